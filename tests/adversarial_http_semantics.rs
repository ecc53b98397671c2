//! Black-box adversarial tests of the HTTP adapter's sharing semantics: *what may be shared
//! with whom*, judged against the README's HTTP section, the `tower_coalesce::http` rustdoc,
//! RFC 9110 and RFC 9111's rules for shared caches.
//!
//! No real time passes and nothing sleeps: the backend holds every `GET`/`HEAD` call behind a
//! gate (`watch`) until the test opens it, so the requests of a burst are all registered (the
//! first of a key leads, the others follow) before any answer exists; every wait is bounded by
//! a virtual-time timeout, so a hang fails instead of stalling.
//!
//! the docs or RFC 9111.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use futures::poll;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;
type Answer = Pin<Box<dyn Future<Output = Result<Res, Infallible>> + Send>>;

/// Fails the test if `f` does not finish within a minute of (virtual) time: a hang.
async fn settle<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung"))
}

/// A backend that numbers its calls from 0 and builds its answer when called (as a handler
/// that reads its data first), then holds `GET`/`HEAD` answers behind a gate until the test
/// opens it. Other methods answer at once.
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
}

impl Backend {
    fn new() -> Self {
        Backend {
            calls: Arc::default(),
            gate: Arc::new(watch::channel(false).0),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    fn service<F>(
        &self,
        answer: F,
    ) -> impl Service<Req, Response = Res, Error = Infallible, Future = Answer> + Clone + Send + 'static
    where
        F: Fn(usize, &Req) -> Res + Send + Sync + 'static,
    {
        let calls = self.calls.clone();
        let gate = self.gate.clone();
        let answer = Arc::new(answer);
        service_fn(move |req: Req| -> Answer {
            let n = calls.fetch_add(1, SeqCst);
            let res = answer(n, &req);
            let gated = req.method() == Method::GET || req.method() == Method::HEAD;
            let mut gate = gate.subscribe();
            Box::pin(async move {
                if gated {
                    gate.wait_for(|open| *open).await.expect("gate");
                }
                Ok(res)
            })
        })
    }
}

fn req(method: Method, uri: &str, pairs: &[(&str, &str)]) -> Req {
    let mut r = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::new()))
        .unwrap();
    for (name, value) in pairs {
        r.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    r
}

fn get(uri: &str, pairs: &[(&str, &str)]) -> Req {
    req(Method::GET, uri, pairs)
}

fn head(uri: &str, pairs: &[(&str, &str)]) -> Req {
    req(Method::HEAD, uri, pairs)
}

fn res(status: u16, pairs: &[(&str, &str)], body: impl Into<Bytes>) -> Res {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (name, value) in pairs {
        r.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    r
}

fn hv(req: &Req, name: &str) -> String {
    req.headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect::<Vec<_>>()
        .join("|")
}

/// Everything a waiter got.
#[derive(Debug)]
struct Read {
    by: ServedBy,
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Read {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect::<Vec<_>>()
            .join("|")
    }
}

async fn read<B>(res: Response<B>) -> Read
where
    B: Body<Data = Bytes>,
    B::Error: Debug,
{
    let by = *res
        .extensions()
        .get::<ServedBy>()
        .expect("every response is marked");
    let (parts, body) = res.into_parts();
    let body = settle("body", body.collect())
        .await
        .expect("body")
        .to_bytes();
    Read {
        by,
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

/// Calls `svc` with every request in order before polling any (so each request after the
/// first of a key joins that key's flight), polls them all once with the gate shut, checks
/// that `expect_calls` calls reached the backend, opens the gate and reads every response.
async fn burst<S, B>(
    svc: &mut S,
    backend: &Backend,
    reqs: Vec<Req>,
    expect_calls: usize,
) -> Vec<Read>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: Debug,
    B: Body<Data = Bytes>,
    B::Error: Debug,
{
    let mut all = Box::pin(join_all(reqs.into_iter().map(|r| svc.call(r))));
    assert!(poll!(&mut all).is_pending(), "the gate holds every call");
    assert_eq!(backend.calls(), expect_calls, "calls before the gate opens");
    backend.open();
    let mut out = Vec::new();
    for res in settle("burst", all).await {
        out.push(read(res.expect("inner service never fails")).await);
    }
    out
}

fn by(reads: &[Read]) -> Vec<ServedBy> {
    reads.iter().map(|r| r.by).collect()
}

use ServedBy::{Bypass, Follower, Leader, Released};

// ---------------------------------------------------------------------------------------------
// Conditional requests
// ---------------------------------------------------------------------------------------------

/// A conditional backend: `If-None-Match: "v1"` or a matching `If-Modified-Since` gets `304`,
/// a failing `If-Match` / `If-Unmodified-Since` gets `412`, everything else the full `200`.
fn conditional(n: usize, req: &Req) -> Res {
    let etag = ("etag", "\"v1\"");
    let lm = ("last-modified", "Sat, 01 Jan 2000 00:00:00 GMT");
    let call = n.to_string();
    let x = ("x-call", call.as_str());
    if hv(req, "if-none-match") == "\"v1\"" || hv(req, "if-modified-since") == lm.1 {
        return res(304, &[etag, lm, x], "");
    }
    if !hv(req, "if-match").is_empty() && hv(req, "if-match") != "\"v1\"" {
        return res(412, &[x], "precondition failed");
    }
    if !hv(req, "if-unmodified-since").is_empty() {
        return res(412, &[x], "precondition failed");
    }
    res(200, &[etag, lm, x], "full representation")
}

/// RFC 9110 §13: a request with a validator that matches must get `304`, never the leader's
/// `200`; the follower's validator is in the key, so it makes its own call.
#[tokio::test(start_paused = true)]
async fn follower_with_matching_if_none_match_gets_its_own_304() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(conditional));
    let reqs = vec![
        get("/doc", &[]),
        get("/doc", &[("if-none-match", "\"v1\"")]),
        get("/doc", &[]),
        get("/doc", &[("if-none-match", "\"v1\"")]),
    ];
    let out = burst(&mut svc, &backend, reqs, 2).await;
    assert_eq!(by(&out), [Leader, Leader, Follower, Follower]);
    assert_eq!(out[0].status, 200);
    assert_eq!(out[2].status, 200);
    assert_eq!(out[1].status, 304);
    assert_eq!(out[3].status, 304);
    assert!(out[1].body.is_empty() && out[3].body.is_empty());
    assert_eq!(backend.calls(), 2);
}

/// The other way round, for every conditional header: a leader whose validator makes the
/// answer a `304`/`412` never hands it to a follower without that validator (who would see
/// "Not Modified" for a representation it does not have).
#[tokio::test(start_paused = true)]
async fn conditional_leader_answers_never_reach_unconditional_followers() {
    let conds: [(&str, &str, u16); 5] = [
        ("if-none-match", "\"v1\"", 304),
        ("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT", 304),
        ("if-match", "\"v0\"", 412),
        ("if-unmodified-since", "Sat, 01 Jan 1999 00:00:00 GMT", 412),
        // `If-Range` without `Range` is ignored by the backend but still keyed.
        ("if-range", "\"v1\"", 200),
    ];
    for (name, value, status) in conds {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(backend.service(conditional));
        let reqs = vec![
            get("/doc", &[(name, value)]),
            get("/doc", &[]),
            get("/doc", &[(name, value)]),
        ];
        let out = burst(&mut svc, &backend, reqs, 2).await;
        assert_eq!(by(&out), [Leader, Leader, Follower], "{name}");
        assert_eq!(out[0].status, status, "{name}");
        assert_eq!(out[2].status, status, "{name}");
        assert_eq!(
            out[1].status, 200,
            "{name}: plain follower got {:?}",
            out[1]
        );
        assert_eq!(out[1].text(), "full representation", "{name}");
        assert_eq!(out[1].header("x-call"), "1", "{name}");
    }
}

/// Validators that a server would treat as equivalent (weak vs strong, list order) still
/// split flights: exact comparison, never a `304` meant for another validator.
#[tokio::test(start_paused = true)]
async fn equivalent_looking_validators_never_share() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc =
        layer
            .layer(backend.service(|n, req| {
                res(304, &[("x-inm", &hv(req, "if-none-match"))], n.to_string())
            }));
    let reqs = vec![
        get("/doc", &[("if-none-match", "\"a\", \"b\"")]),
        get("/doc", &[("if-none-match", "\"b\", \"a\"")]),
        get("/doc", &[("if-none-match", "W/\"a\"")]),
        get("/doc", &[("if-none-match", "\"a\"")]),
        get("/doc", &[("if-none-match", "*")]),
        get(
            "/doc",
            &[("if-none-match", "\"a\""), ("if-none-match", "\"b\"")],
        ),
        get("/doc", &[("if-none-match", "\"a\", \"b\"")]),
    ];
    let inms: Vec<String> = reqs.iter().map(|r| hv(r, "if-none-match")).collect();
    let out = burst(&mut svc, &backend, reqs, 6).await;
    for (i, read) in out.iter().enumerate() {
        assert_eq!(read.header("x-inm"), inms[i], "request {i}");
    }
    assert_eq!(out[6].by, Follower);
}

// ---------------------------------------------------------------------------------------------
// Request directives, Range, credentials
// ---------------------------------------------------------------------------------------------

/// Rule 1: a `Range` request never joins a flight (and so never gets a full `200` meant for
/// somebody else, nor hands its `206` on).
#[tokio::test(start_paused = true)]
async fn range_requests_bypass_a_flight_in_progress() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|n, req| {
        if req.headers().contains_key(header::RANGE) {
            res(206, &[("content-range", "bytes 0-1/10")], format!("{n}p"))
        } else {
            res(200, &[], format!("{n}full-body"))
        }
    }));
    let reqs = vec![
        get("/file", &[]),
        get("/file", &[("range", "bytes=0-1")]),
        get("/file", &[("range", "bytes=0-1")]),
        get("/file", &[]),
    ];
    let out = burst(&mut svc, &backend, reqs, 3).await;
    assert_eq!(by(&out), [Leader, Bypass, Bypass, Follower]);
    assert_eq!((out[1].status.as_u16(), out[2].status.as_u16()), (206, 206));
    assert_ne!(out[1].text(), out[2].text(), "two ranges, two calls");
    assert_eq!(out[3].status, 200);
}

/// Rule 1: `Cache-Control: no-cache`/`no-store` and `Pragma: no-cache` (any case, in a list)
/// make a request go to the backend itself even while an identical flight is in progress.
#[tokio::test(start_paused = true)]
async fn request_no_cache_directives_never_join() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|n, _| res(200, &[], n.to_string())));
    let reqs = vec![
        get("/r", &[]),
        get("/r", &[("cache-control", "no-cache")]),
        get("/r", &[("cache-control", "max-age=0, NO-STORE")]),
        get("/r", &[("pragma", "no-cache")]),
        get("/r", &[("cache-control", "no-cache=\"x\"")]),
    ];
    let out = burst(&mut svc, &backend, reqs, 5).await;
    assert_eq!(by(&out), [Leader, Bypass, Bypass, Bypass, Bypass]);
    let bodies: std::collections::HashSet<_> = out.iter().map(Read::text).collect();
    assert_eq!(bodies.len(), 5, "each got its own call");
}

/// Requests that only tighten freshness (`max-age=0`, a browser reload) or ask for a stored
/// answer (`only-if-cached`) still join: a collapsed response is generated for this instant.
/// (`only-if-cached` is not answered `504`: the layer is not a store.)
#[tokio::test(start_paused = true)]
async fn request_max_age_zero_and_only_if_cached_join() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|n, _| res(200, &[], n.to_string())));
    let reqs = vec![
        get("/r", &[]),
        get("/r", &[("cache-control", "max-age=0")]),
        get("/r", &[("cache-control", "only-if-cached")]),
        get("/r", &[("cache-control", "min-fresh=600")]),
    ];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    assert_eq!(by(&out), [Leader, Follower, Follower, Follower]);
    assert!(out.iter().all(|r| r.status == 200 && r.text() == "0"));
}

/// Rule 2: requests carrying `Authorization`, `Cookie`, `Proxy-Authorization` or URI userinfo
/// never join an anonymous flight (nor get its page), and an anonymous request that arrives
/// while a credentialed one runs leads its own flight.
#[tokio::test(start_paused = true)]
async fn credentialed_requests_never_join_anonymous_flights() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|n, req| {
        let who = [
            hv(req, "authorization"),
            hv(req, "cookie"),
            hv(req, "proxy-authorization"),
            req.uri().to_string(),
        ]
        .join(";");
        res(200, &[], format!("{n}:{who}"))
    }));
    let reqs = vec![
        get("http://a.test/me", &[("authorization", "Bearer alice")]),
        get("http://a.test/me", &[]),
        get("http://a.test/me", &[("cookie", "sid=bob")]),
        get(
            "http://a.test/me",
            &[("proxy-authorization", "Basic Y2Fyb2w6eA==")],
        ),
        get("http://dave:pw@a.test/me", &[]),
        get("http://a.test/me", &[("authorization", "")]),
        get("http://a.test/me", &[]),
    ];
    let out = burst(&mut svc, &backend, reqs, 6).await;
    assert_eq!(
        by(&out),
        [Bypass, Leader, Bypass, Bypass, Bypass, Bypass, Follower]
    );
    assert!(out[0].text().contains("Bearer alice"));
    assert!(out[2].text().contains("sid=bob"));
    assert!(out[4].text().contains("dave:pw@"));
    assert_eq!(out[6].text(), out[1].text());
    assert!(!out[6].text().contains("alice") && !out[6].text().contains("bob"));
}

/// Rule 2's list is closed: an API key in a custom header is not a credential to the layer.
/// Without `.key_header` the second key holder joins the first one's flight (documented:
/// "the key must describe everything the response depends on"); with it, they never share.
#[tokio::test(start_paused = true)]
async fn custom_api_key_header_is_shared_unless_keyed() {
    for keyed in [false, true] {
        let backend = Backend::new();
        let mut layer = CoalesceHttpLayer::new();
        if keyed {
            layer = layer.key_header(HeaderName::from_static("x-api-key"));
        }
        let mut svc = layer.layer(
            backend.service(|_, req| res(200, &[], format!("account of {}", hv(req, "x-api-key")))),
        );
        let reqs = vec![
            get("/account", &[("x-api-key", "alice")]),
            get("/account", &[("x-api-key", "bob")]),
        ];
        let out = burst(&mut svc, &backend, reqs, if keyed { 2 } else { 1 }).await;
        if keyed {
            assert_eq!(out[1].text(), "account of bob");
        } else {
            assert_eq!(out[1].by, Follower);
            assert_eq!(
                out[1].text(),
                "account of alice",
                "documented: not a credential"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

/// Set by an authentication layer outside the coalescing layer.
#[derive(Clone, Debug)]
struct UserId(&'static str);

fn user_identity(parts: &Parts) -> Option<&'static str> {
    parts.extensions.get::<UserId>().map(|u| u.0)
}

fn as_user(mut r: Req, user: &'static str) -> Req {
    r.extensions_mut().insert(UserId(user));
    r
}

/// `.identity(..)`: credentialed requests coalesce per identity and never across identities,
/// even when their tokens and cookies look alike.
#[tokio::test(start_paused = true)]
async fn identity_coalesces_per_user_and_never_across_users() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().identity(user_identity);
    let mut svc = layer.layer(backend.service(|n, req| {
        let user = req.extensions().get::<UserId>().unwrap().0;
        res(200, &[], format!("{n}:inbox of {user}"))
    }));
    let reqs = vec![
        as_user(get("/inbox", &[("authorization", "Bearer t1")]), "alice"),
        as_user(get("/inbox", &[("authorization", "Bearer t1")]), "bob"),
        as_user(get("/inbox", &[("authorization", "Bearer t2")]), "alice"),
        as_user(get("/inbox", &[("cookie", "sid=1")]), "bob"),
    ];
    let out = burst(&mut svc, &backend, reqs, 2).await;
    assert_eq!(by(&out), [Leader, Leader, Follower, Follower]);
    assert!(out[0].text().ends_with("alice") && out[2].text().ends_with("alice"));
    assert!(out[1].text().ends_with("bob") && out[3].text().ends_with("bob"));
}

/// With an identity configured, an anonymous request (no credentials, no identity) and an
/// authenticated one never share; a credentialed request whose identity is unknown bypasses.
#[tokio::test(start_paused = true)]
async fn identity_keeps_anonymous_and_unknown_apart() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().identity(user_identity);
    let mut svc = layer.layer(backend.service(|n, req| {
        let user = req
            .extensions()
            .get::<UserId>()
            .map_or("anonymous", |u| u.0);
        res(200, &[], format!("{n}:{user}"))
    }));
    let reqs = vec![
        as_user(get("/home", &[("authorization", "Bearer a")]), "alice"),
        get("/home", &[]),
        get("/home", &[("authorization", "Bearer forged")]),
        get("/home", &[]),
        as_user(get("/home", &[("authorization", "Bearer a")]), "alice"),
    ];
    let out = burst(&mut svc, &backend, reqs, 3).await;
    assert_eq!(by(&out), [Leader, Leader, Bypass, Follower, Follower]);
    assert!(out[1].text().ends_with("anonymous") && out[3].text().ends_with("anonymous"));
    assert!(out[2].text().ends_with("anonymous"));
    assert!(out[4].text().ends_with("alice"));
}

/// Identity does not override a response's `Vary: Cookie`: one user with two cookie jars
/// (a theme cookie, say) gets the copy only when the cookies are the same.
#[tokio::test(start_paused = true)]
async fn identity_still_honours_vary_cookie() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().identity(user_identity);
    let mut svc = layer.layer(backend.service(|_, req| {
        res(
            200,
            &[("vary", "Cookie")],
            format!("page for {}", hv(req, "cookie")),
        )
    }));
    let reqs = vec![
        as_user(get("/home", &[("cookie", "sid=1; theme=dark")]), "alice"),
        as_user(get("/home", &[("cookie", "sid=1; theme=light")]), "alice"),
        as_user(get("/home", &[("cookie", "sid=1; theme=dark")]), "alice"),
    ];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    assert_eq!(by(&out), [Leader, Released, Follower]);
    assert_eq!(out[1].text(), "page for sid=1; theme=light");
    assert_eq!(backend.calls(), 2);
}

/// Most authenticated pages say `Cache-Control: private`; the layer never shares them, even
/// between requests of one identity (a private cache could). So `.identity` coalesces nothing
/// for such endpoints. Conservative; noted as a doc gap.
#[tokio::test(start_paused = true)]
async fn identity_does_not_share_private_responses_even_within_one_user() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().identity(user_identity);
    let mut svc = layer.layer(backend.service(|n, _| {
        res(
            200,
            &[("cache-control", "private, max-age=60")],
            n.to_string(),
        )
    }));
    let reqs = vec![
        as_user(get("/me", &[("authorization", "Bearer a")]), "alice"),
        as_user(get("/me", &[("authorization", "Bearer a")]), "alice"),
    ];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    assert_eq!(by(&out), [Leader, Released]);
    assert_eq!(backend.calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// Response directives (RFC 9111 §3, §4, §5.2.2)
// ---------------------------------------------------------------------------------------------

/// Runs one leader and two followers against a backend answering `200` with `pairs` and a
/// body naming the call; returns the reads and the number of backend calls.
async fn leader_and_two(pairs: &'static [(&'static str, &'static str)]) -> (Vec<Read>, usize) {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(move |n, _| res(200, pairs, format!("call {n}"))));
    let reqs = vec![get("/r", &[]), get("/r", &[]), get("/r", &[])];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    (out, backend.calls())
}

/// Rule 4: `Set-Cookie`, `private`, `no-store`, `no-cache` (any case, qualified or not, on
/// any line) and `Vary: *` go to their leader only; each follower makes its own call and never
/// sees the leader's body or cookie.
#[tokio::test(start_paused = true)]
async fn personal_responses_go_to_their_leader_only() {
    const CASES: [&[(&str, &str)]; 9] = [
        &[("set-cookie", "session=leader")],
        &[("cache-control", "private")],
        &[
            ("cache-control", "public, max-age=60"),
            ("cache-control", "PRIVATE"),
        ],
        &[("cache-control", "private=\"x-user\"")],
        &[("cache-control", "no-store")],
        &[("cache-control", "no-cache")],
        &[("cache-control", "no-cache=\"set-cookie\"")],
        &[("vary", "*")],
        &[("vary", "accept"), ("vary", "*")],
    ];
    for pairs in CASES {
        let (out, calls) = leader_and_two(pairs).await;
        assert_eq!(by(&out), [Leader, Released, Released], "{pairs:?}");
        assert_eq!(calls, 3, "{pairs:?}");
        assert_eq!(out[0].text(), "call 0");
        assert!(out[1..].iter().all(|r| r.text() != "call 0"), "{pairs:?}");
    }
}

/// Control for the freshness tests below: a response a shared cache may reuse (explicitly
/// fresh, `s-maxage` overriding `max-age` for shared caches, or with no freshness
/// information at all) is shared.
#[tokio::test(start_paused = true)]
async fn fresh_or_unmarked_responses_are_shared() {
    const CASES: [&[(&str, &str)]; 4] = [
        &[("cache-control", "public, max-age=60")],
        &[("cache-control", "s-maxage=60")],
        &[("cache-control", "max-age=0, s-maxage=30")],
        &[],
    ];
    for pairs in CASES {
        let (out, calls) = leader_and_two(pairs).await;
        assert_eq!(by(&out), [Leader, Follower, Follower], "{pairs:?}");
        assert_eq!(calls, 1, "{pairs:?}");
    }
}

/// RFC 9111 §5.2.2.10 (`s-maxage` implies `proxy-revalidate` for shared caches) and
/// §5.2.2.2/§5.2.2.8 (`must-revalidate`/`proxy-revalidate`): a response that is stale on
/// arrival and must be revalidated "MUST NOT [be reused] to satisfy another request until it
/// has been successfully validated" — the same effect as `no-cache`, which the layer honours.
/// §4: collapsed requests may only get a response "allowed to reuse ... for the requests in
/// question". Today such responses are handed to every follower.
#[tokio::test(start_paused = true)]
async fn must_revalidate_stale_responses_are_not_shared() {
    const CASES: [&[(&str, &str)]; 4] = [
        &[("cache-control", "s-maxage=0")],
        &[("cache-control", "public, max-age=60, s-maxage=0")],
        &[("cache-control", "max-age=0, must-revalidate")],
        &[("cache-control", "max-age=0, proxy-revalidate")],
    ];
    let mut shared = Vec::new();
    for pairs in CASES {
        let (out, calls) = leader_and_two(pairs).await;
        if calls != 3 || out[1..].iter().any(|r| r.by == Follower) {
            shared.push(format!("{pairs:?}"));
        }
    }
    assert!(shared.is_empty(), "handed to followers: {shared:?}");
}

/// RFC 9111 §4.2 / §4.2.4: a response whose freshness lifetime is zero (`max-age=0`, an
/// `Expires` not after its `Date`, or `Expires: 0`, which §5.3 says "MUST [be interpreted] as
/// ... already expired") is stale on arrival, and "a cache MUST NOT generate a stale response
/// unless ... explicitly permitted". Shared caches that collapse (nginx `proxy_cache_lock`,
/// Varnish, Fastly) send the waiters of such a response to the origin. Today they are shared.
#[tokio::test(start_paused = true)]
async fn stale_on_arrival_responses_are_not_shared() {
    const CASES: [&[(&str, &str)]; 3] = [
        &[("cache-control", "max-age=0")],
        &[
            ("date", "Sat, 01 Jan 2000 00:00:10 GMT"),
            ("expires", "Sat, 01 Jan 2000 00:00:00 GMT"),
        ],
        &[("expires", "0"), ("pragma", "no-cache")],
    ];
    let mut shared = Vec::new();
    for pairs in CASES {
        let (out, calls) = leader_and_two(pairs).await;
        if calls != 3 || out[1..].iter().any(|r| r.by == Follower) {
            shared.push(format!("{pairs:?}"));
        }
    }
    assert!(shared.is_empty(), "handed to followers: {shared:?}");
}

/// The leader's request goes away before its answer (client gone): a follower carries the
/// call on, but never receives the response meant for the leader alone (`Set-Cookie`).
#[tokio::test(start_paused = true)]
async fn cancelled_leaders_personal_response_never_reaches_the_follower() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|n, _| {
        res(
            200,
            &[("set-cookie", &format!("session=call{n}"))],
            format!("call {n}"),
        )
    }));
    let mut leader = Box::pin(svc.call(get("/login", &[])));
    assert!(poll!(&mut leader).is_pending());
    let mut follower = Box::pin(svc.call(get("/login", &[])));
    assert!(poll!(&mut follower).is_pending());
    assert_eq!(backend.calls(), 1);
    drop(leader);
    backend.open();
    let out = read(settle("follower", follower).await.unwrap()).await;
    assert_eq!(out.by, Released);
    assert_eq!(out.header("set-cookie"), "session=call1");
    assert_eq!(backend.calls(), 2);
}

/// Leader gone, follower takes over: a shareable answer with `Vary` is still checked against
/// the *leader's* request, so a follower that differs on the varied header is released.
#[tokio::test(start_paused = true)]
async fn cancelled_leader_vary_is_checked_against_the_leaders_request() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|_, req| {
        res(
            200,
            &[("vary", "x-theme")],
            format!("theme {}", hv(req, "x-theme")),
        )
    }));
    let mut leader = Box::pin(svc.call(get("/p", &[("x-theme", "dark")])));
    assert!(poll!(&mut leader).is_pending());
    let mut light = Box::pin(svc.call(get("/p", &[("x-theme", "light")])));
    let mut dark = Box::pin(svc.call(get("/p", &[("x-theme", "dark")])));
    assert!(poll!(&mut light).is_pending());
    assert!(poll!(&mut dark).is_pending());
    drop(leader);
    backend.open();
    let (light, dark) = settle("followers", futures::future::join(light, dark)).await;
    let (light, dark) = (read(light.unwrap()).await, read(dark.unwrap()).await);
    assert_eq!((light.by, light.text().as_str()), (Released, "theme light"));
    assert_eq!((dark.by, dark.text().as_str()), (Follower, "theme dark"));
    assert_eq!(backend.calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// Vary and content negotiation
// ---------------------------------------------------------------------------------------------

/// `Vary` naming unkeyed request headers: a follower that differs on any of them (absent vs
/// present, value, extra line) is released; one that matches gets the copy.
#[tokio::test(start_paused = true)]
async fn vary_mismatch_on_unkeyed_headers_releases_only_the_mismatching() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().key_headers([]);
    let mut svc = layer.layer(backend.service(|n, req| {
        let body = format!("{n}:{}:{}", hv(req, "accept-language"), hv(req, "x-theme"));
        res(200, &[("vary", "Accept-Language, X-Theme")], body)
    }));
    let base: &[(&str, &str)] = &[("accept-language", "fr"), ("x-theme", "dark")];
    let reqs = vec![
        get("/p", base),
        get("/p", &[("accept-language", "de"), ("x-theme", "dark")]),
        get("/p", &[("accept-language", "fr")]),
        get(
            "/p",
            &[
                ("accept-language", "fr"),
                ("x-theme", "dark"),
                ("x-theme", "dark"),
            ],
        ),
        get(
            "/p",
            &[
                ("x-theme", "dark"),
                ("accept-language", "fr"),
                ("accept", "x/y"),
            ],
        ),
    ];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    assert_eq!(by(&out), [Leader, Released, Released, Released, Follower]);
    assert_eq!(out[1].text(), "1:de:dark");
    assert_eq!(out[2].text(), "2:fr:");
    assert_eq!(out[4].text(), "0:fr:dark");
}

/// The default key holds `Accept`, `Accept-Encoding`, `Accept-Language`: a handler that
/// negotiates on them without sending `Vary` is still safe.
#[tokio::test(start_paused = true)]
async fn default_key_separates_negotiated_variants_without_vary() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|_, req| {
        let body = format!(
            "{}|{}|{}",
            hv(req, "accept"),
            hv(req, "accept-encoding"),
            hv(req, "accept-language")
        );
        res(200, &[], body)
    }));
    let variants: [&[(&str, &str)]; 4] = [
        &[("accept", "application/json")],
        &[("accept", "text/html")],
        &[("accept-encoding", "br")],
        &[("accept-language", "ja")],
    ];
    let reqs: Vec<Req> = variants
        .iter()
        .chain(&variants)
        .map(|v| get("/neg", v))
        .collect();
    let expect: Vec<String> = reqs
        .iter()
        .map(|r| {
            format!(
                "{}|{}|{}",
                hv(r, "accept"),
                hv(r, "accept-encoding"),
                hv(r, "accept-language")
            )
        })
        .collect();
    let out = burst(&mut svc, &backend, reqs, 4).await;
    for (i, read) in out.iter().enumerate() {
        assert_eq!(read.text(), expect[i], "request {i}");
    }
}

/// A stand-in for tower-http's `CompressionLayer` (its feature is not enabled in this crate's
/// dev-dependencies): gzip-"encodes" the body for clients that accept gzip and always adds
/// `Vary: accept-encoding`, as tower-http does.
#[derive(Clone)]
struct FakeGzip<S>(S);

impl<S, B> Service<Req> for FakeGzip<S>
where
    S: Service<Req, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Debug,
{
    type Response = Res;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Answer {
        let gzip = hv(&req, "accept-encoding").contains("gzip");
        let inner = self.0.clone();
        Box::pin(async move {
            let (mut parts, body) = inner.oneshot(req).await?.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            parts
                .headers
                .append(header::VARY, HeaderValue::from_static("accept-encoding"));
            let body = if gzip {
                parts
                    .headers
                    .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                Bytes::from(format!("gzip({})", String::from_utf8_lossy(&body)))
            } else {
                body
            };
            Ok(Response::from_parts(parts, Full::new(body)))
        })
    }
}

/// Compression *inside* the layer with `Accept-Encoding` taken out of the key: only its
/// `Vary: accept-encoding` protects the followers; a follower that does not accept gzip must
/// never get the gzip copy.
#[tokio::test(start_paused = true)]
async fn compression_inside_with_unkeyed_accept_encoding_is_saved_by_vary() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().key_headers([header::ACCEPT]);
    let mut svc = layer.layer(FakeGzip(
        backend.service(|n, _| res(200, &[], n.to_string())),
    ));
    let reqs = vec![
        get("/big", &[("accept-encoding", "gzip")]),
        get("/big", &[]),
        get("/big", &[("accept-encoding", "identity")]),
        get("/big", &[("accept-encoding", "gzip")]),
    ];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    assert_eq!(by(&out), [Leader, Released, Released, Follower]);
    assert_eq!(out[1].header("content-encoding"), "");
    assert_eq!(out[2].header("content-encoding"), "");
    assert!(!out[1].text().starts_with("gzip") && !out[2].text().starts_with("gzip"));
    assert_eq!(out[3].text(), "gzip(0)");
}

/// Compression *outside* the layer (the README's advice) with `Accept-Encoding` out of the
/// key: one backend call, and each waiter's copy is encoded for its own client.
#[tokio::test(start_paused = true)]
async fn compression_outside_encodes_each_copy_for_its_own_client() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().key_headers([header::ACCEPT]);
    let mut svc = FakeGzip(layer.layer(backend.service(|n, _| res(200, &[], n.to_string()))));
    let reqs = vec![
        get("/big", &[("accept-encoding", "gzip")]),
        get("/big", &[]),
        get("/big", &[("accept-encoding", "gzip, br")]),
    ];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    assert_eq!(by(&out), [Leader, Follower, Follower]);
    assert_eq!(out[0].text(), "gzip(0)");
    assert_eq!(out[1].text(), "0");
    assert_eq!(out[1].header("content-encoding"), "");
    assert_eq!(out[2].text(), "gzip(0)");
}

/// CORS answered inside the layer, mirroring the request's `Origin` with `Vary: Origin` (as
/// tower-http's `CorsLayer` does): a follower from another origin never gets the first
/// origin's `Access-Control-Allow-Origin`.
#[tokio::test(start_paused = true)]
async fn cors_inside_with_vary_origin_never_leaks_another_origins_acao() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|_, req| {
        let origin = hv(req, "origin");
        res(
            200,
            &[("access-control-allow-origin", &origin), ("vary", "origin")],
            "data",
        )
    }));
    let reqs = vec![
        get("/api", &[("origin", "https://a.test")]),
        get("/api", &[("origin", "https://evil.test")]),
        get("/api", &[]),
        get("/api", &[("origin", "https://a.test")]),
    ];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    assert_eq!(by(&out), [Leader, Released, Released, Follower]);
    assert_eq!(
        out[1].header("access-control-allow-origin"),
        "https://evil.test"
    );
    assert_eq!(out[2].header("access-control-allow-origin"), "");
    assert_eq!(
        out[3].header("access-control-allow-origin"),
        "https://a.test"
    );
}

// ---------------------------------------------------------------------------------------------
// Status codes, HEAD, Content-Length
// ---------------------------------------------------------------------------------------------

/// Error statuses and challenges (rule 6, RFC 9111 §3): a status a cache may not reuse
/// without explicit freshness (`401`, `407`, `500`, `503`) is its own request's, and the
/// followers make their own calls; with `max-age` it is shared among identical anonymous
/// requests, as a `404` (heuristically cacheable) always is.
#[tokio::test(start_paused = true)]
async fn error_statuses_and_challenges_are_shared_only_when_a_cache_could_reuse_them() {
    type Case = (u16, &'static [(&'static str, &'static str)], bool);
    let cases: [Case; 9] = [
        (401, &[("www-authenticate", "Bearer realm=\"api\"")], false),
        (
            407,
            &[("proxy-authenticate", "Basic realm=\"proxy\"")],
            false,
        ),
        (404, &[], true),
        (500, &[], false),
        (503, &[("retry-after", "5")], false),
        (
            401,
            &[
                ("www-authenticate", "Bearer"),
                ("cache-control", "max-age=5"),
            ],
            true,
        ),
        (500, &[("cache-control", "s-maxage=5")], true),
        (503, &[("expires", "Thu, 01 Jan 2099 00:00:00 GMT")], true),
        (503, &[("cache-control", "public")], true),
    ];
    for (status, pairs, shared) in cases {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(backend.service(move |n, _| res(status, pairs, n.to_string())));
        let reqs = vec![get("/x", &[]), get("/x", &[]), get("/x", &[])];
        let out = burst(&mut svc, &backend, reqs, 1).await;
        for r in &out {
            assert_eq!(r.status.as_u16(), status);
            for (name, value) in pairs {
                assert_eq!(r.header(name), *value, "{status}");
            }
        }
        if shared {
            assert_eq!(by(&out), [Leader, Follower, Follower], "{status} {pairs:?}");
            assert!(out.iter().all(|r| r.text() == "0"), "{status}");
            assert_eq!(backend.calls(), 1);
        } else {
            assert_eq!(by(&out), [Leader, Released, Released], "{status} {pairs:?}");
            let calls: Vec<_> = out.iter().map(Read::text).collect();
            assert_eq!(calls, ["0", "1", "2"], "{status}: each its own call");
            assert_eq!(backend.calls(), 3);
        }
    }
}

/// A redirect whose `Location` is built from the authority (`Host`, `X-Forwarded-Host`,
/// absolute URI) only goes to requests with that same authority.
#[tokio::test(start_paused = true)]
async fn redirect_locations_never_cross_authorities() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|_, req| {
        let host = [
            hv(req, "x-forwarded-host"),
            hv(req, "host"),
            req.uri().host().unwrap_or("").to_owned(),
        ]
        .into_iter()
        .find(|h| !h.is_empty())
        .unwrap_or_default();
        // Explicitly fresh: a plain `302` would not be shared at all (RFC 9111 §3).
        let location = format!("https://{host}/login");
        res(
            302,
            &[("location", &location), ("cache-control", "max-age=60")],
            "",
        )
    }));
    let reqs = vec![
        get("/account", &[("host", "a.test")]),
        get("/account", &[("host", "evil.test")]),
        get(
            "/account",
            &[("host", "a.test"), ("x-forwarded-host", "evil.test")],
        ),
        get("http://evil.test/account", &[]),
        get("/account", &[("host", "a.test")]),
    ];
    let out = burst(&mut svc, &backend, reqs, 4).await;
    assert_eq!(out[0].header("location"), "https://a.test/login");
    assert_eq!(out[4].header("location"), "https://a.test/login");
    assert_eq!(out[4].by, Follower);
    for r in &out[1..4] {
        assert_eq!(r.header("location"), "https://evil.test/login");
    }
}

/// `HEAD` and `GET` are coalesced apart. A `HEAD` answer's `Content-Length` describes the
/// `GET` body, so a huge one is no reason not to share it; the same header on a `GET` answer
/// is (the body would exceed the limit), even if the body actually sent is short.
#[tokio::test(start_paused = true)]
async fn head_shares_a_huge_content_length_get_does_not() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().max_body_bytes(16);
    let mut svc = layer.layer(backend.service(|n, req| {
        let body = if req.method() == Method::HEAD {
            String::new()
        } else {
            format!("get {n}")
        };
        res(200, &[("content-length", "10000000")], body)
    }));
    let reqs = vec![
        head("/iso", &[]),
        get("/iso", &[]),
        head("/iso", &[]),
        get("/iso", &[]),
    ];
    let out = burst(&mut svc, &backend, reqs, 2).await;
    assert_eq!(by(&out), [Leader, Leader, Follower, Released]);
    assert!(out[0].body.is_empty() && out[2].body.is_empty());
    assert_eq!(out[2].header("content-length"), "10000000");
    assert_eq!(out[1].text(), "get 1");
    assert_eq!(out[3].text(), "get 2", "a HEAD answer never reaches a GET");
    assert_eq!(backend.calls(), 3);
}

/// A `HEAD` answered with the `GET` body (as axum's handlers do; axum drops the body only
/// after the layer): the body, over the limit here, is not read, its length goes into
/// `Content-Length`, and the `HEAD` followers share the call instead of being released as too
/// large.
#[tokio::test(start_paused = true)]
async fn head_answered_with_a_get_body_over_the_limit_is_shared_unread() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().max_body_bytes(16);
    let mut svc = layer.layer(backend.service(|n, _| res(200, &[], format!("{n:0>64}"))));
    let reqs = vec![head("/h", &[]), head("/h", &[]), head("/h", &[])];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    assert_eq!(by(&out), [Leader, Follower, Follower]);
    for r in &out {
        assert!(r.body.is_empty());
        assert_eq!(r.header("content-length"), "64");
    }
    assert_eq!(backend.calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// What a copy carries
// ---------------------------------------------------------------------------------------------

/// Hop-by-hop fields (`Connection: close` and the fields it names, `Keep-Alive`) are meant
/// for the leader's connection: the leader's response keeps them, the followers' copies go
/// without (RFC 9110 §7.6.1 has an intermediary drop them). They were once handed to every
/// follower too.
#[tokio::test(start_paused = true)]
async fn copies_carry_the_leaders_hop_by_hop_headers_to_the_leader_only() {
    let pairs: &'static [(&str, &str)] = &[
        ("connection", "close, x-hop"),
        ("x-hop", "for-the-leaders-connection"),
        ("keep-alive", "timeout=5"),
    ];
    let (out, calls) = leader_and_two(pairs).await;
    assert_eq!(calls, 1);
    assert_eq!(by(&out), [Leader, Follower, Follower]);
    assert_eq!(out[0].header("connection"), "close, x-hop");
    assert_eq!(out[0].header("x-hop"), "for-the-leaders-connection");
    for r in &out[1..] {
        for name in ["connection", "x-hop", "keep-alive"] {
            assert!(!r.headers.contains_key(name), "{name} on a follower's copy");
        }
    }
}

/// Copies keep the leader's `Date` and get no `Age` (RFC 9111 §4 has a cache that reuses a
/// response generate one; with entries living only in flight it would be 0).
#[tokio::test(start_paused = true)]
async fn copies_keep_the_leaders_date_and_get_no_age() {
    let pairs: &'static [(&str, &str)] = &[("date", "Sat, 01 Jan 2000 00:00:00 GMT")];
    let (out, _) = leader_and_two(pairs).await;
    for r in &out {
        assert_eq!(r.header("date"), "Sat, 01 Jan 2000 00:00:00 GMT");
        assert!(!r.headers.contains_key(header::AGE));
    }
}

/// The protocol version is not in the key: an HTTP/1.0 and an HTTP/2 request join an HTTP/1.1
/// leader and get its response, version included (documented: "same status, version").
#[tokio::test(start_paused = true)]
async fn versions_coalesce_and_copies_carry_the_leaders_version() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|_, req| {
        let mut r = res(200, &[], format!("{:?}", req.version()));
        *r.version_mut() = req.version();
        r
    }));
    let with = |v: Version| {
        let mut r = get("/v", &[("host", "a.test")]);
        *r.version_mut() = v;
        r
    };
    let reqs = vec![
        with(Version::HTTP_11),
        with(Version::HTTP_10),
        with(Version::HTTP_2),
    ];
    let out = burst(&mut svc, &backend, reqs, 1).await;
    assert_eq!(by(&out), [Leader, Follower, Follower]);
    for r in &out {
        assert_eq!(r.version, Version::HTTP_11);
        assert_eq!(r.text(), "HTTP/1.1");
    }
}

/// Request extensions are not in the key (only through `.identity`): a handler that reads the
/// peer address (axum's `ConnectInfo`) answers the leader's peer to everybody; the identity
/// is the documented way to split on it.
#[tokio::test(start_paused = true)]
async fn request_extensions_are_not_keyed_unless_through_identity() {
    #[derive(Clone)]
    struct Peer(&'static str);
    for split in [false, true] {
        let backend = Backend::new();
        let mut layer = CoalesceHttpLayer::new();
        if split {
            layer = layer.identity(|p: &Parts| p.extensions.get::<Peer>().map(|p| p.0));
        }
        let mut svc = layer.layer(backend.service(|_, req| {
            res(
                200,
                &[],
                format!("your ip: {}", req.extensions().get::<Peer>().unwrap().0),
            )
        }));
        let from = |ip: &'static str| {
            let mut r = get("/ip", &[]);
            r.extensions_mut().insert(Peer(ip));
            r
        };
        let reqs = vec![from("192.0.2.1"), from("198.51.100.7")];
        let out = burst(&mut svc, &backend, reqs, if split { 2 } else { 1 }).await;
        let expected = if split { "198.51.100.7" } else { "192.0.2.1" };
        assert_eq!(
            out[1].text(),
            format!("your ip: {expected}"),
            "split: {split}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// URIs and authority
// ---------------------------------------------------------------------------------------------

/// "The URI exactly, the host ignoring case": a host in another case shares (RFC 3986 §6.2.2.1),
/// a fragment is not part of `http::Uri`; an explicit default port, an empty query, another
/// form (absolute vs origin), a `Host` header in another case and a percent-encoded
/// unreserved character all get their own call (conservative).
#[tokio::test(start_paused = true)]
async fn uri_variants_share_only_when_equivalent_for_the_handler() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(
        backend.service(|n, req| res(200, &[], format!("{n}:{}:{}", req.uri(), hv(req, "host")))),
    );
    let h = |v: &'static str| [("host", v)];
    let reqs = vec![
        get("http://a.test/x", &[]),          // 0: flight A
        get("http://A.TEST/x", &[]),          // 1: joins A
        get("http://a.test:80/x", &[]),       // 2: own
        get("/x", &h("a.test")),              // 3: flight B
        get("/x#frag", &h("a.test")),         // 4: joins B
        get("/x?", &h("a.test")),             // 5: own
        get("/x", &h("A.TEST")),              // 6: own
        get("/%78", &h("a.test")),            // 7: own
        get("http://a.test/x", &h("a.test")), // 8: own (absolute form with Host)
    ];
    let out = burst(&mut svc, &backend, reqs, 7).await;
    assert_eq!(
        by(&out),
        [Leader, Follower, Leader, Leader, Follower, Leader, Leader, Leader, Leader]
    );
    assert_eq!(out[1].text(), out[0].text());
    assert_eq!(out[4].text(), out[3].text());
    assert_eq!(out[2].text(), "1:http://a.test:80/x:");
    assert_eq!(out[5].text(), "3:/x?:a.test");
    assert_eq!(out[6].text(), "4:/x:A.TEST");
}

/// Rule 3: every header that carries the authority (`Host`, `Forwarded`, `X-Forwarded-Host`,
/// `-Proto`, `-Port`, `-Prefix`) splits flights; `X-Forwarded-For` / `X-Real-IP` do not
/// (documented list; a handler that reads them must key them).
#[tokio::test(start_paused = true)]
async fn forwarding_headers_split_but_client_address_headers_do_not() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let echoed = [
        "host",
        "forwarded",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-for",
    ];
    let mut svc = layer.layer(backend.service(move |_, req| {
        let echo: Vec<String> = echoed.iter().map(|n| hv(req, n)).collect();
        res(200, &[], echo.join(";"))
    }));
    let base = ("host", "a.test");
    let reqs = vec![
        get("/p", &[base]),
        get("/p", &[base, ("forwarded", "host=evil.test")]),
        get("/p", &[base, ("x-forwarded-host", "evil.test")]),
        get("/p", &[base, ("x-forwarded-proto", "http")]),
        get("/p", &[base, ("x-forwarded-port", "8443")]),
        get("/p", &[base, ("x-forwarded-prefix", "/evil")]),
        get("/p", &[("host", "evil.test")]),
        get("/p", &[base, ("x-forwarded-for", "203.0.113.9")]),
        get("/p", &[base, ("x-real-ip", "203.0.113.9")]),
    ];
    let mine: Vec<String> = reqs
        .iter()
        .map(|r| {
            echoed
                .iter()
                .map(|n| hv(r, n))
                .collect::<Vec<_>>()
                .join(";")
        })
        .collect();
    let out = burst(&mut svc, &backend, reqs, 7).await;
    for i in 0..7 {
        assert_eq!(out[i].text(), mine[i], "request {i}");
    }
    assert_eq!((out[7].by, out[8].by), (Follower, Follower));
    assert_eq!(
        out[7].text(),
        mine[0],
        "X-Forwarded-For is not keyed (documented)"
    );
}

// ---------------------------------------------------------------------------------------------
// Unsafe methods and invalidation (RFC 9111 §4.4)
// ---------------------------------------------------------------------------------------------

/// Unsafe methods always reach the handler, one by one, even while an identical-URI `GET`
/// flight is in progress; they never get the `GET`'s answer.
#[tokio::test(start_paused = true)]
async fn unsafe_methods_never_join_read_flights() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc =
        layer.layer(backend.service(|n, req| res(200, &[], format!("{n}:{}", req.method()))));
    let mut read_flight = Box::pin(svc.call(get("/doc", &[])));
    assert!(poll!(&mut read_flight).is_pending());
    for (i, m) in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH]
        .into_iter()
        .enumerate()
    {
        let out = read(svc.call(req(m.clone(), "/doc", &[])).await.unwrap()).await;
        assert_eq!((out.by, out.text()), (Bypass, format!("{}:{m}", i + 1)));
    }
    backend.open();
    let out = read(settle("get", read_flight).await.unwrap()).await;
    assert_eq!(out.text(), "0:GET");
}

/// RFC 9111 §4.4: "A cache MUST invalidate the target URI ... when it receives a non-error
/// status code in response to an unsafe request method". The layer passes a `PUT` through, and
/// a `GET` sent *after* the `PUT`'s `200` still joins a `GET` flight that read the data before
/// the write: the client reads its own write back as the old value (a read-your-writes
/// violation no shared cache would commit).
#[tokio::test(start_paused = true)]
async fn get_after_successful_put_never_joins_an_older_flight() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let version = Arc::new(AtomicUsize::new(0));
    let v = version.clone();
    let mut svc = layer.layer(backend.service(move |_, req| {
        if req.method() == Method::PUT {
            v.fetch_add(1, SeqCst);
            res(204, &[], "")
        } else {
            res(200, &[], format!("v{}", v.load(SeqCst)))
        }
    }));
    // Somebody's slow GET reads v0 and is still rendering.
    let mut old = Box::pin(svc.call(get("/profile", &[])));
    assert!(poll!(&mut old).is_pending());
    // The user saves, gets 204, then reloads.
    let put = read(svc.call(req(Method::PUT, "/profile", &[])).await.unwrap()).await;
    assert_eq!(put.status, 204);
    assert_eq!(version.load(SeqCst), 1);
    let mut reload = Box::pin(svc.call(get("/profile", &[])));
    assert!(poll!(&mut reload).is_pending());
    backend.open();
    let (old, reload) = settle("gets", futures::future::join(old, reload)).await;
    assert_eq!(read(old.unwrap()).await.text(), "v0");
    let reload = read(reload.unwrap()).await;
    assert_eq!(
        reload.text(),
        "v1",
        "the reload after the PUT got pre-write data ({:?})",
        reload.by
    );
}
