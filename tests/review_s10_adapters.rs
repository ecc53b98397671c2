#![cfg(all(feature = "http", feature = "grpc"))]
//! Review (session 10, adapters): black-box tests of the HTTP and gRPC layers through the
//! public API only, in process (tower `service_fn` backends) and over real servers on
//! 127.0.0.1:0 (`axum::serve` with hyper clients, one connection each; a tonic server with
//! tonic clients, one channel each).
//!
//! Found (ignored tests, `BUG:`): the `Cache-Control` reader used for both the request rules
//! and the response rules is lenient in the sharing direction. A malformed field (a quoted
//! string that never ends, a stray `"` inside a token, a missing comma, a `;` instead of a
//! comma, a quoted directive name) hides the `private` / `no-store` / `no-cache` in it, so a
//! personal response is handed to followers and a request that asked for a fresh answer
//! joins a flight (`x=", max-age=0` also hides a zero lifetime). The gRPC layer's reader of a
//! call's `cache-control` misses a quoted `"no-cache"` the same way. Issue 6 requires that
//! malformed input "yields a bypass or a clear error, never a shared response", and the
//! layer's own rule (`has_directive`) is "when unsure, do not share".
//!
//! No sleep decides anything: handlers wait on a gate (a `watch` channel) that a test opens
//! once the layer's gauges (`waiting()`, `in_flight()`) and the backend's call counter say
//! every request is where it should be. Timeouts are hang guards only.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::Stream;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::Status;
use tower::{service_fn, Layer, ServiceExt};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/catalog.v1.rs");
}

use pb::catalog_client::CatalogClient;
use pb::catalog_server::{Catalog, CatalogServer};
use pb::{GetItemRequest, Item};

const GET_ITEM: &str = "/catalog.v1.Catalog/GetItem";

// ---------------------------------------------------------------------------------------------
// Bounded waits (hang guards only: nothing passes because of a timeout)
// ---------------------------------------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(30);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("hangs: {what}"))
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// A gated backend whose calls are counted
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Gate {
    calls: Arc<AtomicUsize>,
    open: Arc<watch::Sender<bool>>,
    /// Calls numbered below this wait for the gate; later ones go straight through.
    held: usize,
}

impl Gate {
    fn new() -> Gate {
        Gate::holding(usize::MAX)
    }

    fn holding(held: usize) -> Gate {
        Gate {
            calls: Arc::default(),
            open: Arc::new(watch::channel(false).0),
            held,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    /// Counts the call, waits for the gate if it is held, returns its number (from 0).
    async fn enter(&self) -> usize {
        let n = self.calls.fetch_add(1, SeqCst);
        if n < self.held {
            let mut rx = self.open.subscribe();
            rx.wait_for(|open| *open).await.expect("gate sender lives");
        }
        n
    }
}

// ---------------------------------------------------------------------------------------------
// In-process HTTP harness
// ---------------------------------------------------------------------------------------------

type Req = Request<Full<Bytes>>;
type Body = BoxBody<Bytes, io::Error>;
type Inner = tower::util::BoxCloneService<Req, Response<Body>, Infallible>;

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn frames(frames: Vec<Result<Frame<Bytes>, io::Error>>) -> Body {
    BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
}

fn request(method: Method, uri: &str, pairs: &[(&str, &str)]) -> Req {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in pairs {
        b = b.header(*k, *v);
    }
    b.body(Full::default()).unwrap()
}

fn get_req(uri: &str, pairs: &[(&str, &str)]) -> Req {
    request(Method::GET, uri, pairs)
}

/// A `200` tagged with the call's number, with `pairs` as headers.
fn tagged(n: usize, pairs: &[(&str, &str)]) -> Response<Body> {
    let mut b = Response::builder().status(200);
    for (k, v) in pairs {
        b = b.header(*k, *v);
    }
    b.body(full(format!("call {n}"))).unwrap()
}

/// A backend answering call `n` of request `req` with `answer(n, req)`, after the gate.
fn backend(
    gate: &Gate,
    answer: impl Fn(usize, &Req) -> Response<Body> + Send + Sync + 'static,
) -> Inner {
    let gate = gate.clone();
    let answer = Arc::new(answer);
    Inner::new(service_fn(move |req: Req| {
        let gate = gate.clone();
        let answer = answer.clone();
        async move {
            let n = gate.enter().await;
            Ok::<_, Infallible>(answer(n, &req))
        }
    }))
}

/// What a caller got.
#[derive(Debug)]
struct Got {
    by: ServedBy,
    status: StatusCode,
    headers: HeaderMap,
    body: Result<Bytes, String>,
}

impl Got {
    fn text(&self) -> &str {
        std::str::from_utf8(self.body.as_ref().expect("a whole body")).unwrap()
    }
}

/// Sends `reqs` at once through `layer` over `inner` (spawned in order, so the first one
/// leads); opens `gate` once `followers` requests wait as followers and `calls` calls reached
/// the backend; returns what each caller got, in order.
async fn burst(
    layer: &CoalesceHttpLayer,
    gate: &Gate,
    inner: Inner,
    reqs: Vec<Req>,
    followers: usize,
    calls: usize,
) -> Vec<Got> {
    let svc = layer.layer(inner);
    let mut tasks = Vec::new();
    for req in reqs {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(req).await.unwrap();
            let by = *res.extensions().get::<ServedBy>().expect("ServedBy is set");
            let (parts, body) = res.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| e.to_string());
            Got {
                by,
                status: parts.status,
                headers: parts.headers,
                body,
            }
        }));
    }
    until("every request in place", || {
        layer.waiting() == followers && gate.calls() == calls
    })
    .await;
    gate.open();
    let mut out = Vec::new();
    for t in tasks {
        out.push(bounded("a caller", t).await.expect("caller task"));
    }
    out
}

fn roles(got: &[Got]) -> Vec<ServedBy> {
    got.iter().map(|g| g.by).collect()
}

/// Two identical GETs of `/me`; the backend answers each call with `cache-control: cc`.
async fn two_gets_answered_with_cache_control(cc: &'static str) -> (Vec<Got>, usize) {
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new();
    let inner = backend(&gate, move |n, _| tagged(n, &[("cache-control", cc)]));
    let reqs = vec![get_req("/me", &[]), get_req("/me", &[])];
    let got = burst(&layer, &gate, inner, reqs, 1, 1).await;
    (got, gate.calls())
}

// ---------------------------------------------------------------------------------------------
// BUGS: malformed Cache-Control hides private / no-store / no-cache
// ---------------------------------------------------------------------------------------------

/// A quoted string that never ends, a stray `"` inside a token, or an escaped quote that
/// leaves the string open: the reader treats the rest of the field as quoted and never sees
/// the `private` / `no-store` after it, so the leader's personal response goes to the
/// follower. Issue 6: malformed input "never a shared response".
#[tokio::test]

async fn http_response_cache_control_with_an_unbalanced_quote_is_never_shared() {
    for cc in [
        "max-age=60, x=\"unterminated, private",
        "a\"b, private",
        "ext=\"a\\\", no-store",
        // Hides a zero lifetime: stale on arrival, never to be reused unvalidated.
        "x=\", max-age=0",
    ] {
        let (got, calls) = two_gets_answered_with_cache_control(cc).await;
        assert_eq!(
            roles(&got),
            [ServedBy::Leader, ServedBy::Released],
            "cache-control: {cc}"
        );
        assert_eq!(got[1].text(), "call 1", "cache-control: {cc}");
        assert_eq!(calls, 2, "cache-control: {cc}");
    }
}

/// Directives run together without a comma (`private max-age=60`), separated by `;`, or a
/// quoted directive name: none is valid `Cache-Control` syntax; every reader that looks for
/// the word (nginx's, for one) finds `private` in them. The layer shares the response.
#[tokio::test]
async fn http_response_cache_control_with_malformed_tokens_is_never_shared() {
    for cc in ["private max-age=60", "private;x=1", "\"private\""] {
        let (got, calls) = two_gets_answered_with_cache_control(cc).await;
        assert_eq!(
            roles(&got),
            [ServedBy::Leader, ServedBy::Released],
            "cache-control: {cc}"
        );
        assert_eq!(got[1].text(), "call 1", "cache-control: {cc}");
        assert_eq!(calls, 2, "cache-control: {cc}");
    }
}

/// The request side reads `Cache-Control` the same way: a follower whose malformed field
/// asks for `no-cache` / `no-store` joins the flight and gets a shared answer instead of
/// bypassing.
#[tokio::test]

async fn http_request_cache_control_with_a_malformed_no_cache_bypasses() {
    for cc in ["x=\", no-cache", "a\"b, no-store", "\"no-cache\""] {
        let gate = Gate::new();
        let layer = CoalesceHttpLayer::new();
        let inner = backend(&gate, |n, _| tagged(n, &[]));
        let svc = layer.layer(inner);
        let leader = tokio::spawn(svc.clone().oneshot(get_req("/a", &[])));
        until("leader in the backend", || gate.calls() == 1).await;
        let fresh = tokio::spawn(svc.oneshot(get_req("/a", &[("cache-control", cc)])));
        // Either it bypassed (a second backend call) or it joined (a follower).
        until("the second request placed", || {
            gate.calls() == 2 || layer.waiting() == 1
        })
        .await;
        let joined = layer.waiting() == 1;
        gate.open();
        let leader = bounded("leader", leader).await.unwrap().unwrap();
        let fresh = bounded("second", fresh).await.unwrap().unwrap();
        assert_eq!(
            leader.extensions().get::<ServedBy>(),
            Some(&ServedBy::Leader)
        );
        assert!(!joined, "cache-control: {cc}: joined the flight");
        assert_eq!(
            fresh.extensions().get::<ServedBy>(),
            Some(&ServedBy::Bypass),
            "cache-control: {cc}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Response rules that hold (pinned)
// ---------------------------------------------------------------------------------------------

/// `no-cache` / `private` with field names (RFC 9111 §5.2.2.4, §5.2.2.7), alone or beside a
/// quoted argument that contains a comma, and `Set-Cookie` next to `public`: never shared;
/// the follower makes its own call. A quoted `private` inside another directive's argument
/// is not a directive, and that response is shared.
#[tokio::test]
async fn http_qualified_private_and_no_cache_are_never_shared() {
    for cc in [
        "no-cache=\"set-cookie\"",
        "max-age=60, private=\"x-user\"",
        "ext=\"a, b\", NO-STORE",
        "public, max-age=60, no-cache=\"x-a, x-b\"",
    ] {
        let (got, calls) = two_gets_answered_with_cache_control(cc).await;
        assert_eq!(roles(&got), [ServedBy::Leader, ServedBy::Released], "{cc}");
        assert_eq!((got[0].text(), got[1].text()), ("call 0", "call 1"));
        assert_eq!(calls, 2, "{cc}");
    }
    let (got, calls) = two_gets_answered_with_cache_control("max-age=60, ext=\"private\"").await;
    assert_eq!(roles(&got), [ServedBy::Leader, ServedBy::Follower]);
    assert_eq!((got[1].text(), calls), ("call 0", 1));

    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new();
    let inner = backend(&gate, |n, _| {
        tagged(
            n,
            &[
                ("cache-control", "public, max-age=600"),
                ("set-cookie", "sid=leader"),
            ],
        )
    });
    let reqs = vec![get_req("/p", &[]), get_req("/p", &[]), get_req("/p", &[])];
    let got = burst(&layer, &gate, inner, reqs, 2, 1).await;
    assert_eq!(
        roles(&got),
        [ServedBy::Leader, ServedBy::Released, ServedBy::Released]
    );
    for (i, g) in got.iter().enumerate().skip(1) {
        assert_ne!(
            g.text(),
            "call 0",
            "follower {i} got the leader's cookie response"
        );
    }
    assert_eq!(gate.calls(), 3);
}

/// `Vary: *` in a second `Vary` field line, and `Vary` names in any case with odd
/// whitespace: a follower whose request differs on a named header is released; one that
/// matches (same values, absent alike) gets the copy.
#[tokio::test]
async fn http_vary_star_anywhere_and_vary_names_in_any_case() {
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new();
    let inner = backend(&gate, |n, _| {
        let mut res = tagged(n, &[("vary", "accept-encoding")]);
        res.headers_mut().append("vary", "*".parse().unwrap());
        res
    });
    let reqs = vec![get_req("/v", &[]), get_req("/v", &[])];
    let got = burst(&layer, &gate, inner, reqs, 1, 1).await;
    assert_eq!(roles(&got), [ServedBy::Leader, ServedBy::Released]);
    assert_eq!(got[1].text(), "call 1");

    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new();
    let inner = backend(&gate, |n, req| {
        let theme = req
            .headers()
            .get("x-theme")
            .map_or("none", |v| v.to_str().unwrap());
        let mut res = tagged(n, &[("vary", " Accept-Language ,\tX-Theme , ")]);
        res.headers_mut()
            .insert("x-rendered-for", theme.parse().unwrap());
        res
    });
    let reqs = vec![
        get_req("/v", &[("x-theme", "dark")]),
        get_req("/v", &[("x-theme", "dark")]),
        get_req("/v", &[("x-theme", "light")]),
        get_req("/v", &[]),
        get_req("/v", &[("x-theme", "dark"), ("x-theme", "dark")]),
    ];
    let got = burst(&layer, &gate, inner, reqs, 4, 1).await;
    assert_eq!(
        roles(&got),
        [
            ServedBy::Leader,
            ServedBy::Follower,
            ServedBy::Released,
            ServedBy::Released,
            ServedBy::Released
        ]
    );
    let rendered: Vec<&str> = got
        .iter()
        .map(|g| g.headers["x-rendered-for"].to_str().unwrap())
        .collect();
    assert_eq!(rendered, ["dark", "dark", "light", "none", "dark"]);
    assert_eq!(gate.calls(), 4);
}

/// A response naming thousands of request headers in `Vary` (hostile upstream): every name
/// is compared, down to the last; nobody hangs.
#[tokio::test]
async fn http_many_vary_entries_are_all_compared() {
    const NAMES: usize = 2000;
    let vary: String = (0..NAMES)
        .map(|i| format!("x-v{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let vary = Arc::new(vary);
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new();
    let inner = backend(&gate, move |n, _| {
        let mut res = tagged(n, &[]);
        res.headers_mut()
            .insert("vary", vary.as_str().parse().unwrap());
        res
    });
    let last = format!("x-v{}", NAMES - 1);
    let mut reqs = Vec::new();
    for value in ["a", "a", "b"] {
        let mut req = get_req("/many", &[]);
        req.headers_mut().insert(
            http::HeaderName::from_bytes(last.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        reqs.push(req);
    }
    let got = burst(&layer, &gate, inner, reqs, 2, 1).await;
    assert_eq!(
        roles(&got),
        [ServedBy::Leader, ServedBy::Follower, ServedBy::Released]
    );
    assert_eq!(
        (got[0].text(), got[1].text(), got[2].text()),
        ("call 0", "call 0", "call 1")
    );
}

/// A `304` is shared only among requests that sent the same validators; a request without
/// them, or with another, never gets it (its own flight). `HEAD` and `GET` of one URI never
/// share, and a `HEAD` copy carries the `GET` body's length and no body.
#[tokio::test]
async fn http_304_and_head_are_shared_only_with_identical_requests() {
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new();
    let inner = backend(&gate, |n, req| {
        if req.headers().get("if-none-match").map(|v| v.as_bytes()) == Some(b"\"v1\"") {
            let mut res = Response::new(full(""));
            *res.status_mut() = StatusCode::NOT_MODIFIED;
            res.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
            return res;
        }
        tagged(n, &[("etag", "\"v1\"")])
    });
    let reqs = vec![
        get_req("/r", &[("if-none-match", "\"v1\"")]),
        get_req("/r", &[("if-none-match", "\"v1\"")]),
        get_req("/r", &[]),
        get_req("/r", &[("if-none-match", "W/\"v1\"")]),
        request(Method::HEAD, "/r", &[]),
        request(Method::HEAD, "/r", &[]),
    ];
    // Four flights (304, plain, weak validator, HEAD), two followers.
    let got = burst(&layer, &gate, inner, reqs, 2, 4).await;
    let status: Vec<u16> = got.iter().map(|g| g.status.as_u16()).collect();
    assert_eq!(status, [304, 304, 200, 200, 200, 200]);
    assert_eq!(
        roles(&got),
        [
            ServedBy::Leader,
            ServedBy::Follower,
            ServedBy::Leader,
            ServedBy::Leader,
            ServedBy::Leader,
            ServedBy::Follower
        ]
    );
    assert!(got[2].text().starts_with("call "));
    // HEAD copies: no body, the GET body's length.
    for g in &got[4..] {
        assert_eq!(g.text(), "");
        let len = g.headers.get("content-length").map(|v| v.to_str().unwrap());
        assert_eq!(len, Some("6"), "{g:?}");
    }
    assert_eq!(gate.calls(), 4);
}

// ---------------------------------------------------------------------------------------------
// Request rules and the key (pinned)
// ---------------------------------------------------------------------------------------------

/// Requests the rules must pass through while an identical plain request is in flight: each
/// reaches the backend itself, is marked `Bypass`, and never waits for the flight.
#[tokio::test]
async fn http_requests_that_must_bypass_never_join_a_flight() {
    let bypassing: &[(Method, &[(&str, &str)])] = &[
        (Method::GET, &[("authorization", "Bearer a")]),
        (Method::GET, &[("cookie", "sid=1")]),
        (Method::GET, &[("proxy-authorization", "Basic eA==")]),
        (Method::GET, &[("range", "bytes=0-1")]),
        (
            Method::GET,
            &[("upgrade", "websocket"), ("connection", "upgrade")],
        ),
        (Method::GET, &[("connection", "keep-alive, Upgrade")]),
        (Method::GET, &[("cache-control", "max-age=0, No-Cache")]),
        (Method::GET, &[("cache-control", "no-store")]),
        (Method::GET, &[("pragma", "x, no-cache")]),
        (Method::POST, &[]),
        (Method::PUT, &[]),
        (Method::DELETE, &[]),
        (Method::PATCH, &[]),
        (Method::OPTIONS, &[]),
    ];
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new().cache_status_header(true);
    let inner = backend(&gate, |n, _| tagged(n, &[]));
    let mut reqs = vec![get_req("/k", &[])];
    for (method, pairs) in bypassing {
        reqs.push(request(method.clone(), "/k", pairs));
    }
    reqs.push(get_req("/k", &[]));
    let got = burst(&layer, &gate, inner, reqs, 1, 1 + bypassing.len()).await;
    assert_eq!(got[0].by, ServedBy::Leader);
    assert_eq!(got.last().unwrap().by, ServedBy::Follower);
    assert_eq!(got.last().unwrap().text(), got[0].text());
    for (g, (method, pairs)) in got[1..].iter().zip(bypassing) {
        assert_eq!(g.by, ServedBy::Bypass, "{method} {pairs:?}");
        assert_ne!(g.text(), got[0].text(), "{method} {pairs:?}");
        let status = g.headers["cache-status"].to_str().unwrap();
        assert!(status.contains("fwd="), "{status}");
    }
    assert_eq!(gate.calls(), 1 + bypassing.len());
    assert_eq!(layer.in_flight(), 0);
}

/// Everything that can change the response splits the key: query, authority (URI and
/// `Host`), forwarding headers, the default negotiation headers and the conditional ones.
/// Headers outside the key (`User-Agent`) do not.
#[tokio::test]
async fn http_key_covers_everything_that_changes_the_response() {
    let base: (&str, &[(&str, &str)]) = ("/q?a=1", &[("host", "one.test")]);
    let variants: &[(&str, &[(&str, &str)])] = &[
        ("/q?a=2", &[("host", "one.test")]),
        ("/q?a=1&", &[("host", "one.test")]),
        ("/q?a=1", &[("host", "two.test")]),
        (
            "/q?a=1",
            &[("host", "one.test"), ("x-forwarded-host", "evil.test")],
        ),
        (
            "/q?a=1",
            &[("host", "one.test"), ("forwarded", "host=evil.test")],
        ),
        (
            "/q?a=1",
            &[("host", "one.test"), ("x-forwarded-proto", "https")],
        ),
        (
            "/q?a=1",
            &[("host", "one.test"), ("accept", "application/json")],
        ),
        (
            "/q?a=1",
            &[("host", "one.test"), ("accept-encoding", "gzip")],
        ),
        ("/q?a=1", &[("host", "one.test"), ("accept-language", "fr")]),
        (
            "/q?a=1",
            &[
                ("host", "one.test"),
                ("if-modified-since", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ],
        ),
        ("/q?a=1", &[("host", "one.test"), ("if-match", "\"x\"")]),
        (
            "/q?a=1",
            &[
                ("host", "one.test"),
                ("if-unmodified-since", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ],
        ),
        ("http://one.test/q?a=1", &[]),
    ];
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new();
    let inner = backend(&gate, |n, _| tagged(n, &[]));
    let mut reqs = vec![get_req(base.0, base.1)];
    for (uri, pairs) in variants {
        reqs.push(get_req(uri, pairs));
    }
    reqs.push(get_req(
        base.0,
        &[("host", "one.test"), ("user-agent", "other")],
    ));
    let got = burst(&layer, &gate, inner, reqs, 1, 1 + variants.len()).await;
    assert_eq!(got[0].by, ServedBy::Leader);
    for (g, v) in got[1..=variants.len()].iter().zip(variants) {
        assert_eq!(g.by, ServedBy::Leader, "{v:?}");
        assert_ne!(g.text(), got[0].text(), "{v:?}");
    }
    assert_eq!(got.last().unwrap().by, ServedBy::Follower);
    assert_eq!(got.last().unwrap().text(), got[0].text());
}

// ---------------------------------------------------------------------------------------------
// Bodies (pinned)
// ---------------------------------------------------------------------------------------------

/// The leader's body fails half-way: the leader gets every byte that came, then the error;
/// the followers are released and each gets a whole body of its own call.
#[tokio::test]
async fn http_body_failing_mid_stream_reaches_the_leader_only() {
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new();
    let inner = backend(&gate, |n, _| {
        let body = if n == 0 {
            frames(vec![
                Ok(Frame::data(Bytes::from_static(b"partial "))),
                Err(io::Error::other("upstream reset")),
            ])
        } else {
            frames(vec![
                Ok(Frame::data(Bytes::from(format!("call {n} ")))),
                Ok(Frame::data(Bytes::from_static(b"whole"))),
            ])
        };
        Response::new(body)
    });
    let reqs = vec![get_req("/e", &[]), get_req("/e", &[]), get_req("/e", &[])];
    let got = burst(&layer, &gate, inner, reqs, 2, 1).await;
    assert_eq!(
        roles(&got),
        [ServedBy::Leader, ServedBy::Released, ServedBy::Released]
    );
    assert!(
        got[0]
            .body
            .as_ref()
            .is_err_and(|e| e.contains("upstream reset")),
        "{:?}",
        got[0].body
    );
    let mut others: Vec<&str> = got[1..].iter().map(Got::text).collect();
    others.sort();
    assert_eq!(others, ["call 1 whole", "call 2 whole"]);
    assert_eq!(gate.calls(), 3);
}

/// A streamed body of unknown length over `max_body_bytes`: the leader gets all of it,
/// trailers included, byte for byte; the followers make their own calls and get theirs whole.
#[tokio::test]
async fn http_streamed_body_over_the_limit_reaches_everyone_whole() {
    const CHUNK: usize = 1000;
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new().max_body_bytes(2500);
    let inner = backend(&gate, |n, _| {
        let mut parts: Vec<Result<Frame<Bytes>, io::Error>> = (0..5)
            .map(|i| {
                Ok(Frame::data(Bytes::from(vec![
                    b'a' + (n * 5 + i) as u8 % 26;
                    CHUNK
                ])))
            })
            .collect();
        let mut t = HeaderMap::new();
        t.insert("x-call", n.to_string().parse().unwrap());
        parts.push(Ok(Frame::trailers(t)));
        Response::new(frames(parts))
    });
    let svc = layer.layer(inner);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(get_req("/big", &[])).await.unwrap();
            let by = *res.extensions().get::<ServedBy>().unwrap();
            let collected = res.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            (by, collected.to_bytes(), trailers)
        }));
    }
    until("followers parked", || {
        layer.waiting() == 2 && gate.calls() == 1
    })
    .await;
    gate.open();
    let mut calls_seen = Vec::new();
    for t in tasks {
        let (by, body, trailers) = bounded("a caller", t).await.unwrap();
        let n: usize = trailers.expect("trailers kept")["x-call"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let expected: Vec<u8> = (0..5)
            .flat_map(|i| vec![b'a' + (n * 5 + i) as u8 % 26; CHUNK])
            .collect();
        assert_eq!(body.len(), 5 * CHUNK, "{by:?}");
        assert!(
            body == expected,
            "{by:?}: body of another call, or reordered"
        );
        calls_seen.push((by, n));
    }
    calls_seen.sort_by_key(|c| c.1);
    assert_eq!(
        calls_seen,
        [
            (ServedBy::Leader, 0),
            (ServedBy::Released, 1),
            (ServedBy::Released, 2)
        ]
    );
}

/// `follower_timeout` on a paused clock: a follower past its limit makes its own call, the
/// flight goes on for the leader and the patient follower, who share one copy.
#[tokio::test(start_paused = true)]
async fn http_follower_past_its_limit_calls_on_its_own() {
    let gate = Gate::holding(1);
    let layer = CoalesceHttpLayer::new()
        .follower_timeout(Duration::from_secs(5))
        .cache_status_header(true);
    let inner = backend(&gate, |n, _| tagged(n, &[]));
    let svc = layer.layer(inner);
    let leader = tokio::spawn(svc.clone().oneshot(get_req("/t", &[])));
    until("leader in the backend", || gate.calls() == 1).await;
    let impatient = tokio::spawn(svc.clone().oneshot(get_req("/t", &[])));
    until("one follower", || layer.waiting() == 1).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    let impatient = bounded("impatient follower", impatient)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        impatient.extensions().get::<ServedBy>(),
        Some(&ServedBy::Released)
    );
    let status = impatient.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(status.contains("detail=timeout"), "{status}");
    let body = impatient.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"call 1");
    assert_eq!(layer.stats().timed_out, 1);
    // The flight is still there for a newcomer, who waits for it.
    let patient = tokio::spawn(svc.clone().oneshot(get_req("/t", &[])));
    until("a new follower", || layer.waiting() == 1).await;
    gate.open();
    for (what, task, by) in [
        ("leader", leader, ServedBy::Leader),
        ("patient", patient, ServedBy::Follower),
    ] {
        let res = bounded(what, task).await.unwrap().unwrap();
        assert_eq!(res.extensions().get::<ServedBy>(), Some(&by), "{what}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"call 0", "{what}");
    }
    assert_eq!(gate.calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// axum over real TCP
// ---------------------------------------------------------------------------------------------

async fn serve_axum(app: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, task)
}

/// One HTTP/1.1 GET on a connection of its own: status, `Cache-Status` and body, or the
/// error the connection ended with.
async fn h1_get(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
) -> Result<(StatusCode, String, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "app.test");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let res = sender
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let cache_status = res
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((
        status,
        cache_status,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

async fn hot(State(gate): State<Gate>) -> String {
    let n = gate.enter().await;
    format!("hot {n}")
}

async fn cold(State(gate): State<Gate>) -> String {
    let n = gate.enter().await;
    format!("cold {n}")
}

/// `Router::layer` under `axum::serve`: 64 clients, each on its own TCP connection, ask for
/// one target at once: one handler call, every client the same body; bypassing clients on
/// the side get their own calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn axum_serve_many_connections_one_backend_call() {
    const CLIENTS: usize = 64;
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new().cache_status_header(true);
    let app = Router::new()
        .route("/hot", get(hot))
        .layer(layer.clone())
        .with_state(gate.clone());
    let (addr, server) = serve_axum(app).await;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(h1_get(addr, "/hot", &[])));
    }
    const SIDE: [&[(&str, &str)]; 2] = [&[("cookie", "sid=1")], &[("cache-control", "no-cache")]];
    for extra in SIDE {
        tasks.push(tokio::spawn(h1_get(addr, "/hot", extra)));
    }
    until("every client in place", || {
        layer.waiting() == CLIENTS - 1 && gate.calls() == 3
    })
    .await;
    gate.open();
    let mut bodies = std::collections::BTreeMap::<String, usize>::new();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let (status, cache_status, body) = bounded("a client", t).await.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK);
        *bodies.entry(body).or_default() += 1;
        let kind = cache_status.split("; ").nth(1).unwrap_or("").to_owned()
            + if cache_status.contains("collapsed") {
                " collapsed"
            } else {
                ""
            };
        *statuses.entry(kind).or_default() += 1;
    }
    assert_eq!(gate.calls(), 3);
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert_eq!(bodies.values().max(), Some(&CLIENTS), "{bodies:?}");
    assert_eq!(
        statuses.get("fwd=miss collapsed"),
        Some(&(CLIENTS - 1)),
        "{statuses:?}"
    );
    assert_eq!(layer.stats().leaders, 1);
    server.abort();
}

/// `route_layer` with one layer value on two routes: each path is its own flight (the path
/// is in the key); a handler that panics on its first call (no `CatchPanicLayer`) takes only
/// the leader's connection down, and the followers make their own calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn axum_route_layer_paths_apart_and_a_panicking_leader_strands_nobody() {
    async fn boom(State(gate): State<Gate>) -> String {
        let n = gate.enter().await;
        if n == 0 {
            panic!("handler blew up on call 0");
        }
        format!("boom {n}")
    }
    const FOLLOWERS: usize = 4;
    let gate = Gate::holding(1);
    let layer = CoalesceHttpLayer::new();
    let app = Router::new()
        .route("/boom", get(boom))
        .route_layer(layer.clone())
        .with_state(gate.clone());
    let (addr, server) = serve_axum(app).await;
    let leader = tokio::spawn(h1_get(addr, "/boom", &[]));
    until("leader in the handler", || gate.calls() == 1).await;
    let mut followers = Vec::new();
    for _ in 0..FOLLOWERS {
        followers.push(tokio::spawn(h1_get(addr, "/boom", &[])));
    }
    until("followers parked", || layer.waiting() == FOLLOWERS).await;
    gate.open();
    let leader = bounded("leader", leader).await.unwrap();
    assert!(
        leader.is_err(),
        "the panic closed the leader's connection: {leader:?}"
    );
    let mut bodies = Vec::new();
    for f in followers {
        let (status, _, body) = bounded("a follower", f).await.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK);
        bodies.push(body);
    }
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        FOLLOWERS,
        "each follower its own call: {bodies:?}"
    );
    assert_eq!(gate.calls(), 1 + FOLLOWERS);
    until("registry empty", || {
        layer.in_flight() == 0 && layer.waiting() == 0
    })
    .await;

    // Two routes under one `route_layer`: two flights, never one.
    let gate = Gate::new();
    let layer = CoalesceHttpLayer::new();
    let app = Router::new()
        .route("/hot", get(hot))
        .route("/cold", get(cold))
        .route_layer(layer.clone())
        .with_state(gate.clone());
    let (addr, server2) = serve_axum(app).await;
    let mut tasks = Vec::new();
    for path in ["/hot", "/cold", "/hot", "/cold"] {
        tasks.push((path, tokio::spawn(h1_get(addr, path, &[]))));
    }
    until("two flights, two followers", || {
        layer.waiting() == 2 && gate.calls() == 2
    })
    .await;
    gate.open();
    for (path, t) in tasks {
        let (_, _, body) = bounded("a client", t).await.unwrap().unwrap();
        assert!(body.starts_with(&path[1..]), "{path} got {body}");
    }
    assert_eq!(gate.calls(), 2);
    server.abort();
    server2.abort();
}

// ---------------------------------------------------------------------------------------------
// gRPC in process
// ---------------------------------------------------------------------------------------------

/// A length-prefixed gRPC message.
fn lpm(payload: &[u8]) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    Bytes::from(b)
}

type GrpcInner = tower::util::BoxCloneService<
    Request<tower_coalesce::http::CoalesceBody<Full<Bytes>>>,
    Response<Body>,
    Infallible,
>;

fn grpc_call(payload: &[u8]) -> Request<Full<Bytes>> {
    Request::post(format!("http://svc.test{GET_ITEM}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(lpm(payload)))
        .unwrap()
}

fn grpc_backend(
    gate: &Gate,
    answer: impl Fn(usize) -> Response<Body> + Send + Sync + 'static,
) -> GrpcInner {
    let gate = gate.clone();
    let answer = Arc::new(answer);
    GrpcInner::new(service_fn(
        move |_req: Request<tower_coalesce::http::CoalesceBody<Full<Bytes>>>| {
            let gate = gate.clone();
            let answer = answer.clone();
            async move {
                let n = gate.enter().await;
                Ok::<_, Infallible>(answer(n))
            }
        },
    ))
}

fn grpc_response(
    header_status: Option<&str>,
    data: &[u8],
    trailer_status: Option<&str>,
) -> Response<Body> {
    let mut parts: Vec<Result<Frame<Bytes>, io::Error>> = Vec::new();
    if !data.is_empty() {
        parts.push(Ok(Frame::data(lpm(data))));
    }
    if let Some(s) = trailer_status {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", s.parse().unwrap());
        parts.push(Ok(Frame::trailers(t)));
    }
    let mut b = Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    if let Some(s) = header_status {
        b = b.header("grpc-status", s);
    }
    b.body(frames(parts)).unwrap()
}

async fn grpc_burst(
    layer: &CoalesceGrpcLayer,
    gate: &Gate,
    inner: GrpcInner,
    calls: Vec<Request<Full<Bytes>>>,
    followers: usize,
    backend_calls: usize,
) -> Vec<(ServedBy, HeaderMap, Bytes, Option<HeaderMap>)> {
    let svc = layer.layer(inner);
    let mut tasks = Vec::new();
    for call in calls {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(call).await.unwrap();
            let by = *res.extensions().get::<ServedBy>().unwrap();
            let (parts, body) = res.into_parts();
            let collected = body.collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            (by, parts.headers, collected.to_bytes(), trailers)
        }));
    }
    until("every call in place", || {
        layer.waiting() == followers && gate.calls() == backend_calls
    })
    .await;
    gate.open();
    let mut out = Vec::new();
    for t in tasks {
        out.push(bounded("a call", t).await.unwrap());
    }
    out
}

/// Status in the headers of a trailers-only response: `0` is shared whole (status kept in
/// the copies' headers); a non-`0` one in the headers is not shared even though the trailers
/// that follow say `0`, and each follower makes its own call.
#[tokio::test]
async fn grpc_status_in_headers_decides_like_status_in_trailers() {
    let gate = Gate::new();
    let layer = CoalesceGrpcLayer::new().method(GET_ITEM);
    let inner = grpc_backend(&gate, |_| grpc_response(Some("0"), b"", None));
    let calls = vec![grpc_call(b"a"), grpc_call(b"a"), grpc_call(b"a")];
    let got = grpc_burst(&layer, &gate, inner, calls, 2, 1).await;
    for (i, (by, headers, body, _)) in got.iter().enumerate() {
        let want = if i == 0 {
            ServedBy::Leader
        } else {
            ServedBy::Follower
        };
        assert_eq!(*by, want);
        assert_eq!(headers["grpc-status"], "0");
        assert!(body.is_empty());
    }
    assert_eq!(gate.calls(), 1);

    let gate = Gate::new();
    let layer = CoalesceGrpcLayer::new().method(GET_ITEM);
    let inner = grpc_backend(&gate, |n| {
        if n == 0 {
            grpc_response(Some("14"), format!("reply {n}").as_bytes(), Some("0"))
        } else {
            grpc_response(None, format!("reply {n}").as_bytes(), Some("0"))
        }
    });
    let calls = vec![grpc_call(b"a"), grpc_call(b"a"), grpc_call(b"a")];
    let got = grpc_burst(&layer, &gate, inner, calls, 2, 1).await;
    assert_eq!(got[0].0, ServedBy::Leader);
    assert_eq!(got[0].1["grpc-status"], "14");
    for (by, headers, body, trailers) in &got[1..] {
        assert_eq!(*by, ServedBy::Released);
        assert!(!headers.contains_key("grpc-status"));
        assert_ne!(body, &lpm(b"reply 0"));
        assert_eq!(trailers.as_ref().unwrap()["grpc-status"], "0");
    }
    assert_eq!(gate.calls(), 3);
}

// ---------------------------------------------------------------------------------------------
// tonic over real HTTP/2
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Catalogue {
    gate: Gate,
    streams: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Catalog for Catalogue {
    async fn get_item(
        &self,
        request: tonic::Request<GetItemRequest>,
    ) -> Result<tonic::Response<Item>, Status> {
        let tenant = request
            .metadata()
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let n = self.gate.enter().await;
        let id = request.into_inner().id;
        if id == "missing" && n == 0 {
            return Err(Status::not_found(format!("no {id} (call {n})")));
        }
        let mut res = tonic::Response::new(Item {
            description: format!("{id} for {tenant} #{n}"),
            id,
            payload: Vec::new(),
        });
        res.metadata_mut()
            .insert("x-call", n.to_string().parse().unwrap());
        Ok(res)
    }

    type WatchItemStream = Pin<Box<dyn Stream<Item = Result<Item, Status>> + Send>>;

    async fn watch_item(
        &self,
        request: tonic::Request<GetItemRequest>,
    ) -> Result<tonic::Response<Self::WatchItemStream>, Status> {
        let n = self.streams.fetch_add(1, SeqCst);
        let id = request.into_inner().id;
        let items = (0..3).map(move |i| {
            Ok(Item {
                id: id.clone(),
                description: format!("stream {n} item {i}"),
                payload: Vec::new(),
            })
        });
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(items))))
    }
}

async fn start_tonic(
    layer: CoalesceGrpcLayer,
    catalogue: Catalogue,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = incoming.local_addr().expect("local addr");
    let router = Server::builder()
        .layer(layer)
        .add_service(CatalogServer::new(catalogue));
    let task = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.expect("server");
    });
    (addr, task)
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn item_request(id: &str, tenant: &str) -> tonic::Request<GetItemRequest> {
    let mut req = tonic::Request::new(GetItemRequest {
        id: id.to_owned(),
        padding: Vec::new(),
    });
    req.metadata_mut()
        .insert("x-tenant", tenant.parse().unwrap());
    req
}

/// A tonic server with one allow-listed unary method and `x-tenant` keyed, clients on
/// separate channels (separate HTTP/2 connections): identical calls share one handler call
/// (status `OK` in trailers, response metadata and all); another message or another tenant is
/// its own flight; the server-streaming method is untouched (every call its own stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tonic_unary_calls_coalesce_per_message_and_metadata_streams_untouched() {
    let gate = Gate::new();
    let layer = CoalesceGrpcLayer::new()
        .method(GET_ITEM)
        .metadata("x-tenant");
    let catalogue = Catalogue {
        gate: gate.clone(),
        streams: Arc::default(),
    };
    let (addr, server) = start_tonic(layer.clone(), catalogue.clone()).await;
    let calls = [
        ("book", "acme"),
        ("book", "acme"),
        ("book", "acme"),
        ("book", "acme"),
        ("pen", "acme"),
        ("book", "globex"),
    ];
    let mut tasks = Vec::new();
    for (id, tenant) in calls {
        let ch = channel(addr).await;
        tasks.push(tokio::spawn(async move {
            let mut client = CatalogClient::new(ch);
            let res = client.get_item(item_request(id, tenant)).await?;
            let call = res
                .metadata()
                .get("x-call")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            Ok::<_, Status>((res.into_inner().description, call))
        }));
    }
    until("three flights, three followers", || {
        layer.waiting() == 3 && gate.calls() == 3
    })
    .await;
    // The streaming method, while the unary flights are held: never coalesced, never held.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut client = CatalogClient::new(channel(addr).await);
        let mut stream = client
            .watch_item(item_request("book", "acme"))
            .await
            .unwrap()
            .into_inner();
        let mut items = Vec::new();
        while let Some(item) = bounded("a stream item", stream.message()).await.unwrap() {
            items.push(item.description);
        }
        streams.push(items);
    }
    assert_eq!(catalogue.streams.load(SeqCst), 3);
    for (n, items) in streams.iter().enumerate() {
        assert_eq!(items.len(), 3, "{items:?}");
        assert!(
            items.iter().all(|d| d.starts_with(&format!("stream {n} "))),
            "{items:?}"
        );
    }
    gate.open();
    let mut got = Vec::new();
    for t in tasks {
        got.push(bounded("a unary call", t).await.unwrap().unwrap());
    }
    let book_acme = &got[0];
    assert!(book_acme.0.starts_with("book for acme #"), "{got:?}");
    for g in &got[1..4] {
        assert_eq!(g, book_acme, "one handler call, metadata and all");
    }
    assert!(got[4].0.starts_with("pen for acme #"));
    assert!(got[5].0.starts_with("book for globex #"));
    assert_eq!(gate.calls(), 3);
    server.abort();
}

/// A handler error (a trailers-only `NOT_FOUND` on the wire) reaches its own caller only;
/// every follower makes its own call and gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tonic_error_status_is_not_shared() {
    let gate = Gate::holding(1);
    let layer = CoalesceGrpcLayer::new().method(GET_ITEM);
    let catalogue = Catalogue {
        gate: gate.clone(),
        streams: Arc::default(),
    };
    let (addr, server) = start_tonic(layer.clone(), catalogue).await;
    let spawn = |ch: Channel| {
        tokio::spawn(async move {
            let mut client = CatalogClient::new(ch);
            client
                .get_item(item_request("missing", "t"))
                .await
                .map(|r| r.into_inner().description)
        })
    };
    let leader = spawn(channel(addr).await);
    until("leader in the handler", || gate.calls() == 1).await;
    let mut followers = Vec::new();
    for _ in 0..3 {
        followers.push(spawn(channel(addr).await));
    }
    until("followers parked", || layer.waiting() == 3).await;
    gate.open();
    let err = bounded("leader", leader).await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let mut own = Vec::new();
    for f in followers {
        own.push(bounded("a follower", f).await.unwrap().unwrap());
    }
    own.sort();
    own.dedup();
    assert_eq!(own.len(), 3, "each follower its own call: {own:?}");
    assert_eq!(gate.calls(), 4);
    assert_eq!(layer.stats().released, 3);
    server.abort();
}

/// The gRPC layer's own reader of a call's `cache-control`: a quoted directive name (not valid
/// syntax) hides the `no-cache`, and the call joins a flight instead of bypassing.
#[tokio::test]
async fn grpc_malformed_request_no_cache_bypasses() {
    let gate = Gate::new();
    let layer = CoalesceGrpcLayer::new().method(GET_ITEM);
    let inner = grpc_backend(&gate, |n| {
        grpc_response(None, format!("reply {n}").as_bytes(), Some("0"))
    });
    let svc = layer.layer(inner);
    let leader = tokio::spawn(svc.clone().oneshot(grpc_call(b"a")));
    until("leader in the backend", || gate.calls() == 1).await;
    let mut fresh = grpc_call(b"a");
    fresh
        .headers_mut()
        .insert("cache-control", "\"no-cache\"".parse().unwrap());
    let fresh = tokio::spawn(svc.oneshot(fresh));
    until("the second call placed", || {
        gate.calls() == 2 || layer.waiting() == 1
    })
    .await;
    let joined = layer.waiting() == 1;
    gate.open();
    bounded("leader", leader).await.unwrap().unwrap();
    let fresh = bounded("second", fresh).await.unwrap().unwrap();
    assert!(
        !joined,
        "a call asking for a fresh answer joined the flight"
    );
    assert_eq!(
        fresh.extensions().get::<ServedBy>(),
        Some(&ServedBy::Bypass)
    );
}
