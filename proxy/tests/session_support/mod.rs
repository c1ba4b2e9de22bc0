//! Shared by the session tests: a test PKI, the `mailproxy serve` binary started on free ports,
//! the Python mail client, and a raw line client.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailproxy_crds::proxy_config::ListenerProtocol;
use mailproxy_testkit::free_port;
use tempfile::TempDir;

/// The address the Python client connects from: not the proxy's, so that a mailbox server's
/// `rip=` proves the proxy forwarded the client's address.
pub const CLIENT_IP: &str = "127.0.0.7";

pub use mailproxy_testkit::{Pki, replace};

/// The listeners a test proxy gets.
pub const ALL_LISTENERS: [ListenerProtocol; 5] = [
    ListenerProtocol::Imap,
    ListenerProtocol::Imaps,
    ListenerProtocol::Pop3,
    ListenerProtocol::Pop3s,
    ListenerProtocol::Http,
];

fn protocol_name(protocol: ListenerProtocol) -> &'static str {
    match protocol {
        ListenerProtocol::Imap => "imap",
        ListenerProtocol::Imaps => "imaps",
        ListenerProtocol::Pop3 => "pop3",
        ListenerProtocol::Pop3s => "pop3s",
        ListenerProtocol::Http => "http",
        ListenerProtocol::Https => "https",
    }
}

/// The `http.maxHeaderBytes` of [`ProxyProcess`]'s configuration (the default is 64 KiB).
pub const HTTP_MAX_HEADER_BYTES: usize = 4096;

/// `mailproxy serve` as a user runs it: a config file, a route-table file, stderr captured.
pub struct ProxyProcess {
    child: Child,
    pub dir: TempDir,
    pub ports: BTreeMap<&'static str, u16>,
    pub health: u16,
}

impl ProxyProcess {
    /// Starts the binary with a route table and TLS from `pki`; `rust_log` sets `RUST_LOG`.
    pub fn start(routes: &str, pki: &Pki, rust_log: &str) -> Self {
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start(routes, pki, rust_log) {
                Ok(proxy) => return proxy,
                Err(error) => last_error = error,
            }
        }
        panic!("mailproxy serve did not start: {last_error}");
    }

    fn try_start(routes: &str, pki: &Pki, rust_log: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("temporary directory");
        // A directory of its own: the table's watch wakes on every change in its directory,
        // and the proxy's log is written next door.
        std::fs::create_dir(dir.path().join("routes")).expect("routes directory");
        let routes_path = dir.path().join("routes/routes.json");
        replace(&routes_path, routes);
        let mut ports = BTreeMap::new();
        let mut listeners = String::new();
        for protocol in ALL_LISTENERS {
            let port = free_port();
            ports.insert(protocol_name(protocol), port);
            listeners.push_str(&format!(
                "  - {{protocol: {}, address: '127.0.0.1:{port}'}}\n",
                protocol_name(protocol)
            ));
        }
        let health = free_port();
        let config = format!(
            "listeners:\n{listeners}tls:\n  certificates:\n    - {{cert: '{}', key: '{}'}}\n\
             routeTable: {{file: '{}'}}\nhealthListen: '127.0.0.1:{health}'\n\
             upstreamTls: {{caFile: '{}'}}\nshutdownGraceSeconds: 5\n\
             http: {{maxHeaderBytes: {HTTP_MAX_HEADER_BYTES}}}\n",
            pki.cert().display(),
            pki.key().display(),
            routes_path.display(),
            pki.ca().display(),
        );
        let config_path = dir.path().join("config.yaml");
        replace(&config_path, &config);
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_mailproxy"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the mailproxy binary starts");
        let mut proxy = Self {
            child,
            dir,
            ports,
            health,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                return Err(format!("exited with {status}: {}", proxy.stderr()));
            }
            if http_get(health, "/readyz").is_some_and(|answer| answer.starts_with("HTTP/1.1 200"))
            {
                return Ok(proxy);
            }
            if Instant::now() > deadline {
                return Err(format!("not ready in time: {}", proxy.stderr()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self, protocol: &str) -> u16 {
        self.ports[protocol]
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn routes_path(&self) -> PathBuf {
        self.dir.path().join("routes/routes.json")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the proxy process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the proxy process is running");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub fn metrics(&self) -> String {
        http_get(self.health, "/metrics").unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on the loopback, whole answer as text.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// Result of a Python client run.
#[derive(Debug)]
pub struct ClientRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `tests/mail_client.py` with these arguments (a real client: imaplib / poplib).
pub async fn python(args: &[&str]) -> ClientRun {
    let output = tokio::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mail_client.py"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("python3 runs");
    ClientRun {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A blocking line client with a read timeout.
pub struct Raw {
    pub reader: BufReader<TcpStream>,
}

impl Raw {
    pub fn connect(port: u16) -> Self {
        Self::connect_to(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    pub fn connect_to(address: SocketAddr) -> Self {
        let stream = TcpStream::connect(address).expect("connect to the proxy");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        Self {
            reader: BufReader::new(stream),
        }
    }

    pub fn send(&mut self, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
        self.reader.get_mut().write_all(bytes.as_ref())
    }

    /// One line without its CRLF; `None` at the end of the stream or on an error.
    pub fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_string()),
        }
    }

    /// Reads until the peer closes; returns everything read. Panics if it does not close.
    pub fn until_closed(&mut self) -> String {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => String::from_utf8_lossy(&rest).into_owned(),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                String::from_utf8_lossy(&rest).into_owned()
            }
            Err(error) => panic!("the proxy did not close the connection: {error}"),
        }
    }
}

/// A lightweight IMAP backend: greets with LITERAL+, answers every command OK (a final LOGIN
/// line of `wrong` gets NO), LOGOUT with BYE. Dovecot starts a process per session; this lets
/// a test hold a thousand sessions open and measure the proxy alone.
pub struct FakeImap {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl FakeImap {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the fake backend");
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(fake_imap_session(stream));
            }
        });
        Self { port, task }
    }
}

impl Drop for FakeImap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_imap_session(stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::with_capacity(512, read).lines();
    if write
        .write_all(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID AUTH=PLAIN] fake ready\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut tag: Option<String> = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let command_tag = tag
            .take()
            .unwrap_or_else(|| line.split(' ').next().unwrap_or("*").to_string());
        if line.ends_with("+}") {
            tag = Some(command_tag);
            continue;
        }
        let answer = if line == "wrong" {
            format!("{command_tag} NO [AUTHENTICATIONFAILED] bad password\r\n")
        } else if line.to_ascii_uppercase().ends_with(" LOGOUT") {
            format!("* BYE fake\r\n{command_tag} OK LOGOUT done\r\n")
        } else {
            format!("{command_tag} OK done\r\n")
        };
        if write.write_all(answer.as_bytes()).await.is_err() || answer.contains("BYE") {
            return;
        }
    }
}
