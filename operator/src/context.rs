//! What every reconcile shares: the client, settings, metrics, the event recorder and the
//! per-object failure counts that drive error backoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ListParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use mailproxy_crds::{MailboxServer, ProxyPool};

use crate::{FIELD_MANAGER, Metrics};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch only this namespace (all namespaces when `None`).
    pub namespace: Option<String>,
    /// This replica's identity in the leader Lease and in Events.
    pub identity: String,
    pub lease_name: String,
    pub lease_namespace: String,
    /// A leader that has not renewed its Lease for this long is replaced.
    pub lease_duration: Duration,
    /// The leader renews this long before its Lease expires.
    pub lease_grace: Duration,
    /// Bound on purging one memcached server of a deleted MailboxServer's routes.
    pub purge_timeout: Duration,
    /// How long a deleted MailboxServer waits for the pools' route tables to drop it before its
    /// cached routes are purged anyway.
    pub route_table_wait: Duration,
    /// Periodic re-reconcile of every ProxyPool, as a safety net for missed watch events.
    pub resync: Duration,
    /// The operator's own pods, which each pool's memcached admits besides the proxies: they
    /// purge deleted servers' routes.
    pub operator_pods: OperatorPods,
}

/// Where the operator's pods run and the labels that select them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorPods {
    pub namespace: String,
    /// Empty: every pod of the namespace.
    pub labels: BTreeMap<String, String>,
}

impl Settings {
    /// Defaults for everything but the identity and the operator's own namespace, which holds
    /// its Lease.
    pub fn new(identity: impl Into<String>, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        Self {
            namespace: None,
            identity: identity.into(),
            lease_name: FIELD_MANAGER.to_string(),
            lease_namespace: namespace.clone(),
            lease_duration: Duration::from_secs(15),
            lease_grace: Duration::from_secs(5),
            purge_timeout: Duration::from_secs(3),
            route_table_wait: Duration::from_secs(10),
            resync: Duration::from_secs(300),
            operator_pods: OperatorPods {
                namespace,
                labels: BTreeMap::new(),
            },
        }
    }

    /// An `Api` over this operator's scope: one namespace or all of them.
    pub fn scoped_api<K>(&self, client: Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(namespace) => Api::namespaced(client, namespace),
            None => Api::all(client),
        }
    }
}

/// Shared by every reconcile of one leadership term.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_string(),
                instance: Some(settings.identity.clone()),
            },
        );
        Self {
            client,
            settings,
            metrics,
            recorder,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an Event about `regarding`; a failure to publish is logged, never fatal.
    pub async fn event(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(%error, reason, "cannot publish Event");
        }
    }

    /// Exponential backoff for an object's consecutive failures: 1 s, 2 s, 4 s, ... up to 5 min.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        backoff_for(*count)
    }

    /// Forgets an object's failures after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// Delay before retry number `failures` (1-based).
pub fn backoff_for(failures: u32) -> Duration {
    let seconds = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(seconds.min(300))
}

/// Fails with instructions when the CRDs are not installed or not readable.
pub async fn check_crds(client: &Client, settings: &Settings) -> anyhow::Result<()> {
    let params = ListParams::default().limit(1);
    settings
        .scoped_api::<ProxyPool>(client.clone())
        .list_metadata(&params)
        .await
        .context(
            "cannot list ProxyPools: install the CRDs (kubectl apply -f crds/) and grant the \
             operator's ServiceAccount the ClusterRole in docs/operator.md",
        )?;
    settings
        .scoped_api::<MailboxServer>(client.clone())
        .list_metadata(&params)
        .await
        .context(
            "cannot list MailboxServers: install the CRDs (kubectl apply -f crds/) and grant the \
             operator's ServiceAccount the ClusterRole in docs/operator.md",
        )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff_for(1), Duration::from_secs(1));
        assert_eq!(backoff_for(2), Duration::from_secs(2));
        assert_eq!(backoff_for(5), Duration::from_secs(16));
        assert_eq!(backoff_for(40), Duration::from_secs(300));
    }
}
