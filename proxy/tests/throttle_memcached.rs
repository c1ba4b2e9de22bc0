//! Login throttling against a real memcached (testkit): IP and user windows shared by proxies,
//! per-protocol overrides, whitelists, and logins allowed when memcached is unavailable.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use mailproxy::route::Protocol;
use mailproxy::route::cache::{MemcachedConfig, RouteCache, RouteCacheConfig};
use mailproxy::route::throttle::{LoginThrottle, ThrottleDecision};
use mailproxy_crds::settings::LoginLimits;
use mailproxy_testkit::Memcached;
use mailproxy_testkit::wire::LineClient;

use ThrottleDecision::{Allowed, RejectedIp, RejectedUser};

const TIMEOUT: Duration = Duration::from_millis(300);

fn cache(servers: &[String]) -> RouteCache {
    let cache = RouteCache::new(RouteCacheConfig {
        memcached: MemcachedConfig {
            timeout: TIMEOUT,
            ..MemcachedConfig::default()
        },
        ..RouteCacheConfig::default()
    });
    cache.set_servers(servers).unwrap();
    cache
}

fn throttle(server: &Memcached, limits: &LoginLimits) -> LoginThrottle {
    LoginThrottle::new(limits, cache(&[server.addr()])).unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn raw_get(server: &Memcached, key: &str) -> Option<String> {
    let mut client = LineClient::connect(server.port()).unwrap();
    client.send(format!("get {key}\r\n")).unwrap();
    let line = client.line().unwrap();
    if line == "END" {
        return None;
    }
    let value = client.line().unwrap();
    assert_eq!(client.line().unwrap(), "END");
    Some(value)
}

fn raw_set(server: &Memcached, key: &str, value: &str) {
    let mut client = LineClient::connect(server.port()).unwrap();
    client
        .send(format!("set {key} 0 300 {}\r\n{value}\r\n", value.len()))
        .unwrap();
    assert_eq!(client.line().unwrap(), "STORED");
}

#[tokio::test]
async fn ip_limit_counts_every_mail_protocol_together_across_proxies() {
    let server = Memcached::start().unwrap();
    let limits = LoginLimits {
        ip_limit: 3,
        ..LoginLimits::default()
    };
    let proxy_a = throttle(&server, &limits);
    let proxy_b = throttle(&server, &limits);
    assert!(proxy_a.enabled());
    let client = ip("192.0.2.1");
    assert_eq!(proxy_a.check_ip(Protocol::Imap, client).await, Allowed);
    assert_eq!(proxy_b.check_ip(Protocol::Pop3, client).await, Allowed);
    assert_eq!(proxy_a.check_ip(Protocol::ImapSsl, client).await, Allowed);
    assert_eq!(
        proxy_b.check_ip(Protocol::Pop3Ssl, client).await,
        RejectedIp
    );
    assert_eq!(proxy_a.check_ip(Protocol::Imap, client).await, RejectedIp);
    assert_eq!(
        raw_get(&server, "throttle:ip=192.0.2.1").as_deref(),
        Some("5")
    );
    // Other clients have their own count; web logins are not throttled here.
    assert_eq!(
        proxy_a.check_ip(Protocol::Imap, ip("192.0.2.2")).await,
        Allowed
    );
    assert_eq!(proxy_a.check_ip(Protocol::Http, client).await, Allowed);
    // A v4-mapped address is the same client.
    assert_eq!(
        proxy_a
            .check_ip(Protocol::Imap, ip("::ffff:192.0.2.1"))
            .await,
        RejectedIp
    );
}

#[tokio::test]
async fn a_protocol_limit_overrides_the_ip_limit_for_that_protocol() {
    let server = Memcached::start().unwrap();
    let proxy = throttle(
        &server,
        &LoginLimits {
            ip_limit: 100,
            imap_ip_limit: 2,
            ..LoginLimits::default()
        },
    );
    let client = ip("198.51.100.7");
    assert_eq!(proxy.check_ip(Protocol::Imap, client).await, Allowed);
    assert_eq!(proxy.check_ip(Protocol::ImapSsl, client).await, Allowed);
    assert_eq!(proxy.check_ip(Protocol::Imap, client).await, RejectedIp);
    for _ in 0..5 {
        assert_eq!(proxy.check_ip(Protocol::Pop3, client).await, Allowed);
    }
    assert_eq!(
        raw_get(&server, "throttle:proto=i,ip=198.51.100.7").as_deref(),
        Some("3")
    );
    assert_eq!(
        raw_get(&server, "throttle:ip=198.51.100.7").as_deref(),
        Some("5")
    );

    // And the POP3 one, the same way; limits change at runtime.
    proxy
        .set_limits(&LoginLimits {
            pop3_ip_limit: 1,
            ..LoginLimits::default()
        })
        .unwrap();
    let other = ip("198.51.100.8");
    assert_eq!(proxy.check_ip(Protocol::Pop3, other).await, Allowed);
    assert_eq!(proxy.check_ip(Protocol::Pop3Ssl, other).await, RejectedIp);
    assert_eq!(proxy.check_ip(Protocol::Imap, other).await, Allowed);
    assert_eq!(
        raw_get(&server, "throttle:proto=p,ip=198.51.100.8").as_deref(),
        Some("2")
    );
}

#[tokio::test]
async fn windows_are_fixed_and_end_with_their_ttl() {
    let server = Memcached::start().unwrap();
    let proxy = throttle(
        &server,
        &LoginLimits {
            ip_limit: 1,
            ip_window_seconds: 1,
            ..LoginLimits::default()
        },
    );
    let client = ip("203.0.113.5");
    assert_eq!(proxy.check_ip(Protocol::Imap, client).await, Allowed);
    assert_eq!(proxy.check_ip(Protocol::Imap, client).await, RejectedIp);
    let deadline = Instant::now() + Duration::from_secs(5);
    // Each rejected attempt counts too, but does not extend the window.
    while proxy.check_ip(Protocol::Imap, client).await == RejectedIp {
        assert!(Instant::now() < deadline, "the window never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn whitelisted_ips_are_never_throttled() {
    let server = Memcached::start().unwrap();
    let proxy = throttle(
        &server,
        &LoginLimits {
            ip_limit: 1,
            whitelist: vec!["10.20.0.0/16".into(), "2001:db8::1".into()],
            ..LoginLimits::default()
        },
    );
    for _ in 0..5 {
        assert_eq!(
            proxy.check_ip(Protocol::Imap, ip("10.20.3.4")).await,
            Allowed
        );
        assert_eq!(
            proxy.check_ip(Protocol::Pop3, ip("2001:db8::1")).await,
            Allowed
        );
    }
    // Whitelisted in memcached (`whitelist:ip=<ip>` = 1), as Zimbra's nginx reads it.
    raw_set(&server, "whitelist:ip=192.0.2.50", "1");
    raw_set(&server, "whitelist:ip=192.0.2.51", "0");
    for _ in 0..5 {
        assert_eq!(
            proxy.check_ip(Protocol::Imap, ip("192.0.2.50")).await,
            Allowed
        );
    }
    assert_eq!(
        proxy.check_ip(Protocol::Imap, ip("192.0.2.51")).await,
        Allowed
    );
    assert_eq!(
        proxy.check_ip(Protocol::Imap, ip("192.0.2.51")).await,
        RejectedIp
    );

    let error = LoginThrottle::new(
        &LoginLimits {
            whitelist: vec!["10.0.0.0/40".into()],
            ..LoginLimits::default()
        },
        cache(&[server.addr()]),
    )
    .err()
    .unwrap();
    assert!(error.to_string().contains("\"10.0.0.0/40\""), "{error}");
}

#[tokio::test]
async fn users_are_checked_before_routing_and_counted_after_login() {
    let server = Memcached::start().unwrap();
    let limits = LoginLimits {
        user_limit: 2,
        ..LoginLimits::default()
    };
    let proxy_a = throttle(&server, &limits);
    let proxy_b = throttle(&server, &limits);
    let user = "kate@example.com";
    // Checking does not count: only successful logins do.
    for _ in 0..5 {
        assert_eq!(proxy_a.check_user(user).await, Allowed);
    }
    proxy_a.count_user(user).await;
    assert_eq!(proxy_b.check_user(user).await, Allowed);
    proxy_b.count_user(user).await;
    assert_eq!(proxy_a.check_user(user).await, RejectedUser);
    assert_eq!(proxy_b.check_user(user).await, RejectedUser);
    assert_eq!(
        raw_get(&server, "throttle:user=kate@example.com").as_deref(),
        Some("2")
    );
    assert_eq!(proxy_a.check_user("liam@example.com").await, Allowed);
    // No IP limit is set: connections are not counted.
    assert_eq!(
        proxy_a.check_ip(Protocol::Imap, ip("192.0.2.1")).await,
        Allowed
    );
    assert_eq!(raw_get(&server, "throttle:ip=192.0.2.1"), None);
}

#[tokio::test]
async fn logins_are_allowed_when_memcached_is_unavailable() {
    let mut server = Memcached::start().unwrap();
    let limits = LoginLimits {
        ip_limit: 1,
        user_limit: 1,
        ..LoginLimits::default()
    };
    let proxy = throttle(&server, &limits);
    let client = ip("192.0.2.9");
    assert_eq!(proxy.check_ip(Protocol::Imap, client).await, Allowed);
    assert_eq!(proxy.check_ip(Protocol::Imap, client).await, RejectedIp);
    proxy.count_user("mia@example.com").await;
    assert_eq!(proxy.check_user("mia@example.com").await, RejectedUser);

    server.kill();
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(proxy.check_ip(Protocol::Imap, client).await, Allowed);
        assert_eq!(proxy.check_user("mia@example.com").await, Allowed);
        proxy.count_user("mia@example.com").await;
    }
    assert!(started.elapsed() < TIMEOUT, "took {:?}", started.elapsed());

    // A memcached that accepts connections but never answers costs one timeout per server,
    // then nothing.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap().to_string();
    let proxy = LoginThrottle::new(&limits, cache(&[hung_addr])).unwrap();
    let started = Instant::now();
    assert_eq!(proxy.check_ip(Protocol::Pop3, client).await, Allowed);
    assert_eq!(proxy.check_user("mia@example.com").await, Allowed);
    assert!(
        started.elapsed() < TIMEOUT * 3,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn throttling_is_off_by_default_and_touches_no_cache() {
    // Any cache access would wait for this silent server.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = LoginThrottle::new(
        &LoginLimits::default(),
        cache(&[hung.local_addr().unwrap().to_string()]),
    )
    .unwrap();
    assert!(!proxy.enabled());
    let started = Instant::now();
    for _ in 0..100 {
        assert_eq!(
            proxy.check_ip(Protocol::Imap, ip("192.0.2.1")).await,
            Allowed
        );
        assert_eq!(proxy.check_user("noah@example.com").await, Allowed);
        proxy.count_user("noah@example.com").await;
    }
    assert!(started.elapsed() < Duration::from_millis(250));
}

#[tokio::test]
async fn the_embedded_cache_throttles_a_proxy_without_memcached() {
    let proxy = LoginThrottle::new(
        &LoginLimits {
            pop3_ip_limit: 2,
            user_limit: 1,
            ..LoginLimits::default()
        },
        RouteCache::new(RouteCacheConfig::default()),
    )
    .unwrap();
    let client = ip("192.0.2.77");
    assert_eq!(proxy.check_ip(Protocol::Pop3, client).await, Allowed);
    assert_eq!(proxy.check_ip(Protocol::Pop3, client).await, Allowed);
    assert_eq!(proxy.check_ip(Protocol::Pop3, client).await, RejectedIp);
    proxy.count_user("olga@example.com").await;
    assert_eq!(proxy.check_user("olga@example.com").await, RejectedUser);
}
