//! The embedded tier: an in-process cache for a proxy that has no memcached.
//!
//! A fixed number of `RwLock<HashMap>` shards with an expiry time per entry, rather than `moka`:
//! the route cache needs memcached's semantics (`add` that keeps the first writer, per-entry TTL,
//! fixed-window counters that increment in place, delete of a list of keys), which are a few
//! lines each on a map and awkward through a cache crate's admission and eviction policies. A hit
//! is one SipHash of the key (keys come from clients, so the hash must resist flooding), a read
//! lock and a clone: tens of nanoseconds. Size is bounded per shard; a full shard first drops its
//! expired entries, then an arbitrary live one (std's randomly seeded hash order).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::keys::CacheKey;

const SHARDS: usize = 16;

/// How often a full shard scans for expired entries, at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub(super) struct EmbeddedCache {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    shard_capacity: usize,
}

struct Shard {
    entries: HashMap<String, Entry>,
    next_sweep: Option<Instant>,
}

struct Entry {
    value: String,
    expires: Instant,
}

impl EmbeddedCache {
    /// `capacity` entries in all (at least one per shard).
    pub fn new(capacity: usize) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                RwLock::new(Shard {
                    entries: HashMap::new(),
                    next_sweep: None,
                })
            })
            .collect();
        Self {
            shards,
            hasher: RandomState::new(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
        }
    }

    pub fn get(&self, key: &CacheKey) -> Option<String> {
        self.get_at(key, Instant::now())
    }

    /// memcached `add`: stores unless a live entry exists. `false` when one does.
    pub fn add(&self, key: &CacheKey, value: &str, ttl: Duration) -> bool {
        self.add_at(key, value, ttl, Instant::now())
    }

    pub fn delete(&self, key: &CacheKey) -> bool {
        self.delete_at(key, Instant::now())
    }

    /// A fixed-window counter, as the memcached tier's: the first count starts the window.
    pub fn count(&self, key: &CacheKey, window: Duration) -> u64 {
        self.count_at(key, window, Instant::now())
    }

    pub fn clear(&self) {
        for shard in &self.shards {
            write(shard).entries.clear();
        }
    }

    fn shard(&self, key: &CacheKey) -> &RwLock<Shard> {
        let hash = self.hasher.hash_one(key.as_str());
        // The remainder is below SHARDS, so the cast cannot truncate.
        &self.shards[(hash % SHARDS as u64) as usize]
    }

    fn get_at(&self, key: &CacheKey, now: Instant) -> Option<String> {
        let shard = self
            .shard(key)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        shard
            .entries
            .get(key.as_str())
            .filter(|entry| entry.expires > now)
            .map(|entry| entry.value.clone())
    }

    fn add_at(&self, key: &CacheKey, value: &str, ttl: Duration, now: Instant) -> bool {
        let mut shard = write(self.shard(key));
        if shard
            .entries
            .get(key.as_str())
            .is_some_and(|entry| entry.expires > now)
        {
            return false;
        }
        shard.insert(key, value.to_owned(), now + ttl, now, self.shard_capacity);
        true
    }

    fn delete_at(&self, key: &CacheKey, now: Instant) -> bool {
        write(self.shard(key))
            .entries
            .remove(key.as_str())
            .is_some_and(|entry| entry.expires > now)
    }

    fn count_at(&self, key: &CacheKey, window: Duration, now: Instant) -> u64 {
        let mut shard = write(self.shard(key));
        if let Some(entry) = shard.entries.get_mut(key.as_str())
            && entry.expires > now
            && let Ok(count) = entry.value.trim_end().parse::<u64>()
        {
            let count = count.saturating_add(1);
            entry.value = count.to_string();
            return count;
        }
        shard.insert(key, "1".to_owned(), now + window, now, self.shard_capacity);
        1
    }
}

impl Shard {
    fn insert(
        &mut self,
        key: &CacheKey,
        value: String,
        expires: Instant,
        now: Instant,
        capacity: usize,
    ) {
        if self.entries.len() >= capacity && !self.entries.contains_key(key.as_str()) {
            if self.next_sweep.is_none_or(|at| now >= at) {
                self.entries.retain(|_, entry| entry.expires > now);
                self.next_sweep = Some(now + SWEEP_INTERVAL);
            }
            if self.entries.len() >= capacity
                && let Some(victim) = self.entries.keys().next().cloned()
            {
                self.entries.remove(&victim);
            }
        }
        self.entries
            .insert(key.as_str().to_owned(), Entry { value, expires });
    }
}

fn write(shard: &RwLock<Shard>) -> std::sync::RwLockWriteGuard<'_, Shard> {
    shard.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Protocol;

    fn key(n: usize) -> CacheKey {
        CacheKey::route_account(Protocol::Imap, &format!("user{n}@example.com")).unwrap()
    }

    #[test]
    fn entries_expire_at_their_ttl() {
        let cache = EmbeddedCache::new(100);
        let start = Instant::now();
        let ttl = Duration::from_secs(60);
        assert!(cache.add_at(&key(1), "10.0.0.1:7143", ttl, start));
        assert_eq!(
            cache.get_at(&key(1), start + ttl - Duration::from_millis(1)),
            Some("10.0.0.1:7143".into())
        );
        assert_eq!(cache.get_at(&key(1), start + ttl), None);
        // An expired entry no longer blocks add.
        assert!(cache.add_at(&key(1), "10.0.0.2:7143", ttl, start + ttl));
        assert_eq!(
            cache.get_at(&key(1), start + ttl),
            Some("10.0.0.2:7143".into())
        );
    }

    #[test]
    fn add_keeps_the_first_writer_and_delete_removes() {
        let cache = EmbeddedCache::new(100);
        let ttl = Duration::from_secs(60);
        assert!(cache.add(&key(1), "first", ttl));
        assert!(!cache.add(&key(1), "second", ttl));
        assert_eq!(cache.get(&key(1)), Some("first".into()));
        assert!(cache.delete(&key(1)));
        assert!(!cache.delete(&key(1)));
        assert_eq!(cache.get(&key(1)), None);
    }

    #[test]
    fn counters_are_fixed_windows() {
        let cache = EmbeddedCache::new(100);
        let start = Instant::now();
        let window = Duration::from_secs(10);
        assert_eq!(cache.count_at(&key(1), window, start), 1);
        assert_eq!(
            cache.count_at(&key(1), window, start + Duration::from_secs(9)),
            2
        );
        assert_eq!(cache.get_at(&key(1), start), Some("2".into()));
        // The window is fixed at the first count: it ends 10 s after it, not after the last.
        assert_eq!(cache.count_at(&key(1), window, start + window), 1);
        assert_eq!(cache.count_at(&key(2), window, start), 1);
    }

    #[test]
    fn size_is_bounded_and_expired_entries_go_first() {
        let cache = EmbeddedCache::new(SHARDS * 4);
        let start = Instant::now();
        let short = Duration::from_secs(1);
        let long = Duration::from_secs(3600);
        for n in 0..1_000 {
            cache.add_at(&key(n), "v", short, start);
        }
        let total: usize = cache
            .shards
            .iter()
            .map(|s| s.read().unwrap().entries.len())
            .sum();
        assert!(total <= SHARDS * 4, "{total} entries");
        // Once the short entries have expired, new ones evict them rather than each other.
        let later = start + Duration::from_secs(2);
        for n in 1_000..1_004 {
            cache.add_at(&key(n), "v", long, later);
        }
        for n in 1_000..1_004 {
            assert_eq!(cache.get_at(&key(n), later), Some("v".into()));
        }
        cache.clear();
        assert_eq!(cache.get_at(&key(1_000), later), None);
    }
}
