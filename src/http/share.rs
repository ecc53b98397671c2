//! Response rules: which responses may be handed to followers, and the shared response
//! every waiter's response is rebuilt from.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::response::Parts;
use http::{Extensions, HeaderMap, Response, StatusCode, Version};
use http_body::Body;

use super::body::CoalesceBody;
use super::key::{has_directive, split_directives};

/// What a flight hands its followers.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// A response every waiter may get a copy of (subject to [`SharedResponse::vary_matches`]).
    Shared(Arc<SharedResponse>),
    /// Nothing to share: each follower makes its own call. The leader, if still there, finds
    /// its own response (or error) in its slot.
    Released(Release),
}

impl Outcome {
    /// Whether the flight failed: the inner service returned an error. (A panic is one too,
    /// known to the core by itself; a response that is not shared did not fail.)
    pub(crate) fn failed(&self) -> bool {
        matches!(self, Outcome::Released(Release::Error))
    }
}

/// Why a flight's response was not shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Release {
    /// The inner service returned an error.
    Error,
    /// The inner service or its body panicked.
    Panic,
    /// `Set-Cookie`: the response starts or changes somebody's session.
    SetCookie,
    /// `Cache-Control: private`, `no-store` or `no-cache`, or a response stale the moment it
    /// was made (a zero freshness lifetime), which a shared cache may not reuse unvalidated.
    CacheControl,
    /// `Vary: *`, or a `Vary` that cannot be read.
    VaryAny,
    /// A status a cache may not reuse without explicit freshness (RFC 9111 §3: not
    /// heuristically cacheable, such as `500`, `503` or `302`), and none given: the call
    /// failed, or its answer was for its own request.
    Status,
    /// The body is larger than the limit (by `Content-Length`, size hint, or while reading),
    /// or failed while being read.
    TooLarge,
    /// A stream that is not meant to end (`text/event-stream`), a protocol switch, or a body in
    /// a transfer coding other than `chunked` (`gzip`...), which a rebuilt copy cannot keep.
    Stream,
    /// Shared, but the follower's request differs from the leader's in a header the
    /// response's `Vary` names.
    Vary,
    /// A call run alone over a bound: nobody to share with. (Never a follower's reason: its
    /// `Cache-Status` detail is the leader's.)
    Alone,
    /// A follower waited past its limit (`follower_timeout`). (Never a flight's outcome.)
    TimedOut,
}

impl Release {
    /// RFC 9211 `fwd` and `detail` values for a released follower's `Cache-Status` entry.
    pub(crate) fn cache_status(self) -> (&'static str, &'static str) {
        match self {
            Release::Error => ("miss", "error"),
            Release::Panic => ("miss", "panic"),
            Release::SetCookie => ("miss", "set-cookie"),
            Release::CacheControl => ("miss", "cache-control"),
            Release::VaryAny => ("miss", "vary-any"),
            Release::Status => ("miss", "status"),
            Release::TooLarge => ("miss", "too-large"),
            Release::Stream => ("miss", "stream"),
            Release::Vary => ("vary-miss", "vary"),
            Release::Alone => ("bypass", "over-capacity"),
            Release::TimedOut => ("miss", "timeout"),
        }
    }
}

/// Whether a response with these parts may be given to followers, judged before its body is
/// read. Returns the response's `Vary` header names (lower case, no duplicates) when it may.
pub(crate) fn shareable(parts: &Parts) -> Result<Vec<HeaderName>, Release> {
    let headers = &parts.headers;
    if parts.status == StatusCode::SWITCHING_PROTOCOLS || transfer_coded(headers) {
        return Err(Release::Stream);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(Release::SetCookie);
    }
    if has_directive(
        headers,
        &header::CACHE_CONTROL,
        &["private", "no-store", "no-cache"],
    ) || stale_on_arrival(headers)
    {
        return Err(Release::CacheControl);
    }
    if !reusable_status(parts.status) && !explicitly_fresh(headers) {
        return Err(Release::Status);
    }
    if headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .any(|v| starts_with_ignore_case(v.as_bytes(), b"text/event-stream"))
    {
        return Err(Release::Stream);
    }
    vary_names(headers)
}

/// Whether a response of this status may be reused with no explicit freshness: the statuses
/// RFC 9110 §15.1 calls heuristically cacheable (200, 203, 204, 206, 300, 301, 308, 404, 405,
/// 410, 414, 501), and `304` and `412`, the answers to a conditional request, whose
/// validators are in the key (every follower sent the same ones). Any other (`500`, `502`,
/// `503`, `504`, `429`, `401`, `302`...) is shared only with explicit freshness (RFC 9111 §3),
/// as nginx's and Varnish's waiting requests go to the origin after such a response.
fn reusable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 304 | 308 | 404 | 405 | 410 | 412 | 414 | 501
    )
}

/// Whether the response says how long it stays fresh, or that any cache may store it
/// (RFC 9111 §3: `public`, `max-age`, `s-maxage`, `Expires`). A zero lifetime was turned away
/// before (`stale_on_arrival`).
fn explicitly_fresh(headers: &HeaderMap) -> bool {
    headers.contains_key(header::EXPIRES)
        || ["public", "max-age", "s-maxage"]
            .iter()
            .any(|name| directive(headers, name).is_some())
}

/// Whether the response is stale the moment it is made, for a shared cache (RFC 9111 §4.2.1):
/// its freshness lifetime is `s-maxage`, else `max-age`, else `Expires` minus `Date`, and a
/// zero one (`max-age=0`, `s-maxage=0`, an `Expires` not after `Date`, or an `Expires` that
/// cannot be read, which §5.3 says means the past) may not be reused for another request
/// without revalidating it (§4.2.4), as collapsing caches (nginx, Varnish) do not. A response
/// with none of these has a heuristic lifetime and is shared.
fn stale_on_arrival(headers: &HeaderMap) -> bool {
    // Its age when it arrived, from an upstream cache (§4.2.3); fresh only while younger.
    let age = headers
        .get(header::AGE)
        .and_then(|v| delta_seconds(v.to_str().ok()?))
        .unwrap_or(0);
    for name in ["s-maxage", "max-age"] {
        if let Some(value) = directive(headers, name) {
            // Invalid freshness information counts as stale (§4.2.1).
            return value
                .and_then(delta_seconds)
                .is_none_or(|lifetime| lifetime <= age);
        }
    }
    let mut expires = headers.get_all(header::EXPIRES).iter();
    let Some(value) = expires.next() else {
        return false;
    };
    let date = |v: &HeaderValue| httpdate::parse_http_date(v.to_str().ok()?).ok();
    match (date(value), expires.next()) {
        (Some(expires), None) => {
            let now = headers.get(header::DATE).and_then(date);
            let now = now.unwrap_or_else(std::time::SystemTime::now);
            expires
                .duration_since(now)
                .map_or(true, |lifetime| lifetime.as_secs() <= age)
        }
        // Unreadable, or several: in the past (§5.3).
        _ => true,
    }
}

/// The first `Cache-Control` directive `name`: `Some(None)` when it has no value.
fn directive<'h>(headers: &'h HeaderMap, name: &str) -> Option<Option<&'h str>> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(split_directives)
        .find_map(|directive| {
            let (key, value) = match directive.split_once('=') {
                Some((key, value)) => (key, Some(value.trim())),
                None => (directive, None),
            };
            key.trim().eq_ignore_ascii_case(name).then_some(value)
        })
}

/// A delta-seconds value (§1.2.2): digits only (a quoted form accepted); one too large for
/// the clock is 2^31, as the RFC says. `None` if invalid.
fn delta_seconds(value: &str) -> Option<u64> {
    let value = value.trim_matches('"');
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse().unwrap_or(1 << 31))
}

fn starts_with_ignore_case(value: &[u8], prefix: &[u8]) -> bool {
    value.len() >= prefix.len() && value[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The header names listed by `Vary`; `*` or an unreadable entry means "anything".
fn vary_names(headers: &HeaderMap) -> Result<Vec<HeaderName>, Release> {
    let mut names: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::VARY) {
        let value = value.to_str().map_err(|_| Release::VaryAny)?;
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(Release::VaryAny);
            }
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| Release::VaryAny)?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// A leader's response, buffered, from which each waiter's response is rebuilt.
#[derive(Debug)]
pub(crate) struct SharedResponse {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    /// Response extensions are `Clone` in `http` 1; the leader's are copied to everybody so a
    /// waiter sees what it would have seen from its own call.
    pub(crate) extensions: Extensions,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
    /// For each header the response's `Vary` names, the leader's request values.
    pub(crate) vary: Vec<(HeaderName, Vec<HeaderValue>)>,
    /// The hop-by-hop fields among `headers`, left out of followers' copies (usually none).
    hop_by_hop: Vec<HeaderName>,
}

impl SharedResponse {
    /// Builds the shared response from the leader's parts, body and request headers.
    pub(crate) fn new(
        parts: Parts,
        vary: &[HeaderName],
        leader_request: &HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Self {
        let vary = vary
            .iter()
            .map(|name| {
                let values = leader_request.get_all(name).iter().cloned().collect();
                (name.clone(), values)
            })
            .collect();
        let mut headers = parts.headers;
        // The inner service's framing of its body, which the copies do not have: a rebuilt
        // body's length is known, and the server frames it itself. (Kept, it went out with a
        // `Content-Length` the server or axum added, and hyper refused the pair.) A
        // `Content-Length` beside it is the caller's to judge: see `flight`.
        headers.remove(header::TRANSFER_ENCODING);
        let hop_by_hop = hop_by_hop(parts.status, &headers, trailers.as_ref());
        SharedResponse {
            status: parts.status,
            version: parts.version,
            headers,
            extensions: parts.extensions,
            body,
            trailers,
            vary,
            hop_by_hop,
        }
    }

    /// Whether a request with `headers` would have varied from the leader's on a header the
    /// response's `Vary` names: same values, same order, or no match.
    pub(crate) fn vary_matches(&self, headers: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, leader)| headers.get_all(name).iter().eq(leader.iter()))
    }

    /// The response itself, for the last holder (a leader without followers): no copies.
    pub(crate) fn into_response<B: Body>(self) -> Response<CoalesceBody<B>> {
        let mut res = Response::new(CoalesceBody::full(self.body, self.trailers));
        *res.status_mut() = self.status;
        *res.version_mut() = self.version;
        *res.headers_mut() = self.headers;
        *res.extensions_mut() = self.extensions;
        res
    }

    /// A copy for a follower: without the hop-by-hop fields (RFC 9110 §7.6.1: `Connection`
    /// and the fields it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Upgrade`), which
    /// were about the leader's connection (`Connection: close` closes the leader's only).
    pub(crate) fn to_follower_response<B: Body>(&self) -> Response<CoalesceBody<B>> {
        let mut headers = self.headers.clone();
        let mut trailers = self.trailers.clone();
        for name in &self.hop_by_hop {
            headers.remove(name);
            if let Some(trailers) = &mut trailers {
                trailers.remove(name);
            }
        }
        if self.status == StatusCode::UPGRADE_REQUIRED && headers.contains_key(header::UPGRADE) {
            // Whoever sends `Upgrade` names it in `Connection` (RFC 9110 §7.8): that option
            // alone, the leader's others dropped.
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        self.copy(headers, trailers)
    }

    /// A fresh copy of the response for one waiter.
    pub(crate) fn to_response<B: Body>(&self) -> Response<CoalesceBody<B>> {
        self.copy(self.headers.clone(), self.trailers.clone())
    }

    /// A copy with these headers and trailers.
    fn copy<B: Body>(
        &self,
        headers: HeaderMap,
        trailers: Option<HeaderMap>,
    ) -> Response<CoalesceBody<B>> {
        let mut res = Response::new(CoalesceBody::full(self.body.clone(), trailers));
        *res.status_mut() = self.status;
        *res.version_mut() = self.version;
        *res.headers_mut() = headers;
        *res.extensions_mut() = self.extensions.clone();
        res
    }
}

/// Whether the body comes in a transfer coding besides `chunked` (RFC 9112 §6.1): a copy's
/// buffered body is framed by the server, which knows nothing of the other codings, so it
/// would go out still coded and unlabelled.
fn transfer_coded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked"))
}

/// The hop-by-hop fields present in `headers` (RFC 9110 §7.6.1): `Connection`, the fields it
/// names, `Keep-Alive`, `Proxy-Connection`, `TE` and `Upgrade`. Also those named only in the
/// trailers: the names, byte by byte, so that one element that is not text does not hide
/// the others. `Upgrade` stays on a `426`, which must name the protocols to upgrade to (RFC 9110 §15.5.22).
fn hop_by_hop(
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
) -> Vec<HeaderName> {
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok());
    let fixed = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::UPGRADE,
    ];
    let kept =
        |name: &HeaderName| status == StatusCode::UPGRADE_REQUIRED && name == header::UPGRADE;
    let present = |name: &HeaderName| {
        headers.contains_key(name) || trailers.is_some_and(|t| t.contains_key(name))
    };
    let mut found: Vec<HeaderName> = Vec::new();
    for name in fixed.into_iter().chain(named) {
        if present(&name) && !kept(&name) && !found.contains(&name) {
            found.push(name);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(res: http::response::Builder) -> Parts {
        res.body(()).unwrap().into_parts().0
    }

    fn ok() -> http::response::Builder {
        Response::builder().status(200)
    }

    #[test]
    fn plain_responses_of_a_heuristically_cacheable_status_are_shareable() {
        for status in [
            200, 203, 204, 300, 301, 304, 308, 404, 405, 410, 412, 414, 501,
        ] {
            assert_eq!(
                shareable(&parts(Response::builder().status(status))),
                Ok(vec![]),
                "{status}"
            );
        }
        let cc = ok().header("cache-control", "public, max-age=60");
        assert!(shareable(&parts(cc)).is_ok());
    }

    #[test]
    fn other_statuses_are_shared_only_with_explicit_freshness() {
        for status in [201, 302, 303, 307, 400, 401, 403, 429, 500, 502, 503, 504] {
            let plain = Response::builder().status(status);
            assert_eq!(shareable(&parts(plain)), Err(Release::Status), "{status}");
            for (name, value) in [
                ("cache-control", "max-age=5"),
                ("cache-control", "s-maxage=5"),
                ("cache-control", "public"),
                ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
            ] {
                let fresh = Response::builder().status(status).header(name, value);
                assert_eq!(shareable(&parts(fresh)), Ok(vec![]), "{status} {value}");
            }
            // A lifetime of zero is no freshness at all.
            let stale = Response::builder()
                .status(status)
                .header("cache-control", "max-age=0");
            assert_eq!(
                shareable(&parts(stale)),
                Err(Release::CacheControl),
                "{status}"
            );
        }
    }

    #[test]
    fn set_cookie_is_never_shared() {
        let res = ok().header("set-cookie", "session=abc");
        assert_eq!(shareable(&parts(res)), Err(Release::SetCookie));
    }

    #[test]
    fn private_no_store_no_cache_are_never_shared() {
        for cc in [
            "private",
            "no-store",
            "no-cache",
            "max-age=0, PRIVATE",
            "no-cache=\"set-cookie\"",
            "private=\"x\"",
        ] {
            let res = ok().header("cache-control", cc);
            assert_eq!(shareable(&parts(res)), Err(Release::CacheControl), "{cc}");
        }
        // Split over several lines.
        let res = ok()
            .header("cache-control", "max-age=5")
            .header("cache-control", "no-store");
        assert_eq!(shareable(&parts(res)), Err(Release::CacheControl));
        // Not visible ASCII: unreadable, so not shared.
        let res = ok().header(
            "cache-control",
            HeaderValue::from_bytes(b"public, \xff").unwrap(),
        );
        assert_eq!(shareable(&parts(res)), Err(Release::CacheControl));
    }

    #[test]
    fn vary_star_and_unreadable_vary_are_never_shared() {
        for vary in ["*", "accept, *", "not a header"] {
            let res = ok().header("vary", vary);
            assert_eq!(shareable(&parts(res)), Err(Release::VaryAny), "{vary}");
        }
    }

    #[test]
    fn vary_names_are_collected() {
        let res = ok()
            .header("vary", "Accept-Encoding, X-Theme")
            .header("vary", "accept-encoding");
        let names = shareable(&parts(res)).unwrap();
        assert_eq!(
            names,
            vec![
                HeaderName::from_static("accept-encoding"),
                HeaderName::from_static("x-theme")
            ]
        );
    }

    #[test]
    fn event_streams_and_protocol_switches_are_not_shared() {
        let res = ok().header("content-type", "Text/Event-Stream; charset=utf-8");
        assert_eq!(shareable(&parts(res)), Err(Release::Stream));
        assert_eq!(
            shareable(&parts(Response::builder().status(101))),
            Err(Release::Stream)
        );
    }

    #[test]
    fn vary_matches_compares_named_request_headers() {
        let res = parts(ok().header("vary", "x-theme"));
        let names = shareable(&res).unwrap();
        let mut leader = HeaderMap::new();
        leader.insert("x-theme", "dark".parse().unwrap());
        leader.insert("x-other", "1".parse().unwrap());
        let shared = SharedResponse::new(res, &names, &leader, Bytes::new(), None);

        let mut follower = HeaderMap::new();
        assert!(
            !shared.vary_matches(&follower),
            "absent differs from present"
        );
        follower.insert("x-theme", "light".parse().unwrap());
        assert!(!shared.vary_matches(&follower));
        follower.insert("x-theme", "dark".parse().unwrap());
        assert!(
            shared.vary_matches(&follower),
            "headers outside Vary do not matter"
        );
        follower.append("x-theme", "dark".parse().unwrap());
        assert!(!shared.vary_matches(&follower), "an extra value differs");

        // A Vary-named header the leader did not send must be absent for the follower too.
        let res = parts(ok().header("vary", "x-absent"));
        let names = shareable(&res).unwrap();
        let shared = SharedResponse::new(res, &names, &HeaderMap::new(), Bytes::new(), None);
        assert!(shared.vary_matches(&HeaderMap::new()));
        let mut with = HeaderMap::new();
        with.insert("x-absent", "1".parse().unwrap());
        assert!(!shared.vary_matches(&with));
    }

    #[test]
    fn rebuilt_responses_copy_everything() {
        #[derive(Clone, Debug, PartialEq)]
        struct Tag(u8);
        let mut res = parts(
            ok().status(203)
                .version(Version::HTTP_10)
                .header("x-a", "1"),
        );
        res.extensions.insert(Tag(7));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", "2".parse().unwrap());
        let shared = SharedResponse::new(
            res,
            &[],
            &HeaderMap::new(),
            Bytes::from_static(b"body"),
            Some(trailers),
        );
        let copy = shared.to_response::<http_body_util::Empty<Bytes>>();
        assert_eq!(copy.status(), 203);
        assert_eq!(copy.version(), Version::HTTP_10);
        assert_eq!(copy.headers()["x-a"], "1");
        assert_eq!(copy.extensions().get::<Tag>(), Some(&Tag(7)));
        assert!(copy.body().is_buffered());
        // Trailers: inexact, so that an HTTP/1.1 server sends the body chunked, with them.
        assert_eq!(copy.body().size_hint().exact(), None);
        assert_eq!(copy.body().size_hint().lower(), 4);
        let last = shared.into_response::<http_body_util::Empty<Bytes>>();
        assert_eq!(last.status(), copy.status());
        assert_eq!(last.headers(), copy.headers());
        assert_eq!(last.extensions().get::<Tag>(), Some(&Tag(7)));
        assert_eq!(last.body().size_hint().exact(), None);
    }

    #[test]
    fn copies_drop_framing_and_followers_copies_drop_hop_by_hop_fields() {
        let res = ok()
            .header("transfer-encoding", "chunked")
            .header("connection", "close, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("upgrade", "websocket")
            .header("te", "trailers")
            .header("x-kept", "2");
        let shared = SharedResponse::new(
            parts(res),
            &[],
            &HeaderMap::new(),
            Bytes::from_static(b"body"),
            None,
        );
        let leader = shared.to_response::<http_body_util::Empty<Bytes>>();
        assert!(!leader.headers().contains_key("transfer-encoding"));
        assert_eq!(leader.headers()["connection"], "close, x-hop");
        assert_eq!(leader.headers()["x-hop"], "1");
        assert_eq!(leader.body().size_hint().exact(), Some(4));
        let follower = shared.to_follower_response::<http_body_util::Empty<Bytes>>();
        for name in [
            "transfer-encoding",
            "connection",
            "x-hop",
            "keep-alive",
            "upgrade",
            "te",
        ] {
            assert!(!follower.headers().contains_key(name), "{name}");
        }
        assert_eq!(follower.headers()["x-kept"], "2");
    }
}
