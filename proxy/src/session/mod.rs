//! The session driver: accepts mail clients, runs the pre-login state machines of
//! [`crate::mail`] on their bytes, routes the login, logs in to the mailbox server as the
//! client and relays bytes both ways.
//!
//! One task per connection. Every wait has a bound: the pre-login phase (TLS handshake
//! included) ends at `timeouts.preLoginSeconds`, the upstream login at
//! `timeouts.upstreamConnectSeconds`, the relay after `timeouts.idleSeconds` without traffic,
//! and every session when the server's shutdown grace is over. Settings are read from the route
//! table when a connection starts, so a new table applies to new sessions without touching
//! those in progress.

mod accept;
pub(crate) mod activity;
mod imap;
mod metrics;
mod pop3;
pub mod proxy_header;
mod proxy_protocol;
pub(crate) mod relay;
pub mod stream;
mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mailproxy_crds::route_table::RouteSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

pub use self::accept::Acceptor;
pub(crate) use self::accept::{Accepted, client_origin};
pub use self::metrics::SessionMetrics;
pub use self::proxy_header::ProxyHeaderPolicy;
use self::relay::{RelayEnd, Traffic, UpstreamEnd};
use self::stream::Stream;
use self::upstream::{UpstreamConnection, UpstreamError};
use crate::dns::Dns;
use crate::mail::imap::ClientId;
use crate::mail::{
    Credentials, LoginMechanism, PreLoginEvent, PreLoginMachine, StartTls, split_login_suffix,
};
use crate::route::resolver::{ResolveError, Resolver};
use crate::route::throttle::{LoginThrottle, ThrottleDecision};
use crate::route::{LoginContext, Protocol};
use crate::tls::{MailTls, UpstreamConnector};

/// Bound on a TLS handshake within the pre-login time: a client that opens a connection and
/// sends nothing, or garbage, is let go quickly.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Bound on writing one answer to a client after the pre-login phase (a client that stops
/// reading must not hold its session forever).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on the goodbye to a client that did not log in in time.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// Read size of the pre-login phase; freed when the login is done.
const PRE_LOGIN_READ: usize = 4096;

/// Which mail service a listener offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailService {
    Imap,
    Pop3,
}

/// A mail listener: its service, and whether clients speak TLS from the first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerKind {
    pub service: MailService,
    pub implicit_tls: bool,
}

impl ListenerKind {
    /// `imap`, `imaps`, `pop3` or `pop3s`: the `protocol` label of the metrics and logs.
    pub fn label(self) -> &'static str {
        match (self.service, self.implicit_tls) {
            (MailService::Imap, false) => "imap",
            (MailService::Imap, true) => "imaps",
            (MailService::Pop3, false) => "pop3",
            (MailService::Pop3, true) => "pop3s",
        }
    }

    /// The lookup protocols: plain, and the one used when the server wants TLS.
    fn protocols(self) -> (Protocol, Protocol) {
        match self.service {
            MailService::Imap => (Protocol::Imap, Protocol::ImapSsl),
            MailService::Pop3 => (Protocol::Pop3, Protocol::Pop3Ssl),
        }
    }
}

/// What every session shares. Built once by the server; cheap to share behind an `Arc`.
pub struct SessionContext {
    pub resolver: Resolver,
    pub throttle: LoginThrottle,
    /// The listeners' TLS (implicit TLS and STARTTLS); `None` when no certificate is
    /// configured, in which case STARTTLS is not offered.
    pub tls: Option<MailTls>,
    pub upstream_tls: UpstreamConnector,
    /// Resolves mailbox server host names and connects to them.
    pub dns: Dns,
    pub metrics: SessionMetrics,
    /// How long a session waits before answering a login the mailbox server refused (the
    /// counterpart of a lookup's Auth-Wait, which slows down password guessing).
    pub upstream_failure_wait: Duration,
    /// The proxy's name in the upstream IMAP ID (`X-VIA`).
    pub via: String,
    /// Turns true when sessions must end now (the shutdown grace is over).
    pub closing: watch::Receiver<bool>,
}

/// Accepts connections until `stop` turns true. A connection is accepted only once `limit`
/// has a permit for it, so past the limit clients wait in the kernel's backlog rather than
/// costing memory here.
pub async fn serve_listener(
    acceptor: Acceptor,
    kind: ListenerKind,
    context: Arc<SessionContext>,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    while let Some(accepted) = acceptor.accept(&limit, &mut stop, kind.label()).await {
        let context = context.clone();
        let proxy_header = acceptor.proxy_header();
        tokio::spawn(async move {
            let Some(Accepted {
                permit,
                tcp,
                peer,
                local,
            }) = client_origin(
                proxy_header.as_deref(),
                accepted,
                kind.label(),
                &context.closing,
            )
            .await
            else {
                return;
            };
            session(&context, kind, tcp, peer, local).await;
            drop(permit);
        });
    }
}

/// Resolves when the flag is (or turns) true, or its sender is gone.
pub(crate) async fn signalled(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// How a session ended: the `outcome` label of `mailproxy_sessions_total` and the session log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Logged in; the relay ended with either side closing.
    Relayed,
    /// Logged in; closed after `idleSeconds` without traffic.
    IdleTimeout,
    /// The mailbox server refused the credentials.
    LoginFailed,
    /// The route lookup refused the login.
    Refused,
    /// No route could be found (no handler answered, no domain entry).
    Unavailable,
    /// The mailbox server could not be reached or spoke nonsense.
    UpstreamError,
    /// Login throttling turned the client or the user away.
    Throttled,
    /// The pre-login state machine closed (LOGOUT/QUIT, too many errors, a line too long).
    Closed,
    /// The client went away before logging in.
    ClientGone,
    /// The client did not log in within `preLoginSeconds`.
    Timeout,
    /// The TLS handshake failed or timed out.
    TlsFailed,
    /// Closed at the end of the shutdown grace.
    Shutdown,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::LoginFailed => "login_failed",
            Outcome::Refused => "refused",
            Outcome::Unavailable => "unavailable",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Throttled => "throttled",
            Outcome::Closed => "closed",
            Outcome::ClientGone => "client_gone",
            Outcome::Timeout => "timeout",
            Outcome::TlsFailed => "tls_failed",
            Outcome::Shutdown => "shutdown",
        }
    }
}

/// What the end-of-session log line reports.
struct Record {
    user: Option<String>,
    upstream: Option<String>,
    traffic: Traffic,
}

async fn session(
    context: &SessionContext,
    kind: ListenerKind,
    tcp: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) {
    let protocol = kind.label();
    let started = Instant::now();
    context.metrics.started(protocol);
    let (from_client, to_client) = context.metrics.byte_counters(protocol);
    let mut record = Record {
        user: None,
        upstream: None,
        traffic: Traffic::new(from_client, to_client),
    };
    let mut closing = context.closing.clone();
    let outcome = tokio::select! {
        outcome = run(context, kind, tcp, peer, local, &mut record) => outcome,
        () = signalled(&mut closing) => Outcome::Shutdown,
    };
    let from_client = record.traffic.bytes_from_client();
    let to_client = record.traffic.bytes_to_client();
    context.metrics.ended(protocol, outcome.label());
    tracing::info!(
        protocol,
        client = %peer.ip().to_canonical(),
        user = record.user.as_deref().unwrap_or("-"),
        upstream = record.upstream.as_deref().unwrap_or("-"),
        outcome = outcome.label(),
        bytes_from_client = from_client,
        bytes_to_client = to_client,
        duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "session ended"
    );
}

/// The client connection's addresses.
#[derive(Clone, Copy, Debug)]
struct Connection {
    kind: ListenerKind,
    peer: SocketAddr,
    local: SocketAddr,
}

impl Connection {
    fn client_ip(&self) -> IpAddr {
        self.peer.ip().to_canonical()
    }
}

/// The route table's session settings when the session started.
#[derive(Clone, Copy, Debug)]
struct Settings {
    starttls: StartTls,
    pre_login: Duration,
    idle: Duration,
    upstream_timeout: Duration,
    max_errors: u32,
}

impl Settings {
    fn of(table: &RouteSettings, tls_available: bool) -> Self {
        let seconds = |value: i64| Duration::from_secs(u64::try_from(value).unwrap_or(1).max(1));
        Self {
            starttls: StartTls {
                mode: table.starttls,
                certificate: tls_available,
            },
            pre_login: seconds(table.timeouts.pre_login_seconds),
            idle: seconds(table.timeouts.idle_seconds),
            upstream_timeout: seconds(table.timeouts.upstream_connect_seconds),
            max_errors: u32::try_from(table.timeouts.max_errors.max(1)).unwrap_or(u32::MAX),
        }
    }
}

async fn run(
    context: &SessionContext,
    kind: ListenerKind,
    tcp: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    record: &mut Record,
) -> Outcome {
    let Some(local) = local else {
        return Outcome::ClientGone;
    };
    let table = context.resolver.table().current();
    let settings = Settings::of(&table.settings, context.tls.is_some());
    drop(table);
    let deadline = Instant::now() + settings.pre_login;
    let connection = Connection { kind, peer, local };
    let tls = context.tls.as_ref().map(|tls| match kind.service {
        MailService::Imap => &tls.imap,
        MailService::Pop3 => &tls.pop3,
    });
    let mut client = Stream::Plain(tcp);
    if kind.implicit_tls {
        client = match start_tls(tls, client, deadline).await {
            Ok(client) => client,
            Err(outcome) => return outcome,
        };
    }
    if context.throttle.enabled() {
        let decision = context
            .throttle
            .check_ip(kind.protocols().0, connection.client_ip())
            .await;
        if decision == ThrottleDecision::RejectedIp {
            let rejection: &[u8] = match kind.service {
                MailService::Imap => b"* BYE Login rejected from this IP\r\n",
                MailService::Pop3 => b"-ERR Login rejected from this IP\r\n",
            };
            let _ = send(&mut client, rejection, deadline).await;
            return Outcome::Throttled;
        }
    }
    let prelogin = match kind.service {
        MailService::Imap => imap::pre_login(client, &settings, deadline, tls).await,
        MailService::Pop3 => pop3::pre_login(client, &settings, deadline, tls).await,
    };
    let prelogin = match prelogin {
        Ok(prelogin) => prelogin,
        Err(outcome) => return outcome,
    };
    log_in_and_relay(context, &connection, &settings, record, prelogin).await
}

/// The TLS handshake of an implicit-TLS listener or after STARTTLS.
async fn start_tls(
    tls: Option<&TlsAcceptor>,
    client: Stream,
    deadline: Instant,
) -> Result<Stream, Outcome> {
    let Some(acceptor) = tls else {
        return Err(Outcome::TlsFailed);
    };
    let deadline = deadline.min(Instant::now() + TLS_HANDSHAKE_TIMEOUT);
    match tokio::time::timeout_at(deadline, client.accept_tls(acceptor)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => {
            tracing::debug!(%error, "client TLS handshake failed");
            Err(Outcome::TlsFailed)
        }
        Err(_) => Err(Outcome::TlsFailed),
    }
}

/// Greets the client and answers it, as the protocol's `machine` decides, until it logs in.
/// At `deadline` the client gets `goodbye`. `Err` ends the session.
async fn answer_until_login<M: PreLoginMachine>(
    machine: &mut M,
    mut client: Stream,
    goodbye: &[u8],
    deadline: Instant,
    tls: Option<&TlsAcceptor>,
) -> Result<(Stream, M::Login), Outcome> {
    send(&mut client, &machine.greeting(), deadline).await?;
    let mut buffer = vec![0; PRE_LOGIN_READ];
    loop {
        let read = read_before_login(&mut client, &mut buffer, deadline, goodbye).await?;
        for event in machine.feed(&buffer[..read]) {
            match event {
                PreLoginEvent::Reply(bytes) => send(&mut client, &bytes, deadline).await?,
                PreLoginEvent::StartTls => {
                    client = start_tls(tls, client, deadline).await?;
                    machine.tls_established();
                }
                PreLoginEvent::Login(login) => return Ok((client, login)),
                PreLoginEvent::Close => return Err(Outcome::Closed),
            }
        }
    }
}

/// Reads what the client sends before it has logged in. At `deadline` the client gets
/// `goodbye` (the protocol's own words for it) and the session ends.
async fn read_before_login(
    client: &mut Stream,
    buffer: &mut [u8],
    deadline: Instant,
    goodbye: &[u8],
) -> Result<usize, Outcome> {
    match tokio::time::timeout_at(deadline, client.read(buffer)).await {
        Ok(Ok(0) | Err(_)) => Err(Outcome::ClientGone),
        Ok(Ok(read)) => Ok(read),
        Err(_) => {
            let _ = send(client, goodbye, Instant::now() + GOODBYE_TIMEOUT).await;
            Err(Outcome::Timeout)
        }
    }
}

/// Writes an answer, giving up at `deadline`.
async fn send(client: &mut Stream, bytes: &[u8], deadline: Instant) -> Result<(), Outcome> {
    let write = async {
        client.write_all(bytes).await?;
        client.flush().await
    };
    match tokio::time::timeout_at(deadline, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Outcome::ClientGone),
        Err(_) => Err(Outcome::Timeout),
    }
}

/// What a pre-login phase hands on: the client connection, the credentials and the bytes the
/// client sent after its login command.
struct PreLogin {
    client: Stream,
    credentials: Credentials,
    pending: Vec<u8>,
    dialect: Dialect,
}

/// The protocol-specific parts of the login: the upstream exchange and the client's answers.
enum Dialect {
    Imap {
        tag: String,
        mechanism: LoginMechanism,
        client_id: ClientId,
    },
    Pop3,
}

/// A login the mailbox server accepted.
struct UpstreamAccepted {
    /// What the server said during the login that the client is to see before the answer
    /// (IMAP's untagged lines), line ends included.
    preamble: Vec<u8>,
    /// The text of the server's OK.
    text: Vec<u8>,
}

/// Why an upstream login did not succeed.
enum LoginFailure {
    /// The mailbox server refused the credentials; its answer text.
    Refused(Vec<u8>),
    Error(UpstreamError),
}

impl From<UpstreamError> for LoginFailure {
    fn from(error: UpstreamError) -> Self {
        LoginFailure::Error(error)
    }
}

impl Dialect {
    async fn log_in(
        &self,
        context: &SessionContext,
        upstream: &mut UpstreamConnection,
        request: &UpstreamLogin<'_>,
    ) -> Result<UpstreamAccepted, LoginFailure> {
        match self {
            Dialect::Imap { client_id, .. } => {
                imap::log_in_upstream(context, upstream, request, client_id).await
            }
            Dialect::Pop3 => Ok(UpstreamAccepted {
                preamble: Vec::new(),
                text: pop3::log_in_upstream(upstream, request).await?,
            }),
        }
    }

    fn user_rejected(&self) -> Vec<u8> {
        match self {
            Dialect::Imap { tag, mechanism, .. } => imap::user_rejected(tag, *mechanism),
            Dialect::Pop3 => pop3::user_rejected(),
        }
    }

    fn refused(&self, message: &str) -> Vec<u8> {
        match self {
            Dialect::Imap { tag, .. } => imap::refused(tag, message),
            Dialect::Pop3 => pop3::refused(message),
        }
    }

    fn unavailable(&self) -> Vec<u8> {
        match self {
            Dialect::Imap { tag, .. } => imap::unavailable(tag),
            Dialect::Pop3 => pop3::unavailable(),
        }
    }

    fn login_failed(&self, backend_text: Option<&[u8]>) -> Vec<u8> {
        match self {
            Dialect::Imap { tag, mechanism, .. } => {
                imap::login_failed(tag, *mechanism, backend_text)
            }
            Dialect::Pop3 => pop3::login_failed(backend_text),
        }
    }

    fn logged_in(&self, accepted: UpstreamAccepted) -> Vec<u8> {
        match self {
            Dialect::Imap { tag, .. } => imap::logged_in(tag, accepted),
            Dialect::Pop3 => pop3::logged_in(&accepted.text),
        }
    }
}

/// What the upstream login sends.
struct UpstreamLogin<'a> {
    connection: &'a Connection,
    target: &'a upstream::Target,
    /// The name to log in with: the account the route names (or the client's login), with the
    /// client's login suffix put back.
    login: &'a str,
    credentials: &'a Credentials,
}

/// Logs in upstream, then relays until either side is done.
async fn log_in_and_relay(
    context: &SessionContext,
    connection: &Connection,
    settings: &Settings,
    record: &mut Record,
    prelogin: PreLogin,
) -> Outcome {
    let session = match log_in(context, connection, settings, record, prelogin).await {
        Ok(session) => session,
        Err(outcome) => return outcome,
    };
    let end = relay::relay(
        session.client,
        session.upstream,
        session.to_upstream,
        session.to_client,
        settings.idle,
        &record.traffic,
        UpstreamEnd::EndsSession,
    )
    .await;
    match end {
        RelayEnd::Closed => Outcome::Relayed,
        RelayEnd::Idle => Outcome::IdleTimeout,
        RelayEnd::Failed(error) => {
            tracing::debug!(%error, "relay ended with an error");
            Outcome::Relayed
        }
    }
}

/// A session logged in on both sides, with the bytes each side sent beyond the login.
///
/// The login's state (route, credentials, answers) ends with [`log_in`] rather than living on
/// beside the relay: an idle session holds only what the relay needs, and the task's size is
/// most of an idle session's memory.
struct LoggedIn {
    client: Stream,
    upstream: Stream,
    to_upstream: Vec<u8>,
    to_client: Vec<u8>,
}

/// Finds the route and logs in upstream as the client, answering the client either way; `Err`
/// is how the session ended.
async fn log_in(
    context: &SessionContext,
    connection: &Connection,
    settings: &Settings,
    record: &mut Record,
    prelogin: PreLogin,
) -> Result<LoggedIn, Outcome> {
    let PreLogin {
        mut client,
        credentials,
        pending,
        dialect,
    } = prelogin;
    let started = Instant::now();
    let answer_by = || Instant::now() + CLIENT_WRITE_TIMEOUT;
    let (name, suffix) = split_login_suffix(&credentials.login);
    let name = name.to_string();
    record.user = Some(name.clone());
    if context.throttle.enabled()
        && context.throttle.check_user(&name).await == ThrottleDecision::RejectedUser
    {
        let _ = send(&mut client, &dialect.user_rejected(), answer_by()).await;
        return Err(Outcome::Throttled);
    }
    let (plain, ssl) = connection.kind.protocols();
    let login = LoginContext {
        user: name.clone(),
        protocol: plain,
        client_ip: connection.client_ip(),
        proxy_ip: Some(connection.local.ip().to_canonical()),
        virtual_host: None,
        attempt: 1,
    };
    let target = match upstream::route(context, login, ssl).await {
        Ok(target) => target,
        Err(ResolveError::Refused { message, wait }) => {
            tokio::time::sleep(wait).await;
            let _ = send(&mut client, &dialect.refused(&message), answer_by()).await;
            return Err(Outcome::Refused);
        }
        Err(ResolveError::Unavailable { reason }) => {
            tracing::warn!(user = %name, %reason, "no route for a login");
            let _ = send(&mut client, &dialect.unavailable(), answer_by()).await;
            return Err(Outcome::Unavailable);
        }
    };
    let route = &target.resolved.route;
    record.upstream = Some(route.upstream.to_string());
    let account = route.account.as_deref().unwrap_or(&name);
    let upstream_login = match suffix {
        Some(suffix) => format!("{account}{suffix}"),
        None => account.to_string(),
    };
    let request = UpstreamLogin {
        connection,
        target: &target,
        login: &upstream_login,
        credentials: &credentials,
    };
    let attempt = async {
        let mut upstream =
            UpstreamConnection::open(context, &target, connection.peer, connection.local).await?;
        let accepted = dialect.log_in(context, &mut upstream, &request).await?;
        Ok::<_, LoginFailure>((upstream, accepted))
    };
    let result = tokio::time::timeout(settings.upstream_timeout, attempt)
        .await
        .unwrap_or(Err(LoginFailure::Error(UpstreamError::Timeout)));
    drop(credentials);
    let protocol = connection.kind.label();
    match result {
        Ok((upstream, accepted)) => {
            context.metrics.logged_in(protocol, started.elapsed());
            // Counted under the name it was checked under, so that the check sees the count.
            context.throttle.count_user(&name).await;
            send(&mut client, &dialect.logged_in(accepted), answer_by()).await?;
            let (upstream, leftover) = upstream.into_parts();
            Ok(LoggedIn {
                client,
                upstream,
                to_upstream: pending,
                to_client: leftover,
            })
        }
        Err(LoginFailure::Refused(text)) => {
            target.forget(context).await;
            tokio::time::sleep(context.upstream_failure_wait).await;
            let text = target.mail.pass_errors.then_some(text.as_slice());
            let _ = send(&mut client, &dialect.login_failed(text), answer_by()).await;
            Err(Outcome::LoginFailed)
        }
        Err(LoginFailure::Error(error)) => {
            tracing::warn!(user = %name, upstream = %route.upstream, %error, "upstream login failed");
            context.metrics.upstream_failed(protocol, error.label());
            // The server may be gone for good (a moved account, a replaced pod): the next
            // login should look again rather than trust the cache.
            target.forget(context).await;
            let _ = send(&mut client, &dialect.unavailable(), answer_by()).await;
            Err(Outcome::UpstreamError)
        }
    }
}
