//! A real memcached on a free loopback port.

use std::process::Command;
use std::time::Duration;

use anyhow::bail;
use tempfile::TempDir;

use crate::process::{Guard, free_port, running_as_root, spawn, start_with_retry, wait_for_port};

/// A memcached server (TCP only) that stops when dropped.
#[derive(Debug)]
pub struct Memcached {
    port: u16,
    child: Guard,
    _dir: TempDir,
}

impl Memcached {
    pub fn start() -> anyhow::Result<Self> {
        start_with_retry("memcached", Self::start_once)
    }

    fn start_once() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let mut command = Command::new("memcached");
        command.args([
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-m",
            "64",
        ]);
        if running_as_root() {
            command.args(["-u", "nobody"]);
        }
        let log = dir.path().join("memcached.log");
        let mut child = Guard(Some(spawn(command, "memcached", &log)?));
        if let Err(error) = wait_for_port(port, Duration::from_secs(10)) {
            let exited = child.exited();
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("memcached on port {port} not ready (exited: {exited}): {error}; log: {output}");
        }
        // The port answering is not proof enough: another test's server may have taken the port
        // between free_port and memcached's bind. Only our memcached answers `version`.
        let version = crate::wire::LineClient::connect(port).and_then(|mut client| {
            client.send("version\r\n")?;
            client.line()
        });
        match version {
            Ok(line) if line.starts_with("VERSION ") && !child.exited() => {}
            other => bail!("port {port} is not our memcached: {other:?}"),
        }
        Ok(Self {
            port,
            child,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, the form the route table's memcached server list uses.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the server now (tests of memcached going away mid-run).
    pub fn kill(&mut self) {
        self.child.kill();
    }
}
