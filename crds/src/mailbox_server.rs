//! `MailboxServer`: one mailbox backend the proxy fleet routes to.

use std::net::{IpAddr, Ipv6Addr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::route_table::is_host_name;

/// A mailbox server (Zimbra mailbox, Dovecot, or any IMAP/POP3/HTTP backend) that proxies route
/// to. Its name is the identity the route table and `mailproxy lookupd`'s directory refer to.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailproxy.io",
    version = "v1alpha1",
    kind = "MailboxServer",
    namespaced,
    shortname = "mbs",
    category = "mailproxy",
    status = "MailboxServerStatus",
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.host"}"#,
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Lookup","type":"boolean","jsonPath":".spec.lookupTarget"}"#,
    printcolumn = r#"{"name":"Drain","type":"boolean","jsonPath":".spec.drain"}"#,
    printcolumn = r#"{"name":"Pools","type":"string","jsonPath":".status.pools"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("has(self.host) != has(self.service)").message("set exactly one of spec.host (a DNS name or IP outside the cluster) or spec.service (a Service in this namespace)"),
    validation = Rule::new("(has(self.host) ? self.host : '') == (has(oldSelf.host) ? oldSelf.host : '') && (has(self.service) ? self.service : '') == (has(oldSelf.service) ? oldSelf.service : '')").message("spec.host and spec.service are immutable: delete and re-create the MailboxServer so that routes cached for the old address are purged"),
)]
#[serde(rename_all = "camelCase")]
pub struct MailboxServerSpec {
    /// DNS name (lower case) or IP address of a mailbox server outside the cluster, without a
    /// port: the ports are in `ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // The host becomes part of lookup handler URLs and `host:port` upstreams on every proxy of
    // the pool, so anything else (a port, user info, `%`, non-ASCII) must be refused here.
    // A last label that is a number is an IPv4 address in a form the resolver reads in its own
    // way (010.0.0.1 is 8.0.0.1): see `route_table::is_host_name`.
    #[x_kube(validation = Rule::new("isIP(self) || (!format.dns1123Subdomain().validate(self).hasValue() && !self.matches('(^|[.])(0[xX][0-9a-fA-F]*|[0-9]+)$'))").message("spec.host must be a DNS name or IP address: lower-case letters, digits, '-' and '.' (at most 253 characters, such as mbs1.example.com, not ending in a number), or an IPv4 or IPv6 address without brackets and leading zeros; no port (set spec.ports instead)"))]
    #[schemars(length(max = 253))]
    pub host: Option<String>,

    /// Name of a Service in this namespace that fronts the mailbox server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && self.size() <= 63").message("spec.service must be a Service name (a DNS-1035 label)"))]
    #[schemars(length(max = 63))]
    pub service: Option<String>,

    /// Backend ports; the defaults are Zimbra's mailbox ports.
    #[serde(default)]
    pub ports: MailboxPorts,

    /// Whether proxies ask this server's Route Lookup Handler where accounts live (zmprov garpu).
    #[serde(default = "default_true")]
    pub lookup_target: bool,

    /// Scheme of the Route Lookup Handler: modern Zimbra servers serve it over https.
    #[serde(default)]
    pub lookup_scheme: LookupScheme,

    /// Whether the MTA authenticates SMTP users against this server (zmprov gamau).
    #[serde(default)]
    pub mta_auth_target: bool,

    /// Whether the web proxy load-balances unauthenticated HTTP requests to it (zmprov garpb).
    #[serde(default = "default_true")]
    pub web_backend: bool,

    /// Accounts pinned to this server: routed without a lookup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(a, a.contains('@') && !a.contains(' '))").message("spec.accounts entries must be qualified account names (user@domain) without spaces"))]
    #[schemars(length(max = 10000), inner(length(min = 3, max = 320)))]
    pub accounts: Vec<String>,

    /// Domains whose accounts route here when neither the table, the cache nor a lookup knows
    /// better.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(d, !d.contains('@') && !d.contains(' ') && d.contains('.'))").message("spec.domains entries must be domain names such as example.com"))]
    #[schemars(length(max = 1000), inner(length(min = 3, max = 253)))]
    pub domains: Vec<String>,

    /// Maintenance switch: a draining server gets no new routes (no pinned accounts or domains,
    /// no lookups, no web traffic); sessions already open stay until they end.
    #[serde(default)]
    pub drain: bool,

    /// How proxies log in to this server's IMAP and POP3 services.
    #[serde(default)]
    pub mail_upstream: MailUpstream,
}

impl MailboxServerSpec {
    /// What makes the server's address unusable by a proxy. The API server enforces the CRD's
    /// rules, but not on a MailboxServer stored before they existed; what counts here is what
    /// the proxies' parsers take (a host with upper case or '_' breaks the CRD's rule and still
    /// works), and a Service name a Service cannot have.
    pub fn address_problem(&self) -> Option<String> {
        if self.host.is_some() == self.service.is_some() {
            return Some(
                "set exactly one of spec.host (a DNS name or IP outside the cluster) or \
                 spec.service (a Service in this namespace)"
                    .to_string(),
            );
        }
        if let Some(host) = &self.host {
            let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
            let usable = host.parse::<IpAddr>().is_ok()
                || literal.is_some_and(|h| h.parse::<Ipv6Addr>().is_ok())
                || is_host_name(host);
            if !usable {
                return Some(format!(
                    "spec.host {host:?} is neither a DNS name (letters, digits, '-' and '.', at \
                     most 253 characters, not ending in a number, no port) nor an IP address"
                ));
            }
        }
        if let Some(service) = &self.service
            && !(service.len() <= 63 && is_dns1123_label(service))
        {
            return Some(format!(
                "spec.service {service:?} is not a Service name (lower-case letters, digits and \
                 '-', at most 63 characters)"
            ));
        }
        None
    }
}

fn is_dns1123_label(label: &str) -> bool {
    let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !label.is_empty()
        && label.starts_with(alphanumeric)
        && label.ends_with(alphanumeric)
        && label.chars().all(|c| alphanumeric(c) || c == '-')
}

/// Backend ports (Zimbra defaults).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("[self.imap, self.imaps, self.pop3, self.pop3s, self.http, self.https, self.lookup, self.mtaAuth].all(p, p >= 1 && p <= 65535)").message("every port must be between 1 and 65535"))]
#[serde(rename_all = "camelCase")]
pub struct MailboxPorts {
    #[serde(default = "ports::imap")]
    pub imap: i32,
    #[serde(default = "ports::imaps")]
    pub imaps: i32,
    #[serde(default = "ports::pop3")]
    pub pop3: i32,
    #[serde(default = "ports::pop3s")]
    pub pop3s: i32,
    #[serde(default = "ports::http")]
    pub http: i32,
    #[serde(default = "ports::https")]
    pub https: i32,
    /// Route Lookup Handler port (Zimbra's nginx-lookup extension).
    #[serde(default = "ports::lookup")]
    pub lookup: i32,
    /// Port of the SOAP admin service that MTA authentication uses.
    #[serde(default = "ports::mta_auth")]
    pub mta_auth: i32,
}

impl Default for MailboxPorts {
    fn default() -> Self {
        Self {
            imap: ports::imap(),
            imaps: ports::imaps(),
            pop3: ports::pop3(),
            pop3s: ports::pop3s(),
            http: ports::http(),
            https: ports::https(),
            lookup: ports::lookup(),
            mta_auth: ports::mta_auth(),
        }
    }
}

/// Zimbra's mailbox-side port defaults (the seed guide's "Zimbra Mailbox Ports").
pub mod ports {
    pub fn imap() -> i32 {
        7143
    }
    pub fn imaps() -> i32 {
        7993
    }
    pub fn pop3() -> i32 {
        7110
    }
    pub fn pop3s() -> i32 {
        7995
    }
    pub fn http() -> i32 {
        8080
    }
    pub fn https() -> i32 {
        8443
    }
    pub fn lookup() -> i32 {
        7072
    }
    pub fn mta_auth() -> i32 {
        7073
    }
}

/// Scheme of a Route Lookup Handler.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "lowercase")]
pub enum LookupScheme {
    #[default]
    Http,
    Https,
}

impl LookupScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            LookupScheme::Http => "http",
            LookupScheme::Https => "https",
        }
    }
}

/// How a proxy logs in to a mailbox server's mail services.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MailUpstream {
    /// Connect to the backend's IMAPS and POP3S ports with TLS instead of plain IMAP and POP3.
    #[serde(default)]
    pub tls: bool,
    /// How the backend learns the client's real address.
    #[serde(default)]
    pub origin: OriginForwarding,
    /// Pass the backend's error text to the client on a failed login instead of a generic
    /// "LOGIN failed".
    #[serde(default)]
    pub pass_errors: bool,
}

/// How the client's address reaches the mailbox server.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "camelCase")]
pub enum OriginForwarding {
    /// IMAP `ID ("X-ORIGINATING-IP" ...)` and POP3 `XOIP` before the login (Zimbra, Dovecot).
    #[default]
    Id,
    /// A PROXY protocol v2 header at the start of the connection.
    ProxyProtocol,
    /// Nothing: the backend sees the proxy's address.
    None,
}

/// Observed state of a MailboxServer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MailboxServerStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (valid and routed to by at least one pool), Draining.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// ProxyPools whose selector matches this server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problem with a MailboxServer whose `field` (host or service) is `value`.
    fn problem(field: &str, value: &str) -> Option<String> {
        serde_json::from_value::<MailboxServerSpec>(serde_json::json!({ field: value }))
            .unwrap()
            .address_problem()
    }

    #[test]
    fn addresses_by_the_crd_rules() {
        let good = [
            ("host", "10.1.2.3"),
            ("host", "2001:db8::1"),
            ("host", "[2001:db8::1]"),
            ("host", "mbs1"),
            ("host", "mbs-1.mail.example.com"),
            ("host", "0mbs"),
            // Break the CRD's rule, but the proxies take them.
            ("host", "MBS1.example.com"),
            ("host", "mbs_1.example.com"),
            ("service", "dovecot-0"),
        ];
        for (field, value) in good {
            assert_eq!(problem(field, value), None, "{field} {value}");
        }
        let long_host = "a".repeat(254);
        let long_service = "d".repeat(64);
        let bad = [
            ("host", ""),
            ("host", "admin@mbs2"),
            ("host", "mbs2.example.com:7072"),
            ("host", "mbs-\u{fc}.example.com"),
            ("host", "fe80::1%eth0"),
            ("host", "[10.1.2.3]"),
            ("host", "010.0.0.1"),
            ("host", "mbs 1"),
            ("host", "mbs1/imap"),
            ("host", &long_host),
            ("service", "Dovecot"),
            ("service", "dovecot.mail"),
            ("service", "-dovecot"),
            ("service", &long_service),
        ];
        for (field, value) in bad {
            let problem = problem(field, value);
            assert!(
                problem
                    .as_deref()
                    .is_some_and(|p| p.starts_with(&format!("spec.{field}"))),
                "{field} {value:?}: {problem:?}"
            );
        }
        for neither_or_both in [
            serde_json::json!({}),
            serde_json::json!({"host": "mbs1", "service": "dovecot"}),
        ] {
            let spec: MailboxServerSpec = serde_json::from_value(neither_or_both).unwrap();
            assert!(
                spec.address_problem()
                    .is_some_and(|p| p.starts_with("set exactly one"))
            );
        }
    }
}
