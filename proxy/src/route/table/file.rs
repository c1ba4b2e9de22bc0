//! A route table in a file, reloaded when it changes.

use std::path::{Path, PathBuf};

use mailproxy_crds::route_table::RouteTable;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{TableHandle, TablePublisher};

/// Why a route-table file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileTableError {
    #[error("cannot read route table {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("route table {path} is invalid: {source}")]
    Invalid {
        path: PathBuf,
        source: mailproxy_crds::route_table::RouteTableError,
    },
    #[error("cannot watch {path} for changes: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

fn load(path: &Path) -> Result<RouteTable, FileTableError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileTableError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    RouteTable::from_json(&text).map_err(|source| FileTableError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the table at `path` and keeps it current: every change in the file's directory
/// re-reads it. The directory is watched rather than the file because Kubernetes updates a
/// mounted ConfigMap by swapping a symlink, which a watch on the old file never sees.
///
/// The first load must succeed; a later invalid file is logged and the last good table stays.
/// The watch ends when every [`TableHandle`] is dropped.
pub fn watch_file(path: impl Into<PathBuf>) -> Result<TableHandle, FileTableError> {
    let path = path.into();
    let (publisher, handle) = TablePublisher::new(load(&path)?);
    // Bursts of events (write, chmod, rename) collapse into one pending reload.
    let (wake, mut woken) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        let _ = wake.try_send(());
    })
    .map_err(|source| FileTableError::Watch {
        path: path.clone(),
        source,
    })?;
    let directory = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    watcher
        .watch(&directory, RecursiveMode::NonRecursive)
        .map_err(|source| FileTableError::Watch {
            path: directory.clone(),
            source,
        })?;
    tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                woke = woken.recv() => {
                    if woke.is_none() {
                        return;
                    }
                }
                () = publisher.sender.closed() => return,
            }
            match load(&path) {
                Ok(table) => {
                    publisher.publish(table);
                }
                Err(error) => {
                    tracing::error!(%error, "route table reload failed; still serving the previous table");
                }
            }
        }
    });
    Ok(handle)
}
