//! The proxy started in-process through the library API ([`mailproxy::serve::Server`]):
//! graceful shutdown, certificate and route-table reloads under live sessions, idle timeout,
//! pipelining after login, refused logins and IP throttling, `starttls: only` without a
//! certificate, against a lightweight backend.

mod session_support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailproxy::serve::{ServeOptions, Server};
use mailproxy_crds::proxy_config::ProxyConfig;
use mailproxy_testkit::{eventually, free_ports};
use serde_json::json;
use session_support::{FakeImap, Pki, http_get, replace};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// An async line client.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    async fn connect(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    async fn send(&mut self, text: &str) {
        self.reader
            .get_mut()
            .write_all(text.as_bytes())
            .await
            .expect("send to the proxy");
    }

    /// The next line, `None` once the proxy closed.
    async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(15), self.reader.read_line(&mut line))
            .await
            .expect("the proxy answers or closes within 15 s");
        match read {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end().to_string()),
        }
    }

    async fn logged_in(port: u16, user: &str) -> Self {
        let mut client = Self::connect(port).await.expect("connect");
        assert!(client.line().await.unwrap().starts_with("* OK"));
        client.send(&format!("a LOGIN {user} pw\r\n")).await;
        assert_eq!(client.line().await.as_deref(), Some("a OK done"));
        client
    }
}

struct Setup {
    dir: tempfile::TempDir,
    imap: u16,
    imaps: u16,
    health: u16,
    config: ProxyConfig,
}

fn routes(fake: &FakeImap, domains: serde_json::Value, settings: serde_json::Value) -> String {
    routes_to(fake.port, domains, settings)
}

fn routes_to(port: u16, domains: serde_json::Value, settings: serde_json::Value) -> String {
    json!({
        "servers": {"fake": {"host": "127.0.0.1", "ports": {"imap": port}}},
        "domains": domains,
        "settings": settings,
    })
    .to_string()
}

fn setup(pki: &Pki, routes: &str, grace_seconds: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("routes")).unwrap();
    let routes_path = dir.path().join("routes/routes.json");
    replace(&routes_path, routes);
    let [imap, imaps, health] = free_ports();
    let yaml = format!(
        "listeners:\n  - {{protocol: imap, address: '127.0.0.1:{imap}'}}\n  \
         - {{protocol: imaps, address: '127.0.0.1:{imaps}'}}\n\
         tls: {{certificates: [{{cert: '{}', key: '{}'}}]}}\n\
         routeTable: {{file: '{}'}}\nhealthListen: '127.0.0.1:{health}'\n\
         shutdownGraceSeconds: {grace_seconds}\n",
        pki.cert().display(),
        pki.key().display(),
        routes_path.display()
    );
    let config = ProxyConfig::parse(&yaml, Path::new("test.yaml")).unwrap();
    Setup {
        dir,
        imap,
        imaps,
        health,
        config,
    }
}

fn options() -> ServeOptions {
    ServeOptions {
        file_poll_interval: Duration::from_millis(100),
        upstream_failure_wait: Duration::ZERO,
        ..ServeOptions::default()
    }
}

/// Waits for the health port's `/readyz` to answer 503.
/// Runs `server` in the background until `stop` is sent (or dropped); the task returns what
/// `run` returned.
fn serve_until_stopped(
    server: Server,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    (stop, running)
}

/// Serves the configuration `yaml` until stopped, as [`serve_until_stopped`].
async fn serve_yaml(
    yaml: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let config = ProxyConfig::parse(yaml, Path::new("test.yaml")).unwrap();
    serve_until_stopped(Server::bind(&config, options()).await.unwrap())
}

async fn until_unready(health: u16) {
    eventually(
        "readyz to fail",
        Duration::from_secs(10),
        async || match http_get(health, "/readyz") {
            Some(answer) if answer.starts_with("HTTP/1.1 503") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
}

/// Waits for the listener on `port` to refuse connections.
async fn until_closed(port: u16) {
    eventually(
        "the listener to close",
        Duration::from_secs(10),
        async || match Client::connect(port).await {
            Err(_) => Ok(()),
            Ok(_) => Err("a connection was accepted".to_string()),
        },
    )
    .await;
}

/// A TLS client trusting `ca` and offering `alpn`.
fn tls_connector(ca: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The end-entity certificate the IMAPS listener presents.
async fn served_certificate(port: u16, ca: &Path) -> Vec<u8> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tls_connector(ca, &[])
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake with the proxy");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_sessions_and_shutdown_drains_them() {
    let fake = FakeImap::start().await;
    let pki = Pki::new();
    let ca = pki.ca();
    let setup = setup(
        &pki,
        &routes(&fake, json!({"f.test": "fake"}), json!({})),
        2,
    );
    let server = Server::bind(&setup.config, options()).await.unwrap();
    assert_eq!(server.listener_addresses().len(), 2);
    let (stop, running) = serve_until_stopped(server);
    assert!(
        http_get(setup.health, "/readyz")
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );

    let mut session = Client::logged_in(setup.imap, "u@f.test").await;

    // A certificate rotation: new handshakes get the new certificate.
    let before = served_certificate(setup.imaps, &ca).await;
    pki.issue("server");
    eventually(
        "the rotated certificate",
        Duration::from_secs(10),
        async || {
            (served_certificate(setup.imaps, &ca).await != before)
                .then_some(())
                .ok_or_else(|| "the old certificate".to_string())
        },
    )
    .await;
    // A route-table change: a new domain routes without a restart.
    replace(
        &setup.dir.path().join("routes/routes.json"),
        &routes(
            &fake,
            json!({"f.test": "fake", "g.test": "fake"}),
            json!({}),
        ),
    );
    eventually("the new route table", Duration::from_secs(10), async || {
        let mut client = Client::connect(setup.imap)
            .await
            .map_err(|error| error.to_string())?;
        client.line().await.ok_or("no greeting")?;
        client.send("a LOGIN u@g.test pw\r\n").await;
        match client.line().await {
            Some(line) if line == "a OK done" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    session.send("b NOOP\r\n").await;
    assert_eq!(
        session.line().await.as_deref(),
        Some("b OK done"),
        "the session survived both reloads"
    );

    // Shutdown: not ready, no new connections, live sessions go on for the grace, then close.
    let shutdown_started = Instant::now();
    stop.send(()).unwrap();
    until_unready(setup.health).await;
    until_closed(setup.imap).await;
    session.send("c NOOP\r\n").await;
    assert_eq!(
        session.line().await.as_deref(),
        Some("c OK done"),
        "the grace lets it finish"
    );
    assert_eq!(session.line().await, None, "closed at the end of the grace");
    let took = shutdown_started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "{took:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("run returns after the grace")
        .unwrap()
        .unwrap();
}

/// Between SIGTERM and the closing of its listeners the proxy is unready but still serves new
/// clients: the ones endpoints and load balancers send before they notice are not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_proxy_serves_new_clients_until_its_delay_is_over() {
    let fake = FakeImap::start().await;
    let pki = Pki::new();
    let mut setup = setup(
        &pki,
        &routes(&fake, json!({"f.test": "fake"}), json!({})),
        0,
    );
    setup.config.shutdown_delay_seconds = 3;
    let server = Server::bind(&setup.config, options()).await.unwrap();
    let (stop, running) = serve_until_stopped(server);
    Client::logged_in(setup.imap, "u@f.test").await;

    let shutdown_started = Instant::now();
    stop.send(()).unwrap();
    until_unready(setup.health).await;
    let mut late = Client::logged_in(setup.imap, "u@f.test").await;
    late.send("b NOOP\r\n").await;
    assert_eq!(late.line().await.as_deref(), Some("b OK done"));
    assert!(
        shutdown_started.elapsed() < Duration::from_secs(3),
        "the late client came within the delay"
    );
    until_closed(setup.imap).await;
    let took = shutdown_started.elapsed();
    assert!(took >= Duration::from_millis(2900), "closed after {took:?}");
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("run returns once the delay and the grace are over")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_pipelining_refusals_and_ip_throttling() {
    let fake = FakeImap::start().await;
    let settings =
        json!({"timeouts": {"idleSeconds": 1}, "loginLimits": {"ipLimit": 4, "userLimit": 1}});
    let pki = Pki::new();
    let setup = setup(&pki, &routes(&fake, json!({"f.test": "fake"}), settings), 1);
    let server = Server::bind(&setup.config, options()).await.unwrap();
    let (stop, running) = serve_until_stopped(server);

    // Commands pipelined behind the login reach the backend once it is done.
    let mut session = Client::connect(setup.imap).await.unwrap();
    assert!(session.line().await.unwrap().starts_with("* OK"));
    session
        .send("a LOGIN u@f.test/tb pw\r\nb NOOP\r\nc NOOP\r\n")
        .await;
    assert_eq!(session.line().await.as_deref(), Some("a OK done"));
    assert_eq!(session.line().await.as_deref(), Some("b OK done"));
    assert_eq!(session.line().await.as_deref(), Some("c OK done"));
    let idle_since = Instant::now();
    assert_eq!(session.line().await, None, "closed when idle");
    let idle = idle_since.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(4),
        "{idle:?}"
    );

    let mut refused = Client::connect(setup.imap).await.unwrap();
    refused.line().await.unwrap();
    refused.send("x LOGIN w@f.test wrong\r\n").await;
    assert_eq!(refused.line().await.as_deref(), Some("x NO LOGIN failed"));
    assert_eq!(refused.line().await, None);

    // u@f.test logged in once (the /tb suffix is not part of the name): that is its limit.
    let mut again = Client::connect(setup.imap).await.unwrap();
    again.line().await.unwrap();
    again.send("b LOGIN u@f.test pw\r\n").await;
    assert_eq!(
        again.line().await.as_deref(),
        Some("* BYE Login rejected for this user")
    );
    assert_eq!(again.line().await.as_deref(), Some("b NO LOGIN failed"));
    assert_eq!(again.line().await, None);

    let mut third = Client::connect(setup.imap).await.unwrap();
    assert!(third.line().await.unwrap().starts_with("* OK"));
    let mut fourth = Client::connect(setup.imap).await.unwrap();
    assert_eq!(
        fourth.line().await.as_deref(),
        Some("* BYE Login rejected from this IP")
    );
    assert_eq!(fourth.line().await, None);

    let metrics = http_get(setup.health, "/metrics").unwrap();
    for (outcome, count) in [("idle_timeout", 1), ("login_failed", 1), ("throttled", 2)] {
        assert!(
            metrics.contains(&format!(
                "mailproxy_sessions_total{{protocol=\"imap\",outcome=\"{outcome}\"}} {count}"
            )),
            "{outcome}: {metrics}"
        );
    }
    stop.send(()).unwrap();
    drop(third);
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_half_close_is_passed_on_and_the_server_close_ends_the_session() {
    let fake = FakeImap::start().await;
    let pki = Pki::new();
    let setup = setup(
        &pki,
        &routes(&fake, json!({"f.test": "fake"}), json!({})),
        1,
    );
    let server = Server::bind(&setup.config, options()).await.unwrap();
    let (stop, running) = serve_until_stopped(server);

    // The client sends its last command and half-closes: the answer still comes back, then
    // the end (the backend closed once it saw the client's end).
    let mut half = Client::logged_in(setup.imap, "half@f.test").await;
    half.send("b NOOP\r\n").await;
    half.reader.get_mut().shutdown().await.unwrap();
    assert_eq!(half.line().await.as_deref(), Some("b OK done"));
    assert_eq!(half.line().await, None, "closed after the backend's end");

    // The backend closes after LOGOUT while the client keeps its side open: the session ends
    // then and there (as in nginx), without waiting for the client to close too.
    let mut open = Client::logged_in(setup.imap, "open@f.test").await;
    open.send("z LOGOUT\r\n").await;
    assert_eq!(open.line().await.as_deref(), Some("* BYE fake"));
    assert_eq!(open.line().await.as_deref(), Some("z OK LOGOUT done"));
    assert_eq!(open.line().await, None, "closed after the backend's end");
    let ended = "mailproxy_sessions_total{protocol=\"imap\",outcome=\"relayed\"} 2";
    eventually(
        "both sessions counted as ended",
        Duration::from_secs(5),
        || async {
            let metrics = http_get(setup.health, "/metrics").ok_or("no answer from /metrics")?;
            if metrics.contains(ended)
                && metrics.contains("mailproxy_sessions_active{protocol=\"imap\"} 0")
            {
                Ok(())
            } else {
                Err(metrics)
            }
        },
    )
    .await;
    drop(open);

    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_only_reloaded_on_a_proxy_without_certificate_fails_closed() {
    let fake = FakeImap::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("routes")).unwrap();
    let routes_path = dir.path().join("routes/routes.json");
    replace(
        &routes_path,
        &routes(&fake, json!({"f.test": "fake"}), json!({"starttls": "on"})),
    );
    let [imap, health] = free_ports();
    let yaml = format!(
        "listeners:\n  - {{protocol: imap, address: '127.0.0.1:{imap}'}}\n\
         routeTable: {{file: '{}'}}\nhealthListen: '127.0.0.1:{health}'\n\
         shutdownGraceSeconds: 0\n",
        routes_path.display()
    );
    let (stop, running) = serve_yaml(&yaml).await;
    drop(Client::logged_in(imap, "u@f.test").await);

    replace(
        &routes_path,
        &routes(
            &fake,
            json!({"f.test": "fake"}),
            json!({"starttls": "only"}),
        ),
    );
    eventually("the `only` table", Duration::from_secs(10), async || {
        let mut client = Client::connect(imap)
            .await
            .map_err(|error| error.to_string())?;
        let greeting = client.line().await.ok_or("no greeting")?;
        if !greeting.contains("LOGINDISABLED") {
            return Err(greeting);
        }
        assert!(!greeting.contains("STARTTLS"), "{greeting}");
        client.send("a LOGIN u@f.test pw\r\n").await;
        assert_eq!(
            client.line().await.as_deref(),
            Some("a NO cleartext logins disabled"),
            "a cleartext login under `only`"
        );
        Ok(())
    })
    .await;

    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

/// ALPACA: a browser pointed at a mail port offers only HTTP in ALPN and must get no TLS
/// session to send its request in, on IMAPS as after STARTTLS; mail clients, which offer `imap`
/// or no ALPN at all, are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_tls_refuses_clients_offering_only_other_protocols() {
    let fake = FakeImap::start().await;
    let pki = Pki::new();
    let ca = pki.ca();
    let setup = setup(
        &pki,
        &routes(&fake, json!({"f.test": "fake"}), json!({})),
        0,
    );
    let server = Server::bind(&setup.config, options()).await.unwrap();
    let (stop, running) = serve_until_stopped(server);
    let localhost = || rustls::pki_types::ServerName::try_from("localhost").unwrap();

    for alpn in [&[&b"http/1.1"[..]][..], &[b"h2", b"http/1.1"], &[b"pop3"]] {
        let tcp = TcpStream::connect(("127.0.0.1", setup.imaps))
            .await
            .unwrap();
        let error = tls_connector(&ca, alpn)
            .connect(localhost(), tcp)
            .await
            .expect_err("no handshake for another protocol");
        assert!(
            error.to_string().contains("NoApplicationProtocol"),
            "{error}"
        );
    }

    for (alpn, chosen) in [
        (&[][..], None),
        (&[&b"imap"[..]][..], Some(&b"imap"[..])),
        (&[b"h2", b"imap"], Some(b"imap")),
    ] {
        let tcp = TcpStream::connect(("127.0.0.1", setup.imaps))
            .await
            .unwrap();
        let tls = tls_connector(&ca, alpn)
            .connect(localhost(), tcp)
            .await
            .expect("a mail client's handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), chosen);
        let mut greeting = String::new();
        BufReader::new(tls).read_line(&mut greeting).await.unwrap();
        assert!(greeting.starts_with("* OK"), "{greeting}");
    }

    let starttls = async |alpn: &[&[u8]]| {
        let mut client = Client::connect(setup.imap).await.unwrap();
        assert!(client.line().await.unwrap().contains("STARTTLS"));
        client.send("s STARTTLS\r\n").await;
        assert_eq!(
            client.line().await.as_deref(),
            Some("s OK Begin TLS negotiation now")
        );
        tls_connector(&ca, alpn)
            .connect(localhost(), client.reader.into_inner())
            .await
    };
    let error = starttls(&[b"http/1.1"])
        .await
        .expect_err("no STARTTLS for HTTP");
    assert!(
        error.to_string().contains("NoApplicationProtocol"),
        "{error}"
    );
    let tls = starttls(&[b"imap"]).await.expect("STARTTLS for IMAP");
    let mut client = BufReader::new(tls);
    client
        .get_mut()
        .write_all(b"a LOGIN u@f.test pw\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    client.read_line(&mut answer).await.unwrap();
    assert_eq!(answer, "a OK done\r\n");

    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

/// A backend that says more than OK to a login: an ALERT, its new capabilities, an answer to
/// the proxy's ID among them, and more lines than the proxy passes on.
async fn talkative_imap() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let greeting = "* OK [CAPABILITY IMAP4rev1 LITERAL+ ID AUTH=PLAIN] ready\r\n";
                write.write_all(greeting.as_bytes()).await.unwrap();
                let mut in_login = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let tag = line.split(' ').next().unwrap_or("*").to_string();
                    let answer = if line.contains(" ID (") {
                        format!("* ID (\"name\" \"talkative\")\r\n{tag} OK ID done\r\n")
                    } else if line.ends_with("+}") {
                        in_login |= line.contains(" LOGIN ");
                        continue;
                    } else if std::mem::take(&mut in_login) {
                        let mut answer = "* OK [ALERT] Your password expires in 3 days\r\n\
                                          * ID NIL\r\n\
                                          * CAPABILITY IMAP4rev1 IDLE\r\n"
                            .to_string();
                        for n in 0..30 {
                            answer.push_str(&format!("* OK noise {n}\r\n"));
                        }
                        answer + "P2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
                    } else {
                        format!("{tag} OK done\r\n")
                    };
                    if write.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_backend_says_during_the_login_reaches_the_client_bounded() {
    let (backend, task) = talkative_imap().await;
    let pki = Pki::new();
    let setup = setup(
        &pki,
        &routes_to(backend, json!({"f.test": "fake"}), json!({})),
        0,
    );
    let server = Server::bind(&setup.config, options()).await.unwrap();
    let (stop, running) = serve_until_stopped(server);

    let mut client = Client::connect(setup.imap).await.unwrap();
    assert!(client.line().await.unwrap().starts_with("* OK"));
    client.send("a LOGIN u@f.test pw\r\nb NOOP\r\n").await;
    let mut expected = vec![
        "* OK [ALERT] Your password expires in 3 days".to_string(),
        "* CAPABILITY IMAP4rev1 IDLE".to_string(),
    ];
    expected.extend((0..14).map(|n| format!("* OK noise {n}")));
    expected.push("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in".to_string());
    expected.push("b OK done".to_string());
    let mut answers = Vec::new();
    while let Some(line) = client.line().await {
        let done = line == "b OK done";
        answers.push(line);
        if done {
            break;
        }
    }
    assert_eq!(answers, expected);

    stop.send(()).unwrap();
    drop(client);
    running.await.unwrap().unwrap();
    task.abort();
}

/// A backend that answers OK to everything and hands over each `ID` line it receives.
async fn id_recording_imap() -> (
    u16,
    tokio::sync::mpsc::UnboundedReceiver<String>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (ids, received) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let ids = ids.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let greeting = "* OK [CAPABILITY IMAP4rev1 LITERAL+ ID] ready\r\n";
                write.write_all(greeting.as_bytes()).await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains(" ID (") {
                        let _ = ids.send(line.clone());
                    }
                    let tag = line.split(' ').next().unwrap_or("*");
                    let answer = format!("{tag} OK done\r\n");
                    if write.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, received, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_balancers_proxy_protocol_header_gives_the_clients_address() {
    let (backend, mut ids, task) = id_recording_imap().await;
    let dir = tempfile::tempdir().unwrap();
    let routes_path = dir.path().join("routes.json");
    replace(
        &routes_path,
        &routes_to(backend, json!({"f.test": "fake"}), json!({})),
    );
    let [behind, direct, health] = free_ports();
    let yaml = format!(
        "listeners:\n  - {{protocol: imap, address: '127.0.0.1:{behind}', proxyProtocol: true}}\n  \
         - {{protocol: imap, address: '127.0.0.1:{direct}'}}\n\
         proxyProtocol: {{trustedNetworks: [127.0.0.0/8], headerTimeoutSeconds: 5}}\n\
         routeTable: {{file: '{}'}}\nhealthListen: '127.0.0.1:{health}'\n\
         shutdownGraceSeconds: 0\n",
        routes_path.display()
    );
    let (stop, running) = serve_yaml(&yaml).await;

    // Behind the load balancer: the header names the client; the mailbox server hears of it.
    for header in [
        b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 143\r\n".to_vec(),
        [
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".as_slice(),
            &[198, 51, 100, 7, 192, 0, 2, 1, 0x9c, 0x40, 0, 143],
        ]
        .concat(),
    ] {
        let mut client = Client::connect(behind).await.unwrap();
        client
            .reader
            .get_mut()
            .write_all(&header)
            .await
            .expect("send the header");
        assert!(client.line().await.unwrap().starts_with("* OK"));
        client.send("a LOGIN u@f.test pw\r\n").await;
        assert_eq!(client.line().await.as_deref(), Some("a OK done"));
        let id = ids.recv().await.unwrap();
        let claimed = if header.starts_with(b"PROXY") {
            "203.0.113.9"
        } else {
            "198.51.100.7"
        };
        assert!(
            id.contains(&format!("\"X-ORIGINATING-IP\" \"{claimed}\"")),
            "{id}"
        );
    }

    // Without a header that listener serves nothing; the other one is unaffected, and a
    // header sent to it is a bad command, not an address.
    let mut client = Client::connect(behind).await.unwrap();
    client.send("a LOGIN u@f.test pw\r\n").await;
    assert_eq!(client.line().await, None);
    let metrics = http_get(health, "/metrics").unwrap();
    assert!(
        metrics.contains(
            "mailproxy_proxy_protocol_refused_total{listener=\"imap\",reason=\"invalid\"} 1\n"
        ),
        "{metrics}"
    );
    let mut client = Client::connect(direct).await.unwrap();
    assert!(client.line().await.unwrap().starts_with("* OK"));
    client
        .send("PROXY TCP4 203.0.113.9 192.0.2.1 40000 143\r\n")
        .await;
    assert!(client.line().await.unwrap().contains("BAD"));
    client.send("a LOGIN u@f.test pw\r\n").await;
    assert_eq!(client.line().await.as_deref(), Some("a OK done"));
    let id = ids.recv().await.unwrap();
    assert!(id.contains("\"X-ORIGINATING-IP\" \"127.0.0.1\""), "{id}");

    // A connection still owing its header does not hold the shutdown up once sessions close
    // (without the race on closing: its header timeout, or the 5 s the drain waits at most).
    let silent = TcpStream::connect(("127.0.0.1", behind)).await.unwrap();
    // Accepted in order: once a later connection is served, this one has been taken.
    let mut later = Client::connect(behind).await.unwrap();
    later
        .send("PROXY TCP4 203.0.113.9 192.0.2.1 40000 143\r\n")
        .await;
    assert!(later.line().await.unwrap().starts_with("* OK"));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), running)
        .await
        .expect("the proxy stops without waiting for the header")
        .unwrap()
        .unwrap();
    drop(silent);
    task.abort();
}

#[tokio::test]
async fn http_listeners_are_accepted() {
    // Web listeners are served (proxy/tests/http_*.rs); this configuration fails only on its
    // missing route table.
    let yaml =
        "listeners: [{protocol: http, address: '127.0.0.1:1'}]\nrouteTable: {file: /nonexistent}\n";
    let config = ProxyConfig::parse(yaml, Path::new("test.yaml")).unwrap();
    let error = format!(
        "{:#}",
        Server::bind(&config, ServeOptions::default())
            .await
            .err()
            .expect("the route table is missing")
    );
    assert!(!error.contains("not implemented"), "{error}");
    assert!(error.contains("route table"), "{error}");
}

#[test]
fn the_standalone_example_is_a_valid_configuration() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/standalone");
    let config = ProxyConfig::from_file(&root.join("config.yaml")).unwrap();
    assert_eq!(config.listeners.len(), 4);
    let routes = std::fs::read_to_string(root.join("routes.json")).unwrap();
    let table = mailproxy_crds::route_table::RouteTable::from_json(&routes).unwrap();
    assert_eq!(table.pinned_domain("example.org").unwrap().0, "mbs2");
}
