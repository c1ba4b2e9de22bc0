//! Shared by the lookup tests: real `mailproxy lookupd` instances on loopback listeners, fed by
//! route-table and directory files in a temporary directory.
//!
//! Each test binary that includes this module uses a different part of it.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mailproxy::lookupd::{Lookupd, LookupdConfig};
use mailproxy::route::{LoginContext, Protocol};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Two servers and a draining one; `pinned@example.com` and domain `example.org` pinned.
pub const TABLE: &str = r#"{
    "servers": {
        "mbs-1": {"host": "127.0.0.1", "ports": {"imap": 1143, "pop3": 1110, "imaps": 1993}},
        "mbs-2": {"host": "localhost", "ports": {"imap": 2143, "pop3": 2110}},
        "old": {"host": "127.0.0.9", "draining": true}
    },
    "accounts": {"pinned@example.com": "mbs-2"},
    "domains": {"example.org": "mbs-2"}
}"#;

pub const DIRECTORY: &str = "default-domain example.com\n\
                             account alice mbs-1\n\
                             account bob@example.com mbs-2\n\
                             account pinned mbs-1\n\
                             account leaving old\n\
                             alias al alice\n";

/// The route table and directory files of one test.
pub struct Files {
    dir: TempDir,
}

impl Files {
    pub fn new(table: &str, directory: &str) -> Self {
        let files = Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        files.write_table(table);
        files.write_directory(directory);
        files
    }

    pub fn table(&self) -> PathBuf {
        self.dir.path().join("routes.json")
    }

    pub fn directory(&self) -> PathBuf {
        self.dir.path().join("directory.txt")
    }

    /// Written to a temporary name and renamed, as Kubernetes and editors do, so that a poll
    /// never sees half a file.
    pub fn write_table(&self, text: &str) {
        self.replace(self.table(), text);
    }

    pub fn write_directory(&self, text: &str) {
        self.replace(self.directory(), text);
    }

    /// Writes the shared secret file and returns its path.
    pub fn write_secret(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("secret");
        self.replace(path.clone(), text);
        path
    }

    fn replace(&self, path: PathBuf, text: &str) {
        let temporary = path.with_extension("new");
        std::fs::write(&temporary, text).expect("write test file");
        std::fs::rename(&temporary, &path).expect("rename test file");
    }

    /// A lookupd config over these files, polling them every 50 ms.
    pub fn config(&self) -> LookupdConfig {
        let mut config = LookupdConfig::new(self.table());
        config.directory = Some(self.directory());
        config.reload_interval = Duration::from_millis(50);
        config
    }
}

/// A lookupd serving on `127.0.0.1:<free port>` until dropped.
pub struct RunningLookupd {
    pub lookupd: Lookupd,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningLookupd {
    pub async fn start(config: LookupdConfig) -> Self {
        let lookupd = Lookupd::new(config).expect("lookupd loads its files");
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("listener address");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = lookupd.clone();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            lookupd,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The handler URL, Zimbra's path on this server.
    pub fn url(&self) -> String {
        format!(
            "http://{}{}",
            self.addr,
            mailproxy_crds::route_table::LOOKUP_PATH
        )
    }

    /// Stops the server and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("lookupd task")
                .expect("lookupd serve ends cleanly");
        }
    }
}

impl Drop for RunningLookupd {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A mail login from 203.0.113.7 through a proxy at 10.1.2.3.
pub fn login(user: &str, protocol: Protocol) -> LoginContext {
    LoginContext {
        user: user.to_string(),
        protocol,
        client_ip: IpAddr::from([203, 0, 113, 7]),
        proxy_ip: Some(IpAddr::from([10, 1, 2, 3])),
        virtual_host: None,
        attempt: 1,
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `deadline` with `what`.
pub async fn eventually<T>(
    what: &str,
    deadline: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "{what}: not seen within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
