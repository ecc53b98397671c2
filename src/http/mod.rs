//! HTTP adapter (feature `http`): coalescing for `http::Request` → `http::Response` services
//! that follows the shared-cache rules of RFC 9111.

// Used by the HTTP service and by the gRPC adapter.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod body;

pub use body::CoalesceBody;
