//! Bodies relayed for HTTP/2 clients, with the limits the HTTP/1 relay has: a body that sends no
//! frame for `http.bodyIdleTimeoutSeconds` fails (a stalled upload or download would otherwise
//! hold its stream, a pooled backend connection and a connection slot for ever), and a request
//! body says when it is complete, for the backend's answer is waited for from then on (a long
//! upload is not a slow backend).
//!
//! Written here rather than taken from tower-http's `TimeoutBody`: that one times each frame
//! from the body's creation, not from its first poll (hyper polls a request body only once the
//! backend connection is open), and has no completion signal.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

/// The error of a relayed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a body ended early.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?}")]
pub struct BodyIdle(Duration);

/// `inner` with an idle limit between frames and, optionally, a signal sent when it ends.
pub struct IdleBody<B> {
    inner: B,
    idle: Duration,
    /// Armed at the first poll, reset by every frame.
    deadline: Option<Pin<Box<Sleep>>>,
    ended: Option<oneshot::Sender<()>>,
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            deadline: None,
            ended: None,
        }
    }

    /// Like [`IdleBody::new`]; `ended` gets a message once the whole body has been read (it is
    /// dropped without one if the body fails or is dropped first).
    pub fn signalling(inner: B, idle: Duration, ended: oneshot::Sender<()>) -> Self {
        Self {
            ended: Some(ended),
            ..Self::new(inner, idle)
        }
    }

    fn signal_end(&mut self) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.signal_end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(deadline) = &mut this.deadline {
                    deadline.as_mut().reset(Instant::now() + this.idle);
                }
                if this.inner.is_end_stream() {
                    this.signal_end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Pending => {
                let idle = this.idle;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(deadline.as_mut().poll(cx));
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

    #[tokio::test(start_paused = true)]
    async fn a_body_fails_only_after_the_idle_time_without_a_frame() {
        let (mut sender, inner) = body();
        let (ended, mut end) = oneshot::channel();
        let mut relayed = IdleBody::signalling(inner, Duration::from_secs(30), ended);
        let started = Instant::now();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let frame = Ok(Frame::data(Bytes::from_static(b"data")));
                if futures::SinkExt::send(&mut sender, frame).await.is_err() {
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
        assert!(end.try_recv().is_err(), "a failed body never ended");
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_is_signalled_and_the_clock_starts_at_the_first_poll() {
        let (mut sender, inner) = body();
        let (ended, end) = oneshot::channel();
        let mut relayed = IdleBody::signalling(inner, Duration::from_secs(30), ended);
        tokio::time::sleep(Duration::from_secs(60)).await;
        futures::SinkExt::send(&mut sender, Ok(Frame::data(Bytes::from_static(b"late"))))
            .await
            .unwrap();
        drop(sender);
        let frame = relayed.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "late");
        assert!(relayed.frame().await.is_none());
        end.await.unwrap();
    }
}
