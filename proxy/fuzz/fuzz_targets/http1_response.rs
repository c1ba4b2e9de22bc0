//! Arbitrary bytes as what a web backend answers: a response head, then its body. Parsing never
//! panics; the head the client gets parses again, whole, with the same status; a chunked body
//! passed through or taken out of its coding never yields more data than the backend sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::http::h1::framing::{ChunkedDecoder, Framing};
use mailproxy::http::h1::head::{ClientSide, parse_response, write_client_response};

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
    let again = parse_response(&out, usize::MAX, false)
        .unwrap_or_else(|error| panic!("{error}: {:?}", String::from_utf8_lossy(&out)))
        .expect("a whole head");
    assert_eq!(again.length, out.len());
    assert_eq!(again.status, head.status);
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
