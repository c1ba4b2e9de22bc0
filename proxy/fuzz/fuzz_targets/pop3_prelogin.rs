//! Arbitrary client bytes, split at arbitrary points, into the POP3 pre-login state machine.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mailproxy::mail::pop3::{Pop3Config, Pop3Event, Pop3PreLogin, upstream};

fuzz_target!(|data: &[u8]| {
    let _ = upstream::parse_reply(data);

    let Some(plan) = common::plan(data) else {
        return;
    };
    let bound = plan.limits.max_line_len;
    let mut session = Pop3PreLogin::new(Pop3Config {
        starttls: plan.starttls,
        tls_active: plan.tls_active,
        limits: plan.limits,
        ..Pop3Config::default()
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
                Pop3Event::Reply(bytes) => {
                    assert!(bytes.ends_with(b"\r\n"));
                    output_len += bytes.len();
                }
                Pop3Event::StartTls => {
                    assert!(last);
                    awaiting_tls = true;
                }
                Pop3Event::Login { credentials } => {
                    assert!(last);
                    assert!(!credentials.login.is_empty());
                    assert!(!credentials.login.chars().any(char::is_control));
                    assert!(upstream::user_command(&credentials.login).is_some());
                    assert!(upstream::pass_command(&credentials.password).is_some());
                    finished = true;
                }
                Pop3Event::Close => {
                    assert!(last);
                    finished = true;
                }
            }
        }
        assert!(session.buffered_len() < bound);
        assert!(output_len <= common::output_bound(input_len));
    }
    assert!(session.take_pending_input().len() <= input_len);
});
