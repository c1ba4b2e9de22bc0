//! The operator against a real control plane (etcd, kube-apiserver, kube-controller-manager;
//! no kubelet, so pods stay Pending): children, route tables, drift correction, garbage
//! collection, status, CEL validation, the proxies' RBAC, the operator's own and leader election.
//! Each test runs its own operator in its own namespace on one shared control plane.

mod common;

use mailproxy_crds::proxy_config::{ProxyConfig, RouteTableSource};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube::{Client, ResourceExt};
use mailproxy_crds::route_table::RouteTable;
use mailproxy_crds::{MailboxServer, ProxyPool};
use mailproxy_operator::permissions::{LEASE, WATCHED};
use mailproxy_operator::proxy_pool::build::route_table::CONFIGMAP_DATA_LIMIT;
use serde_json::json;

const SOON: Duration = Duration::from_secs(20);

async fn route_table(client: &Client, namespace: &str, pool: &str) -> Result<RouteTable, String> {
    let map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(&format!("{pool}-routes"))
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no route-table ConfigMap yet")?;
    RouteTable::from_configmap(&map).map_err(|e| e.to_string())
}

async fn table_where(
    client: &Client,
    namespace: &str,
    pool: &str,
    what: &str,
    predicate: impl Fn(&RouteTable) -> bool,
) -> (RouteTable, Duration) {
    let started = Instant::now();
    let table = eventually(what, SOON, || async {
        let table = route_table(client, namespace, pool).await?;
        if predicate(&table) {
            Ok(table)
        } else {
            Err(format!("{table:?}"))
        }
    })
    .await;
    (table, started.elapsed())
}

async fn get<K>(client: &Client, namespace: &str, name: &str) -> Result<K, String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{name} not found"))
}

async fn absent<K>(client: &Client, namespace: &str, name: &str) -> Result<(), String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match get::<K>(client, namespace, name).await {
        Ok(_) => Err(format!("{name} still exists")),
        Err(_) => Ok(()),
    }
}

fn condition(pool: &ProxyPool, type_: &str) -> Option<(String, String)> {
    pool.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// The Events about `regarding`, once every reason in `wanted` is among them: the operator
/// publishes an Event after the write it reports, so a test that saw the write polls for it.
async fn events_with(
    client: &Client,
    namespace: &str,
    regarding: &str,
    wanted: &[&str],
) -> Vec<Event> {
    eventually(
        &format!("Events {wanted:?} about {regarding}"),
        SOON,
        || async {
            let events: Vec<Event> = Api::<Event>::namespaced(client.clone(), namespace)
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding))
                .collect();
            let reasons: Vec<&str> = events.iter().filter_map(|e| e.reason.as_deref()).collect();
            if wanted.iter().all(|w| reasons.contains(w)) {
                Ok(events)
            } else {
                Err(format!("{reasons:?}"))
            }
        },
    )
    .await
}

async fn tls_secret(client: &Client, namespace: &str, name: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": "not checked by the operator", "tls.key": "not checked"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_gets_every_child_with_the_expected_spec() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "children").await;
    let _operator = start_operator(client.clone(), settings(&ns, "children-op"));
    tls_secret(&client, &ns, "cert").await;
    let servers = servers(&client, &ns);
    apply(
        &servers,
        "a",
        mailbox_server(
            "a",
            json!({"pool": "main"}),
            json!({
        "host": "10.1.0.1", "accounts": ["alice@example.com"], "domains": ["example.com"]}),
        ),
    )
    .await;
    apply(
        &servers,
        "b",
        mailbox_server(
            "b",
            json!({"pool": "main"}),
            json!({
        "service": "dovecot", "mtaAuthTarget": true}),
        ),
    )
    .await;
    apply(
        &servers,
        "other",
        mailbox_server("other", json!({"pool": "other"}), json!({"host": "h"})),
    )
    .await;
    let pool = apply(&pools(&client, &ns), "main", proxy_pool("main", json!({
        "replicas": 2,
        "mailboxSelector": {"matchLabels": {"pool": "main"}},
        "tls": {"secretName": "cert"},
        "memcached": {"replicas": 2, "memoryMiB": 128},
        "routeCache": {"ttlSeconds": 120},
        "service": {"type": "LoadBalancer", "preserveClientIp": true, "annotations": {"lb": "internal"}},
        "pod": {"terminationGracePeriodSeconds": 60},
    }))).await;
    let uid = pool.uid().unwrap();

    let deployment: Deployment =
        eventually("the Deployment", SOON, || get(&client, &ns, "main")).await;
    let owner = &deployment.owner_references()[0];
    assert_eq!(
        (owner.uid.as_str(), owner.controller),
        (uid.as_str(), Some(true))
    );
    assert_eq!(
        deployment.labels()["app.kubernetes.io/managed-by"],
        "mailproxy-operator"
    );
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let template = &spec.template;
    assert!(
        template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()
            .contains_key("mailproxy.io/restart-hash")
    );
    let pod = template.spec.as_ref().unwrap();
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    assert_eq!(pod.service_account_name.as_deref(), Some("main-proxy"));
    let container = &pod.containers[0];
    assert_eq!(
        container.args.as_ref().unwrap(),
        &["serve", "--config", "/etc/mailproxy/config.yaml"]
    );
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let tls = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "tls")
        .unwrap();
    assert_eq!(
        tls.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("cert")
    );
    let managers: Vec<String> = deployment
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&"mailproxy-operator".to_string()),
        "{managers:?}"
    );

    // kube-controller-manager runs the Deployment: a ReplicaSet and (Pending) pods appear.
    eventually("a ReplicaSet owned by the Deployment", SOON, || async {
        let sets = Api::<ReplicaSet>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        sets.items
            .iter()
            .any(|rs| rs.owner_references().iter().any(|o| o.name == "main"))
            .then_some(())
            .ok_or_else(|| format!("{} ReplicaSets", sets.items.len()))
    })
    .await;

    let service: Service = get(&client, &ns, "main").await.unwrap();
    let svc = service.spec.unwrap();
    assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(svc.external_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(svc.ports.unwrap().len(), 6);
    assert_eq!(service.metadata.annotations.unwrap()["lb"], "internal");
    let headless: Service = eventually("memcached Service", SOON, || {
        get(&client, &ns, "main-memcached")
    })
    .await;
    assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    let memcached: StatefulSet = eventually("memcached StatefulSet", SOON, || {
        get(&client, &ns, "main-memcached")
    })
    .await;
    let memcached_spec = memcached.spec.unwrap();
    assert_eq!(memcached_spec.replicas, Some(2));
    assert_eq!(
        memcached_spec.template.spec.unwrap().containers[0]
            .args
            .as_ref()
            .unwrap()[..2],
        ["-m".to_string(), "128".to_string()]
    );
    let policy: NetworkPolicy = get(&client, &ns, "main-memcached").await.unwrap();
    assert_eq!(policy.owner_references()[0].uid, uid);
    let policy = policy.spec.unwrap();
    assert_eq!(
        policy.pod_selector.unwrap().match_labels.unwrap()["app.kubernetes.io/component"],
        "memcached"
    );
    assert_eq!(
        serde_json::to_value(policy.ingress).unwrap(),
        json!([{
            "from": [
                {"podSelector": {"matchLabels": {
                    "app.kubernetes.io/component": "proxy",
                    "app.kubernetes.io/instance": "main",
                    "app.kubernetes.io/name": "mailproxy"}}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}],
            "ports": [{"protocol": "TCP", "port": 11211}]}])
    );

    let (table, _) = table_where(&client, &ns, "main", "route table with a and b", |t| {
        t.servers.len() == 2
    })
    .await;
    assert_eq!(table.servers["a"].host, "10.1.0.1");
    assert_eq!(table.servers["b"].host, format!("dovecot.{ns}.svc"));
    assert!(!table.servers.contains_key("other"));
    assert_eq!(table.pinned_account("alice@example.com").unwrap().0, "a");
    assert_eq!(table.settings.cache_ttl_seconds, 120);
    assert_eq!(
        table.memcached_servers,
        [0, 1].map(|i| format!("main-memcached-{i}.main-memcached.{ns}.svc:11211"))
    );
    assert_eq!(
        table.mta_auth_urls,
        [format!("https://dovecot.{ns}.svc:7073/service/admin/soap/")]
    );
    let config: ConfigMap = get(&client, &ns, "main-config").await.unwrap();
    let config = ProxyConfig::parse(
        &config.data.unwrap()["config.yaml"],
        std::path::Path::new("config.yaml"),
    )
    .expect("the operator writes a configuration `mailproxy serve` accepts");
    assert_eq!(
        config.route_table,
        RouteTableSource::config_map(ns.as_str(), "main-routes")
    );
    assert_eq!(
        config.tls.unwrap().certificates[0].cert,
        std::path::Path::new("/etc/mailproxy/tls/tls.crt")
    );

    let _: ServiceAccount = get(&client, &ns, "main-proxy").await.unwrap();
    let role: Role = get(&client, &ns, "main-proxy").await.unwrap();
    let rule = &role.rules.unwrap()[0];
    assert_eq!(rule.resource_names.as_ref().unwrap(), &["main-routes"]);
    assert_eq!(rule.verbs, ["get", "list", "watch"]);
    let binding: RoleBinding = get(&client, &ns, "main-proxy").await.unwrap();
    assert_eq!(binding.subjects.unwrap()[0].name, "main-proxy");
    let pdb: PodDisruptionBudget = get(&client, &ns, "main").await.unwrap();
    assert!(pdb.spec.unwrap().max_unavailable.is_some());

    let pool: ProxyPool = eventually("pool status", SOON, || async {
        let pool: ProxyPool = get(&client, &ns, "main").await?;
        let status = pool.status.clone().unwrap_or_default();
        (status.mailbox_servers == 2 && status.observed_generation == pool.metadata.generation)
            .then_some(pool.clone())
            .ok_or_else(|| format!("{status:?}"))
    })
    .await;
    let status = pool.status.clone().unwrap();
    assert_eq!(
        condition(&pool, "Degraded"),
        Some(("False".into(), "ReconcileSucceeded".into()))
    );
    assert_eq!(
        condition(&pool, "Ready"),
        Some(("False".into(), "ProxiesNotReady".into()))
    );
    assert_eq!(status.route_table_version, Some(table.version()));
    assert_eq!(
        status.selector.as_deref(),
        Some(
            "app.kubernetes.io/component=proxy,app.kubernetes.io/instance=main,app.kubernetes.io/name=mailproxy"
        )
    );

    let a: MailboxServer = eventually("server a's status", SOON, || async {
        let server: MailboxServer = get(&client, &ns, "a").await?;
        (server.status.as_ref().is_some_and(|s| s.pools == ["main"]))
            .then_some(server.clone())
            .ok_or_else(|| format!("{:?}", server.status))
    })
    .await;
    assert!(
        a.finalizers()
            .contains(&"mailproxy.io/purge-routes".to_string())
    );
    assert_eq!(a.status.unwrap().conditions[0].reason, "Routed");
    eventually("server other is not selected", SOON, || async {
        let server: MailboxServer = get(&client, &ns, "other").await?;
        let status = server.status.unwrap_or_default();
        (status.conditions.first().map(|c| c.reason.as_str()) == Some("NotSelected"))
            .then_some(())
            .ok_or_else(|| format!("{status:?}"))
    })
    .await;
    events_with(&client, &ns, "main", &["Created", "RouteTableUpdated"]).await;

    // kubectl mailproxy answers from the same table.
    let plugin = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-mailproxy"))
            .args(args)
            .env("KUBECONFIG", cp.kubeconfig())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        plugin(&["zmprov", "gamcs", "--pool", "main", "-n", &ns]),
        format!("{}\n", table.gamcs())
    );
    assert_eq!(
        plugin(&["zmprov", "garpu", "--pool", "main", "-n", &ns]),
        format!("{}\n", table.garpu())
    );
    let overview = plugin(&["status", "-n", &ns]);
    assert!(
        overview.contains("ProxyPool main: 0/2 proxies ready, 2 MailboxServers"),
        "{overview}"
    );
    assert!(
        overview.contains("Degraded=False ReconcileSucceeded"),
        "{overview}"
    );
    assert!(
        overview.contains(&format!("servers: a (10.1.0.1), b (dovecot.{ns}.svc)")),
        "{overview}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_table_follows_mailbox_servers_within_seconds() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "routes").await;
    let _operator = start_operator(client.clone(), settings(&ns, "routes-op"));
    let servers = servers(&client, &ns);
    let labels = json!({"pool": "rt"});
    apply(
        &servers,
        "s1",
        mailbox_server(
            "s1",
            labels.clone(),
            json!({"host": "10.2.0.1", "accounts": ["one@example.com"]}),
        ),
    )
    .await;
    apply(
        &pools(&client, &ns),
        "rt",
        proxy_pool(
            "rt",
            json!({"mailboxSelector": {"matchLabels": {"pool": "rt"}}}),
        ),
    )
    .await;
    table_where(&client, &ns, "rt", "s1 routed", |t| {
        t.servers.contains_key("s1")
    })
    .await;

    let mut latencies = BTreeMap::new();
    apply(
        &servers,
        "s2",
        mailbox_server(
            "s2",
            labels.clone(),
            json!({"host": "10.2.0.2", "accounts": ["two@example.com"]}),
        ),
    )
    .await;
    let (_, added) = table_where(&client, &ns, "rt", "s2 added", |t| {
        t.pinned_account("two@example.com").is_some()
    })
    .await;
    latencies.insert("added", added);

    apply(
        &servers,
        "s2",
        mailbox_server(
            "s2",
            labels.clone(),
            json!({"host": "10.2.0.2", "accounts": ["two@example.com", "three@example.com"]}),
        ),
    )
    .await;
    let (_, changed) = table_where(&client, &ns, "rt", "s2 changed", |t| {
        t.pinned_account("three@example.com").is_some()
    })
    .await;
    latencies.insert("changed", changed);

    apply(
        &servers,
        "s1",
        mailbox_server(
            "s1",
            labels.clone(),
            json!({"host": "10.2.0.1", "accounts": ["one@example.com"], "drain": true}),
        ),
    )
    .await;
    let (table, drained) = table_where(&client, &ns, "rt", "s1 drained", |t| {
        t.servers.get("s1").is_some_and(|s| s.draining)
    })
    .await;
    // Its pinned account stays pinned to it (the mailbox is there; proxies answer it as
    // unavailable), but it takes no lookups.
    assert!(
        table
            .pinned_account("one@example.com")
            .is_some_and(|(name, server)| name == "s1" && server.draining)
    );
    assert!(!table.lookup_handlers.iter().any(|h| h.contains("10.2.0.1")));
    latencies.insert("drained", drained);
    eventually("s1 reports Draining", SOON, || async {
        let server: MailboxServer = get(&client, &ns, "s1").await?;
        let status = server.status.unwrap_or_default();
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Draining" && c.status == "True")
            .then_some(())
            .ok_or_else(|| format!("{status:?}"))
    })
    .await;

    apply(
        &servers,
        "s2",
        mailbox_server(
            "s2",
            json!({"pool": "elsewhere"}),
            json!({"host": "10.2.0.2", "accounts": ["two@example.com", "three@example.com"]}),
        ),
    )
    .await;
    let (_, relabelled) = table_where(&client, &ns, "rt", "s2 relabelled away", |t| {
        !t.servers.contains_key("s2")
    })
    .await;
    latencies.insert("relabelled", relabelled);

    servers
        .delete("s1", &DeleteParams::default())
        .await
        .unwrap();
    let (_, deleted) = table_where(&client, &ns, "rt", "s1 deleted", |t| {
        !t.servers.contains_key("s1")
    })
    .await;
    latencies.insert("deleted", deleted);
    // The finalizer purged (or, memcached being unreachable without a kubelet, skipped with an
    // Event) and let the server go.
    eventually("s1 gone", SOON, || {
        absent::<MailboxServer>(&client, &ns, "s1")
    })
    .await;
    events_with(&client, &ns, "s1", &["PurgeSkipped"]).await;
    eprintln!("MailboxServer change to route-table ConfigMap: {latencies:?}");
    for (what, latency) in latencies {
        assert!(latency < Duration::from_secs(5), "{what} took {latency:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_corrected_and_dropped_children_are_pruned() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "drift").await;
    let _operator = start_operator(client.clone(), settings(&ns, "drift-op"));
    let pools = pools(&client, &ns);
    apply(
        &pools,
        "drift",
        proxy_pool(
            "drift",
            json!({"mailboxSelector": {"matchLabels": {"pool": "drift"}}}),
        ),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let original: Deployment =
        eventually("the Deployment", SOON, || get(&client, &ns, "drift")).await;
    let hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["mailproxy.io/restart-hash"]
            .clone()
    };

    deployments
        .delete("drift", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deleted Deployment is re-created", SOON, || async {
        let d: Deployment = get(&client, &ns, "drift").await?;
        (d.uid() != original.uid() && d.metadata.deletion_timestamp.is_none())
            .then_some(())
            .ok_or("same object".to_string())
    })
    .await;

    deployments
        .patch("drift", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "mailproxy", "image": "evil:1"}]}}}})))
        .await
        .unwrap();
    eventually("the hand-edited Deployment is restored", SOON, || async {
        let d: Deployment = get(&client, &ns, "drift").await?;
        let spec = d.spec.clone().unwrap();
        let image = spec.template.spec.unwrap().containers[0].image.clone();
        (spec.replicas == Some(2) && image.as_deref() == Some("mailproxy/mailproxy:0.1.0"))
            .then_some(())
            .ok_or_else(|| format!("{:?} {image:?}", spec.replicas))
    })
    .await;

    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .delete("drift-routes", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deleted route table is re-created", SOON, || async {
        route_table(&client, &ns, "drift").await.map(|_| ())
    })
    .await;

    // Hot settings change the route table, not the pod template.
    let before = hash(&get::<Deployment>(&client, &ns, "drift").await.unwrap());
    apply(&pools, "drift", proxy_pool("drift", json!({"mailboxSelector": {"matchLabels": {"pool": "drift"}}, "routeCache": {"ttlSeconds": 77}}))).await;
    table_where(&client, &ns, "drift", "new TTL", |t| {
        t.settings.cache_ttl_seconds == 77
    })
    .await;
    assert_eq!(
        hash(&get::<Deployment>(&client, &ns, "drift").await.unwrap()),
        before
    );
    // An image change restarts the proxies.
    apply(&pools, "drift", proxy_pool("drift", json!({"mailboxSelector": {"matchLabels": {"pool": "drift"}}, "routeCache": {"ttlSeconds": 77}, "image": "mailproxy/mailproxy:0.2.0"}))).await;
    eventually("new restart hash", SOON, || async {
        let d: Deployment = get(&client, &ns, "drift").await?;
        (hash(&d) != before)
            .then_some(())
            .ok_or("same hash".to_string())
    })
    .await;

    apply(
        &pools,
        "drift",
        proxy_pool(
            "drift",
            json!({
                "mailboxSelector": {"matchLabels": {"pool": "drift"}},
                "memcached": {"replicas": 0},
                "disruptionBudget": {"enabled": false},
            }),
        ),
    )
    .await;
    eventually("memcached and the PDB are pruned", SOON, || async {
        absent::<StatefulSet>(&client, &ns, "drift-memcached").await?;
        absent::<Service>(&client, &ns, "drift-memcached").await?;
        absent::<NetworkPolicy>(&client, &ns, "drift-memcached").await?;
        absent::<PodDisruptionBudget>(&client, &ns, "drift").await
    })
    .await;
    table_where(&client, &ns, "drift", "no memcached servers", |t| {
        t.memcached_servers.is_empty()
    })
    .await;
    events_with(&client, &ns, "drift", &["Deleted", "RollingRestart"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pool_garbage_collects_its_children() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "gc").await;
    let _operator = start_operator(client.clone(), settings(&ns, "gc-op"));
    let pools = pools(&client, &ns);
    apply(
        &pools,
        "gc",
        proxy_pool(
            "gc",
            json!({"mailboxSelector": {"matchLabels": {"pool": "gc"}}}),
        ),
    )
    .await;
    eventually("every child", SOON, || async {
        get::<PodDisruptionBudget>(&client, &ns, "gc").await?;
        get::<StatefulSet>(&client, &ns, "gc-memcached").await?;
        get::<NetworkPolicy>(&client, &ns, "gc-memcached").await?;
        get::<Deployment>(&client, &ns, "gc").await.map(|_| ())
    })
    .await;
    pools.delete("gc", &DeleteParams::default()).await.unwrap();
    let labels = ListParams::default().labels("mailproxy.io/pool=gc");
    eventually("the garbage collector deletes the children", Duration::from_secs(60), || async {
        let mut left = Vec::new();
        macro_rules! count {
            ($($kind:ty),*) => {$(
                let items = Api::<$kind>::namespaced(client.clone(), &ns).list_metadata(&labels).await.map_err(|e| e.to_string())?.items;
                left.extend(items.into_iter().map(|i| format!("{}/{}", stringify!($kind), i.name_any())));
            )*};
        }
        count!(Deployment, StatefulSet, Service, NetworkPolicy, ConfigMap, ServiceAccount, Role, RoleBinding, PodDisruptionBudget);
        left.is_empty().then_some(()).ok_or_else(|| format!("{left:?}"))
    })
    .await;
    eventually(
        "the ReplicaSets and pods go too",
        Duration::from_secs(60),
        || async {
            let sets = Api::<ReplicaSet>::namespaced(client.clone(), &ns)
                .list_metadata(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            let pods = Api::<Pod>::namespaced(client.clone(), &ns)
                .list_metadata(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            (sets + pods == 0)
                .then_some(())
                .ok_or_else(|| format!("{sets} ReplicaSets, {pods} pods"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_conditions_and_observed_generation_follow_the_spec() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "status").await;
    let _operator = start_operator(client.clone(), settings(&ns, "status-op"));
    let pools = pools(&client, &ns);
    let selector = json!({"matchLabels": {"pool": "st"}});
    let wait_for = |ready: &'static str, reason: &'static str| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            eventually(&format!("Ready={ready} {reason}"), SOON, || async {
                let pool: ProxyPool = get(&client, &ns, "st").await?;
                let observed = pool.status.as_ref().and_then(|s| s.observed_generation);
                (observed == pool.metadata.generation
                    && condition(&pool, "Ready") == Some((ready.into(), reason.into())))
                .then_some(pool.clone())
                .ok_or_else(|| format!("{:?}", pool.status))
            })
            .await
        }
    };
    // Until the Ready condition has `reason` and its message says `text`.
    let ready_says = |reason: &'static str, text: &'static str| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            eventually(&format!("Ready {reason} saying {text}"), SOON, || async {
                let pool: ProxyPool = get(&client, &ns, "st").await?;
                let ready = pool
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
                ready
                    .filter(|c| c.reason == reason && c.message.contains(text))
                    .map(|_| ())
                    .ok_or_else(|| format!("{:?}", pool.status))
            })
            .await
        }
    };
    apply(
        &pools,
        "st",
        proxy_pool("st", json!({"mailboxSelector": selector, "replicas": 0})),
    )
    .await;
    let idle = wait_for("True", "ProxiesReady").await;
    eventually("the rollout of 0 replicas completes", SOON, || async {
        let pool: ProxyPool = get(&client, &ns, "st").await?;
        let progressing = condition(&pool, "Progressing");
        (progressing == Some(("False".into(), "RolloutComplete".into())))
            .then_some(())
            .ok_or_else(|| format!("{progressing:?}"))
    })
    .await;

    apply(
        &pools,
        "st",
        proxy_pool("st", json!({"mailboxSelector": selector, "replicas": 1})),
    )
    .await;
    let scaled = wait_for("False", "ProxiesNotReady").await;
    assert!(scaled.metadata.generation > idle.metadata.generation);
    assert_eq!(condition(&scaled, "Progressing").unwrap().0, "True");

    apply(&pools, "st", proxy_pool("st", json!({"replicas": 1, "mailboxSelector": {"matchExpressions": [{"key": "pool", "operator": "Near", "values": ["st"]}]}}))).await;
    let invalid = wait_for("False", "InvalidSpec").await;
    assert_eq!(
        condition(&invalid, "Degraded"),
        Some(("True".into(), "InvalidSpec".into()))
    );
    let message = &invalid.status.unwrap().conditions[0].message;
    assert!(message.contains("spec.mailboxSelector"), "{message}");

    // A label value the API server would refuse in the list of MailboxServers.
    apply(
        &pools,
        "st",
        proxy_pool(
            "st",
            json!({"replicas": 1, "mailboxSelector": {"matchLabels": {"pool": "s t"}}}),
        ),
    )
    .await;
    let refused = eventually("the bad label value in the status", SOON, || async {
        let pool: ProxyPool = get(&client, &ns, "st").await?;
        let message = pool
            .status
            .as_ref()
            .and_then(|status| status.conditions.first())
            .map(|condition| condition.message.clone())
            .unwrap_or_default();
        message
            .contains("\"s t\"")
            .then_some(message.clone())
            .ok_or(message)
    })
    .await;
    assert!(refused.contains("spec.mailboxSelector"), "{refused}");
    let events = events_with(&client, &ns, "st", &["InvalidSpec"]).await;
    assert!(events.iter().any(
        |e| e.reason.as_deref() == Some("InvalidSpec") && e.type_.as_deref() == Some("Warning")
    ));

    apply(
        &pools,
        "st",
        proxy_pool(
            "st",
            json!({"mailboxSelector": selector, "replicas": 1, "tls": {"secretName": "later"}}),
        ),
    )
    .await;
    let missing = wait_for("False", "TlsSecretNotFound").await;
    assert_eq!(condition(&missing, "Degraded").unwrap().0, "True");
    // The running proxies still get route-table changes while the pool waits for the Secret.
    apply(
        &servers(&client, &ns),
        "while-waiting",
        mailbox_server(
            "while-waiting",
            json!({"pool": "st"}),
            json!({"host": "10.0.0.9", "domains": ["waiting.example"]}),
        ),
    )
    .await;
    table_where(&client, &ns, "st", "the new server routed", |t| {
        t.servers.contains_key("while-waiting")
    })
    .await;
    assert_eq!(
        condition(&get(&client, &ns, "st").await.unwrap(), "Ready").map(|c| c.1),
        Some("TlsSecretNotFound".to_string())
    );
    // The proxies would crash-loop on a Secret without the key.
    let half: Secret = serde_json::from_value(json!({
        "metadata": {"name": "later"}, "stringData": {"tls.crt": "a certificate"}}))
    .unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    secrets.create(&PostParams::default(), &half).await.unwrap();
    ready_says("TlsSecretNotFound", "no key \"tls.key\"").await;
    secrets
        .delete("later", &DeleteParams::default())
        .await
        .unwrap();
    tls_secret(&client, &ns, "later").await;
    let recovered = wait_for("False", "ProxiesNotReady").await;
    assert_eq!(
        condition(&recovered, "Degraded"),
        Some(("False".into(), "ReconcileSucceeded".into()))
    );

    // The proxies mount the lookup secret as a required volume: its pods would never start.
    let lookup = json!({"name": "lookup", "key": "shared"});
    apply(
        &pools,
        "st",
        proxy_pool(
            "st",
            json!({"mailboxSelector": selector, "replicas": 1, "tls": {"secretName": "later"},
                   "lookup": {"secretRef": lookup}}),
        ),
    )
    .await;
    let no_secret = wait_for("False", "LookupSecretNotFound").await;
    assert_eq!(condition(&no_secret, "Degraded").unwrap().0, "True");
    let message = &no_secret.status.unwrap().conditions[0].message;
    assert!(
        message.contains("\"lookup\" (spec.lookup.secretRef.name) does not exist"),
        "{message}"
    );
    let secret = |key: &str| -> Secret {
        serde_json::from_value(
            json!({"metadata": {"name": "lookup"}, "stringData": {key: "s3cret"}}),
        )
        .unwrap()
    };
    secrets
        .create(&PostParams::default(), &secret("other"))
        .await
        .unwrap();
    ready_says("LookupSecretNotFound", "has no key \"shared\"").await;
    secrets
        .replace("lookup", &PostParams::default(), &secret("shared"))
        .await
        .unwrap();
    wait_for("False", "ProxiesNotReady").await;
}

/// A route table the API server would refuse (over a ConfigMap's 1 MiB) is not sent: the pool
/// says why and what to do, and is built again once the table fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_table_too_large_for_a_configmap_is_reported_not_attempted() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "large").await;

    // The operator's limit is the API server's: a ConfigMap whose data is exactly the limit is
    // stored, one byte more is refused.
    let maps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let sized = |name: &str, size: usize| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "x".repeat(size)}}))
            .unwrap()
    };
    let create = |name: &'static str, size: usize| {
        let (maps, map) = (maps.clone(), sized(name, size));
        async move {
            maps.create(&PostParams::default(), &map)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    assert_eq!(create("at-limit", CONFIGMAP_DATA_LIMIT).await, Ok(()));
    let refused = create("over-limit", CONFIGMAP_DATA_LIMIT + 1).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("1048576")),
        "{refused:?}"
    );

    let _operator = start_operator(client.clone(), settings(&ns, "large-op"));
    let accounts = |count: usize| -> Vec<String> {
        (0..count)
            .map(|n| format!("user-{n:05}@mail.a-rather-long-domain-name-for-this-test.example"))
            .collect()
    };
    let servers = servers(&client, &ns);
    let server = |count: usize| {
        mailbox_server(
            "mailbox-server-with-a-long-name",
            json!({"pool": "big"}),
            json!({"host": "10.0.0.9", "accounts": accounts(count)}),
        )
    };
    apply(&servers, "mailbox-server-with-a-long-name", server(10_000)).await;
    apply(
        &pools(&client, &ns),
        "big",
        proxy_pool(
            "big",
            json!({"mailboxSelector": {"matchLabels": {"pool": "big"}}, "replicas": 0}),
        ),
    )
    .await;
    let message = eventually("Ready=False RouteTableTooLarge", SOON, || async {
        let pool: ProxyPool = get(&client, &ns, "big").await?;
        let ready = pool
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        ready
            .filter(|c| c.status == "False" && c.reason == "RouteTableTooLarge")
            .map(|c| c.message.clone())
            .ok_or_else(|| format!("{:?}", pool.status))
    })
    .await;
    assert!(message.contains("pinned accounts: 10000"), "{message}");
    assert!(message.contains("spec.accounts"), "{message}");
    absent::<ConfigMap>(&client, &ns, "big-routes")
        .await
        .unwrap();
    let events = events_with(&client, &ns, "big", &["RouteTableTooLarge"]).await;
    assert!(
        events
            .iter()
            .all(|e| e.reason.as_deref() != Some("ApplyFailed"))
    );

    apply(&servers, "mailbox-server-with-a-long-name", server(1_000)).await;
    table_where(&client, &ns, "big", "the table of 1,000 accounts", |t| {
        t.accounts.len() == 1_000
    })
    .await;
    eventually("Ready=True once the table fits", SOON, || async {
        let pool: ProxyPool = get(&client, &ns, "big").await?;
        (condition(&pool, "Ready") == Some(("True".into(), "ProxiesReady".into())))
            .then_some(())
            .ok_or_else(|| format!("{:?}", pool.status))
    })
    .await;
}

/// A Service the user made under the name a pool's Service would take is left alone: the pool
/// says so in its status and is built once the name is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_does_not_take_over_objects_it_did_not_make() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "conflict").await;
    let _operator = start_operator(client.clone(), settings(&ns, "conflict-op"));
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let users: Service = serde_json::from_value(json!({
        "metadata": {"name": "taken"},
        "spec": {"selector": {"app": "users"}, "ports": [{"port": 25}]}
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &users)
        .await
        .unwrap();
    let pools = pools(&client, &ns);
    let spec = json!({"mailboxSelector": {"matchLabels": {"pool": "taken"}}, "replicas": 0});
    apply(&pools, "taken", proxy_pool("taken", spec)).await;

    let blocked = eventually("Ready=False NameConflict", SOON, || async {
        let pool: ProxyPool = get(&client, &ns, "taken").await?;
        (condition(&pool, "Ready") == Some(("False".into(), "NameConflict".into())))
            .then_some(pool.clone())
            .ok_or_else(|| format!("{:?}", pool.status))
    })
    .await;
    let message = &blocked.status.unwrap().conditions[0].message;
    assert!(message.contains("Service/taken"), "{message}");
    let untouched: Service = get(&client, &ns, "taken").await.unwrap();
    assert_eq!(
        untouched.spec.unwrap().selector,
        Some(BTreeMap::from([("app".to_string(), "users".to_string())]))
    );
    assert!(untouched.metadata.owner_references.is_none());

    services
        .delete("taken", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the pool's own Service", SOON, || async {
        let service: Service = get(&client, &ns, "taken").await?;
        let owners = service.metadata.owner_references.unwrap_or_default();
        owners
            .iter()
            .any(|owner| owner.kind == "ProxyPool" && owner.name == "taken")
            .then_some(())
            .ok_or_else(|| format!("owners {owners:?}"))
    })
    .await;
}

/// The MailboxServer controller reads the pools from the API server when its own pool watch
/// triggers it, not from the ProxyPool controller's store (a separate watch that may lag, and
/// left the status stale when it did): here that controller does not run at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_server_status_follows_the_pools_without_the_pool_controller() {
    use mailproxy_operator::{Context, Metrics, mailbox_server};
    use std::sync::Arc;

    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "mbs-alone").await;
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings(&ns, "mbs-alone"),
        Arc::new(Metrics::default()),
    ));
    let controller = mailbox_server::controller(&ctx);
    let task = tokio::spawn(mailbox_server::run(
        controller,
        Arc::new(mailbox_server::State { ctx }),
    ));
    let reason_of = |want: &'static str, pools: &'static [&'static str]| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            eventually(
                &format!("server a is {want} by {pools:?}"),
                SOON,
                || async {
                    let server: MailboxServer = get(&client, &ns, "a").await?;
                    let status = server.status.unwrap_or_default();
                    (status.conditions.first().map(|c| c.reason.as_str()) == Some(want)
                        && status.pools == pools)
                        .then_some(())
                        .ok_or_else(|| format!("{status:?}"))
                },
            )
            .await
        }
    };
    apply(
        &servers(&client, &ns),
        "a",
        mailbox_server("a", json!({"pool": "x"}), json!({"host": "a.example.com"})),
    )
    .await;
    reason_of("NotSelected", &[]).await;
    let pools = pools(&client, &ns);
    let selecting = |value: &str| {
        proxy_pool(
            "p",
            json!({"mailboxSelector": {"matchLabels": {"pool": value}}}),
        )
    };
    apply(&pools, "p", selecting("x")).await;
    reason_of("Routed", &["p"]).await;
    apply(&pools, "p", selecting("y")).await;
    reason_of("NotSelected", &[]).await;
    task.abort();
}

async fn rejected<K>(api: &Api<K>, object: serde_json::Value, expected: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    match api.create(&PostParams::default(), &object).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains(expected),
                "expected {expected:?} in {:?}",
                status.message
            );
        }
        other => panic!("the API server accepted an invalid object: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_rejects_invalid_resources_with_cel() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "cel").await;
    let typed_servers: Api<MailboxServer> = common::servers(&client, &ns);
    let typed_pools: Api<ProxyPool> = common::pools(&client, &ns);
    rejected(
        &typed_servers,
        mailbox_server("both", json!({}), json!({"host": "h", "service": "s"})),
        "exactly one of spec.host",
    )
    .await;
    rejected(
        &typed_servers,
        mailbox_server(
            "port",
            json!({}),
            json!({"host": "h", "ports": {"imap": 0}}),
        ),
        "between 1 and 65535",
    )
    .await;
    rejected(
        &typed_servers,
        mailbox_server(
            "acct",
            json!({}),
            json!({"host": "h", "accounts": ["nodomain"]}),
        ),
        "qualified account names",
    )
    .await;
    for (name, host) in [
        ("userinfo", "admin@mbs2"),
        ("port", "mbs2.example.com:7072"),
        ("nonascii", "mbs-\u{fc}.example.com"),
        ("zone", "fe80::1%eth0"),
        ("upper", "MBS2.example.com"),
        ("dots", "mbs2..example.com"),
        ("octal", "010.0.0.1"),
        ("short", "10.1"),
        ("hex", "0x0a000001"),
    ] {
        rejected(
            &typed_servers,
            mailbox_server(name, json!({}), json!({ "host": host })),
            "spec.host must be a DNS name or IP address",
        )
        .await;
    }
    for (name, host) in [("v6", "2001:db8::1"), ("v4", "10.1.2.3")] {
        apply(
            &typed_servers,
            name,
            mailbox_server(name, json!({}), json!({ "host": host })),
        )
        .await;
    }
    rejected(
        &typed_pools,
        proxy_pool("empty", json!({"mailboxSelector": {}})),
        "must not be empty",
    )
    .await;
    rejected(
        &typed_pools,
        proxy_pool(
            "only",
            json!({"mailboxSelector": {"matchLabels": {"a": "b"}}, "starttls": "only"}),
        ),
        "needs spec.tls",
    )
    .await;
    rejected(&typed_pools, proxy_pool("dup", json!({"mailboxSelector": {"matchLabels": {"a": "b"}}, "listeners": {"pop3": {"port": 143}}})), "same port").await;
    rejected(
        &typed_pools,
        proxy_pool(
            "neg",
            json!({"mailboxSelector": {"matchLabels": {"a": "b"}}, "replicas": -1}),
        ),
        "spec.replicas",
    )
    .await;
    rejected(
        &typed_pools,
        proxy_pool(
            "whitelist",
            json!({"mailboxSelector": {"matchLabels": {"a": "b"}},
                   "loginLimits": {"whitelist": ["10.0.0.0/8", "10.0.0.0/33", "office-nat"]}}),
        ),
        "loginLimits.whitelist entries must be IP addresses or CIDR blocks",
    )
    .await;
    for (name, proxy_protocol, expected) in [
        (
            "pp-empty",
            json!({"trustedNetworks": []}),
            "spec.service.proxyProtocol.trustedNetworks must not be empty",
        ),
        (
            "pp-bad",
            json!({"trustedNetworks": ["10.0.0.0/8", "10.0.0.0/33", "lb.example.com"]}),
            "spec.service.proxyProtocol.trustedNetworks entries must be IP addresses or CIDR blocks",
        ),
    ] {
        rejected(
            &typed_pools,
            proxy_pool(
                name,
                json!({"mailboxSelector": {"matchLabels": {"a": "b"}},
                       "service": {"proxyProtocol": proxy_protocol}}),
            ),
            expected,
        )
        .await;
    }
    apply(
        &typed_pools,
        "pp",
        proxy_pool(
            "pp",
            json!({"mailboxSelector": {"matchLabels": {"a": "b"}},
                   "service": {"proxyProtocol": {"trustedNetworks": ["10.0.0.0/8", "2001:db8::/32"]}}}),
        ),
    )
    .await;

    // A listener turned off, or moved, needs no more than that: the API server fills in the
    // protocol's port.
    apply(
        &typed_pools,
        "ports",
        proxy_pool(
            "ports",
            json!({"mailboxSelector": {"matchLabels": {"a": "b"}},
                   "listeners": {"pop3": {"enabled": false}, "imap": {"enabled": true}}}),
        ),
    )
    .await;
    let stored: kube::api::DynamicObject = Api::namespaced_with(
        client.clone(),
        &ns,
        &kube::api::ApiResource::erase::<ProxyPool>(&()),
    )
    .get("ports")
    .await
    .unwrap();
    assert_eq!(
        stored.data["spec"]["listeners"]["pop3"],
        json!({"enabled": false, "port": 110})
    );
    assert_eq!(
        stored.data["spec"]["listeners"]["imap"],
        json!({"enabled": true, "port": 143})
    );

    apply(
        &typed_servers,
        "moving",
        mailbox_server("moving", json!({}), json!({"host": "a.example.com"})),
    )
    .await;
    let moved = typed_servers
        .patch(
            "moving",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&mailbox_server(
                "moving",
                json!({}),
                json!({"host": "b.example.com"}),
            )),
        )
        .await
        .unwrap_err();
    assert!(moved.to_string().contains("immutable"), "{moved}");
}

/// The rules the operator checks at start are all it needs, on an API server that, like
/// OpenShift's, lets only who may update a pool's finalizers give its children owner references
/// that block the pool's deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_builds_a_pool_with_only_the_rules_it_checks() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "least").await;
    let rules: Vec<_> = WATCHED
        .iter()
        .chain([&LEASE])
        .map(|rule| json!({"apiGroups": [rule.group], "resources": [rule.resource], "verbs": rule.verbs}))
        .collect();
    apply(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
        "operator",
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "operator"}}),
    )
    .await;
    apply(
        &Api::<Role>::namespaced(client.clone(), &ns),
        "operator",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "operator"}, "rules": rules}),
    )
    .await;
    apply(
        &Api::<RoleBinding>::namespaced(client.clone(), &ns),
        "operator",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "operator"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
               "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}]}),
    )
    .await;
    let operator = cp.service_account_client(&ns, "operator").await.unwrap();
    let _operator = start_operator(operator, settings(&ns, "least-op"));
    apply(
        &pools(&client, &ns),
        "least",
        proxy_pool(
            "least",
            json!({"mailboxSelector": {"matchLabels": {"pool": "least"}}}),
        ),
    )
    .await;
    eventually("the pool built", SOON, || async {
        let pool: ProxyPool = get(&client, &ns, "least").await?;
        let degraded = condition(&pool, "Degraded");
        (degraded == Some(("False".into(), "ReconcileSucceeded".into())))
            .then_some(())
            .ok_or_else(|| format!("{:?}", pool.status))
    })
    .await;
    let policy: NetworkPolicy = get(&client, &ns, "least-memcached").await.unwrap();
    assert_eq!(
        policy.owner_references()[0].block_owner_deletion,
        Some(true)
    );
    get::<StatefulSet>(&client, &ns, "least-memcached")
        .await
        .unwrap();
    get::<Deployment>(&client, &ns, "least").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_service_account_reads_its_route_table_and_nothing_else() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "rbac").await;
    let _operator = start_operator(client.clone(), settings(&ns, "rbac-op"));
    apply(
        &pools(&client, &ns),
        "rb",
        proxy_pool(
            "rb",
            json!({"mailboxSelector": {"matchLabels": {"pool": "rb"}}}),
        ),
    )
    .await;
    eventually("RBAC and the route table", SOON, || async {
        get::<RoleBinding>(&client, &ns, "rb-proxy").await?;
        get::<ServiceAccount>(&client, &ns, "rb-proxy").await?;
        route_table(&client, &ns, "rb").await.map(|_| ())
    })
    .await;
    tls_secret(&client, &ns, "private").await;
    let proxy = cp.service_account_client(&ns, "rb-proxy").await.unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(proxy.clone(), &ns);
    let by_name = "metadata.name=rb-routes";

    maps.get("rb-routes").await.expect("get its route table");
    let listed = maps
        .list(&ListParams::default().fields(by_name))
        .await
        .expect("list it by name");
    assert_eq!(listed.items.len(), 1);
    let mut stream = Box::pin(
        maps.watch(&WatchParams::default().fields(by_name).timeout(2), "0")
            .await
            .expect("watch it by name"),
    );
    use futures::TryStreamExt;
    assert!(stream.try_next().await.expect("a watch event").is_some());

    let forbidden = |result: Result<(), kube::Error>, what: &str| match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what} should be forbidden: {other:?}"),
    };
    forbidden(
        maps.get("rb-config").await.map(|_| ()),
        "get another ConfigMap",
    );
    forbidden(
        maps.list(&ListParams::default()).await.map(|_| ()),
        "list every ConfigMap",
    );
    forbidden(
        maps.patch(
            "rb-routes",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"x": "y"}})),
        )
        .await
        .map(|_| ()),
        "change its route table",
    );
    let secrets: Api<Secret> = Api::namespaced(proxy.clone(), &ns);
    forbidden(secrets.get("private").await.map(|_| ()), "get a Secret");
    forbidden(
        secrets.list(&ListParams::default()).await.map(|_| ()),
        "list Secrets",
    );
    let pods: Api<Pod> = Api::namespaced(proxy.clone(), &ns);
    forbidden(
        pods.list(&ListParams::default()).await.map(|_| ()),
        "list pods",
    );
    let other: Api<ConfigMap> = Api::namespaced(proxy, "default");
    forbidden(
        other
            .list(&ListParams::default().fields(by_name))
            .await
            .map(|_| ()),
        "read another namespace",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_only_the_leader_writes() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "leader").await;
    let first = start_operator(client.clone(), settings(&ns, "replica-a"));
    eventually("replica-a leads", SOON, || async {
        first
            .metrics
            .is_leader()
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    let second = start_operator(client.clone(), settings(&ns, "replica-b"));

    apply(
        &servers(&client, &ns),
        "m1",
        mailbox_server("m1", json!({"pool": "ha"}), json!({"host": "10.3.0.1"})),
    )
    .await;
    apply(
        &pools(&client, &ns),
        "ha",
        proxy_pool(
            "ha",
            json!({"mailboxSelector": {"matchLabels": {"pool": "ha"}}}),
        ),
    )
    .await;
    table_where(&client, &ns, "ha", "m1 routed", |t| {
        t.servers.contains_key("m1")
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease = leases.get("mailproxy-operator").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("replica-a")
    );
    assert!(first.metrics.reconciles("proxypool") > 0);
    assert!(!second.metrics.is_leader());
    assert_eq!(second.metrics.reconciles("proxypool"), 0);
    assert_eq!(second.metrics.reconciles("mailboxserver"), 0);

    // The leader steps down (releasing the Lease); the standby takes over and writes.
    first.stop().await;
    eventually("replica-b leads", SOON, || async {
        second
            .metrics
            .is_leader()
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    apply(
        &servers(&client, &ns),
        "m2",
        mailbox_server("m2", json!({"pool": "ha"}), json!({"host": "10.3.0.2"})),
    )
    .await;
    table_where(&client, &ns, "ha", "m2 routed by replica-b", |t| {
        t.servers.contains_key("m2")
    })
    .await;
    assert!(second.metrics.reconciles("proxypool") > 0);
    let lease = leases.get("mailproxy-operator").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("replica-b")
    );
}
