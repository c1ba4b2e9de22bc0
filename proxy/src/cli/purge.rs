//! `mailproxy purge`: zmproxypurge, deleting every cached route of an account.

use std::path::PathBuf;

use anyhow::{Context, bail};
use mailproxy::route::cache::{RouteCache, RouteCacheConfig};
use mailproxy_crds::route_table::RouteTable;

#[derive(clap::Args)]
pub struct Args {
    /// The account whose routes to delete (user@domain).
    account: String,
    /// memcached servers (host:port); repeat or separate with commas.
    #[arg(long, value_delimiter = ',', env = "MAILPROXY_MEMCACHED")]
    memcached: Vec<String>,
    /// Take the memcached servers from this route table file instead (its memcachedServers).
    #[arg(long, env = "MAILPROXY_ROUTES", conflicts_with = "memcached")]
    routes: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let servers = match &args.routes {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read route table {}", path.display()))?;
            RouteTable::from_json(&text)
                .with_context(|| format!("route table {} is invalid", path.display()))?
                .memcached_servers
        }
        None => args.memcached.clone(),
    };
    if servers.is_empty() {
        bail!("no memcached server to purge: give --memcached host:port or --routes FILE");
    }
    let cache = RouteCache::new(RouteCacheConfig::default());
    cache
        .set_servers(&servers)
        .context("invalid memcached server list")?;
    let report = cache
        .purge_account(&args.account)
        .await
        .with_context(|| format!("cannot purge {}", args.account))?;
    for server in &report.servers {
        match &server.error {
            None => println!(
                "{}: {} deleted, {} not cached",
                server.server, server.deleted, server.not_found
            ),
            Some(error) => println!(
                "{}: FAILED after {} deleted: {error}",
                server.server, server.deleted
            ),
        }
    }
    println!(
        "{} keys tried, {} deleted",
        report.keys.len(),
        report.deleted()
    );
    if !report.complete() {
        bail!("the purge did not reach every memcached server; run it again when they are back");
    }
    Ok(())
}
