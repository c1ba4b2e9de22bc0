//! `mailproxy zmprov`: zmprov's proxy commands, answered from a route table.

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;
use mailproxy_crds::route_table::RouteTable;

#[derive(clap::Args)]
pub struct Args {
    /// Which zmprov command to answer.
    #[arg(value_enum)]
    query: Query,
    /// Route table file (the `routes.json` of a pool's ConfigMap).
    #[arg(long, env = "MAILPROXY_ROUTES")]
    routes: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Query {
    /// getAllReverseProxyURLs: the Route Lookup Handler URLs.
    Garpu,
    /// getAllReverseProxyBackends: the web backends as nginx `server` lines.
    Garpb,
    /// getAllMtaAuthURLs: the MTA auth URLs.
    Gamau,
    /// getAllMemcachedServers: the memcached servers.
    Gamcs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.routes)
        .with_context(|| format!("cannot read route table {}", args.routes.display()))?;
    let table = RouteTable::from_json(&text)
        .with_context(|| format!("route table {} is invalid", args.routes.display()))?;
    match args.query {
        Query::Garpu => println!("{}", table.garpu()),
        Query::Garpb => print!("{}", table.garpb()),
        Query::Gamau => println!("{}", table.gamau()),
        Query::Gamcs => println!("{}", table.gamcs()),
    }
    Ok(())
}
