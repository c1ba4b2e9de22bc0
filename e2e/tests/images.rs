//! The container images `scripts/build-images.sh` builds (the test command builds them first and
//! passes their directory in `MAILPROXY_IMAGES`): each one unpacked as a runtime would, its
//! binary run from the image's own root filesystem (chroot) as the image's user, and its
//! docker-archive tagged as the chart and the ProxyPool default expect.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn images() -> PathBuf {
    let dir = std::env::var_os("MAILPROXY_IMAGES")
        .map(PathBuf::from)
        .expect(
            "MAILPROXY_IMAGES is not set: run scripts/build-images.sh <dir> (scripts/test.sh does) \
         and export MAILPROXY_IMAGES=<dir>",
        );
    assert!(
        dir.join("oci").is_dir(),
        "{} holds no OCI layout: run scripts/build-images.sh {}",
        dir.display(),
        dir.display()
    );
    dir
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("the command runs");
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn each_image_runs_its_binary_as_the_non_root_user_from_its_own_files() {
    let images = images();
    for binary in ["mailproxy", "mailproxy-operator"] {
        let bundle = tempfile::tempdir().unwrap();
        let unpacked = bundle.path().join("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!(
                "{}:{binary}-{VERSION}",
                images.join("oci").display()
            ))
            .arg(&unpacked));
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(unpacked.join("config.json")).unwrap())
                .unwrap();
        let process = &config["process"];
        assert_eq!(process["user"]["uid"], 65532, "{binary}");
        assert_eq!(process["user"]["gid"], 65532, "{binary}");
        assert_eq!(process["args"][0], format!("/usr/local/bin/{binary}"));
        // Nothing of the host's: the image's loader, libraries and binary, as uid 65532.
        let said = run(Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(unpacked.join("rootfs"))
            .arg(format!("/usr/local/bin/{binary}"))
            .arg("--version"));
        assert_eq!(said.trim(), format!("{binary} {VERSION}"));
        assert!(
            unpacked
                .join("rootfs/etc/ssl/certs/ca-certificates.crt")
                .is_file()
        );
    }
}

#[test]
fn the_docker_archives_carry_the_tags_the_chart_and_the_proxy_pool_use() {
    let images = images();
    for binary in ["mailproxy", "mailproxy-operator"] {
        let manifest = run(Command::new("tar")
            .args(["-xOf"])
            .arg(images.join(format!("{binary}.tar")))
            .arg("manifest.json"));
        let manifest: Value = serde_json::from_str(&manifest).unwrap();
        assert_eq!(
            manifest[0]["RepoTags"],
            serde_json::json!([format!("docker.io/mailproxy/{binary}:{VERSION}")])
        );
    }
    let chart = std::fs::read_to_string(mailproxy_e2e::chart_dir().join("values.yaml")).unwrap();
    assert!(chart.contains("repository: mailproxy/mailproxy-operator"));
    assert_eq!(
        mailproxy_crds::proxy_pool::defaults::IMAGE,
        format!("mailproxy/mailproxy:{VERSION}")
    );
}
