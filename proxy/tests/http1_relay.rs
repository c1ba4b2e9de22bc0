//! HTTP/1.x as a relay must handle it, byte for byte on real sockets: pipelined requests,
//! `Expect: 100-continue`, `HEAD`, chunked uploads with trailers, an HTTP/1.0 client getting a
//! chunked response, a request that frames its body two ways (request smuggling), and the
//! redirect of plain http to https. One real hyper backend behind `mailproxy serve`
//! (in-process).

mod http_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn setup() -> (Backend, Proxy) {
    let backend = Backend::start("A").await;
    let routes = table(&[], &[backend.addr], None, &[]);
    let proxy = Proxy::start(&routes, |_| {}).await;
    (backend, proxy)
}

/// Everything the proxy sends until it closes the connection.
async fn read_all(tcp: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads until `needle` has arrived; returns everything read.
async fn read_until(tcp: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buffer))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            read > 0,
            "closed before {needle:?}: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (_backend, proxy) = setup().await;
    let mut tcp = connect_from(client(1), proxy.http).await;
    tcp.write_all(
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_all(&mut tcp).await;
    let positions: Vec<usize> = ["A GET /one", "A GET /two", "A GET /three"]
        .iter()
        .map(|body| {
            all.find(body)
                .unwrap_or_else(|| panic!("{body} missing: {all}"))
        })
        .collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "{all}");
    assert_eq!(all.matches("HTTP/1.1 200").count(), 3, "{all}");
    assert!(all.ends_with("A GET /three"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_head_and_chunked_uploads() {
    let (_backend, proxy) = setup().await;
    let mut tcp = connect_from(client(1), proxy.http).await;
    // The proxy answers 100 Continue itself, then relays the body.
    tcp.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = read_until(&mut tcp, "\r\n\r\n").await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    tcp.write_all(b"0123456789").await.unwrap();
    let answer = read_until(&mut tcp, "\r\n\r\n10").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // HEAD: a head without a body, then the connection serves the next request.
    tcp.write_all(b"HEAD /stream/5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut tcp, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.ends_with("\r\n\r\n"),
        "no body after a HEAD's head: {head:?}"
    );

    // A chunked upload with an extension and a trailer reaches the backend whole.
    tcp.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n\
          4;note=first\r\nabcd\r\n6\r\nefghij\r\n0\r\nX-Checksum: 1\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_all(&mut tcp).await;
    assert!(all.starts_with("HTTP/1.1 200"), "{all}");
    assert!(all.ends_with("\r\n\r\n10"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_gets_a_chunked_response_without_its_coding() {
    let (_backend, proxy) = setup().await;
    let mut tcp = connect_from(client(1), proxy.http).await;
    tcp.write_all(b"GET /stream/100000 HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("closed after the body")
        .unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&answer[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body = &answer[split..];
    assert_eq!(body.len(), 100_000);
    assert!(body.iter().all(|byte| *byte == b'z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_framed_two_ways_is_refused_and_the_connection_closed() {
    let (_backend, proxy) = setup().await;
    for smuggling in [
        &b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
           Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"[..],
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let mut tcp = connect_from(client(1), proxy.http).await;
        tcp.write_all(smuggling).await.unwrap();
        let all = read_all(&mut tcp).await;
        assert!(
            all.starts_with("HTTP/1.1 400"),
            "{all:?} for {:?}",
            String::from_utf8_lossy(smuggling)
        );
        assert!(!all.contains("smuggled"), "{all}");
    }
}

/// A client that names `Content-Length` in `Connection` (a hop-by-hop header the proxy drops)
/// must not make the backend read the body as a request of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_header_naming_the_framing_smuggles_nothing() {
    let (_backend, proxy) = setup().await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut tcp = connect_from(client(1), proxy.http).await;
    tcp.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Content-Length, Host\r\n\
             Content-Length: {}\r\n\r\n{smuggled}\
             GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            smuggled.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let all = read_all(&mut tcp).await;
    assert_eq!(all.matches("HTTP/1.1 200").count(), 2, "{all}");
    let upload = format!("\r\n\r\n{}HTTP/1.1 200", smuggled.len());
    assert!(
        all.contains(&upload),
        "the backend read the body whole: {all}"
    );
    assert!(!all.contains("smuggled"), "{all}");
    assert!(all.ends_with("A GET /after"), "{all}");
}

/// A backend that answers GETs and closes the connection on the first POST after reading it,
/// as a backend restarting mid-request would: it counts the POSTs it read.
async fn closing_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let posts = Arc::new(AtomicUsize::new(0));
    let counted = posts.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let posts = counted.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = seen.drain(..end + 4).collect();
                        if head.starts_with(b"POST") && posts.fetch_add(1, Ordering::SeqCst) == 0 {
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match tcp.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => seen.extend_from_slice(&buffer[..read]),
                    }
                }
            });
        }
    });
    (addr, posts)
}

/// A POST on a kept backend connection that the backend closed after reading it may have been
/// acted on: it is not sent again (a GET would be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_backend_may_have_processed_is_not_sent_twice() {
    let (backend, posts) = closing_backend().await;
    let proxy = Proxy::start(&table(&[], &[backend], None, &[]), |_| {}).await;
    let mut tcp = connect_from(client(1), proxy.http).await;
    tcp.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_until(&mut tcp, "\r\n\r\nok").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    tcp.write_all(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut tcp, "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert_eq!(posts.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_to_https_when_configured_and_https_is_served() {
    let backend = Backend::start("A").await;
    let routes = table(&[], &[backend.addr], None, &[]);
    let proxy = Proxy::start(&routes, |options| {
        options.http.redirect_to_https = Some(8443);
    })
    .await;
    let mut tcp = connect_from(client(1), proxy.http).await;
    tcp.write_all(b"GET /zimbra/?app=mail HTTP/1.1\r\nHost: mail.example.com:80\r\n\r\n")
        .await
        .unwrap();
    let first = read_until(&mut tcp, "\r\n\r\n").await;
    assert!(first.starts_with("HTTP/1.1 301"), "{first}");
    assert!(
        first.contains("location: https://mail.example.com:8443/zimbra/?app=mail\r\n"),
        "{first}"
    );
    // The connection stays open for the next request; a request with an empty Host (which
    // names no site to redirect to) gets 400.
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: \r\n\r\n")
        .await
        .unwrap();
    let second = read_all(&mut tcp).await;
    assert!(second.starts_with("HTTP/1.1 400"), "{second}");

    let https = format!("https://localhost:{}/home/alice/x", proxy.https.port());
    let resolve = format!("localhost:{}:127.0.0.1", proxy.https.port());
    let ca = proxy.pki.ca();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-i", "--http1.1", "--cacert"])
            .arg(&ca)
            .args(["--resolve", &resolve, &https])
            .output()
            .expect("curl runs")
    })
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&output.stdout).to_lowercase();
    assert!(
        answer.starts_with("http/1.1 200"),
        "{answer} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(answer.contains("x-backend: a"), "{answer}");
    let metrics = get(client(1), proxy.health, "/metrics", &[]).await.body;
    for counted in [
        "mailproxy_http_requests_total{route=\"https_redirect\",status=\"3xx\"} 1",
        "mailproxy_http_requests_total{route=\"https_redirect\",status=\"4xx\"} 1",
    ] {
        assert!(metrics.contains(counted), "{counted} in {metrics}");
    }
}
