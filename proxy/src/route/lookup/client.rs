//! [`LookupClient`]: asks the Route Lookup Handlers, round-robin, with Zimbra's failover.
//!
//! Zimbra's proxy rotates through its handlers, fails over to the next one on a connect error
//! or timeout (15 s by default), and marks a failed handler down (60 s by default) so that
//! later logins do not wait on it again. This client does the same, and treats a broken HTTP
//! exchange and a 5xx answer (the handler itself is failing) the same way.
//!
//! Any other answer it cannot use (a 4xx, a 200 without the lookup protocol's headers) fails
//! this lookup alone, as in Zimbra: the handler is up, and such an answer is most often caused
//! by the login (a 431 for a huge `Auth-User`), so the next handler would answer it the same.
//! Marking handlers down for it would let one client's logins take every handler out of
//! rotation for everyone.
//!
//! Handlers marked down are tried last, after those in rotation have failed, rather than not at
//! all: after a brief outage, logins then resume as soon as one is back instead of failing for
//! the rest of the down period. A lookup's time stays bounded by the number of handlers times
//! the timeout.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::Uri;
use http::header::HeaderValue;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Body;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use mailproxy_crds::route_table::{RouteTable, is_host_name};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tracing::{debug, error, warn};

use super::AuthMethod;
use super::request::{RequestError, build_request};
use super::response::{LookupOutcome, ResponseError, parse_response};
use crate::route::LoginContext;

/// Zimbra's lookup timeout (connect and answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Zimbra's handler down period.
pub const DEFAULT_DOWN_PERIOD: Duration = Duration::from_secs(60);

/// How long a pooled connection to a handler stays open unused.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Unused connections kept per handler. A login storm opens as many connections as lookups run
/// at once (100 logins arriving together: 100 connections), and each kept one costs the proxy
/// its buffers and task (about 20 KiB) until [`POOL_IDLE_TIMEOUT`]; a steady lookup rate needs a
/// few (rate × answer time: 10,000 misses a second at 1 ms is 10).
pub const IDLE_CONNECTIONS_PER_HANDLER: usize = 32;

/// hyper's read buffer, and so the largest response head it accepts (the parser's own caps
/// are smaller; this only keeps a runaway handler from costing memory).
const MAX_HEAD_BUFFER: usize = 64 * 1024;

/// Largest body drained so that its connection can be reused; answers have empty bodies.
const MAX_DRAINED_BODY: usize = 64 * 1024;

/// A Route Lookup Handler URL: `http` or `https`, with a host; the path is sent as given
/// (Zimbra's is [`mailproxy_crds::route_table::LOOKUP_PATH`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HandlerUrl {
    uri: Uri,
    text: String,
}

impl HandlerUrl {
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The `Host` header for this handler: the URL's authority.
    pub fn host_header(&self) -> &str {
        self.uri
            .authority()
            .map_or("", |authority| authority.as_str())
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for HandlerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for HandlerUrl {
    type Err = LookupConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| LookupConfigError::BadUrl {
            url: s.chars().take(200).collect(),
            reason: reason.to_string(),
        };
        let uri: Uri = s.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("the scheme must be http or https")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information is not supported"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        // The URI parser takes anything between brackets and characters such as `%` or `|` in
        // a host; such a handler could never be reached, so it is refused with the reason.
        match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(literal) => {
                if literal.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(bad("the host in brackets is not an IPv6 address"));
                }
            }
            None => {
                if !is_host_name(host) {
                    return Err(bad(
                        "the host must be a DNS name, an IPv4 address or an IPv6 address in brackets",
                    ));
                }
            }
        }
        Ok(Self {
            text: uri.to_string(),
            uri,
        })
    }
}

/// How to build a [`LookupClient`].
#[derive(Clone, Debug)]
pub struct LookupClientConfig {
    /// Handlers, used round-robin in this order.
    pub handlers: Vec<HandlerUrl>,
    /// Per-attempt limit on connect plus answer.
    pub timeout: Duration,
    /// How long a failed handler is skipped.
    pub down_period: Duration,
    /// Sent as `X-Mailproxy-Lookup-Secret` when set.
    pub secret: Option<String>,
    /// Trust the system's CA store for https handlers.
    pub system_roots: bool,
    /// Extra CAs for https handlers (see [`certificates_from_pem`]).
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl Default for LookupClientConfig {
    fn default() -> Self {
        Self {
            handlers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            down_period: DEFAULT_DOWN_PERIOD,
            secret: None,
            system_roots: true,
            extra_roots: Vec::new(),
        }
    }
}

/// Reads the certificates of a PEM file (a CA bundle) for [`LookupClientConfig::extra_roots`].
pub fn certificates_from_pem(
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, LookupConfigError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| LookupConfigError::BadCa(error.to_string()))?;
    if certificates.is_empty() {
        return Err(LookupConfigError::BadCa(
            "no CERTIFICATE block in the PEM data".to_string(),
        ));
    }
    Ok(certificates)
}

/// A configuration the client cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupConfigError {
    #[error("lookup handler URL {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("the lookup secret cannot be sent as an HTTP header value")]
    BadSecret,
    #[error("bad CA certificate for https lookup handlers: {0}")]
    BadCa(String),
    #[error("cannot set up TLS for https lookup handlers: {0}")]
    Tls(String),
}

/// Why one handler gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerFailure {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP exchange failed: {0}")]
    Exchange(String),
    #[error(transparent)]
    Response(#[from] ResponseError),
}

impl HandlerFailure {
    fn reason(&self) -> &'static str {
        match self {
            HandlerFailure::Connect(_) => "connect",
            HandlerFailure::Timeout(_) => "timeout",
            HandlerFailure::Exchange(_) => "exchange",
            HandlerFailure::Response(_) => "response",
        }
    }
}

/// One handler's failure within a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAttempt {
    pub handler: HandlerUrl,
    pub failure: HandlerFailure,
}

/// A lookup that produced no answer. A refusal is an answer, not an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no Route Lookup Handler is configured")]
    NoHandlers,
    #[error("cannot ask for this login: {0}")]
    Request(#[from] RequestError),
    #[error("every Route Lookup Handler failed: {}", describe_attempts(.attempts))]
    AllHandlersFailed { attempts: Vec<FailedAttempt> },
    /// A handler answered this login with something it cannot use; no other is asked.
    #[error("Route Lookup Handler {handler} gave no usable answer: {error}")]
    BadAnswer {
        handler: HandlerUrl,
        error: ResponseError,
    },
}

fn describe_attempts(attempts: &[FailedAttempt]) -> String {
    attempts
        .iter()
        .map(|attempt| format!("{}: {}", attempt.handler, attempt.failure))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A handler as [`LookupClient::handlers`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerStatus {
    pub url: HandlerUrl,
    /// How much longer it is skipped; `None` when it is in rotation.
    pub down_for: Option<Duration>,
}

struct Entry {
    url: HandlerUrl,
    down_until: Option<Instant>,
}

impl Entry {
    fn is_down(&self, now: Instant) -> bool {
        self.down_until.is_some_and(|until| until > now)
    }
}

struct State {
    handlers: Vec<Entry>,
    timeout: Duration,
    down_period: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabels {
    handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    handler: String,
    reason: &'static str,
}

#[derive(Clone)]
struct Metrics {
    lookups: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    handler_up: Family<HandlerLabels, Gauge>,
    failures: Family<FailureLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        Self {
            lookups: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            handler_up: Family::default(),
            failures: Family::default(),
        }
    }

    fn finish(&self, outcome: &'static str, started: Instant) {
        self.lookups.get_or_create(&OutcomeLabels { outcome }).inc();
        self.duration.observe(started.elapsed().as_secs_f64());
    }

    fn set_up(&self, url: &HandlerUrl, up: bool) {
        self.handler_up
            .get_or_create(&HandlerLabels {
                handler: url.to_string(),
            })
            .set(i64::from(up));
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The secret as a header value that logs and debug output never show.
fn secret_header(secret: &str) -> Result<HeaderValue, LookupConfigError> {
    let mut value = HeaderValue::from_str(secret).map_err(|_| LookupConfigError::BadSecret)?;
    value.set_sensitive(true);
    Ok(value)
}

/// The Route Lookup Handler client: cheap to share (`Arc`), safe to use from many sessions at
/// once, with one pool of keep-alive connections so that a lookup is one round trip.
pub struct LookupClient {
    http: HttpClient,
    state: Mutex<State>,
    next: AtomicUsize,
    /// Replaced when the mounted secret file changes (see [`LookupClient::replace_secret`]).
    secret: ArcSwapOption<HeaderValue>,
    metrics: Metrics,
}

impl fmt::Debug for LookupClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LookupClient")
            .field("handlers", &self.handlers())
            .finish_non_exhaustive()
    }
}

impl LookupClient {
    /// Builds the client; reads the system CA store when `config.system_roots` is set.
    pub fn new(config: LookupClientConfig) -> Result<Self, LookupConfigError> {
        let secret = config.secret.as_deref().map(secret_header).transpose()?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(&config)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HANDLER)
            .pool_timer(TokioTimer::new())
            .http1_max_buf_size(MAX_HEAD_BUFFER)
            .build(connector);
        let this = Self {
            http: client,
            state: Mutex::new(State {
                handlers: Vec::new(),
                timeout: config.timeout,
                down_period: config.down_period,
            }),
            next: AtomicUsize::new(0),
            secret: ArcSwapOption::from(secret.map(Arc::new)),
            metrics: Metrics::new(),
        };
        this.set_handlers(config.handlers);
        Ok(this)
    }

    /// Sends `secret` from now on: a rotated lookup secret takes effect without a restart.
    pub fn replace_secret(&self, secret: &str) -> Result<(), LookupConfigError> {
        self.secret.store(Some(Arc::new(secret_header(secret)?)));
        Ok(())
    }

    /// Registers the client's metrics: `mailproxy_lookups_total{outcome}` (found, refused,
    /// failed), `mailproxy_lookup_duration_seconds`, `mailproxy_lookup_handler_up{handler}`
    /// (0 from a failure until the handler answers again) and
    /// `mailproxy_lookup_handler_failures_total{handler,reason}` (connect, timeout, exchange,
    /// response).
    pub fn register(&self, registry: &mut Registry) {
        let metrics = self.metrics.clone();
        registry.register(
            "mailproxy_lookups",
            "Route lookups by outcome",
            metrics.lookups,
        );
        registry.register(
            "mailproxy_lookup_duration_seconds",
            "Time to a lookup's answer or final failure, failovers included",
            metrics.duration,
        );
        registry.register(
            "mailproxy_lookup_handler_up",
            "Whether a Route Lookup Handler is in rotation (0: marked down after a failure)",
            metrics.handler_up,
        );
        registry.register(
            "mailproxy_lookup_handler_failures",
            "Failed attempts by Route Lookup Handler and reason",
            metrics.failures,
        );
    }

    /// Replaces the handler list (the route table reloaded). Handlers that remain keep their
    /// down marks, so a reload does not send logins back to a handler that just failed.
    pub fn set_handlers(&self, handlers: Vec<HandlerUrl>) {
        let mut state = self.lock();
        let mut old = std::mem::take(&mut state.handlers);
        for url in handlers {
            if state.handlers.iter().any(|entry| entry.url == url) {
                continue;
            }
            let down_until = old
                .iter()
                .position(|entry| entry.url == url)
                .and_then(|index| old.swap_remove(index).down_until);
            self.metrics.set_up(&url, down_until.is_none());
            state.handlers.push(Entry { url, down_until });
        }
        for removed in old {
            self.metrics.handler_up.remove(&HandlerLabels {
                handler: removed.url.to_string(),
            });
        }
    }

    /// Changes the per-attempt timeout and the down period; current down marks keep their end.
    pub fn set_timing(&self, timeout: Duration, down_period: Duration) {
        let mut state = self.lock();
        state.timeout = timeout;
        state.down_period = down_period;
    }

    /// Takes the handlers and timing of a (re)loaded route table. A handler URL the client
    /// cannot use is logged and skipped, and the others are taken: each URL comes from one
    /// MailboxServer, and one bad server must not cost the pool every handler. Returns why each
    /// skipped URL was skipped.
    pub fn apply_route_table(&self, table: &RouteTable) -> Vec<LookupConfigError> {
        let mut skipped = Vec::new();
        let handlers = table
            .lookup_handlers
            .iter()
            .filter_map(|url| match url.parse::<HandlerUrl>() {
                Ok(handler) => Some(handler),
                Err(error) => {
                    error!(%url, %error, "skipping a lookup handler of the route table; the others stay in use. Fix spec.host, spec.ports.lookup or spec.lookupScheme of the MailboxServer it comes from");
                    skipped.push(error);
                    None
                }
            })
            .collect();
        self.set_handlers(handlers);
        self.set_timing(
            Duration::from_secs(table.settings.lookup_timeout_seconds.max(1)),
            Duration::from_secs(table.settings.handler_down_seconds),
        );
        skipped
    }

    /// Whether any handler is configured (a lookup without one fails at once).
    pub fn has_handlers(&self) -> bool {
        !self.lock().handlers.is_empty()
    }

    /// The handlers in rotation order, with their down marks.
    pub fn handlers(&self) -> Vec<HandlerStatus> {
        let now = Instant::now();
        self.lock()
            .handlers
            .iter()
            .map(|entry| HandlerStatus {
                url: entry.url.clone(),
                down_for: entry
                    .down_until
                    .and_then(|until| until.checked_duration_since(now))
                    .filter(|left| !left.is_zero()),
            })
            .collect()
    }

    /// Asks where `login` lives: the next handler in rotation first, then the others in turn
    /// until one answers, those marked down last.
    pub async fn lookup(
        &self,
        login: &LoginContext,
        method: AuthMethod,
    ) -> Result<LookupOutcome, LookupError> {
        let started = Instant::now();
        let (plan, timeout, down_period) = self.plan();
        if plan.is_empty() {
            self.metrics.finish("failed", started);
            return Err(LookupError::NoHandlers);
        }
        let mut attempts = Vec::new();
        for url in plan {
            let secret = self.secret.load();
            let request = match build_request(&url, login, method, secret.as_deref()) {
                Ok(request) => request,
                Err(error) => {
                    self.metrics.finish("failed", started);
                    return Err(error.into());
                }
            };
            match self.attempt(request, timeout).await {
                Ok(outcome) => {
                    self.mark(&url, None);
                    let label = match &outcome {
                        LookupOutcome::Found { .. } => "found",
                        LookupOutcome::Refused { .. } => "refused",
                        LookupOutcome::Draining { .. } => "draining",
                    };
                    debug!(handler = %url, user = %login.user, protocol = %login.protocol, ?outcome, "route lookup answered");
                    self.metrics.finish(label, started);
                    return Ok(outcome);
                }
                Err(failure) => {
                    self.metrics
                        .failures
                        .get_or_create(&FailureLabels {
                            handler: url.to_string(),
                            reason: failure.reason(),
                        })
                        .inc();
                    match failure {
                        HandlerFailure::Response(error) if !fails_every_login(&error) => {
                            warn!(handler = %url, user = %login.user, protocol = %login.protocol, %error, "route lookup handler gave no usable answer for this login; failing the lookup, the handler stays in rotation");
                            self.metrics.finish("failed", started);
                            return Err(LookupError::BadAnswer {
                                handler: url,
                                error,
                            });
                        }
                        failure => {
                            warn!(handler = %url, user = %login.user, protocol = %login.protocol, error = %failure, down_for = ?down_period, "route lookup handler failed; marking it down");
                            self.mark(&url, Some(Instant::now() + down_period));
                            attempts.push(FailedAttempt {
                                handler: url,
                                failure,
                            });
                        }
                    }
                }
            }
        }
        self.metrics.finish("failed", started);
        Err(LookupError::AllHandlersFailed { attempts })
    }

    /// The handlers to try, in order: those in rotation starting at the next turn, then those
    /// marked down, likewise.
    fn plan(&self) -> (Vec<HandlerUrl>, Duration, Duration) {
        let state = self.lock();
        let now = Instant::now();
        let (mut plan, mut down): (Vec<&Entry>, Vec<&Entry>) =
            state.handlers.iter().partition(|entry| !entry.is_down(now));
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        for handlers in [&mut plan, &mut down] {
            let len = handlers.len();
            if len > 0 {
                handlers.rotate_left(turn % len);
            }
        }
        plan.append(&mut down);
        let plan = plan.into_iter().map(|entry| entry.url.clone()).collect();
        (plan, state.timeout, state.down_period)
    }

    /// Sets or clears a handler's down mark, unless a reload removed it meanwhile.
    fn mark(&self, url: &HandlerUrl, down_until: Option<Instant>) {
        let mut state = self.lock();
        if let Some(entry) = state.handlers.iter_mut().find(|entry| &entry.url == url) {
            entry.down_until = down_until;
            self.metrics.set_up(url, down_until.is_none());
        }
    }

    async fn attempt(
        &self,
        request: http::Request<Empty<Bytes>>,
        timeout: Duration,
    ) -> Result<LookupOutcome, HandlerFailure> {
        let exchange = async {
            let response = self.http.request(request).await.map_err(|error| {
                if error.is_connect() {
                    HandlerFailure::Connect(error_chain(&error))
                } else {
                    HandlerFailure::Exchange(error_chain(&error))
                }
            })?;
            let (head, body) = response.into_parts();
            if !body.is_end_stream() {
                // Answers have empty bodies; reading one that is not lets hyper pool the
                // connection again, in the background so that a slow body cannot hold a
                // login that already has its answer.
                tokio::spawn(async move {
                    let drain = Limited::new(body, MAX_DRAINED_BODY).collect();
                    let _drained = tokio::time::timeout(POOL_IDLE_TIMEOUT, drain).await;
                });
            }
            Ok(parse_response(
                head.status.as_u16(),
                head.headers
                    .iter()
                    .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
            )?)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HandlerFailure::Timeout(timeout))?
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every await-free step, so a panic elsewhere while
        // holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A status that no login of this proxy can change: the handler fails whatever login is
/// asked (a 5xx, a refused lookup secret during a rotation that reached some handlers only, a
/// URL that is no lookup handler: 404, 405), so it is marked down and another one tried. Only
/// what a login's own request can cause (400, 414, 431: a name too long or malformed for it)
/// fails that login alone.
fn fails_every_login(error: &ResponseError) -> bool {
    matches!(error, ResponseError::Status { status } if !matches!(status, 400 | 414 | 431))
}

/// hyper-util's errors say "client error (Connect)"; the cause is further down the chain.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn tls_config(config: &LookupClientConfig) -> Result<rustls::ClientConfig, LookupConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    if config.system_roots {
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            warn!(%error, "cannot read part of the system CA store for https lookup handlers");
        }
        roots.add_parsable_certificates(native.certs);
    }
    for certificate in &config.extra_roots {
        roots
            .add(certificate.clone())
            .map_err(|error| LookupConfigError::BadCa(error.to_string()))?;
    }
    // An explicit provider: the process-wide default is ambiguous when more than one rustls
    // backend is linked in.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| LookupConfigError::Tls(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_urls() {
        let url: HandlerUrl = "https://mbs1.mail.svc:7072/service/extension/nginx-lookup"
            .parse()
            .unwrap();
        assert_eq!(url.host_header(), "mbs1.mail.svc:7072");
        assert_eq!(url.uri().path(), "/service/extension/nginx-lookup");
        assert_eq!(
            url.to_string(),
            "https://mbs1.mail.svc:7072/service/extension/nginx-lookup"
        );
        for bad in [
            "mbs1:7072/x",
            "ftp://h/x",
            "http:///x",
            "http://user:pw@h/x",
            "http://admin@mbs2:7072/x",
            "http://mbs2%:7072/x",
            "http://mbs2|x:7072/x",
            "http://mbs-\u{fc}.example.com:7072/x",
            "http://[mbs2.example.com:7072]:7072/x",
            "not a url",
            "",
        ] {
            assert!(
                bad.parse::<HandlerUrl>().is_err(),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn handler_urls_with_ip_literals() {
        for good in [
            "http://10.0.0.1:7072/x",
            "https://[2001:db8::5]:7072/x",
            "http://mbs_1/x",
        ] {
            assert!(
                good.parse::<HandlerUrl>().is_ok(),
                "{good:?} must be accepted"
            );
        }
    }

    #[test]
    fn pem_certificates() {
        assert!(matches!(
            certificates_from_pem(b"no pem here"),
            Err(LookupConfigError::BadCa(_))
        ));
    }

    fn client(urls: &[&str]) -> LookupClient {
        LookupClient::new(LookupClientConfig {
            handlers: urls.iter().map(|u| u.parse().unwrap()).collect(),
            system_roots: false,
            ..LookupClientConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn rotation_puts_down_handlers_last() {
        let client = client(&["http://a/", "http://b/", "http://c/"]);
        let first: Vec<String> = (0..3).map(|_| client.plan().0[0].to_string()).collect();
        assert_eq!(first, ["http://a/", "http://b/", "http://c/"]);
        let b: HandlerUrl = "http://b/".parse().unwrap();
        let down = || Some(Instant::now() + Duration::from_secs(60));
        client.mark(&b, down());
        for _ in 0..4 {
            let plan = client.plan().0;
            assert_eq!(plan.len(), 3);
            assert_eq!(plan[2], b, "{plan:?}");
        }
        for url in ["http://a/", "http://c/"] {
            client.mark(&url.parse().unwrap(), down());
        }
        assert_eq!(client.plan().0.len(), 3);
        client.mark(&b, Some(Instant::now()));
        assert_eq!(client.plan().0[0], b);
    }

    #[test]
    fn set_handlers_keeps_down_marks_and_dedupes() {
        let client = client(&["http://a/", "http://b/"]);
        let a: HandlerUrl = "http://a/".parse().unwrap();
        client.mark(&a, Some(Instant::now() + Duration::from_secs(60)));
        client.set_handlers(
            ["http://c/", "http://a/", "http://c/"]
                .iter()
                .map(|u| u.parse().unwrap())
                .collect(),
        );
        let handlers = client.handlers();
        assert_eq!(handlers.len(), 2);
        assert_eq!(handlers[0].url.as_str(), "http://c/");
        assert!(handlers[0].down_for.is_none());
        assert_eq!(handlers[1].url, a);
        assert!(handlers[1].down_for.is_some());
    }

    #[test]
    fn bad_secret_is_a_config_error() {
        let error = LookupClient::new(LookupClientConfig {
            secret: Some("line\nbreak".to_string()),
            system_roots: false,
            ..LookupClientConfig::default()
        })
        .unwrap_err();
        assert_eq!(error, LookupConfigError::BadSecret);
    }
}
