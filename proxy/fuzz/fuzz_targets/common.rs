//! Turns fuzzer bytes into a listener configuration and a sequence of reads.

use mailproxy::mail::{Limits, StartTlsMode};

pub struct Plan<'a> {
    pub starttls: StartTlsMode,
    pub tls_active: bool,
    pub limits: Limits,
    pub chunks: Vec<&'a [u8]>,
}

/// Byte 0 picks the configuration, byte 1 seeds how the rest is split into reads, so that the
/// fuzzer explores commands cut at every possible point as well as whole pipelines.
pub fn plan(data: &[u8]) -> Option<Plan<'_>> {
    let (&[config, seed], mut rest) = data.split_first_chunk::<2>()?;
    let starttls = match config & 3 {
        0 => StartTlsMode::Off,
        1 => StartTlsMode::On,
        _ => StartTlsMode::Only,
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
pub fn output_bound(input_len: usize) -> usize {
    32 * input_len + 8192
}
