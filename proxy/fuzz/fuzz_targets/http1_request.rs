//! Arbitrary bytes as what an HTTP/1.x client sends: a request head, then a chunked body.
//! Parsing never panics; a head the proxy accepts is rewritten into a head that a backend's
//! parser (httparse, 100 header lines) takes whole, with the same method and framing; the chunked decoder finds the same body end however
//! the bytes are cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::http::h1::framing::{ChunkedDecoder, Framing};
use mailproxy::http::h1::head::{
    ClientAddress, Forwarding, MAX_HEADERS, parse_request, write_upstream_request,
};

/// Where the body ends when `data` arrives in pieces of `piece` bytes.
fn body_end(data: &[u8], piece: usize) -> Option<usize> {
    let mut decoder = ChunkedDecoder::default();
    let mut consumed = 0;
    for chunk in data.chunks(piece) {
        let mut at = 0;
        while at < chunk.len() && !decoder.is_done() {
            let step = decoder.advance(&chunk[at..]).ok()?;
            assert!(step.data.end <= step.consumed, "{step:?}");
            at += step.consumed;
        }
        consumed += at;
        if decoder.is_done() {
            return Some(consumed);
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, data)) = data.split_first() else {
        return;
    };
    if let Ok(Some(head)) = parse_request(data, 8192) {
        assert!(head.length <= data.len());
        let mut out = Vec::new();
        let client = ClientAddress::new("192.0.2.1".parse().unwrap());
        let forwarding = Forwarding {
            client: &client,
            tls: piece & 1 == 1,
            host: None,
            upstream: &"10.0.0.1:8080",
        };
        write_upstream_request(data, &head, &forwarding, &mut out);
        // What a backend on hyper (httparse, 100 header lines) must take whole.
        let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut again = httparse::Request::new(&mut lines);
        let parsed = again.parse(&out);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(
            parsed,
            Ok(httparse::Status::Complete(out.len())),
            "{text:?}"
        );
        assert_eq!(again.method, Some(head.method.as_str()), "{text:?}");
        let has = |name: &str| {
            again
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case(name))
        };
        assert_eq!(
            has("transfer-encoding"),
            head.framing == Framing::Chunked,
            "{text:?}"
        );
        if let Framing::Length(length) = head.framing {
            let sent = again
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                .flat_map(|h| h.value.split(|b| *b == b','))
                .all(|v| {
                    std::str::from_utf8(v.trim_ascii())
                        .ok()
                        .and_then(|v| v.parse().ok())
                        == Some(length)
                });
            assert!(sent, "{text:?}");
        }
        let body = &data[head.length..];
        let whole = body_end(body, body.len().max(1));
        assert_eq!(body_end(body, 1 + usize::from(piece % 16)), whole);
    }
});
