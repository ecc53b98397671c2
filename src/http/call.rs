//! [`Eager`]: one call of the inner service, made in the layer's `call` when the service is
//! ready, as the core layer (and tower's own middleware) does.
//!
//! Apart from the core layer's `Call`, which it mirrors: that one keeps a failed readiness as
//! a `CoalesceError` (its service's error need only be `Into<BoxError>`, not `Send`), this one
//! as the inner service's own error, which the HTTP layer returns unwrapped.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use pin_project_lite::pin_project;
use tower_service::Service;

pin_project! {
    /// One call of `svc` with `req`: readiness, then the call, then its future. [`begin`]
    /// makes the call at once if the service is ready, so that a `tower_test` mock sees the
    /// request before the response future is polled; otherwise the first poll waits for
    /// readiness with its own waker.
    ///
    /// [`begin`]: Eager::begin
    #[project = EagerProj]
    pub(crate) enum Eager<S, Req>
    where
        S: Service<Req>,
    {
        NotReady { svc: S, req: Option<Req> },
        Called { #[pin] fut: S::Future },
        // `poll_ready` failed in `begin`.
        Failed { err: Option<S::Error> },
        // `poll_ready` or `call` panicked in `begin`: raised again at the first poll, where it
        // would have been raised without `begin`.
        Panicked { payload: Option<Box<dyn Any + Send>> },
        // Answered: the inner future is dropped at once, with what it holds (a
        // `ConcurrencyLimit` permit), as tower's `Oneshot` does.
        Done,
    }
}

impl<S: Service<Req>, Req> Eager<S, Req> {
    pub(crate) fn new(svc: S, req: Req) -> Self {
        Eager::NotReady {
            svc,
            req: Some(req),
        }
    }

    /// Makes the call now if the service is ready (a poll with a no-op waker), in place.
    pub(crate) fn begin(mut self: Pin<&mut Self>) {
        let EagerProj::NotReady { svc, req } = self.as_mut().project() else {
            return;
        };
        if let Some(now) = Self::started(svc, req) {
            self.set(now);
        }
    }

    /// [`begin`](Self::begin) before it is pinned (a call not polled yet can be moved).
    pub(crate) fn begun(mut self) -> Self {
        let Eager::NotReady { svc, req } = &mut self else {
            return self;
        };
        Self::started(svc, req).unwrap_or(self)
    }

    /// What a call not made yet becomes once `svc` is asked whether it is ready: called,
    /// failed, panicked, or (`None`) still waiting for readiness.
    fn started(svc: &mut S, req: &mut Option<Req>) -> Option<Self> {
        let began = catch_unwind(AssertUnwindSafe(|| {
            let mut cx = Context::from_waker(Waker::noop());
            Some(match svc.poll_ready(&mut cx) {
                Poll::Pending => return None,
                Poll::Ready(Ok(())) => Eager::Called {
                    fut: svc.call(req.take().expect("not called yet")),
                },
                Poll::Ready(Err(err)) => Eager::Failed { err: Some(err) },
            })
        }));
        match began {
            Ok(now) => now,
            Err(payload) => Some(Eager::Panicked {
                payload: Some(payload),
            }),
        }
    }
}

impl<S: Service<Req>, Req> Future for Eager<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let fut = match self.as_mut().project() {
                EagerProj::NotReady { svc, req } => {
                    ready!(svc.poll_ready(cx))?;
                    svc.call(req.take().expect("polled after completion"))
                }
                EagerProj::Called { fut } => {
                    let out = ready!(fut.poll(cx));
                    self.set(Eager::Done);
                    return Poll::Ready(out);
                }
                EagerProj::Failed { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")))
                }
                EagerProj::Panicked { payload } => {
                    resume_unwind(payload.take().expect("polled after completion"))
                }
                EagerProj::Done => panic!("polled after completion"),
            };
            self.set(Eager::Called { fut });
        }
    }
}
