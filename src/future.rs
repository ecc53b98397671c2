//! [`ResponseFuture`]: a waiter of a flight, or a bypassed call.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::util::{Oneshot, ServiceExt};
use tower::BoxError;
use tower_service::Service;

use crate::error::CoalesceError;
use crate::flight::Group;
use crate::flight::Run;
use crate::service::{join, OnTimeout, Options};

type Waiter<S, Req, K> = Run<K, Result<<S as Service<Req>>::Response, CoalesceError>>;

pin_project! {
    /// The response future of [`CoalesceService`].
    pub struct ResponseFuture<S, Req, K>
    where
        S: Service<Req>,
    {
        #[pin]
        kind: Kind<S, Req, K>,
        // A follower's wait limit; boxed because only followers with the option pay for it.
        deadline: Option<(Pin<Box<Sleep>>, Duration)>,
        // A follower's own request, kept when it may have to call or retry on its own.
        fallback: Option<Box<Fallback<S, K, Req>>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, K>
    where
        S: Service<Req>,
    {
        Coalesced { run: Waiter<S, Req, K> },
        Bypass { #[pin] call: Oneshot<S, Req> },
    }
}

/// What a follower needs to call on its own or to retry: kept only when an option needs it.
pub(crate) struct Fallback<S, K, Req> {
    inner: S,
    group: Group<K>,
    options: Options,
    key: K,
    req: Req,
    retries_left: u32,
}

impl<S, K, Req> Fallback<S, K, Req> {
    pub(crate) fn new(
        inner: S,
        group: Group<K>,
        options: Options,
        key: K,
        req: Req,
        retries_left: u32,
    ) -> Box<Self> {
        Box::new(Fallback {
            inner,
            group,
            options,
            key,
            req,
            retries_left,
        })
    }
}

impl<S: Service<Req>, Req, K> ResponseFuture<S, Req, K> {
    pub(crate) fn coalesced(
        run: Waiter<S, Req, K>,
        wait_limit: Option<Duration>,
        fallback: Option<Box<Fallback<S, K, Req>>>,
    ) -> Self {
        let deadline = match run.is_leader() {
            true => None,
            false => wait_limit.map(|d| (Box::pin(tokio::time::sleep(d)), d)),
        };
        ResponseFuture {
            kind: Kind::Coalesced { run },
            deadline,
            fallback,
        }
    }

    pub(crate) fn bypass(call: Oneshot<S, Req>) -> Self {
        ResponseFuture {
            kind: Kind::Bypass { call },
            deadline: None,
            fallback: None,
        }
    }

    /// Whether this request leads its flight (its own request made the call), rather than
    /// waiting for another request's response or bypassing coalescing.
    pub fn is_leader(&self) -> bool {
        matches!(&self.kind, Kind::Coalesced { run } if run.is_leader())
    }

    /// Whether this request joined another request's flight: its response will be a clone of
    /// that request's response.
    pub fn is_follower(&self) -> bool {
        matches!(&self.kind, Kind::Coalesced { run } if !run.is_leader())
    }

    /// Whether this request goes straight to the inner service: its key was `None`, or it
    /// stopped waiting and made its own call.
    pub fn is_bypass(&self) -> bool {
        matches!(self.kind, Kind::Bypass { .. })
    }

    /// Whether the response was given to more than one request (Go's `shared` flag): true for
    /// a follower; for a leader, known once the response is ready.
    ///
    /// ```
    /// use std::pin::pin;
    /// use tower::{service_fn, Service};
    /// use tower_coalesce::CoalesceLayer;
    /// use tower_layer::Layer;
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
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Clone + Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    K: Hash + Eq + Clone + Send + 'static,
{
    type Output = Result<S::Response, CoalesceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let run = match this.kind.as_mut().project() {
                KindProj::Bypass { call } => {
                    return Poll::Ready(ready!(call.poll(cx)).map_err(CoalesceError::inner))
                }
                KindProj::Coalesced { run } => run,
            };
            let out = match Pin::new(&mut *run).poll(cx) {
                Poll::Ready(out) => out.unwrap_or_else(|panic| Err(CoalesceError::panicked(panic))),
                Poll::Pending => {
                    let Some((sleep, limit)) = this.deadline else {
                        return Poll::Pending;
                    };
                    ready!(sleep.as_mut().poll(cx));
                    let limit = *limit;
                    *this.deadline = None;
                    run.note_timeout();
                    match this.fallback.take() {
                        Some(fallback) if fallback.options.on_timeout == OnTimeout::CallInner => {
                            // Leaves the flight (dropping the old waiter) and calls alone.
                            let Fallback { inner, req, .. } = *fallback;
                            this.kind.set(Kind::Bypass {
                                call: inner.oneshot(req),
                            });
                            continue;
                        }
                        _ => return Poll::Ready(Err(CoalesceError::timed_out(limit))),
                    }
                }
            };
            // A failed flight: its followers retry, as one new flight (the first of them to
            // get here leads it, the others join it).
            let retry = out.is_err() && !run.is_leader();
            match this.fallback.take() {
                Some(fallback) if retry && fallback.retries_left > 0 => {
                    fallback.group.note_retry();
                    let Fallback {
                        inner,
                        group,
                        options,
                        key,
                        req,
                        retries_left,
                    } = *fallback;
                    let (run, req) = join(&group, &inner, key.clone(), req);
                    let next = ResponseFuture::coalesced(
                        run,
                        options.follower_timeout,
                        req.map(|req| {
                            Fallback::new(inner, group, options, key, req, retries_left - 1)
                        }),
                    );
                    *this.deadline = next.deadline;
                    *this.fallback = next.fallback;
                    this.kind.set(next.kind);
                    continue;
                }
                _ => return Poll::Ready(out),
            }
        }
    }
}

impl<S: Service<Req>, Req, K> fmt::Debug for ResponseFuture<S, Req, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Coalesced { run } => f.debug_tuple("ResponseFuture").field(run).finish(),
            Kind::Bypass { .. } => f.debug_tuple("ResponseFuture").field(&"bypass").finish(),
        }
    }
}

pin_project! {
    /// A flight's inner future: one call of a clone of the inner service, readiness included.
    pub(crate) struct Call<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        call: Oneshot<S, Req>,
    }
}

impl<S: Service<Req>, Req> Call<S, Req> {
    pub(crate) fn new(call: Oneshot<S, Req>) -> Self {
        Call { call }
    }
}

impl<S, Req> Future for Call<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, CoalesceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(ready!(self.project().call.poll(cx)).map_err(CoalesceError::inner))
    }
}
