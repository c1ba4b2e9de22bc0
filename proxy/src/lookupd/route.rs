//! Where lookupd sends a login, decided from the route table and the directory alone (no I/O).
//!
//! Order: the route table's pinned account, then the directory's account, then the route
//! table's domain entry. A draining server gets no new routes: its domains are skipped, and an
//! account pinned to it or put on it by the directory is refused, saying so, rather than sent to
//! a domain's server where its mailbox does not live. So is an account the directory puts on a
//! server the route table does not list.

use mailproxy_crds::route_table::RouteTable;

use super::directory::{Arrival, Directory};
use crate::route::Protocol;

/// A login's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Routed<'a> {
    /// MailboxServer name, for the log.
    pub server: &'a str,
    /// Host name or IP address from the route table.
    pub host: &'a str,
    pub port: u16,
    /// The qualified account name to log in upstream as.
    pub account: String,
    /// Zimbra's rule: the account is in the default domain, so its short alias may be cached;
    /// not when the name was qualified by something the proxy's alias key does not hold.
    pub cache_alias: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision<'a> {
    Route(Routed<'a>),
    /// No route; the reason is for the log only (clients get Zimbra's generic message).
    Refuse(String),
    /// The table pins the account to this server, or the directory puts it there, and it is
    /// draining: refused too, and the refusal says so, since no other server holds the mailbox
    /// (a proxy must not fall back to a domain's server).
    Draining {
        server: &'a str,
    },
    /// The directory puts the account on this server, which the route table does not list (the
    /// two files change separately, so one may be ahead of the other): refused, saying so, for
    /// the same reason as [`Decision::Draining`].
    Unlisted {
        server: String,
    },
}

pub(crate) fn decide<'a>(
    table: &'a RouteTable,
    directory: &Directory,
    login: &str,
    arrival: Arrival<'_>,
    protocol: Protocol,
) -> Decision<'a> {
    let (qualified, scoped) = directory.qualify_arriving(login, arrival);
    let account = directory.account_of(&qualified).to_string();
    let domain = account.rsplit_once('@').map(|(_, domain)| domain);
    let (name, server) = if let Some((name, server)) = table.pinned_account(&account) {
        if server.draining {
            return Decision::Draining { server: name };
        }
        (name, server)
    } else if let Some(name) = directory.server_of(&account) {
        match table.servers.get_key_value(name) {
            None => {
                return Decision::Unlisted {
                    server: name.to_string(),
                };
            }
            Some((name, server)) if server.draining => {
                return Decision::Draining { server: name };
            }
            Some((name, server)) => (name.as_str(), server),
        }
    } else if let Some(pinned) = domain.and_then(|domain| table.pinned_domain(domain)) {
        pinned
    } else {
        return Decision::Refuse(format!("no route for {account}"));
    };
    let port = protocol.port_of(&server.ports);
    let Some(port) = u16::try_from(port).ok().filter(|port| *port != 0) else {
        return Decision::Refuse(format!(
            "the route table gives {name} {protocol} port {port}"
        ));
    };
    Decision::Route(Routed {
        server: name,
        host: &server.host,
        port,
        cache_alias: scoped && domain.is_some() && domain == directory.default_domain(),
        account,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::from_json(
            r#"{
                "servers": {
                    "mbs-1": {"host": "10.0.0.1", "ports": {"imap": 1143, "pop3": 1110}},
                    "mbs-2": {"host": "mbs-2.mail.svc"},
                    "old": {"host": "10.0.0.9", "draining": true},
                    "odd": {"host": "10.0.0.8", "ports": {"imap": 70000}}
                },
                "accounts": {"pinned@example.com": "mbs-2", "gone@example.com": "old"},
                "domains": {"example.org": "mbs-2"}
            }"#,
        )
        .unwrap()
    }

    fn directory() -> Directory {
        Directory::parse(
            "default-domain example.com\n\
             account alice mbs-1\n\
             account pinned mbs-1\n\
             account moving mbs-x\n\
             account leaving old\n\
             account weird odd\n\
             alias al alice\n",
        )
        .unwrap()
    }

    fn route<'a>(table: &'a RouteTable, login: &str, protocol: Protocol) -> Decision<'a> {
        decide(table, &directory(), login, Arrival::default(), protocol)
    }

    fn routed(
        server: &'static str,
        host: &'static str,
        port: u16,
        account: &str,
        cache_alias: bool,
    ) -> Decision<'static> {
        Decision::Route(Routed {
            server,
            host,
            port,
            account: account.to_string(),
            cache_alias,
        })
    }

    #[test]
    fn directory_accounts_aliases_and_default_domain() {
        let table = table();
        assert_eq!(
            route(&table, "alice", Protocol::Imap),
            routed("mbs-1", "10.0.0.1", 1143, "alice@example.com", true)
        );
        assert_eq!(
            route(&table, "AL@Example.com", Protocol::Pop3),
            routed("mbs-1", "10.0.0.1", 1110, "alice@example.com", true)
        );
    }

    #[test]
    fn table_pins_win_and_domains_catch_the_rest() {
        let table = table();
        assert_eq!(
            route(&table, "pinned", Protocol::ImapSsl),
            routed("mbs-2", "mbs-2.mail.svc", 7993, "pinned@example.com", true)
        );
        assert_eq!(
            route(&table, "anyone@example.org", Protocol::HttpSsl),
            routed("mbs-2", "mbs-2.mail.svc", 8443, "anyone@example.org", false)
        );
        assert_eq!(
            route(&table, "anyone@example.org", Protocol::Pop3Ssl),
            routed("mbs-2", "mbs-2.mail.svc", 7995, "anyone@example.org", false)
        );
    }

    #[test]
    fn refusals() {
        let table = table();
        for (login, reason) in [
            ("nobody", "no route for nobody@example.com"),
            ("weird", "port 70000"),
        ] {
            match route(&table, login, Protocol::Imap) {
                Decision::Refuse(text) => assert!(text.contains(reason), "{login}: {text}"),
                other => panic!("{login} must be refused, got {other:?}"),
            }
        }
        // In the directory, or pinned in the table: on the draining server either way.
        for login in ["leaving", "gone"] {
            assert_eq!(
                route(&table, login, Protocol::Imap),
                Decision::Draining { server: "old" },
                "{login}"
            );
        }
        // Not a refusal: the mailbox is on mbs-x, whatever the table's domains say.
        assert_eq!(
            route(&table, "moving", Protocol::Imap),
            Decision::Unlisted {
                server: "mbs-x".to_string()
            }
        );
    }
}
