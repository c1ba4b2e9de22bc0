//! The resolution paths of a login, through the `Resolver` as sessions call it: a pinned account
//! (no I/O), an embedded-cache hit, a memcached hit (one loopback round trip, no handler call),
//! and a cold lookup (one handler round trip plus the cache write), beside the bare handler
//! round trip for scale. The handler is a real `mailproxy lookupd` on its own runtime; memcached
//! is real. Benchmarks that need memcached are skipped, with a message, where it cannot start.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use mailproxy::dns::Dns;
use mailproxy::lookupd::{Lookupd, LookupdConfig, RequestOutcome};
use mailproxy::route::cache::{RouteCache, RouteCacheConfig};
use mailproxy::route::lookup::{AuthMethod, LookupClient, LookupClientConfig};
use mailproxy::route::resolver::{Resolver, RouteSource};
use mailproxy::route::table::TableHandle;
use mailproxy::route::{LoginContext, Protocol};
use mailproxy_crds::route_table::RouteTable;
use mailproxy_testkit::Memcached;
use tokio::runtime::Runtime;

/// lookupd's own table: every account of bench.example lives on mbs-1.
const HANDLER_TABLE: &str = r#"{
    "servers": {"mbs-1": {"host": "127.0.0.1", "ports": {"imap": 7143}}},
    "domains": {"bench.example": "mbs-1"}
}"#;

fn login(user: &str) -> LoginContext {
    LoginContext {
        user: user.to_string(),
        protocol: Protocol::Imap,
        client_ip: IpAddr::from([192, 0, 2, 10]),
        proxy_ip: Some(IpAddr::from([10, 0, 0, 1])),
        virtual_host: None,
        attempt: 1,
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A lookupd on its own thread and runtime, as a remote handler would be.
struct Handler {
    lookupd: Lookupd,
    url: String,
    _dir: tempfile::TempDir,
}

fn handler() -> Handler {
    let dir = tempfile::tempdir().expect("temporary directory");
    let table = dir.path().join("routes.json");
    std::fs::write(&table, HANDLER_TABLE).expect("write the handler's table");
    let lookupd = Lookupd::new(LookupdConfig::new(&table)).expect("lookupd starts");
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let url = format!(
        "http://{}/service/extension/nginx-lookup",
        listener.local_addr().expect("address")
    );
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let server = lookupd.clone();
    std::thread::spawn(move || {
        let runtime = runtime();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            server.serve(listener, std::future::pending()).await
        })
    });
    Handler {
        lookupd,
        url,
        _dir: dir,
    }
}

fn resolver(runtime: &Runtime, handler: &Handler, memcached: Option<&Memcached>) -> Resolver {
    let mut table = RouteTable::from_json(
        r#"{"servers": {"pinned": {"host": "10.9.9.9"}}, "accounts": {"vip@bench.example": "pinned"}}"#,
    )
    .expect("bench table");
    table.lookup_handlers = vec![handler.url.clone()];
    table.memcached_servers = memcached.iter().map(|m| m.addr()).collect();
    let lookup = LookupClient::new(LookupClientConfig::default()).expect("lookup client");
    let resolver = Resolver::new(
        TableHandle::fixed(table),
        RouteCache::new(RouteCacheConfig::default()),
        Arc::new(lookup),
        Dns::from_system_config(),
    );
    let _guard = runtime.enter();
    resolver.follow_table();
    resolver
}

fn resolve_once(runtime: &Runtime, resolver: &Resolver, user: &str) -> RouteSource {
    runtime
        .block_on(resolver.resolve(&login(user)))
        .expect("resolves")
        .source
}

fn paths(c: &mut Criterion) {
    let handler = handler();
    let runtime = runtime();
    let local = resolver(&runtime, &handler, None);

    assert_eq!(
        resolve_once(&runtime, &local, "vip@bench.example"),
        RouteSource::TableAccount
    );
    c.bench_function("resolve: table pin", |b| {
        b.to_async(&runtime)
            .iter(|| async { local.resolve(&login("vip@bench.example")).await })
    });

    assert_eq!(
        resolve_once(&runtime, &local, "hot@bench.example"),
        RouteSource::Lookup
    );
    assert_eq!(
        resolve_once(&runtime, &local, "hot@bench.example"),
        RouteSource::Cache
    );
    c.bench_function("resolve: embedded cache hit", |b| {
        b.to_async(&runtime)
            .iter(|| async { local.resolve(&login("hot@bench.example")).await })
    });

    let counter = AtomicU64::new(0);
    let before = handler.lookupd.requests(RequestOutcome::Found);
    c.bench_function("resolve: cold lookup (embedded cache)", |b| {
        b.to_async(&runtime).iter(|| {
            let user = format!(
                "cold{}@bench.example",
                counter.fetch_add(1, Ordering::Relaxed)
            );
            let local = local.clone();
            async move {
                let resolved = local.resolve(&login(&user)).await.expect("resolves");
                assert_eq!(resolved.source, RouteSource::Lookup);
            }
        })
    });
    let lookups = handler.lookupd.requests(RequestOutcome::Found) - before;
    eprintln!(
        "cold lookups: {} logins, {lookups} handler requests",
        counter.load(Ordering::Relaxed)
    );

    let client = LookupClient::new(LookupClientConfig {
        handlers: vec![handler.url.parse().expect("handler URL")],
        ..LookupClientConfig::default()
    })
    .expect("lookup client");
    c.bench_function("handler round trip (lookup client alone)", |b| {
        b.to_async(&runtime).iter(|| async {
            client
                .lookup(&login("hot@bench.example"), AuthMethod::Username)
                .await
        })
    });

    let memcached = match Memcached::start() {
        Ok(server) => server,
        Err(error) => {
            eprintln!("skipping the memcached benchmarks: cannot start memcached: {error:#}");
            return;
        }
    };
    let learner = resolver(&runtime, &handler, Some(&memcached));
    let fleet = resolver(&runtime, &handler, Some(&memcached));
    assert_eq!(
        resolve_once(&runtime, &learner, "shared@bench.example"),
        RouteSource::Lookup
    );
    let before = handler.lookupd.requests(RequestOutcome::Found);
    assert_eq!(
        resolve_once(&runtime, &fleet, "shared@bench.example"),
        RouteSource::Cache
    );
    c.bench_function("resolve: memcached hit (another proxy learned it)", |b| {
        b.to_async(&runtime)
            .iter(|| async { fleet.resolve(&login("shared@bench.example")).await })
    });
    assert_eq!(
        handler.lookupd.requests(RequestOutcome::Found),
        before,
        "memcached hits call no handler"
    );
}

criterion_group!(benches, paths);
criterion_main!(benches);
