//! Connections kept open between requests (to web backends, to memcached): whether one is still
//! usable before it is reused.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};

/// Whether an idle kept connection is still open: it has nothing to read (no close, no stray
/// bytes). Polled once without waiting.
pub(crate) fn is_open<I: AsyncRead + Unpin>(io: &mut I) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(io).poll_read(&mut cx, &mut buf), Poll::Pending)
}
