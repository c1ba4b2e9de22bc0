//! `kubectl mailproxy`: zmprov-style views of a pool's route table and a status overview.
//! The rendering is pure; the binary only fetches objects.

use std::collections::BTreeMap;
use std::fmt::Write;

use mailproxy_crds::ProxyPool;
use mailproxy_crds::route_table::RouteTable;

/// The zmprov commands the route table answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Zmprov {
    /// getAllReverseProxyURLs: Route Lookup Handler URLs.
    Garpu,
    /// getAllReverseProxyBackends: web backends as nginx server lines.
    Garpb,
    /// getAllMtaAuthURLs: MTA authentication URLs.
    Gamau,
    /// getAllMemcachedServers: the pool's memcached servers.
    Gamcs,
}

/// The answer to a zmprov command, newline-terminated.
pub fn zmprov(table: &RouteTable, command: Zmprov) -> String {
    let text = match command {
        Zmprov::Garpu => table.garpu(),
        Zmprov::Garpb => return table.garpb(),
        Zmprov::Gamau => table.gamau(),
        Zmprov::Gamcs => table.gamcs(),
    };
    format!("{text}\n")
}

/// What `kubectl mailproxy status` found of one pool's route table.
pub type TableRead = Result<RouteTable, String>;

/// A status overview of `pools`, with the servers of each pool's route table (`tables`, by pool
/// name: the table, or why it could not be read; absent when it is not written yet).
pub fn render_status(pools: &[ProxyPool], tables: &BTreeMap<String, TableRead>) -> String {
    if pools.is_empty() {
        return "No ProxyPools found.\n".to_string();
    }
    let mut out = String::new();
    for pool in pools {
        let name = pool.metadata.name.as_deref().unwrap_or_default();
        let status = pool.status.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "ProxyPool {name}: {}/{} proxies ready, {} MailboxServers, route table {}, generation {} (observed {})",
            status.ready_replicas,
            pool.spec.replicas,
            status.mailbox_servers,
            status.route_table_version.as_deref().unwrap_or("-"),
            pool.metadata.generation.unwrap_or_default(),
            status
                .observed_generation
                .map_or_else(|| "-".to_string(), |g| g.to_string()),
        );
        for condition in &status.conditions {
            let _ = writeln!(
                out,
                "  {}={} {}: {}",
                condition.type_, condition.status, condition.reason, condition.message
            );
        }
        match tables.get(name) {
            Some(Ok(table)) if !table.servers.is_empty() => {
                let servers: Vec<String> = table
                    .servers
                    .iter()
                    .map(|(server, route)| {
                        let draining = if route.draining { ", draining" } else { "" };
                        format!("{server} ({}{draining})", route.host)
                    })
                    .collect();
                let _ = writeln!(out, "  servers: {}", servers.join(", "));
            }
            Some(Ok(_)) => {
                let _ = writeln!(out, "  servers: none selected");
            }
            Some(Err(error)) => {
                let _ = writeln!(out, "  servers: route table unreadable: {error}");
            }
            None => {
                let _ = writeln!(out, "  servers: route table not written yet");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;
    use mailproxy_crds::ProxyPoolStatus;
    use mailproxy_crds::route_table::RouteServer;

    #[test]
    fn zmprov_answers_from_the_table() {
        let table = RouteTable {
            lookup_handlers: vec!["http://a:7072/x".into(), "http://b:7072/x".into()],
            memcached_servers: vec!["m:11211".into()],
            ..RouteTable::default()
        };
        assert_eq!(zmprov(&table, Zmprov::Garpu), "a:7072/x b:7072/x \n");
        assert_eq!(zmprov(&table, Zmprov::Gamcs), "m:11211 \n");
        assert_eq!(zmprov(&table, Zmprov::Gamau), "\n");
        assert_eq!(
            zmprov(&table, Zmprov::Garpb),
            "    server localhost:8080;\n"
        );
    }

    #[test]
    fn status_lists_conditions_and_servers() {
        let mut pool = ProxyPool::new(
            "main",
            serde_json::from_value(
                serde_json::json!({"mailboxSelector": {"matchLabels": {"a": "b"}}}),
            )
            .unwrap(),
        );
        pool.metadata.generation = Some(2);
        pool.status = Some(ProxyPoolStatus {
            observed_generation: Some(2),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "ProxiesNotReady".into(),
                message: "0 of 2 proxy pods ready".into(),
                observed_generation: Some(2),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            mailbox_servers: 1,
            route_table_version: Some("abc".into()),
            ..ProxyPoolStatus::default()
        });
        let mut table = RouteTable::default();
        table.servers.insert(
            "mbs1".into(),
            RouteServer {
                host: "10.0.0.1".into(),
                ports: Default::default(),
                draining: true,
                mail_upstream: Default::default(),
            },
        );
        let text = render_status(
            std::slice::from_ref(&pool),
            &BTreeMap::from([("main".to_string(), Ok(table))]),
        );
        assert!(
            text.contains("ProxyPool main: 0/2 proxies ready, 1 MailboxServers, route table abc"),
            "{text}"
        );
        assert!(
            text.contains("  Ready=False ProxiesNotReady: 0 of 2 proxy pods ready"),
            "{text}"
        );
        assert!(
            text.contains("  servers: mbs1 (10.0.0.1, draining)"),
            "{text}"
        );
        let unreadable = render_status(
            &[pool],
            &BTreeMap::from([("main".to_string(), Err("not JSON".to_string()))]),
        );
        assert!(
            unreadable.contains("  servers: route table unreadable: not JSON"),
            "{unreadable}"
        );
        assert_eq!(
            render_status(&[], &BTreeMap::new()),
            "No ProxyPools found.\n"
        );
    }
}
