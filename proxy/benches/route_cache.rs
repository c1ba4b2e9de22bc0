//! Route cache hits: the embedded tier (must stay well under a microsecond) and the memcached
//! tier against a real memcached on loopback (one round trip on a pooled connection). The
//! memcached benchmarks are skipped, with a message, where memcached is not installed.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use mailproxy::route::cache::{CacheKey, RouteCache, RouteCacheConfig};
use mailproxy::route::{Protocol, Upstream};
use mailproxy_testkit::Memcached;
use tokio::runtime::Runtime;

const USER: &str = "alice@example.com";
const TTL: Duration = Duration::from_secs(3600);

fn client() -> IpAddr {
    IpAddr::from([192, 0, 2, 10])
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Caches one route and checks it is a hit, so that the benchmark measures hits.
fn warm(runtime: &Runtime, cache: &RouteCache) {
    let upstream = Upstream::new("10.0.0.1", 7143);
    runtime.block_on(async {
        cache
            .put_route(Protocol::Imap, USER, client(), &upstream, TTL)
            .await
            .expect("put_route");
        let hit = cache.get_route(Protocol::Imap, USER, client()).await;
        assert_eq!(hit.expect("get_route"), Some(upstream));
    });
}

fn keys(c: &mut Criterion) {
    c.bench_function("route key", |b| {
        b.iter(|| CacheKey::route_user(Protocol::Imap, black_box(USER), client()))
    });
}

fn embedded(c: &mut Criterion) {
    let runtime = runtime();
    let cache = RouteCache::new(RouteCacheConfig::default());
    warm(&runtime, &cache);
    c.bench_function("embedded hit", |b| {
        b.to_async(&runtime)
            .iter(|| cache.get_route(Protocol::Imap, black_box(USER), client()))
    });
    c.bench_function("embedded miss", |b| {
        b.to_async(&runtime)
            .iter(|| cache.get_route(Protocol::Imap, black_box("nobody@example.com"), client()))
    });
}

fn memcached(c: &mut Criterion) {
    let server = match Memcached::start() {
        Ok(server) => server,
        Err(error) => {
            eprintln!("skipping the memcached benchmarks: cannot start memcached: {error:#}");
            return;
        }
    };
    let runtime = runtime();
    let cache = RouteCache::new(RouteCacheConfig::default());
    cache.set_servers(&[server.addr()]).expect("server address");
    warm(&runtime, &cache);
    c.bench_function("memcached hit", |b| {
        b.to_async(&runtime)
            .iter(|| cache.get_route(Protocol::Imap, black_box(USER), client()))
    });
    c.bench_function("memcached miss", |b| {
        b.to_async(&runtime)
            .iter(|| cache.get_route(Protocol::Imap, black_box("nobody@example.com"), client()))
    });
}

criterion_group!(benches, keys, embedded, memcached);
criterion_main!(benches);
