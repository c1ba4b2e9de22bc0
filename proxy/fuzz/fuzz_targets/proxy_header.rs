//! Arbitrary connection starts into the PROXY protocol header parser: what a load balancer, or
//! anything that reaches a listener expecting a header, sends first.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::session::proxy_header::{Parsed, parse};

fuzz_target!(|data: &[u8]| {
    let Parsed::Header { length, addresses } = parse(data) else {
        return;
    };
    assert!(length > 0 && length <= data.len());
    // A header is its own bytes: alone it parses the same, and the reader may consume every
    // shorter cut of it as "need more".
    assert_eq!(
        parse(&data[..length]),
        Parsed::Header { length, addresses }
    );
    for cut in [0, length / 2, length - 1] {
        assert_eq!(parse(&data[..cut]), Parsed::Incomplete, "cut at {cut}");
    }
});
