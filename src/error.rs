//! The error every waiter of a failed flight gets.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::flight::Panicked;

/// The error type of [`CoalesceService`](crate::CoalesceService).
///
/// Every waiter of a flight gets a clone of the same error. The inner service's error is kept
/// behind an [`Arc`] (so it need not be `Clone`) and stays reachable by type:
///
/// ```
/// use std::error::Error as _;
/// use tower::{service_fn, ServiceExt};
/// use tower_coalesce::{CoalesceError, CoalesceLayer};
/// use tower::Layer;
///
/// #[derive(Debug)]
/// struct NotFound;
/// impl std::fmt::Display for NotFound {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         f.write_str("not found")
///     }
/// }
/// impl std::error::Error for NotFound {}
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = CoalesceLayer::new(|id: &u32| Some(*id))
///     .layer(service_fn(|_id: u32| async { Err::<String, _>(NotFound) }));
/// let err: CoalesceError = svc.oneshot(7).await.unwrap_err();
/// assert!(err.downcast_ref::<NotFound>().is_some());
/// assert!(err.source().unwrap().downcast_ref::<NotFound>().is_some());
/// # }
/// ```
#[derive(Clone)]
pub struct CoalesceError {
    // Shared: one pointer wide, so a `Result<Response, CoalesceError>` handed to every
    // follower is no bigger than it must be; errors are rare, the allocation is theirs.
    kind: Arc<Kind>,
}

enum Kind {
    Inner(Box<dyn Error + Send + Sync + 'static>),
    Panicked(Panicked),
    TimedOut(Duration),
}

impl CoalesceError {
    /// The error a flight's waiters get when the inner service fails with `error`: for code
    /// written against `CoalesceError` (a retry policy, an error mapper) to be tested with a
    /// stand-in for the coalesced service.
    ///
    /// ```
    /// use tower_coalesce::CoalesceError;
    ///
    /// let err = CoalesceError::new(std::io::Error::other("backend down"));
    /// assert!(err.downcast_ref::<std::io::Error>().is_some());
    /// assert!(!err.is_panic() && !err.is_timeout());
    /// ```
    pub fn new(error: impl Into<tower::BoxError>) -> Self {
        CoalesceError::inner(error)
    }

    pub(crate) fn inner(error: impl Into<tower::BoxError>) -> Self {
        CoalesceError {
            kind: Arc::new(Kind::Inner(error.into())),
        }
    }

    pub(crate) fn panicked(panic: Panicked) -> Self {
        CoalesceError {
            kind: Arc::new(Kind::Panicked(panic)),
        }
    }

    pub(crate) fn timed_out(after: Duration) -> Self {
        CoalesceError {
            kind: Arc::new(Kind::TimedOut(after)),
        }
    }

    /// Whether this follower gave up waiting at its wait limit
    /// ([`CoalesceLayer::follower_timeout`](crate::CoalesceLayer::follower_timeout) with
    /// [`OnTimeout::Error`](crate::OnTimeout::Error)). Not a timeout of the inner service: a
    /// tower `Timeout` below the layer is its error, found with
    /// `downcast_ref::<tower::timeout::error::Elapsed>()`.
    pub fn is_timeout(&self) -> bool {
        matches!(*self.kind, Kind::TimedOut(_))
    }

    /// Whether user code run for this request's call panicked: the inner service (its
    /// `Clone`, `poll_ready`, `call` or future), or the response's `Clone` while the
    /// followers' copies were made (every follower not yet served gets that panic).
    pub fn is_panic(&self) -> bool {
        matches!(*self.kind, Kind::Panicked(_))
    }

    /// The panic message, if [`is_panic`](Self::is_panic): its payload if that was a string,
    /// `<non-string panic payload>` otherwise.
    pub fn panic_message(&self) -> Option<&str> {
        match &*self.kind {
            Kind::Panicked(p) => Some(p.message()),
            Kind::Inner(_) | Kind::TimedOut(_) => None,
        }
    }

    /// The inner service's error, if it returned one.
    pub fn get_ref(&self) -> Option<&(dyn Error + Send + Sync + 'static)> {
        match &*self.kind {
            Kind::Inner(e) => Some(&**e),
            Kind::Panicked(_) | Kind::TimedOut(_) => None,
        }
    }

    /// The inner service's error as `E`, if it returned one of that type.
    pub fn downcast_ref<E: Error + 'static>(&self) -> Option<&E> {
        self.get_ref()?.downcast_ref()
    }
}

impl fmt::Debug for CoalesceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.kind {
            Kind::Inner(e) => f.debug_tuple("CoalesceError::Inner").field(e).finish(),
            Kind::Panicked(p) => f.debug_tuple("CoalesceError::Panicked").field(p).finish(),
            Kind::TimedOut(d) => f.debug_tuple("CoalesceError::TimedOut").field(d).finish(),
        }
    }
}

impl fmt::Display for CoalesceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.kind {
            Kind::Inner(e) => write!(f, "inner service failed: {e}"),
            Kind::Panicked(p) => write!(f, "coalesced call panicked: {}", p.message()),
            Kind::TimedOut(d) => write!(f, "gave up waiting for a coalesced call after {d:?}"),
        }
    }
}

impl Error for CoalesceError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &*self.kind {
            Kind::Inner(e) => Some(&**e),
            Kind::Panicked(p) => Some(p),
            Kind::TimedOut(_) => None,
        }
    }
}
