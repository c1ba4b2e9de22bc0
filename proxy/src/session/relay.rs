//! After login: bytes both ways until either side is done, with an idle timeout.
//!
//! Most of a proxy's sessions are idle IMAP connections (IDLE, or a client that keeps its
//! connection open), so what an idle session holds is what the proxy's memory is made of. A
//! plain TCP side is read only after the socket reports data, into a buffer taken for that burst
//! and freed when the socket would block again: an idle plain session holds no relay buffer at
//! all. A TLS side needs a buffer for rustls to decrypt into; it is small ([`TLS_CHUNK`]) since
//! rustls keeps its own record buffers anyway.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;

use super::activity::ActivityClock;
use super::stream::{ReadHalf, Stream, WriteHalf};

/// First buffer of a burst on a plain side: what most commands and answers fit in.
const TCP_CHUNK: usize = 16 * 1024;

/// Largest buffer of a burst. A read that fills the buffer means a bulk transfer (a FETCH of a
/// big message), which then grows the buffer: on loopback and fast links each send costs a
/// wakeup of the receiver, so fewer, larger sends move more bytes per second. The buffer is
/// freed as soon as the burst is over, so only sessions moving data hold one.
const TCP_CHUNK_MAX: usize = 1024 * 1024;

/// The kernel send buffer of a relay's destination once a burst outgrows [`TCP_CHUNK`] (the
/// kernel doubles it). A burst is written while the next one is read only if it fits in the
/// destination's send buffer; the kernel grows that buffer on its own (`tcp_wmem`), but from
/// 16 KiB and in steps, so a bulk transfer (a FETCH of large messages) would run at a fraction of
/// its speed meanwhile. It is set only then, not for every session: a login's few commands never
/// need it, and two system calls are a measurable part of a login. What it costs an idle session
/// is nothing: the kernel holds only the bytes queued.
const RELAY_SEND_BUFFER: usize = 2 * 1024 * 1024;

/// Buffer a TLS side keeps for the session.
const TLS_CHUNK: usize = 4 * 1024;

/// Bytes and last activity of a session, shared by both directions.
#[derive(Debug)]
pub(crate) struct Traffic {
    /// The last byte either way.
    activity: ActivityClock,
    from_client: Direction,
    to_client: Direction,
}

/// One direction's count for the session log and for the metrics, which count as bytes move so
/// that an hours-long session shows its traffic while it runs.
#[derive(Debug)]
struct Direction {
    session: AtomicU64,
    metric: Counter,
}

impl Direction {
    fn add(&self, bytes: usize) {
        let bytes = bytes as u64;
        self.session.fetch_add(bytes, Ordering::Relaxed);
        self.metric.inc_by(bytes);
    }
}

impl Traffic {
    /// `from_client` and `to_client` are the metric counters of the session's protocol.
    pub(crate) fn new(from_client: Counter, to_client: Counter) -> Self {
        let direction = |metric| Direction {
            session: AtomicU64::new(0),
            metric,
        };
        Self {
            activity: ActivityClock::new(),
            from_client: direction(from_client),
            to_client: direction(to_client),
        }
    }

    pub(crate) fn bytes_from_client(&self) -> u64 {
        self.from_client.session.load(Ordering::Relaxed)
    }

    pub(crate) fn bytes_to_client(&self) -> u64 {
        self.to_client.session.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        self.activity.touch();
    }

    /// Resolves once nothing moved either way for `idle`.
    async fn idle_for(&self, idle: Duration) {
        self.activity.idle_for(idle, || false).await;
    }
}

/// What the upstream's end of stream means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpstreamEnd {
    /// The session is over: once what the upstream sent has reached the client, both
    /// connections close, as nginx's mail proxy does. A mail server that closed accepts no
    /// more commands, and waiting for the client to close too would cost the proxy a wakeup
    /// and two `shutdown` calls per session for nothing.
    EndsSession,
    /// Passed on as a half-close; the client may still send (a tunnel of any protocol).
    HalfClose,
}

/// How a relay ended.
#[derive(Debug)]
pub(crate) enum RelayEnd {
    /// The sides closed (each close passed on, or the upstream's close ended the session).
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A read or write failed (a reset, most often).
    Failed(io::Error),
}

/// Relays until both directions have ended (or the upstream's, per `upstream_end`), one fails,
/// or the session is idle for `idle`. `first_to_upstream` and `first_to_client` are bytes
/// already read from one side (pipelined commands, the rest of the upstream's last login
/// answer) that go out before anything else.
pub(crate) async fn relay(
    client: Stream,
    upstream: Stream,
    first_to_upstream: Vec<u8>,
    first_to_client: Vec<u8>,
    idle: Duration,
    traffic: &Traffic,
    upstream_end: UpstreamEnd,
) -> RelayEnd {
    // With a TLS side, bursts are not seen where a plain pump sees them (and a TLS writer is
    // out of reach once split): both buffers are set now.
    if client.is_tls() || upstream.is_tls() {
        for stream in [&client, &upstream] {
            grow_send_buffer(stream.tcp());
        }
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    traffic.touch();
    let upstream_bound = async {
        forward_first(
            &mut upstream_write,
            first_to_upstream,
            &traffic.from_client,
            traffic,
        )
        .await?;
        pump(
            &mut client_read,
            &mut upstream_write,
            &traffic.from_client,
            traffic,
        )
        .await?;
        finish(&mut upstream_write).await;
        Ok(())
    };
    let client_bound = async {
        forward_first(
            &mut client_write,
            first_to_client,
            &traffic.to_client,
            traffic,
        )
        .await?;
        pump(
            &mut upstream_read,
            &mut client_write,
            &traffic.to_client,
            traffic,
        )
        .await?;
        // A session that ends here closes its plain sockets, which passes the end on; a TLS
        // client still gets its close_notify.
        if upstream_end == UpstreamEnd::HalfClose || matches!(client_write, WriteHalf::Tls(_)) {
            finish(&mut client_write).await;
        }
        Ok(())
    };
    let relayed = async {
        tokio::pin!(upstream_bound, client_bound);
        tokio::select! {
            result = &mut client_bound => {
                result?;
                match upstream_end {
                    UpstreamEnd::EndsSession => Ok(()),
                    UpstreamEnd::HalfClose => upstream_bound.await,
                }
            }
            // The client's close went on to the upstream, whose last answers still go to the
            // client.
            result = &mut upstream_bound => {
                result?;
                client_bound.await
            }
        }
    };
    let end = tokio::select! {
        result = relayed => match result {
            Ok(()) => RelayEnd::Closed,
            Err(error) => RelayEnd::Failed(error),
        },
        () = traffic.idle_for(idle) => RelayEnd::Idle,
    };
    if upstream_end == UpstreamEnd::EndsSession && matches!(end, RelayEnd::Closed) {
        // Closing the sockets sends their FINs; tokio's write halves would first shut down
        // each one in a system call of its own.
        for half in [client_write, upstream_write] {
            if let WriteHalf::Tcp(half) = half {
                half.forget();
            }
        }
    }
    end
}

async fn forward_first(
    to: &mut WriteHalf,
    bytes: Vec<u8>,
    counter: &Direction,
    traffic: &Traffic,
) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    to.write_all(&bytes).await?;
    to.flush().await?;
    counter.add(bytes.len());
    traffic.touch();
    Ok(())
}

/// One direction, until its source ends (passing the end on is the caller's) or fails.
async fn pump(
    from: &mut ReadHalf,
    to: &mut WriteHalf,
    counter: &Direction,
    traffic: &Traffic,
) -> io::Result<()> {
    match from {
        ReadHalf::Tcp(source) => {
            // The size of the next burst's buffer: a bulk transfer drains the socket now and
            // then (the proxy reads faster than the sender writes), and should not start over
            // from small reads each time it does.
            let mut chunk = TCP_CHUNK;
            loop {
                source.readable().await?;
                let mut buffer = Vec::with_capacity(chunk);
                loop {
                    match read_available(source, &mut buffer).await {
                        Ok(0) => return Ok(()),
                        Ok(read) => {
                            send(to, &buffer, counter, traffic).await?;
                            let next = next_chunk(chunk, read);
                            if next > chunk
                                && chunk == TCP_CHUNK
                                && let WriteHalf::Tcp(destination) = &*to
                            {
                                grow_send_buffer(destination.as_ref());
                            }
                            chunk = next;
                            buffer.clear();
                            buffer.reserve_exact(chunk);
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                        Err(error) => return Err(error),
                    }
                }
            }
        }
        ReadHalf::Tls(source) => {
            let mut buffer = vec![0; TLS_CHUNK];
            loop {
                let read = source.read(&mut buffer).await?;
                if read == 0 {
                    return Ok(());
                }
                send(to, &buffer[..read], counter, traffic).await?;
            }
        }
    }
}

/// Reads what the socket holds now, or fails with `WouldBlock`. Unlike `try_read_buf`, a read
/// that leaves room in the buffer marks the socket drained (tokio's `poll_read` knows that
/// epoll will report the next data), so the next wait costs no read that returns `EAGAIN`.
async fn read_available(source: &mut OwnedReadHalf, buffer: &mut Vec<u8>) -> io::Result<usize> {
    let read = source.read_buf(buffer);
    tokio::pin!(read);
    std::future::poll_fn(|context| match read.as_mut().poll(context) {
        Poll::Pending => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
        ready => ready,
    })
    .await
}

fn grow_send_buffer(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_send_buffer_size(RELAY_SEND_BUFFER);
}

/// The next read's buffer size after a read of `read` bytes into `chunk`: four times larger
/// when it filled the buffer, four times smaller when it used less than a quarter of it.
fn next_chunk(chunk: usize, read: usize) -> usize {
    if read == chunk {
        (chunk * 4).min(TCP_CHUNK_MAX)
    } else if read < chunk / 4 {
        (chunk / 4).max(TCP_CHUNK)
    } else {
        chunk
    }
}

async fn send(
    to: &mut WriteHalf,
    bytes: &[u8],
    counter: &Direction,
    traffic: &Traffic,
) -> io::Result<()> {
    to.write_all(bytes).await?;
    // A TLS writer keeps records until flushed; plain TCP flushes as a no-op.
    to.flush().await?;
    counter.add(bytes.len());
    traffic.touch();
    Ok(())
}

/// Passes an end of stream on. The peer may already be gone, which is no error at this point.
async fn finish(to: &mut WriteHalf) {
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_grow_while_reads_fill_the_buffer_and_shrink_when_they_do_not() {
        assert_eq!(next_chunk(TCP_CHUNK, TCP_CHUNK), 4 * TCP_CHUNK);
        assert_eq!(next_chunk(TCP_CHUNK_MAX, TCP_CHUNK_MAX), TCP_CHUNK_MAX);
        assert_eq!(next_chunk(4 * TCP_CHUNK, 3 * TCP_CHUNK), 4 * TCP_CHUNK);
        assert_eq!(next_chunk(TCP_CHUNK_MAX, 100), TCP_CHUNK_MAX / 4);
        assert_eq!(next_chunk(TCP_CHUNK, 1), TCP_CHUNK);
    }
}
