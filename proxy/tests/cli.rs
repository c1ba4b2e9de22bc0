//! The `mailproxy` binary's route subcommands: zmprov, purge and lookupd, run as a user would.

mod lookup_support;

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use lookup_support::{DIRECTORY, Files, TABLE, login};
use mailproxy::route::cache::{AliasScope, RouteCache, RouteCacheConfig};
use mailproxy::route::lookup::{AuthMethod, LookupClient, LookupClientConfig, LookupOutcome};
use mailproxy::route::{Protocol, Upstream};
use mailproxy_testkit::{Memcached, free_port, wait_for_port};

fn mailproxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mailproxy"))
}

#[test]
fn zmprov_prints_zimbra_formats_from_a_route_table() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(
        &routes,
        r#"{"lookupHandlers": ["http://a:7072/service/extension/nginx-lookup", "https://b:7072/service/extension/nginx-lookup"],
            "webBackends": ["a:8080", "b:8080"],
            "mtaAuthUrls": ["https://a:7073/service/admin/soap/"],
            "memcachedServers": ["m0:11211", "m1:11211"]}"#,
    )
    .unwrap();
    let run = |query: &str| {
        let output = mailproxy()
            .args(["zmprov", query, "--routes"])
            .arg(&routes)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(
        run("garpu"),
        "a:7072/service/extension/nginx-lookup b:7072/service/extension/nginx-lookup \n"
    );
    assert_eq!(run("garpb"), "    server a:8080;\n    server b:8080;\n");
    assert_eq!(run("gamau"), "https://a:7073/service/admin/soap/ \n");
    assert_eq!(run("gamcs"), "m0:11211 m1:11211 \n");

    let missing = mailproxy()
        .args(["zmprov", "garpu", "--routes", "/nonexistent/routes.json"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read route table"));
}

#[tokio::test]
async fn purge_deletes_the_accounts_routes_from_every_memcached_server() {
    let first = Memcached::start().unwrap();
    let second = Memcached::start().unwrap();
    let servers = [first.addr(), second.addr()];
    let client_ip: IpAddr = [203, 0, 113, 7].into();
    let upstream = Upstream::new("10.0.0.5", 7143);
    // Each server gets the routes directly, as if the ring had been different when they were
    // written: a purge must reach every server, not only the current owner.
    for server in &servers {
        let cache = RouteCache::new(RouteCacheConfig::default());
        cache.set_servers(std::slice::from_ref(server)).unwrap();
        for protocol in [Protocol::Imap, Protocol::Pop3Ssl, Protocol::Http] {
            cache
                .put_route(
                    protocol,
                    "carol@example.com",
                    client_ip,
                    &upstream,
                    Duration::from_secs(600),
                )
                .await
                .unwrap();
        }
    }

    let output = mailproxy()
        .args(["purge", "carol@example.com", "--memcached"])
        .arg(servers.join(","))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("6 deleted"), "{stdout}");

    for server in &servers {
        let cache = RouteCache::new(RouteCacheConfig::default());
        cache.set_servers(std::slice::from_ref(server)).unwrap();
        for protocol in Protocol::ALL {
            let cached = cache
                .get_route(protocol, "carol@example.com", client_ip)
                .await
                .unwrap();
            assert_eq!(cached, None, "{protocol} route left on {server}");
        }
    }

    let dead = format!("127.0.0.1:{}", free_port());
    let output = mailproxy()
        .args(["purge", "carol@example.com", "--memcached", &dead])
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "a purge that missed a server must fail"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("did not reach every memcached server"),
        "{output:?}"
    );
}

/// What a purge given the account's id, alias and proxy address deletes beyond its routes: the
/// routes by id (web requests routed by auth token), the alias's routes and alias entries, and
/// the name in lower case as the client may have typed it differently.
#[tokio::test]
async fn purge_deletes_id_alias_and_lower_case_entries_when_named() {
    let memcached = Memcached::start().unwrap();
    let server = memcached.addr();
    let cache = RouteCache::new(RouteCacheConfig::default());
    cache.set_servers(std::slice::from_ref(&server)).unwrap();
    let client_ip: IpAddr = [203, 0, 113, 7].into();
    let proxy_ip: IpAddr = [10, 0, 0, 1].into();
    let upstream = Upstream::new("10.0.0.5", 7143);
    let ttl = Duration::from_secs(600);
    for login in ["dave@example.com", "d.alias@example.com"] {
        cache
            .put_route(Protocol::Imap, login, client_ip, &upstream, ttl)
            .await
            .unwrap();
    }
    cache
        .put_route_by_id(Protocol::HttpSsl, "id-dave", &upstream, ttl)
        .await
        .unwrap();
    cache
        .put_alias(
            "d.alias@example.com",
            AliasScope::ProxyIp(proxy_ip),
            "dave@example.com",
            ttl,
        )
        .await
        .unwrap();

    let output = mailproxy()
        .args(["purge", "Dave@Example.com", "--id", "id-dave"])
        .args(["--alias", "d.alias@example.com", "--proxy-ip", "10.0.0.1"])
        .args(["--memcached", &server])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("4 deleted"), "{stdout}");
    for login in ["dave@example.com", "d.alias@example.com"] {
        let left = cache.get_route(Protocol::Imap, login, client_ip).await;
        assert_eq!(left.unwrap(), None, "{login}");
    }
    let by_id = cache.get_route_by_id(Protocol::HttpSsl, "id-dave").await;
    assert_eq!(by_id.unwrap(), None);
    let alias = cache
        .get_alias("d.alias@example.com", AliasScope::ProxyIp(proxy_ip))
        .await;
    assert_eq!(alias.unwrap(), None);

    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(&routes, r#"{"memcachedServers": []}"#).unwrap();
    let embedded = mailproxy()
        .args(["purge", "dave@example.com", "--routes"])
        .arg(&routes)
        .output()
        .unwrap();
    assert!(!embedded.status.success());
    let stderr = String::from_utf8_lossy(&embedded.stderr);
    assert!(stderr.contains("embedded caches"), "{stderr}");
}

#[tokio::test]
async fn lookupd_serves_the_lookup_protocol_and_stops_on_sigterm() {
    let files = Files::new(TABLE, DIRECTORY);
    let port = free_port();
    let mut child = mailproxy()
        .args([
            "lookupd",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--routes",
        ])
        .arg(files.table())
        .arg("--directory")
        .arg(files.directory())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, Duration::from_secs(10)).unwrap();

    let client = LookupClient::new(LookupClientConfig {
        handlers: vec![
            format!("http://127.0.0.1:{port}/service/extension/nginx-lookup")
                .parse()
                .unwrap(),
        ],
        ..LookupClientConfig::default()
    })
    .unwrap();
    let outcome = client
        .lookup(&login("al", Protocol::Imap), AuthMethod::Username)
        .await
        .unwrap();
    match outcome {
        LookupOutcome::Found { route, .. } => {
            assert_eq!(route.upstream, Upstream::new("127.0.0.1", 1143));
            assert_eq!(route.account.as_deref(), Some("alice@example.com"));
        }
        other => panic!("expected a route for the alias, got {other:?}"),
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lookupd ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "lookupd exits cleanly on SIGTERM: {exit:?}");
}
