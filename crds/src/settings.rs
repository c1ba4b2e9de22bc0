//! Proxy behaviour settings shared by the `ProxyPool` spec and the route table the proxies read.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The longest any `...Seconds` setting may be: 30 days (memcached's longest relative expiry).
/// Settings are refused above it where they are read, so that no deadline a proxy computes
/// from one can overflow its clock.
pub const MAX_SECONDS: i64 = 2_592_000;

/// STARTTLS on the plain IMAP and POP3 listeners.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "lowercase")]
pub enum StartTlsMode {
    /// Not offered.
    Off,
    /// Offered when the pool has a certificate; cleartext logins are allowed.
    #[default]
    On,
    /// Required: cleartext logins are refused until the client has started TLS.
    Only,
}

/// Login throttling (Zimbra's service protection). Every limit 0 means off; windows are fixed
/// windows kept in memcached, so they hold across the whole pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LoginLimits {
    /// Connections per client IP per window, every protocol together.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("login limits must not be negative"))]
    pub ip_limit: i64,
    /// IMAP connections per client IP per window; overrides ipLimit for IMAP when set.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("login limits must not be negative"))]
    pub imap_ip_limit: i64,
    /// POP3 connections per client IP per window; overrides ipLimit for POP3 when set.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("login limits must not be negative"))]
    pub pop3_ip_limit: i64,
    #[serde(default = "defaults::window_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("windowSeconds must be between 1 second and 30 days (2592000)"))]
    pub ip_window_seconds: i64,
    /// Successful logins per user per window.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("login limits must not be negative"))]
    pub user_limit: i64,
    #[serde(default = "defaults::window_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("windowSeconds must be between 1 second and 30 days (2592000)"))]
    pub user_window_seconds: i64,
    /// Client IPs never throttled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 64)))]
    pub whitelist: Vec<String>,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            ip_limit: 0,
            imap_ip_limit: 0,
            pop3_ip_limit: 0,
            ip_window_seconds: defaults::window_seconds(),
            user_limit: 0,
            user_window_seconds: defaults::window_seconds(),
            whitelist: Vec::new(),
        }
    }
}

impl LoginLimits {
    /// Whether any limit is set (throttling is off by default).
    pub fn enabled(&self) -> bool {
        self.ip_limit > 0 || self.imap_ip_limit > 0 || self.pop3_ip_limit > 0 || self.user_limit > 0
    }
}

/// Session timeouts and limits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Time a client has to complete its login (nginx/Zimbra: 60 s).
    #[serde(default = "defaults::pre_login_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("timeouts must be between 1 second and 30 days (2592000)"))]
    pub pre_login_seconds: i64,
    /// Idle time after login before the session is closed (Zimbra: 1 hour).
    #[serde(default = "defaults::idle_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("timeouts must be between 1 second and 30 days (2592000)"))]
    pub idle_seconds: i64,
    /// Time to connect to a mailbox server (Zimbra: 120 s).
    #[serde(default = "defaults::upstream_connect_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("timeouts must be between 1 second and 30 days (2592000)"))]
    pub upstream_connect_seconds: i64,
    /// Invalid commands before the proxy disconnects a client that has not logged in.
    #[serde(default = "defaults::max_errors")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("maxErrors must be between 1 and 1000"))]
    pub max_errors: i64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            pre_login_seconds: defaults::pre_login_seconds(),
            idle_seconds: defaults::idle_seconds(),
            upstream_connect_seconds: defaults::upstream_connect_seconds(),
            max_errors: defaults::max_errors(),
        }
    }
}

mod defaults {
    pub fn window_seconds() -> i64 {
        3600
    }
    pub fn pre_login_seconds() -> i64 {
        60
    }
    pub fn idle_seconds() -> i64 {
        3600
    }
    pub fn upstream_connect_seconds() -> i64 {
        120
    }
    pub fn max_errors() -> i64 {
        5
    }
}
