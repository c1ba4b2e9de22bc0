//! `mailproxy-operator`: makes a cluster match its `MailboxServer` and `ProxyPool` resources.
//!
//! Two controllers run while this replica holds the leader Lease ([`leader`]):
//! - [`proxy_pool`] turns each ProxyPool into its children (Deployment, Services, memcached
//!   StatefulSet and NetworkPolicy, route-table and config ConfigMaps, RBAC,
//!   PodDisruptionBudget), in pure stages: dereference, validate, build, apply, status.
//! - [`mailbox_server`] reports which pools route to each MailboxServer and, through the
//!   `mailproxy.io/purge-routes` finalizer, purges a deleted server's cached routes from the pools'
//!   memcached.
//!
//! [`health`] serves `/healthz`, `/readyz` and `/metrics` ([`metrics`]); [`permissions`] checks
//! at start that the operator may do what it will do.

pub mod backoff;
pub mod cli;
pub mod conditions;
pub mod context;
pub mod error;
pub mod health;
pub mod labels;
pub mod leader;
pub mod mailbox_server;
pub mod metrics;
pub mod permissions;
pub mod proxy_pool;

use std::sync::Arc;

pub use context::{Context, Settings};
pub use error::{Error, Result};
pub use metrics::Metrics;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "mailproxy-operator";

/// A configured operator: [`Operator::run`] campaigns for the lease and runs the controllers while
/// leading; [`Operator::metrics`] and [`Operator::health`] are shared with the HTTP endpoints.
pub struct Operator {
    client: kube::Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    health: Arc<health::Health>,
}

impl Operator {
    pub fn new(client: kube::Client, settings: Settings) -> Self {
        Self {
            client,
            settings,
            metrics: Arc::new(Metrics::default()),
            health: Arc::new(health::Health::default()),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn health(&self) -> Arc<health::Health> {
        self.health.clone()
    }

    /// Checks that the CRDs are installed and that the operator holds its permissions, then
    /// campaigns for leadership and runs the controllers while leading, until `shutdown`
    /// resolves (the lease is then released).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        context::check_crds(&self.client, &self.settings).await?;
        permissions::check(&self.client, &self.settings).await?;
        self.health.set_ready();
        leader::run(self.client, self.settings, self.metrics, shutdown).await
    }
}
