//! A real Kubernetes control plane on free loopback ports: etcd, kube-apiserver and
//! kube-controller-manager run as local processes (what controller-runtime's envtest does, plus
//! the controller manager so that Deployments get ReplicaSets and Pods, and owner references are
//! garbage-collected). There is no kubelet and no node: Pods stay Pending.
//!
//! The binaries come from `scripts/control-plane-binaries.sh`, found through `MAILPROXY_K8S_BIN`
//! or in `~/.cache/mailproxy/k8s-v1.34.4`. Certificates (a CA, the API server's serving
//! certificate, an admin client certificate in `system:masters`) and the service-account signing
//! key are generated for each control plane.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::process::{Guard, free_port, wait_for_port};

/// The Kubernetes version the binaries are built at; it matches the k8s-openapi feature (v1_34).
pub const KUBERNETES_VERSION: &str = "1.34.4";

const BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// What to set up before the controller manager starts.
#[derive(Clone, Debug, Default)]
pub struct ControlPlaneOptions {
    /// CustomResourceDefinitions installed (and waited for until Established) before
    /// kube-controller-manager starts, so that its garbage collector knows their kinds from the
    /// start instead of after its next discovery resync.
    pub crds: Vec<CustomResourceDefinition>,
}

/// etcd, kube-apiserver and kube-controller-manager, stopped when dropped. The API server can be
/// stopped and started again on the same port and data (failure tests).
pub struct ControlPlane {
    controller_manager: Mutex<Guard>,
    apiserver: Mutex<Guard>,
    etcd: Mutex<Guard>,
    reaper: Guard,
    bin: PathBuf,
    apiserver_port: u16,
    etcd_port: u16,
    kubeconfig: PathBuf,
    ca_pem: String,
    dir: TempDir,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url())
            .field("kubeconfig", &self.kubeconfig)
            .finish()
    }
}

impl ControlPlane {
    /// The directory holding the control-plane binaries: `MAILPROXY_K8S_BIN`, else
    /// `~/.cache/mailproxy/k8s-v1.34.4`; an error names the script that builds them.
    pub fn binaries() -> anyhow::Result<PathBuf> {
        let dir = match std::env::var_os("MAILPROXY_K8S_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let home = std::env::var_os("HOME").context("HOME is not set")?;
                Path::new(&home)
                    .join(".cache/mailproxy")
                    .join(format!("k8s-v{KUBERNETES_VERSION}"))
            }
        };
        let missing: Vec<&str> = BINARIES
            .into_iter()
            .filter(|binary| !dir.join(binary).is_file())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} missing in {}: run scripts/control-plane-binaries.sh (it builds them from Go \
                 modules) and export MAILPROXY_K8S_BIN=<the directory it prints>",
                missing.join(", "),
                dir.display()
            );
        }
        Ok(dir)
    }

    /// Starts a control plane with no custom resources.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ControlPlaneOptions::default()).await
    }

    /// Starts etcd and kube-apiserver, waits for `/readyz`, installs `options.crds`, then starts
    /// kube-controller-manager.
    pub async fn start_with(options: ControlPlaneOptions) -> anyhow::Result<Self> {
        let bin = Self::binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("mailproxy-k8s-")
            .tempdir()?;
        let pki = Pki::generate()?;
        pki.write(dir.path())?;
        let apiserver_port = free_port();
        let etcd_port = free_port();
        let kubeconfig = dir.path().join("admin.kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(
                &format!("https://127.0.0.1:{apiserver_port}"),
                &pki.ca_pem,
                User::Certificate {
                    cert_pem: &pki.admin_cert_pem,
                    key_pem: &pki.admin_key_pem,
                },
            ),
        )?;
        let reaper = spawn_reaper(dir.path())?;
        let control_plane = Self {
            controller_manager: Mutex::new(Guard(None)),
            apiserver: Mutex::new(Guard(None)),
            etcd: Mutex::new(Guard(None)),
            reaper,
            bin,
            apiserver_port,
            etcd_port,
            kubeconfig,
            ca_pem: pki.ca_pem,
            dir,
        };
        control_plane.start_etcd()?;
        control_plane.start_apiserver().await?;
        control_plane.install_crds(&options.crds).await?;
        control_plane.start_controller_manager().await?;
        Ok(control_plane)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// A kubeconfig for the admin user (`system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A client for the admin user. A kube client belongs to the Tokio runtime it was made on:
    /// make one per test.
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// A client that authenticates as a ServiceAccount with a token from the TokenRequest API
    /// (what a pod's projected token is).
    pub async fn service_account_client(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<Client> {
        let path = self
            .service_account_kubeconfig(namespace, service_account)
            .await?;
        client_from_kubeconfig(&path).await
    }

    /// A kubeconfig file that authenticates as a ServiceAccount with a token from the
    /// TokenRequest API, for a process that runs as that ServiceAccount (an operator or proxy
    /// binary under the permissions its pod would have).
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<PathBuf> {
        let admin = self.client().await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(admin, namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let issued = accounts
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .with_context(|| {
                format!("TokenRequest for ServiceAccount {namespace}/{service_account}")
            })?;
        let token = issued
            .status
            .context("the TokenRequest came back without a status")?
            .token;
        let path = self
            .dir
            .path()
            .join(format!("sa-{namespace}-{service_account}.kubeconfig"));
        std::fs::write(
            &path,
            kubeconfig_yaml(&self.url(), &self.ca_pem, User::Token(&token)),
        )?;
        Ok(path)
    }

    /// Stops kube-apiserver (etcd keeps the data); [`ControlPlane::restart_apiserver`] brings it
    /// back on the same port.
    pub fn stop_apiserver(&self) {
        let _ = std::fs::remove_file(self.pid_file("kube-apiserver"));
        lock(&self.apiserver).kill();
    }

    /// Starts kube-apiserver again after [`ControlPlane::stop_apiserver`] and waits for `/readyz`.
    pub async fn restart_apiserver(&self) -> anyhow::Result<()> {
        self.start_apiserver().await
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pid"))
    }

    fn log_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn spawn(&self, name: &str, args: &[String]) -> anyhow::Result<Guard> {
        let log = self.log_file(name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let program = self.bin.join(name);
        let child = Command::new(&program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}: rebuild it with scripts/control-plane-binaries.sh",
                    program.display()
                )
            })?;
        std::fs::write(self.pid_file(name), child.id().to_string())?;
        Ok(Guard(Some(child)))
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log_file(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn start_etcd(&self) -> anyhow::Result<()> {
        let peer_port = free_port();
        let client_url = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let data = self.dir.path().join("etcd");
        let args = [
            "--name=test".to_string(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=test={peer_url}"),
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
        ];
        let mut guard = self.spawn("etcd", &args)?;
        if let Err(error) = wait_for_port(self.etcd_port, Duration::from_secs(30)) {
            let exited = guard.exited();
            bail!(
                "etcd did not listen on {client_url} (exited: {exited}): {error}\n{}",
                self.log_tail("etcd")
            );
        }
        *lock(&self.etcd) = guard;
        Ok(())
    }

    fn apiserver_args(&self) -> Vec<String> {
        let dir = self.dir.path();
        let file = |name: &str| dir.join(name).display().to_string();
        vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            format!("--secure-port={}", self.apiserver_port),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--cert-dir={}", file("apiserver-certs")),
            format!("--tls-cert-file={}", file("apiserver.crt")),
            format!("--tls-private-key-file={}", file("apiserver.key")),
            format!("--client-ca-file={}", file("ca.crt")),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            // OpenShift enables it: an owner reference with blockOwnerDeletion needs `update` on
            // the owner's finalizers, which tests running as a ServiceAccount then prove it has.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", file("sa.pub")),
            format!("--service-account-signing-key-file={}", file("sa.key")),
            "--profiling=false".into(),
        ]
    }

    async fn start_apiserver(&self) -> anyhow::Result<()> {
        let mut guard = self.spawn("kube-apiserver", &self.apiserver_args())?;
        let client = self.client().await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let request = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => break,
                _ if guard.exited() => bail!(
                    "kube-apiserver exited during start:\n{}",
                    self.log_tail("kube-apiserver")
                ),
                result if Instant::now() > deadline => bail!(
                    "kube-apiserver on {} not ready within 90 s (last answer: {result:?}):\n{}",
                    self.url(),
                    self.log_tail("kube-apiserver")
                ),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        *lock(&self.apiserver) = guard;
        Ok(())
    }

    /// Starts kube-controller-manager and waits until its controllers run: the root-CA publisher
    /// has written `kube-root-ca.crt` into the `default` namespace.
    async fn start_controller_manager(&self) -> anyhow::Result<()> {
        let dir = self.dir.path();
        let args = [
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--secure-port=0".to_string(),
            "--leader-elect=false".to_string(),
            format!("--root-ca-file={}", dir.join("ca.crt").display()),
            format!(
                "--service-account-private-key-file={}",
                dir.join("sa.key").display()
            ),
            "--use-service-account-credentials=false".to_string(),
            "--concurrent-gc-syncs=5".to_string(),
        ];
        let mut guard = self.spawn("kube-controller-manager", &args)?;
        let maps: Api<ConfigMap> = Api::namespaced(self.client().await?, "default");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if maps
                .get_opt("kube-root-ca.crt")
                .await
                .ok()
                .flatten()
                .is_some()
            {
                break;
            }
            if guard.exited() {
                bail!(
                    "kube-controller-manager exited at start:\n{}",
                    self.log_tail("kube-controller-manager")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager did not publish kube-root-ca.crt within 60 s:\n{}",
                    self.log_tail("kube-controller-manager")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        *lock(&self.controller_manager) = guard;
        Ok(())
    }

    async fn install_crds(&self, crds: &[CustomResourceDefinition]) -> anyhow::Result<()> {
        if crds.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let params = PatchParams::apply("mailproxy-testkit").force();
        for crd in crds {
            let name = crd.metadata.name.clone().context("a CRD without a name")?;
            api.patch(&name, &params, &Patch::Apply(crd))
                .await
                .with_context(|| format!("cannot apply CRD {name}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            loop {
                let current = api.get(&name).await?;
                let established = current
                    .status
                    .and_then(|status| status.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("CRD {name} was not Established within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        lock(&self.controller_manager).kill();
        lock(&self.apiserver).kill();
        lock(&self.etcd).kill();
        self.reaper.kill();
    }
}

fn lock(guard: &Mutex<Guard>) -> std::sync::MutexGuard<'_, Guard> {
    guard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A control plane kept in a `static` is never dropped: this watchdog stops its processes and
/// removes its directory once the test process has exited.
fn spawn_reaper(dir: &Path) -> anyhow::Result<Guard> {
    let script = r#"
parent="$1"; dir="$2"
while kill -0 "$parent" 2>/dev/null; do sleep 1; done
for f in "$dir"/*.pid; do [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null; done
sleep 3
for f in "$dir"/*.pid; do [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null; done
rm -rf "$dir"
"#;
    let child = Command::new("sh")
        .args(["-c", script, "reaper"])
        .arg(std::process::id().to_string())
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start the control plane's watchdog shell")?;
    Ok(Guard(Some(child)))
}

async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("invalid kubeconfig {}", path.display()))?;
    Ok(Client::try_from(config)?)
}

enum User<'a> {
    Certificate { cert_pem: &'a str, key_pem: &'a str },
    Token(&'a str),
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, user: User<'_>) -> String {
    let credentials = match user {
        User::Certificate { cert_pem, key_pem } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            BASE64.encode(cert_pem),
            BASE64.encode(key_pem)
        ),
        User::Token(token) => format!("    token: {token}\n"),
    };
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: test
  user:
{credentials}contexts:
- name: test
  context:
    cluster: test
    user: test
    namespace: default
current-context: test
",
        ca = BASE64.encode(ca_pem)
    )
}

/// The certificates and keys of one control plane.
struct Pki {
    ca_pem: String,
    apiserver_cert_pem: String,
    apiserver_key_pem: String,
    admin_cert_pem: String,
    admin_key_pem: String,
    service_account_key_pem: String,
    service_account_public_pem: String,
}

impl Pki {
    fn generate() -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mailproxy-test-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca_params.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let apiserver_key = KeyPair::generate()?;
        let mut apiserver = CertificateParams::new(
            [
                "127.0.0.1",
                "localhost",
                "10.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ]
            .map(String::from)
            .to_vec(),
        )?;
        apiserver
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        apiserver.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let apiserver_cert_pem = apiserver.signed_by(&apiserver_key, &issuer)?.pem();

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "mailproxy-test-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert_pem = admin.signed_by(&admin_key, &issuer)?.pem();

        let service_account = KeyPair::generate()?;
        Ok(Self {
            ca_pem,
            apiserver_cert_pem,
            apiserver_key_pem: apiserver_key.serialize_pem(),
            admin_cert_pem,
            admin_key_pem: admin_key.serialize_pem(),
            service_account_key_pem: service_account.serialize_pem(),
            service_account_public_pem: service_account.public_key_pem(),
        })
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        for (name, pem) in [
            ("ca.crt", &self.ca_pem),
            ("apiserver.crt", &self.apiserver_cert_pem),
            ("apiserver.key", &self.apiserver_key_pem),
            ("sa.key", &self.service_account_key_pem),
            ("sa.pub", &self.service_account_public_pem),
        ] {
            std::fs::write(dir.join(name), pem)
                .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
        }
        Ok(())
    }
}
