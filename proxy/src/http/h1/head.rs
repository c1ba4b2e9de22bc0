//! HTTP/1.x message heads: parsing a client's request head and a backend's response head, and
//! writing the heads the proxy sends on. Pure code over byte buffers, no I/O.
//!
//! Parsing is httparse's (the parser hyper uses). A parsed head keeps byte ranges into the buffer
//! it was read into instead of owned header maps, so relaying a request costs one pass over its
//! head and one write of the new one.

use std::net::IpAddr;
use std::ops::Range;

use http::{Method, Uri};

use super::framing::Framing;

/// Most header lines in a head the proxy sends (hyper's default limit too, so a backend or
/// client on hyper takes every head the proxy writes).
pub const MAX_HEADERS: usize = 100;

/// Most header lines taken from a client: the proxy adds up to six to a request (`Host`, three
/// forwarding headers, `Connection` and `Upgrade`).
const MAX_REQUEST_HEADERS: usize = MAX_HEADERS - 6;

/// Most header lines taken from a backend: the proxy adds `Connection` to a response.
const MAX_RESPONSE_HEADERS: usize = MAX_HEADERS - 1;

/// A head the proxy will not relay, with the answer it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the head is larger than the limit")]
    TooLarge,
    #[error("the head has too many header lines")]
    TooManyHeaders,
    #[error("the head is malformed")]
    Malformed,
    #[error("the HTTP version is not 1.0 or 1.1")]
    Version,
    #[error("Content-Length and Transfer-Encoding disagree or are invalid")]
    Framing,
    #[error("CONNECT is not supported")]
    Connect,
    #[error("the Host header is missing (HTTP/1.1), repeated or invalid")]
    Host,
}

impl HeadError {
    /// Status code, reason and body of the answer to a client whose request head failed.
    pub fn answer(self) -> (u16, &'static str, &'static str) {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => (
                431,
                "Request Header Fields Too Large",
                "the request head is too large\n",
            ),
            HeadError::Malformed => (400, "Bad Request", "malformed request\n"),
            HeadError::Version => (
                505,
                "HTTP Version Not Supported",
                "only HTTP/1.0, HTTP/1.1 and HTTP/2 are supported\n",
            ),
            HeadError::Framing => (
                400,
                "Bad Request",
                "invalid Content-Length or Transfer-Encoding\n",
            ),
            HeadError::Connect => (405, "Method Not Allowed", "CONNECT is not supported\n"),
            HeadError::Host => (
                400,
                "Bad Request",
                "an HTTP/1.1 request needs one valid Host header\n",
            ),
        }
    }
}

/// One header line: byte ranges of its name and value in the head's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderSpan {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

/// A client's request head, as ranges into the buffer it was parsed from.
#[derive(Clone, Debug)]
pub struct RequestHead {
    /// Bytes of the head, its final CRLF included.
    pub length: usize,
    pub method: Method,
    pub uri: Uri,
    /// The request target as the client sent it.
    pub target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<HeaderSpan>,
    pub framing: Framing,
    /// The client keeps the connection after this exchange.
    pub keep_alive: bool,
    /// The `Upgrade` value of an HTTP/1.1 request that asks for one (`Connection: upgrade`).
    pub upgrade: Option<Range<usize>>,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// A backend's response head, as ranges into the buffer it was parsed from.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub length: usize,
    pub status: u16,
    pub reason: Range<usize>,
    pub headers: Vec<HeaderSpan>,
    pub framing: Framing,
    /// The backend keeps the connection after this exchange.
    pub keep_alive: bool,
}

impl ResponseHead {
    /// An interim answer (`100 Continue`, `103 Early Hints`), followed by the real one.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Parses a request head at the start of `buffer`: `Ok(None)` while it is incomplete.
pub fn parse_request(buffer: &[u8], max_bytes: usize) -> Result<Option<RequestHead>, HeadError> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut lines);
    let Some(length) = head_length(request.parse(buffer), buffer.len(), max_bytes)? else {
        return Ok(None);
    };
    let (Some(method), Some(target), Some(minor)) = (request.method, request.path, request.version)
    else {
        return Err(HeadError::Malformed);
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Malformed)?;
    if method == Method::CONNECT {
        return Err(HeadError::Connect);
    }
    let uri = Uri::try_from(target).map_err(|_| HeadError::Malformed)?;
    let target = range_of(buffer, target.as_bytes());
    if request.headers.len() > MAX_REQUEST_HEADERS {
        return Err(HeadError::TooManyHeaders);
    }
    let headers = spans(buffer, request.headers);
    let fields = Fields {
        buffer,
        headers: &headers,
    };
    // RFC 9112 §3.2, as nginx does: the Host routes the request, names its cache keys and
    // reaches the backend, so there is exactly one (HTTP/1.0 may have none), and a valid one.
    let hosts: Vec<&[u8]> = fields.values("host").take(2).collect();
    match hosts[..] {
        [] if minor == 0 => {}
        [host] if is_valid_host(host) => {}
        _ => return Err(HeadError::Host),
    }
    let transfer_encoding = fields.chunked_last("transfer-encoding");
    let framing = match (transfer_encoding, fields.content_length()?) {
        (Some(_), _) if minor == 0 => return Err(HeadError::Framing),
        (Some(_), Some(_)) | (Some(false), None) => return Err(HeadError::Framing),
        (Some(true), None) => Framing::Chunked,
        (None, Some(0)) | (None, None) => Framing::Empty,
        (None, Some(length)) => Framing::Length(length),
    };
    // WebSocket only: another protocol (`h2c`) would open a tunnel past the proxy's per-request
    // routing and header rewriting; such a request goes on as a plain one.
    let upgrade = (minor == 1 && fields.connection_has("upgrade"))
        .then(|| fields.value_range("upgrade"))
        .flatten()
        .filter(|range| {
            buffer[range.clone()]
                .trim_ascii()
                .eq_ignore_ascii_case(b"websocket")
        });
    let expect_continue = fields
        .values("expect")
        .any(|value| value.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
    Ok(Some(RequestHead {
        length,
        method,
        uri,
        target,
        minor,
        keep_alive: fields.keeps_alive(minor),
        framing,
        upgrade,
        expect_continue,
        headers,
    }))
}

/// Parses a response head at the start of `buffer`: `Ok(None)` while it is incomplete.
/// `to_head` says the request was a `HEAD` (whose response has no body whatever it says).
pub fn parse_response(
    buffer: &[u8],
    max_bytes: usize,
    to_head: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut lines);
    let Some(length) = head_length(response.parse(buffer), buffer.len(), max_bytes)? else {
        return Ok(None);
    };
    let (Some(status), Some(minor)) = (response.code, response.version) else {
        return Err(HeadError::Malformed);
    };
    let reason = range_of(buffer, response.reason.unwrap_or("").as_bytes());
    if response.headers.len() > MAX_RESPONSE_HEADERS {
        return Err(HeadError::TooManyHeaders);
    }
    let headers = spans(buffer, response.headers);
    let fields = Fields {
        buffer,
        headers: &headers,
    };
    // Checked even where no body follows: the client gets the header as it is.
    let content_length = fields.content_length()?;
    let no_body = to_head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if no_body {
        Framing::Empty
    } else {
        match (fields.chunked_last("transfer-encoding"), content_length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(length)) => Framing::Length(length),
            (None, None) => Framing::UntilClose,
        }
    };
    Ok(Some(ResponseHead {
        length,
        status,
        reason,
        keep_alive: fields.keeps_alive(minor) && framing != Framing::UntilClose,
        framing,
        headers,
    }))
}

/// The length of a parsed head, `None` while it is incomplete and may still fit in `max_bytes`.
fn head_length(
    parsed: httparse::Result<usize>,
    buffered: usize,
    max_bytes: usize,
) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(length)) if length <= max_bytes => Ok(Some(length)),
        Ok(httparse::Status::Partial) if buffered < max_bytes => Ok(None),
        Ok(_) => Err(HeadError::TooLarge),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => Err(HeadError::Version),
        Err(_) => Err(HeadError::Malformed),
    }
}

/// What the backend is told about the client.
#[derive(Clone, Copy)]
pub struct Forwarding<'a> {
    /// The client's address as `X-Forwarded-For` lists it ([`ClientAddress`]).
    pub client: &'a ClientAddress,
    pub tls: bool,
    /// The client's `Host` (or the target's authority), for `Forwarded: host=`.
    pub host: Option<&'a str>,
    /// The `Host` to send when the client sent none: the backend's address.
    pub upstream: &'a (dyn std::fmt::Display + Sync),
}

/// A client's address, written out once per connection for every request's forwarding
/// headers.
#[derive(Clone, Debug)]
pub struct ClientAddress {
    /// For `X-Forwarded-For`: `192.0.2.7`, `2001:db8::1`.
    list: String,
    /// For `Forwarded: for=`: `192.0.2.7`, `"[2001:db8::1]"` (RFC 7239 §6).
    node: String,
}

impl ClientAddress {
    pub fn new(ip: IpAddr) -> Self {
        let list = ip.to_string();
        let node = match ip {
            IpAddr::V4(_) => list.clone(),
            IpAddr::V6(_) => format!("\"[{list}]\""),
        };
        Self { list, node }
    }

    /// As `X-Forwarded-For` lists it.
    pub fn listed(&self) -> &str {
        &self.list
    }

    /// Writes its `Forwarded` element: `for=<node>;proto=<http|https>[;host="<host>"]` (a host
    /// that cannot be quoted is left out).
    pub fn write_forwarded_element(&self, tls: bool, host: Option<&str>, out: &mut Vec<u8>) {
        out.extend_from_slice(b"for=");
        out.extend_from_slice(self.node.as_bytes());
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(proto(tls).as_bytes());
        if let Some(host) =
            host.filter(|host| host.bytes().all(|b| b.is_ascii_graphic() && b != b'"'))
        {
            out.extend_from_slice(b";host=\"");
            out.extend_from_slice(host.as_bytes());
            out.push(b'"');
        }
    }
}

/// The `X-Forwarded-Proto` of a client connection.
pub fn proto(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// Writes the head of the request sent to the backend: HTTP/1.1, origin-form target, the
/// client's headers without the hop-by-hop ones (those `Connection` names included), a `Host`,
/// and `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` extended with the client.
/// `Expect` is left out: the proxy answers `100 Continue` itself. The body's framing is written
/// from the framing the proxy relays, never taken from the client's headers: a client that names
/// `Content-Length` in `Connection`, or sends `Content-Length: 5, 5`, cannot make the backend
/// read the body otherwise than the proxy sends it (request smuggling). `Host` is never dropped.
pub fn write_upstream_request(
    buffer: &[u8],
    head: &RequestHead,
    forwarding: &Forwarding<'_>,
    out: &mut Vec<u8>,
) {
    let fields = Fields {
        buffer,
        headers: &head.headers,
    };
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    match (head.uri.authority(), head.uri.path_and_query()) {
        (None, _) => out.extend_from_slice(&buffer[head.target.clone()]),
        (Some(_), Some(path)) => out.extend_from_slice(path.as_str().as_bytes()),
        (Some(_), None) => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let named = fields.connection_tokens();
    let mut has_host = false;
    for header in &head.headers {
        let name = &buffer[header.name.clone()];
        let host = name.eq_ignore_ascii_case(b"host");
        if is_hop_by_hop(name)
            || (is_named(&named, name) && !host)
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"expect")
            || is_forwarding(name)
        {
            continue;
        }
        has_host |= host;
        write_header(out, name, &buffer[header.value.clone()]);
    }
    match head.framing {
        Framing::Chunked => {
            for value in fields.values("transfer-encoding") {
                write_header(out, b"transfer-encoding", value);
            }
        }
        Framing::Length(length) => {
            write_header(out, b"content-length", length.to_string().as_bytes());
        }
        // An explicit empty body stays explicit (some servers want a length on every POST).
        Framing::Empty if fields.values("content-length").next().is_some() => {
            write_header(out, b"content-length", b"0");
        }
        Framing::Empty | Framing::UntilClose => {}
    }
    if let Some(upgrade) = &head.upgrade {
        write_header(out, b"connection", b"upgrade");
        write_header(out, b"upgrade", &buffer[upgrade.clone()]);
    }
    if !has_host {
        match forwarding.host {
            Some(host) => write_header(out, b"host", host.as_bytes()),
            None => {
                let upstream = forwarding.upstream.to_string();
                write_header(out, b"host", upstream.as_bytes());
            }
        }
    }
    write_list_header(out, &fields, b"x-forwarded-for", |out| {
        out.extend_from_slice(forwarding.client.list.as_bytes());
    });
    write_header(out, b"x-forwarded-proto", proto(forwarding.tls).as_bytes());
    write_list_header(out, &fields, b"forwarded", |out| {
        forwarding
            .client
            .write_forwarded_element(forwarding.tls, forwarding.host, out);
    });
    out.extend_from_slice(b"\r\n");
}

/// How the client gets a response.
#[derive(Clone, Copy, Debug)]
pub struct ClientSide {
    /// 0 for an HTTP/1.0 client.
    pub minor: u8,
    /// The connection stays open after the response.
    pub keep_alive: bool,
    /// A chunked body reaches the client without its chunked coding (HTTP/1.0 clients).
    pub dechunk: bool,
}

/// Writes the head of the response sent to the client: the backend's status and headers without
/// the hop-by-hop ones, and the proxy's own `Connection`. A `101` keeps its `Upgrade`.
pub fn write_client_response(
    buffer: &[u8],
    head: &ResponseHead,
    client: ClientSide,
    out: &mut Vec<u8>,
) {
    let fields = Fields {
        buffer,
        headers: &head.headers,
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    let status = head.status;
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(&buffer[head.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    let switching = head.status == 101;
    let named = fields.connection_tokens();
    for header in &head.headers {
        let name = &buffer[header.name.clone()];
        let keep = if name.eq_ignore_ascii_case(b"upgrade") {
            switching
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            head.framing == Framing::Chunked && !client.dechunk
        } else if name.eq_ignore_ascii_case(b"content-length") {
            head.framing != Framing::Chunked
        } else {
            !is_hop_by_hop(name) && !is_named(&named, name)
        };
        if keep {
            write_header(out, name, &buffer[header.value.clone()]);
        }
    }
    if switching {
        write_header(out, b"connection", b"upgrade");
    } else if !client.keep_alive {
        write_header(out, b"connection", b"close");
    } else if client.minor == 0 {
        write_header(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a complete short answer of the proxy's own.
pub fn write_answer(status: u16, reason: &str, text: &str, close: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "connection: close\r\n" } else { "" },
        )
        .as_bytes(),
    );
}

/// Where a plain-http request is redirected: `https://<host>[:port]<target>`. `None` when the
/// request names no usable host (a `Host` must be a bare authority: no path, no credentials).
pub fn https_location(host: Option<&str>, target: &str, port: u16) -> Option<String> {
    let authority: http::uri::Authority = host?.parse().ok()?;
    if authority.as_str().contains('@') || !target.starts_with('/') {
        return None;
    }
    let host = authority.host();
    Some(if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    })
}

/// Writes a `301` to `location`.
pub fn write_redirect(location: &str, close: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 301 Moved Permanently\r\nlocation: ");
    out.extend_from_slice(location.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: 0\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The value of a header of a parsed head (the first one of that name).
pub fn header_value<'a>(buffer: &'a [u8], headers: &[HeaderSpan], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|header| buffer[header.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
        .map(|header| &buffer[header.value.clone()])
}

const HOP_BY_HOP: [&[u8]; 9] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
];

/// Whether a header belongs to one connection only (RFC 9110 §7.6.1), `Upgrade` included.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop))
}

fn is_named(named: &[&[u8]], name: &[u8]) -> bool {
    named.iter().any(|token| token.eq_ignore_ascii_case(name))
}

fn is_forwarding(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"x-forwarded-for")
        || name.eq_ignore_ascii_case(b"x-forwarded-proto")
        || name.eq_ignore_ascii_case(b"forwarded")
}

fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `name: <earlier values>, <element>` (a list header the proxy appends to).
fn write_list_header(
    out: &mut Vec<u8>,
    fields: &Fields<'_>,
    name: &[u8],
    element: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    let name = std::str::from_utf8(name).unwrap_or_default();
    for value in fields.values(name) {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    element(out);
    out.extend_from_slice(b"\r\n");
}

fn spans(buffer: &[u8], headers: &[httparse::Header<'_>]) -> Vec<HeaderSpan> {
    headers
        .iter()
        .map(|header| HeaderSpan {
            name: range_of(buffer, header.name.as_bytes()),
            value: range_of(buffer, header.value),
        })
        .collect()
}

/// A Host value nginx would take (`ngx_http_validate_host`): no path separator, space, control
/// byte or empty label (`a..b`), at most as long as a DNS name and a port. Anything else (`_`
/// in internal names, UTF-8) passes, as it does through nginx.
fn is_valid_host(host: &[u8]) -> bool {
    host.len() <= 261
        && !host.windows(2).any(|pair| pair == b"..")
        && !host
            .iter()
            .any(|&byte| byte <= b' ' || byte == 0x7f || byte == b'/' || byte == b'\\')
}

/// Where `part` (a slice of `buffer`) lies in `buffer`. A part that is not in it (httparse
/// gives a static `""` for a status line without a reason) is the empty range at 0, so that no
/// later slice of the buffer can panic on it.
fn range_of(buffer: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(buffer.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= buffer.len() => start..end,
        _ => 0..0,
    }
}

/// The header lines of a parsed head.
struct Fields<'a> {
    buffer: &'a [u8],
    headers: &'a [HeaderSpan],
}

impl<'a> Fields<'a> {
    fn values(&self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let buffer = self.buffer;
        self.headers
            .iter()
            .filter(move |header| buffer[header.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(move |header| &buffer[header.value.clone()])
    }

    fn value_range(&self, name: &str) -> Option<Range<usize>> {
        self.headers
            .iter()
            .find(|header| self.buffer[header.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|header| header.value.clone())
    }

    /// The comma-separated elements of every `name` line.
    fn tokens(&self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.values(name)
            .flat_map(|value| value.split(|byte| *byte == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|token| !token.is_empty())
    }

    fn connection_has(&self, token: &str) -> bool {
        self.tokens("connection")
            .any(|found| found.eq_ignore_ascii_case(token.as_bytes()))
    }

    /// The headers `Connection` names (making them hop-by-hop), and its options.
    fn connection_tokens(&self) -> Vec<&'a [u8]> {
        self.tokens("connection").collect()
    }

    fn keeps_alive(&self, minor: u8) -> bool {
        if self.connection_has("close") {
            false
        } else {
            minor == 1 || self.connection_has("keep-alive")
        }
    }

    /// `Some(true)` when `Transfer-Encoding` is present and ends with `chunked`, `Some(false)`
    /// when it is present and does not.
    fn chunked_last(&self, name: &'a str) -> Option<bool> {
        let last = self.tokens(name).last()?;
        Some(last.eq_ignore_ascii_case(b"chunked"))
    }

    /// The `Content-Length`: every line and list element must be the same decimal number.
    fn content_length(&self) -> Result<Option<u64>, HeadError> {
        let mut length = None;
        for value in self.values("content-length") {
            for element in value.split(|byte| *byte == b',').map(<[u8]>::trim_ascii) {
                let parsed = parse_decimal(element).ok_or(HeadError::Framing)?;
                if length.is_some_and(|seen| seen != parsed) {
                    return Err(HeadError::Framing);
                }
                length = Some(parsed);
            }
        }
        Ok(length)
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 8192;

    fn request(text: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(text.as_bytes(), LIMIT)
    }

    fn forwarded(text: &str, tls: bool) -> String {
        let head = request(text).unwrap().unwrap();
        let mut out = Vec::new();
        let client = ClientAddress::new("192.0.2.7".parse().unwrap());
        let forwarding = Forwarding {
            client: &client,
            tls,
            host: Some("mail.example.com"),
            upstream: &"10.0.0.1:8080",
        };
        write_upstream_request(text.as_bytes(), &head, &forwarding, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_head_is_complete_only_at_its_empty_line() {
        let text = "GET /home/alice/ HTTP/1.1\r\nHost: mail.example.com\r\n\r\nnext";
        for cut in 0..text.len() - 4 {
            assert!(request(&text[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        let head = request(text).unwrap().unwrap();
        assert_eq!(head.length, text.len() - 4);
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri.path(), "/home/alice/");
        assert_eq!(head.minor, 1);
        assert!(head.keep_alive);
        assert_eq!(head.framing, Framing::Empty);
        assert_eq!(
            header_value(text.as_bytes(), &head.headers, "HOST"),
            Some(&b"mail.example.com"[..])
        );
    }

    #[test]
    fn request_bodies_are_framed_or_refused() {
        let framing = |headers: &str| {
            request(&format!("POST / HTTP/1.1\r\nHost: h\r\n{headers}\r\n"))
                .map(|head| head.unwrap().framing)
        };
        assert_eq!(framing("Content-Length: 5\r\n"), Ok(Framing::Length(5)));
        assert_eq!(framing("Content-Length: 0\r\n"), Ok(Framing::Empty));
        assert_eq!(
            framing("Content-Length: 5\r\nContent-Length: 5, 5\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing("Transfer-Encoding: gzip, Chunked\r\n"),
            Ok(Framing::Chunked)
        );
        for refused in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 1e3\r\n",
            "Content-Length: 99999999999999999999\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
        ] {
            assert_eq!(framing(refused), Err(HeadError::Framing), "{refused}");
        }
        assert_eq!(
            request("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err(),
            HeadError::Framing
        );
    }

    #[test]
    fn bad_heads_get_their_answers() {
        assert_eq!(
            request("GARBAGE\r\n\r\n").unwrap_err(),
            HeadError::Malformed
        );
        assert_eq!(
            request("GET / HTTP/9.9\r\n\r\n").unwrap_err(),
            HeadError::Version
        );
        assert_eq!(
            request("CONNECT a:443 HTTP/1.1\r\n\r\n").unwrap_err(),
            HeadError::Connect
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(LIMIT));
        assert_eq!(request(&big).unwrap_err(), HeadError::TooLarge);
        assert_eq!(
            request(&big[..LIMIT + 10]).unwrap_err(),
            HeadError::TooLarge
        );
        let lines = |count| {
            (0..count)
                .map(|n| format!("X-{n}: a\r\n"))
                .collect::<String>()
        };
        let most = lines(MAX_REQUEST_HEADERS);
        assert!(request(&format!("GET / HTTP/1.0\r\n{most}\r\n")).is_ok());
        let response_lines = lines(MAX_RESPONSE_HEADERS + 1);
        assert_eq!(
            parse_response(
                format!("HTTP/1.1 200 OK\r\n{response_lines}\r\n").as_bytes(),
                LIMIT,
                false
            )
            .unwrap_err(),
            HeadError::TooManyHeaders
        );
        let many = lines(MAX_REQUEST_HEADERS + 1);
        assert_eq!(
            request(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err(),
            HeadError::TooManyHeaders
        );
    }

    #[test]
    fn an_http_1_1_request_has_exactly_one_valid_host() {
        for refused in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://a.example/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a.example\r\nhost: a.example\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.example/evil\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\texample\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a..example\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\\b\r\n\r\n",
        ] {
            assert_eq!(request(refused).unwrap_err(), HeadError::Host, "{refused}");
        }
        for accepted in [
            "GET / HTTP/1.1\r\nHost: mail.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: mail.example.com:8443\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: mail_int.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
        ] {
            assert!(request(accepted).unwrap().is_some(), "{accepted}");
        }
        assert_eq!(HeadError::Host.answer().0, 400);
    }

    #[test]
    fn only_websocket_upgrades_are_relayed() {
        let upgrade = |protocol: &str| {
            let text = format!(
                "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
            );
            request(&text).unwrap().unwrap().upgrade.is_some()
        };
        assert!(upgrade("websocket"));
        assert!(upgrade("WebSocket"));
        assert!(!upgrade("h2c"));
        assert!(!upgrade("websocket, h2c"));
        let plain = forwarded(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            false,
        );
        assert!(!plain.to_ascii_lowercase().contains("upgrade"), "{plain}");
        assert!(!plain.contains("HTTP2-Settings"), "{plain}");
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let keep = |text: &str| request(text).unwrap().unwrap().keep_alive;
        assert!(keep("GET / HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(!keep(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        ));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn the_upstream_request_drops_hop_by_hop_and_adds_forwarding() {
        let out = forwarded(
            "GET http://mail.example.com/a?b=1 HTTP/1.0\r\nHost: mail.example.com\r\n\
             Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\n\
             Proxy-Authorization: Basic x\r\nExpect: 100-continue\r\n\
             X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 198.51.100.2\r\n\
             Forwarded: for=198.51.100.1\r\nX-Forwarded-Proto: ftp\r\nCookie: a=b\r\n\r\n",
            true,
        );
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nHost: mail.example.com\r\nCookie: a=b\r\n\
             x-forwarded-for: 198.51.100.1, 198.51.100.2, 192.0.2.7\r\n\
             x-forwarded-proto: https\r\n\
             forwarded: for=198.51.100.1, for=192.0.2.7;proto=https;host=\"mail.example.com\"\r\n\r\n"
        );
    }

    #[test]
    fn a_part_outside_the_buffer_is_an_empty_range() {
        let buffer = b"HTTP/1.1 200\r\n\r\n";
        assert_eq!(range_of(buffer, &buffer[9..12]), 9..12);
        assert_eq!(range_of(buffer, b""), 0..0);
        assert_eq!(range_of(&buffer[4..], &buffer[..8]), 0..0);
        assert_eq!(range_of(&buffer[..4], &buffer[2..8]), 0..0);
        let reason = response("HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", false).reason;
        assert!(reason.is_empty(), "{reason:?}");
    }

    #[test]
    fn the_upstream_body_framing_is_the_relayed_one_whatever_connection_names() {
        let smuggling = "POST /service/soap HTTP/1.1\r\nHost: mail.example.com\r\n\
                         Connection: keep-alive, Content-Length, Host\r\nContent-Length: 96\r\n\r\n";
        let out = forwarded(smuggling, true);
        assert!(
            out.starts_with(
                "POST /service/soap HTTP/1.1\r\nHost: mail.example.com\r\ncontent-length: 96\r\n"
            ),
            "{out}"
        );
        assert_eq!(out.matches("ontent-length").count(), 1, "{out}");
        let repeated = forwarded(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert!(
            repeated
                .starts_with("POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 5\r\nx-forwarded-for"),
            "{repeated}"
        );
        let empty = forwarded(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(
            empty.starts_with("POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 0\r\n"),
            "{empty}"
        );
        let none = forwarded("GET / HTTP/1.1\r\nHost: h\r\n\r\n", false);
        assert!(!none.contains("content-length"), "{none}");
    }

    #[test]
    fn the_upstream_request_keeps_chunked_upgrades_and_adds_a_host() {
        let out = forwarded(
            "POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert!(
            out.starts_with("POST /up HTTP/1.1\r\nHost: h\r\ntransfer-encoding: chunked\r\n"),
            "{out}"
        );
        let out = forwarded("GET / HTTP/1.0\r\n\r\n", false);
        assert!(
            out.starts_with("GET / HTTP/1.1\r\nhost: mail.example.com\r\n"),
            "{out}"
        );
        let out = forwarded(
            "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: k\r\n\r\n",
            false,
        );
        assert!(
            out.starts_with(
                "GET /ws HTTP/1.1\r\nHost: h\r\nSec-WebSocket-Key: k\r\n\
                 connection: upgrade\r\nupgrade: websocket\r\n"
            ),
            "{out}"
        );
        assert!(out.contains("forwarded: for=192.0.2.7;proto=http;host=\"mail.example.com\"\r\n"));
    }

    #[test]
    fn an_ipv6_client_is_quoted_in_forwarded_and_the_backend_is_the_last_resort_host() {
        let text = "GET / HTTP/1.0\r\n\r\n";
        let head = request(text).unwrap().unwrap();
        let client = ClientAddress::new("2001:db8::1".parse().unwrap());
        let forwarding = Forwarding {
            client: &client,
            tls: false,
            host: None,
            upstream: &"10.0.0.1:8080",
        };
        let mut out = Vec::new();
        write_upstream_request(text.as_bytes(), &head, &forwarding, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: 10.0.0.1:8080\r\nx-forwarded-for: 2001:db8::1\r\n\
             x-forwarded-proto: http\r\nforwarded: for=\"[2001:db8::1]\";proto=http\r\n\r\n"
        );
    }

    fn response(text: &str, to_head: bool) -> ResponseHead {
        parse_response(text.as_bytes(), LIMIT, to_head)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |text: &str| response(text, false).framing;
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"),
            Framing::Length(3)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            Framing::Chunked
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Framing::UntilClose);
        assert_eq!(framing("HTTP/1.1 204 No Content\r\n\r\n"), Framing::Empty);
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(
            response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).framing,
            Framing::Empty
        );
        assert!(!response("HTTP/1.1 200 OK\r\n\r\n", false).keep_alive);
        assert!(!response("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).keep_alive);
        assert!(response("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", false).keep_alive);
        assert!(response("HTTP/1.1 100 Continue\r\n\r\n", false).is_interim());
        assert!(!response("HTTP/1.1 101 Switching Protocols\r\n\r\n", false).is_interim());
        for to_head in [false, true] {
            let head = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n";
            let error = parse_response(head, LIMIT, to_head).unwrap_err();
            assert_eq!(
                error,
                HeadError::Framing,
                "a HEAD's response too: {to_head}"
            );
        }
    }

    #[test]
    fn the_client_response_has_the_proxys_connection_header() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
                    Transfer-Encoding: chunked\r\nX-Backend: a\r\n\r\n";
        let head = response(text, false);
        let write = |client| {
            let mut out = Vec::new();
            write_client_response(text.as_bytes(), &head, client, &mut out);
            String::from_utf8(out).unwrap()
        };
        let keep = ClientSide {
            minor: 1,
            keep_alive: true,
            dechunk: false,
        };
        assert_eq!(
            write(keep),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Backend: a\r\n\r\n"
        );
        let old = ClientSide {
            minor: 0,
            keep_alive: false,
            dechunk: true,
        };
        assert_eq!(
            write(old),
            "HTTP/1.1 200 OK\r\nX-Backend: a\r\nconnection: close\r\n\r\n"
        );
        let text =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let head = response(text, false);
        let mut out = Vec::new();
        write_client_response(text.as_bytes(), &head, keep, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        );
    }

    #[test]
    fn redirects_name_the_host_without_its_port_and_keep_the_target() {
        assert_eq!(
            https_location(Some("mail.example.com:80"), "/zimbra/?a=1", 443).as_deref(),
            Some("https://mail.example.com/zimbra/?a=1")
        );
        assert_eq!(
            https_location(Some("[2001:db8::1]"), "/", 8443).as_deref(),
            Some("https://[2001:db8::1]:8443/")
        );
        for bad in [
            None,
            Some(""),
            Some("a b"),
            Some("user@evil.example"),
            Some("h/x"),
        ] {
            assert_eq!(https_location(bad, "/", 443), None, "{bad:?}");
        }
        assert_eq!(https_location(Some("h"), "*", 443), None);
        let mut out = Vec::new();
        write_redirect("https://h/", false, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 301 Moved Permanently\r\nlocation: https://h/\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn the_proxys_own_answers_are_complete() {
        let mut out = Vec::new();
        write_answer(502, "Bad Gateway", "the backend failed\n", true, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 19\r\nconnection: close\r\n\r\nthe backend failed\n"
        );
    }
}
