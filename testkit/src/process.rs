//! Child processes, free ports and readiness.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A loopback port that was free a moment ago (bind port 0, read it back). Ports handed out are
/// in the kernel's ephemeral range, so a later bind can race with another test: servers started
/// here retry with a new port when their bind fails.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding 127.0.0.1:0 must work on a test machine")
}

/// `N` distinct free ports: all are held at once while they are picked, since one port released
/// may be the next one the kernel hands out (two listeners of one configuration then collide).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [TcpListener; N] = std::array::from_fn(|_| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("binding 127.0.0.1:0 must work on a test machine")
    });
    listeners.map(|listener| {
        listener
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    })
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`, or fails after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing accepted connections on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `program` with its output appended to `log`, with an error that names the Debian
/// package when the program is missing.
pub(crate) fn spawn(mut command: Command, package: &str, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| {
            format!("cannot start {program}: install the Debian package {package} (scripts/test.sh does)")
        })
}

/// A child process killed and reaped on drop.
#[derive(Debug)]
pub struct Guard(pub Option<Child>);

impl Guard {
    /// SIGTERM first, so that servers such as Dovecot stop their children too; SIGKILL if the
    /// child has not exited within five seconds.
    pub fn kill(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Whether the child has exited already (a failed start).
    pub fn exited(&mut self) -> bool {
        match self.0.as_mut() {
            Some(child) => child.try_wait().map(|s| s.is_some()).unwrap_or(true),
            None => true,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether this process runs as root (servers such as memcached then need an explicit user).
pub(crate) fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| out.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

/// Makes a temporary directory traversable by the unprivileged users that servers drop to.
pub(crate) fn world_traversable(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", dir.display()))
}

/// Starts a server on fresh ports, retrying a few times when another process took a port between
/// `free_port` and the server's bind.
pub(crate) fn start_with_retry<T>(
    what: &str,
    mut attempt: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut last = None;
    for _ in 0..3 {
        match attempt() {
            Ok(server) => return Ok(server),
            Err(error) => last = Some(error),
        }
    }
    Err(last.expect("three attempts ran")).with_context(|| format!("{what} did not start"))
}
