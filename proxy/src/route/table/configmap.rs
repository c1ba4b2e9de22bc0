//! A route table in a ConfigMap, watched through the Kubernetes API: a pool's proxies follow the
//! operator's changes without a restart.

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use mailproxy_crds::route_table::RouteTable;

use super::{TableHandle, TablePublisher};

/// Why a watched ConfigMap never gave a route table.
#[derive(Debug, thiserror::Error)]
#[error("watching ConfigMap {namespace}/{name} ended before it was seen: {reason}")]
pub struct ConfigMapNeverSeen {
    namespace: String,
    name: String,
    reason: String,
}

/// Where to watch: one named ConfigMap in one namespace (the proxy's RBAC allows no more).
#[derive(Clone, Debug)]
pub struct ConfigMapSource {
    pub namespace: String,
    pub name: String,
}

impl ConfigMapSource {
    /// Watches the ConfigMap; returns once a first valid table has arrived. Later versions are
    /// published as they come; an invalid or deleted ConfigMap is logged and the last good table
    /// stays live. The watch re-connects with backoff when the API server goes away.
    pub async fn watch(self, client: Client) -> Result<TableHandle, ConfigMapNeverSeen> {
        let api: Api<ConfigMap> = Api::namespaced(client, &self.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        let first = loop {
            match events.next().await {
                Some(event) => {
                    if let Some(table) = self.table_of(event) {
                        break table;
                    }
                }
                None => {
                    return Err(ConfigMapNeverSeen {
                        namespace: self.namespace,
                        name: self.name,
                        reason: "the watch stream ended".into(),
                    });
                }
            }
        };
        let (publisher, handle) = TablePublisher::new(first);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    () = publisher.sender.closed() => return,
                };
                let Some(event) = event else { return };
                if let Some(table) = self.table_of(event) {
                    publisher.publish(table);
                }
            }
        });
        Ok(handle)
    }

    /// The table a watch event carries, if any; every other outcome is logged here.
    fn table_of(&self, event: Result<Event<ConfigMap>, watcher::Error>) -> Option<RouteTable> {
        match event {
            Ok(Event::Apply(configmap) | Event::InitApply(configmap)) => {
                match RouteTable::from_configmap(&configmap) {
                    Ok(table) => Some(table),
                    Err(error) => {
                        tracing::error!(%error, "route table rejected; keeping the previous table");
                        None
                    }
                }
            }
            Ok(Event::Delete(_)) => {
                tracing::warn!(configmap = %self.name, "route-table ConfigMap deleted; keeping the last table");
                None
            }
            Ok(Event::Init | Event::InitDone) => None,
            Err(error) => {
                tracing::warn!(%error, configmap = %self.name, "route-table watch error; retrying");
                None
            }
        }
    }
}
