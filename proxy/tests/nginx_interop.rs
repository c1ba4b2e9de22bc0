//! Interoperability with a peer nobody here wrote: stock nginx's mail proxy uses
//! `mailproxy lookupd` as its `auth_http` server, and real IMAP and POP3 logins through nginx
//! land on the Dovecot the directory names.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use mailproxy::lookupd::{Lookupd, LookupdConfig, RequestOutcome};
use mailproxy::route::lookup::{AuthMethod, LookupClient, LookupClientConfig, LookupOutcome};
use mailproxy::route::{LoginContext, Protocol, Route, Upstream};
use mailproxy_testkit::wire::LineClient;
use mailproxy_testkit::{Dovecot, Nginx, free_ports};
use tokio::net::TcpListener;

fn table(one: &Dovecot, two: &Dovecot) -> String {
    format!(
        r#"{{"servers": {{
            "dove-1": {{"host": "127.0.0.1", "ports": {{"imap": {}, "pop3": {}}}}},
            "dove-2": {{"host": "localhost", "ports": {{"imap": {}, "pop3": {}}}}}
        }}}}"#,
        one.imap_port(),
        one.pop3_port(),
        two.imap_port(),
        two.pop3_port()
    )
}

const DIRECTORY: &str = "default-domain example.com\n\
                         account alice dove-1\n\
                         account bob dove-2\n";

const SECRET: &str = "interop-secret";

fn imap_login(port: u16, user: &str, password: &str) -> anyhow::Result<LineClient> {
    let mut client = LineClient::connect(port)?;
    let greeting = client.line()?;
    anyhow::ensure!(greeting.starts_with("* OK"), "greeting {greeting:?}");
    client.imap_ok("a1", &format!("LOGIN {user} {password}"))?;
    Ok(client)
}

fn imap_append(client: &mut LineClient, tag: &str, message: &str) -> anyhow::Result<()> {
    client.send(format!("{tag} APPEND INBOX {{{}}}\r\n", message.len()))?;
    let continuation = client.line()?;
    anyhow::ensure!(
        continuation.starts_with('+'),
        "no continuation: {continuation:?}"
    );
    client.send(format!("{message}\r\n"))?;
    let lines = client.until(&format!("{tag} "))?;
    let done = lines.last().map(String::as_str).unwrap_or_default();
    anyhow::ensure!(done.starts_with(&format!("{tag} OK")), "APPEND: {lines:?}");
    Ok(())
}

fn pop3_login(port: u16, user: &str, password: &str) -> anyhow::Result<LineClient> {
    let mut client = LineClient::connect(port)?;
    let greeting = client.line()?;
    anyhow::ensure!(greeting.starts_with("+OK"), "greeting {greeting:?}");
    client.pop3_ok(&format!("USER {user}"))?;
    client.pop3_ok(&format!("PASS {password}"))?;
    Ok(client)
}

/// RETR 1, returned without the final `.` line.
fn pop3_first_message(client: &mut LineClient) -> anyhow::Result<Vec<String>> {
    client.pop3_ok("RETR 1")?;
    let mut lines = client.until(".")?;
    lines.pop();
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_nginx_routes_imap_and_pop3_logins_through_lookupd() {
    let (one, two) = tokio::task::spawn_blocking(|| {
        (
            Dovecot::start().expect("dovecot #1"),
            Dovecot::start().expect("dovecot #2"),
        )
    })
    .await
    .unwrap();
    let files = tempfile::tempdir().unwrap();
    let table_path = files.path().join("routes.json");
    let directory_path = files.path().join("directory.txt");
    std::fs::write(&table_path, table(&one, &two)).unwrap();
    std::fs::write(&directory_path, DIRECTORY).unwrap();
    let mut config = LookupdConfig::new(table_path);
    config.directory = Some(directory_path);
    let secret_path = files.path().join("secret");
    std::fs::write(&secret_path, SECRET).unwrap();
    config.secret_file = Some(secret_path);
    config.refusal_wait = Duration::from_secs(1);
    let lookupd = Lookupd::new(config).unwrap();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let lookup_port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = lookupd.clone();
    let serving = tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    });
    let url = format!("http://127.0.0.1:{lookup_port}/service/extension/nginx-lookup");

    // Our own client and nginx must agree on what lookupd says.
    let client = LookupClient::new(LookupClientConfig {
        handlers: vec![url.parse().unwrap()],
        secret: Some(SECRET.to_string()),
        system_roots: false,
        ..LookupClientConfig::default()
    })
    .unwrap();
    assert_eq!(
        client
            .lookup(
                &LoginContext {
                    user: "bob".to_string(),
                    protocol: Protocol::Pop3,
                    client_ip: IpAddr::from([198, 51, 100, 9]),
                    proxy_ip: None,
                    virtual_host: None,
                    attempt: 1,
                },
                AuthMethod::Username,
            )
            .await
            .unwrap(),
        LookupOutcome::Found {
            route: Route {
                upstream: Upstream::new("127.0.0.1", two.pop3_port()),
                account: Some("bob@example.com".to_string()),
            },
            cache_alias: true,
        }
    );

    let [imap, pop3] = free_ports();
    let body = format!(
        "mail {{\n\
           auth_http 127.0.0.1:{lookup_port}/service/extension/nginx-lookup;\n\
           auth_http_header X-Mailproxy-Lookup-Secret {SECRET};\n\
           proxy on;\n\
           imap_auth plain login;\n\
           pop3_auth plain;\n\
           server {{ listen 127.0.0.1:{imap}; protocol imap; }}\n\
           server {{ listen 127.0.0.1:{pop3}; protocol pop3; }}\n\
         }}\n",
    );
    let password = one.password().to_string();
    let (one, two, nginx) = tokio::task::spawn_blocking(move || {
        let nginx = Nginx::start(&body, &[imap, pop3]).expect("nginx with the mail module");

        let mut alice = imap_login(imap, "alice", &password).expect("alice logs in over IMAP");
        alice.imap_ok("a2", "CREATE FromAlice").unwrap();
        imap_append(&mut alice, "a3", "Subject: for alice\r\n\r\nhello alice").unwrap();
        alice.imap_ok("a4", "LOGOUT").unwrap();

        let mut bob = imap_login(imap, "bob", &password).expect("bob logs in over IMAP");
        imap_append(&mut bob, "b2", "Subject: for bob\r\n\r\nhello bob").unwrap();
        bob.imap_ok("b3", "LOGOUT").unwrap();

        let mut bob = pop3_login(pop3, "bob", &password).expect("bob logs in over POP3");
        let stat = bob.pop3_ok("STAT").unwrap();
        assert!(stat.starts_with("+OK 1 "), "bob has one message: {stat}");
        let message = pop3_first_message(&mut bob).unwrap();
        assert!(
            message.contains(&"Subject: for bob".to_string()),
            "{message:?}"
        );
        bob.pop3_ok("QUIT").unwrap();

        let mut alice = pop3_login(pop3, "alice", &password).expect("alice logs in over POP3");
        let message = pop3_first_message(&mut alice).unwrap();
        assert!(
            message.contains(&"Subject: for alice".to_string()),
            "{message:?}"
        );
        alice.pop3_ok("QUIT").unwrap();

        // lookupd refuses an unknown account; nginx waits Auth-Wait and says NO.
        let mut mallory = LineClient::connect(imap).unwrap();
        mallory.line().unwrap();
        mallory.send("m1 LOGIN mallory secret\r\n").unwrap();
        let refusal = mallory.until("m1 ").unwrap();
        assert!(
            refusal.last().unwrap().starts_with("m1 NO"),
            "unknown account refused: {refusal:?}"
        );
        (one, two, nginx)
    })
    .await
    .unwrap();

    let (log_one, log_two) = (one.log(), two.log());
    for (log, here, elsewhere) in [
        (&log_one, "alice@example.com", "bob@example.com"),
        (&log_two, "bob@example.com", "alice@example.com"),
    ] {
        for service in ["imap-login", "pop3-login"] {
            let login = format!("Login: user=<{here}>");
            assert!(
                log.lines()
                    .any(|line| line.contains(service) && line.contains(&login)),
                "{service} {login} missing: {log}"
            );
        }
        assert!(
            !log.contains(&format!("user=<{elsewhere}>")),
            "{elsewhere} on the wrong server: {log}"
        );
    }
    assert!(one.maildir("alice@example.com").join(".FromAlice").is_dir());
    assert!(!two.maildir("alice@example.com").exists());
    assert!(two.maildir("bob@example.com").is_dir());
    assert!(!one.maildir("bob@example.com").exists());
    assert_eq!(
        lookupd.requests(RequestOutcome::Found),
        5,
        "our client once, nginx four times: {}",
        nginx.error_log()
    );
    assert_eq!(lookupd.requests(RequestOutcome::Refused), 1);
    assert_eq!(lookupd.requests(RequestOutcome::Forbidden), 0);
    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
