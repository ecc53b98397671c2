//! [`ResponseFuture`]: buffer the request message, join or lead the key's flight, and turn the
//! flight's outcome into this caller's response.
//!
//! The flight's shared output is an [`Outcome`]: a successful response to rebuild for every
//! follower, or `Released`, which sends each follower to make its own call with its own
//! request (kept for that purpose until the flight ends). The caller that started the flight
//! gets its own response, always whole, through a slot only it and its flight hold, never through the
//! shared output: if it goes away and a follower takes over polling the flight, that response
//! is dropped rather than handed to anybody else.

use std::fmt;
use std::future::Future;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::HeaderMap;
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::util::{Oneshot, ServiceExt};
use tower_service::Service;

use super::key::{GrpcKey, KeyHead};
use super::layer::Shared;
use super::status;
use crate::flight::{NoBegin, Run};
use crate::future::{follower_limit, poll_within};
use crate::http::body::{buffer, Buffered};
use crate::http::future::{LeaderSlot, Slot};
use crate::http::{CoalesceBody, ServedBy};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the inner service gave the caller that started a flight.
type Reply<E, ResBody> = Result<Response<CoalesceBody<ResBody>>, E>;

type InnerRequest<B> = Request<CoalesceBody<B>>;

pin_project! {
    /// The response future of [`CoalesceGrpcService`](super::CoalesceGrpcService).
    pub struct ResponseFuture<S, B, ResBody>
    where
        S: Service<InnerRequest<B>>,
        B: Body,
        ResBody: Body,
    {
        #[pin]
        state: State<S, B, ResBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, ResBody>
    where
        S: Service<InnerRequest<B>>,
        B: Body,
        ResBody: Body,
    {
        /// Reading the request message to complete the key.
        Buffering {
            message: BoxFuture<Buffered<B>>,
            call: Option<Keyed<S>>,
        },
        /// Leading or following the key's flight.
        Waiting {
            run: Run<GrpcKey, Outcome>,
            // A follower's own request and service, for when the flight does not share.
            own: Option<(S, InnerRequest<B>)>,
            // Where the flight leaves the leader's own reply; `None` for followers.
            reply: Option<LeaderSlot<ResBody, S::Error>>,
            waiting: Option<WaitGuard>,
            // A follower's wait limit (`follower_timeout`), boxed: only followers with one pay
            // for it.
            limit: Option<Pin<Box<Sleep>>>,
        },
        /// A call of its own: bypassed, or released by its flight.
        Calling {
            #[pin]
            call: Oneshot<S, InnerRequest<B>>,
            served: ServedBy,
            // A call of a method not allow-listed: the layer's write count, bumped when its
            // response (or error) comes.
            write: Option<Arc<AtomicU64>>,
        },
        Done,
    }
}

/// The rest of a call whose key awaits the request message.
struct Keyed<S> {
    parts: Parts,
    head: KeyHead,
    inner: S,
    shared: Shared,
}

impl<S, B, ResBody> ResponseFuture<S, B, ResBody>
where
    S: Service<InnerRequest<B>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    pub(crate) fn keyed(parts: Parts, body: B, head: KeyHead, inner: S, shared: Shared) -> Self {
        let limit = shared.config.request_limit;
        ResponseFuture {
            state: State::Buffering {
                message: Box::pin(buffer(body, limit)),
                call: Some(Keyed {
                    parts,
                    head,
                    inner,
                    shared,
                }),
            },
        }
    }

    /// Registers the call with its key's flight: leads it (the inner service is called with
    /// `request`) or follows it (`request` is kept in case the flight does not share).
    fn join(
        key: GrpcKey,
        request: InnerRequest<B>,
        inner: S,
        shared: &Shared,
    ) -> State<S, B, ResBody> {
        let slot: LeaderSlot<ResBody, S::Error> = Arc::new(Slot::new());
        let limit = shared.config.response_limit;
        let mut call = Some((inner, request));
        let make = || {
            let (inner, request) = call.take().expect("make runs once");
            lead(inner, request, limit, Arc::downgrade(&slot))
        };
        let run = shared
            .group
            .run_classified(key, make, Outcome::failed, None, NoBegin);
        match call {
            None => {
                if run.is_alone() {
                    slot.mark_alone();
                }
                State::Waiting {
                    run,
                    own: None,
                    reply: Some(slot),
                    waiting: None,
                    limit: None,
                }
            }
            Some((inner, request)) => State::Waiting {
                limit: follower_limit(shared.config.follower_timeout, &run),
                run,
                own: Some((inner, request)),
                reply: None,
                waiting: Some(WaitGuard::new(&shared.waiting)),
            },
        }
    }
}

impl<S, B, ResBody> ResponseFuture<S, B, ResBody>
where
    S: Service<InnerRequest<B>>,
    B: Body,
    ResBody: Body,
{
    /// A call the rules pass through, sent on as it is.
    pub(crate) fn bypass(
        shared: &Shared,
        call: Oneshot<S, InnerRequest<B>>,
        write: Option<Arc<AtomicU64>>,
    ) -> Self {
        ResponseFuture {
            state: State::bypass(shared, call, write),
        }
    }
}

impl<S, B, ResBody> State<S, B, ResBody>
where
    S: Service<InnerRequest<B>>,
    B: Body,
    ResBody: Body,
{
    /// A call the rules pass through: counted once, in the registry's `bypassed`.
    fn bypass(
        shared: &Shared,
        call: Oneshot<S, InnerRequest<B>>,
        write: Option<Arc<AtomicU64>>,
    ) -> Self {
        shared.group.note_bypass();
        State::Calling {
            call,
            served: ServedBy::Bypass,
            write,
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B, ResBody>
where
    S: Service<InnerRequest<B>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Output = Reply<S::Error, ResBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Buffering { message, call } => {
                    let buffered = ready!(message.as_mut().poll(cx));
                    let Keyed {
                        parts,
                        head,
                        inner,
                        shared,
                    } = call.take().expect("ResponseFuture polled after completion");
                    match buffered {
                        Buffered::Complete {
                            data,
                            trailers: None,
                        } => {
                            let key = GrpcKey::new(head, data.clone());
                            let request =
                                Request::from_parts(parts, CoalesceBody::full(data, None));
                            Self::join(key, request, inner, &shared)
                        }
                        // Request trailers are not part of gRPC; rather than key on them, pass
                        // the call through.
                        Buffered::Complete { data, trailers } => {
                            let request =
                                Request::from_parts(parts, CoalesceBody::full(data, trailers));
                            State::bypass(&shared, inner.oneshot(request), None)
                        }
                        // Over the limit (or failed): passed on with every byte, uncoalesced.
                        Buffered::Incomplete(body) => {
                            let request = Request::from_parts(parts, body);
                            State::bypass(&shared, inner.oneshot(request), None)
                        }
                    }
                }
                StateProj::Waiting {
                    run,
                    own,
                    reply,
                    waiting,
                    limit,
                } => {
                    let Some(outcome) = ready!(poll_within(run, limit, cx)) else {
                        // Past its limit: a call of its own, now.
                        drop(waiting.take());
                        let (inner, request) =
                            own.take().expect("a follower keeps its own request");
                        state.set(State::Calling {
                            call: inner.oneshot(request),
                            served: ServedBy::Released,
                            write: None,
                        });
                        continue;
                    };
                    drop(waiting.take());
                    if let Some(reply) = reply.take() {
                        // The caller that started the flight, or, over a bound, its own call.
                        let by = match run.is_alone() {
                            true => ServedBy::Bypass,
                            false => ServedBy::Leader,
                        };
                        state.set(State::Done);
                        return match outcome {
                            Ok(_) => {
                                let reply = reply
                                    .take()
                                    .expect("a flight replies to its leader before it completes");
                                Poll::Ready(reply.map(|r| served(r, by)))
                            }
                            // The inner service panicked on this caller's request: let the
                            // panic go on as it would without the layer.
                            Err(panicked) => resume_unwind(Box::new(panicked.message().to_owned())),
                        };
                    }
                    match outcome {
                        Ok(Outcome::Shared(response)) => {
                            state.set(State::Done);
                            return Poll::Ready(Ok(served(response.rebuild(), ServedBy::Follower)));
                        }
                        Ok(Outcome::Released { .. }) | Err(_) => {
                            run.note_released();
                            let (inner, request) =
                                own.take().expect("a follower keeps its own request");
                            State::Calling {
                                call: inner.oneshot(request),
                                served: ServedBy::Released,
                                write: None,
                            }
                        }
                    }
                }
                StateProj::Calling {
                    call,
                    served: by,
                    write,
                } => {
                    let by = *by;
                    let response = ready!(call.poll(cx));
                    if let Some(writes) = write.take() {
                        writes.fetch_add(1, Ordering::AcqRel);
                    }
                    state.set(State::Done);
                    return Poll::Ready(
                        response.map(|r| served(r.map(CoalesceBody::original), by)),
                    );
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };
            state.set(next);
        }
    }
}

impl<S, B, ResBody> fmt::Debug for ResponseFuture<S, B, ResBody>
where
    S: Service<InnerRequest<B>>,
    B: Body,
    ResBody: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Buffering { .. } => "buffering request",
            State::Waiting { reply: Some(_), .. } => "leader",
            State::Waiting { reply: None, .. } => "follower",
            State::Calling { .. } => "calling",
            State::Done => "done",
        };
        f.debug_tuple("ResponseFuture").field(&state).finish()
    }
}

/// The output every waiter of a flight gets a clone of.
#[derive(Clone)]
enum Outcome {
    /// A successful response, buffered whole: rebuilt for each follower.
    Shared(Arc<SharedResponse>),
    /// Not shareable (failed, errored, panicked, too large, not gRPC): followers make their own
    /// calls. `failed` when the call failed: an inner error, an HTTP status other than `200`, or
    /// a `grpc-status` other than `OK`.
    Released { failed: bool },
}

impl Outcome {
    /// Whether the flight failed (stats, span outcome, metrics).
    fn failed(&self) -> bool {
        matches!(self, Outcome::Released { failed: true })
    }
}

struct SharedResponse {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl SharedResponse {
    /// A follower's copy. Extensions are not copied: they belong to the leader's request.
    fn rebuild<B: Body>(&self) -> Response<CoalesceBody<B>> {
        let mut response =
            Response::new(CoalesceBody::full(self.data.clone(), self.trailers.clone()));
        *response.status_mut() = self.status;
        *response.version_mut() = self.version;
        *response.headers_mut() = self.headers.clone();
        response
    }
}

/// The flight: calls the inner service with the leader's request, replies to the leader, and
/// tells the followers whether they may share the response.
async fn lead<S, B, ResBody>(
    inner: S,
    request: InnerRequest<B>,
    limit: usize,
    slot: Weak<Slot<ResBody, S::Error>>,
) -> Outcome
where
    S: Service<InnerRequest<B>, Response = Response<ResBody>>,
    B: Body,
    ResBody: Body,
{
    // The leader may be gone (a follower drives the flight then): its reply is dropped.
    let reply = |reply| Slot::put(&slot, reply);
    let response = match inner.oneshot(request).await {
        Ok(response) => response,
        Err(error) => {
            reply(Err(error));
            return Outcome::Released { failed: true };
        }
    };
    let (parts, body) = response.into_parts();
    // A call over a bound (alone) has nobody to share with: passed on as it comes.
    if !status::head_may_share(&parts) || Slot::is_alone(&slot) {
        let failed = status::head_failed(&parts);
        reply(Ok(Response::from_parts(
            parts,
            CoalesceBody::original(body),
        )));
        return Outcome::Released { failed };
    }
    let (body, outcome) = match buffer(body, limit).await {
        // Too large (not shared, not a failure), or the body failed midway (a failed call).
        Buffered::Incomplete(body) => {
            let failed = body.failed_while_buffered();
            (body, Outcome::Released { failed })
        }
        Buffered::Complete { data, trailers } => {
            let ok = status::is_ok(&parts.headers, trailers.as_ref());
            let outcome = if ok && status::trailers_may_share(trailers.as_ref()) {
                Outcome::Shared(Arc::new(SharedResponse {
                    status: parts.status,
                    version: parts.version,
                    headers: parts.headers.clone(),
                    data: data.clone(),
                    trailers: trailers.clone(),
                }))
            } else {
                Outcome::Released { failed: !ok }
            };
            (CoalesceBody::full(data, trailers), outcome)
        }
    };
    reply(Ok(Response::from_parts(parts, body)));
    outcome
}

fn served<B>(mut response: Response<B>, by: ServedBy) -> Response<B> {
    response.extensions_mut().insert(by);
    response
}

/// Counts a follower while it waits for its flight.
struct WaitGuard(Arc<AtomicUsize>);

impl WaitGuard {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        WaitGuard(Arc::clone(count))
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
