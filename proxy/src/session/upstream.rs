//! The proxy's side of a mailbox server connection until the login is answered: the route,
//! the connection (PROXY header, TLS), and line-by-line reading of the server's answers.

use std::net::SocketAddr;

use mailproxy_crds::mailbox_server::{MailUpstream, OriginForwarding};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::SessionContext;
use super::proxy_protocol;
use super::stream::Stream;
use crate::route::resolver::{ResolveError, Resolved};
use crate::route::{LoginContext, Protocol, Route};

/// Longest line accepted from a mailbox server before the login is answered (capability lists
/// are the long ones, well under this).
const MAX_LINE: usize = 64 * 1024;

/// Read size while waiting for the server's answers.
const READ_CHUNK: usize = 4096;

/// Where a login goes and how to talk to that server.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) resolved: Resolved,
    /// The login as resolved: its protocol is the one the connection uses (`imapssl` when the
    /// server wants TLS), which is also the cache key a failed login must forget.
    pub(crate) login: LoginContext,
    /// When the server wants TLS: the plain protocol and the route it resolved to, which said
    /// so. Its cache entry is forgotten with the other one, or a stale route there would keep
    /// deciding TLS for the account.
    plain: Option<(Protocol, Route)>,
    pub(crate) mail: MailUpstream,
}

impl Target {
    pub(crate) fn tls(&self) -> bool {
        self.plain.is_some()
    }

    /// Forgets every cached route the login was resolved through, after it failed upstream.
    pub(crate) async fn forget(&self, context: &SessionContext) {
        let resolver = &context.resolver;
        resolver.forget(&self.login, &self.resolved.route).await;
        if let Some((protocol, route)) = &self.plain {
            let login = LoginContext {
                protocol: *protocol,
                ..self.login.clone()
            };
            resolver.forget(&login, route).await;
        }
    }
}

/// Finds the route of `login` (resolved with its plain protocol) and decides TLS from the
/// server the route leads to. A server that wants TLS is resolved again with `ssl_protocol`, so
/// that the port is its IMAPS/POP3S port and the route is cached and purged under Zimbra's
/// `imapssl`/`pop3ssl` keys; how to talk to the server (origin, errors) then comes from that
/// second answer, the server actually dialled. A server the table does not know is reached as
/// Zimbra would: in plain text, with the client's address sent by ID/XOIP.
pub(crate) async fn route(
    context: &SessionContext,
    login: LoginContext,
    ssl_protocol: Protocol,
) -> Result<Target, ResolveError> {
    let resolver = &context.resolver;
    let resolved = resolver.resolve(&login).await?;
    let mail = server_settings(context, &resolved);
    if !mail.tls {
        return Ok(Target {
            resolved,
            login,
            plain: None,
            mail,
        });
    }
    let plain_protocol = login.protocol;
    let ssl_login = LoginContext {
        protocol: ssl_protocol,
        ..login
    };
    let ssl_resolved = resolver.resolve(&ssl_login).await?;
    let mail = server_settings(context, &ssl_resolved);
    Ok(Target {
        resolved: ssl_resolved,
        login: ssl_login,
        plain: Some((plain_protocol, resolved.route)),
        mail,
    })
}

fn server_settings(context: &SessionContext, resolved: &Resolved) -> MailUpstream {
    let table = context.resolver.table().current();
    resolved
        .server
        .as_ref()
        .and_then(|name| table.servers.get(name))
        .map(|server| server.mail_upstream.clone())
        .unwrap_or_default()
}

/// Why an upstream login could not be completed. None of the variants carries what was sent,
/// so none can carry a password.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("cannot connect to {upstream}: {source}")]
    Connect {
        upstream: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {upstream} failed: {source}")]
    Tls {
        upstream: String,
        source: std::io::Error,
    },
    #[error("connection to the mailbox server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the mailbox server closed the connection")]
    Closed,
    #[error("the mailbox server sent a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("unexpected answer from the mailbox server: {0}")]
    Protocol(&'static str),
    #[error("the mailbox server did not answer the login in time")]
    Timeout,
}

impl UpstreamError {
    /// The `reason` label of `mailproxy_upstream_failures_total`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Tls { .. } => "tls",
            UpstreamError::Io(_) | UpstreamError::Closed => "io",
            UpstreamError::LineTooLong | UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Timeout => "timeout",
        }
    }
}

/// A connection to a mailbox server, read line by line until the login is answered.
pub(crate) struct UpstreamConnection {
    stream: Stream,
    buffer: Vec<u8>,
}

impl UpstreamConnection {
    /// Connects to the target, sends the PROXY header first when the server takes one, and
    /// starts TLS when it wants it. `client` and `local` are the client connection's addresses.
    pub(crate) async fn open(
        context: &SessionContext,
        target: &Target,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<Self, UpstreamError> {
        let upstream = &target.resolved.route.upstream;
        let mut tcp = context
            .dns
            .connect(&upstream.host, upstream.port)
            .await
            .map_err(|source| UpstreamError::Connect {
                upstream: upstream.to_string(),
                source,
            })?;
        if target.mail.origin == OriginForwarding::ProxyProtocol {
            tcp.write_all(&proxy_protocol::header(client, local))
                .await?;
        }
        let stream = if target.tls() {
            let tls = context
                .upstream_tls
                .connect(&upstream.host, tcp)
                .await
                .map_err(|source| UpstreamError::Tls {
                    upstream: upstream.to_string(),
                    source,
                })?;
            Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls)))
        } else {
            Stream::Plain(tcp)
        };
        Ok(Self {
            stream,
            buffer: Vec::new(),
        })
    }

    /// The next line, without its line end.
    pub(crate) async fn line(&mut self) -> Result<Vec<u8>, UpstreamError> {
        loop {
            if let Some(lf) = self.buffer.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=lf).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buffer.len() >= MAX_LINE {
                return Err(UpstreamError::LineTooLong);
            }
            self.buffer.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return Err(UpstreamError::Closed);
            }
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The connection for the relay, with what the server sent after its last answered line
    /// (to be passed on to the client first).
    pub(crate) fn into_parts(self) -> (Stream, Vec<u8>) {
        (self.stream, self.buffer)
    }
}
