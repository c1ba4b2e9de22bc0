//! `mailproxy serve`: a [`ProxyConfig`] turned into running listeners.
//!
//! [`Server::bind`] does everything that can fail at start (certificates, the first route
//! table, every bind) so that a bad configuration stops the process before it reports ready;
//! [`Server::run`] serves until its shutdown future resolves, then drains:
//!
//! 1. `/readyz` turns 503 (Kubernetes stops routing new clients here), while the listeners
//!    still accept for `shutdownDelaySeconds`: endpoints and load balancers take that long to
//!    notice, and a closed port would refuse the clients they still send;
//! 2. the listeners close; sessions in progress go on for up to `shutdownGraceSeconds`;
//! 3. those still open are closed, and `run` returns.
//!
//! The route table and the certificates reload while sessions run: neither restarts anything.
//!
//! `http` and `https` listeners serve the web proxy ([`crate::http`]); `https` offers HTTP/2 and
//! HTTP/1.1 by ALPN with the same certificates as the mail listeners, which offer only `imap`
//! or `pop3` ([`MailTls`]).

mod health;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use mailproxy_crds::proxy_config::{ListenerProtocol, ProxyConfig, RouteTableLocation};
use mailproxy_crds::settings::StartTlsMode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::dns::Dns;
use crate::http::proxy::{HttpProxy, HttpSettings};
use crate::http::upstream::WebConnector;
use crate::listen::bind;
use crate::mounted_file::FileStamp;
use crate::route::cache::{RouteCache, RouteCacheConfig};
use crate::route::lookup::{LookupClient, LookupClientConfig, certificates_from_pem};
use crate::route::resolver::Resolver;
use crate::route::table::{ConfigMapSource, TableHandle, watch_file};
use crate::route::throttle::LoginThrottle;
use crate::session::{
    Acceptor, ListenerKind, MailService, ProxyHeaderPolicy, SessionContext, SessionMetrics,
};
use crate::tls::{ALPN_WEB, CertificateStore, MailTls, UpstreamConnector};

/// After the grace, how long closed sessions get to finish their last writes and log.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What the configuration file does not say.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// How often the mounted certificate and lookup secret files are checked for a rotation.
    pub file_poll_interval: Duration,
    /// How long a session waits before answering a login the mailbox server refused. Zimbra
    /// waits too: it slows down password guessing through the proxy. One second costs a
    /// legitimate user with a typo nothing noticeable.
    pub upstream_failure_wait: Duration,
    /// The proxy's name in the upstream IMAP ID (`X-VIA`); the host name by default.
    pub via: String,
    /// The route cache (its embedded tier is used when the route table names no memcached).
    pub route_cache: RouteCacheConfig,
    /// Limits and timeouts of the `http`/`https` listeners (the configuration's `http` section
    /// with [`ServeOptions::from_config`]).
    pub http: HttpSettings,
}

impl ServeOptions {
    /// The defaults, with what the configuration file sets.
    pub fn from_config(config: &ProxyConfig) -> Self {
        Self {
            http: HttpSettings::from(&config.http),
            ..Self::default()
        }
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            file_poll_interval: Duration::from_secs(10),
            upstream_failure_wait: Duration::from_secs(1),
            via: std::env::var("HOSTNAME")
                .ok()
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "mailproxy".to_string()),
            route_cache: RouteCacheConfig::default(),
            http: HttpSettings::default(),
        }
    }
}

/// What a listener serves.
#[derive(Clone, Copy, Debug)]
enum Service {
    Mail(ListenerKind),
    Web { tls: bool },
}

/// A bound listener and how its connections start.
struct Listening {
    protocol: ListenerProtocol,
    service: Service,
    listener: TcpListener,
    /// Set when every connection starts with a PROXY protocol header.
    proxy_header: Option<Arc<ProxyHeaderPolicy>>,
}

/// A bound, not yet serving, proxy.
pub struct Server {
    listeners: Vec<Listening>,
    web: Arc<HttpProxy>,
    web_tls: Option<tokio_rustls::TlsAcceptor>,
    health: TcpListener,
    registry: Registry,
    context: Arc<SessionContext>,
    closing: watch::Sender<bool>,
    max_connections: usize,
    shutdown_delay: Duration,
    shutdown_grace: Duration,
    background: Vec<JoinHandle<()>>,
}

impl Server {
    /// Loads certificates and the route table, and binds every listener and the health port.
    pub async fn bind(config: &ProxyConfig, options: ServeOptions) -> anyhow::Result<Self> {
        let kinds = config
            .listeners
            .iter()
            .map(|listener| listener_service(listener.protocol))
            .collect::<Vec<_>>();
        let mut background = Vec::new();
        let mut web_tls = None;
        let tls = match &config.tls {
            Some(tls) if !tls.certificates.is_empty() => {
                let store = CertificateStore::load(&tls.certificates)
                    .context("cannot load the TLS certificates")?;
                background.push(store.watch(options.file_poll_interval));
                let web_config = crate::tls::server_config(store.clone(), &ALPN_WEB)?;
                web_tls = Some(tokio_rustls::TlsAcceptor::from(web_config));
                Some(MailTls::new(&store)?)
            }
            _ => None,
        };
        let upstream_tls = UpstreamConnector::new(config.upstream_tls.ca_file.as_deref())
            .context("cannot set up TLS to the mailbox servers")?;
        let dns = Dns::from_system_config();
        let web_connector = WebConnector::new(
            config.http.upstream_ca_file.as_deref(),
            options.http.upstream_connect_timeout,
            dns.clone(),
        )
        .context("cannot set up TLS to the web backends (http.upstreamCaFile)")?;
        let table = route_table(config).await?;
        let current = table.current();
        let plain_mail_listener = kinds
            .iter()
            .any(|kind| matches!(kind, Service::Mail(kind) if !kind.implicit_tls));
        let starttls_unusable = tls.is_none() && plain_mail_listener;
        if starttls_unusable && current.settings.starttls == StartTlsMode::Only {
            bail!("{STARTTLS_ONLY_WITHOUT_CERTIFICATE}");
        }

        // Stamped before it is read: a change in between is followed.
        let secret_seen = config.lookup.secret_file.as_deref().and_then(FileStamp::of);
        let lookup = Arc::new(lookup_client(config)?);
        if let Some(path) = &config.lookup.secret_file {
            let client = lookup.clone();
            background.push(crate::mounted_file::follow(
                path.clone(),
                secret_seen,
                options.file_poll_interval,
                "lookup secret",
                move |text| {
                    client
                        .replace_secret(text.trim())
                        .map_err(|error| error.to_string())
                },
            ));
        }
        let cache = RouteCache::new(options.route_cache.clone());
        let throttle = LoginThrottle::new(&current.settings.login_limits, cache.clone())
            .context("the route table's login limits are invalid")?;
        let resolver = Resolver::new(table.clone(), cache.clone(), lookup.clone(), dns.clone());
        background.push(resolver.follow_table());
        background.push(follow_settings(table, throttle.clone(), starttls_unusable));

        let metrics = SessionMetrics::default();
        let mut registry = Registry::default();
        resolver.register(&mut registry);
        cache.register(&mut registry);
        lookup.register(&mut registry);
        metrics.register(&mut registry);

        let (closing, closing_receiver) = watch::channel(false);
        let web = Arc::new(HttpProxy::new(
            resolver.clone(),
            options.http.clone(),
            web_connector,
        ));
        web.register(&mut registry);
        let context = Arc::new(SessionContext {
            resolver,
            throttle,
            tls,
            upstream_tls,
            dns,
            metrics,
            upstream_failure_wait: options.upstream_failure_wait,
            via: options.via,
            closing: closing_receiver,
        });
        let proxy_header = proxy_header_policy(config)?;
        if let Some(policy) = &proxy_header {
            policy.register(&mut registry);
        }
        let mut listeners = Vec::new();
        for (listener, service) in config.listeners.iter().zip(kinds) {
            listeners.push(Listening {
                protocol: listener.protocol,
                service,
                listener: bind(&listener.address).await?,
                proxy_header: proxy_header.clone().filter(|_| listener.proxy_protocol),
            });
        }
        let health = bind(&config.health_listen)
            .await
            .context("cannot bind the health port")?;
        Ok(Self {
            listeners,
            web,
            web_tls,
            health,
            registry,
            context,
            closing,
            // The drain waits for all permits at once, which takes a u32.
            max_connections: config
                .max_connections
                .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)),
            shutdown_delay: Duration::from_secs(config.shutdown_delay_seconds),
            shutdown_grace: Duration::from_secs(config.shutdown_grace_seconds),
            background,
        })
    }

    /// The bound address of each listener, in configuration order (useful with port 0).
    pub fn listener_addresses(&self) -> Vec<(ListenerProtocol, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.protocol, l.listener.local_addr().ok()?)))
            .collect()
    }

    /// The bound address of the health port.
    pub fn health_address(&self) -> Option<SocketAddr> {
        self.health.local_addr().ok()
    }

    /// Serves until `shutdown` resolves, then drains (see the module documentation).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            listeners,
            web,
            web_tls,
            health,
            registry,
            context,
            closing,
            max_connections,
            shutdown_delay,
            shutdown_grace,
            background,
        } = self;
        let ready = Arc::new(AtomicBool::new(true));
        let health = tokio::spawn(health::serve(health, Arc::new(registry), ready.clone()));
        let limit = Arc::new(Semaphore::new(max_connections));
        let (stop, stopped) = watch::channel(false);
        let mut accepting = Vec::new();
        for Listening {
            protocol,
            service,
            listener,
            proxy_header,
        } in listeners
        {
            if let Ok(address) = listener.local_addr() {
                let proxy_protocol = proxy_header.is_some();
                tracing::info!(?protocol, %address, proxy_protocol, "listening");
            }
            let acceptor = Acceptor::new(listener, proxy_header);
            let task = match service {
                Service::Mail(kind) => tokio::spawn(crate::session::serve_listener(
                    acceptor,
                    kind,
                    context.clone(),
                    limit.clone(),
                    stopped.clone(),
                )),
                Service::Web { tls } => tokio::spawn(crate::http::proxy::serve_listener(
                    acceptor,
                    if tls { web_tls.clone() } else { None },
                    web.clone(),
                    limit.clone(),
                    stopped.clone(),
                    context.closing.clone(),
                )),
            };
            accepting.push(task);
        }
        shutdown.await;
        ready.store(false, Ordering::Relaxed);
        if !shutdown_delay.is_zero() {
            tracing::info!(
                delay_seconds = shutdown_delay.as_secs(),
                "not ready; accepting connections until load balancers stop sending them"
            );
            tokio::time::sleep(shutdown_delay).await;
        }
        let _ = stop.send(true);
        for task in accepting {
            let _ = task.await;
        }
        let open = max_connections - limit.available_permits();
        tracing::info!(
            sessions = open,
            grace_seconds = shutdown_grace.as_secs(),
            "listeners closed; waiting for sessions to end"
        );
        let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(shutdown_grace, limit.acquire_many(all))
            .await
            .is_err()
        {
            let open = max_connections - limit.available_permits();
            tracing::info!(sessions = open, "shutdown grace over; closing sessions");
            let _ = closing.send(true);
            let _ = tokio::time::timeout(CLOSE_WAIT, limit.acquire_many(all)).await;
        }
        health.abort();
        for task in background {
            task.abort();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The PROXY protocol policy of the configuration's `proxyProtocol` block (only the listeners that
/// expect a header use it).
fn proxy_header_policy(config: &ProxyConfig) -> anyhow::Result<Option<Arc<ProxyHeaderPolicy>>> {
    let trusted = config
        .proxy_protocol_networks()
        .map_err(anyhow::Error::msg)?;
    Ok(config.proxy_protocol.as_ref().map(|settings| {
        Arc::new(ProxyHeaderPolicy::new(
            trusted,
            Duration::from_secs(settings.header_timeout_seconds),
        ))
    }))
}

/// Binds, loads everything and serves until `shutdown` resolves.
pub async fn serve(
    config: &ProxyConfig,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Server::bind(config, options).await?.run(shutdown).await
}

fn listener_service(protocol: ListenerProtocol) -> Service {
    let (service, implicit_tls) = match protocol {
        ListenerProtocol::Imap => (MailService::Imap, false),
        ListenerProtocol::Imaps => (MailService::Imap, true),
        ListenerProtocol::Pop3 => (MailService::Pop3, false),
        ListenerProtocol::Pop3s => (MailService::Pop3, true),
        ListenerProtocol::Http => return Service::Web { tls: false },
        ListenerProtocol::Https => return Service::Web { tls: true },
    };
    Service::Mail(ListenerKind {
        service,
        implicit_tls,
    })
}

async fn route_table(config: &ProxyConfig) -> anyhow::Result<TableHandle> {
    match config.route_table.location() {
        Some(RouteTableLocation::File(path)) => {
            Ok(watch_file(path).context("cannot load the route table")?)
        }
        Some(RouteTableLocation::ConfigMap(configmap)) => {
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API for the route-table ConfigMap")?;
            let source = ConfigMapSource {
                namespace: configmap.namespace.clone(),
                name: configmap.name.clone(),
            };
            Ok(source
                .watch(client)
                .await
                .context("cannot load the route table")?)
        }
        None => bail!("routeTable needs exactly one of `file` and `configMap`"),
    }
}

fn lookup_client(config: &ProxyConfig) -> anyhow::Result<LookupClient> {
    let mut lookup = LookupClientConfig::default();
    if let Some(path) = &config.lookup.ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read the lookup CA file {}", path.display()))?;
        lookup.extra_roots = certificates_from_pem(&pem)?;
    }
    if let Some(path) = &config.lookup.secret_file {
        let secret = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the lookup secret file {}", path.display()))?;
        lookup.secret = Some(secret.trim().to_string());
    }
    Ok(LookupClient::new(lookup)?)
}

const STARTTLS_ONLY_WITHOUT_CERTIFICATE: &str = "the route table says `starttls: only` but no \
     certificate is configured: add tls.certificates, or set starttls to on or off";

/// Applies what a new route table changes outside the sessions. Login limits follow it; an
/// invalid whitelist keeps the limits in force. A table that says `only` where no certificate
/// can honour it is still served, failing closed: every cleartext login is refused until it is
/// fixed, so it is reported on each change.
fn follow_settings(
    mut table: TableHandle,
    throttle: LoginThrottle,
    starttls_unusable: bool,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(current) = table.changed().await {
            if let Err(error) = throttle.set_limits(&current.settings.login_limits) {
                tracing::error!(%error, "new login limits rejected; keeping the previous ones");
            }
            if starttls_unusable && current.settings.starttls == StartTlsMode::Only {
                tracing::error!(
                    "{STARTTLS_ONLY_WITHOUT_CERTIFICATE}; until then IMAP and POP3 logins on \
                     the plain listeners are refused"
                );
            }
        }
    })
}
