//! `mailproxy serve`: the mail proxy.

use std::path::PathBuf;

use anyhow::Context;
use mailproxy::serve::{ServeOptions, Server};
use mailproxy_crds::proxy_config::ProxyConfig;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (YAML or JSON): listeners, certificates, where the route table is
    /// (see docs/configuration.md).
    #[arg(long, env = "MAILPROXY_CONFIG")]
    config: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = ProxyConfig::from_file(&args.config)?;
    let server = Server::bind(&config, ServeOptions::from_config(&config))
        .await
        .context("mailproxy serve cannot start")?;
    server.run(super::shutdown_signal()).await
}
