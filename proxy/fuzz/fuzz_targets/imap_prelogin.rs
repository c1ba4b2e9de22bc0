//! Arbitrary client bytes, split at arbitrary points, into the IMAP pre-login state machine.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mailproxy::mail::imap::{ImapConfig, ImapLogin, ImapPreLogin, upstream};

fuzz_target!(|data: &[u8]| {
    let _ = upstream::parse_response(data, "P1");
    let _ = upstream::ServerCapabilities::from_line(data);

    let Some(plan) = common::plan(data) else {
        return;
    };
    let bound = plan.limits.max_line_len + plan.limits.max_literal_len;
    let session = ImapPreLogin::new(ImapConfig {
        starttls: plan.starttls,
        tls_active: plan.tls_active,
        limits: plan.limits,
        ..ImapConfig::default()
    });
    common::check_pre_login(
        session,
        plan.chunks,
        bound,
        |session, ImapLogin { tag, credentials }| {
            assert!(!tag.is_empty());
            let id = upstream::id_command("P1", [203, 0, 113, 7].into(), session.client_id(), "px");
            assert_eq!(id.iter().filter(|&&b| b == b'\r' || b == b'\n').count(), 2);
            assert!(
                upstream::login_command("P2", &credentials.login, &credentials.password, true)
                    .is_some()
            );
        },
    );
});
