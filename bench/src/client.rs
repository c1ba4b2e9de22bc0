//! A minimal IMAP client: just enough to log in, select, fetch and log out, and to fail loudly on
//! any answer that is not the expected one.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Read buffer of a client connection (bulk FETCH literals are drained through it).
const READ_BUFFER: usize = 64 * 1024;

/// One IMAP connection to `127.0.0.1:port`.
pub struct Client {
    stream: BufReader<TcpStream>,
    line: Vec<u8>,
}

impl Client {
    /// Connects and reads the `* OK` greeting.
    pub async fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await
            .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
        stream.set_nodelay(true)?;
        let mut client = Self {
            stream: BufReader::with_capacity(READ_BUFFER, stream),
            line: Vec::with_capacity(256),
        };
        client.read_line().await?;
        ensure!(
            client.line.starts_with(b"* OK"),
            "the greeting is not * OK: {}",
            client.shown()
        );
        Ok(client)
    }

    /// Connects and logs in.
    pub async fn logged_in(port: u16, user: &str, password: &str) -> anyhow::Result<Self> {
        let mut client = Self::connect(port).await?;
        client
            .command("a", &format!("LOGIN \"{user}\" \"{password}\""))
            .await
            .with_context(|| format!("LOGIN {user}"))?;
        Ok(client)
    }

    /// Sends `tag command` and reads up to its tagged answer, which must be OK.
    pub async fn command(&mut self, tag: &str, command: &str) -> anyhow::Result<()> {
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        self.tagged_ok(tag).await
    }

    /// Logs out: the tagged OK of LOGOUT must arrive.
    pub async fn logout(mut self) -> anyhow::Result<()> {
        self.command("z", "LOGOUT").await
    }

    /// APPENDs one message with a synchronizing literal.
    pub async fn append(&mut self, mailbox: &str, message: &[u8]) -> anyhow::Result<()> {
        self.send(format!("p APPEND {mailbox} {{{}}}\r\n", message.len()).as_bytes())
            .await?;
        self.read_line().await?;
        ensure!(
            self.line.starts_with(b"+"),
            "APPEND got no continuation: {}",
            self.shown()
        );
        self.send(message).await?;
        self.send(b"\r\n").await?;
        self.tagged_ok("p").await
    }

    /// `FETCH 1:count BODY.PEEK[]`: checks that `count` literals of `size` bytes each arrive,
    /// and returns the number of literal bytes read.
    pub async fn fetch_all(&mut self, count: usize, size: u64) -> anyhow::Result<u64> {
        self.send(format!("f FETCH 1:{count} BODY.PEEK[]\r\n").as_bytes())
            .await?;
        let mut literals = 0;
        let mut bytes = 0;
        loop {
            self.read_line().await?;
            if self.line.starts_with(b"f ") {
                ensure!(
                    self.line.starts_with(b"f OK"),
                    "FETCH failed: {}",
                    self.shown()
                );
                ensure!(
                    literals == count,
                    "FETCH returned {literals} messages, not {count}"
                );
                return Ok(bytes);
            }
            let Some(length) = literal_length(&self.line) else {
                continue;
            };
            ensure!(
                length == size,
                "a message of {length} bytes, not {size}: {}",
                self.shown()
            );
            let drained =
                tokio::io::copy_buf(&mut (&mut self.stream).take(length), &mut tokio::io::sink())
                    .await?;
            ensure!(drained == length, "the connection ended inside a literal");
            bytes += length;
            literals += 1;
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.get_mut().write_all(bytes).await?;
        Ok(())
    }

    /// Reads lines up to the one tagged `tag`, which must say OK.
    async fn tagged_ok(&mut self, tag: &str) -> anyhow::Result<()> {
        loop {
            self.read_line().await?;
            let line = &self.line;
            if line.len() > tag.len() && line.starts_with(tag.as_bytes()) && line[tag.len()] == b' '
            {
                if line[tag.len() + 1..].starts_with(b"OK") {
                    return Ok(());
                }
                bail!("{}", self.shown());
            }
        }
    }

    async fn read_line(&mut self) -> anyhow::Result<()> {
        self.line.clear();
        let read = self.stream.read_until(b'\n', &mut self.line).await?;
        if read == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }

    fn shown(&self) -> String {
        String::from_utf8_lossy(&self.line).trim_end().to_string()
    }
}

/// The length of the literal that ends `line` (`... {1234}\r\n`).
pub fn literal_length(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|&byte| byte == b'{')?;
    let digits = &line[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::literal_length;

    #[test]
    fn literals_are_found_at_the_end_of_a_line() {
        assert_eq!(
            literal_length(b"* 1 FETCH (BODY[] {1048576}\r\n"),
            Some(1048576)
        );
        assert_eq!(literal_length(b"a LOGIN {5+}\r\n"), Some(5));
        assert_eq!(literal_length(b"a LOGIN user pass\r\n"), None);
        assert_eq!(literal_length(b"a LOGIN {x}\r\n"), None);
    }
}
