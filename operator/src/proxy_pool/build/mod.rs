//! Pure functions from a validated ProxyPool (and the MailboxServers it selects) to the objects
//! the cluster should hold. No client: every function here is unit-tested on plain values.

pub mod config;
pub mod deployment;
pub mod memcached;
pub mod pdb;
pub mod rbac;
pub mod route_table;
pub mod service;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use mailproxy_crds::route_table::RouteTable;
use mailproxy_crds::{MailboxServer, ProxyPoolSpec};

use crate::context::OperatorPods;
use crate::labels::{self, Component};

/// A ProxyPool that passed validation: it has a name, a namespace and a uid to own children.
#[derive(Clone, Debug)]
pub struct Pool<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub spec: &'a ProxyPoolSpec,
    pub owner: OwnerReference,
}

impl Pool<'_> {
    /// Metadata of a child: name, namespace, labels and the controller owner reference that has
    /// the garbage collector delete it with the pool.
    pub fn child_meta(&self, name: String, component: Component) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(labels::labels(self.name, component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Every object a pool should have, in the order they are applied: RBAC before the pods that
/// use it, ConfigMaps before the pods that mount them, memcached before the proxies that use it.
#[derive(Clone, Debug)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub route_table: RouteTable,
    pub routes: ConfigMap,
    pub config: ConfigMap,
    pub memcached: Option<memcached::Memcached>,
    pub service: Service,
    pub deployment: Deployment,
    pub pdb: Option<PodDisruptionBudget>,
}

/// Builds every child of `pool` from the MailboxServers its selector matched; `operator` is
/// where the operator's pods run, which memcached admits.
pub fn desired(pool: &Pool<'_>, servers: &[MailboxServer], operator: &OperatorPods) -> Desired {
    let route_table = route_table::route_table(pool, servers);
    let proxy_config = config::proxy_config(pool);
    Desired {
        service_account: rbac::service_account(pool),
        role: rbac::role(pool),
        role_binding: rbac::role_binding(pool),
        routes: route_table::config_map(pool, &route_table),
        route_table,
        config: config::config_map(pool, &proxy_config),
        memcached: memcached::memcached(pool, operator),
        service: service::service(pool),
        deployment: deployment::deployment(pool, &proxy_config),
        pdb: pdb::pdb(pool),
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::Pool;
    use crate::context::OperatorPods;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use mailproxy_crds::{MailboxServer, ProxyPoolSpec};
    use std::collections::BTreeMap;

    /// A pool spec from JSON as the API server would store it (serde fills the defaults).
    pub fn spec(json: serde_json::Value) -> ProxyPoolSpec {
        let mut value = serde_json::json!({"mailboxSelector": {"matchLabels": {"pool": "main"}}});
        if let (Some(base), Some(extra)) = (value.as_object_mut(), json.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(value).expect("valid ProxyPool spec")
    }

    pub fn pool(spec: &ProxyPoolSpec) -> Pool<'_> {
        Pool {
            name: "main",
            namespace: "mail",
            spec,
            owner: OwnerReference {
                api_version: "mailproxy.io/v1alpha1".into(),
                kind: "ProxyPool".into(),
                name: "main".into(),
                uid: "uid-1".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            },
        }
    }

    /// The operator as the chart installs it, release `mp` in `mailproxy-system`.
    pub fn operator() -> OperatorPods {
        OperatorPods {
            namespace: "mailproxy-system".into(),
            labels: BTreeMap::from([
                ("app.kubernetes.io/name".into(), "mailproxy-operator".into()),
                ("app.kubernetes.io/instance".into(), "mp".into()),
            ]),
        }
    }

    pub fn server(name: &str, spec: serde_json::Value) -> MailboxServer {
        MailboxServer::new(name, serde_json::from_value(spec).expect("valid spec"))
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{operator, pool, server, spec};
    use super::*;
    use kube::Resource;

    fn metas(d: &Desired) -> Vec<&ObjectMeta> {
        let mut metas = vec![
            d.service_account.meta(),
            d.role.meta(),
            d.role_binding.meta(),
            d.routes.meta(),
            d.config.meta(),
            d.service.meta(),
            d.deployment.meta(),
        ];
        if let Some(memcached) = &d.memcached {
            metas.push(memcached.service.meta());
            metas.push(memcached.network_policy.meta());
            metas.push(memcached.stateful_set.meta());
        }
        if let Some(pdb) = &d.pdb {
            metas.push(pdb.meta());
        }
        metas
    }

    #[test]
    fn every_child_is_labelled_and_owned_by_the_pool() {
        let spec = spec(serde_json::json!({}));
        let pool = pool(&spec);
        let desired = desired(
            &pool,
            &[server("a", serde_json::json!({"host": "h"}))],
            &operator(),
        );
        let metas = metas(&desired);
        assert_eq!(metas.len(), 11);
        for meta in metas {
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels["app.kubernetes.io/managed-by"], "mailproxy-operator");
            assert_eq!(labels["mailproxy.io/pool"], "main");
            assert_eq!(meta.namespace.as_deref(), Some("mail"));
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].uid, "uid-1");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(owners[0].kind, "ProxyPool");
        }
    }
}
