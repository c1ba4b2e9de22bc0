//! Arbitrary client bytes, split at arbitrary points, into the IMAP pre-login state machine.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mailproxy::mail::imap::{ImapConfig, ImapEvent, ImapPreLogin, upstream};

fuzz_target!(|data: &[u8]| {
    let _ = upstream::parse_response(data, "P1");
    let _ = upstream::ServerCapabilities::from_line(data);

    let Some(plan) = common::plan(data) else {
        return;
    };
    let bound = plan.limits.max_line_len + plan.limits.max_literal_len;
    let mut session = ImapPreLogin::new(ImapConfig {
        starttls: plan.starttls,
        tls_active: plan.tls_active,
        limits: plan.limits,
        ..ImapConfig::default()
    });
    let mut input_len = 0;
    let mut output_len = 0;
    let mut finished = false;
    let mut awaiting_tls = false;
    for chunk in plan.chunks {
        input_len += chunk.len();
        let events = session.feed(chunk);
        if finished || awaiting_tls {
            assert!(
                events.is_empty(),
                "events after a terminal event: {events:?}"
            );
        }
        if awaiting_tls {
            session.tls_established();
            awaiting_tls = false;
        }
        let count = events.len();
        for (index, event) in events.into_iter().enumerate() {
            let last = index + 1 == count;
            match event {
                ImapEvent::Reply(bytes) => {
                    assert!(bytes.ends_with(b"\r\n"));
                    output_len += bytes.len();
                }
                ImapEvent::StartTls => {
                    assert!(last);
                    awaiting_tls = true;
                }
                ImapEvent::Login { tag, credentials } => {
                    assert!(last);
                    assert!(!tag.is_empty());
                    assert!(!credentials.login.is_empty());
                    assert!(!credentials.login.chars().any(char::is_control));
                    let id = upstream::id_command(
                        "P1",
                        [203, 0, 113, 7].into(),
                        session.client_id(),
                        "px",
                    );
                    assert_eq!(id.iter().filter(|&&b| b == b'\r' || b == b'\n').count(), 2);
                    assert!(
                        upstream::login_command(
                            "P2",
                            &credentials.login,
                            &credentials.password,
                            true
                        )
                        .is_some()
                    );
                    finished = true;
                }
                ImapEvent::Close => {
                    assert!(last);
                    finished = true;
                }
            }
        }
        assert!(session.buffered_len() <= bound);
        assert!(output_len <= common::output_bound(input_len));
    }
    assert!(session.take_pending_input().len() <= input_len);
});
