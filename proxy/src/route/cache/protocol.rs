//! The four memcached text-protocol commands the route cache uses, and a parser for their
//! replies that treats the server as untrusted: a malformed, oversized or unexpected reply is an
//! error, never a panic, an unbounded allocation or a misread value.
//!
//! The parser is incremental: it is handed everything read so far and answers "need more",
//! a reply and the bytes it used, or an error.

use std::fmt;

use super::keys::CacheKey;

/// Longest reply line accepted (a `VALUE` line holds at most a 250-byte key and three numbers).
pub const MAX_LINE: usize = 1024;

/// A command. Keys are [`CacheKey`]s, so a command line can never carry a space or CRLF that a
/// caller did not put there.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    Get(&'a CacheKey),
    /// `add`: stored only if the key does not exist, so the first writer wins.
    Add {
        key: &'a CacheKey,
        ttl_seconds: u32,
        value: &'a [u8],
    },
    Delete(&'a CacheKey),
    Incr(&'a CacheKey, u64),
}

impl<'a> Request<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Request::Get(key) => {
                out.extend_from_slice(b"get ");
                out.extend_from_slice(key.as_str().as_bytes());
            }
            Request::Add {
                key,
                ttl_seconds,
                value,
            } => {
                out.extend_from_slice(b"add ");
                out.extend_from_slice(key.as_str().as_bytes());
                out.extend_from_slice(format!(" 0 {ttl_seconds} {}\r\n", value.len()).as_bytes());
                out.extend_from_slice(value);
            }
            Request::Delete(key) => {
                out.extend_from_slice(b"delete ");
                out.extend_from_slice(key.as_str().as_bytes());
            }
            Request::Incr(key, by) => {
                out.extend_from_slice(b"incr ");
                out.extend_from_slice(key.as_str().as_bytes());
                out.extend_from_slice(format!(" {by}").as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    /// What reply this command expects.
    pub fn expect(&self) -> Expect<'a> {
        match self {
            Request::Get(key) => Expect::Value(key.as_str().as_bytes()),
            Request::Add { .. } => Expect::Store,
            Request::Delete(_) => Expect::Delete,
            Request::Incr(..) => Expect::Incr,
        }
    }
}

/// The reply a command expects; for `get`, the key the `VALUE` line must name.
#[derive(Clone, Copy, Debug)]
pub enum Expect<'a> {
    Value(&'a [u8]),
    Store,
    Delete,
    Incr,
}

/// A successful reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `get`: the value, or `None` for a miss (`END` alone).
    Value(Option<Vec<u8>>),
    Stored,
    NotStored,
    Deleted,
    NotFound,
    /// `incr`: the new value.
    Number(u64),
}

/// A reply that is not what the command expects.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("reply line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("reply line {0} does not end in CRLF")]
    BareLf(Printable),
    /// `ERROR`, `CLIENT_ERROR ...` or `SERVER_ERROR ...`: the server is alive but refused.
    #[error("server answered {0}")]
    Refused(Printable),
    #[error("unexpected reply {0}")]
    Unexpected(Printable),
    #[error("malformed VALUE line {0}")]
    BadValueLine(Printable),
    #[error("VALUE for key {got}, but the request was for {want}")]
    WrongKey { got: Printable, want: Printable },
    #[error("value of {size} bytes is over the {limit}-byte limit")]
    ValueTooLarge { size: u64, limit: usize },
    #[error("value data not followed by CRLF")]
    BadValueEnd,
    #[error("unexpected data after the reply: {0}")]
    Trailing(Printable),
}

impl ProtocolError {
    pub(super) fn trailing(bytes: &[u8]) -> Self {
        Self::Trailing(Printable::new(bytes))
    }

    pub(super) fn mismatch(reply: &Reply) -> Self {
        Self::Unexpected(Printable::new(format!("{reply:?}").as_bytes()))
    }
}

/// Reply text made safe to log: at most 64 bytes, control and non-UTF-8 bytes escaped.
#[derive(Clone, PartialEq, Eq)]
pub struct Printable(String);

impl Printable {
    fn new(bytes: &[u8]) -> Self {
        let shown = &bytes[..bytes.len().min(64)];
        let mut text = String::from_utf8_lossy(shown).escape_debug().to_string();
        if bytes.len() > shown.len() {
            text.push('…');
        }
        Self(text)
    }
}

impl fmt::Display for Printable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

impl fmt::Debug for Printable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parses one reply from the start of `input`. `Ok(None)`: more bytes are needed.
/// `Ok(Some((reply, used)))`: `used` bytes of `input` made the reply. A value larger than
/// `max_value` is refused as soon as its `VALUE` line is read, before its data is awaited.
pub fn parse_reply(
    expect: Expect<'_>,
    input: &[u8],
    max_value: usize,
) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let Some((line, mut used)) = line(input)? else {
        return Ok(None);
    };
    if line == b"ERROR" || line.starts_with(b"CLIENT_ERROR ") || line.starts_with(b"SERVER_ERROR ")
    {
        return Err(ProtocolError::Refused(Printable::new(line)));
    }
    let reply = match expect {
        Expect::Value(key) => {
            if line == b"END" {
                Reply::Value(None)
            } else if line.starts_with(b"VALUE ") {
                let size = value_size(line, key, max_value)?;
                let rest = &input[used..];
                // `size` is at most `max_value`, a usize.
                let size = size as usize;
                if rest.len() < size.saturating_add(2) {
                    return Ok(None);
                }
                if &rest[size..size + 2] != b"\r\n" {
                    return Err(ProtocolError::BadValueEnd);
                }
                let value = rest[..size].to_vec();
                used += size + 2;
                let Some((end, end_used)) = self::line(&input[used..])? else {
                    return Ok(None);
                };
                if end != b"END" {
                    return Err(ProtocolError::Unexpected(Printable::new(end)));
                }
                used += end_used;
                Reply::Value(Some(value))
            } else {
                return Err(ProtocolError::Unexpected(Printable::new(line)));
            }
        }
        Expect::Store => match line {
            b"STORED" => Reply::Stored,
            b"NOT_STORED" => Reply::NotStored,
            _ => return Err(ProtocolError::Unexpected(Printable::new(line))),
        },
        Expect::Delete => match line {
            b"DELETED" => Reply::Deleted,
            b"NOT_FOUND" => Reply::NotFound,
            _ => return Err(ProtocolError::Unexpected(Printable::new(line))),
        },
        Expect::Incr => match line {
            b"NOT_FOUND" => Reply::NotFound,
            _ => Reply::Number(
                number(line).ok_or_else(|| ProtocolError::Unexpected(Printable::new(line)))?,
            ),
        },
    };
    Ok(Some((reply, used)))
}

/// The first CRLF-terminated line of `input` (without its CRLF) and its length with the CRLF.
fn line(input: &[u8]) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let window = &input[..input.len().min(MAX_LINE + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(0) => Err(ProtocolError::BareLf(Printable::new(b""))),
        Some(lf) if window[lf - 1] != b'\r' => {
            Err(ProtocolError::BareLf(Printable::new(&window[..lf])))
        }
        Some(lf) => Ok(Some((&window[..lf - 1], lf + 1))),
        None if input.len() > MAX_LINE + 1 => Err(ProtocolError::LineTooLong),
        None => Ok(None),
    }
}

/// `VALUE <key> <flags> <bytes> [<cas>]`: checks the key and returns the data size.
fn value_size(line: &[u8], key: &[u8], max_value: usize) -> Result<u64, ProtocolError> {
    let bad = || ProtocolError::BadValueLine(Printable::new(line));
    let mut fields = line.split(|&b| b == b' ');
    fields.next();
    let got = fields.next().ok_or_else(bad)?;
    let _flags: u32 = fields
        .next()
        .and_then(number)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(bad)?;
    let size = fields.next().and_then(number).ok_or_else(bad)?;
    if let Some(cas) = fields.next() {
        number(cas).ok_or_else(bad)?;
    }
    if fields.next().is_some() {
        return Err(bad());
    }
    if got != key {
        return Err(ProtocolError::WrongKey {
            got: Printable::new(got),
            want: Printable::new(key),
        });
    }
    if size > max_value as u64 {
        return Err(ProtocolError::ValueTooLarge {
            size,
            limit: max_value,
        });
    }
    Ok(size)
}

/// A decimal u64: digits only, no sign, no overflow.
fn number(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Protocol;

    fn key() -> CacheKey {
        CacheKey::route_account(Protocol::Imap, "a@b").unwrap()
    }

    fn get(input: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
        let key = key();
        parse_reply(Request::Get(&key).expect(), input, 1024)
    }

    #[test]
    fn encodes_commands() {
        let key = key();
        let mut out = Vec::new();
        Request::Get(&key).encode(&mut out);
        Request::Add {
            key: &key,
            ttl_seconds: 3600,
            value: b"10.0.0.1:7143",
        }
        .encode(&mut out);
        Request::Delete(&key).encode(&mut out);
        Request::Incr(&key, 1).encode(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "get route:proto=imap;user=a@b\r\n\
             add route:proto=imap;user=a@b 0 3600 13\r\n10.0.0.1:7143\r\n\
             delete route:proto=imap;user=a@b\r\n\
             incr route:proto=imap;user=a@b 1\r\n"
        );
    }

    #[test]
    fn parses_get_hits_and_misses() {
        assert_eq!(get(b"END\r\n"), Ok(Some((Reply::Value(None), 5))));
        let hit = b"VALUE route:proto=imap;user=a@b 0 13\r\n10.0.0.1:7143\r\nEND\r\n";
        assert_eq!(
            get(hit),
            Ok(Some((
                Reply::Value(Some(b"10.0.0.1:7143".to_vec())),
                hit.len()
            )))
        );
        let with_cas = b"VALUE route:proto=imap;user=a@b 5 2 99\r\nhi\r\nEND\r\n";
        assert_eq!(
            get(with_cas).unwrap().unwrap().0,
            Reply::Value(Some(b"hi".to_vec()))
        );
        // The data may hold CRLF: it is length-delimited.
        let binary = b"VALUE route:proto=imap;user=a@b 0 4\r\n\r\n\r\n\r\nEND\r\n";
        assert_eq!(
            get(binary).unwrap().unwrap().0,
            Reply::Value(Some(b"\r\n\r\n".to_vec()))
        );
    }

    #[test]
    fn waits_for_incomplete_replies() {
        let hit = b"VALUE route:proto=imap;user=a@b 0 13\r\n10.0.0.1:7143\r\nEND\r\n";
        for cut in 0..hit.len() {
            assert_eq!(get(&hit[..cut]), Ok(None), "cut at {cut}");
        }
        let key = key();
        assert_eq!(
            parse_reply(Request::Delete(&key).expect(), b"DELET", 10),
            Ok(None)
        );
    }

    #[test]
    fn parses_store_delete_and_incr() {
        let key = key();
        let add = Request::Add {
            key: &key,
            ttl_seconds: 1,
            value: b"",
        };
        let cases: [(Expect<'_>, &[u8], Reply); 7] = [
            (add.expect(), b"STORED\r\n", Reply::Stored),
            (add.expect(), b"NOT_STORED\r\n", Reply::NotStored),
            (
                Request::Delete(&key).expect(),
                b"DELETED\r\n",
                Reply::Deleted,
            ),
            (
                Request::Delete(&key).expect(),
                b"NOT_FOUND\r\n",
                Reply::NotFound,
            ),
            (
                Request::Incr(&key, 1).expect(),
                b"NOT_FOUND\r\n",
                Reply::NotFound,
            ),
            (
                Request::Incr(&key, 1).expect(),
                b"42\r\n",
                Reply::Number(42),
            ),
            (
                Request::Incr(&key, 1).expect(),
                b"18446744073709551615\r\n",
                Reply::Number(u64::MAX),
            ),
        ];
        for (expect, input, reply) in cases {
            assert_eq!(
                parse_reply(expect, input, 10),
                Ok(Some((reply, input.len())))
            );
        }
    }

    #[test]
    fn refuses_malformed_replies() {
        let key = key();
        let incr = Request::Incr(&key, 1).expect();
        let cases: [(Expect<'_>, &[u8], &str); 12] = [
            (incr, b"18446744073709551616\r\n", "unexpected reply"),
            (incr, b"-1\r\n", "unexpected reply"),
            (incr, b"\r\n", "unexpected reply"),
            (
                Expect::Store,
                b"DELETED\r\n",
                "unexpected reply \"DELETED\"",
            ),
            (Expect::Delete, b"STORED\n", "does not end in CRLF"),
            (Expect::Delete, b"\n", "does not end in CRLF"),
            (
                Expect::Store,
                b"SERVER_ERROR out of memory\r\n",
                "server answered",
            ),
            (Expect::Store, b"ERROR\r\n", "server answered \"ERROR\""),
            (
                Expect::Value(b"k"),
                b"VALUE k 0\r\n",
                "malformed VALUE line",
            ),
            (
                Expect::Value(b"k"),
                b"VALUE k x 1\r\n",
                "malformed VALUE line",
            ),
            (
                Expect::Value(b"k"),
                b"VALUE other 0 1\r\nx\r\nEND\r\n",
                "but the request was for",
            ),
            (
                Expect::Value(b"k"),
                b"VALUE k 0 1\r\nxy\r\nEND\r\n",
                "not followed by CRLF",
            ),
        ];
        for (expect, input, message) in cases {
            let error = parse_reply(expect, input, 10).unwrap_err().to_string();
            assert!(error.contains(message), "{input:?}: {error}");
        }
    }

    #[test]
    fn refuses_oversized_values_and_lines_early() {
        let error =
            parse_reply(Expect::Value(b"k"), b"VALUE k 0 99999999999\r\n", 1024).unwrap_err();
        assert_eq!(
            error,
            ProtocolError::ValueTooLarge {
                size: 99_999_999_999,
                limit: 1024
            }
        );
        let long = vec![b'x'; MAX_LINE + 2];
        assert_eq!(
            parse_reply(Expect::Store, &long, 10),
            Err(ProtocolError::LineTooLong)
        );
        let second = b"VALUE k 0 1\r\nx\r\nVALUE k 0 1\r\n";
        assert!(parse_reply(Expect::Value(b"k"), second, 10).is_err());
    }

    #[test]
    fn printable_hides_control_bytes_and_truncates() {
        let error = parse_reply(Expect::Store, b"\x1b[31mred\xff\r\n", 10).unwrap_err();
        assert_eq!(
            error.to_string(),
            "unexpected reply \"\\u{1b}[31mred\u{fffd}\""
        );
        let long = [b'y'; 200];
        let text = Printable::new(&long).to_string();
        assert!(text.len() < 80 && text.ends_with("…\""));
    }
}
