//! The route table: the static part of routing that the operator compiles from MailboxServers
//! and every proxy of a pool reads (from a ConfigMap, or from a file when standalone).
//!
//! It holds what Zimbra keeps in LDAP and publishes with zmprov: pinned accounts and domains,
//! the Route Lookup Handler URLs (garpu), web backends (garpb), MTA auth URLs (gamau) and
//! memcached servers (gamcs), plus the pool's protocol and timeout settings.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::ConfigMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mailbox_server::{MailUpstream, MailboxPorts, MailboxServerSpec};
use crate::settings::{BadWhitelist, LoginLimits, MAX_SECONDS, StartTlsMode, Timeouts};

/// Key of the route table in its ConfigMap.
pub const CONFIGMAP_KEY: &str = "routes.json";

/// Path of Zimbra's Route Lookup Handler on a mailbox server.
pub const LOOKUP_PATH: &str = "/service/extension/nginx-lookup";

/// Name of a pool's route-table ConfigMap.
pub fn configmap_name(pool: &str) -> String {
    format!("{pool}-routes")
}

/// Why a route table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RouteTableError {
    #[error("route table is not valid JSON for the route-table model: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("route table must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    #[error(
        "route table maps {kind} {key:?} to server {server:?}, which is not in its servers list"
    )]
    UnknownServer {
        kind: &'static str,
        key: String,
        server: String,
    },
    #[error(
        "route table setting {setting} is {value}: give it between {min} and {MAX_SECONDS} \
         seconds (30 days)"
    )]
    OutOfRange {
        setting: &'static str,
        value: i128,
        min: i64,
    },
    #[error("route table setting {0}")]
    Whitelist(#[from] BadWhitelist),
    #[error(
        "route table maps {kind} {key:?} to server {first:?} and to server {second:?} \
         (names compare case-insensitively)"
    )]
    ConflictingKeys {
        kind: &'static str,
        key: String,
        first: String,
        second: String,
    },
}

/// Why a ConfigMap holds no usable route table.
#[derive(Debug, thiserror::Error)]
pub enum ConfigMapTableError {
    #[error("ConfigMap {name} has no {CONFIGMAP_KEY} key: is it the pool's route-table ConfigMap?")]
    MissingKey { name: String },
    #[error("ConfigMap {name} key {CONFIGMAP_KEY} is invalid: {source}")]
    Invalid {
        name: String,
        source: RouteTableError,
    },
}

/// The static routing state of one ProxyPool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteTable {
    /// Mailbox servers by MailboxServer name.
    #[serde(default)]
    pub servers: BTreeMap<String, RouteServer>,
    /// Pinned accounts (lower-case) to server name.
    #[serde(default)]
    pub accounts: BTreeMap<String, String>,
    /// Domains (lower-case) to server name: the fallback when no lookup knows an account.
    #[serde(default)]
    pub domains: BTreeMap<String, String>,
    /// Route Lookup Handler URLs, used round-robin (zmprov garpu).
    #[serde(default)]
    pub lookup_handlers: Vec<String>,
    /// `host:port` of the web backends, balanced for unauthenticated requests (zmprov garpb).
    #[serde(default)]
    pub web_backends: Vec<String>,
    /// MTA auth URLs (zmprov gamau).
    #[serde(default)]
    pub mta_auth_urls: Vec<String>,
    /// `host:port` of the pool's memcached servers (zmprov gamcs); empty: embedded cache.
    #[serde(default)]
    pub memcached_servers: Vec<String>,
    #[serde(default)]
    pub settings: RouteSettings,
}

/// One mailbox server as the proxies see it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteServer {
    /// DNS name or IP address the proxies connect to.
    pub host: String,
    #[serde(default)]
    pub ports: MailboxPorts,
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub mail_upstream: MailUpstream,
}

/// Pool-wide proxy settings carried with the route table, so that they change without a restart.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteSettings {
    #[serde(default = "defaults::cache_ttl_seconds")]
    pub cache_ttl_seconds: u64,
    #[serde(default = "defaults::lookup_timeout_seconds")]
    pub lookup_timeout_seconds: u64,
    #[serde(default = "defaults::handler_down_seconds")]
    pub handler_down_seconds: u64,
    #[serde(default)]
    pub starttls: StartTlsMode,
    #[serde(default)]
    pub login_limits: LoginLimits,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Connect to the web backends over TLS: account routes are looked up and cached as
    /// `httpssl` and point at the servers' https ports, and `webBackends` list the https ports
    /// (Zimbra's `zimbraReverseProxySSLToUpstreamEnabled`).
    #[serde(default)]
    pub web_upstream_tls: bool,
}

impl RouteSettings {
    /// Every duration within `min..=MAX_SECONDS`: the proxies add them to their clock.
    fn check_ranges(&self) -> Result<(), RouteTableError> {
        let limits = &self.login_limits;
        let timeouts = &self.timeouts;
        for (setting, value, min) in [
            ("cacheTtlSeconds", i128::from(self.cache_ttl_seconds), 0),
            (
                "lookupTimeoutSeconds",
                i128::from(self.lookup_timeout_seconds),
                1,
            ),
            (
                "handlerDownSeconds",
                i128::from(self.handler_down_seconds),
                0,
            ),
            (
                "loginLimits.ipWindowSeconds",
                i128::from(limits.ip_window_seconds),
                1,
            ),
            (
                "loginLimits.userWindowSeconds",
                i128::from(limits.user_window_seconds),
                1,
            ),
            (
                "timeouts.preLoginSeconds",
                i128::from(timeouts.pre_login_seconds),
                1,
            ),
            ("timeouts.idleSeconds", i128::from(timeouts.idle_seconds), 1),
            (
                "timeouts.upstreamConnectSeconds",
                i128::from(timeouts.upstream_connect_seconds),
                1,
            ),
        ] {
            if !(i128::from(min)..=i128::from(MAX_SECONDS)).contains(&value) {
                return Err(RouteTableError::OutOfRange {
                    setting,
                    value,
                    min,
                });
            }
        }
        Ok(())
    }
}

impl Default for RouteSettings {
    fn default() -> Self {
        Self {
            cache_ttl_seconds: defaults::cache_ttl_seconds(),
            lookup_timeout_seconds: defaults::lookup_timeout_seconds(),
            handler_down_seconds: defaults::handler_down_seconds(),
            starttls: StartTlsMode::default(),
            login_limits: LoginLimits::default(),
            timeouts: Timeouts::default(),
            web_upstream_tls: false,
        }
    }
}

mod defaults {
    pub fn cache_ttl_seconds() -> u64 {
        3600
    }
    pub fn lookup_timeout_seconds() -> u64 {
        15
    }
    pub fn handler_down_seconds() -> u64 {
        60
    }
}

/// A MailboxServer with the address the operator resolved for it (its host, or its Service's
/// cluster DNS name).
#[derive(Clone, Debug)]
pub struct ServerSource<'a> {
    pub name: &'a str,
    pub host: String,
    pub spec: &'a MailboxServerSpec,
}

impl RouteTable {
    /// The table a pool's route-table ConfigMap carries (under [`CONFIGMAP_KEY`]).
    pub fn from_configmap(configmap: &ConfigMap) -> Result<Self, ConfigMapTableError> {
        let name = configmap.metadata.name.clone().unwrap_or_default();
        let text = configmap
            .data
            .as_ref()
            .and_then(|data| data.get(CONFIGMAP_KEY))
            .ok_or_else(|| ConfigMapTableError::MissingKey { name: name.clone() })?;
        Self::from_json(text).map_err(|source| ConfigMapTableError::Invalid { name, source })
    }

    /// Compiles the table from the MailboxServers a pool selects. Draining servers stay in
    /// `servers` (sessions may still be relayed to them) and keep their pinned accounts, whose
    /// mailboxes are there (a proxy answers their logins as unavailable rather than routing them
    /// elsewhere), but get no domains, no lookups and no web traffic. When two servers claim the
    /// same account or domain, the first by name wins, so the result does not depend on list
    /// order. Web backends are listed with their https port when the settings ask for TLS to
    /// them, else their http port (as garpb).
    pub fn compile(
        servers: &[ServerSource<'_>],
        settings: RouteSettings,
        memcached_servers: Vec<String>,
    ) -> Self {
        let mut ordered: Vec<&ServerSource<'_>> = servers.iter().collect();
        ordered.sort_by(|a, b| a.name.cmp(b.name));
        let mut table = RouteTable {
            settings,
            memcached_servers,
            ..RouteTable::default()
        };
        for source in ordered {
            let spec = source.spec;
            table.servers.insert(
                source.name.to_string(),
                RouteServer {
                    host: source.host.clone(),
                    ports: spec.ports.clone(),
                    draining: spec.drain,
                    mail_upstream: spec.mail_upstream.clone(),
                },
            );
            for account in &spec.accounts {
                table
                    .accounts
                    .entry(account.to_ascii_lowercase())
                    .or_insert_with(|| source.name.to_string());
            }
            if spec.drain {
                continue;
            }
            for domain in &spec.domains {
                table
                    .domains
                    .entry(domain.to_ascii_lowercase())
                    .or_insert_with(|| source.name.to_string());
            }
            let host = bracket_ipv6(&source.host);
            if spec.lookup_target {
                table.lookup_handlers.push(format!(
                    "{}://{host}:{}{LOOKUP_PATH}",
                    spec.lookup_scheme.as_str(),
                    spec.ports.lookup
                ));
            }
            if spec.web_backend {
                let port = if table.settings.web_upstream_tls {
                    spec.ports.https
                } else {
                    spec.ports.http
                };
                table.web_backends.push(format!("{host}:{port}"));
            }
            if spec.mta_auth_target {
                table.mta_auth_urls.push(format!(
                    "https://{host}:{}/service/admin/soap/",
                    spec.ports.mta_auth
                ));
            }
        }
        table
    }

    /// Parses a table and checks that every pinned entry names a known server and that every
    /// setting is one a proxy can apply. Pinned account and domain names are lower-cased, as
    /// [`RouteTable::compile`] writes them and the lookups compare them.
    pub fn from_json(text: &str) -> Result<Self, RouteTableError> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        let kind = match &value {
            serde_json::Value::Object(_) => None,
            serde_json::Value::Array(_) => Some("an array"),
            serde_json::Value::String(_) => Some("a string"),
            serde_json::Value::Number(_) => Some("a number"),
            serde_json::Value::Bool(_) => Some("a boolean"),
            serde_json::Value::Null => Some("null"),
        };
        if let Some(kind) = kind {
            return Err(RouteTableError::NotAnObject(kind));
        }
        let mut table: RouteTable = serde_json::from_value(value)?;
        table.accounts = lower_case_keys("account", std::mem::take(&mut table.accounts))?;
        table.domains = lower_case_keys("domain", std::mem::take(&mut table.domains))?;
        table.settings.check_ranges()?;
        table.settings.login_limits.whitelist_blocks()?;
        for (kind, map) in [("account", &table.accounts), ("domain", &table.domains)] {
            for (key, server) in map {
                if !table.servers.contains_key(server) {
                    return Err(RouteTableError::UnknownServer {
                        kind,
                        key: key.clone(),
                        server: server.clone(),
                    });
                }
            }
        }
        Ok(table)
    }

    /// The canonical serialized form (what the operator writes to the ConfigMap).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("route table serializes")
    }

    /// A short content hash: equal tables have equal versions, so the operator writes the
    /// ConfigMap only when the content changes and the status shows which table is live.
    pub fn version(&self) -> String {
        let digest = Sha256::digest(self.to_json().as_bytes());
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The server an account is pinned to (names compare case-insensitively), draining or not:
    /// the account's mailbox is there, so a drain makes it unavailable, not routed elsewhere.
    pub fn pinned_account(&self, account: &str) -> Option<(&str, &RouteServer)> {
        let name = self.accounts.get(&account.to_ascii_lowercase())?;
        let (name, server) = self.servers.get_key_value(name)?;
        Some((name.as_str(), server))
    }

    /// The server a domain falls back to; none while that server drains.
    pub fn pinned_domain(&self, domain: &str) -> Option<(&str, &RouteServer)> {
        self.serving(self.domains.get(&domain.to_ascii_lowercase())?)
    }

    fn serving(&self, name: &str) -> Option<(&str, &RouteServer)> {
        let (name, server) = self.servers.get_key_value(name)?;
        (!server.draining).then_some((name.as_str(), server))
    }

    /// zmprov garpu: the lookup handlers on one line, as `host:port/path` (Zimbra prints no
    /// scheme: "don't need proto for nginx.conf").
    pub fn garpu(&self) -> String {
        zmprov_line(self.lookup_handlers.iter().map(|url| {
            url.split_once("://")
                .map_or(url.as_str(), |(_, without)| without)
        }))
    }

    /// zmprov garpb: an nginx `server` line per web backend.
    pub fn garpb(&self) -> String {
        if self.web_backends.is_empty() {
            return "    server localhost:8080;\n".to_string();
        }
        self.web_backends
            .iter()
            .map(|backend| format!("    server {backend};\n"))
            .collect()
    }

    /// zmprov gamau: the MTA auth URLs on one line.
    pub fn gamau(&self) -> String {
        zmprov_line(self.mta_auth_urls.iter().map(String::as_str))
    }

    /// zmprov gamcs: the memcached servers on one line.
    pub fn gamcs(&self) -> String {
        zmprov_line(self.memcached_servers.iter().map(String::as_str))
    }
}

/// A hand-written table may spell a name in any case; two spellings of one name must agree.
fn lower_case_keys(
    kind: &'static str,
    map: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, RouteTableError> {
    let mut lowered = BTreeMap::new();
    for (key, server) in map {
        match lowered.entry(key.to_ascii_lowercase()) {
            Entry::Vacant(entry) => {
                entry.insert(server);
            }
            Entry::Occupied(entry) if *entry.get() != server => {
                return Err(RouteTableError::ConflictingKeys {
                    kind,
                    key: entry.key().clone(),
                    first: entry.get().clone(),
                    second: server,
                });
            }
            Entry::Occupied(_) => {}
        }
    }
    Ok(lowered)
}

/// A zmprov one-line answer: each entry followed by a space, as ProvUtil prints them (scripts
/// that split or paste the line see the same bytes).
fn zmprov_line<'a>(entries: impl Iterator<Item = &'a str>) -> String {
    entries.map(|entry| format!("{entry} ")).collect()
}

/// A host name or IPv4 address as the proxies take it in routes, handler URLs and memcached
/// addresses: ASCII letters, digits, '.', '-' and '_', at most 253 bytes. Looser than the CRD's
/// rule for a MailboxServer's `spec.host` (a lower-case DNS-1123 subdomain): Zimbra's server
/// names and MailboxServers stored before that rule may have upper case or '_'.
///
/// A name whose last label is a number is an IPv4 address in its dotted-decimal form
/// (`10.0.0.1`) or refused (`010.0.0.1`, `10.1`, `0x7f`): no top-level domain is a number, and
/// the system resolver reads such a name as an IPv4 address in the old BSD forms, octal and hex
/// included, so `010.0.0.1` would reach 8.0.0.1.
pub fn is_host_name(host: &str) -> bool {
    if host.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let last_label = host.rsplit('.').next().unwrap_or_default();
    let numeric = !last_label.is_empty()
        && (last_label.bytes().all(|b| b.is_ascii_digit())
            || last_label
                .get(..2)
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case("0x"))
                && last_label[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    !host.is_empty()
        && host.len() <= 253
        && !numeric
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// IPv6 literals need brackets in `host:port` and URLs.
fn bracket_ipv6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox_server::LookupScheme;

    fn spec(accounts: &[&str], domains: &[&str]) -> MailboxServerSpec {
        serde_json::from_value(serde_json::json!({
            "host": "unused",
            "accounts": accounts,
            "domains": domains,
        }))
        .unwrap()
    }

    fn source<'a>(name: &'a str, host: &str, spec: &'a MailboxServerSpec) -> ServerSource<'a> {
        ServerSource {
            name,
            host: host.to_string(),
            spec,
        }
    }

    #[test]
    fn compile_pins_accounts_and_domains_and_lists_zmprov_urls() {
        let a = spec(&["Alice@Example.com"], &["example.com"]);
        let mut b = spec(&["bob@example.org"], &["example.org"]);
        b.lookup_scheme = LookupScheme::Https;
        b.mta_auth_target = true;
        let table = RouteTable::compile(
            &[
                source("mbs-b", "10.0.0.2", &b),
                source("mbs-a", "mbs-a.mail.svc", &a),
            ],
            RouteSettings::default(),
            vec!["pool-memcached-0.pool-memcached:11211".into()],
        );
        assert_eq!(
            table.pinned_account("alice@example.COM").unwrap().0,
            "mbs-a"
        );
        assert_eq!(table.pinned_domain("example.org").unwrap().0, "mbs-b");
        assert_eq!(
            table.garpu(),
            "mbs-a.mail.svc:7072/service/extension/nginx-lookup 10.0.0.2:7072/service/extension/nginx-lookup "
        );
        assert_eq!(
            table.lookup_handlers[1], "https://10.0.0.2:7072/service/extension/nginx-lookup",
            "the proxies' own URLs keep their scheme"
        );
        assert_eq!(
            table.garpb(),
            "    server mbs-a.mail.svc:8080;\n    server 10.0.0.2:8080;\n"
        );
        assert_eq!(table.gamau(), "https://10.0.0.2:7073/service/admin/soap/ ");
        assert_eq!(table.gamcs(), "pool-memcached-0.pool-memcached:11211 ");
    }

    #[test]
    fn web_upstream_tls_lists_the_https_ports_and_travels_in_the_json() {
        let a = spec(&[], &[]);
        let settings = RouteSettings {
            web_upstream_tls: true,
            ..RouteSettings::default()
        };
        let table = RouteTable::compile(&[source("a", "10.0.0.1", &a)], settings, vec![]);
        assert_eq!(table.web_backends, vec!["10.0.0.1:8443".to_string()]);
        assert_eq!(table.garpb(), "    server 10.0.0.1:8443;\n");
        let json: serde_json::Value = serde_json::from_str(&table.to_json()).unwrap();
        assert_eq!(json["settings"]["webUpstreamTls"], true);
        assert_eq!(RouteTable::from_json(&table.to_json()).unwrap(), table);
        let older = RouteTable::from_json(r#"{"settings": {"cacheTtlSeconds": 60}}"#).unwrap();
        assert!(
            !older.settings.web_upstream_tls,
            "off unless a table says so"
        );
    }

    #[test]
    fn host_names_as_the_proxies_take_them() {
        for host in [
            "mbs1",
            "MBS_1.example.com",
            "mbs1.mail.svc",
            "10-0-0-1.example.com",
            "a.0xyz",
            "10.0.0.1",
        ] {
            assert!(is_host_name(host), "{host}");
        }
        let long = "a".repeat(254);
        for host in [
            "",
            "mbs1:7143",
            "mbs 1",
            "mbs1/x",
            "m\u{fc}",
            &long,
            "010.0.0.1",
            "10.1",
            "0x7f",
            "0X7F.1",
            "mbs.123",
            "mbs.0x",
        ] {
            assert!(!is_host_name(host), "{host:?}");
        }
    }

    #[test]
    fn draining_server_gets_no_new_routes() {
        let mut a = spec(&["alice@example.com"], &["example.com"]);
        a.drain = true;
        let table = RouteTable::compile(&[source("a", "h", &a)], RouteSettings::default(), vec![]);
        // The pinned account's mailbox is there: it stays pinned, to a draining server.
        let (name, server) = table.pinned_account("alice@example.com").unwrap();
        assert!(name == "a" && server.draining);
        assert!(table.pinned_domain("example.com").is_none());
        assert!(table.lookup_handlers.is_empty());
        assert_eq!(table.garpb(), "    server localhost:8080;\n");
        assert!(table.servers["a"].draining);
    }

    #[test]
    fn first_server_by_name_wins_a_contested_account() {
        let a = spec(&["x@example.com"], &[]);
        let b = spec(&["x@example.com"], &[]);
        let one = RouteTable::compile(
            &[source("b", "hb", &b), source("a", "ha", &a)],
            RouteSettings::default(),
            vec![],
        );
        let two = RouteTable::compile(
            &[source("a", "ha", &a), source("b", "hb", &b)],
            RouteSettings::default(),
            vec![],
        );
        assert_eq!(one.pinned_account("x@example.com").unwrap().0, "a");
        assert_eq!(one, two);
        assert_eq!(one.version(), two.version());
    }

    #[test]
    fn json_round_trip_and_version_tracks_content() {
        let a = spec(&["alice@example.com"], &[]);
        let table =
            RouteTable::compile(&[source("a", "::1", &a)], RouteSettings::default(), vec![]);
        assert_eq!(table.web_backends, vec!["[::1]:8080".to_string()]);
        let parsed = RouteTable::from_json(&table.to_json()).unwrap();
        assert_eq!(parsed, table);
        let mut changed = table.clone();
        changed.settings.cache_ttl_seconds = 60;
        assert_ne!(changed.version(), table.version());
        assert_eq!(table.version().len(), 12);
    }

    #[test]
    fn from_json_rejects_dangling_entries_and_garbage() {
        let err = RouteTable::from_json(r#"{"accounts": {"a@b.c": "nowhere"}}"#).unwrap_err();
        assert!(err.to_string().contains("\"nowhere\""), "{err}");
        assert!(RouteTable::from_json("{not json").is_err());
        let array = RouteTable::from_json("[]").unwrap_err();
        assert!(array.to_string().contains("not an array"), "{array}");
        let empty = RouteTable::from_json("{}").unwrap();
        assert_eq!(empty.settings.cache_ttl_seconds, 3600);
    }

    #[test]
    fn from_json_lower_cases_hand_written_names() {
        let table = RouteTable::from_json(
            r#"{
                "servers": {"Mbs-1": {"host": "h1"}, "mbs-2": {"host": "h2"}},
                "accounts": {"Alice@Example.COM": "Mbs-1", "alice@example.com": "Mbs-1"},
                "domains": {"Example.ORG": "mbs-2"}
            }"#,
        )
        .unwrap();
        assert_eq!(
            table.pinned_account("ALICE@example.com").unwrap().0,
            "Mbs-1",
            "server names are kept as written"
        );
        assert_eq!(table.pinned_domain("example.org").unwrap().0, "mbs-2");
        assert_eq!(
            table.accounts.keys().collect::<Vec<_>>(),
            ["alice@example.com"]
        );
        assert_eq!(table.domains.keys().collect::<Vec<_>>(), ["example.org"]);

        let conflict = RouteTable::from_json(
            r#"{
                "servers": {"a": {"host": "h1"}, "b": {"host": "h2"}},
                "domains": {"Example.org": "a", "example.ORG": "b"}
            }"#,
        )
        .unwrap_err();
        assert!(
            matches!(
                &conflict,
                RouteTableError::ConflictingKeys { kind: "domain", key, .. } if key == "example.org"
            ),
            "{conflict}"
        );
    }

    fn configmap(data: Option<(&str, &str)>) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("pool-routes".into()),
                ..Default::default()
            },
            data: data.map(|(k, v)| BTreeMap::from([(k.to_string(), v.to_string())])),
            ..Default::default()
        }
    }

    #[test]
    fn reads_the_table_from_its_configmap_key() {
        let table = RouteTable {
            lookup_handlers: vec!["http://10.0.0.1:7072/service/extension/nginx-lookup".into()],
            ..RouteTable::default()
        };
        let parsed =
            RouteTable::from_configmap(&configmap(Some((CONFIGMAP_KEY, &table.to_json()))))
                .unwrap();
        assert_eq!(parsed, table);
    }

    #[test]
    fn names_what_is_wrong_with_a_bad_configmap() {
        let missing = RouteTable::from_configmap(&configmap(Some(("other", "{}")))).unwrap_err();
        assert!(
            missing.to_string().contains("no routes.json key"),
            "{missing}"
        );
        assert!(RouteTable::from_configmap(&configmap(None)).is_err());
        let invalid =
            RouteTable::from_configmap(&configmap(Some((CONFIGMAP_KEY, "[1,2")))).unwrap_err();
        assert!(invalid.to_string().contains("pool-routes"), "{invalid}");
    }

    #[test]
    fn refuses_durations_a_proxy_cannot_add_to_its_clock() {
        let huge = RouteTable::from_json(
            r#"{"settings": {"timeouts": {"idleSeconds": 9223372036854775807}}}"#,
        )
        .unwrap_err();
        assert!(
            huge.to_string().contains(
                "timeouts.idleSeconds is 9223372036854775807: give it between 1 and 2592000"
            ),
            "{huge}"
        );
        let zero =
            RouteTable::from_json(r#"{"settings": {"lookupTimeoutSeconds": 0}}"#).unwrap_err();
        assert!(
            zero.to_string().contains("lookupTimeoutSeconds is 0"),
            "{zero}"
        );
        let longest = format!(r#"{{"settings": {{"cacheTtlSeconds": {MAX_SECONDS}}}}}"#);
        assert!(RouteTable::from_json(&longest).is_ok());
        assert!(RouteTable::from_json(r#"{"settings": {"cacheTtlSeconds": 0}}"#).is_ok());
    }

    #[test]
    fn refuses_a_whitelist_a_proxy_cannot_match_clients_against() {
        for bad in ["10.0.0.0/33", "office-nat"] {
            let text = format!(
                r#"{{"settings": {{"loginLimits": {{"whitelist": ["10.0.0.0/8", "{bad}"]}}}}}}"#
            );
            let error = RouteTable::from_json(&text).unwrap_err();
            assert!(
                error.to_string().starts_with(&format!(
                    "route table setting loginLimits.whitelist entry \"{bad}\" is not an IP \
                     address or CIDR block"
                )),
                "{error}"
            );
        }
        let good = RouteTable::from_json(
            r#"{"settings": {"loginLimits": {"whitelist": ["10.0.0.0/8", "2001:db8::1"]}}}"#,
        )
        .unwrap();
        assert_eq!(good.settings.login_limits.whitelist.len(), 2);
    }
}
