//! `mailproxy-operator`: the control plane of a mailproxy fleet.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mailproxy_operator::{Operator, Settings, health, labels};

#[derive(Parser)]
#[command(
    name = "mailproxy-operator",
    version,
    about = "Control plane of a mailproxy fleet"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers (the default).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML (or write one file per CRD with --out-dir).
    Crds {
        /// Write `<group>_<plural>.yaml` files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

/// `run`'s arguments with their defaults and environment variables, when no subcommand is given.
#[derive(Parser)]
struct DefaultRun {
    #[command(flatten)]
    args: RunArgs,
}

#[derive(Args, Clone, Debug)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "HTTP_ADDR", default_value = "[::]:8080")]
    http_addr: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "mailproxy-operator")]
    lease_name: String,
    /// The operator's own namespace: its Lease's (unless --lease-namespace), and the one from
    /// which each pool's memcached admits the operator.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pod_namespace: String,
    /// Labels of the operator's own pods, `key=value,...`: each pool's memcached admits those
    /// pods of --pod-namespace (every pod there when unset).
    #[arg(long, env = "POD_LABELS", value_parser = labels::parse_labels)]
    pod_labels: Option<BTreeMap<String, String>>,
    /// Namespace of the Lease (default: --pod-namespace).
    #[arg(long)]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events (default: POD_NAME, else
    /// `<host name>-<pid>`).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader may go without renewing before another replica takes over.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds before the bound on purging one memcached of a deleted server's routes.
    #[arg(long, default_value_t = 3)]
    purge_timeout_seconds: u64,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    log_format: String,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    // Colours only for a person at a terminal: log collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn identity(args: &RunArgs) -> String {
    args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "mailproxy-operator".into());
        format!("{host}-{}", std::process::id())
    })
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let client = kube::Client::try_default().await.context(
        "cannot reach the Kubernetes API: run in a pod with a ServiceAccount, or set KUBECONFIG",
    )?;
    let mut settings = Settings::new(identity(&args), args.pod_namespace.clone());
    settings.namespace = args.namespace.clone();
    if let Some(namespace) = &args.lease_namespace {
        settings.lease_namespace = namespace.clone();
    }
    settings.operator_pods.labels = args.pod_labels.clone().unwrap_or_default();
    settings.lease_name = args.lease_name.clone();
    settings.lease_duration = Duration::from_secs(args.lease_duration_seconds.max(2));
    settings.lease_grace = Duration::from_secs((args.lease_duration_seconds / 3).max(1));
    settings.purge_timeout = Duration::from_secs(args.purge_timeout_seconds.max(1));
    let operator = Operator::new(client, settings);
    let server = tokio::spawn(health::serve(
        args.http_addr,
        operator.health(),
        operator.metrics(),
    ));
    tokio::select! {
        result = operator.run(shutdown_signal()) => result,
        served = server => match served {
            Ok(result) => result,
            Err(error) => Err(error.into()),
        },
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        None => run(DefaultRun::parse_from(["mailproxy-operator"]).args).await,
        Some(Command::Run(args)) => run(args).await,
        Some(Command::Crds { out_dir: None }) => {
            let documents: Vec<String> = mailproxy_crds::manifests::files()
                .into_iter()
                .map(|(_, yaml)| yaml)
                .collect();
            print!("{}", documents.join("---\n"));
            Ok(())
        }
        Some(Command::Crds { out_dir: Some(dir) }) => {
            for (name, yaml) in mailproxy_crds::manifests::files() {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        }
    }
}
