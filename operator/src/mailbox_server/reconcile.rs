//! One MailboxServer reconcile: the finalizer is added first; then the status says which pools
//! route to the server (Ready, Draining). Deletion runs [`super::finalizer::cleanup`].

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use mailproxy_crds::{MailboxServer, MailboxServerStatus};

use super::{CONTROLLER, FINALIZER, State, pools_selecting};
use crate::FIELD_MANAGER;
use crate::conditions::{Decided, merge};
use crate::error::{Error, Result, kube_error};

pub const READY: &str = "Ready";
pub const DRAINING: &str = "Draining";

pub async fn reconcile(server: Arc<MailboxServer>, state: Arc<State>) -> Result<Action> {
    let _timer = state.ctx.metrics.reconcile_started(CONTROLLER);
    let namespace = server
        .namespace()
        .ok_or_else(|| Error::NoNamespace(format!("MailboxServer {}", server.name_any())))?;
    let key = format!("mbs:{namespace}/{}", server.name_any());
    let api: Api<MailboxServer> = Api::namespaced(state.ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, server, |event| async {
        match event {
            Event::Apply(server) => update_status(&server, &state).await,
            Event::Cleanup(server) => super::finalizer::cleanup(&server, &state).await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)));
    if result.is_ok() {
        state.ctx.succeeded(&key);
    }
    result
}

/// The status for a server that `pools` route to.
pub fn status(server: &MailboxServer, pools: Vec<String>, now: &Time) -> MailboxServerStatus {
    let previous = server.status.clone().unwrap_or_default();
    let namespace = server.namespace().unwrap_or_default();
    let ready = if let Some(problem) = server.spec.address_problem() {
        Decided::new(
            READY,
            false,
            "InvalidAddress",
            format!(
                "{problem}, so no pool routes to it; spec.host and spec.service cannot be \
                 changed: delete this MailboxServer and create it again with a valid address"
            ),
        )
    } else if server.spec.drain {
        Decided::new(
            READY,
            false,
            "Draining",
            "spec.drain is set: no new routes go to this server; open sessions continue".into(),
        )
    } else if pools.is_empty() {
        Decided::new(
            READY,
            false,
            "NotSelected",
            format!(
                "no ProxyPool in namespace {namespace} selects this server: give it labels that \
                 a pool's spec.mailboxSelector matches"
            ),
        )
    } else {
        Decided::new(
            READY,
            true,
            "Routed",
            format!("routed by ProxyPools {}", pools.join(", ")),
        )
    };
    let draining = if server.spec.drain {
        Decided::new(
            DRAINING,
            true,
            "DrainRequested",
            "draining: removed from new routes, lookups and web balancing".into(),
        )
    } else {
        Decided::new(DRAINING, false, "NotDraining", "serving new routes".into())
    };
    let generation = server.metadata.generation;
    MailboxServerStatus {
        observed_generation: generation,
        conditions: merge(&previous.conditions, vec![ready, draining], generation, now),
        pools,
    }
}

async fn update_status(server: &MailboxServer, state: &State) -> Result<Action> {
    let pools = pools_selecting(&state.ctx.client, server).await?;
    let status = status(server, pools, &Time(Timestamp::now()));
    if server.status.as_ref() != Some(&status) {
        let namespace = server.namespace().unwrap_or_default();
        let name = server.name_any();
        let patch = serde_json::json!({
            "apiVersion": "mailproxy.io/v1alpha1",
            "kind": "MailboxServer",
            "status": status,
        });
        Api::<MailboxServer>::namespaced(state.ctx.client.clone(), &namespace)
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(kube_error::<MailboxServer>(
                "write the status of",
                &namespace,
                &name,
            ))?;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::status_of;
    use serde_json::json;

    fn server(drain: bool) -> MailboxServer {
        server_at("h", drain)
    }

    fn server_at(host: &str, drain: bool) -> MailboxServer {
        let mut server = MailboxServer::new(
            "mbs",
            serde_json::from_value(json!({"host": host, "drain": drain})).unwrap(),
        );
        server.metadata.namespace = Some("mail".into());
        server.metadata.generation = Some(3);
        server
    }

    fn now() -> Time {
        Time(Timestamp::from_second(5).unwrap())
    }

    #[test]
    fn ready_when_routed_not_ready_when_unselected_or_draining() {
        let routed = status(&server(false), vec!["a".into(), "b".into()], &now());
        assert_eq!(routed.pools, ["a", "b"]);
        assert_eq!(routed.observed_generation, Some(3));
        assert_eq!(status_of(&routed.conditions, READY), Some("True"));
        assert_eq!(status_of(&routed.conditions, DRAINING), Some("False"));
        assert!(routed.conditions[0].message.contains("a, b"));

        let alone = status(&server(false), vec![], &now());
        assert_eq!(status_of(&alone.conditions, READY), Some("False"));
        assert_eq!(alone.conditions[0].reason, "NotSelected");
        assert!(alone.conditions[0].message.contains("spec.mailboxSelector"));

        let draining = status(&server(true), vec!["a".into()], &now());
        assert_eq!(status_of(&draining.conditions, READY), Some("False"));
        assert_eq!(status_of(&draining.conditions, DRAINING), Some("True"));
        assert_eq!(draining.pools, ["a"]);
    }

    #[test]
    fn not_ready_with_an_address_no_proxy_can_use() {
        // Stored before the CRD's rule for spec.host existed.
        let stored = status(&server_at("mbs2:7072", false), vec!["a".into()], &now());
        assert_eq!(status_of(&stored.conditions, READY), Some("False"));
        assert_eq!(stored.conditions[0].reason, "InvalidAddress");
        assert!(
            stored.conditions[0].message.contains("\"mbs2:7072\"")
                && stored.conditions[0].message.contains("create it again"),
            "{}",
            stored.conditions[0].message
        );
    }
}
