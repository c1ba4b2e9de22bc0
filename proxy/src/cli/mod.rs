//! Command-line interface: one module per subcommand.

mod zmprov;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "mailproxy", version, about = "Zimbra-style IMAP, POP3 and HTTP proxy for Kubernetes")]
pub struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value = "text", global = true, env = "MAILPROXY_LOG_FORMAT")]
    pub log_format: LogFormat,
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
    /// Print what zmprov's proxy commands print (garpu, garpb, gamau, gamcs) for a route table.
    Zmprov(zmprov::Args),
}

/// Structured logs on stderr; the level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Zmprov(args) => zmprov::run(args),
    }
}
