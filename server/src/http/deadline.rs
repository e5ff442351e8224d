//! One deadline for a whole request body. tower-http's `RequestBodyTimeoutLayer` restarts its
//! timer at every frame, so a client dripping a byte a second held its connection, and a
//! generation route's admission permit, for as long as it kept dripping (issue 13's slow-drip
//! body); this deadline starts once, when the request head has been read.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use hyper::body::{Frame, SizeHint};
use tokio::time::Sleep;

/// `request` with a body that fails once `timeout` has passed from now.
pub(super) fn limit_body(request: Request, timeout: Duration) -> Request {
    request.map(|body| {
        Body::new(DeadlineBody {
            body,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        })
    })
}

struct DeadlineBody {
    body: Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the body read timeout ({} s)", .0.as_secs_f64())]
struct BodyTimeout(Duration);

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // What has arrived is always taken; the deadline only ends a wait.
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use futures_util::stream;

    use super::*;

    /// A body that sends one byte every `every`, `count` times.
    fn dripping(every: Duration, count: usize) -> Body {
        Body::from_stream(stream::unfold(0, move |sent| async move {
            if sent == count {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b" ")), sent + 1))
        }))
    }

    async fn read(body: Body, timeout: Duration) -> Result<Bytes, String> {
        let request = limit_body(Request::new(body), timeout);
        axum::body::to_bytes(request.into_body(), usize::MAX)
            .await
            .map_err(|err| err.to_string())
    }

    #[tokio::test]
    async fn a_body_that_keeps_dripping_fails_at_the_deadline_not_at_its_end() {
        let started = Instant::now();
        let err = read(
            dripping(Duration::from_millis(20), 100),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(err.contains("body read timeout"), "{err}");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1000), "{took:?}");
        assert!(took >= Duration::from_millis(200), "{took:?}");
    }

    #[tokio::test]
    async fn a_body_within_the_deadline_is_read_whole() {
        let body = read(
            dripping(Duration::from_millis(5), 10),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(body.unwrap(), Bytes::from_static(b"          "));
    }
}
