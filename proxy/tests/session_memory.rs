//! What an idle logged-in session costs the `mailproxy serve` process, measured from its RSS
//! with many sessions open to a lightweight backend. Prints the numbers (`--nocapture`).

mod session_support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use session_support::{FakeImap, Pki, ProxyProcess};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const PLAIN_SESSIONS: usize = 1000;
const TLS_SESSIONS: usize = 300;

async fn log_in<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> BufReader<S> {
    let mut reader = BufReader::with_capacity(256, stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("* OK"), "{line}");
    reader
        .get_mut()
        .write_all(b"a LOGIN u@f.test pw\r\n")
        .await
        .unwrap();
    line.clear();
    reader.read_line(&mut line).await.unwrap();
    assert_eq!(line, "a OK done\r\n");
    reader
}

fn tls_connector(pki: &Pki) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls::pki_types::CertificateDer::pem_file_iter(pki.ca()).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn settled_rss(proxy: &ProxyProcess) -> u64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.rss_kib()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_hold_little_memory() {
    let fake = FakeImap::start().await;
    let pki = Pki::new();
    let routes = json!({
        "servers": {"fake": {"host": "127.0.0.1", "ports": {"imap": fake.port}}},
        "domains": {"f.test": "fake"},
    })
    .to_string();
    let proxy = ProxyProcess::start(&routes, &pki, "warn");
    let imap = proxy.port("imap");
    let imaps = proxy.port("imaps");
    let connector = tls_connector(&pki);

    // Warm-up: the allocator's arenas, the runtime's worker state and the TLS session cache
    // are paid once, not per session.
    let mut warm = Vec::new();
    for _ in 0..50 {
        warm.push(log_in(TcpStream::connect(("127.0.0.1", imap)).await.unwrap()).await);
    }
    drop(warm);
    let base = settled_rss(&proxy).await;

    let mut plain = Vec::with_capacity(PLAIN_SESSIONS);
    for _ in 0..PLAIN_SESSIONS {
        plain.push(log_in(TcpStream::connect(("127.0.0.1", imap)).await.unwrap()).await);
    }
    let with_plain = settled_rss(&proxy).await;

    let mut tls = Vec::with_capacity(TLS_SESSIONS);
    for _ in 0..TLS_SESSIONS {
        let tcp = TcpStream::connect(("127.0.0.1", imaps)).await.unwrap();
        let stream = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.push(log_in(stream).await);
    }
    let with_tls = settled_rss(&proxy).await;

    let per_plain = (with_plain.saturating_sub(base)) * 1024 / PLAIN_SESSIONS as u64;
    let per_tls = (with_tls.saturating_sub(with_plain)) * 1024 / TLS_SESSIONS as u64;
    println!(
        "proxy RSS: {base} KiB at rest, {with_plain} KiB with {PLAIN_SESSIONS} idle IMAP \
         sessions ({per_plain} bytes each), {with_tls} KiB with {TLS_SESSIONS} more over IMAPS \
         ({per_tls} bytes each)"
    );
    assert!(
        per_plain < 12 * 1024,
        "{per_plain} bytes per idle plain session"
    );
    assert!(per_tls < 48 * 1024, "{per_tls} bytes per idle TLS session");

    // They are all still alive.
    for session in plain.iter_mut().take(10) {
        session.get_mut().write_all(b"b NOOP\r\n").await.unwrap();
        let mut line = String::new();
        session.read_line(&mut line).await.unwrap();
        assert_eq!(line, "b OK done\r\n");
    }
}
