//! The route cache: Zimbra's memcached key formats, the memcached tier shared by the fleet and the
//! embedded in-process tier, behind one facade, [`RouteCache`].
//!
//! A proxy with memcached servers uses them (what one proxy learns, every proxy reads); without
//! any it uses its embedded cache. The server list comes from the route table and can change at
//! runtime ([`RouteCache::set_servers`]).
//!
//! The cache is an optimisation, never a dependency: every operation returns a `Result`, and a
//! caller treats an error as a miss (for reads) or a no-op (for writes). The memcached tier
//! answers within its timeout whatever the servers do, so a dead, hung or garbling memcached
//! costs a login at most that timeout once, and nothing while the server is marked down.
//!
//! - [`keys`]: the key formats ([`CacheKey`]).
//! - [`ring`]: ketama consistent hashing.
//! - [`protocol`]: the memcached text protocol and its reply parser.

mod embedded;
pub mod keys;
mod memcached;
pub mod protocol;
pub mod ring;

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use mailproxy_crds::route_table::is_host_name;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub use self::keys::{AliasScope, CacheKey, IpScope, KeyError};
pub use self::memcached::{MemcachedConfig, ServerPurge};
pub use self::protocol::ProtocolError;

use self::embedded::EmbeddedCache;
use self::keys::is_qualified;
use self::memcached::{MemcachedTier, ServerMetrics};
use super::{LoginContext, Protocol, Upstream};

/// Zimbra's default route cache TTL (`zimbraReverseProxyCacheEntryTTL`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// memcached reads an expiry over 30 days as an absolute Unix time, so longer TTLs are capped.
const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;

/// Default memcached port, for server addresses given without one.
const MEMCACHED_PORT: u16 = 11211;

/// Settings of both tiers.
#[derive(Clone, Debug)]
pub struct RouteCacheConfig {
    pub memcached: MemcachedConfig,
    /// Entries the embedded cache holds at most.
    pub embedded_capacity: usize,
}

impl Default for RouteCacheConfig {
    fn default() -> Self {
        Self {
            memcached: MemcachedConfig::default(),
            embedded_capacity: 100_000,
        }
    }
}

/// Why a cache operation failed. Callers treat every one as a miss.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("invalid memcached server address {0:?}: expected host:port, [ipv6]:port or host")]
    BadServer(String),
    #[error("no memcached server is available: all {configured} are marked down")]
    NoServer { configured: usize },
    #[error("memcached {server}: no reply within {after:?}")]
    Timeout { server: String, after: Duration },
    /// Every connection this proxy may open to the server was in use until the deadline: the
    /// proxy is busy, not the server down.
    #[error("memcached {server}: all {limit} connections stayed busy")]
    Busy { server: String, limit: usize },
    #[error("memcached {server}: {source}")]
    Io {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("memcached {server}: {source}")]
    Protocol {
        server: String,
        #[source]
        source: ProtocolError,
    },
    #[error("cached value of {key} is not {expected}: {value:?}")]
    BadValue {
        key: String,
        expected: &'static str,
        value: String,
    },
}

/// Which tier serves requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Embedded = 0,
    Memcached = 1,
}

impl Tier {
    fn label(self) -> &'static str {
        match self {
            Tier::Embedded => "embedded",
            Tier::Memcached => "memcached",
        }
    }
}

/// Everything a purge should delete for one account. [`PurgeTarget::account`] is the account
/// alone; the other fields add what only the caller can know.
///
/// What no purge can find: keys of unqualified logins (`user=<login>@<clientip>`) for client
/// addresses not listed in `client_ips`, alias keys for proxy addresses and virtual hosts not
/// listed, aliases of the account that are not in `logins`, and entries on memcached servers
/// that are no longer in the server list. Those expire with their TTL (1 hour by default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgeTarget {
    /// The account name, normally qualified (`user@domain`).
    pub account: String,
    /// Its Zimbra account ids, for the `route:proto=<proto>;id=<id>` keys of web routing.
    pub ids: Vec<String>,
    /// Other login names of the account (aliases).
    pub logins: Vec<String>,
    /// Proxy addresses clients connect to, for `alias:user=<login>;ip=<proxy-ip>`.
    pub proxy_ips: Vec<IpAddr>,
    /// Web virtual hosts, for `alias:user=<login>;vhost=<host>`.
    pub virtual_hosts: Vec<String>,
    /// Client addresses whose unqualified logins should be purged too.
    pub client_ips: Vec<IpAddr>,
}

impl PurgeTarget {
    pub fn account(account: impl Into<String>) -> Self {
        Self {
            account: account.into(),
            ..Self::default()
        }
    }

    /// Every key variant: for each login name (the account, its listed logins and the local part
    /// of each qualified one, which is what users type when the proxy qualifies names) the route
    /// key of every protocol with and without each listed client address, its alias keys, and
    /// the id keys of every protocol.
    pub fn keys(&self) -> Result<Vec<CacheKey>, KeyError> {
        if self.account.is_empty() {
            return Err(KeyError::Empty("account name"));
        }
        let mut names: Vec<&str> = Vec::new();
        for name in
            std::iter::once(self.account.as_str()).chain(self.logins.iter().map(String::as_str))
        {
            names.push(name);
            if is_qualified(name)
                && let Some((local, _)) = name.rsplit_once('@')
                && !local.is_empty()
            {
                names.push(local);
            }
        }
        let mut keys = Vec::new();
        for protocol in Protocol::ALL {
            for name in &names {
                keys.push(CacheKey::route_account(protocol, name)?);
                for &client_ip in &self.client_ips {
                    keys.push(CacheKey::route_user(protocol, name, client_ip)?);
                }
            }
            for id in &self.ids {
                keys.push(CacheKey::route_id(protocol, id)?);
            }
        }
        for name in &names {
            for &ip in &self.proxy_ips {
                keys.push(CacheKey::alias(name, AliasScope::ProxyIp(ip))?);
            }
            for host in &self.virtual_hosts {
                keys.push(CacheKey::alias(name, AliasScope::VirtualHost(host))?);
            }
        }
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }
}

/// What a purge did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurgeReport {
    /// The keys deleted.
    pub keys: Vec<CacheKey>,
    /// Entries deleted from this proxy's embedded cache.
    pub embedded_deleted: usize,
    /// Per memcached server (every configured server, not only each key's owner).
    pub servers: Vec<ServerPurge>,
}

impl PurgeReport {
    /// Whether every memcached server took every delete.
    pub fn complete(&self) -> bool {
        self.servers.iter().all(|server| server.error.is_none())
    }

    /// Entries deleted in all.
    pub fn deleted(&self) -> usize {
        self.embedded_deleted
            + self
                .servers
                .iter()
                .map(|server| server.deleted)
                .sum::<usize>()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    tier: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    tier: &'static str,
    op: &'static str,
}

struct Metrics {
    lookups: Family<LookupLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    servers: ServerMetrics,
    /// The lookup counters by tier and outcome, taken from `lookups` once: a hit then costs one
    /// atomic add instead of a locked map lookup.
    lookup_counters: [[Counter; 3]; 2],
}

const OUTCOMES: [&str; 3] = ["hit", "miss", "error"];

impl Metrics {
    fn new() -> Self {
        let lookups = Family::<LookupLabels, Counter>::default();
        let lookup_counters = [Tier::Embedded, Tier::Memcached].map(|tier| {
            OUTCOMES.map(|result| {
                lookups
                    .get_or_create(&LookupLabels {
                        tier: tier.label(),
                        result,
                    })
                    .clone()
            })
        });
        Self {
            lookups,
            errors: Family::default(),
            servers: ServerMetrics::default(),
            lookup_counters,
        }
    }

    fn lookup(&self, tier: Tier, outcome: usize) {
        self.lookup_counters[tier as usize][outcome].inc();
    }
}

/// The route cache a proxy uses: cheap to clone, shared by every session.
#[derive(Clone)]
pub struct RouteCache {
    inner: Arc<Inner>,
}

struct Inner {
    memcached: MemcachedTier,
    embedded: EmbeddedCache,
    metrics: Metrics,
}

impl RouteCache {
    /// A cache on the embedded tier until [`RouteCache::set_servers`] gives it memcached servers.
    pub fn new(config: RouteCacheConfig) -> Self {
        let metrics = Metrics::new();
        Self {
            inner: Arc::new(Inner {
                memcached: MemcachedTier::new(config.memcached, metrics.servers.clone()),
                embedded: EmbeddedCache::new(config.embedded_capacity),
                metrics,
            }),
        }
    }

    /// Uses these memcached servers (`host:port`, `[ipv6]:port`, or `host` for port 11211); an
    /// empty list switches to the embedded tier. Servers that stay keep their connections and
    /// health. An invalid address rejects the whole list and keeps the current one.
    ///
    /// Moving to memcached empties the embedded cache: its entries would be stale by the time
    /// the proxy fell back to it.
    pub fn set_servers<S: AsRef<str>>(&self, servers: &[S]) -> Result<(), CacheError> {
        let addrs = servers
            .iter()
            .map(|server| parse_server(server.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if !addrs.is_empty() {
            self.inner.embedded.clear();
        }
        self.inner.memcached.set_servers(addrs);
        Ok(())
    }

    /// The memcached servers in use, normalised (`host:port`).
    pub fn servers(&self) -> Vec<String> {
        self.inner.memcached.servers()
    }

    pub fn tier(&self) -> Tier {
        if self.inner.memcached.has_servers() {
            Tier::Memcached
        } else {
            Tier::Embedded
        }
    }

    /// The cached route of a login (`route:proto=<proto>;user=<login>`, `@<clientip>` added
    /// for an unqualified login).
    pub async fn get_route(
        &self,
        protocol: Protocol,
        user: &str,
        client_ip: IpAddr,
    ) -> Result<Option<Upstream>, CacheError> {
        let key = CacheKey::route_user(protocol, user, client_ip)?;
        self.get_upstream(&key).await
    }

    /// The cached route of an account id (web routing by auth token).
    pub async fn get_route_by_id(
        &self,
        protocol: Protocol,
        id: &str,
    ) -> Result<Option<Upstream>, CacheError> {
        let key = CacheKey::route_id(protocol, id)?;
        self.get_upstream(&key).await
    }

    /// Caches a route with memcached `add`: if another proxy cached one first, theirs stays and
    /// this returns `false`.
    pub async fn put_route(
        &self,
        protocol: Protocol,
        user: &str,
        client_ip: IpAddr,
        upstream: &Upstream,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let key = CacheKey::route_user(protocol, user, client_ip)?;
        self.inner.add(&key, &upstream.to_string(), ttl).await
    }

    pub async fn put_route_by_id(
        &self,
        protocol: Protocol,
        id: &str,
        upstream: &Upstream,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let key = CacheKey::route_id(protocol, id)?;
        self.inner.add(&key, &upstream.to_string(), ttl).await
    }

    /// Forgets a route, e.g. after the upstream refused the login: the account may have moved.
    pub async fn delete_route(
        &self,
        protocol: Protocol,
        user: &str,
        client_ip: IpAddr,
    ) -> Result<bool, CacheError> {
        let key = CacheKey::route_user(protocol, user, client_ip)?;
        self.inner.delete(&key).await
    }

    pub async fn delete_route_by_id(
        &self,
        protocol: Protocol,
        id: &str,
    ) -> Result<bool, CacheError> {
        let key = CacheKey::route_id(protocol, id)?;
        self.inner.delete(&key).await
    }

    /// The account a login name resolved to, in the scope it was resolved in.
    pub async fn get_alias(
        &self,
        login: &str,
        scope: AliasScope<'_>,
    ) -> Result<Option<String>, CacheError> {
        let key = CacheKey::alias(login, scope)?;
        let Some(account) = self.inner.get(&key).await? else {
            return Ok(None);
        };
        if account.is_empty() || account.len() > 1024 || account.chars().any(char::is_control) {
            return Err(self.inner.bad_value(&key, "an account name", account).await);
        }
        Ok(Some(account))
    }

    /// Caches what a login name resolved to (`add`: the first writer wins).
    pub async fn put_alias(
        &self,
        login: &str,
        scope: AliasScope<'_>,
        account: &str,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let key = CacheKey::alias(login, scope)?;
        self.inner.add(&key, account, ttl).await
    }

    pub async fn delete_alias(
        &self,
        login: &str,
        scope: AliasScope<'_>,
    ) -> Result<bool, CacheError> {
        let key = CacheKey::alias(login, scope)?;
        self.inner.delete(&key).await
    }

    /// What a session calls when the upstream refused a login: deletes the login's route key,
    /// the route key of the account it was rewritten to (if any) and its alias key (scoped by the
    /// virtual host for web logins, else by the proxy address), as Zimbra does after an upstream
    /// authentication failure. Tries every delete; returns the first error.
    pub async fn forget_login(
        &self,
        login: &LoginContext,
        account: Option<&str>,
    ) -> Result<(), CacheError> {
        let mut keys = vec![CacheKey::route_user(
            login.protocol,
            &login.user,
            login.client_ip,
        )?];
        if let Some(account) = account.filter(|account| *account != login.user) {
            keys.push(CacheKey::route_user(
                login.protocol,
                account,
                login.client_ip,
            )?);
        }
        if let Some(scope) = AliasScope::of(login) {
            keys.push(CacheKey::alias(&login.user, scope)?);
        }
        let mut first_error = None;
        for key in &keys {
            if let Err(error) = self.inner.delete(key).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `zmproxypurge <account>`: deletes every route key variant of the account that can be
    /// derived from its name (see [`PurgeTarget`] for what cannot) on every memcached server and
    /// in the embedded cache.
    pub async fn purge_account(&self, account: &str) -> Result<PurgeReport, CacheError> {
        self.purge(&PurgeTarget::account(account)).await
    }

    /// Deletes every key of `target` on every memcached server (not only each key's owner on the
    /// current ring: an entry may have been written while a server was down or the list was
    /// different) and in the embedded cache. A server that fails is reported in
    /// [`PurgeReport::servers`]; check [`PurgeReport::complete`].
    pub async fn purge(&self, target: &PurgeTarget) -> Result<PurgeReport, CacheError> {
        let keys = target.keys()?;
        let embedded_deleted = keys
            .iter()
            .filter(|key| self.inner.embedded.delete(key))
            .count();
        let servers = self.inner.memcached.delete_everywhere(&keys).await;
        Ok(PurgeReport {
            keys,
            embedded_deleted,
            servers,
        })
    }

    /// Registers the cache's metrics under `route_cache_`: `lookups{tier,result}`,
    /// `errors{tier,op}`, `memcached_server_up{server}` and
    /// `memcached_server_errors{server,kind}`.
    pub fn register(&self, registry: &mut Registry) {
        let metrics = &self.inner.metrics;
        let registry = registry.sub_registry_with_prefix("route_cache");
        registry.register(
            "lookups",
            "Route cache reads by tier and result (hit, miss, error)",
            metrics.lookups.clone(),
        );
        registry.register(
            "errors",
            "Failed route cache operations by tier and operation",
            metrics.errors.clone(),
        );
        registry.register(
            "memcached_server_up",
            "Whether a memcached server is used (1) or skipped as down (0)",
            metrics.servers.up.clone(),
        );
        registry.register(
            "memcached_server_errors",
            "Failed memcached requests by server and kind (timeout, io, protocol, refused)",
            metrics.servers.errors.clone(),
        );
    }

    /// A raw read, for the throttle's whitelist entries.
    pub(crate) async fn read(&self, key: &CacheKey) -> Result<Option<String>, CacheError> {
        self.inner.get(key).await
    }

    /// A fixed-window counter: the count including this one. The first count creates the entry
    /// with `window` as its TTL.
    pub(crate) async fn count(&self, key: &CacheKey, window: Duration) -> Result<u64, CacheError> {
        self.inner.count(key, window).await
    }

    async fn get_upstream(&self, key: &CacheKey) -> Result<Option<Upstream>, CacheError> {
        let Some(value) = self.inner.get(key).await? else {
            return Ok(None);
        };
        match value.parse::<Upstream>() {
            Ok(upstream) => Ok(Some(upstream)),
            Err(_) => Err(self
                .inner
                .bad_value(key, "an upstream address", value)
                .await),
        }
    }
}

impl Inner {
    async fn get(&self, key: &CacheKey) -> Result<Option<String>, CacheError> {
        let (tier, result) = if self.memcached.has_servers() {
            let result = self.memcached.get(key).await.and_then(|value| {
                value
                    .map(|bytes| {
                        String::from_utf8(bytes).map_err(|error| CacheError::BadValue {
                            key: key.to_string(),
                            expected: "UTF-8 text",
                            value: String::from_utf8_lossy(error.as_bytes()).into_owned(),
                        })
                    })
                    .transpose()
            });
            (Tier::Memcached, result)
        } else {
            (Tier::Embedded, Ok(self.embedded.get(key)))
        };
        let outcome = match &result {
            Ok(Some(_)) => 0,
            Ok(None) => 1,
            Err(_) => 2,
        };
        self.metrics.lookup(tier, outcome);
        result
    }

    async fn add(&self, key: &CacheKey, value: &str, ttl: Duration) -> Result<bool, CacheError> {
        let ttl = ttl_seconds(ttl);
        if !self.memcached.has_servers() {
            return Ok(self
                .embedded
                .add(key, value, Duration::from_secs(ttl.into())));
        }
        let result = self.memcached.add(key, value.as_bytes(), ttl).await;
        self.count_error(result, "add")
    }

    async fn delete(&self, key: &CacheKey) -> Result<bool, CacheError> {
        if !self.memcached.has_servers() {
            return Ok(self.embedded.delete(key));
        }
        let result = self.memcached.delete(key).await;
        self.count_error(result, "delete")
    }

    async fn count(&self, key: &CacheKey, window: Duration) -> Result<u64, CacheError> {
        let window = ttl_seconds(window);
        if !self.memcached.has_servers() {
            return Ok(self.embedded.count(key, Duration::from_secs(window.into())));
        }
        let result = self.memcached.count(key, window).await;
        self.count_error(result, "count")
    }

    /// A value no reader can use: removed (best effort), so that `add` can replace it rather
    /// than every reader failing on it until it expires.
    async fn bad_value(&self, key: &CacheKey, expected: &'static str, value: String) -> CacheError {
        // The read's error is what matters to the caller; a failed delete only means the
        // value stays until its TTL.
        let _ = self.delete(key).await;
        let value = value.chars().take(64).collect();
        CacheError::BadValue {
            key: key.to_string(),
            expected,
            value,
        }
    }

    fn count_error<T>(
        &self,
        result: Result<T, CacheError>,
        op: &'static str,
    ) -> Result<T, CacheError> {
        if result.is_err() {
            self.metrics
                .errors
                .get_or_create(&ErrorLabels {
                    tier: Tier::Memcached.label(),
                    op,
                })
                .inc();
        }
        result
    }
}

/// A TTL as memcached seconds: rounded up, at least 1 (0 would mean "never expires"), at most
/// 30 days.
fn ttl_seconds(ttl: Duration) -> u32 {
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    // Clamped to 30 days, which fits in a u32.
    seconds.clamp(1, MAX_TTL_SECONDS) as u32
}

fn parse_server(server: &str) -> Result<String, CacheError> {
    let server = server.trim();
    let bad = || CacheError::BadServer(server.chars().take(64).collect());
    if let Ok(upstream) = Upstream::from_str(server) {
        return Ok(upstream.to_string());
    }
    if is_host_name(server) {
        Ok(Upstream::new(server, MEMCACHED_PORT).to_string())
    } else if let Ok(ip) = server.parse::<std::net::Ipv6Addr>() {
        Ok(Upstream::new(ip.to_string(), MEMCACHED_PORT).to_string())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_and_stay_relative() {
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_seconds(DEFAULT_TTL), 3600);
        assert_eq!(ttl_seconds(Duration::from_secs(365 * 24 * 3600)), 2_592_000);
    }

    #[test]
    fn server_addresses_are_validated() {
        assert_eq!(parse_server("10.0.0.1:11211").unwrap(), "10.0.0.1:11211");
        assert_eq!(parse_server(" mc-0.mc:11212 ").unwrap(), "mc-0.mc:11212");
        assert_eq!(parse_server("mc-0.mc").unwrap(), "mc-0.mc:11211");
        assert_eq!(parse_server("[::1]:11211").unwrap(), "[::1]:11211");
        assert_eq!(parse_server("::1").unwrap(), "[::1]:11211");
        for bad in ["", "a b:1", "host:0", "host:x", "h\r\n:1", "[::1]"] {
            assert!(parse_server(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn purge_keys_cover_every_variant() {
        let target = PurgeTarget {
            account: "alice@example.com".into(),
            ids: vec!["id-1".into()],
            logins: vec!["al@example.com".into()],
            proxy_ips: vec!["10.0.0.1".parse().unwrap()],
            virtual_hosts: vec!["mail.example.com".into()],
            client_ips: vec!["192.0.2.9".parse().unwrap()],
        };
        let keys: Vec<String> = target
            .keys()
            .unwrap()
            .iter()
            .map(|k| k.to_string())
            .collect();
        for expected in [
            "route:proto=imap;user=alice@example.com",
            "route:proto=httpssl;user=alice@example.com",
            "route:proto=pop3;user=alice",
            "route:proto=pop3;user=alice@192.0.2.9",
            "route:proto=imapssl;user=al@example.com",
            "route:proto=imapssl;user=al@192.0.2.9",
            "route:proto=http;id=id-1",
            "alias:user=alice;ip=10.0.0.1",
            "alias:user=al;vhost=mail.example.com",
            "alias:user=alice@example.com;vhost=mail.example.com",
        ] {
            assert!(
                keys.iter().any(|k| k == expected),
                "missing {expected}: {keys:#?}"
            );
        }
        // A qualified name is never bound to a client address.
        assert!(
            !keys
                .iter()
                .any(|k| k == "route:proto=imap;user=alice@example.com@192.0.2.9")
        );
        let only_account = PurgeTarget::account("alice@example.com").keys().unwrap();
        // Six protocols, with and without the domain.
        assert_eq!(only_account.len(), 12);
        assert!(PurgeTarget::account("").keys().is_err());
    }
}
