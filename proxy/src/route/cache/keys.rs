//! Zimbra's memcached key formats, so that a fleet mixing mailproxy and Zimbra's nginx (and
//! Zimbra's `zmproxypurge`) reads and deletes the same entries. The escaping and hashing (and the
//! account route key the operator purges) are [`mailproxy_crds::cache_key`]'s.

use std::fmt;
use std::net::IpAddr;

use mailproxy_crds::cache_key::{KeyBuilder as Builder, route_account};
pub use mailproxy_crds::cache_key::{KeyError, MAX_KEY_LEN, is_qualified};

use crate::route::{LoginContext, Protocol};

/// A key that is safe to put on a memcached command line: at most [`MAX_KEY_LEN`] bytes, no
/// space, no control byte. Only the constructors below make one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

/// Which connections an IP throttle counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpScope {
    /// Every mail protocol together: `throttle:ip=<ip>` (the key of Zimbra's all-protocol
    /// counter before per-protocol limits existed).
    AllProtocols,
    /// `throttle:proto=i,ip=<ip>`.
    Imap,
    /// `throttle:proto=p,ip=<ip>`.
    Pop3,
}

/// What an alias entry is scoped by: mail logins are qualified by the domain bound to the proxy
/// address the client connected to, web logins by the virtual host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AliasScope<'a> {
    ProxyIp(IpAddr),
    VirtualHost(&'a str),
}

impl<'a> AliasScope<'a> {
    /// The scope of a login: its virtual host for web logins, else the proxy address.
    pub fn of(login: &'a LoginContext) -> Option<Self> {
        match (&login.virtual_host, login.proxy_ip) {
            (Some(host), _) => Some(AliasScope::VirtualHost(host)),
            (None, Some(ip)) => Some(AliasScope::ProxyIp(ip)),
            (None, None) => None,
        }
    }
}

impl CacheKey {
    /// `route:proto=<proto>;user=<login>`, with `@<clientip>` appended to an unqualified login
    /// (no `@` before its last character), because its domain depends on where the client
    /// connected: the same short name may be different accounts for different clients.
    pub fn route_user(protocol: Protocol, user: &str, client_ip: IpAddr) -> Result<Self, KeyError> {
        let mut key = Builder::new("route:proto=");
        key.raw(protocol.as_str());
        key.raw(";user=");
        key.escaped("login", user)?;
        if !is_qualified(user) {
            key.raw("@");
            key.display(client_ip.to_canonical());
        }
        Ok(Self(key.finish()))
    }

    /// `route:proto=<proto>;user=<account>` without a client address whatever the name: the key
    /// of a qualified account, and the key Zimbra writes for unqualified names when it is told to
    /// allow them. Purge deletes both forms.
    pub fn route_account(protocol: Protocol, account: &str) -> Result<Self, KeyError> {
        route_account(protocol.as_str(), account).map(Self)
    }

    /// `route:proto=<proto>;id=<zimbraId>`: web routing by an auth token's account id.
    pub fn route_id(protocol: Protocol, id: &str) -> Result<Self, KeyError> {
        let mut key = Builder::new("route:proto=");
        key.raw(protocol.as_str());
        key.raw(";id=");
        key.escaped("account id", id)?;
        Ok(Self(key.finish()))
    }

    /// `alias:user=<login>;ip=<proxy-ip>` or `alias:user=<login>;vhost=<host>`. The host is
    /// lower-cased, as nginx normalises the Host header Zimbra builds this key from.
    pub fn alias(login: &str, scope: AliasScope<'_>) -> Result<Self, KeyError> {
        let mut key = Builder::new("alias:user=");
        key.escaped("login", login)?;
        match scope {
            AliasScope::ProxyIp(ip) => {
                key.raw(";ip=");
                key.display(ip.to_canonical());
            }
            AliasScope::VirtualHost(host) => {
                key.raw(";vhost=");
                key.escaped("virtual host", &host.to_ascii_lowercase())?;
            }
        }
        Ok(Self(key.finish()))
    }

    /// `throttle:ip=<ip>` or `throttle:proto=<i|p>,ip=<ip>`.
    pub fn throttle_ip(scope: IpScope, ip: IpAddr) -> Self {
        let mut key = Builder::new("throttle:");
        match scope {
            IpScope::AllProtocols => {}
            IpScope::Imap => key.raw("proto=i,"),
            IpScope::Pop3 => key.raw("proto=p,"),
        }
        key.raw("ip=");
        key.display(ip.to_canonical());
        Self(key.finish())
    }

    /// `throttle:user=<account>`, in lower case: account names are case-insensitive, and a
    /// user who logs in as `Bob` and `bob` is one user to limit.
    pub fn throttle_user(account: &str) -> Result<Self, KeyError> {
        let mut key = Builder::new("throttle:user=");
        key.escaped("account name", &account.to_lowercase())?;
        Ok(Self(key.finish()))
    }

    /// `whitelist:ip=<ip>`.
    pub fn whitelist_ip(ip: IpAddr) -> Self {
        let mut key = Builder::new("whitelist:ip=");
        key.display(ip.to_canonical());
        Self(key.finish())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailproxy_crds::cache_key::ROUTE_PROTOCOLS;
    use md5::{Digest, Md5};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn is_safe(key: &CacheKey) -> bool {
        key.as_str().len() <= MAX_KEY_LEN && key.as_str().bytes().all(|b| b > b' ' && b != 0x7f)
    }

    #[test]
    fn the_operator_purges_the_protocols_routes_are_cached_under() {
        assert_eq!(Protocol::ALL.map(Protocol::as_str), ROUTE_PROTOCOLS);
    }

    #[test]
    fn route_keys_match_zimbra() {
        let client = ip("192.0.2.10");
        let cases = [
            (
                CacheKey::route_user(Protocol::Imap, "alice@example.com", client),
                "route:proto=imap;user=alice@example.com",
            ),
            (
                CacheKey::route_user(Protocol::Pop3Ssl, "alice", client),
                "route:proto=pop3ssl;user=alice@192.0.2.10",
            ),
            (
                CacheKey::route_user(Protocol::Imap, "alice@", client),
                "route:proto=imap;user=alice@@192.0.2.10",
            ),
            (
                CacheKey::route_user(Protocol::Http, "bob", ip("2001:db8::7")),
                "route:proto=http;user=bob@2001:db8::7",
            ),
            (
                CacheKey::route_user(Protocol::Imap, "bob", ip("::ffff:192.0.2.10")),
                "route:proto=imap;user=bob@192.0.2.10",
            ),
            (
                CacheKey::route_account(Protocol::ImapSsl, "alice"),
                "route:proto=imapssl;user=alice",
            ),
            (
                CacheKey::route_id(Protocol::HttpSsl, "5f1e3c2a-0000-4000-8000-000000000001"),
                "route:proto=httpssl;id=5f1e3c2a-0000-4000-8000-000000000001",
            ),
        ];
        for (key, expected) in cases {
            assert_eq!(key.unwrap().as_str(), expected);
        }
    }

    #[test]
    fn alias_throttle_and_whitelist_keys_match_zimbra() {
        assert_eq!(
            CacheKey::alias("alice", AliasScope::ProxyIp(ip("10.0.0.1")))
                .unwrap()
                .as_str(),
            "alias:user=alice;ip=10.0.0.1"
        );
        assert_eq!(
            CacheKey::alias("alice", AliasScope::VirtualHost("Mail.Example.COM"))
                .unwrap()
                .as_str(),
            "alias:user=alice;vhost=mail.example.com"
        );
        let client = ip("198.51.100.4");
        assert_eq!(
            CacheKey::throttle_ip(IpScope::Imap, client).as_str(),
            "throttle:proto=i,ip=198.51.100.4"
        );
        assert_eq!(
            CacheKey::throttle_ip(IpScope::Pop3, client).as_str(),
            "throttle:proto=p,ip=198.51.100.4"
        );
        assert_eq!(
            CacheKey::throttle_ip(IpScope::AllProtocols, client).as_str(),
            "throttle:ip=198.51.100.4"
        );
        for login in ["alice@example.com", "Alice@EXAMPLE.com"] {
            assert_eq!(
                CacheKey::throttle_user(login).unwrap().as_str(),
                "throttle:user=alice@example.com"
            );
        }
        assert_eq!(
            CacheKey::whitelist_ip(client).as_str(),
            "whitelist:ip=198.51.100.4"
        );
    }

    #[test]
    fn hostile_names_are_escaped_not_injected() {
        let client = ip("192.0.2.1");
        let key = CacheKey::route_user(
            Protocol::Imap,
            "a b\r\nflush_all\r\n%x\u{7f}@example.com",
            client,
        )
        .unwrap();
        assert_eq!(
            key.as_str(),
            "route:proto=imap;user=a%20b%0D%0Aflush_all%0D%0A%25x%7F@example.com"
        );
        assert!(is_safe(&key));
        let nul = CacheKey::throttle_user("x\0y").unwrap();
        assert_eq!(nul.as_str(), "throttle:user=x%00y");
        // Non-ASCII text is legal in a memcached key and stays as it is.
        let utf8 = CacheKey::route_account(Protocol::Imap, "jörg@exämple.de").unwrap();
        assert_eq!(utf8.as_str(), "route:proto=imap;user=jörg@exämple.de");
    }

    #[test]
    fn long_keys_become_their_md5() {
        let prefix = "route:proto=imap;user=";
        let fits = format!("{}@x", "a".repeat(MAX_KEY_LEN - prefix.len() - 2));
        let key = CacheKey::route_account(Protocol::Imap, &fits).unwrap();
        assert_eq!(key.as_str().len(), MAX_KEY_LEN);
        assert!(key.as_str().starts_with(prefix));

        let over = format!("{}@x", "a".repeat(MAX_KEY_LEN - prefix.len() - 1));
        let hashed = CacheKey::route_account(Protocol::Imap, &over).unwrap();
        let full = format!("{prefix}{over}");
        let expected: String = Md5::digest(full.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hashed.as_str(), expected);
        assert_eq!(hashed.as_str().len(), 32);

        let huge = "\r\n".repeat(100_000);
        let key = CacheKey::route_user(Protocol::Pop3, &huge, ip("192.0.2.1")).unwrap();
        assert!(is_safe(&key));
        assert_eq!(key.as_str().len(), 32);
    }

    #[test]
    fn empty_names_are_refused() {
        assert_eq!(
            CacheKey::route_account(Protocol::Imap, ""),
            Err(KeyError::Empty("account name"))
        );
        let error = CacheKey::alias("", AliasScope::VirtualHost("h")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "a route cache key needs a non-empty login"
        );
        assert!(CacheKey::alias("a", AliasScope::VirtualHost("")).is_err());
    }
}
