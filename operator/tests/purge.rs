//! The purge of a deleted MailboxServer's cached routes, against a real memcached.

use std::time::Duration;

use mailproxy_operator::mailbox_server::purge::{purge, route_keys};
use mailproxy_testkit::Memcached;
use mailproxy_testkit::wire::LineClient;

fn set(client: &mut LineClient, key: &str) {
    client
        .send(format!("set {key} 0 3600 13\r\n10.0.0.5:7143\r\n"))
        .unwrap();
    assert_eq!(client.line().unwrap(), "STORED");
}

fn get(client: &mut LineClient, key: &str) -> bool {
    client.send(format!("get {key}\r\n")).unwrap();
    let first = client.line().unwrap();
    if first == "END" {
        return false;
    }
    client.line().unwrap();
    assert_eq!(client.line().unwrap(), "END");
    true
}

#[tokio::test]
async fn every_protocol_route_of_the_servers_accounts_is_deleted_and_others_stay() {
    let memcached = Memcached::start().unwrap();
    let mut client = LineClient::connect(memcached.port()).unwrap();
    let keys = route_keys(&["Alice@Example.com".into(), "bob@example.com".into()]);
    for key in &keys[..4] {
        set(&mut client, key);
    }
    let unrelated = "route:proto=imap;user=carol@example.com";
    set(&mut client, unrelated);

    let purged = purge(&memcached.addr(), &keys, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(purged.deleted, 4);
    assert_eq!(purged.not_found, keys.len() - 4);
    for key in &keys {
        assert!(!get(&mut client, key), "{key} was not purged");
    }
    assert!(get(&mut client, unrelated), "an unrelated route was purged");
}

#[tokio::test]
async fn a_silent_memcached_is_given_up_after_the_timeout() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let _accepting = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let started = std::time::Instant::now();
    let error = purge(
        &addr,
        &route_keys(&["a@example.com".into()]),
        Duration::from_millis(500),
    )
    .await
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(error.to_string().contains("did not answer"), "{error}");
}
