//! A minimal blocking line client for test conversations with IMAP, POP3 and memcached servers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};

/// A CRLF line conversation over TCP, with a read timeout so a silent server fails the test
/// instead of hanging it.
pub struct LineClient {
    reader: BufReader<TcpStream>,
}

impl LineClient {
    pub fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) -> anyhow::Result<()> {
        self.reader.get_mut().write_all(bytes.as_ref())?;
        Ok(())
    }

    /// Reads one line, without its CRLF.
    pub fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the server closed the connection");
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    /// Reads exactly `n` bytes (a literal or a memcached value).
    pub fn bytes(&mut self, n: usize) -> anyhow::Result<Vec<u8>> {
        let mut buf = vec![0; n];
        self.reader.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Reads lines up to and including the one that starts with `prefix`; returns them all.
    pub fn until(&mut self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let line = self.line()?;
            let done = line.starts_with(prefix);
            lines.push(line);
            if done {
                return Ok(lines);
            }
        }
    }

    /// Sends an IMAP command and returns its responses up to the tagged one, which must be OK.
    pub fn imap_ok(&mut self, tag: &str, command: &str) -> anyhow::Result<Vec<String>> {
        self.send(format!("{tag} {command}\r\n"))?;
        let lines = self.until(&format!("{tag} "))?;
        let last = lines.last().expect("until returns at least one line");
        if !last.starts_with(&format!("{tag} OK")) {
            bail!("{command:?} failed: {lines:?}");
        }
        Ok(lines)
    }

    /// Sends a POP3 command and returns its status line, which must be +OK.
    pub fn pop3_ok(&mut self, command: &str) -> anyhow::Result<String> {
        self.send(format!("{command}\r\n"))?;
        let line = self.line()?;
        if !line.starts_with("+OK") {
            bail!("{command:?} failed: {line}");
        }
        Ok(line)
    }
}
