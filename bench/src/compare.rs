//! `mailbench compare`: starts the backends, the route handler, stock nginx and mailproxy on free
//! loopback ports, runs the three scenarios against each proxy configuration one after the
//! other, and prints the table with ratios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mailproxy_testkit::{Dovecot, free_port, wait_for_port};
use tempfile::TempDir;
use tokio::runtime::Runtime;

use crate::cpu;
use crate::scenarios;

const MAIL_MODULE: &str = "/usr/lib/nginx/modules/ngx_mail_module.so";
const LOOKUP_PATH: &str = "/service/extension/nginx-lookup";
/// The ceiling row: the client talks to the backend itself.
const DIRECT: &str = "no proxy (client to backend directly: the ceiling)";
const STARTUP: Duration = Duration::from_secs(15);

/// What `compare` runs.
#[derive(Clone, Debug, clap::Args)]
pub struct CompareArgs {
    /// The mailproxy binary (a release build).
    #[arg(long, default_value = "target/release/mailproxy")]
    pub mailproxy: PathBuf,
    /// Seconds each login and FETCH measurement runs.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Concurrent clients of the login benchmark.
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// Concurrent clients of the FETCH benchmark.
    #[arg(long, default_value_t = 1)]
    pub fetch_clients: usize,
    /// Messages in the FETCH benchmark's mailbox.
    #[arg(long, default_value_t = 20)]
    pub messages: usize,
    /// Size of each message in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub message_size: usize,
    /// Idle logged-in sessions held open for the memory measurement.
    #[arg(long, default_value_t = scenarios::IDLE_SESSIONS)]
    pub sessions: usize,
    /// Rounds of every measurement; the table shows each row's median. On a shared 2-core
    /// machine single runs vary by ±15 %.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
}

/// A proxy under test.
#[derive(Clone, Copy, Debug)]
enum Proxy {
    /// Stock nginx: worker processes, `proxy_buffer` (`None`: the default, one page).
    Nginx {
        workers: u32,
        buffer: Option<&'static str>,
    },
    /// mailproxy: tokio worker threads and how it routes.
    Mailproxy { threads: u32, route: Route },
}

#[derive(Clone, Copy, Debug)]
enum Route {
    /// The route table's `lookupHandlers` with the embedded cache, `cacheTtlSeconds` as given.
    Lookup { cache_ttl: u64 },
    /// A `domains` entry of the route table: no lookup at all.
    Table,
}

impl Proxy {
    fn label(self) -> String {
        match self {
            Proxy::Nginx { workers, buffer } => format!(
                "nginx {workers} worker{}, proxy_buffer {}",
                if workers == 1 { "" } else { "s" },
                buffer.unwrap_or("default (1 page)")
            ),
            Proxy::Mailproxy { threads, route } => {
                let route = match route {
                    Route::Lookup { cache_ttl: 0 } => {
                        "lookup handler on every login (cacheTtlSeconds 0)".to_string()
                    }
                    Route::Lookup { cache_ttl } => {
                        format!("lookup handler + embedded cache ({cache_ttl} s)")
                    }
                    Route::Table => "route in the table (domains)".to_string(),
                };
                format!(
                    "mailproxy {threads} thread{}, {route}",
                    if threads == 1 { "" } else { "s" }
                )
            }
        }
    }
}

const NGINX_1: Proxy = Proxy::Nginx {
    workers: 1,
    buffer: None,
};
const MAILPROXY_1: Proxy = Proxy::Mailproxy {
    threads: 1,
    route: Route::Lookup { cache_ttl: 3600 },
};

/// One measured row.
#[derive(Clone, Debug)]
struct Row {
    scenario: &'static str,
    label: String,
    value: f64,
    unit: &'static str,
    /// The baseline the ratio is against (`None`: this row is the baseline).
    baseline: Option<f64>,
    /// Whether a smaller value is better (memory).
    lower_is_better: bool,
}

pub fn run(args: &CompareArgs, runtime: &Runtime) -> anyhow::Result<()> {
    let mailproxy = args
        .mailproxy
        .canonicalize()
        .with_context(|| format!("{} is missing: build it first", args.mailproxy.display()))?;
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        eprintln!("round {round}/{}", args.rounds);
        rounds.push(one_round(args, runtime, &mailproxy)?);
    }
    print_table(&medians(&rounds));
    Ok(())
}

/// Each row's median value over the rounds (which list the same rows in the same order), the
/// ratios taken between medians.
fn medians(rounds: &[Vec<Row>]) -> Vec<Row> {
    let mut rows: Vec<Row> = rounds[0].clone();
    for (index, row) in rows.iter_mut().enumerate() {
        let mut values: Vec<f64> = rounds.iter().map(|round| round[index].value).collect();
        values.sort_by(f64::total_cmp);
        row.value = values[values.len() / 2];
    }
    let baselines: Vec<(&'static str, f64)> = rows
        .iter()
        .filter(|row| row.baseline.is_none())
        .map(|row| (row.scenario, row.value))
        .collect();
    for row in &mut rows {
        if row.baseline.is_some() {
            row.baseline = baselines
                .iter()
                .find(|(scenario, _)| *scenario == row.scenario)
                .map(|(_, value)| *value);
        }
    }
    rows
}

/// Every scenario through every proxy once.
fn one_round(args: &CompareArgs, runtime: &Runtime, mailproxy: &Path) -> anyhow::Result<Vec<Row>> {
    let duration = Duration::from_secs(args.duration);
    let mut rows = Vec::new();

    // Logins and idle sessions: the lightweight backend, nginx's http block as route handler.
    let backend_port = free_port();
    let _backend = Server::spawn(
        "mailbench backend",
        Command::new(std::env::current_exe()?).args([
            "backend",
            "--port",
            &backend_port.to_string(),
            "--messages",
            &args.messages.to_string(),
            "--message-size",
            &args.message_size.to_string(),
        ]),
        None,
    )?;
    wait_for_port(backend_port, STARTUP)?;
    let handler = Nginx::handler(backend_port)?;

    let login_proxies = [
        NGINX_1,
        Proxy::Nginx {
            workers: 2,
            buffer: None,
        },
        MAILPROXY_1,
        Proxy::Mailproxy {
            threads: 1,
            route: Route::Lookup { cache_ttl: 0 },
        },
        Proxy::Mailproxy {
            threads: 1,
            route: Route::Table,
        },
        Proxy::Mailproxy {
            threads: 2,
            route: Route::Lookup { cache_ttl: 3600 },
        },
    ];
    let direct = runtime.block_on(scenarios::logins(backend_port, args.clients, duration))?;
    let mut nginx_logins = None;
    let mut nginx_cpu = None;
    let mut cpu_rows = Vec::new();
    for proxy in login_proxies {
        let running = Running::start(proxy, mailproxy, backend_port, &handler)?;
        eprintln!("logins: {} ...", proxy.label());
        let cpu_pids = running.cpu_pids(&handler)?;
        let cpu_before = cpu::cpu_seconds(&cpu_pids)?;
        let rate = runtime
            .block_on(scenarios::logins(running.port, args.clients, duration))
            .with_context(|| format!("logins through {}", proxy.label()))?;
        let cpu_spent = cpu::cpu_seconds(&cpu_pids)? - cpu_before;
        let per_login = cpu_spent / (rate * duration.as_secs_f64()) * 1e6;
        let baseline = nginx_logins;
        nginx_logins.get_or_insert(rate);
        rows.push(Row {
            scenario: "logins/s",
            label: proxy.label(),
            value: rate,
            unit: "logins/s",
            baseline,
            lower_is_better: false,
        });
        let baseline = nginx_cpu;
        nginx_cpu.get_or_insert(per_login);
        cpu_rows.push(Row {
            scenario: "CPU per login (proxy + route handler)",
            label: proxy.label(),
            value: per_login,
            unit: "µs",
            baseline,
            lower_is_better: true,
        });
    }

    rows.push(Row {
        scenario: "logins/s",
        label: DIRECT.to_string(),
        value: direct,
        unit: "logins/s",
        baseline: nginx_logins,
        lower_is_better: false,
    });
    rows.append(&mut cpu_rows);

    let mut nginx_idle = None;
    for proxy in [NGINX_1, MAILPROXY_1] {
        let running = Running::start(proxy, mailproxy, backend_port, &handler)?;
        eprintln!("idle sessions: {} ...", proxy.label());
        let pids = running.pids()?;
        let per_session = runtime
            .block_on(scenarios::idle(running.port, args.sessions, &pids))
            .with_context(|| format!("idle sessions through {}", proxy.label()))?;
        let baseline = nginx_idle;
        nginx_idle.get_or_insert(per_session / 1024.0);
        rows.push(Row {
            scenario: "RSS per idle session",
            label: proxy.label(),
            value: per_session / 1024.0,
            unit: "KiB",
            baseline,
            lower_is_better: true,
        });
    }

    // Bulk FETCH from the lightweight backend's in-memory INBOX: the proxy is the bottleneck.
    bulk_fetch(
        "bulk FETCH, in-memory backend",
        args,
        runtime,
        mailproxy,
        backend_port,
        &handler,
        &mut rows,
    )?;
    drop(handler);

    // Bulk FETCH: a real Dovecot with the messages appended beforehand.
    let dovecot = Dovecot::start()?;
    eprintln!(
        "seeding {} messages of {} bytes ...",
        args.messages, args.message_size
    );
    runtime.block_on(scenarios::seed(
        dovecot.imap_port(),
        FETCH_USER,
        args.messages,
        args.message_size,
    ))?;
    let handler = Nginx::handler(dovecot.imap_port())?;
    bulk_fetch(
        "bulk FETCH, Dovecot",
        args,
        runtime,
        mailproxy,
        dovecot.imap_port(),
        &handler,
        &mut rows,
    )?;
    Ok(rows)
}

const FETCH_USER: &str = "bench@example.com";

/// Bulk FETCH straight from the mailbox server on `backend_port` (the ceiling), then through
/// nginx (default and 1 MiB `proxy_buffer`) and mailproxy (1 and 2 threads).
#[allow(clippy::too_many_arguments)]
fn bulk_fetch(
    scenario: &'static str,
    args: &CompareArgs,
    runtime: &Runtime,
    mailproxy: &Path,
    backend_port: u16,
    handler: &Nginx,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.duration);
    let fetch = |port| {
        runtime.block_on(scenarios::fetch(
            port,
            FETCH_USER,
            args.fetch_clients,
            args.messages,
            args.message_size as u64,
            duration,
        ))
    };
    let direct = fetch(backend_port)?;
    let mut nginx_fetch = None;
    let fetch_proxies = [
        NGINX_1,
        Proxy::Nginx {
            workers: 1,
            buffer: Some("1m"),
        },
        MAILPROXY_1,
        Proxy::Mailproxy {
            threads: 2,
            route: Route::Lookup { cache_ttl: 3600 },
        },
    ];
    for proxy in fetch_proxies {
        let running = Running::start(proxy, mailproxy, backend_port, handler)?;
        eprintln!("{scenario}: {} ...", proxy.label());
        let rate =
            fetch(running.port).with_context(|| format!("{scenario} through {}", proxy.label()))?;
        let baseline = nginx_fetch;
        nginx_fetch.get_or_insert(rate);
        rows.push(Row {
            scenario,
            label: proxy.label(),
            value: rate,
            unit: "MiB/s",
            baseline,
            lower_is_better: false,
        });
    }
    rows.push(Row {
        scenario,
        label: DIRECT.to_string(),
        value: direct,
        unit: "MiB/s",
        baseline: nginx_fetch,
        lower_is_better: false,
    });
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!("| scenario | proxy | result | vs nginx 1 worker (default) |");
    println!("|---|---|---:|---:|");
    for row in rows {
        let ratio = match row.baseline {
            None => "baseline".to_string(),
            Some(baseline) if row.lower_is_better => {
                format!("{:.2}x less", baseline / row.value)
            }
            Some(baseline) => format!("{:.2}x", row.value / baseline),
        };
        println!(
            "| {} | {} | {:.1} {} | {} |",
            row.scenario, row.label, row.value, row.unit, ratio
        );
    }
}

/// A proxy started for one measurement, stopped when dropped.
struct Running {
    port: u16,
    nginx: Option<Nginx>,
    mailproxy: Option<(Server, TempDir)>,
}

impl Running {
    fn start(
        proxy: Proxy,
        mailproxy: &Path,
        backend_port: u16,
        handler: &Nginx,
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let running = match proxy {
            Proxy::Nginx { workers, buffer } => Running {
                port,
                nginx: Some(Nginx::mail(workers, buffer, port, backend_port)?),
                mailproxy: None,
            },
            Proxy::Mailproxy { threads, route } => Running {
                port,
                nginx: None,
                mailproxy: Some(start_mailproxy(
                    mailproxy,
                    threads,
                    route,
                    port,
                    backend_port,
                    handler.http_port,
                )?),
            },
        };
        wait_for_port(port, STARTUP)?;
        Ok(running)
    }

    /// The processes that do the work of a login: the proxy and its route handler (stock
    /// nginx answers its `auth_http` in its own worker; mailproxy asks `handler`).
    fn cpu_pids(&self, handler: &Nginx) -> anyhow::Result<Vec<u32>> {
        let mut pids = self.pids()?;
        if self.mailproxy.is_some() {
            pids.extend(handler.pids()?);
        }
        Ok(pids)
    }

    /// The processes whose memory holds the sessions.
    fn pids(&self) -> anyhow::Result<Vec<u32>> {
        match (&self.nginx, &self.mailproxy) {
            (Some(nginx), _) => nginx.pids(),
            (None, Some((server, _))) => Ok(vec![server.pid]),
            (None, None) => bail!("no proxy runs"),
        }
    }
}

fn start_mailproxy(
    binary: &Path,
    threads: u32,
    route: Route,
    port: u16,
    backend_port: u16,
    handler_port: u16,
) -> anyhow::Result<(Server, TempDir)> {
    let (handlers, domains, cache_ttl) = match route {
        Route::Lookup { cache_ttl } => (
            format!("\"http://127.0.0.1:{handler_port}{LOOKUP_PATH}\""),
            String::new(),
            cache_ttl,
        ),
        Route::Table => (
            String::new(),
            "\"example.com\": \"bench\"".to_string(),
            3600,
        ),
    };
    let routes = format!(
        r#"{{
  "servers": {{"bench": {{"host": "127.0.0.1", "ports": {{"imap": {backend_port}}}}}}},
  "domains": {{{domains}}},
  "lookupHandlers": [{handlers}],
  "memcachedServers": [],
  "settings": {{"starttls": "off", "cacheTtlSeconds": {cache_ttl}}}
}}
"#
    );
    spawn_mailproxy(binary, threads, "imap", port, &routes)
}

/// `mailproxy serve` with one `protocol` listener on 127.0.0.1:`port`, the route table `routes`
/// (JSON), `threads` runtime threads and warnings-only logs, in a temporary directory.
pub(crate) fn spawn_mailproxy(
    binary: &Path,
    threads: u32,
    protocol: &str,
    port: u16,
    routes: &str,
) -> anyhow::Result<(Server, TempDir)> {
    let dir = tempfile::tempdir()?;
    let routes_path = dir.path().join("routes.json");
    std::fs::write(&routes_path, routes)?;
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - {{protocol: {protocol}, address: \"127.0.0.1:{port}\"}}\n\
             routeTable: {{file: {}}}\n\
             healthListen: \"127.0.0.1:{}\"\n\
             shutdownGraceSeconds: 0\n\
             maxConnections: 100000\n",
            routes_path.display(),
            free_port()
        ),
    )?;
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("MAILPROXY_THREADS", threads.to_string())
        .env("RUST_LOG", "warn");
    let server = Server::spawn("mailproxy", &mut command, Some(&dir.path().join("out.log")))?;
    Ok((server, dir))
}

/// An nginx master process with its configuration in a temporary directory.
struct Nginx {
    server: Server,
    http_port: u16,
    _dir: TempDir,
}

impl Nginx {
    /// nginx as the route handler only: its http block answers auth_http and Zimbra lookups
    /// alike with `backend_port`.
    fn handler(backend_port: u16) -> anyhow::Result<Self> {
        let nginx = Self::start(1, None, backend_port)?;
        wait_for_port(nginx.http_port, STARTUP)?;
        Ok(nginx)
    }

    /// nginx as mail proxy on `imap_port`, its own http block as its auth_http server.
    fn mail(
        workers: u32,
        buffer: Option<&str>,
        imap_port: u16,
        backend_port: u16,
    ) -> anyhow::Result<Self> {
        Self::start(workers, Some((imap_port, buffer)), backend_port)
    }

    fn start(
        workers: u32,
        mail: Option<(u16, Option<&str>)>,
        backend_port: u16,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("logs"))?;
        let http_port = free_port();
        let d = dir.path().display();
        let mail = match mail {
            Some((imap_port, buffer)) => format!(
                "mail {{\n  auth_http 127.0.0.1:{http_port}/auth;\n  proxy on;\n{}  \
                 server {{ listen 127.0.0.1:{imap_port}; protocol imap; }}\n}}\n",
                buffer
                    .map(|size| format!("  proxy_buffer {size};\n"))
                    .unwrap_or_default()
            ),
            None => String::new(),
        };
        // nginx's auth_http takes any status; Zimbra's lookup protocol (mailproxy) needs 200.
        let answer = |status: u16| {
            format!(
                "{{\n      add_header Auth-Status OK;\n      add_header Auth-Server 127.0.0.1;\n      \
                 add_header Auth-Port {backend_port};\n      return {status};\n    }}"
            )
        };
        let config = format!(
            "load_module {MAIL_MODULE};\n\
             daemon off;\n\
             worker_processes {workers};\n\
             worker_rlimit_nofile 20000;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 10000; }}\n\
             http {{\n  access_log off;\n  server {{\n    listen 127.0.0.1:{http_port};\n    \
             location / {}\n    location {LOOKUP_PATH} {}\n  }}\n}}\n\
             {mail}",
            answer(204),
            answer(200)
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config)?;
        let mut command = Command::new("nginx");
        command.arg("-p").arg(dir.path()).arg("-c").arg(&path);
        let server = Server::spawn("nginx", &mut command, Some(&dir.path().join("out.log")))?;
        Ok(Self {
            server,
            http_port,
            _dir: dir,
        })
    }

    /// The master and its workers.
    fn pids(&self) -> anyhow::Result<Vec<u32>> {
        let pids = cpu::process_tree(self.server.pid)?;
        if pids.len() < 2 {
            bail!("nginx has no worker processes");
        }
        Ok(pids)
    }
}

/// A child process stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
pub(crate) struct Server {
    child: Child,
    pub(crate) pid: u32,
}

impl Server {
    pub(crate) fn spawn(
        what: &str,
        command: &mut Command,
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        command.stdin(Stdio::null());
        if let Some(log) = log {
            let out = std::fs::File::create(log)?;
            command.stdout(out.try_clone()?).stderr(out);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let pid = child.id();
        Ok(Self { child, pid })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str, value: f64, baseline: Option<f64>) -> Row {
        Row {
            scenario: "logins/s",
            label: label.to_string(),
            value,
            unit: "logins/s",
            baseline,
            lower_is_better: false,
        }
    }

    #[test]
    fn medians_are_taken_row_by_row_and_ratios_between_medians() {
        let rounds = vec![
            vec![
                row("nginx", 100.0, None),
                row("mailproxy", 150.0, Some(100.0)),
            ],
            vec![
                row("nginx", 120.0, None),
                row("mailproxy", 130.0, Some(120.0)),
            ],
            vec![
                row("nginx", 80.0, None),
                row("mailproxy", 170.0, Some(80.0)),
            ],
        ];
        let rows = medians(&rounds);
        assert_eq!(rows[0].value, 100.0);
        assert_eq!(rows[0].baseline, None);
        assert_eq!(rows[1].value, 150.0);
        assert_eq!(rows[1].baseline, Some(100.0));
    }
}
