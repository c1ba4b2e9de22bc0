//! Files that change under a running process: certificates, the lookup secret and lookupd's
//! files, mounted from Secrets and ConfigMaps.
//!
//! Kubernetes updates a mounted Secret or ConfigMap by swapping a symlink in the parent
//! directory, which a watch on the file itself misses; a `stat` every few seconds costs nothing
//! and sees it, since the inode changes even when size and time happen to match.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What identifies a version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    /// The stamp of `path` now; `None` when it cannot be read (gone for a moment or for good).
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self {
            inode: metadata.ino(),
            len: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

/// Ticks every `interval`, the first one an interval from now; a late poll delays the next
/// rather than bunching them.
pub fn polls(interval: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// Reads `path` every `interval` once its stamp is no longer `seen` (that of the content in
/// force, taken before it was read, so that a change in between counts) and hands the text to
/// `apply`. A file that cannot be read or applied is logged once per version and the previous
/// content stays in force; `what` names the file in the logs (never its content, which may be a
/// secret).
pub fn follow<F>(
    path: PathBuf,
    mut seen: Option<FileStamp>,
    interval: Duration,
    what: &'static str,
    mut apply: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(&str) -> Result<(), String> + Send + 'static,
{
    tokio::spawn(async move {
        let mut ticks = polls(interval);
        loop {
            ticks.tick().await;
            let now = FileStamp::of(&path);
            if now.is_none() || now == seen {
                continue;
            }
            seen = now;
            let applied = tokio::fs::read_to_string(&path)
                .await
                .map_err(|error| error.to_string())
                .and_then(|text| apply(&text));
            match applied {
                Ok(()) => tracing::info!(path = %path.display(), "{what} reloaded"),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot reload the {what}; keeping the previous one");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn each_new_version_is_read_once_and_a_refused_one_does_not_stop_the_follow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "one").unwrap();
        let read = Arc::new(Mutex::new(Vec::new()));
        let reads = read.clone();
        let task = follow(
            path.clone(),
            FileStamp::of(&path),
            Duration::from_millis(20),
            "test file",
            move |text| {
                reads.lock().unwrap().push(text.to_string());
                if text == "bad" {
                    return Err("refused".into());
                }
                Ok(())
            },
        );
        // As a Secret update does it: a new file renamed over the old one.
        let replace = |text: &str| {
            let next = dir.path().join("next");
            std::fs::write(&next, text).unwrap();
            std::fs::rename(&next, &path).unwrap();
        };
        let read_so_far = |expected: &'static [&'static str]| {
            let read = read.clone();
            async move {
                mailproxy_testkit::eventually(
                    "the new version read",
                    Duration::from_secs(5),
                    async || {
                        let now = read.lock().unwrap().clone();
                        (now == expected).then_some(()).ok_or(format!("{now:?}"))
                    },
                )
                .await
            }
        };
        replace("two");
        read_so_far(&["two"]).await;
        replace("bad");
        read_so_far(&["two", "bad"]).await;
        replace("three");
        read_so_far(&["two", "bad", "three"]).await;
        task.abort();
    }
}
