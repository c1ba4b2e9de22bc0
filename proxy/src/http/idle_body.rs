//! Bodies relayed for HTTP/2 clients, with the limits the HTTP/1 relay has: a body that sends no
//! frame for `http.bodyIdleTimeoutSeconds` fails (a stalled upload or download would otherwise
//! hold its stream, a pooled backend connection and a connection slot for ever), and a request
//! body reports its progress ([`UploadProgress`]): the backend's answer is waited for from its
//! end (a long upload is not a slow backend), and a backend that stops taking it is given up
//! after the idle time (the body's own timer does not run then: nobody polls it).
//!
//! Written here rather than taken from tower-http's `TimeoutBody`: that one times each frame
//! from the body's creation, not from its first poll (hyper polls a request body only once the
//! backend connection is open), and reports no progress.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::session::activity::ActivityClock;

/// The error of a relayed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a body ended early.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?}")]
pub struct BodyIdle(Duration);

/// How a request body is going, for the task waiting on the backend's answer.
#[derive(Debug)]
pub struct UploadProgress {
    /// The last frame the backend took.
    moved: ActivityClock,
    /// The backend's side has asked for the body: the connection is open.
    asked: AtomicBool,
    /// The body is waiting for its source, the client: a stall there is the body's own timer's
    /// (a 502), not the backend's.
    waiting_on_client: AtomicBool,
    /// No more of it goes out: sent whole, failed, or dropped.
    ended: AtomicBool,
    ended_signal: Notify,
}

impl UploadProgress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            moved: ActivityClock::new(),
            asked: AtomicBool::new(false),
            waiting_on_client: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            ended_signal: Notify::new(),
        })
    }

    pub fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.ended_signal.notify_waiters();
    }

    /// Resolves once the body has ended.
    pub async fn ended(&self) {
        loop {
            let signalled = self.ended_signal.notified();
            if self.ended.load(Ordering::Acquire) {
                return;
            }
            signalled.await;
        }
    }

    /// Resolves once the backend has taken nothing of an unfinished body for `idle` while the
    /// body had data for it; never before the backend first asks (connecting has its own
    /// timeout), nor once the body has ended.
    pub async fn stalled(&self, idle: Duration) {
        let not_the_backends = || {
            !self.asked.load(Ordering::Acquire)
                || self.waiting_on_client.load(Ordering::Acquire)
                || self.ended.load(Ordering::Acquire)
        };
        self.moved.idle_for(idle, not_the_backends).await;
    }
}

/// `inner` with an idle limit between frames and, for a request body, its progress reported.
pub struct IdleBody<B> {
    inner: B,
    idle: Duration,
    /// Armed when the body first waits for its source, re-armed when it waits after a frame.
    deadline: Option<Pin<Box<Sleep>>>,
    rearm: bool,
    progress: Option<Arc<UploadProgress>>,
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            deadline: None,
            rearm: false,
            progress: None,
        }
    }

    /// Like [`IdleBody::new`], reporting to `progress` each frame taken and the end.
    pub fn watched(inner: B, idle: Duration, progress: Arc<UploadProgress>) -> Self {
        let mut body = Self::new(inner, idle);
        body.progress = Some(progress);
        body
    }

    fn end(&mut self) {
        if let Some(progress) = self.progress.take() {
            progress.end();
        }
    }
}

impl<B> Drop for IdleBody<B> {
    fn drop(&mut self) {
        self.end();
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(progress) = &this.progress {
            if !progress.asked.swap(true, Ordering::AcqRel) {
                progress.moved.touch();
            }
            progress
                .waiting_on_client
                .store(polled.is_pending(), Ordering::Release);
        }
        match polled {
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                // The time the consumer takes with this frame is not the source's: the timer
                // starts again when the body next waits.
                this.rearm = true;
                if let Some(progress) = &this.progress {
                    progress.moved.touch();
                }
                if this.inner.is_end_stream() {
                    this.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.end();
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Pending => {
                let idle = this.idle;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if std::mem::take(&mut this.rearm) {
                    deadline.as_mut().reset(Instant::now() + idle);
                }
                ready!(deadline.as_mut().poll(cx));
                this.end();
                Poll::Ready(Some(Err(Box::new(BodyIdle(idle)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Frames = futures::channel::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>;

    fn body() -> (
        futures::channel::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        StreamBody<Frames>,
    ) {
        let (sender, receiver) = futures::channel::mpsc::channel(4);
        (sender, StreamBody::new(receiver))
    }

    fn data(text: &'static str) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_fails_only_after_the_idle_time_without_a_frame() {
        let (mut sender, inner) = body();
        let progress = UploadProgress::new();
        let mut relayed = IdleBody::watched(inner, Duration::from_secs(30), progress.clone());
        let started = Instant::now();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                if futures::SinkExt::send(&mut sender, data("data"))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(sender);
        });
        for _ in 0..3 {
            let frame = relayed.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "data");
        }
        let error = relayed.frame().await.unwrap().unwrap_err();
        assert!(error.is::<BodyIdle>(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(90));
        assert!(
            progress.ended.load(Ordering::Acquire),
            "a failed body sends no more"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_time_a_consumer_takes_with_a_frame_is_not_idle_time() {
        let (mut sender, inner) = body();
        let mut relayed = IdleBody::new(inner, Duration::from_secs(30));
        futures::SinkExt::send(&mut sender, data("first"))
            .await
            .unwrap();
        // Armed by a first wait, before any frame.
        assert!(futures::poll!(relayed.frame()).is_ready());
        assert!(futures::poll!(relayed.frame()).is_pending());
        futures::SinkExt::send(&mut sender, data("second"))
            .await
            .unwrap();
        relayed.frame().await.unwrap().unwrap();
        // A slow consumer: 40 s before it asks for the next frame, which comes 5 s later.
        tokio::time::sleep(Duration::from_secs(40)).await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            futures::SinkExt::send(&mut sender, data("third"))
                .await
                .unwrap();
        });
        let frame = relayed.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "third");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_reports_the_end_and_a_stall_of_the_backend_only() {
        let (mut sender, inner) = body();
        let progress = UploadProgress::new();
        let mut relayed = IdleBody::watched(inner, Duration::from_secs(30), progress.clone());
        let idle = Duration::from_secs(30);
        // Not asked for yet (connecting): no stall, however long.
        let unasked = tokio::time::timeout(Duration::from_secs(100), progress.stalled(idle)).await;
        assert!(unasked.is_err(), "connecting is not a stall");

        // Asked, and the client has nothing yet: the body's own timer's business.
        assert!(futures::poll!(relayed.frame()).is_pending());
        let client_stall =
            tokio::time::timeout(Duration::from_secs(100), progress.stalled(idle)).await;
        assert!(
            client_stall.is_err(),
            "a client that stalls is not the backend"
        );

        // A frame taken, and nobody asks for the next (a backend that stopped reading).
        futures::SinkExt::send(&mut sender, data("first"))
            .await
            .unwrap();
        relayed.frame().await.unwrap().unwrap();
        let started = Instant::now();
        progress.stalled(idle).await;
        assert_eq!(started.elapsed(), idle);

        futures::SinkExt::send(&mut sender, data("last"))
            .await
            .unwrap();
        drop(sender);
        relayed.frame().await.unwrap().unwrap();
        assert!(relayed.frame().await.is_none());
        progress.ended().await;
        let stalled = tokio::time::timeout(
            Duration::from_secs(3600),
            progress.stalled(Duration::from_secs(30)),
        )
        .await;
        assert!(stalled.is_err(), "an ended body never stalls");
    }

    #[tokio::test]
    async fn a_body_dropped_unfinished_has_ended() {
        let (_sender, inner) = body();
        let progress = UploadProgress::new();
        drop(IdleBody::watched(
            inner,
            Duration::from_secs(30),
            progress.clone(),
        ));
        progress.ended().await;
    }
}
