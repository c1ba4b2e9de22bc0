//! Session metrics: what an operator watches on a mail proxy's dashboard.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    protocol: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    protocol: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    protocol: &'static str,
    reason: &'static str,
}

type HistogramFamily = Family<ProtocolLabels, Histogram, fn() -> Histogram>;

fn login_histogram() -> Histogram {
    // 5 ms to ~40 s: a login is a route lookup plus a backend's password check.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Cheap to clone; every clone updates the same series.
#[derive(Clone)]
pub struct SessionMetrics {
    sessions: Family<SessionLabels, Counter>,
    active: Family<ProtocolLabels, Gauge>,
    logins: HistogramFamily,
    bytes: Family<BytesLabels, Counter>,
    upstream_failures: Family<FailureLabels, Counter>,
}

impl Default for SessionMetrics {
    fn default() -> Self {
        Self {
            sessions: Family::default(),
            active: Family::default(),
            logins: HistogramFamily::new_with_constructor(login_histogram),
            bytes: Family::default(),
            upstream_failures: Family::default(),
        }
    }
}

impl SessionMetrics {
    /// `mailproxy_sessions_total{protocol,outcome}`, `mailproxy_sessions_active{protocol}`,
    /// `mailproxy_login_duration_seconds{protocol}` (successful logins, from the client's login
    /// command to the backend's answer), `mailproxy_relayed_bytes_total{protocol,direction}`
    /// and `mailproxy_upstream_failures_total{protocol,reason}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailproxy_sessions",
            "Client sessions ended, by listener protocol and outcome",
            self.sessions.clone(),
        );
        registry.register(
            "mailproxy_sessions_active",
            "Client sessions open now, by listener protocol",
            self.active.clone(),
        );
        registry.register(
            "mailproxy_login_duration_seconds",
            "Time from a client's login command to the mailbox server's acceptance",
            self.logins.clone(),
        );
        registry.register(
            "mailproxy_relayed_bytes",
            "Bytes relayed after login, by direction (from_client, to_client)",
            self.bytes.clone(),
        );
        registry.register(
            "mailproxy_upstream_failures",
            "Upstream logins that failed for another reason than the credentials",
            self.upstream_failures.clone(),
        );
    }

    pub(crate) fn started(&self, protocol: &'static str) {
        self.active
            .get_or_create(&ProtocolLabels { protocol })
            .inc();
    }

    pub(crate) fn ended(&self, protocol: &'static str, outcome: &'static str) {
        self.active
            .get_or_create(&ProtocolLabels { protocol })
            .dec();
        self.sessions
            .get_or_create(&SessionLabels { protocol, outcome })
            .inc();
    }

    /// The `from_client` and `to_client` byte counters of a protocol, for a session's relay.
    pub(crate) fn byte_counters(&self, protocol: &'static str) -> (Counter, Counter) {
        let counter = |direction| {
            self.bytes
                .get_or_create(&BytesLabels {
                    protocol,
                    direction,
                })
                .clone()
        };
        (counter("from_client"), counter("to_client"))
    }

    pub(crate) fn logged_in(&self, protocol: &'static str, took: Duration) {
        self.logins
            .get_or_create(&ProtocolLabels { protocol })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn upstream_failed(&self, protocol: &'static str, reason: &'static str) {
        self.upstream_failures
            .get_or_create(&FailureLabels { protocol, reason })
            .inc();
    }
}
