//! [`CoalesceService`]: key each request, then join or start its key's flight.

use std::borrow::Borrow;
use std::fmt;
use std::hash::Hash;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::task::{Context, Poll};
use std::time::Duration;

use tower::BoxError;
use tower_service::Service;

use crate::error::CoalesceError;
use crate::flight::{boxer, Group};
use crate::future::{Call, CallNow, ResponseFuture};
use crate::stats::Stats;

/// Coalesces concurrent requests with equal keys into one call of the inner service.
///
/// Made by [`CoalesceLayer`](crate::CoalesceLayer); see there for the registry's scope and the
/// options.
///
/// - `poll_ready` is always ready: a follower never waits for the inner service. Each flight
///   drives a clone of the inner service through `poll_ready` and `call` itself, so a
///   `ConcurrencyLimit` below this layer limits flights, not waiters. Above it, a limit holds
///   back followers too, and `LoadShed` never sheds.
/// - Only a flight's first request reaches the inner service: middleware below sees one
///   request per flight, middleware above every waiter.
/// - A request whose key is `None` goes to a clone of the inner service as if the layer were
///   absent (its error is still wrapped in [`CoalesceError`]).
/// - The response must be `Clone`: each follower gets a clone of the leader's response.
/// - A leader's `call` (and a bypassed request's) calls the inner service at once if that clone
///   is ready (one `poll_ready` with a no-op waker), as tower's own middleware does, so that a
///   [`tower_test`](https://docs.rs/tower-test) mock sees the request before the response
///   future is polled; if it is not ready, the flight's first poll waits for readiness.
///   Dropping the response future cancels the call as usual. As with any tower middleware,
///   what the inner `call` reserved (a `ConcurrencyLimit` permit below) is held by the response
///   future until it is polled to completion or dropped, and the future must be made where the
///   inner `call` can run (inside the runtime, for tower's `Timeout` below).
///
/// ```
/// use tower::{Layer, Service};
/// use tower_coalesce::CoalesceLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (mock, mut handle) = tower_test::mock::pair::<&str, &str>();
/// let mut svc = CoalesceLayer::new(|k: &&str| Some(*k)).layer(mock);
/// let leader = svc.call("hot");
/// let follower = svc.call("hot");
/// // One request reached the backend, before anything was polled.
/// let (req, send) = handle.next_request().await.unwrap();
/// assert_eq!(req, "hot");
/// send.send_response("value");
/// assert_eq!(leader.await.unwrap(), "value");
/// assert_eq!(follower.await.unwrap(), "value");
/// # }
/// ```
pub struct CoalesceService<S, F, K> {
    inner: S,
    extractor: F,
    group: Group<K>,
    options: Options,
}

/// Service-level options, set through [`CoalesceLayer`](crate::CoalesceLayer).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Options {
    pub(crate) follower_timeout: Option<Duration>,
    pub(crate) on_timeout: OnTimeout,
}

impl Options {
    fn calls_alone_on_timeout(&self) -> bool {
        self.follower_timeout.is_some() && self.on_timeout == OnTimeout::CallInner
    }
}

/// What a follower does when it has waited for its wait limit
/// ([`CoalesceLayer::follower_timeout`](crate::CoalesceLayer::follower_timeout)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnTimeout {
    /// Stop waiting and call the inner service itself (nginx's `proxy_cache_lock_timeout`).
    /// Its response, error or panic is its own: a panic becomes a [`CoalesceError`] whose
    /// [`is_panic`](CoalesceError::is_panic) is true, as for any call made for a key.
    #[default]
    CallInner,
    /// Stop waiting and fail with a [`CoalesceError`] whose
    /// [`is_timeout`](CoalesceError::is_timeout) is true.
    Error,
}

impl<S, F, K> CoalesceService<S, F, K>
where
    K: Hash + Eq + Send + 'static,
{
    /// Wraps `inner` with a registry of its own and no options.
    pub fn new<Req>(inner: S, extractor: F) -> Self
    where
        F: Fn(&Req) -> Option<K>,
    {
        Self::from_parts(inner, extractor, Group::new(), Options::default())
    }

    /// Removes `key`'s flight from the registry so the next request for it starts a new one;
    /// the current waiters still get their response. See [`Group::forget`].
    pub fn forget<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.group.forget(key)
    }
}

impl<S, F, K> CoalesceService<S, F, K> {
    pub(crate) fn from_parts(inner: S, extractor: F, group: Group<K>, options: Options) -> Self {
        CoalesceService {
            inner,
            extractor,
            group,
            options,
        }
    }

    /// The number of keys with a call in flight, in the registry this service shares.
    pub fn in_flight(&self) -> usize {
        self.group.in_flight()
    }

    /// A snapshot of the shared registry's counters.
    pub fn stats(&self) -> Stats {
        self.group.stats()
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
            self.group.note_bypass();
            let mut call = Box::pin(Call::new(self.inner.clone(), req));
            call.as_mut().begin();
            return ResponseFuture::bypass(call);
        };
        let options = self.options;
        let run = if self.group.retries() > 0 || options.calls_alone_on_timeout() {
            // A follower keeps its own call (its request), to retry or to call alone, so the
            // inner service is cloned now. A panic of that `Clone` is the call's: raised again
            // if the call is made, where any call's panic is caught, not out of `call`.
            let inner = catch_unwind(AssertUnwindSafe(|| self.inner.clone()));
            self.group.run_classified(
                key,
                move || match inner {
                    Ok(inner) => Call::new(inner, req),
                    Err(payload) => resume_unwind(payload),
                },
                Result::is_err,
                Some(boxer),
                CallNow,
            )
        } else {
            let inner = &self.inner;
            self.group.run_classified(
                key,
                || Call::new(inner.clone(), req),
                Result::is_err,
                None,
                CallNow,
            )
        };
        ResponseFuture::coalesced(run, options)
    }
}

impl<S: Clone, F: Clone, K> Clone for CoalesceService<S, F, K> {
    fn clone(&self) -> Self {
        CoalesceService {
            inner: self.inner.clone(),
            extractor: self.extractor.clone(),
            group: self.group.clone(),
            options: self.options,
        }
    }
}

impl<S: fmt::Debug, F, K> fmt::Debug for CoalesceService<S, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceService")
            .field("inner", &self.inner)
            .field("group", &self.group)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}
