//! The ConfigMap source of the route table against a real kube-apiserver: the first table
//! arrives, updates are followed without a restart, an invalid update or a deletion keeps the
//! last good table, and a re-created ConfigMap is followed again.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use mailproxy::route::table::{ConfigMapSource, TableHandle};
use mailproxy_crds::route_table::{CONFIGMAP_KEY, RouteTable};
use mailproxy_testkit::ControlPlane;

const NAMESPACE: &str = "mail";
const NAME: &str = "main-routes";

fn table(ttl: u64) -> RouteTable {
    let mut table = RouteTable::default();
    table.settings.cache_ttl_seconds = ttl;
    table
}

fn configmap(text: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            CONFIGMAP_KEY.to_string(),
            text.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

async fn write(api: &Api<ConfigMap>, text: &str) {
    api.patch(
        NAME,
        &PatchParams::apply("route-table-test").force(),
        &Patch::Apply(configmap(text)),
    )
    .await
    .unwrap();
}

async fn next_ttl(handle: &mut TableHandle) -> u64 {
    tokio::time::timeout(Duration::from_secs(20), handle.changed())
        .await
        .expect("the change reaches the proxy within 20 s")
        .expect("the watch is alive")
        .settings
        .cache_ttl_seconds
}

#[tokio::test]
async fn follows_the_pool_configmap_through_the_api() {
    let control_plane = ControlPlane::start().await.unwrap();
    let client: Client = control_plane.client().await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NAMESPACE.into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    write(&api, &table(100).to_json()).await;

    let source = ConfigMapSource {
        namespace: NAMESPACE.into(),
        name: NAME.into(),
    };
    let mut handle = tokio::time::timeout(Duration::from_secs(20), source.watch(client.clone()))
        .await
        .expect("the first table arrives")
        .unwrap();
    assert_eq!(handle.current().settings.cache_ttl_seconds, 100);

    write(&api, &table(200).to_json()).await;
    assert_eq!(next_ttl(&mut handle).await, 200);

    write(&api, "{ this is not a route table").await;
    write(&api, &table(300).to_json()).await;
    assert_eq!(
        next_ttl(&mut handle).await,
        300,
        "the invalid version was skipped"
    );

    api.delete(NAME, &DeleteParams::default()).await.unwrap();
    let unchanged = tokio::time::timeout(Duration::from_secs(1), handle.changed()).await;
    assert!(unchanged.is_err(), "a deleted ConfigMap publishes nothing");
    assert_eq!(handle.current().settings.cache_ttl_seconds, 300);

    write(&api, &table(400).to_json()).await;
    assert_eq!(
        next_ttl(&mut handle).await,
        400,
        "a re-created ConfigMap is followed"
    );
}
