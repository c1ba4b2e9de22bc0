//! A route table in a file, reloaded when it changes.

use std::ffi::OsStr;
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

/// Whether an event in the file's directory can mean new content for the file named
/// `file_name`. Opening and reading are not changes, and counting them would loop: every reload
/// opens the file, and the open would trigger the next reload. Closing after a write is (the
/// writer has finished). Events on other files of the directory are not changes either (a
/// standalone proxy's table may share a busy directory), except Kubernetes' own entries, whose
/// names start with `..`: a mounted ConfigMap changes by swapping its `..data` symlink, and the
/// file is a symlink through it. An event naming no file (the kernel's queue overflowed) may
/// hide anything.
fn may_change_the_file(event: &notify::Event, file_name: &OsStr) -> bool {
    let content_may_change = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    let concerns_the_file = event.paths.is_empty()
        || event.paths.iter().any(|path| {
            path.file_name()
                .is_some_and(|name| name == file_name || name.as_encoded_bytes().starts_with(b".."))
        });
    content_may_change && concerns_the_file
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
    let file_name = path
        .file_name()
        .map(OsStr::to_os_string)
        .unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_err() || event.is_ok_and(|event| may_change_the_file(&event, &file_name)) {
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

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn reading_the_file_is_not_a_change_writing_and_replacing_it_are() {
        let name = OsStr::new("routes.json");
        let file = "/etc/mailproxy/routes.json";
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(!may_change_the_file(&event(kind, file), name), "{kind:?}");
        }
        for kind in [
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Create(CreateKind::File),
            EventKind::Remove(RemoveKind::File),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ] {
            assert!(may_change_the_file(&event(kind, file), name), "{kind:?}");
        }
    }

    #[test]
    fn other_files_are_not_changes_kubernetes_symlink_swaps_and_overflows_are() {
        let name = OsStr::new("routes.json");
        let written = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(!may_change_the_file(
            &event(written, "/etc/mailproxy/notes.txt"),
            name
        ));
        assert!(!may_change_the_file(
            &event(written, "/etc/mailproxy/routes.json.bak"),
            name
        ));
        let swapped = EventKind::Create(CreateKind::Any);
        assert!(may_change_the_file(
            &event(swapped, "/etc/mailproxy/..data"),
            name
        ));
        assert!(may_change_the_file(
            &notify::Event::new(EventKind::Other),
            name
        ));
    }
}
