//! Stock nginx (Debian's nginx-light with libnginx-mod-mail): the reference peer and benchmark
//! anchor.

use std::process::Command;
use std::time::Duration;

use anyhow::bail;
use tempfile::TempDir;

use crate::process::{Guard, spawn, wait_for_port, world_traversable};

const MAIL_MODULE: &str = "/usr/lib/nginx/modules/ngx_mail_module.so";

/// An nginx master process that stops when dropped.
#[derive(Debug)]
pub struct Nginx {
    child: Guard,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx with `body` (the `mail {}` and `http {}` blocks, listening on ports the
    /// caller chose with [`crate::free_port`]) after a generated header that loads the mail
    /// module and keeps pid, logs and temp files in a temporary directory. Returns once every
    /// port in `ports` accepts connections.
    pub fn start(body: &str, ports: &[u16]) -> anyhow::Result<Self> {
        if !std::path::Path::new(MAIL_MODULE).exists() {
            bail!("{MAIL_MODULE} is missing: install the Debian package libnginx-mod-mail");
        }
        let dir = tempfile::tempdir()?;
        world_traversable(dir.path())?;
        let d = dir.path().display();
        let config = format!(
            "load_module {MAIL_MODULE};\n\
             daemon off;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 16384; }}\n\
             {body}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config)?;
        let mut command = Command::new("nginx");
        command.arg("-p").arg(dir.path()).arg("-c").arg(&path);
        let log = dir.path().join("nginx.out");
        let mut child = Guard(Some(spawn(command, "nginx-light", &log)?));
        for &port in ports {
            if let Err(error) = wait_for_port(port, Duration::from_secs(10)) {
                let exited = child.exited();
                let errors =
                    std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                bail!(
                    "nginx not ready (exited: {exited}): {error}; output: {output}; error.log: {errors}"
                );
            }
        }
        if child.exited() {
            let errors = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            bail!("nginx exited at start (a port taken by another server?): {errors}");
        }
        Ok(Self { child, dir })
    }

    /// nginx's error log (mail proxy sessions are logged there at info level).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// The nginx master's process id (its worker holds the session memory).
    pub fn pid(&self) -> Option<u32> {
        self.child.0.as_ref().map(|child| child.id())
    }
}
