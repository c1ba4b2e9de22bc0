//! Deleting a MailboxServer's cached routes from memcached.
//!
//! The client is hand-written: the operator needs one command of the memcached text protocol
//! (`delete <key>\r\n`, answered `DELETED` or `NOT_FOUND`), pipelined, under a hard deadline,
//! against servers that may be gone. A client crate would bring connection pools, retries and
//! codecs for the rest of the protocol, none of which helps here.

use std::time::Duration;

use mailproxy_crds::cache_key::{ROUTE_PROTOCOLS, route_account};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// `route:proto=<protocol>;user=<account>` for every protocol and account (as written and in
/// lower case, the two forms a proxy may have cached), in the proxies' own key format: escaped,
/// and hashed when too long for memcached.
pub fn route_keys(accounts: &[String]) -> Vec<String> {
    let mut keys = Vec::new();
    for account in accounts {
        let lower = account.to_ascii_lowercase();
        let forms: &[&str] = if lower == *account {
            &[account.as_str()]
        } else {
            &[account.as_str(), lower.as_str()]
        };
        for form in forms {
            // An empty name has no key: no proxy caches a route for it.
            keys.extend(
                ROUTE_PROTOCOLS
                    .iter()
                    .filter_map(|protocol| route_account(protocol, form).ok()),
            );
        }
    }
    keys
}

/// What one memcached server answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    pub deleted: usize,
    pub not_found: usize,
}

/// Why a server could not be purged.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("memcached {addr} cannot be reached: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("memcached {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("memcached {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("memcached {addr} answered {line:?} to a delete")]
    Protocol { addr: String, line: String },
}

impl PurgeError {
    /// A memcached that takes no connection serves no route either, stale or not; one that
    /// took the connection and failed still may.
    pub fn unreachable(&self) -> bool {
        matches!(self, PurgeError::Unreachable { .. })
    }
}

/// Deletes per second a busy memcached is still expected to answer: the exchange's deadline
/// grows with the number of keys (a server pinning thousands of accounts has tens of thousands).
const DELETES_PER_SECOND: u64 = 10_000;

/// Deletes `keys` on the memcached at `addr` (`host:port`): connects within `timeout`, then
/// exchanges within `timeout` plus a second per [`DELETES_PER_SECOND`] keys.
pub async fn purge(addr: &str, keys: &[String], timeout: Duration) -> Result<Purged, PurgeError> {
    let unreachable = |source| PurgeError::Unreachable {
        addr: addr.to_string(),
        source,
    };
    // A refusal or a name that no longer resolves: nothing reads routes from there. Silence is
    // not that: a NetworkPolicy that does not admit the operator drops its SYNs while the
    // proxies still read the routes.
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(connected) => connected.map_err(unreachable)?,
        Err(_) => {
            return Err(PurgeError::Timeout {
                addr: addr.to_string(),
                timeout,
            });
        }
    };
    let exchange_timeout = timeout + Duration::from_secs(keys.len() as u64 / DELETES_PER_SECOND);
    match tokio::time::timeout(exchange_timeout, exchange(addr, stream, keys)).await {
        Ok(result) => result,
        Err(_) => Err(PurgeError::Timeout {
            addr: addr.to_string(),
            timeout: exchange_timeout,
        }),
    }
}

async fn exchange(addr: &str, stream: TcpStream, keys: &[String]) -> Result<Purged, PurgeError> {
    let io = |source| PurgeError::Io {
        addr: addr.to_string(),
        source,
    };
    let (read, mut write) = stream.into_split();
    let commands: String = keys.iter().map(|key| format!("delete {key}\r\n")).collect();
    let send = async move {
        write.write_all(commands.as_bytes()).await?;
        write.flush().await
    };
    let receive = async {
        let mut reader = BufReader::new(read);
        let mut purged = Purged::default();
        let mut line = String::new();
        for _ in keys {
            line.clear();
            if reader.read_line(&mut line).await.map_err(io)? == 0 {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            match line.trim_end() {
                "DELETED" => purged.deleted += 1,
                "NOT_FOUND" => purged.not_found += 1,
                other => {
                    return Err(PurgeError::Protocol {
                        addr: addr.to_string(),
                        line: other.to_string(),
                    });
                }
            }
        }
        Ok(purged)
    };
    let (sent, received) = tokio::join!(send, receive);
    sent.map_err(io)?;
    received
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cover_every_protocol_and_both_cases() {
        let keys = route_keys(&["Alice@Example.com".into(), "bob@example.com".into()]);
        assert_eq!(keys.len(), 18);
        assert!(keys.contains(&"route:proto=imap;user=Alice@Example.com".to_string()));
        assert!(keys.contains(&"route:proto=httpssl;user=alice@example.com".to_string()));
        assert!(keys.contains(&"route:proto=pop3ssl;user=bob@example.com".to_string()));
    }

    #[test]
    fn keys_are_the_ones_the_proxies_cache_under_escaped_and_hashed() {
        let keys = route_keys(&["a b%c@example.com".into()]);
        assert!(
            keys.contains(&"route:proto=imap;user=a%20b%25c@example.com".to_string()),
            "{keys:?}"
        );
        let long = format!("{}@example.com", "x".repeat(300));
        let keys = route_keys(&[long]);
        assert_eq!(keys.len(), 6);
        assert!(keys.iter().all(|key| key.len() == 32), "{keys:?}");
        // The MD5 of route:proto=imap;user=<long>, as memcached holds it.
        assert_eq!(keys[0], "878e5b8bf85202f51799bc5974d57c95");
        assert!(route_keys(&[String::new()]).is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_within_the_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let started = std::time::Instant::now();
        let error = purge(&addr, &["k".into()], Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(error.to_string().contains(&addr), "{error}");
        assert!(error.unreachable(), "{error}");
    }

    /// A listener whose accept queue is full drops SYNs, as a NetworkPolicy that does not admit
    /// the operator does.
    #[tokio::test]
    async fn a_server_that_drops_the_connection_attempt_is_not_unreachable() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _queued = std::net::TcpStream::connect(&addr).unwrap();
        let error = purge(&addr, &["k".into()], Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(error, PurgeError::Timeout { .. }), "{error}");
        assert!(!error.unreachable());
    }

    #[tokio::test]
    async fn a_server_that_takes_the_connection_and_stays_silent_is_not_unreachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let silent = tokio::spawn(async move {
            let (connection, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(connection);
        });
        let error = purge(&addr, &["k".into()], Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(error, PurgeError::Timeout { .. }), "{error}");
        assert!(!error.unreachable());
        silent.abort();
    }
}
