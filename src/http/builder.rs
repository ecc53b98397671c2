//! [`HttpServiceBuilderExt`]: `.coalesce_http()` on tower's `ServiceBuilder`.

use tower::layer::util::Stack;
use tower::ServiceBuilder;

use super::CoalesceHttpLayer;

/// Adds [`coalesce_http`](HttpServiceBuilderExt::coalesce_http) to [`ServiceBuilder`], as
/// tower-http's `ServiceBuilderExt` does for its layers.
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_coalesce::http::{HttpServiceBuilderExt, ServedBy};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .coalesce_http()
///     .service(service_fn(|_req: http::Request<Full<Bytes>>| async {
///         Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("hello"))))
///     }));
/// let res = svc.oneshot(http::Request::new(Full::default())).await.unwrap();
/// assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));
/// # }
/// ```
pub trait HttpServiceBuilderExt<L>: sealed::Sealed {
    /// Coalesces identical concurrent requests with the default options; see
    /// [`CoalesceHttpLayer::new`]. For other options use
    /// `.layer(CoalesceHttpLayer::new()...)`.
    fn coalesce_http(self) -> ServiceBuilder<Stack<CoalesceHttpLayer, L>>;
}

impl<L> HttpServiceBuilderExt<L> for ServiceBuilder<L> {
    fn coalesce_http(self) -> ServiceBuilder<Stack<CoalesceHttpLayer, L>> {
        self.layer(CoalesceHttpLayer::new())
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
