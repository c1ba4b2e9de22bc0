//! Route resolution end to end, against a real memcached and real `mailproxy lookupd` handlers:
//! the resolution order, the fleet-wide cache, TTL, purge, memcached failure and coalescing.
//! Lookups by account id go to the web tests' handler (lookupd answers by name only).

mod http_support;
mod lookup_support;

use std::sync::Arc;
use std::time::Duration;

use lookup_support::{DIRECTORY, Files, RunningLookupd, TABLE, eventually, login};
use mailproxy::dns::Dns;
use mailproxy::lookupd::RequestOutcome;
use mailproxy::route::cache::{AliasScope, RouteCache, RouteCacheConfig};
use mailproxy::route::lookup::{AuthMethod, LookupClient, LookupClientConfig, LookupOutcome};
use mailproxy::route::resolver::{ResolveError, Resolver, RouteSource};
use mailproxy::route::table::TableHandle;
use mailproxy::route::{LoginContext, Protocol, Upstream};
use mailproxy_crds::route_table::RouteTable;
use mailproxy_testkit::Memcached;

/// The proxy's own route table: lookup handlers, memcached servers, a pinned account and a
/// domain fallback.
fn proxy_table(handlers: &[String], memcached: &[String], ttl_seconds: u64) -> RouteTable {
    let mut table = RouteTable::from_json(
        r#"{
            "servers": {
                "pinned-server": {"host": "10.9.9.9", "ports": {"imap": 9143, "pop3": 9110}},
                "domain-server": {"host": "10.8.8.8", "ports": {"imap": 8143}}
            },
            "accounts": {"vip@example.com": "pinned-server"},
            "domains": {"fallback.example": "domain-server"}
        }"#,
    )
    .unwrap();
    table.lookup_handlers = handlers.to_vec();
    table.memcached_servers = memcached.to_vec();
    table.settings.cache_ttl_seconds = ttl_seconds;
    table.settings.lookup_timeout_seconds = 2;
    table
}

/// One proxy instance: its own cache client, lookup client and resolver.
fn proxy(table: RouteTable) -> Resolver {
    let lookup = LookupClient::new(LookupClientConfig::default()).unwrap();
    let resolver = Resolver::new(
        TableHandle::fixed(table),
        RouteCache::new(RouteCacheConfig::default()),
        Arc::new(lookup),
        Dns::from_system_config(),
    );
    resolver.follow_table();
    resolver
}

fn found(handler: &RunningLookupd) -> u64 {
    handler.lookupd.requests(RequestOutcome::Found)
}

#[tokio::test]
async fn a_route_learned_by_one_proxy_is_served_to_another_from_memcached() {
    let memcached = Memcached::start().unwrap();
    let files = Files::new(TABLE, DIRECTORY);
    let handler = RunningLookupd::start(files.config()).await;
    let table = proxy_table(&[handler.url()], &[memcached.addr()], 3600);

    let first = proxy(table.clone());
    let resolved = first
        .resolve(&login("alice@example.com", Protocol::Imap))
        .await
        .unwrap();
    assert_eq!(resolved.source, RouteSource::Lookup);
    assert_eq!(resolved.route.upstream, Upstream::new("127.0.0.1", 1143));
    assert_eq!(found(&handler), 1);

    let second = proxy(table);
    let resolved = second
        .resolve(&login("alice@example.com", Protocol::Imap))
        .await
        .unwrap();
    assert_eq!(resolved.source, RouteSource::Cache);
    assert_eq!(resolved.route.upstream, Upstream::new("127.0.0.1", 1143));
    assert_eq!(found(&handler), 1, "the second proxy asked no handler");

    let pop3 = second
        .resolve(&login("alice@example.com", Protocol::Pop3))
        .await
        .unwrap();
    assert_eq!(
        pop3.source,
        RouteSource::Lookup,
        "routes are cached per protocol"
    );
    assert_eq!(pop3.route.upstream.port, 1110);
}

#[tokio::test]
async fn cached_routes_expire_with_the_table_ttl_and_a_purge_removes_them() {
    let memcached = Memcached::start().unwrap();
    let files = Files::new(TABLE, DIRECTORY);
    let handler = RunningLookupd::start(files.config()).await;
    let resolver = proxy(proxy_table(&[handler.url()], &[memcached.addr()], 1));
    let alice = login("alice@example.com", Protocol::Imap);

    assert_eq!(
        resolver.resolve(&alice).await.unwrap().source,
        RouteSource::Lookup
    );
    assert_eq!(
        resolver.resolve(&alice).await.unwrap().source,
        RouteSource::Cache
    );
    let cache = resolver.cache().clone();
    eventually(
        "the 1 s TTL to expire the route",
        Duration::from_secs(5),
        async || {
            let cached = cache
                .get_route(Protocol::Imap, "alice@example.com", alice.client_ip)
                .await
                .unwrap();
            cached.is_none().then_some(())
        },
    )
    .await;
    assert_eq!(
        resolver.resolve(&alice).await.unwrap().source,
        RouteSource::Lookup
    );
    assert_eq!(found(&handler), 2);

    let long_lived = proxy(proxy_table(&[handler.url()], &[memcached.addr()], 3600));
    let bob = login("bob@example.com", Protocol::Imap);
    long_lived.resolve(&bob).await.unwrap();
    long_lived
        .resolve(&login("bob@example.com", Protocol::Pop3))
        .await
        .unwrap();
    assert_eq!(
        long_lived.resolve(&bob).await.unwrap().source,
        RouteSource::Cache
    );
    let report = long_lived
        .cache()
        .purge_account("bob@example.com")
        .await
        .unwrap();
    assert!(report.complete(), "{report:?}");
    assert!(
        report.deleted() >= 2,
        "both protocols' routes deleted: {report:?}"
    );
    assert_eq!(
        long_lived.resolve(&bob).await.unwrap().source,
        RouteSource::Lookup
    );
}

#[tokio::test]
async fn logins_still_resolve_when_memcached_dies() {
    let mut memcached = Memcached::start().unwrap();
    let files = Files::new(TABLE, DIRECTORY);
    let handler = RunningLookupd::start(files.config()).await;
    let resolver = proxy(proxy_table(&[handler.url()], &[memcached.addr()], 3600));
    let alice = login("alice@example.com", Protocol::Imap);
    assert_eq!(
        resolver.resolve(&alice).await.unwrap().source,
        RouteSource::Lookup
    );
    assert_eq!(
        resolver.resolve(&alice).await.unwrap().source,
        RouteSource::Cache
    );

    memcached.kill();
    for _ in 0..3 {
        let resolved = tokio::time::timeout(Duration::from_secs(10), resolver.resolve(&alice))
            .await
            .expect("a dead memcached never hangs a login")
            .expect("a dead memcached never fails a login");
        assert_eq!(resolved.source, RouteSource::Lookup);
        assert_eq!(resolved.route.upstream, Upstream::new("127.0.0.1", 1143));
    }
}

#[tokio::test]
async fn a_thousand_concurrent_logins_of_a_cold_account_send_one_lookup() {
    let files = Files::new(TABLE, DIRECTORY);
    let handler = RunningLookupd::start(files.config()).await;
    for memcached in [None, Some(Memcached::start().unwrap())] {
        let servers: Vec<String> = memcached.iter().map(Memcached::addr).collect();
        let resolver = proxy(proxy_table(&[handler.url()], &servers, 3600));
        let user = format!(
            "storm-{}@example.com",
            if memcached.is_some() {
                "memcached"
            } else {
                "embedded"
            }
        );
        files.write_directory(&format!("{DIRECTORY}account {user} mbs-2\n"));
        let probe = login(&user, Protocol::Imap);
        // A probe outside the resolver, so that the account stays cold in the proxy's cache.
        let client = LookupClient::new(LookupClientConfig {
            handlers: vec![handler.url().parse().unwrap()],
            ..LookupClientConfig::default()
        })
        .unwrap();
        eventually(
            "lookupd to load the new account",
            Duration::from_secs(5),
            async || {
                let outcome = client.lookup(&probe, AuthMethod::Username).await;
                matches!(outcome, Ok(LookupOutcome::Found { .. })).then_some(())
            },
        )
        .await;
        let baseline = found(&handler);

        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let resolver = resolver.clone();
                let login = login(&user, Protocol::Imap);
                tokio::spawn(async move { resolver.resolve(&login).await })
            })
            .collect();
        for task in tasks {
            let resolved = task.await.unwrap().unwrap();
            assert_eq!(resolved.route.upstream.port, 2143);
        }
        assert_eq!(
            found(&handler) - baseline,
            1,
            "1,000 concurrent logins of one cold account made one handler request (memcached: {})",
            memcached.is_some()
        );
    }
}

#[tokio::test]
async fn a_thousand_concurrent_resolves_of_a_cold_account_id_send_one_lookup() {
    let backend: std::net::SocketAddr = "127.0.0.1:8443".parse().unwrap();
    for memcached in [None, Some(Memcached::start().unwrap())] {
        let id = format!("id-storm-{}", memcached.is_some());
        let handler = http_support::Handler::start(
            Default::default(),
            [(id.clone(), backend)].into_iter().collect(),
        )
        .await;
        let servers: Vec<String> = memcached.iter().map(Memcached::addr).collect();
        let resolver = proxy(proxy_table(&[handler.url()], &servers, 3600));

        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let resolver = resolver.clone();
                let login = login(&id, Protocol::Http);
                tokio::spawn(async move { resolver.resolve_account_id(&login).await })
            })
            .collect();
        for task in tasks {
            let resolved = task.await.unwrap().unwrap();
            assert_eq!(resolved.route.upstream, Upstream::new("127.0.0.1", 8443));
        }
        let asked = handler.asked();
        assert_eq!(
            asked.len(),
            1,
            "1,000 concurrent resolves of one cold account id made one handler request \
             (memcached: {})",
            memcached.is_some()
        );
        assert_eq!(asked[0].method, "zimbraId");
        assert_eq!(asked[0].user, id);
    }
}

#[tokio::test]
async fn the_table_pins_first_and_the_domain_entry_is_the_last_resort() {
    let files = Files::new(TABLE, DIRECTORY);
    let handler = RunningLookupd::start(files.config()).await;
    let resolver = proxy(proxy_table(&[handler.url()], &[], 3600));

    let vip = resolver
        .resolve(&login("VIP@example.com", Protocol::Pop3))
        .await
        .unwrap();
    assert_eq!(vip.source, RouteSource::TableAccount);
    assert_eq!(vip.route.upstream, Upstream::new("10.9.9.9", 9110));
    assert_eq!(vip.server.as_deref(), Some("pinned-server"));
    assert_eq!(
        handler.lookupd.requests(RequestOutcome::Found)
            + handler.lookupd.requests(RequestOutcome::Refused),
        0
    );

    let unknown = resolver
        .resolve(&login("nobody@fallback.example", Protocol::Imap))
        .await
        .unwrap();
    assert_eq!(
        unknown.source,
        RouteSource::TableDomain,
        "a refused lookup falls back to the domain"
    );
    assert_eq!(unknown.route.upstream, Upstream::new("10.8.8.8", 8143));
    assert_eq!(handler.lookupd.requests(RequestOutcome::Refused), 1);

    let refused = resolver
        .resolve(&login("nobody@example.net", Protocol::Imap))
        .await
        .unwrap_err();
    match refused {
        ResolveError::Refused { wait, .. } => assert_eq!(wait, Duration::from_secs(10)),
        other => panic!("expected the handler's refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn with_every_handler_down_the_domain_entry_routes_and_others_get_a_clear_error() {
    let dead = format!(
        "http://127.0.0.1:{}/service/extension/nginx-lookup",
        mailproxy_testkit::free_port()
    );
    let resolver = proxy(proxy_table(&[dead], &[], 3600));
    let fallback = resolver
        .resolve(&login("a@fallback.example", Protocol::Imap))
        .await
        .unwrap();
    assert_eq!(fallback.source, RouteSource::TableDomain);
    let error = resolver
        .resolve(&login("a@example.com", Protocol::Imap))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ResolveError::Unavailable { reason } if reason.contains("every Route Lookup Handler failed")),
        "{error:?}"
    );
}

/// A draining server at 10.0.0.9 (Zimbra's default ports), a serving one at 10.8.8.8 and a
/// domain entry on the serving one.
fn drain_table(handlers: &[String], memcached: &[String]) -> RouteTable {
    let mut table = RouteTable::from_json(
        r#"{
            "servers": {
                "old": {"host": "10.0.0.9", "draining": true},
                "new": {"host": "10.8.8.8"}
            },
            "domains": {"fallback.example": "new"}
        }"#,
    )
    .unwrap();
    table.lookup_handlers = handlers.to_vec();
    table.memcached_servers = memcached.to_vec();
    table
}

const ON_OLD: &str = "10.0.0.9";
const ON_NEW: &str = "10.8.8.8";

fn at(host: &str, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(host.parse().unwrap(), port)
}

#[tokio::test]
async fn a_route_cached_before_a_drain_is_deleted_and_the_login_resolved_again() {
    let handler = http_support::Handler::start(
        [("moved@example.com".to_string(), at(ON_NEW, 7143))].into(),
        [("id-moved".to_string(), at(ON_NEW, 8080))].into(),
    )
    .await;
    for memcached in [None, Some(Memcached::start().unwrap())] {
        let servers: Vec<String> = memcached.iter().map(Memcached::addr).collect();
        let resolver = proxy(drain_table(&[handler.url()], &servers));
        let cache = resolver.cache();
        let hour = Duration::from_secs(3600);
        let old_imap = Upstream::new(ON_OLD, 7143);

        // Learned by lookup before the drain; the handler now knows better.
        let moved = login("moved@example.com", Protocol::Imap);
        cache
            .put_route(
                moved.protocol,
                &moved.user,
                moved.client_ip,
                &old_imap,
                hour,
            )
            .await
            .unwrap();
        let resolved = resolver.resolve(&moved).await.unwrap();
        assert_eq!(resolved.source, RouteSource::Lookup);
        assert_eq!(resolved.route.upstream, Upstream::new(ON_NEW, 7143));
        assert_eq!(resolved.server.as_deref(), Some("new"));

        // The handler does not know it: the domain entry routes, and the stale entry is gone.
        let alice = login("alice@fallback.example", Protocol::Imap);
        cache
            .put_route(
                alice.protocol,
                &alice.user,
                alice.client_ip,
                &old_imap,
                hour,
            )
            .await
            .unwrap();
        let resolved = resolver.resolve(&alice).await.unwrap();
        assert_eq!(resolved.source, RouteSource::TableDomain);
        assert_eq!(resolved.server.as_deref(), Some("new"));
        assert_eq!(
            cache
                .get_route(alice.protocol, &alice.user, alice.client_ip)
                .await
                .unwrap(),
            None,
            "the route to the draining server is deleted (memcached: {})",
            memcached.is_some()
        );

        // Web routing by account id.
        let id = login("id-moved", Protocol::Http);
        cache
            .put_route_by_id(id.protocol, &id.user, &Upstream::new(ON_OLD, 8080), hour)
            .await
            .unwrap();
        let resolved = resolver.resolve_account_id(&id).await.unwrap();
        assert_eq!(resolved.source, RouteSource::Lookup);
        assert_eq!(resolved.route.upstream, Upstream::new(ON_NEW, 8080));
    }
}

/// Resolves `login`, whose mailbox is on the draining server `old`: it must fail as
/// unavailable, since no other server can take it, and leave no route in the cache.
async fn assert_unavailable_on_old(resolver: &Resolver, login: &LoginContext) {
    let error = resolver.resolve(login).await.unwrap_err();
    assert!(
        matches!(&error, ResolveError::Unavailable { reason } if reason.contains("on old, which is draining")),
        "the mailbox is on the draining server, so no other server can take it: {error:?}"
    );
    assert_eq!(
        resolver
            .cache()
            .get_route(login.protocol, &login.user, login.client_ip)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn a_lookup_answer_naming_a_draining_server_is_not_used_nor_cached() {
    let handler = http_support::Handler::start(
        [("leaving@fallback.example".to_string(), at(ON_OLD, 7143))].into(),
        [("id-leaving".to_string(), at(ON_OLD, 8080))].into(),
    )
    .await;
    let resolver = proxy(drain_table(&[handler.url()], &[]));

    assert_unavailable_on_old(
        &resolver,
        &login("leaving@fallback.example", Protocol::Imap),
    )
    .await;

    let id = login("id-leaving", Protocol::Http);
    let error = resolver.resolve_account_id(&id).await.unwrap_err();
    assert!(
        matches!(&error, ResolveError::Unavailable { reason } if reason.contains("draining")),
        "{error:?}"
    );
    assert_eq!(
        resolver
            .cache()
            .get_route_by_id(id.protocol, &id.user)
            .await
            .unwrap(),
        None
    );
}

/// A Route Lookup Handler that qualifies `john` as Zimbra's does, by the domain bound to the
/// virtual host (web) or else the proxy address (mail) the client came to, and answers no request
/// before `together` have arrived (or 5 s have passed): logins started together are then
/// certainly in flight at the same time.
struct QualifyingHandler {
    url: String,
    asked: tokio::sync::watch::Sender<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for QualifyingHandler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl QualifyingHandler {
    /// `domains`: X-Proxy-Host, else X-Proxy-IP, to the account `john` stands for there and
    /// its server.
    async fn start(domains: &[(&str, &str, std::net::SocketAddr)], together: usize) -> Self {
        use http_body_util::Empty;
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}{}",
            listener.local_addr().unwrap(),
            mailproxy_crds::route_table::LOOKUP_PATH
        );
        let domains: Arc<Vec<(String, String, std::net::SocketAddr)>> = Arc::new(
            domains
                .iter()
                .map(|(arrival, account, server)| {
                    (arrival.to_string(), account.to_string(), *server)
                })
                .collect(),
        );
        let (asked, _) = tokio::sync::watch::channel(0);
        let counter = asked.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let domains = domains.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: http::Request<hyper::body::Incoming>| {
                            let domains = domains.clone();
                            let counter = counter.clone();
                            async move {
                                let header = |name: &str| {
                                    request
                                        .headers()
                                        .get(name)
                                        .and_then(|value| value.to_str().ok())
                                        .map(str::to_string)
                                };
                                let arrival = header("x-proxy-host")
                                    .or_else(|| header("x-proxy-ip"))
                                    .unwrap_or_default();
                                let mut all_in = counter.subscribe();
                                counter.send_modify(|asked| *asked += 1);
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(5),
                                    all_in.wait_for(|asked| *asked >= together),
                                )
                                .await;
                                let mut response =
                                    http::Response::new(Empty::<bytes::Bytes>::new());
                                let headers = response.headers_mut();
                                match domains.iter().find(|(at, ..)| *at == arrival) {
                                    Some((_, account, server)) => {
                                        headers.insert("auth-status", "OK".parse().unwrap());
                                        headers.insert(
                                            "auth-server",
                                            server.ip().to_string().parse().unwrap(),
                                        );
                                        headers.insert(
                                            "auth-port",
                                            server.port().to_string().parse().unwrap(),
                                        );
                                        headers.insert("auth-user", account.parse().unwrap());
                                        headers.insert("auth-cache-alias", "TRUE".parse().unwrap());
                                    }
                                    None => {
                                        headers
                                            .insert("auth-status", "login failed".parse().unwrap());
                                        headers.insert("auth-wait", "0".parse().unwrap());
                                    }
                                }
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { url, asked, task }
    }

    fn asked(&self) -> usize {
        *self.asked.borrow()
    }
}

/// Resolves `john` arriving two ways at once (`arrive` sets one of `arrivals` on the login)
/// against a handler that qualifies it by how it arrived, and checks that each login reaches
/// its own account on its own port, with a lookup each.
async fn short_name_arriving_two_ways(
    protocol: Protocol,
    arrivals: [&str; 2],
    ports: [u16; 2],
    arrive: fn(&mut LoginContext, &str),
) {
    let accounts = ["john@a.example", "john@b.example"];
    let handler = QualifyingHandler::start(
        &[
            (arrivals[0], accounts[0], at("127.0.0.1", ports[0])),
            (arrivals[1], accounts[1], at("127.0.0.1", ports[1])),
        ],
        2,
    )
    .await;
    let mut table = proxy_table(std::slice::from_ref(&handler.url), &[], 3600);
    // Longer than the handler holds a lone request: one shared lookup then shows as a login
    // routed to the other account rather than as a timeout.
    table.settings.lookup_timeout_seconds = 15;
    let resolver = proxy(table);
    let mut to_a = login("john", protocol);
    arrive(&mut to_a, arrivals[0]);
    let mut to_b = to_a.clone();
    arrive(&mut to_b, arrivals[1]);

    let (on_a, on_b) = tokio::join!(resolver.resolve(&to_a), resolver.resolve(&to_b));
    let (on_a, on_b) = (on_a.unwrap(), on_b.unwrap());
    assert_eq!(on_a.route.account.as_deref(), Some(accounts[0]));
    assert_eq!(on_a.route.upstream.port, ports[0]);
    assert_eq!(on_b.route.account.as_deref(), Some(accounts[1]));
    assert_eq!(on_b.route.upstream.port, ports[1]);
    assert_eq!(handler.asked(), 2);
}

#[tokio::test]
async fn the_same_short_name_on_two_proxy_addresses_at_once_reaches_two_accounts() {
    short_name_arriving_two_ways(
        Protocol::Imap,
        ["10.1.2.3", "10.1.2.4"],
        [1143, 2143],
        |login, proxy_ip| login.proxy_ip = Some(proxy_ip.parse().unwrap()),
    )
    .await;
}

#[tokio::test]
async fn the_same_short_name_on_two_virtual_hosts_at_once_reaches_two_accounts() {
    short_name_arriving_two_ways(
        Protocol::Http,
        ["mail.a.example", "mail.b.example"],
        [8080, 9080],
        |login, host| login.virtual_host = Some(host.to_string()),
    )
    .await;
}

/// lookupd refuses an account whose server is draining and says so in its refusal: the proxy
/// must not fall back to the domain's server, where the mailbox does not live.
#[tokio::test]
async fn an_account_on_a_draining_server_is_unavailable_rather_than_sent_to_its_domain() {
    let files = Files::new(TABLE, DIRECTORY);
    let handler = RunningLookupd::start(files.config()).await;
    let mut table = proxy_table(&[handler.url()], &[], 3600);
    table
        .domains
        .insert("example.com".to_string(), "domain-server".to_string());
    let resolver = proxy(table);

    assert_unavailable_on_old(&resolver, &login("leaving@example.com", Protocol::Imap)).await;
    assert_eq!(handler.lookupd.requests(RequestOutcome::Draining), 1);

    // An account lookupd does not know still falls back to the domain entry.
    let resolved = resolver
        .resolve(&login("stranger@example.com", Protocol::Imap))
        .await
        .unwrap();
    assert_eq!(resolved.source, RouteSource::TableDomain);
    assert_eq!(resolved.server.as_deref(), Some("domain-server"));
}

/// Handlers answer with IP addresses; a MailboxServer named by a host name is still recognised,
/// by what its name resolves to and its ports: its settings apply and its drain holds.
#[tokio::test]
async fn a_learned_route_finds_its_server_by_the_address_of_the_servers_host_name() {
    let handler = http_support::Handler::start(
        [
            ("staying@example.com".to_string(), at("127.0.0.1", 7143)),
            ("leaving@example.com".to_string(), at("127.0.0.1", 8143)),
        ]
        .into(),
        [].into(),
    )
    .await;
    let mut table = RouteTable::from_json(
        r#"{
            "servers": {
                "named": {"host": "localhost", "ports": {"imap": 7143}},
                "old": {"host": "localhost", "ports": {"imap": 8143}, "draining": true},
                "new": {"host": "10.8.8.8"}
            },
            "domains": {"example.com": "new"}
        }"#,
    )
    .unwrap();
    table.lookup_handlers = vec![handler.url()];
    let resolver = proxy(table);
    let staying = Upstream::new("127.0.0.1", 7143);
    assert_eq!(
        resolver
            .server_at(&staying, Protocol::Imap)
            .await
            .as_deref(),
        Some("named")
    );

    let resolved = resolver
        .resolve(&login("staying@example.com", Protocol::Imap))
        .await
        .unwrap();
    assert_eq!(resolved.source, RouteSource::Lookup);
    assert_eq!(resolved.route.upstream, staying);
    assert_eq!(resolved.server.as_deref(), Some("named"));
    assert_eq!(
        resolver
            .server_at(&Upstream::new("127.0.0.1", 9999), Protocol::Imap)
            .await,
        None,
        "an address of the servers on none of their ports is neither of them"
    );

    assert_unavailable_on_old(&resolver, &login("leaving@example.com", Protocol::Imap)).await;
}

/// An account pinned to a draining server: its mailbox is there, so the login is unavailable,
/// not sent to its domain's server.
#[tokio::test]
async fn an_account_pinned_to_a_draining_server_is_unavailable() {
    let mut table = drain_table(&[], &[]);
    table
        .accounts
        .insert("pinned@fallback.example".to_string(), "old".to_string());
    let resolver = proxy(table);
    assert_unavailable_on_old(&resolver, &login("Pinned@fallback.example", Protocol::Imap)).await;
}

/// Right after start the table's host names are not resolved yet: a login routed to one of
/// their addresses waits for them, rather than going there without its server's settings (TLS
/// upstream, drain).
#[tokio::test]
async fn a_login_right_after_start_is_matched_to_its_server_by_host_name() {
    let table = RouteTable::from_json(
        r#"{"servers": {"named": {"host": "localhost", "ports": {"imap": 7143}}}}"#,
    )
    .unwrap();
    let resolver = proxy(table);
    let bob = login("bob@example.com", Protocol::Imap);
    resolver
        .cache()
        .put_route(
            bob.protocol,
            &bob.user,
            bob.client_ip,
            &Upstream::new("127.0.0.1", 7143),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    // Nothing above yielded to the task resolving the names.
    let resolved = resolver.resolve(&bob).await.unwrap();
    assert_eq!(resolved.source, RouteSource::Cache);
    assert_eq!(resolved.server.as_deref(), Some("named"));
}

/// `cacheTtlSeconds: 0` turns the route cache off: every login asks a handler, and nothing is
/// stored (memcached would keep an entry with expiry 0 for ever).
#[tokio::test]
async fn a_zero_ttl_caches_nothing() {
    let files = Files::new(TABLE, DIRECTORY);
    let lookupd = RunningLookupd::start(files.config()).await;
    let ids = http_support::Handler::start(
        [].into(),
        [("id-alice".to_string(), at("127.0.0.1", 8080))].into(),
    )
    .await;
    for memcached in [None, Some(Memcached::start().unwrap())] {
        let servers: Vec<String> = memcached.iter().map(Memcached::addr).collect();
        let resolver = proxy(proxy_table(&[lookupd.url()], &servers, 0));
        let by_ids = proxy(proxy_table(&[ids.url()], &servers, 0));
        let cache = resolver.cache();
        for user in ["alice@example.com", "al"] {
            let alice = login(user, Protocol::Imap);
            for _ in 0..2 {
                let resolved = resolver.resolve(&alice).await.unwrap();
                assert_eq!(resolved.source, RouteSource::Lookup, "{user}");
            }
            assert_eq!(
                cache
                    .get_route(alice.protocol, user, alice.client_ip)
                    .await
                    .unwrap(),
                None
            );
        }
        let al = login("al", Protocol::Imap);
        let scope = AliasScope::of(&al).unwrap();
        assert_eq!(cache.get_alias("al", scope).await.unwrap(), None);
        assert_eq!(
            cache
                .get_route(al.protocol, "alice@example.com", al.client_ip)
                .await
                .unwrap(),
            None
        );

        let id = login("id-alice", Protocol::Http);
        for _ in 0..2 {
            let resolved = by_ids.resolve_account_id(&id).await.unwrap();
            assert_eq!(resolved.source, RouteSource::Lookup);
        }
        assert_eq!(
            by_ids
                .cache()
                .get_route_by_id(id.protocol, &id.user)
                .await
                .unwrap(),
            None
        );
    }
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Found), 8);
}

/// A handler that rewrites a login without letting the alias be cached (lookupd, for a
/// domain other than its default) still teaches the fleet the account's route, as Zimbra's
/// proxy caches it: a later login as the account asks no handler.
#[tokio::test]
async fn a_rewritten_login_caches_the_accounts_route_even_when_its_alias_may_not_be() {
    let directory = format!(
        "{DIRECTORY}account carol@other.org mbs-1\nalias sales@other.org carol@other.org\n"
    );
    let files = Files::new(TABLE, &directory);
    let handler = RunningLookupd::start(files.config()).await;
    let resolver = proxy(proxy_table(&[handler.url()], &[], 3600));
    let sales = login("sales@other.org", Protocol::Imap);
    let resolved = resolver.resolve(&sales).await.unwrap();
    assert_eq!(resolved.source, RouteSource::Lookup);
    assert_eq!(resolved.route.account.as_deref(), Some("carol@other.org"));

    let cache = resolver.cache();
    let scope = AliasScope::of(&sales).unwrap();
    assert_eq!(
        cache.get_alias("sales@other.org", scope).await.unwrap(),
        None,
        "the handler said Auth-Cache-Alias: FALSE"
    );
    assert_eq!(
        cache
            .get_route(Protocol::Imap, "carol@other.org", sales.client_ip)
            .await
            .unwrap(),
        Some(Upstream::new("127.0.0.1", 1143))
    );
    let carol = login("carol@other.org", Protocol::Imap);
    assert_eq!(
        resolver.resolve(&carol).await.unwrap().source,
        RouteSource::Cache
    );
    assert_eq!(found(&handler), 1);
}
