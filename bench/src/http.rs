//! `mailbench http`: the web proxy side by side with stock nginx as reverse proxy (issue 5).
//!
//! One backend for everyone: stock nginx (one worker) serving a file of `--body-size` bytes,
//! because it is fast, neutral (neither proxy's code) and answers with a `Content-Length`, so both
//! proxies relay the same fixed-size responses. In front of it, one after the other: stock nginx as
//! reverse proxy with upstream keep-alive, and `mailproxy serve` with an `http` listener whose
//! route table has the backend as its only `webBackends` entry. wrk (keep-alive, its default) runs
//! against each the same way; requests/s and the p99 latency come from its `--latency` output.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use mailproxy_testkit::{free_port, wait_for_port};
use tempfile::TempDir;

use crate::compare::{Server, spawn_mailproxy};
use crate::cpu;

const STARTUP: Duration = Duration::from_secs(15);

/// What `http` runs.
#[derive(Clone, Debug, clap::Args)]
pub struct HttpArgs {
    /// The mailproxy binary (a release build).
    #[arg(long, default_value = "target/release/mailproxy")]
    pub mailproxy: PathBuf,
    /// Seconds each wrk measurement runs.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds of load before each measurement (fills connection pools; not counted).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Concurrent keep-alive connections (wrk -c).
    #[arg(long, default_value_t = 50)]
    pub connections: u32,
    /// wrk threads (wrk -t).
    #[arg(long, default_value_t = 1)]
    pub wrk_threads: u32,
    /// Size of every response body in bytes.
    #[arg(long, default_value_t = 1024)]
    pub body_size: usize,
    /// Only the one-core rows (nginx 1 worker, mailproxy 1 thread) and the no-proxy row.
    #[arg(long)]
    pub one_core: bool,
    /// Rounds of measurements, each running every target once in turn; the table shows each
    /// target's median. On a shared 2-core machine single runs vary by ±20 %.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
}

/// What wrk talks to.
#[derive(Clone, Copy, Debug)]
enum Target {
    Nginx { workers: u32 },
    Mailproxy { threads: u32 },
    Direct,
}

impl Target {
    fn label(self) -> String {
        let plural = |n: u32| if n == 1 { "" } else { "s" };
        match self {
            Target::Nginx { workers } => format!("nginx {workers} worker{}", plural(workers)),
            Target::Mailproxy { threads } => {
                format!("mailproxy {threads} thread{}", plural(threads))
            }
            Target::Direct => "no proxy (wrk to the backend directly: the ceiling)".to_string(),
        }
    }
}

/// One wrk run.
#[derive(Clone, Copy, Debug)]
struct Measured {
    requests_per_second: f64,
    p99_ms: f64,
    /// CPU time the proxy's processes spent per request (no proxy: `None`).
    cpu_per_request_us: Option<f64>,
}

pub fn run(args: &HttpArgs) -> anyhow::Result<()> {
    let mailproxy = args
        .mailproxy
        .canonicalize()
        .with_context(|| format!("{} is missing: build it first", args.mailproxy.display()))?;
    let backend = Nginx::backend(args.body_size)?;
    check(backend.port, args.body_size).context("the backend answers wrongly")?;

    let mut targets = vec![Target::Nginx { workers: 1 }];
    if !args.one_core {
        targets.push(Target::Nginx { workers: 2 });
    }
    targets.push(Target::Mailproxy { threads: 1 });
    if !args.one_core {
        targets.push(Target::Mailproxy { threads: 2 });
    }
    targets.push(Target::Direct);

    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); targets.len()];
    for round in 1..=args.rounds {
        for (target, runs) in targets.iter().zip(&mut runs) {
            let label = target.label();
            eprintln!("http: round {round}/{}: {label} ...", args.rounds);
            runs.push(measure(args, *target, &mailproxy, backend.port)?);
        }
    }
    let rows: Vec<(String, Measured)> = targets
        .iter()
        .zip(&runs)
        .map(|(target, runs)| (target.label(), median(runs)))
        .collect();
    print_table(&rows);
    if args.rounds > 1 {
        print_rounds(&targets, &runs);
    }
    Ok(())
}

/// Starts `target`, warms it up, and runs wrk through it, counting its processes' CPU time.
fn measure(
    args: &HttpArgs,
    target: Target,
    mailproxy: &Path,
    backend_port: u16,
) -> anyhow::Result<Measured> {
    let label = target.label();
    let running = Running::start(target, mailproxy, backend_port)
        .with_context(|| format!("cannot start {label}"))?;
    check(running.port, args.body_size)
        .with_context(|| format!("{label} does not relay the backend's answer"))?;
    if args.warmup > 0 {
        wrk(args, running.port, args.warmup).with_context(|| format!("warm-up through {label}"))?;
    }
    let pids = running.pids()?;
    let cpu_before = cpu::cpu_seconds(&pids)?;
    let mut measured =
        wrk(args, running.port, args.duration).with_context(|| format!("wrk through {label}"))?;
    let cpu_spent = cpu::cpu_seconds(&pids)? - cpu_before;
    let requests = measured.requests_per_second * args.duration as f64;
    measured.cpu_per_request_us = (!pids.is_empty()).then(|| cpu_spent / requests * 1e6);
    Ok(measured)
}

/// Each figure's median over the rounds (taken separately: the median requests/s and the
/// median p99 may come from different rounds).
fn median(runs: &[Measured]) -> Measured {
    let middle = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Measured {
        requests_per_second: middle(runs.iter().map(|run| run.requests_per_second).collect()),
        p99_ms: middle(runs.iter().map(|run| run.p99_ms).collect()),
        cpu_per_request_us: runs
            .iter()
            .map(|run| run.cpu_per_request_us)
            .collect::<Option<Vec<f64>>>()
            .map(middle),
    }
}

/// Every round's figures, for the spread behind the medians.
fn print_rounds(targets: &[Target], runs: &[Vec<Measured>]) {
    println!();
    println!("| proxy | round | requests/s | p99 latency | proxy CPU per request |");
    println!("|---|---:|---:|---:|---:|");
    for (target, runs) in targets.iter().zip(runs) {
        for (round, run) in runs.iter().enumerate() {
            let cpu = run
                .cpu_per_request_us
                .map_or("-".to_string(), |us| format!("{us:.1} µs"));
            println!(
                "| {} | {} | {:.0} | {:.2} ms | {cpu} |",
                target.label(),
                round + 1,
                run.requests_per_second,
                run.p99_ms
            );
        }
    }
}

fn print_table(rows: &[(String, Measured)]) {
    let baseline = rows.first().map(|(_, measured)| *measured);
    println!(
        "| proxy | requests/s | p99 latency | proxy CPU per request | requests/s vs nginx 1 \
         worker | p99 vs nginx 1 worker | CPU per request vs nginx 1 worker |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (index, (label, measured)) in rows.iter().enumerate() {
        let cpu = measured
            .cpu_per_request_us
            .map_or("-".to_string(), |us| format!("{us:.1} µs"));
        let (rps, p99, cpu_ratio) = match baseline {
            Some(base) if index > 0 => (
                format!(
                    "{:.2}x",
                    measured.requests_per_second / base.requests_per_second
                ),
                format!("{:.2}x", measured.p99_ms / base.p99_ms),
                match (measured.cpu_per_request_us, base.cpu_per_request_us) {
                    (Some(us), Some(base)) => format!("{:.2}x", us / base),
                    _ => "-".to_string(),
                },
            ),
            _ => (
                "baseline".to_string(),
                "baseline".to_string(),
                "baseline".to_string(),
            ),
        };
        println!(
            "| {label} | {:.0} | {:.2} ms | {cpu} | {rps} | {p99} | {cpu_ratio} |",
            measured.requests_per_second, measured.p99_ms
        );
    }
}

/// `wrk --latency` for `seconds` against `127.0.0.1:port`. Any non-2xx/3xx answer or socket
/// error fails the run: a proxy that answers errors fast must not look fast.
fn wrk(args: &HttpArgs, port: u16, seconds: u64) -> anyhow::Result<Measured> {
    let output = Command::new("wrk")
        .arg("-t")
        .arg(args.wrk_threads.to_string())
        .arg("-c")
        .arg(args.connections.to_string())
        .arg("-d")
        .arg(format!("{seconds}s"))
        .arg("--latency")
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("cannot run wrk: install the Debian package wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> anyhow::Result<Measured> {
    if let Some(line) = text
        .lines()
        .find(|line| line.contains("Non-2xx") || line.contains("Socket errors"))
    {
        bail!("wrk saw failed requests ({}): {text}", line.trim());
    }
    let requests_per_second = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))?
        .trim()
        .parse()
        .context("wrk's Requests/sec is not a number")?;
    let p99 = text
        .lines()
        .skip_while(|line| !line.contains("Latency Distribution"))
        .find_map(|line| line.trim().strip_prefix("99%"))
        .with_context(|| format!("no 99% latency in wrk's output (--latency): {text}"))?;
    Ok(Measured {
        requests_per_second,
        p99_ms: milliseconds(p99.trim())?,
        cpu_per_request_us: None,
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`.
fn milliseconds(value: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown unit in wrk's latency {value:?}")
    };
    let number: f64 = number
        .parse()
        .with_context(|| format!("wrk's latency {value:?} is not a number"))?;
    Ok(number * scale)
}

/// One `GET /` on its own connection: a 200 with exactly `body_size` bytes of body.
fn check(port: u16, body_size: usize) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no complete response: {text:?}");
    };
    if !head.starts_with("HTTP/1.1 200") || body.len() != body_size {
        bail!(
            "expected 200 with {body_size} bytes, got {} bytes after {head:?}",
            body.len()
        );
    }
    Ok(())
}

/// A target started for one measurement, stopped when dropped.
struct Running {
    port: u16,
    nginx: Option<Nginx>,
    mailproxy: Option<(Server, TempDir)>,
}

impl Running {
    /// The proxy's processes (none without a proxy).
    fn pids(&self) -> anyhow::Result<Vec<u32>> {
        match (&self.nginx, &self.mailproxy) {
            (Some(nginx), _) => cpu::process_tree(nginx.server.pid),
            (None, Some((server, _))) => Ok(vec![server.pid]),
            (None, None) => Ok(Vec::new()),
        }
    }

    fn start(target: Target, mailproxy: &Path, backend_port: u16) -> anyhow::Result<Self> {
        let running = match target {
            Target::Direct => Running {
                port: backend_port,
                nginx: None,
                mailproxy: None,
            },
            Target::Nginx { workers } => {
                let nginx = Nginx::reverse_proxy(workers, backend_port)?;
                Running {
                    port: nginx.port,
                    nginx: Some(nginx),
                    mailproxy: None,
                }
            }
            Target::Mailproxy { threads } => {
                let port = free_port();
                let server = start_mailproxy(mailproxy, threads, port, backend_port)?;
                Running {
                    port,
                    nginx: None,
                    mailproxy: Some(server),
                }
            }
        };
        wait_for_port(running.port, STARTUP)?;
        Ok(running)
    }
}

fn start_mailproxy(
    binary: &Path,
    threads: u32,
    port: u16,
    backend_port: u16,
) -> anyhow::Result<(Server, TempDir)> {
    let routes = format!("{{\"webBackends\": [\"127.0.0.1:{backend_port}\"]}}\n");
    spawn_mailproxy(binary, threads, "http", port, &routes)
}

/// An nginx master process with its configuration in a temporary directory.
struct Nginx {
    server: Server,
    port: u16,
    _dir: TempDir,
}

impl Nginx {
    /// The backend: one worker serving a file of `body_size` bytes at every path.
    fn backend(body_size: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("www");
        std::fs::create_dir(&root)?;
        std::fs::write(root.join("body"), vec![b'x'; body_size])?;
        let server = format!(
            "open_file_cache max=16;\n  \
             server {{\n    listen 127.0.0.1:{{port}};\n    root {};\n    \
             default_type application/octet-stream;\n    \
             location / {{ try_files /body =500; }}\n  }}",
            root.display()
        );
        Self::start(dir, 1, &server)
    }

    /// nginx as reverse proxy to the backend, the way a Zimbra-style web proxy is configured:
    /// HTTP/1.1 to the upstream with a keep-alive pool, the client's Host and the usual
    /// forwarding headers (mailproxy adds them too).
    fn reverse_proxy(workers: u32, backend_port: u16) -> anyhow::Result<Self> {
        let server = format!(
            "upstream backend {{\n    server 127.0.0.1:{backend_port};\n    keepalive 64;\n    \
             keepalive_requests 1000000;\n  }}\n  \
             server {{\n    listen 127.0.0.1:{{port}};\n    location / {{\n      \
             proxy_pass http://backend;\n      proxy_http_version 1.1;\n      \
             proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      \
             proxy_set_header X-Forwarded-Proto $scheme;\n    }}\n  }}"
        );
        Self::start(tempfile::tempdir()?, workers, &server)
    }

    /// Starts nginx with `http_body` (where `{port}` is a free port) in its `http {}` block,
    /// no access log and no per-connection request limit (keep-alive connections stay open for
    /// the whole run, as hyper's do).
    fn start(dir: TempDir, workers: u32, http_body: &str) -> anyhow::Result<Self> {
        let port = free_port();
        let d = dir.path().display();
        let http_body = http_body.replace("{port}", &port.to_string());
        let config = format!(
            "daemon off;\n\
             worker_processes {workers};\n\
             worker_rlimit_nofile 20000;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 10000; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n  {http_body}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config)?;
        let mut command = Command::new("nginx");
        command.arg("-p").arg(dir.path()).arg("-c").arg(&path);
        let server = Server::spawn("nginx", &mut command, Some(&dir.path().join("out.log")))?;
        wait_for_port(port, STARTUP).with_context(|| {
            let errors = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            format!("nginx did not start: {errors}")
        })?;
        Ok(Self {
            server,
            port,
            _dir: dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 10s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.80ms  344.12us   9.44ms   91.02%
    Req/Sec    27.91k     1.02k   29.13k    87.00%
  Latency Distribution
     50%    1.75ms
     75%    1.86ms
     90%    2.05ms
     99%  812.50us
  277731 requests in 10.00s, 336.79MB read
Requests/sec:  27770.35
Transfer/sec:     33.68MB
";

    #[test]
    fn reads_requests_per_second_and_p99() {
        let measured = parse_wrk(OUTPUT).unwrap();
        assert_eq!(measured.requests_per_second, 27770.35);
        assert!((measured.p99_ms - 0.8125).abs() < 1e-9);
    }

    #[test]
    fn the_median_is_taken_figure_by_figure() {
        let run = |rps, p99, cpu| Measured {
            requests_per_second: rps,
            p99_ms: p99,
            cpu_per_request_us: cpu,
        };
        let runs = [
            run(100.0, 9.0, Some(3.0)),
            run(300.0, 1.0, Some(1.0)),
            run(200.0, 5.0, Some(2.0)),
        ];
        let median = median(&runs);
        assert_eq!(median.requests_per_second, 200.0);
        assert_eq!(median.p99_ms, 5.0);
        assert_eq!(median.cpu_per_request_us, Some(2.0));
        assert_eq!(
            super::median(&[run(1.0, 1.0, None)]).cpu_per_request_us,
            None
        );
    }

    #[test]
    fn failed_requests_fail_the_run() {
        let failed = OUTPUT.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 12\nRequests/sec",
        );
        assert!(parse_wrk(&failed).is_err());
        assert_eq!(milliseconds("2.00s").unwrap(), 2000.0);
        assert!(milliseconds("3m").is_err());
    }
}
