//! [`CoalesceLayer`]: wraps services in [`CoalesceService`], all sharing one registry.

use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use tower::Layer;

use crate::flight::{Config, Group};
use crate::service::{CoalesceService, OnTimeout, Options};
use crate::stats::Stats;

/// Applies request coalescing to the services it wraps.
///
/// `extractor` maps a request to its key; requests with equal keys that arrive while a call
/// for that key is in flight wait for that call's response instead of making their own.
/// `None` bypasses: the request goes to the inner service untouched.
///
/// # Registry scope
///
/// The layer owns one registry, made in [`new`](Self::new). Every service it makes, in every
/// [`layer`](Layer::layer) call, and every clone of the layer share that registry, as tower's
/// `GlobalConcurrencyLimitLayer` shares its semaphore. This is what makes coalescing work under
/// axum, which applies a layer again per route and per connection. The flip side: when one
/// layer wraps several services (several routes), the key must tell their requests apart, for
/// example by including the path. A [`CoalesceLayer::new`] per service gives each its own
/// registry.
///
/// # Options
///
/// All off by default. The registry options ([`detached`](Self::detached),
/// [`linger`](Self::linger), [`linger_errors`](Self::linger_errors),
/// [`max_in_flight`](Self::max_in_flight), [`max_followers`](Self::max_followers),
/// [`retry_failed`](Self::retry_failed)) each
/// give the layer a new registry with that option: set them before the layer is used or cloned.
///
/// ```
/// use std::time::Duration;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_coalesce::CoalesceLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(
///         CoalesceLayer::new(|user_id: &u64| Some(*user_id))
///             .follower_timeout(Duration::from_secs(2))
///             .retry_failed(1)
///             .max_followers(10_000),
///     )
///     .service(service_fn(|user_id: u64| async move {
///         Ok::<_, std::convert::Infallible>(format!("profile of {user_id}"))
///     }));
/// assert_eq!(svc.oneshot(42).await.unwrap(), "profile of 42");
/// # }
/// ```
pub struct CoalesceLayer<F, K> {
    extractor: F,
    group: Group<K>,
    config: Config,
    options: Options,
}

impl<F, K> CoalesceLayer<F, K>
where
    K: Hash + Eq + Send + 'static,
{
    /// Creates a layer that keys requests with `extractor`, with a new registry.
    pub fn new<Req>(extractor: F) -> Self
    where
        F: Fn(&Req) -> Option<K>,
    {
        Self::with_group(extractor, Group::new())
    }

    /// Creates a layer that uses `group` as its registry, shared with whoever else holds it.
    ///
    /// Two layers (or a layer and direct [`Group::run`] callers) that share a group coalesce
    /// with each other when their keys and response types are equal. Configure the group with
    /// [`Group::builder`]: the layer's registry options would replace it.
    pub fn with_group<Req>(extractor: F, group: Group<K>) -> Self
    where
        F: Fn(&Req) -> Option<K>,
    {
        CoalesceLayer {
            extractor,
            group,
            config: Config::default(),
            options: Options::default(),
        }
    }

    fn reconfigure(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self.group = Group::with_config(self.config.clone());
        self
    }

    /// Runs each call on a spawned task that completes even when every waiter has gone; see
    /// [`GroupBuilder::detached`](crate::GroupBuilder::detached).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::{service_fn, Service, ServiceExt};
    /// use tower_coalesce::CoalesceLayer;
    /// use tower::Layer;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    /// let done_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(done_tx)));
    /// let mut svc = CoalesceLayer::new(|k: &u8| Some(*k)).detached(true).layer(service_fn(
    ///     move |k: u8| {
    ///         let done = done_tx.lock().unwrap().take();
    ///         async move {
    ///             tokio::time::sleep(Duration::from_secs(1)).await;
    ///             done.map(|tx| tx.send(k));
    ///             Ok::<_, std::convert::Infallible>(k)
    ///         }
    ///     },
    /// ));
    /// let impatient = svc.ready().await.unwrap().call(7);
    /// drop(impatient); // nobody waits any more...
    /// assert_eq!(done_rx.await.unwrap(), 7); // ...and the call still completed.
    /// # }
    /// ```
    pub fn detached(self, detached: bool) -> Self {
        self.reconfigure(|c| c.detached = detached)
    }

    /// Keeps a successful response for `window` after its call finishes, for requests in that
    /// window (a micro-cache); see [`GroupBuilder::linger`](crate::GroupBuilder::linger).
    pub fn linger(self, window: Duration) -> Self {
        self.reconfigure(|c| c.linger = Some(window))
    }

    /// Keeps errors too, for `window`; see
    /// [`GroupBuilder::linger_errors`](crate::GroupBuilder::linger_errors).
    pub fn linger_errors(self, window: Duration) -> Self {
        self.reconfigure(|c| c.linger_errors = Some(window))
    }

    /// At most `max` keys in flight; requests over it call the inner service on their own
    /// (they never wait or fail for it).
    pub fn max_in_flight(self, max: usize) -> Self {
        self.reconfigure(|c| c.max_in_flight = Some(max))
    }

    /// At most `max` followers per call; the extra requests call the inner service on their
    /// own.
    pub fn max_followers(self, max: usize) -> Self {
        self.reconfigure(|c| c.max_followers = Some(max))
    }

    /// When a call fails (an error or a panic), its followers retry it as one new call: one
    /// of them makes its own call for everybody, the others wait for it, up to `retries` times
    /// per call. The request whose call failed gets its error; a follower that took a call
    /// over from a request that went away did not make it, and retries. The default, 0, hands
    /// every follower the error. See
    /// [`GroupBuilder::retry_failed`](crate::GroupBuilder::retry_failed).
    pub fn retry_failed(self, retries: u32) -> Self {
        self.reconfigure(|c| c.retries = retries)
    }
}

impl<F, K> CoalesceLayer<F, K> {
    /// A follower that has waited `limit` stops waiting and, by default, calls the inner
    /// service itself ([`OnTimeout::CallInner`]); the call it waited for goes on undisturbed.
    ///
    /// The limit is a `tokio::time` timer, armed when the follower's request is called inside
    /// a tokio runtime with its time driver enabled (as `tokio::time::sleep` needs). A
    /// follower called outside any tokio runtime (under another executor), in the context of
    /// one that has shut down, or in one without a time driver, waits with no limit, as
    /// [`detached`](Self::detached) runs its calls undetached there; so does one whose limit
    /// ends past the clock's range. A response that came in before the limit is the follower's even
    /// if its future is first polled after it.
    ///
    /// A follower that takes the call over (its leader went away) waits no longer: it drives
    /// the call for everybody, and its limit is gone for good (with
    /// [`retry_failed`](Self::retry_failed), it runs the retry itself if that call fails).
    pub fn follower_timeout(mut self, limit: Duration) -> Self {
        self.options.follower_timeout = Some(limit);
        self
    }

    /// What a follower does at its wait limit; see [`follower_timeout`](Self::follower_timeout).
    pub fn on_follower_timeout(mut self, action: OnTimeout) -> Self {
        self.options.on_timeout = action;
        self
    }

    /// The registry shared by every service this layer makes.
    pub fn group(&self) -> &Group<K> {
        &self.group
    }

    /// A snapshot of the shared registry's counters (as [`Group::stats`]).
    ///
    /// ```
    /// use tower_coalesce::CoalesceLayer;
    ///
    /// let layer = CoalesceLayer::new(|key: &u64| Some(*key));
    /// assert_eq!(layer.stats().leaders, 0);
    /// ```
    pub fn stats(&self) -> Stats {
        self.group.stats()
    }

    /// The number of keys with a call in flight in the shared registry.
    pub fn in_flight(&self) -> usize {
        self.group.in_flight()
    }
}

impl<S, F: Clone, K> Layer<S> for CoalesceLayer<F, K> {
    type Service = CoalesceService<S, F, K>;

    fn layer(&self, inner: S) -> Self::Service {
        CoalesceService::from_parts(
            inner,
            self.extractor.clone(),
            self.group.clone(),
            self.options,
        )
    }
}

impl<F: Clone, K> Clone for CoalesceLayer<F, K> {
    fn clone(&self) -> Self {
        CoalesceLayer {
            extractor: self.extractor.clone(),
            group: self.group.clone(),
            config: self.config.clone(),
            options: self.options,
        }
    }
}

impl<F, K> fmt::Debug for CoalesceLayer<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("group", &self.group)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}
