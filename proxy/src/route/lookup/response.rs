//! The lookup answer's parser.
//!
//! A handler is a remote server, possibly a broken or hostile one: the parser never panics
//! (it is fuzzed), bounds what it accepts, and says precisely what was wrong so that an operator
//! reading the proxy's log knows which handler to fix.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use mailproxy_crds::route_table::is_host_name;

use super::unescape_auth_user;
use crate::route::{Route, Upstream};

/// Cap on the whole header section (names, values, separators): Zimbra's answers are a few
/// hundred bytes, so anything near this is a broken handler, not a route.
pub const MAX_HEADERS_BYTES: usize = 16 * 1024;

/// Cap on one header value; a qualified account name is at most 320 bytes before escaping.
pub const MAX_HEADER_VALUE_BYTES: usize = 4 * 1024;

/// Longest `Auth-Wait` honoured: a client held longer than this by one handler's say-so looks
/// like an outage, not throttling.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// mailproxy's own addition to a refusal (`mailproxy lookupd` sends it): the account's mailbox
/// is on this MailboxServer, which is draining. Unlike a plain refusal, which lets the proxy
/// fall back to the route table's domain entry, it makes the login unavailable: no other server
/// holds the mailbox.
pub const DRAINING_HEADER: &str = "x-mailproxy-draining";

/// Most headers [`parse_response_head`] accepts (hyper's client allows 100).
const MAX_HEADERS: usize = 100;

/// What a handler said about a login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupOutcome {
    /// `Auth-Status: OK`: where the account lives. `cache_alias` is `Auth-Cache-Alias: TRUE`,
    /// the handler's permission to cache the login as an alias of the account (Zimbra gives it
    /// for accounts of the default domain, whose short login names are unambiguous).
    Found { route: Route, cache_alias: bool },
    /// Any other `Auth-Status`: the handler's message and how long to hold the client before
    /// answering it (`Auth-Wait`, capped at [`MAX_WAIT`]).
    Refused { message: String, wait: Duration },
    /// A refusal with [`DRAINING_HEADER`]: the MailboxServer that holds the account is
    /// draining.
    Draining { server: String },
}

/// Why an answer is not a usable lookup result. Values quoted in messages are cut to 64
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the handler answered HTTP {status}; the lookup protocol needs 200")]
    Status { status: u16 },
    #[error("the handler's answer has no Auth-Status header")]
    MissingStatus,
    #[error("the handler answered Auth-Status OK without an {header} header")]
    Missing { header: &'static str },
    #[error("the handler's answer has more than one {header} header")]
    Duplicate { header: &'static str },
    #[error("Auth-Port {0:?} is not a port number from 1 to 65535")]
    BadPort(String),
    #[error("Auth-Server {0:?} is neither an IP address nor a host name of at most 253 bytes")]
    BadServer(String),
    #[error("Auth-Wait {0:?} is not a whole number of seconds")]
    BadWait(String),
    #[error("Auth-Cache-Alias {0:?} is neither TRUE nor FALSE")]
    BadCacheAlias(String),
    #[error("Auth-User {0:?} is empty or does not decode to UTF-8")]
    BadUser(String),
    #[error("the {header} header is not UTF-8")]
    NotUtf8 { header: &'static str },
    #[error("the handler's answer headers exceed {MAX_HEADERS_BYTES} bytes")]
    HeadersTooLarge,
    #[error(
        "the {header} header value is {len} bytes, over the {MAX_HEADER_VALUE_BYTES}-byte limit"
    )]
    HeaderValueTooLarge { header: String, len: usize },
    #[error("the handler's answer is not an HTTP response head: {0}")]
    Malformed(String),
}

/// The lookup protocol's response headers, by the name errors use.
const KNOWN: [&str; 7] = [
    "Auth-Status",
    "Auth-Server",
    "Auth-Port",
    "Auth-User",
    "Auth-Wait",
    "Auth-Cache-Alias",
    DRAINING_HEADER,
];

/// Interprets a handler's answer from its status code and headers (names compare
/// case-insensitively; other headers are ignored but count towards the size caps).
pub fn parse_response<'a>(
    status: u16,
    headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<LookupOutcome, ResponseError> {
    if status != 200 {
        return Err(ResponseError::Status { status });
    }
    let mut found: [Option<&str>; KNOWN.len()] = [None; KNOWN.len()];
    let mut total = 0usize;
    for (name, value) in headers {
        total = total.saturating_add(name.len() + value.len() + 4);
        if total > MAX_HEADERS_BYTES {
            return Err(ResponseError::HeadersTooLarge);
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return Err(ResponseError::HeaderValueTooLarge {
                header: quote(&String::from_utf8_lossy(name)),
                len: value.len(),
            });
        }
        let Some(index) = KNOWN
            .iter()
            .position(|known| known.as_bytes().eq_ignore_ascii_case(name))
        else {
            continue;
        };
        let header = KNOWN[index];
        if found[index].is_some() {
            return Err(ResponseError::Duplicate { header });
        }
        let value = std::str::from_utf8(value).map_err(|_| ResponseError::NotUtf8 { header })?;
        found[index] = Some(value.trim_matches([' ', '\t']));
    }
    let [status, server, port, user, wait, cache_alias, draining] = found;
    let status = status
        .filter(|s| !s.is_empty())
        .ok_or(ResponseError::MissingStatus)?;
    if status != "OK" {
        if let Some(draining) = draining.filter(|name| !name.is_empty()) {
            // The name is for messages and logs only: any value is taken, escaped and cut.
            return Ok(LookupOutcome::Draining {
                server: quote(&draining.escape_default().to_string()),
            });
        }
        return Ok(LookupOutcome::Refused {
            message: status.to_string(),
            wait: wait.map(parse_wait).transpose()?.unwrap_or(Duration::ZERO),
        });
    }
    let host = parse_server(server.ok_or(ResponseError::Missing {
        header: "Auth-Server",
    })?)?;
    let port = parse_port(port.ok_or(ResponseError::Missing {
        header: "Auth-Port",
    })?)?;
    let account = user
        .map(|user| {
            unescape_auth_user(user)
                .filter(|account| !account.is_empty())
                .ok_or_else(|| ResponseError::BadUser(quote(user)))
        })
        .transpose()?;
    let cache_alias = match cache_alias {
        None => false,
        Some(value) if value.eq_ignore_ascii_case("TRUE") => true,
        Some(value) if value.eq_ignore_ascii_case("FALSE") => false,
        Some(value) => return Err(ResponseError::BadCacheAlias(quote(value))),
    };
    Ok(LookupOutcome::Found {
        route: Route {
            upstream: Upstream::new(host, port),
            account,
        },
        cache_alias,
    })
}

/// Interprets a raw HTTP/1.x response head (status line and headers, as it arrives on the
/// wire; bytes after the head are ignored). Parsed with `httparse`, the parser under hyper.
pub fn parse_response_head(bytes: &[u8]) -> Result<LookupOutcome, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ResponseError::Malformed(
                "the head ends before its blank line".to_string(),
            ));
        }
        Err(error) => return Err(ResponseError::Malformed(error.to_string())),
    }
    let status = response
        .code
        .ok_or_else(|| ResponseError::Malformed("no status code".to_string()))?;
    parse_response(
        status,
        response
            .headers
            .iter()
            .map(|header| (header.name.as_bytes(), header.value)),
    )
}

fn parse_server(value: &str) -> Result<String, ResponseError> {
    if let Some(inner) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        return match inner.parse::<Ipv6Addr>() {
            Ok(_) => Ok(inner.to_string()),
            Err(_) => Err(ResponseError::BadServer(quote(value))),
        };
    }
    if value.parse::<IpAddr>().is_ok() {
        return Ok(value.to_string());
    }
    // The character set of `Upstream`'s parser, so that a route read back from the route cache
    // parses to the same upstream.
    if is_host_name(value) {
        Ok(value.to_string())
    } else {
        Err(ResponseError::BadServer(quote(value)))
    }
}

fn parse_port(value: &str) -> Result<u16, ResponseError> {
    let digits = !value.is_empty() && value.len() <= 5 && value.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<u16>() {
        Ok(port) if digits && port != 0 => Ok(port),
        _ => Err(ResponseError::BadPort(quote(value))),
    }
}

fn parse_wait(value: &str) -> Result<Duration, ResponseError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ResponseError::BadWait(quote(value)));
    }
    // All digits: only an overflow fails to parse, and that is as absurd as any value over
    // the cap.
    let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
    Ok(Duration::from_secs(seconds).min(MAX_WAIT))
}

fn quote(value: &str) -> String {
    value.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, headers: &[(&str, &str)]) -> Result<LookupOutcome, ResponseError> {
        parse_response(
            status,
            headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        )
    }

    fn found(host: &str, port: u16, account: Option<&str>, cache_alias: bool) -> LookupOutcome {
        LookupOutcome::Found {
            route: Route {
                upstream: Upstream::new(host, port),
                account: account.map(str::to_string),
            },
            cache_alias,
        }
    }

    #[test]
    fn zimbra_success_with_rewritten_user_and_cache_alias() {
        let outcome = parse(
            200,
            &[
                ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                ("Auth-Status", "OK"),
                ("Auth-Server", "10.0.0.5"),
                ("Auth-Port", "7143"),
                ("Auth-User", "first%20last%25x@example.com"),
                ("Auth-Cache-Alias", "TRUE"),
            ],
        );
        assert_eq!(
            outcome,
            Ok(found(
                "10.0.0.5",
                7143,
                Some("first last%x@example.com"),
                true
            ))
        );
    }

    #[test]
    fn a_refusal_naming_a_draining_server() {
        let refusal = [
            ("Auth-Status", "login failed"),
            ("Auth-Wait", "10"),
            ("x-mailproxy-draining", "mbs-2.example"),
        ];
        assert_eq!(
            parse(200, &refusal),
            Ok(LookupOutcome::Draining {
                server: "mbs-2.example".to_string()
            })
        );
        // Whatever a handler sends is a drain, named safely for a log line.
        let odd = [
            ("Auth-Status", "login failed"),
            (DRAINING_HEADER, "Mbs\n2\u{fc}"),
        ];
        assert_eq!(
            parse(200, &odd),
            Ok(LookupOutcome::Draining {
                server: "Mbs\\n2\\u{fc}".to_string()
            })
        );
        let twice = [
            ("Auth-Status", "login failed"),
            (DRAINING_HEADER, "a"),
            (DRAINING_HEADER, "b"),
        ];
        assert_eq!(
            parse(200, &twice),
            Err(ResponseError::Duplicate {
                header: DRAINING_HEADER
            })
        );
        // A route is a route: the proxy checks its server against its own table.
        let routed = [
            ("Auth-Status", "OK"),
            ("Auth-Server", "10.0.0.5"),
            ("Auth-Port", "7143"),
            (DRAINING_HEADER, "mbs-2"),
        ];
        assert_eq!(
            parse(200, &routed),
            Ok(found("10.0.0.5", 7143, None, false))
        );
    }

    #[test]
    fn header_names_are_case_insensitive_and_values_trimmed() {
        let outcome = parse(
            200,
            &[
                ("auth-status", "OK"),
                ("AUTH-SERVER", " mbs1.mail.svc.cluster.local "),
                ("auth-port", "7110"),
                ("auth-cache-alias", "false"),
            ],
        );
        assert_eq!(
            outcome,
            Ok(found("mbs1.mail.svc.cluster.local", 7110, None, false))
        );
    }

    #[test]
    fn ipv6_servers_with_or_without_brackets() {
        for server in ["2001:db8::1", "[2001:db8::1]"] {
            let outcome = parse(
                200,
                &[
                    ("Auth-Status", "OK"),
                    ("Auth-Server", server),
                    ("Auth-Port", "993"),
                ],
            );
            assert_eq!(outcome, Ok(found("2001:db8::1", 993, None, false)));
        }
    }

    #[test]
    fn refusal_with_wait_capped_and_defaulted() {
        let refused = |wait: Option<&str>| {
            let mut headers = vec![("Auth-Status", "Login failed")];
            headers.extend(wait.map(|w| ("Auth-Wait", w)));
            parse(200, &headers)
        };
        let outcome = |secs| {
            Ok(LookupOutcome::Refused {
                message: "Login failed".to_string(),
                wait: Duration::from_secs(secs),
            })
        };
        assert_eq!(refused(Some("10")), outcome(10));
        assert_eq!(refused(None), outcome(0));
        assert_eq!(refused(Some("3600")), outcome(60));
        assert_eq!(refused(Some("99999999999999999999999")), outcome(60));
        assert_eq!(
            refused(Some("-1")),
            Err(ResponseError::BadWait("-1".into()))
        );
        assert_eq!(
            refused(Some("1.5")),
            Err(ResponseError::BadWait("1.5".into()))
        );
    }

    #[test]
    fn refusal_ignores_route_headers() {
        let outcome = parse(
            200,
            &[
                ("Auth-Status", "Account locked"),
                ("Auth-Port", "not a port"),
            ],
        );
        assert!(
            matches!(outcome, Ok(LookupOutcome::Refused { message, .. }) if message == "Account locked")
        );
    }

    #[test]
    fn specific_errors() {
        fn ok(extra: &[(&str, &str)]) -> Result<LookupOutcome, ResponseError> {
            let mut headers = vec![("Auth-Status", "OK")];
            headers.extend_from_slice(extra);
            parse(200, &headers)
        }
        assert_eq!(
            parse(502, &[("Auth-Status", "OK")]),
            Err(ResponseError::Status { status: 502 })
        );
        assert_eq!(parse(200, &[]), Err(ResponseError::MissingStatus));
        assert_eq!(
            parse(200, &[("Auth-Status", "")]),
            Err(ResponseError::MissingStatus)
        );
        assert_eq!(
            ok(&[("Auth-Port", "7143")]),
            Err(ResponseError::Missing {
                header: "Auth-Server"
            })
        );
        assert_eq!(
            ok(&[("Auth-Server", "10.0.0.1")]),
            Err(ResponseError::Missing {
                header: "Auth-Port"
            })
        );
        for port in ["0", "65536", "+143", "", "14 3", "99999999"] {
            assert_eq!(
                ok(&[("Auth-Server", "10.0.0.1"), ("Auth-Port", port)]),
                Err(ResponseError::BadPort(port.into())),
                "{port:?}"
            );
        }
        for server in [
            "",
            "a b",
            "host\u{1}",
            "[10.0.0.1]",
            "x/y",
            "h:1",
            "010.0.0.1",
            "0x7f.1",
        ] {
            assert_eq!(
                ok(&[("Auth-Server", server), ("Auth-Port", "1")]),
                Err(ResponseError::BadServer(server.into())),
                "{server:?}"
            );
        }
        let long = "a".repeat(254);
        assert!(matches!(
            ok(&[("Auth-Server", &long), ("Auth-Port", "1")]),
            Err(ResponseError::BadServer(_))
        ));
        assert_eq!(
            ok(&[
                ("Auth-Server", "h"),
                ("Auth-Port", "1"),
                ("Auth-Cache-Alias", "yes")
            ]),
            Err(ResponseError::BadCacheAlias("yes".into()))
        );
        assert_eq!(
            ok(&[
                ("Auth-Server", "h"),
                ("Auth-Port", "1"),
                ("Auth-User", "%ff")
            ]),
            Err(ResponseError::BadUser("%ff".into()))
        );
        assert_eq!(
            ok(&[
                ("Auth-Server", "h"),
                ("Auth-Port", "1"),
                ("Auth-Server", "i")
            ]),
            Err(ResponseError::Duplicate {
                header: "Auth-Server"
            })
        );
    }

    #[test]
    fn size_caps_and_non_utf8() {
        let big = "x".repeat(MAX_HEADER_VALUE_BYTES + 1);
        assert_eq!(
            parse(200, &[("Auth-Status", "OK"), ("X-Filler", &big)]),
            Err(ResponseError::HeaderValueTooLarge {
                header: "X-Filler".into(),
                len: MAX_HEADER_VALUE_BYTES + 1
            })
        );
        let filler = "y".repeat(1000);
        let many: Vec<(&str, &str)> = (0..20).map(|_| ("X-Filler", filler.as_str())).collect();
        assert_eq!(parse(200, &many), Err(ResponseError::HeadersTooLarge));
        let outcome = parse_response(200, [(&b"Auth-Status"[..], &b"\xff\xfe"[..])]);
        assert_eq!(
            outcome,
            Err(ResponseError::NotUtf8 {
                header: "Auth-Status"
            })
        );
    }

    #[test]
    fn raw_heads() {
        let head = b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n\r\nbody";
        assert_eq!(
            parse_response_head(head),
            Ok(found("127.0.0.1", 143, None, false))
        );
        assert_eq!(
            parse_response_head(b"HTTP/1.0 404 Not Found\r\n\r\n"),
            Err(ResponseError::Status { status: 404 })
        );
        assert!(matches!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\n"),
            Err(ResponseError::Malformed(_))
        ));
        assert!(matches!(
            parse_response_head(b"\x00\xff garbage\r\n\r\n"),
            Err(ResponseError::Malformed(_))
        ));
        assert!(matches!(
            parse_response_head(b""),
            Err(ResponseError::Malformed(_))
        ));
    }
}
