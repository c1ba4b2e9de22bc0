//! The whole product on a real local control plane, the way a user runs it: `helm install` of
//! the chart, then the operator binary under the chart's ServiceAccount (so the chart's RBAC is
//! what lets it work), MailboxServers and a ProxyPool applied, then the proxy binary under the
//! ServiceAccount the operator made for the pool, reading the route table and configuration the
//! operator wrote (its certificate from the pool's TLS Secret, written out as the kubelet mounts
//! it), relaying real clients (Python's imaplib and poplib, over IMAPS, POP3S and STARTTLS) to
//! real Dovecot backends.
//!
//! There is no kubelet: the chart's and the pool's Deployments stay unscheduled, and the tests
//! run their binaries as local processes instead, with the tokens those pods would get.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mailproxy_crds::proxy_config::{ListenerProtocol, ProxyConfig};
use mailproxy_crds::route_table::RouteTable;
use mailproxy_crds::{MailboxServer, ProxyPool};
use mailproxy_e2e::{chart_dir, helm_ok, workspace_binary, workspace_root};
use mailproxy_testkit::{ControlPlane, Dovecot, Guard, Pki, eventually, free_port};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RELEASE: &str = "mp";
const OPERATOR_NAMESPACE: &str = "mailproxy-system";
const OPERATOR_ACCOUNT: &str = "mp-mailproxy-operator";
const MAIL_NAMESPACE: &str = "mail";
const POOL: &str = "main";
const WAIT: Duration = Duration::from_secs(60);

/// A binary of the workspace as a local process, its output in `log`.
fn spawn(binary: &str, args: &[&str], env: &[(&str, &Path)], log: &Path) -> Guard {
    let out = std::fs::File::create(log).unwrap();
    let mut command = Command::new(workspace_binary(binary).unwrap());
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    for (name, value) in env {
        command.env(name, value);
    }
    Guard(Some(command.spawn().unwrap()))
}

/// `helm install` of the chart into `cluster`, release [`RELEASE`] in [`OPERATOR_NAMESPACE`].
fn helm_install(cluster: &ControlPlane, extra: &[&str]) {
    let chart = chart_dir();
    let kubeconfig = cluster.kubeconfig().to_str().unwrap();
    let mut args = vec![
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--kubeconfig",
        kubeconfig,
    ];
    args.extend_from_slice(extra);
    helm_ok(&args).unwrap();
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The status code of `GET path` on `127.0.0.1:port`.
async fn http_status(port: u16, path: &str) -> Result<u16, String> {
    let mut stream = tokio::net::TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .map_err(|error| error.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| error.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .map_err(|error| error.to_string())?;
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {answer:?}"))
}

/// Python's imaplib or poplib (`proxy/tests/mail_client.py`) through the proxy.
async fn mail_client(args: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new("python3")
        .arg(workspace_root().join("proxy/tests/mail_client.py"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| error.to_string())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn mailbox_server(name: &str, dovecot: &Dovecot, routes: Value) -> Value {
    let mut spec = json!({
        "host": "127.0.0.1",
        "ports": {"imap": dovecot.imap_port(), "pop3": dovecot.pop3_port()},
    });
    spec.as_object_mut()
        .unwrap()
        .extend(routes.as_object().unwrap().clone());
    json!({
        "apiVersion": "mailproxy.io/v1alpha1",
        "kind": "MailboxServer",
        "metadata": {"name": name, "labels": {"pool": POOL}},
        "spec": spec,
    })
}

async fn apply<K>(api: &Api<K>, name: &str, object: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|error| panic!("apply {name}: {error}"));
}

async fn route_table(maps: &Api<ConfigMap>) -> Result<RouteTable, String> {
    let map = maps
        .get_opt(&format!("{POOL}-routes"))
        .await
        .map_err(|error| error.to_string())?
        .ok_or("no route-table ConfigMap yet")?;
    RouteTable::from_configmap(&map).map_err(|error| error.to_string())
}

/// The proxy of the test: its configuration and where its listeners and health port are.
struct LocalProxy {
    config: ProxyConfig,
    ports: HashMap<ListenerProtocol, u16>,
    health: u16,
}

/// The pool's `config.yaml` as the operator wrote it, with every listener and the health port
/// moved to free loopback ports (a pod binds 0.0.0.0 on the standard ports), and the TLS files
/// read from `mounted`, where the test wrote the Secret as the kubelet would mount it.
async fn proxy_config(maps: &Api<ConfigMap>, mounted: &Path) -> LocalProxy {
    let text = eventually("the pool's config.yaml", WAIT, || async {
        maps.get_opt(&format!("{POOL}-config"))
            .await
            .map_err(|error| error.to_string())?
            .and_then(|map| map.data?.get("config.yaml").cloned())
            .ok_or_else(|| "no config ConfigMap yet".to_string())
    })
    .await;
    let mut config: ProxyConfig = serde_norway::from_str(&text).unwrap();
    let mut ports = HashMap::new();
    for listener in &mut config.listeners {
        let port = free_port();
        listener.address = format!("127.0.0.1:{port}");
        ports.insert(listener.protocol, port);
    }
    for protocol in [
        ListenerProtocol::Imap,
        ListenerProtocol::Imaps,
        ListenerProtocol::Pop3,
        ListenerProtocol::Pop3s,
    ] {
        assert!(ports.contains_key(&protocol), "{protocol:?} in {text}");
    }
    let tls = config
        .tls
        .as_mut()
        .expect("spec.tls gives the proxy certificates");
    for files in &mut tls.certificates {
        assert!(files.cert.starts_with("/etc/mailproxy/tls"), "{text}");
        files.cert = mounted.join(files.cert.file_name().unwrap());
        files.key = mounted.join(files.key.file_name().unwrap());
    }
    let health = free_port();
    config.health_listen = format!("127.0.0.1:{health}");
    LocalProxy {
        config,
        ports,
        health,
    }
}

/// The keys of a Secret written as files, as the kubelet mounts them.
async fn mount_secret(secrets: &Api<Secret>, name: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let secret = secrets.get(name).await.unwrap();
    for (key, value) in secret.data.unwrap() {
        std::fs::write(dir.join(key), value.0).unwrap();
    }
}

async fn namespace(client: &Client, name: &str) {
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
}

fn dovecot_logins(dovecot: &Dovecot, user: &str) -> usize {
    dovecot
        .log()
        .lines()
        .filter(|line| line.contains("Login:") && line.contains(&format!("user=<{user}>")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_then_the_operator_and_the_proxy_route_real_clients_to_dovecot() {
    let cluster = ControlPlane::start().await.unwrap();
    let admin = cluster.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cluster.kubeconfig().to_str().unwrap().to_string();

    // The install a user does.
    helm_install(&cluster, &[]);
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in ["mailboxservers.mailproxy.io", "proxypools.mailproxy.io"] {
        eventually(&format!("CRD {crd} established"), WAIT, || async {
            let crd = crds.get(crd).await.map_err(|error| error.to_string())?;
            let established = crd
                .status
                .and_then(|status| status.conditions)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            established
                .then_some(())
                .ok_or_else(|| "not yet".to_string())
        })
        .await;
    }
    let operator_deployment = Api::<Deployment>::namespaced(admin.clone(), OPERATOR_NAMESPACE)
        .get(OPERATOR_ACCOUNT)
        .await
        .unwrap();
    assert_eq!(
        operator_deployment
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .service_account_name
            .as_deref(),
        Some(OPERATOR_ACCOUNT)
    );

    // The operator, with nothing but the chart's permissions.
    let operator_kubeconfig = cluster
        .service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT)
        .await
        .unwrap();
    let operator_http = free_port();
    let operator_log = dir.path().join("operator.log");
    let _operator = spawn(
        "mailproxy-operator",
        &[
            "run",
            "--http-addr",
            &format!("127.0.0.1:{operator_http}"),
            "--lease-name",
            OPERATOR_ACCOUNT,
            "--log-format",
            "text",
        ],
        &[
            ("KUBECONFIG", &operator_kubeconfig),
            ("POD_NAMESPACE", Path::new(OPERATOR_NAMESPACE)),
            ("POD_NAME", Path::new("e2e-operator")),
        ],
        &operator_log,
    );
    eventually("the operator's /readyz", WAIT, || async {
        match http_status(operator_http, "/readyz").await? {
            200 => Ok(()),
            code => Err(format!("{code}; log: {}", log_tail(&operator_log))),
        }
    })
    .await;

    // Two mailbox servers behind one pool: the domain on the first, bob pinned later.
    let first = Dovecot::start().unwrap();
    let second = Dovecot::start().unwrap();
    namespace(&admin, MAIL_NAMESPACE).await;
    let pki = Pki::new();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), MAIL_NAMESPACE);
    apply(
        &secrets,
        "mail-tls",
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "mail-tls"},
            "type": "kubernetes.io/tls",
            "stringData": {
                "tls.crt": std::fs::read_to_string(pki.cert()).unwrap(),
                "tls.key": std::fs::read_to_string(pki.key()).unwrap(),
            },
        }),
    )
    .await;
    let servers: Api<MailboxServer> = Api::namespaced(admin.clone(), MAIL_NAMESPACE);
    let pools: Api<ProxyPool> = Api::namespaced(admin.clone(), MAIL_NAMESPACE);
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), MAIL_NAMESPACE);
    apply(
        &servers,
        "mbs1",
        mailbox_server("mbs1", &first, json!({"domains": ["example.com"]})),
    )
    .await;
    apply(
        &pools,
        POOL,
        json!({
            "apiVersion": "mailproxy.io/v1alpha1",
            "kind": "ProxyPool",
            "metadata": {"name": POOL},
            "spec": {
                "replicas": 1,
                "mailboxSelector": {"matchLabels": {"pool": POOL}},
                "memcached": {"replicas": 0},
                "tls": {"secretName": "mail-tls"},
                "starttls": "only",
            },
        }),
    )
    .await;
    let table = eventually("the route table lists mbs1", WAIT, || async {
        let table = route_table(&maps)
            .await
            .map_err(|error| format!("{error}; log: {}", log_tail(&operator_log)))?;
        if table.servers.contains_key("mbs1") {
            Ok(table)
        } else {
            Err(format!("servers: {:?}", table.servers.keys()))
        }
    })
    .await;
    assert_eq!(
        table.domains.get("example.com").map(String::as_str),
        Some("mbs1")
    );
    eventually("mbs1's status names the pool", WAIT, || async {
        let server = servers
            .get("mbs1")
            .await
            .map_err(|error| error.to_string())?;
        let pools = server.status.map(|status| status.pools).unwrap_or_default();
        (pools == [POOL])
            .then_some(())
            .ok_or_else(|| format!("{pools:?}"))
    })
    .await;
    let pool_deployments = Api::<Deployment>::namespaced(admin.clone(), MAIL_NAMESPACE);
    let pool_deployment = eventually("the pool's Deployment", WAIT, || async {
        pool_deployments
            .get_opt(POOL)
            .await
            .map_err(|error| error.to_string())?
            .ok_or_else(|| "not applied yet".to_string())
    })
    .await;
    assert_eq!(pool_deployment.spec.unwrap().replicas, Some(1));

    // The proxy, with nothing but the permissions the operator gave the pool.
    let proxy_kubeconfig = cluster
        .service_account_kubeconfig(MAIL_NAMESPACE, &format!("{POOL}-proxy"))
        .await
        .unwrap();
    let mounted = dir.path().join("tls");
    mount_secret(&secrets, "mail-tls", &mounted).await;
    let proxy = proxy_config(&maps, &mounted).await;
    let config_path: PathBuf = dir.path().join("config.yaml");
    std::fs::write(
        &config_path,
        serde_norway::to_string(&proxy.config).unwrap(),
    )
    .unwrap();
    let proxy_log = dir.path().join("proxy.log");
    let _proxy = spawn(
        "mailproxy",
        &["serve", "--config", config_path.to_str().unwrap()],
        &[
            ("KUBECONFIG", &proxy_kubeconfig),
            ("POD_NAMESPACE", Path::new(MAIL_NAMESPACE)),
            ("POD_NAME", Path::new("e2e-proxy")),
        ],
        &proxy_log,
    );
    eventually("the proxy's /readyz", WAIT, || async {
        match http_status(proxy.health, "/readyz").await? {
            200 => Ok(()),
            code => Err(format!("{code}; log: {}", log_tail(&proxy_log))),
        }
    })
    .await;
    let port = |protocol| proxy.ports[&protocol].to_string();
    let ca = pki.ca();
    let ca = ca.to_str().unwrap();
    let client =
        |mode: &'static str, protocol, user: &'static str, password: &str, extra: &[&str]| {
            let mut args: Vec<String> = [mode, "--port", &port(protocol), "--user", user]
                .iter()
                .map(|arg| arg.to_string())
                .collect();
            args.extend(["--password", password, "--cafile", ca].map(str::to_string));
            args.extend(extra.iter().map(|arg| arg.to_string()));
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                mail_client(&args).await
            }
        };

    // Real clients through the proxy to the domain's server, over IMAPS and POP3S with the
    // certificate from the pool's Secret; in clear text, STARTTLS is required (starttls: only).
    client(
        "imaps",
        ListenerProtocol::Imaps,
        "alice@example.com",
        first.password(),
        &["--append", "installed by helm"],
    )
    .await
    .unwrap_or_else(|error| panic!("IMAPS through the proxy: {error}\n{}", log_tail(&proxy_log)));
    client(
        "pop3s",
        ListenerProtocol::Pop3s,
        "alice@example.com",
        first.password(),
        &["--expect", "installed by helm"],
    )
    .await
    .unwrap_or_else(|error| panic!("POP3S through the proxy: {error}\n{}", log_tail(&proxy_log)));
    client(
        "imap",
        ListenerProtocol::Imap,
        "alice@example.com",
        first.password(),
        &["--expect-failure"],
    )
    .await
    .unwrap_or_else(|error| panic!("a cleartext login was not refused: {error}"));
    assert_eq!(
        dovecot_logins(&first, "alice@example.com"),
        2,
        "{}",
        first.log()
    );
    assert_eq!(dovecot_logins(&second, "alice@example.com"), 0);

    // bob goes to the domain's server until he is pinned to the second one; the running proxy
    // follows the route table the operator rewrites, without a restart.
    let bob = |password| {
        client(
            "imap-starttls",
            ListenerProtocol::Imap,
            "bob@example.com",
            password,
            &[],
        )
    };
    bob(first.password()).await.unwrap();
    assert_eq!(dovecot_logins(&first, "bob@example.com"), 1);
    apply(
        &servers,
        "mbs2",
        mailbox_server("mbs2", &second, json!({"accounts": ["bob@example.com"]})),
    )
    .await;
    eventually("bob's logins reach the second server", WAIT, || async {
        let _ = bob(second.password()).await;
        let accounts = route_table(&maps).await.map(|table| table.accounts);
        (dovecot_logins(&second, "bob@example.com") > 0)
            .then_some(())
            .ok_or_else(|| format!("route table accounts: {accounts:?}"))
    })
    .await;

    // Uninstalling removes the operator and its permissions; the CRDs, and so every user's
    // resources, stay (helm never deletes a chart's crds/).
    helm_ok(&[
        "uninstall",
        RELEASE,
        "--namespace",
        OPERATOR_NAMESPACE,
        "--kubeconfig",
        &kubeconfig,
    ])
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), OPERATOR_NAMESPACE);
    assert!(
        deployments
            .get_opt(OPERATOR_ACCOUNT)
            .await
            .unwrap()
            .is_none()
    );
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    assert!(roles.get_opt(OPERATOR_ACCOUNT).await.unwrap().is_none());
    assert!(
        crds.get_opt("proxypools.mailproxy.io")
            .await
            .unwrap()
            .is_some()
    );
    assert!(servers.get_opt("mbs1").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_charts_rbac_the_operator_stops_naming_what_it_lacks() {
    let cluster = ControlPlane::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    helm_install(&cluster, &["--set", "rbac.create=false"]);
    let admin = cluster.client().await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(admin);
    eventually("the CRDs are served", WAIT, || async {
        crds.get("proxypools.mailproxy.io")
            .await
            .map(|_| ())
            .map_err(|error| error.to_string())
    })
    .await;
    // The CRDs alone would not let it list ProxyPools: grant just that much, so that the
    // permission check itself is what stops it.
    let roles: Api<ClusterRole> = Api::all(cluster.client().await.unwrap());
    apply(
        &roles,
        "list-proxypools",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "list-proxypools"},
            "rules": [{"apiGroups": ["mailproxy.io"], "resources": ["proxypools", "mailboxservers"], "verbs": ["list"]}],
        }),
    )
    .await;
    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> =
        Api::all(cluster.client().await.unwrap());
    apply(
        &bindings,
        "list-proxypools",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "list-proxypools"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "list-proxypools"},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}],
        }),
    )
    .await;
    let operator_kubeconfig = cluster
        .service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT)
        .await
        .unwrap();
    let log = dir.path().join("operator.log");
    let mut operator = spawn(
        "mailproxy-operator",
        &[
            "run",
            "--http-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--log-format",
            "text",
        ],
        &[
            ("KUBECONFIG", &operator_kubeconfig),
            ("POD_NAMESPACE", Path::new(OPERATOR_NAMESPACE)),
        ],
        &log,
    );
    eventually("the operator stops", WAIT, || {
        let exited = operator.exited();
        async move {
            exited
                .then_some(())
                .ok_or_else(|| "still running".to_string())
        }
    })
    .await;
    let said = std::fs::read_to_string(&log).unwrap();
    for expected in [
        "the operator's ServiceAccount lacks",
        "watch configmaps in every namespace",
        "patch proxypools/status.mailproxy.io in every namespace",
        "create leases.coordination.k8s.io in namespace mailproxy-system",
        "Install the Helm chart's RBAC",
    ] {
        assert!(said.contains(expected), "{expected:?} in {said}");
    }
    assert!(
        !said.contains("list proxypools.mailproxy.io"),
        "a granted permission is not reported missing: {said}"
    );
}
