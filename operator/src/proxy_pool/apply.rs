//! Stage 4: server-side apply every desired child in a fixed order (field manager
//! `mailproxy-operator`, forced: the operator owns these fields), then delete the labelled
//! children this pass did not produce. Together: drift correction and orphan clean-up.

use std::collections::BTreeSet;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::{Desired, route_table};
use super::dereference::{Children, Dereferenced};
use crate::FIELD_MANAGER;
use crate::error::{Result, kube_error};
use crate::labels::{MANAGED_BY_KEY, MANAGED_BY_VALUE, POOL_KEY};

/// What applying changed.
#[derive(Clone, Debug)]
pub struct Applied {
    /// `Kind/name` of children that did not exist before.
    pub created: Vec<String>,
    /// `Kind/name` of children deleted because this pass did not produce them.
    pub deleted: Vec<String>,
    /// Whether the route-table ConfigMap was written (its content changed).
    pub route_table_written: bool,
    /// The Deployment as the API server returned it.
    pub deployment: Deployment,
}

/// Kind to names of every desired child.
pub fn desired_names(desired: &Desired) -> Children {
    let mut names = Children::new();
    let mut add =
        |kind: &'static str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            names
                .entry(kind)
                .or_default()
                .insert(meta.name.clone().unwrap_or_default());
        };
    add("ServiceAccount", &desired.service_account.metadata);
    add("Role", &desired.role.metadata);
    add("RoleBinding", &desired.role_binding.metadata);
    add("ConfigMap", &desired.routes.metadata);
    add("ConfigMap", &desired.config.metadata);
    if let Some(memcached) = &desired.memcached {
        add("Service", &memcached.service.metadata);
        add("NetworkPolicy", &memcached.network_policy.metadata);
        add("StatefulSet", &memcached.stateful_set.metadata);
    }
    add("Service", &desired.service.metadata);
    add("Deployment", &desired.deployment.metadata);
    if let Some(pdb) = &desired.pdb {
        add("PodDisruptionBudget", &pdb.metadata);
    }
    names
}

/// `Kind/name` of what is in `a` and not in `b`.
pub fn difference(a: &Children, b: &Children) -> Vec<(&'static str, String)> {
    let empty = BTreeSet::new();
    a.iter()
        .flat_map(|(kind, names)| {
            let other = b.get(kind).unwrap_or(&empty);
            names
                .iter()
                .filter(|name| !other.contains(*name))
                .map(|name| (*kind, name.clone()))
        })
        .collect()
}

async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(kube_error::<K>("apply", namespace, &name))
}

/// What to do with a child named by kind and name.
#[derive(Clone, Copy)]
enum ByName<'a> {
    Delete,
    /// Whether an object of that name exists and is not the pool's: neither an owner reference
    /// to its uid nor the labels of its children (which a child keeps when someone removed its
    /// owner reference; applying restores that).
    IsForeign {
        owner_uid: &'a str,
        pool: &'a str,
    },
}

async fn by_name<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    action: ByName<'_>,
) -> Result<bool>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    match action {
        ByName::Delete => match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(error) => Err(kube_error::<K>("delete", namespace, name)(error)),
        },
        ByName::IsForeign { owner_uid, pool } => {
            let found = api
                .get_metadata_opt(name)
                .await
                .map_err(kube_error::<K>("get", namespace, name))?;
            Ok(found.is_some_and(|object| is_foreign(&object.metadata, owner_uid, pool)))
        }
    }
}

/// See [`ByName::IsForeign`].
fn is_foreign(metadata: &ObjectMeta, owner_uid: &str, pool: &str) -> bool {
    let owned = metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.uid == owner_uid);
    let label = |key| metadata.labels.as_ref().and_then(|l| l.get(key));
    let labelled = label(MANAGED_BY_KEY).map(String::as_str) == Some(MANAGED_BY_VALUE)
        && label(POOL_KEY).map(String::as_str) == Some(pool);
    !owned && !labelled
}

async fn by_kind(
    client: &Client,
    namespace: &str,
    kind: &str,
    name: &str,
    action: ByName<'_>,
) -> Result<bool> {
    match kind {
        "ServiceAccount" => by_name::<ServiceAccount>(client, namespace, name, action).await,
        "Role" => by_name::<Role>(client, namespace, name, action).await,
        "RoleBinding" => by_name::<RoleBinding>(client, namespace, name, action).await,
        "ConfigMap" => by_name::<ConfigMap>(client, namespace, name, action).await,
        "Service" => by_name::<Service>(client, namespace, name, action).await,
        "NetworkPolicy" => by_name::<NetworkPolicy>(client, namespace, name, action).await,
        "StatefulSet" => by_name::<StatefulSet>(client, namespace, name, action).await,
        "Deployment" => by_name::<Deployment>(client, namespace, name, action).await,
        "PodDisruptionBudget" => {
            by_name::<PodDisruptionBudget>(client, namespace, name, action).await
        }
        other => {
            tracing::warn!(kind = other, name, "the operator does not manage this kind");
            Ok(false)
        }
    }
}

/// `Kind/name` of the desired children that exist without belonging to the pool (see
/// [`ByName::IsForeign`]): a Service the user made, another pool's child of the same name
/// (`main-memcached` of pool `main`, and pool `main-memcached`). A forced apply would take them
/// over, and deleting the pool would then delete them. Only names the pool does not already own
/// are asked about, so a built pool costs no request here.
pub async fn foreign_children(
    client: &Client,
    namespace: &str,
    deref: &Dereferenced,
    desired: &Desired,
    owner_uid: &str,
    pool: &str,
) -> Result<Vec<String>> {
    let mut foreign = Vec::new();
    for (kind, name) in difference(&desired_names(desired), &deref.children) {
        let action = ByName::IsForeign { owner_uid, pool };
        if by_kind(client, namespace, kind, &name, action).await? {
            foreign.push(format!("{kind}/{name}"));
        }
    }
    Ok(foreign)
}

/// Writes the route-table ConfigMap unless `current` already holds its table; returns whether
/// it wrote.
pub async fn apply_route_table(
    client: &Client,
    namespace: &str,
    current: Option<&ConfigMap>,
    desired: &ConfigMap,
) -> Result<bool> {
    if route_table::up_to_date(current, desired) {
        return Ok(false);
    }
    apply(client, namespace, desired).await?;
    Ok(true)
}

/// Applies `desired` and prunes what is left over.
pub async fn apply_all(
    client: &Client,
    namespace: &str,
    deref: &Dereferenced,
    desired: &Desired,
) -> Result<Applied> {
    apply(client, namespace, &desired.service_account).await?;
    apply(client, namespace, &desired.role).await?;
    apply(client, namespace, &desired.role_binding).await?;
    let route_table_written =
        apply_route_table(client, namespace, deref.routes.as_ref(), &desired.routes).await?;
    apply(client, namespace, &desired.config).await?;
    if let Some(memcached) = &desired.memcached {
        apply(client, namespace, &memcached.service).await?;
        apply(client, namespace, &memcached.network_policy).await?;
        apply(client, namespace, &memcached.stateful_set).await?;
    }
    apply(client, namespace, &desired.service).await?;
    let deployment = apply(client, namespace, &desired.deployment).await?;
    if let Some(pdb) = &desired.pdb {
        apply(client, namespace, pdb).await?;
    }

    let wanted = desired_names(desired);
    let leftovers = difference(&deref.children, &wanted);
    for (kind, name) in &leftovers {
        by_kind(client, namespace, kind, name, ByName::Delete).await?;
    }
    let label = |(kind, name): &(&'static str, String)| format!("{kind}/{name}");
    Ok(Applied {
        created: difference(&wanted, &deref.children)
            .iter()
            .map(label)
            .collect(),
        deleted: leftovers.iter().map(label).collect(),
        route_table_written,
        deployment,
    })
}

#[cfg(test)]
mod tests {
    use super::super::build::fixtures::operator;
    use super::super::build::{desired, fixtures};
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[test]
    fn leftovers_are_what_exists_and_is_no_longer_desired() {
        let with_all = fixtures::spec(json!({}));
        let pool = fixtures::pool(&with_all);
        let before = desired_names(&desired(&pool, &[], &operator()));
        let without = fixtures::spec(json!({"memcached": {"replicas": 0},
                                             "disruptionBudget": {"enabled": false}}));
        let pool = fixtures::pool(&without);
        let after = desired_names(&desired(&pool, &[], &operator()));
        let mut gone: Vec<String> = difference(&before, &after)
            .into_iter()
            .map(|(k, n)| format!("{k}/{n}"))
            .collect();
        gone.sort();
        assert_eq!(
            gone,
            [
                "NetworkPolicy/main-memcached",
                "PodDisruptionBudget/main",
                "Service/main-memcached",
                "StatefulSet/main-memcached"
            ]
        );
        assert!(difference(&after, &before).is_empty());
        let kinds: BTreeMap<_, _> = before.iter().map(|(k, v)| (*k, v.len())).collect();
        assert_eq!(kinds.len(), 9);
        assert_eq!(kinds["ConfigMap"], 2);
        assert_eq!(kinds["Service"], 2);
    }

    #[test]
    fn an_object_is_the_pools_by_owner_reference_or_by_its_childrens_labels() {
        let meta =
            |value: serde_json::Value| -> ObjectMeta { serde_json::from_value(value).unwrap() };
        let owner = json!([{"apiVersion": "mailproxy.io/v1alpha1", "kind": "ProxyPool",
                            "name": "main", "uid": "uid-1"}]);
        let labels = json!({"app.kubernetes.io/managed-by": "mailproxy-operator",
                            "mailproxy.io/pool": "main"});
        assert!(!is_foreign(
            &meta(json!({"ownerReferences": owner})),
            "uid-1",
            "main"
        ));
        // Someone removed the owner reference: the labels still say whose it is.
        assert!(!is_foreign(
            &meta(json!({"labels": labels})),
            "uid-1",
            "main"
        ));
        assert!(is_foreign(
            &meta(json!({"labels": labels})),
            "uid-1",
            "other"
        ));
        assert!(is_foreign(
            &meta(json!({"labels": {"app": "users"}})),
            "uid-1",
            "main"
        ));
        assert!(is_foreign(&meta(json!({})), "uid-1", "main"));
    }
}
