//! Shared by the end-to-end tests: the chart, the helm binary that installs it, and the
//! workspace's own binaries (`mailproxy`, `mailproxy-operator`), which the tests run as the
//! processes a cluster would run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

/// The helm release `scripts/helm-binary.sh` builds.
pub const HELM_VERSION: &str = "3.19.5";

/// The checkout's root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the workspace root")
        .to_path_buf()
}

/// `charts/mailproxy-operator`.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/mailproxy-operator")
}

/// helm: `MAILPROXY_HELM`, else what `scripts/helm-binary.sh` caches in
/// `~/.cache/mailproxy/helm-v<version>/helm`; the error names the script.
pub fn helm_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("MAILPROXY_HELM") {
        Some(path) => PathBuf::from(path),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            Path::new(&home)
                .join(".cache/mailproxy")
                .join(format!("helm-v{HELM_VERSION}"))
                .join("helm")
        }
    };
    if !path.is_file() {
        bail!(
            "helm is missing at {}: run scripts/helm-binary.sh (it builds helm from its Go module) \
             and export MAILPROXY_HELM=<the path it prints>",
            path.display()
        );
    }
    Ok(path)
}

/// Runs helm with `args`, its configuration, cache and data in a fresh temporary directory (so
/// that no repository or plugin of the machine's user is involved).
pub fn helm(args: &[&str]) -> anyhow::Result<Output> {
    let home = tempfile::tempdir()?;
    let output = Command::new(helm_binary()?)
        .args(args)
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .context("cannot run helm")?;
    Ok(output)
}

/// Runs helm and fails with its output unless it succeeds; returns its standard output.
pub fn helm_ok(args: &[&str]) -> anyhow::Result<String> {
    let output = helm(args)?;
    if !output.status.success() {
        bail!(
            "helm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// `helm template` of the chart as release `release` in `namespace`, with `--set` values: the
/// rendered objects (CRDs included), in order.
pub fn render(release: &str, namespace: &str, set: &[&str]) -> anyhow::Result<Vec<Value>> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        release,
        chart.to_str().context("the checkout's path is not UTF-8")?,
        "--namespace",
        namespace,
        "--include-crds",
    ];
    for value in set {
        args.extend(["--set", value]);
    }
    parse_documents(&helm_ok(&args)?)
}

/// The objects of a multi-document YAML stream, empty documents left out.
pub fn parse_documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut objects = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let object = Value::deserialize(document).context("helm rendered invalid YAML")?;
        if !object.is_null() {
            objects.push(object);
        }
    }
    Ok(objects)
}

/// The rendered object of this kind and name.
pub fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    objects
        .iter()
        .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
        .with_context(|| format!("the chart rendered no {kind} named {name}"))
}

/// A binary of this workspace, built by `cargo test --workspace` next to the test executables'
/// `deps/` directory.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let test_executable = std::env::current_exe()?;
    let profile_dir = test_executable
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in a cargo target directory")?;
    let binary = profile_dir.join(name);
    if !binary.is_file() {
        bail!(
            "{} is missing: build it with `cargo build -p mailproxy -p mailproxy-operator` \
             (`cargo test --workspace` does)",
            binary.display()
        );
    }
    Ok(binary)
}
