//! The Prometheus `/metrics` endpoint of a subcommand.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpStream;

/// A request head must arrive within this, so that idle or slow clients do not hold
/// connections (and file descriptors) for ever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed accept: out of file descriptors, the next accept fails at once too.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `GET /metrics` (and `/healthz`) on `address` in the background.
pub async fn serve(address: SocketAddr, registry: Registry) -> anyhow::Result<()> {
    let listener = mailproxy::listen::bind(&address.to_string())
        .await
        .context("the metrics endpoint cannot start")?;
    let accept = async move || listener.accept().await.map(|(stream, _)| stream);
    tokio::spawn(accept_loop(accept, Arc::new(registry)));
    Ok(())
}

/// Serves every connection `accept` yields, for ever.
async fn accept_loop(
    mut accept: impl AsyncFnMut() -> io::Result<TcpStream>,
    registry: Arc<Registry>,
) {
    loop {
        match accept().await {
            Ok(stream) => {
                tokio::spawn(serve_connection(stream, registry.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "the metrics endpoint cannot accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, registry: Arc<Registry>) {
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let registry = registry.clone();
        async move {
            let response = match request.uri().path() {
                "/metrics" => {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(text))),
                        Err(_) => Response::builder()
                            .status(StatusCode::INTERNAL_SERVER_ERROR)
                            .body(Full::new(Bytes::from_static(b"metrics encoding failed\n"))),
                    }
                }
                "/healthz" => Response::builder().body(Full::new(Bytes::from_static(b"ok\n"))),
                _ => Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Full::new(Bytes::from_static(b"not found\n"))),
            };
            Ok::<_, hyper::http::Error>(response.expect("static response parts are valid"))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::time::Instant;

    use super::*;

    #[tokio::test]
    async fn a_client_that_never_finishes_its_request_head_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accept = async move || listener.accept().await.map(|(stream, _)| stream);
        tokio::spawn(accept_loop(accept, Arc::new(Registry::default())));
        let mut client = TcpStream::connect(address).await.unwrap();
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0; 12];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        // The bytes are in the server's socket: from here the clock jumps to the next timer.
        tokio::time::pause();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(
            HEADER_TIMEOUT + Duration::from_secs(50),
            client.read_to_end(&mut rest),
        )
        .await;
        assert!(
            closed.is_ok(),
            "the connection is still open a minute into its request head"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_pause_the_loop_instead_of_spinning() {
        let started = Instant::now();
        let (report, tenth) = tokio::sync::oneshot::channel();
        let mut report = Some(report);
        let mut failures = 0;
        let accept = async move || {
            failures += 1;
            if failures == 10 {
                let _ = report.take().map(|report| report.send(Instant::now()));
                std::future::pending::<()>().await;
            }
            Err(io::Error::from_raw_os_error(libc::EMFILE))
        };
        tokio::spawn(accept_loop(accept, Arc::new(Registry::default())));
        let tenth = tenth.await.unwrap();
        assert_eq!(tenth - started, 9 * ACCEPT_ERROR_PAUSE);
    }
}
