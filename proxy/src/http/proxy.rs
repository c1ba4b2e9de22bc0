//! The web proxy: a hyper server (HTTP/1.1, HTTP/2 by ALPN on TLS or by preface in clear text)
//! that routes each request to a mailbox server's web port and streams it there over a
//! keep-alive connection.
//!
//! Per request: [`routing::detect`] names an account (or none); the account's route comes from
//! the [`Resolver`] (by name, or by id with `Auth-Method: zimbraId`); requests without an account
//! and those whose lookup fails go to the route table's `webBackends` with client-IP affinity.
//! Bodies stream both ways (never buffered). Hop-by-hop headers are dropped, `X-Forwarded-For`,
//! `X-Forwarded-Proto` and `Forwarded` added. WebSocket (HTTP/1.1 `Upgrade`) is passed through.
//!
//! An HTTP/1.x client connection sends one request after the other, so it gets a backend
//! connection of its own, kept between its requests and driven by the client connection's own
//! task: a request then costs no pool lookup and no wake-ups between tasks (the pooled client
//! runs each backend connection in a task of its own). The backend connection closes with the
//! client connection, or when the client moves to another backend. HTTP/2 requests (concurrent
//! on one connection) and upgrades go through the pooled client.
//!
//! Failures answer with a short text body: 503 when there is no backend, 502 when it refuses or
//! breaks the exchange, 504 when it does not answer in time. A balanced request that is
//! idempotent and has no body is retried once per other backend when the chosen one refuses the
//! connection, and that backend is skipped for a few seconds.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mailproxy_crds::proxy_config::HttpConfig;
use mailproxy_crds::route_table::RouteTable;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::routing::{self, WebRoute};
use super::upstream::{UpstreamStream, WebConnector, is_handshake_failure};
use crate::route::resolver::Resolver;
use crate::route::{LoginContext, Protocol, Route, Upstream};
use crate::session::{accept_connection, signalled};

/// The body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Limits and timeouts of the web proxy.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// From the first byte of a request head (or of the connection) to its end: slowloris.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1: answered 431 past it; HTTP/2: the header list size).
    pub max_header_bytes: usize,
    /// The TLS handshake of an `https` listener.
    pub tls_handshake_timeout: Duration,
    /// Connecting to a backend.
    pub upstream_connect_timeout: Duration,
    /// From sending a request to the backend's response head (504 past it). Zimbra's web
    /// client long-polls for up to a few minutes, hence the generous default.
    pub upstream_response_timeout: Duration,
    /// How long a balanced backend that refused a connection is skipped.
    pub backend_down: Duration,
}

impl From<&HttpConfig> for HttpSettings {
    fn from(config: &HttpConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds),
            max_header_bytes: config.max_header_bytes,
            tls_handshake_timeout: Duration::from_secs(config.tls_handshake_timeout_seconds),
            upstream_connect_timeout: Duration::from_secs(config.upstream_connect_timeout_seconds),
            upstream_response_timeout: Duration::from_secs(
                config.upstream_response_timeout_seconds,
            ),
            backend_down: Duration::from_secs(config.backend_down_seconds),
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self::from(&HttpConfig::default())
    }
}

/// The client side of one connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

struct Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    backend_failures: Family<RouteLabels, Counter>,
    /// Per entry of [`ROUTE_LABELS`]: its series, taken from the families on first use, so that
    /// a request costs atomic additions rather than the families' lock and a hash of the labels.
    series: [RouteSeries; ROUTE_LABELS.len()],
}

/// The `route` labels of [`routing::WebRoute::label`].
const ROUTE_LABELS: [&str; 8] = [
    "rest",
    "activesync",
    "ews",
    "caldav",
    "auth_token",
    "admin_auth_token",
    "jwt",
    "balanced",
];

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Default)]
struct RouteSeries {
    requests: [OnceLock<Counter>; STATUS_CLASSES.len()],
    duration: OnceLock<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 4.0, 10))
            }),
            backend_failures: Family::default(),
            series: Default::default(),
        }
    }
}

impl Metrics {
    fn record(&self, route: &'static str, status: StatusCode, elapsed: Duration) {
        let class = status_index(status);
        let request_labels = || RequestLabels {
            route,
            status: STATUS_CLASSES[class],
        };
        let duration_labels = || RouteLabels { route };
        match ROUTE_LABELS.iter().position(|label| *label == route) {
            Some(index) => {
                let series = &self.series[index];
                series.requests[class]
                    .get_or_init(|| self.requests.get_or_create(&request_labels()).clone())
                    .inc();
                series
                    .duration
                    .get_or_init(|| self.duration.get_or_create(&duration_labels()).clone())
                    .observe(elapsed.as_secs_f64());
            }
            None => {
                self.requests.get_or_create(&request_labels()).inc();
                self.duration
                    .get_or_create(&duration_labels())
                    .observe(elapsed.as_secs_f64());
            }
        }
    }
}

/// The web proxy shared by every HTTP connection.
pub struct HttpProxy {
    resolver: Resolver,
    client: Client<WebConnector, ProxyBody>,
    connector: WebConnector,
    balancer: Mutex<Balancer>,
    metrics: Metrics,
    settings: HttpSettings,
    /// Turns true when the shutdown grace is over: upgraded tunnels close then.
    closing: watch::Receiver<bool>,
}

/// Keeps a client connection's place in the connection limit while any of its work runs,
/// upgraded tunnels included (the shutdown drain waits for them).
#[derive(Clone)]
pub struct ConnectionGuard {
    _permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl ConnectionGuard {
    pub fn new(permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            _permit: permit.map(Arc::new),
        }
    }
}

/// Why a request got no backend response.
#[derive(Debug)]
enum Failure {
    NoBackend,
    Refused(String),
    Timeout,
    Broken(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoBackend => f.write_str("no web backend"),
            Failure::Refused(error) => write!(f, "refused: {error}"),
            Failure::Timeout => f.write_str("no response in time"),
            Failure::Broken(error) => write!(f, "failed: {error}"),
        }
    }
}

impl Failure {
    fn response(&self) -> Response<ProxyBody> {
        let (status, text) = match self {
            Failure::NoBackend => (StatusCode::SERVICE_UNAVAILABLE, "no backend available\n"),
            Failure::Refused(_) => (
                StatusCode::BAD_GATEWAY,
                "the backend refused the connection\n",
            ),
            Failure::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "the backend did not answer in time\n",
            ),
            Failure::Broken(_) => (StatusCode::BAD_GATEWAY, "the backend failed\n"),
        };
        text_response(status, text)
    }
}

/// The web backends of the route table last seen (parsed once per table) and those that refused
/// a connection lately, with the time they are skipped until.
#[derive(Default)]
struct Balancer {
    table: Option<Arc<RouteTable>>,
    backends: Vec<Upstream>,
    down: HashMap<Upstream, Instant>,
}

/// An account's route, for forgetting it when its server cannot be reached.
struct AccountRoute {
    login: LoginContext,
    route: Route,
    /// Found by account id (an auth token) rather than by name.
    by_id: bool,
}

/// Where a request goes.
struct Target<'a> {
    upstream: Upstream,
    /// Chosen by the balancer (not an account's route).
    balanced: bool,
    /// Over TLS (the route table's `webUpstreamTls`).
    tls: bool,
    /// The client connection's own backend connection.
    backend: &'a BackendSlot,
}

/// Why a backend did not answer.
enum SendError {
    /// No connection to it (another balanced backend may be tried).
    Connect(String),
    /// The exchange failed after connecting.
    Broken(String),
}

/// A backend connection of one HTTP/1.x client connection. Its driver (hyper's connection
/// future) is polled by whoever uses it: the request's future until the response head, then the
/// response body; nobody polls it between requests.
struct OwnConnection {
    upstream: Upstream,
    tls: bool,
    sender: http1::SendRequest<ProxyBody>,
    /// `None` once the connection has ended.
    driver: Option<Pin<Box<BackendDriver>>>,
}

/// hyper's future that runs one backend connection.
type BackendDriver = http1::Connection<TokioIo<UpstreamStream>, ProxyBody>;

impl OwnConnection {
    fn poll_driver(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = &mut self.driver
            && driver.as_mut().poll(cx).is_ready()
        {
            self.driver = None;
        }
    }

    /// Whether a kept connection can take the next request (the backend may have closed it).
    async fn ready(&mut self) -> bool {
        poll_fn(|cx| {
            self.poll_driver(cx);
            if self.driver.is_none() {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|ready| ready.is_ok())
        })
        .await
    }

    async fn send(
        &mut self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<ProxyBody>>> {
        let response = self.sender.try_send_request(request);
        tokio::pin!(response);
        poll_fn(|cx| {
            self.poll_driver(cx);
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// A client connection's backend connection between two requests.
#[derive(Clone, Default)]
pub struct BackendSlot(Arc<Mutex<Option<OwnConnection>>>);

impl BackendSlot {
    fn take(&self) -> Option<OwnConnection> {
        self.0.lock().expect("backend slot lock").take()
    }

    fn put(&self, own: OwnConnection) {
        *self.0.lock().expect("backend slot lock") = Some(own);
    }
}

/// A response's own backend connection and where it goes back once the body is read.
type Held = (OwnConnection, BackendSlot);

/// A backend response body on a client connection's own backend connection: polling it drives
/// the connection, and once it has been read to its end the connection is put back for the
/// client connection's next request (an unfinished body closes it).
struct OwnBody {
    body: Incoming,
    own: Option<OwnConnection>,
    slot: BackendSlot,
    ended: bool,
}

impl Body for OwnBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(own) = &mut this.own {
            own.poll_driver(cx);
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for OwnBody {
    fn drop(&mut self) {
        if (self.ended || self.body.is_end_stream())
            && let Some(own) = self.own.take()
            && own.driver.is_some()
        {
            self.slot.put(own);
        }
    }
}

impl HttpProxy {
    /// A proxy over a resolver, reaching backends through `connector`; `closing` turning true
    /// closes upgraded tunnels.
    pub fn new(
        resolver: Resolver,
        settings: HttpSettings,
        connector: WebConnector,
        closing: watch::Receiver<bool>,
    ) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector.clone());
        Self {
            resolver,
            client,
            connector,
            balancer: Mutex::new(Balancer::default()),
            metrics: Metrics::default(),
            settings,
            closing,
        }
    }

    /// `mailproxy_http_requests_total{route,status}`,
    /// `mailproxy_http_request_duration_seconds{route}` and
    /// `mailproxy_http_backend_failures_total{route}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailproxy_http_requests",
            "Web requests answered, by route kind and status class",
            self.metrics.requests.clone(),
        );
        registry.register(
            "mailproxy_http_request_duration_seconds",
            "Web requests, from the request head to the response head",
            self.metrics.duration.clone(),
        );
        registry.register(
            "mailproxy_http_backend_failures",
            "Web requests a backend refused, broke or did not answer in time",
            self.metrics.backend_failures.clone(),
        );
    }

    /// Proxies one request. Never fails: problems become 5xx answers.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        conn: ConnectionInfo,
        guard: &ConnectionGuard,
        backend: &BackendSlot,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let route = routing::detect(request.uri(), request.headers());
        let host = virtual_host(&request);
        let tls = self.resolver.table().current().settings.web_upstream_tls;
        let (upstream, account) = self.upstream_for(&route, conn, host.as_deref(), tls).await;
        let balanced = account.is_none();
        let method = request.method().clone();
        let uri = request.uri().clone();
        let result = match &upstream {
            Some(upstream) => {
                let target = Target {
                    upstream: upstream.clone(),
                    balanced,
                    tls,
                    backend,
                };
                self.forward(request, target, conn, host, guard).await
            }
            None => Err(Failure::NoBackend),
        };
        let label = route.label();
        let response = match result {
            Ok(response) => response,
            Err(failure) => {
                if let (Failure::Refused(_), Some(account)) = (&failure, &account) {
                    self.forget_unreachable(account).await;
                }
                if !matches!(failure, Failure::NoBackend) {
                    self.metrics
                        .backend_failures
                        .get_or_create(&RouteLabels { route: label })
                        .inc();
                }
                tracing::warn!(route = label, upstream = ?upstream.as_ref().map(ToString::to_string), %failure, "web request failed");
                failure.response()
            }
        };
        let status = response.status();
        let elapsed = started.elapsed();
        self.metrics.record(label, status, elapsed);
        let account = match &route {
            WebRoute::User { name, .. } => name.as_str(),
            WebRoute::AccountId { id, .. } => id.as_str(),
            WebRoute::Balanced => "",
        };
        // No query (it may carry zauthtoken/zjwt), no cookies, no Authorization.
        tracing::info!(
            client = %conn.peer.ip(),
            %method,
            path = uri.path().chars().take(256).collect::<String>(),
            status = status.as_u16(),
            route = label,
            account,
            upstream = upstream.as_ref().map(ToString::to_string).unwrap_or_default(),
            duration_ms = elapsed.as_millis() as u64,
            "web request"
        );
        response
    }

    /// The backend of a route; `true` when it was chosen by the balancer. Routes to backends
    /// over TLS are looked up and cached as `httpssl`, and point at the servers' https ports.
    async fn upstream_for(
        &self,
        route: &WebRoute,
        conn: ConnectionInfo,
        host: Option<&str>,
        tls: bool,
    ) -> (Option<Upstream>, Option<AccountRoute>) {
        let login = |user: &str| LoginContext {
            user: user.to_string(),
            protocol: if tls {
                Protocol::HttpSsl
            } else {
                Protocol::Http
            },
            client_ip: conn.peer.ip(),
            proxy_ip: Some(conn.local.ip()),
            virtual_host: host.map(str::to_string),
            attempt: 0,
        };
        let (login, resolved) = match route {
            WebRoute::User { name, .. } => {
                let login = login(name);
                let resolved = self.resolver.resolve(&login).await;
                (login, resolved)
            }
            WebRoute::AccountId { id, .. } => {
                let login = login(id);
                let resolved = self.resolver.resolve_account_id(&login).await;
                (login, resolved)
            }
            WebRoute::Balanced => return (self.pick(conn.peer.ip(), &[]), None),
        };
        match resolved {
            Ok(resolved) => {
                let upstream = resolved.route.upstream.clone();
                let by_id = matches!(route, WebRoute::AccountId { .. });
                let account = AccountRoute {
                    login,
                    route: resolved.route,
                    by_id,
                };
                (Some(upstream), Some(account))
            }
            Err(error) => {
                tracing::debug!(route = route.label(), %error, "no route for the account; balancing");
                (self.pick(conn.peer.ip(), &[]), None)
            }
        }
    }

    /// Forgets what the cache says of an account whose mailbox server refused the connection,
    /// so that its next request asks the lookup handler again (the account may have moved), as
    /// a failed mail login does.
    async fn forget_unreachable(&self, account: &AccountRoute) {
        if account.by_id {
            self.resolver.forget_account_id(&account.login).await;
        } else {
            self.resolver.forget(&account.login, &account.route).await;
        }
    }

    /// A web backend for a client: the same one for the same address while the backends stay
    /// the same and up. Backends marked down (or excluded) are skipped unless all are down.
    fn pick(&self, client: IpAddr, exclude: &[Upstream]) -> Option<Upstream> {
        let table = self.resolver.table().current();
        let mut balancer = self.balancer.lock().expect("balancer lock");
        if !balancer
            .table
            .as_ref()
            .is_some_and(|parsed| Arc::ptr_eq(parsed, &table))
        {
            balancer.backends = table
                .web_backends
                .iter()
                .filter_map(|backend| backend.parse().ok())
                .collect();
            balancer.table = Some(table);
        }
        let Balancer { backends, down, .. } = &mut *balancer;
        let candidates = backends.iter().filter(|backend| !exclude.contains(backend));
        let count = candidates.clone().count();
        if count == 0 {
            return None;
        }
        let mut hasher = DefaultHasher::new();
        client.hash(&mut hasher);
        let start = (hasher.finish() % count as u64) as usize;
        if !down.is_empty() {
            let now = Instant::now();
            down.retain(|_, until| *until > now);
        }
        let mut order = candidates.cycle().skip(start).take(count);
        order
            .clone()
            .find(|backend| !down.contains_key(*backend))
            .or_else(|| order.next())
            .cloned()
    }

    fn mark_down(&self, upstream: &Upstream) {
        let until = Instant::now() + self.settings.backend_down;
        self.balancer
            .lock()
            .expect("balancer lock")
            .down
            .insert(upstream.clone(), until);
    }

    async fn forward(
        &self,
        mut request: Request<Incoming>,
        mut target: Target<'_>,
        conn: ConnectionInfo,
        host: Option<String>,
        guard: &ConnectionGuard,
    ) -> Result<Response<ProxyBody>, Failure> {
        let upgrade =
            upgrade_protocol(request.headers()).filter(|_| request.version() == Version::HTTP_11);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let retryable =
            target.balanced && is_idempotent(request.method()) && request.body().is_end_stream();
        let own_connection = client_upgrade.is_none() && request.version() < Version::HTTP_2;
        let (mut parts, body) = request.into_parts();
        forwarding_headers(&mut parts.headers, conn, host.as_deref(), upgrade.as_ref());
        let mut body = Some(body.boxed());
        let mut tried = Vec::new();
        loop {
            let mut outgoing = Request::new(body.take().unwrap_or_else(empty));
            *outgoing.method_mut() = parts.method.clone();
            *outgoing.uri_mut() = parts.uri.clone();
            *outgoing.version_mut() = Version::HTTP_11;
            *outgoing.headers_mut() = if retryable {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let upstream = &target.upstream;
            if !outgoing.headers().contains_key(header::HOST)
                && let Ok(value) = HeaderValue::from_str(&upstream.to_string())
            {
                outgoing.headers_mut().insert(header::HOST, value);
            }
            let slot = own_connection.then_some(target.backend);
            let sent = tokio::time::timeout(
                self.settings.upstream_response_timeout,
                self.send(outgoing, upstream, target.tls, slot),
            )
            .await;
            let error = match sent {
                Err(_) => return Err(Failure::Timeout),
                Ok(Ok((response, held))) => {
                    return Ok(self.respond(response, held, client_upgrade, guard));
                }
                Ok(Err(SendError::Broken(error))) => return Err(Failure::Broken(error)),
                Ok(Err(SendError::Connect(error))) => error,
            };
            if target.balanced {
                self.mark_down(upstream);
            }
            tried.push(upstream.clone());
            match self.pick(conn.peer.ip(), &tried).filter(|_| retryable) {
                Some(next) => {
                    tracing::info!(from = %upstream, to = %next, "web backend refused the connection; retrying on another");
                    target.upstream = next;
                }
                None => return Err(Failure::Refused(error)),
            }
        }
    }

    /// Sends a request to `upstream`: on the client connection's own backend connection when
    /// `slot` is given, else through the pool.
    async fn send(
        &self,
        mut request: Request<ProxyBody>,
        upstream: &Upstream,
        tls: bool,
        slot: Option<&BackendSlot>,
    ) -> Result<(Response<Incoming>, Option<Held>), SendError> {
        let Some(slot) = slot else {
            *request.uri_mut() = upstream_uri(upstream, tls, request.uri())?;
            return match self.client.request(request).await {
                Ok(response) => Ok((response, None)),
                Err(error) if error.is_connect() && !is_handshake_failure(&error) => {
                    Err(SendError::Connect(error_chain(&error)))
                }
                Err(error) => Err(SendError::Broken(error_chain(&error))),
            };
        };
        let kept = match slot
            .take()
            .filter(|own| own.upstream == *upstream && own.tls == tls)
        {
            Some(mut own) => own.ready().await.then_some(own),
            None => None,
        };
        let (mut own, reused) = match kept {
            Some(own) => (own, true),
            None => (self.connect(upstream, tls).await?, false),
        };
        let request = match own.send(request).await {
            Ok(response) => return Ok((response, Some((own, slot.clone())))),
            Err(mut error) => match error.take_message() {
                // The backend closed the kept connection before the request went out.
                Some(request) if reused => request,
                _ => return Err(SendError::Broken(error_chain(error.error()))),
            },
        };
        let mut own = self.connect(upstream, tls).await?;
        match own.send(request).await {
            Ok(response) => Ok((response, Some((own, slot.clone())))),
            Err(error) => Err(SendError::Broken(error_chain(error.error()))),
        }
    }

    /// A new backend connection of a client connection's own.
    async fn connect(&self, upstream: &Upstream, tls: bool) -> Result<OwnConnection, SendError> {
        let stream = match self.connector.connect(upstream, tls).await {
            Ok(stream) => stream,
            Err(error) if error.unreachable() => return Err(SendError::Connect(error.to_string())),
            Err(error) => return Err(SendError::Broken(error.to_string())),
        };
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Broken(error_chain(&error)))?;
        Ok(OwnConnection {
            upstream: upstream.clone(),
            tls,
            sender,
            driver: Some(Box::pin(driver)),
        })
    }

    fn respond(
        &self,
        mut response: Response<Incoming>,
        held: Option<Held>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        guard: &ConnectionGuard,
    ) -> Response<ProxyBody> {
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        match (switching, client_upgrade) {
            (true, Some(client)) => {
                let backend = hyper::upgrade::on(&mut response);
                let guard = guard.clone();
                let mut closing = self.closing.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    let (client, backend) = match tokio::try_join!(client, backend) {
                        Ok(pair) => pair,
                        Err(error) => {
                            tracing::debug!(%error, "upgrade failed");
                            return;
                        }
                    };
                    let mut client = TokioIo::new(client);
                    let mut backend = TokioIo::new(backend);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut backend) => {}
                        () = signalled(&mut closing) => {}
                    }
                });
                let (parts, _) = response.into_parts();
                Response::from_parts(parts, empty())
            }
            (true, None) => Failure::Broken("an upgrade nobody asked for".into()).response(),
            (false, _) => {
                strip_hop_by_hop(response.headers_mut(), false);
                match held {
                    Some((own, slot)) => response.map(|body| {
                        OwnBody {
                            body,
                            own: Some(own),
                            slot,
                            ended: false,
                        }
                        .boxed()
                    }),
                    None => response.map(BodyExt::boxed),
                }
            }
        }
    }
}

/// Serves one `http` or `https` listener until `stop`; each connection holds a permit of
/// `limit`. On `stop` open connections finish their request in flight (keep-alive ends); on
/// `closing` they are dropped.
pub async fn serve_listener(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<HttpProxy>,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    closing: watch::Receiver<bool>,
) {
    let label = if tls.is_some() { "https" } else { "http" };
    while let Some((permit, tcp, peer)) =
        accept_connection(&listener, &limit, &mut stop, label).await
    {
        let proxy = proxy.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        let closing = closing.clone();
        tokio::spawn(async move {
            let guard = ConnectionGuard::new(Some(permit));
            connection(proxy, tcp, peer, tls, guard, stop, closing).await;
        });
    }
}

async fn connection(
    proxy: Arc<HttpProxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    guard: ConnectionGuard,
    stop: watch::Receiver<bool>,
    closing: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let Ok(local) = tcp.local_addr() else { return };
    let mut conn = ConnectionInfo {
        peer,
        local,
        tls: false,
    };
    match tls {
        None => serve_io(proxy, TokioIo::new(tcp), conn, guard, stop, closing).await,
        Some(acceptor) => {
            let handshake = proxy.settings.tls_handshake_timeout;
            match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    conn.tls = true;
                    serve_io(proxy, TokioIo::new(stream), conn, guard, stop, closing).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_io<I>(
    proxy: Arc<HttpProxy>,
    io: TokioIo<I>,
    conn: ConnectionInfo,
    guard: ConnectionGuard,
    mut stop: watch::Receiver<bool>,
    mut closing: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = proxy.settings.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(60));
    let backend = BackendSlot::default();
    let service = service_fn(move |request| {
        let proxy = proxy.clone();
        let guard = guard.clone();
        let backend = backend.clone();
        async move { Ok::<_, Infallible>(proxy.handle(request, conn, &guard, &backend).await) }
    });
    let served = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = signalled(&mut stop) => {
            served.as_mut().graceful_shutdown();
            tokio::select! {
                result = served.as_mut() => result,
                () = signalled(&mut closing) => Ok(()),
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(peer = %conn.peer, %error, "web connection ended with an error");
    }
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn text_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The index in [`STATUS_CLASSES`] of a status.
fn status_index(status: StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The Host of a request: the header (HTTP/1.1) or the URI's authority (HTTP/2).
fn virtual_host<B>(request: &Request<B>) -> Option<String> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.as_str().to_string()))
        .filter(|host| !host.is_empty() && host.len() <= 255)
}

/// The protocol a client asks to switch to (`Connection: upgrade` + `Upgrade: x`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes the hop-by-hop headers, those `Connection` names included. `Upgrade` too unless the
/// exchange is an upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Turns a client's request headers into the backend's.
fn forwarding_headers(
    headers: &mut HeaderMap,
    conn: ConnectionInfo,
    host: Option<&str>,
    upgrade: Option<&HeaderValue>,
) {
    strip_hop_by_hop(headers, false);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    if !headers.contains_key(header::HOST)
        && let Some(host) = host.and_then(|host| HeaderValue::from_str(host).ok())
    {
        headers.insert(header::HOST, host);
    }
    let client = conn.peer.ip();
    let proto = if conn.tls { "https" } else { "http" };
    let forwarded_for = match headers
        .get("x-forwarded-for")
        .and_then(|value| value.to_str().ok())
    {
        Some(previous) => format!("{previous}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    let node = match client {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let mut element = format!("for={node};proto={proto}");
    if let Some(host) = host.filter(|host| host.bytes().all(|b| b.is_ascii_graphic() && b != b'"'))
    {
        element.push_str(&format!(";host=\"{host}\""));
    }
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {element}"),
        None => element,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, value);
    }
}

fn upstream_uri(upstream: &Upstream, tls: bool, original: &Uri) -> Result<Uri, SendError> {
    let path = original.path_and_query().map_or("/", |pq| pq.as_str());
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{upstream}{path}")
        .parse()
        .map_err(|error| SendError::Broken(format!("cannot address {upstream}: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(peer: &str, tls: bool) -> ConnectionInfo {
        ConnectionInfo {
            peer: peer.parse().unwrap(),
            local: "127.0.0.1:80".parse().unwrap(),
            tls,
        }
    }

    #[test]
    fn hop_by_hop_headers_go_and_forwarding_headers_come() {
        let request = Request::builder()
            .uri("/x")
            .header("connection", "keep-alive, x-secret-hop")
            .header("keep-alive", "timeout=5")
            .header("x-secret-hop", "1")
            .header("te", "trailers")
            .header("upgrade", "h2c")
            .header("x-forwarded-for", "10.0.0.1")
            .header("cookie", "a=b")
            .body(())
            .unwrap();
        let mut headers = request.headers().clone();
        forwarding_headers(
            &mut headers,
            conn("192.0.2.7:5555", true),
            Some("mail.example.com"),
            None,
        );
        for gone in ["connection", "keep-alive", "x-secret-hop", "te", "upgrade"] {
            assert!(!headers.contains_key(gone), "{gone}");
        }
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(
            headers["forwarded"],
            "for=192.0.2.7;proto=https;host=\"mail.example.com\""
        );
        assert_eq!(headers["host"], "mail.example.com");
        assert_eq!(headers["cookie"], "a=b");
        let mut v6 = request.headers().clone();
        forwarding_headers(&mut v6, conn("[2001:db8::1]:1", false), None, None);
        assert_eq!(v6["forwarded"], "for=\"[2001:db8::1]\";proto=http");
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let request = Request::builder()
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        let protocol = upgrade_protocol(request.headers());
        assert_eq!(protocol.as_ref().unwrap(), "websocket");
        let mut headers = request.headers().clone();
        forwarding_headers(
            &mut headers,
            conn("127.0.0.1:1", false),
            None,
            protocol.as_ref(),
        );
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");
        let plain = Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert_eq!(upgrade_protocol(plain.headers()), None);
    }

    /// A backend on a free port that answers each request with its path (`Connection: close`
    /// for `/close`) and counts the connections it accepted.
    async fn counting_backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let service = service_fn(|request: Request<Incoming>| async move {
                    let path = request.uri().path().to_string();
                    let mut response = Response::new(Full::new(Bytes::from(path.clone())));
                    if path == "/close" {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_client_connection_keeps_its_own_backend_connection() {
        use crate::route::cache::{RouteCache, RouteCacheConfig};
        use crate::route::lookup::{LookupClient, LookupClientConfig};
        use crate::route::table::TableHandle;

        let (backend, accepted) = counting_backend().await;
        let table = RouteTable {
            web_backends: vec![backend.to_string()],
            ..RouteTable::default()
        };
        let resolver = Resolver::new(
            TableHandle::fixed(table),
            RouteCache::new(RouteCacheConfig::default()),
            Arc::new(LookupClient::new(LookupClientConfig::default()).unwrap()),
        );
        let (_stop, stop) = watch::channel(false);
        let (_closing, closing) = watch::channel(false);
        let settings = HttpSettings::default();
        let connector = WebConnector::new(None, settings.upstream_connect_timeout).unwrap();
        let proxy = Arc::new(HttpProxy::new(
            resolver,
            settings,
            connector,
            closing.clone(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = Arc::new(Semaphore::new(10));
        tokio::spawn(serve_listener(listener, None, proxy, limit, stop, closing));

        let connect = || async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (client, connection) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
            tokio::spawn(connection);
            client
        };
        let get = |client: &mut http1::SendRequest<Empty<Bytes>>, path: &'static str| {
            let request = Request::get(path)
                .header(header::HOST, "mail.example.com")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let response = client.send_request(request);
            async move {
                let response = response.await.unwrap();
                assert_eq!(response.status(), StatusCode::OK, "{path}");
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, path.as_bytes());
            }
        };
        let accepted = || accepted.load(std::sync::atomic::Ordering::SeqCst);
        let mut first = connect().await;
        for path in ["/a", "/b", "/close", "/c", "/d"] {
            get(&mut first, path).await;
        }
        // One backend connection until the backend closed it after /close, then a new one.
        assert_eq!(accepted(), 2);
        // Another client connection does not share the first one's (idle) backend connection.
        let mut second = connect().await;
        get(&mut second, "/e").await;
        assert_eq!(accepted(), 3);
        get(&mut first, "/f").await;
        get(&mut second, "/g").await;
        assert_eq!(accepted(), 3);
    }

    #[test]
    fn status_classes() {
        let class = |status| STATUS_CLASSES[status_index(status)];
        assert_eq!(class(StatusCode::SWITCHING_PROTOCOLS), "1xx");
        assert_eq!(class(StatusCode::NOT_FOUND), "4xx");
        assert_eq!(class(StatusCode::BAD_GATEWAY), "5xx");
    }

    #[test]
    fn every_route_label_has_its_series() {
        let routes = [
            WebRoute::Balanced,
            WebRoute::User {
                name: "a".into(),
                kind: routing::UserSource::Rest,
            },
            WebRoute::User {
                name: "a".into(),
                kind: routing::UserSource::ActiveSync,
            },
            WebRoute::User {
                name: "a".into(),
                kind: routing::UserSource::Ews,
            },
            WebRoute::User {
                name: "a".into(),
                kind: routing::UserSource::CalDav,
            },
            WebRoute::AccountId {
                id: "a".into(),
                kind: routing::TokenSource::AuthToken,
            },
            WebRoute::AccountId {
                id: "a".into(),
                kind: routing::TokenSource::AdminAuthToken,
            },
            WebRoute::AccountId {
                id: "a".into(),
                kind: routing::TokenSource::Jwt,
            },
        ];
        for route in routes {
            assert!(ROUTE_LABELS.contains(&route.label()), "{route:?}");
        }
    }
}
