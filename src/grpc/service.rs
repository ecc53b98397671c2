//! [`CoalesceGrpcService`]: classify a call, then bypass it or buffer its message and key it.

use std::fmt;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower::util::ServiceExt;
use tower_service::Service;

use super::future::ResponseFuture;
use super::key;
use super::layer::Shared;
use crate::http::CoalesceBody;
use crate::Stats;

/// Coalesces concurrent identical unary gRPC calls; made by
/// [`CoalesceGrpcLayer`](super::CoalesceGrpcLayer), which documents the rules.
///
/// - The inner service gets every request with its body wrapped in a [`CoalesceBody`]: the
///   original body untouched for bypassed calls, or the buffered message, replayed whole.
/// - Responses come back with their body wrapped in a [`CoalesceBody`] too: a follower's is a
///   rebuilt copy of the shared response. Each carries a [`ServedBy`] extension.
///
/// [`ServedBy`]: crate::http::ServedBy
/// - The error type is the inner service's own: a follower of a failed call makes its own call
///   and gets its own result, so errors are never shared and need not be `Clone`.
/// - `poll_ready` is always ready: each call drives a clone of the inner service through
///   `poll_ready` and `call` itself, so a follower never waits for the inner service.
pub struct CoalesceGrpcService<S> {
    inner: S,
    shared: Shared,
}

impl<S> CoalesceGrpcService<S> {
    pub(crate) fn from_parts(inner: S, shared: Shared) -> Self {
        CoalesceGrpcService { inner, shared }
    }

    /// The number of calls in flight for which others may wait, in the registry this service
    /// shares with its layer and clones.
    pub fn in_flight(&self) -> usize {
        self.shared.group.in_flight()
    }

    /// The number of calls currently waiting for another call's response, in the registry
    /// this service shares.
    pub fn waiting(&self) -> usize {
        self.shared.waiting()
    }

    /// A snapshot of the counters of the registry this service shares with its layer and its
    /// clones (see [`CoalesceGrpcLayer::stats`](super::CoalesceGrpcLayer::stats)).
    pub fn stats(&self) -> Stats {
        self.shared.group.stats()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResBody> Service<Request<B>> for CoalesceGrpcService<S>
where
    S: Service<Request<CoalesceBody<B>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<CoalesceBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, ResBody>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        match key::classify(&self.shared.config, &parts) {
            Ok(head) => {
                let head = head.after_writes(self.shared.writes.load(Ordering::Acquire));
                ResponseFuture::keyed(parts, body, head, self.inner.clone(), self.shared.clone())
            }
            Err(why) => {
                // Another method, which may change what the listed ones answer: once it has
                // its response, later calls do not join flights begun before it.
                let write = (why == key::Bypass::NotAllowed
                    && self.shared.config.writes(parts.uri.path()))
                .then(|| self.shared.writes.clone());
                let req = Request::from_parts(parts, CoalesceBody::original(body));
                ResponseFuture::bypass(&self.shared, self.inner.clone().oneshot(req), write)
            }
        }
    }
}

impl<S: Clone> Clone for CoalesceGrpcService<S> {
    fn clone(&self) -> Self {
        CoalesceGrpcService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for CoalesceGrpcService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceGrpcService")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .field("in_flight", &self.in_flight())
            .field("waiting", &self.waiting())
            .finish()
    }
}
