//! One HTTP/1.x client connection: its requests one after the other, each relayed to its
//! backend over the client connection's own backend connection, which is kept between requests
//! while the backend stays the same. Everything runs in the client connection's task.

use std::future::{Future, poll_fn};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use http::Method;
use http::header::{AUTHORIZATION, COOKIE, HeaderMap, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, timeout, timeout_at};

use super::buffer::ReadBuffer;
use super::framing::{ChunkedDecoder, ChunkedError, Framing};
use super::head::{
    self, ClientAddress, ClientSide, Forwarding, RequestHead, ResponseHead, parse_request,
    parse_response,
};
use crate::http::proxy::{
    ConnectionInfo, Failure, HttpProxy, Routed, is_idempotent, is_usable_host,
};
use crate::http::upstream::ConnectError;
use crate::kept_connection::is_open;
use crate::route::Upstream;
use crate::session::relay::{UpstreamEnd, relay};
use crate::session::signalled;
use crate::session::stream::Stream;

/// A client connection's read buffer to start with (grows to `http.maxHeaderBytes` for a head).
const CLIENT_BUFFER: usize = 8 * 1024;
/// A backend connection's read buffer, also the largest piece of a body moved at once.
const BACKEND_BUFFER: usize = 16 * 1024;
/// Body bytes that go out in one write with the head before them (a small response: one write).
const COALESCE: usize = 16 * 1024;
/// The start of HTTP/2 in clear text (prior knowledge, RFC 9113 §3.3).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest response head taken from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How a client connection's HTTP/1 service ended.
pub(crate) enum Ended {
    /// The connection is done with.
    Closed,
    /// The client speaks HTTP/2 (prior knowledge): its connection and the bytes read so far.
    Http2(Stream, Vec<u8>),
}

struct Client {
    io: Stream,
    buffer: ReadBuffer,
}

/// A client connection's own backend connection.
struct Backend {
    upstream: Upstream,
    /// Over TLS.
    tls: bool,
    io: Stream,
    buffer: ReadBuffer,
    /// Served an earlier request (the backend may have closed it since).
    reused: bool,
}

/// Serves HTTP/1.x requests on `io` until the client or the proxy ends the connection; `stop`
/// turning true ends it after the request in flight.
pub(crate) async fn serve(
    proxy: &HttpProxy,
    io: Stream,
    conn: ConnectionInfo,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let mut client = Client {
        io,
        buffer: ReadBuffer::new(CLIENT_BUFFER),
    };
    let mut backend = None;
    let mut out = Vec::with_capacity(1024);
    let address = ClientAddress::new(conn.peer.ip());
    let mut first = true;
    let mut stop_watch = stop.clone();
    let stopping = signalled(&mut stop_watch);
    tokio::pin!(stopping);
    loop {
        let head = match read_request_head(
            proxy,
            conn.peer.ip(),
            &mut client,
            stopping.as_mut(),
            first,
            &mut out,
        )
        .await
        {
            Some(Ok(head)) => head,
            Some(Err(())) => {
                return Ended::Http2(client.io, client.buffer.filled().to_vec());
            }
            None => return Ended::Closed,
        };
        first = false;
        if let Some(port) = proxy.settings().redirect_to_https.filter(|_| !conn.tls) {
            if !redirect(proxy, &mut client, &head, port, &mut out).await {
                return Ended::Closed;
            }
            continue;
        }
        let exchange = Exchange {
            proxy,
            conn,
            address: &address,
            started: Instant::now(),
            head,
        };
        match exchange
            .run(&mut client, &mut backend, stop, &mut out)
            .await
        {
            Next::Request => client.buffer.shrink(),
            Next::Close => return Ended::Closed,
            Next::Upgraded(backend) => {
                upgraded(proxy, client, *backend, std::mem::take(&mut out)).await;
                return Ended::Closed;
            }
        }
    }
}

/// Answers a plain-http request with a redirect to https; `true` when the connection goes on.
async fn redirect(
    proxy: &HttpProxy,
    client: &mut Client,
    head: &RequestHead,
    port: u16,
    out: &mut Vec<u8>,
) -> bool {
    let started = Instant::now();
    let buffer = client.buffer.filled();
    let target = match head.uri.authority() {
        Some(_) => head.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        None => std::str::from_utf8(&buffer[head.target.clone()]).unwrap_or("/"),
    };
    let location = head::https_location(virtual_host(buffer, head), target, port);
    let keep = head.keep_alive && head.framing == Framing::Empty && location.is_some();
    out.clear();
    let status = match location {
        Some(location) => {
            head::write_redirect(&location, !keep, out);
            301
        }
        None => {
            head::write_answer(
                400,
                "Bad Request",
                "no usable Host to redirect to\n",
                true,
                out,
            );
            400
        }
    };
    proxy.redirected(status, started.elapsed());
    client.buffer.consume(head.length);
    let written = write_all(&mut client.io, out, proxy.settings().body_idle_timeout).await;
    keep && written.is_ok()
}

/// The next request head: `None` when the connection should close (the client left, was too
/// slow, sent a bad head, which was answered, or the proxy stops), `Err` for an HTTP/2 preface.
async fn read_request_head(
    proxy: &HttpProxy,
    peer: IpAddr,
    client: &mut Client,
    mut stopping: Pin<&mut impl Future<Output = ()>>,
    first: bool,
    out: &mut Vec<u8>,
) -> Option<Result<RequestHead, ()>> {
    let settings = proxy.settings();
    let deadline = Instant::now() + settings.header_read_timeout;
    loop {
        let filled = client.buffer.filled();
        if first
            && !filled.is_empty()
            && H2_PREFACE.starts_with(&filled[..filled.len().min(H2_PREFACE.len())])
        {
            if filled.len() >= H2_PREFACE.len() {
                return Some(Err(()));
            }
        } else if !filled.is_empty() {
            match parse_request(filled, settings.max_header_bytes) {
                Ok(Some(head)) => return Some(Ok(head)),
                Ok(None) => {}
                Err(error) => {
                    let (status, reason, text) = error.answer();
                    tracing::debug!(%peer, %error, "bad request head");
                    out.clear();
                    head::write_answer(status, reason, text, true, out);
                    let _ = write_all(&mut client.io, out, settings.header_read_timeout).await;
                    return None;
                }
            }
        }
        let idle = client.buffer.is_empty();
        let read = client
            .buffer
            .read_from(&mut client.io, settings.max_header_bytes.max(CLIENT_BUFFER));
        tokio::select! {
            biased;
            read = timeout_at(deadline, read) => match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            },
            () = stopping.as_mut(), if idle => return None,
        }
    }
}

/// One request and its response.
struct Exchange<'a> {
    proxy: &'a HttpProxy,
    conn: ConnectionInfo,
    address: &'a ClientAddress,
    started: Instant,
    head: RequestHead,
}

/// Why relaying a body stopped short.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    /// The sending side failed or closed early.
    #[error("{0}")]
    Source(String),
    /// The sending side broke the chunked coding.
    #[error("{0}")]
    Malformed(ChunkedError),
    /// The receiving side failed.
    #[error("{0}")]
    Destination(io::Error),
    /// Nothing moved for the idle timeout.
    #[error("nothing moved for the idle timeout")]
    Idle,
}

/// What a client connection does after an exchange.
enum Next {
    /// Reads its next request.
    Request,
    /// Closes.
    Close,
    /// Relays bytes both ways with this backend (after a `101`); the head for the client is in
    /// the exchange's output buffer.
    Upgraded(Box<Backend>),
}

impl Next {
    fn keep(keep: bool) -> Self {
        if keep { Next::Request } else { Next::Close }
    }
}

impl Exchange<'_> {
    /// Relays the exchange.
    async fn run(
        self,
        client: &mut Client,
        kept: &mut Option<Backend>,
        stop: &mut watch::Receiver<bool>,
        out: &mut Vec<u8>,
    ) -> Next {
        let proxy = self.proxy;
        let settings = proxy.settings();
        let head = &self.head;
        let buffer = client.buffer.filled();
        let host = virtual_host(buffer, head);
        let mut routed = proxy
            .route(&head.uri, &routing_headers(buffer, head), self.conn, host)
            .await;
        let Some(mut upstream) = routed.upstream.take() else {
            return self
                .fail_unsent(client, &routed, None, Failure::NoBackend, out)
                .await;
        };
        let retryable =
            routed.balanced() && is_idempotent(&head.method) && head.framing == Framing::Empty;
        let mut tried = Vec::new();
        let mut backend = loop {
            match take_or_connect(proxy, kept, &upstream, routed.tls).await {
                Ok(backend) => break backend,
                Err(error) if !error.unreachable() => {
                    let failure = Failure::Broken(error.to_string());
                    return self
                        .fail_unsent(client, &routed, Some(&upstream), failure, out)
                        .await;
                }
                Err(error) => {
                    match proxy.next_backend(
                        &routed,
                        &upstream,
                        &mut tried,
                        self.conn.peer.ip(),
                        retryable,
                    ) {
                        Some(next) => {
                            tracing::info!(from = %upstream, to = %next, "web backend refused the connection; retrying on another");
                            upstream = next;
                        }
                        None => {
                            return self
                                .fail_unsent(
                                    client,
                                    &routed,
                                    Some(&upstream),
                                    Failure::Refused(error.to_string()),
                                    out,
                                )
                                .await;
                        }
                    }
                }
            }
        };

        out.clear();
        let forwarding = Forwarding {
            client: self.address,
            tls: self.conn.tls,
            host,
            upstream: &upstream,
        };
        head::write_upstream_request(client.buffer.filled(), head, &forwarding, out);
        client.buffer.consume(head.length);
        let to_head = head.method == Method::HEAD;

        let exchanged = if head.framing == Framing::Empty {
            send_without_body(
                proxy,
                &mut backend,
                out,
                to_head,
                is_idempotent(&head.method),
            )
            .await
        } else {
            if head.expect_continue && head.minor == 1 {
                let answered = write_all(
                    &mut client.io,
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    settings.body_idle_timeout,
                )
                .await;
                if answered.is_err() {
                    return Next::Close;
                }
            }
            send_with_body(proxy, client, &mut backend, head.framing, out, to_head).await
        };
        let (mut response, body_sent) = match exchanged {
            Ok(exchanged) => exchanged,
            Err(Sent::ClientFailed) => return Next::Close,
            Err(Sent::ClientMalformed(error)) => {
                tracing::debug!(peer = %self.conn.peer, %error, "malformed request body");
                out.clear();
                head::write_answer(400, "Bad Request", "malformed request body\n", true, out);
                self.finished(&routed, 400, Some(&upstream));
                let _ = write_all(&mut client.io, out, settings.body_idle_timeout).await;
                return Next::Close;
            }
            Err(Sent::Backend(failure)) => {
                return self
                    .fail(client, &routed, Some(&upstream), failure, out)
                    .await;
            }
        };

        loop {
            if !response.is_interim() {
                break;
            }
            let interim = response.length;
            if response.status != 100 && head.minor == 1 {
                let bytes = &backend.buffer.filled()[..interim];
                if write_all(&mut client.io, bytes, settings.body_idle_timeout)
                    .await
                    .is_err()
                {
                    return Next::Close;
                }
            }
            backend.buffer.consume(interim);
            match read_response_head(
                &mut backend.io,
                &mut backend.buffer,
                to_head,
                Some(settings.upstream_response_timeout),
            )
            .await
            {
                Ok(next) => response = next,
                Err(failure) => {
                    return self
                        .fail(client, &routed, Some(&upstream), failure, out)
                        .await;
                }
            }
        }

        if response.status == 101 {
            if head.upgrade.is_none() {
                let failure = Failure::Broken("an upgrade nobody asked for".into());
                return self
                    .fail(client, &routed, Some(&upstream), failure, out)
                    .await;
            }
            self.finished(&routed, 101, Some(&upstream));
            out.clear();
            let side = ClientSide {
                minor: head.minor,
                keep_alive: true,
                dechunk: false,
            };
            head::write_client_response(backend.buffer.filled(), &response, side, out);
            backend.buffer.consume(response.length);
            return Next::Upgraded(Box::new(backend));
        }

        let dechunk = head.minor == 0 && response.framing == Framing::Chunked;
        let client_keeps = head.keep_alive
            && body_sent
            && !*stop.borrow()
            && response.framing != Framing::UntilClose
            && !dechunk;
        out.clear();
        let side = ClientSide {
            minor: head.minor,
            keep_alive: client_keeps,
            dechunk,
        };
        head::write_client_response(backend.buffer.filled(), &response, side, out);
        backend.buffer.consume(response.length);
        self.finished(&routed, response.status, Some(&upstream));
        let relayed = relay_body(
            response.framing,
            &mut backend.io,
            &mut backend.buffer,
            &mut client.io,
            out,
            dechunk,
            settings.body_idle_timeout,
        )
        .await;
        match relayed {
            Ok(()) => {
                if response.keep_alive && body_sent && backend.buffer.is_empty() {
                    backend.reused = true;
                    backend.buffer.shrink();
                    *kept = Some(backend);
                }
                Next::keep(client_keeps)
            }
            Err(error) => {
                tracing::debug!(upstream = %upstream, %error, "web response cut short");
                Next::Close
            }
        }
    }

    /// Answers a request that never left the proxy: its head is still in the client's buffer.
    async fn fail_unsent(
        &self,
        client: &mut Client,
        routed: &Routed,
        upstream: Option<&Upstream>,
        failure: Failure,
        out: &mut Vec<u8>,
    ) -> Next {
        client.buffer.consume(self.head.length);
        self.fail(client, routed, upstream, failure, out).await
    }

    /// Answers a request the proxy could not relay.
    async fn fail(
        &self,
        client: &mut Client,
        routed: &Routed,
        upstream: Option<&Upstream>,
        failure: Failure,
        out: &mut Vec<u8>,
    ) -> Next {
        self.proxy.failed(routed, upstream, &failure).await;
        let keep = self.head.keep_alive && self.head.framing == Framing::Empty;
        let (status, text) = failure.answer();
        out.clear();
        head::write_answer(
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            text,
            !keep,
            out,
        );
        self.finished(routed, status.as_u16(), upstream);
        let written = write_all(&mut client.io, out, self.proxy.settings().body_idle_timeout).await;
        Next::keep(keep && written.is_ok())
    }

    fn finished(&self, routed: &Routed, status: u16, upstream: Option<&Upstream>) {
        self.proxy.finished(
            routed,
            self.conn.peer.ip(),
            &self.head.method,
            self.head.uri.path(),
            status,
            self.started.elapsed(),
            upstream,
        );
    }
}

/// The client connection's kept backend connection if it goes to `upstream` and is still open,
/// else a new one.
async fn take_or_connect(
    proxy: &HttpProxy,
    kept: &mut Option<Backend>,
    upstream: &Upstream,
    tls: bool,
) -> Result<Backend, ConnectError> {
    if let Some(mut backend) = kept.take()
        && backend.upstream == *upstream
        && backend.tls == tls
        && is_open(&mut backend.io)
    {
        backend.reused = true;
        return Ok(backend);
    }
    let io = proxy.connect(upstream, tls).await?;
    Ok(Backend {
        upstream: upstream.clone(),
        tls,
        io,
        buffer: ReadBuffer::new(BACKEND_BUFFER),
        reused: false,
    })
}

/// Why no response head came back.
enum Sent {
    /// The client abandoned its request body: nothing to answer.
    ClientFailed,
    /// The client's chunked body broke the coding: it gets a 400.
    ClientMalformed(ChunkedError),
    /// The backend failed: the client gets this answer.
    Backend(Failure),
}

/// Sends a request without a body and reads the response head. A kept connection the backend
/// closed in the meantime is replaced once: when the request could not be written (nothing of
/// it was processed), or when it is `idempotent` (RFC 9112 §9.3.1: a backend that closed after
/// reading it may have acted on it, so a POST is not sent twice).
async fn send_without_body(
    proxy: &HttpProxy,
    backend: &mut Backend,
    request: &[u8],
    to_head: bool,
    idempotent: bool,
) -> Result<(ResponseHead, bool), Sent> {
    let settings = proxy.settings();
    loop {
        let written = write_all(&mut backend.io, request, settings.body_idle_timeout).await;
        let (result, unsent) = match written {
            Ok(()) => {
                let head = read_response_head(
                    &mut backend.io,
                    &mut backend.buffer,
                    to_head,
                    Some(settings.upstream_response_timeout),
                )
                .await;
                (head, false)
            }
            Err(error) => (Err(Failure::Broken(error.to_string())), true),
        };
        match result {
            Ok(head) => return Ok((head, true)),
            Err(Failure::Broken(_))
                if backend.reused && backend.buffer.is_empty() && (unsent || idempotent) =>
            {
                let io = proxy
                    .connect(&backend.upstream, backend.tls)
                    .await
                    .map_err(|error| Sent::Backend(Failure::Broken(error.to_string())))?;
                backend.io = io;
                backend.reused = false;
            }
            Err(failure) => return Err(Sent::Backend(failure)),
        }
    }
}

/// Streams the request body to the backend while watching for its response head (a backend may
/// answer before reading the whole body). `true` with the head when the body was sent whole:
/// otherwise the rest of it is still unread on the client's connection, which must then close
/// (its next bytes are not a request head), as must the backend's.
async fn send_with_body(
    proxy: &HttpProxy,
    client: &mut Client,
    backend: &mut Backend,
    framing: Framing,
    request: &mut Vec<u8>,
    to_head: bool,
) -> Result<(ResponseHead, bool), Sent> {
    let settings = proxy.settings();
    let Backend { io, buffer, .. } = backend;
    let (mut reader, mut writer) = tokio::io::split(io);
    let send = relay_body(
        framing,
        &mut client.io,
        &mut client.buffer,
        &mut writer,
        request,
        false,
        settings.body_idle_timeout,
    );
    // Interim answers (`102`, `103`, an unasked `100`) are dropped here: the client's
    // connection is busy with its body, and the body must go on to the final answer.
    let response = async {
        loop {
            let head = read_response_head(&mut reader, buffer, to_head, None).await?;
            if !head.is_interim() {
                return Ok(head);
            }
            buffer.consume(head.length);
        }
    };
    tokio::pin!(send, response);
    let answer_by = tokio::time::sleep(Duration::from_secs(86400 * 365));
    tokio::pin!(answer_by);
    // `ended`: no more of the body goes out; `whole`: all of it did.
    let (mut ended, mut whole) = (false, false);
    loop {
        tokio::select! {
            result = &mut send, if !ended => match result {
                Ok(()) => {
                    (ended, whole) = (true, true);
                    answer_by.as_mut().reset(Instant::now() + settings.upstream_response_timeout);
                }
                Err(RelayError::Destination(error)) => {
                    tracing::debug!(%error, "the backend stopped taking the request body");
                    ended = true;
                    answer_by.as_mut().reset(Instant::now() + settings.upstream_response_timeout);
                }
                Err(RelayError::Malformed(error)) => return Err(Sent::ClientMalformed(error)),
                Err(error) => {
                    tracing::debug!(%error, "the client's request body failed");
                    return Err(Sent::ClientFailed);
                }
            },
            head = &mut response => return match head {
                Ok(head) => Ok((head, whole)),
                Err(failure) => Err(Sent::Backend(failure)),
            },
            () = &mut answer_by, if ended => return Err(Sent::Backend(Failure::Timeout)),
        }
    }
}

/// Reads a backend's response head into `buffer` (left unconsumed), within `wait` (`None`: the
/// caller bounds the wait).
async fn read_response_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buffer: &mut ReadBuffer,
    to_head: bool,
    wait: Option<Duration>,
) -> Result<ResponseHead, Failure> {
    let deadline = wait.map(|wait| Instant::now() + wait);
    loop {
        if !buffer.is_empty() {
            match parse_response(buffer.filled(), MAX_RESPONSE_HEAD, to_head) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(error) => return Err(Failure::Broken(format!("bad response head: {error}"))),
            }
        }
        let read = buffer.read_from(io, MAX_RESPONSE_HEAD);
        let read = match deadline {
            Some(deadline) => timeout_at(deadline, read)
                .await
                .map_err(|_| Failure::Timeout)?,
            None => read.await,
        };
        match read {
            Ok(0) => return Err(Failure::Broken("the backend closed the connection".into())),
            Ok(_) => {}
            Err(error) => return Err(Failure::Broken(error.to_string())),
        }
    }
}

/// Moves a body framed by `framing` from `source` (what `buffer` holds first) to `destination`,
/// after the bytes in `pending` (the head before it), which is left empty.
async fn relay_body<R, W>(
    framing: Framing,
    source: &mut R,
    buffer: &mut ReadBuffer,
    destination: &mut W,
    pending: &mut Vec<u8>,
    dechunk: bool,
    idle: Duration,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut remaining = match framing {
        Framing::Length(length) => length,
        _ => 0,
    };
    let mut decoder = ChunkedDecoder::default();
    loop {
        let available = buffer.filled();
        let (take, done) = match framing {
            Framing::Empty => (0, true),
            Framing::Length(_) => {
                let take = remaining.min(available.len() as u64);
                remaining -= take;
                (take as usize, remaining == 0)
            }
            Framing::UntilClose => (available.len(), false),
            Framing::Chunked => {
                let mut at = 0;
                while at < available.len() && !decoder.is_done() {
                    let step = decoder
                        .advance(&available[at..])
                        .map_err(RelayError::Malformed)?;
                    if dechunk {
                        pending.extend_from_slice(&available[at..][step.data]);
                    }
                    at += step.consumed;
                }
                (at, decoder.is_done())
            }
        };
        let body = &available[..take];
        if dechunk {
            write_all(destination, pending, idle).await?;
        } else if pending.is_empty() {
            write_all(destination, body, idle).await?;
        } else if body.len() <= COALESCE {
            pending.extend_from_slice(body);
            write_all(destination, pending, idle).await?;
        } else {
            write_all(destination, pending, idle).await?;
            write_all(destination, body, idle).await?;
        }
        pending.clear();
        buffer.consume(take);
        if done {
            return flush(destination, idle).await;
        }
        match timeout(idle, buffer.read_from(source, BACKEND_BUFFER)).await {
            Err(_) => return Err(RelayError::Idle),
            Ok(Err(error)) => return Err(RelayError::Source(error.to_string())),
            Ok(Ok(0)) if framing == Framing::UntilClose => return flush(destination, idle).await,
            Ok(Ok(0)) => {
                return Err(RelayError::Source(
                    "closed before the end of the body".into(),
                ));
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Writes `bytes` and flushes them: a TLS stream may keep records it took when the socket was
/// full, and the peer, waiting for them, would never answer.
async fn write_all<W: AsyncWrite + Unpin>(
    destination: &mut W,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), RelayError> {
    if bytes.is_empty() {
        return Ok(());
    }
    // A write nearly always fits in the socket's buffer at once: the idle timer is armed only
    // for what does not.
    let first = poll_fn(|cx| Poll::Ready(Pin::new(&mut *destination).poll_write(cx, bytes))).await;
    let written = match first {
        Poll::Ready(Ok(written)) => written,
        Poll::Ready(Err(error)) => return Err(RelayError::Destination(error)),
        Poll::Pending => 0,
    };
    if written < bytes.len() {
        match timeout(idle, destination.write_all(&bytes[written..])).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(RelayError::Destination(error)),
            Err(_) => return Err(RelayError::Idle),
        }
    }
    // Nothing to flush on plain TCP: no timer for it.
    match poll_fn(|cx| Poll::Ready(Pin::new(&mut *destination).poll_flush(cx))).await {
        Poll::Ready(Ok(())) => Ok(()),
        Poll::Ready(Err(error)) => Err(RelayError::Destination(error)),
        Poll::Pending => flush(destination, idle).await,
    }
}

async fn flush<W: AsyncWrite + Unpin>(
    destination: &mut W,
    idle: Duration,
) -> Result<(), RelayError> {
    match timeout(idle, destination.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(RelayError::Destination(error)),
        Err(_) => Err(RelayError::Idle),
    }
}

/// After a `101`: the client gets the backend's head (in `to_client`) and what else the backend
/// sent, the backend what else the client sent, then bytes flow both ways until both sides
/// close or nothing moves for `http.tunnelIdleTimeoutSeconds`.
async fn upgraded(proxy: &HttpProxy, client: Client, backend: Backend, mut to_client: Vec<u8>) {
    to_client.extend_from_slice(backend.buffer.filled());
    let to_backend = client.buffer.filled().to_vec();
    let traffic = proxy.tunnel_traffic();
    let idle = proxy.settings().tunnel_idle_timeout;
    let end = relay(
        client.io,
        backend.io,
        to_backend,
        to_client,
        idle,
        &traffic,
        UpstreamEnd::HalfClose,
    )
    .await;
    tracing::debug!(
        upstream = %backend.upstream,
        ?end,
        from_client = traffic.bytes_from_client(),
        to_client = traffic.bytes_to_client(),
        "upgraded connection ended"
    );
}

/// The Host of a request: the header, else the target's authority.
fn virtual_host<'a>(buffer: &'a [u8], head: &'a RequestHead) -> Option<&'a str> {
    head::header_value(buffer, &head.headers, "host")
        .and_then(|value| std::str::from_utf8(value).ok())
        .or_else(|| head.uri.authority().map(|a| a.as_str()))
        .filter(|host| is_usable_host(host))
}

/// The headers routing reads (credentials), in the form [`crate::http::routing::detect`] takes.
fn routing_headers(buffer: &[u8], head: &RequestHead) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for span in &head.headers {
        let name = &buffer[span.name.clone()];
        let name = if name.eq_ignore_ascii_case(b"authorization") {
            AUTHORIZATION
        } else if name.eq_ignore_ascii_case(b"cookie") {
            COOKIE
        } else {
            continue;
        };
        if let Ok(value) = HeaderValue::from_bytes(&buffer[span.value.clone()]) {
            headers.append(name, value);
        }
    }
    headers
}
