//! The memcached tier: the route cache the whole fleet shares.
//!
//! A small text-protocol client of our own over tokio's `TcpStream`, because none of the async
//! crates covers what a login path needs. `async-memcached` and `memcache-async` drive one
//! connection to one server: no server selection, no dead-server handling, no timeouts, no
//! pooling, and a timeout wrapped around one of their calls would leave a half-read reply on the
//! connection for the next caller. `memcache`'s tokio client is an experimental module of a
//! blocking crate and places keys with jump hashing, which cannot drop a server from the middle
//! of the list. What we need is four commands (`get`, `add`, `delete`, `incr`), so the client is
//! a few hundred lines: [`super::protocol`] parses replies defensively (and is fuzzed), this file
//! does servers, connections and failures.
//!
//! - Keys are placed on a ketama ring ([`super::ring`]); a key whose server is down goes to the
//!   next server on the ring.
//! - A server that fails a request (connect error, I/O error, malformed reply, timeout) is marked
//!   down for `retry_interval` (Zimbra: 1 minute); the first request after that tries it again.
//! - Every request has one deadline, `timeout` (Zimbra: 3 s), covering connect, write and read.
//!   A request that misses it is abandoned and its connection dropped, so a hung server costs a
//!   caller at most `timeout`, never a hang.
//! - Connections are kept per server and reused: a hit is one round trip on an open connection.
//!   A reused connection that turns out closed (memcached restarted) is replaced once within the
//!   same deadline instead of failing the request.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::CacheError;
use super::keys::CacheKey;
use super::protocol::{ProtocolError, Reply, Request, parse_reply};
use super::ring::Ring;
use crate::kept_connection::is_open;

/// Connection and failure handling of the memcached tier.
#[derive(Clone, Debug)]
pub struct MemcachedConfig {
    /// Deadline of one request, connect included (Zimbra's fetch timeout: 3 s).
    pub timeout: Duration,
    /// How long a failed server is skipped before it is tried again (Zimbra: 1 minute).
    pub retry_interval: Duration,
    /// Idle connections kept open per server for reuse.
    pub max_idle_connections: usize,
    /// Largest value accepted from a server; route values are a few dozen bytes, so anything
    /// near memcached's 1 MiB item limit means the key holds something else.
    pub max_value_len: usize,
}

impl Default for MemcachedConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3),
            retry_interval: Duration::from_secs(60),
            max_idle_connections: 16,
            max_value_len: 64 * 1024,
        }
    }
}

/// What one server said to a purge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerPurge {
    /// The server, `host:port` as configured.
    pub server: String,
    /// Keys it deleted.
    pub deleted: usize,
    /// Keys it did not have.
    pub not_found: usize,
    /// Why the purge of this server stopped early, if it did: its remaining keys were not
    /// deleted there.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ServerLabels {
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ServerErrorLabels {
    pub server: String,
    pub kind: &'static str,
}

/// Per-server metrics, registered by [`super::RouteCache::register`].
#[derive(Clone, Default)]
pub(super) struct ServerMetrics {
    pub up: Family<ServerLabels, Gauge>,
    pub errors: Family<ServerErrorLabels, Counter>,
}

pub(super) struct MemcachedTier {
    cluster: ArcSwap<Cluster>,
    config: MemcachedConfig,
    metrics: ServerMetrics,
}

#[derive(Default)]
struct Cluster {
    servers: Vec<Arc<Server>>,
    ring: Ring,
}

impl MemcachedTier {
    pub fn new(config: MemcachedConfig, metrics: ServerMetrics) -> Self {
        Self {
            cluster: ArcSwap::from_pointee(Cluster::default()),
            config,
            metrics,
        }
    }

    pub fn has_servers(&self) -> bool {
        !self.cluster.load().servers.is_empty()
    }

    pub fn servers(&self) -> Vec<String> {
        self.cluster
            .load()
            .servers
            .iter()
            .map(|server| server.addr.clone())
            .collect()
    }

    /// Replaces the server list. Servers that stay keep their connections and health; the ring
    /// is rebuilt, so only the keys of added or removed servers move.
    pub fn set_servers(&self, addrs: Vec<String>) {
        let old = self.cluster.load_full();
        let mut servers: Vec<Arc<Server>> = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if servers.iter().any(|server| server.addr == addr) {
                continue;
            }
            let server = match old.servers.iter().find(|server| server.addr == addr) {
                Some(server) => Arc::clone(server),
                None => Arc::new(Server::new(addr, &self.metrics)),
            };
            servers.push(server);
        }
        for gone in old
            .servers
            .iter()
            .filter(|server| !servers.iter().any(|kept| kept.addr == server.addr))
        {
            self.metrics.up.remove(&ServerLabels {
                server: gone.addr.clone(),
            });
        }
        let names: Vec<&str> = servers.iter().map(|server| server.addr.as_str()).collect();
        let ring = Ring::new(&names);
        self.cluster.store(Arc::new(Cluster { servers, ring }));
    }

    pub async fn get(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, CacheError> {
        let server = self.pick(key)?;
        match server
            .call(&Request::Get(key), &Budget::new(&self.config))
            .await?
        {
            Reply::Value(value) => Ok(value),
            other => Err(server.mismatch(other)),
        }
    }

    /// memcached `add`: `false` when the key already exists.
    pub async fn add(
        &self,
        key: &CacheKey,
        value: &[u8],
        ttl_seconds: u32,
    ) -> Result<bool, CacheError> {
        let server = self.pick(key)?;
        server
            .add(key, value, ttl_seconds, &Budget::new(&self.config))
            .await
    }

    pub async fn delete(&self, key: &CacheKey) -> Result<bool, CacheError> {
        let server = self.pick(key)?;
        server.delete(key, &Budget::new(&self.config)).await
    }

    /// A fixed-window counter: increments `key`, creating it with `1` and a TTL of `window` when
    /// it does not exist, so the window starts at the first count and ends when the entry
    /// expires. Returns the count including this one.
    pub async fn count(&self, key: &CacheKey, window_seconds: u32) -> Result<u64, CacheError> {
        let server = self.pick(key)?;
        // One deadline for the whole exchange, so a count costs at most one timeout too (plus
        // any wait for a connection).
        let budget = Budget::new(&self.config);
        if let Some(count) = server.incr(key, &budget).await? {
            return Ok(count);
        }
        if server.add(key, b"1", window_seconds, &budget).await? {
            return Ok(1);
        }
        // Another proxy created the counter between our incr and add: count on it.
        Ok(server.incr(key, &budget).await?.unwrap_or(1))
    }

    /// Deletes `keys` on every server, not only on each key's owner: an entry may have been
    /// written while the ring was different (a server down, or another server list).
    pub async fn delete_everywhere(&self, keys: &[CacheKey]) -> Vec<ServerPurge> {
        let cluster = self.cluster.load_full();
        let purges = cluster.servers.iter().map(|server| async move {
            let mut report = ServerPurge {
                server: server.addr.clone(),
                deleted: 0,
                not_found: 0,
                error: None,
            };
            for key in keys {
                match server.delete(key, &Budget::new(&self.config)).await {
                    Ok(true) => report.deleted += 1,
                    Ok(false) => report.not_found += 1,
                    Err(error) => {
                        // One timeout per server, not one per key.
                        report.error = Some(error.to_string());
                        break;
                    }
                }
            }
            report
        });
        futures::future::join_all(purges).await
    }

    /// The first server on the key's ring path that is not marked down.
    fn pick(&self, key: &CacheKey) -> Result<Arc<Server>, CacheError> {
        let cluster = self.cluster.load();
        let now = Instant::now();
        cluster
            .ring
            .candidates(key.as_str().as_bytes())
            .map(|index| &cluster.servers[index])
            .find(|server| server.available(now))
            .cloned()
            .ok_or(CacheError::NoServer {
                configured: cluster.servers.len(),
            })
    }
}

/// Connections in use at once per server and proxy. A login storm must not open one per
/// request: memcached refuses connections past its own limit (1024 by default), shared by every
/// proxy of the pool, and the refusals would mark it down for everyone.
const MAX_CONNECTIONS: usize = 64;

struct Server {
    addr: String,
    /// Permits for connections in use ([`MAX_CONNECTIONS`]); idle ones hold none.
    in_use: Semaphore,
    idle: Mutex<Vec<Connection>>,
    down_until: Mutex<Option<Instant>>,
    up: Gauge,
    errors: Family<ServerErrorLabels, Counter>,
}

/// The settings and the deadline of one operation (one or several requests to one server).
struct Budget<'a> {
    config: &'a MemcachedConfig,
    /// Moved later by the time spent waiting for connections (see [`Server::call`]); shared by
    /// the operation's requests, so a wait in the first one is not charged to the next.
    deadline: Mutex<tokio::time::Instant>,
}

impl<'a> Budget<'a> {
    fn new(config: &'a MemcachedConfig) -> Self {
        Self {
            config,
            deadline: Mutex::new(tokio::time::Instant::now() + config.timeout),
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        *lock(&self.deadline)
    }

    /// The new deadline, `waited` later.
    fn extend(&self, waited: Duration) -> tokio::time::Instant {
        let mut deadline = lock(&self.deadline);
        *deadline += waited;
        *deadline
    }
}

/// Why one exchange failed, before it is attributed to a server.
enum Failure {
    Io(io::Error),
    Protocol(ProtocolError),
    /// A kept connection broke after an increment went out: the server may have counted it, so
    /// it is not sent again, and the server is not blamed (it closed an idle connection).
    Unconfirmed(io::Error),
}

impl Server {
    fn new(addr: String, metrics: &ServerMetrics) -> Self {
        let up = metrics
            .up
            .get_or_create(&ServerLabels {
                server: addr.clone(),
            })
            .clone();
        up.set(1);
        Self {
            addr,
            in_use: Semaphore::new(MAX_CONNECTIONS),
            idle: Mutex::new(Vec::new()),
            down_until: Mutex::new(None),
            up,
            errors: metrics.errors.clone(),
        }
    }

    fn available(&self, now: Instant) -> bool {
        lock(&self.down_until).is_none_or(|until| now >= until)
    }

    async fn add(
        &self,
        key: &CacheKey,
        value: &[u8],
        ttl_seconds: u32,
        budget: &Budget<'_>,
    ) -> Result<bool, CacheError> {
        let request = Request::Add {
            key,
            ttl_seconds,
            value,
        };
        match self.call(&request, budget).await? {
            Reply::Stored => Ok(true),
            Reply::NotStored => Ok(false),
            other => Err(self.mismatch(other)),
        }
    }

    async fn delete(&self, key: &CacheKey, budget: &Budget<'_>) -> Result<bool, CacheError> {
        match self.call(&Request::Delete(key), budget).await? {
            Reply::Deleted => Ok(true),
            Reply::NotFound => Ok(false),
            other => Err(self.mismatch(other)),
        }
    }

    async fn incr(&self, key: &CacheKey, budget: &Budget<'_>) -> Result<Option<u64>, CacheError> {
        match self.call(&Request::Incr(key, 1), budget).await? {
            Reply::Number(count) => Ok(Some(count)),
            Reply::NotFound => Ok(None),
            other => Err(self.mismatch(other)),
        }
    }

    /// One request within the budget's deadline, with the server's health updated from the
    /// outcome.
    async fn call(&self, request: &Request<'_>, budget: &Budget<'_>) -> Result<Reply, CacheError> {
        let config = budget.config;
        let waiting = tokio::time::Instant::now();
        let Ok(Ok(_permit)) =
            tokio::time::timeout_at(budget.deadline(), self.in_use.acquire()).await
        else {
            self.count_error("busy");
            return Err(CacheError::Busy {
                server: self.addr.clone(),
                limit: MAX_CONNECTIONS,
            });
        };
        // Time spent waiting for a connection is the proxy's, not the server's: the exchange
        // still gets what the budget left it, so that a queue never looks like a dead server.
        let deadline = budget.extend(waiting.elapsed());
        let exchange = self.exchange(request, config.max_value_len);
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok((reply, connection))) => {
                self.mark_up();
                let mut idle = lock(&self.idle);
                if idle.len() < config.max_idle_connections {
                    idle.push(connection);
                }
                Ok(reply)
            }
            Ok(Err(Failure::Protocol(error @ ProtocolError::Refused(_)))) => {
                // The server is alive and said no; its connection was dropped because memcached
                // may follow a refused command line with more error lines.
                self.count_error("refused");
                Err(CacheError::Protocol {
                    server: self.addr.clone(),
                    source: error,
                })
            }
            Ok(Err(Failure::Protocol(error))) => {
                self.count_error("protocol");
                self.mark_down(config.retry_interval, &error);
                Err(CacheError::Protocol {
                    server: self.addr.clone(),
                    source: error,
                })
            }
            Ok(Err(Failure::Io(error))) => {
                self.count_error("io");
                self.mark_down(config.retry_interval, &error);
                Err(CacheError::Io {
                    server: self.addr.clone(),
                    source: error,
                })
            }
            Ok(Err(Failure::Unconfirmed(error))) => {
                self.count_error("io");
                Err(CacheError::Io {
                    server: self.addr.clone(),
                    source: error,
                })
            }
            Err(_) => {
                self.count_error("timeout");
                let error = CacheError::Timeout {
                    server: self.addr.clone(),
                    after: config.timeout,
                };
                self.mark_down(config.retry_interval, &error);
                Err(error)
            }
        }
    }

    async fn exchange(
        &self,
        request: &Request<'_>,
        max_value: usize,
    ) -> Result<(Reply, Connection), Failure> {
        let reused = std::iter::from_fn(|| lock(&self.idle).pop())
            .find_map(|mut connection| is_open(&mut connection.stream).then_some(connection));
        if let Some(mut connection) = reused {
            match connection.call(request, max_value).await {
                Ok(reply) => return Ok((reply, connection)),
                // Closed while idle in a way not seen yet: sent again on a new connection, but
                // an increment only if nothing reached the server (it may have counted it).
                Err(Failure::Io(error))
                    if matches!(request, Request::Incr(..)) && connection.sent > 0 =>
                {
                    return Err(Failure::Unconfirmed(error));
                }
                Err(Failure::Io(error)) => {
                    tracing::debug!(server = %self.addr, %error, "an idle memcached connection had closed");
                }
                Err(error) => return Err(error),
            }
        }
        let mut connection = Connection::open(&self.addr).await.map_err(Failure::Io)?;
        let reply = connection.call(request, max_value).await?;
        Ok((reply, connection))
    }

    fn mark_down(&self, retry: Duration, why: &dyn std::fmt::Display) {
        let was_up = lock(&self.down_until)
            .replace(Instant::now() + retry)
            .is_none();
        lock(&self.idle).clear();
        self.up.set(0);
        if was_up {
            tracing::warn!(server = %self.addr, retry_in = ?retry, "memcached server marked down: {why}");
        }
    }

    fn mark_up(&self) {
        if lock(&self.down_until).take().is_some() {
            self.up.set(1);
            tracing::info!(server = %self.addr, "memcached server is back");
        }
    }

    fn count_error(&self, kind: &'static str) {
        self.errors
            .get_or_create(&ServerErrorLabels {
                server: self.addr.clone(),
                kind,
            })
            .inc();
    }

    /// A reply of the wrong kind for its command (the parser never produces one; kept as an
    /// error rather than a panic).
    fn mismatch(&self, reply: Reply) -> CacheError {
        CacheError::Protocol {
            server: self.addr.clone(),
            source: ProtocolError::mismatch(&reply),
        }
    }
}

/// One open connection and the bytes read from it that no reply has used yet.
struct Connection {
    stream: TcpStream,
    read: BytesMut,
    /// Bytes of the current request written so far.
    sent: usize,
}

impl Connection {
    async fn open(addr: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            read: BytesMut::with_capacity(1024),
            sent: 0,
        })
    }

    async fn call(&mut self, request: &Request<'_>, max_value: usize) -> Result<Reply, Failure> {
        let mut command = Vec::with_capacity(128);
        request.encode(&mut command);
        self.sent = 0;
        while self.sent < command.len() {
            match self.stream.write(&command[self.sent..]).await {
                Ok(0) => return Err(Failure::Io(io::ErrorKind::WriteZero.into())),
                Ok(written) => self.sent += written,
                Err(error) => return Err(Failure::Io(error)),
            }
        }
        loop {
            if let Some((reply, used)) =
                parse_reply(request.expect(), &self.read, max_value).map_err(Failure::Protocol)?
            {
                if used != self.read.len() {
                    // Bytes nobody asked for: the connection is out of step with its requests.
                    return Err(Failure::Protocol(ProtocolError::trailing(
                        &self.read[used..],
                    )));
                }
                self.read.clear();
                return Ok(reply);
            }
            self.read.reserve(4096);
            let read = self
                .stream
                .read_buf(&mut self.read)
                .await
                .map_err(Failure::Io)?;
            if read == 0 {
                return Err(Failure::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a complete reply",
                )));
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
