//! Deleting a MailboxServer: wait (bounded) until the pools' route tables no longer list it, then
//! purge its pinned accounts' cached routes from every pool's memcached, then let it go. An
//! unreachable memcached is logged, reported as an Event and skipped after a bounded timeout:
//! a memcached nobody can reach serves no stale route either. One that took the connection and
//! failed (busy, or answering nonsense) is retried, with backoff, for five minutes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use mailproxy_crds::MailboxServer;
use mailproxy_crds::route_table::{CONFIGMAP_KEY, RouteTable};

use super::purge::{PurgeError, purge, route_keys};
use super::{State, pools_selecting};
use crate::error::{Error, Result, kube_error};
use crate::labels::names;

/// What the pools' route tables say about a server being deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// Pools whose table still lists the server.
    pub still_listing: Vec<String>,
    /// memcached servers of every pool (zmprov gamcs), deduplicated.
    pub memcached: BTreeSet<String>,
}

/// Reads the route tables of `pools`; a missing or unreadable table lists nothing.
pub fn inspect<'a>(
    server: &str,
    tables: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Tables {
    let mut result = Tables::default();
    for (pool, text) in tables {
        let Some(table) = text.and_then(|text| RouteTable::from_json(text).ok()) else {
            continue;
        };
        if table.servers.contains_key(server) {
            result.still_listing.push(pool.to_string());
        }
        result.memcached.extend(table.memcached_servers);
    }
    result
}

async fn read_tables(
    client: &kube::Client,
    namespace: &str,
    server: &str,
    pools: &BTreeSet<String>,
) -> Result<Tables> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut texts = Vec::new();
    for pool in pools {
        let name = names::routes(pool);
        let map = api
            .get_opt(&name)
            .await
            .map_err(kube_error::<ConfigMap>("get", namespace, &name))?;
        texts.push((
            pool.as_str(),
            map.and_then(|m| m.data)
                .and_then(|mut d| d.remove(CONFIGMAP_KEY)),
        ));
    }
    Ok(inspect(
        server,
        texts.iter().map(|(pool, text)| (*pool, text.as_deref())),
    ))
}

pub async fn cleanup(server: &MailboxServer, state: &State) -> Result<Action> {
    let ctx = &state.ctx;
    let namespace = server.namespace().unwrap_or_default();
    let name = server.name_any();
    let reference = server.object_ref(&());
    let mut pools: BTreeSet<String> = server
        .status
        .as_ref()
        .map(|s| s.pools.iter().cloned().collect())
        .unwrap_or_default();
    pools.extend(pools_selecting(&ctx.client, server).await?);

    // The pools drop the server from their tables as soon as they see it is being deleted;
    // purging before that could let a proxy cache a route to it again.
    let deadline = Instant::now() + ctx.settings.route_table_wait;
    let tables = loop {
        let tables = read_tables(&ctx.client, &namespace, &name, &pools).await?;
        if tables.still_listing.is_empty() {
            break tables;
        }
        if Instant::now() >= deadline {
            let message = format!(
                "route tables of pools {} still list this server after {:?} (is the pool \
                 invalid?); purging its cached routes anyway",
                tables.still_listing.join(", "),
                ctx.settings.route_table_wait
            );
            tracing::warn!(server = %name, %namespace, "{message}");
            ctx.event(
                &reference,
                EventType::Warning,
                "RouteTablesNotUpdated",
                "Purge",
                message,
            )
            .await;
            break tables;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let keys = route_keys(&server.spec.accounts);
    if keys.is_empty() || tables.memcached.is_empty() {
        tracing::info!(server = %name, %namespace, "no cached routes to purge");
        return Ok(Action::await_change());
    }
    let deleting_for = server
        .metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|since| Duration::try_from(Timestamp::now() - since.0).ok())
        .unwrap_or_default();
    let mut purged = Vec::new();
    let mut failed = Vec::new();
    for addr in &tables.memcached {
        let error = match purge(addr, &keys, ctx.settings.purge_timeout).await {
            Ok(result) => {
                ctx.metrics.purge_done("purged");
                tracing::info!(server = %name, memcached = %addr, deleted = result.deleted, "purged cached routes");
                purged.push(format!("{addr} ({} deleted)", result.deleted));
                continue;
            }
            Err(error) => error,
        };
        let why = match after_failure(&error, deleting_for) {
            AfterFailure::Retry => {
                ctx.metrics.purge_done("retried");
                failed.push(error.to_string());
                continue;
            }
            AfterFailure::Skip => {
                "its cached routes were not purged (an unreachable memcached serves none either)"
            }
            AfterFailure::GiveUp => {
                "its cached routes were not purged: given up after retrying for 5 minutes; they \
                 expire with the pool's cache TTL"
            }
        };
        ctx.metrics.purge_done("unreachable");
        tracing::warn!(server = %name, %error, "cannot purge cached routes; skipping this memcached");
        ctx.event(
            &reference,
            EventType::Warning,
            "PurgeSkipped",
            "Purge",
            format!("{error}; {why}"),
        )
        .await;
    }
    if !failed.is_empty() {
        // The finalizer stays: the reconcile is retried with backoff, every memcached again.
        return Err(Error::PurgeIncomplete(failed.join("; ")));
    }
    if !purged.is_empty() {
        ctx.event(
            &reference,
            EventType::Normal,
            "RoutesPurged",
            "Purge",
            format!(
                "purged the cached routes of {} accounts from {}",
                server.spec.accounts.len(),
                purged.join(", ")
            ),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// How long a purge that failed on a reachable memcached is retried before the server is let
/// go anyway.
const PURGE_RETRY_WINDOW: Duration = Duration::from_secs(300);

#[derive(Debug, PartialEq, Eq)]
enum AfterFailure {
    /// Try again: the memcached took the connection, so it may serve the stale routes.
    Retry,
    /// Go on without it: it refused the connection or its name is gone, so nothing reads
    /// routes from it.
    Skip,
    /// Go on: retried for [`PURGE_RETRY_WINDOW`] already; the routes expire with their TTL.
    GiveUp,
}

fn after_failure(error: &PurgeError, deleting_for: Duration) -> AfterFailure {
    if error.unreachable() {
        AfterFailure::Skip
    } else if deleting_for < PURGE_RETRY_WINDOW {
        AfterFailure::Retry
    } else {
        AfterFailure::GiveUp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reachable_memcached_that_failed_is_retried_for_a_while() {
        let addr = "m0:11211".to_string();
        let unreachable = PurgeError::Unreachable {
            addr: addr.clone(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        let silent = PurgeError::Timeout {
            addr,
            timeout: Duration::from_secs(3),
        };
        let early = Duration::from_secs(10);
        assert_eq!(after_failure(&unreachable, early), AfterFailure::Skip);
        assert_eq!(after_failure(&silent, early), AfterFailure::Retry);
        assert_eq!(
            after_failure(&silent, PURGE_RETRY_WINDOW),
            AfterFailure::GiveUp
        );
    }

    #[test]
    fn inspect_reports_listing_pools_and_their_memcached() {
        let listing =
            r#"{"servers": {"gone": {"host": "h"}}, "memcachedServers": ["m0:11211", "m1:11211"]}"#;
        let dropped = r#"{"servers": {}, "memcachedServers": ["m1:11211", "n0:11211"]}"#;
        let tables = inspect(
            "gone",
            [
                ("a", Some(listing)),
                ("b", Some(dropped)),
                ("c", None),
                ("d", Some("garbage")),
            ],
        );
        assert_eq!(tables.still_listing, ["a"]);
        assert_eq!(
            tables.memcached.into_iter().collect::<Vec<_>>(),
            ["m0:11211", "m1:11211", "n0:11211"]
        );
    }
}
