//! The web proxy: a hyper server (HTTP/1.1, HTTP/2 by ALPN on TLS or by preface in clear text)
//! that routes each request to a mailbox server's web port and streams it there through a
//! pooled keep-alive client.
//!
//! Per request: [`routing::detect`] names an account (or none); the account's route comes from
//! the [`Resolver`] (by name, or by id with `Auth-Method: zimbraId`); requests without an account
//! and those whose lookup fails go to the route table's `webBackends` with client-IP affinity.
//! Bodies stream both ways (never buffered). Hop-by-hop headers are dropped, `X-Forwarded-For`,
//! `X-Forwarded-Proto` and `Forwarded` added. WebSocket (HTTP/1.1 `Upgrade`) is passed through.
//!
//! Failures answer with a short text body: 503 when there is no backend, 502 when it refuses or
//! breaks the exchange, 504 when it does not answer in time. A balanced request that is
//! idempotent and has no body is retried once per other backend when the chosen one refuses the
//! connection, and that backend is skipped for a few seconds.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
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
use crate::route::resolver::Resolver;
use crate::route::{LoginContext, Protocol, Upstream};
use crate::session::signalled;

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

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            tls_handshake_timeout: Duration::from_secs(15),
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_response_timeout: Duration::from_secs(600),
            backend_down: Duration::from_secs(10),
        }
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 4.0, 10))
            }),
            backend_failures: Family::default(),
        }
    }
}

/// The web proxy shared by every HTTP connection.
pub struct HttpProxy {
    resolver: Resolver,
    client: Client<HttpConnector, ProxyBody>,
    down: Mutex<HashMap<Upstream, Instant>>,
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

impl HttpProxy {
    /// A proxy over a resolver; `closing` turning true closes upgraded tunnels.
    pub fn new(resolver: Resolver, settings: HttpSettings, closing: watch::Receiver<bool>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.upstream_connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Self {
            resolver,
            client,
            down: Mutex::new(HashMap::new()),
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
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let route = routing::detect(request.uri(), request.headers());
        let host = virtual_host(&request);
        let (upstream, balanced) = self.upstream_for(&route, conn, host.as_deref()).await;
        let method = request.method().clone();
        let path: String = request.uri().path().chars().take(256).collect();
        let result = match &upstream {
            Some(upstream) => {
                self.forward(request, upstream.clone(), balanced, conn, host, guard)
                    .await
            }
            None => Err(Failure::NoBackend),
        };
        let label = route.label();
        let response = match result {
            Ok(response) => response,
            Err(failure) => {
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
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route: label,
                status: status_class(status),
            })
            .inc();
        let elapsed = started.elapsed();
        self.metrics
            .duration
            .get_or_create(&RouteLabels { route: label })
            .observe(elapsed.as_secs_f64());
        let account = match &route {
            WebRoute::User { name, .. } => name.as_str(),
            WebRoute::AccountId { id, .. } => id.as_str(),
            WebRoute::Balanced => "",
        };
        // No query (it may carry zauthtoken/zjwt), no cookies, no Authorization.
        tracing::info!(
            client = %conn.peer.ip(),
            %method,
            path,
            status = status.as_u16(),
            route = label,
            account,
            upstream = upstream.as_ref().map(ToString::to_string).unwrap_or_default(),
            duration_ms = elapsed.as_millis() as u64,
            "web request"
        );
        response
    }

    /// The backend of a route; `true` when it was chosen by the balancer.
    async fn upstream_for(
        &self,
        route: &WebRoute,
        conn: ConnectionInfo,
        host: Option<&str>,
    ) -> (Option<Upstream>, bool) {
        let login = |user: &str| LoginContext {
            user: user.to_string(),
            protocol: Protocol::Http,
            client_ip: conn.peer.ip(),
            proxy_ip: Some(conn.local.ip()),
            virtual_host: host.map(str::to_string),
            attempt: 0,
        };
        let resolved = match route {
            WebRoute::User { name, .. } => self.resolver.resolve(&login(name)).await,
            WebRoute::AccountId { id, .. } => self.resolver.resolve_account_id(&login(id)).await,
            WebRoute::Balanced => return (self.pick(conn.peer.ip(), &[]), true),
        };
        match resolved {
            Ok(resolved) => (Some(resolved.route.upstream), false),
            Err(error) => {
                tracing::debug!(route = route.label(), %error, "no route for the account; balancing");
                (self.pick(conn.peer.ip(), &[]), true)
            }
        }
    }

    /// A web backend for a client: the same one for the same address while the backends stay
    /// the same and up. Backends marked down (or excluded) are skipped unless all are down.
    fn pick(&self, client: IpAddr, exclude: &[Upstream]) -> Option<Upstream> {
        let table = self.resolver.table().current();
        let backends: Vec<Upstream> = table
            .web_backends
            .iter()
            .filter_map(|backend| backend.parse().ok())
            .filter(|backend| !exclude.contains(backend))
            .collect();
        if backends.is_empty() {
            return None;
        }
        let mut hasher = DefaultHasher::new();
        client.hash(&mut hasher);
        let start = (hasher.finish() % backends.len() as u64) as usize;
        let now = Instant::now();
        let mut down = self.down.lock().expect("backend down map lock");
        down.retain(|_, until| *until > now);
        let order = (0..backends.len()).map(|i| &backends[(start + i) % backends.len()]);
        order
            .clone()
            .find(|backend| !down.contains_key(*backend))
            .or_else(|| order.clone().next())
            .cloned()
    }

    fn mark_down(&self, upstream: &Upstream) {
        let until = Instant::now() + self.settings.backend_down;
        self.down
            .lock()
            .expect("backend down map lock")
            .insert(upstream.clone(), until);
    }

    async fn forward(
        &self,
        mut request: Request<Incoming>,
        mut upstream: Upstream,
        balanced: bool,
        conn: ConnectionInfo,
        host: Option<String>,
        guard: &ConnectionGuard,
    ) -> Result<Response<ProxyBody>, Failure> {
        let upgrade =
            upgrade_protocol(request.headers()).filter(|_| request.version() == Version::HTTP_11);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let retryable =
            balanced && is_idempotent(request.method()) && request.body().is_end_stream();
        let headers = upstream_headers(&request, conn, host.as_deref(), upgrade.as_ref());
        let (parts, body) = request.into_parts();
        let mut body = Some(body.boxed());
        let mut tried = Vec::new();
        loop {
            let mut outgoing = Request::new(body.take().unwrap_or_else(empty));
            *outgoing.method_mut() = parts.method.clone();
            *outgoing.uri_mut() = upstream_uri(&upstream, &parts.uri)?;
            *outgoing.version_mut() = Version::HTTP_11;
            *outgoing.headers_mut() = headers.clone();
            let sent = tokio::time::timeout(
                self.settings.upstream_response_timeout,
                self.client.request(outgoing),
            )
            .await;
            let error = match sent {
                Err(_) => return Err(Failure::Timeout),
                Ok(Ok(response)) => return Ok(self.respond(response, client_upgrade, guard)),
                Ok(Err(error)) => error,
            };
            if !error.is_connect() {
                return Err(Failure::Broken(error_chain(&error)));
            }
            if balanced {
                self.mark_down(&upstream);
            }
            tried.push(upstream.clone());
            match self.pick(conn.peer.ip(), &tried).filter(|_| retryable) {
                Some(next) => {
                    tracing::info!(from = %upstream, to = %next, "web backend refused the connection; retrying on another");
                    upstream = next;
                }
                None => return Err(Failure::Refused(error_chain(&error))),
            }
        }
    }

    fn respond(
        &self,
        mut response: Response<Incoming>,
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
                response.map(BodyExt::boxed)
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
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = signalled(&mut stop) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = signalled(&mut stop) => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let proxy = proxy.clone();
                let tls = tls.clone();
                let stop = stop.clone();
                let closing = closing.clone();
                tokio::spawn(async move {
                    let guard = ConnectionGuard::new(Some(permit));
                    connection(proxy, tcp, peer, tls, guard, stop, closing).await;
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
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
    let service = service_fn(move |request| {
        let proxy = proxy.clone();
        let guard = guard.clone();
        async move { Ok::<_, Infallible>(proxy.handle(request, conn, &guard).await) }
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

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
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

fn upstream_headers<B>(
    request: &Request<B>,
    conn: ConnectionInfo,
    host: Option<&str>,
    upgrade: Option<&HeaderValue>,
) -> HeaderMap {
    let mut headers = request.headers().clone();
    strip_hop_by_hop(&mut headers, false);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    if let Some(host) = host.and_then(|host| HeaderValue::from_str(host).ok()) {
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
    headers
}

fn upstream_uri(upstream: &Upstream, original: &Uri) -> Result<Uri, Failure> {
    let path = original.path_and_query().map_or("/", |pq| pq.as_str());
    format!("http://{upstream}{path}")
        .parse()
        .map_err(|error| Failure::Broken(format!("cannot address {upstream}: {error}")))
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
        let headers = upstream_headers(
            &request,
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
        let v6 = upstream_headers(&request, conn("[2001:db8::1]:1", false), None, None);
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
        let headers = upstream_headers(
            &request,
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

    #[test]
    fn status_classes() {
        assert_eq!(status_class(StatusCode::SWITCHING_PROTOCOLS), "1xx");
        assert_eq!(status_class(StatusCode::NOT_FOUND), "4xx");
        assert_eq!(status_class(StatusCode::BAD_GATEWAY), "5xx");
    }
}
