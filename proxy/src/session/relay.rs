//! After login: bytes both ways until either side is done, with an idle timeout.
//!
//! Most of a proxy's sessions are idle IMAP connections (IDLE, or a client that keeps its
//! connection open), so what an idle session holds is what the proxy's memory is made of. A
//! plain TCP side is read only after the socket reports data, into a buffer taken for that burst
//! and freed when the socket would block again: an idle plain session holds no relay buffer at
//! all. A TLS side needs a buffer for rustls to decrypt into; it is small ([`TLS_CHUNK`]) since
//! rustls keeps its own record buffers anyway.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::stream::{ReadHalf, Stream, WriteHalf};

/// First buffer of a burst on a plain side: what most commands and answers fit in.
const TCP_CHUNK: usize = 16 * 1024;

/// Largest buffer of a burst. A read that fills the buffer means a bulk transfer (a FETCH of a
/// big message), which then grows the buffer: on loopback and fast links each send costs a
/// wakeup of the receiver, so fewer, larger sends move more bytes per second. The buffer is
/// freed as soon as the burst is over, so only sessions moving data hold one.
const TCP_CHUNK_MAX: usize = 1024 * 1024;

/// Buffer a TLS side keeps for the session.
const TLS_CHUNK: usize = 4 * 1024;

/// Bytes and last activity of a session, shared by both directions.
#[derive(Debug)]
pub(crate) struct Traffic {
    origin: Instant,
    /// Milliseconds from `origin` to the last byte either way.
    last_activity: AtomicU64,
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
            origin: Instant::now(),
            last_activity: AtomicU64::new(0),
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
        let elapsed = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity.store(elapsed, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_activity.load(Ordering::Relaxed))
    }

    /// Resolves once nothing moved either way for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last_activity() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// How a relay ended.
#[derive(Debug)]
pub(crate) enum RelayEnd {
    /// Both sides closed (each close was passed on to the other side).
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A read or write failed (a reset, most often).
    Failed(io::Error),
}

/// Relays until both directions have ended, one fails, or the session is idle for `idle`.
/// `first_to_upstream` and `first_to_client` are bytes already read from one side (pipelined
/// commands, the rest of the upstream's last login answer) that go out before anything else.
pub(crate) async fn relay(
    client: Stream,
    upstream: Stream,
    first_to_upstream: Vec<u8>,
    first_to_client: Vec<u8>,
    idle: Duration,
    traffic: &Traffic,
) -> RelayEnd {
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
        .await
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
        .await
    };
    tokio::select! {
        result = async { tokio::try_join!(upstream_bound, client_bound) } => match result {
            Ok(_) => RelayEnd::Closed,
            Err(error) => RelayEnd::Failed(error),
        },
        () = traffic.idle_for(idle) => RelayEnd::Idle,
    }
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

/// One direction, until its source ends (the end is passed on as a shutdown of the
/// destination) or fails.
async fn pump(
    from: &mut ReadHalf,
    to: &mut WriteHalf,
    counter: &Direction,
    traffic: &Traffic,
) -> io::Result<()> {
    match from {
        ReadHalf::Tcp(source) => loop {
            source.readable().await?;
            let mut buffer = Vec::with_capacity(TCP_CHUNK);
            loop {
                match source.try_read_buf(&mut buffer) {
                    Ok(0) => return finish(to).await,
                    Ok(_) => {
                        send(to, &buffer, counter, traffic).await?;
                        let filled = buffer.len() == buffer.capacity();
                        buffer.clear();
                        if filled && buffer.capacity() < TCP_CHUNK_MAX {
                            buffer.reserve_exact((buffer.capacity() * 4).min(TCP_CHUNK_MAX));
                        }
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) => return Err(error),
                }
            }
        },
        ReadHalf::Tls(source) => {
            let mut buffer = vec![0; TLS_CHUNK];
            loop {
                let read = source.read(&mut buffer).await?;
                if read == 0 {
                    return finish(to).await;
                }
                send(to, &buffer[..read], counter, traffic).await?;
            }
        }
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
async fn finish(to: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
    let _ = to.shutdown().await;
    Ok(())
}
