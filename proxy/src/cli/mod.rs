//! Command-line interface: one module per subcommand.

mod lookupd;
mod metrics;
mod purge;
mod serve;
mod zmprov;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "mailproxy",
    version,
    about = "Zimbra-style IMAP, POP3 and HTTP proxy for Kubernetes"
)]
pub struct Cli {
    /// Log line format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        global = true,
        env = "MAILPROXY_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Runtime threads; default: one per CPU the process may use (its cgroup quota included).
    /// With one, every connection runs on a single-threaded runtime: no work stealing, tasks run
    /// in the order they woke, which keeps tail latency low on one core.
    #[arg(long, global = true, env = "MAILPROXY_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the Route Lookup Handler protocol from a directory file and a route table (for
    /// mailbox backends that are not Zimbra; also works as stock nginx's auth_http server).
    Lookupd(lookupd::Args),
    /// Delete every cached route of an account from every memcached server (zmproxypurge).
    Purge(purge::Args),
    /// Run the mail proxy: IMAP, IMAPS, POP3, POP3S, HTTP and HTTPS listeners from a
    /// configuration file.
    Serve(serve::Args),
    /// Print what zmprov's proxy commands print (garpu, garpb, gamau, gamcs) for a route table.
    Zmprov(zmprov::Args),
}

/// Structured logs on stderr; the level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: log collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Lookupd(args) => lookupd::run(args).await,
        Command::Purge(args) => purge::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Zmprov(args) => zmprov::run(args),
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
