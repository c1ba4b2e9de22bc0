//! The reference Route Lookup Handler (`mailproxy lookupd`).
//!
//! Mailbox backends that are not Zimbra (Dovecot, Cyrus, ...) have no `nginx-lookup` servlet;
//! lookupd answers the same protocol from two files: the route table (the operator's
//! `routes.json`, for server addresses, ports, draining, pinned accounts and domains) and a
//! [`directory`] (account and alias to MailboxServer name, default domain).
//!
//! It also serves stock nginx as its `auth_http` server: it accepts `Auth-Method: plain` and
//! `login` besides Zimbra's `username`, ignores the real password nginx sends in `Auth-Pass`
//! (never read, never logged), and answers `Auth-Server` with an IP address (nginx accepts
//! nothing else), resolving the route table's host names the way Zimbra's servlet does: the
//! first IPv4 address, else the first IPv6 one.
//!
//! Every answer about a login is HTTP 200, as the protocol requires, refusals included; one
//! whose server cannot take it now (draining, or unreachable) names that server in
//! [`DRAINING_HEADER`], which a mailproxy answers as temporarily unavailable.
//!
//! The files (and the shared secret's) are polled for changes (see [`crate::mounted_file`],
//! every [`LookupdConfig::reload_interval`]). A file that fails to parse is logged and the
//! previous content keeps serving. A changed secret is required from then on, and the previous
//! one is still accepted for [`LookupdConfig::secret_overlap`], so that a rotation refuses no
//! proxy that has not yet seen the new one.

pub mod directory;
mod route;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use mailproxy_crds::route_table::RouteTable;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use self::directory::{Arrival, Directory, DirectoryError};
use self::route::{Decision, decide};
use crate::dns::Dns;
use crate::mounted_file::{FileStamp, polls};
use crate::route::Protocol;
use crate::route::lookup::{DRAINING_HEADER, SECRET_HEADER, escape_auth_user, unescape_auth_user};

/// Zimbra's `zimbraReverseProxyAuthWaitInterval` default.
pub const DEFAULT_REFUSAL_WAIT: Duration = Duration::from_secs(10);

/// Zimbra's generic refusal: clients learn nothing about which accounts exist.
const REFUSAL: &str = "login failed";

const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// A request head must arrive within this (slow-client protection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// hyper's minimum; lookup requests are a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// How long the previous shared secret is still accepted after the secret file changed: the
/// kubelet updates each pod's copy of a Secret within about a minute, and the proxies check
/// theirs every 10 s.
pub const SECRET_OVERLAP: Duration = Duration::from_secs(300);

/// How to run lookupd (clap-free: the CLI fills it in).
#[derive(Clone, Debug)]
pub struct LookupdConfig {
    /// The route table JSON file (required: it holds the servers' addresses).
    pub route_table: PathBuf,
    /// The directory file, see [`directory`]; without it only the table's pins answer.
    pub directory: Option<PathBuf>,
    /// When set, requests without the `X-Mailproxy-Lookup-Secret` this file holds get 403 (an
    /// empty file is refused). The file is followed like the others; after a change the
    /// previous secret is still accepted for `secret_overlap`, so that proxies that have not
    /// seen the new one yet keep working.
    pub secret_file: Option<PathBuf>,
    pub secret_overlap: Duration,
    /// `Auth-Wait` of a refusal (whole seconds).
    pub refusal_wait: Duration,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
    /// Serve https instead of http.
    pub tls: Option<LookupdTls>,
}

impl LookupdConfig {
    pub fn new(route_table: impl Into<PathBuf>) -> Self {
        Self {
            route_table: route_table.into(),
            directory: None,
            secret_file: None,
            secret_overlap: SECRET_OVERLAP,
            refusal_wait: DEFAULT_REFUSAL_WAIT,
            reload_interval: RELOAD_INTERVAL,
            tls: None,
        }
    }
}

/// PEM files of the https certificate chain and its private key (read once, at start).
#[derive(Clone, Debug)]
pub struct LookupdTls {
    pub certificate_chain: PathBuf,
    pub private_key: PathBuf,
}

/// Why lookupd cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LookupdError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("route table {path}: {source}")]
    RouteTable {
        path: PathBuf,
        source: mailproxy_crds::route_table::RouteTableError,
    },
    #[error("directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: DirectoryError,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the secret in {path} cannot be an HTTP header value (one line of printable text)")]
    BadSecret { path: PathBuf },
    #[error(
        "the secret file {path} is empty: put the shared secret in it, or leave out \
         --secret-file to answer lookups without one"
    )]
    EmptySecret { path: PathBuf },
}

/// How a request was answered, the label of `mailproxy_lookupd_requests_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestOutcome {
    /// `Auth-Status: OK`.
    Found,
    /// `Auth-Status: login failed` (unknown account, a login name, method or protocol lookupd
    /// cannot route).
    Refused,
    /// `Auth-Status: login failed` with `x-mailproxy-draining`: the account's server is
    /// draining.
    Draining,
    /// 400 or 405: not a lookup request (not a GET, or without `Auth-Method`, `Auth-User` or
    /// `Auth-Protocol`).
    BadRequest,
    /// 403: the shared secret was missing or wrong.
    Forbidden,
    /// Answered like [`RequestOutcome::Draining`]: the account's server cannot be reached (its
    /// host name does not resolve, or the route table does not list it).
    Unavailable,
}

impl RequestOutcome {
    fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Found => "found",
            RequestOutcome::Refused => "refused",
            RequestOutcome::Draining => "draining",
            RequestOutcome::BadRequest => "bad_request",
            RequestOutcome::Forbidden => "forbidden",
            RequestOutcome::Unavailable => "unavailable",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    file: &'static str,
    result: &'static str,
}

/// The stamps of the followed files as last loaded.
#[derive(Clone, Copy)]
struct LoadedStamps {
    table: Option<FileStamp>,
    directory: Option<FileStamp>,
    secret: Option<FileStamp>,
}

/// The shared secret requests must carry, and after a rotation the one before it, until then.
struct Secrets {
    current: String,
    previous: Option<(String, Instant)>,
}

struct Shared {
    config: LookupdConfig,
    /// The stamps of the files as `Lookupd::new` loaded them: the reload loop compares against
    /// these, so a change between loading and serving is not mistaken for the baseline.
    loaded_stamps: LoadedStamps,
    /// `None`: no secret is required.
    secrets: ArcSwapOption<Secrets>,
    table: ArcSwap<RouteTable>,
    directory: ArcSwap<Directory>,
    tls: Option<TlsAcceptor>,
    /// Resolves the mailbox servers' host names (answers carry IP addresses).
    dns: Dns,
    requests: Family<OutcomeLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
}

/// A loaded lookupd; clones share state. Start it with [`Lookupd::serve`].
#[derive(Clone)]
pub struct Lookupd {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lookupd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookupd")
            .field("route_table", &self.shared.config.route_table)
            .field("directory", &self.shared.config.directory)
            .finish_non_exhaustive()
    }
}

impl Lookupd {
    /// Loads both files and the TLS identity; any error here is fatal (there is no previous
    /// content to fall back on).
    pub fn new(config: LookupdConfig) -> Result<Self, LookupdError> {
        let loaded_stamps = LoadedStamps {
            table: FileStamp::of(&config.route_table),
            directory: config.directory.as_deref().and_then(FileStamp::of),
            secret: config.secret_file.as_deref().and_then(FileStamp::of),
        };
        let secret = config.secret_file.as_deref().map(load_secret).transpose()?;
        let table = load_table(&config.route_table)?;
        let directory = match &config.directory {
            Some(path) => load_directory(path)?,
            None => Directory::default(),
        };
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        Ok(Self {
            shared: Arc::new(Shared {
                table: ArcSwap::from_pointee(table),
                directory: ArcSwap::from_pointee(directory),
                secrets: ArcSwapOption::from_pointee(secret.map(|current| Secrets {
                    current,
                    previous: None,
                })),
                tls,
                dns: Dns::from_system_config(),
                requests: Family::default(),
                reloads: Family::default(),
                loaded_stamps,
                config,
            }),
        })
    }

    /// Registers `mailproxy_lookupd_requests_total{outcome}` and
    /// `mailproxy_lookupd_reloads_total{file,result}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailproxy_lookupd_requests",
            "Lookup requests answered, by outcome",
            self.shared.requests.clone(),
        );
        registry.register(
            "mailproxy_lookupd_reloads",
            "Reloads of the route table and directory files, by result",
            self.shared.reloads.clone(),
        );
    }

    /// Requests answered so far with `outcome`.
    pub fn requests(&self, outcome: RequestOutcome) -> u64 {
        self.shared
            .requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .get()
    }

    /// Serves HTTP/1.1 (https with [`LookupdConfig::tls`]) on `listener` and reloads changed
    /// files until `shutdown` completes; then stops accepting and gives requests in flight a
    /// few seconds. Accept errors are logged, not returned: the only error is a listener
    /// without a local address.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let address = listener.local_addr()?;
        info!(%address, tls = self.shared.tls.is_some(), "lookupd listening");
        let _reloader = AbortOnDrop(tokio::spawn(reload_loop(self.shared.clone())));
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Answers are one small write; Nagle would only delay them. Failing to
                        // set it costs latency, nothing else.
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(accept_connection(
                            self.shared.clone(),
                            stream,
                            peer,
                            graceful.watcher(),
                        ));
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        warn!(%error, "lookupd cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("lookupd stopped with requests still in flight");
        }
        info!(%address, "lookupd stopped");
        Ok(())
    }
}

/// Stops the reload loop when `serve` ends, however it ends (shutdown, or its future dropped).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    watcher: Watcher,
) {
    let Some(acceptor) = shared.tls.clone() else {
        return serve_connection(shared, stream, peer, watcher).await;
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(shared, stream, peer, watcher).await,
        Ok(Err(error)) => debug!(%peer, %error, "lookupd TLS handshake failed"),
        Err(_) => debug!(%peer, "lookupd TLS handshake timed out"),
    }
}

async fn serve_connection<I>(shared: Arc<Shared>, io: I, peer: SocketAddr, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(shared.handle(&request, peer).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection).await {
        debug!(%peer, %error, "lookupd connection ended with an error");
    }
}

/// A parsed lookup request.
struct Ask {
    user: String,
    protocol: Protocol,
    /// `X-Proxy-IP`: the proxy address the client reached.
    proxy_ip: Option<IpAddr>,
    /// `X-Proxy-Host` without a port: the web host name the client asked for.
    vhost: Option<String>,
}

impl Shared {
    async fn handle(&self, request: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let (outcome, response) = self.answer(request, peer).await;
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        response
    }

    async fn answer(
        &self,
        request: &Request<Incoming>,
        peer: SocketAddr,
    ) -> (RequestOutcome, Response<Full<Bytes>>) {
        let headers = request.headers();
        // No answer about any account, so no Auth-Status: a refusal would tell the proxy that
        // the account does not exist. The status puts the fault on this handler in its log.
        if !self.secret_matches(headers) {
            warn!(%peer, "lookup request without the right shared secret");
            return (
                RequestOutcome::Forbidden,
                plain(StatusCode::FORBIDDEN, "wrong or missing lookup secret"),
            );
        }
        if request.method() != Method::GET {
            return (
                RequestOutcome::BadRequest,
                plain(StatusCode::METHOD_NOT_ALLOWED, "lookups are GET requests"),
            );
        }
        let client = headers
            .get("client-ip")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("-");
        let ask = match parse_ask(headers) {
            Ok(ask) => ask,
            Err(Unasked::Malformed(problem)) => {
                info!(%peer, problem, "bad lookup request");
                return (
                    RequestOutcome::BadRequest,
                    plain(StatusCode::BAD_REQUEST, problem),
                );
            }
            Err(Unasked::Unroutable(problem)) => {
                info!(%peer, client, problem, "lookup refused");
                return (RequestOutcome::Refused, self.refusal());
            }
        };
        let table = self.table.load();
        let directory = self.directory.load();
        let arrival = Arrival {
            proxy_ip: ask.proxy_ip,
            vhost: ask.vhost.as_deref(),
        };
        let routed = match decide(&table, &directory, &ask.user, arrival, ask.protocol) {
            Decision::Route(routed) => routed,
            Decision::Refuse(reason) => {
                info!(%peer, client, user = %ask.user, protocol = %ask.protocol, reason, "lookup refused");
                return (RequestOutcome::Refused, self.refusal());
            }
            Decision::Draining { server } => {
                info!(%peer, client, user = %ask.user, protocol = %ask.protocol, server, "lookup refused: the account's server is draining");
                return (RequestOutcome::Draining, self.unavailable_refusal(server));
            }
            Decision::Unlisted { server } => {
                warn!(%peer, client, user = %ask.user, protocol = %ask.protocol, %server, "lookup refused: the directory puts the account on a server the route table does not list");
                return (
                    RequestOutcome::Unavailable,
                    self.unavailable_refusal(&server),
                );
            }
        };
        let ip = match resolve(&self.dns, routed.host).await {
            Ok(ip) => ip,
            Err(error) => {
                warn!(%peer, client, user = %ask.user, host = routed.host, server = routed.server, %error, "lookup refused: cannot resolve the account's server");
                return (
                    RequestOutcome::Unavailable,
                    self.unavailable_refusal(routed.server),
                );
            }
        };
        debug!(%peer, client, user = %ask.user, protocol = %ask.protocol, server = routed.server, %ip, port = routed.port, "lookup routed");
        let mut answer = vec![
            ("auth-status", "OK".to_string()),
            ("auth-server", ip.to_string()),
            ("auth-port", routed.port.to_string()),
            (
                "auth-cache-alias",
                if routed.cache_alias { "TRUE" } else { "FALSE" }.to_string(),
            ),
        ];
        if routed.account != ask.user {
            answer.push(("auth-user", escape_auth_user(&routed.account).into_owned()));
        }
        (RequestOutcome::Found, auth_response(&answer))
    }

    fn secret_matches(&self, headers: &HeaderMap) -> bool {
        let secrets = self.secrets.load();
        let Some(secrets) = secrets.as_ref() else {
            return true;
        };
        let given = headers
            .get(SECRET_HEADER)
            .map_or(&b""[..], HeaderValue::as_bytes);
        let previous = secrets
            .previous
            .as_ref()
            .filter(|(_, until)| Instant::now() < *until)
            .is_some_and(|(secret, _)| bool::from(given.ct_eq(secret.as_bytes())));
        bool::from(given.ct_eq(secrets.current.as_bytes())) || previous
    }

    fn refusal(&self) -> Response<Full<Bytes>> {
        auth_response(&self.refusal_headers())
    }

    /// A refusal that names the server holding the account's mailbox, which cannot take the
    /// login now (draining, or unreachable): a proxy answers the login as temporarily
    /// unavailable, neither taking the answer for a broken handler's (as any non-200 one) nor
    /// falling back to a domain's server (as after a plain refusal). Other peers (stock nginx)
    /// see a plain refusal.
    fn unavailable_refusal(&self, server: &str) -> Response<Full<Bytes>> {
        let mut headers = self.refusal_headers();
        // Hand-written files may name a server anything; escaped, it is always a header value.
        headers.push((DRAINING_HEADER, server.escape_default().to_string()));
        auth_response(&headers)
    }

    fn refusal_headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("auth-status", REFUSAL.to_string()),
            ("auth-wait", self.config.refusal_wait.as_secs().to_string()),
        ]
    }
}

/// Why a request is answered without consulting the route table.
enum Unasked {
    /// Not a lookup request at all: a header every lookup carries is missing (400).
    Malformed(&'static str),
    /// A lookup of a login lookupd cannot route (a name that is no account's, a method or a
    /// protocol it does not serve): refused, as Zimbra's servlet refuses it.
    Unroutable(&'static str),
}

fn parse_ask(headers: &HeaderMap) -> Result<Ask, Unasked> {
    let header = |name: &str, missing| headers.get(name).ok_or(Unasked::Malformed(missing));
    let method = header("auth-method", "no Auth-Method header")?;
    let user = header("auth-user", "no Auth-User header")?;
    let protocol = header("auth-protocol", "no Auth-Protocol header")?;
    let method = method.to_str().unwrap_or_default().to_ascii_lowercase();
    if !matches!(method.as_str(), "plain" | "login" | "username") {
        return Err(Unasked::Unroutable("unsupported Auth-Method"));
    }
    let user = std::str::from_utf8(user.as_bytes())
        .ok()
        .and_then(unescape_auth_user)
        .filter(|user| !user.is_empty())
        .ok_or(Unasked::Unroutable(
            "Auth-User is empty or does not decode to UTF-8",
        ))?;
    let protocol = protocol
        .to_str()
        .ok()
        .and_then(|protocol| protocol.parse().ok())
        .ok_or(Unasked::Unroutable(
            "Auth-Protocol is not imap, imapssl, pop3, pop3ssl, http or httpssl",
        ))?;
    let text = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let proxy_ip = text("x-proxy-ip").and_then(|ip| ip.trim().parse().ok());
    // Decoded as Auth-User is (a proxy passes a UTF-8 Host on): a host name present but
    // unreadable must still count as one, or an alias would be cached under it unscoped.
    let vhost = headers.get("x-proxy-host").map(|host| {
        let host = String::from_utf8_lossy(host.as_bytes());
        let host = host.trim();
        match host.rsplit_once(':') {
            Some((name, port))
                if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name.to_string()
            }
            _ => host.to_string(),
        }
    });
    Ok(Ask {
        user,
        protocol,
        proxy_ip,
        vhost,
    })
}

/// A lookup-protocol answer: status 200, the given headers, no body.
fn auth_response(headers: &[(&'static str, String)]) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    for (name, value) in headers {
        match HeaderValue::from_str(value) {
            Ok(value) => {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(name), value);
            }
            Err(_) => {
                error!(header = name, "lookupd built an unsendable header value");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "unsendable answer");
            }
        }
    }
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response
}

/// The address nginx needs: an IP literal as is, else the host's first IPv4 address, else its
/// first IPv6 one (Zimbra's choice in dual-stack mode).
async fn resolve(dns: &Dns, host: &str) -> std::io::Result<IpAddr> {
    let addresses = dns.lookup(host).await?;
    Ok(addresses
        .iter()
        .find(|ip| ip.is_ipv4())
        .unwrap_or(&addresses[0])
        .to_owned())
}

fn read(path: &Path) -> Result<String, LookupdError> {
    std::fs::read_to_string(path).map_err(|source| LookupdError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_table(path: &Path) -> Result<RouteTable, LookupdError> {
    RouteTable::from_json(&read(path)?).map_err(|source| LookupdError::RouteTable {
        path: path.to_path_buf(),
        source,
    })
}

/// The shared secret a file holds (surrounding white space is not part of it).
fn load_secret(path: &Path) -> Result<String, LookupdError> {
    let secret = read(path)?.trim().to_string();
    // A request without the header compares as the empty secret, so an empty secret would
    // accept every request: with --secret-file, a secret is required.
    if secret.is_empty() {
        return Err(LookupdError::EmptySecret {
            path: path.to_path_buf(),
        });
    }
    if HeaderValue::from_str(&secret).is_err() {
        return Err(LookupdError::BadSecret {
            path: path.to_path_buf(),
        });
    }
    Ok(secret)
}

fn load_directory(path: &Path) -> Result<Directory, LookupdError> {
    Directory::parse(&read(path)?).map_err(|source| LookupdError::Directory {
        path: path.to_path_buf(),
        source,
    })
}

/// Polls the files; a changed one is parsed in a blocking thread and swapped in if good.
async fn reload_loop(shared: Arc<Shared>) {
    let table_path = shared.config.route_table.clone();
    let directory_path = shared.config.directory.clone();
    let secret_path = shared.config.secret_file.clone();
    let mut stamps = shared.loaded_stamps;
    let mut ticks = polls(shared.config.reload_interval);
    loop {
        ticks.tick().await;
        let shared = shared.clone();
        let (table_path, directory_path, secret_path) = (
            table_path.clone(),
            directory_path.clone(),
            secret_path.clone(),
        );
        let (table_stamp, directory_stamp, secret_stamp) =
            (stamps.table, stamps.directory, stamps.secret);
        let checked = tokio::task::spawn_blocking(move || {
            let table = reload_if_changed(
                &shared,
                "route_table",
                &table_path,
                table_stamp,
                |path| {
                    let table = load_table(path)?;
                    info!(path = %path.display(), servers = table.servers.len(), version = table.version(), "route table reloaded");
                    shared.table.store(Arc::new(table));
                    Ok(())
                },
            );
            let directory = directory_path.as_deref().map(|path| {
                reload_if_changed(&shared, "directory", path, directory_stamp, |path| {
                    let directory = load_directory(path)?;
                    let (accounts, aliases) = directory.counts();
                    info!(path = %path.display(), accounts, aliases, "directory reloaded");
                    shared.directory.store(Arc::new(directory));
                    Ok(())
                })
            });
            let secret = secret_path.as_deref().map(|path| {
                reload_if_changed(&shared, "secret", path, secret_stamp, |path| {
                    let current = load_secret(path)?;
                    let loaded = shared.secrets.load();
                    // The kubelet also swaps the file when another key of its Secret changes:
                    // a new stamp with the same secret must not cut the overlap of the one
                    // before it short.
                    if loaded
                        .as_ref()
                        .is_some_and(|secrets| secrets.current == current)
                    {
                        debug!(path = %path.display(), "secret file replaced; the secret is unchanged");
                        return Ok(());
                    }
                    let until = Instant::now() + shared.config.secret_overlap;
                    let previous = loaded
                        .as_ref()
                        .map(|secrets| (secrets.current.clone(), until));
                    shared
                        .secrets
                        .store(Some(Arc::new(Secrets { current, previous })));
                    info!(path = %path.display(), overlap_seconds = shared.config.secret_overlap.as_secs(), "shared secret reloaded; the previous one is accepted for the overlap");
                    Ok(())
                })
            });
            LoadedStamps {
                table,
                directory: directory.flatten(),
                secret: secret.flatten(),
            }
        });
        match checked.await {
            Ok(checked) => stamps = checked,
            Err(error) => error!(%error, "lookupd reload check failed"),
        }
    }
}

/// Reloads `path` when its stamp differs from `seen`; returns the stamp now seen. A failed
/// load is remembered too, so a broken file is logged once, not at every poll.
fn reload_if_changed(
    shared: &Shared,
    file: &'static str,
    path: &Path,
    seen: Option<FileStamp>,
    load: impl FnOnce(&Path) -> Result<(), LookupdError>,
) -> Option<FileStamp> {
    let Some(now) = FileStamp::of(path) else {
        // Gone for a moment (an editor's rename, a ConfigMap's symlink swap) or for good:
        // either way the last content keeps serving.
        debug!(path = %path.display(), "cannot stat the {file}");
        return seen;
    };
    if Some(now) == seen {
        return seen;
    }
    let result = match load(path) {
        Ok(()) => "ok",
        Err(error) => {
            error!(%error, "cannot reload the {file}; serving its last content");
            "error"
        }
    };
    shared
        .reloads
        .get_or_create(&ReloadLabels { file, result })
        .inc();
    Some(now)
}

fn tls_acceptor(tls: &LookupdTls) -> Result<TlsAcceptor, LookupdError> {
    let certificates = CertificateDer::pem_file_iter(&tls.certificate_chain)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| {
            LookupdError::Tls(format!("{}: {error}", tls.certificate_chain.display()))
        })?;
    let key = PrivateKeyDer::from_pem_file(&tls.private_key)
        .map_err(|error| LookupdError::Tls(format!("{}: {error}", tls.private_key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| LookupdError::Tls(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .map_err(|error| LookupdError::Tls(error.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
