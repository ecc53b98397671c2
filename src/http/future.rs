//! [`ResponseFuture`] of [`CoalesceHttpService`](super::CoalesceHttpService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{ready, Context, Poll};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::util::Oneshot;
use tower_service::Service;

use super::body::CoalesceBody;
use super::call::Eager;
use super::key::{Bypass, Key, Writes};
use super::share::{Outcome, Release};
use super::ServedBy;
use crate::flight::Run;
use crate::future::poll_within;

pub(crate) type LeaderSlot<B, E> = Arc<Slot<B, E>>;

/// What a leader's request shares with its flight: the reply slot and the over-bound flag.
pub(crate) struct Slot<B: Body, E> {
    /// Where the flight leaves the leader's own response (or error) when it is not shared.
    pub(crate) reply: Mutex<Option<Result<Response<CoalesceBody<B>>, E>>>,
    /// Set when the request calls alone (over a bound), before its call's response is judged:
    /// nobody can share its response, so it is passed on as it comes, unbuffered.
    pub(crate) alone: AtomicBool,
}

impl<B: Body, E> Slot<B, E> {
    pub(crate) fn new() -> Self {
        Slot {
            reply: Mutex::new(None),
            alone: AtomicBool::new(false),
        }
    }

    /// Marks the leader's request as over a bound: made by the request in `call`, read when
    /// its call's response is in ([`is_alone`](Self::is_alone)).
    pub(crate) fn mark_alone(&self) {
        self.alone.store(true, Ordering::Relaxed);
    }

    /// Whether the leader's request is over a bound, if it is still there.
    pub(crate) fn is_alone(slot: &Weak<Self>) -> bool {
        slot.upgrade()
            .is_some_and(|s| s.alone.load(Ordering::Relaxed))
    }

    /// Leaves `reply` for the leader, if it is still there (whoever took the flight over
    /// does not get it).
    pub(crate) fn put(slot: &Weak<Self>, reply: Result<Response<CoalesceBody<B>>, E>) {
        if let Some(slot) = slot.upgrade() {
            *slot.reply.lock().unwrap_or_else(PoisonError::into_inner) = Some(reply);
        }
    }

    /// The reply the flight left for the leader.
    pub(crate) fn take(&self) -> Option<Result<Response<CoalesceBody<B>>, E>> {
        self.reply
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

pin_project! {
    /// The response future of [`CoalesceHttpService`](super::CoalesceHttpService).
    ///
    /// # Panics
    ///
    /// If the inner service (or the response body, while it is buffered) panics, the leader's
    /// future panics again with the same message (`std::panic::resume_unwind`), so that
    /// `CatchPanicLayer` or the server sees the panic exactly as without this layer. The
    /// followers do not panic for it: they are released to make their own calls. (A panic of
    /// user code while a waiter's own copy is made, such as a response extension's `Clone`,
    /// is that waiter's alone.)
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
        ResBody: Body,
    {
        #[pin]
        state: State<S, ReqBody, ResBody>,
        cache_status: bool,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
        ResBody: Body,
    {
        Bypass {
            #[pin]
            call: Eager<S, Request<ReqBody>>,
            reason: Bypass,
            // A write's URI slot, counted when its response has a non-error status.
            write: Option<(Arc<Writes>, usize)>,
        },
        Leader {
            run: Run<Key, Outcome>,
            slot: LeaderSlot<ResBody, S::Error>,
        },
        Follower {
            run: Run<Key, Outcome>,
            waiting: Option<WaitGuard>,
            own: Option<(S, Request<ReqBody>)>,
            // Its wait limit (`follower_timeout`), boxed: only followers with one pay for it.
            limit: Option<Pin<Box<Sleep>>>,
        },
        Released {
            #[pin]
            call: Oneshot<S, Request<ReqBody>>,
            reason: Release,
        },
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
    ResBody: Body,
{
    pub(crate) fn bypass(
        call: Eager<S, Request<ReqBody>>,
        reason: Bypass,
        write: Option<(Arc<Writes>, usize)>,
        cache_status: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Bypass {
                call,
                reason,
                write,
            },
            cache_status,
        }
    }

    pub(crate) fn leader(
        run: Run<Key, Outcome>,
        slot: LeaderSlot<ResBody, S::Error>,
        cache_status: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Leader { run, slot },
            cache_status,
        }
    }

    pub(crate) fn follower(
        run: Run<Key, Outcome>,
        waiting: WaitGuard,
        inner: S,
        req: Request<ReqBody>,
        limit: Option<Pin<Box<Sleep>>>,
        cache_status: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Follower {
                run,
                waiting: Some(waiting),
                own: Some((inner, req)),
                limit,
            },
            cache_status,
        }
    }

    /// How the response of this future is going to be served, as far as known now: a
    /// follower can still turn into [`ServedBy::Released`].
    pub fn served_by(&self) -> ServedBy {
        match &self.state {
            State::Bypass { .. } => ServedBy::Bypass,
            State::Leader { run, .. } if run.is_alone() => ServedBy::Bypass,
            State::Leader { .. } => ServedBy::Leader,
            State::Follower { .. } => ServedBy::Follower,
            State::Released { .. } => ServedBy::Released,
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Output = Result<Response<CoalesceBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let header = *this.cache_status;
        loop {
            let reason = match this.state.as_mut().project() {
                StateProj::Bypass {
                    call,
                    reason,
                    write,
                } => {
                    let res = ready!(call.poll(cx))?;
                    if let Some((writes, slot)) = write.take() {
                        writes.wrote(slot, res.status());
                    }
                    let (fwd, detail) = reason.cache_status();
                    let entry = || format!("tower-coalesce; fwd={fwd}; detail={detail}");
                    let res = res.map(CoalesceBody::original);
                    return Poll::Ready(Ok(mark(res, ServedBy::Bypass, header, entry)));
                }
                StateProj::Released { call, reason } => {
                    let res = ready!(call.poll(cx))?;
                    let (fwd, detail) = reason.cache_status();
                    let entry =
                        || format!("tower-coalesce; fwd={fwd}; collapsed=?0; detail={detail}");
                    let res = res.map(CoalesceBody::original);
                    return Poll::Ready(Ok(mark(res, ServedBy::Released, header, entry)));
                }
                StateProj::Leader { run, slot } => {
                    let res = match ready!(Pin::new(&mut *run).poll(cx)) {
                        // Without followers the leader holds the only reference.
                        Ok(Outcome::Shared(shared)) => match Arc::try_unwrap(shared) {
                            Ok(only) => only.into_response(),
                            Err(shared) => shared.to_response(),
                        },
                        Ok(Outcome::Released(_)) => slot
                            .take()
                            .expect("a flight that releases leaves the leader its response")?,
                        // Let the panic go on as if this layer were not there.
                        Err(panicked) => {
                            std::panic::resume_unwind(Box::new(panicked.message().to_owned()))
                        }
                    };
                    // Over a capacity bound, the call was the request's own, unshared: a
                    // bypass, as for any request this layer does not coalesce.
                    let alone = run.is_alone();
                    let entry = || {
                        if alone {
                            let (fwd, detail) = Release::Alone.cache_status();
                            format!("tower-coalesce; fwd={fwd}; detail={detail}")
                        } else {
                            "tower-coalesce; fwd=miss".to_owned()
                        }
                    };
                    let by = match alone {
                        true => ServedBy::Bypass,
                        false => ServedBy::Leader,
                    };
                    return Poll::Ready(Ok(mark(res, by, header, entry)));
                }
                StateProj::Follower {
                    run,
                    waiting,
                    own,
                    limit,
                } => {
                    let out = ready!(poll_within(run, limit, cx));
                    drop(waiting.take());
                    let reason = match out {
                        None => Release::TimedOut,
                        Some(Ok(Outcome::Shared(shared))) => {
                            let (_, req) = own.as_ref().expect("polled after completion");
                            if shared.vary_matches(req.headers()) {
                                let entry = || "tower-coalesce; fwd=miss; collapsed".to_owned();
                                let res = shared.to_follower_response();
                                return Poll::Ready(Ok(mark(
                                    res,
                                    ServedBy::Follower,
                                    header,
                                    entry,
                                )));
                            }
                            Release::Vary
                        }
                        Some(Ok(Outcome::Released(reason))) => reason,
                        Some(Err(_)) => Release::Panic,
                    };
                    reason
                }
            };
            // A follower with nothing it may use: make its own call, now.
            let StateProj::Follower { own, run, .. } = this.state.as_mut().project() else {
                unreachable!("only followers are released");
            };
            if reason != Release::TimedOut {
                // A follower past its limit counts as timed out only.
                run.note_released();
            }
            let (inner, req) = own.take().expect("polled after completion");
            this.state.set(State::Released {
                call: Oneshot::new(inner, req),
                reason,
            });
        }
    }
}

/// Counts a follower in the layer's `waiting` gauge while it exists.
pub(crate) struct WaitGuard(Arc<AtomicUsize>);

impl WaitGuard {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        WaitGuard(Arc::clone(count))
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn mark<B>(
    mut res: Response<B>,
    by: ServedBy,
    header: bool,
    entry: impl FnOnce() -> String,
) -> Response<B> {
    res.extensions_mut().insert(by);
    if header {
        if let Ok(value) = HeaderValue::try_from(entry()) {
            // RFC 9211: each cache appends its entry, the one nearest the client last. A map
            // already at `HeaderMap`'s capacity goes out without it.
            let _ = res
                .headers_mut()
                .try_append(HeaderName::from_static("cache-status"), value);
        }
    }
    res
}

impl<S, ReqBody, ResBody> fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
    ResBody: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("served_by", &self.served_by())
            .finish()
    }
}
