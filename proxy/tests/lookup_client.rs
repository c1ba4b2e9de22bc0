//! The lookup client against real servers: `mailproxy lookupd` instances, a port with nothing
//! listening, a server that accepts but never answers, and raw TCP servers that answer whatever
//! bytes a test gives them.

mod lookup_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lookup_support::{DIRECTORY, Files, RunningLookupd, TABLE, eventually, login};
use mailproxy::lookupd::RequestOutcome;
use mailproxy::route::lookup::{
    AuthMethod, HandlerFailure, HandlerStatus, HandlerUrl, IDLE_CONNECTIONS_PER_HANDLER,
    LookupClient, LookupClientConfig, LookupConfigError, LookupError, LookupOutcome, MAX_WAIT,
    ResponseError,
};
use mailproxy::route::{Protocol, Route, Upstream};
use mailproxy_crds::route_table::RouteTable;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

fn client(urls: &[String], timeout: Duration, down_period: Duration) -> LookupClient {
    LookupClient::new(LookupClientConfig {
        handlers: urls.iter().map(|url| url.parse().unwrap()).collect(),
        timeout,
        down_period,
        system_roots: false,
        ..LookupClientConfig::default()
    })
    .unwrap()
}

fn alice_on_mbs1() -> LookupOutcome {
    LookupOutcome::Found {
        route: Route {
            upstream: Upstream::new("127.0.0.1", 1143),
            account: Some("alice@example.com".to_string()),
        },
        cache_alias: true,
    }
}

/// A listener on a free loopback port and its lookup URL.
async fn handler_listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/service/extension/nginx-lookup",
        listener.local_addr().unwrap()
    );
    (listener, url)
}

/// A URL on a loopback port where nothing listens (bound, then closed).
async fn refusing_url() -> String {
    handler_listener().await.1
}

/// Accepts connections and holds them open without a byte of answer.
struct Silent {
    url: String,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Silent {
    async fn start() -> Self {
        let (listener, url) = handler_listener().await;
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        Self {
            url,
            connections,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers every request head it reads with `answer` (see [`Scripted::answer_with`]); closes
/// after each answer unless `keep_alive`. Records the request heads.
struct Scripted {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    answer: Arc<std::sync::Mutex<Arc<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl Scripted {
    async fn start(answer: Vec<u8>, keep_alive: bool) -> Self {
        let (listener, url) = handler_listener().await;
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (counter, log) = (connections.clone(), requests.clone());
        let answer = Arc::new(std::sync::Mutex::new(Arc::new(answer)));
        let current = answer.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let (log, current) = (log.clone(), current.clone());
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buffer.extend_from_slice(&chunk[..n]);
                        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head: Vec<u8> = buffer.drain(..end + 4).collect();
                        log.lock()
                            .await
                            .push(String::from_utf8_lossy(&head).into_owned());
                        let answer = current.lock().unwrap().clone();
                        if stream.write_all(&answer).await.is_err() || !keep_alive {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            url,
            connections,
            requests,
            answer,
            task,
        }
    }

    /// Answers later requests with `answer`.
    fn answer_with(&self, answer: Vec<u8>) {
        *self.answer.lock().unwrap() = Arc::new(answer);
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers nothing until `storm` requests have arrived, each on its own connection (so a client
/// must open that many), then answers them all, keeping connections open. Counts the
/// connections still open.
struct Gathering {
    url: String,
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Gathering {
    async fn start(storm: usize, answer: Vec<u8>) -> Self {
        let (listener, url) = handler_listener().await;
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        let barrier = Arc::new(tokio::sync::Barrier::new(storm));
        let answer = Arc::new(answer);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let (counter, barrier, answer) = (counter.clone(), barrier.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let mut answered = false;
                    loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                        if !answered && buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                            barrier.wait().await;
                            answered = stream.write_all(&answer).await.is_ok();
                        }
                    }
                    counter.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self { url, open, task }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Gathering {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the client makes of one raw answer from a single handler.
async fn outcome_of(answer: &[u8]) -> Result<LookupOutcome, HandlerFailure> {
    let server = Scripted::start(answer.to_vec(), false).await;
    let client = client(
        std::slice::from_ref(&server.url),
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    match client
        .lookup(&login("alice", Protocol::Imap), AuthMethod::Username)
        .await
    {
        Ok(outcome) => Ok(outcome),
        Err(LookupError::AllHandlersFailed { mut attempts }) => {
            assert_eq!(attempts.len(), 1);
            Err(attempts.remove(0).failure)
        }
        Err(LookupError::BadAnswer { error, .. }) => Err(error.into()),
        Err(other) => panic!("unexpected error {other}"),
    }
}

fn head(lines: &[&str]) -> Vec<u8> {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// Reads one sample from the text exposition, e.g. `mailproxy_lookups_total{outcome="found"}`.
fn sample(registry: &Registry, series: &str) -> Option<f64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn round_robin_across_two_healthy_handlers() {
    let files = Files::new(TABLE, DIRECTORY);
    let one = RunningLookupd::start(files.config()).await;
    let two = RunningLookupd::start(files.config()).await;
    let client = client(
        &[one.url(), two.url()],
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    for _ in 0..10 {
        let outcome = client
            .lookup(&login("alice", Protocol::Imap), AuthMethod::Username)
            .await
            .unwrap();
        assert_eq!(outcome, alice_on_mbs1());
    }
    assert_eq!(one.lookupd.requests(RequestOutcome::Found), 5);
    assert_eq!(two.lookupd.requests(RequestOutcome::Found), 5);
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn failover_skips_dead_handlers_while_down_and_retries_them_after() {
    let files = Files::new(TABLE, DIRECTORY);
    let healthy = RunningLookupd::start(files.config()).await;
    let silent = Silent::start().await;
    let refusing = refusing_url().await;
    let timeout = Duration::from_millis(300);
    let client = client(
        &[refusing.clone(), silent.url.clone(), healthy.url()],
        timeout,
        Duration::from_secs(1),
    );
    let mut registry = Registry::default();
    client.register(&mut registry);
    let alice = login("alice", Protocol::Imap);

    // The first lookup starts at the refusing handler, waits out the silent one, and is
    // answered by the healthy one.
    let started = Instant::now();
    let outcome = client.lookup(&alice, AuthMethod::Username).await.unwrap();
    assert_eq!(outcome, alice_on_mbs1());
    assert!(
        started.elapsed() >= timeout,
        "the silent handler was waited for"
    );
    assert_eq!(silent.connections(), 1);
    let down: Vec<bool> = client
        .handlers()
        .iter()
        .map(|handler| handler.down_for.is_some())
        .collect();
    assert_eq!(down, [true, true, false]);
    let connect_failures = format!(
        "mailproxy_lookup_handler_failures_total{{handler=\"{refusing}\",reason=\"connect\"}}"
    );
    let timeouts = format!(
        "mailproxy_lookup_handler_failures_total{{handler=\"{}\",reason=\"timeout\"}}",
        silent.url
    );
    assert_eq!(sample(&registry, &connect_failures), Some(1.0));
    assert_eq!(sample(&registry, &timeouts), Some(1.0));
    assert_eq!(
        sample(
            &registry,
            &format!("mailproxy_lookup_handler_up{{handler=\"{}\"}}", silent.url)
        ),
        Some(0.0)
    );

    // While they are down, lookups go straight to the healthy handler.
    for _ in 0..5 {
        let started = Instant::now();
        let outcome = client.lookup(&alice, AuthMethod::Username).await.unwrap();
        assert_eq!(outcome, alice_on_mbs1());
        assert!(
            started.elapsed() < timeout,
            "no wait on a handler marked down"
        );
    }
    assert_eq!(silent.connections(), 1);
    assert_eq!(sample(&registry, &connect_failures), Some(1.0));
    assert_eq!(healthy.lookupd.requests(RequestOutcome::Found), 6);

    // After the down period both are back in rotation and get tried (and fail) again.
    eventually(
        "handlers back in rotation",
        Duration::from_secs(5),
        async || {
            client
                .handlers()
                .iter()
                .all(|handler| handler.down_for.is_none())
                .then_some(())
        },
    )
    .await;
    for _ in 0..6 {
        let outcome = client.lookup(&alice, AuthMethod::Username).await.unwrap();
        assert_eq!(outcome, alice_on_mbs1());
        if silent.connections() == 2 && sample(&registry, &connect_failures) == Some(2.0) {
            break;
        }
    }
    assert_eq!(silent.connections(), 2, "the silent handler was retried");
    assert_eq!(
        sample(&registry, &connect_failures),
        Some(2.0),
        "the refusing handler was retried"
    );
    assert_eq!(
        sample(&registry, "mailproxy_lookups_total{outcome=\"found\"}"),
        Some(healthy.lookupd.requests(RequestOutcome::Found) as f64)
    );
}

#[tokio::test]
async fn all_handlers_failing_is_a_clear_error_within_bounded_time() {
    let silent_one = Silent::start().await;
    let silent_two = Silent::start().await;
    let refusing = refusing_url().await;
    let timeout = Duration::from_millis(300);
    let client = client(
        &[
            refusing.clone(),
            silent_one.url.clone(),
            silent_two.url.clone(),
        ],
        timeout,
        Duration::from_secs(60),
    );
    let alice = login("alice", Protocol::Pop3);
    for round in 1..=2 {
        // Round 2: every handler is marked down, and all are tried anyway.
        let started = Instant::now();
        let error = client
            .lookup(&alice, AuthMethod::Username)
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        assert!(elapsed >= timeout * 2, "round {round}: {elapsed:?}");
        assert!(
            elapsed < Duration::from_secs(3),
            "round {round}: {elapsed:?}"
        );
        let LookupError::AllHandlersFailed { attempts } = &error else {
            panic!("round {round}: {error}");
        };
        let tried: Vec<&str> = attempts.iter().map(|a| a.handler.as_str()).collect();
        assert_eq!(tried.len(), 3, "round {round}: {error}");
        for attempt in attempts {
            if attempt.handler.as_str() == refusing {
                assert!(
                    matches!(attempt.failure, HandlerFailure::Connect(_)),
                    "{error}"
                );
            } else {
                assert_eq!(attempt.failure, HandlerFailure::Timeout(timeout));
            }
        }
        let message = error.to_string();
        assert!(
            message.starts_with("every Route Lookup Handler failed: "),
            "{message}"
        );
        assert!(
            message.contains(&refusing) && message.contains("cannot connect"),
            "{message}"
        );
        assert!(message.contains("no answer within 300ms"), "{message}");
        assert_eq!(silent_one.connections(), round);
        assert_eq!(silent_two.connections(), round);
    }

    let empty = client_without_handlers();
    assert_eq!(
        empty.lookup(&alice, AuthMethod::Username).await,
        Err(LookupError::NoHandlers)
    );
}

/// A handler's raw answer that is [`alice_on_mbs1`].
fn alice_answer() -> Vec<u8> {
    head(&[
        "HTTP/1.1 200 OK",
        "Auth-Status: OK",
        "Auth-Server: 127.0.0.1",
        "Auth-Port: 1143",
        "Auth-User: alice@example.com",
        "Auth-Cache-Alias: TRUE",
        "Content-Length: 0",
    ])
}

/// A 4xx or a malformed answer comes from this login (a 431 for a huge Auth-User): the lookup
/// fails, no other handler is asked, and the handler stays in rotation for other logins.
#[tokio::test]
async fn an_unusable_answer_fails_the_lookup_and_leaves_the_handler_up() {
    let files = Files::new(TABLE, DIRECTORY);
    let healthy = RunningLookupd::start(files.config()).await;
    for (answer, expected) in [
        (
            head(&[
                "HTTP/1.1 431 Request Header Fields Too Large",
                "Content-Length: 0",
            ]),
            ResponseError::Status { status: 431 },
        ),
        (
            head(&["HTTP/1.1 200 OK", "Content-Length: 0"]),
            ResponseError::MissingStatus,
        ),
    ] {
        let bad = Scripted::start(answer, false).await;
        let client = client(
            &[bad.url.clone(), healthy.url()],
            Duration::from_secs(5),
            Duration::from_secs(60),
        );
        let mut registry = Registry::default();
        client.register(&mut registry);
        let alice = login("alice", Protocol::Imap);
        let asked_before = healthy.lookupd.requests(RequestOutcome::Found);

        let error = client
            .lookup(&alice, AuthMethod::Username)
            .await
            .unwrap_err();
        assert_eq!(
            error,
            LookupError::BadAnswer {
                handler: bad.url.parse().unwrap(),
                error: expected.clone(),
            }
        );
        assert!(
            client.handlers().iter().all(|h| h.down_for.is_none()),
            "{expected}: {:?}",
            client.handlers()
        );
        assert_eq!(
            healthy.lookupd.requests(RequestOutcome::Found),
            asked_before,
            "no failover"
        );
        let failures = format!(
            "mailproxy_lookup_handler_failures_total{{handler=\"{}\",reason=\"response\"}}",
            bad.url
        );
        assert_eq!(sample(&registry, &failures), Some(1.0));

        // The rotation goes on through both.
        assert_eq!(
            client.lookup(&alice, AuthMethod::Username).await,
            Ok(alice_on_mbs1())
        );
        assert!(client.lookup(&alice, AuthMethod::Username).await.is_err());
        assert_eq!(bad.requests.lock().await.len(), 2);
    }
}

/// A 5xx says the handler is failing, whoever asks: it is marked down and the next one answers.
#[tokio::test]
async fn a_server_error_marks_the_handler_down_and_fails_over() {
    let files = Files::new(TABLE, DIRECTORY);
    let healthy = RunningLookupd::start(files.config()).await;
    // A 403 is a handler that does not take this proxy's lookup secret (a rotation that
    // reached it first, or not yet), a 404 a URL that is no lookup handler: they fail every
    // login alike.
    for status in [
        "HTTP/1.1 503 Service Unavailable",
        "HTTP/1.1 403 Forbidden",
        "HTTP/1.1 404 Not Found",
    ] {
        let failing = Scripted::start(head(&[status, "Content-Length: 0"]), false).await;
        let client = client(
            &[failing.url.clone(), healthy.url()],
            Duration::from_secs(5),
            Duration::from_secs(60),
        );
        assert_eq!(
            client
                .lookup(&login("alice", Protocol::Imap), AuthMethod::Username)
                .await,
            Ok(alice_on_mbs1()),
            "{status}"
        );
        let down: Vec<bool> = client
            .handlers()
            .iter()
            .map(|handler| handler.down_for.is_some())
            .collect();
        assert_eq!(down, [true, false], "{status}");
    }
}

/// When every handler in rotation fails, those marked down are tried before the login fails:
/// one may be back before its down period ends.
#[tokio::test]
async fn handlers_marked_down_are_tried_when_the_others_fail() {
    let recovering = Scripted::start(
        head(&["HTTP/1.1 503 Service Unavailable", "Content-Length: 0"]),
        false,
    )
    .await;
    let client = client(
        std::slice::from_ref(&recovering.url),
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let alice = login("alice", Protocol::Imap);
    assert!(client.lookup(&alice, AuthMethod::Username).await.is_err());
    assert!(client.handlers()[0].down_for.is_some());

    recovering.answer_with(alice_answer());
    let refusing = refusing_url().await;
    client.set_handlers(
        [refusing.as_str(), recovering.url.as_str()]
            .iter()
            .map(|url| url.parse().unwrap())
            .collect(),
    );
    assert_eq!(
        client.lookup(&alice, AuthMethod::Username).await,
        Ok(alice_on_mbs1())
    );
    let down: Vec<bool> = client
        .handlers()
        .iter()
        .map(|handler| handler.down_for.is_some())
        .collect();
    assert_eq!(
        down,
        [true, false],
        "the refusing one is down, the other back"
    );
}

fn client_without_handlers() -> LookupClient {
    client(&[], Duration::from_secs(1), Duration::from_secs(1))
}

#[tokio::test]
async fn refusal_is_an_answer_and_does_not_mark_the_handler_down() {
    let files = Files::new(TABLE, DIRECTORY);
    let lookupd = RunningLookupd::start(files.config()).await;
    let client = client(
        &[lookupd.url()],
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let outcome = client
        .lookup(&login("nobody", Protocol::Imap), AuthMethod::Username)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        LookupOutcome::Refused {
            message: "login failed".to_string(),
            wait: Duration::from_secs(10),
        }
    );
    assert!(client.handlers()[0].down_for.is_none());
}

#[tokio::test]
async fn handler_list_is_replaceable_at_runtime() {
    let files = Files::new(TABLE, DIRECTORY);
    let one = RunningLookupd::start(files.config()).await;
    let two = RunningLookupd::start(files.config()).await;
    let client = client(
        &[one.url()],
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let alice = login("alice", Protocol::Imap);
    client.lookup(&alice, AuthMethod::Username).await.unwrap();
    client.set_handlers(vec![two.url().parse::<HandlerUrl>().unwrap()]);
    for _ in 0..3 {
        client.lookup(&alice, AuthMethod::Username).await.unwrap();
    }
    assert_eq!(one.lookupd.requests(RequestOutcome::Found), 1);
    assert_eq!(two.lookupd.requests(RequestOutcome::Found), 3);

    let mut table = RouteTable::from_json(TABLE).unwrap();
    table.lookup_handlers = vec![one.url(), two.url()];
    table.settings.lookup_timeout_seconds = 2;
    assert_eq!(client.apply_route_table(&table), vec![]);
    for _ in 0..4 {
        client.lookup(&alice, AuthMethod::Username).await.unwrap();
    }
    assert_eq!(one.lookupd.requests(RequestOutcome::Found), 3);
    assert_eq!(two.lookupd.requests(RequestOutcome::Found), 5);

    table.lookup_handlers.push("ftp://nope/".to_string());
    let skipped = client.apply_route_table(&table);
    assert!(
        matches!(&skipped[..], [LookupConfigError::BadUrl { url, .. }] if url == "ftp://nope/"),
        "{skipped:?}"
    );
    assert_eq!(
        client.handlers().len(),
        2,
        "a bad URL is skipped, the good ones stay"
    );
}

/// One MailboxServer with a host that makes no usable URL (admitted before the CRD checked
/// hosts) must cost the pool its own handler only, on running and new proxies alike.
#[test]
fn one_bad_host_costs_only_its_own_lookup_handler() {
    use mailproxy_crds::mailbox_server::MailboxServerSpec;
    use mailproxy_crds::route_table::{RouteSettings, ServerSource};
    let spec = |host: &str| -> MailboxServerSpec {
        serde_json::from_value(serde_json::json!({ "host": host })).unwrap()
    };
    let hosts = [
        ("good", "10.0.0.1"),
        ("also-good", "2001:db8::7"),
        ("user-info", "admin@mbs2"),
        ("percent", "mbs2%"),
        ("pipe", "mbs2|x"),
        ("non-ascii", "mbs-\u{fc}.example.com"),
        ("with-port", "mbs2.example.com:7072"),
        ("octal", "010.0.0.1"),
    ];
    let specs: Vec<MailboxServerSpec> = hosts.iter().map(|(_, host)| spec(host)).collect();
    let sources: Vec<ServerSource<'_>> = hosts
        .iter()
        .zip(&specs)
        .map(|((name, host), spec)| ServerSource {
            name,
            host: (*host).to_string(),
            spec,
        })
        .collect();
    let table = RouteTable::compile(&sources, RouteSettings::default(), vec![]);
    let good = |handlers: Vec<HandlerStatus>| -> Vec<String> {
        handlers.into_iter().map(|h| h.url.to_string()).collect()
    };
    let expected = [
        "http://[2001:db8::7]:7072/service/extension/nginx-lookup",
        "http://10.0.0.1:7072/service/extension/nginx-lookup",
    ];

    let running = LookupClient::new(LookupClientConfig {
        handlers: vec!["http://10.0.0.2:7072/x".parse().unwrap()],
        system_roots: false,
        ..LookupClientConfig::default()
    })
    .unwrap();
    let skipped = running.apply_route_table(&table);
    assert_eq!(skipped.len(), 6, "{skipped:?}");
    assert_eq!(good(running.handlers()), expected, "a running proxy");

    let fresh = LookupClient::new(LookupClientConfig {
        system_roots: false,
        ..LookupClientConfig::default()
    })
    .unwrap();
    assert_eq!(fresh.apply_route_table(&table).len(), 6);
    assert_eq!(good(fresh.handlers()), expected, "a new proxy");
}

#[tokio::test]
async fn pooled_connection_and_request_headers_on_the_wire() {
    let answer = head(&[
        "HTTP/1.1 200 OK",
        "Content-Length: 0",
        "Auth-Status: OK",
        "Auth-Server: 10.0.0.5",
        "Auth-Port: 7143",
        "Auth-User: first%20last@example.com",
        "Auth-Cache-Alias: FALSE",
    ]);
    let server = Scripted::start(answer, true).await;
    let client = LookupClient::new(LookupClientConfig {
        handlers: vec![server.url.parse().unwrap()],
        secret: Some("s3cret".to_string()),
        system_roots: false,
        ..LookupClientConfig::default()
    })
    .unwrap();
    for _ in 0..5 {
        let outcome = client
            .lookup(&login("First Last", Protocol::Imap), AuthMethod::Username)
            .await
            .unwrap();
        assert_eq!(
            outcome,
            LookupOutcome::Found {
                route: Route {
                    upstream: Upstream::new("10.0.0.5", 7143),
                    account: Some("first last@example.com".to_string()),
                },
                cache_alias: false,
            }
        );
    }
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        1,
        "one pooled connection"
    );
    let requests = server.requests.lock().await;
    assert_eq!(requests.len(), 5);
    let request = requests[0].to_ascii_lowercase();
    let port = server
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    for expected in [
        "get /service/extension/nginx-lookup http/1.1\r\n".to_string(),
        format!("host: 127.0.0.1:{port}\r\n"),
        "auth-method: username\r\n".to_string(),
        "auth-user: first%20last\r\n".to_string(),
        "auth-pass: _password_\r\n".to_string(),
        "auth-protocol: imap\r\n".to_string(),
        "auth-login-attempt: 1\r\n".to_string(),
        "client-ip: 203.0.113.7\r\n".to_string(),
        "x-proxy-ip: 10.1.2.3\r\n".to_string(),
        "x-mailproxy-lookup-secret: s3cret\r\n".to_string(),
    ] {
        assert!(
            request.contains(&expected),
            "{expected:?} missing from {request}"
        );
    }
}

/// A storm of concurrent lookups opens a connection each; once it is over, the client keeps only
/// [`IDLE_CONNECTIONS_PER_HANDLER`] of them, since every kept connection costs memory.
#[tokio::test]
async fn a_lookup_storm_leaves_a_bounded_pool_of_idle_connections() {
    let storm = IDLE_CONNECTIONS_PER_HANDLER + 16;
    let answer = head(&[
        "HTTP/1.1 200 OK",
        "Content-Length: 0",
        "Auth-Status: OK",
        "Auth-Server: 127.0.0.1",
        "Auth-Port: 1143",
    ]);
    let server = Gathering::start(storm, answer).await;
    let client = Arc::new(client(
        std::slice::from_ref(&server.url),
        Duration::from_secs(10),
        Duration::from_secs(60),
    ));
    let lookups: Vec<_> = (0..storm)
        .map(|index| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .lookup(
                        &login(&format!("user{index}@example.com"), Protocol::Imap),
                        AuthMethod::Username,
                    )
                    .await
            })
        })
        .collect();
    for lookup in lookups {
        assert!(matches!(
            lookup.await.unwrap(),
            Ok(LookupOutcome::Found { .. })
        ));
    }
    eventually(
        "the storm's surplus connections closed",
        Duration::from_secs(10),
        async || (server.open() == IDLE_CONNECTIONS_PER_HANDLER).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn malformed_answers_are_specific_errors() {
    let cases: Vec<(Vec<u8>, HandlerFailure)> = vec![
        (
            head(&["HTTP/1.1 200 OK", "Content-Length: 0"]),
            ResponseError::MissingStatus.into(),
        ),
        (
            head(&["HTTP/1.1 200 OK", "Auth-Status: OK", "Auth-Server: 10.0.0.1"]),
            ResponseError::Missing {
                header: "Auth-Port",
            }
            .into(),
        ),
        (
            head(&["HTTP/1.1 200 OK", "Auth-Status: OK", "Auth-Port: 143"]),
            ResponseError::Missing {
                header: "Auth-Server",
            }
            .into(),
        ),
        (
            head(&[
                "HTTP/1.1 200 OK",
                "Auth-Status: OK",
                "Auth-Server: 10.0.0.1",
                "Auth-Port: 0",
            ]),
            ResponseError::BadPort("0".to_string()).into(),
        ),
        (
            head(&[
                "HTTP/1.1 200 OK",
                "Auth-Status: OK",
                "Auth-Server: 10.0.0.1",
                "Auth-Port: 70000",
            ]),
            ResponseError::BadPort("70000".to_string()).into(),
        ),
        (
            head(&[
                "HTTP/1.1 200 OK",
                "Auth-Status: OK",
                "Auth-Server: mail/host",
                "Auth-Port: 143",
            ]),
            ResponseError::BadServer("mail/host".to_string()).into(),
        ),
        (
            head(&["HTTP/1.1 500 Internal Server Error", "Content-Length: 0"]),
            ResponseError::Status { status: 500 }.into(),
        ),
        (
            head(&["HTTP/1.0 404 Not Found"]),
            ResponseError::Status { status: 404 }.into(),
        ),
        (
            head(&["HTTP/1.1 200 OK", "Auth-Status: locked", "Auth-Wait: soon"]),
            ResponseError::BadWait("soon".to_string()).into(),
        ),
        (
            head(&[
                "HTTP/1.1 200 OK",
                "Auth-Status: OK",
                "Auth-Server: 10.0.0.1",
                "Auth-Port: 143",
                "Auth-Cache-Alias: maybe",
            ]),
            ResponseError::BadCacheAlias("maybe".to_string()).into(),
        ),
        (
            b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.0.0.1\r\nAuth-Port: 143\r\nAuth-User: \xff\xfe\r\n\r\n".to_vec(),
            ResponseError::NotUtf8 {
                header: "Auth-User",
            }
            .into(),
        ),
        (
            head(&[
                "HTTP/1.1 200 OK",
                "Auth-Status: OK",
                &format!("X-Padding: {}", "p".repeat(3000)),
                &format!("X-Padding: {}", "p".repeat(3000)),
                &format!("X-Padding: {}", "p".repeat(3000)),
                &format!("X-Padding: {}", "p".repeat(3000)),
                &format!("X-Padding: {}", "p".repeat(3000)),
                &format!("X-Padding: {}", "p".repeat(3000)),
            ]),
            ResponseError::HeadersTooLarge.into(),
        ),
        (
            head(&[
                "HTTP/1.1 200 OK",
                "Auth-Status: OK",
                &format!("Auth-User: {}", "u".repeat(5000)),
            ]),
            ResponseError::HeaderValueTooLarge {
                header: "auth-user".to_string(),
                len: 5000,
            }
            .into(),
        ),
    ];
    for (answer, expected) in cases {
        let shown = String::from_utf8_lossy(&answer[..answer.len().min(120)]).into_owned();
        assert_eq!(outcome_of(&answer).await, Err(expected), "answer {shown:?}");
    }

    // What hyper itself refuses to parse fails as an exchange error, never a panic.
    let huge = head(&[
        "HTTP/1.1 200 OK",
        &format!("X-Huge: {}", "h".repeat(200_000)),
    ]);
    let many: Vec<String> = (0..150).map(|i| format!("X-{i}: v")).collect();
    let mut many_lines = vec!["HTTP/1.1 200 OK"];
    many_lines.extend(many.iter().map(String::as_str));
    for answer in [
        b"\x00\x01\x02 garbage \xff\r\n\r\n".to_vec(),
        b"SMTP/1.0 200 OK\r\n\r\n".to_vec(),
        huge,
        head(&many_lines),
        Vec::new(),
    ] {
        let shown = String::from_utf8_lossy(&answer[..answer.len().min(40)]).into_owned();
        match outcome_of(&answer).await {
            Err(HandlerFailure::Exchange(_)) => {}
            other => panic!("answer {shown:?}: expected an exchange error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn auth_wait_is_honoured_and_capped() {
    let refusal = |wait: &str| {
        head(&[
            "HTTP/1.1 200 OK",
            "Auth-Status: Temporarily locked",
            &format!("Auth-Wait: {wait}"),
        ])
    };
    assert_eq!(
        outcome_of(&refusal("5")).await,
        Ok(LookupOutcome::Refused {
            message: "Temporarily locked".to_string(),
            wait: Duration::from_secs(5),
        })
    );
    assert_eq!(
        outcome_of(&refusal("86400")).await,
        Ok(LookupOutcome::Refused {
            message: "Temporarily locked".to_string(),
            wait: MAX_WAIT,
        })
    );
    assert_eq!(
        outcome_of(&head(&["HTTP/1.1 200 OK", "Auth-Status: Login failed"])).await,
        Ok(LookupOutcome::Refused {
            message: "Login failed".to_string(),
            wait: Duration::ZERO,
        })
    );
}
