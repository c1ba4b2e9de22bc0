//! The proxies' configuration file, `<pool>-config` (key `config.yaml`), mounted at
//! `/etc/mailproxy/config.yaml`: `mailproxy serve`'s own model
//! ([`mailproxy_crds::proxy_config::ProxyConfig`]). It holds what needs a restart to change
//! (listeners, TLS files); the route table (hot-reloaded) is only referenced, by ConfigMap name.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use mailproxy_crds::ProxyPoolSpec;
use mailproxy_crds::proxy_config::{
    self, CertificateFiles, HttpConfig, ListenerConfig, ListenerProtocol, LookupClientConfig,
    ProxyConfig, ProxyProtocolConfig, RouteTableSource, TlsConfig, UpstreamTlsConfig,
};

use super::Pool;
use crate::labels::{Component, names};

pub const CONFIG_KEY: &str = proxy_config::CONFIGMAP_KEY;
pub const CONFIG_FILE: &str = "/etc/mailproxy/config.yaml";
pub const TLS_DIR: &str = "/etc/mailproxy/tls";
/// The keys of the TLS Secret (those of a `kubernetes.io/tls` Secret), mounted in [`TLS_DIR`].
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";
/// Where the key of `spec.lookup.secretRef` is mounted.
pub const LOOKUP_SECRET_DIR: &str = "/etc/mailproxy/lookup";
pub const LOOKUP_SECRET_FILE: &str = "/etc/mailproxy/lookup/secret";
/// The proxy's health port: `/healthz` (liveness), `/readyz` (readiness), `/metrics`.
pub const HEALTH_PORT: i32 = 8081;
/// The proxy closes the sessions still open this long before the kubelet's SIGKILL.
const SHUTDOWN_MARGIN_SECONDS: i64 = 5;

/// How long a terminating proxy keeps accepting after it turned unready: the time kube-proxy
/// and cloud load balancers take to stop sending it new connections, which would otherwise be
/// refused during every rollout, scale-down and node drain.
const SHUTDOWN_DELAY_SECONDS: u64 = 5;

/// How long a connection from the load balancer may take to send its PROXY protocol header
/// (the proxy's default, nginx's `proxy_protocol_timeout`).
const PROXY_PROTOCOL_HEADER_TIMEOUT_SECONDS: u64 = 30;

/// A proxy's shutdown within the pod's termination grace period: the delay first, then the
/// sessions' grace, and a margin before the kubelet's SIGKILL.
#[derive(Debug, PartialEq, Eq)]
struct Shutdown {
    delay: u64,
    grace: u64,
}

impl Shutdown {
    fn within(termination_grace_period_seconds: i64) -> Self {
        let available =
            u64::try_from(termination_grace_period_seconds - SHUTDOWN_MARGIN_SECONDS).unwrap_or(0);
        let delay = SHUTDOWN_DELAY_SECONDS.min(available);
        Self {
            delay,
            grace: available - delay,
        }
    }
}

/// A client-facing listener of the pool, as the Deployment and the Service expose it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolListener {
    /// imap, imaps, pop3, pop3s, http, https (also the container port name).
    pub name: &'static str,
    pub protocol: ListenerProtocol,
    pub port: i32,
    /// Implicit TLS from the first byte (IMAPS, POP3S, HTTPS).
    pub tls: bool,
}

/// The enabled listeners: TLS listeners only when the pool has a certificate.
pub fn listeners(spec: &ProxyPoolSpec) -> Vec<PoolListener> {
    let l = &spec.listeners;
    let has_tls = spec.tls.is_some();
    [
        ("imap", ListenerProtocol::Imap, &l.imap),
        ("imaps", ListenerProtocol::Imaps, &l.imaps),
        ("pop3", ListenerProtocol::Pop3, &l.pop3),
        ("pop3s", ListenerProtocol::Pop3s, &l.pop3s),
        ("http", ListenerProtocol::Http, &l.http),
        ("https", ListenerProtocol::Https, &l.https),
    ]
    .into_iter()
    .filter(|(_, protocol, listener)| listener.enabled && (!protocol.implicit_tls() || has_tls))
    .map(|(name, protocol, listener)| PoolListener {
        name,
        protocol,
        port: listener.port,
        tls: protocol.implicit_tls(),
    })
    .collect()
}

pub fn proxy_config(pool: &Pool<'_>) -> ProxyConfig {
    let spec = pool.spec;
    let shutdown = Shutdown::within(spec.pod.termination_grace_period_seconds);
    // Every client-facing listener is behind the Service, so behind its load balancer.
    let proxy_protocol = spec
        .service
        .proxy_protocol
        .as_ref()
        .map(|p| ProxyProtocolConfig {
            trusted_networks: p.trusted_networks.clone(),
            header_timeout_seconds: PROXY_PROTOCOL_HEADER_TIMEOUT_SECONDS,
        });
    ProxyConfig {
        listeners: listeners(spec)
            .into_iter()
            .map(|listener| ListenerConfig {
                protocol: listener.protocol,
                address: format!("[::]:{}", listener.port),
                proxy_protocol: proxy_protocol.is_some(),
            })
            .collect(),
        tls: spec.tls.as_ref().map(|_| TlsConfig {
            certificates: vec![CertificateFiles {
                cert: format!("{TLS_DIR}/{TLS_CERT_KEY}").into(),
                key: format!("{TLS_DIR}/{TLS_KEY_KEY}").into(),
            }],
        }),
        route_table: RouteTableSource::config_map(pool.namespace, names::routes(pool.name)),
        health_listen: format!("[::]:{HEALTH_PORT}"),
        lookup: LookupClientConfig {
            ca_file: None,
            secret_file: spec
                .lookup
                .secret_ref
                .as_ref()
                .map(|_| LOOKUP_SECRET_FILE.into()),
        },
        upstream_tls: UpstreamTlsConfig::default(),
        shutdown_delay_seconds: shutdown.delay,
        shutdown_grace_seconds: shutdown.grace,
        max_connections: 100_000,
        http: http_config(spec),
        proxy_protocol,
    }
}

/// `spec.web` in the proxy's terms. The redirects name the https listener's port unless it is
/// 443; the Service exposes the listeners on their own ports.
fn http_config(spec: &ProxyPoolSpec) -> HttpConfig {
    let web = &spec.web;
    let seconds = |value: i64| u64::try_from(value).unwrap_or(1);
    let https_port = spec.listeners.https.port;
    HttpConfig {
        max_header_bytes: usize::try_from(web.max_header_bytes)
            .unwrap_or(HttpConfig::default().max_header_bytes),
        header_read_timeout_seconds: seconds(web.header_read_timeout_seconds),
        upstream_response_timeout_seconds: seconds(web.upstream_response_timeout_seconds),
        body_idle_timeout_seconds: seconds(web.body_idle_timeout_seconds),
        tunnel_idle_timeout_seconds: seconds(web.tunnel_idle_timeout_seconds),
        redirect_to_https: web.redirect_to_https,
        redirect_https_port: (https_port != 443)
            .then(|| u16::try_from(https_port).ok())
            .flatten(),
        ..HttpConfig::default()
    }
}

pub fn config_map(pool: &Pool<'_>, config: &ProxyConfig) -> ConfigMap {
    ConfigMap {
        metadata: pool.child_meta(names::config(pool.name), Component::Proxy),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), config.to_yaml())])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pool, spec};
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pool_without_web_settings_runs_the_proxys_http_defaults() {
        let spec = spec(json!({}));
        assert_eq!(proxy_config(&pool(&spec)).http, HttpConfig::default());
    }

    #[test]
    fn web_settings_reach_the_proxy_and_redirects_name_a_nonstandard_https_port() {
        let on_8443 = spec(json!({
            "tls": {"secretName": "mail-tls"},
            "listeners": {"https": {"enabled": true, "port": 8443}},
            "web": {"redirectToHttps": true, "maxHeaderBytes": 8192, "tunnelIdleTimeoutSeconds": 60},
        }));
        let http = proxy_config(&pool(&on_8443)).http;
        assert!(http.redirect_to_https);
        assert_eq!(http.redirect_https_port, Some(8443));
        assert_eq!(http.max_header_bytes, 8192);
        assert_eq!(http.tunnel_idle_timeout_seconds, 60);
        assert_eq!(
            http.body_idle_timeout_seconds,
            HttpConfig::default().body_idle_timeout_seconds
        );
        let on_443 =
            spec(json!({"tls": {"secretName": "mail-tls"}, "web": {"redirectToHttps": true}}));
        assert_eq!(proxy_config(&pool(&on_443)).http.redirect_https_port, None);
    }

    #[test]
    fn a_listener_written_without_its_port_keeps_the_protocols_port() {
        let spec = spec(json!({
            "tls": {"secretName": "mail-tls"},
            "listeners": {"pop3": {"enabled": false}, "imaps": {}, "imap": {"port": 1143}},
        }));
        let served: Vec<(&str, i32)> = listeners(&spec).iter().map(|l| (l.name, l.port)).collect();
        assert_eq!(
            served,
            [
                ("imap", 1143),
                ("imaps", 993),
                ("pop3s", 995),
                ("http", 80),
                ("https", 443)
            ]
        );
        assert!(!spec.listeners.pop3.enabled);
        assert_eq!(spec.listeners.pop3.port, 110);
    }

    #[test]
    fn config_lists_enabled_listeners_and_references_the_route_table() {
        let spec = spec(json!({"listeners": {"pop3": {"enabled": false, "port": 110}}}));
        let pool = pool(&spec);
        let config = proxy_config(&pool);
        let addresses: Vec<&str> = config
            .listeners
            .iter()
            .map(|l| l.address.as_str())
            .collect();
        // No certificate: the TLS listeners are not served.
        assert_eq!(addresses, ["[::]:143", "[::]:80"]);
        assert_eq!(
            config.route_table,
            RouteTableSource::config_map("mail", "main-routes")
        );
        assert_eq!(config.health_listen, "[::]:8081");
        assert_eq!(config.shutdown_delay_seconds, 5);
        assert_eq!(config.shutdown_grace_seconds, 290);
        assert!(config.tls.is_none());
        assert!(config.lookup.secret_file.is_none());
        let map = config_map(&pool, &config);
        assert_eq!(map.metadata.name.as_deref(), Some("main-config"));
        // What the operator writes is what `mailproxy serve` reads.
        let text = &map.data.unwrap()["config.yaml"];
        let read = ProxyConfig::parse(text, std::path::Path::new(CONFIG_FILE)).unwrap();
        assert_eq!(read, config);
    }

    #[test]
    fn tls_adds_the_implicit_tls_listeners_and_the_mounted_files() {
        let spec = spec(json!({"tls": {"secretName": "cert"},
                               "lookup": {"secretRef": {"name": "s", "key": "k"}}}));
        let names: Vec<&str> = listeners(&spec).iter().map(|l| l.name).collect();
        assert_eq!(names, ["imap", "imaps", "pop3", "pop3s", "http", "https"]);
        assert!(
            listeners(&spec)
                .iter()
                .find(|l| l.name == "imaps")
                .unwrap()
                .tls
        );
        let config = proxy_config(&pool(&spec));
        assert_eq!(
            config.tls.as_ref().unwrap().certificates[0].cert,
            std::path::Path::new("/etc/mailproxy/tls/tls.crt")
        );
        assert_eq!(
            config.lookup.secret_file.as_deref(),
            Some(std::path::Path::new(LOOKUP_SECRET_FILE))
        );
        ProxyConfig::parse(&config.to_yaml(), std::path::Path::new(CONFIG_FILE)).unwrap();
    }

    #[test]
    fn service_proxy_protocol_makes_every_listener_expect_the_header_from_trusted_networks() {
        let plain = proxy_config(&pool(&spec(json!({"tls": {"secretName": "cert"}}))));
        assert!(plain.listeners.iter().all(|l| !l.proxy_protocol));
        assert_eq!(plain.proxy_protocol, None);
        assert!(!plain.to_yaml().contains("proxyProtocol"));

        let spec = spec(json!({
            "tls": {"secretName": "cert"},
            "service": {"type": "LoadBalancer",
                        "proxyProtocol": {"trustedNetworks": ["10.0.0.0/8", "2001:db8::/32"]}},
        }));
        let config = proxy_config(&pool(&spec));
        assert_eq!(config.listeners.len(), 6);
        assert!(config.listeners.iter().all(|l| l.proxy_protocol));
        assert_eq!(
            config.proxy_protocol,
            Some(ProxyProtocolConfig {
                trusted_networks: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
                header_timeout_seconds: 30,
            })
        );
        // What the operator writes is what `mailproxy serve` reads, and accepts.
        let read = ProxyConfig::parse(&config.to_yaml(), std::path::Path::new(CONFIG_FILE))
            .expect("the proxy takes the rendered PROXY protocol settings");
        assert_eq!(read, config);
        assert_eq!(read.proxy_protocol_networks().unwrap().len(), 2);
    }

    #[test]
    fn the_shutdown_delay_and_grace_fit_the_termination_grace_period() {
        assert_eq!(
            Shutdown::within(300),
            Shutdown {
                delay: 5,
                grace: 290
            }
        );
        assert_eq!(Shutdown::within(8), Shutdown { delay: 3, grace: 0 });
        assert_eq!(Shutdown::within(0), Shutdown { delay: 0, grace: 0 });
    }
}
