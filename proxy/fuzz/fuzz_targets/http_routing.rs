//! Arbitrary bytes as a web request head (first line: the URI; then `name: value` header
//! lines) and as credentials: route detection and token parsing must never panic, and whatever
//! they extract must be usable as a lookup's `Auth-User` and a cache key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::http::routing::{WebRoute, detect};
use mailproxy::http::token::{auth_token_account_id, jwt_subject};

fn usable_id(id: &str) {
    assert!(!id.is_empty() && id.len() <= 256, "{id:?}");
    assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id:?}");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(id) = auth_token_account_id(&text) {
        usable_id(&id);
    }
    if let Some(sub) = jwt_subject(&text) {
        usable_id(&sub);
    }

    let mut lines = data.split(|&b| b == b'\n');
    let Ok(uri) = http::Uri::try_from(lines.next().unwrap_or_default()) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    match detect(&uri, &headers) {
        WebRoute::User { name, .. } => {
            assert!(!name.is_empty(), "{uri}");
            assert!(!name.chars().any(char::is_control), "{name:?}");
        }
        WebRoute::AccountId { id, .. } => usable_id(&id),
        WebRoute::Balanced => {}
    }
});
