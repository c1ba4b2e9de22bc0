//! The route table's servers by IP address.
//!
//! A Route Lookup Handler answers with an IP address (Zimbra's protocol: `Auth-Server` is an IP
//! literal; `mailproxy lookupd` resolves host names), while a MailboxServer is most often named
//! by a host name (`spec.host`, or its Service's cluster name). To know which server a learned
//! route points at (its `mailUpstream` settings, whether it is draining), the proxy resolves
//! the table's host names itself, when the table changes and every [`REFRESH_INTERVAL`].
//!
//! A server missing from the index loses its settings: a server that needs TLS upstream would
//! get the user's password in clear, a draining one new sessions. So a name that fails to
//! resolve for a reason that may pass (a timeout, SERVFAIL) keeps its last known addresses; only
//! "no such name", or the server leaving the table, removes them. And a login whose table names
//! servers the index has not resolved yet (the proxy just started, or the table just gained
//! them) waits for that resolution: see [`ServerAddresses::index_for`].

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::join_all;
use mailproxy_crds::route_table::RouteTable;
use tokio::sync::watch;

use crate::dns::Dns;

/// How often host names are resolved again while the table stays the same (a Service's
/// ClusterIP is stable, an external name may move).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// Bound on resolving one host name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a login waits for the index to cover its table. Host names are resolved at once, so
/// a refresh takes at most [`RESOLVE_TIMEOUT`]; twice that also covers a refresh of the previous
/// table that was still running when the login's table arrived.
const COVER_WAIT: Duration = Duration::from_secs(2 * RESOLVE_TIMEOUT.as_secs());

/// The address a host written as an IP literal (bracketed or not) stands for, canonical: an
/// IPv4-mapped IPv6 address is its IPv4 address, so that every spelling of one address compares
/// equal.
pub(crate) fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// The table's servers named by a host name rather than an IP literal, with that name.
fn named_servers(table: &RouteTable) -> impl Iterator<Item = (&String, &str)> {
    table
        .servers
        .iter()
        .filter(|(_, server)| ip_literal(&server.host).is_none())
        .map(|(name, server)| (name, server.host.as_str()))
}

/// What the host names of one table resolved to.
#[derive(Debug, Default)]
pub struct AddressIndex {
    /// The table it was built for: a login with that very table needs no further check.
    table: Option<Arc<RouteTable>>,
    /// The host name of each server it was built for.
    hosts_of: HashMap<String, String>,
    /// Each of those host names' last known addresses (none: it never resolved, or no longer
    /// exists).
    addresses: HashMap<String, Vec<IpAddr>>,
    /// Server names by canonical address.
    by_ip: HashMap<IpAddr, Vec<String>>,
}

impl AddressIndex {
    /// The names of the servers whose host name resolved to `ip` (servers named by an IP
    /// address are found by the table itself).
    pub fn servers_at(&self, ip: IpAddr) -> &[String] {
        self.by_ip
            .get(&ip.to_canonical())
            .map_or(&[], Vec::as_slice)
    }

    /// Whether every server `table` names by a host name was resolved under that name.
    fn covers(&self, table: &Arc<RouteTable>) -> bool {
        if self
            .table
            .as_ref()
            .is_some_and(|built| Arc::ptr_eq(built, table))
        {
            return true;
        }
        named_servers(table)
            .all(|(name, host)| self.hosts_of.get(name).is_some_and(|known| known == host))
    }
}

/// The table's server names by the IP addresses their host names resolve to.
pub struct ServerAddresses {
    dns: Dns,
    index: ArcSwap<AddressIndex>,
    /// Tells logins waiting in [`ServerAddresses::index_for`] that the index was rebuilt.
    rebuilt: watch::Sender<()>,
    /// The table's host names that did not resolve last time, and whether that left them
    /// without addresses: a warning when a name stops resolving or loses its addresses, not
    /// every [`REFRESH_INTERVAL`] while it stays so.
    unresolved: Mutex<HashMap<String, bool>>,
}

impl ServerAddresses {
    /// An empty index whose names `dns` resolves.
    pub fn new(dns: Dns) -> Self {
        Self {
            dns,
            index: ArcSwap::default(),
            rebuilt: watch::Sender::new(()),
            unresolved: Mutex::default(),
        }
    }

    /// The index as it is now, whichever table it was built for.
    pub fn index(&self) -> Arc<AddressIndex> {
        self.index.load_full()
    }

    /// The index, once it has resolved the host names of `table`'s servers: before that, a
    /// route to a server whose name is new would be matched to no server. Waits at most
    /// [`COVER_WAIT`], since nothing may be refreshing the index (no caller of
    /// [`ServerAddresses::refresh`]), then gives the index as it is.
    pub async fn index_for(&self, table: &Arc<RouteTable>) -> Arc<AddressIndex> {
        let index = self.index.load_full();
        if index.covers(table) {
            return index;
        }
        let covered = async {
            // Subscribed before the check: a rebuild in between is not missed.
            let mut rebuilt = self.rebuilt.subscribe();
            loop {
                let index = self.index.load_full();
                if index.covers(table) || rebuilt.changed().await.is_err() {
                    return index;
                }
            }
        };
        match tokio::time::timeout(COVER_WAIT, covered).await {
            Ok(index) => index,
            Err(_) => {
                tracing::debug!(
                    "the route table's host names are not resolved yet; routing with the addresses known so far"
                );
                self.index.load_full()
            }
        }
    }

    /// Resolves the host names of `table`'s servers and rebuilds the index with what they
    /// resolve to now, logging those that do not. A name that does not answer in time or fails
    /// for another reason that may pass keeps its last known addresses; one that does not exist
    /// loses them.
    pub async fn refresh(&self, table: &Arc<RouteTable>) {
        self.refresh_with(table, |host| self.dns.lookup(host)).await;
    }

    /// [`ServerAddresses::refresh`] with `lookup` for [`Dns::lookup`], which answers
    /// [`io::ErrorKind::NotFound`] for a name that does not exist (NXDOMAIN) or has no address
    /// (NODATA), and another error for a failure to find out.
    async fn refresh_with<'t, Lookup, Answer>(&self, table: &'t Arc<RouteTable>, lookup: Lookup)
    where
        Lookup: Fn(&'t str) -> Answer,
        Answer: Future<Output = io::Result<Vec<IpAddr>>>,
    {
        let mut servers_of: HashMap<&str, Vec<&String>> = HashMap::new();
        for (name, host) in named_servers(table) {
            servers_of.entry(host).or_default().push(name);
        }
        let answers = join_all(servers_of.keys().map(|&host| {
            let answer = tokio::time::timeout(RESOLVE_TIMEOUT, lookup(host));
            async move { (host, answer.await) }
        }))
        .await;
        let before = self.index.load_full();
        let mut index = AddressIndex {
            table: Some(table.clone()),
            ..AddressIndex::default()
        };
        let mut unresolved = HashMap::new();
        let mut logged = self
            .unresolved
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (host, answer) in answers {
            let servers = &servers_of[host];
            let known = || before.addresses.get(host).cloned().unwrap_or_default();
            let (addresses, failure) = match answer {
                Ok(Ok(addresses)) => (addresses, None),
                Ok(Err(error)) if error.kind() == io::ErrorKind::NotFound => {
                    (Vec::new(), Some(error.to_string()))
                }
                Ok(Err(error)) => (known(), Some(error.to_string())),
                Err(_) => (
                    known(),
                    Some(format!("no answer within {RESOLVE_TIMEOUT:?}")),
                ),
            };
            if let Some(error) = failure {
                let gone = addresses.is_empty();
                if logged.get(host) == Some(&gone) {
                    tracing::debug!(?servers, host, %error, kept = ?addresses, "a mailbox server's host name still does not resolve");
                } else if gone {
                    tracing::warn!(?servers, host, %error, "a mailbox server's host name does not resolve: routes learned for its address get none of its settings, and a drain does not stop them");
                } else {
                    tracing::warn!(?servers, host, %error, kept = ?addresses, "a mailbox server's host name did not resolve; keeping its last known addresses");
                }
                unresolved.insert(host.to_string(), gone);
            }
            for &ip in &addresses {
                let at = index.by_ip.entry(ip.to_canonical()).or_default();
                for &name in servers {
                    if !at.contains(name) {
                        at.push(name.clone());
                    }
                }
            }
            for &name in servers {
                index.hosts_of.insert(name.clone(), host.to_string());
            }
            index.addresses.insert(host.to_string(), addresses);
        }
        *logged = unresolved;
        drop(logged);
        self.index.store(Arc::new(index));
        self.rebuilt.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(json: &str) -> Arc<RouteTable> {
        Arc::new(RouteTable::from_json(json).unwrap())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[tokio::test]
    async fn host_names_resolve_to_their_servers() {
        let table = table(
            r#"{"servers": {
                "named": {"host": "localhost"},
                "literal": {"host": "10.0.0.9"},
                "nowhere": {"host": "no-such-host.invalid"}
            }}"#,
        );
        let addresses = ServerAddresses::new(Dns::from_system_config());
        assert!(addresses.index().servers_at(ip("127.0.0.1")).is_empty());
        addresses.refresh(&table).await;
        let index = addresses.index();
        assert_eq!(index.servers_at(ip("127.0.0.1")), ["named"]);
        let unresolved = |addresses: &ServerAddresses| addresses.unresolved.lock().unwrap().clone();
        assert_eq!(
            unresolved(&addresses),
            HashMap::from([("no-such-host.invalid".to_string(), true)])
        );
        assert_eq!(
            index.servers_at(ip("::ffff:127.0.0.1")),
            ["named"],
            "an IPv4-mapped answer is the same address"
        );
        assert!(index.servers_at(ip("10.0.0.9")).is_empty());

        let renamed = self::table(r#"{"servers": {"other": {"host": "localhost"}}}"#);
        addresses.refresh(&renamed).await;
        assert_eq!(addresses.index().servers_at(ip("127.0.0.1")), ["other"]);
        assert!(
            unresolved(&addresses).is_empty(),
            "only the current table's names"
        );
    }

    /// What a scripted name server says about `mbs.mail.svc`.
    fn answer(said: &str) -> io::Result<Vec<IpAddr>> {
        match said {
            "servfail" => Err(io::Error::other("mbs.mail.svc did not resolve: SERVFAIL")),
            "nxdomain" => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "mbs.mail.svc did not resolve: no A or AAAA record",
            )),
            address => Ok(vec![ip(address)]),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_keeps_its_addresses_until_it_is_known_to_be_gone() {
        let table = table(r#"{"servers": {"mbs": {"host": "mbs.mail.svc"}}}"#);
        let addresses = ServerAddresses::new(Dns::from_system_config());
        let refresh = |said: &'static str| {
            addresses.refresh_with(&table, move |_| async move { answer(said) })
        };
        let at = |address| addresses.index().servers_at(ip(address)).to_vec();

        refresh("10.0.0.5").await;
        assert_eq!(at("10.0.0.5"), ["mbs"]);
        refresh("servfail").await;
        assert_eq!(at("10.0.0.5"), ["mbs"], "kept through SERVFAIL");
        addresses
            .refresh_with(&table, |_| std::future::pending())
            .await;
        assert_eq!(at("10.0.0.5"), ["mbs"], "kept through a timeout");
        refresh("10.0.0.6").await;
        assert!(at("10.0.0.5").is_empty(), "a new answer replaces the old");
        assert_eq!(at("10.0.0.6"), ["mbs"]);
        refresh("nxdomain").await;
        assert!(at("10.0.0.6").is_empty(), "no such name: gone");
        refresh("servfail").await;
        assert!(at("10.0.0.6").is_empty(), "and stays gone");

        refresh("10.0.0.6").await;
        let without = self::table(r#"{"servers": {}}"#);
        addresses
            .refresh_with(&without, |_| async { answer("servfail") })
            .await;
        assert!(at("10.0.0.6").is_empty(), "the server left the table");
        refresh("servfail").await;
        assert!(at("10.0.0.6").is_empty(), "nothing is remembered of it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_waits_for_its_tables_names_to_be_resolved() {
        let table = table(r#"{"servers": {"mbs": {"host": "mbs.mail.svc"}}}"#);
        let addresses = Arc::new(ServerAddresses::new(Dns::from_system_config()));
        let waiting = tokio::spawn({
            let (addresses, table) = (addresses.clone(), table.clone());
            async move { addresses.index_for(&table).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        addresses
            .refresh_with(&table, |_| async { answer("10.0.0.5") })
            .await;
        let index = waiting.await.unwrap();
        assert_eq!(index.servers_at(ip("10.0.0.5")), ["mbs"]);

        // A table with the same servers is covered at once; one with a new server waits for it,
        // but never longer than COVER_WAIT.
        let same = self::table(r#"{"servers": {"mbs": {"host": "mbs.mail.svc"}}}"#);
        let started = tokio::time::Instant::now();
        addresses.index_for(&same).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        let grown = self::table(
            r#"{"servers": {"mbs": {"host": "mbs.mail.svc"}, "new": {"host": "new.mail.svc"}}}"#,
        );
        addresses.index_for(&grown).await;
        assert_eq!(started.elapsed(), COVER_WAIT);
    }

    #[test]
    fn ip_literals_in_every_spelling_are_one_address() {
        for (host, canonical) in [
            ("fd00:0:0:0:0:0:0:5", "fd00::5"),
            ("[fd00::5]", "fd00::5"),
            ("::ffff:10.0.0.5", "10.0.0.5"),
            ("10.0.0.5", "10.0.0.5"),
        ] {
            assert_eq!(ip_literal(host), Some(ip(canonical)), "{host}");
        }
        assert_eq!(ip_literal("mbs.mail.svc"), None);
    }
}
