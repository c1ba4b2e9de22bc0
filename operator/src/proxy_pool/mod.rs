//! The ProxyPool controller: watches pools, their children (`.owns`) and the MailboxServers
//! their selectors match (`.watches`), and reconciles each pool into its children.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod reconcile;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use mailproxy_crds::{MailboxServer, ProxyPool};

use crate::Context;
use crate::backoff::watch_backoff;
use crate::error::Error;
use crate::labels::{MANAGED_BY_KEY, MANAGED_BY_VALUE};

/// The controller's name in metrics.
pub const CONTROLLER: &str = "proxypool";

/// Whether `pool` routes to `server`: same namespace, and the pool's selector matches the
/// server's labels.
pub fn selects(pool: &ProxyPool, server: &MailboxServer) -> bool {
    pool.namespace() == server.namespace()
        && Selector::try_from(pool.spec.mailbox_selector.clone())
            .is_ok_and(|selector| selector.matches(server.labels()))
}

/// The pools to reconcile when `server` changes: those that select it now and those its status
/// says routed to it (its labels may have moved it away from them).
pub fn pools_for_server(
    pools: &[Arc<ProxyPool>],
    server: &MailboxServer,
) -> Vec<ObjectRef<ProxyPool>> {
    let listed: Vec<String> = server
        .status
        .as_ref()
        .map(|s| s.pools.clone())
        .unwrap_or_default();
    pools
        .iter()
        .filter(|pool| {
            selects(pool, server)
                || (pool.namespace() == server.namespace() && listed.contains(&pool.name_any()))
        })
        .map(|pool| ObjectRef::from_obj(pool.as_ref()))
        .collect()
}

/// Builds the controller with its watches.
pub fn controller(ctx: &Context) -> Controller<ProxyPool> {
    let client = ctx.client.clone();
    let settings = &ctx.settings;
    let children =
        watcher::Config::default().labels(&format!("{MANAGED_BY_KEY}={MANAGED_BY_VALUE}"));
    let pools = Controller::new(
        settings.scoped_api::<ProxyPool>(client.clone()),
        watcher::Config::default(),
    )
    .with_config(controller::Config::default().debounce(Duration::from_millis(100)))
    .trigger_backoff(watch_backoff());
    let store = pools.store();
    pools
        .owns(
            settings.scoped_api::<ServiceAccount>(client.clone()),
            children.clone(),
        )
        .owns(
            settings.scoped_api::<Role>(client.clone()),
            children.clone(),
        )
        .owns(
            settings.scoped_api::<RoleBinding>(client.clone()),
            children.clone(),
        )
        .owns(
            settings.scoped_api::<ConfigMap>(client.clone()),
            children.clone(),
        )
        .owns(
            settings.scoped_api::<Service>(client.clone()),
            children.clone(),
        )
        .owns(
            settings.scoped_api::<NetworkPolicy>(client.clone()),
            children.clone(),
        )
        .owns(
            settings.scoped_api::<StatefulSet>(client.clone()),
            children.clone(),
        )
        .owns(
            settings.scoped_api::<Deployment>(client.clone()),
            children.clone(),
        )
        .owns(
            settings.scoped_api::<PodDisruptionBudget>(client.clone()),
            children,
        )
        .watches(
            settings.scoped_api::<MailboxServer>(client),
            watcher::Config::default(),
            move |server| pools_for_server(&store.state(), &server),
        )
}

/// Counts the failure by reason and retries with per-pool exponential backoff.
pub fn error_policy(pool: Arc<ProxyPool>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    );
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    let delay = ctx.backoff(&key);
    tracing::warn!(pool = %key, %error, retry_in = ?delay, "ProxyPool reconcile failed");
    Action::requeue(delay)
}

/// Runs the controller until it is dropped.
pub async fn run(controller: Controller<ProxyPool>, ctx: Arc<Context>) {
    controller
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "ProxyPool controller event");
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

    fn pool(name: &str, selector: serde_json::Value) -> Arc<ProxyPool> {
        let mut pool = ProxyPool::new(name, spec(json!({"mailboxSelector": selector})));
        pool.metadata.namespace = Some("mail".into());
        Arc::new(pool)
    }

    fn server(labels: &[(&str, &str)], pools: &[&str]) -> MailboxServer {
        let mut server =
            MailboxServer::new("mbs", serde_json::from_value(json!({"host": "h"})).unwrap());
        server.metadata.namespace = Some("mail".into());
        server.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        server.status = Some(MailboxServerStatus {
            pools: pools.iter().map(|p| p.to_string()).collect(),
            ..MailboxServerStatus::default()
        });
        server
    }

    #[test]
    fn a_server_change_maps_to_the_pools_that_select_it_or_did() {
        let pools = vec![
            pool("a", json!({"matchLabels": {"pool": "a"}})),
            pool(
                "b",
                json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold"]}]}),
            ),
            pool("c", json!({"matchLabels": {"pool": "c"}})),
        ];
        let names = |refs: Vec<ObjectRef<ProxyPool>>| -> Vec<String> {
            refs.into_iter().map(|r| r.name).collect()
        };
        assert_eq!(
            names(pools_for_server(&pools, &server(&[("pool", "a")], &[]))),
            ["a"]
        );
        assert_eq!(
            names(pools_for_server(
                &pools,
                &server(&[("pool", "a"), ("tier", "gold")], &[])
            )),
            ["a", "b"]
        );
        // Relabelled from c to a: c must drop it.
        assert_eq!(
            names(pools_for_server(&pools, &server(&[("pool", "a")], &["c"]))),
            ["a", "c"]
        );
        let mut elsewhere = server(&[("pool", "a")], &[]);
        elsewhere.metadata.namespace = Some("other".into());
        assert!(pools_for_server(&pools, &elsewhere).is_empty());
    }
}
