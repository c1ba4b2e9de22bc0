//! Ketama consistent hashing over the memcached servers.
//!
//! Hand-written rather than taken from a crate: the classic ketama points (MD5 of
//! `<host:port>-<n>`, four 32-bit little-endian points per digest, 160 points per server, a key
//! hashed by the first four bytes of its MD5) are a few dozen lines on top of the `md-5` crate we
//! already use for long keys, and they place keys where libmemcached, twemproxy and spymemcached's
//! ketama locators place them. The crates on crates.io (`hashring` and the like) use their own
//! hash functions and point layouts, which would share no placement with those clients.
//!
//! Unlike Zimbra's `hash % server count`, adding or removing one of N servers moves only about
//! 1/N of the keys.

use md5::{Digest, Md5};

/// Points per server (40 digests of 4 points each), as in libketama.
const POINTS_PER_SERVER: usize = 160;

/// The ring: sorted points, each owned by a server index.
#[derive(Clone, Debug, Default)]
pub struct Ring {
    points: Vec<(u32, usize)>,
    servers: usize,
}

impl Ring {
    /// Places each server by its name as given (`host:port`), so every proxy that lists the same
    /// servers builds the same ring, whatever the order of the list.
    pub fn new<S: AsRef<str>>(servers: &[S]) -> Self {
        let mut points = Vec::with_capacity(servers.len() * POINTS_PER_SERVER);
        for (index, server) in servers.iter().enumerate() {
            for digest_number in 0..POINTS_PER_SERVER / 4 {
                let digest = Md5::digest(format!("{}-{digest_number}", server.as_ref()));
                for chunk in digest.chunks_exact(4) {
                    let point = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    points.push((point, index));
                }
            }
        }
        // Ties between servers are broken by name so the ring does not depend on list order.
        points.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| servers[a.1].as_ref().cmp(servers[b.1].as_ref()))
        });
        Self {
            points,
            servers: servers.len(),
        }
    }

    /// The key's ketama hash: the first four bytes of its MD5, little-endian.
    pub fn hash(key: &[u8]) -> u32 {
        let digest = Md5::digest(key);
        u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
    }

    /// The servers in the order a key tries them: its owner first, then each other server in the
    /// order their points follow on the ring. When the owner is down its keys go to the next
    /// server on the ring, and only those keys move.
    pub fn candidates(&self, key: &[u8]) -> Candidates<'_> {
        let hash = Self::hash(key);
        let start = self.points.partition_point(|&(point, _)| point < hash);
        Candidates {
            ring: self,
            offset: 0,
            start,
            seen: vec![false; self.servers],
            found: 0,
        }
    }
}

/// Distinct servers in ring order from a key's position.
pub struct Candidates<'a> {
    ring: &'a Ring,
    start: usize,
    offset: usize,
    seen: Vec<bool>,
    found: usize,
}

impl Iterator for Candidates<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let len = self.ring.points.len();
        while self.found < self.ring.servers && self.offset < len {
            let (_, server) = self.ring.points[(self.start + self.offset) % len];
            self.offset += 1;
            if !self.seen[server] {
                self.seen[server] = true;
                self.found += 1;
                return Some(server);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(ring: &Ring, keys: &[String]) -> Vec<usize> {
        keys.iter()
            .map(|key| ring.candidates(key.as_bytes()).next().unwrap())
            .collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("route:proto=imap;user=user{i}@example.com"))
            .collect()
    }

    #[test]
    fn empty_ring_has_no_candidates() {
        let ring = Ring::new::<&str>(&[]);
        assert_eq!(ring.candidates(b"k").next(), None);
    }

    #[test]
    fn every_server_is_a_candidate_once() {
        let ring = Ring::new(&["a:11211", "b:11211", "c:11211"]);
        for key in keys(50) {
            let mut order: Vec<usize> = ring.candidates(key.as_bytes()).collect();
            assert_eq!(order.len(), 3);
            order.sort_unstable();
            assert_eq!(order, [0, 1, 2]);
        }
    }

    #[test]
    fn keys_spread_over_all_servers() {
        let ring = Ring::new(&["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"]);
        let keys = keys(30_000);
        let mut counts = [0usize; 3];
        for owner in owners(&ring, &keys) {
            counts[owner] += 1;
        }
        for count in counts {
            // An even split is 10,000 each; 160 points per server keep every share within 25%.
            assert!(
                (7_500..12_500).contains(&count),
                "uneven spread: {counts:?}"
            );
        }
    }

    #[test]
    fn removing_a_server_moves_only_its_keys() {
        let all = ["m0:11211", "m1:11211", "m2:11211"];
        let before = Ring::new(&all);
        let after = Ring::new(&[all[0], all[2]]);
        let keys = keys(5_000);
        let mut moved = 0;
        for (key, owner) in keys.iter().zip(owners(&before, &keys)) {
            let new_owner = after.candidates(key.as_bytes()).next().unwrap();
            let new_name = [all[0], all[2]][new_owner];
            if owner == 1 {
                moved += 1;
                // Its keys go to the server that followed it on the old ring.
                let next = before.candidates(key.as_bytes()).nth(1).unwrap();
                assert_eq!(new_name, all[next]);
            } else {
                assert_eq!(new_name, all[owner], "a key of a surviving server moved");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn adding_a_server_moves_about_a_quarter_of_the_keys() {
        let three = ["m0:11211", "m1:11211", "m2:11211"];
        let four = ["m0:11211", "m1:11211", "m2:11211", "m3:11211"];
        let keys = keys(10_000);
        let before = owners(&Ring::new(&three), &keys);
        let after = owners(&Ring::new(&four), &keys);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert!(after.iter().zip(&before).all(|(a, b)| a == b || *a == 3));
        assert!((1_500..3_500).contains(&moved), "{moved} keys moved");
    }

    #[test]
    fn list_order_does_not_matter() {
        let a = Ring::new(&["x:1", "y:2", "z:3"]);
        let b = Ring::new(&["z:3", "x:1", "y:2"]);
        let names_a = ["x:1", "y:2", "z:3"];
        let names_b = ["z:3", "x:1", "y:2"];
        for key in keys(1_000) {
            let owner_a = names_a[a.candidates(key.as_bytes()).next().unwrap()];
            let owner_b = names_b[b.candidates(key.as_bytes()).next().unwrap()];
            assert_eq!(owner_a, owner_b);
        }
    }
}
