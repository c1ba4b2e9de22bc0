//! Arbitrary bytes as a Route Lookup Handler's response head: the parser must never panic, and
//! whatever it accepts must be a route the rest of the proxy can use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::route::Upstream;
use mailproxy::route::lookup::{
    LookupOutcome, MAX_WAIT, escape_auth_user, parse_response_head, unescape_auth_user,
};

fuzz_target!(|data: &[u8]| {
    match parse_response_head(data) {
        Ok(LookupOutcome::Found { route, .. }) => {
            assert_ne!(route.upstream.port, 0);
            // The route cache stores `host:port` text; it must read back as the same upstream.
            let text = route.upstream.to_string();
            assert_eq!(
                text.parse::<Upstream>().as_ref(),
                Ok(&route.upstream),
                "{text}"
            );
            if let Some(account) = route.account {
                assert!(!account.is_empty());
            }
        }
        Ok(LookupOutcome::Refused { wait, .. }) => assert!(wait <= MAX_WAIT),
        // The name goes into log lines: printable ASCII, bounded.
        Ok(LookupOutcome::Draining { server }) => {
            assert!(!server.is_empty() && server.len() <= 64);
            assert!(server.bytes().all(|b| b == b' ' || b.is_ascii_graphic()), "{server:?}");
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }

    let user = String::from_utf8_lossy(data);
    assert_eq!(
        unescape_auth_user(&escape_auth_user(&user)).as_deref(),
        Some(&*user)
    );
});
