//! Hostile input for the HTTP adapter, through its public API only: property tests (proptest)
//! of the key and shareability rules.
//!
//! Each case sends a few concurrent requests through one [`CoalesceHttpService`]: a generated
//! request and variants of it (header names in another case, duplicated and comma-joined
//! values, odd `Cache-Control`, `Pragma`, `Connection`, `Content-Length` and `Range` headers,
//! invalid UTF-8 values, hundreds of junk headers, credentials, identities, bodies). The
//! backend answers with generated response headers (odd `Cache-Control` and `Vary` syntax,
//! `Set-Cookie`, event streams, bytes that are not UTF-8, bodies around the size limit) and
//! records every request it gets, so each response can be traced to the request it was made
//! for.
//!
//! Properties, for every waiter:
//! - nothing panics and nothing hangs (each case is bounded by a timeout);
//! - a waiter that called the backend itself (bypass, leader, released follower) got its own
//!   request there, untouched, and its own response whole;
//! - a follower got a copy of a response made for a request equal to its own in everything
//!   the key covers (method, URI, key and conditional and authority headers, identity) and in
//!   every header the response's `Vary` names, and that response was one a shared cache may
//!   store (no `Set-Cookie`, no `private`/`no-store`/`no-cache`, no `Vary: *`, readable,
//!   within the size limit, and of a heuristically cacheable status unless explicitly fresh:
//!   RFC 9111 §3) — never a shared response to the wrong key;
//! - a request the rules exclude (unsafe method, body, credentials without an identity,
//!   `Range`, `Upgrade`, `no-cache`/`no-store`, unreadable directive headers) bypasses;
//! - two requests that differ only in header-name case, or not at all, share a clean response
//!   of a heuristically cacheable status; with any other status (`500`, `503`, `302`), and no
//!   explicit freshness, each makes its own call.
//!
//! `src/http/` has unit-level proptests of the key's equality and of body buffering; these
//! complement them end to end.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::{service_fn, Layer, Service};
use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

/// The identity a (pretend) authentication layer put on the request.
#[derive(Clone, Debug, PartialEq)]
struct Uid(Vec<u8>);

/// Every request header that the key covers, by default.
const KEYED: [&str; 12] = [
    "accept",
    "accept-encoding",
    "accept-language",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "host",
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
];

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Header names that go into the key, or do not matter to it.
const PLAIN_NAMES: [&str; 10] = [
    "accept",
    "Accept-Encoding",
    "ACCEPT-LANGUAGE",
    "If-None-Match",
    "if-modified-since",
    "host",
    "X-Forwarded-Host",
    "forwarded",
    "x-theme",
    "user-agent",
];

/// Header names that can make a request bypass, depending on their values.
const RULE_NAMES: [&str; 10] = [
    "cache-control",
    "Pragma",
    "connection",
    "upgrade",
    "range",
    "content-length",
    "transfer-encoding",
    "authorization",
    "Cookie",
    "proxy-authorization",
];

/// Values, many of them malformed on purpose.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "", " ", "a", "A", "a, b", "a,b", "b, a", "gzip", "GZIP", "gzip;q=0.5, br",
            "no-cache", "No-Cache", "NO-STORE", " no-cache ", "max-age=0", "max-age=0, no-store",
            "no-cache=\"set-cookie\"", "private", ",,,", "=", "no-cache=", "x=\"a,no-cache\"",
            "upgrade", "keep-alive, Upgrade", "keep-alive", "websocket", "bytes=0-1", "0", "00",
            "5", "-1", "abc", "0, 0", "chunked", "\"v1\"", "W/\"v1\"", "*", "example.test",
            "evil.test", "dark", "light", "Bearer alice", "sid=1",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        // Arbitrary bytes that a header value can hold: visible ASCII, space, tab and
        // obs-text (0x80..=0xff, not UTF-8 on its own).
        1 => prop::collection::vec(
            prop_oneof![0x20u8..0x7f, Just(b'\t'), 0x80u8..=0xff],
            0..24
        ),
    ]
}

fn recase(name: &str, upper: &[bool]) -> String {
    name.chars()
        .zip(upper.iter().cycle())
        .map(|(c, up)| {
            if *up {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// A request, before it is built: generated once, then varied.
#[derive(Clone, Debug)]
struct Spec {
    method: Method,
    uri: String,
    /// (name as written, value bytes), in order.
    headers: Vec<(String, Vec<u8>)>,
    identity: Option<Vec<u8>>,
    body: Vec<u8>,
}

impl Spec {
    fn build(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from(self.body.clone())));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.parse().expect("generated URIs are valid");
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("generated names");
            let value = HeaderValue::from_bytes(value).expect("generated values");
            req.headers_mut().append(name, value);
        }
        if let Some(id) = &self.identity {
            req.extensions_mut().insert(Uid(id.clone()));
        }
        req
    }
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        6 => Just(Method::GET),
        2 => Just(Method::HEAD),
        1 => prop::sample::select(vec![
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
            Method::CONNECT,
            Method::from_bytes(b"PURGE").unwrap(),
        ]),
    ]
}

fn uri() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "/a",
        "/a?",
        "/a?x=1",
        "/a?x=1&x=1",
        "/A",
        "/a/../a",
        "/%61",
        "http://one.test/a",
        "https://one.test/a",
        "http://two.test/a",
        "*",
    ])
    .prop_map(str::to_owned)
}

fn header() -> impl Strategy<Value = (String, Vec<u8>)> {
    let name = prop_oneof![
        4 => prop::sample::select(PLAIN_NAMES.to_vec()),
        1 => prop::sample::select(RULE_NAMES.to_vec()),
    ];
    (name, prop::collection::vec(any::<bool>(), 1..4), value())
        .prop_map(|(name, upper, value)| (recase(name, &upper), value))
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        method(),
        uri(),
        prop::collection::vec(header(), 0..6),
        // Hundreds of junk headers, now and then.
        prop_oneof![4 => Just(0usize), 1 => 100usize..400],
        prop::option::weighted(
            0.3,
            prop::sample::select(vec![b"alice".to_vec(), b"bob".to_vec(), vec![0xff, 0]]),
        ),
        prop_oneof![9 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..8)],
    )
        .prop_map(|(method, uri, mut headers, junk, identity, body)| {
            for i in 0..junk {
                headers.push((format!("x-junk-{}", i % 50), format!("{i}").into_bytes()));
            }
            Spec {
                method,
                uri,
                headers,
                identity,
                body,
            }
        })
}

/// How a variant differs from the request it is made from.
#[derive(Clone, Debug)]
enum Change {
    /// Same request: must share a clean response.
    Same,
    /// Header names written in another case: the same request to HTTP.
    Recase(Vec<bool>),
    /// One more header.
    Add(String, Vec<u8>),
    /// One header dropped.
    Remove(usize),
    /// The first value of a header repeated (a duplicate line).
    Duplicate(usize),
    /// Two lines of one header joined with a comma.
    Join,
    Identity(Option<Vec<u8>>),
    Method(Method),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => Just(Change::Same),
        3 => prop::collection::vec(any::<bool>(), 1..5).prop_map(Change::Recase),
        2 => header().prop_map(|(n, v)| Change::Add(n, v)),
        1 => (0usize..8).prop_map(Change::Remove),
        1 => (0usize..8).prop_map(Change::Duplicate),
        1 => Just(Change::Join),
        1 => prop::option::of(prop::sample::select(vec![b"alice".to_vec(), b"bob".to_vec()]))
            .prop_map(Change::Identity),
        1 => method().prop_map(Change::Method),
    ]
}

fn apply(base: &Spec, change: &Change) -> Spec {
    let mut s = base.clone();
    match change {
        Change::Same => {}
        Change::Recase(upper) => {
            for (name, _) in &mut s.headers {
                *name = recase(name, upper);
            }
        }
        Change::Add(n, v) => s.headers.push((n.clone(), v.clone())),
        Change::Remove(i) => {
            if !s.headers.is_empty() {
                let i = i % s.headers.len();
                s.headers.remove(i);
            }
        }
        Change::Duplicate(i) => {
            if !s.headers.is_empty() {
                let h = s.headers[i % s.headers.len()].clone();
                s.headers.push(h);
            }
        }
        Change::Join => {
            // The first header with two lines gets them as one comma-joined line.
            let lower = |n: &str| n.to_ascii_lowercase();
            let pair = (0..s.headers.len()).find_map(|i| {
                (i + 1..s.headers.len())
                    .find(|&j| lower(&s.headers[j].0) == lower(&s.headers[i].0))
                    .map(|j| (i, j))
            });
            if let Some((i, j)) = pair {
                let (_, second) = s.headers.remove(j);
                let first = &mut s.headers[i].1;
                first.extend_from_slice(b", ");
                first.extend_from_slice(&second);
            }
        }
        Change::Identity(id) => s.identity = id.clone(),
        Change::Method(m) => s.method = m.clone(),
    }
    s
}

/// What the backend answers, for every call of the case.
#[derive(Clone, Debug)]
struct Answer {
    status: StatusCode,
    headers: Vec<(&'static str, Vec<u8>)>,
    /// Body padding after the call's tag.
    padding: usize,
}

fn answer() -> impl Strategy<Value = Answer> {
    let names = prop::sample::select(vec![
        "cache-control",
        "Cache-Control",
        "vary",
        "VARY",
        "set-cookie",
        "content-type",
        "expires",
        "x-other",
    ]);
    let values = prop_oneof![
        4 => prop::sample::select(vec![
            "", "public", "max-age=60", "PRIVATE", " private ", "private=\"x\"", "no-store",
            "No-Cache", "no-cache=\"set-cookie\"", "max-age=0,private", "x=\"private\"",
            "public, max-age=0", "*", "accept, *", " * ", "x-theme", "X-Theme, accept",
            "accept,,accept-language", ",", "not a header", "accept-encoding",
            "text/event-stream", "TEXT/EVENT-STREAM; charset=utf-8", "text/plain",
            "session=1", "x-theme, user-agent",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff], 0..16),
    ];
    // An `Expires` is mostly a date (in the future: explicit freshness; in the past: stale).
    let dates = prop::sample::select(vec![
        "Thu, 01 Jan 2099 00:00:00 GMT",
        "Thu, 01 Jan 2099 00:00:00 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
    ]);
    (
        prop::sample::select(vec![200u16, 203, 204, 304, 404, 412, 500, 503, 302, 101]),
        prop_oneof![1 => Just(Vec::new()), 2 => prop::collection::vec(
            (names, values, dates, any::<bool>()).prop_map(|(n, v, date, odd)| {
                // Header names are case-insensitive; `http` stores them lower case.
                let n: &'static str = match n {
                    "Cache-Control" => "cache-control",
                    "VARY" => "vary",
                    other => other,
                };
                let v = if n == "expires" && !odd { date.as_bytes().to_vec() } else { v };
                (n, v)
            }),
            1..4,
        )],
        prop_oneof![Just(0usize), 0usize..200],
    )
        .prop_map(|(status, headers, padding)| Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            padding,
        })
}

// ---------------------------------------------------------------------------------------------
// The case
// ---------------------------------------------------------------------------------------------

/// A request as the backend received it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    identity: Option<Vec<u8>>,
    body: Bytes,
}

/// The exact body the backend sends for call `id` (nothing for `HEAD`).
fn body_of(id: usize, method: &Method, padding: usize) -> Bytes {
    if method == Method::HEAD {
        return Bytes::new();
    }
    let mut b = format!("call={id};").into_bytes();
    b.resize(b.len() + padding, b'.');
    b.into()
}

struct Outcome {
    served_by: ServedBy,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Sends every request of `specs` through one service at once (all registered before any is
/// polled), and returns what each got, with the requests the backend saw.
fn run_case(
    specs: &[Spec],
    answer: &Answer,
    with_identity: bool,
    limit: usize,
) -> Result<(Vec<Outcome>, Vec<Seen>), TestCaseError> {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = Arc::clone(&seen);
    let answer_for_backend = answer.clone();
    let backend = service_fn(move |req: Request<Full<Bytes>>| {
        let record = Arc::clone(&record);
        let answer = answer_for_backend.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.expect("infallible").to_bytes();
            let id = {
                let mut record = record.lock().unwrap();
                record.push(Seen {
                    method: parts.method.clone(),
                    uri: parts.uri.clone(),
                    headers: parts.headers.clone(),
                    identity: parts.extensions.get::<Uid>().map(|u| u.0.clone()),
                    body,
                });
                record.len() - 1
            };
            let mut res = Response::new(Full::new(body_of(id, &parts.method, answer.padding)));
            *res.status_mut() = answer.status;
            for (name, value) in &answer.headers {
                res.headers_mut().append(
                    HeaderName::from_static(name),
                    HeaderValue::from_bytes(value).expect("generated values"),
                );
            }
            res.headers_mut()
                .insert("x-call", HeaderValue::from(id as u64));
            Ok::<_, Infallible>(res)
        }
    });
    let mut layer = CoalesceHttpLayer::new().max_body_bytes(limit);
    if with_identity {
        layer = layer.identity(|parts: &http::request::Parts| {
            parts.extensions.get::<Uid>().map(|u| u.0.clone())
        });
    }
    let mut svc = layer.layer(backend);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let outcomes = runtime.block_on(async {
        let futures: Vec<_> = specs.iter().map(|s| svc.call(s.build())).collect();
        let all = async {
            let mut outcomes = Vec::new();
            for res in futures::future::join_all(futures).await {
                let res = res.expect("infallible");
                let served_by = *res
                    .extensions()
                    .get::<ServedBy>()
                    .expect("every response says how it was served");
                let (parts, body) = res.into_parts();
                let body = body.collect().await.expect("infallible").to_bytes();
                outcomes.push(Outcome {
                    served_by,
                    status: parts.status,
                    headers: parts.headers,
                    body,
                });
            }
            outcomes
        };
        tokio::time::timeout(Duration::from_secs(10), all).await
    });
    let outcomes = outcomes.map_err(|_| TestCaseError::fail("a waiter hung"))?;
    prop_assert_eq!(svc.in_flight(), 0, "flights left after the case");
    prop_assert_eq!(svc.waiting(), 0, "followers left waiting");
    let seen = seen.lock().unwrap().clone();
    Ok((outcomes, seen))
}

// ---------------------------------------------------------------------------------------------
// The oracle: conditions that must hold, written independently of the implementation
// ---------------------------------------------------------------------------------------------

/// Whether a comma-separated directive header has one of `wanted` (before any `=`), ignoring
/// case and spaces. An unreadable value answers `true`: when unsure, do not share.
fn has_directive(headers: &HeaderMap, name: &str, wanted: &[&str]) -> bool {
    headers.get_all(name).iter().any(|v| match v.to_str() {
        Err(_) => true,
        Ok(v) => v.split(',').any(|d| {
            let d = d.split('=').next().unwrap_or("").trim();
            wanted.iter().any(|w| d.eq_ignore_ascii_case(w))
        }),
    })
}

fn credentials(h: &HeaderMap) -> bool {
    ["authorization", "cookie", "proxy-authorization"]
        .iter()
        .any(|n| h.contains_key(*n))
}

/// Why a request must bypass, if it must.
fn must_bypass(req: &Seen, with_identity: bool) -> Option<&'static str> {
    let h = &req.headers;
    if req.method != Method::GET && req.method != Method::HEAD {
        return Some("method");
    }
    if h.contains_key("range") {
        return Some("range");
    }
    if h.contains_key("upgrade") || has_directive(h, "connection", &["upgrade"]) {
        return Some("upgrade");
    }
    if has_directive(h, "cache-control", &["no-cache", "no-store"])
        || has_directive(h, "pragma", &["no-cache"])
    {
        return Some("no-cache");
    }
    let positive_length = h.get_all("content-length").iter().any(|v| {
        v.to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    });
    if positive_length || h.contains_key("transfer-encoding") || !req.body.is_empty() {
        return Some("body");
    }
    if credentials(h) && !(with_identity && req.identity.is_some()) {
        return Some("credentials");
    }
    None
}

/// Why a response must not be handed to a follower, if it must not.
fn must_not_share(res: &Outcome) -> Option<&'static str> {
    let h = &res.headers;
    if res.status == StatusCode::SWITCHING_PROTOCOLS {
        return Some("101");
    }
    if h.contains_key("set-cookie") {
        return Some("set-cookie");
    }
    if has_directive(h, "cache-control", &["private", "no-store", "no-cache"]) {
        return Some("cache-control");
    }
    let event_stream = h.get_all("content-type").iter().any(|v| {
        v.as_bytes()
            .to_ascii_lowercase()
            .starts_with(b"text/event-stream")
    });
    if event_stream {
        return Some("event stream");
    }
    if !reusable_status(res.status) && !explicitly_fresh(h) {
        return Some("status");
    }
    for v in h.get_all("vary") {
        let Ok(v) = v.to_str() else {
            return Some("unreadable vary");
        };
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" || HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Some("vary *");
            }
        }
    }
    None
}

/// Whether a cache may reuse a response of this status with no explicit freshness: the
/// heuristically cacheable statuses (RFC 9110 §15.1), and `304`/`412`, the answers to the
/// conditional headers the key holds.
fn reusable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 304 | 308 | 404 | 405 | 410 | 412 | 414 | 501
    )
}

/// Whether the response has explicit freshness or says any cache may store it (RFC 9111 §3):
/// `Expires`, or a readable `Cache-Control` with `public`, `max-age` or `s-maxage`. (A zero or
/// invalid lifetime is not shared either, but this oracle only needs the ones that may be.)
fn explicitly_fresh(headers: &HeaderMap) -> bool {
    headers.contains_key("expires")
        || headers
            .get_all("cache-control")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.split('=').next().unwrap_or("").trim())
            .any(|d| {
                ["public", "max-age", "s-maxage"]
                    .iter()
                    .any(|w| d.eq_ignore_ascii_case(w))
            })
}

/// The names a response's `Vary` lists (only called for shareable responses).
fn vary_names(res: &Outcome) -> Vec<HeaderName> {
    res.headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect()
}

fn values<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
    h.get_all(name).iter().map(HeaderValue::as_bytes).collect()
}

fn same_request(a: &Seen, b: &Seen) -> bool {
    a.method == b.method
        && a.uri == b.uri
        && a.headers == b.headers
        && a.identity == b.identity
        && a.body == b.body
}

fn as_seen(spec: &Spec) -> Seen {
    let (parts, _) = spec.build().into_parts();
    Seen {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        identity: spec.identity.clone(),
        body: Bytes::from(spec.body.clone()),
    }
}

fn call_id(res: &Outcome) -> Option<usize> {
    res.headers.get("x-call")?.to_str().ok()?.parse().ok()
}

fn check_case(
    specs: &[Spec],
    answer: &Answer,
    with_identity: bool,
    limit: usize,
) -> Result<(), TestCaseError> {
    let (outcomes, seen) = run_case(specs, answer, with_identity, limit)?;
    prop_assert_eq!(outcomes.len(), specs.len());
    for (spec, res) in specs.iter().zip(&outcomes) {
        let mine = as_seen(spec);
        let id = call_id(res);
        prop_assert!(id.is_some(), "a response the backend did not make");
        let id = id.unwrap();
        prop_assert!(id < seen.len());
        let made_for = &seen[id];
        let expected_body = body_of(id, &made_for.method, answer.padding);
        prop_assert_eq!(
            &res.body,
            &expected_body,
            "the body must be the call's, whole ({:?})",
            res.served_by
        );
        prop_assert_eq!(res.status, answer.status);
        match res.served_by {
            ServedBy::Bypass | ServedBy::Leader | ServedBy::Released => {
                // Its own call: its own request reached the backend untouched.
                prop_assert!(
                    same_request(made_for, &mine),
                    "{:?} got a response made for another request:\n{:?}\nvs\n{:?}",
                    res.served_by,
                    made_for,
                    mine
                );
            }
            ServedBy::Follower => {
                let shareable = must_not_share(res);
                prop_assert!(
                    shareable.is_none(),
                    "a follower got a response that must not be shared ({:?})",
                    shareable
                );
                prop_assert!(
                    res.body.len() <= limit,
                    "a follower got a body over the limit"
                );
                prop_assert_eq!(&made_for.method, &mine.method);
                prop_assert_eq!(&made_for.uri, &mine.uri);
                for name in KEYED {
                    prop_assert_eq!(
                        values(&made_for.headers, name),
                        values(&mine.headers, name),
                        "key header {} differs",
                        name
                    );
                }
                if with_identity {
                    prop_assert_eq!(&made_for.identity, &mine.identity, "identity differs");
                }
                // Credentials never ride on another request's response without an identity.
                prop_assert!(
                    !credentials(&mine.headers) || (with_identity && mine.identity.is_some())
                );
                for name in vary_names(res) {
                    prop_assert_eq!(
                        values(&made_for.headers, name.as_str()),
                        values(&mine.headers, name.as_str()),
                        "Vary-named header {} differs",
                        name
                    );
                }
            }
            other => prop_assert!(false, "unknown ServedBy {:?}", other),
        }
        if let Some(why) = must_bypass(&mine, with_identity) {
            prop_assert_eq!(
                res.served_by,
                ServedBy::Bypass,
                "a request that must bypass ({}) was coalesced",
                why
            );
        }
    }
    // A request sent twice (or with its header names in another case) shares a clean answer
    // of a heuristically cacheable status; of any other status (no headers: no explicit
    // freshness), each makes its own call.
    let clean = answer.headers.is_empty()
        && answer.status != StatusCode::SWITCHING_PROTOCOLS
        && answer.padding + 16 < limit;
    if clean && outcomes[0].served_by == ServedBy::Leader {
        let (expected, what) = if reusable_status(answer.status) {
            (ServedBy::Follower, "did not share a clean response")
        } else {
            (
                ServedBy::Released,
                "was not released from an unreusable status",
            )
        };
        for (spec, res) in specs.iter().zip(&outcomes).skip(1) {
            if same_request(&as_seen(spec), &as_seen(&specs[0])) {
                prop_assert_eq!(
                    res.served_by,
                    expected,
                    "an identical request {} ({})",
                    what,
                    answer.status
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if cfg!(debug_assertions) { 2048 } else { 16384 },
        ..ProptestConfig::default()
    })]

    /// A generated request and up to three variants of it, at once, with and without an
    /// identity, around the body limit.
    #[test]
    fn hostile_requests_and_responses_never_share_across_keys(
        base in spec(),
        changes in prop::collection::vec(change(), 1..4),
        answer in answer(),
        with_identity in any::<bool>(),
        limit in prop_oneof![Just(64usize), Just(4096usize)],
    ) {
        let mut specs = vec![base.clone()];
        specs.extend(changes.iter().map(|c| apply(&base, c)));
        check_case(&specs, &answer, with_identity, limit)?;
    }

    /// Unrelated requests (each generated on its own) at once: whatever they collide on, a
    /// follower's response was made for an equally keyed request.
    #[test]
    fn unrelated_hostile_requests_never_share_across_keys(
        specs in prop::collection::vec(spec(), 2..5),
        answer in answer(),
        with_identity in any::<bool>(),
    ) {
        check_case(&specs, &answer, with_identity, 4096)?;
    }
}
