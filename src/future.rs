//! [`ResponseFuture`]: a waiter of a flight, or a bypassed call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::BoxError;
use tower_service::Service;

use crate::error::CoalesceError;
use crate::flight::Run;

pin_project! {
    /// The response future of [`CoalesceService`](crate::CoalesceService).
    pub struct ResponseFuture<S, Req, K>
    where
        S: Service<Req>,
    {
        #[pin]
        kind: Kind<S, Req, K>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, K>
    where
        S: Service<Req>,
    {
        Coalesced { run: Run<K, Result<S::Response, CoalesceError>> },
        Bypass { #[pin] call: Oneshot<S, Req> },
    }
}

impl<S: Service<Req>, Req, K> ResponseFuture<S, Req, K> {
    pub(crate) fn coalesced(run: Run<K, Result<S::Response, CoalesceError>>) -> Self {
        ResponseFuture {
            kind: Kind::Coalesced { run },
        }
    }

    pub(crate) fn bypass(call: Oneshot<S, Req>) -> Self {
        ResponseFuture {
            kind: Kind::Bypass { call },
        }
    }

    /// Whether this request leads its flight (its response is its own), rather than waiting
    /// for another request's response or bypassing coalescing.
    pub fn is_leader(&self) -> bool {
        matches!(&self.kind, Kind::Coalesced { run } if run.is_leader())
    }

    /// Whether this request joined another request's flight: its response will be a clone of
    /// that request's response.
    pub fn is_follower(&self) -> bool {
        matches!(&self.kind, Kind::Coalesced { run } if !run.is_leader())
    }

    /// Whether this request bypassed coalescing because its key was `None`.
    pub fn is_bypass(&self) -> bool {
        matches!(self.kind, Kind::Bypass { .. })
    }
}

impl<S, Req, K> Future for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Clone + Send + 'static,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, CoalesceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Coalesced { run } => {
                let out = ready!(Pin::new(run).poll(cx));
                Poll::Ready(out.unwrap_or_else(|panic| Err(CoalesceError::panicked(panic))))
            }
            KindProj::Bypass { call } => {
                Poll::Ready(ready!(call.poll(cx)).map_err(CoalesceError::inner))
            }
        }
    }
}

impl<S: Service<Req>, Req, K> fmt::Debug for ResponseFuture<S, Req, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match &self.kind {
            Kind::Coalesced { run } => return f.debug_tuple("ResponseFuture").field(run).finish(),
            Kind::Bypass { .. } => "bypass",
        };
        f.debug_tuple("ResponseFuture").field(&role).finish()
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
