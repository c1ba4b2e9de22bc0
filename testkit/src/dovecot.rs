//! A real Dovecot IMAP and POP3 mailbox backend on free loopback ports.
//!
//! Any user logs in with the one configured password (static passdb); mail is kept in maildirs
//! under the server's temporary directory. The proxy's loopback address is a trusted network,
//! so Dovecot honours `ID ("X-ORIGINATING-IP" ...)` and `XOIP` and logs the client's address as
//! `rip=`. Two more listeners take a PROXY protocol header first (`haproxy = yes`, from loopback
//! peers), for proxies that forward the client's address that way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::process::{Guard, free_port, spawn, start_with_retry, wait_for_port, world_traversable};

/// How to start a [`Dovecot`].
#[derive(Clone, Debug)]
pub struct DovecotOptions {
    /// The password every user logs in with.
    pub password: String,
    /// PEM certificate and key: when set, IMAPS and POP3S listeners are started too.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for DovecotOptions {
    fn default() -> Self {
        Self {
            password: "secret".to_string(),
            tls: None,
        }
    }
}

/// Ports of a running Dovecot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DovecotPorts {
    pub imap: u16,
    pub pop3: u16,
    /// Only when started with TLS.
    pub imaps: Option<u16>,
    pub pop3s: Option<u16>,
    /// Plain IMAP and POP3 that expect a PROXY protocol (v1 or v2) header first.
    pub imap_haproxy: u16,
    pub pop3_haproxy: u16,
}

/// A Dovecot server that stops when dropped.
#[derive(Debug)]
pub struct Dovecot {
    ports: DovecotPorts,
    password: String,
    child: Guard,
    dir: TempDir,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl Dovecot {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(DovecotOptions::default())
    }

    pub fn start_with(options: DovecotOptions) -> anyhow::Result<Self> {
        start_with_retry("dovecot", || Self::start_once(&options))
    }

    fn start_once(options: &DovecotOptions) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        world_traversable(dir.path())?;
        let mail = dir.path().join("mail");
        std::fs::create_dir(&mail)?;
        let status = Command::new("chown")
            .args(["dovecot:dovecot", &mail.to_string_lossy()])
            .status()
            .context("cannot run chown")?;
        if !status.success() {
            bail!(
                "cannot give {} to the dovecot user: is dovecot-imapd installed?",
                mail.display()
            );
        }
        let ports = DovecotPorts {
            imap: free_port(),
            pop3: free_port(),
            imaps: options.tls.as_ref().map(|_| free_port()),
            pop3s: options.tls.as_ref().map(|_| free_port()),
            imap_haproxy: free_port(),
            pop3_haproxy: free_port(),
        };
        let config = dir.path().join("dovecot.conf");
        std::fs::write(&config, render_config(dir.path(), &ports, options))?;
        let log = dir.path().join("dovecot.out");
        let mut command = Command::new("dovecot");
        command.arg("-F").arg("-c").arg(&config);
        let mut child = Guard(Some(spawn(
            command,
            "dovecot-imapd and dovecot-pop3d",
            &log,
        )?));
        let all_ports = [
            Some(ports.imap),
            Some(ports.pop3),
            ports.imaps,
            ports.pop3s,
            Some(ports.imap_haproxy),
            Some(ports.pop3_haproxy),
        ];
        for port in all_ports.into_iter().flatten() {
            if let Err(error) = wait_for_port(port, Duration::from_secs(15)) {
                let exited = child.exited();
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                let dovecot_log =
                    std::fs::read_to_string(dir.path().join("dovecot.log")).unwrap_or_default();
                bail!(
                    "dovecot not ready (exited: {exited}): {error}; output: {output}; log: {dovecot_log}"
                );
            }
        }
        if child.exited() {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("dovecot exited at start (a port taken by another server?): {output}");
        }
        Ok(Self {
            ports,
            password: options.password.clone(),
            child,
            dir,
        })
    }

    pub fn ports(&self) -> DovecotPorts {
        self.ports
    }

    pub fn imap_port(&self) -> u16 {
        self.ports.imap
    }

    pub fn pop3_port(&self) -> u16 {
        self.ports.pop3
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Dovecot's log (logins, with `rip=` the client address it believes in).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// The maildir of a user (`<dir>/mail/<user>`).
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.path().join("mail").join(user)
    }

    /// Stops the server now.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

fn render_config(dir: &Path, ports: &DovecotPorts, options: &DovecotOptions) -> String {
    let instance = format!(
        "mailproxy-test-{}-{}",
        std::process::id(),
        INSTANCE.fetch_add(1, Ordering::Relaxed)
    );
    let dir = dir.display();
    let (ssl, imaps, pop3s) = match (&options.tls, ports.imaps, ports.pop3s) {
        (Some((cert, key)), Some(imaps), Some(pop3s)) => (
            format!(
                "ssl = yes\nssl_cert = <{}\nssl_key = <{}\n",
                cert.display(),
                key.display()
            ),
            imaps,
            pop3s,
        ),
        _ => ("ssl = no\n".to_string(), 0, 0),
    };
    let password = options.password.replace(['\\', ' ', '\n'], "");
    format!(
        r#"instance_name = {instance}
base_dir = {dir}/run
state_dir = {dir}/state
listen = 127.0.0.1
protocols = imap pop3
{ssl}disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_chars =
auth_verbose = yes
first_valid_uid = 1
first_valid_gid = 1
login_trusted_networks = 127.0.0.0/8 ::1/128
haproxy_trusted_networks = 127.0.0.0/8 ::1/128
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{{session}}>
log_path = {dir}/dovecot.log
mail_location = maildir:{dir}/mail/%u
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = static
  args = password={password}
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={dir}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
  }}
  inet_listener imap_haproxy {{
    port = {imap_haproxy}
    haproxy = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = {pop3s}
  }}
  inet_listener pop3_haproxy {{
    port = {pop3_haproxy}
    haproxy = yes
  }}
}}
"#,
        imap = ports.imap,
        pop3 = ports.pop3,
        imap_haproxy = ports.imap_haproxy,
        pop3_haproxy = ports.pop3_haproxy,
    )
}
