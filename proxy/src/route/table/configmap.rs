//! A route table in a ConfigMap, watched through the Kubernetes API: a pool's proxies follow the
//! operator's changes without a restart.

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use mailproxy_crds::route_table::{CONFIGMAP_KEY, RouteTable};

use super::{TableHandle, TablePublisher};

/// Why a ConfigMap holds no usable route table.
#[derive(Debug, thiserror::Error)]
pub enum ConfigMapTableError {
    #[error("ConfigMap {name} has no {CONFIGMAP_KEY} key: is it the pool's route-table ConfigMap?")]
    MissingKey { name: String },
    #[error("ConfigMap {name} key {CONFIGMAP_KEY} is invalid: {source}")]
    Invalid {
        name: String,
        source: mailproxy_crds::route_table::RouteTableError,
    },
    #[error("watching ConfigMap {namespace}/{name} ended before it was seen: {reason}")]
    NeverSeen {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// The route table a ConfigMap carries.
pub fn table_from_configmap(configmap: &ConfigMap) -> Result<RouteTable, ConfigMapTableError> {
    let name = configmap.metadata.name.clone().unwrap_or_default();
    let text = configmap
        .data
        .as_ref()
        .and_then(|data| data.get(CONFIGMAP_KEY))
        .ok_or_else(|| ConfigMapTableError::MissingKey { name: name.clone() })?;
    RouteTable::from_json(text).map_err(|source| ConfigMapTableError::Invalid { name, source })
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
    pub async fn watch(self, client: Client) -> Result<TableHandle, ConfigMapTableError> {
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
                    return Err(ConfigMapTableError::NeverSeen {
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
                match table_from_configmap(&configmap) {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn configmap(data: Option<(&str, &str)>) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("pool-routes".into()),
                ..Default::default()
            },
            data: data.map(|(k, v)| BTreeMap::from([(k.to_string(), v.to_string())])),
            ..Default::default()
        }
    }

    #[test]
    fn reads_the_table_from_its_key() {
        let table = RouteTable {
            lookup_handlers: vec!["http://10.0.0.1:7072/service/extension/nginx-lookup".into()],
            ..RouteTable::default()
        };
        let parsed =
            table_from_configmap(&configmap(Some((CONFIGMAP_KEY, &table.to_json())))).unwrap();
        assert_eq!(parsed, table);
    }

    #[test]
    fn names_what_is_wrong_with_a_bad_configmap() {
        let missing = table_from_configmap(&configmap(Some(("other", "{}")))).unwrap_err();
        assert!(
            missing.to_string().contains("no routes.json key"),
            "{missing}"
        );
        assert!(table_from_configmap(&configmap(None)).is_err());
        let invalid = table_from_configmap(&configmap(Some((CONFIGMAP_KEY, "[1,2")))).unwrap_err();
        assert!(invalid.to_string().contains("pool-routes"), "{invalid}");
    }
}
