//! The configuration file of `mailproxy serve`: what needs a restart to change (listeners,
//! certificate paths, where the route table comes from). Everything that may change while
//! sessions run (routes, handlers, memcached servers, timeouts, STARTTLS mode, login limits)
//! lives in the route table instead.
//!
//! The operator writes it into the ConfigMap `<pool>-config` (key [`CONFIGMAP_KEY`]); a
//! standalone proxy reads it from a file. YAML or JSON (JSON is valid YAML).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::settings::{IpBlock, MAX_SECONDS};

/// Key of the proxy configuration in its ConfigMap.
pub const CONFIGMAP_KEY: &str = "config.yaml";

/// Name of a pool's proxy-configuration ConfigMap.
pub fn configmap_name(pool: &str) -> String {
    format!("{pool}-config")
}

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProxyConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid mailproxy configuration: {source}")]
    Parse {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// `mailproxy serve --config FILE`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Client-facing listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Certificates for the TLS listeners and STARTTLS; required when any listener is TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Where the route table comes from.
    pub route_table: RouteTableSource,
    /// Address of the health (`/healthz`, `/readyz`) and metrics (`/metrics`) endpoint.
    #[serde(default = "defaults::health_listen")]
    pub health_listen: String,
    /// Route Lookup Handler client settings.
    #[serde(default)]
    pub lookup: LookupClientConfig,
    /// Connections to mailbox servers over TLS (IMAPS, POP3S; the web backends trust
    /// `http.upstreamCaFile`).
    #[serde(default)]
    pub upstream_tls: UpstreamTlsConfig,
    /// On SIGTERM, how long the listeners keep accepting after `/readyz` turned 503, while load
    /// balancers and Kubernetes endpoints stop sending new clients here.
    #[serde(default)]
    pub shutdown_delay_seconds: u64,
    /// On SIGTERM, once the listeners have closed, how long live sessions may continue before
    /// they are closed.
    #[serde(default = "defaults::shutdown_grace_seconds")]
    pub shutdown_grace_seconds: u64,
    /// Client connections served at once, across listeners; more wait in the kernel's backlog.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Limits and timeouts of the `http` and `https` listeners.
    #[serde(default)]
    pub http: HttpConfig,
    /// Who may send the PROXY protocol header that listeners with `proxyProtocol` expect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

/// The load balancers in front of listeners with `proxyProtocol: true`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// Addresses and CIDR blocks whose headers are believed; such a listener closes connections
    /// from anywhere else (they could claim any client address).
    pub trusted_networks: Vec<String>,
    /// How long a connection may take to send its header (nginx's `proxy_protocol_timeout`).
    #[serde(default = "defaults::proxy_protocol_timeout_seconds")]
    pub header_timeout_seconds: u64,
}

/// Limits and timeouts of the web proxy. Every field is optional.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpConfig {
    /// From the first byte of a request head to its end: a slower client (slowloris) is cut off.
    pub header_read_timeout_seconds: u64,
    /// Largest request head; HTTP/1.1 clients get `431` past it, HTTP/2 a header-list limit.
    pub max_header_bytes: usize,
    /// The TLS handshake of an `https` listener.
    pub tls_handshake_timeout_seconds: u64,
    /// Connecting to a mailbox server's web port.
    pub upstream_connect_timeout_seconds: u64,
    /// From sending a request to the backend's response head (`504` past it). Zimbra's web
    /// client long-polls for minutes, hence the generous default.
    pub upstream_response_timeout_seconds: u64,
    /// How long a balanced backend that refused a connection is skipped.
    pub backend_down_seconds: u64,
    /// The longest a request or response body may stall (no byte moved) before the exchange is
    /// given up.
    pub body_idle_timeout_seconds: u64,
    /// The longest an upgraded connection (WebSocket) may carry nothing either way.
    pub tunnel_idle_timeout_seconds: u64,
    /// Extra CA certificates (PEM) trusted for the web backends' certificates, besides the
    /// system's, when the route table sets `webUpstreamTls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Plain `http` listeners answer every request with a permanent redirect to the same URL
    /// over https (Zimbra's `zimbraReverseProxyMailMode: redirect`).
    pub redirect_to_https: bool,
    /// The port the redirects name (443 when unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_https_port: Option<u16>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_seconds: 30,
            max_header_bytes: 64 * 1024,
            tls_handshake_timeout_seconds: 15,
            upstream_connect_timeout_seconds: 10,
            upstream_response_timeout_seconds: 600,
            backend_down_seconds: 10,
            body_idle_timeout_seconds: 300,
            tunnel_idle_timeout_seconds: 3600,
            upstream_ca_file: None,
            redirect_to_https: false,
            redirect_https_port: None,
        }
    }
}

/// Which client protocol a listener speaks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    Imap,
    Imaps,
    Pop3,
    Pop3s,
    Http,
    Https,
}

impl ListenerProtocol {
    /// Whether clients speak TLS from the first byte (not STARTTLS).
    pub fn implicit_tls(self) -> bool {
        matches!(
            self,
            ListenerProtocol::Imaps | ListenerProtocol::Pop3s | ListenerProtocol::Https
        )
    }
}

/// One listener: a protocol on an address (`[::]:143` for every address of both families, `0.0.0.0:143`, `192.0.2.7:993`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerConfig {
    pub protocol: ListenerProtocol,
    pub address: String,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from a load balancer in
    /// `proxyProtocol.trustedNetworks`, which gives the client's address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
}

/// Certificates, reloaded when their files change (Kubernetes rotates Secrets in place).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// The first is the default; others are chosen by SNI when a name matches.
    pub certificates: Vec<CertificateFiles>,
}

/// A PEM certificate chain and its private key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the route table comes from: exactly one of `file` and `configMap`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTableSource {
    /// A JSON file, watched (standalone proxies, or a mounted ConfigMap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// A ConfigMap watched through the Kubernetes API (pods of a ProxyPool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapRef>,
}

/// A ConfigMap by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapRef {
    pub namespace: String,
    pub name: String,
}

/// A [`RouteTableSource`] once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteTableLocation<'a> {
    File(&'a Path),
    ConfigMap(&'a ConfigMapRef),
}

impl RouteTableSource {
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            file: Some(path.into()),
            config_map: None,
        }
    }

    pub fn config_map(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            file: None,
            config_map: Some(ConfigMapRef {
                namespace: namespace.into(),
                name: name.into(),
            }),
        }
    }

    /// The one location given, or `None` when there are none or two.
    pub fn location(&self) -> Option<RouteTableLocation<'_>> {
        match (&self.file, &self.config_map) {
            (Some(path), None) => Some(RouteTableLocation::File(path)),
            (None, Some(configmap)) => Some(RouteTableLocation::ConfigMap(configmap)),
            _ => None,
        }
    }
}

/// Route Lookup Handler client settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LookupClientConfig {
    /// Extra CA certificates (PEM) to trust for https handlers, besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// File holding the shared secret sent in `X-Mailproxy-Lookup-Secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

/// Trust for TLS connections to mailbox servers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// Extra CA certificates (PEM) to trust, besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

mod defaults {
    pub fn health_listen() -> String {
        "[::]:8081".to_string()
    }
    pub fn shutdown_grace_seconds() -> u64 {
        300
    }
    pub fn max_connections() -> usize {
        100_000
    }
    pub fn proxy_protocol_timeout_seconds() -> u64 {
        30
    }
}

impl ProxyConfig {
    /// The networks whose PROXY protocol headers are believed (empty without a `proxyProtocol`
    /// block). An error says what is wrong with `proxyProtocol`, checked whenever the block is
    /// there or a listener expects a header.
    pub fn proxy_protocol_networks(&self) -> Result<Vec<IpBlock>, String> {
        let listener = self.listeners.iter().find(|l| l.proxy_protocol);
        if listener.is_none() && self.proxy_protocol.is_none() {
            return Ok(Vec::new());
        }
        let networks = self
            .proxy_protocol
            .as_ref()
            .map(|p| p.trusted_networks.as_slice())
            .unwrap_or_default();
        if let (Some(listener), true) = (listener, networks.is_empty()) {
            return Err(format!(
                "listener {} expects a PROXY protocol header, but proxyProtocol.trustedNetworks \
                 is empty: list the load balancers' addresses or CIDR blocks (0.0.0.0/0 and ::/0 \
                 believe any source, which lets every client claim any address)",
                listener.address
            ));
        }
        let timeout = self
            .proxy_protocol
            .as_ref()
            .map_or(1, |p| p.header_timeout_seconds);
        if timeout == 0 || timeout > MAX_SECONDS.unsigned_abs() {
            return Err(format!(
                "proxyProtocol.headerTimeoutSeconds is {timeout}: give it 1 to {MAX_SECONDS} \
                 seconds (the default is 30)"
            ));
        }
        networks
            .iter()
            .map(|entry| {
                IpBlock::parse_trimmed(entry.trim()).ok_or_else(|| {
                    format!(
                        "proxyProtocol.trustedNetworks entry {entry:?} is not an IP address or \
                         CIDR block: list addresses such as 192.0.2.7 and blocks such as \
                         10.0.0.0/8 or 2001:db8::/32"
                    )
                })
            })
            .collect()
    }

    /// Parses a configuration (YAML or JSON) and checks what the types cannot say.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ProxyConfigError> {
        let config: ProxyConfig =
            serde_norway::from_str(text).map_err(|source| ProxyConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        let invalid = |message: String| ProxyConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if config.route_table.location().is_none() {
            return Err(invalid(
                "routeTable needs exactly one of `file: <path>` and `configMap: {namespace, name}`"
                    .into(),
            ));
        }
        if config.listeners.is_empty() {
            return Err(invalid(
                "no listeners: add at least one under `listeners`".into(),
            ));
        }
        let tls_listener = config.listeners.iter().find(|l| l.protocol.implicit_tls());
        let has_certificates = config
            .tls
            .as_ref()
            .is_some_and(|tls| !tls.certificates.is_empty());
        if let (Some(listener), false) = (tls_listener, has_certificates) {
            return Err(invalid(format!(
                "listener {} ({:?}) needs a certificate: add tls.certificates",
                listener.address, listener.protocol
            )));
        }
        let http = &config.http;
        for (name, value, min) in [
            ("shutdownDelaySeconds", config.shutdown_delay_seconds, 0),
            ("shutdownGraceSeconds", config.shutdown_grace_seconds, 0),
            (
                "http.headerReadTimeoutSeconds",
                http.header_read_timeout_seconds,
                1,
            ),
            (
                "http.tlsHandshakeTimeoutSeconds",
                http.tls_handshake_timeout_seconds,
                1,
            ),
            (
                "http.upstreamConnectTimeoutSeconds",
                http.upstream_connect_timeout_seconds,
                1,
            ),
            (
                "http.upstreamResponseTimeoutSeconds",
                http.upstream_response_timeout_seconds,
                1,
            ),
            ("http.backendDownSeconds", http.backend_down_seconds, 0),
            (
                "http.bodyIdleTimeoutSeconds",
                http.body_idle_timeout_seconds,
                1,
            ),
            (
                "http.tunnelIdleTimeoutSeconds",
                http.tunnel_idle_timeout_seconds,
                1,
            ),
        ] {
            if value < min {
                return Err(invalid(format!(
                    "{name} is 0, which would time every request out: give it at least 1"
                )));
            }
            if value > MAX_SECONDS.unsigned_abs() {
                return Err(invalid(format!(
                    "{name} is {value}: give it at most {MAX_SECONDS} seconds (30 days)"
                )));
            }
        }
        if http
            .upstream_ca_file
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(invalid(
                "http.upstreamCaFile is empty: give the path of a PEM file of CA certificates, \
                 or leave it out to trust only the system's CAs"
                    .into(),
            ));
        }
        if http.redirect_https_port == Some(0) {
            return Err(invalid(
                "http.redirectHttpsPort is 0: give the port clients reach https on, or leave it \
                 out for 443"
                    .into(),
            ));
        }
        if http.max_header_bytes < 1024 {
            return Err(invalid(format!(
                "http.maxHeaderBytes is {}: no browser request head fits; give it at least 1024 \
                 (the default is 65536)",
                http.max_header_bytes
            )));
        }
        config.proxy_protocol_networks().map_err(invalid)?;
        let mut addresses: Vec<&str> = config
            .listeners
            .iter()
            .map(|l| l.address.as_str())
            .collect();
        addresses.sort_unstable();
        if let Some(pair) = addresses.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(invalid(format!("two listeners on {}", pair[0])));
        }
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ProxyConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProxyConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The canonical YAML form (what the operator writes).
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a proxy configuration serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProxyConfig, ProxyConfigError> {
        ProxyConfig::parse(text, Path::new("config.yaml"))
    }

    #[test]
    fn proxy_protocol_needs_trusted_networks_that_parse() {
        let with = |listener: &str, block: &str| {
            parse(&format!(
                "listeners:\n- {{protocol: imap, address: '[::]:143'{listener}}}\n\
                 routeTable: {{file: /routes.json}}\n{block}"
            ))
        };
        let refused = |result: Result<ProxyConfig, ProxyConfigError>, expected: &str| {
            let error = result.unwrap_err().to_string();
            assert!(error.contains(expected), "{expected:?} not in {error}");
        };
        refused(
            with(", proxyProtocol: true", ""),
            "trustedNetworks is empty",
        );
        refused(
            with(
                ", proxyProtocol: true",
                "proxyProtocol: {trustedNetworks: []}\n",
            ),
            "trustedNetworks is empty",
        );
        // Checked even when no listener uses it yet.
        refused(
            with("", "proxyProtocol: {trustedNetworks: [10.0.0.0/33]}\n"),
            "\"10.0.0.0/33\" is not an IP address or CIDR block",
        );
        refused(
            with(
                ", proxyProtocol: true",
                "proxyProtocol: {trustedNetworks: [10.0.0.0/8], headerTimeoutSeconds: 0}\n",
            ),
            "headerTimeoutSeconds is 0",
        );
        let config = with(
            ", proxyProtocol: true",
            "proxyProtocol: {trustedNetworks: [10.0.0.0/8, '2001:db8::1']}\n",
        )
        .unwrap();
        assert!(config.listeners[0].proxy_protocol);
        assert_eq!(
            config
                .proxy_protocol
                .as_ref()
                .unwrap()
                .header_timeout_seconds,
            30
        );
        assert_eq!(config.proxy_protocol_networks().unwrap().len(), 2);
        assert!(
            with("", "")
                .unwrap()
                .proxy_protocol_networks()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_standalone_configuration_parses_with_defaults() {
        let config = parse(
            "listeners:\n\
             - {protocol: imap, address: '127.0.0.1:1143'}\n\
             - {protocol: pop3s, address: '127.0.0.1:1995'}\n\
             tls:\n  certificates: [{cert: /tls/tls.crt, key: /tls/tls.key}]\n\
             routeTable: {file: /etc/mailproxy/routes.json}\n",
        )
        .unwrap();
        assert_eq!(config.listeners.len(), 2);
        assert_eq!(config.health_listen, "[::]:8081");
        assert_eq!(config.shutdown_grace_seconds, 300);
        assert_eq!(
            config.route_table,
            RouteTableSource::file("/etc/mailproxy/routes.json")
        );
        assert_eq!(parse(&config.to_yaml()).unwrap(), config);
    }

    #[test]
    fn http_limits_have_defaults_and_refuse_what_cannot_work() {
        let base = "listeners: [{protocol: http, address: ':80'}]\nrouteTable: {file: r}\n";
        assert_eq!(parse(base).unwrap().http, HttpConfig::default());
        let tuned = parse(&format!(
            "{base}http: {{headerReadTimeoutSeconds: 5, upstreamResponseTimeoutSeconds: 120}}\n"
        ))
        .unwrap();
        assert_eq!(tuned.http.header_read_timeout_seconds, 5);
        assert_eq!(tuned.http.upstream_response_timeout_seconds, 120);
        assert_eq!(tuned.http.max_header_bytes, 64 * 1024);
        assert_eq!(parse(&tuned.to_yaml()).unwrap(), tuned);
        let zero = parse(&format!(
            "{base}http: {{upstreamConnectTimeoutSeconds: 0}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            zero.contains("http.upstreamConnectTimeoutSeconds is 0"),
            "{zero}"
        );
        let idle = parse(&format!("{base}http: {{tunnelIdleTimeoutSeconds: 0}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            idle.contains("http.tunnelIdleTimeoutSeconds is 0"),
            "{idle}"
        );
        let redirect = parse(&format!(
            "{base}http: {{redirectToHttps: true, redirectHttpsPort: 8443}}\n"
        ))
        .unwrap();
        assert!(redirect.http.redirect_to_https);
        assert_eq!(redirect.http.redirect_https_port, Some(8443));
        assert_eq!(parse(&redirect.to_yaml()).unwrap(), redirect);
        let port = parse(&format!("{base}http: {{redirectHttpsPort: 0}}\n"))
            .unwrap_err()
            .to_string();
        assert!(port.contains("http.redirectHttpsPort is 0"), "{port}");
        let tiny = parse(&format!("{base}http: {{maxHeaderBytes: 100}}\n"))
            .unwrap_err()
            .to_string();
        assert!(tiny.contains("http.maxHeaderBytes is 100"), "{tiny}");
        let forever = parse(&format!(
            "{base}http: {{backendDownSeconds: 18446744073709551615}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            forever.contains(
                "http.backendDownSeconds is 18446744073709551615: give it at most 2592000"
            ),
            "{forever}"
        );
    }

    #[test]
    fn the_web_backends_ca_file_is_optional_and_never_empty() {
        let base = "listeners: [{protocol: http, address: ':80'}]\nrouteTable: {file: r}\n";
        assert_eq!(parse(base).unwrap().http.upstream_ca_file, None);
        let with = parse(&format!(
            "{base}http: {{upstreamCaFile: /etc/mailproxy/web-ca.pem}}\n"
        ))
        .unwrap();
        assert_eq!(
            with.http.upstream_ca_file.as_deref(),
            Some(Path::new("/etc/mailproxy/web-ca.pem"))
        );
        assert_eq!(parse(&with.to_yaml()).unwrap(), with);
        let empty = parse(&format!("{base}http: {{upstreamCaFile: ''}}\n"))
            .unwrap_err()
            .to_string();
        assert!(empty.contains("http.upstreamCaFile is empty"), "{empty}");
    }

    #[test]
    fn json_works_too() {
        let config = parse(
            r#"{"listeners": [{"protocol": "http", "address": "0.0.0.0:80"}],
                "routeTable": {"configMap": {"namespace": "mail", "name": "main-routes"}}}"#,
        )
        .unwrap();
        assert_eq!(
            config.route_table,
            RouteTableSource::config_map("mail", "main-routes")
        );
    }

    #[test]
    fn mistakes_are_named() {
        let error = |text: &str| parse(text).unwrap_err().to_string();
        let no_cert = error(
            "listeners: [{protocol: imaps, address: '0.0.0.0:993'}]\nrouteTable: {file: r}\n",
        );
        assert!(no_cert.contains("needs a certificate"), "{no_cert}");
        let twice = error(
            "listeners: [{protocol: imap, address: ':1'}, {protocol: pop3, address: ':1'}]\nrouteTable: {file: r}\n",
        );
        assert!(twice.contains("two listeners on :1"), "{twice}");
        let typo = error("listeners: []\nroutetable: {}\n");
        assert!(
            typo.contains("not a valid mailproxy configuration"),
            "{typo}"
        );
        let both = error(
            "listeners: [{protocol: imap, address: ':1'}]\nrouteTable: {file: r, configMap: {namespace: a, name: b}}\n",
        );
        assert!(both.contains("exactly one"), "{both}");
        let empty = error("listeners: []\nrouteTable: {file: r}\n");
        assert!(empty.contains("no listeners"), "{empty}");
    }
}
