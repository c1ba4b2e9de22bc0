//! A working local mailproxy fleet on this machine: memcached, two Dovecot mailbox servers,
//! `mailproxy lookupd` as the Route Lookup Handler and `mailproxy serve` in front, all on
//! loopback. Started by `scripts/quickstart.sh`; runs until Ctrl-C.
//!
//! The `mailproxy` binary is taken from `MAILPROXY_BIN`, else from beside this program (cargo
//! builds both into the same target directory).

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, bail};
use mailproxy_testkit::wire::LineClient;
use mailproxy_testkit::{Dovecot, Memcached, free_port, wait_for_port};

/// Stops the child when the fleet stops.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mailproxy_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MAILPROXY_BIN") {
        return Ok(path.into());
    }
    let beside = std::env::current_exe()?.with_file_name("mailproxy");
    if !beside.exists() {
        bail!(
            "{} not found: build it with `cargo build -p mailproxy` or set MAILPROXY_BIN",
            beside.display()
        );
    }
    Ok(beside)
}

fn port_from_env(name: &str, default: u16) -> anyhow::Result<u16> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("{name}={value} is not a port number")),
        Err(_) => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let mailproxy = mailproxy_binary()?;
    let imap_port = port_from_env("MAILPROXY_IMAP_PORT", 1143)?;
    let pop3_port = port_from_env("MAILPROXY_POP3_PORT", 1110)?;
    let dir = tempfile::tempdir()?;

    let memcached = Memcached::start()?;
    let mbs1 = Dovecot::start()?;
    let mbs2 = Dovecot::start()?;
    let lookupd_port = free_port();
    let health_port = free_port();

    let routes = dir.path().join("routes.json");
    std::fs::write(
        &routes,
        format!(
            r#"{{
  "servers": {{
    "mbs-1": {{"host": "127.0.0.1", "ports": {{"imap": {}, "pop3": {}}}}},
    "mbs-2": {{"host": "127.0.0.1", "ports": {{"imap": {}, "pop3": {}}}}}
  }},
  "domains": {{"example.com": "mbs-1"}},
  "lookupHandlers": ["http://127.0.0.1:{lookupd_port}/service/extension/nginx-lookup"],
  "memcachedServers": ["{}"],
  "settings": {{"starttls": "off"}}
}}
"#,
            mbs1.imap_port(),
            mbs1.pop3_port(),
            mbs2.imap_port(),
            mbs2.pop3_port(),
            memcached.addr(),
        ),
    )?;
    let directory = dir.path().join("directory.txt");
    std::fs::write(
        &directory,
        "default-domain example.com\naccount alice mbs-1\naccount bob mbs-2\n",
    )?;
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n\
             - {{protocol: imap, address: '127.0.0.1:{imap_port}'}}\n\
             - {{protocol: pop3, address: '127.0.0.1:{pop3_port}'}}\n\
             routeTable: {{file: '{}'}}\n\
             healthListen: '127.0.0.1:{health_port}'\n\
             shutdownGraceSeconds: 5\n",
            routes.display()
        ),
    )?;

    let _lookupd = Running(
        Command::new(&mailproxy)
            .args([
                "lookupd",
                "--listen",
                &format!("127.0.0.1:{lookupd_port}"),
                "--routes",
            ])
            .arg(&routes)
            .arg("--directory")
            .arg(&directory)
            .spawn()
            .context("cannot start mailproxy lookupd")?,
    );
    wait_for_port(lookupd_port, Duration::from_secs(10))?;
    let _proxy = Running(
        Command::new(&mailproxy)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .spawn()
            .context("cannot start mailproxy serve")?,
    );
    wait_for_port(imap_port, Duration::from_secs(10))
        .with_context(|| format!("mailproxy serve did not listen on {imap_port}"))?;

    let mut client = LineClient::connect(imap_port)?;
    client.line()?;
    client.imap_ok("a1", "LOGIN bob secret")?;
    client.imap_ok("a2", "LOGOUT")?;
    let landed = mbs2.log().contains("user=<bob@example.com>");

    println!(
        "\nmailproxy local fleet is up (files in {}):\n\
         \x20 IMAP  127.0.0.1:{imap_port}   POP3  127.0.0.1:{pop3_port}   metrics http://127.0.0.1:{health_port}/metrics\n\
         \x20 users alice (-> mbs-1) and bob (-> mbs-2) @example.com, any other @example.com -> mbs-1;\n\
         \x20 password: secret   route handler: mailproxy lookupd on 127.0.0.1:{lookupd_port}   memcached: {}\n\
         \x20 self-check: bob logged in through the proxy and landed on mbs-2: {landed}\n\
         \x20 try: python3 -c \"import imaplib; c=imaplib.IMAP4('127.0.0.1', {imap_port}); print(c.login('alice', 'secret'))\"\n\
         Press Ctrl-C to stop.",
        dir.path().display(),
        memcached.addr(),
    );
    if !landed {
        bail!("the self-check login did not reach the expected mailbox server");
    }
    let (stop, stopped) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop.send(());
    })
    .context("cannot install the Ctrl-C handler")?;
    let _ = stopped.recv();
    println!("stopping the fleet");
    Ok(())
}
