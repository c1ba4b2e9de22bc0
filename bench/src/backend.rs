//! A lightweight IMAP mailbox server for the benchmarks: it answers CAPABILITY, ID, LOGIN
//! (quoted strings or literals, LITERAL+ too), AUTHENTICATE PLAIN, NOOP and LOGOUT at once and
//! accepts any password, so that the proxy, not the backend, is measured. Every account's INBOX
//! holds the same messages, kept in memory: SELECT and `FETCH ... BODY.PEEK[]` (of the whole
//! mailbox, whatever the set) answer from them, so that a bulk transfer is limited by the proxy
//! rather than by a real server's disk and parsing.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::client::literal_length;

const CAPABILITIES: &str = "IMAP4rev1 LITERAL+ ID AUTH=PLAIN";
/// A command longer than this closes the connection.
const MAX_COMMAND: usize = 8 * 1024;

/// The INBOX of every account: `messages` copies of one message of `size` bytes.
#[derive(Clone, Copy, Debug)]
pub struct Inbox {
    pub messages: usize,
    pub size: usize,
}

/// Serves `127.0.0.1:port` until the process is stopped.
pub async fn serve(port: u16, inbox: Inbox) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    let message: Arc<[u8]> = vec![b'x'; inbox.size].into();
    loop {
        let (stream, _) = listener.accept().await?;
        let message = message.clone();
        tokio::spawn(async move {
            // A client that goes away mid-command is no error for the benchmark backend.
            let _ = session(stream, inbox.messages, &message).await;
        });
    }
}

async fn session(stream: TcpStream, messages: usize, message: &[u8]) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::with_capacity(4096, read);
    write
        .write_all(format!("* OK [CAPABILITY {CAPABILITIES}] bench backend ready\r\n").as_bytes())
        .await?;
    let mut command = Vec::with_capacity(256);
    loop {
        command.clear();
        if !read_command(&mut read, &mut write, &mut command).await? {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&command);
        let mut words = text.split_ascii_whitespace();
        let tag = words.next().unwrap_or("*");
        let name = words.next().unwrap_or("").to_ascii_uppercase();
        let answer = match name.as_str() {
            "CAPABILITY" => format!("* CAPABILITY {CAPABILITIES}\r\n{tag} OK done\r\n"),
            "ID" => format!("* ID NIL\r\n{tag} OK ID completed\r\n"),
            "LOGIN" => format!("{tag} OK [CAPABILITY {CAPABILITIES}] Logged in\r\n"),
            "AUTHENTICATE" => {
                // SASL-IR is not offered: the initial response comes after a continuation.
                write.write_all(b"+ \r\n").await?;
                let mut response = Vec::new();
                if read.read_until(b'\n', &mut response).await? == 0 {
                    return Ok(());
                }
                format!("{tag} OK [CAPABILITY {CAPABILITIES}] Logged in\r\n")
            }
            "NOOP" => format!("{tag} OK NOOP completed\r\n"),
            "SELECT" => format!(
                "* {messages} EXISTS\r\n* FLAGS ()\r\n{tag} OK [READ-WRITE] SELECT completed\r\n"
            ),
            "FETCH" => {
                for number in 1..=messages {
                    let head = format!("* {number} FETCH (BODY[] {{{}}}\r\n", message.len());
                    write.write_all(head.as_bytes()).await?;
                    write.write_all(message).await?;
                    write.write_all(b")\r\n").await?;
                }
                format!("{tag} OK FETCH completed\r\n")
            }
            "LOGOUT" => {
                let bye = format!("* BYE logging out\r\n{tag} OK Logout completed\r\n");
                write.write_all(bye.as_bytes()).await?;
                return Ok(());
            }
            _ => format!("{tag} BAD unknown command\r\n"),
        };
        write.write_all(answer.as_bytes()).await?;
    }
}

/// Reads one command, literals included (with a continuation for synchronizing ones). `false`
/// when the client has gone.
async fn read_command(
    read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    command: &mut Vec<u8>,
) -> std::io::Result<bool> {
    loop {
        let start = command.len();
        if read.read_until(b'\n', command).await? == 0 || command.len() > MAX_COMMAND {
            return Ok(false);
        }
        let Some(length) = literal_length(&command[start..]) else {
            return Ok(true);
        };
        let line = command[start..]
            .strip_suffix(b"\r\n")
            .unwrap_or(&command[start..]);
        if !line.ends_with(b"+}") {
            write.write_all(b"+ go ahead\r\n").await?;
        }
        if command.len() as u64 + length > MAX_COMMAND as u64 {
            return Ok(false);
        }
        let before = command.len();
        (&mut *read).take(length).read_to_end(command).await?;
        if ((command.len() - before) as u64) < length {
            return Ok(false);
        }
    }
}
