//! The memcached tier against servers that misbehave: silent, garbling, closing. Each fake is a
//! raw TCP server on a loopback port speaking whatever the test tells it to.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mailproxy::route::cache::{CacheError, MemcachedConfig, RouteCache, RouteCacheConfig};
use mailproxy::route::throttle::{LoginThrottle, ThrottleDecision};
use mailproxy::route::{Protocol, Upstream};
use mailproxy_crds::settings::LoginLimits;
use mailproxy_testkit::Memcached;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_millis(300);
const USER: &str = "alice@example.com";
const KEY: &str = "route:proto=imap;user=alice@example.com";

enum Action {
    Reply(Vec<u8>),
    /// Answer after a while (a busy server).
    ReplyAfter(Duration, Vec<u8>),
    ReplyAndClose(Vec<u8>),
    /// Read on, never answer.
    Hang,
    Close,
}

struct Fake {
    addr: String,
    connections: Arc<AtomicUsize>,
}

/// A TCP server that answers each request line as `respond` says.
async fn fake(respond: impl Fn(&str) -> Action + Send + Sync + 'static) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let respond = Arc::clone(&respond);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match respond(&line) {
                        Action::Reply(bytes) => {
                            if write.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Action::ReplyAfter(delay, bytes) => {
                            tokio::time::sleep(delay).await;
                            if write.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Action::ReplyAndClose(bytes) => {
                            let _ = write.write_all(&bytes).await;
                            return;
                        }
                        Action::Hang => {}
                        Action::Close => return,
                    }
                }
            });
        }
    });
    Fake { addr, connections }
}

fn cache(servers: &[&str], retry_interval: Duration) -> RouteCache {
    let cache = RouteCache::new(RouteCacheConfig {
        memcached: MemcachedConfig {
            timeout: TIMEOUT,
            retry_interval,
            ..MemcachedConfig::default()
        },
        ..RouteCacheConfig::default()
    });
    cache.set_servers(servers).unwrap();
    cache
}

/// A cache that keeps every connection idle for reuse, so that the connections a server saw
/// opened are the most ever in use at once.
fn keeping_every_connection(server: &str, timeout: Duration) -> RouteCache {
    let cache = RouteCache::new(RouteCacheConfig {
        memcached: MemcachedConfig {
            timeout,
            max_idle_connections: 200,
            ..MemcachedConfig::default()
        },
        ..RouteCacheConfig::default()
    });
    cache.set_servers(&[server]).unwrap();
    cache
}

/// The server answers the next request: it is not (or no longer) marked down.
async fn assert_answers(cache: &RouteCache) {
    let route = cache.get_route(Protocol::Imap, USER, client()).await;
    assert_eq!(route.unwrap(), None, "the server answers");
}

fn client() -> IpAddr {
    "192.0.2.10".parse().unwrap()
}

fn metrics(cache: &RouteCache) -> String {
    let mut registry = Registry::default();
    cache.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

#[tokio::test]
async fn a_hung_server_costs_one_timeout_then_nothing() {
    let hung = fake(|_| Action::Hang).await;
    let proxy = cache(&[&hung.addr], Duration::from_secs(60));

    let started = Instant::now();
    let error = proxy
        .get_route(Protocol::Imap, USER, client())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(error, CacheError::Timeout { .. }), "{error}");
    assert!((TIMEOUT..TIMEOUT * 3).contains(&took), "took {took:?}");
    assert_eq!(
        error.to_string(),
        format!("memcached {}: no reply within 300ms", hung.addr)
    );

    let started = Instant::now();
    let put = proxy
        .put_route(
            Protocol::Imap,
            USER,
            client(),
            &Upstream::new("10.0.0.1", 7143),
            Duration::from_secs(60),
        )
        .await;
    assert!(matches!(put, Err(CacheError::NoServer { .. })), "{put:?}");
    assert!(started.elapsed() < Duration::from_millis(150));
    let text = metrics(&proxy);
    assert!(
        text.contains(&format!(
            "route_cache_memcached_server_up{{server=\"{}\"}} 0",
            hung.addr
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "route_cache_memcached_server_errors_total{{server=\"{}\",kind=\"timeout\"}} 1",
        hung.addr
    )));
    assert!(text.contains("route_cache_lookups_total{tier=\"memcached\",result=\"error\"} 1"));
}

#[tokio::test]
async fn concurrent_callers_of_a_hung_server_all_return_in_time() {
    let hung = fake(|_| Action::Hang).await;
    let proxy = cache(&[&hung.addr], Duration::from_secs(60));
    let started = Instant::now();
    let calls = (0..20).map(|n| {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            proxy
                .get_route(Protocol::Imap, &format!("user{n}@example.com"), client())
                .await
        })
    });
    for result in futures::future::join_all(calls).await {
        assert!(result.unwrap().is_err());
    }
    assert!(
        started.elapsed() < TIMEOUT * 3,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_hung_server_among_healthy_ones_loses_only_its_keys() {
    let hung = fake(|_| Action::Hang).await;
    let healthy = Memcached::start().unwrap();
    let proxy = cache(&[&hung.addr, &healthy.addr()], Duration::from_secs(60));
    let ttl = Duration::from_secs(60);
    let upstream = Upstream::new("10.0.0.1", 7143);
    let mut timeouts = 0;
    for n in 0..40 {
        let user = format!("user{n}@example.com");
        match proxy
            .put_route(Protocol::Imap, &user, client(), &upstream, ttl)
            .await
        {
            Ok(_) => {}
            Err(CacheError::Timeout { .. }) => timeouts += 1,
            Err(other) => panic!("{other}"),
        }
        // Whatever the ring said, every key is now on the healthy server.
        if proxy
            .get_route(Protocol::Imap, &user, client())
            .await
            .unwrap()
            .is_none()
        {
            proxy
                .put_route(Protocol::Imap, &user, client(), &upstream, ttl)
                .await
                .unwrap();
            assert!(
                proxy
                    .get_route(Protocol::Imap, &user, client())
                    .await
                    .unwrap()
                    .is_some()
            );
        }
    }
    assert_eq!(timeouts, 1, "the hung server cost more than one timeout");
}

#[tokio::test]
async fn a_server_marked_down_is_tried_again_after_the_retry_interval() {
    let answering = Arc::new(AtomicBool::new(false));
    let switch = Arc::clone(&answering);
    let server = fake(move |_| {
        if switch.load(Ordering::SeqCst) {
            Action::Reply(b"END\r\n".to_vec())
        } else {
            Action::Hang
        }
    })
    .await;
    let proxy = cache(&[&server.addr], Duration::from_millis(200));
    assert!(
        proxy
            .get_route(Protocol::Imap, USER, client())
            .await
            .is_err()
    );
    assert!(matches!(
        proxy.get_route(Protocol::Imap, USER, client()).await,
        Err(CacheError::NoServer { .. })
    ));
    answering.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_answers(&proxy).await;
    assert!(metrics(&proxy).contains(&format!(
        "route_cache_memcached_server_up{{server=\"{}\"}} 1",
        server.addr
    )));
}

#[tokio::test]
async fn malformed_replies_are_clear_errors() {
    let oversized = format!("VALUE {KEY} 0 999999999\r\n");
    // What the server sends, whether it then closes, and what the error must say.
    let cases: Vec<(Vec<u8>, bool, &str)> = vec![
        (b"HELLO\r\n".to_vec(), false, "unexpected reply \"HELLO\""),
        (
            b"VALUE route:proto=imap;user=mallory@example.com 0 1\r\nx\r\nEND\r\n".to_vec(),
            false,
            "but the request was for",
        ),
        (
            oversized.into_bytes(),
            false,
            "value of 999999999 bytes is over the 65536-byte limit",
        ),
        (vec![b'A'; 5000], false, "reply line longer than 1024 bytes"),
        (
            b"END\r\nEND\r\n".to_vec(),
            false,
            "unexpected data after the reply",
        ),
        (b"END\n".to_vec(), false, "does not end in CRLF"),
        (
            format!("VALUE {KEY} zero 2\r\nab\r\nEND\r\n").into_bytes(),
            false,
            "malformed VALUE line",
        ),
        (
            format!("VALUE {KEY} 0 2\r\nabc\r\nEND\r\n").into_bytes(),
            false,
            "value data not followed by CRLF",
        ),
        (
            b"VALUE \xff\xfe\r\n".to_vec(),
            false,
            "malformed VALUE line",
        ),
        (
            format!("VALUE {KEY} 0 10\r\nabc").into_bytes(),
            true,
            "connection closed before a complete reply",
        ),
        (
            Vec::new(),
            true,
            "connection closed before a complete reply",
        ),
    ];
    for (reply, close, expected) in cases {
        let server = fake(move |_| match (close, reply.is_empty()) {
            (false, _) => Action::Reply(reply.clone()),
            (true, true) => Action::Close,
            (true, false) => Action::ReplyAndClose(reply.clone()),
        })
        .await;
        let proxy = cache(&[&server.addr], Duration::from_secs(60));
        let started = Instant::now();
        let error = proxy
            .get_route(Protocol::Imap, USER, client())
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < TIMEOUT,
            "{expected}: waited for the timeout"
        );
        let text = error.to_string();
        assert!(
            text.contains(expected),
            "expected {expected:?}, got {text:?}"
        );
        assert!(
            text.starts_with(&format!("memcached {}: ", server.addr)),
            "{text}"
        );
        // A server that garbles is skipped from then on.
        assert!(matches!(
            proxy.get_route(Protocol::Imap, USER, client()).await,
            Err(CacheError::NoServer { .. })
        ));
    }
}

#[tokio::test]
async fn refusals_fail_the_request_but_keep_the_server() {
    let server =
        fake(|_| Action::Reply(b"SERVER_ERROR out of memory storing object\r\n".to_vec())).await;
    let proxy = cache(&[&server.addr], Duration::from_secs(60));
    for _ in 0..3 {
        let error = proxy
            .get_route(Protocol::Imap, USER, client())
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("server answered \"SERVER_ERROR out of memory storing object\""),
            "{error}"
        );
    }
}

#[tokio::test]
async fn connections_are_reused() {
    let server = fake(|_| Action::Reply(b"END\r\n".to_vec())).await;
    let proxy = cache(&[&server.addr], Duration::from_secs(60));
    for _ in 0..50 {
        assert_answers(&proxy).await;
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_pooled_connection_closed_by_the_server_is_replaced_silently() {
    // Every connection answers once, then the server closes it (as a restarted memcached would
    // have closed the pool's idle connections).
    let server = fake(|_| Action::ReplyAndClose(b"END\r\n".to_vec())).await;
    let proxy = cache(&[&server.addr], Duration::from_secs(60));
    for _ in 0..5 {
        assert_answers(&proxy).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 5);
}

/// A login storm against a slow memcached opens at most 64 connections from one proxy (memcached
/// refuses past its own limit, shared by the whole pool); the requests beyond wait their turn.
#[tokio::test]
async fn connections_to_a_server_are_capped_and_the_others_wait() {
    let server = fake(|_| Action::ReplyAfter(Duration::from_millis(50), b"END\r\n".to_vec())).await;
    let proxy = keeping_every_connection(&server.addr, Duration::from_secs(5));
    let lookups = (0..200).map(|_| proxy.get_route(Protocol::Imap, USER, client()));
    for result in futures::future::join_all(lookups).await {
        assert_eq!(result.unwrap(), None);
    }
    let opened = server.connections.load(Ordering::SeqCst);
    assert!((1..=64).contains(&opened), "{opened} connections");
}

/// An increment whose connection broke after it was sent may have been counted: it is not sent
/// again (a login would count twice), and the failure does not stop the login.
#[tokio::test]
async fn a_broken_increment_is_not_sent_twice() {
    let increments = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&increments);
    let server = fake(move |line| {
        if line.starts_with("incr") {
            if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                return Action::Close;
            }
            return Action::Reply(b"2\r\n".to_vec());
        }
        Action::Reply(b"END\r\n".to_vec())
    })
    .await;
    let proxy = cache(&[&server.addr], Duration::from_secs(60));
    let limits = LoginLimits {
        ip_limit: 10,
        ..LoginLimits::default()
    };
    let throttle = LoginThrottle::new(&limits, proxy.clone()).unwrap();
    // The whitelist read leaves an idle connection; the count goes out on it.
    assert_eq!(
        throttle.check_ip(Protocol::Imap, client()).await,
        ThrottleDecision::Allowed
    );
    assert_eq!(increments.load(Ordering::SeqCst), 1);
    // A server that closed an idle connection is not down: the next request goes to it.
    assert_answers(&proxy).await;
}

/// Requests that queue for a connection past their deadline fail as "busy", and the time one
/// waited for its connection does not count against the server: a storm on a slow but healthy
/// memcached never marks it down.
#[tokio::test]
async fn a_queue_for_connections_is_not_a_dead_server() {
    let server =
        fake(|_| Action::ReplyAfter(Duration::from_millis(150), b"END\r\n".to_vec())).await;
    let proxy = keeping_every_connection(&server.addr, Duration::from_millis(400));
    let lookups = (0..320).map(|_| proxy.get_route(Protocol::Imap, USER, client()));
    let mut busy = 0;
    for result in futures::future::join_all(lookups).await {
        match result {
            Ok(route) => assert_eq!(route, None),
            Err(CacheError::Busy { .. }) => busy += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert!(busy > 0, "the queue was longer than the deadline");
    assert_answers(&proxy).await;
}

/// The same for a login count, whose increment and creation share one deadline: the wait for a
/// connection before the increment is not charged to the creation that follows.
#[tokio::test]
async fn a_queue_for_connections_does_not_fail_the_counts_that_follow() {
    let server = fake(|line| {
        if line == "1" {
            // The data line of `add`: answered with the command.
            return Action::Hang;
        }
        let answer: &[u8] = if line.starts_with("incr") {
            b"NOT_FOUND\r\n"
        } else if line.starts_with("add") {
            b"STORED\r\n"
        } else {
            b"END\r\n"
        };
        Action::ReplyAfter(Duration::from_millis(150), answer.to_vec())
    })
    .await;
    let proxy = keeping_every_connection(&server.addr, Duration::from_millis(400));
    let limits = LoginLimits {
        ip_limit: 1000,
        ..LoginLimits::default()
    };
    let throttle = LoginThrottle::new(&limits, proxy.clone()).unwrap();
    let logins = (0..200).map(|_| throttle.check_ip(Protocol::Imap, client()));
    for decision in futures::future::join_all(logins).await {
        assert_eq!(decision, ThrottleDecision::Allowed);
    }
    assert_answers(&proxy).await;
}
