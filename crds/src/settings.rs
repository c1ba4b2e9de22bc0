//! Proxy behaviour settings shared by the `ProxyPool` spec and the route table the proxies read.

use std::net::IpAddr;

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
    /// Client IPs never throttled: IP addresses and CIDR blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(e, isIP(e) || isCIDR(e))").message("loginLimits.whitelist entries must be IP addresses or CIDR blocks: list addresses such as 192.0.2.7 and blocks such as 10.0.0.0/8 or 2001:db8::/32"))]
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

    /// The whitelist as the proxies match client IPs against it. The operator and the route
    /// table refuse what this refuses, so that a whitelist a proxy cannot use never reaches one.
    pub fn whitelist_blocks(&self) -> Result<Vec<IpBlock>, BadWhitelist> {
        self.whitelist
            .iter()
            .map(|entry| IpBlock::parse(entry))
            .collect()
    }
}

/// A whitelist entry that is neither an IP address nor a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "loginLimits.whitelist entry {0:?} is not an IP address or CIDR block: list addresses such as \
     192.0.2.7 and blocks such as 10.0.0.0/8 or 2001:db8::/32"
)]
pub struct BadWhitelist(pub String);

/// An address block of the whitelist; a plain address is a block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpBlock {
    network: IpAddr,
    prefix: u32,
}

impl IpBlock {
    pub fn parse(entry: &str) -> Result<Self, BadWhitelist> {
        Self::parse_trimmed(entry.trim()).ok_or_else(|| BadWhitelist(entry.to_string()))
    }

    /// An address (`192.0.2.7`, `2001:db8::1`) or CIDR block (`10.0.0.0/8`); `None` for
    /// anything else.
    pub fn parse_trimmed(text: &str) -> Option<Self> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        // Canonical, so that a v4-mapped entry matches the v4 addresses clients are
        // canonicalised to.
        let network: IpAddr = address.parse::<IpAddr>().ok()?.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            // `u32::from_str` takes a leading `+`, which no CIDR notation has.
            Some(prefix) if prefix.bytes().all(|b| b.is_ascii_digit()) => prefix.parse().ok()?,
            Some(_) => return None,
            None => bits,
        };
        (prefix <= bits).then_some(Self { network, prefix })
    }

    /// Whether `ip` (canonical: v4-mapped addresses as v4) is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix).unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix).unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn whitelist_entries_are_addresses_or_blocks() {
        let block = IpBlock::parse("10.1.0.0/16").unwrap();
        assert!(block.contains(ip("10.1.200.3")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(!block.contains(ip("::1")));
        let one = IpBlock::parse(" 192.0.2.7 ").unwrap();
        assert!(one.contains(ip("192.0.2.7")));
        assert!(!one.contains(ip("192.0.2.8")));
        assert!(
            IpBlock::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("203.0.113.1"))
        );
        let v6 = IpBlock::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        // A v4-mapped entry matches the v4 address clients are canonicalised to.
        assert!(
            IpBlock::parse("::ffff:192.0.2.7")
                .unwrap()
                .contains(ip("192.0.2.7"))
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "host",
            "office-nat",
            "::/129",
            "1.2.3.4/",
        ] {
            assert_eq!(
                IpBlock::parse(bad),
                Err(BadWhitelist(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_whitelist_is_refused_at_its_first_bad_entry_with_what_to_write_instead() {
        let limits = LoginLimits {
            whitelist: vec![
                "10.0.0.0/8".into(),
                "office-nat".into(),
                "10.0.0.0/33".into(),
            ],
            ..LoginLimits::default()
        };
        let error = limits.whitelist_blocks().unwrap_err();
        assert_eq!(error, BadWhitelist("office-nat".into()));
        assert_eq!(
            error.to_string(),
            "loginLimits.whitelist entry \"office-nat\" is not an IP address or CIDR block: list \
             addresses such as 192.0.2.7 and blocks such as 10.0.0.0/8 or 2001:db8::/32"
        );
        let good = LoginLimits {
            whitelist: vec!["10.0.0.0/8".into(), "2001:db8::1".into()],
            ..LoginLimits::default()
        };
        assert_eq!(good.whitelist_blocks().unwrap().len(), 2);
    }
}
