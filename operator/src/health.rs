//! The operator's HTTP endpoints: `/healthz` (the process serves), `/readyz` (it reached the API
//! server and the CRDs are installed) and `/metrics` (Prometheus text format).

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::Metrics;

/// Readiness shared between the operator and its HTTP endpoint.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Answers one request.
pub fn respond(path: &str, health: &Health, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok".to_string()),
        "/readyz" if health.is_ready() => (StatusCode::OK, "text/plain", "ok".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: the API server or the CRDs are not reachable yet".to_string(),
        ),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz or /metrics".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a response from static parts is valid")
}

/// Binds `addr` and serves until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let (listener, addr) = match TcpListener::bind(addr).await {
        // `[::]` serves both families (the kubelet probes the pod's IPv6 address in IPv6-only
        // clusters); a kernel without IPv6 gets IPv4 alone.
        Err(error)
            if addr.ip() == Ipv6Addr::UNSPECIFIED
                && matches!(
                    error.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
        {
            let ipv4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::info!(%error, %addr, "cannot listen on the IPv6 wildcard: trying IPv4 only");
            (TcpListener::bind(ipv4).await, ipv4)
        }
        bound => (bound, addr),
    };
    let listener = listener.map_err(|e| anyhow::anyhow!("cannot listen on {addr} for /healthz, /readyz and /metrics: {e} (choose another --http-addr)"))?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let health = health.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(request.uri().path(), &health, &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a kernel without IPv6 falls back to IPv4: a port in use is reported as it is, for
    /// the address asked for.
    #[tokio::test]
    async fn a_port_in_use_is_an_error_not_a_fallback() {
        let taken = std::net::TcpListener::bind("[::]:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let error = serve(addr, Arc::default(), Arc::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!("cannot listen on {addr} ")),
            "{error}"
        );
    }

    #[test]
    fn readyz_follows_readiness_and_metrics_are_served() {
        let health = Health::default();
        let metrics = Metrics::default();
        assert_eq!(
            respond("/healthz", &health, &metrics).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond("/readyz", &health, &metrics).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.set_ready();
        assert_eq!(
            respond("/readyz", &health, &metrics).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond("/metrics", &health, &metrics).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond("/nope", &health, &metrics).status(),
            StatusCode::NOT_FOUND
        );
    }
}
