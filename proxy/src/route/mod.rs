//! Route resolution: which mailbox server holds an account.
//!
//! For each login the proxy consults, in order (the resolution order of the route table design):
//! the route table's pinned account, the route cache (memcached shared by the fleet, or the
//! embedded in-process cache), a live request to a Route Lookup Handler, and finally the route
//! table's domain entry. What a lookup learns is cached for the whole fleet.
//!
//! - [`table`]: the route table and its sources (a watched file, a watched ConfigMap).
//! - [`cache`]: the route cache tiers, Zimbra's memcached key formats and purge.
//! - [`lookup`]: the Route Lookup Handler client (Zimbra nginx-lookup / nginx `auth_http`).
//! - [`throttle`]: login throttling (Zimbra service protection).
//! - [`resolver`]: the resolution order, with concurrent lookups coalesced.

pub mod cache;
pub mod lookup;
pub mod resolver;
pub mod table;
pub mod throttle;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use mailproxy_crds::route_table::is_host_name;

/// The protocol of the connection to the mailbox server, named as the lookup protocol's
/// `Auth-Protocol` header and Zimbra's cache keys name it. The `ssl` variants are chosen by how
/// the proxy talks to the upstream, not by how the client connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Imap,
    ImapSsl,
    Pop3,
    Pop3Ssl,
    Http,
    HttpSsl,
}

impl Protocol {
    pub const ALL: [Protocol; 6] = [
        Protocol::Imap,
        Protocol::ImapSsl,
        Protocol::Pop3,
        Protocol::Pop3Ssl,
        Protocol::Http,
        Protocol::HttpSsl,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::ImapSsl => "imapssl",
            Protocol::Pop3 => "pop3",
            Protocol::Pop3Ssl => "pop3ssl",
            Protocol::Http => "http",
            Protocol::HttpSsl => "httpssl",
        }
    }

    /// The mailbox server port for this protocol.
    pub fn port_of(self, ports: &mailproxy_crds::mailbox_server::MailboxPorts) -> i32 {
        match self {
            Protocol::Imap => ports.imap,
            Protocol::ImapSsl => ports.imaps,
            Protocol::Pop3 => ports.pop3,
            Protocol::Pop3Ssl => ports.pop3s,
            Protocol::Http => ports.http,
            Protocol::HttpSsl => ports.https,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "unknown protocol {s:?}: expected imap, imapssl, pop3, pop3ssl, http or httpssl"
                )
            })
    }
}

/// Where a route points: a mailbox server's address and port. Written as `ip:port`,
/// `[v6]:port` or `host:port`, the value format of Zimbra's route cache entries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
}

impl Upstream {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// An `ip:port` / `[v6]:port` / `host:port` string that is not a usable address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an upstream address: expected host:port, ip:port or [ipv6]:port")]
pub struct BadUpstream(pub String);

impl FromStr for Upstream {
    type Err = BadUpstream;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadUpstream(s.chars().take(64).collect());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            (host, port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
            if host.contains(':') {
                return Err(bad());
            }
            (host, port)
        };
        // A host with ':' is an IPv6 address, checked in brackets above.
        let valid_host = host.contains(':') || is_host_name(host);
        let port: u16 = port.parse().map_err(|_| bad())?;
        if !valid_host || port == 0 {
            return Err(bad());
        }
        Ok(Upstream::new(host, port))
    }
}

impl From<std::net::SocketAddr> for Upstream {
    fn from(addr: std::net::SocketAddr) -> Self {
        Upstream::new(addr.ip().to_string(), addr.port())
    }
}

/// Who is asking for a route, as the lookup protocol describes a login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginContext {
    /// The login name as the client gave it (login suffixes such as `/tb` already stripped).
    pub user: String,
    pub protocol: Protocol,
    pub client_ip: IpAddr,
    /// The proxy's local address of the client connection (`X-Proxy-IP`).
    pub proxy_ip: Option<IpAddr>,
    /// The HTTP Host header, for web logins (`X-Proxy-Host`).
    pub virtual_host: Option<String>,
    /// Login attempt number on this connection (`Auth-Login-Attempt`), 0 for web.
    pub attempt: u32,
}

/// Where a login goes, and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub upstream: Upstream,
    /// The qualified account name to log in upstream as, when the handler rewrote the login
    /// (`Auth-User`) or the route table qualified it.
    pub account: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_parses_and_prints_zimbra_cache_values() {
        for text in [
            "10.0.0.5:7143",
            "[::1]:7110",
            "mbs1.mail.svc.cluster.local:7143",
        ] {
            let upstream: Upstream = text.parse().unwrap();
            assert_eq!(upstream.to_string(), text);
        }
        let v6: Upstream = "[2001:db8::1]:993".parse().unwrap();
        assert_eq!(v6.host, "2001:db8::1");
        assert_eq!(v6.port, 993);
    }

    #[test]
    fn upstream_rejects_garbage() {
        for text in [
            "",
            ":",
            "host",
            "host:",
            "host:0",
            "host:65536",
            "host:-1",
            "a b:1",
            "::1:7143",
            "[::1]",
            "[nothex]:1",
            "[::1]:x",
            "h\r\n:1",
            // IPv4 in the resolver's old forms: 010.0.0.1 would be 8.0.0.1.
            "010.0.0.1:7143",
            "10.1:7143",
            "0x7f000001:7143",
        ] {
            assert!(
                text.parse::<Upstream>().is_err(),
                "{text:?} must be rejected"
            );
        }
    }

    #[test]
    fn protocol_names_round_trip() {
        for protocol in Protocol::ALL {
            assert_eq!(protocol.as_str().parse::<Protocol>().unwrap(), protocol);
        }
        assert!("smtp".parse::<Protocol>().is_err());
    }
}
