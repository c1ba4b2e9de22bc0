//! The file source of the route table: reloads on change (including Kubernetes' symlink swap of
//! a mounted ConfigMap), keeps the last good table when the file turns invalid.

use std::time::Duration;

use mailproxy::route::table::{TableHandle, watch_file};
use mailproxy_crds::route_table::RouteTable;

fn table(ttl: u64) -> RouteTable {
    let mut table = RouteTable::default();
    table.settings.cache_ttl_seconds = ttl;
    table
}

async fn next(handle: &mut TableHandle) -> u64 {
    tokio::time::timeout(Duration::from_secs(10), handle.changed())
        .await
        .expect("a reload within 10 s")
        .expect("the source is alive")
        .settings
        .cache_ttl_seconds
}

#[tokio::test]
async fn reloads_on_change_and_keeps_the_last_good_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.json");
    std::fs::write(&path, table(100).to_json()).unwrap();
    let mut handle = watch_file(&path).unwrap();
    assert_eq!(handle.current().settings.cache_ttl_seconds, 100);

    std::fs::write(&path, table(200).to_json()).unwrap();
    assert_eq!(next(&mut handle).await, 200);

    std::fs::write(&path, "{ not json").unwrap();
    std::fs::write(&path, table(300).to_json()).unwrap();
    assert_eq!(
        next(&mut handle).await,
        300,
        "an invalid version in between is skipped"
    );

    std::fs::write(&path, r#"{"accounts": {"a@b.c": "missing-server"}}"#).unwrap();
    let unchanged = tokio::time::timeout(Duration::from_millis(500), handle.changed()).await;
    assert!(unchanged.is_err(), "an invalid table is never published");
    assert_eq!(handle.current().settings.cache_ttl_seconds, 300);
}

#[tokio::test]
async fn follows_a_kubernetes_style_symlink_swap() {
    let dir = tempfile::tempdir().unwrap();
    let write_version = |name: &str, ttl: u64| {
        let version = dir.path().join(name);
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("routes.json"), table(ttl).to_json()).unwrap();
        let staging = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(name, &staging).unwrap();
        std::fs::rename(&staging, dir.path().join("..data")).unwrap();
    };
    write_version("..v1", 10);
    std::os::unix::fs::symlink("..data/routes.json", dir.path().join("routes.json")).unwrap();
    let mut handle = watch_file(dir.path().join("routes.json")).unwrap();
    assert_eq!(handle.current().settings.cache_ttl_seconds, 10);
    write_version("..v2", 20);
    assert_eq!(next(&mut handle).await, 20);
}

#[tokio::test]
async fn a_missing_or_invalid_file_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = watch_file(dir.path().join("nope.json")).unwrap_err();
    assert!(
        missing.to_string().contains("cannot read route table"),
        "{missing}"
    );
    let path = dir.path().join("bad.json");
    std::fs::write(&path, "[]").unwrap();
    let invalid = watch_file(&path).unwrap_err();
    assert!(invalid.to_string().contains("is invalid"), "{invalid}");
}
