//! Zimbra's memcached key format, shared by the proxies that write route entries and the
//! operator that purges them: a key built in two places would drift, and a purge that misses the
//! proxies' keys leaves stale routes to a deleted server.
//!
//! Every variable part (a login, an account id, a virtual host) is escaped the way Zimbra's nginx
//! escapes throttle keys (`NGX_ESCAPE_MEMCACHED`: `%XX` for space, `%` and control bytes), so no
//! login can smuggle a space or CRLF into the memcached text protocol. For ordinary names the
//! escaped form is the name itself, and the key equals Zimbra's byte for byte. A key longer than
//! memcached's 250-byte limit becomes the lower-case hex MD5 of the full key, as in Zimbra.

use std::fmt::{self, Write as _};

use md5::{Digest, Md5};

/// memcached's key length limit.
pub const MAX_KEY_LEN: usize = 250;

/// The protocol names route keys carry (`route:proto=<name>;...`), as Zimbra names them.
pub const ROUTE_PROTOCOLS: [&str; 6] = ["imap", "imapssl", "pop3", "pop3ssl", "http", "httpssl"];

/// A key that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a route cache key needs a non-empty {0}")]
    Empty(&'static str),
}

/// `route:proto=<protocol>;user=<account>`: the route entry of an account name, without a client
/// address whatever the name.
pub fn route_account(protocol: &str, account: &str) -> Result<String, KeyError> {
    let mut key = KeyBuilder::new("route:proto=");
    key.raw(protocol);
    key.raw(";user=");
    key.escaped("account name", account)?;
    Ok(key.finish())
}

/// Zimbra's test for a qualified login: an `@` anywhere but at the very end.
pub fn is_qualified(login: &str) -> bool {
    login
        .char_indices()
        .any(|(at, c)| c == '@' && at + 1 < login.len())
}

/// Bytes a memcached key cannot hold (space, control bytes) and `%`, the escape itself.
fn needs_escape(byte: u8) -> bool {
    byte <= b' ' || byte == b'%' || byte == 0x7f
}

/// Builds one key: fixed parts as they are, variable parts escaped, the whole hashed when too
/// long.
pub struct KeyBuilder(String);

impl KeyBuilder {
    pub fn new(prefix: &str) -> Self {
        let mut text = String::with_capacity(64);
        text.push_str(prefix);
        Self(text)
    }

    /// A fixed part of the format: it must hold no space or control byte.
    pub fn raw(&mut self, text: &str) {
        self.0.push_str(text);
    }

    /// A value whose text holds no space or control byte (an IP address).
    pub fn display(&mut self, value: impl fmt::Display) {
        // Writing to a String cannot fail.
        let _ = write!(self.0, "{value}");
    }

    /// A variable part, `what` naming it in the error when it is empty.
    pub fn escaped(&mut self, what: &'static str, text: &str) -> Result<(), KeyError> {
        if text.is_empty() {
            return Err(KeyError::Empty(what));
        }
        if !text.bytes().any(needs_escape) {
            self.0.push_str(text);
            return Ok(());
        }
        for c in text.chars() {
            if c.is_ascii() && needs_escape(c as u8) {
                let _ = write!(self.0, "%{:02X}", c as u32);
            } else {
                self.0.push(c);
            }
        }
        Ok(())
    }

    pub fn finish(self) -> String {
        if self.0.len() <= MAX_KEY_LEN {
            return self.0;
        }
        let digest = Md5::digest(self.0.as_bytes());
        let mut hex = String::with_capacity(32);
        for byte in digest {
            let _ = write!(hex, "{byte:02x}");
        }
        hex
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_account_keys_are_zimbra_s_escaped_and_hashed_when_long() {
        assert_eq!(
            route_account("imapssl", "alice").unwrap(),
            "route:proto=imapssl;user=alice"
        );
        assert_eq!(
            route_account("imap", "a b\r\n%x\u{7f}@example.com").unwrap(),
            "route:proto=imap;user=a%20b%0D%0A%25x%7F@example.com"
        );
        let prefix = "route:proto=imap;user=";
        let fits = format!("{}@x", "a".repeat(MAX_KEY_LEN - prefix.len() - 2));
        assert_eq!(
            route_account("imap", &fits).unwrap(),
            format!("{prefix}{fits}")
        );
        let over = format!("{}@x", "a".repeat(MAX_KEY_LEN - prefix.len() - 1));
        let expected: String = Md5::digest(format!("{prefix}{over}").as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(route_account("imap", &over).unwrap(), expected);
        assert_eq!(
            route_account("imap", ""),
            Err(KeyError::Empty("account name"))
        );
    }

    #[test]
    fn qualified_means_an_at_before_the_end() {
        assert!(is_qualified("a@b"));
        assert!(is_qualified("@b"));
        assert!(!is_qualified("a@"));
        assert!(!is_qualified("a"));
        assert!(!is_qualified(""));
    }
}
