//! [`CoalesceHttpLayer`] and its options.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::request::Parts;
use http::Method;
use tower::Layer;

use super::key::{Key, KeyRules, Writes};
use super::service::CoalesceHttpService;
use crate::flight::{Group, GroupBuilder};
use crate::Stats;

/// Options shared by a layer and every service it makes.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) rules: KeyRules,
    pub(crate) max_body_bytes: usize,
    pub(crate) cache_status: bool,
    pub(crate) detached: bool,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) max_followers: Option<usize>,
    pub(crate) follower_timeout: Option<Duration>,
}

/// The default of [`CoalesceHttpLayer::max_body_bytes`]: 2 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Coalesces identical concurrent `GET` and `HEAD` requests to an HTTP service, following the
/// rules of a shared cache (RFC 9111) with a zero lifetime.
///
/// See the [module documentation](super) for the rules; in short, a request is coalesced only
/// when it is safe to hand one response to all, and a response is handed to followers only
/// when a shared cache could store it.
///
/// ```
/// use axum::{routing::get, Router};
/// use tower_coalesce::http::CoalesceHttpLayer;
///
/// let app: Router = Router::new()
///     .route("/report", get(|| async { "expensive report" }))
///     .layer(CoalesceHttpLayer::new().cache_status_header(true));
/// ```
///
/// # Registry scope
///
/// The layer creates its registry in [`new`](Self::new). Every service it makes, in every
/// [`layer`](Layer::layer) call, and every clone share that registry, as tower's
/// `GlobalConcurrencyLimitLayer` shares its semaphore: axum applies a layer again for every
/// connection, so a registry per `layer` call would coalesce nothing. Changing an option makes
/// a new registry, so layers that coalesce together always have the same options.
///
/// Because of this sharing, a layer value must not wrap two services that can see the same
/// request but answer it differently. In axum, `Router::nest` strips the prefix before inner
/// layers see the path: put one clone of a layer on two nested routers and `/v1/users` and
/// `/v2/users` both arrive as `/users`, with the same key. Give each nested router its own
/// `CoalesceHttpLayer::new()`, or put the layer on the outer router.
#[derive(Clone)]
pub struct CoalesceHttpLayer {
    config: Arc<Config>,
    group: Group<Key>,
    waiting: Arc<AtomicUsize>,
    writes: Arc<Writes>,
}

impl CoalesceHttpLayer {
    /// A layer with the default options: `GET` and `HEAD`; `Accept`, `Accept-Encoding` and
    /// `Accept-Language` in the key; no identity (credentialed requests bypass); bodies up to
    /// 2 MiB shared; no `Cache-Status` header.
    pub fn new() -> Self {
        CoalesceHttpLayer {
            config: Arc::new(Config {
                rules: KeyRules::default(),
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                cache_status: false,
                detached: false,
                max_in_flight: None,
                max_followers: None,
                follower_timeout: None,
            }),
            group: Group::new(),
            waiting: Arc::default(),
            writes: Arc::default(),
        }
    }

    fn configure(self, change: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::clone(&self.config);
        change(&mut config);
        CoalesceHttpLayer {
            group: GroupBuilder::new()
                .detached(config.detached)
                .bounds(config.max_in_flight, config.max_followers)
                .build(),
            config: Arc::new(config),
            waiting: Arc::default(),
            writes: Arc::default(),
        }
    }

    /// Replaces the request headers whose values go into the key (by default `Accept`,
    /// `Accept-Encoding`, `Accept-Language`).
    ///
    /// Put here every request header your handler reads to build its response, other than
    /// credentials (see [`identity`](Self::identity)). The conditional headers
    /// (`If-None-Match`, `If-Modified-Since`, `If-Match`, `If-Unmodified-Since`, `If-Range`)
    /// and the headers that carry the authority (`Host`, `Forwarded`, `X-Forwarded-Host`,
    /// `X-Forwarded-Proto`, `X-Forwarded-Port`, `X-Forwarded-Prefix`) are always in the key.
    ///
    /// ```
    /// use http::header::{ACCEPT, HeaderName};
    /// use tower_coalesce::http::CoalesceHttpLayer;
    ///
    /// let layer = CoalesceHttpLayer::new()
    ///     .key_headers([ACCEPT, HeaderName::from_static("x-tenant")]);
    /// ```
    pub fn key_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.configure(|c| c.rules.set_headers(names))
    }

    /// Adds one request header to the key.
    pub fn key_header(self, name: HeaderName) -> Self {
        self.configure(|c| c.rules.add_header(name))
    }

    /// Adds a caller identity to the key, so that requests with credentials are coalesced
    /// with requests of the same identity only.
    ///
    /// Without an identity, requests with `Authorization`, `Cookie`, `Proxy-Authorization` or
    /// userinfo in the URI bypass the layer. With one, `identify` is called for every coalescible
    /// request; its result becomes part of the key; a request with credentials for which it returns
    /// `None` bypasses. The identity must determine everything the credentials change about the
    /// response: derive it from what authentication *verified* (a user id an authentication layer
    /// outside this one put in the extensions), never from an unchecked header, or a client can
    /// claim someone else's identity and get their response.
    ///
    /// ```
    /// use tower_coalesce::http::CoalesceHttpLayer;
    ///
    /// #[derive(Clone)]
    /// struct UserId(u64); // inserted by an authentication layer placed outside
    ///
    /// let layer = CoalesceHttpLayer::new().identity(|parts: &http::request::Parts| {
    ///     parts.extensions.get::<UserId>().map(|UserId(id)| id.to_string())
    /// });
    /// ```
    pub fn identity<F, I>(self, identify: F) -> Self
    where
        F: Fn(&Parts) -> Option<I> + Send + Sync + 'static,
        I: Into<Bytes>,
    {
        let identify = Arc::new(move |parts: &Parts| identify(parts).map(Into::into));
        self.configure(|c| c.rules.identity = Some(identify))
    }

    /// Replaces the methods that are coalesced (by default `GET` and `HEAD`). Each method is
    /// coalesced apart from the others. `CONNECT` always bypasses, and so does any request
    /// with a body; only add methods that are safe and idempotent for your service.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods: Vec<Method> = methods.into_iter().collect();
        self.configure(|c| c.rules.methods = methods)
    }

    /// The largest response body, in bytes, that is buffered and shared (default 2 MiB).
    ///
    /// A larger body (by `Content-Length`, by its size hint, or found while reading) goes to
    /// the leader whole and untruncated — the bytes already read, then the rest of the
    /// stream — and the followers make their own calls.
    pub fn max_body_bytes(self, limit: usize) -> Self {
        self.configure(|c| c.max_body_bytes = limit)
    }

    /// Whether to add an RFC 9211 `Cache-Status` entry named `tower-coalesce` to every
    /// response (off by default). Its values:
    ///
    /// | served by | entry |
    /// |---|---|
    /// | leader | `tower-coalesce; fwd=miss` |
    /// | request over [`max_in_flight`](Self::max_in_flight) or [`max_followers`](Self::max_followers), calling on its own | `tower-coalesce; fwd=bypass; detail=over-capacity` |
    /// | follower | `tower-coalesce; fwd=miss; collapsed` |
    /// | follower released to make its own call | `tower-coalesce; fwd=miss; collapsed=?0; detail=<reason>` (`fwd=vary-miss` for a `Vary` mismatch) |
    /// | bypass | `tower-coalesce; fwd=bypass; detail=<reason>` (`fwd=method`, `fwd=request` for those reasons) |
    ///
    /// The [`ServedBy`](super::ServedBy) response extension is always set.
    pub fn cache_status_header(self, enabled: bool) -> Self {
        self.configure(|c| c.cache_status = enabled)
    }

    /// At most `max` keys in flight at once, across every service this layer made. A request
    /// that would start one more flight calls the inner service on its own instead: it never
    /// waits and never fails for the bound, and its response streams to it unbuffered, as
    /// without this layer. That call is the request's own: not [detached](Self::detached),
    /// it ends if the request goes. (Off by default.)
    ///
    /// ```
    /// use tower_coalesce::http::CoalesceHttpLayer;
    ///
    /// let layer = CoalesceHttpLayer::new().max_in_flight(10_000).max_followers(1_000);
    /// ```
    pub fn max_in_flight(self, max: usize) -> Self {
        self.configure(|c| c.max_in_flight = Some(max))
    }

    /// At most `max` followers per flight. The requests after that call the inner service on
    /// their own, unbuffered, as over [`max_in_flight`](Self::max_in_flight). (Off by default.)
    pub fn max_followers(self, max: usize) -> Self {
        self.configure(|c| c.max_followers = Some(max))
    }

    /// How long a follower waits for the leader's response (nginx's
    /// `proxy_cache_lock_timeout`). Past `limit` it stops waiting and calls the inner service
    /// with its own request, as a follower released for any other reason, with `detail=timeout`
    /// in its `Cache-Status` entry; the flight goes on for the others. A follower that took the
    /// call over from a leader that went away waits for that call with no limit. Counted in
    /// [`Stats::timed_out`]. Off by default: a follower waits as long as the call takes. The
    /// limit needs tokio's timer: outside a tokio runtime, or in one without its time driver,
    /// followers wait with no limit.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_coalesce::http::CoalesceHttpLayer;
    ///
    /// let layer = CoalesceHttpLayer::new().follower_timeout(Duration::from_secs(5));
    /// ```
    pub fn follower_timeout(self, limit: Duration) -> Self {
        self.configure(|c| c.follower_timeout = Some(limit))
    }

    /// Runs each flight (the inner call and the buffering of its body) on a spawned tokio task,
    /// so that it completes even when every request waiting for it has gone: a costly response
    /// is not thrown away because its clients disconnected, and the backend sees no
    /// cancellation. Off by default: a flight is cancelled when its last request goes. See
    /// [`GroupBuilder::detached`](crate::GroupBuilder::detached); outside a tokio runtime
    /// flights are driven by their requests regardless.
    ///
    /// ```
    /// use tower_coalesce::http::CoalesceHttpLayer;
    ///
    /// let layer = CoalesceHttpLayer::new().detached(true);
    /// ```
    pub fn detached(self, detached: bool) -> Self {
        self.configure(|c| c.detached = detached)
    }

    /// The number of keys with a call in flight, across every service this layer made.
    pub fn in_flight(&self) -> usize {
        self.group.in_flight()
    }

    /// The number of requests currently waiting for another request's call (followers),
    /// across every service this layer made.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// A snapshot of the counters of the registry this layer's services share: flights
    /// (`leaders`), `followers`, requests the rules passed through (`bypassed`), followers
    /// `released` to make their own call, failed and panicked flights.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_coalesce::http::CoalesceHttpLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = CoalesceHttpLayer::new();
    /// let svc = layer.layer(service_fn(|_: Request<Full<Bytes>>| async {
    ///     Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::from("hello")))
    /// }));
    /// let get = Request::get("/a").body(Full::default()).unwrap();
    /// let post = Request::post("/a").body(Full::default()).unwrap();
    /// svc.clone().oneshot(get).await.unwrap();
    /// svc.oneshot(post).await.unwrap(); // not a safe method: passed through
    /// let stats = layer.stats();
    /// assert_eq!((stats.leaders, stats.bypassed), (1, 1));
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        self.group.stats()
    }
}

impl Default for CoalesceHttpLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for CoalesceHttpLayer {
    type Service = CoalesceHttpService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CoalesceHttpService::from_parts(
            inner,
            Arc::clone(&self.config),
            self.group.clone(),
            Arc::clone(&self.waiting),
            Arc::clone(&self.writes),
        )
    }
}

impl fmt::Debug for CoalesceHttpLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceHttpLayer")
            .field("config", &self.config)
            .field("group", &self.group)
            .field("waiting", &self.waiting())
            .finish()
    }
}
