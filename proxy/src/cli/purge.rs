//! `mailproxy purge`: zmproxypurge, deleting every cached route of an account.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use mailproxy::route::cache::{PurgeTarget, RouteCache, RouteCacheConfig};
use mailproxy_crds::route_table::RouteTable;

#[derive(clap::Args)]
pub struct Args {
    /// The account whose routes to delete (user@domain); the name in lower case too.
    account: String,
    /// Its Zimbra account id (zimbraId), for the routes of web requests routed by auth token;
    /// repeatable.
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Another login name of the account (an alias), whose routes and alias entries go too;
    /// repeatable.
    #[arg(long = "alias")]
    aliases: Vec<String>,
    /// A proxy address clients connect to, for the `alias:user=<login>;ip=<proxy-ip>` entries;
    /// repeatable.
    #[arg(long = "proxy-ip")]
    proxy_ips: Vec<IpAddr>,
    /// A web virtual host, for the `alias:user=<login>;vhost=<host>` entries; repeatable.
    #[arg(long = "vhost")]
    virtual_hosts: Vec<String>,
    /// A client address whose unqualified logins (`route:...;user=<login>@<client-ip>`) go too;
    /// repeatable.
    #[arg(long = "client-ip")]
    client_ips: Vec<IpAddr>,
    /// memcached servers (host:port); repeat or separate with commas.
    #[arg(long, value_delimiter = ',', env = "MAILPROXY_MEMCACHED")]
    memcached: Vec<String>,
    /// Take the memcached servers from this route table file instead (its memcachedServers).
    #[arg(long, env = "MAILPROXY_ROUTES", conflicts_with = "memcached")]
    routes: Option<PathBuf>,
}

impl Args {
    /// Every key form of the account: the names as given and in lower case (proxies cache
    /// the name the client typed; the operator purges both forms too).
    fn target(&self) -> PurgeTarget {
        let mut logins: Vec<String> = Vec::new();
        for name in std::iter::once(&self.account).chain(&self.aliases) {
            logins.push(name.clone());
            logins.push(name.to_lowercase());
        }
        logins.retain(|login| *login != self.account);
        logins.sort_unstable();
        logins.dedup();
        PurgeTarget {
            account: self.account.clone(),
            ids: self.ids.clone(),
            logins,
            proxy_ips: self.proxy_ips.clone(),
            virtual_hosts: self.virtual_hosts.clone(),
            client_ips: self.client_ips.clone(),
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let servers = match &args.routes {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read route table {}", path.display()))?;
            let servers = RouteTable::from_json(&text)
                .with_context(|| format!("route table {} is invalid", path.display()))?
                .memcached_servers;
            if servers.is_empty() {
                bail!(
                    "route table {} names no memcached server: its proxies keep routes in their \
                     own embedded caches, which no command reaches; restart the proxies, or wait \
                     for the cache TTL (settings.cacheTtlSeconds)",
                    path.display()
                );
            }
            servers
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
        .purge(&args.target())
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
