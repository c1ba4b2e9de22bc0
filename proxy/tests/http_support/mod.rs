//! Shared by the web proxy tests: real hyper backends (plain or TLS), a real WebSocket echo
//! backend, a hand-written Route Lookup Handler that answers by name and by zimbraId and records
//! what it was asked, an in-process `mailproxy serve` with `http` and `https` listeners, and
//! clients bound to chosen loopback addresses (so that the proxy sees distinct client IPs).
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mailproxy::serve::{ServeOptions, Server};
use mailproxy_crds::proxy_config::{ListenerProtocol, ProxyConfig};
use mailproxy_testkit::free_port;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request as WsRequest, Response as WsResponse,
};

#[path = "../session_support/mod.rs"]
mod session_support;
pub use session_support::Pki;

pub type TestBody = BoxBody<Bytes, std::io::Error>;

fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// `n` bytes in 64 KiB chunks, made as they are read.
pub fn zeros(n: u64) -> TestBody {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'z'; CHUNK as usize]);
    let stream = futures::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            (left > 0).then(|| {
                let take = left.min(CHUNK);
                (
                    Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take as usize))),
                    left - take,
                )
            })
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// A web backend: every answer names it (`x-backend`) and shows what the proxy forwarded.
///
/// - `/stream/<n>`: `n` bytes, streamed;
/// - `/upload`: the byte count of the request body;
/// - `/ws` with `Connection: upgrade`: switches protocols and echoes raw bytes;
/// - `/reset`: announces 1 MB, sends 1000 bytes, then breaks the connection;
/// - `/slow`: answers after 3 s;
/// - anything else: `<name> <method> <path>`.
pub struct Backend {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Why TLS handshakes with a TLS backend failed, as the backend saw it.
    pub tls_failures: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &'static str) -> Self {
        Self::serve(name, None).await
    }

    /// A backend that speaks only TLS, with the certificate of `pki` (for localhost and
    /// 127.0.0.1, issued by `pki.ca()`).
    pub async fn start_tls(name: &'static str, pki: &Pki) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(pki.cert())
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.key()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Self::serve(name, Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(name: &'static str, tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls_failures = Arc::new(Mutex::new(Vec::new()));
        let failures = tls_failures.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let tls = tls.clone();
                let failures = failures.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| backend_answer(name, request));
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(tcp), service)
                                .with_upgrades()
                                .await;
                        }
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(stream) => {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .with_upgrades()
                                    .await;
                            }
                            Err(error) => failures.lock().unwrap().push(error.to_string()),
                        },
                    }
                });
            }
        });
        Self {
            name,
            addr,
            tls_failures,
            task,
        }
    }
}

/// A WebSocket backend (tokio-tungstenite): echoes text and binary messages, answers pings and
/// completes close handshakes; its handshake response names it (`x-backend`).
pub struct WsBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsBackend {
    pub async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(ws_echo(name, tcp));
            }
        });
        Self { addr, task }
    }
}

/// Names the WebSocket backend in its handshake response.
struct Tag(&'static str);

impl Callback for Tag {
    fn on_request(
        self,
        _: &WsRequest,
        mut response: WsResponse,
    ) -> Result<WsResponse, ErrorResponse> {
        response
            .headers_mut()
            .insert("x-backend", self.0.parse().unwrap());
        Ok(response)
    }
}

async fn ws_echo(name: &'static str, tcp: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, Tag(name)).await else {
        return;
    };
    // Ends when the client's close has been answered (tungstenite replies by itself) or the
    // connection breaks.
    while let Some(Ok(message)) = ws.next().await {
        let sent = match message {
            Message::Text(_) | Message::Binary(_) => ws.send(message).await,
            // tungstenite has queued the pong; flushing sends it now.
            Message::Ping(_) => ws.flush().await,
            Message::Pong(_) | Message::Close(_) | Message::Frame(_) => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

async fn backend_answer(
    name: &'static str,
    mut request: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let path = request.uri().path().to_string();
    let seen = |headers: &HeaderMap, name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut response = if let Some(n) = path.strip_prefix("/stream/") {
        Response::new(zeros(n.parse().unwrap()))
    } else if path == "/upload" {
        let mut count = 0u64;
        let body = request.body_mut();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => count += frame.data_ref().map_or(0, |data| data.len() as u64),
                Err(_) => break,
            }
        }
        Response::new(full(count.to_string()))
    } else if path == "/ws" && request.headers().contains_key("upgrade") {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        response
            .headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        response
    } else if path == "/reset" {
        // The head and the first chunk leave before the break.
        let stream = futures::stream::unfold(0, |step| async move {
            match step {
                0 => Some((Ok(Frame::data(Bytes::from(vec![b'r'; 1000]))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((Err(std::io::Error::other("backend broke")), 2))
                }
                _ => None,
            }
        });
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        response
            .headers_mut()
            .insert("content-length", "1000000".parse().unwrap());
        response
    } else if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Response::new(full("late"))
    } else {
        Response::new(full(format!("{name} {} {path}", request.method())))
    };
    let headers = request.headers().clone();
    let out = response.headers_mut();
    out.insert("x-backend", name.parse().unwrap());
    for header in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "forwarded",
        "host",
        "connection",
        "keep-alive",
    ] {
        if let Ok(value) = seen(&headers, header).parse() {
            out.insert(
                http::HeaderName::try_from(format!("x-seen-{header}")).unwrap(),
                value,
            );
        }
    }
    Ok(response)
}

/// What the lookup handler was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asked {
    pub method: String,
    pub user: String,
    pub protocol: String,
    pub proxy_host: String,
    pub password: String,
}

/// A Route Lookup Handler answering from two maps: logins (`Auth-Method: username`) and
/// account ids (`Auth-Method: zimbraId`) to backend addresses.
pub struct Handler {
    pub addr: SocketAddr,
    pub asked: Arc<Mutex<Vec<Asked>>>,
    task: JoinHandle<()>,
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Handler {
    pub async fn start(
        users: HashMap<String, SocketAddr>,
        ids: HashMap<String, SocketAddr>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let routes = Arc::new((users, ids));
        let log = asked.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let routes = routes.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let routes = routes.clone();
                        let log = log.clone();
                        async move {
                            let header = |name: &str| {
                                request
                                    .headers()
                                    .get(name)
                                    .map(|value| String::from_utf8_lossy(value.as_bytes()))
                                    .unwrap_or_default()
                                    .into_owned()
                            };
                            let asked = Asked {
                                method: header("auth-method"),
                                user: header("auth-user"),
                                protocol: header("auth-protocol"),
                                proxy_host: header("x-proxy-host"),
                                password: header("auth-pass"),
                            };
                            let map = if asked.method == "zimbraId" {
                                &routes.1
                            } else {
                                &routes.0
                            };
                            let found = map.get(&asked.user).copied();
                            log.lock().unwrap().push(asked);
                            let mut response = Response::new(Empty::<Bytes>::new());
                            let headers = response.headers_mut();
                            match found {
                                Some(addr) => {
                                    headers.insert("auth-status", "OK".parse().unwrap());
                                    headers.insert(
                                        "auth-server",
                                        addr.ip().to_string().parse().unwrap(),
                                    );
                                    headers.insert(
                                        "auth-port",
                                        addr.port().to_string().parse().unwrap(),
                                    );
                                }
                                None => {
                                    headers
                                        .insert("auth-status", "unknown account".parse().unwrap());
                                    headers.insert("auth-wait", "0".parse().unwrap());
                                }
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { addr, asked, task }
    }

    pub fn url(&self) -> String {
        format!(
            "http://{}{}",
            self.addr,
            mailproxy_crds::route_table::LOOKUP_PATH
        )
    }

    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

/// An in-process `mailproxy serve` with an `http` and an `https` listener.
pub struct Proxy {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub health: SocketAddr,
    pub pki: Pki,
    _dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Proxy {
    pub async fn start(routes: &str, configure: impl FnOnce(&mut ServeOptions)) -> Self {
        Self::start_with(routes, "", configure).await
    }

    /// A proxy whose configuration file also holds `extra` (YAML lines, such as an `http:`
    /// section).
    pub async fn start_with(
        routes: &str,
        extra: &str,
        configure: impl FnOnce(&mut ServeOptions),
    ) -> Self {
        Self::start_listening(routes, "", extra, configure).await
    }

    /// A proxy behind a load balancer in `trusted`: both listeners expect its PROXY protocol
    /// header.
    pub async fn start_behind_load_balancer(routes: &str, trusted: &str) -> Self {
        let extra = format!("proxyProtocol: {{trustedNetworks: ['{trusted}']}}\n");
        Self::start_listening(routes, ", proxyProtocol: true", &extra, |_| {}).await
    }

    /// `listener` is added to each listener's entry (`, key: value`).
    async fn start_listening(
        routes: &str,
        listener: &str,
        extra: &str,
        configure: impl FnOnce(&mut ServeOptions),
    ) -> Self {
        let pki = Pki::new();
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("routes.json");
        std::fs::write(&table, routes).unwrap();
        let yaml = format!(
            "listeners:\n\
             - {{protocol: http, address: '127.0.0.1:{}'{listener}}}\n\
             - {{protocol: https, address: '127.0.0.1:{}'{listener}}}\n\
             tls:\n  certificates: [{{cert: '{}', key: '{}'}}]\n\
             routeTable: {{file: '{}'}}\n\
             healthListen: '127.0.0.1:{}'\n\
             shutdownGraceSeconds: 1\n\
             {}",
            free_port(),
            free_port(),
            pki.cert().display(),
            pki.key().display(),
            table.display(),
            free_port(),
            extra,
        );
        let config = ProxyConfig::parse(&yaml, Path::new("test.yaml")).unwrap();
        let mut options = ServeOptions::default();
        options.http.header_read_timeout = Duration::from_secs(1);
        options.http.upstream_response_timeout = Duration::from_secs(2);
        options.http.backend_down = Duration::from_millis(500);
        configure(&mut options);
        let server = Server::bind(&config, options).await.expect("proxy binds");
        let addresses = server.listener_addresses();
        let find = |protocol| {
            addresses
                .iter()
                .find(|(p, _)| *p == protocol)
                .map(|(_, addr)| *addr)
                .unwrap()
        };
        let http = find(ListenerProtocol::Http);
        let https = find(ListenerProtocol::Https);
        let health = server.health_address().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            http,
            https,
            health,
            pki,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A route table over web backends, with a lookup handler and optional pinned accounts.
pub fn table(
    servers: &[(&str, SocketAddr)],
    web_backends: &[SocketAddr],
    handler: Option<&Handler>,
    accounts: &[(&str, &str)],
) -> String {
    let servers: serde_json::Map<String, serde_json::Value> = servers
        .iter()
        .map(|(name, addr)| {
            (
                name.to_string(),
                serde_json::json!({"host": addr.ip().to_string(), "ports": {"http": addr.port()}}),
            )
        })
        .collect();
    let accounts: serde_json::Map<String, serde_json::Value> = accounts
        .iter()
        .map(|(account, server)| (account.to_string(), serde_json::json!(server)))
        .collect();
    serde_json::json!({
        "servers": servers,
        "accounts": accounts,
        "lookupHandlers": handler.map(|h| vec![h.url()]).unwrap_or_default(),
        "webBackends": web_backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "settings": {"lookupTimeoutSeconds": 2},
    })
    .to_string()
}

/// An answer read in full.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }
}

/// A TCP connection to `to` from `from` (a loopback address of the test's choosing).
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// One HTTP/1.1 request on a new connection from `from`.
pub async fn send(
    from: IpAddr,
    to: SocketAddr,
    request: Request<TestBody>,
) -> Result<Response<Incoming>, hyper::Error> {
    let tcp = connect_from(from, to).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender.send_request(request).await
}

/// A GET with headers, read in full.
pub async fn get(from: IpAddr, to: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::get(uri).header("host", "mail.example.com");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = send(from, to, request.body(full("")).unwrap())
        .await
        .expect("an answer");
    read(response).await
}

pub async fn read(response: Response<Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Counts a body's bytes as they arrive.
pub async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut count = 0;
    while let Some(frame) = body.frame().await {
        count += frame?.data_ref().map_or(0, |data| data.len() as u64);
    }
    Ok(count)
}

/// The process's resident set in bytes (Linux).
pub fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Loopback client address number `n` (127.0.0.n).
pub fn client(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

pub async fn backends() -> (Backend, Backend) {
    (Backend::start("A").await, Backend::start("B").await)
}

pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
}

/// An HTTP/2 connection in clear text (prior knowledge) from `from` to `to`, driven in the
/// background; the task ends with the connection.
pub async fn h2c<B>(
    from: IpAddr,
    to: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    JoinHandle<Result<(), hyper::Error>>,
)
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = connect_from(from, to).await;
    let (sender, connection) = hyper::client::conn::http2::handshake(executor(), TokioIo::new(tcp))
        .await
        .expect("h2c handshake");
    (sender, tokio::spawn(connection))
}

pub fn boxed_stream<S>(stream: S) -> TestBody
where
    S: futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
{
    BodyExt::boxed(StreamBody::new(stream.map(|chunk| chunk.map(Frame::data))))
}
