//! Backoff of the controllers' watches. A controller merges all its watches (the resource, every
//! owned kind, the watched kind) into one stream with one backoff: each error pauses every
//! trigger. After an API server restart each of the ten watches reports 410 Gone once, so kube's
//! default (0.8 s doubling to 30 s, reset only after two quiet minutes) pauses the controller
//! for minutes. This one starts at 200 ms and stays at most 1 s, which still allows at most one
//! reconnect attempt per second per controller, and resets after 10 quiet seconds.

use std::time::Duration;

use kube::runtime::utils::{Backoff, ResetTimerBackoff};

const FIRST: Duration = Duration::from_millis(200);
const MAX: Duration = Duration::from_secs(1);
const RESET_AFTER: Duration = Duration::from_secs(10);

/// Doubling delays from [`FIRST`] to [`MAX`].
#[derive(Clone, Debug)]
pub struct Doubling {
    next: Duration,
}

impl Default for Doubling {
    fn default() -> Self {
        Self { next: FIRST }
    }
}

impl Iterator for Doubling {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (current * 2).min(MAX);
        Some(current)
    }
}

impl Backoff for Doubling {
    fn reset(&mut self) {
        self.next = FIRST;
    }
}

/// The watch backoff of both controllers.
pub fn watch_backoff() -> ResetTimerBackoff<Doubling> {
    ResetTimerBackoff::new(Doubling::default(), RESET_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_one_second_and_resets() {
        let mut backoff = Doubling::default();
        let delays: Vec<u128> = backoff.by_ref().take(5).map(|d| d.as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(FIRST));
    }
}
