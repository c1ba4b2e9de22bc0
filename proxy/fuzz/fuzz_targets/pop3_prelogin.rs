//! Arbitrary client bytes, split at arbitrary points, into the POP3 pre-login state machine.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mailproxy::mail::pop3::{Pop3Config, Pop3PreLogin, upstream};

fuzz_target!(|data: &[u8]| {
    let _ = upstream::parse_reply(data);

    let Some(plan) = common::plan(data) else {
        return;
    };
    // A line is held only while shorter than the limit.
    let bound = plan.limits.max_line_len - 1;
    let session = Pop3PreLogin::new(Pop3Config {
        starttls: plan.starttls,
        tls_active: plan.tls_active,
        limits: plan.limits,
        ..Pop3Config::default()
    });
    common::check_pre_login(session, plan.chunks, bound, |_, credentials| {
        assert!(upstream::user_command(&credentials.login).is_some());
        assert!(upstream::pass_command(&credentials.password).is_some());
    });
});
