//! `mailbench`: load generator for mailproxy's benchmarks against stock nginx mail proxy (see
//! docs/benchmarks.md). The load generator runs on one thread (a current-thread tokio runtime),
//! so that on a 2-core machine the proxy gets the other core. `mailbench http` compares the web
//! proxy with nginx as reverse proxy, with wrk as its load generator.

mod backend;
mod client;
mod compare;
mod cpu;
mod http;
mod scenarios;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mailbench",
    about = "IMAP and HTTP benchmarks: mailproxy vs stock nginx"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything (both proxies, all scenarios) and print the table.
    Compare(compare::CompareArgs),
    /// The web proxy against stock nginx as reverse proxy (wrk, 1 KiB answers): requests/s and
    /// p99 latency.
    Http(http::HttpArgs),
    /// The lightweight IMAP backend (any password, instant answers, an in-memory INBOX).
    Backend {
        #[arg(long)]
        port: u16,
        /// Messages in every INBOX.
        #[arg(long, default_value_t = 20)]
        messages: usize,
        /// Size of each message in bytes.
        #[arg(long, default_value_t = 1024 * 1024)]
        message_size: usize,
    },
    /// Logins per second through an IMAP proxy on 127.0.0.1:PORT.
    Logins {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 50)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// APPEND the FETCH benchmark's messages directly to a mailbox server on 127.0.0.1:PORT.
    Seed {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "bench@example.com")]
        user: String,
        #[arg(long, default_value_t = 20)]
        messages: usize,
        #[arg(long, default_value_t = 1024 * 1024)]
        message_size: usize,
    },
    /// Bulk FETCH throughput (MiB/s) through an IMAP proxy on 127.0.0.1:PORT.
    Fetch {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "bench@example.com")]
        user: String,
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value_t = 20)]
        messages: usize,
        #[arg(long, default_value_t = 1024 * 1024)]
        message_size: u64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// RSS growth per idle logged-in session of the proxy processes PIDS.
    Idle {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = scenarios::IDLE_SESSIONS)]
        sessions: usize,
        /// Proxy process ids whose VmRSS is summed (an nginx master and its workers).
        #[arg(long, value_delimiter = ',', required = true)]
        pids: Vec<u32>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Compare(args) => compare::run(&args, &runtime)?,
        Command::Http(args) => http::run(&args)?,
        Command::Backend {
            port,
            messages,
            message_size,
        } => runtime.block_on(backend::serve(
            port,
            backend::Inbox {
                messages,
                size: message_size,
            },
        ))?,
        Command::Logins {
            port,
            clients,
            duration,
        } => {
            let rate = runtime.block_on(scenarios::logins(
                port,
                clients,
                Duration::from_secs(duration),
            ))?;
            println!("{rate:.1} logins/s");
        }
        Command::Seed {
            port,
            user,
            messages,
            message_size,
        } => runtime.block_on(scenarios::seed(port, &user, messages, message_size))?,
        Command::Fetch {
            port,
            user,
            clients,
            messages,
            message_size,
            duration,
        } => {
            let rate = runtime.block_on(scenarios::fetch(
                port,
                &user,
                clients,
                messages,
                message_size,
                Duration::from_secs(duration),
            ))?;
            println!("{rate:.1} MiB/s");
        }
        Command::Idle {
            port,
            sessions,
            pids,
        } => {
            let per_session = runtime.block_on(scenarios::idle(port, sessions, &pids))?;
            println!("{:.1} KiB per idle session", per_session / 1024.0);
        }
    }
    Ok(())
}
