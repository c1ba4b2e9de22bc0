//! Stage 1: read what a ProxyPool points at and what it already has: the MailboxServers its
//! selector matches, its TLS and lookup Secrets, its current route table and Deployment, and the
//! children it owns (for drift correction).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams};
use kube::core::Selector;
use kube::{Client, Resource, ResourceExt};

use super::build::config::{TLS_CERT_KEY, TLS_KEY_KEY};
use crate::labels::selector_syntax_problem;
use mailproxy_crds::{MailboxServer, ProxyPool};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result, kube_error, static_kind};
use crate::labels::{children_selector, names};

/// Existing children owned by the pool: kind to names.
pub type Children = BTreeMap<&'static str, BTreeSet<String>>;

/// What the pool's dependencies look like right now.
#[derive(Clone, Debug)]
pub struct Dereferenced {
    /// The parsed `spec.mailboxSelector`, or why it does not parse.
    pub selector: Result<Selector, String>,
    /// The selected MailboxServers that are not being deleted, by name.
    pub servers: Vec<MailboxServer>,
    /// Whether `spec.tls.secretName` exists with `tls.crt` and `tls.key` (`None` without TLS).
    pub tls_secret: Option<SecretFound>,
    /// Whether the Secret key `spec.lookup.secretRef` names exists (`None` without one).
    pub lookup_secret: Option<SecretFound>,
    pub routes: Option<ConfigMap>,
    pub deployment: Option<Deployment>,
    pub children: Children,
}

/// How much of a Secret the proxies mount resolves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretFound {
    Yes,
    NoSecret,
    /// The Secret exists without these of the keys the proxies read.
    NoKeys(Vec<String>),
}

/// The pool's `spec.mailboxSelector`, or what is wrong with it. A key or value the API server
/// refuses would fail the list of MailboxServers, and with it every reconcile, before the
/// pool's status could say why: it is found here, for `validate` to report.
pub fn mailbox_selector(pool: &ProxyPool) -> Result<Selector, String> {
    match selector_syntax_problem(&pool.spec.mailbox_selector) {
        Some(problem) => Err(problem),
        None => Selector::try_from(pool.spec.mailbox_selector.clone()).map_err(|e| e.to_string()),
    }
}

pub async fn dereference(
    client: &Client,
    pool: &ProxyPool,
    namespace: &str,
) -> Result<Dereferenced> {
    let name = pool.name_any();
    let selector = mailbox_selector(pool);
    let servers = match &selector {
        Ok(selector) => {
            let api: Api<MailboxServer> = Api::namespaced(client.clone(), namespace);
            let mut servers: Vec<MailboxServer> = api
                .list(&ListParams::default().labels_from(selector))
                .await
                .map_err(|source| Error::List {
                    kind: "MailboxServer",
                    namespace: namespace.to_string(),
                    source,
                })?
                .items
                .into_iter()
                .filter(|server| server.metadata.deletion_timestamp.is_none())
                .collect();
            servers.sort_by_key(|server| server.name_any());
            servers
        }
        Err(_) => Vec::new(),
    };
    // Without their keys the proxies' pods do not start: the TLS Secret's two are read at
    // startup, the lookup secret's is mounted as a required volume.
    let tls_secret = match &pool.spec.tls {
        Some(tls) => Some(
            secret(
                client,
                namespace,
                &tls.secret_name,
                &[TLS_CERT_KEY, TLS_KEY_KEY],
            )
            .await?,
        ),
        None => None,
    };
    let lookup_secret = match &pool.spec.lookup.secret_ref {
        Some(reference) => Some(
            secret(
                client,
                namespace,
                &reference.name,
                &[reference.key.as_str()],
            )
            .await?,
        ),
        None => None,
    };
    let routes_name = names::routes(&name);
    let routes = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(&routes_name)
        .await
        .map_err(kube_error::<ConfigMap>("get", namespace, &routes_name))?;
    let deployment = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(&names::proxy(&name))
        .await
        .map_err(kube_error::<Deployment>("get", namespace, &name))?;
    let uid = pool.uid().unwrap_or_default();
    let labels = children_selector(&name);
    let (sa, role, binding, cm, svc, policy, sts, deploy, pdb) = futures::try_join!(
        owned::<ServiceAccount>(client, namespace, &labels, &uid),
        owned::<Role>(client, namespace, &labels, &uid),
        owned::<RoleBinding>(client, namespace, &labels, &uid),
        owned::<ConfigMap>(client, namespace, &labels, &uid),
        owned::<Service>(client, namespace, &labels, &uid),
        owned::<NetworkPolicy>(client, namespace, &labels, &uid),
        owned::<StatefulSet>(client, namespace, &labels, &uid),
        owned::<Deployment>(client, namespace, &labels, &uid),
        owned::<PodDisruptionBudget>(client, namespace, &labels, &uid),
    )?;
    let children = Children::from([sa, role, binding, cm, svc, policy, sts, deploy, pdb]);
    Ok(Dereferenced {
        selector,
        servers,
        tls_secret,
        lookup_secret,
        routes,
        deployment,
        children,
    })
}

/// Whether the Secret `name` exists with every one of `keys`.
async fn secret(
    client: &Client,
    namespace: &str,
    name: &str,
    keys: &[&str],
) -> Result<SecretFound> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(kube_error::<Secret>("get", namespace, name))?;
    let Some(secret) = secret else {
        return Ok(SecretFound::NoSecret);
    };
    // The API server turns `stringData` into `data` on write, so `data` holds every key.
    let data = secret.data.unwrap_or_default();
    let missing: Vec<String> = keys
        .iter()
        .filter(|key| !data.contains_key(**key))
        .map(|key| key.to_string())
        .collect();
    Ok(if missing.is_empty() {
        SecretFound::Yes
    } else {
        SecretFound::NoKeys(missing)
    })
}

/// Names of the objects of kind `K` labelled as the pool's children and owned by its uid.
async fn owned<K>(
    client: &Client,
    namespace: &str,
    labels: &str,
    owner_uid: &str,
) -> Result<(&'static str, BTreeSet<String>)>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let kind = static_kind::<K>();
    let list = Api::<K>::namespaced(client.clone(), namespace)
        .list_metadata(&ListParams::default().labels(labels))
        .await
        .map_err(|source| Error::List {
            kind,
            namespace: namespace.to_string(),
            source,
        })?;
    let names = list
        .items
        .into_iter()
        .filter(|item| item.owner_references().iter().any(|o| o.uid == owner_uid))
        .filter_map(|item| item.metadata.name)
        .collect();
    Ok((kind, names))
}
