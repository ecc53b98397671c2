//! gRPC adapter (feature `grpc`): coalesces identical concurrent unary calls to allow-listed
//! methods, for tonic servers and any `http::Request` → `http::Response` gRPC service.
//!
//! Every gRPC call is an HTTP/2 `POST`, so HTTP's "safe method" rule cannot pick what to
//! coalesce: [`CoalesceGrpcLayer`] coalesces only the unary methods you allow-list, and a call
//! only when it is anonymous (or an [identity](CoalesceGrpcLayer::identity) is configured) and
//! small enough to key. The key holds the request message bytes themselves, so two calls share
//! a response only if they sent the same message to the same method with the same encodings
//! and configured metadata. Only a response whose `grpc-status` is `0` is shared; after any
//! other outcome each follower makes its own call.
//!
//! ```no_run
//! # // Needs a tonic service; see `examples/tonic.rs` for the whole program.
//! # use tower_coalesce::grpc::CoalesceGrpcLayer;
//! # fn doc<Svc>(catalog: Svc) where
//! #     Svc: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>, Error = std::convert::Infallible>
//! #         + tonic::server::NamedService + Clone + Send + Sync + 'static,
//! #     Svc::Future: Send + 'static,
//! # {
//! let coalesce = CoalesceGrpcLayer::new().method("/catalog.v1.Catalog/GetItem");
//! let server = tonic::transport::Server::builder()
//!     // Authentication goes outside (before) coalescing; timeouts, tracing and compression
//!     // too, so they stay per caller.
//!     .layer(coalesce)
//!     .add_service(catalog)
//!     .serve("127.0.0.1:50051".parse().unwrap());
//! # drop(server);
//! # }
//! ```
//!
//! The inner service sees each request with its body as a [`CoalesceBody`], and responses
//! come back as `http::Response<CoalesceBody<_>>`, each with a [`ServedBy`] extension that
//! says whether it was the caller's own call, a copy of another's, a call of its own after
//! the flight could not be shared, or a bypass.
//!
//!
//! Put the layer on the server (`Server::builder().layer(..)`, as above), not on one service
//! passed to `add_service`: tonic asks that one for its `NamedService` name, which
//! [`CoalesceGrpcService`] does not give (the crate does not depend on tonic). To coalesce a
//! client's outgoing calls, wrap its `Channel` with a `map_request` below the layer that turns
//! the body back into tonic's own (`.map_request(|r: http::Request<_>|
//! r.map(tonic::body::Body::new))`), since the inner service sees a [`CoalesceBody`].
//!
//! [`CoalesceBody`]: crate::http::CoalesceBody
//! [`ServedBy`]: crate::http::ServedBy

mod builder;
mod future;
mod key;
mod layer;
mod service;
mod status;

pub use builder::GrpcServiceBuilderExt;
pub use future::ResponseFuture;
pub use layer::{CoalesceGrpcLayer, DEFAULT_REQUEST_LIMIT, DEFAULT_RESPONSE_LIMIT};
pub use service::CoalesceGrpcService;
