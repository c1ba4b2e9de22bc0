//! The API server goes away in the middle of reconciling and comes back: the operator recovers
//! (its watches resume, the pending change lands) with no duplicate and no lost object. This
//! binary has its own control plane, since it stops the API server.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use mailproxy_crds::ProxyPool;
use mailproxy_crds::route_table::RouteTable;
use serde_json::json;

const RECOVERY: Duration = Duration::from_secs(90);

async fn servers_in_table(client: &Client, namespace: &str) -> Result<Vec<String>, String> {
    let map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get("fail-routes")
        .await
        .map_err(|e| e.to_string())?;
    let table = RouteTable::from_configmap(&map).map_err(|e| e.to_string())?;
    Ok(table.servers.into_keys().collect())
}

async fn children(client: &Client, namespace: &str) -> Result<Vec<String>, String> {
    let labels = ListParams::default().labels("mailproxy.io/pool=fail");
    let mut names = Vec::new();
    macro_rules! list {
        ($($kind:ty),*) => {$(
            let items = Api::<$kind>::namespaced(client.clone(), namespace)
                .list_metadata(&labels).await.map_err(|e| e.to_string())?.items;
            names.extend(items.into_iter().map(|i| format!("{}/{}", stringify!($kind), i.name_any())));
        )*};
    }
    list!(
        ServiceAccount,
        Role,
        RoleBinding,
        ConfigMap,
        Service,
        NetworkPolicy,
        StatefulSet,
        Deployment,
        PodDisruptionBudget
    );
    names.sort();
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_recovers_from_an_api_server_restart_without_duplicates_or_losses() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "failure").await;
    let operator = start_operator(client.clone(), settings(&ns, "failure-op"));
    let servers = servers(&client, &ns);
    let labels = json!({"pool": "fail"});
    apply(
        &servers,
        "s1",
        mailbox_server("s1", labels.clone(), json!({"host": "10.4.0.1"})),
    )
    .await;
    apply(
        &pools(&client, &ns),
        "fail",
        proxy_pool(
            "fail",
            json!({"mailboxSelector": {"matchLabels": {"pool": "fail"}}}),
        ),
    )
    .await;
    eventually("s1 routed", Duration::from_secs(20), || async {
        let names = servers_in_table(&client, &ns).await?;
        (names == ["s1"])
            .then_some(())
            .ok_or_else(|| format!("{names:?}"))
    })
    .await;
    let expected = eventually("every child", Duration::from_secs(20), || async {
        let names = children(&client, &ns).await?;
        (names.len() == 11)
            .then_some(names.clone())
            .ok_or_else(|| format!("{names:?}"))
    })
    .await;

    // A change the operator starts reconciling, then the API server disappears under it.
    apply(
        &servers,
        "s2",
        mailbox_server("s2", labels.clone(), json!({"host": "10.4.0.2"})),
    )
    .await;
    cp.stop_apiserver();
    let outage = Duration::from_secs(4);
    tokio::time::sleep(outage).await;
    cp.restart_apiserver().await.unwrap();

    eventually(
        "the change made before the outage lands",
        RECOVERY,
        || async {
            let names = servers_in_table(&client, &ns).await?;
            (names == ["s1", "s2"])
                .then_some(())
                .ok_or_else(|| format!("{names:?}"))
        },
    )
    .await;
    // Watches resumed: a change after the outage lands within seconds.
    apply(
        &servers,
        "s3",
        mailbox_server("s3", labels, json!({"host": "10.4.0.3"})),
    )
    .await;
    eventually(
        "a change after the outage lands",
        Duration::from_secs(20),
        || async {
            let names = servers_in_table(&client, &ns).await?;
            (names == ["s1", "s2", "s3"])
                .then_some(())
                .ok_or_else(|| format!("{names:?}"))
        },
    )
    .await;

    assert_eq!(
        children(&client, &ns).await.unwrap(),
        expected,
        "no duplicate, no lost child"
    );
    let sets = Api::<ReplicaSet>::namespaced(client.clone(), &ns)
        .list_metadata(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        sets.items.len(),
        1,
        "the pod template did not change: one ReplicaSet"
    );
    let pool: ProxyPool = eventually(
        "the pool is healthy again",
        Duration::from_secs(20),
        || async {
            let pool: ProxyPool = pools(&client, &ns)
                .get("fail")
                .await
                .map_err(|e| e.to_string())?;
            let status = pool.status.clone().unwrap_or_default();
            let degraded = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Degraded")
                .map(|c| c.status.clone());
            (degraded.as_deref() == Some("False") && status.mailbox_servers == 3)
                .then_some(pool.clone())
                .ok_or_else(|| format!("{status:?}"))
        },
    )
    .await;
    assert_eq!(
        pool.status.unwrap().observed_generation,
        pool.metadata.generation
    );
    assert!(
        operator.metrics.is_leader(),
        "the only replica keeps leading"
    );
}
