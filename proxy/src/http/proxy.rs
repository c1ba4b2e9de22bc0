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
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mailproxy_crds::proxy_config::HttpConfig;
use mailproxy_crds::route_table::RouteTable;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::{TlsAcceptor, TlsStream};

use super::h1;
use super::h1::connection::Ended;
use super::h1::head::{ClientAddress, https_location, is_hop_by_hop, proto};
use super::h1::rewind::Rewind;
use super::h2_idle::StreamActivity;
use super::idle_body::{BoxError, IdleBody, UploadProgress};
use super::routing::{self, WebRoute};
use super::upstream::{ConnectError, WebConnector, is_handshake_failure};
use crate::route::resolver::Resolver;
use crate::route::{LoginContext, Protocol, Route, Upstream};
use crate::session::relay::Traffic;
use crate::session::stream::Stream;
use crate::session::{Accepted, Acceptor, client_origin, signalled};

/// The body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

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
    /// The longest a body may stall before the exchange is given up.
    pub body_idle_timeout: Duration,
    /// The longest an upgraded connection may carry nothing either way.
    pub tunnel_idle_timeout: Duration,
    /// Plain `http` requests are redirected to https on this port.
    pub redirect_to_https: Option<u16>,
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
            body_idle_timeout: Duration::from_secs(config.body_idle_timeout_seconds),
            tunnel_idle_timeout: Duration::from_secs(config.tunnel_idle_timeout_seconds),
            redirect_to_https: config
                .redirect_to_https
                .then(|| config.redirect_https_port.unwrap_or(443)),
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

struct Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    backend_failures: Family<RouteLabels, Counter>,
    upgraded_bytes: Family<DirectionLabels, Counter>,
    /// Per entry of [`ROUTE_LABELS`]: its series, taken from the families on first use, so that
    /// a request costs atomic additions rather than the families' lock and a hash of the labels.
    series: [RouteSeries; ROUTE_LABELS.len()],
}

/// The `route` label of requests answered with a redirect to https (`http.redirectToHttps`).
pub(super) const HTTPS_REDIRECT: &str = "https_redirect";

/// The `route` labels of [`routing::WebRoute::label`], and [`HTTPS_REDIRECT`].
const ROUTE_LABELS: [&str; 9] = [
    "rest",
    "activesync",
    "ews",
    "caldav",
    "auth_token",
    "admin_auth_token",
    "jwt",
    "balanced",
    HTTPS_REDIRECT,
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
            upgraded_bytes: Family::default(),
            series: Default::default(),
        }
    }
}

impl Metrics {
    fn record(&self, route: &'static str, status: u16, elapsed: Duration) {
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
}

/// Why a request got no backend response.
#[derive(Debug)]
pub(super) enum Failure {
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
    /// The status and text the client gets.
    pub(super) fn answer(&self) -> (StatusCode, &'static str) {
        match self {
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
        }
    }

    fn response(&self) -> Response<ProxyBody> {
        let (status, text) = self.answer();
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

/// Where a request goes, decided from its head.
pub(super) struct Routed {
    pub route: WebRoute,
    /// `None`: no backend at all.
    pub upstream: Option<Upstream>,
    /// The account's route; `None` when the balancer chose the backend.
    account: Option<AccountRoute>,
    /// The backend is reached over TLS (the route table's `webUpstreamTls`).
    pub tls: bool,
}

impl Routed {
    /// Chosen by the balancer (not an account's route): another backend may serve it.
    pub fn balanced(&self) -> bool {
        self.account.is_none()
    }
}

impl HttpProxy {
    /// A proxy over a resolver, reaching backends through `connector`.
    pub fn new(resolver: Resolver, settings: HttpSettings, connector: WebConnector) -> Self {
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
        }
    }

    /// `mailproxy_http_requests_total{route,status}`,
    /// `mailproxy_http_request_duration_seconds{route}`,
    /// `mailproxy_http_backend_failures_total{route}` and
    /// `mailproxy_http_upgraded_bytes_total{direction}`.
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
        registry.register(
            "mailproxy_http_upgraded_bytes",
            "Bytes relayed on upgraded connections (WebSocket), by direction",
            self.metrics.upgraded_bytes.clone(),
        );
    }

    pub(super) fn settings(&self) -> &HttpSettings {
        &self.settings
    }

    /// Counts a request answered with a redirect to https (or 400 without a usable Host).
    pub(super) fn redirected(&self, status: u16, elapsed: Duration) {
        self.metrics.record(HTTPS_REDIRECT, status, elapsed);
    }

    /// The byte counts of one upgraded connection.
    pub(super) fn tunnel_traffic(&self) -> Traffic {
        let direction = |direction| {
            self.metrics
                .upgraded_bytes
                .get_or_create(&DirectionLabels { direction })
                .clone()
        };
        Traffic::new(direction("from_client"), direction("to_client"))
    }

    /// Proxies one HTTP/2 request through the pooled client. Never fails: problems become 5xx
    /// answers.
    async fn handle(
        &self,
        request: Request<Incoming>,
        conn: ConnectionInfo,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let host = virtual_host(&request);
        if let Some(port) = self.settings.redirect_to_https.filter(|_| !conn.tls) {
            let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
            let response = match https_location(host.as_deref(), target, port) {
                Some(location) => {
                    let mut response = Response::new(empty());
                    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
                    if let Ok(location) = HeaderValue::from_str(&location) {
                        response.headers_mut().insert(header::LOCATION, location);
                    }
                    response
                }
                None => text_response(StatusCode::BAD_REQUEST, "no usable Host to redirect to\n"),
            };
            self.redirected(response.status().as_u16(), started.elapsed());
            return response;
        }
        let routed = self
            .route(request.uri(), request.headers(), conn, host.as_deref())
            .await;
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let (result, upstream) = match &routed.upstream {
            Some(upstream) => {
                self.forward(request, &routed, upstream.clone(), conn, host)
                    .await
            }
            None => (Err(Failure::NoBackend), None),
        };
        let response = match result {
            Ok(response) => response,
            Err(failure) => {
                self.failed(&routed, upstream.as_ref(), &failure).await;
                failure.response()
            }
        };
        self.finished(
            &routed,
            conn.peer.ip(),
            &method,
            &path,
            response.status().as_u16(),
            started.elapsed(),
            upstream.as_ref(),
        );
        response
    }

    /// The route of a request head: an account's mailbox server, else a balanced web backend.
    pub(super) async fn route(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        conn: ConnectionInfo,
        host: Option<&str>,
    ) -> Routed {
        let route = routing::detect(uri, headers);
        let tls = self.resolver.table().current().settings.web_upstream_tls;
        // Routes to backends over TLS are looked up and cached as `httpssl` and point at the
        // servers' https ports.
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
        let (login, resolved) = match &route {
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
            WebRoute::Balanced => {
                let upstream = self.pick(conn.peer.ip(), &[]);
                return Routed {
                    route,
                    upstream,
                    account: None,
                    tls,
                };
            }
        };
        match resolved {
            Ok(resolved) => {
                let upstream = resolved.route.upstream.clone();
                let by_id = matches!(route, WebRoute::AccountId { .. });
                Routed {
                    route,
                    upstream: Some(upstream),
                    account: Some(AccountRoute {
                        login,
                        route: resolved.route,
                        by_id,
                    }),
                    tls,
                }
            }
            Err(error) => {
                tracing::debug!(route = route.label(), %error, "no route for the account; balancing");
                let upstream = self.pick(conn.peer.ip(), &[]);
                Routed {
                    route,
                    upstream,
                    account: None,
                    tls,
                }
            }
        }
    }

    /// After `failed` refused a connection: marks it down if the balancer chose it, and picks
    /// another backend when the request may be retried.
    pub(super) fn next_backend(
        &self,
        routed: &Routed,
        failed: &Upstream,
        tried: &mut Vec<Upstream>,
        client: IpAddr,
        retryable: bool,
    ) -> Option<Upstream> {
        if routed.balanced() {
            self.mark_down(failed);
        }
        tried.push(failed.clone());
        self.pick(client, tried).filter(|_| retryable)
    }

    /// Counts and logs a request that got no backend response. An account's server that refused
    /// the connection has the account's cached route forgotten, so that its next request asks the
    /// lookup handler again (the account may have moved), as a failed mail login does.
    pub(super) async fn failed(
        &self,
        routed: &Routed,
        upstream: Option<&Upstream>,
        failure: &Failure,
    ) {
        if let (Failure::Refused(_), Some(account)) = (failure, &routed.account) {
            if account.by_id {
                self.resolver.forget_account_id(&account.login).await;
            } else {
                self.resolver.forget(&account.login, &account.route).await;
            }
        }
        let label = routed.route.label();
        if !matches!(failure, Failure::NoBackend) {
            self.metrics
                .backend_failures
                .get_or_create(&RouteLabels { route: label })
                .inc();
        }
        tracing::warn!(route = label, upstream = ?upstream.map(ToString::to_string), %failure, "web request failed");
    }

    /// Counts a request by its response head and writes its access log line: no query (it may
    /// carry zauthtoken/zjwt), no cookies, no Authorization.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finished(
        &self,
        routed: &Routed,
        client: IpAddr,
        method: &Method,
        path: &str,
        status: u16,
        elapsed: Duration,
        upstream: Option<&Upstream>,
    ) {
        let label = routed.route.label();
        self.metrics.record(label, status, elapsed);
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let account = match &routed.route {
            WebRoute::User { name, .. } => name.as_str(),
            WebRoute::AccountId { id, .. } => id.as_str(),
            WebRoute::Balanced => "",
        };
        tracing::info!(
            %client,
            %method,
            path = path.chars().take(256).collect::<String>(),
            status,
            route = label,
            account,
            upstream = upstream.map(ToString::to_string).unwrap_or_default(),
            duration_ms = elapsed.as_millis() as u64,
            "web request"
        );
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

    /// Sends an HTTP/2 request on through the pooled client (as HTTP/1.1); the backend it went
    /// to comes back with the result.
    async fn forward(
        &self,
        request: Request<Incoming>,
        routed: &Routed,
        mut upstream: Upstream,
        conn: ConnectionInfo,
        host: Option<String>,
    ) -> (Result<Response<ProxyBody>, Failure>, Option<Upstream>) {
        let retryable =
            routed.balanced() && is_idempotent(request.method()) && request.body().is_end_stream();
        let (mut parts, body) = request.into_parts();
        forwarding_headers(&mut parts.headers, conn, host.as_deref());
        let idle = self.settings.body_idle_timeout;
        let mut body = Some(body);
        let mut tried = Vec::new();
        loop {
            // The backend's answer is waited for once the body is sent: an upload may take
            // longer than the response timeout and still be going well.
            let progress = UploadProgress::new();
            let attempt = match body.take() {
                Some(body) => IdleBody::watched(body, idle, progress.clone()).boxed(),
                None => {
                    progress.end();
                    empty()
                }
            };
            let mut outgoing = Request::new(attempt);
            *outgoing.method_mut() = parts.method.clone();
            *outgoing.version_mut() = Version::HTTP_11;
            *outgoing.headers_mut() = if retryable {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            if !outgoing.headers().contains_key(header::HOST)
                && let Ok(value) = HeaderValue::from_str(&upstream.to_string())
            {
                outgoing.headers_mut().insert(header::HOST, value);
            }
            match upstream_uri(&upstream, routed.tls, &parts.uri) {
                Ok(uri) => *outgoing.uri_mut() = uri,
                Err(failure) => return (Err(failure), Some(upstream)),
            }
            let response_timeout = self.settings.upstream_response_timeout;
            let answer_by = async {
                // A body that failed or was dropped ends the wait for it too.
                progress.ended().await;
                tokio::time::sleep(response_timeout).await;
            };
            let sent = tokio::select! {
                sent = self.client.request(outgoing) => Some(sent),
                () = answer_by => None,
                // A backend that stopped reading the body: hyper no longer polls it, so the
                // body's own idle timer does not run.
                () = progress.stalled(idle) => None,
            };
            let error = match sent {
                None => return (Err(Failure::Timeout), Some(upstream)),
                Some(Ok(mut response)) => {
                    strip_hop_by_hop(response.headers_mut());
                    let response = response.map(|body| IdleBody::new(body, idle).boxed());
                    return (Ok(response), Some(upstream));
                }
                Some(Err(error)) if error.is_connect() && !is_handshake_failure(&error) => {
                    error_chain(&error)
                }
                Some(Err(error)) => {
                    return (Err(Failure::Broken(error_chain(&error))), Some(upstream));
                }
            };
            match self.next_backend(routed, &upstream, &mut tried, conn.peer.ip(), retryable) {
                Some(next) => {
                    tracing::info!(from = %upstream, to = %next, "web backend refused the connection; retrying on another");
                    upstream = next;
                }
                None => return (Err(Failure::Refused(error)), Some(upstream)),
            }
        }
    }

    /// A new connection to a backend's web port (an HTTP/1.x client connection's own), over
    /// TLS when `tls`.
    pub(super) async fn connect(
        &self,
        upstream: &Upstream,
        tls: bool,
    ) -> Result<Stream, ConnectError> {
        self.connector.connect(upstream, tls).await
    }
}

/// Serves one `http` or `https` listener until `stop`; each connection holds a permit of
/// `limit`. On `stop` open connections finish their request in flight (keep-alive ends); on
/// `closing` they are dropped, upgraded ones included.
pub async fn serve_listener(
    acceptor: Acceptor,
    tls: Option<TlsAcceptor>,
    proxy: Arc<HttpProxy>,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    closing: watch::Receiver<bool>,
) {
    let label = if tls.is_some() { "https" } else { "http" };
    while let Some(accepted) = acceptor.accept(&limit, &mut stop, label).await {
        let proxy = proxy.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        let mut closing = closing.clone();
        let proxy_header = acceptor.proxy_header();
        tokio::spawn(async move {
            let Some(Accepted {
                permit,
                tcp,
                peer,
                local,
            }) = client_origin(proxy_header.as_deref(), accepted, label, &closing).await
            else {
                return;
            };
            let _permit = permit;
            tokio::select! {
                biased;
                () = connection(proxy, tcp, peer, local, tls, stop) => {}
                () = signalled(&mut closing) => {}
            }
        });
    }
}

async fn connection(
    proxy: Arc<HttpProxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(local) = local else { return };
    let mut conn = ConnectionInfo {
        peer,
        local,
        tls: false,
    };
    let stream = match tls {
        None => Stream::Plain(tcp),
        Some(acceptor) => {
            let handshake = proxy.settings.tls_handshake_timeout;
            match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    conn.tls = true;
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let stream = Stream::Tls(Box::new(TlsStream::Server(stream)));
                    if h2 {
                        return serve_http2(proxy, stream, conn, stop).await;
                    }
                    stream
                }
                Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    };
    if let Ended::Http2(stream, preface) =
        h1::connection::serve(&proxy, stream, conn, &mut stop).await
    {
        serve_http2(proxy, Rewind::new(preface, stream), conn, stop).await;
    }
}

async fn serve_http2<I>(
    proxy: Arc<HttpProxy>,
    io: I,
    conn: ConnectionInfo,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(proxy.settings.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(60));
    let idle = proxy.settings.header_read_timeout;
    let activity = StreamActivity::new();
    let streams = activity.clone();
    let service = service_fn(move |request| {
        let proxy = proxy.clone();
        let stream = streams.stream_started();
        async move {
            let response = proxy.handle(request, conn).await;
            Ok::<_, Infallible>(stream.until_sent(response))
        }
    });
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let closing = async {
        tokio::select! {
            () = signalled(&mut stop) => {}
            () = activity.idle_for(idle) => {}
        }
    };
    // A GOAWAY: streams already open finish, no new one starts.
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = closing => {
            served.as_mut().graceful_shutdown();
            served.as_mut().await
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
fn status_index(status: u16) -> usize {
    match status {
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

/// Whether a request may be sent again to another backend (RFC 9110 §9.2.2).
pub(super) fn is_idempotent(method: &Method) -> bool {
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
        .filter(|host| is_usable_host(host))
}

/// A Host worth passing to routing and lookups: present, and no longer than a DNS name.
pub(super) fn is_usable_host(host: &str) -> bool {
    !host.is_empty() && host.len() <= 255
}

/// Removes the hop-by-hop headers, those `Connection` names included.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .chain(
            headers
                .keys()
                .filter(|name| is_hop_by_hop(name.as_str().as_bytes()))
                .cloned(),
        )
        .collect();
    for name in &named {
        headers.remove(name);
    }
}

/// Turns an HTTP/2 client's request headers into the backend's.
fn forwarding_headers(headers: &mut HeaderMap, conn: ConnectionInfo, host: Option<&str>) {
    strip_hop_by_hop(headers);
    if !headers.contains_key(header::HOST)
        && let Some(host) = host.and_then(|host| HeaderValue::from_str(host).ok())
    {
        headers.insert(header::HOST, host);
    }
    let client = ClientAddress::new(conn.peer.ip());
    let mut forwarded_for = list_so_far(headers, "x-forwarded-for");
    forwarded_for.extend_from_slice(client.listed().as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(proto(conn.tls)),
    );
    let mut forwarded = list_so_far(headers, header::FORWARDED.as_str());
    client.write_forwarded_element(conn.tls, host, &mut forwarded);
    if let Ok(value) = HeaderValue::from_bytes(&forwarded) {
        headers.insert(header::FORWARDED, value);
    }
}

/// Every line of the list header `name`, joined, and a separator for one more element (nothing
/// when there is none): all lines, as the HTTP/1 relay keeps them, not just the first.
fn list_so_far(headers: &HeaderMap, name: &str) -> Vec<u8> {
    let mut list = Vec::new();
    for value in headers.get_all(name) {
        list.extend_from_slice(value.as_bytes());
        list.extend_from_slice(b", ");
    }
    list
}

fn upstream_uri(upstream: &Upstream, tls: bool, original: &Uri) -> Result<Uri, Failure> {
    let path = original.path_and_query().map_or("/", |pq| pq.as_str());
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{upstream}{path}")
        .parse()
        .map_err(|error| Failure::Broken(format!("cannot address {upstream}: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::Dns;
    use tokio::net::TcpListener;

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
            .header("x-forwarded-for", "10.0.0.2")
            .header("forwarded", "for=10.0.0.1")
            .header("forwarded", "for=10.0.0.2")
            .header("cookie", "a=b")
            .body(())
            .unwrap();
        let mut headers = request.headers().clone();
        forwarding_headers(
            &mut headers,
            conn("192.0.2.7:5555", true),
            Some("mail.example.com"),
        );
        for gone in ["connection", "keep-alive", "x-secret-hop", "te", "upgrade"] {
            assert!(!headers.contains_key(gone), "{gone}");
        }
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(
            headers["forwarded"],
            "for=10.0.0.1, for=10.0.0.2, for=192.0.2.7;proto=https;host=\"mail.example.com\""
        );
        assert_eq!(headers["host"], "mail.example.com");
        assert_eq!(headers["cookie"], "a=b");
        let mut v6 = HeaderMap::new();
        forwarding_headers(&mut v6, conn("[2001:db8::1]:1", false), None);
        assert_eq!(v6["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert_eq!(v6["x-forwarded-for"], "2001:db8::1");
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
            Dns::from_system_config(),
        );
        let (_stop, stop) = watch::channel(false);
        let (_closing, closing) = watch::channel(false);
        let settings = HttpSettings::default();
        let connector = WebConnector::new(
            None,
            settings.upstream_connect_timeout,
            Dns::from_system_config(),
        )
        .unwrap();
        let proxy = Arc::new(HttpProxy::new(resolver, settings, connector));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = Arc::new(Semaphore::new(10));
        let acceptor = Acceptor::new(listener, None);
        tokio::spawn(serve_listener(acceptor, None, proxy, limit, stop, closing));

        let connect = || async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (client, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(connection);
            client
        };
        let get = |client: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
                   path: &'static str| {
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
        assert_eq!(class(101), "1xx");
        assert_eq!(class(404), "4xx");
        assert_eq!(class(502), "5xx");
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
