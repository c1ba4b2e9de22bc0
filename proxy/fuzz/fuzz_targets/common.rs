//! What the IMAP and POP3 pre-login targets share: fuzzer bytes turned into a listener
//! configuration and a sequence of reads, and the checks every pre-login machine must pass.

use mailproxy::mail::{Limits, PreLoginEvent, PreLoginMachine, StartTls, StartTlsMode};

pub struct Plan<'a> {
    pub starttls: StartTls,
    pub tls_active: bool,
    pub limits: Limits,
    pub chunks: Vec<&'a [u8]>,
}

/// Byte 0 picks the configuration, byte 1 seeds how the rest is split into reads, so that the
/// fuzzer explores commands cut at every possible point as well as whole pipelines.
pub fn plan(data: &[u8]) -> Option<Plan<'_>> {
    let (&[config, seed], mut rest) = data.split_first_chunk::<2>()?;
    let mode = match config & 3 {
        0 => StartTlsMode::Off,
        1 => StartTlsMode::On,
        _ => StartTlsMode::Only,
    };
    let starttls = StartTls {
        mode,
        certificate: config & 4 == 0,
    };
    let limits = if config & 8 != 0 {
        Limits {
            max_line_len: 64,
            max_literal_len: 32,
            max_errors: u32::from(config >> 4),
        }
    } else {
        Limits {
            max_errors: u32::from(config >> 4),
            ..Limits::default()
        }
    };
    let max_chunk = 1 + usize::from(seed % 64);
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    let mut chunks = Vec::new();
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = (1 + state as usize % max_chunk).min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        chunks.push(chunk);
        rest = tail;
    }
    Some(Plan {
        starttls,
        tls_active: config & 4 != 0,
        limits,
        chunks,
    })
}

/// Replies are small and proportional to what the client sent; anything else would let a
/// client amplify its traffic or make the proxy buffer without bound.
fn output_bound(input_len: usize) -> usize {
    32 * input_len + 8192
}

/// Feeds `plan`'s reads to `session` and checks what every pre-login machine promises: replies
/// are whole lines and proportional to the input, STARTTLS and the login or close are the last
/// event of a read and nothing follows them, a login names a user without control characters,
/// and no more than `buffer_bound` bytes are ever held. `check_login` adds the protocol's own
/// checks (the upstream commands built from the login).
pub fn check_pre_login<M: PreLoginMachine>(
    mut session: M,
    chunks: Vec<&[u8]>,
    buffer_bound: usize,
    mut check_login: impl FnMut(&M, &M::Login),
) {
    let mut input_len = 0;
    let mut output_len = 0;
    let mut finished = false;
    let mut awaiting_tls = false;
    for chunk in chunks {
        input_len += chunk.len();
        let events = session.feed(chunk);
        if finished || awaiting_tls {
            assert!(events.is_empty(), "events after a terminal event");
        }
        if awaiting_tls {
            session.tls_established();
            awaiting_tls = false;
        }
        let count = events.len();
        for (index, event) in events.into_iter().enumerate() {
            let last = index + 1 == count;
            match event {
                PreLoginEvent::Reply(bytes) => {
                    assert!(bytes.ends_with(b"\r\n"));
                    output_len += bytes.len();
                }
                PreLoginEvent::StartTls => {
                    assert!(last);
                    awaiting_tls = true;
                }
                PreLoginEvent::Login(login) => {
                    assert!(last);
                    let credentials = M::credentials(&login);
                    assert!(!credentials.login.is_empty());
                    assert!(!credentials.login.chars().any(char::is_control));
                    check_login(&session, &login);
                    finished = true;
                }
                PreLoginEvent::Close => {
                    assert!(last);
                    finished = true;
                }
            }
        }
        assert!(session.buffered_len() <= buffer_bound);
        assert!(output_len <= output_bound(input_len));
    }
    assert!(session.take_pending_input().len() <= input_len);
}
