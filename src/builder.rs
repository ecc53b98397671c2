//! [`ServiceBuilderExt`]: `.coalesce(extractor)` on tower's `ServiceBuilder`.

use std::hash::Hash;

use tower::layer::util::Stack;
use tower::ServiceBuilder;

use crate::layer::CoalesceLayer;

/// Adds [`coalesce`](ServiceBuilderExt::coalesce) to [`ServiceBuilder`].
///
/// ```
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_coalesce::ServiceBuilderExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .coalesce(|name: &String| Some(name.clone()))
///     .service(service_fn(|name: String| async move {
///         Ok::<_, std::convert::Infallible>(name.len())
///     }));
/// assert_eq!(svc.oneshot("tower".to_string()).await.unwrap(), 5);
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Coalesces requests keyed by `extractor`; see [`CoalesceLayer`].
    fn coalesce<F, K, Req>(self, extractor: F) -> ServiceBuilder<Stack<CoalesceLayer<F, K>, L>>
    where
        F: Fn(&Req) -> Option<K>,
        K: Hash + Eq + Send + 'static;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn coalesce<F, K, Req>(self, extractor: F) -> ServiceBuilder<Stack<CoalesceLayer<F, K>, L>>
    where
        F: Fn(&Req) -> Option<K>,
        K: Hash + Eq + Send + 'static,
    {
        self.layer(CoalesceLayer::new(extractor))
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
