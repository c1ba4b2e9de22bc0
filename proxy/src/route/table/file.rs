//! A route table in a file, reloaded when it changes.

use std::path::{Path, PathBuf};

use mailproxy_crds::route_table::RouteTable;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
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

/// Whether an event in the file's directory can mean new content. Opening and reading are not
/// changes, and counting them would loop: every reload opens the file, and the open would
/// trigger the next reload. Closing after a write is (the writer has finished).
fn may_change_the_file(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
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
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_err() || event.is_ok_and(|event| may_change_the_file(&event.kind)) {
            let _ = wake.try_send(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind};

    #[test]
    fn reading_the_file_is_not_a_change_writing_and_replacing_it_are() {
        assert!(!may_change_the_file(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!may_change_the_file(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(may_change_the_file(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(may_change_the_file(&EventKind::Create(CreateKind::File)));
        assert!(may_change_the_file(&EventKind::Remove(RemoveKind::File)));
        assert!(may_change_the_file(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
    }
}
