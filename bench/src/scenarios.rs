//! The three measurements, each against a proxy listening on a loopback port. Loops are bounded
//! by a duration; the first error ends the run with an error.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tokio::task::JoinSet;

use crate::client::Client;

/// The password every benchmark user logs in with (the backends accept it).
pub const PASSWORD: &str = "secret";

/// `clients` concurrent clients repeat connect, LOGIN, LOGOUT for `duration`. Returns successful
/// logins (tagged OK) per second. Client `i` logs in as `user<i>@example.com`.
pub async fn logins(port: u16, clients: usize, duration: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = JoinSet::new();
    for index in 0..clients {
        let user = format!("user{index}@example.com");
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < end {
                let client = Client::logged_in(port, &user, PASSWORD).await?;
                client.logout().await.context("LOGOUT")?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    let mut total = 0;
    while let Some(result) = tasks.join_next().await {
        total += result??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// `clients` logged-in clients SELECT INBOX then repeat `FETCH 1:messages BODY.PEEK[]` for
/// `duration`, checking every message's size. Returns MiB/s of message bytes received.
pub async fn fetch(
    port: u16,
    user: &str,
    clients: usize,
    messages: usize,
    size: u64,
    duration: Duration,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let user = user.to_string();
        tasks.spawn(async move {
            let mut client = Client::logged_in(port, &user, PASSWORD).await?;
            client.command("s", "SELECT INBOX").await?;
            let mut bytes = 0;
            while Instant::now() < end {
                bytes += client.fetch_all(messages, size).await?;
            }
            client.logout().await?;
            anyhow::Ok(bytes)
        });
    }
    let mut total = 0;
    while let Some(result) = tasks.join_next().await {
        total += result??;
    }
    Ok(total as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
}

/// Idle sessions the memory measurement holds by default. RSS grows in steps of up to 2 MiB (an
/// allocator that asks for transparent huge pages, as mimalloc does, gets them a huge page at a
/// time), so the figure per session is only as fine as 2 MiB over this: 0.5 KiB.
pub const IDLE_SESSIONS: usize = 4000;

/// Logins that the idle-session scenario runs at once.
const LOGIN_BATCH: usize = 100;

/// Opens `sessions` logged-in sessions ([`LOGIN_BATCH`] logins at a time), waits for the proxy
/// to settle and returns its RSS growth per session in bytes (processes in `pids` summed: an
/// nginx master and its workers). Every session then answers a NOOP before it is closed.
pub async fn idle(port: u16, sessions: usize, pids: &[u32]) -> anyhow::Result<f64> {
    // Warm-up: routes cached, buffers and allocator arenas in use before the baseline, and what
    // grows with the number of logins at once (a pool of connections to the route handler) at
    // the size the measured logins need.
    open(port, LOGIN_BATCH).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(pids)?;
    let mut open_sessions = open(port, sessions).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss(pids)?;
    for session in &mut open_sessions {
        session.command("n", "NOOP").await.context("NOOP")?;
    }
    Ok((after as f64 - before as f64) / sessions as f64)
}

async fn open(port: u16, sessions: usize) -> anyhow::Result<Vec<Client>> {
    let mut open = Vec::with_capacity(sessions);
    while open.len() < sessions {
        let batch = (sessions - open.len()).min(LOGIN_BATCH);
        let mut tasks = JoinSet::new();
        for index in open.len()..open.len() + batch {
            let user = format!("idle{index}@example.com");
            tasks.spawn(async move { Client::logged_in(port, &user, PASSWORD).await });
        }
        while let Some(result) = tasks.join_next().await {
            open.push(result??);
        }
    }
    Ok(open)
}

/// Sum of VmRSS (bytes) of `pids`.
pub fn rss(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
        total += kib * 1024;
    }
    Ok(total)
}

/// APPENDs `messages` messages of exactly `size` bytes to the INBOX of `user` (directly to the
/// mailbox server), then checks that the first `messages` messages are those.
pub async fn seed(port: u16, user: &str, messages: usize, size: usize) -> anyhow::Result<()> {
    let mut client = Client::logged_in(port, user, PASSWORD).await?;
    for number in 1..=messages {
        client.append("INBOX", &message(number, size)).await?;
    }
    client.command("s", "SELECT INBOX").await?;
    let stored = client.fetch_all(messages, size as u64).await;
    client.logout().await?;
    let stored = stored.context("the seeded INBOX does not hold exactly the appended messages")?;
    ensure!(stored == (messages * size) as u64);
    Ok(())
}

/// A message of exactly `size` bytes: headers, then 78-byte CRLF lines.
fn message(number: usize, size: usize) -> Vec<u8> {
    let mut message = format!(
        "From: bench@example.com\r\nTo: bench@example.com\r\nSubject: bench message {number}\r\n\r\n"
    )
    .into_bytes();
    let line = [b'x'; 76];
    while size - message.len() > 2 * (line.len() + 2) {
        message.extend_from_slice(&line);
        message.extend_from_slice(b"\r\n");
    }
    message.resize(size - 2, b'y');
    message.extend_from_slice(b"\r\n");
    message
}

#[cfg(test)]
mod tests {
    use super::message;

    #[test]
    fn messages_have_the_exact_size_and_crlf_lines() {
        let body = message(7, 1024 * 1024);
        assert_eq!(body.len(), 1024 * 1024);
        assert!(body.ends_with(b"\r\n"));
        assert!(!body.windows(2).any(|pair| pair == b"\r\r"));
    }
}
