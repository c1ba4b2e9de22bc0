//! `mailproxy serve` end to end, run as the built binary: real clients (Python's imaplib and
//! poplib), real Dovecot backends, real memcached, and hostile clients.

mod lookup_support;
mod session_support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use lookup_support::{Files, RunningLookupd};
use mailproxy::route::Protocol;
use mailproxy::route::cache::{RouteCache, RouteCacheConfig};
use mailproxy_testkit::{Dovecot, DovecotOptions, Memcached};
use serde_json::json;
use session_support::{
    CLIENT_IP, ClientRun, HTTP_MAX_HEADER_BYTES, Pki, ProxyProcess, Raw, python,
};

/// Every user of backend A logs in with this password, every user of B with the other: a
/// login that succeeds proves which backend the route chose.
const ALPHA: &str = "alpha-Pw-4711";
const BRAVO: &str = "bravo-Pw-0815";

struct Backends {
    pki: Pki,
    memcached: Memcached,
    a: Dovecot,
    b: Dovecot,
}

fn backends() -> Backends {
    let pki = Pki::new();
    let a = Dovecot::start_with(DovecotOptions {
        password: ALPHA.into(),
        tls: None,
    })
    .expect("dovecot A");
    let b = Dovecot::start_with(DovecotOptions {
        password: BRAVO.into(),
        tls: Some((pki.cert(), pki.key())),
    })
    .expect("dovecot B");
    Backends {
        pki,
        memcached: Memcached::start().expect("memcached"),
        a,
        b,
    }
}

/// Domain `a.test` on A (plain, ID/XOIP), `b.test` on B over TLS, `c.test` on B's PROXY
/// protocol listeners with the backend's error text passed through.
fn routes(backends: &Backends, settings: serde_json::Value, handlers: &[String]) -> String {
    let a = backends.a.ports();
    let b = backends.b.ports();
    json!({
        "servers": {
            "mbs-a": {"host": "127.0.0.1", "ports": {"imap": a.imap, "pop3": a.pop3}},
            "mbs-b": {
                "host": "127.0.0.1",
                "ports": {"imap": b.imap, "pop3": b.pop3, "imaps": b.imaps, "pop3s": b.pop3s},
                "mailUpstream": {"tls": true}
            },
            "mbs-c": {
                "host": "127.0.0.1",
                "ports": {"imap": b.imap_haproxy, "pop3": b.pop3_haproxy},
                "mailUpstream": {"origin": "proxyProtocol", "passErrors": true}
            }
        },
        "domains": {"a.test": "mbs-a", "b.test": "mbs-b", "c.test": "mbs-c"},
        "lookupHandlers": handlers,
        "memcachedServers": [backends.memcached.addr()],
        "settings": settings,
    })
    .to_string()
}

async fn client(
    proxy: &ProxyProcess,
    pki: &Pki,
    mode: &str,
    user: &str,
    password: &str,
    extra: &[&str],
) -> ClientRun {
    let listener = match mode {
        "imap" | "imap-starttls" => "imap",
        "pop3" | "pop3-stls" => "pop3",
        other => other,
    };
    let port = proxy.port(listener).to_string();
    let ca = pki.ca().display().to_string();
    let mut args = vec![
        mode,
        "--port",
        &port,
        "--source",
        CLIENT_IP,
        "--cafile",
        &ca,
        "--user",
        user,
        "--password",
        password,
    ];
    args.extend_from_slice(extra);
    python(&args).await
}

fn assert_ok(run: &ClientRun, what: &str) {
    assert!(run.success, "{what}: {run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_log_in_through_every_listener_to_the_routed_backend() {
    let backends = backends();
    let pki = &backends.pki;
    let mut proxy = ProxyProcess::start(&routes(&backends, json!({}), &[]), pki, "trace");

    let (imap, imaps, starttls) = tokio::join!(
        client(
            &proxy,
            pki,
            "imap",
            "alice@a.test",
            ALPHA,
            &["--append", "imap to A"]
        ),
        client(
            &proxy,
            pki,
            "imaps",
            "bob@b.test",
            BRAVO,
            &["--append", "imaps to B over TLS"]
        ),
        client(
            &proxy,
            pki,
            "imap-starttls",
            "carol@c.test",
            BRAVO,
            &["--append", "starttls to B with PROXY"]
        ),
    );
    assert_ok(&imap, "IMAP to A");
    assert_ok(&imaps, "IMAPS to B (TLS upstream)");
    assert_ok(&starttls, "IMAP STARTTLS to B (PROXY protocol)");
    assert!(imap.stdout.contains("FOUND Subject: imap to A"), "{imap:?}");

    let (pop3, pop3s, stls) = tokio::join!(
        client(
            &proxy,
            pki,
            "pop3",
            "alice@a.test",
            ALPHA,
            &["--expect", "imap to A"]
        ),
        client(
            &proxy,
            pki,
            "pop3s",
            "bob@b.test",
            BRAVO,
            &["--expect", "imaps to B over TLS"]
        ),
        client(
            &proxy,
            pki,
            "pop3-stls",
            "carol@c.test",
            BRAVO,
            &["--expect", "starttls to B with PROXY"]
        ),
    );
    assert_ok(&pop3, "POP3 to A");
    assert_ok(&pop3s, "POP3S to B (TLS upstream)");
    assert_ok(&stls, "POP3 STLS to B (PROXY protocol)");

    // The route decides the backend: B does not know A's password.
    let wrong_backend = client(
        &proxy,
        pki,
        "imap",
        "bob@b.test",
        ALPHA,
        &["--expect-failure"],
    )
    .await;
    assert_ok(&wrong_backend, "A's password on B");
    assert!(
        wrong_backend.stdout.contains("LOGIN failed"),
        "{wrong_backend:?}"
    );
    // mbs-c passes the backend's own error text through.
    let passed = client(
        &proxy,
        pki,
        "pop3",
        "carol@c.test",
        "nope",
        &["--expect-failure"],
    )
    .await;
    assert_ok(&passed, "wrong password on mbs-c");
    assert!(passed.stdout.contains("[AUTH]"), "{passed:?}");

    // The mailbox servers saw the client's address (127.0.0.7), not the proxy's: through ID
    // and XOIP on A, ID over TLS on B, and the PROXY header on B's haproxy listeners.
    let a_log = backends.a.log();
    let b_log = backends.b.log();
    for (log, service, user) in [
        (&a_log, "imap-login", "alice@a.test"),
        (&a_log, "pop3-login", "alice@a.test"),
        (&b_log, "imap-login", "bob@b.test"),
        (&b_log, "pop3-login", "bob@b.test"),
        (&b_log, "imap-login", "carol@c.test"),
        (&b_log, "pop3-login", "carol@c.test"),
    ] {
        let line = log
            .lines()
            .find(|line| {
                line.contains(service)
                    && line.contains(&format!("user=<{user}>"))
                    && line.contains("Login")
            })
            .unwrap_or_else(|| panic!("no {service} login of {user} in:\n{log}"));
        assert!(line.contains(&format!("rip={CLIENT_IP}")), "{line}");
    }
    let bob = b_log
        .lines()
        .find(|line| {
            line.contains("imap-login")
                && line.contains("user=<bob@b.test>")
                && line.contains("Login")
        })
        .unwrap();
    assert!(
        bob.contains("TLS"),
        "the upstream connection to B is TLS: {bob}"
    );

    let metrics = proxy.metrics();
    for protocol in ["imap", "imaps", "pop3", "pop3s"] {
        assert!(
            metrics.contains(&format!(
                "mailproxy_sessions_total{{protocol=\"{protocol}\",outcome=\"relayed\"}}"
            )),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains("mailproxy_login_duration_seconds_count"),
        "{metrics}"
    );

    assert!(proxy.terminate().success());
    let log = proxy.stderr();
    assert!(log.contains("session ended"), "{log}");
    assert!(log.contains("outcome=\"login_failed\""), "{log}");
    // The log scan: at trace level, no password of any login appears anywhere, in clear or
    // in the SASL PLAIN encodings a client or the proxy may use.
    let mut secrets = vec![ALPHA.to_string(), BRAVO.to_string(), "nope".to_string()];
    for (user, password) in [
        ("alice@a.test", ALPHA),
        ("bob@b.test", BRAVO),
        ("carol@c.test", BRAVO),
    ] {
        let plain = format!("\0{user}\0{password}");
        secrets.push(base64::engine::general_purpose::STANDARD.encode(plain));
        secrets.push(base64::engine::general_purpose::STANDARD.encode(password));
    }
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a password leaked into the proxy's log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_gets_no_and_purges_the_cached_route() {
    let backends = backends();
    let pki = &backends.pki;
    let files = Files::new(
        &routes(&backends, json!({}), &[]),
        "account dave@l.test mbs-a\naccount erin@l.test mbs-b\n",
    );
    let lookupd = RunningLookupd::start(files.config()).await;
    let mut proxy = ProxyProcess::start(
        &routes(&backends, json!({}), &[lookupd.url()]),
        pki,
        "debug",
    );
    let cache = RouteCache::new(RouteCacheConfig::default());
    cache.set_servers(&[backends.memcached.addr()]).unwrap();
    let client_ip: IpAddr = CLIENT_IP.parse().unwrap();

    for (mode, protocol, port) in [
        ("imap", Protocol::Imap, backends.a.imap_port()),
        ("pop3", Protocol::Pop3, backends.a.pop3_port()),
    ] {
        let good = client(&proxy, pki, mode, "dave@l.test", ALPHA, &[]).await;
        assert_ok(&good, "a login routed by the lookup");
        let cached = cache
            .get_route(protocol, "dave@l.test", client_ip)
            .await
            .unwrap();
        assert_eq!(
            cached.map(|upstream| upstream.port),
            Some(port),
            "{mode}: route cached in memcached"
        );

        let started = Instant::now();
        let bad = client(
            &proxy,
            pki,
            mode,
            "dave@l.test",
            "not-the-password",
            &["--expect-failure"],
        )
        .await;
        assert_ok(&bad, "a wrong password");
        assert!(bad.stdout.contains("LOGIN failed"), "{bad:?}");
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "the refusal waits"
        );
        let cached = cache
            .get_route(protocol, "dave@l.test", client_ip)
            .await
            .unwrap();
        assert_eq!(cached, None, "{mode}: the refused login's route was purged");
    }

    // A server reached over TLS is resolved as `imap` (which says TLS) and then as `imapssl`
    // (its IMAPS port): a refused login purges both.
    let b = backends.b.ports();
    let both_routes = async || {
        let mut ports = Vec::new();
        for protocol in [Protocol::Imap, Protocol::ImapSsl] {
            let cached = cache.get_route(protocol, "erin@l.test", client_ip).await;
            ports.push(cached.unwrap().map(|upstream| upstream.port));
        }
        ports
    };
    let good = client(&proxy, pki, "imap", "erin@l.test", BRAVO, &[]).await;
    assert_ok(&good, "a login routed by the lookup to the TLS server");
    assert_eq!(both_routes().await, [Some(b.imap), b.imaps]);
    let bad = client(
        &proxy,
        pki,
        "imap",
        "erin@l.test",
        "not-the-password",
        &["--expect-failure"],
    )
    .await;
    assert_ok(&bad, "a wrong password to the TLS server");
    assert_eq!(both_routes().await, [None, None], "both routes purged");

    let log = proxy.stderr();
    assert!(
        !log.contains("not-the-password") && !log.contains(ALPHA),
        "password in the log"
    );
    proxy.terminate();
}

/// Runs a blocking hostile client on its own thread.
fn hostile(
    name: &'static str,
    run: impl FnOnce() -> String + Send + 'static,
) -> std::thread::JoinHandle<(&'static str, String)> {
    std::thread::spawn(move || (name, run()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_cut_off_and_others_are_not_disturbed() {
    let backends = backends();
    let pki = &backends.pki;
    let settings = json!({"timeouts": {"preLoginSeconds": 2, "maxErrors": 5}});
    let proxy = ProxyProcess::start(&routes(&backends, settings, &[]), pki, "info");
    let imap = proxy.port("imap");
    let imaps = proxy.port("imaps");
    let pop3 = proxy.port("pop3");
    let rss_before = proxy.rss_kib();

    let mut threads = Vec::new();
    for _ in 0..20 {
        threads.push(hostile("1 MiB command line", move || {
            let mut raw = Raw::connect(imap);
            raw.line();
            let mut line = vec![b'x'; 1024 * 1024];
            line.extend_from_slice(b"\r\n");
            let _ = raw.send(b"a LOGIN ");
            let _ = raw.send(&line);
            raw.until_closed()
        }));
        threads.push(hostile("10,000 bad commands", move || {
            let mut raw = Raw::connect(imap);
            raw.line();
            let _ = raw.send("x FOO\r\n".repeat(10_000));
            raw.until_closed()
        }));
        threads.push(hostile("10,000 bad POP3 commands", move || {
            let mut raw = Raw::connect(pop3);
            raw.line();
            let _ = raw.send("FOO\r\n".repeat(10_000));
            raw.until_closed()
        }));
        threads.push(hostile("one byte per second", move || {
            let started = Instant::now();
            let mut raw = Raw::connect(imap);
            raw.line();
            for byte in b"a LOGIN alice@a.test x\r\n" {
                if raw.send([*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
                if started.elapsed() > Duration::from_secs(6) {
                    break;
                }
            }
            let rest = raw.until_closed();
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(7),
                "the pre-login timeout took {took:?}"
            );
            rest
        }));
        threads.push(hostile("garbage instead of a TLS handshake", move || {
            let mut raw = Raw::connect(imaps);
            let _ = raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            raw.until_closed()
        }));
        threads.push(hostile("vanishing mid-literal", move || {
            let mut raw = Raw::connect(imap);
            raw.line();
            let _ = raw.send(b"a LOGIN {12}\r\n");
            let answer = raw.line().unwrap_or_default();
            let _ = raw.send(b"alice");
            answer
        }));
        threads.push(hostile("vanishing during the upstream login", move || {
            let mut raw = Raw::connect(imap);
            raw.line();
            let _ = raw.send(format!("a LOGIN alice@a.test {ALPHA}\r\n"));
            String::new()
        }));
    }
    let literal = hostile("a literal announcing 4 GiB", move || {
        let mut raw = Raw::connect(imap);
        raw.line();
        let _ = raw.send(b"a LOGIN {4294967296}\r\n");
        let answer = raw.line().unwrap_or_default();
        let _ = raw.send(b"b LOGOUT\r\n");
        format!("{answer}\n{}", raw.until_closed())
    });

    // Normal logins keep working while all of that goes on.
    for round in 0..3 {
        let subject = format!("during the attack {round}");
        let run = client(
            &proxy,
            pki,
            "imap",
            "alice@a.test",
            ALPHA,
            &["--append", &subject],
        )
        .await;
        assert_ok(&run, "a normal login next to hostile clients");
    }

    for thread in threads {
        let (name, answer) = thread.join().expect("hostile client thread");
        match name {
            "1 MiB command line" => assert!(
                answer.is_empty() || answer.contains("too long"),
                "{name}: {answer}"
            ),
            "10,000 bad commands" => assert!(
                answer.is_empty() || answer.contains("BAD invalid command"),
                "{name}: {answer:.200}"
            ),
            "vanishing mid-literal" => assert_eq!(answer, "+ OK", "{name}"),
            _ => {}
        }
    }
    let (_, answer) = literal.join().unwrap();
    assert!(answer.starts_with("a BAD literal too large"), "{answer}");
    assert!(answer.contains("* BYE"), "{answer}");

    let rss_after = proxy.rss_kib();
    println!("proxy RSS: {rss_before} KiB before the hostile clients, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    let log = proxy.stderr();
    for outcome in ["timeout", "closed", "tls_failed", "client_gone"] {
        assert!(
            log.contains(&format!("outcome=\"{outcome}\"")),
            "no {outcome} session in:\n{log:.3000}"
        );
    }
}

#[test]
fn the_configuration_files_http_limits_apply() {
    let pki = Pki::new();
    let proxy = ProxyProcess::start(r#"{"servers": {}}"#, &pki, "warn");
    let request = |header_bytes: usize| {
        let mut raw = Raw::connect(proxy.port("http"));
        let padding = "x".repeat(header_bytes);
        raw.send(format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX-Padding: {padding}\r\n\r\n"
        ))
        .unwrap();
        raw.line().unwrap_or_default()
    };
    // Under the limit: an answer from the proxy itself (no web backend in this table).
    assert_eq!(
        request(HTTP_MAX_HEADER_BYTES / 2),
        "HTTP/1.1 503 Service Unavailable"
    );
    // Over the configured limit, though far under the 64 KiB default.
    assert_eq!(
        request(HTTP_MAX_HEADER_BYTES * 2),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
}
