//! HTTP adapter (feature `http`): coalescing for `http::Request` → `http::Response` services,
//! such as an axum `Router`, following the rules of a shared cache (RFC 9111) whose entries
//! live only while their request is in flight.
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_coalesce::http::CoalesceHttpLayer;
//!
//! let app: Router = Router::new()
//!     .route("/prices", get(|| async { "expensive" }))
//!     .layer(CoalesceHttpLayer::new());
//! ```
//!
//! # Which requests are coalesced
//!
//! A request is coalesced only if its method is `GET` or `HEAD` (configurable, never `CONNECT`) and
//! it has no body, no `Range`, no `Upgrade` / `Connection: upgrade`, no
//! `Cache-Control: no-cache|no-store` or `Pragma: no-cache`, and no `Authorization`, `Cookie`,
//! `Proxy-Authorization` or userinfo in the URI (`http://user:password@host/`) unless an
//! [identity](CoalesceHttpLayer::identity) is configured and known for it. Every other request
//! bypasses: it goes to the inner service untouched.
//!
//! Requests are coalesced when their keys are equal. The key is made of the method; the URI
//! (scheme, authority, path and query, exactly; the host ignoring case, userinfo byte for byte);
//! the values of the key headers (by default `Accept`, `Accept-Encoding`, `Accept-Language`), of
//! the conditional headers (`If-None-Match`, `If-Modified-Since`, `If-Match`,
//! `If-Unmodified-Since`, `If-Range`) and of `Host`, `Forwarded`, `X-Forwarded-Host`,
//! `X-Forwarded-Proto`, `X-Forwarded-Port`, `X-Forwarded-Prefix`; and the identity, if configured.
//! The key is compared field by field, never reduced to a hash. An HTTP/2 request carries its
//! scheme and authority in its URI, an HTTP/1.1 one usually only its path (the authority in
//! `Host`): a handler may answer by the scheme, which HTTP/1.1 does not say, so they usually get
//! different keys and each protocol's requests share their own call. (The version itself is not
//! in the key: requests that spell the URI and `Host` alike share a call.)
//!
//! **The response must depend on nothing else.** If a handler reads another header, a query
//! parameter it ignores does not matter, but a header it reads does: add it with
//! [`key_header`](CoalesceHttpLayer::key_header), or send a `Vary` naming it.
//!
//! # Which responses are shared
//!
//! The first request of a key (the *leader*) calls the inner service; identical requests that
//! arrive while it runs (the *followers*) wait. Its response is shared with them only if a
//! shared cache could reuse it: no `Set-Cookie`, no `Cache-Control: private`, `no-store` or
//! `no-cache` (a `Cache-Control` or `Pragma` that is not a well-formed directive list counts as
//! having them, on requests too), no `Vary: *`, not stale on arrival (`max-age=0`, `s-maxage=0`, an `Expires`
//! not after its `Date`), not `text/event-stream`, not `101`, no transfer coding but `chunked`
//! (a `gzip` one would leave the copies coded and unlabelled), and a body within
//! [`max_body_bytes`](CoalesceHttpLayer::max_body_bytes) (default 2 MiB). Its status must be
//! one a cache may reuse (RFC 9111 §3): `200`, `203`, `204`, `206`, `300`, `301`, `308`,
//! `404`, `405`, `410`, `414`, `501`, or `304`/`412` (answers to the validators in the key),
//! or any other with explicit freshness (`max-age`,
//! `s-maxage`, `Expires`, `public`). A `500`, `503` or `302` without it is the leader's alone:
//! the call failed, or answered its own request, and the followers make their own calls, as
//! nginx's and Varnish's waiting requests do.
//! A write through the layer (an unsafe method with a non-error response) invalidates its URI:
//! reads made after it do not join a call that began before it.
//!
//! A shared body is buffered into memory with its trailers, and every waiter (the leader too)
//! gets a rebuilt copy: same status, version, headers, extensions, body and trailers. Framing
//! is the server's: the copies drop the handler's `Transfer-Encoding` and (but for a `HEAD`) a
//! `Content-Length` beside it (their length is known; one with trailers reports no exact
//! length, so that the server can send it chunked, trailers and all). A follower's copy goes
//! without the hop-by-hop fields, which were about the leader's connection: the header
//! `Connection` and the fields it names (from the headers and the trailers), `Keep-Alive`,
//! `Proxy-Connection`, `TE` and `Upgrade` (a `426` keeps `Upgrade`, with `Connection:
//! upgrade`). A follower whose request headers differ from the leader's on a header named by
//! the response's `Vary` does not get it.
//!
//! A `HEAD` response's body is never sent, but under axum a `HEAD` request is answered by the
//! `GET` handler, whose body axum drops only after this layer. When its length is known, the
//! layer does not read it: the copies go out with no body and, unless it is 0 or the status
//! has no body, that length in `Content-Length` (whatever `max_body_bytes`). One of unknown
//! length is buffered as any other.
//!
//! Buffering has a cost: a shared response reaches its waiters (the leader included) only once
//! its whole body has arrived, so the body's transfer time is added to the time to first
//! byte, and up to `max_body_bytes` per flight are held in memory. Endpoints that stream
//! (large downloads, long polls) are better left out: route the layer around them, or lower
//! the limit.
//!
//! When the response is not shared, the leader gets its own response, untouched (but for a
//! `Content-Length` beside a `Transfer-Encoding`, which overrode it and is dropped, RFC 9112
//! §6.3; a body over the limit arrives whole: the bytes already read, then the rest of the
//! stream), and every follower is released at once to make its own call to the inner service.
//! The same happens when the inner service returns an error: the leader gets the error, the
//! followers call.
//!
//! # Errors and panics
//!
//! The service's error type is the inner service's, so the layer stacks on an axum `Router`
//! with no `HandleErrorLayer`. If the inner service panics, the leader's future panics again
//! with the same message (so `CatchPanicLayer`, or the server, handles it as without this
//! layer) and the followers make their own calls. If the leader's request is dropped (client
//! gone, timeout), a follower takes over the call; it does not get a response that was meant
//! for the leader alone.
//!
//! # Bounds
//!
//! Off by default: [`follower_timeout`](CoalesceHttpLayer::follower_timeout) sends a follower
//! that waited too long to make its own call (as released); past
//! [`max_in_flight`](CoalesceHttpLayer::max_in_flight) or
//! [`max_followers`](CoalesceHttpLayer::max_followers) a request calls on its own and gets its
//! response as it streams (its [`ServedBy`] is `Bypass`: its own call, shared with nobody).
//!
//! # How a response was served
//!
//! Every response carries a [`ServedBy`] extension, and optionally an RFC 9211
//! `Cache-Status` header (see [`CoalesceHttpLayer::cache_status_header`]).
//!
//! # Where to put the layer
//!
//! Everything below the layer runs once for all the waiters of a call, so:
//!
//! - put it *inside* authentication, so only allowed requests reach it and an identity can
//!   come from verified credentials;
//! - keep per-request layers *outside* (request ids, CORS answering the request's `Origin`),
//!   or add the header they read to the key;
//! - keep tracing, timeouts and compression *outside* (added after it with `Router::layer`,
//!   before it in a `ServiceBuilder`): a timeout inside would cut the shared call short for
//!   everybody, tracing inside would record one span for many requests, and compression
//!   inside would compress for the leader's `Accept-Encoding` only (which is in the key by
//!   default, so that merely wastes sharing).

// `pub(crate)`: the gRPC adapter buffers and replays bodies with it too.
pub(crate) mod body;
mod builder;
mod call;
// `pub(crate)`: the gRPC adapter hands its leader's reply over in the same slot.
pub(crate) mod future;
pub(crate) mod key;
mod layer;
mod service;
mod share;

#[cfg(test)]
mod tests;

pub use body::CoalesceBody;
pub use builder::HttpServiceBuilderExt;
pub use future::ResponseFuture;
pub use layer::{CoalesceHttpLayer, DEFAULT_MAX_BODY_BYTES};
pub use service::CoalesceHttpService;

/// How a response was served: a response extension set on every response of
/// [`CoalesceHttpService`].
///
/// ```
/// use tower_coalesce::http::ServedBy;
///
/// # fn inspect(res: &http::Response<()>) {
/// if res.extensions().get::<ServedBy>() == Some(&ServedBy::Follower) {
///     // This response is a copy of another request's response.
/// }
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServedBy {
    /// The request started the call; the response is its own (shared with followers, or not).
    Leader,
    /// The request joined another request's call and got a copy of its response.
    Follower,
    /// The request joined another request's call, but that response could not be shared
    /// with it (or the call failed, or it waited past its
    /// [`follower_timeout`](CoalesceHttpLayer::follower_timeout)), so it made its own call.
    Released,
    /// The request was not eligible for coalescing, or came over a capacity bound
    /// ([`max_in_flight`](CoalesceHttpLayer::max_in_flight),
    /// [`max_followers`](CoalesceHttpLayer::max_followers)), and went straight to the inner
    /// service; its response is its own, unbuffered.
    Bypass,
}

impl ServedBy {
    /// A short lowercase name (`leader`, `follower`, `released`, `bypass`), for metrics labels
    /// and logs.
    ///
    /// ```
    /// use tower_coalesce::http::ServedBy;
    ///
    /// assert_eq!(ServedBy::Follower.as_str(), "follower");
    /// assert_eq!(ServedBy::Bypass.to_string(), "bypass");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ServedBy::Leader => "leader",
            ServedBy::Follower => "follower",
            ServedBy::Released => "released",
            ServedBy::Bypass => "bypass",
        }
    }
}

impl std::fmt::Display for ServedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
