//! Stage 5: the pool's status (conditions Ready / Progressing / Degraded with reasons,
//! observedGeneration, replicas, the scale selector, route-table version, server count), built by
//! a pure function and written by server-side apply on the status subresource only when it
//! changed.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use mailproxy_crds::route_table::RouteTable;
use mailproxy_crds::{ProxyPool, ProxyPoolStatus};

use crate::FIELD_MANAGER;
use crate::conditions::{Decided, merge};
use crate::error::{Result, kube_error};
use crate::labels::{self, Component};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// How this reconcile ended.
#[derive(Clone, Copy, Debug)]
pub enum Outcome<'a> {
    /// Every child applied.
    Reconciled {
        route_table: &'a RouteTable,
        servers: usize,
    },
    /// Not built: the spec must change (`InvalidSpec`) or a dependency is missing. The route
    /// table may still have been written (`route_table`, with its number of servers).
    Blocked {
        reason: &'static str,
        message: &'a str,
        route_table: Option<(&'a RouteTable, usize)>,
    },
    /// Applying failed; it is retried.
    Failed { message: &'a str },
}

/// Replica counts of the proxies' Deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Rollout {
    replicas: i32,
    ready: i32,
    updated: i32,
    current: bool,
}

fn rollout(deployment: Option<&Deployment>) -> Rollout {
    let Some(deployment) = deployment else {
        return Rollout::default();
    };
    let status = deployment.status.clone().unwrap_or_default();
    Rollout {
        replicas: status.replicas.unwrap_or(0),
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        current: status.observed_generation >= deployment.metadata.generation,
    }
}

pub fn status(
    pool: &ProxyPool,
    outcome: Outcome<'_>,
    deployment: Option<&Deployment>,
    now: &Time,
) -> ProxyPoolStatus {
    let previous = pool.status.clone().unwrap_or_default();
    let desired = pool.spec.replicas;
    let r = rollout(deployment);
    let pods = format!(
        "{} of {desired} proxy pods ready, {} updated",
        r.ready, r.updated
    );
    let rolled_out =
        r.current && r.updated >= desired && r.replicas == desired && r.ready >= desired;
    let (degraded, progressing, ready) = match outcome {
        Outcome::Reconciled { servers, .. } => (
            Decided::new(
                DEGRADED,
                false,
                "ReconcileSucceeded",
                format!("every child object is applied; {servers} MailboxServers routed"),
            ),
            if rolled_out {
                Decided::new(PROGRESSING, false, "RolloutComplete", pods.clone())
            } else {
                Decided::new(PROGRESSING, true, "RollingOut", pods.clone())
            },
            if r.ready >= desired {
                Decided::new(READY, true, "ProxiesReady", pods)
            } else {
                Decided::new(READY, false, "ProxiesNotReady", pods)
            },
        ),
        Outcome::Blocked {
            reason, message, ..
        } => (
            Decided::new(DEGRADED, true, reason, message.to_string()),
            Decided::new(PROGRESSING, false, reason, message.to_string()),
            Decided::new(READY, false, reason, message.to_string()),
        ),
        Outcome::Failed { message } => (
            Decided::new(DEGRADED, true, "ApplyFailed", message.to_string()),
            Decided::new(PROGRESSING, true, "Retrying", message.to_string()),
            Decided::new(READY, false, "ApplyFailed", message.to_string()),
        ),
    };
    let (route_table_version, mailbox_servers) = match outcome {
        Outcome::Reconciled {
            route_table,
            servers,
        }
        | Outcome::Blocked {
            route_table: Some((route_table, servers)),
            ..
        } => (
            Some(route_table.version()),
            i32::try_from(servers).unwrap_or(i32::MAX),
        ),
        _ => (
            previous.route_table_version.clone(),
            previous.mailbox_servers,
        ),
    };
    let generation = pool.metadata.generation;
    ProxyPoolStatus {
        observed_generation: generation,
        conditions: merge(
            &previous.conditions,
            vec![ready, progressing, degraded],
            generation,
            now,
        ),
        replicas: r.replicas,
        ready_replicas: r.ready,
        selector: Some(labels::to_selector_string(&labels::selector(
            &pool.name_any(),
            Component::Proxy,
        ))),
        route_table_version,
        mailbox_servers,
    }
}

/// Writes `status` unless the pool already shows it. Returns whether it wrote.
pub async fn write(client: &Client, pool: &ProxyPool, status: ProxyPoolStatus) -> Result<bool> {
    if pool.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let namespace = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let patch = serde_json::json!({
        "apiVersion": "mailproxy.io/v1alpha1",
        "kind": "ProxyPool",
        "status": status,
    });
    Api::<ProxyPool>::namespaced(client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_error::<ProxyPool>(
            "write the status of",
            &namespace,
            &name,
        ))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::status_of;
    use crate::proxy_pool::build::fixtures::spec;
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn pool(replicas: i32) -> ProxyPool {
        let mut pool = ProxyPool::new("main", spec(json!({"replicas": replicas})));
        pool.metadata.generation = Some(4);
        pool
    }

    fn deployment(ready: i32, updated: i32, replicas: i32) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(2);
        d.status = Some(DeploymentStatus {
            observed_generation: Some(2),
            replicas: Some(replicas),
            ready_replicas: Some(ready),
            updated_replicas: Some(updated),
            ..DeploymentStatus::default()
        });
        d
    }

    fn now() -> Time {
        Time(Timestamp::from_second(1_000).unwrap())
    }

    fn reason<'a>(status: &'a ProxyPoolStatus, type_: &str) -> &'a str {
        &status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
            .reason
    }

    #[test]
    fn reconciled_pool_reports_rollout_and_readiness() {
        let table = RouteTable::default();
        let outcome = Outcome::Reconciled {
            route_table: &table,
            servers: 3,
        };
        let pool = pool(2);
        let rolling = status(&pool, outcome, Some(&deployment(0, 2, 2)), &now());
        assert_eq!(rolling.observed_generation, Some(4));
        assert_eq!(status_of(&rolling.conditions, READY), Some("False"));
        assert_eq!(reason(&rolling, READY), "ProxiesNotReady");
        assert_eq!(status_of(&rolling.conditions, PROGRESSING), Some("True"));
        assert_eq!(status_of(&rolling.conditions, DEGRADED), Some("False"));
        assert_eq!(rolling.mailbox_servers, 3);
        assert_eq!(rolling.route_table_version, Some(table.version()));
        assert_eq!(
            rolling.selector.as_deref(),
            Some(
                "app.kubernetes.io/component=proxy,app.kubernetes.io/instance=main,app.kubernetes.io/name=mailproxy"
            )
        );

        let done = status(&pool, outcome, Some(&deployment(2, 2, 2)), &now());
        assert_eq!(status_of(&done.conditions, READY), Some("True"));
        assert_eq!(reason(&done, PROGRESSING), "RolloutComplete");
        assert_eq!(done.ready_replicas, 2);

        let idle = status(&self::pool(0), outcome, None, &now());
        assert_eq!(status_of(&idle.conditions, READY), Some("True"));
    }

    #[test]
    fn blocked_and_failed_pools_are_degraded_and_keep_the_last_table() {
        let mut pool = pool(2);
        pool.status = Some(ProxyPoolStatus {
            route_table_version: Some("abc".into()),
            mailbox_servers: 5,
            ..ProxyPoolStatus::default()
        });
        let invalid = status(
            &pool,
            Outcome::Blocked {
                reason: "InvalidSpec",
                message: "bad",
                route_table: None,
            },
            None,
            &now(),
        );
        assert_eq!(status_of(&invalid.conditions, DEGRADED), Some("True"));
        assert_eq!(reason(&invalid, READY), "InvalidSpec");
        assert_eq!(invalid.route_table_version.as_deref(), Some("abc"));
        assert_eq!(invalid.mailbox_servers, 5);
        assert_eq!(invalid.observed_generation, Some(4));
        let failed = status(&pool, Outcome::Failed { message: "boom" }, None, &now());
        assert_eq!(reason(&failed, DEGRADED), "ApplyFailed");
    }

    #[test]
    fn an_unchanged_status_is_identical() {
        let table = RouteTable::default();
        let outcome = Outcome::Reconciled {
            route_table: &table,
            servers: 0,
        };
        let mut pool = pool(2);
        let first = status(&pool, outcome, Some(&deployment(0, 2, 2)), &now());
        pool.status = Some(first.clone());
        let later = Time(Timestamp::from_second(2_000).unwrap());
        let second = status(&pool, outcome, Some(&deployment(0, 2, 2)), &later);
        assert_eq!(first, second);
    }
}
