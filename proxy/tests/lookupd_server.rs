//! `mailproxy lookupd` as a real server: routing from the directory and the route table, reloads,
//! the shared secret, stock nginx's requests, and https.

mod lookup_support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lookup_support::{DIRECTORY, Files, RunningLookupd, TABLE, eventually, login};
use mailproxy::lookupd::{Lookupd, LookupdError, LookupdTls, RequestOutcome};
use mailproxy::route::lookup::{
    AuthMethod, HandlerFailure, LookupClient, LookupClientConfig, LookupError, LookupOutcome,
    parse_response_head,
};
use mailproxy::route::{Protocol, Route, Upstream};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn client_for(url: String, secret: Option<&str>) -> LookupClient {
    LookupClient::new(LookupClientConfig {
        handlers: vec![url.parse().unwrap()],
        timeout: Duration::from_secs(5),
        secret: secret.map(str::to_string),
        system_roots: false,
        ..LookupClientConfig::default()
    })
    .unwrap()
}

fn found(port: u16, account: Option<&str>, cache_alias: bool) -> LookupOutcome {
    LookupOutcome::Found {
        route: Route {
            upstream: Upstream::new("127.0.0.1", port),
            account: account.map(str::to_string),
        },
        cache_alias,
    }
}

fn refused() -> LookupOutcome {
    LookupOutcome::Refused {
        message: "login failed".to_string(),
        wait: Duration::from_secs(10),
    }
}

fn draining(server: &str) -> LookupOutcome {
    LookupOutcome::Draining {
        server: server.to_string(),
    }
}

async fn ask(client: &LookupClient, user: &str, protocol: Protocol) -> LookupOutcome {
    client
        .lookup(&login(user, protocol), AuthMethod::Username)
        .await
        .unwrap()
}

/// Sends raw bytes and reads the answer until the server closes.
async fn raw(addr: SocketAddr, request: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("lookupd closes an HTTP/1.0 exchange")
        .unwrap();
    answer
}

fn nginx_request(headers: &[(&str, &str)]) -> String {
    let mut request = "GET /auth HTTP/1.0\r\nHost: localhost\r\n".to_string();
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

fn status_of(answer: &[u8]) -> &str {
    std::str::from_utf8(&answer[..answer.len().min(12)]).unwrap()
}

#[tokio::test]
async fn routes_from_directory_aliases_default_domain_and_table_pins() {
    let files = Files::new(TABLE, DIRECTORY);
    let lookupd = RunningLookupd::start(files.config()).await;
    let client = client_for(lookupd.url(), None);

    // Directory accounts, qualified with the default domain; Auth-User only when rewritten.
    assert_alice_found(&client).await;
    assert_eq!(
        ask(&client, "alice@example.com", Protocol::ImapSsl).await,
        found(1993, None, true)
    );
    assert_eq!(
        ask(&client, "AL@Example.com", Protocol::Pop3).await,
        found(1110, Some("alice@example.com"), true)
    );
    // mbs-2's host is `localhost`: answered as an IP address, IPv4 first.
    assert_eq!(
        ask(&client, "bob", Protocol::Imap).await,
        found(2143, Some("bob@example.com"), true)
    );
    // The table's pinned account wins over the directory (which says mbs-1).
    assert_eq!(
        ask(&client, "pinned", Protocol::Pop3).await,
        found(2110, Some("pinned@example.com"), true)
    );
    // The table's domain entry catches accounts nobody lists.
    assert_eq!(
        ask(&client, "carol@example.org", Protocol::Imap).await,
        found(2143, None, false)
    );
    // A draining server gets no new routes (and the refusal says why); unknown accounts are
    // refused with Zimbra's wait.
    assert_eq!(
        ask(&client, "leaving", Protocol::Imap).await,
        draining("old")
    );
    assert_eq!(ask(&client, "nobody", Protocol::Imap).await, refused());
    assert_eq!(
        client
            .lookup(&login("6a3c-id", Protocol::Http), AuthMethod::ZimbraId)
            .await
            .unwrap(),
        refused(),
        "no id map: zimbraId lookups are refused, not errors"
    );
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Found), 6);
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Refused), 2);
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Draining), 1);
    lookupd.stop().await;
}

/// A short name is qualified by the domain of the proxy address or web host it reached
/// (`X-Proxy-IP`, `X-Proxy-Host`), as Zimbra does by the domain's virtual IPs and host names.
#[tokio::test]
async fn short_names_take_the_domain_of_the_address_or_host_they_reached() {
    let directory = format!(
        "{DIRECTORY}account john mbs-1\naccount john@other.org mbs-2\n\
         domain-ip 10.1.2.4 other.org\ndomain-vhost mail.other.org other.org\n"
    );
    let files = Files::new(TABLE, &directory);
    let lookupd = RunningLookupd::start(files.config()).await;
    let client = client_for(lookupd.url(), None);
    let ask_as = |proxy_ip: [u8; 4], vhost: Option<&str>| {
        let mut john = login("john", Protocol::Imap);
        john.proxy_ip = Some(proxy_ip.into());
        john.virtual_host = vhost.map(str::to_string);
        let client = &client;
        async move { client.lookup(&john, AuthMethod::Username).await.unwrap() }
    };
    assert_eq!(
        ask_as([10, 1, 2, 4], None).await,
        found(2143, Some("john@other.org"), false)
    );
    assert_eq!(
        ask_as([10, 1, 2, 3], Some("Mail.Other.org:443")).await,
        found(2143, Some("john@other.org"), false)
    );
    assert_eq!(
        ask_as([10, 1, 2, 3], None).await,
        found(1143, Some("john@example.com"), true),
        "elsewhere, the default domain"
    );
    // A proxy caches a web login's alias by host name alone; this default came from the
    // address, and the same host reached at 10.1.2.4 means other.org: not cacheable.
    assert_eq!(
        ask_as([10, 1, 2, 3], Some("webmail.other.org")).await,
        found(1143, Some("john@example.com"), false)
    );
    // The same for a host name in UTF-8, which a proxy passes on from HTTP/1.1.
    assert_eq!(
        ask_as([10, 1, 2, 3], Some("wébmail.other.org")).await,
        found(1143, Some("john@example.com"), false)
    );
}

/// A server lookupd cannot give an address for holds the account all the same: the answer is a
/// 200 that names it, which a proxy takes as "temporarily unavailable", not as a broken handler
/// (marked down) or an unknown account (sent to the domain's server).
#[tokio::test]
async fn an_unreachable_server_makes_its_accounts_unavailable_not_unknown() {
    let table = TABLE.replace(
        r#""old":"#,
        r#""lost": {"host": "no-such-host.invalid"}, "old":"#,
    );
    let directory =
        format!("{DIRECTORY}account carol@example.org lost\naccount dave@example.org mbs-x\n");
    let files = Files::new(&table, &directory);
    let lookupd = RunningLookupd::start(files.config()).await;
    let client = client_for(lookupd.url(), None);
    // example.org's domain entry is mbs-2, where neither mailbox is.
    assert_eq!(
        ask(&client, "carol@example.org", Protocol::Imap).await,
        draining("lost")
    );
    assert_eq!(
        ask(&client, "dave@example.org", Protocol::Imap).await,
        draining("mbs-x")
    );
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Unavailable), 2);
    assert!(client.handlers()[0].down_for.is_none());
    lookupd.stop().await;
}

#[tokio::test]
async fn reloads_changed_files_and_keeps_serving_on_bad_ones() {
    let files = Files::new(TABLE, DIRECTORY);
    let lookupd = RunningLookupd::start(files.config()).await;
    let mut registry = Registry::default();
    lookupd.lookupd.register(&mut registry);
    let client = client_for(lookupd.url(), None);
    assert_alice_found(&client).await;

    // alice moves to mbs-2.
    files.write_directory(&DIRECTORY.replace("account alice mbs-1", "account alice mbs-2"));
    eventually(
        "alice routed to mbs-2",
        Duration::from_secs(10),
        async || {
            (ask(&client, "alice", Protocol::Imap).await
                == found(2143, Some("alice@example.com"), true))
            .then_some(())
        },
    )
    .await;

    // mbs-2 starts draining: alice gets no new route.
    files.write_table(&TABLE.replace(
        r#""host": "localhost","#,
        r#""host": "localhost", "draining": true,"#,
    ));
    eventually("mbs-2 draining", Duration::from_secs(10), async || {
        (ask(&client, "alice", Protocol::Imap).await == draining("mbs-2")).then_some(())
    })
    .await;

    // Broken files are logged and counted; the last good content keeps serving.
    files.write_directory("account only-two-words\n");
    files.write_table("{ not json");
    let errors = |file: &str| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series =
            format!("mailproxy_lookupd_reloads_total{{file=\"{file}\",result=\"error\"}} 1");
        text.contains(&series).then_some(())
    };
    eventually(
        "bad directory counted",
        Duration::from_secs(10),
        async || errors("directory"),
    )
    .await;
    eventually("bad table counted", Duration::from_secs(10), async || {
        errors("route_table")
    })
    .await;
    assert_eq!(
        ask(&client, "alice", Protocol::Imap).await,
        draining("mbs-2")
    );
    assert_eq!(
        ask(&client, "carol@example.org", Protocol::Imap).await,
        refused(),
        "the draining table is still the one in force"
    );

    // Fixed files are picked up again.
    files.write_table(TABLE);
    files.write_directory(DIRECTORY);
    eventually("alice back on mbs-1", Duration::from_secs(10), async || {
        (ask(&client, "alice", Protocol::Imap).await
            == found(1143, Some("alice@example.com"), true))
        .then_some(())
    })
    .await;
    lookupd.stop().await;
}

#[tokio::test]
async fn shared_secret_is_required_when_configured() {
    let files = Files::new(TABLE, DIRECTORY);
    let mut config = files.config();
    config.secret_file = Some(files.write_secret("s3cret\n"));
    let lookupd = RunningLookupd::start(config).await;
    for secret in [None, Some("wrong"), Some("s3cret-but-longer")] {
        assert_forbidden(&client_for(lookupd.url(), secret)).await;
    }
    assert_alice_found(&client_for(lookupd.url(), Some("s3cret"))).await;
    // A rotated secret: the same client sends the new one from then on.
    let rotated = client_for(lookupd.url(), Some("before-rotation"));
    assert!(
        rotated
            .lookup(&login("alice", Protocol::Imap), AuthMethod::Username)
            .await
            .is_err()
    );
    rotated.replace_secret("s3cret").unwrap();
    assert_alice_found(&rotated).await;
    // A secret that cannot be a header value is refused and the previous one stays.
    assert!(rotated.replace_secret("line\nbreak").is_err());
    assert_alice_found(&rotated).await;
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Forbidden), 4);
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Found), 3);
}

/// The lookup fails on lookupd's 403 (whether the client then tries other handlers is its own
/// business).
async fn assert_forbidden(client: &LookupClient) {
    let error = client
        .lookup(&login("alice", Protocol::Imap), AuthMethod::Username)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("HTTP 403"), "{error}");
}

/// lookupd routes alice, a directory account, to her server.
async fn assert_alice_found(client: &LookupClient) {
    assert_eq!(
        ask(client, "alice", Protocol::Imap).await,
        found(1143, Some("alice@example.com"), true)
    );
}

/// Whether `registry` shows `series` (a metric line, value included).
fn shows(registry: &Registry, series: &str) -> Option<()> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.contains(series).then_some(())
}

#[tokio::test]
async fn an_empty_secret_file_is_refused_at_start_and_on_reload() {
    let files = Files::new(TABLE, DIRECTORY);
    for empty in ["", " \n\t\n"] {
        let mut config = files.config();
        let path = files.write_secret(empty);
        config.secret_file = Some(path.clone());
        let error = Lookupd::new(config).unwrap_err();
        assert!(matches!(error, LookupdError::EmptySecret { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains("--secret-file"),
            "{message}"
        );
    }

    let mut config = files.config();
    config.secret_file = Some(files.write_secret("s3cret"));
    let lookupd = RunningLookupd::start(config).await;
    let mut registry = Registry::default();
    lookupd.lookupd.register(&mut registry);
    files.write_secret("\n");
    eventually(
        "the empty secret refused",
        Duration::from_secs(10),
        async || {
            shows(
                &registry,
                "mailproxy_lookupd_reloads_total{file=\"secret\",result=\"error\"} 1",
            )
        },
    )
    .await;
    // The check stays on, with the secret in force before.
    assert_forbidden(&client_for(lookupd.url(), None)).await;
    assert_alice_found(&client_for(lookupd.url(), Some("s3cret"))).await;
    lookupd.stop().await;
}

/// Collects what lookupd logs, to check that the password nginx sends never shows.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, from a global subscriber: a thread-scoped one races
/// with tracing's per-callsite interest cache when other tests log from other threads.
fn captured_logs() -> &'static Captured {
    static CAPTURE: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
        captured
    })
}

#[tokio::test]
async fn answers_stock_nginx_auth_http_requests_without_logging_the_password() {
    let captured = captured_logs();

    let files = Files::new(TABLE, DIRECTORY);
    let lookupd = RunningLookupd::start(files.config()).await;
    let password = "Hunter2-not-for-logs";
    let nginx = |user: &'static str, method: &'static str, protocol: &'static str| {
        nginx_request(&[
            ("Auth-Method", method),
            ("Auth-User", user),
            ("Auth-Pass", password),
            ("Auth-Protocol", protocol),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "198.51.100.9"),
            ("Client-Host", "[UNAVAILABLE]"),
        ])
    };

    let answer = raw(lookupd.addr, &nginx("Alice", "plain", "imap")).await;
    assert_eq!(
        parse_response_head(&answer),
        Ok(found(1143, Some("alice@example.com"), true))
    );
    let answer = raw(lookupd.addr, &nginx("bob", "login", "pop3")).await;
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(
        text.contains("auth-server: 127.0.0.1\r\n"),
        "nginx needs an IP: {text}"
    );
    assert_eq!(
        parse_response_head(&answer),
        Ok(found(2110, Some("bob@example.com"), true))
    );
    let answer = raw(lookupd.addr, &nginx("a%20lice", "plain", "imap")).await;
    assert_eq!(parse_response_head(&answer), Ok(refused()));
    let answer = raw(lookupd.addr, &nginx("alice", "cram-md5", "imap")).await;
    assert_eq!(
        parse_response_head(&answer),
        Ok(refused()),
        "no Auth-Pass to give back"
    );

    // A login lookupd cannot route is refused like any unknown account, as Zimbra's servlet
    // refuses it: the lookup protocol answers 200 about every login.
    for request in [
        nginx("alice", "plain", "smtp"),
        nginx("%ff", "plain", "imap"),
        nginx("", "plain", "imap"),
    ] {
        let answer = raw(lookupd.addr, &request).await;
        assert_eq!(parse_response_head(&answer), Ok(refused()), "{request:?}");
    }
    // Only what is no lookup request at all gets another status.
    for request in [
        nginx_request(&[("Auth-Method", "plain"), ("Auth-Protocol", "imap")]),
        nginx_request(&[("Auth-User", "alice"), ("Auth-Protocol", "imap")]),
        nginx_request(&[("Auth-Method", "plain"), ("Auth-User", "alice")]),
    ] {
        let answer = raw(lookupd.addr, &request).await;
        assert_eq!(status_of(&answer), "HTTP/1.0 400", "{request:?}");
    }
    let answer = raw(lookupd.addr, "POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(status_of(&answer), "HTTP/1.0 405");
    let answer = raw(lookupd.addr, "this is not HTTP\r\n\r\n").await;
    assert_eq!(status_of(&answer), "HTTP/1.1 400");

    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Found), 2);
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Refused), 5);
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::BadRequest), 4);
    lookupd.stop().await;

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logs.contains("lookup routed"), "the capture works: {logs}");
    assert!(
        logs.contains("198.51.100.9"),
        "the client's address is logged: {logs}"
    );
    assert!(
        !logs.contains(password),
        "the password leaked into the log: {logs}"
    );
}

#[tokio::test]
async fn serves_https_to_clients_that_trust_its_ca() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mailproxy test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();

    let files = Files::new(TABLE, DIRECTORY);
    let pem_dir = tempfile::tempdir().unwrap();
    let (chain, private_key) = (
        pem_dir.path().join("tls.crt"),
        pem_dir.path().join("tls.key"),
    );
    std::fs::write(&chain, certificate.pem()).unwrap();
    std::fs::write(&private_key, key.serialize_pem()).unwrap();
    let mut config = files.config();
    config.tls = Some(LookupdTls {
        certificate_chain: chain,
        private_key,
    });
    let lookupd = RunningLookupd::start(config).await;
    let url = lookupd.url().replace("http://", "https://");

    let trusting = LookupClient::new(LookupClientConfig {
        handlers: vec![url.parse().unwrap()],
        extra_roots: mailproxy::route::lookup::certificates_from_pem(ca.pem().as_bytes()).unwrap(),
        system_roots: false,
        ..LookupClientConfig::default()
    })
    .unwrap();
    for _ in 0..3 {
        assert_alice_found(&trusting).await;
    }

    let untrusting = LookupClient::new(LookupClientConfig {
        handlers: vec![url.parse().unwrap()],
        ..LookupClientConfig::default()
    })
    .unwrap();
    let error = untrusting
        .lookup(&login("alice", Protocol::Imap), AuthMethod::Username)
        .await
        .unwrap_err();
    let LookupError::AllHandlersFailed { attempts } = &error else {
        panic!("{error}");
    };
    let HandlerFailure::Connect(reason) = &attempts[0].failure else {
        panic!("{error}");
    };
    assert!(reason.contains("certificate"), "{reason}");
    assert_eq!(lookupd.lookupd.requests(RequestOutcome::Found), 3);
}

/// A rotation: lookupd follows its secret file and accepts the previous secret for the overlap,
/// so proxies that have not seen the new secret yet are not refused; after the overlap they are.
#[tokio::test]
async fn a_rotated_secret_is_followed_with_an_overlap_for_the_previous_one() {
    let files = Files::new(TABLE, DIRECTORY);
    for (overlap, previous_still_accepted) in
        [(Duration::from_secs(300), true), (Duration::ZERO, false)]
    {
        let mut config = files.config();
        config.secret_file = Some(files.write_secret("first"));
        config.secret_overlap = overlap;
        let lookupd = RunningLookupd::start(config).await;
        let alice = login("alice", Protocol::Imap);
        let answers = |secret: &'static str| {
            let client = client_for(lookupd.url(), Some(secret));
            let alice = alice.clone();
            async move { client.lookup(&alice, AuthMethod::Username).await.is_ok() }
        };
        let mut registry = Registry::default();
        lookupd.lookupd.register(&mut registry);
        assert!(answers("first").await);
        files.write_secret("second");
        eventually(
            "the new secret accepted",
            Duration::from_secs(10),
            async || answers("second").await.then_some(()),
        )
        .await;
        // The kubelet swaps the file again when another key of the Secret changes: the same
        // secret, a new file, and the overlap of the one before must go on.
        files.write_secret("second");
        eventually(
            "the same secret reloaded",
            Duration::from_secs(10),
            async || {
                shows(
                    &registry,
                    "mailproxy_lookupd_reloads_total{file=\"secret\",result=\"ok\"} 2",
                )
            },
        )
        .await;
        assert_eq!(
            answers("first").await,
            previous_still_accepted,
            "overlap {overlap:?}"
        );
        assert!(!answers("third").await);
    }
}
