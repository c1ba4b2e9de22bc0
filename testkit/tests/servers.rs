//! The test kit's servers are real and usable: a message appended over IMAP is read back over
//! IMAP and POP3, memcached stores and returns a key, nginx with the mail module serves.

use mailproxy_testkit::wire::LineClient;
use mailproxy_testkit::{Dovecot, Memcached, Nginx, free_port};

const MESSAGE: &str =
    "From: a@example.com\r\nTo: alice@example.com\r\nSubject: testkit hello\r\n\r\nbody line\r\n";

#[test]
fn dovecot_serves_an_appended_message_over_imap_and_pop3() {
    let dovecot = Dovecot::start().unwrap();

    let mut imap = LineClient::connect(dovecot.imap_port()).unwrap();
    assert!(imap.line().unwrap().starts_with("* OK"), "IMAP greeting");
    imap.imap_ok("a1", "LOGIN alice@example.com secret")
        .unwrap();
    imap.send(format!("a2 APPEND INBOX {{{}}}\r\n", MESSAGE.len()))
        .unwrap();
    assert!(
        imap.line().unwrap().starts_with('+'),
        "literal continuation"
    );
    imap.send(format!("{MESSAGE}\r\n")).unwrap();
    let appended = imap.until("a2 ").unwrap();
    assert!(
        appended.last().unwrap().starts_with("a2 OK"),
        "{appended:?}"
    );
    let select = imap.imap_ok("a3", "SELECT INBOX").unwrap();
    assert!(select.iter().any(|l| l == "* 1 EXISTS"), "{select:?}");
    let fetch = imap
        .imap_ok("a4", "FETCH 1 BODY[HEADER.FIELDS (SUBJECT)]")
        .unwrap();
    assert!(
        fetch.iter().any(|l| l == "Subject: testkit hello"),
        "{fetch:?}"
    );
    imap.imap_ok("a5", "LOGOUT").unwrap();

    let mut pop3 = LineClient::connect(dovecot.pop3_port()).unwrap();
    assert!(pop3.line().unwrap().starts_with("+OK"), "POP3 greeting");
    pop3.pop3_ok("USER alice@example.com").unwrap();
    pop3.pop3_ok("PASS secret").unwrap();
    assert!(pop3.pop3_ok("STAT").unwrap().starts_with("+OK 1 "));
    pop3.pop3_ok("RETR 1").unwrap();
    let retr = pop3.until(".").unwrap();
    assert!(
        retr.iter().any(|l| l == "Subject: testkit hello"),
        "{retr:?}"
    );
    pop3.pop3_ok("QUIT").unwrap();

    let mut wrong = LineClient::connect(dovecot.imap_port()).unwrap();
    wrong.line().unwrap();
    wrong.send("b1 LOGIN alice@example.com wrong\r\n").unwrap();
    assert!(
        wrong
            .until("b1 ")
            .unwrap()
            .last()
            .unwrap()
            .starts_with("b1 NO")
    );
    assert!(
        dovecot.log().contains("user=<alice@example.com>"),
        "{}",
        dovecot.log()
    );
}

#[test]
fn memcached_stores_and_returns_a_key() {
    let mut memcached = Memcached::start().unwrap();
    let mut client = LineClient::connect(memcached.port()).unwrap();
    let value = "10.0.0.5:7143";
    client
        .send(format!(
            "set route:proto=imap;user=alice@example.com 0 60 {}\r\n{value}\r\n",
            value.len()
        ))
        .unwrap();
    assert_eq!(client.line().unwrap(), "STORED");
    client
        .send("get route:proto=imap;user=alice@example.com\r\n")
        .unwrap();
    assert_eq!(
        client.line().unwrap(),
        format!(
            "VALUE route:proto=imap;user=alice@example.com 0 {}",
            value.len()
        )
    );
    assert_eq!(client.bytes(value.len()).unwrap(), value.as_bytes());
    assert_eq!(client.line().unwrap(), "");
    assert_eq!(client.line().unwrap(), "END");

    let port = memcached.port();
    memcached.kill();
    assert!(
        LineClient::connect(port).is_err(),
        "a killed memcached refuses connections"
    );
}

#[test]
fn nginx_starts_with_the_mail_module_loaded() {
    let port = free_port();
    let nginx = Nginx::start(
        &format!("http {{ server {{ listen 127.0.0.1:{port}; return 200 \"ok\\n\"; }} }}"),
        &[port],
    )
    .unwrap();
    let mut client = LineClient::connect(port).unwrap();
    client.send("GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(client.line().unwrap().starts_with("HTTP/1.1 200"));
    assert!(nginx.pid().is_some());
}
