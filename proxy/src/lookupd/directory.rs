//! The lookupd directory file: which MailboxServer holds each account, for mailbox backends
//! that have no Zimbra LDAP to ask.
//!
//! A line-based text format, so that it diffs well in a ConfigMap and is written by any script:
//!
//! ```text
//! # Blank lines and words from a `#` on are ignored.
//! default-domain example.com            # qualifies logins without '@'
//! account alice@example.com mbs-1       # account -> MailboxServer name (in the route table)
//! account bob mbs-2                     # unqualified: bob@example.com
//! alias al@example.com alice@example.com
//! alias postmaster alice                # postmaster@example.com -> alice@example.com
//! domain-ip 192.0.2.10 example.org      # mail logins without '@' to that proxy address
//! domain-vhost mail.example.org example.org   # web logins without '@' to that host name
//! ```
//!
//! Names compare case-insensitively (they are kept in lower case). `default-domain` may appear
//! once, anywhere: it applies to every `account` and `alias` line, and to the logins of a lookup
//! that no `domain-ip` (the proxy address the client reached, `X-Proxy-IP`) or `domain-vhost`
//! (the web host name it asked for, `X-Proxy-Host`) names, as Zimbra qualifies them by the
//! domain's virtual IP addresses and host names. An alias names an account, not another alias; its
//! account may be listed here or pinned in the route table. A file with any bad line is
//! rejected whole, with the line number, so a typo never silently drops accounts.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;

/// A directory file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("directory line {line}: {message}")]
pub struct DirectoryError {
    pub line: usize,
    pub message: String,
}

/// The parsed directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    default_domain: Option<String>,
    accounts: HashMap<String, String>,
    aliases: HashMap<String, String>,
    /// The domain of unqualified logins by the proxy address they arrived at.
    ip_domains: HashMap<IpAddr, String>,
    /// The domain of unqualified web logins by the host name they asked for (lower case).
    vhost_domains: HashMap<String, String>,
}

/// Where a lookup's login arrived: what qualifies a login without `@` besides the default
/// domain.
#[derive(Debug, Clone, Copy, Default)]
pub struct Arrival<'a> {
    /// The proxy address the client connected to (`X-Proxy-IP`).
    pub proxy_ip: Option<IpAddr>,
    /// The web host name the client asked for (`X-Proxy-Host`).
    pub vhost: Option<&'a str>,
}

impl Directory {
    pub fn parse(text: &str) -> Result<Self, DirectoryError> {
        let mut default_domain: Option<(usize, String)> = None;
        let mut ip_domains = HashMap::new();
        let mut vhost_domains = HashMap::new();
        let mut accounts = Vec::new();
        let mut aliases = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let fail = |message: String| DirectoryError {
                line: number,
                message,
            };
            let words: Vec<&str> = line
                .split_whitespace()
                .take_while(|word| !word.starts_with('#'))
                .collect();
            match words.as_slice() {
                [] => {}
                ["default-domain", domain] => {
                    if let Some((first, _)) = &default_domain {
                        return Err(fail(format!(
                            "second default-domain (the first is on line {first})"
                        )));
                    }
                    if domain.contains('@') {
                        return Err(fail(format!("default-domain {domain:?} contains '@'")));
                    }
                    default_domain = Some((number, domain.to_ascii_lowercase()));
                }
                ["account", account, server] => accounts.push((number, *account, *server)),
                ["alias", alias, account] => aliases.push((number, *alias, *account)),
                ["domain-ip", ip, domain] => {
                    let ip: IpAddr = ip
                        .parse()
                        .map_err(|_| fail(format!("domain-ip {ip:?} is not an IP address")))?;
                    let domain = domain_name(domain).map_err(fail)?;
                    if ip_domains.insert(ip.to_canonical(), domain).is_some() {
                        return Err(fail(format!("domain-ip {ip} is listed twice")));
                    }
                }
                ["domain-vhost", host, domain] => {
                    let domain = domain_name(domain).map_err(fail)?;
                    if vhost_domains
                        .insert(host.to_ascii_lowercase(), domain)
                        .is_some()
                    {
                        return Err(fail(format!("domain-vhost {host} is listed twice")));
                    }
                }
                [
                    keyword @ ("default-domain" | "account" | "alias" | "domain-ip"
                    | "domain-vhost"),
                    ..,
                ] => {
                    let expected = match *keyword {
                        "default-domain" => "default-domain <domain>",
                        "account" => "account <account> <server>",
                        "domain-ip" => "domain-ip <proxy ip> <domain>",
                        "domain-vhost" => "domain-vhost <host name> <domain>",
                        _ => "alias <login> <account>",
                    };
                    return Err(fail(format!("expected `{expected}`")));
                }
                [other, ..] => {
                    return Err(fail(format!(
                        "unknown entry {other:?}: expected default-domain, account, alias, \
                         domain-ip or domain-vhost"
                    )));
                }
            }
        }
        let mut directory = Directory {
            default_domain: default_domain.map(|(_, domain)| domain),
            ip_domains,
            vhost_domains,
            ..Directory::default()
        };
        for (line, account, server) in accounts {
            let account = directory.qualify(account);
            if directory.accounts.contains_key(&account) {
                return Err(DirectoryError {
                    line,
                    message: format!("account {account} is listed twice"),
                });
            }
            directory.accounts.insert(account, server.to_string());
        }
        for (line, alias, account) in aliases {
            let (alias, account) = (directory.qualify(alias), directory.qualify(account));
            let problem = if directory.accounts.contains_key(&alias) {
                "is also an account"
            } else if alias == account {
                "names itself"
            } else {
                match directory.aliases.entry(alias.clone()) {
                    Entry::Occupied(_) => "is listed twice",
                    Entry::Vacant(entry) => {
                        entry.insert(account);
                        continue;
                    }
                }
            };
            return Err(DirectoryError {
                line,
                message: format!("alias {alias} {problem}"),
            });
        }
        Ok(directory)
    }

    /// The login in lower case, with the default domain appended when it has no `@`.
    pub fn qualify(&self, login: &str) -> String {
        let login = login.to_ascii_lowercase();
        match &self.default_domain {
            Some(domain) if !login.contains('@') => format!("{login}@{domain}"),
            _ => login,
        }
    }

    /// The login of a lookup in lower case, qualified when it has no `@`: by the domain of the
    /// host name or proxy address it arrived at, else the default domain. The flag says whether
    /// the result depends on nothing but what a proxy scopes a cached alias by: the host name
    /// of a web login, else the proxy address.
    pub fn qualify_arriving(&self, login: &str, arrival: Arrival<'_>) -> (String, bool) {
        if login.contains('@') {
            return (login.to_ascii_lowercase(), true);
        }
        let by_vhost = arrival
            .vhost
            .and_then(|host| self.vhost_domains.get(&host.to_ascii_lowercase()));
        let by_ip = arrival
            .proxy_ip
            .and_then(|ip| self.ip_domains.get(&ip.to_canonical()));
        // A web login's alias is cached by host name alone: a domain that came from the proxy
        // address, or a default that another proxy address would not give, must not be cached
        // under it (the next login to that host from elsewhere would take it).
        let scoped = match (arrival.vhost, by_vhost) {
            (Some(_), Some(_)) | (None, _) => true,
            (Some(_), None) => self.ip_domains.is_empty(),
        };
        let qualified = match by_vhost.or(by_ip) {
            Some(domain) => format!("{}@{domain}", login.to_ascii_lowercase()),
            None => self.qualify(login),
        };
        (qualified, scoped)
    }

    /// The account a qualified login stands for (itself unless it is an alias).
    pub fn account_of<'a>(&'a self, qualified: &'a str) -> &'a str {
        self.aliases
            .get(qualified)
            .map_or(qualified, String::as_str)
    }

    /// The MailboxServer name of an account listed here.
    pub fn server_of(&self, account: &str) -> Option<&str> {
        self.accounts.get(account).map(String::as_str)
    }

    pub fn default_domain(&self) -> Option<&str> {
        self.default_domain.as_deref()
    }

    /// Number of accounts and aliases, for the reload log.
    pub fn counts(&self) -> (usize, usize) {
        (self.accounts.len(), self.aliases.len())
    }
}

/// The domain of a `domain-ip` or `domain-vhost` line, in lower case.
fn domain_name(domain: &str) -> Result<String, String> {
    if domain.contains('@') {
        return Err(format!("domain {domain:?} contains '@'"));
    }
    Ok(domain.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../examples/lookupd-directory.txt");

    #[test]
    fn example_file_parses() {
        let directory = Directory::parse(EXAMPLE).unwrap();
        assert_eq!(directory.default_domain(), Some("example.com"));
        assert_eq!(directory.server_of("alice@example.com"), Some("mbs-1"));
        assert_eq!(directory.server_of("bob@example.com"), Some("mbs-2"));
        let postmaster = directory.qualify("Postmaster");
        assert_eq!(directory.account_of(&postmaster), "alice@example.com");
    }

    #[test]
    fn qualifies_lowercases_and_resolves_aliases() {
        let directory = Directory::parse(
            "default-domain Example.COM\n\
             account Carol mbs-3 # trailing comment\n\
             alias c carol\n\
             alias x@other.org carol@example.com\n",
        )
        .unwrap();
        assert_eq!(directory.qualify("CAROL"), "carol@example.com");
        assert_eq!(directory.qualify("a@B.org"), "a@b.org");
        assert_eq!(directory.server_of("carol@example.com"), Some("mbs-3"));
        assert_eq!(directory.account_of("c@example.com"), "carol@example.com");
        assert_eq!(directory.account_of("x@other.org"), "carol@example.com");
        assert_eq!(
            directory.account_of("nobody@example.com"),
            "nobody@example.com"
        );
        assert_eq!(directory.counts(), (1, 2));
    }

    #[test]
    fn logins_without_a_domain_take_the_domain_of_where_they_arrived() {
        let directory = Directory::parse(
            "default-domain example.com\n\
             domain-ip 192.0.2.10 Example.ORG\n\
             domain-ip 2001:db8::10 example.net\n\
             domain-vhost Mail.Example.org example.org\n",
        )
        .unwrap();
        let qualify = |login, proxy_ip: &str, vhost| {
            let arrival = Arrival {
                proxy_ip: Some(proxy_ip.parse().unwrap()),
                vhost,
            };
            directory.qualify_arriving(login, arrival)
        };
        let cases = [
            ("John", "192.0.2.10", None, "john@example.org", true),
            ("john", "::ffff:192.0.2.10", None, "john@example.org", true),
            ("john", "2001:db8::10", None, "john@example.net", true),
            ("john", "192.0.2.99", None, "john@example.com", true),
            (
                "john",
                "192.0.2.10",
                Some("MAIL.example.ORG"),
                "john@example.org",
                true,
            ),
            // By the address, under a host name that has no domain: a login to the same host
            // from another address would get another domain, so no alias may be cached.
            (
                "john",
                "192.0.2.10",
                Some("other.host"),
                "john@example.org",
                false,
            ),
            (
                "john",
                "192.0.2.99",
                Some("other.host"),
                "john@example.com",
                false,
            ),
            (
                "John@Example.NET",
                "192.0.2.10",
                Some("other.host"),
                "john@example.net",
                true,
            ),
        ];
        for (login, proxy_ip, vhost, account, scoped) in cases {
            assert_eq!(
                qualify(login, proxy_ip, vhost),
                (account.to_string(), scoped),
                "{login} at {proxy_ip} {vhost:?}"
            );
        }
        let no_ip_domains = Directory::parse("default-domain example.com\n").unwrap();
        let arrival = Arrival {
            proxy_ip: None,
            vhost: Some("other.host"),
        };
        assert_eq!(
            no_ip_domains.qualify_arriving("john", arrival),
            ("john@example.com".to_string(), true),
            "with no domain-ip line the default does not depend on the address"
        );
    }

    #[test]
    fn without_default_domain_names_stay_as_given() {
        let directory = Directory::parse("account dave mbs-1\n").unwrap();
        assert_eq!(directory.qualify("Dave"), "dave");
        assert_eq!(directory.server_of("dave"), Some("mbs-1"));
    }

    #[test]
    fn bad_lines_are_rejected_with_their_number() {
        let cases = [
            ("account a", 1, "expected `account <account> <server>`"),
            ("\n\nalias a", 3, "expected `alias <login> <account>`"),
            ("default-domain", 1, "expected `default-domain <domain>`"),
            ("user a b", 1, "unknown entry \"user\""),
            (
                "default-domain a.b\ndefault-domain c.d",
                2,
                "second default-domain",
            ),
            ("default-domain a@b", 1, "contains '@'"),
            ("account a@b s\naccount A@B t", 2, "listed twice"),
            ("account a@b s\nalias a@b x@y", 2, "also an account"),
            ("alias a@b x@y\nalias a@b z@y", 2, "listed twice"),
            ("alias a@b a@b", 1, "names itself"),
            ("domain-ip mail.example.org b.c", 1, "not an IP address"),
            ("domain-ip 192.0.2.1 a@b", 1, "contains '@'"),
            (
                "domain-ip 192.0.2.1 b.c\ndomain-ip 192.0.2.1 d.e",
                2,
                "listed twice",
            ),
            (
                "domain-vhost a.b c.d\ndomain-vhost A.B e.f",
                2,
                "listed twice",
            ),
            (
                "domain-vhost a.b",
                1,
                "expected `domain-vhost <host name> <domain>`",
            ),
        ];
        for (text, line, message) in cases {
            let error = Directory::parse(text).unwrap_err();
            assert_eq!(error.line, line, "{text:?}: {error}");
            assert!(error.message.contains(message), "{text:?}: {error}");
        }
    }
}
