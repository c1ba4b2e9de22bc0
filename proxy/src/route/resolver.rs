//! The resolution order, with concurrent lookups for one account coalesced.
//!
//! For a login: the route table's pinned account, then the route cache, then a live lookup
//! (whose answer is cached for the fleet), then the route table's domain entry. The domain entry
//! is the fallback both when no handler can answer and when the handler does not know the
//! account: a pool may front backends that the handlers only partly cover. A draining server
//! gets no new session from any of these: a cached route to it is deleted and counts as a miss,
//! and a lookup answer naming it is neither used nor cached.
//!
//! A login storm after a restart must not become a handler storm: concurrent cache misses for
//! the same login share one lookup. The lookup runs in its own task, so a client that hangs up
//! mid-login cancels nothing the others wait for.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use mailproxy_crds::route_table::{RouteServer, RouteTable};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::cache::keys::is_qualified;
use super::cache::{AliasScope, RouteCache};
use super::lookup::{AuthMethod, LookupClient, LookupError, LookupOutcome};
use super::table::{AddressIndex, REFRESH_INTERVAL, ServerAddresses, TableHandle, ip_literal};
use super::{LoginContext, Protocol, Route, Upstream};
use crate::dns::Dns;

/// Where a route came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteSource {
    TableAccount,
    Cache,
    Lookup,
    TableDomain,
}

impl RouteSource {
    fn label(self) -> &'static str {
        match self {
            RouteSource::TableAccount => "table_account",
            RouteSource::Cache => "cache",
            RouteSource::Lookup => "lookup",
            RouteSource::TableDomain => "table_domain",
        }
    }
}

/// A resolved login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub route: Route,
    pub source: RouteSource,
    /// The MailboxServer the route points at, when the route table knows it (pinned and domain
    /// routes, and learned routes whose address matches a server of the table).
    pub server: Option<String>,
}

/// Why a login has no route. Every variant tells the session what to answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The handler does not know the account and the table has no domain entry: answer the
    /// client's login with a failure after `wait` (Auth-Wait).
    #[error("the route lookup refused the login: {message}")]
    Refused { message: String, wait: Duration },
    /// No handler answered and the table has no domain entry: a temporary failure.
    #[error("no route: {reason}")]
    Unavailable { reason: String },
}

type FlightResult = Result<Resolved, ResolveError>;
type Flight = Shared<BoxFuture<'static, FlightResult>>;

/// Concurrent misses share a lookup when its answer would be the same for each of them, and
/// each would cache it under the same keys (only the first login's task writes the cache): same
/// method, same protocol, same login (account names compared case-insensitively; account ids as
/// they are, since they are cached as they are). An unqualified name also needs the same client
/// address (Zimbra's cache key for it), proxy address and virtual host: the handler qualifies it
/// by the domain bound to the address or host the client came to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FlightKey {
    method: AuthMethod,
    protocol: Protocol,
    user: String,
    unqualified: Option<Arrival>,
}

/// Where an unqualified login came from and to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Arrival {
    client_ip: IpAddr,
    proxy_ip: Option<IpAddr>,
    virtual_host: Option<String>,
}

impl FlightKey {
    fn of(login: &LoginContext, method: AuthMethod) -> Self {
        // Every field `build_request` sends is named here, so that a field added to the login
        // (and so to the request) cannot be left out of the key unnoticed. The attempt number
        // is left out: it counts this connection's tries and routes nothing.
        let LoginContext {
            user,
            protocol,
            client_ip,
            proxy_ip,
            virtual_host,
            attempt: _,
        } = login;
        match method {
            AuthMethod::Username => Self {
                method,
                protocol: *protocol,
                user: user.to_lowercase(),
                unqualified: (!is_qualified(user)).then(|| Arrival {
                    client_ip: *client_ip,
                    proxy_ip: *proxy_ip,
                    virtual_host: virtual_host.clone(),
                }),
            },
            AuthMethod::ZimbraId => Self {
                method,
                protocol: *protocol,
                user: user.clone(),
                unqualified: None,
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResolveLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
}

#[derive(Default)]
struct Metrics {
    resolved: Family<ResolveLabels, Counter>,
    failed: Family<FailureLabels, Counter>,
    coalesced: Counter,
}

/// Resolves logins to routes; cheap to clone, shared by every session.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    table: TableHandle,
    cache: RouteCache,
    lookup: Arc<LookupClient>,
    /// The table's servers by the addresses their host names resolve to.
    addresses: ServerAddresses,
    flights: Mutex<HashMap<FlightKey, Flight>>,
    metrics: Metrics,
}

impl Resolver {
    /// A resolver over a live route table. The cache's memcached servers and the client's
    /// handlers follow the table: see [`Resolver::follow_table`]. `dns` resolves the table's
    /// server host names.
    pub fn new(table: TableHandle, cache: RouteCache, lookup: Arc<LookupClient>, dns: Dns) -> Self {
        Self {
            inner: Arc::new(Inner {
                table,
                cache,
                lookup,
                addresses: ServerAddresses::new(dns),
                flights: Mutex::new(HashMap::new()),
                metrics: Metrics::default(),
            }),
        }
    }

    pub fn cache(&self) -> &RouteCache {
        &self.inner.cache
    }

    pub fn table(&self) -> &TableHandle {
        &self.inner.table
    }

    /// Applies the current table's handlers, timeouts and memcached servers now, and every
    /// later table as it arrives (until the table source stops); resolves the table's server
    /// host names on each table and every [`REFRESH_INTERVAL`].
    pub fn follow_table(&self) -> tokio::task::JoinHandle<()> {
        let resolver = self.clone();
        let mut table = self.inner.table.clone();
        resolver.apply(&table.current());
        // Resolving names may take seconds; a new table's handlers and memcached servers must
        // not wait for it.
        tokio::spawn(self.clone().follow_server_addresses());
        tokio::spawn(async move {
            while let Some(current) = table.changed().await {
                resolver.apply(&current);
            }
        })
    }

    async fn follow_server_addresses(self) {
        let mut table = self.inner.table.clone();
        let mut current = table.current();
        loop {
            self.inner.addresses.refresh(&current).await;
            tokio::select! {
                changed = table.changed() => match changed {
                    Some(changed) => current = changed,
                    None => return,
                },
                () = tokio::time::sleep(REFRESH_INTERVAL) => {}
            }
        }
    }

    /// The current table's MailboxServer at `upstream` for a login of `protocol`: by its host as
    /// the table names it, or by the address its host name resolved to (see
    /// [`Resolver::follow_table`]; waits for the table's names to be resolved).
    pub async fn server_at(&self, upstream: &Upstream, protocol: Protocol) -> Option<String> {
        self.server_of(&self.inner.table.current(), upstream, protocol)
            .await
    }

    /// The MailboxServer of `table` at `upstream`. A route learned for an address is matched
    /// only once the index has resolved `table`'s host names: before that, a server that needs
    /// TLS upstream or is draining would be taken for no server, and get neither.
    async fn server_of(
        &self,
        table: &Arc<RouteTable>,
        upstream: &Upstream,
        protocol: Protocol,
    ) -> Option<String> {
        let index = self.inner.addresses.index_for(table).await;
        server_at(table, &index, upstream, protocol)
    }

    fn apply(&self, table: &RouteTable) {
        // Each URL the client cannot use is logged there; the usable ones are taken.
        self.inner.lookup.apply_route_table(table);
        if let Err(error) = self.inner.cache.set_servers(&table.memcached_servers) {
            tracing::error!(%error, "route table has an invalid memcached server; keeping the previous servers");
        }
    }

    /// Finds the route of a login.
    pub async fn resolve(&self, login: &LoginContext) -> Result<Resolved, ResolveError> {
        let table = self.inner.table.current();
        if let Some((name, server)) = table.pinned_account(&login.user) {
            // The account's mailbox is on that server: while it drains, nothing else can take
            // the login.
            if server.draining {
                let error = draining(login, name);
                self.count_failure(&error);
                return Err(error);
            }
            return Ok(self.count(pinned(
                name,
                server,
                login.protocol,
                RouteSource::TableAccount,
            )));
        }
        if let Some((route, server)) = self.cached_serving(login, &table).await {
            return Ok(self.count(Resolved {
                route,
                source: RouteSource::Cache,
                server,
            }));
        }
        // Without handlers there is nothing to coalesce: the domain entry answers at once.
        let result = if !self.inner.lookup.has_handlers() {
            table_domain(
                login,
                &table,
                ResolveError::Unavailable {
                    reason: LookupError::NoHandlers.to_string(),
                },
            )
        } else {
            self.flight(login, AuthMethod::Username).await
        };
        match &result {
            Ok(resolved) => {
                self.count(resolved.clone());
            }
            Err(error) => self.count_failure(error),
        }
        result
    }

    /// Finds the route of an account id (web routing by auth token, `Auth-Method: zimbraId`):
    /// the route cache (`route:proto=<proto>;id=<id>`), then a live lookup whose answer is
    /// cached. `login.user` is the account id. Concurrent misses of one id share the lookup: a
    /// web client opens several connections at once, each carrying the same token.
    pub async fn resolve_account_id(&self, login: &LoginContext) -> Result<Resolved, ResolveError> {
        let table = self.inner.table.current();
        if let Some((upstream, server)) = self.cached_by_id_serving(login, &table).await {
            return Ok(self.count(Resolved {
                route: Route {
                    upstream,
                    account: None,
                },
                source: RouteSource::Cache,
                server,
            }));
        }
        let result = self.flight(login, AuthMethod::ZimbraId).await;
        match &result {
            Ok(resolved) => {
                self.count(resolved.clone());
            }
            Err(error) => self.count_failure(error),
        }
        result
    }

    /// Forgets what the cache knows of a login after the mailbox server refused it (the account
    /// may have moved) or its route led to a draining server: its route, the route of the
    /// account it was rewritten to, and its alias.
    pub async fn forget(&self, login: &LoginContext, route: &Route) {
        if let Err(error) = self
            .inner
            .cache
            .forget_login(login, route.account.as_deref())
            .await
        {
            tracing::warn!(%error, "could not delete the cached route of a login");
        }
    }

    /// Forgets the cached route of an account id (web routing by auth token) after its mailbox
    /// server could not be reached (the account may have moved) or is draining.
    pub async fn forget_account_id(&self, login: &LoginContext) {
        if let Err(error) = self
            .inner
            .cache
            .delete_route_by_id(login.protocol, &login.user)
            .await
        {
            tracing::warn!(%error, "could not delete the cached route of an account id");
        }
    }

    /// `mailproxy_route_resolutions_total{source}`, `mailproxy_route_failures_total{reason}` and
    /// `mailproxy_route_coalesced_lookups_total`.
    pub fn register(&self, registry: &mut Registry) {
        let metrics = &self.inner.metrics;
        registry.register(
            "mailproxy_route_resolutions",
            "Logins resolved, by where the route came from",
            metrics.resolved.clone(),
        );
        registry.register(
            "mailproxy_route_failures",
            "Logins without a route, by reason",
            metrics.failed.clone(),
        );
        registry.register(
            "mailproxy_route_coalesced_lookups",
            "Lookups answered by another login's lookup in flight",
            metrics.coalesced.clone(),
        );
    }

    fn count(&self, resolved: Resolved) -> Resolved {
        let source = resolved.source.label();
        self.inner
            .metrics
            .resolved
            .get_or_create(&ResolveLabels { source })
            .inc();
        resolved
    }

    fn count_failure(&self, error: &ResolveError) {
        let reason = match error {
            ResolveError::Refused { .. } => "refused",
            ResolveError::Unavailable { .. } => "unavailable",
        };
        self.inner
            .metrics
            .failed
            .get_or_create(&FailureLabels { reason })
            .inc();
    }

    /// The cached route of a login and the table's server at its address, unless that server
    /// is draining: its entry is then deleted and it is a miss, so that a route learned before
    /// the drain sends no new session there.
    async fn cached_serving(
        &self,
        login: &LoginContext,
        table: &Arc<RouteTable>,
    ) -> Option<(Route, Option<String>)> {
        let route = self.cached(login).await?;
        let server = self.server_of(table, &route.upstream, login.protocol).await;
        if is_draining(table, server.as_deref()) {
            tracing::debug!(user = %login.user, server = ?server, "cached route points at a draining server; resolving the login again");
            self.forget(login, &route).await;
            return None;
        }
        Some((route, server))
    }

    /// As [`Resolver::cached_serving`], for an account id.
    async fn cached_by_id_serving(
        &self,
        login: &LoginContext,
        table: &Arc<RouteTable>,
    ) -> Option<(Upstream, Option<String>)> {
        let upstream = self.cached_by_id(login).await?;
        let server = self.server_of(table, &upstream, login.protocol).await;
        if is_draining(table, server.as_deref()) {
            tracing::debug!(account_id = %login.user, server = ?server, "cached route points at a draining server; resolving the account id again");
            self.forget_account_id(login).await;
            return None;
        }
        Some((upstream, server))
    }

    /// The cached route of an account id. A cache error is a miss.
    async fn cached_by_id(&self, login: &LoginContext) -> Option<Upstream> {
        match self
            .inner
            .cache
            .get_route_by_id(login.protocol, &login.user)
            .await
        {
            Ok(upstream) => upstream,
            Err(error) => {
                tracing::debug!(%error, "route cache read failed; treating it as a miss");
                None
            }
        }
    }

    /// The cached route: the login's own key, else through the alias the handler allowed us to
    /// cache. A cache error is a miss.
    async fn cached(&self, login: &LoginContext) -> Option<Route> {
        let cache = &self.inner.cache;
        match cache
            .get_route(login.protocol, &login.user, login.client_ip)
            .await
        {
            Ok(Some(upstream)) => {
                return Some(Route {
                    upstream,
                    account: None,
                });
            }
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(%error, "route cache read failed; treating it as a miss");
                return None;
            }
        }
        let scope = AliasScope::of(login)?;
        let account = cache.get_alias(&login.user, scope).await.ok()??;
        let upstream = cache
            .get_route(login.protocol, &account, login.client_ip)
            .await
            .ok()??;
        Some(Route {
            upstream,
            account: Some(account),
        })
    }

    async fn flight(&self, login: &LoginContext, method: AuthMethod) -> FlightResult {
        self.fly(FlightKey::of(login, method), || {
            let resolver = self.clone();
            let login = login.clone();
            async move {
                match method {
                    AuthMethod::Username => resolver.lookup_and_cache(&login).await,
                    AuthMethod::ZimbraId => resolver.lookup_id_and_cache(&login).await,
                }
            }
        })
        .await
    }

    /// Joins the flight of `key`, or starts one with `lookup` for later misses to join.
    async fn fly<Lookup, Answer>(&self, key: FlightKey, lookup: Lookup) -> FlightResult
    where
        Lookup: FnOnce() -> Answer,
        Answer: Future<Output = FlightResult> + Send + 'static,
    {
        let (flight, answer) = {
            let mut flights = self.inner.flights.lock().expect("flight map lock");
            if let Some(flight) = flights.get(&key) {
                self.inner.metrics.coalesced.inc();
                (flight.clone(), None)
            } else {
                let (answer, answered) = tokio::sync::oneshot::channel();
                let flight = async move {
                    answered.await.unwrap_or_else(|_| {
                        Err(ResolveError::Unavailable {
                            reason: "the lookup task ended without an answer".to_string(),
                        })
                    })
                }
                .boxed()
                .shared();
                flights.insert(key.clone(), flight.clone());
                (flight, Some(answer))
            }
        };
        // Spawned once the lock is released: a runtime that is shutting down drops the task at
        // once, on this thread, and its landing takes the lock.
        if let Some(answer) = answer {
            let landing = Landing {
                resolver: self.clone(),
                key,
            };
            let lookup = lookup();
            tokio::spawn(async move {
                let _landing = landing;
                let _ = answer.send(lookup.await);
            });
        }
        flight.await
    }

    async fn lookup_and_cache(&self, login: &LoginContext) -> FlightResult {
        let table = self.inner.table.current();
        // A flight that just ended has cached its route before leaving the flight map; a login
        // that missed the cache before that write and arrives after it finds the route here
        // instead of sending a second lookup.
        if let Some((route, server)) = self.cached_serving(login, &table).await {
            return Ok(Resolved {
                route,
                source: RouteSource::Cache,
                server,
            });
        }
        let outcome = self.inner.lookup.lookup(login, AuthMethod::Username).await;
        let refusal = match outcome {
            Ok(LookupOutcome::Found { route, cache_alias }) => {
                let server = self
                    .server_of(&table, &route.upstream, login.protocol)
                    .await;
                refuse_draining(login, &table, server.as_deref())?;
                self.remember(login, &route, cache_alias, &table).await;
                return Ok(Resolved {
                    route,
                    source: RouteSource::Lookup,
                    server,
                });
            }
            Ok(LookupOutcome::Refused { message, wait }) => ResolveError::Refused { message, wait },
            Ok(LookupOutcome::Draining { server }) => return Err(draining(login, &server)),
            Err(error) => ResolveError::Unavailable {
                reason: error.to_string(),
            },
        };
        table_domain(login, &table, refusal)
    }

    async fn lookup_id_and_cache(&self, login: &LoginContext) -> FlightResult {
        let table = self.inner.table.current();
        // As in `lookup_and_cache`: a flight that just ended may have cached the route.
        if let Some((upstream, server)) = self.cached_by_id_serving(login, &table).await {
            return Ok(Resolved {
                route: Route {
                    upstream,
                    account: None,
                },
                source: RouteSource::Cache,
                server,
            });
        }
        match self.inner.lookup.lookup(login, AuthMethod::ZimbraId).await {
            Ok(LookupOutcome::Found { route, .. }) => {
                let server = self
                    .server_of(&table, &route.upstream, login.protocol)
                    .await;
                refuse_draining(login, &table, server.as_deref())?;
                if let Some(ttl) = cache_ttl(&table)
                    && let Err(error) = self
                        .inner
                        .cache
                        .put_route_by_id(login.protocol, &login.user, &route.upstream, ttl)
                        .await
                {
                    tracing::debug!(%error, "could not cache a learned route");
                }
                Ok(Resolved {
                    route,
                    source: RouteSource::Lookup,
                    server,
                })
            }
            Ok(LookupOutcome::Refused { message, wait }) => {
                Err(ResolveError::Refused { message, wait })
            }
            Ok(LookupOutcome::Draining { server }) => Err(draining(login, &server)),
            Err(error) => Err(ResolveError::Unavailable {
                reason: error.to_string(),
            }),
        }
    }

    /// Caches a learned route for the fleet. A rewritten login (`Auth-User`) is cached as the
    /// account's route plus, when the handler allows it (`Auth-Cache-Alias: TRUE`), the login's
    /// alias, so that the next login under the same name finds both the server and the name to
    /// log in with.
    async fn remember(
        &self,
        login: &LoginContext,
        route: &Route,
        cache_alias: bool,
        table: &RouteTable,
    ) {
        let Some(ttl) = cache_ttl(table) else {
            return;
        };
        let cache = &self.inner.cache;
        let rewritten = route
            .account
            .as_deref()
            .filter(|account| *account != login.user);
        let written = match rewritten {
            None => cache
                .put_route(
                    login.protocol,
                    &login.user,
                    login.client_ip,
                    &route.upstream,
                    ttl,
                )
                .await
                .map(drop),
            Some(account) => {
                // The account's route is the account's whatever the handler says of the name
                // used (Zimbra caches it too): a later login as the account, from any proxy of
                // the fleet, needs no lookup.
                let account_route = cache
                    .put_route(
                        login.protocol,
                        account,
                        login.client_ip,
                        &route.upstream,
                        ttl,
                    )
                    .await;
                let alias = match AliasScope::of(login).filter(|_| cache_alias) {
                    Some(scope) => cache
                        .put_alias(&login.user, scope, account, ttl)
                        .await
                        .map(drop),
                    None => Ok(()),
                };
                account_route.and(alias).map(drop)
            }
        };
        if let Err(error) = written {
            tracing::debug!(%error, "could not cache a learned route");
        }
    }
}

/// Takes a flight off the map when its task ends, however it ends (an answer, a panic, an abort
/// when the runtime stops): a finished flight left there would answer every later miss of its
/// key with its failure.
struct Landing {
    resolver: Resolver,
    key: FlightKey,
}

impl Drop for Landing {
    fn drop(&mut self) {
        // This may run while a panic unwinds, where a second panic would abort the process.
        self.resolver
            .inner
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// The route of the login's domain in the table, else `otherwise`.
fn table_domain(login: &LoginContext, table: &RouteTable, otherwise: ResolveError) -> FlightResult {
    let domain = login.user.rsplit_once('@').map(|(_, domain)| domain);
    match domain.and_then(|domain| table.pinned_domain(domain)) {
        Some((name, server)) => Ok(pinned(
            name,
            server,
            login.protocol,
            RouteSource::TableDomain,
        )),
        None => Err(otherwise),
    }
}

fn pinned(name: &str, server: &RouteServer, protocol: Protocol, source: RouteSource) -> Resolved {
    let port = u16::try_from(protocol.port_of(&server.ports)).unwrap_or(0);
    Resolved {
        route: Route {
            upstream: Upstream::new(server.host.clone(), port),
            account: None,
        },
        source,
        server: Some(name.to_string()),
    }
}

/// How long a learned route is cached; `None` when `cacheTtlSeconds` is 0, which turns caching
/// off (memcached would take an expiry of 0 as "never").
fn cache_ttl(table: &RouteTable) -> Option<Duration> {
    let seconds = table.settings.cache_ttl_seconds;
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

fn is_draining(table: &RouteTable, server: Option<&str>) -> bool {
    server
        .and_then(|name| table.servers.get(name))
        .is_some_and(|server| server.draining)
}

/// A handler's answer naming a draining server is not used: the account's mailbox is there, so
/// no other server can take the login, and the drained server must get no new sessions. The
/// login fails as temporarily unavailable (the client retries later) and nothing is cached.
fn refuse_draining(
    login: &LoginContext,
    table: &RouteTable,
    server: Option<&str>,
) -> Result<(), ResolveError> {
    match server {
        Some(name) if is_draining(table, Some(name)) => Err(draining(login, name)),
        _ => Ok(()),
    }
}

/// The login's mailbox is on `server`, which is draining: as its own table says (a pinned
/// account, or a lookup answer checked by [`refuse_draining`]) or as the handler says, refusing
/// with [`crate::route::lookup::DRAINING_HEADER`] (a handler that knows of drains, like
/// `mailproxy lookupd`, gives no route to a draining server). Either way no fallback takes the
/// login.
fn draining(login: &LoginContext, server: &str) -> ResolveError {
    ResolveError::Unavailable {
        reason: format!(
            "the mailbox of {} is on {server}, which is draining (spec.drain)",
            login.user
        ),
    }
}

/// The table's server at an address: by the host as the table names it, or by the address its
/// host name resolves to (`addresses`), since handlers answer with IP addresses. A server whose
/// port for `protocol` is the address's port comes first; else one with the port for any
/// protocol, since a handler may answer a login with another protocol's port of the server (a
/// drain must hold for it all the same).
fn server_at(
    table: &RouteTable,
    addresses: &AddressIndex,
    upstream: &Upstream,
    protocol: Protocol,
) -> Option<String> {
    let port = i32::from(upstream.port);
    let ip = ip_literal(&upstream.host);
    let resolved = ip.map_or(&[][..], |ip| addresses.servers_at(ip));
    // Addresses compare parsed: `fd00::5` is `fd00:0:0:0:0:0:0:5`, `::ffff:10.0.0.5` is
    // `10.0.0.5`, whichever way the table and the handler write them.
    let at_host = |name: &String, server: &RouteServer| match (ip, ip_literal(&server.host)) {
        (Some(ip), Some(server_ip)) => ip == server_ip,
        _ => server.host.eq_ignore_ascii_case(&upstream.host) || resolved.contains(name),
    };
    let find = |serves: &dyn Fn(&RouteServer) -> bool| {
        table
            .servers
            .iter()
            .find(|(name, server)| at_host(name, server) && serves(server))
            .map(|(name, _)| name.clone())
    };
    find(&|server| protocol.port_of(&server.ports) == port).or_else(|| {
        find(&|server| {
            Protocol::ALL
                .iter()
                .any(|p| p.port_of(&server.ports) == port)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::cache::RouteCacheConfig;
    use super::super::lookup::LookupClientConfig;
    use super::*;

    fn login(user: &str) -> LoginContext {
        LoginContext {
            user: user.to_string(),
            protocol: Protocol::Imap,
            client_ip: IpAddr::from([203, 0, 113, 7]),
            proxy_ip: Some(IpAddr::from([10, 1, 2, 3])),
            virtual_host: None,
            attempt: 1,
        }
    }

    fn key(login: &LoginContext) -> FlightKey {
        FlightKey::of(login, AuthMethod::Username)
    }

    /// Two servers on one host whose ports overlap across protocols: the login's protocol says
    /// which one an address is; another protocol's port still finds a server.
    #[test]
    fn a_shared_host_is_told_apart_by_the_port_of_the_logins_protocol() {
        let table = RouteTable::from_json(
            r#"{"servers": {
                "a": {"host": "10.0.0.1", "ports": {"imap": 7143, "pop3": 7110}},
                "b": {"host": "10.0.0.1", "ports": {"imap": 8143, "pop3": 7143}}
            }}"#,
        )
        .unwrap();
        let addresses = AddressIndex::default();
        let at = |port, protocol| {
            server_at(
                &table,
                &addresses,
                &Upstream::new("10.0.0.1", port),
                protocol,
            )
        };
        assert_eq!(at(7143, Protocol::Imap).as_deref(), Some("a"));
        assert_eq!(at(7143, Protocol::Pop3).as_deref(), Some("b"));
        assert_eq!(at(7110, Protocol::Imap).as_deref(), Some("a"));
        assert_eq!(at(9999, Protocol::Imap), None);
    }

    /// Handlers and tables write one address in several ways; each finds the server.
    #[test]
    fn a_server_named_by_an_address_is_found_however_the_address_is_written() {
        let table = RouteTable::from_json(
            r#"{"servers": {
                "v6": {"host": "fd00::5", "ports": {"imap": 7143}},
                "v4": {"host": "10.0.0.5", "ports": {"imap": 7143}},
                "long": {"host": "fd00:0:0:0:0:0:0:6", "ports": {"imap": 7143}}
            }}"#,
        )
        .unwrap();
        let addresses = AddressIndex::default();
        let at = |host: &str| {
            server_at(
                &table,
                &addresses,
                &Upstream::new(host, 7143),
                Protocol::Imap,
            )
        };
        assert_eq!(at("fd00:0:0:0:0:0:0:5").as_deref(), Some("v6"));
        assert_eq!(at("FD00::5").as_deref(), Some("v6"));
        assert_eq!(at("::ffff:10.0.0.5").as_deref(), Some("v4"));
        assert_eq!(at("fd00::6").as_deref(), Some("long"));
        assert_eq!(at("fd00::7"), None);
    }

    fn resolver() -> Resolver {
        Resolver::new(
            TableHandle::fixed(RouteTable::default()),
            RouteCache::new(RouteCacheConfig::default()),
            Arc::new(
                LookupClient::new(LookupClientConfig {
                    system_roots: false,
                    ..LookupClientConfig::default()
                })
                .unwrap(),
            ),
            Dns::from_system_config(),
        )
    }

    fn found() -> FlightResult {
        Ok(Resolved {
            route: Route {
                upstream: Upstream::new("10.0.0.5", 7143),
                account: None,
            },
            source: RouteSource::Lookup,
            server: None,
        })
    }

    /// A lookup task that panics must not leave its failure for every later login of the key.
    #[tokio::test]
    async fn a_flight_whose_task_panics_is_not_joined_later() {
        let resolver = resolver();
        let key = key(&login("alice@example.com"));
        let failed = resolver
            .fly(key.clone(), || async { panic!("a bug in the lookup") })
            .await;
        assert!(
            matches!(&failed, Err(ResolveError::Unavailable { reason }) if reason.contains("ended without an answer")),
            "{failed:?}"
        );
        assert_eq!(resolver.fly(key, || async { found() }).await, found());
    }

    /// The runtime stopping aborts a lookup task mid-flight.
    #[test]
    fn a_flight_whose_task_is_aborted_leaves_the_map() {
        let resolver = resolver();
        let key = key(&login("alice@example.com"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let waiting = resolver.fly(key.clone(), std::future::pending::<FlightResult>);
            let _ = tokio::time::timeout(Duration::from_millis(1), waiting).await;
        });
        assert!(resolver.inner.flights.lock().unwrap().contains_key(&key));
        drop(runtime);
        assert!(resolver.inner.flights.lock().unwrap().is_empty());
    }

    #[test]
    fn unqualified_logins_share_a_lookup_only_when_they_arrived_the_same_way() {
        let john = login("john");
        let mut other_proxy_ip = john.clone();
        other_proxy_ip.proxy_ip = Some(IpAddr::from([10, 1, 2, 4]));
        let mut other_host = john.clone();
        other_host.virtual_host = Some("mail.example.org".to_string());
        let mut other_client = john.clone();
        other_client.client_ip = IpAddr::from([203, 0, 113, 8]);
        for different in [&other_proxy_ip, &other_host, &other_client] {
            assert_ne!(key(&john), key(different), "{different:?}");
        }
        let mut next_attempt = john.clone();
        next_attempt.attempt = 2;
        assert_eq!(key(&john), key(&next_attempt));
        assert_eq!(key(&john), key(&login("JOHN")));
    }

    #[test]
    fn qualified_logins_share_a_lookup_wherever_they_came_from() {
        let alice = login("alice@example.com");
        let mut elsewhere = login("Alice@Example.com");
        elsewhere.client_ip = IpAddr::from([198, 51, 100, 1]);
        elsewhere.proxy_ip = Some(IpAddr::from([10, 1, 2, 4]));
        elsewhere.virtual_host = Some("mail.example.org".to_string());
        assert_eq!(key(&alice), key(&elsewhere));
    }

    #[test]
    fn a_trailing_at_is_unqualified_as_in_the_cache_keys() {
        let john = login("john@");
        let mut other_client = john.clone();
        other_client.client_ip = IpAddr::from([203, 0, 113, 8]);
        assert_ne!(key(&john), key(&other_client));
    }

    #[test]
    fn account_ids_share_a_lookup_wherever_they_came_from() {
        let id = login("6a3c1c1e-0000-4000-8000-000000000001");
        let mut elsewhere = id.clone();
        elsewhere.client_ip = IpAddr::from([198, 51, 100, 1]);
        elsewhere.virtual_host = Some("mail.example.org".to_string());
        assert_eq!(
            FlightKey::of(&id, AuthMethod::ZimbraId),
            FlightKey::of(&elsewhere, AuthMethod::ZimbraId)
        );
    }
}
