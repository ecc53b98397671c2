//! [`CoalesceHttpService`]: classify each request, then bypass, lead or follow.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::{buffer, content_length, Buffered, CoalesceBody};
use super::call::Eager;
use super::future::{LeaderSlot, ResponseFuture, Slot, WaitGuard};
use super::key::{Bypass, Key, Writes};
use super::layer::Config;
use super::share::{shareable, Outcome, Release, SharedResponse};
use crate::flight::{Begin, Group};
use crate::future::follower_limit;
use crate::Stats;

/// Coalesces identical concurrent HTTP requests; made by
/// [`CoalesceHttpLayer`](super::CoalesceHttpLayer), see there for the options and the
/// registry's scope.
///
/// - The error type is the inner service's: the layer adds no errors of its own, so it stacks
///   on an axum `Router` (whose errors are `Infallible`) without `HandleErrorLayer`.
/// - `poll_ready` is always ready. Each call (a flight, a bypassed request, a follower's own
///   call) drives a clone of the inner service through `poll_ready` and `call` itself, so a
///   follower never waits for the inner service's readiness.
/// - A leader's `call` (and a bypassed request's) calls the inner service at once when its
///   clone is ready (one `poll_ready` with a no-op waker), as
///   [`CoalesceService`](crate::CoalesceService) and tower's own middleware do, so that a
///   `tower_test` mock sees the request before the response future is polled; otherwise the
///   first poll waits for readiness. What that call reserves (a `ConcurrencyLimit` permit
///   below) is held until the response head is in (not while the body is buffered), or until
///   the response future is dropped. A follower's own
///   call (after its wait limit, or when the response could not be shared) is made when it is
///   needed.
/// - Responses have a [`CoalesceBody`] and a [`ServedBy`](super::ServedBy) extension.
pub struct CoalesceHttpService<S> {
    inner: S,
    config: Arc<Config>,
    group: Group<Key>,
    waiting: Arc<AtomicUsize>,
    writes: Arc<Writes>,
}

impl<S> CoalesceHttpService<S> {
    pub(crate) fn from_parts(
        inner: S,
        config: Arc<Config>,
        group: Group<Key>,
        waiting: Arc<AtomicUsize>,
        writes: Arc<Writes>,
    ) -> Self {
        CoalesceHttpService {
            inner,
            config,
            group,
            waiting,
            writes,
        }
    }

    /// The number of keys with a call in flight, in the registry this service shares with its
    /// layer and its clones.
    pub fn in_flight(&self) -> usize {
        self.group.in_flight()
    }

    /// The number of requests currently waiting for another request's call (followers), in
    /// the registry this service shares.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// A snapshot of the counters of the registry this service shares with its layer and its
    /// clones (see [`CoalesceHttpLayer::stats`](super::CoalesceHttpLayer::stats)).
    pub fn stats(&self) -> Stats {
        self.group.stats()
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CoalesceHttpService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<CoalesceBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        let (parts, body) = req.into_parts();
        let key = match config.rules.classify(&parts, &body, &self.writes) {
            Ok(key) => key,
            Err(reason) => {
                self.group.note_bypass();
                // A write (an unsafe method the layer does not coalesce) that succeeds
                // invalidates its URI: reads made after its response do not join older flights.
                let write = match reason {
                    Bypass::Method => Writes::write_slot(&parts).map(|s| (self.writes.clone(), s)),
                    _ => None,
                };
                // Called now if the inner service is ready, as a leader's call is.
                let call = Eager::new(self.inner.clone(), Request::from_parts(parts, body)).begun();
                return ResponseFuture::bypass(call, reason, write, config.cache_status);
            }
        };
        let req = Request::from_parts(parts, body);
        let slot: LeaderSlot<ResBody, S::Error> = Arc::new(Slot::new());
        // Taken only by `make`, which runs only for the leader: whoever still holds the
        // request afterwards is a follower and can make its own call if it must.
        let mut own = Some(req);
        let make = || {
            let req = own.take().expect("the flight is made once");
            flight(
                self.inner.clone(),
                req,
                Arc::downgrade(&slot),
                config.max_body_bytes,
            )
        };
        // An inner error counts as a failed flight (stats, span outcome, metrics).
        let run = self
            .group
            .run_classified(key, make, Outcome::failed, None, BeginCall);
        match own {
            None => {
                if run.is_alone() {
                    slot.mark_alone();
                }
                ResponseFuture::leader(run, slot, config.cache_status)
            }
            Some(req) => {
                let waiting = WaitGuard::new(&self.waiting);
                let limit = follower_limit(config.follower_timeout, &run);
                ResponseFuture::follower(
                    run,
                    waiting,
                    self.inner.clone(),
                    req,
                    limit,
                    config.cache_status,
                )
            }
        }
    }
}

pin_project! {
    /// One call of the inner service on behalf of a key: calls ([`Eager`], begun in `call` as
    /// the core layer does), then judges the response and buffers a shareable body (`then`,
    /// made when the response is in). A response that cannot be shared goes to the leader
    /// through the slot (if the leader is still there: whoever took over the flight does not
    /// get it).
    pub(crate) struct Flight<S, ReqBody, ResBody, Then>
    where
        S: Service<Request<ReqBody>>,
        ResBody: Body,
    {
        // Drops its inner future once it has the response head (`Eager::Done`): what that
        // holds (a `ConcurrencyLimit` permit below) goes before the body is buffered.
        #[pin]
        call: Eager<S, Request<ReqBody>>,
        ctx: Option<Ctx<ResBody, S::Error>>,
        judge: Judge<ResBody, S::Error, Then>,
        #[pin]
        then: Option<Then>,
    }
}

/// The step after the call, [`judge`], held as a pointer: that names its future's type
/// (`Then`), which an `async fn`'s is not otherwise.
type Judge<ResBody, E, Then> = fn(Result<Response<ResBody>, E>, Ctx<ResBody, E>) -> Then;

/// What judging a flight's response needs of its request and its leader.
pub(crate) struct Ctx<ResBody: Body, E> {
    slot: Weak<Slot<ResBody, E>>,
    limit: usize,
    head: bool,
    /// The leader's request headers, to compare with the followers' on whatever the
    /// response's `Vary` will name; one copy per flight.
    request_headers: http::HeaderMap,
}

/// A flight of `req` on `inner`, not called yet.
fn flight<S, ReqBody, ResBody>(
    inner: S,
    req: Request<ReqBody>,
    slot: Weak<Slot<ResBody, S::Error>>,
    limit: usize,
) -> Flight<S, ReqBody, ResBody, impl Future<Output = Outcome>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    let ctx = Ctx {
        slot,
        limit,
        head: req.method() == Method::HEAD,
        request_headers: req.headers().clone(),
    };
    Flight {
        call: Eager::new(inner, req),
        ctx: Some(ctx),
        judge: judge::<S::Error, ResBody>,
        then: None,
    }
}

impl<S, ReqBody, ResBody, Then> Future for Flight<S, ReqBody, ResBody, Then>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
    Then: Future<Output = Outcome>,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut this = self.project();
        if this.then.is_none() {
            let result = ready!(this.call.poll(cx));
            let ctx = this.ctx.take().expect("polled after completion");
            this.then.set(Some((this.judge)(result, ctx)));
        }
        let then = this.then.as_pin_mut().expect("polled after completion");
        then.poll(cx)
    }
}

/// Begins a leader's call in `call`, as [`CallNow`](crate::future::CallNow) does for the core
/// layer (not while the key's cancelled call is still being dropped: the group does not
/// begin those).
pub(crate) struct BeginCall;

impl<S, ReqBody, ResBody, Then> Begin<Flight<S, ReqBody, ResBody, Then>> for BeginCall
where
    S: Service<Request<ReqBody>>,
    ResBody: Body,
{
    fn begin(flight: Pin<&mut Flight<S, ReqBody, ResBody, Then>>) {
        flight.project().call.begin();
    }
}

/// Judges a flight's response (`result` of its call) and buffers a shareable body.
async fn judge<E, ResBody: Body>(
    result: Result<Response<ResBody>, E>,
    ctx: Ctx<ResBody, E>,
) -> Outcome {
    let Ctx {
        slot,
        limit,
        head,
        request_headers,
    } = ctx;
    let hand_to_leader = |result| Slot::put(&slot, result);
    // Set before the leader's `call` returned: a call over a bound, which nobody shares.
    let alone = Slot::is_alone(&slot);
    let (parts, body) = match result {
        Ok(res) => res.into_parts(),
        Err(error) => {
            hand_to_leader(Err(error));
            return Outcome::Released(Release::Error);
        }
    };
    let mut parts = parts;
    if !head && parts.headers.contains_key(header::TRANSFER_ENCODING) {
        // Overridden by the `Transfer-Encoding` (RFC 9112 §6.3), it says nothing of the body:
        // kept, it would frame the copies (which carry the body buffered, without that field)
        // by a wrong length, and hyper refuses the pair on a response passed on as it is. (A
        // `HEAD` response's describes the `GET` body, and stays.)
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    if alone {
        hand_to_leader(Ok(Response::from_parts(
            parts,
            CoalesceBody::original(body),
        )));
        return Outcome::Released(Release::Alone);
    }
    let vary = match shareable(&parts) {
        Ok(vary) => vary,
        Err(release) => {
            hand_to_leader(Ok(Response::from_parts(
                parts,
                CoalesceBody::original(body),
            )));
            return Outcome::Released(release);
        }
    };
    // `Content-Length` describes the body of a `HEAD` response's `GET`, and there is no body
    // for 1xx, 204 and 304.
    let no_body = head
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if !no_body && content_length(&parts.headers).is_some_and(|len| len > limit as u64) {
        hand_to_leader(Ok(Response::from_parts(
            parts,
            CoalesceBody::original(body),
        )));
        return Outcome::Released(Release::TooLarge);
    }
    if head {
        if let Some(len) = body.size_hint().exact() {
            // No server sends a `HEAD` response's body (axum answers `HEAD` with the `GET`
            // handler and drops the body after this layer): it is not read, only its length
            // kept, as the server would have announced it.
            let bodiless_status = parts.status.is_informational()
                || parts.status == StatusCode::NO_CONTENT
                || parts.status == StatusCode::NOT_MODIFIED;
            // An empty body says nothing (a `HEAD` handler of a resource of unknown length):
            // the server decides then, as it would have.
            if len > 0 && !bodiless_status && !parts.headers.contains_key(header::CONTENT_LENGTH) {
                parts.headers.insert(header::CONTENT_LENGTH, len.into());
            }
            drop(body);
            let shared = SharedResponse::new(parts, &vary, &request_headers, Bytes::new(), None);
            return Outcome::Shared(Arc::new(shared));
        }
    }
    match buffer(body, limit).await {
        // Trailers are judged as the head was: a cookie there is one client's too.
        Buffered::Complete { data, trailers }
            if trailers
                .as_ref()
                .is_some_and(|t| t.contains_key(header::SET_COOKIE)) =>
        {
            let body = CoalesceBody::full(data, trailers);
            hand_to_leader(Ok(Response::from_parts(parts, body)));
            Outcome::Released(Release::SetCookie)
        }
        Buffered::Complete { data, trailers } => Outcome::Shared(Arc::new(SharedResponse::new(
            parts,
            &vary,
            &request_headers,
            data,
            trailers,
        ))),
        Buffered::Incomplete(body) => {
            hand_to_leader(Ok(Response::from_parts(parts, body)));
            Outcome::Released(Release::TooLarge)
        }
    }
}

impl<S: Clone> Clone for CoalesceHttpService<S> {
    fn clone(&self) -> Self {
        CoalesceHttpService {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
            group: self.group.clone(),
            waiting: Arc::clone(&self.waiting),
            writes: Arc::clone(&self.writes),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for CoalesceHttpService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceHttpService")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("group", &self.group)
            .field("waiting", &self.waiting())
            .finish()
    }
}
