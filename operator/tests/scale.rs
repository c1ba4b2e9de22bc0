//! Scale benchmark, run by hand:
//!
//! ```text
//! cargo test --release -p mailproxy-operator --test scale -- --ignored --nocapture
//! ```
//!
//! 1,000 MailboxServers across 10 ProxyPools, with the operator binary as its own process (so
//! its memory is its own): time to converge, time from a MailboxServer change to the updated
//! route-table ConfigMap (p50 / p99), and the operator's resident memory.
//! Goals: converge under 60 s, change-to-ConfigMap p99 under 2 s, under 150 MiB resident.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use mailproxy_crds::MailboxServer;
use mailproxy_crds::route_table::RouteTable;
use serde_json::json;

const POOLS: usize = 10;
const SERVERS: usize = 1_000;
const CHANGES: usize = 100;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn memory_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn table(maps: &Api<ConfigMap>, pool: usize) -> Option<RouteTable> {
    let map = maps.get_opt(&format!("p{pool}-routes")).await.ok()??;
    RouteTable::from_configmap(&map).ok()
}

fn server(n: usize, extra: &[String]) -> serde_json::Value {
    let mut accounts: Vec<String> = (0..5).map(|a| format!("u{n}-{a}@example.com")).collect();
    accounts.extend_from_slice(extra);
    mailbox_server(
        &format!("s{n}"),
        json!({"pool": format!("p{}", n % POOLS)}),
        json!({"host": format!("10.{}.{}.{}", n / 65536, (n / 256) % 256, n % 256),
               "accounts": accounts, "domains": [format!("d{n}.example.com")]}),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale benchmark: run by hand with --ignored --nocapture"]
async fn a_thousand_mailbox_servers_across_ten_pools() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = namespace(&client, "scale").await;
    let port = mailproxy_testkit::free_port();
    let operator = Killed(
        Command::new(env!("CARGO_BIN_EXE_mailproxy-operator"))
            .args([
                "run",
                "--namespace",
                &ns,
                "--lease-namespace",
                &ns,
                "--log-format",
                "text",
            ])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", cp.kubeconfig())
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let pid = operator.0.id();
    let pools = pools(&client, &ns);
    for p in 0..POOLS {
        apply(
            &pools,
            &format!("p{p}"),
            proxy_pool(
                &format!("p{p}"),
                json!({
            "replicas": 1, "mailboxSelector": {"matchLabels": {"pool": format!("p{p}")}}}),
            ),
        )
        .await;
    }
    let servers: Api<MailboxServer> = servers(&client, &ns);
    let started = Instant::now();
    futures::stream::iter(0..SERVERS)
        .map(|n| {
            let servers = servers.clone();
            async move {
                let object: MailboxServer = serde_json::from_value(server(n, &[])).unwrap();
                servers
                    .create(&PostParams::default(), &object)
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let created = started.elapsed();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    eventually(
        "every route table complete",
        Duration::from_secs(300),
        || async {
            let mut counts = Vec::new();
            for p in 0..POOLS {
                counts.push(table(&maps, p).await.map_or(0, |t| t.servers.len()));
            }
            counts
                .iter()
                .all(|c| *c == SERVERS / POOLS)
                .then_some(())
                .ok_or_else(|| format!("{counts:?}"))
        },
    )
    .await;
    let tables_converged = started.elapsed();
    eventually(
        "every MailboxServer status",
        Duration::from_secs(300),
        || async {
            let list = servers
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let done = list
                .items
                .iter()
                .filter(|s| s.status.as_ref().is_some_and(|s| s.pools.len() == 1))
                .count();
            (done == SERVERS)
                .then_some(())
                .ok_or_else(|| format!("{done} of {SERVERS}"))
        },
    )
    .await;
    let statuses_converged = started.elapsed();
    let steady_rss = memory_kib(pid, "VmRSS:");

    let mut latencies = Vec::new();
    for k in 0..CHANGES {
        let n = (k * 7) % SERVERS;
        let account = format!("change-{k}@example.com");
        let change = server(n, std::slice::from_ref(&account));
        let t0 = Instant::now();
        servers
            .patch(
                &format!("s{n}"),
                &PatchParams::default(),
                &Patch::Merge(&change),
            )
            .await
            .unwrap();
        eventually(
            "the change reaches the ConfigMap",
            Duration::from_secs(30),
            || async {
                let table = table(&maps, n % POOLS).await.ok_or("no table")?;
                table
                    .pinned_account(&account)
                    .map(|_| ())
                    .ok_or_else(|| "not yet".to_string())
            },
        )
        .await;
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
    let rss = memory_kib(pid, "VmRSS:");
    let peak = memory_kib(pid, "VmHWM:");
    let metrics = http_get(port, "/metrics").await;
    let reconciles: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("mailproxy_operator_reconciles_total")
                || l.starts_with("mailproxy_operator_route_table_writes_total")
        })
        .collect();
    println!(
        "scale: {SERVERS} MailboxServers across {POOLS} ProxyPools\n\
         created in {created:.1?}; route tables converged after {tables_converged:.1?}; \
         every MailboxServer status after {statuses_converged:.1?}\n\
         change to ConfigMap over {CHANGES} changes: p50 {p50:.0?}, p99 {p99:.0?}, max {:.0?}\n\
         operator memory: {} MiB resident at steady state, {} MiB after the changes, {} MiB peak\n\
         {}",
        latencies.last().unwrap(),
        steady_rss / 1024,
        rss / 1024,
        peak / 1024,
        reconciles.join("\n"),
    );
    assert!(
        tables_converged < Duration::from_secs(60),
        "converged after {tables_converged:?}"
    );
    assert!(p99 < Duration::from_secs(2), "p99 {p99:?}");
    assert!(peak < 150 * 1024, "peak {peak} KiB");
}

/// GET on the operator's HTTP port with a plain TCP request (no HTTP client dependency).
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
