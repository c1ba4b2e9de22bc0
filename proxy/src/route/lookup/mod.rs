//! The Route Lookup Handler client.
//!
//! The proxy never checks passwords: it asks a Route Lookup Handler (Zimbra's `nginx-lookup`
//! servlet, `mailproxy lookupd`, or any nginx `auth_http` server) where an account lives, and
//! the mailbox server checks the real credentials when the proxy logs in upstream.
//!
//! - [`request`]: the request for one login (pure).
//! - [`response`]: the answer's parser (pure, fuzzed).
//! - [`client`]: [`LookupClient`], round-robin over the handlers with failover and down-marking.

pub mod client;
pub mod request;
pub mod response;

use std::borrow::Cow;
use std::fmt;

pub use client::{
    DEFAULT_DOWN_PERIOD, DEFAULT_TIMEOUT, FailedAttempt, HandlerFailure, HandlerStatus, HandlerUrl,
    IDLE_CONNECTIONS_PER_HANDLER, LookupClient, LookupClientConfig, LookupConfigError, LookupError,
    certificates_from_pem,
};
pub use request::{PASSWORD_PLACEHOLDER, RequestError, SECRET_HEADER, build_request};
pub use response::{
    DRAINING_HEADER, LookupOutcome, MAX_HEADER_VALUE_BYTES, MAX_HEADERS_BYTES, MAX_WAIT,
    ResponseError, parse_response, parse_response_head,
};

/// How the handler should find the account (`Auth-Method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// By login name: mail logins and web logins with a user name.
    Username,
    /// By account id: web requests routed by an auth token's `id` field.
    ZimbraId,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Username => "username",
            AuthMethod::ZimbraId => "zimbraId",
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Escapes a login name for `Auth-User` the way nginx's `ngx_escape_uri(NGX_ESCAPE_MAIL_AUTH)`
/// does, plus DEL: control characters, space and `%` become `%XX`; everything else, UTF-8
/// included, passes through. Hand-written because the `percent-encoding` crate always escapes
/// non-ASCII bytes, which Zimbra's servlet and nginx handlers would not decode the same way.
pub fn escape_auth_user(user: &str) -> Cow<'_, str> {
    let needs_escape = |b: u8| b.is_ascii_control() || b == b' ' || b == b'%';
    if !user.bytes().any(needs_escape) {
        return Cow::Borrowed(user);
    }
    let mut escaped = String::with_capacity(user.len() + 8);
    for c in user.chars() {
        match u8::try_from(c) {
            Ok(b) if needs_escape(b) => escaped.push_str(&format!("%{b:02X}")),
            _ => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

/// Decodes an escaped `Auth-User` (`%20` is a space, `%25` a percent sign); `None` when the
/// decoded bytes are not UTF-8.
pub fn unescape_auth_user(value: &str) -> Option<String> {
    percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .ok()
        .map(Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_user_escapes_only_controls_space_and_percent() {
        assert_eq!(escape_auth_user("alice@example.com"), "alice@example.com");
        assert!(matches!(escape_auth_user("plain"), Cow::Borrowed(_)));
        assert_eq!(escape_auth_user("a b%c\td\u{7f}"), "a%20b%25c%09d%7F");
        assert_eq!(escape_auth_user("jürgen+x@ex.com"), "jürgen+x@ex.com");
    }

    #[test]
    fn auth_user_round_trips() {
        for user in ["a b%c", "x%20y", "jürgen", "\r\n", "%"] {
            assert_eq!(unescape_auth_user(&escape_auth_user(user)).unwrap(), user);
        }
        assert_eq!(unescape_auth_user("%ff"), None);
    }
}
