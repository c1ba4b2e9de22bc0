//! Shared by the operator's integration tests: one real control plane per test binary, a fresh
//! namespace per test, an in-process operator scoped to it, and polling with deadlines.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mailproxy_crds::{MailboxServer, ProxyPool};
use mailproxy_operator::{Metrics, Operator, Settings};
pub use mailproxy_testkit::eventually;
use mailproxy_testkit::{ControlPlane, ControlPlaneOptions};
use serde_json::{Value, json};
use tokio::sync::{OnceCell, oneshot};
use tokio::task::JoinHandle;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();

/// A control plane with the mailproxy CRDs, started once per test binary.
pub async fn control_plane() -> &'static ControlPlane {
    CONTROL_PLANE
        .get_or_init(|| async {
            init_tracing();
            ControlPlane::start_with(ControlPlaneOptions {
                crds: mailproxy_crds::manifests::crds(),
            })
            .await
            .expect("the control plane starts")
        })
        .await
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kube=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Creates a namespace named `<prefix>-<n>` and returns its name.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!(
        "{prefix}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 1_000_000
    );
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    name
}

/// An operator running in this test's runtime, watching one namespace; it stops (releasing its
/// Lease) when dropped or [`RunningOperator::stop`]ped.
pub struct RunningOperator {
    pub identity: String,
    pub metrics: Arc<Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RunningOperator {
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Stops without releasing the Lease, like a crashed replica.
    pub fn crash(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub fn settings(namespace: &str, identity: &str) -> Settings {
    let mut settings = Settings::new(identity, namespace);
    settings.namespace = Some(namespace.to_string());
    settings.lease_duration = Duration::from_secs(4);
    settings.lease_grace = Duration::from_secs(1);
    settings.purge_timeout = Duration::from_secs(1);
    settings.route_table_wait = Duration::from_secs(5);
    settings
}

pub fn start_operator(client: Client, settings: Settings) -> RunningOperator {
    let identity = settings.identity.clone();
    let operator = Operator::new(client, settings);
    let metrics = operator.metrics();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));
    RunningOperator {
        identity,
        metrics,
        shutdown: Some(shutdown),
        task: Some(task),
    }
}

pub async fn apply<K>(api: &Api<K>, name: &str, object: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name}: {e}"))
}

pub fn mailbox_server(name: &str, labels: Value, spec: Value) -> Value {
    json!({
        "apiVersion": "mailproxy.io/v1alpha1",
        "kind": "MailboxServer",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    })
}

pub fn proxy_pool(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "mailproxy.io/v1alpha1",
        "kind": "ProxyPool",
        "metadata": {"name": name},
        "spec": spec,
    })
}

pub fn servers(client: &Client, namespace: &str) -> Api<MailboxServer> {
    Api::namespaced(client.clone(), namespace)
}

pub fn pools(client: &Client, namespace: &str) -> Api<ProxyPool> {
    Api::namespaced(client.clone(), namespace)
}
