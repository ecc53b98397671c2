//! [`CoalesceLayer`]: wraps services in [`CoalesceService`], all sharing one registry.

use std::fmt;
use std::hash::Hash;

use tower_layer::Layer;

use crate::flight::Group;
use crate::service::CoalesceService;

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
/// ```
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_coalesce::CoalesceLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(CoalesceLayer::new(|user_id: &u64| Some(*user_id)))
///     .service(service_fn(|user_id: u64| async move {
///         Ok::<_, std::convert::Infallible>(format!("profile of {user_id}"))
///     }));
/// assert_eq!(svc.oneshot(42).await.unwrap(), "profile of 42");
/// # }
/// ```
pub struct CoalesceLayer<F, K> {
    extractor: F,
    group: Group<K>,
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
    /// with each other when their keys and response types are equal.
    pub fn with_group<Req>(extractor: F, group: Group<K>) -> Self
    where
        F: Fn(&Req) -> Option<K>,
    {
        CoalesceLayer { extractor, group }
    }
}

impl<F, K> CoalesceLayer<F, K> {
    /// The registry shared by every service this layer makes.
    pub fn group(&self) -> &Group<K> {
        &self.group
    }
}

impl<S, F: Clone, K> Layer<S> for CoalesceLayer<F, K> {
    type Service = CoalesceService<S, F, K>;

    fn layer(&self, inner: S) -> Self::Service {
        CoalesceService::from_parts(inner, self.extractor.clone(), self.group.clone())
    }
}

impl<F: Clone, K> Clone for CoalesceLayer<F, K> {
    fn clone(&self) -> Self {
        CoalesceLayer {
            extractor: self.extractor.clone(),
            group: self.group.clone(),
        }
    }
}

impl<F, K> fmt::Debug for CoalesceLayer<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}
