//! The route table of a pool, compiled from the MailboxServers it selects, and its ConfigMap
//! `<pool>-routes` (key `routes.json`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use mailproxy_crds::route_table::{CONFIGMAP_KEY, RouteSettings, RouteTable, ServerSource};
use mailproxy_crds::{MailboxServer, ProxyPoolSpec};

use super::Pool;
use super::memcached::memcached_servers;
use crate::labels::{Component, names};

/// Annotation on the route-table ConfigMap with the table's content version.
pub const VERSION_ANNOTATION: &str = "mailproxy.io/route-table-version";

/// The address proxies connect to: the server's host, or its Service's cluster DNS name.
pub fn server_host(server: &MailboxServer, namespace: &str) -> Option<String> {
    match (&server.spec.host, &server.spec.service) {
        (Some(host), _) => Some(host.clone()),
        (None, Some(service)) => Some(format!("{service}.{namespace}.svc")),
        (None, None) => None,
    }
}

fn seconds(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// The pool-wide settings that travel with the table (hot-reloaded by the proxies).
pub fn route_settings(spec: &ProxyPoolSpec) -> RouteSettings {
    RouteSettings {
        cache_ttl_seconds: seconds(spec.route_cache.ttl_seconds),
        lookup_timeout_seconds: seconds(spec.lookup.timeout_seconds),
        handler_down_seconds: seconds(spec.lookup.handler_down_seconds),
        starttls: spec.starttls,
        login_limits: spec.login_limits.clone(),
        timeouts: spec.timeouts.clone(),
        web_upstream_tls: spec.web_upstream_tls,
    }
}

/// The table of the selected `servers`, but for those whose address no proxy can use (stored
/// before the CRD's rules; their own status says so): a proxy would fail on each of their
/// logins and lookups.
pub fn route_table(pool: &Pool<'_>, servers: &[MailboxServer]) -> RouteTable {
    let sources: Vec<ServerSource<'_>> = servers
        .iter()
        .filter(|server| server.spec.address_problem().is_none())
        .filter_map(|server| {
            Some(ServerSource {
                name: server.metadata.name.as_deref()?,
                host: server_host(server, pool.namespace)?,
                spec: &server.spec,
            })
        })
        .collect();
    RouteTable::compile(&sources, route_settings(pool.spec), memcached_servers(pool))
}

/// The table the running proxies have (`current`) with the servers of `built` (servers,
/// accounts, domains and the addresses made from them): what a pool waiting for a Secret still
/// sends them, so that drains and new servers take effect. Its settings and memcached servers
/// stay: a spec change may depend on the missing Secret (`starttls: only` on a certificate) or
/// on children not made yet (new memcached pods). `None` when `current` holds no readable table.
pub fn with_servers_of(current: &ConfigMap, built: RouteTable) -> Option<RouteTable> {
    let running = RouteTable::from_configmap(current).ok()?;
    Some(RouteTable {
        settings: running.settings,
        memcached_servers: running.memcached_servers,
        ..built
    })
}

pub fn config_map(pool: &Pool<'_>, table: &RouteTable) -> ConfigMap {
    let mut metadata = pool.child_meta(names::routes(pool.name), Component::Routes);
    metadata.annotations = Some(BTreeMap::from([(
        VERSION_ANNOTATION.to_string(),
        table.version(),
    )]));
    ConfigMap {
        metadata,
        data: Some(BTreeMap::from([(
            CONFIGMAP_KEY.to_string(),
            table.to_json(),
        )])),
        ..ConfigMap::default()
    }
}

/// The most a ConfigMap's data values may hold together (the keys do not count): the API server
/// refuses a larger one.
pub const CONFIGMAP_DATA_LIMIT: usize = 1024 * 1024;

/// Why the table's ConfigMap cannot be written, when it would pass [`CONFIGMAP_DATA_LIMIT`].
/// Said before the API server would refuse it, with what makes the table large and what to do.
pub fn too_large(routes: &ConfigMap, table: &RouteTable) -> Option<String> {
    let size: usize = routes
        .data
        .iter()
        .flatten()
        .map(|(_, value)| value.len())
        .sum();
    (size > CONFIGMAP_DATA_LIMIT).then(|| {
        format!(
            "the route table would be {size} bytes (MailboxServers: {}, pinned accounts: {}, \
             domains: {}), over the {CONFIGMAP_DATA_LIMIT} bytes a ConfigMap holds; the proxies keep \
             the table they have. Pin fewer accounts in the MailboxServers' spec.accounts (a \
             lookup handler routes the others), or split the servers between pools with \
             narrower mailboxSelectors",
            table.servers.len(),
            table.accounts.len(),
            table.domains.len()
        )
    })
}

/// Whether `current` already holds exactly what `desired` would write (then it is not written).
pub fn up_to_date(current: Option<&ConfigMap>, desired: &ConfigMap) -> bool {
    let Some(current) = current else {
        return false;
    };
    let owned = current.metadata.owner_references == desired.metadata.owner_references;
    let version = |cm: &ConfigMap| {
        cm.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(VERSION_ANNOTATION).cloned())
    };
    let labelled = desired
        .metadata
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| current.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    owned && labelled && version(current) == version(desired) && current.data == desired.data
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pool, server, spec};
    use super::*;
    use mailproxy_crds::settings::StartTlsMode;
    use serde_json::json;

    #[test]
    fn compiles_selected_servers_with_the_pool_settings_and_memcached() {
        let spec = spec(json!({
            "routeCache": {"ttlSeconds": 120},
            "lookup": {"timeoutSeconds": 3, "handlerDownSeconds": 30},
            "starttls": "off",
            "loginLimits": {"ipLimit": 100},
            "timeouts": {"idleSeconds": 600},
            "memcached": {"replicas": 1}
        }));
        let pool = pool(&spec);
        let servers = [
            server(
                "ext",
                json!({"host": "10.0.0.9", "accounts": ["Bob@Example.com"]}),
            ),
            server(
                "int",
                json!({"service": "dovecot", "domains": ["example.org"]}),
            ),
            // Stored before the CRD's rule for spec.host: left out.
            server(
                "stored",
                json!({"host": "mbs2:7072", "domains": ["example.net"]}),
            ),
        ];
        let table = route_table(&pool, &servers);
        assert_eq!(table.servers.len(), 2);
        assert_eq!(table.pinned_domain("example.net"), None);
        assert_eq!(table.servers["ext"].host, "10.0.0.9");
        assert_eq!(table.servers["int"].host, "dovecot.mail.svc");
        assert_eq!(table.pinned_account("bob@example.com").unwrap().0, "ext");
        assert_eq!(table.pinned_domain("example.org").unwrap().0, "int");
        assert_eq!(table.settings.cache_ttl_seconds, 120);
        assert_eq!(table.settings.lookup_timeout_seconds, 3);
        assert_eq!(table.settings.handler_down_seconds, 30);
        assert_eq!(table.settings.starttls, StartTlsMode::Off);
        assert_eq!(table.settings.login_limits.ip_limit, 100);
        assert_eq!(table.settings.timeouts.idle_seconds, 600);
        assert!(!table.settings.web_upstream_tls);
        assert_eq!(
            table.gamcs(),
            "main-memcached-0.main-memcached.mail.svc:11211 "
        );
    }

    #[test]
    fn web_upstream_tls_travels_to_the_table_with_the_https_ports() {
        let spec = spec(json!({"webUpstreamTls": true}));
        let pool = pool(&spec);
        let servers = [server(
            "mbs",
            json!({"host": "10.0.0.9", "ports": {"http": 8080, "https": 9443}}),
        )];
        let table = route_table(&pool, &servers);
        assert!(table.settings.web_upstream_tls);
        assert_eq!(table.web_backends, vec!["10.0.0.9:9443".to_string()]);
    }

    #[test]
    fn config_map_carries_the_table_and_its_version_and_is_rewritten_only_on_change() {
        let spec = spec(json!({}));
        let pool = pool(&spec);
        let one = [server(
            "a",
            json!({"host": "h", "accounts": ["x@example.com"]}),
        )];
        let table = route_table(&pool, &one);
        let cm = config_map(&pool, &table);
        assert_eq!(cm.metadata.name.as_deref(), Some("main-routes"));
        assert_eq!(
            cm.metadata.annotations.as_ref().unwrap()[VERSION_ANNOTATION],
            table.version()
        );
        let parsed = RouteTable::from_json(&cm.data.as_ref().unwrap()[CONFIGMAP_KEY]).unwrap();
        assert_eq!(parsed, table);

        assert!(!up_to_date(None, &cm));
        assert!(up_to_date(Some(&cm), &cm.clone()));
        let mut drained = one.clone();
        drained[0].spec.drain = true;
        let changed = config_map(&pool, &route_table(&pool, &drained));
        assert!(!up_to_date(Some(&cm), &changed));
        let mut edited = cm.clone();
        edited
            .data
            .as_mut()
            .unwrap()
            .insert(CONFIGMAP_KEY.into(), "{}".into());
        assert!(!up_to_date(Some(&edited), &cm));
    }

    #[test]
    fn a_table_over_the_configmap_limit_is_refused_with_what_makes_it_large() {
        let spec = spec(json!({}));
        let pool = pool(&spec);
        let accounts = |count: usize| -> Vec<String> {
            (0..count)
                .map(|n| {
                    format!("user-{n:05}@mail.a-rather-long-domain-name-for-this-test.example")
                })
                .collect()
        };
        let with = |count: usize| {
            let servers = [server(
                "mailbox-server-with-a-long-name",
                json!({"host": "10.0.0.9", "accounts": accounts(count)}),
            )];
            let table = route_table(&pool, &servers);
            (config_map(&pool, &table), table)
        };
        let (small, table) = with(1_000);
        assert_eq!(too_large(&small, &table), None);
        let (large, table) = with(10_000);
        let size = large.data.as_ref().unwrap()[CONFIGMAP_KEY].len();
        assert!(size > CONFIGMAP_DATA_LIMIT, "{size}");
        let message = too_large(&large, &table).unwrap();
        assert!(
            message.starts_with(&format!(
                "the route table would be {size} bytes (MailboxServers: 1, pinned accounts: \
                 10000, domains: 0)"
            )),
            "{message}"
        );
        assert!(message.contains("spec.accounts"), "{message}");
    }

    #[test]
    fn a_waiting_pool_sends_new_servers_with_the_running_settings() {
        let before = spec(json!({"memcached": {"replicas": 0}}));
        let running = route_table(&pool(&before), &[]);
        let current = config_map(&pool(&before), &running);
        let after = spec(json!({"starttls": "only", "memcached": {"replicas": 2}}));
        let server = MailboxServer::new(
            "new",
            serde_json::from_value(json!({"host": "10.0.0.9", "domains": ["new.example"]}))
                .unwrap(),
        );
        let built = route_table(&pool(&after), std::slice::from_ref(&server));
        assert_ne!(built.settings, running.settings);
        let sent = with_servers_of(&current, built).unwrap();
        assert!(sent.servers.contains_key("new"));
        assert_eq!(sent.domains["new.example"], "new");
        assert_eq!(sent.settings, running.settings);
        assert!(sent.memcached_servers.is_empty());
    }
}
