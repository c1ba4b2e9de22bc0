//! The web proxy end to end: `mailproxy serve` (in-process) with `http` and `https` listeners in
//! front of two real hyper backends, routed by a Route Lookup Handler written here that answers
//! by name and by zimbraId.

mod http_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use http::{Request, StatusCode};
use http_support::*;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn zimbra_token(id: &str) -> String {
    let data = format!("id={}:{id};exp=13:1700000000000;", id.len());
    let hex: String = data.bytes().map(|b| format!("{b:02x}")).collect();
    format!("0_0123456789abcdef_{hex}")
}

fn jwt(sub: &str) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.sig",
        engine.encode(r#"{"alg":"HS256"}"#),
        engine.encode(format!(r#"{{"sub":"{sub}"}}"#))
    )
}

/// A request URI, its headers and the backend it must reach.
type Case = (String, Vec<(&'static str, String)>, &'static str);

struct Setup {
    a: Backend,
    b: Backend,
    handler: Handler,
    proxy: Proxy,
}

async fn setup() -> Setup {
    let (a, b) = backends().await;
    let users: HashMap<String, _> = [
        ("alice", a.addr),
        ("bob", b.addr),
        ("carol@example.com", a.addr),
        ("dave@EXAMPLE", b.addr),
        ("erin@example.com", b.addr),
        ("jürgen@example.com", b.addr),
    ]
    .into_iter()
    .map(|(user, addr)| (user.to_string(), addr))
    .collect();
    let ids: HashMap<String, _> = [("id-a", a.addr), ("id-b", b.addr)]
        .into_iter()
        .map(|(id, addr)| (id.to_string(), addr))
        .collect();
    let handler = Handler::start(users, ids).await;
    let routes = table(
        &[("mbs-a", a.addr), ("mbs-b", b.addr)],
        &[a.addr, b.addr],
        Some(&handler),
        &[("pinned@example.com", "mbs-b")],
    );
    let proxy = Proxy::start(&routes, |_| {}).await;
    Setup {
        a,
        b,
        handler,
        proxy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_sends_each_user_to_the_right_backend() {
    let s = setup().await;
    let proxy = s.proxy.http;
    let me = client(1);
    let basic = |user_pass: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    };
    let cookie = format!("JSESSIONID=x; ZM_AUTH_TOKEN={}", zimbra_token("id-b"));
    let admin_cookie = format!("ZM_ADMIN_AUTH_TOKEN={}", zimbra_token("id-a"));
    let bearer = format!("Bearer {}", jwt("id-b"));
    let cases: Vec<Case> = vec![
        ("/home/alice/Inbox".into(), vec![], "A"),
        ("/home/~bob/Inbox?fmt=json".into(), vec![], "B"),
        ("/service/home/~alice/Calendar".into(), vec![], "A"),
        ("/service/home/bob/".into(), vec![], "B"),
        ("/home/j%C3%BCrgen%40example.com/x".into(), vec![], "B"),
        (
            "/Microsoft-Server-ActiveSync?Cmd=Sync".into(),
            vec![("authorization", basic("EXAMPLE\\dave:secret"))],
            "B",
        ),
        (
            "/Microsoft-Server-ActiveSync?Cmd=Sync&User=example.com%5Ccarol".into(),
            vec![],
            "A",
        ),
        (
            "/ews/Exchange.asmx".into(),
            vec![("authorization", basic("erin@example.com:pw"))],
            "B",
        ),
        ("/dav/bob/Calendar/".into(), vec![], "B"),
        ("/principals/users/alice/".into(), vec![], "A"),
        (
            "/home/~/Inbox".into(),
            vec![("cookie", cookie.clone())],
            "B",
        ),
        ("/zimbraAdmin/".into(), vec![("cookie", admin_cookie)], "A"),
        (
            format!("/service/soap?zauthtoken={}", zimbra_token("id-a")),
            vec![],
            "A",
        ),
        ("/".into(), vec![("authorization", bearer)], "B"),
        (format!("/x?zjwt={}", jwt("id-a")), vec![], "A"),
        ("/home/pinned@example.com/".into(), vec![], "B"),
    ];
    for (uri, headers, expected) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let answer = get(me, proxy, uri, &headers).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}: {answer:?}");
        assert_eq!(answer.backend(), *expected, "{uri}: {answer:?}");
        let path = uri.split('?').next().unwrap();
        assert!(answer.body.ends_with(path), "{uri}: {}", answer.body);
        assert_eq!(answer.header("x-seen-x-forwarded-for"), "127.0.0.1");
        assert_eq!(answer.header("x-seen-x-forwarded-proto"), "http");
        assert_eq!(
            answer.header("x-seen-forwarded"),
            "for=127.0.0.1;proto=http;host=\"mail.example.com\""
        );
        assert_eq!(answer.header("x-seen-host"), "mail.example.com");
    }

    let asked = s.handler.asked();
    // Every lookup is a web lookup with the placeholder password and the virtual host.
    for question in &asked {
        assert_eq!(question.protocol, "http", "{question:?}");
        assert_eq!(question.password, "_password_");
        assert_eq!(question.proxy_host, "mail.example.com");
    }
    let by_id: Vec<&str> = asked
        .iter()
        .filter(|q| q.method == "zimbraId")
        .map(|q| q.user.as_str())
        .collect();
    // id-b and id-a asked once each: the second token request for each was a cache hit.
    assert_eq!(by_id, ["id-b", "id-a"], "{asked:?}");
    let by_name: Vec<&str> = asked
        .iter()
        .filter(|q| q.method == "username")
        .map(|q| q.user.as_str())
        .collect();
    for user in [
        "alice",
        "bob",
        "jürgen@example.com",
        "dave@EXAMPLE",
        "carol@example.com",
        "erin@example.com",
    ] {
        assert!(by_name.contains(&user), "{user} not asked: {by_name:?}");
    }
    assert!(
        !by_name.iter().any(|user| user.contains("pinned")),
        "a pinned account needs no lookup"
    );

    // An account the handler does not know, and a token it does not know: the balancer.
    for (uri, headers) in [
        ("/home/nobody/", vec![]),
        (
            "/",
            vec![("cookie", format!("ZM_AUTH_TOKEN={}", zimbra_token("id-x")))],
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let answer = get(me, proxy, uri, &headers).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
        assert!(["A", "B"].contains(&answer.backend()));
    }

    // The metrics count requests by route kind and status class.
    let metrics = get(me, s.proxy.health, "/metrics", &[]).await.body;
    for line in [
        "mailproxy_http_requests_total{route=\"rest\",status=\"2xx\"} 7",
        "mailproxy_http_requests_total{route=\"activesync\",status=\"2xx\"} 2",
        "mailproxy_http_requests_total{route=\"jwt\",status=\"2xx\"} 2",
        "mailproxy_http_requests_total{route=\"auth_token\",status=\"2xx\"} 3",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    let _ = (&s.a, &s.b);
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_spread_with_client_ip_affinity() {
    let s = setup().await;
    let mut seen = HashMap::new();
    for n in 10..42 {
        let first = get(client(n), s.proxy.http, "/", &[]).await;
        assert_eq!(first.status, StatusCode::OK);
        for _ in 0..2 {
            let again = get(client(n), s.proxy.http, "/zimbra/", &[]).await;
            assert_eq!(again.backend(), first.backend(), "client {n} moved");
        }
        *seen.entry(first.backend().to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both backends get clients: {seen:?}");
    assert!(s.handler.asked().is_empty(), "no lookup without an account");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_by_alpn_and_curl() {
    let s = setup().await;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls::pki_types::CertificateDer::pem_file_iter(s.proxy.pki.ca()).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = connect_from(client(1), s.proxy.https).await;
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(executor(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    // Several streams on one connection, to different backends.
    for (path, backend) in [
        ("/home/alice/a", "A"),
        ("/dav/bob/", "B"),
        ("/home/alice/b", "A"),
    ] {
        let request = Request::get(format!("https://mail.example.com{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.expect("a response");
        let answer = read(response).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.backend(), backend, "{path}");
        assert_eq!(answer.header("x-seen-x-forwarded-proto"), "https");
        assert_eq!(answer.header("x-seen-host"), "mail.example.com");
    }

    // curl, HTTP/1.1 in clear text and HTTP/2 over TLS.
    let http = format!("http://127.0.0.1:{}/dav/bob/", s.proxy.http.port());
    let https = format!("https://localhost:{}/home/alice/x", s.proxy.https.port());
    let ca = s.proxy.pki.ca();
    let output = tokio::task::spawn_blocking(move || {
        let plain = std::process::Command::new("curl")
            .args(["-sS", "-i", &http])
            .output()
            .expect("curl runs");
        let tls = std::process::Command::new("curl")
            .args(["-sS", "-i", "--http2", "--cacert"])
            .arg(&ca)
            .args([
                "--resolve",
                &format!(
                    "localhost:{}:127.0.0.1",
                    https.split(':').nth(2).unwrap().split('/').next().unwrap()
                ),
                &https,
            ])
            .output()
            .expect("curl runs");
        (plain, tls)
    })
    .await
    .unwrap();
    let plain = String::from_utf8_lossy(&output.0.stdout).to_lowercase();
    assert!(plain.starts_with("http/1.1 200"), "{plain}");
    assert!(plain.contains("x-backend: b"), "{plain}");
    let tls = String::from_utf8_lossy(&output.1.stdout).to_lowercase();
    assert!(
        tls.starts_with("http/2 200"),
        "{tls} {}",
        String::from_utf8_lossy(&output.1.stderr)
    );
    assert!(tls.contains("x-backend: a"), "{tls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_pass_through() {
    let s = setup().await;
    let mut tcp = connect_from(client(1), s.proxy.http).await;
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: mail.example.com\r\nConnection: Upgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "head cut short");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in [
        &b"hello"[..],
        &[0x81, 0x85, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        &[7u8; 70_000],
    ] {
        tcp.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(echoed, message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_in_flat_memory() {
    const SIZE: u64 = 200 * 1024 * 1024;
    let s = setup().await;
    let before = rss();
    let upload = Request::post("/upload")
        .header("host", "mail.example.com")
        .header("content-length", SIZE.to_string())
        .body(zeros(SIZE))
        .unwrap();
    let answer = read(send(client(1), s.proxy.http, upload).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, SIZE.to_string());
    // Chunked too (no length announced).
    let chunked = Request::post("/upload")
        .header("host", "mail.example.com")
        .body(zeros(SIZE / 4))
        .unwrap();
    let answer = read(send(client(1), s.proxy.http, chunked).await.unwrap()).await;
    assert_eq!(answer.body, (SIZE / 4).to_string());

    let download = Request::get(format!("/stream/{SIZE}"))
        .header("host", "mail.example.com")
        .body(zeros(0))
        .unwrap();
    let response = send(client(1), s.proxy.http, download).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(count_body(response.into_body()).await.unwrap(), SIZE);
    let grown = rss().saturating_sub(before);
    // Proxy, backends and clients share this process: 600 MB moved through it, a buffered body
    // would be 200 MB.
    assert!(grown < 64 * 1024 * 1024, "RSS grew by {grown} bytes");
}

/// Sends raw bytes and reads what comes back until the proxy closes or 5 s pass.
async fn raw(proxy: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = connect_from(client(1), proxy).await;
    tcp.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Behind a load balancer that sends the PROXY protocol, the backend learns the client's
/// address from the header, in the same segment as the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_names_the_client_a_proxy_protocol_header_gives() {
    let (a, b) = backends().await;
    let routes = table(
        &[("mbs-a", a.addr), ("mbs-b", b.addr)],
        &[a.addr],
        None,
        &[],
    );
    let proxy = Proxy::start_behind_load_balancer(&routes, "127.0.0.0/8").await;
    let request = b"GET / HTTP/1.1\r\nHost: mail.example.com\r\nConnection: close\r\n\r\n";
    let header = b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 80\r\n";
    let answer = raw(proxy.http, &[header.as_slice(), request].concat()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-seen-x-forwarded-for: 203.0.113.9\r\n"),
        "{answer}"
    );
    let without = raw(proxy.http, request).await;
    assert_eq!(without, "", "no header, no answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_answers_and_the_proxy_goes_on() {
    let s = setup().await;
    let proxy = s.proxy.http;

    let garbage = raw(proxy, b"GARBAGE\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
    let bad_version = raw(proxy, b"GET / HTTP/9.9\r\nHost: x\r\n\r\n").await;
    assert!(
        bad_version.is_empty()
            || bad_version.starts_with("HTTP/1.1 4")
            || bad_version.starts_with("HTTP/1.1 505"),
        "{bad_version:?}"
    );

    let mut huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100 * 1024));
    huge.extend(b"\r\n\r\n");
    let oversized = raw(proxy, &huge).await;
    assert!(oversized.starts_with("HTTP/1.1 431"), "{oversized:?}");

    // Slowloris: a header line every 300 ms never completes a head within the 1 s limit.
    let started = Instant::now();
    let mut slow = connect_from(client(1), proxy).await;
    slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if slow.write_all(b"X-A: b\r\n").await.is_err() {
            break true;
        }
        let mut buffer = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buffer)).await {
            Ok(Ok(_)) | Ok(Err(_)) => break true,
            Err(_) if started.elapsed() > Duration::from_secs(5) => break false,
            Err(_) => {}
        }
    };
    assert!(closed, "the slow client is still connected");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Malformed cookies and tokens: the balancer, no panic.
    for header in [
        ("cookie", "ZM_AUTH_TOKEN=0_zz_nothex".to_string()),
        (
            "cookie",
            "ZM_AUTH_TOKEN=;;;=;ZM_ADMIN_AUTH_TOKEN=1_2_3".to_string(),
        ),
        ("cookie", format!("ZM_AUTH_TOKEN={}", "0_ab_".repeat(2000))),
        ("authorization", "Bearer a.b.c".to_string()),
        ("authorization", "Bearer ....".to_string()),
        ("authorization", "Basic %%%".to_string()),
    ] {
        let answer = get(client(1), proxy, "/", &[(header.0, &header.1)]).await;
        assert_eq!(answer.status, StatusCode::OK, "{header:?}");
    }
    for uri in [
        "/?zjwt=%FF%FE",
        "/?zauthtoken=0_1_zz",
        "/home/%FF/",
        "/dav/%00/",
    ] {
        let answer = get(client(1), proxy, uri, &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
    }

    // A backend that breaks mid-response: the client's body ends early with an error (the
    // announced length is never reached), never a hang.
    let response = send(
        client(1),
        proxy,
        Request::get("/reset")
            .header("host", "x")
            .body(zeros(0))
            .unwrap(),
    )
    .await;
    match response {
        Ok(response) => {
            assert_eq!(response.status(), StatusCode::OK);
            let counted =
                tokio::time::timeout(Duration::from_secs(5), count_body(response.into_body()))
                    .await
                    .expect("no hang");
            assert!(
                counted.is_err(),
                "a truncated body is an error: {counted:?}"
            );
        }
        Err(error) => assert!(!error.is_user(), "{error}"),
    }
    // A backend too slow to answer: 504 after the response timeout (2 s here).
    let slow = get(client(1), proxy, "/slow", &[]).await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT, "{slow:?}");
    // And the proxy serves the next request.
    let answer = get(client(1), proxy, "/home/alice/after", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.backend(), "A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_is_retried_and_skipped() {
    let (a, _b) = backends().await;
    // A backend address nobody listens on.
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", mailproxy_testkit::free_port())
        .parse()
        .unwrap();
    let routes = table(&[("mbs-a", a.addr)], &[a.addr, dead], None, &[]);
    let proxy = Proxy::start(&routes, |_| {}).await;
    // Requests with a body are not retried: some client hashes to the dead backend and gets 502.
    let mut statuses = Vec::new();
    for n in 10..42 {
        let request = Request::post("/upload")
            .header("host", "x")
            .body(zeros(10))
            .unwrap();
        let answer = read(send(client(n), proxy.http, request).await.unwrap()).await;
        statuses.push(answer.status);
        // Let the dead backend's down mark expire, so that the next client may hash to it.
        tokio::time::sleep(Duration::from_millis(600)).await;
        if answer.status == StatusCode::BAD_GATEWAY {
            assert!(answer.body.contains("refused"), "{answer:?}");
            break;
        }
    }
    assert!(statuses.contains(&StatusCode::BAD_GATEWAY), "{statuses:?}");
    // GETs are retried on the live backend: every client gets an answer.
    for n in 10..42 {
        let answer = get(client(n), proxy.http, "/", &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "client {n}");
        assert_eq!(answer.backend(), "A");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_is_503() {
    let routes = table(&[], &[], None, &[]);
    let proxy = Proxy::start(&routes, |_| {}).await;
    let answer = get(client(1), proxy.http, "/", &[]).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body, "no backend available\n");
    // An account with no handler and no domain entry also ends at the (empty) balancer.
    let answer = get(client(1), proxy.http, "/home/alice/", &[]).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_and_h2c_works() {
    let s = setup().await;
    // A keep-alive connection that answered one request is closed once idle for the header
    // timeout (1 s here).
    let mut tcp = connect_from(client(1), s.proxy.http).await;
    tcp.write_all(b"GET /home/alice/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the idle connection is closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("A GET /home/alice/"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // HTTP/2 in clear text by prior knowledge.
    let (mut sender, connection) = h2c(client(1), s.proxy.http).await;
    let request = Request::get("http://mail.example.com/dav/bob/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = read(sender.send_request(request).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.backend(), "B");
    assert_eq!(answer.header("x-seen-x-forwarded-proto"), "http");
    // A stream open longer than the idle time (1 s) keeps the connection: this one waits for
    // the backend's head until the response timeout (2 s) answers it. Once nothing is open for
    // the idle time, the proxy closes the connection.
    let request = Request::get("http://mail.example.com/slow")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let asked = Instant::now();
    let answer = read(sender.send_request(request).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(asked.elapsed() >= Duration::from_millis(1900));
    let idle_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .unwrap()
        .expect("closed with a GOAWAY, not an error");
    assert!(idle_since.elapsed() >= Duration::from_millis(900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_account_server_is_forgotten_and_looked_up_again() {
    let (a, _b) = backends().await;
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", mailproxy_testkit::free_port())
        .parse()
        .unwrap();
    let handler = Handler::start(
        [("mover".to_string(), dead)].into_iter().collect(),
        [("id-moved".to_string(), dead)].into_iter().collect(),
    )
    .await;
    let routes = table(&[("mbs-a", a.addr)], &[a.addr], Some(&handler), &[]);
    let proxy = Proxy::start(&routes, |_| {}).await;
    let token = format!("/service/soap?zauthtoken={}", zimbra_token("id-moved"));
    let asked = |user: &str| {
        handler
            .asked()
            .iter()
            .filter(|asked| asked.user == user)
            .count()
    };
    for attempt in 1..=2 {
        let answer = get(client(1), proxy.http, "/home/mover/Inbox", &[]).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{answer:?}");
        let answer = get(client(1), proxy.http, &token, &[]).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{answer:?}");
        // Had the route stayed cached, the second attempt would not have asked the handler.
        assert_eq!(asked("mover"), attempt, "lookups of mover");
        assert_eq!(asked("id-moved"), attempt, "lookups of id-moved");
    }
}

/// A WebSocket client connected through the proxy at `to`, with extra request headers; and the
/// backend that answered the handshake.
async fn websocket(
    to: std::net::SocketAddr,
    headers: &[(&'static str, String)],
) -> (
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    String,
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = "ws://mail.example.com/ws".into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let tcp = connect_from(client(1), to).await;
    let (ws, response) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("a WebSocket handshake through the proxy");
    let backend = response
        .headers()
        .get("x-backend")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    (ws, backend)
}

/// Sends text, a 1 MiB binary message and a ping, checks the echoes and the pong, then closes
/// and checks that the close handshake completes.
async fn echo_and_close(mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let binary: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let ping = bytes::Bytes::from_static(b"are you there");
    for (sent, expected) in [
        (
            Message::text("hello, backend"),
            Message::text("hello, backend"),
        ),
        (Message::binary(binary.clone()), Message::binary(binary)),
        (Message::Ping(ping.clone()), Message::Pong(ping)),
    ] {
        ws.send(sent).await.expect("send through the proxy");
        let answer = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer in time")
            .expect("the connection stays open")
            .expect("a valid message");
        assert!(
            answer == expected,
            "expected {expected:.40?}, got {answer:.40?}"
        );
    }
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    })))
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the close reply in time");
    match reply {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the backend's close frame, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the connection ends in time");
    assert!(end.is_none(), "the close handshake is complete: {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_websocket_session_passes_through_balanced_and_token_routes() {
    let balanced = WsBackend::start("ws-balanced").await;
    let by_token = WsBackend::start("ws-token").await;
    let handler = Handler::start(
        HashMap::new(),
        [("id-ws".to_string(), by_token.addr)].into_iter().collect(),
    )
    .await;
    let routes = table(
        &[("mbs-ws", by_token.addr)],
        &[balanced.addr],
        Some(&handler),
        &[],
    );
    let proxy = Proxy::start(&routes, |_| {}).await;

    let (ws, backend) = websocket(proxy.http, &[]).await;
    assert_eq!(backend, "ws-balanced");
    echo_and_close(ws).await;

    let cookie = format!("ZM_AUTH_TOKEN={}", zimbra_token("id-ws"));
    let (ws, backend) = websocket(proxy.http, &[("cookie", cookie)]).await;
    assert_eq!(backend, "ws-token", "routed by the token's account id");
    echo_and_close(ws).await;
    let asked = handler.asked();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(
        (asked[0].method.as_str(), asked[0].user.as_str()),
        ("zimbraId", "id-ws")
    );
    proxy.stop().await;
}

/// With `webUpstreamTls`, every web backend is reached over TLS on its https port and its
/// certificate is verified against `http.upstreamCaFile`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_backends_over_tls_are_verified_and_looked_up_as_httpssl() {
    let trusted = Pki::new();
    let untrusted = Pki::new();
    let good = Backend::start_tls("TLS", &trusted).await;
    let bad = Backend::start_tls("UNTRUSTED", &untrusted).await;
    // The servers' plain http port: a route that used it would answer "PLAIN".
    let plain = Backend::start("PLAIN").await;
    let handler = Handler::start(
        [
            ("alice".to_string(), good.addr),
            ("mallory".to_string(), bad.addr),
        ]
        .into_iter()
        .collect(),
        [("id-a".to_string(), good.addr)].into_iter().collect(),
    )
    .await;
    let server = |https: std::net::SocketAddr| {
        serde_json::json!({
            "host": "127.0.0.1",
            "ports": {"http": plain.addr.port(), "https": https.port()},
        })
    };
    let routes = serde_json::json!({
        "servers": {"mbs-good": server(good.addr), "mbs-bad": server(bad.addr)},
        "accounts": {"pinned@example.com": "mbs-good", "victim@example.com": "mbs-bad"},
        "lookupHandlers": [handler.url()],
        "webBackends": [good.addr.to_string()],
        "settings": {"lookupTimeoutSeconds": 2, "webUpstreamTls": true},
    })
    .to_string();
    let config = format!("http: {{upstreamCaFile: '{}'}}\n", trusted.ca().display());
    let proxy = Proxy::start_with(&routes, &config, |_| {}).await;

    // HTTP/1.1: each request on its client connection's own backend connection.
    let token = format!("ZM_AUTH_TOKEN={}", zimbra_token("id-a"));
    for (uri, headers) in [
        ("/", vec![]),
        ("/home/alice/Inbox", vec![]),
        ("/home/pinned@example.com/Inbox", vec![]),
        ("/home/~/Inbox", vec![("cookie", token.as_str())]),
    ] {
        let answer = get(client(1), proxy.http, uri, &headers).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}: {answer:?}");
        assert_eq!(answer.backend(), "TLS", "{uri}: {answer:?}");
        assert!(answer.body.ends_with(uri), "{uri}: {}", answer.body);
    }
    for uri in ["/home/mallory/Inbox", "/home/victim@example.com/Inbox"] {
        let answer = get(client(1), proxy.http, uri, &[]).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{uri}: {answer:?}");
        assert_eq!(answer.body, "the backend failed\n", "{uri}");
    }

    // HTTP/2: through the pooled client.
    let (mut sender, _connection) = h2c(client(1), proxy.http).await;
    for (path, status, backend) in [
        ("/home/alice/h2", StatusCode::OK, "TLS"),
        ("/h2", StatusCode::OK, "TLS"),
        ("/home/mallory/h2", StatusCode::BAD_GATEWAY, ""),
    ] {
        let request = Request::get(format!("http://mail.example.com{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let answer = read(sender.send_request(request).await.unwrap()).await;
        assert_eq!(answer.status, status, "{path}: {answer:?}");
        assert_eq!(answer.backend(), backend, "{path}: {answer:?}");
        if status == StatusCode::BAD_GATEWAY {
            assert_eq!(answer.body, "the backend failed\n", "{path}");
        }
    }
    // Once more after the pooled client's failure: the route must still be cached.
    let again = get(client(1), proxy.http, "/home/mallory/again", &[]).await;
    assert_eq!(again.status, StatusCode::BAD_GATEWAY, "{again:?}");

    // The proxy refused the untrusted certificate: the backend saw its alert, once per request
    // (a certificate problem is not retried)...
    // The backend records a failure after the proxy has answered: wait for the last one.
    let deadline = Instant::now() + Duration::from_secs(5);
    let failures = loop {
        let failures = bad.tls_failures.lock().unwrap().clone();
        if failures.len() >= 4 || Instant::now() > deadline {
            break failures;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(failures.len(), 4, "{failures:?}");
    assert!(
        failures.iter().all(|f| f.contains("received fatal alert")),
        "{failures:?}"
    );
    // ... and took it for a certificate problem, not for a server that moved: the route stayed
    // cached (a refused connection would have made it ask the handler again).
    let asked = handler.asked();
    assert_eq!(
        asked.iter().filter(|q| q.user == "mallory").count(),
        1,
        "{asked:?}"
    );
    for question in &asked {
        assert_eq!(question.protocol, "httpssl", "{question:?}");
    }
    assert!(
        asked
            .iter()
            .any(|q| q.method == "zimbraId" && q.user == "id-a"),
        "{asked:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_web_backend_ca_file_stops_the_proxy_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let routes = dir.path().join("routes.json");
    std::fs::write(&routes, table(&[], &[], None, &[])).unwrap();
    let yaml = format!(
        "listeners: [{{protocol: http, address: '127.0.0.1:{}'}}]\n\
         routeTable: {{file: '{}'}}\n\
         healthListen: '127.0.0.1:{}'\n\
         http: {{upstreamCaFile: '{}'}}\n",
        mailproxy_testkit::free_port(),
        routes.display(),
        mailproxy_testkit::free_port(),
        missing.display(),
    );
    let config =
        mailproxy_crds::proxy_config::ProxyConfig::parse(&yaml, std::path::Path::new("t.yaml"))
            .unwrap();
    let error = match mailproxy::serve::Server::bind(&config, Default::default()).await {
        Ok(_) => panic!("the proxy started without its web backends' CA file"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("http.upstreamCaFile"), "{error}");
    assert!(error.contains(&missing.display().to_string()), "{error}");
}

/// HTTP/2 bodies have the HTTP/1 relay's limits: the backend's answer is waited for from the end
/// of the upload (an upload longer than the response timeout is not a slow backend), and a body
/// that stalls for the body idle time fails instead of holding its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_uploads_are_timed_from_their_end_and_stalls_are_cut() {
    let backend = Backend::start("A").await;
    let routes = table(&[], &[backend.addr], None, &[]);
    // Response timeout 2 s (the harness's), body idle time 1 s.
    let proxy = Proxy::start(&routes, |options| {
        options.http.body_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let (mut sender, _connection) = h2c(client(1), proxy.http).await;
    let upload = |chunks: usize, then_stall: bool| {
        let (mut chunk_sender, receiver) = futures::channel::mpsc::channel(1);
        tokio::spawn(async move {
            for _ in 0..chunks {
                tokio::time::sleep(Duration::from_millis(600)).await;
                let chunk = Ok(bytes::Bytes::from_static(b"0123456789"));
                if futures::SinkExt::send(&mut chunk_sender, chunk)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if then_stall {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        Request::post("http://mail.example.com/upload")
            .body(boxed_stream(receiver))
            .unwrap()
    };

    // 6 chunks 0.6 s apart: 3.6 s of upload, past the 2 s response timeout.
    let started = Instant::now();
    let answer = read(sender.send_request(upload(6, false)).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body, "60");
    assert!(started.elapsed() >= Duration::from_millis(3500));

    let started = Instant::now();
    let answer = read(sender.send_request(upload(1, true)).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{answer:?}");
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(10)).contains(&waited),
        "{waited:?}"
    );
}

/// A backend that takes an HTTP/2 client's upload and then stops reading it (a hung server) is
/// given up after the body idle time: nothing else would end the stream, since the proxy's
/// client no longer asks the body for data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upload_to_a_backend_that_stops_reading_is_given_up() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let hung = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let routes = table(&[], &[backend], None, &[]);
    let proxy = Proxy::start(&routes, |options| {
        options.http.body_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let (mut sender, _connection) = h2c(client(1), proxy.http).await;
    let (mut chunks, receiver) = futures::channel::mpsc::channel(1);
    tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        for _ in 0..4096 {
            if futures::SinkExt::send(&mut chunks, Ok(chunk.clone()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let request = Request::post("http://mail.example.com/upload")
        .body(boxed_stream(receiver))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), async {
        read(sender.send_request(request).await.unwrap()).await
    })
    .await
    .expect("the stalled upload is answered");
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{answer:?}");
    hung.abort();
}
