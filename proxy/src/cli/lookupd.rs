//! `mailproxy lookupd`: the reference Route Lookup Handler.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use mailproxy::lookupd::{Lookupd, LookupdConfig, LookupdTls};

#[derive(clap::Args)]
pub struct Args {
    /// Address to serve the lookup protocol on (Zimbra's handler port is 7072); `[::]:7072` for
    /// every address of both families.
    #[arg(
        long,
        default_value = "127.0.0.1:7072",
        env = "MAILPROXY_LOOKUPD_LISTEN"
    )]
    listen: SocketAddr,
    /// Route table file: the mailbox servers' addresses and ports, pinned accounts and domains.
    #[arg(long, env = "MAILPROXY_ROUTES")]
    routes: PathBuf,
    /// Directory file: account -> MailboxServer name, aliases, default domain
    /// (see examples/lookupd-directory.txt).
    #[arg(long, env = "MAILPROXY_LOOKUPD_DIRECTORY")]
    directory: Option<PathBuf>,
    /// File holding the shared secret clients must send in X-Mailproxy-Lookup-Secret (an empty
    /// file is refused); followed like the other files, with the previous secret accepted for
    /// 5 minutes after a change.
    #[arg(long, env = "MAILPROXY_LOOKUPD_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// Auth-Wait, in seconds, of a refused lookup (Zimbra: 10).
    #[arg(long, default_value_t = 10)]
    refusal_wait_seconds: u64,
    /// Serve https with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Address of the Prometheus metrics endpoint (/metrics).
    #[arg(long, env = "MAILPROXY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = LookupdConfig::new(args.routes);
    config.directory = args.directory;
    config.refusal_wait = Duration::from_secs(args.refusal_wait_seconds);
    config.secret_file = args.secret_file;
    if let (Some(certificate_chain), Some(private_key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(LookupdTls {
            certificate_chain,
            private_key,
        });
    }
    let lookupd = Lookupd::new(config).context("lookupd cannot start")?;
    let mut registry = prometheus_client::registry::Registry::default();
    lookupd.register(&mut registry);
    if let Some(address) = args.metrics_listen {
        super::metrics::serve(address, registry).await?;
    }
    let listener = mailproxy::listen::bind(&args.listen.to_string()).await?;
    lookupd
        .serve(listener, super::shutdown_signal())
        .await
        .context("lookupd stopped with an error")
}
