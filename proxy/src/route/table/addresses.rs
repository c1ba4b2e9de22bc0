//! The route table's servers by IP address.
//!
//! A Route Lookup Handler answers with an IP address (Zimbra's protocol: `Auth-Server` is an IP
//! literal; `mailproxy lookupd` resolves host names), while a MailboxServer is most often named
//! by a host name (`spec.host`, or its Service's cluster name). To know which server a learned
//! route points at (its `mailUpstream` settings, whether it is draining), the proxy resolves
//! the table's host names itself, when the table changes and every [`REFRESH_INTERVAL`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::join_all;
use mailproxy_crds::route_table::RouteTable;

use crate::dns::Dns;

/// How often host names are resolved again while the table stays the same (a Service's
/// ClusterIP is stable, an external name may move).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// Bound on resolving one host name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The table's server names by the IP addresses their host names resolve to.
pub struct ServerAddresses {
    dns: Dns,
    by_ip: ArcSwap<HashMap<IpAddr, Vec<String>>>,
    /// The table's host names that did not resolve last time: a warning when a name stops
    /// resolving, not every [`REFRESH_INTERVAL`] while it stays so.
    unresolved: Mutex<HashSet<String>>,
}

impl ServerAddresses {
    /// An empty index whose names `dns` resolves.
    pub fn new(dns: Dns) -> Self {
        Self {
            dns,
            by_ip: ArcSwap::default(),
            unresolved: Mutex::default(),
        }
    }

    /// The names of the servers whose host name resolved to `ip` (servers named by an IP
    /// address are found by the table itself).
    pub fn servers_at(&self, ip: IpAddr) -> Vec<String> {
        self.by_ip
            .load()
            .get(&ip.to_canonical())
            .cloned()
            .unwrap_or_default()
    }

    /// Resolves the host names of `table`'s servers and replaces the index with what they
    /// resolve to now. A name that does not resolve (in time) is left out and logged.
    pub async fn refresh(&self, table: &RouteTable) {
        let names = table
            .servers
            .iter()
            .filter(|(_, server)| server.host.parse::<IpAddr>().is_err());
        let resolved = join_all(names.map(|(name, server)| async move {
            let host = server.host.as_str();
            let addresses = match tokio::time::timeout(RESOLVE_TIMEOUT, self.dns.lookup(host)).await
            {
                Ok(Ok(addresses)) => Ok(addresses),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
            };
            (name, host, addresses)
        }))
        .await;
        let mut by_ip: HashMap<IpAddr, Vec<String>> = HashMap::new();
        let mut unresolved = HashSet::new();
        let mut before = self.unresolved.lock().unwrap_or_else(|e| e.into_inner());
        for (name, host, addresses) in resolved {
            match addresses {
                Ok(addresses) => {
                    for ip in addresses {
                        let names = by_ip.entry(ip.to_canonical()).or_default();
                        if !names.contains(name) {
                            names.push(name.clone());
                        }
                    }
                }
                Err(error) => {
                    if before.contains(host) {
                        tracing::debug!(server = %name, host, %error, "a mailbox server's host name still does not resolve");
                    } else {
                        tracing::warn!(server = %name, host, %error, "a mailbox server's host name does not resolve: routes learned for its address get none of its settings, and a drain does not stop them");
                    }
                    unresolved.insert(host.to_string());
                }
            }
        }
        *before = unresolved;
        drop(before);
        self.by_ip.store(Arc::new(by_ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_names_resolve_to_their_servers() {
        let table = RouteTable::from_json(
            r#"{"servers": {
                "named": {"host": "localhost"},
                "literal": {"host": "10.0.0.9"},
                "nowhere": {"host": "no-such-host.invalid"}
            }}"#,
        )
        .unwrap();
        let addresses = ServerAddresses::new(Dns::from_system_config());
        assert!(
            addresses
                .servers_at("127.0.0.1".parse().unwrap())
                .is_empty()
        );
        addresses.refresh(&table).await;
        assert_eq!(
            addresses.servers_at("127.0.0.1".parse().unwrap()),
            ["named"]
        );
        let unresolved = |addresses: &ServerAddresses| addresses.unresolved.lock().unwrap().clone();
        assert_eq!(
            unresolved(&addresses),
            HashSet::from(["no-such-host.invalid".to_string()])
        );
        assert_eq!(
            addresses.servers_at("::ffff:127.0.0.1".parse().unwrap()),
            ["named"],
            "an IPv4-mapped answer is the same address"
        );
        assert!(addresses.servers_at("10.0.0.9".parse().unwrap()).is_empty());

        let renamed =
            RouteTable::from_json(r#"{"servers": {"other": {"host": "localhost"}}}"#).unwrap();
        addresses.refresh(&renamed).await;
        assert_eq!(
            addresses.servers_at("127.0.0.1".parse().unwrap()),
            ["other"]
        );
        assert!(
            unresolved(&addresses).is_empty(),
            "only the current table's names"
        );
    }
}
