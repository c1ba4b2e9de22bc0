//! Login throttling (Zimbra service protection), off unless a limit is set.
//!
//! - Per client IP: every mail connection counts, in a fixed window kept in the route cache
//!   (memcached, so the limit holds across the pool; the embedded cache when there is none). A
//!   per-protocol limit (`imapIpLimit`, `pop3IpLimit`) counts that protocol alone under
//!   `throttle:proto=<i|p>,ip=<ip>`; otherwise `ipLimit` counts every mail protocol together
//!   under `throttle:ip=<ip>`. (Zimbra's current nginx counts per protocol even for its global
//!   limit; the ProxyPool API promises one budget for all protocols, so we keep the all-protocol
//!   key Zimbra used before per-protocol limits.) Web logins are not throttled here.
//! - Per user: [`LoginThrottle::check_user`] before routing reads the count of successful logins
//!   in the window; [`LoginThrottle::count_user`] after a successful upstream login adds one. A
//!   user is rejected once the count reaches `userLimit`.
//! - Whitelisted client IPs (the `whitelist` list, addresses or CIDR blocks, plus
//!   `whitelist:ip=<ip>` entries set to `1` in memcached) are never IP-throttled.
//! - A window is fixed: the first count creates the counter with the window as its TTL.
//! - When the cache is unavailable (memcached down, slow or garbling), logins are allowed: the
//!   throttle protects the mailboxes, it must not take logins down with memcached.
//!
//! The session acts on the [`ThrottleDecision`] and writes Zimbra's texts
//! (`* BYE Login rejected from this IP`, `-ERR ...`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mailproxy_crds::settings::LoginLimits;

use super::Protocol;
use super::cache::{CacheKey, IpScope, RouteCache};

/// What a session does with a login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThrottleDecision {
    Allowed,
    /// Too many connections from this client IP in the window: reject and close.
    RejectedIp,
    /// Too many logins of this user in the window.
    RejectedUser,
}

/// A whitelist entry that is neither an IP address nor a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "login limits: whitelist entry {0:?} is not an IP address or CIDR block (such as 10.0.0.0/8)"
)]
pub struct BadWhitelist(pub String);

/// The throttle of one proxy; cheap to clone, its limits replaceable when the route table
/// reloads.
#[derive(Clone)]
pub struct LoginThrottle {
    cache: RouteCache,
    limits: Arc<ArcSwap<Limits>>,
}

struct Limits {
    ip: u64,
    imap_ip: u64,
    pop3_ip: u64,
    ip_window: Duration,
    user: u64,
    user_window: Duration,
    whitelist: Vec<Cidr>,
}

impl LoginThrottle {
    /// Counts in `cache`, shared with the route cache as in Zimbra.
    pub fn new(limits: &LoginLimits, cache: RouteCache) -> Result<Self, BadWhitelist> {
        Ok(Self {
            cache,
            limits: Arc::new(ArcSwap::from_pointee(Limits::from_settings(limits)?)),
        })
    }

    /// Replaces the limits; an invalid whitelist keeps the current ones.
    pub fn set_limits(&self, limits: &LoginLimits) -> Result<(), BadWhitelist> {
        self.limits.store(Arc::new(Limits::from_settings(limits)?));
        Ok(())
    }

    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        let limits = self.limits.load();
        limits.ip > 0 || limits.imap_ip > 0 || limits.pop3_ip > 0 || limits.user > 0
    }

    /// Counts a new mail connection from `client_ip` and decides whether it may go on.
    pub async fn check_ip(&self, protocol: Protocol, client_ip: IpAddr) -> ThrottleDecision {
        let limits = self.limits.load_full();
        let (scope, limit) = match protocol {
            Protocol::Imap | Protocol::ImapSsl if limits.imap_ip > 0 => {
                (IpScope::Imap, limits.imap_ip)
            }
            Protocol::Pop3 | Protocol::Pop3Ssl if limits.pop3_ip > 0 => {
                (IpScope::Pop3, limits.pop3_ip)
            }
            Protocol::Imap | Protocol::ImapSsl | Protocol::Pop3 | Protocol::Pop3Ssl
                if limits.ip > 0 =>
            {
                (IpScope::AllProtocols, limits.ip)
            }
            _ => return ThrottleDecision::Allowed,
        };
        let ip = client_ip.to_canonical();
        if limits.whitelist.iter().any(|block| block.contains(ip)) {
            return ThrottleDecision::Allowed;
        }
        match self.cache.read(&CacheKey::whitelist_ip(ip)).await {
            Ok(Some(flag)) if flag.trim() == "1" => return ThrottleDecision::Allowed,
            Ok(_) => {}
            // Not fatal: the counter may live on a server that answers.
            Err(error) => tracing::debug!(%ip, "whitelist lookup failed: {error}"),
        }
        match self
            .cache
            .count(&CacheKey::throttle_ip(scope, ip), limits.ip_window)
            .await
        {
            Ok(count) if count > limit => {
                tracing::info!(%ip, %protocol, count, limit, "login rejected: IP over its limit");
                ThrottleDecision::RejectedIp
            }
            Ok(_) => ThrottleDecision::Allowed,
            Err(error) => {
                tracing::warn!(%ip, "IP throttle not applied, cache unavailable: {error}");
                ThrottleDecision::Allowed
            }
        }
    }

    /// Before routing: whether `account` (the qualified name, so that its aliases share one
    /// count) still has logins left in the window. Reads only; [`LoginThrottle::count_user`]
    /// counts.
    pub async fn check_user(&self, account: &str) -> ThrottleDecision {
        let limits = self.limits.load_full();
        if limits.user == 0 {
            return ThrottleDecision::Allowed;
        }
        let Ok(key) = CacheKey::throttle_user(account) else {
            return ThrottleDecision::Allowed;
        };
        match self.cache.read(&key).await {
            Ok(Some(count)) => match count.trim().parse::<u64>() {
                Ok(count) if count >= limits.user => {
                    tracing::info!(
                        account,
                        count,
                        limit = limits.user,
                        "login rejected: user over its limit"
                    );
                    ThrottleDecision::RejectedUser
                }
                _ => ThrottleDecision::Allowed,
            },
            Ok(None) => ThrottleDecision::Allowed,
            Err(error) => {
                tracing::warn!(
                    account,
                    "user throttle not applied, cache unavailable: {error}"
                );
                ThrottleDecision::Allowed
            }
        }
    }

    /// After a successful upstream login: counts it against `account`.
    pub async fn count_user(&self, account: &str) {
        let limits = self.limits.load_full();
        if limits.user == 0 {
            return;
        }
        let Ok(key) = CacheKey::throttle_user(account) else {
            return;
        };
        if let Err(error) = self.cache.count(&key, limits.user_window).await {
            tracing::warn!(account, "login not counted, cache unavailable: {error}");
        }
    }
}

impl Limits {
    fn from_settings(settings: &LoginLimits) -> Result<Self, BadWhitelist> {
        let limit = |value: i64| u64::try_from(value).unwrap_or(0);
        let window = |seconds: i64| Duration::from_secs(u64::try_from(seconds).unwrap_or(0).max(1));
        Ok(Self {
            ip: limit(settings.ip_limit),
            imap_ip: limit(settings.imap_ip_limit),
            pop3_ip: limit(settings.pop3_ip_limit),
            ip_window: window(settings.ip_window_seconds),
            user: limit(settings.user_limit),
            user_window: window(settings.user_window_seconds),
            whitelist: settings
                .whitelist
                .iter()
                .map(|entry| Cidr::parse(entry).ok_or_else(|| BadWhitelist(entry.clone())))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// An address block; a plain address is a block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    network: IpAddr,
    prefix: u32,
}

impl Cidr {
    fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.parse::<IpAddr>().ok()?.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) if prefix.bytes().all(|b| b.is_ascii_digit()) => prefix.parse().ok()?,
            Some(_) => return None,
            None => bits,
        };
        (prefix <= bits).then_some(Self { network, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn whitelist_entries_are_addresses_or_blocks() {
        let block = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(block.contains(ip("10.1.200.3")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(!block.contains(ip("::1")));
        let one = Cidr::parse(" 192.0.2.7 ").unwrap();
        assert!(one.contains(ip("192.0.2.7")));
        assert!(!one.contains(ip("192.0.2.8")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("203.0.113.1"))
        );
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        // A v4-mapped entry matches the v4 address clients are canonicalised to.
        assert!(
            Cidr::parse("::ffff:192.0.2.7")
                .unwrap()
                .contains(ip("192.0.2.7"))
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "host",
            "::/129",
            "1.2.3.4/",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn invalid_whitelists_are_refused() {
        let limits = LoginLimits {
            whitelist: vec!["10.0.0.0/8".into(), "nonsense".into()],
            ..LoginLimits::default()
        };
        let error = Limits::from_settings(&limits).err().unwrap();
        assert_eq!(error, BadWhitelist("nonsense".into()));
    }
}
