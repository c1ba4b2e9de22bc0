//! `kubectl mailproxy`: a kubectl plugin (put it on PATH as `kubectl-mailproxy`).
//!
//! - `kubectl mailproxy zmprov <garpu|garpb|gamau|gamcs> --pool P [-n NS]` answers from the
//!   pool's route-table ConfigMap, like zmprov on a Zimbra server.
//! - `kubectl mailproxy status [-n NS]` lists the pools with their conditions and servers.

use std::collections::BTreeMap;

use anyhow::Context;
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use kube::{Client, Config};
use mailproxy_crds::ProxyPool;
use mailproxy_crds::route_table::{RouteTable, configmap_name};
use mailproxy_operator::cli::{Zmprov, render_status, zmprov};

#[derive(Parser)]
#[command(
    name = "kubectl mailproxy",
    version,
    about = "Inspect mailproxy ProxyPools and their route tables"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a zmprov query from a pool's route table.
    Zmprov {
        #[arg(value_enum)]
        query: Zmprov,
        /// The ProxyPool.
        #[arg(long)]
        pool: String,
    },
    /// List ProxyPools with their conditions and MailboxServers.
    Status,
}

/// A pool's route table: `None` when its ConfigMap does not exist (yet).
async fn route_table(
    api: &Api<ConfigMap>,
    namespace: &str,
    pool: &str,
) -> anyhow::Result<Option<RouteTable>> {
    let name = configmap_name(pool);
    let Some(map) = api
        .get_opt(&name)
        .await
        .with_context(|| format!("cannot read ConfigMap {namespace}/{name}"))?
    else {
        return Ok(None);
    };
    Ok(Some(RouteTable::from_configmap(&map).with_context(
        || format!("ConfigMap {namespace}/{name} holds no usable route table"),
    )?))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::infer()
        .await
        .context("cannot find a cluster: set KUBECONFIG or run inside a pod")?;
    let namespace = cli
        .namespace
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    match cli.command {
        Command::Zmprov { query, pool } => {
            let table = route_table(&maps, &namespace, &pool).await?.with_context(|| {
                format!(
                    "ProxyPool {namespace}/{pool} has no route table yet (ConfigMap {} not found): \
                     is the pool name right and the operator running?",
                    configmap_name(&pool)
                )
            })?;
            print!("{}", zmprov(&table, query));
        }
        Command::Status => {
            let pools = Api::<ProxyPool>::namespaced(client, &namespace)
                .list(&ListParams::default())
                .await
                .with_context(|| format!("cannot list ProxyPools in namespace {namespace}"))?
                .items;
            let mut tables = BTreeMap::new();
            // One pool's unreadable table is shown with the others, not instead of them.
            for pool in &pools {
                let name = pool.metadata.name.clone().unwrap_or_default();
                match route_table(&maps, &namespace, &name).await {
                    Ok(Some(table)) => {
                        tables.insert(name, Ok(table));
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tables.insert(name, Err(format!("{error:#}")));
                    }
                }
            }
            print!("{}", render_status(&pools, &tables));
        }
    }
    Ok(())
}
