//! [`CoalesceGrpcLayer`]: options, and one registry shared by every service it wraps.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::request::Parts;
use tower::Layer;

use super::key::{Config, GrpcKey, IdentityFn};
use super::service::CoalesceGrpcService;
use crate::flight::{Group, GroupBuilder};
use crate::Stats;

/// `path`, if it looks like a gRPC method path (a leading `/`, exactly one more `/`, nothing
/// empty); a panic otherwise, since it would silently never match.
fn checked_path(path: String) -> String {
    let valid = path
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(service, method)| {
            !service.is_empty() && !method.is_empty() && !method.contains('/')
        });
    assert!(
        valid,
        "gRPC method paths look like \"/package.Service/Method\", got {path:?}"
    );
    path
}

/// The default of [`CoalesceGrpcLayer::request_limit`]: 64 KiB.
pub const DEFAULT_REQUEST_LIMIT: usize = 64 * 1024;

/// The default of [`CoalesceGrpcLayer::response_limit`]: 4 MiB, tonic's default message size
/// limit.
pub const DEFAULT_RESPONSE_LIMIT: usize = 4 * 1024 * 1024;

/// Coalesces concurrent identical unary gRPC calls to allow-listed methods.
///
/// Nothing is coalesced until a method is allow-listed with [`method`](Self::method). A call is
/// coalesced only if it is a `POST` to an allow-listed path with an `application/grpc` content
/// type, carries no credentials (`authorization`, `cookie`, `proxy-authorization`, userinfo in the
/// URI) unless an [`identity`](Self::identity) tells callers apart, does not ask for a fresh answer
/// (`cache-control: no-cache` or `no-store`, `pragma: no-cache`), and its request message fits in
/// [`request_limit`](Self::request_limit). Every other call bypasses the layer untouched.
///
/// Calls share a response when their key is equal: method path, authority, content type,
/// request message bytes, `grpc-encoding`, `grpc-accept-encoding`, `accept-encoding`, the
/// [`metadata`](Self::metadata) keys configured, and the identity. Only a response whose
/// `grpc-status` is `0` is shared, and only if it carries no `set-cookie` (in its headers or
/// trailers) and fits in [`response_limit`](Self::response_limit); otherwise its own caller
/// gets it untouched and the followers make their own calls, all at once.
///
/// A call of a method that is not allow-listed (or, if any are named, of a
/// [`write_method`](Self::write_method)) may change what the listed ones answer (a write):
/// once it has its response, later calls do not join a flight that began before it,
/// so a client reads its own writes (the HTTP layer's rule for unsafe methods, per URI; here
/// per layer, since a gRPC path does not say which data it touches). Writes that happen later
/// in a stream's life are not seen.
///
/// # Registry scope
///
/// The layer owns one registry: every service it makes, in every [`layer`](Layer::layer)
/// call, and every clone of the layer share it (as tower's `GlobalConcurrencyLimitLayer` shares
/// its semaphore). The key includes the method path, so one layer can wrap a whole tonic
/// server. Each builder method returns a layer with a registry of its own, so configure the
/// layer first and clone the finished one.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_coalesce::grpc::CoalesceGrpcLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = CoalesceGrpcLayer::new()
///     .method("/catalog.v1.Catalog/GetItem")
///     .metadata("x-tenant");
/// // With tonic: `Server::builder().layer(layer).add_service(...)`.
/// let svc = ServiceBuilder::new()
///     .layer(layer)
///     .service(service_fn(|_req: Request<_>| async {
///         let response = Response::builder()
///             .header("content-type", "application/grpc")
///             .header("grpc-status", "0")
///             .body(Full::new(Bytes::new()))
///             .unwrap();
///         Ok::<_, std::convert::Infallible>(response)
///     }));
///
/// let call = Request::post("/catalog.v1.Catalog/GetItem")
///     .header("content-type", "application/grpc")
///     .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
///     .unwrap();
/// let response = svc.oneshot(call).await.unwrap();
/// assert_eq!(response.headers()["grpc-status"], "0");
/// # }
/// ```
#[derive(Clone)]
pub struct CoalesceGrpcLayer {
    pub(crate) shared: Shared,
}

/// What a layer shares with every service it makes.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) group: Group<GrpcKey>,
    /// Followers waiting for a flight, across the registry.
    pub(crate) waiting: Arc<AtomicUsize>,
    /// Calls of methods not allow-listed (writes, as far as this layer can tell) that have
    /// had their response: part of every key, so that a call made after one does not join a
    /// flight that began before it. Only ever incremented.
    pub(crate) writes: Arc<AtomicU64>,
}

impl Shared {
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

impl CoalesceGrpcLayer {
    /// A layer with no method allow-listed (it coalesces nothing yet) and the default limits:
    /// 64 KiB per request message, 4 MiB per response.
    pub fn new() -> Self {
        CoalesceGrpcLayer {
            shared: Shared {
                config: Arc::new(Config::new()),
                group: Group::new(),
                waiting: Arc::new(AtomicUsize::new(0)),
                writes: Arc::new(AtomicU64::new(0)),
            },
        }
    }

    /// Changes the options. A layer with other options gets a registry of its own, made for
    /// them: its keys mean something else, so it must not meet flights of the layer it was made
    /// from.
    fn configure(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.shared.config));
        let config = &self.shared.config;
        self.shared.group = GroupBuilder::new()
            .detached(config.detached)
            .bounds(config.max_in_flight, config.max_followers)
            .build();
        self.shared.waiting = Arc::new(AtomicUsize::new(0));
        self.shared.writes = Arc::new(AtomicU64::new(0));
        self
    }

    /// Allow-lists a unary method by its full path, `/package.Service/Method`.
    ///
    /// Only unary methods belong here: a streaming call's request or response is a sequence of
    /// messages over time, which the layer does not share. tonic's generated servers expose
    /// the service part as `NAME` (via `tonic::server::NamedService`).
    ///
    /// # Panics
    ///
    /// If `path` does not look like `/service/method` (a leading `/`, exactly one more `/`,
    /// nothing empty), since it would silently never match.
    pub fn method(self, path: impl Into<String>) -> Self {
        let path = checked_path(path.into());
        self.configure(|c| {
            c.methods.insert(path.into_boxed_str());
        })
    }

    /// Names a method whose calls may change what the allow-listed methods answer (a write).
    /// Once it has its response, later calls do not join a flight that began before it, so a
    /// client reads its own writes. By default every method not allow-listed counts as a write;
    /// once one is named, only the named ones do (health checks and other reads then no longer
    /// split flights). A method that is also allow-listed is coalesced, never counted.
    ///
    /// ```
    /// use tower_coalesce::grpc::CoalesceGrpcLayer;
    ///
    /// let layer = CoalesceGrpcLayer::new()
    ///     .method("/shop.Catalog/GetItem")
    ///     .write_method("/shop.Catalog/SetItem");
    /// # drop(layer);
    /// ```
    ///
    /// # Panics
    ///
    /// If `path` does not look like `/service/method`, as for [`method`](Self::method).
    pub fn write_method(self, path: impl Into<String>) -> Self {
        let path = checked_path(path.into());
        self.configure(|c| {
            c.write_methods
                .get_or_insert_with(HashSet::new)
                .insert(path.into_boxed_str());
        })
    }

    /// Allow-lists several unary methods; see [`method`](Self::method).
    pub fn methods<I>(self, paths: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        paths.into_iter().fold(self, Self::method)
    }

    /// Makes the values of a request metadata key part of the key: calls that differ in it do
    /// not share a response. Use it for every metadata the handler reads (a tenant, a locale).
    ///
    /// # Panics
    ///
    /// If `name` is not a valid metadata (HTTP header) name.
    pub fn metadata(self, name: impl AsRef<str>) -> Self {
        let name = HeaderName::try_from(name.as_ref())
            .unwrap_or_else(|_| panic!("invalid metadata key {:?}", name.as_ref()));
        self.configure(|c| {
            if !c.metadata.contains(&name) {
                c.metadata.push(name);
            }
        })
    }

    /// Adds the caller's identity to the key, and lets calls with credentials be coalesced.
    ///
    /// Without an identity, a call that carries `authorization`, `cookie` or `proxy-authorization`
    /// metadata (or userinfo in its URI) bypasses the layer: its response may be meant for that
    /// caller alone. With one, `identify` is called for every candidate call; calls share a
    /// response only when their identities are equal, and a call with credentials for which
    /// `identify` returns `None` still bypasses.
    ///
    /// Derive the identity from credentials that were *verified* before this layer (put the
    /// authentication layer outside it and read what it stored in the request extensions),
    /// not from the raw token: an unverified token would let a caller join another's call.
    ///
    /// ```
    /// use tower_coalesce::grpc::CoalesceGrpcLayer;
    ///
    /// #[derive(Clone)]
    /// struct UserId(String);
    ///
    /// let layer = CoalesceGrpcLayer::new()
    ///     .method("/catalog.v1.Catalog/GetItem")
    ///     .identity(|parts| parts.extensions.get::<UserId>().map(|user| user.0.clone()));
    /// # let _ = layer;
    /// ```
    pub fn identity<F, I>(self, identify: F) -> Self
    where
        F: Fn(&Parts) -> Option<I> + Send + Sync + 'static,
        I: Into<Bytes>,
    {
        let identify: IdentityFn = Arc::new(move |parts: &Parts| identify(parts).map(Into::into));
        self.configure(|c| c.identity = Some(identify))
    }

    /// The largest request body (the framed request message) that is buffered to compute a
    /// key, in bytes; default 64 KiB. A larger request bypasses the layer, with its body
    /// passed on whole.
    ///
    /// The key holds the whole message while the call is in flight, so this bounds the memory
    /// a flight's key uses.
    pub fn request_limit(self, bytes: usize) -> Self {
        self.configure(|c| c.request_limit = bytes)
    }

    /// The largest response body that is buffered to be shared, in bytes; default 4 MiB
    /// (tonic's default message size limit). Over it, the caller that made the call gets its
    /// whole response and the followers make their own calls.
    pub fn response_limit(self, bytes: usize) -> Self {
        self.configure(|c| c.response_limit = bytes)
    }

    /// At most `max` flights (keys) at once, across every service this layer made. A call
    /// that would start one more flight is made on its own instead: it never waits and never
    /// fails for the bound, and its response is passed on as it comes, unbuffered. That call
    /// is the caller's own: not [detached](Self::detached), it ends if the caller goes. (Off
    /// by default.)
    ///
    /// ```
    /// use tower_coalesce::grpc::CoalesceGrpcLayer;
    ///
    /// let layer = CoalesceGrpcLayer::new()
    ///     .method("/catalog.v1.Catalog/GetItem")
    ///     .max_in_flight(10_000)
    ///     .max_followers(1_000);
    /// ```
    pub fn max_in_flight(self, max: usize) -> Self {
        self.configure(|c| c.max_in_flight = Some(max))
    }

    /// At most `max` followers per flight. The calls after that are made on their own, as
    /// over [`max_in_flight`](Self::max_in_flight). (Off by default.)
    pub fn max_followers(self, max: usize) -> Self {
        self.configure(|c| c.max_followers = Some(max))
    }

    /// How long a follower waits for the leader's response. Past `limit` it stops waiting and
    /// calls the inner service with its own request, as a follower released for any other
    /// reason; the flight goes on for the others. A follower that took the call over from a
    /// leader that went away waits for that call with no limit. Counted in
    /// [`Stats::timed_out`]. Off by default. The limit needs tokio's timer: outside a tokio
    /// runtime, or in one without its time driver, followers wait with no limit. (A deadline for the whole call is the client's
    /// `grpc-timeout`, which tonic's server enforces.)
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_coalesce::grpc::CoalesceGrpcLayer;
    ///
    /// let layer = CoalesceGrpcLayer::new()
    ///     .method("/catalog.v1.Catalog/GetItem")
    ///     .follower_timeout(Duration::from_secs(2));
    /// ```
    pub fn follower_timeout(self, limit: Duration) -> Self {
        self.configure(|c| c.follower_timeout = Some(limit))
    }

    /// Runs each flight (the inner call and the buffering of its response) on a spawned tokio
    /// task, so that it completes even when every call waiting for it has gone (its clients
    /// cancelled or disconnected). Off by default: a flight is cancelled when its last call
    /// goes. See [`GroupBuilder::detached`](crate::GroupBuilder::detached); outside a tokio
    /// runtime flights are driven by their calls regardless.
    ///
    /// ```
    /// use tower_coalesce::grpc::CoalesceGrpcLayer;
    ///
    /// let layer = CoalesceGrpcLayer::new()
    ///     .method("/catalog.v1.Catalog/GetItem")
    ///     .detached(true);
    /// ```
    pub fn detached(self, detached: bool) -> Self {
        self.configure(|c| c.detached = detached)
    }

    /// The number of calls in flight for which others may wait, in the registry this layer
    /// shares.
    pub fn in_flight(&self) -> usize {
        self.shared.group.in_flight()
    }

    /// The number of calls currently waiting for another call's response (followers), in the
    /// registry this layer shares.
    pub fn waiting(&self) -> usize {
        self.shared.waiting()
    }

    /// A snapshot of the counters of the registry this layer's services share: flights
    /// (`leaders`), `followers`, calls the rules passed through (`bypassed`: methods not
    /// allow-listed, gRPC-Web, oversized or failing request bodies, requests with trailers),
    /// followers `released` to make their own call (the flight's status was not `OK`, its
    /// response too large, or its handler panicked), failed and panicked flights.
    ///
    /// ```
    /// use tower_coalesce::grpc::CoalesceGrpcLayer;
    ///
    /// let layer = CoalesceGrpcLayer::new().method("/catalog.Catalog/GetItem");
    /// let stats = layer.stats();
    /// assert_eq!((stats.leaders, stats.followers, stats.released), (0, 0, 0));
    /// ```
    pub fn stats(&self) -> Stats {
        self.shared.group.stats()
    }
}

impl Default for CoalesceGrpcLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for CoalesceGrpcLayer {
    type Service = CoalesceGrpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CoalesceGrpcService::from_parts(inner, self.shared.clone())
    }
}

impl fmt::Debug for CoalesceGrpcLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceGrpcLayer")
            .field("config", &self.shared.config)
            .field("group", &self.shared.group)
            .field("waiting", &self.waiting())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_paths_are_validated() {
        for bad in [
            "GetItem",
            "catalog.v1.Catalog/GetItem",
            "/catalog.v1.Catalog",
            "//GetItem",
            "/a/b/c",
            "/a/",
        ] {
            let result = std::panic::catch_unwind(|| CoalesceGrpcLayer::new().method(bad));
            assert!(result.is_err(), "{bad:?} must be refused");
        }
        let layer = CoalesceGrpcLayer::new().methods(["/a.B/C", "/a.B/D", "/a.B/C"]);
        assert_eq!(layer.shared.config.methods.len(), 2);
    }

    #[test]
    fn metadata_keys_are_normalised_and_deduplicated() {
        let layer = CoalesceGrpcLayer::new()
            .metadata("X-Tenant")
            .metadata("x-tenant");
        assert_eq!(
            layer.shared.config.metadata,
            [HeaderName::from_static("x-tenant")]
        );
        assert!(std::panic::catch_unwind(|| CoalesceGrpcLayer::new().metadata("bad key")).is_err());
    }

    #[test]
    fn clones_share_the_registry_and_builder_calls_do_not() {
        let layer = CoalesceGrpcLayer::new().method("/a.B/C");
        let clone = layer.clone();
        assert!(Arc::ptr_eq(&layer.shared.waiting, &clone.shared.waiting));
        let reconfigured = clone.response_limit(1);
        assert!(!Arc::ptr_eq(
            &layer.shared.waiting,
            &reconfigured.shared.waiting
        ));
        assert_eq!(layer.shared.config.response_limit, DEFAULT_RESPONSE_LIMIT);
        assert_eq!(reconfigured.shared.config.response_limit, 1);
    }

    #[test]
    fn debug_shows_options_but_no_identity_internals() {
        let layer = CoalesceGrpcLayer::new()
            .method("/a.B/C")
            .identity(|_: &Parts| Some("secret"));
        let shown = format!("{layer:?}");
        assert!(
            shown.contains("/a.B/C") && shown.contains("identity: true"),
            "{shown}"
        );
        assert!(!shown.contains("secret"));
    }
}
