//! Arbitrary bytes as what an HTTP/1.x client sends: a request head, then a chunked body.
//! Parsing never panics; a head the proxy accepts is rewritten into a head that parses again,
//! whole, with the same method and framing; the chunked decoder finds the same body end however
//! the bytes are cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::http::h1::framing::{ChunkedDecoder, Framing};
use mailproxy::http::h1::head::{
    ClientAddress, Forwarding, parse_request, write_upstream_request,
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
        let again = parse_request(&out, usize::MAX)
            .unwrap_or_else(|error| panic!("{error}: {:?}", String::from_utf8_lossy(&out)))
            .expect("a whole head");
        assert_eq!(again.length, out.len());
        assert_eq!(again.method, head.method);
        let framing = |framing| match framing {
            Framing::Length(0) => Framing::Empty,
            other => other,
        };
        assert_eq!(framing(again.framing), framing(head.framing));
        let body = &data[head.length..];
        let whole = body_end(body, body.len().max(1));
        assert_eq!(body_end(body, 1 + usize::from(piece % 16)), whole);
    }
});
