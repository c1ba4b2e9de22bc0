//! The Prometheus `/metrics` endpoint of a subcommand.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;

/// Serves `GET /metrics` (and `/healthz`) on `address` in the background.
pub async fn serve(address: SocketAddr, registry: Registry) -> anyhow::Result<()> {
    let listener = mailproxy::listen::bind(&address.to_string())
        .await
        .context("the metrics endpoint cannot start")?;
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
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
                            "/healthz" => {
                                Response::builder().body(Full::new(Bytes::from_static(b"ok\n")))
                            }
                            _ => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"not found\n"))),
                        };
                        Ok::<_, hyper::http::Error>(
                            response.expect("static response parts are valid"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}
