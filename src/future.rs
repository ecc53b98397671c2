//! [`ResponseFuture`]: a waiter of a flight, or a bypassed call.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::BoxError;
use tower_service::Service;

use crate::error::CoalesceError;
use crate::flight::{Begin, Panicked, Run};
use crate::service::{OnTimeout, Options};

type Output<S, Req> = Result<<S as Service<Req>>::Response, CoalesceError>;
type Waiter<S, Req, K> = Run<K, Output<S, Req>>;

pin_project! {
    /// The response future of [`CoalesceService`](crate::CoalesceService).
    ///
    /// Its size does not depend on the inner service's future: a waiter of a flight holds
    /// only its place in the flight, and a bypassed request's call is boxed. Under a
    /// stampede every waiting request is a task holding one of these, so this keeps those
    /// tasks small; a bypassed request pays one allocation instead.
    pub struct ResponseFuture<S, Req, K>
    where
        S: Service<Req>,
        S::Response: Send,
        S::Response: 'static,
    {
        #[pin]
        kind: Kind<S, Req, K>,
        // A follower's wait limit, boxed: only followers with the option pay for its room.
        deadline: Option<Pin<Box<Deadline>>>,
    }
}

pin_project! {
    struct Deadline {
        #[pin]
        sleep: Sleep,
        limit: Duration,
        action: OnTimeout,
    }
}

impl Deadline {
    fn new(limit: Duration, action: OnTimeout) -> Option<Pin<Box<Self>>> {
        Some(Box::pin(Deadline {
            sleep: limit_timer(limit)?,
            limit,
            action,
        }))
    }
}

/// The timer of a follower's wait `limit`, if one can be made. None outside a tokio runtime
/// (a `block_on` of another executor), in a runtime without a time driver (`tokio::time`
/// panics there), or when the limit ends past the clock's range: the follower then waits with
/// no limit rather than failing its `call` (a panic there would strike only once a second
/// request for a key came: a crash under load). Callers ask only for followers with a limit:
/// looking the runtime up costs a reference count on its handle.
pub(crate) fn limit_timer(limit: Duration) -> Option<Sleep> {
    tokio::runtime::Handle::try_current().ok()?;
    let at = tokio::time::Instant::now().checked_add(limit)?;
    catch_unwind(|| tokio::time::sleep_until(at)).ok()
}

/// The wait limit of an HTTP or gRPC request, if it follows a flight and the layer has one
/// (boxed: only such followers pay for its room).
#[cfg(feature = "http")]
pub(crate) fn follower_limit<K, T: Send + 'static>(
    limit: Option<Duration>,
    run: &Run<K, T>,
) -> Option<Pin<Box<Sleep>>> {
    limit
        .filter(|_| run.is_following())
        .and_then(limit_timer)
        .map(Box::pin)
}

/// Whether a wait limit's timer has fired. A timer panics when polled after its runtime shut
/// down (its context entered through a kept handle): `None` then, and the waiter should drop
/// it and wait with no limit, as outside a runtime.
pub(crate) fn limit_passed(timer: Pin<&mut Sleep>, cx: &mut Context<'_>) -> Option<bool> {
    catch_unwind(AssertUnwindSafe(|| timer.poll(cx).is_ready())).ok()
}

/// Polls a follower of the HTTP or gRPC adapter under its wait limit (boxed: only followers
/// with one pay for it). `Ready(None)` once the limit has passed: the follower has left the
/// flight then, counted as timed out, and makes its own call. The limit is looked at before
/// the flight, so an output that is in by then is taken, not dropped for a timeout; a
/// follower that took the call over has no limit of its own any more.
#[cfg(feature = "http")]
pub(crate) fn poll_within<K: Send + 'static, T: Clone + Send + 'static>(
    run: &mut Run<K, T>,
    limit: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<T, Panicked>>> {
    let passed = match limit.as_mut().map(|timer| limit_passed(timer.as_mut(), cx)) {
        Some(Some(passed)) => passed,
        // Its runtime is gone: no limit, as outside a runtime.
        Some(None) => {
            *limit = None;
            false
        }
        None => false,
    };
    if let Poll::Ready(out) = Pin::new(&mut *run).poll(cx) {
        return Poll::Ready(Some(out));
    }
    if run.is_driving() {
        *limit = None;
    }
    if !passed || limit.take().is_none() {
        return Poll::Pending;
    }
    run.note_timeout();
    // Out of the flight now: its place must not hold up the others.
    run.give_up();
    Poll::Ready(None)
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, K>
    where
        S: Service<Req>,
        S::Response: Send,
        S::Response: 'static,
    {
        Coalesced { run: Waiter<S, Req, K> },
        // Boxed so that the inner future's size is not every waiter's.
        Bypass { call: Pin<Box<Call<S, Req>>> },
        // A follower that stopped waiting, making its own call.
        Alone { call: Pin<Box<dyn Future<Output = Output<S, Req>> + Send>> },
    }
}

impl<S, Req, K> ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Send + 'static,
{
    pub(crate) fn coalesced(run: Waiter<S, Req, K>, options: Options) -> Self {
        let deadline = match options.follower_timeout {
            Some(limit) if run.is_following() => Deadline::new(limit, options.on_timeout),
            _ => None,
        };
        ResponseFuture {
            kind: Kind::Coalesced { run },
            deadline,
        }
    }

    pub(crate) fn bypass(call: Pin<Box<Call<S, Req>>>) -> Self {
        ResponseFuture {
            kind: Kind::Bypass { call },
            deadline: None,
        }
    }

    /// Whether this request leads its flight (its own request made the call), rather than
    /// waiting for another request's response or bypassing coalescing. A request that calls
    /// alone over a capacity bound leads no flight: it is [`is_bypass`](Self::is_bypass) and
    /// [`is_alone`](Self::is_alone).
    pub fn is_leader(&self) -> bool {
        matches!(&self.kind, Kind::Coalesced { run } if run.is_leader() && !run.is_alone())
    }

    /// Whether this request joined another request's flight: its response will be a clone of
    /// that request's response (a caller served a [lingering](crate::CoalesceLayer::linger)
    /// response counts as one).
    pub fn is_follower(&self) -> bool {
        matches!(&self.kind, Kind::Coalesced { run } if !run.is_leader())
    }

    /// Whether this request calls the inner service beside any flight, unshared: over a
    /// capacity bound, or a follower that stopped waiting at its wait limit.
    pub fn is_alone(&self) -> bool {
        match &self.kind {
            Kind::Coalesced { run } => run.is_alone(),
            Kind::Alone { .. } => true,
            Kind::Bypass { .. } => false,
        }
    }

    /// Whether this request goes straight to the inner service, unshared: its key was `None`,
    /// it was over a capacity bound (then it is [`is_alone`](Self::is_alone) too), or it
    /// stopped waiting and made its own call.
    pub fn is_bypass(&self) -> bool {
        match &self.kind {
            Kind::Coalesced { run } => run.is_alone(),
            Kind::Bypass { .. } | Kind::Alone { .. } => true,
        }
    }

    /// Whether the response was given to more than one request (Go's `shared` flag): true for
    /// a follower; for a leader, known once the response is ready.
    ///
    /// ```
    /// use std::pin::pin;
    /// use tower::{service_fn, Service};
    /// use tower_coalesce::CoalesceLayer;
    /// use tower::Layer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut svc = CoalesceLayer::new(|n: &u8| Some(*n))
    ///     .layer(service_fn(|n: u8| async move { Ok::<_, std::convert::Infallible>(n) }));
    /// let mut leader = pin!(svc.call(1));
    /// let follower = svc.call(1);
    /// assert!(follower.is_shared());
    /// assert_eq!(leader.as_mut().await.unwrap(), 1);
    /// assert!(leader.is_shared(), "its response went to the follower too");
    /// # drop(follower);
    /// # }
    /// ```
    pub fn is_shared(&self) -> bool {
        matches!(&self.kind, Kind::Coalesced { run } if run.is_shared())
    }
}

impl<S, Req, K> Future for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Clone + Send + 'static,
    S::Error: Into<BoxError>,
    K: Send + 'static,
{
    type Output = Output<S, Req>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let run = match this.kind.as_mut().project() {
                KindProj::Bypass { call } => {
                    let out = ready!(call.as_mut().poll(cx));
                    call.set(Call::Done);
                    return Poll::Ready(out);
                }
                KindProj::Alone { call } => {
                    // It came in with a key, so, as every call run for a key, its panic is
                    // an error (only a request without a key is left untouched).
                    return match catch_unwind(AssertUnwindSafe(|| call.as_mut().poll(cx))) {
                        Ok(poll) => poll,
                        Err(payload) => {
                            Poll::Ready(Err(CoalesceError::panicked(Panicked::new(payload))))
                        }
                    };
                }
                KindProj::Coalesced { run } => run,
            };
            // The limit is looked at before the flight: an output that is in by then is taken,
            // not dropped for a timeout.
            let expired = match this.deadline.as_mut() {
                Some(deadline) => limit_passed(deadline.as_mut().project().sleep, cx),
                None => Some(false),
            };
            let expired = expired.unwrap_or_else(|| {
                *this.deadline = None;
                false
            });
            if let Poll::Ready(out) = Pin::new(&mut *run).poll(cx) {
                return Poll::Ready(
                    out.unwrap_or_else(|panic| Err(CoalesceError::panicked(panic))),
                );
            }
            if run.is_driving() {
                // It took over the call for everybody (or waits for its own, run by a task):
                // its own limit no longer applies.
                *this.deadline = None;
            }
            if !expired {
                return Poll::Pending;
            }
            let Some(deadline) = this.deadline.take() else {
                return Poll::Pending;
            };
            let (limit, action) = (deadline.limit, deadline.action);
            run.note_timeout();
            let make = run.take_make();
            // Out of the flight now, not when this future is dropped: a caller may keep it (to
            // ask `is_shared`, say), and its place must not hold up the others.
            run.give_up();
            match (action, make) {
                (OnTimeout::CallInner, Some(make)) => {
                    // Calls alone; the flight goes on for the others.
                    match catch_unwind(AssertUnwindSafe(make)) {
                        Ok((call, _)) => this.kind.set(Kind::Alone { call }),
                        Err(payload) => {
                            let panicked = CoalesceError::panicked(Panicked::new(payload));
                            return Poll::Ready(Err(panicked));
                        }
                    }
                }
                _ => return Poll::Ready(Err(CoalesceError::timed_out(limit))),
            }
        }
    }
}

impl<S, Req, K> fmt::Debug for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Coalesced { run } => f.debug_tuple("ResponseFuture").field(run).finish(),
            Kind::Bypass { .. } => f.debug_tuple("ResponseFuture").field(&"bypass").finish(),
            Kind::Alone { .. } => f.debug_tuple("ResponseFuture").field(&"alone").finish(),
        }
    }
}

pin_project! {
    /// A flight's inner future: one call of a clone of the inner service, readiness included.
    #[project = CallProj]
    pub(crate) enum Call<S, Req>
    where
        S: Service<Req>,
    {
        // Not called yet: its readiness is polled with the flight.
        NotReady { svc: S, req: Option<Req> },
        Called { #[pin] fut: S::Future },
        // `poll_ready` failed in `begin`.
        Failed { err: Option<CoalesceError> },
        // `poll_ready` or `call` panicked in `begin`: raised again when the call is first
        // polled, as it would have been without `begin`, so that every waiter that joined by
        // then gets that panic.
        Panicked { payload: Option<Box<dyn Any + Send>> },
        // A bypassed request's call once answered: its inner future dropped at once, with what
        // it holds (a `ConcurrencyLimit` permit), as tower's `Oneshot` does, even if the
        // response future is kept. (A flight's call is dropped whole when it answers.)
        Done,
    }
}

impl<S: Service<Req>, Req> Call<S, Req> {
    pub(crate) fn new(svc: S, req: Req) -> Self {
        Call::NotReady {
            svc,
            req: Some(req),
        }
    }
}

impl<S, Req> Call<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    /// Makes the call now if the service is ready (a poll with a no-op waker): as tower's own
    /// middleware calls its inner service in `call`, so that a `tower_test` mock sees the
    /// request before the response future is polled. If not ready, the flight's first poll
    /// waits for readiness with its own waker, which replaces this one.
    pub(crate) fn begin(mut self: Pin<&mut Self>) {
        let CallProj::NotReady { svc, req } = self.as_mut().project() else {
            return;
        };
        let began = catch_unwind(AssertUnwindSafe(|| {
            let mut cx = Context::from_waker(Waker::noop());
            Some(match svc.poll_ready(&mut cx) {
                Poll::Pending => return None,
                Poll::Ready(Ok(())) => {
                    let req = req.take().expect("not called yet");
                    Call::Called { fut: svc.call(req) }
                }
                Poll::Ready(Err(err)) => Call::Failed {
                    err: Some(CoalesceError::inner(err)),
                },
            })
        }));
        self.set(match began {
            Ok(Some(now)) => now,
            Ok(None) => return,
            Err(payload) => Call::Panicked {
                payload: Some(payload),
            },
        });
    }
}

/// [`Call::begin`] for a new flight: the layer calls its inner service in `call`.
pub(crate) struct CallNow;

impl<S, Req> Begin<Call<S, Req>> for CallNow
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    fn begin(call: Pin<&mut Call<S, Req>>) {
        call.begin();
    }
}

impl<S, Req> Future for Call<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, CoalesceError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let fut = match self.as_mut().project() {
                CallProj::NotReady { svc, req } => {
                    if let Err(err) = ready!(svc.poll_ready(cx)) {
                        return Poll::Ready(Err(CoalesceError::inner(err)));
                    }
                    svc.call(req.take().expect("polled after completion"))
                }
                CallProj::Called { fut } => {
                    return Poll::Ready(ready!(fut.poll(cx)).map_err(CoalesceError::inner))
                }
                CallProj::Failed { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")))
                }
                CallProj::Panicked { payload } => {
                    resume_unwind(payload.take().expect("polled after completion"))
                }
                CallProj::Done => panic!("polled after completion"),
            };
            self.set(Call::Called { fut });
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::convert::Infallible;

    use tower::service_fn;
    use tower::Layer;
    use tower_service::Service;

    use crate::CoalesceLayer;

    /// A waiting request's task holds its `ResponseFuture`: its size must not follow the inner
    /// future's (a 4 KiB one here), or every follower of a stampede carries that much.
    #[test]
    fn response_future_does_not_embed_the_inner_future() {
        let inner = service_fn(|key: u64| async move {
            let buffer = [key as u8; 4096];
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(u64::from(buffer[4095]))
        });
        let mut svc = CoalesceLayer::new(|key: &u64| (*key != 0).then_some(*key)).layer(inner);
        let coalesced = svc.call(1);
        let bypassed = svc.call(0);
        assert!(coalesced.is_leader() && bypassed.is_bypass());
        let size = std::mem::size_of_val(&coalesced);
        assert!(size <= 256, "ResponseFuture is {size} bytes");
        #[cfg(target_pointer_width = "64")]
        assert!(
            size <= 56,
            "a waiter's future: 48 bytes of `Run` and the follower wait limit"
        );
    }
}
