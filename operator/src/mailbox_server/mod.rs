//! The MailboxServer controller: reports which pools route to each server and, through the
//! `mailproxy.io/purge-routes` finalizer, purges a deleted server's cached routes from the pools'
//! memcached before it goes.

pub mod finalizer;
pub mod purge;
pub mod reconcile;

use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use mailproxy_crds::{MailboxServer, ProxyPool};

use crate::Context;
use crate::backoff::watch_backoff;
use crate::error::{Error, Result};
use crate::proxy_pool::selects;

/// The controller's name in metrics.
pub const CONTROLLER: &str = "mailboxserver";
/// Held until the server's cached routes are purged.
pub const FINALIZER: &str = "mailproxy.io/purge-routes";

/// What a MailboxServer reconcile needs.
pub struct State {
    pub ctx: Arc<Context>,
}

/// Names of the pools (in the server's namespace) whose selector matches it, sorted.
pub fn selecting_pools(pools: &[ProxyPool], server: &MailboxServer) -> Vec<String> {
    let mut names: Vec<String> = pools
        .iter()
        .filter(|pool| pool.metadata.deletion_timestamp.is_none() && selects(pool, server))
        .map(|pool| pool.name_any())
        .collect();
    names.sort();
    names
}

/// The pools that select `server`, listed from the API server rather than read from a store: a
/// reconcile triggered by a pool change must see that change, and the only store that has
/// surely applied it is the trigger's own watch, which kube-runtime does not expose. The ProxyPool
/// controller's store is a separate watch that may lag; a status computed from it would stay
/// stale until the next change. A list is a consistent read of a namespace's few pools.
pub async fn pools_selecting(client: &Client, server: &MailboxServer) -> Result<Vec<String>> {
    let namespace = server.namespace().unwrap_or_default();
    let pools = Api::<ProxyPool>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::List {
            kind: "ProxyPool",
            namespace: namespace.clone(),
            source,
        })?;
    Ok(selecting_pools(&pools.items, server))
}

/// The servers to reconcile when `pool` changes: those it selects and those that list it.
/// Servers still without the finalizer are left to their own events: their first reconcile adds
/// it, and a second one started from a cache that has not seen that write yet would fail to add
/// it again.
pub fn servers_for_pool(
    servers: &[Arc<MailboxServer>],
    pool: &ProxyPool,
) -> Vec<ObjectRef<MailboxServer>> {
    let name = pool.name_any();
    servers
        .iter()
        .filter(|server| server.finalizers().iter().any(|f| f == FINALIZER))
        .filter(|server| {
            selects(pool, server)
                || (server.namespace() == pool.namespace()
                    && server
                        .status
                        .as_ref()
                        .is_some_and(|s| s.pools.contains(&name)))
        })
        .map(|server| ObjectRef::from_obj(server.as_ref()))
        .collect()
}

pub fn controller(ctx: &Context) -> Controller<MailboxServer> {
    let client = ctx.client.clone();
    let settings = &ctx.settings;
    let servers = Controller::new(
        settings.scoped_api::<MailboxServer>(client.clone()),
        watcher::Config::default(),
    )
    .with_config(controller::Config::default().concurrency(16))
    .trigger_backoff(watch_backoff());
    let store = servers.store();
    servers.watches(
        settings.scoped_api::<ProxyPool>(client),
        watcher::Config::default(),
        move |pool| servers_for_pool(&store.state(), &pool),
    )
}

pub fn error_policy(server: Arc<MailboxServer>, error: &Error, state: Arc<State>) -> Action {
    let key = format!(
        "{}/{}",
        server.namespace().unwrap_or_default(),
        server.name_any()
    );
    state
        .ctx
        .metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    let delay = state.ctx.backoff(&format!("mbs:{key}"));
    tracing::warn!(server = %key, %error, retry_in = ?delay, "MailboxServer reconcile failed");
    Action::requeue(delay)
}

pub async fn run(controller: Controller<MailboxServer>, state: Arc<State>) {
    controller
        .run(reconcile::reconcile, error_policy, state)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "MailboxServer controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_pool::build::fixtures::spec;
    use mailproxy_crds::MailboxServerStatus;
    use serde_json::json;

    fn pool(name: &str, value: &str) -> ProxyPool {
        let mut pool = ProxyPool::new(
            name,
            spec(json!({"mailboxSelector": {"matchLabels": {"pool": value}}})),
        );
        pool.metadata.namespace = Some("mail".into());
        pool
    }

    fn server(name: &str, label: &str, listed: &[&str]) -> Arc<MailboxServer> {
        let mut server =
            MailboxServer::new(name, serde_json::from_value(json!({"host": "h"})).unwrap());
        server.metadata.namespace = Some("mail".into());
        server.metadata.labels = Some([("pool".to_string(), label.to_string())].into());
        server.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        server.status = Some(MailboxServerStatus {
            pools: listed.iter().map(|p| p.to_string()).collect(),
            ..MailboxServerStatus::default()
        });
        Arc::new(server)
    }

    #[test]
    fn selection_and_pool_to_server_mapping() {
        let pools = vec![pool("b", "x"), pool("a", "x"), pool("c", "y")];
        assert_eq!(selecting_pools(&pools, &server("s", "x", &[])), ["a", "b"]);
        let mut deleting = pool("d", "x");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(selecting_pools(&[deleting], &server("s", "x", &[])).is_empty());

        let mut new = server("new", "x", &[]).as_ref().clone();
        new.metadata.finalizers = None;
        let servers = vec![
            server("one", "x", &[]),
            server("two", "y", &["a"]),
            server("three", "z", &[]),
            Arc::new(new),
        ];
        let names: Vec<String> = servers_for_pool(&servers, &pool("a", "x"))
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["one", "two"]);
    }
}
