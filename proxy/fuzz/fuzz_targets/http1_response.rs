//! Arbitrary bytes as what a web backend answers: a response head, then its body. Parsing never
//! panics; the head the client gets is one a client's parser (httparse, 100 header lines) takes
//! whole, with the same status; a chunked body
//! passed through or taken out of its coding never yields more data than the backend sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::http::h1::framing::{ChunkedDecoder, Framing};
use mailproxy::http::h1::head::{ClientSide, MAX_HEADERS, parse_response, write_client_response};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let Ok(Some(head)) = parse_response(data, 8192, flags & 1 == 1) else {
        return;
    };
    assert!(head.length <= data.len());
    let client = ClientSide {
        minor: (flags >> 1) & 1,
        keep_alive: flags & 4 == 4,
        dechunk: flags & 8 == 8,
    };
    let mut out = Vec::new();
    write_client_response(data, &head, client, &mut out);
    // What a client on hyper (httparse, 100 header lines) must take whole.
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut again = httparse::Response::new(&mut lines);
    let parsed = again.parse(&out);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(
        parsed,
        Ok(httparse::Status::Complete(out.len())),
        "{text:?}"
    );
    assert_eq!(again.code, Some(head.status), "{text:?}");
    if head.framing == Framing::Chunked {
        let body = &data[head.length..];
        let mut decoder = ChunkedDecoder::default();
        let (mut at, mut payload) = (0, 0);
        while at < body.len() && !decoder.is_done() {
            let Ok(step) = decoder.advance(&body[at..]) else {
                return;
            };
            payload += step.data.len();
            at += step.consumed;
        }
        assert!(payload <= at && at <= body.len());
    }
});
