//! Connections to the web backends: plain TCP, or TLS when the pool sets `webUpstreamTls`
//! (Zimbra's `zimbraReverseProxySSLToUpstreamEnabled`).
//!
//! [`WebConnector`] serves both ways the web proxy reaches a backend: the own connection of an
//! HTTP/1 client connection ([`WebConnector::connect`]) and hyper-util's pooled client (as a
//! tower `Service<Uri>`: TLS for `https` URIs). It stands in for hyper-rustls under the pool so
//! that both ways trust the same roots and fail the same way: the pool's errors keep a
//! [`ConnectError`], and a certificate problem is not mistaken for a backend that is down.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::Scheme;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio_rustls::{TlsConnector, TlsStream};

use crate::dns::Dns;
use crate::route::Upstream;
use crate::session::stream::Stream;
use crate::tls::TlsError;

/// Opens connections to web backends, in TLS when asked, verifying the backend's certificate
/// against the system's CAs and `http.upstreamCaFile`. Cheap to clone.
#[derive(Clone)]
pub struct WebConnector {
    tls: TlsConnector,
    connect_timeout: Duration,
    dns: Dns,
}

impl std::fmt::Debug for WebConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConnector")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Why no connection to a backend was opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {upstream}: {source}")]
    Connect { upstream: String, source: io::Error },
    #[error("{stage} {upstream} timed out after {timeout:?}")]
    Timeout {
        stage: &'static str,
        upstream: String,
        timeout: Duration,
    },
    /// The backend answered but its certificate (or TLS) was not acceptable.
    #[error(
        "TLS handshake with {upstream} failed: {source} (is its certificate issued for that \
         address by a CA in the system store or http.upstreamCaFile?)"
    )]
    Handshake { upstream: String, source: io::Error },
}

impl ConnectError {
    /// Whether the backend could not be reached at all: another backend may be tried and this
    /// one is skipped for a while. A failed handshake is a configuration problem instead, which
    /// another attempt would not fix.
    pub fn unreachable(&self) -> bool {
        !matches!(self, ConnectError::Handshake { .. })
    }
}

/// Whether an error (a pooled client's, through its sources) is a failed TLS handshake.
pub fn is_handshake_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(connect) = error.downcast_ref::<ConnectError>() {
            return !connect.unreachable();
        }
        current = error.source();
    }
    false
}

impl WebConnector {
    /// A connector trusting the system's CAs and those of `ca_file`; `connect_timeout` bounds the
    /// TCP connect and, separately, the TLS handshake; `dns` resolves backend host names.
    pub fn new(
        ca_file: Option<&Path>,
        connect_timeout: Duration,
        dns: Dns,
    ) -> Result<Self, TlsError> {
        let mut config = crate::tls::client_config(ca_file)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
            connect_timeout,
            dns,
        })
    }

    /// Connects to `upstream`, and handshakes TLS with it when `tls` (the certificate must name
    /// the upstream's host: its DNS name, or its IP address).
    pub async fn connect(&self, upstream: &Upstream, tls: bool) -> Result<Stream, ConnectError> {
        let timeout = self.connect_timeout;
        let connecting = self.dns.connect(&upstream.host, upstream.port);
        let tcp = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => {
                return Err(ConnectError::Connect {
                    upstream: upstream.to_string(),
                    source,
                });
            }
            Err(_) => {
                return Err(ConnectError::Timeout {
                    stage: "connecting to",
                    upstream: upstream.to_string(),
                    timeout,
                });
            }
        };
        if !tls {
            return Ok(Stream::Plain(tcp));
        }
        let handshake_error = |source| ConnectError::Handshake {
            upstream: upstream.to_string(),
            source,
        };
        let name = ServerName::try_from(upstream.host.clone()).map_err(|_| {
            handshake_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{:?} is not a valid TLS server name", upstream.host),
            ))
        })?;
        match tokio::time::timeout(timeout, self.tls.connect(name, tcp)).await {
            Ok(Ok(stream)) => Ok(Stream::Tls(Box::new(TlsStream::Client(stream)))),
            Ok(Err(source)) => Err(handshake_error(source)),
            Err(_) => Err(ConnectError::Timeout {
                stage: "the TLS handshake with",
                upstream: upstream.to_string(),
                timeout,
            }),
        }
    }
}

/// hyper-util's pooled client connects through this: `https` URIs get TLS.
impl tower_service::Service<Uri> for WebConnector {
    type Response = TokioIo<Stream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move {
            let tls = uri.scheme() == Some(&Scheme::HTTPS);
            let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
            let upstream: Upstream = format!("{}:{port}", uri.host().unwrap_or_default())
                .parse()
                .map_err(|error| ConnectError::Connect {
                    upstream: uri.to_string(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, error),
                })?;
            connector.connect(&upstream, tls).await.map(TokioIo::new)
        })
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}
