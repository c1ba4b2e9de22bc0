//! When something last happened, for idle timeouts: a session's last byte either way, an HTTP/2
//! connection's last stream. Kept as milliseconds from a start instant in an atomic, so that the
//! tasks that act and the task that times out share it without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct ActivityClock {
    origin: Instant,
    /// Milliseconds from `origin` to the last activity.
    last: AtomicU64,
}

impl ActivityClock {
    /// A clock whose last activity is now.
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let elapsed = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Resolves once nothing happened for `idle` while `busy` said no: time spent busy (an open
    /// stream) never counts as idle.
    pub(crate) async fn idle_for(&self, idle: Duration, busy: impl Fn() -> bool) {
        loop {
            let deadline = if busy() {
                Instant::now() + idle
            } else {
                self.last() + idle
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
