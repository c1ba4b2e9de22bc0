//! The route cache against real memcached servers (testkit): sharing between proxies, `add`
//! semantics, TTLs, purge across servers, ketama placement and failover.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use mailproxy::route::cache::{
    AliasScope, CacheError, CacheKey, MemcachedConfig, PurgeTarget, RouteCache, RouteCacheConfig,
    Tier,
};
use mailproxy::route::{LoginContext, Protocol, Upstream};
use mailproxy_testkit::Memcached;
use mailproxy_testkit::wire::LineClient;

const TTL: Duration = Duration::from_secs(3600);

fn config() -> RouteCacheConfig {
    RouteCacheConfig {
        memcached: MemcachedConfig {
            timeout: Duration::from_millis(500),
            ..MemcachedConfig::default()
        },
        ..RouteCacheConfig::default()
    }
}

fn cache(servers: &[&Memcached]) -> RouteCache {
    let cache = RouteCache::new(config());
    let addrs: Vec<String> = servers.iter().map(|server| server.addr()).collect();
    cache.set_servers(&addrs).unwrap();
    cache
}

fn client() -> IpAddr {
    "192.0.2.10".parse().unwrap()
}

fn upstream(n: u16) -> Upstream {
    Upstream::new(format!("10.0.0.{n}"), 7143)
}

/// `get` straight from one server, bypassing the cache's ring.
fn raw_get(server: &Memcached, key: &str) -> Option<String> {
    let mut client = LineClient::connect(server.port()).unwrap();
    client.send(format!("get {key}\r\n")).unwrap();
    let line = client.line().unwrap();
    if line == "END" {
        return None;
    }
    let len: usize = line.rsplit(' ').next().unwrap().parse().unwrap();
    let data = client.bytes(len + 2).unwrap();
    assert_eq!(client.line().unwrap(), "END");
    Some(String::from_utf8(data[..len].to_vec()).unwrap())
}

/// `set` straight onto one server, as a proxy with another server list would have written it.
fn raw_set(server: &Memcached, key: &str, value: &str) {
    let mut client = LineClient::connect(server.port()).unwrap();
    client
        .send(format!("set {key} 0 3600 {}\r\n{value}\r\n", value.len()))
        .unwrap();
    assert_eq!(client.line().unwrap(), "STORED");
}

fn key(protocol: Protocol, user: &str) -> String {
    CacheKey::route_user(protocol, user, client())
        .unwrap()
        .to_string()
}

/// Polls until `done` holds, failing after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_proxies_share_routes_and_the_first_writer_wins() {
    let server = Memcached::start().unwrap();
    let proxy_a = cache(&[&server]);
    let proxy_b = cache(&[&server]);
    assert_eq!(proxy_a.tier(), Tier::Memcached);

    let user = "alice@example.com";
    assert_eq!(
        proxy_b
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap(),
        None
    );
    assert!(
        proxy_a
            .put_route(Protocol::Imap, user, client(), &upstream(1), TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        proxy_b
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap(),
        Some(upstream(1))
    );
    // memcached `add`: the second writer does not replace the first.
    assert!(
        !proxy_b
            .put_route(Protocol::Imap, user, client(), &upstream(2), TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        proxy_a
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap(),
        Some(upstream(1))
    );
    // Zimbra's key and value, readable by Zimbra's nginx.
    assert_eq!(
        raw_get(&server, "route:proto=imap;user=alice@example.com").as_deref(),
        Some("10.0.0.1:7143")
    );
    // Other protocols are other entries.
    assert_eq!(
        proxy_b
            .get_route(Protocol::Pop3, user, client())
            .await
            .unwrap(),
        None
    );

    // An unqualified login is cached per client address.
    assert!(
        proxy_a
            .put_route(Protocol::Pop3, "bob", client(), &upstream(3), TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        raw_get(&server, "route:proto=pop3;user=bob@192.0.2.10").as_deref(),
        Some("10.0.0.3:7143")
    );
    let elsewhere: IpAddr = "198.51.100.1".parse().unwrap();
    assert_eq!(
        proxy_b
            .get_route(Protocol::Pop3, "bob", elsewhere)
            .await
            .unwrap(),
        None
    );

    // Web routes by account id, and aliases.
    let v6 = Upstream::new("2001:db8::5", 8080);
    assert!(
        proxy_a
            .put_route_by_id(Protocol::Http, "id-7", &v6, TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        proxy_b
            .get_route_by_id(Protocol::Http, "id-7")
            .await
            .unwrap(),
        Some(v6)
    );
    assert_eq!(
        raw_get(&server, "route:proto=http;id=id-7").as_deref(),
        Some("[2001:db8::5]:8080")
    );
    let proxy_ip: IpAddr = "10.9.0.1".parse().unwrap();
    assert!(
        proxy_a
            .put_alias("al", AliasScope::ProxyIp(proxy_ip), user, TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        proxy_b
            .get_alias("al", AliasScope::ProxyIp(proxy_ip))
            .await
            .unwrap()
            .as_deref(),
        Some(user)
    );
    assert_eq!(
        raw_get(&server, "alias:user=al;ip=10.9.0.1").as_deref(),
        Some(user)
    );
    assert!(
        proxy_b
            .delete_alias("al", AliasScope::ProxyIp(proxy_ip))
            .await
            .unwrap()
    );
    assert_eq!(
        proxy_a
            .get_alias("al", AliasScope::ProxyIp(proxy_ip))
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn deleted_routes_are_gone_for_every_proxy() {
    let server = Memcached::start().unwrap();
    let proxy_a = cache(&[&server]);
    let proxy_b = cache(&[&server]);
    let user = "carol@example.com";
    proxy_a
        .put_route(Protocol::Imap, user, client(), &upstream(1), TTL)
        .await
        .unwrap();
    assert!(
        proxy_b
            .delete_route(Protocol::Imap, user, client())
            .await
            .unwrap()
    );
    assert!(
        !proxy_b
            .delete_route(Protocol::Imap, user, client())
            .await
            .unwrap()
    );
    assert_eq!(
        proxy_a
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap(),
        None
    );
    // The account may have moved: a new route can be cached now.
    assert!(
        proxy_a
            .put_route(Protocol::Imap, user, client(), &upstream(2), TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        proxy_b
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap(),
        Some(upstream(2))
    );

    // What a session calls after the upstream refused a login.
    let proxy_ip: IpAddr = "10.9.0.1".parse().unwrap();
    let login = LoginContext {
        user: "carol".into(),
        protocol: Protocol::Imap,
        client_ip: client(),
        proxy_ip: Some(proxy_ip),
        virtual_host: None,
        attempt: 1,
    };
    proxy_a
        .put_route(Protocol::Imap, "carol", client(), &upstream(2), TTL)
        .await
        .unwrap();
    proxy_a
        .put_alias("carol", AliasScope::ProxyIp(proxy_ip), user, TTL)
        .await
        .unwrap();
    proxy_b.forget_login(&login, Some(user)).await.unwrap();
    assert_eq!(
        raw_get(&server, "route:proto=imap;user=carol@192.0.2.10"),
        None
    );
    assert_eq!(
        raw_get(&server, "route:proto=imap;user=carol@example.com"),
        None
    );
    assert_eq!(raw_get(&server, "alias:user=carol;ip=10.9.0.1"), None);
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let server = Memcached::start().unwrap();
    let embedded = RouteCache::new(config());
    let shared = cache(&[&server]);
    let user = "dave@example.com";
    for cache in [&embedded, &shared] {
        let ttl = Duration::from_secs(1);
        assert!(
            cache
                .put_route(Protocol::Imap, user, client(), &upstream(1), ttl)
                .await
                .unwrap()
        );
        let start = Instant::now();
        assert!(
            cache
                .get_route(Protocol::Imap, user, client())
                .await
                .unwrap()
                .is_some()
        );
        // memcached's clock ticks in whole seconds: the entry goes within about two.
        eventually(Duration::from_secs(5), "the entry to expire", || async {
            cache
                .get_route(Protocol::Imap, user, client())
                .await
                .unwrap()
                .is_none()
        })
        .await;
        assert!(start.elapsed() < Duration::from_secs(4));
        // Expired entries do not block a new add.
        assert!(
            cache
                .put_route(Protocol::Imap, user, client(), &upstream(2), TTL)
                .await
                .unwrap()
        );
    }
}

#[tokio::test]
async fn purge_deletes_every_variant_on_every_server() {
    let first = Memcached::start().unwrap();
    let second = Memcached::start().unwrap();
    let proxy = cache(&[&first, &second]);
    let account = "erin@example.com";
    let proxy_ip: IpAddr = "10.9.0.1".parse().unwrap();
    let target = PurgeTarget {
        account: account.into(),
        ids: vec!["id-erin".into()],
        logins: vec!["e.smith@example.com".into()],
        proxy_ips: vec![proxy_ip],
        virtual_hosts: vec!["mail.example.com".into()],
        client_ips: vec![client()],
    };
    let keys = target.keys().unwrap();
    // Every variant on both servers, as proxies with different server lists would leave them.
    for key in &keys {
        raw_set(&first, key.as_str(), "10.0.0.1:7143");
        raw_set(&second, key.as_str(), "10.0.0.1:7143");
    }
    // And through the cache, on the current ring.
    proxy
        .put_route(Protocol::Imap, "erin", client(), &upstream(1), TTL)
        .await
        .unwrap();
    let survivor = key(Protocol::Imap, "frank@example.com");
    raw_set(&first, &survivor, "10.0.0.2:7143");
    raw_set(&second, &survivor, "10.0.0.2:7143");

    let report = proxy.purge(&target).await.unwrap();
    assert!(report.complete(), "{report:?}");
    assert_eq!(report.servers.len(), 2);
    assert_eq!(report.deleted(), 2 * keys.len());
    for key in &keys {
        assert_eq!(
            raw_get(&first, key.as_str()),
            None,
            "{key} left on the first server"
        );
        assert_eq!(
            raw_get(&second, key.as_str()),
            None,
            "{key} left on the second server"
        );
    }
    assert!(raw_get(&first, &survivor).is_some());
    assert!(raw_get(&second, &survivor).is_some());

    // `zmproxypurge <account>`: every protocol, qualified and bare.
    for protocol in Protocol::ALL {
        proxy
            .put_route(protocol, account, client(), &upstream(1), TTL)
            .await
            .unwrap();
        raw_set(
            &second,
            &format!("route:proto={protocol};user=erin"),
            "10.0.0.1:7143",
        );
    }
    let report = proxy.purge_account(account).await.unwrap();
    assert!(report.complete());
    assert_eq!(report.keys.len(), 12);
    for protocol in Protocol::ALL {
        for name in [account, "erin"] {
            let key = format!("route:proto={protocol};user={name}");
            assert_eq!(raw_get(&first, &key), None);
            assert_eq!(raw_get(&second, &key), None);
        }
    }
}

#[tokio::test]
async fn keys_spread_over_servers_and_move_when_one_dies() {
    let mut servers = [
        Memcached::start().unwrap(),
        Memcached::start().unwrap(),
        Memcached::start().unwrap(),
    ];
    let proxy = cache(&[&servers[0], &servers[1], &servers[2]]);
    let users: Vec<String> = (0..90).map(|n| format!("user{n}@example.com")).collect();
    for user in &users {
        proxy
            .put_route(Protocol::Imap, user, client(), &upstream(1), TTL)
            .await
            .unwrap();
    }
    // Each key lives on exactly one server, and every server holds some.
    let mut owner = Vec::new();
    for user in &users {
        let on: Vec<usize> = (0..3)
            .filter(|&i| raw_get(&servers[i], &key(Protocol::Imap, user)).is_some())
            .collect();
        assert_eq!(on.len(), 1, "{user} is on {on:?}");
        owner.push(on[0]);
    }
    for i in 0..3 {
        let held = owner.iter().filter(|&&o| o == i).count();
        assert!(held >= 5, "server {i} holds {held} of 90 keys: {owner:?}");
    }

    servers[1].kill();
    let dead_users: Vec<&String> = users
        .iter()
        .zip(&owner)
        .filter(|(_, o)| **o == 1)
        .map(|(u, _)| u)
        .collect();
    // The first request to the dead server fails (fast: connection refused) and marks it down.
    let started = Instant::now();
    let first = proxy
        .get_route(Protocol::Imap, dead_users[0], client())
        .await;
    assert!(matches!(first, Err(CacheError::Io { .. })), "{first:?}");
    assert!(started.elapsed() < Duration::from_millis(500));

    // The other servers keep their keys.
    for (user, _) in users.iter().zip(&owner).filter(|(_, o)| **o != 1) {
        assert_eq!(
            proxy
                .get_route(Protocol::Imap, user, client())
                .await
                .unwrap(),
            Some(upstream(1)),
            "{user} lost"
        );
    }
    // The dead server's keys miss, and are cached again on the next server of the ring.
    for user in &dead_users {
        assert_eq!(
            proxy
                .get_route(Protocol::Imap, user, client())
                .await
                .unwrap(),
            None
        );
        assert!(
            proxy
                .put_route(Protocol::Imap, user, client(), &upstream(2), TTL)
                .await
                .unwrap()
        );
        assert_eq!(
            proxy
                .get_route(Protocol::Imap, user, client())
                .await
                .unwrap(),
            Some(upstream(2))
        );
        let on: Vec<usize> = [0, 2]
            .into_iter()
            .filter(|&i| raw_get(&servers[i], &key(Protocol::Imap, user)).is_some())
            .collect();
        assert_eq!(on.len(), 1);
    }
    // A second proxy with the same list sends the moved keys to the same place once it has seen
    // the dead server fail too.
    let other = cache(&[&servers[0], &servers[1], &servers[2]]);
    let _ = other
        .get_route(Protocol::Imap, dead_users[0], client())
        .await;
    for user in &dead_users {
        assert_eq!(
            other
                .get_route(Protocol::Imap, user, client())
                .await
                .unwrap(),
            Some(upstream(2))
        );
    }
}

#[tokio::test]
async fn a_killed_memcached_gives_errors_within_the_timeout() {
    let mut server = Memcached::start().unwrap();
    let proxy = cache(&[&server]);
    let user = "gina@example.com";
    proxy
        .put_route(Protocol::Imap, user, client(), &upstream(1), TTL)
        .await
        .unwrap();
    assert!(
        proxy
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap()
            .is_some()
    );
    server.kill();

    let started = Instant::now();
    let error = proxy
        .get_route(Protocol::Imap, user, client())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    assert!(error.to_string().contains(&server.addr()), "{error}");

    // Marked down: later calls fail at once without touching the network.
    let started = Instant::now();
    for _ in 0..100 {
        let error = proxy
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap_err();
        assert!(
            matches!(error, CacheError::NoServer { configured: 1 }),
            "{error}"
        );
        assert!(
            proxy
                .put_route(Protocol::Imap, user, client(), &upstream(1), TTL)
                .await
                .is_err()
        );
    }
    assert!(started.elapsed() < Duration::from_millis(250));
    let report = proxy.purge_account(user).await.unwrap();
    assert!(!report.complete());
    assert!(report.servers[0].error.is_some());
}

#[tokio::test]
async fn long_and_hostile_names_are_hashed_or_escaped() {
    let server = Memcached::start().unwrap();
    let proxy = cache(&[&server]);
    let other = "harry@example.com";
    proxy
        .put_route(Protocol::Imap, other, client(), &upstream(9), TTL)
        .await
        .unwrap();

    let long = format!("{}@example.com", "x".repeat(400));
    assert!(
        proxy
            .put_route(Protocol::Imap, &long, client(), &upstream(1), TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        proxy
            .get_route(Protocol::Imap, &long, client())
            .await
            .unwrap(),
        Some(upstream(1))
    );
    let hashed = CacheKey::route_user(Protocol::Imap, &long, client()).unwrap();
    assert_eq!(hashed.as_str().len(), 32);
    assert_eq!(
        raw_get(&server, hashed.as_str()).as_deref(),
        Some("10.0.0.1:7143")
    );

    // A login that tries to inject commands is one escaped key; the server is not flushed.
    let hostile = "evil\r\nflush_all\r\nset x 0 0 1 @example.com";
    assert!(
        proxy
            .put_route(Protocol::Imap, hostile, client(), &upstream(2), TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        proxy
            .get_route(Protocol::Imap, hostile, client())
            .await
            .unwrap(),
        Some(upstream(2))
    );
    assert_eq!(
        raw_get(
            &server,
            "route:proto=imap;user=evil%0D%0Aflush_all%0D%0Aset%20x%200%200%201%20@example.com"
        )
        .as_deref(),
        Some("10.0.0.2:7143")
    );
    assert_eq!(
        proxy
            .get_route(Protocol::Imap, other, client())
            .await
            .unwrap(),
        Some(upstream(9))
    );
    let error = proxy
        .get_route(Protocol::Imap, "", client())
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "a route cache key needs a non-empty login"
    );
}

#[tokio::test]
async fn server_list_changes_at_runtime() {
    let server = Memcached::start().unwrap();
    let proxy = RouteCache::new(config());
    assert_eq!(proxy.tier(), Tier::Embedded);
    let user = "iris@example.com";
    proxy
        .put_route(Protocol::Imap, user, client(), &upstream(1), TTL)
        .await
        .unwrap();
    assert!(
        proxy
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(raw_get(&server, &key(Protocol::Imap, user)), None);

    proxy.set_servers(&[server.addr()]).unwrap();
    assert_eq!(proxy.tier(), Tier::Memcached);
    assert_eq!(proxy.servers(), vec![server.addr()]);
    assert_eq!(
        proxy
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap(),
        None
    );
    proxy
        .put_route(Protocol::Imap, user, client(), &upstream(2), TTL)
        .await
        .unwrap();
    assert_eq!(
        raw_get(&server, &key(Protocol::Imap, user)).as_deref(),
        Some("10.0.0.2:7143")
    );

    let error = proxy
        .set_servers(&[server.addr(), "bad host:1".to_string()])
        .unwrap_err();
    assert!(error.to_string().contains("bad host:1"), "{error}");
    assert_eq!(proxy.servers(), vec![server.addr()]);

    // Back to embedded: the entries cached there before memcached are not resurrected.
    proxy.set_servers::<String>(&[]).unwrap();
    assert_eq!(proxy.tier(), Tier::Embedded);
    assert_eq!(
        proxy
            .get_route(Protocol::Imap, user, client())
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn garbage_values_are_errors_and_are_removed() {
    let server = Memcached::start().unwrap();
    let proxy = cache(&[&server]);
    let route_key = key(Protocol::Imap, "jack@example.com");
    raw_set(&server, &route_key, "not an address");
    let error = proxy
        .get_route(Protocol::Imap, "jack@example.com", client())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("is not an upstream address"),
        "{error}"
    );
    assert_eq!(raw_get(&server, &route_key), None);
    let alias_key = "alias:user=jack;vhost=mail.example.com";
    raw_set(&server, alias_key, "bad\u{7}name");
    assert!(
        proxy
            .get_alias("jack", AliasScope::VirtualHost("mail.example.com"))
            .await
            .is_err()
    );
    assert_eq!(raw_get(&server, alias_key), None);
}
