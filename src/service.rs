//! [`CoalesceService`]: key each request, then join or start its key's flight.

use std::fmt;
use std::hash::Hash;
use std::task::{Context, Poll};

use tower::util::ServiceExt;
use tower::BoxError;
use tower_service::Service;

use crate::error::CoalesceError;
use crate::flight::Group;
use crate::future::{Call, ResponseFuture};

/// Coalesces concurrent requests with equal keys into one call of the inner service.
///
/// Made by [`CoalesceLayer`](crate::CoalesceLayer); see there for the registry's scope.
///
/// - `poll_ready` is always ready: a follower never waits for the inner service. Each flight
///   drives a clone of the inner service through `poll_ready` and `call` itself, so a
///   `ConcurrencyLimit` below this layer limits flights, not waiters.
/// - A request whose key is `None` goes to a clone of the inner service as if the layer were
///   absent (its error is still wrapped in [`CoalesceError`]).
/// - The response must be `Clone`: each follower gets a clone of the leader's response.
pub struct CoalesceService<S, F, K> {
    inner: S,
    extractor: F,
    group: Group<K>,
}

impl<S, F, K> CoalesceService<S, F, K>
where
    K: Hash + Eq + Send + 'static,
{
    /// Wraps `inner` with a registry of its own.
    pub fn new<Req>(inner: S, extractor: F) -> Self
    where
        F: Fn(&Req) -> Option<K>,
    {
        Self::from_parts(inner, extractor, Group::new())
    }
}

impl<S, F, K> CoalesceService<S, F, K> {
    pub(crate) fn from_parts(inner: S, extractor: F, group: Group<K>) -> Self {
        CoalesceService {
            inner,
            extractor,
            group,
        }
    }

    /// The number of keys with a call in flight, in the registry this service shares.
    pub fn in_flight(&self) -> usize {
        self.group.in_flight()
    }

    /// The registry this service shares with its clones and its layer.
    pub fn group(&self) -> &Group<K> {
        &self.group
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

impl<S, F, K, Req> Service<Req> for CoalesceService<S, F, K>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Clone + Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    F: Fn(&Req) -> Option<K>,
    K: Hash + Eq + Send + 'static,
{
    type Response = S::Response;
    type Error = CoalesceError;
    type Future = ResponseFuture<S, Req, K>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(key) = (self.extractor)(&req) else {
            return ResponseFuture::bypass(self.inner.clone().oneshot(req));
        };
        let inner = &self.inner;
        ResponseFuture::coalesced(
            self.group
                .run(key, || Call::new(inner.clone().oneshot(req))),
        )
    }
}

impl<S: Clone, F: Clone, K> Clone for CoalesceService<S, F, K> {
    fn clone(&self) -> Self {
        CoalesceService {
            inner: self.inner.clone(),
            extractor: self.extractor.clone(),
            group: self.group.clone(),
        }
    }
}

impl<S: fmt::Debug, F, K> fmt::Debug for CoalesceService<S, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceService")
            .field("inner", &self.inner)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}
