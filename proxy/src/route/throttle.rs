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
use mailproxy_crds::settings::{BadWhitelist, IpBlock, LoginLimits};

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
    whitelist: Vec<IpBlock>,
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
            whitelist: settings.whitelist_blocks()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
