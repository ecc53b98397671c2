//! [`GrpcServiceBuilderExt`]: `.coalesce_grpc(methods)` on tower's `ServiceBuilder`.

use tower::layer::util::Stack;
use tower::ServiceBuilder;

use super::CoalesceGrpcLayer;

/// Adds [`coalesce_grpc`](GrpcServiceBuilderExt::coalesce_grpc) to [`ServiceBuilder`], as
/// tower-http's `ServiceBuilderExt` does for its layers.
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_coalesce::grpc::GrpcServiceBuilderExt;
/// use tower_coalesce::http::{CoalesceBody, ServedBy};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .coalesce_grpc(["/catalog.v1.Catalog/GetItem"])
///     .service(service_fn(|_req: http::Request<CoalesceBody<Full<Bytes>>>| async {
///         let mut trailers = http::HeaderMap::new();
///         trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
///         let body = http_body_util::StreamBody::new(futures::stream::iter([
///             Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
///             Ok(http_body::Frame::trailers(trailers)),
///         ]));
///         Ok::<_, Infallible>(http::Response::new(body))
///     }));
/// let call = http::Request::post("/catalog.v1.Catalog/GetItem")
///     .header("content-type", "application/grpc")
///     .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
///     .unwrap();
/// let res = svc.oneshot(call).await.unwrap();
/// assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));
/// # }
/// ```
pub trait GrpcServiceBuilderExt<L>: sealed::Sealed {
    /// Coalesces identical concurrent calls of the given unary methods with the default
    /// options; see [`CoalesceGrpcLayer::methods`]. For other options use
    /// `.layer(CoalesceGrpcLayer::new()...)`.
    ///
    /// # Panics
    ///
    /// If a path does not look like `/package.Service/Method`.
    fn coalesce_grpc<I>(self, methods: I) -> ServiceBuilder<Stack<CoalesceGrpcLayer, L>>
    where
        I: IntoIterator,
        I::Item: Into<String>;
}

impl<L> GrpcServiceBuilderExt<L> for ServiceBuilder<L> {
    fn coalesce_grpc<I>(self, methods: I) -> ServiceBuilder<Stack<CoalesceGrpcLayer, L>>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.layer(CoalesceGrpcLayer::new().methods(methods))
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
