//! The proxies' configuration file, `<pool>-config` (key `config.json`), mounted at
//! `/etc/mailproxy/config.json`. It holds what needs a restart to change (listeners, TLS); the
//! route table (hot-reloaded) is only referenced, by ConfigMap name.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use mailproxy_crds::ProxyPoolSpec;
use serde::Serialize;

use super::Pool;
use crate::labels::{Component, names};

pub const CONFIG_DIR: &str = "/etc/mailproxy";
pub const CONFIG_KEY: &str = "config.json";
pub const CONFIG_FILE: &str = "/etc/mailproxy/config.json";
pub const TLS_DIR: &str = "/etc/mailproxy/tls";
/// The proxy's health port: `/healthz` (liveness) and `/readyz` (readiness).
pub const HEALTH_PORT: i32 = 8081;
/// Environment variable carrying the lookup shared secret (from `spec.lookup.secretRef`).
pub const LOOKUP_SECRET_ENV: &str = "MAILPROXY_LOOKUP_SECRET";

/// `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    pub listeners: Vec<ListenerConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    pub health: HealthConfig,
    pub route_table: RouteTableSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup_secret: Option<EnvSource>,
}

/// One client-facing listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerConfig {
    /// imap, imaps, pop3, pop3s, http, https (also the container port name).
    pub name: &'static str,
    /// imap, pop3 or http.
    pub protocol: &'static str,
    pub port: i32,
    /// Implicit TLS from the first byte (IMAPS, POP3S, HTTPS).
    pub tls: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsConfig {
    pub certificate_file: String,
    pub key_file: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthConfig {
    pub port: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTableSource {
    pub config_map: ConfigMapRef,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigMapRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EnvSource {
    pub env: &'static str,
}

/// The enabled listeners: TLS listeners only when the pool has a certificate.
pub fn listeners(spec: &ProxyPoolSpec) -> Vec<ListenerConfig> {
    let l = &spec.listeners;
    let has_tls = spec.tls.is_some();
    [
        ("imap", "imap", &l.imap, false),
        ("imaps", "imap", &l.imaps, true),
        ("pop3", "pop3", &l.pop3, false),
        ("pop3s", "pop3", &l.pop3s, true),
        ("http", "http", &l.http, false),
        ("https", "http", &l.https, true),
    ]
    .into_iter()
    .filter(|(_, _, listener, tls)| listener.enabled && (!tls || has_tls))
    .map(|(name, protocol, listener, tls)| ListenerConfig {
        name,
        protocol,
        port: listener.port,
        tls,
    })
    .collect()
}

pub fn proxy_config(pool: &Pool<'_>) -> ProxyConfig {
    ProxyConfig {
        listeners: listeners(pool.spec),
        tls: pool.spec.tls.as_ref().map(|_| TlsConfig {
            certificate_file: format!("{TLS_DIR}/tls.crt"),
            key_file: format!("{TLS_DIR}/tls.key"),
        }),
        health: HealthConfig { port: HEALTH_PORT },
        route_table: RouteTableSource {
            config_map: ConfigMapRef {
                namespace: pool.namespace.to_string(),
                name: names::routes(pool.name),
            },
        },
        lookup_secret: pool
            .spec
            .lookup
            .secret_ref
            .as_ref()
            .map(|_| EnvSource {
                env: LOOKUP_SECRET_ENV,
            }),
    }
}

/// The canonical text of `config.json`.
pub fn to_json(config: &ProxyConfig) -> String {
    serde_json::to_string_pretty(config).expect("the proxy config serializes")
}

pub fn config_map(pool: &Pool<'_>, config: &ProxyConfig) -> ConfigMap {
    ConfigMap {
        metadata: pool.child_meta(names::config(pool.name), Component::Proxy),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), to_json(config))])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pool, spec};
    use super::*;
    use serde_json::json;

    #[test]
    fn config_lists_enabled_listeners_and_references_the_route_table() {
        let spec = spec(json!({"listeners": {"pop3": {"enabled": false, "port": 110}}}));
        let pool = pool(&spec);
        let config = proxy_config(&pool);
        let names: Vec<&str> = config.listeners.iter().map(|l| l.name).collect();
        // No certificate: the TLS listeners are not served.
        assert_eq!(names, ["imap", "http"]);
        let value: serde_json::Value = serde_json::from_str(&to_json(&config)).unwrap();
        assert_eq!(
            value["routeTable"],
            json!({"configMap": {"namespace": "mail", "name": "main-routes"}})
        );
        assert_eq!(value["health"], json!({"port": 8081}));
        assert!(value.get("tls").is_none());
        assert!(value.get("lookupSecret").is_none());
        let map = config_map(&pool, &config);
        assert_eq!(map.metadata.name.as_deref(), Some("main-config"));
        assert!(map.data.unwrap().contains_key("config.json"));
    }

    #[test]
    fn tls_adds_the_implicit_tls_listeners_and_the_mounted_files() {
        let spec = spec(json!({"tls": {"secretName": "cert"},
                               "lookup": {"secretRef": {"name": "s", "key": "k"}}}));
        let config = proxy_config(&pool(&spec));
        let names: Vec<&str> = config.listeners.iter().map(|l| l.name).collect();
        assert_eq!(names, ["imap", "imaps", "pop3", "pop3s", "http", "https"]);
        assert!(config.listeners.iter().find(|l| l.name == "imaps").unwrap().tls);
        assert_eq!(
            config.tls.unwrap().certificate_file,
            "/etc/mailproxy/tls/tls.crt"
        );
        assert_eq!(config.lookup_secret.unwrap().env, LOOKUP_SECRET_ENV);
    }
}
