//! Prometheus metrics: reconciles, failures by reason, reconcile duration, leadership, route-table
//! writes and memcached purges.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    controller: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

type DurationFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;

/// The operator's metrics and their registry (prefix `mailproxy_operator_`).
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: DurationFamily,
    leader: Gauge,
    route_table_writes: Counter,
    purges: Family<ResultLabels, Counter>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mailproxy_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = DurationFamily::new_with_constructor(duration_histogram);
        let leader = Gauge::default();
        let route_table_writes = Counter::default();
        let purges = Family::<ResultLabels, Counter>::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and runs the controllers",
            leader.clone(),
        );
        registry.register(
            "route_table_writes",
            "Route-table ConfigMap writes (only when the content changed)",
            route_table_writes.clone(),
        );
        registry.register(
            "memcached_purges",
            "Memcached servers purged of a deleted MailboxServer's routes, by result",
            purges.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            route_table_writes,
            purges,
        }
    }
}

/// Observes a reconcile's duration when dropped.
pub struct ReconcileTimer {
    histogram: Histogram,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a reconcile of `controller` and times it until the returned guard drops.
    pub fn reconcile_started(&self, controller: &str) -> ReconcileTimer {
        let labels = ControllerLabels {
            controller: controller.to_string(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            histogram: self.duration.get_or_create(&labels).clone(),
            started: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, controller: &str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                controller: controller.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn route_table_written(&self) {
        self.route_table_writes.inc();
    }

    pub fn purge_done(&self, result: &str) {
        self.purges
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// Reconciles started by `controller` so far.
    pub fn reconciles(&self, controller: &str) -> u64 {
        self.reconciles
            .get_or_create(&ControllerLabels {
                controller: controller.to_string(),
            })
            .get()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reconciles_failures_and_leadership() {
        let metrics = Metrics::default();
        drop(metrics.reconcile_started("proxypool"));
        metrics.reconcile_failed("proxypool", "apply");
        metrics.set_leader(true);
        assert_eq!(metrics.reconciles("proxypool"), 1);
        assert!(metrics.is_leader());
        let text = metrics.encode();
        assert!(
            text.contains("mailproxy_operator_reconciles_total{controller=\"proxypool\"} 1"),
            "{text}"
        );
        assert!(text.contains(
            "mailproxy_operator_reconcile_failures_total{controller=\"proxypool\",reason=\"apply\"} 1"
        ));
        assert!(text.contains("mailproxy_operator_leader 1"));
        assert!(text.contains("mailproxy_operator_reconcile_duration_seconds_count"));
    }
}
