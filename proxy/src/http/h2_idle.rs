//! When an HTTP/2 connection is idle: no stream open for the keep-alive idle time
//! (`http.headerReadTimeoutSeconds`, as for a kept HTTP/1 connection). hyper's server pings a
//! silent peer but never closes a live, idle connection, so without this every client that
//! once spoke HTTP/2 would hold a connection (and a connection slot) forever. A stream counts as
//! open from its request head until hyper drops its response body, so long-polls and slow
//! downloads keep their connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Response;

use super::proxy::ProxyBody;
use crate::session::activity::ActivityClock;

/// The open streams of one connection, and when the last one ended.
#[derive(Clone)]
pub(super) struct StreamActivity(Arc<Activity>);

struct Activity {
    open: AtomicUsize,
    /// The end of the last stream.
    last_end: ActivityClock,
}

/// An open stream; it ends when this is dropped.
pub(super) struct OpenStream(Arc<Activity>);

impl StreamActivity {
    pub(super) fn new() -> Self {
        Self(Arc::new(Activity {
            open: AtomicUsize::new(0),
            last_end: ActivityClock::new(),
        }))
    }

    pub(super) fn stream_started(&self) -> OpenStream {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.0.clone())
    }

    /// Resolves once no stream has been open for `idle`.
    pub(super) async fn idle_for(&self, idle: Duration) {
        let activity = &self.0;
        // Acquire pairs with the Release of the last stream's end: its `last_end` is seen.
        let busy = || activity.open.load(Ordering::Acquire) > 0;
        activity.last_end.idle_for(idle, busy).await;
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.last_end.touch();
        activity.open.fetch_sub(1, Ordering::Release);
    }
}

impl OpenStream {
    /// Keeps the stream open until hyper has sent (or dropped) `response`'s body.
    pub(super) fn until_sent(self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        response.map(|body| {
            body.map_frame(move |frame| {
                let _open = &self;
                frame
            })
            .boxed()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn idle_only_counts_from_the_end_of_the_last_open_stream() {
        let activity = StreamActivity::new();
        let idle = Duration::from_secs(30);
        let stream = activity.stream_started();
        let started = Instant::now();
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(idle).await }
        });
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!waiting.is_finished(), "a stream was open");
        drop(stream);
        waiting.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(130));
    }
}
