//! Arbitrary server bytes into the memcached reply parser, the only code that reads what a
//! memcached server (or anything listening where one should be) sends the proxy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::route::cache::protocol::{Expect, Reply, parse_reply};

const KEY: &[u8] = b"route:proto=imap;user=alice@example.com";
const MAX_VALUE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // Byte 0 picks the command whose reply is expected.
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let expect = match selector % 4 {
        0 => Expect::Value(KEY),
        1 => Expect::Store,
        2 => Expect::Delete,
        _ => Expect::Incr,
    };
    let Ok(Some((reply, used))) = parse_reply(expect, input, MAX_VALUE) else {
        return;
    };
    assert!(used > 0 && used <= input.len());
    if let Reply::Value(Some(value)) = &reply {
        assert!(value.len() <= MAX_VALUE);
    }
    // A reply depends on its own bytes only, and every cut of it is "need more": a connection
    // that receives it in pieces reads the same reply.
    assert_eq!(
        parse_reply(expect, &input[..used], MAX_VALUE),
        Ok(Some((reply, used)))
    );
    for cut in [0, used / 2, used - 1] {
        assert_eq!(
            parse_reply(expect, &input[..cut], MAX_VALUE),
            Ok(None),
            "cut at {cut}"
        );
    }
});
