//! Black-box adversarial tests of the HTTP and gRPC adapters, through the public API only.
//!
//! Each test pins one rule of `DESIGN.md` ("HTTP and gRPC", and rules 1-8 of "The contract")
//! against inputs the other suites do not try: odd trailers, lying size hints, bodies that
//! panic or fail before their first byte, URIs and headers that differ only slightly, status
//! codes without a body, and gRPC responses whose status hides in unusual places.
//!
//! No real time passes: tests run on a paused clock, backends are held behind a gate
//! (`watch`) and released followers meet at a `Barrier` (which only opens if they all call at
//! once). Every wait is bounded by a (virtual) timeout, so a hang fails the test.
#![cfg(feature = "grpc")]

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use futures::{poll, FutureExt};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::{watch, Barrier};
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, ServedBy};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

type TestBody = UnsyncBoxBody<Bytes, BoxError>;
type Req = Request<Full<Bytes>>;
type Answer = Pin<Box<dyn Future<Output = Result<Response<TestBody>, BoxError>> + Send>>;

const GRPC_PATH: &str = "/catalog.v1.Catalog/GetItem";

/// Fails the test if `f` does not finish within a minute of (virtual) time: a hang.
async fn settle<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung"))
}

fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn frames(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> TestBody {
    StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
}

fn data(s: impl Into<Bytes>) -> Result<Frame<Bytes>, BoxError> {
    Ok(Frame::data(s.into()))
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn trailers(pairs: &[(&str, &str)]) -> Result<Frame<Bytes>, BoxError> {
    Ok(Frame::trailers(headers(pairs)))
}

fn now(res: Response<TestBody>) -> Answer {
    Box::pin(async move { Ok(res) })
}

/// A backend that numbers its calls from 0, holds each behind a gate until the test opens it,
/// then answers with the test's `answer(n, request)`.
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

    fn opened() -> Self {
        let backend = Backend::new();
        backend.open();
        backend
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    fn service<R, F>(
        &self,
        answer: F,
    ) -> impl Service<R, Response = Response<TestBody>, Error = BoxError, Future = Answer>
           + Clone
           + Send
           + 'static
    where
        R: Send + 'static,
        F: Fn(usize, R) -> Answer + Send + Sync + 'static,
    {
        let calls = self.calls.clone();
        let gate = self.gate.clone();
        let answer = Arc::new(answer);
        service_fn(move |req: R| -> Answer {
            let n = calls.fetch_add(1, SeqCst);
            let mut gate = gate.subscribe();
            let answer = answer.clone();
            Box::pin(async move {
                gate.wait_for(|open| *open).await.expect("gate");
                answer(n, req).await
            })
        })
    }
}

fn get(uri: &str) -> Req {
    Request::get(uri).body(Full::new(Bytes::new())).unwrap()
}

fn get_with(uri: &str, pairs: &[(&str, &str)]) -> Req {
    let mut req = get(uri);
    *req.headers_mut() = headers(pairs);
    req
}

/// Everything a waiter got.
#[derive(Debug)]
struct Read {
    by: ServedBy,
    status: StatusCode,
    headers: HeaderMap,
    data: Vec<u8>,
    /// Every trailers frame, in order.
    trailers: Vec<HeaderMap>,
    error: Option<String>,
}

impl Read {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    fn trailer_values(&self, name: &str) -> Vec<String> {
        self.trailers
            .iter()
            .flat_map(|t| t.get_all(name).iter())
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }
}

async fn read<B>(res: Response<CoalesceBody<B>>) -> Read
where
    B: Body,
    B::Error: std::fmt::Display,
{
    let by = *res
        .extensions()
        .get::<ServedBy>()
        .expect("every response is marked");
    let (parts, body) = res.into_parts();
    let mut body = std::pin::pin!(body);
    let mut out = Read {
        by,
        status: parts.status,
        headers: parts.headers,
        data: Vec::new(),
        trailers: Vec::new(),
        error: None,
    };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(d) => out.data.extend_from_slice(&d),
                Err(frame) => out.trailers.extend(frame.into_trailers().ok()),
            },
            Err(e) => {
                out.error = Some(e.to_string());
                break;
            }
        }
    }
    out
}

/// Calls `svc` with every request before polling any (so each request after the first of a
/// key joins that key's flight), polls them all once with the backend's gate shut, checks that
/// `expect_calls` calls reached it, opens the gate and reads every response.
async fn burst<S, R, B>(
    svc: &mut S,
    backend: &Backend,
    reqs: Vec<R>,
    expect_calls: usize,
) -> Vec<Result<Read, S::Error>>
where
    S: Service<R, Response = Response<CoalesceBody<B>>>,
    B: Body,
    B::Error: std::fmt::Display,
{
    let mut all = Box::pin(join_all(reqs.into_iter().map(|r| svc.call(r))));
    assert!(poll!(&mut all).is_pending(), "the gate holds every call");
    assert_eq!(backend.calls(), expect_calls, "calls before the gate opens");
    backend.open();
    let mut out = Vec::new();
    for res in settle("burst", all).await {
        out.push(match res {
            Ok(res) => Ok(read(res).await),
            Err(e) => Err(e),
        });
    }
    out
}

/// A flag raised when dropped: proves a future or a body was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// A response body that lies about its size.
struct Lying {
    inner: TestBody,
    hint: SizeHint,
}

impl Body for Lying {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// A body that yields one data frame, then panics.
struct Panicking {
    sent: bool,
}

impl Body for Panicking {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.sent {
            panic!("response body panicked mid-stream");
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"partial")))))
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: which requests share
// ---------------------------------------------------------------------------------------------

/// HTTP rule "HEAD vs GET never share": concurrent GETs and HEADs of one URI make one call per
/// method, and each waiter gets its own method's response.
#[tokio::test(start_paused = true)]
async fn http_head_and_get_never_share_a_response() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|n, req: Req| {
        let head = req.method() == Method::HEAD;
        now(Response::builder()
            .header("content-length", "5")
            .header("x-method", req.method().as_str())
            .header("x-call", n.to_string())
            .body(if head { full("") } else { full("hello") })
            .unwrap())
    }));
    let head = || Request::head("/r").body(Full::new(Bytes::new())).unwrap();
    let reqs = vec![get("/r"), head(), get("/r"), head(), get("/r"), head()];
    let reads = burst(&mut svc, &backend, reqs, 2).await;
    for (i, read) in reads.into_iter().enumerate() {
        let read = read.unwrap();
        if i % 2 == 0 {
            assert_eq!(read.headers["x-method"], "GET");
            assert_eq!(read.text(), "hello");
        } else {
            assert_eq!(read.headers["x-method"], "HEAD");
            assert!(read.data.is_empty(), "a HEAD response has no body");
        }
        let expected = if i < 2 {
            ServedBy::Leader
        } else {
            ServedBy::Follower
        };
        assert_eq!(read.by, expected, "request {i}");
    }
    assert_eq!(backend.calls(), 2);
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

/// HTTP rule "conditional headers go into the key": validators that differ in case or
/// weakness never share, and a bodiless `304` (with a `Content-Length` far over the limit,
/// which describes the full representation) is shared among identical conditional requests.
#[tokio::test(start_paused = true)]
async fn http_conditional_validators_split_flights_and_304_is_shared() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().max_body_bytes(16);
    let mut svc = layer.layer(backend.service(|n, req: Req| {
        let inm = req.headers().get("if-none-match").cloned();
        let ims = req.headers().get("if-modified-since").cloned();
        let mut res = Response::builder()
            .header("x-call", n.to_string())
            .header("content-length", "10000000");
        res = match (&inm, &ims) {
            (None, None) => res.status(200).header("content-length", "4"),
            _ => res.status(304),
        };
        let echo = format!("{inm:?}|{ims:?}");
        let res = res.header("x-echo", echo).body(full("")).unwrap();
        now(res)
    }));
    let variants: [&[(&str, &str)]; 5] = [
        &[("if-none-match", "\"abc\"")],
        &[("if-none-match", "\"ABC\"")],
        &[("if-none-match", "W/\"abc\"")],
        &[("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT")],
        &[("if-modified-since", "Sat, 01 Jan 2000 00:00:01 GMT")],
    ];
    let mut reqs = Vec::new();
    for _ in 0..3 {
        for v in variants {
            reqs.push(get_with("/doc", v));
        }
    }
    let reads = burst(&mut svc, &backend, reqs, variants.len()).await;
    for (i, read) in reads.into_iter().enumerate() {
        let read = read.unwrap();
        let mine = variants[i % variants.len()];
        let inm = headers(mine).get("if-none-match").cloned();
        let ims = headers(mine).get("if-modified-since").cloned();
        assert_eq!(
            read.headers["x-echo"],
            format!("{inm:?}|{ims:?}").as_str(),
            "request {i} got another validator's answer"
        );
        assert_eq!(read.status, StatusCode::NOT_MODIFIED);
        if i >= variants.len() {
            assert_eq!(read.by, ServedBy::Follower, "a 304 has no body to exceed");
        }
    }
    assert_eq!(backend.calls(), variants.len());
}

/// HTTP key: URIs that differ in query order, percent-encoding, case, a trailing `/` or `?`,
/// or only in the last byte of a very long path, never share; identical long URIs do.
#[tokio::test(start_paused = true)]
async fn http_uris_that_differ_slightly_never_share() {
    let long = "x".repeat(16 * 1024);
    let pairs: Vec<(String, String)> = vec![
        ("/a?x=1&y=2".into(), "/a?y=2&x=1".into()),
        ("/a%2Fb".into(), "/a/b".into()),
        ("/a%2fb".into(), "/a%2Fb".into()),
        ("/%7Euser".into(), "/~user".into()),
        ("/a".into(), "/a/".into()),
        ("/a".into(), "/a?".into()),
        ("/A".into(), "/a".into()),
        ("/q?v=a+b".into(), "/q?v=a%20b".into()),
        (format!("/{long}a"), format!("/{long}b")),
        ("http://one.test/a".into(), "http://one.test:8080/a".into()),
    ];
    for (a, b) in pairs {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer
            .layer(backend.service(|_, req: Req| now(Response::new(full(req.uri().to_string())))));
        let reqs = vec![get(&a), get(&b), get(&a), get(&b)];
        let reads = burst(&mut svc, &backend, reqs, 2).await;
        for (i, read) in reads.into_iter().enumerate() {
            let mine = if i % 2 == 0 { &a } else { &b };
            let read = read.unwrap();
            let got = read.text();
            assert!(
                got == *mine || got.ends_with(mine.as_str()),
                "{a:.40} / {b:.40}: request {i} got {got:.60}"
            );
        }
        assert_eq!(backend.calls(), 2, "{a:.40} / {b:.40}");
    }
    // Identical very long URIs and headers still share one call.
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc =
        layer.layer(backend.service(|n, _: Req| now(Response::new(full(format!("{n}"))))));
    let big = "v".repeat(32 * 1024);
    let reqs: Vec<_> = (0..5)
        .map(|_| get_with(&format!("/{long}"), &[("accept", &big)]))
        .collect();
    let reads = burst(&mut svc, &backend, reqs, 1).await;
    assert!(reads.iter().all(|r| r.as_ref().unwrap().text() == "0"));
}

/// HTTP key ("the URI ... exactly"): the userinfo of an absolute URI is case-sensitive
/// (RFC 3986 §6.2.2.1) and carries credentials, so `alice:secret@` and `alice:SECRET@` must
/// never share a response.
#[tokio::test(start_paused = true)]
async fn http_userinfo_differing_in_case_never_shares() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc =
        layer.layer(backend.service(|_, req: Req| now(Response::new(full(req.uri().to_string())))));
    let a = "http://alice:secret@one.test/me";
    let b = "http://alice:SECRET@one.test/me";
    let reqs = vec![get(a), get(b)];
    // Both must reach the backend (or at least bypass): two calls.
    let mut all = Box::pin(join_all(reqs.into_iter().map(|r| svc.call(r))));
    assert!(poll!(&mut all).is_pending());
    backend.open();
    let reads = settle("userinfo", all).await;
    let b_read = read(reads.into_iter().nth(1).unwrap().unwrap()).await;
    assert_eq!(b_read.text(), b, "the second caller got the first's answer");
    assert_eq!(backend.calls(), 2);
}

/// HTTP key: repeated values of a key header in another order, values differing only in case,
/// never share; headers outside the key in any order do.
#[tokio::test(start_paused = true)]
async fn http_key_header_order_and_case_of_values() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|_, req: Req| {
        let accept: Vec<_> = req
            .headers()
            .get_all("accept")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let lang = req
            .headers()
            .get("accept-language")
            .map(|v| v.to_str().unwrap().to_owned());
        now(Response::new(full(format!("{accept:?}|{lang:?}"))))
    }));
    let mk = |accept: &[&str], lang: Option<&str>, junk: &[(&str, &str)]| {
        let mut req = get("/k");
        for a in accept {
            req.headers_mut().append("accept", a.parse().unwrap());
        }
        if let Some(l) = lang {
            req.headers_mut()
                .insert("accept-language", l.parse().unwrap());
        }
        for (n, v) in junk {
            req.headers_mut().append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        req
    };
    let reqs = vec![
        mk(&["a", "b"], None, &[("x-1", "1"), ("x-2", "2")]),
        mk(&["b", "a"], None, &[]),
        mk(&["a"], Some("en"), &[]),
        mk(&["a"], Some("EN"), &[]),
        // Joins request 0: only headers outside the key differ (and their order).
        mk(&["a", "b"], None, &[("x-2", "2"), ("x-1", "1")]),
        mk(&["b", "a"], None, &[("user-agent", "z")]),
        mk(&["a"], Some("EN"), &[]),
    ];
    let expected: Vec<String> = vec![
        r#"["a", "b"]|None"#.into(),
        r#"["b", "a"]|None"#.into(),
        r#"["a"]|Some("en")"#.into(),
        r#"["a"]|Some("EN")"#.into(),
        r#"["a", "b"]|None"#.into(),
        r#"["b", "a"]|None"#.into(),
        r#"["a"]|Some("EN")"#.into(),
    ];
    let reads = burst(&mut svc, &backend, reqs, 4).await;
    for (i, read) in reads.into_iter().enumerate() {
        let read = read.unwrap();
        assert_eq!(read.text(), expected[i], "request {i}");
        if i >= 4 {
            assert_eq!(read.by, ServedBy::Follower, "request {i}");
        }
    }
    assert_eq!(backend.calls(), 4);
}

/// HTTP rule "Upgrade/CONNECT bypass": `CONNECT` bypasses even when configured as a method;
/// a configured `POST` coalesces only without a body; a `GET` with `Content-Length: 0` is no
/// body and coalesces.
#[tokio::test(start_paused = true)]
async fn http_connect_bypasses_even_when_configured() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().methods([Method::CONNECT, Method::GET, Method::POST]);
    let mut svc =
        layer.layer(backend.service(|n, _: Req| now(Response::new(full(format!("{n}"))))));
    let connect = || {
        Request::connect("one.test:443")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let reads = burst(&mut svc, &backend, vec![connect(), connect(), connect()], 3).await;
    assert!(reads
        .iter()
        .all(|r| r.as_ref().unwrap().by == ServedBy::Bypass));

    let backend = Backend::new();
    let mut svc =
        layer.layer(backend.service(|n, _: Req| now(Response::new(full(format!("{n}"))))));
    let post = |body: &'static [u8]| {
        Request::post("/p")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    };
    let reqs = vec![
        post(b""),
        post(b""),
        post(b"1"),
        post(b"1"),
        get_with("/p", &[("content-length", "0")]),
        get_with("/p", &[("content-length", "0")]),
    ];
    let reads = burst(&mut svc, &backend, reqs, 4).await;
    let by: Vec<_> = reads.iter().map(|r| r.as_ref().unwrap().by).collect();
    assert_eq!(
        by,
        [
            ServedBy::Leader,
            ServedBy::Follower,
            ServedBy::Bypass,
            ServedBy::Bypass,
            ServedBy::Leader,
            ServedBy::Follower
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP: which responses share
// ---------------------------------------------------------------------------------------------

/// HTTP rule "never handed to a follower ... released all at once": for each unshareable
/// response (odd spellings of `Set-Cookie`, `private`, `no-store`, `no-cache`, `Vary: *`, a
/// `101`), every follower makes its own call, concurrently (they meet at a barrier), and the
/// leader gets its own response.
#[tokio::test(start_paused = true)]
async fn http_unshareable_responses_release_all_followers_at_once() {
    const FOLLOWERS: usize = 4;
    let cases: Vec<(u16, &[(&str, &str)])> = vec![
        (200, &[("set-cookie", "")]),
        (404, &[("set-cookie", "a=1"), ("cache-control", "public")]),
        (200, &[("cache-control", "public,PRIVATE")]),
        (
            200,
            &[
                ("cache-control", "max-age=60"),
                ("cache-control", "\tno-store"),
            ],
        ),
        (
            200,
            &[("cache-control", "no-cache=\"set-cookie\", max-age=5")],
        ),
        (500, &[("cache-control", "s-maxage=5 , private = \"x\"")]),
        (200, &[("vary", "accept-encoding"), ("vary", " * ")]),
        (200, &[("vary", "Accept,*")]),
        (101, &[("upgrade", "websocket")]),
    ];
    for (status, extra) in cases {
        let backend = Backend::new();
        let barrier = Arc::new(Barrier::new(FOLLOWERS));
        let layer = CoalesceHttpLayer::new();
        let extra = headers(extra);
        let mut svc = layer.layer(backend.service(move |n, _: Req| {
            let barrier = barrier.clone();
            let mut res = Response::new(full(format!("call {n}")));
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            *res.headers_mut() = extra.clone();
            Box::pin(async move {
                if n > 0 {
                    // Opens only if every released follower is calling at the same time.
                    barrier.wait().await;
                }
                Ok(res)
            })
        }));
        let reqs = (0..=FOLLOWERS).map(|_| get("/u")).collect();
        let reads = burst(&mut svc, &backend, reqs, 1).await;
        let mut bodies = Vec::new();
        for (i, read) in reads.into_iter().enumerate() {
            let read = read.unwrap();
            assert_eq!(read.status.as_u16(), status);
            let expected = if i == 0 {
                ServedBy::Leader
            } else {
                ServedBy::Released
            };
            assert_eq!(read.by, expected, "status {status}, request {i}");
            bodies.push(read.text());
        }
        assert_eq!(bodies[0], "call 0", "the leader gets its own response");
        bodies.sort();
        bodies.dedup();
        assert_eq!(
            bodies.len(),
            FOLLOWERS + 1,
            "every follower has its own call"
        );
        assert_eq!(backend.calls(), FOLLOWERS + 1);
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    }
}

/// HTTP rule "keep the trailers ... nothing is lost": a body that ends with two trailers
/// frames naming the same field must not lose the first frame's value.
#[tokio::test(start_paused = true)]
async fn http_values_from_every_trailers_frame_are_kept() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|_, _: Req| {
        now(Response::new(frames(vec![
            data("body"),
            trailers(&[("x-checksum", "first")]),
            trailers(&[("x-checksum", "second"), ("x-other", "o")]),
        ])))
    }));
    let reads = burst(&mut svc, &backend, vec![get("/t"), get("/t")], 1).await;
    for read in reads {
        let read = read.unwrap();
        assert_eq!(read.text(), "body");
        assert_eq!(read.trailer_values("x-other"), ["o"]);
        assert!(
            read.trailer_values("x-checksum")
                .contains(&"first".to_owned()),
            "{:?} lost the first trailers frame: {:?}",
            read.by,
            read.trailers
        );
    }
    // Replayed to each caller as it came (two trailers frames), so not shared.
    assert_eq!(backend.calls(), 2);
}

/// HTTP rule "rebuild a response per waiter": an empty body, and a body made only of trailers,
/// reach every follower intact (status, headers, no data, trailers).
#[tokio::test(start_paused = true)]
async fn http_empty_and_trailers_only_bodies_are_shared_intact() {
    for with_trailers in [false, true] {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(backend.service(move |_, _: Req| {
            let body = if with_trailers {
                frames(vec![trailers(&[("x-t", "1"), ("x-t", "2")])])
            } else {
                full("")
            };
            now(Response::builder()
                .status(203)
                .header("x-a", "a")
                .body(body)
                .unwrap())
        }));
        let reqs = (0..4).map(|_| get("/e")).collect();
        let reads = burst(&mut svc, &backend, reqs, 1).await;
        for (i, read) in reads.into_iter().enumerate() {
            let read = read.unwrap();
            assert_eq!(read.status, 203);
            assert_eq!(read.headers["x-a"], "a");
            assert!(read.data.is_empty());
            assert!(read.error.is_none());
            if with_trailers {
                assert_eq!(read.trailer_values("x-t"), ["1", "2"], "request {i}");
            } else {
                assert!(read.trailers.is_empty());
            }
            if i > 0 {
                assert_eq!(read.by, ServedBy::Follower);
            }
        }
        assert_eq!(backend.calls(), 1);
    }
}

/// HTTP rule "over the limit ... nothing truncated": a stream of thousands of 1-byte frames
/// exactly at the limit is shared byte for byte; one byte more goes whole to the leader (even
/// one that drops it unread does not stall anyone) and the followers call.
#[tokio::test(start_paused = true)]
async fn http_many_frames_at_and_over_the_limit() {
    const LIMIT: usize = 4096;
    for len in [LIMIT, LIMIT + 1] {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new().max_body_bytes(LIMIT);
        let mut svc = layer.layer(backend.service(move |n, _: Req| {
            let tag = b'a' + n as u8;
            let chunks = (0..len)
                .map(|i| data(vec![if i == 0 { tag } else { b'0' + (i % 10) as u8 }]))
                .chain([trailers(&[("x-len", &len.to_string())])])
                .collect();
            now(Response::new(frames(chunks)))
        }));
        let mut calls = Box::pin(join_all((0..3).map(|_| svc.call(get("/big")))));
        assert!(poll!(&mut calls).is_pending());
        backend.open();
        let mut responses = settle("many frames", calls).await.into_iter();
        // The leader walks away from its response without reading a byte.
        let leader = responses.next().unwrap().unwrap();
        assert_eq!(
            leader.extensions().get::<ServedBy>(),
            Some(&ServedBy::Leader)
        );
        drop(leader);
        for (i, res) in responses.enumerate() {
            let read = settle("follower body", read(res.unwrap())).await;
            assert_eq!(read.data.len(), len, "follower {i}");
            assert!(read.error.is_none());
            assert_eq!(read.trailer_values("x-len"), [len.to_string()]);
            let expected_by = if len <= LIMIT {
                ServedBy::Follower
            } else {
                ServedBy::Released
            };
            assert_eq!(read.by, expected_by, "len {len}");
            for (j, byte) in read.data.iter().enumerate().skip(1) {
                assert_eq!(*byte, b'0' + (j % 10) as u8, "byte {j}");
            }
        }
        let expected_calls = if len <= LIMIT { 1 } else { 3 };
        assert_eq!(backend.calls(), expected_calls, "len {len}");
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    }
    // And when the leader reads its over-limit body it gets all of it.
    let backend = Backend::opened();
    let layer = CoalesceHttpLayer::new().max_body_bytes(LIMIT);
    let mut svc = layer.layer(backend.service(|_, _: Req| {
        let chunks = (0..LIMIT + 100).map(|_| data("z")).collect();
        now(Response::new(frames(chunks)))
    }));
    let read = read(settle("leader", svc.call(get("/big"))).await.unwrap()).await;
    assert_eq!(read.data.len(), LIMIT + 100);
}

/// HTTP rule "nothing lost, nothing truncated" with bodies whose `size_hint` lies: too small
/// (more data than announced, over the limit), too large (less data than announced).
#[tokio::test(start_paused = true)]
async fn http_lying_size_hints_never_truncate() {
    // (announced hint, actual length): limit is 10 bytes.
    let cases: [(SizeHint, usize); 3] = [
        (SizeHint::with_exact(1), 100),
        (SizeHint::with_exact(0), 7),
        (
            {
                let mut h = SizeHint::new();
                h.set_lower(1_000_000);
                h
            },
            5,
        ),
    ];
    for (hint, len) in cases {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new().max_body_bytes(10);
        let h = hint;
        let mut svc = layer.layer(backend.service(move |n, _: Req| {
            let chunks = (0..len).map(|_| data(format!("{n}"))).collect();
            let body = Lying {
                inner: frames(chunks),
                hint: h,
            };
            now(Response::new(body.boxed_unsync()))
        }));
        let reqs = (0..3).map(|_| get("/lie")).collect();
        let reads = burst(&mut svc, &backend, reqs, 1).await;
        for (i, read) in reads.into_iter().enumerate() {
            let read = read.unwrap();
            assert_eq!(
                read.data.len(),
                len,
                "hint {hint:?}, request {i}: {:?}",
                read.by
            );
            assert!(read.error.is_none());
        }
    }
}

/// HTTP edge "a body that errors": an error as the very first frame reaches the leader as an
/// error (not as an empty, complete body); the followers make their own calls.
#[tokio::test(start_paused = true)]
async fn http_body_failing_before_its_first_byte() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|n, _: Req| {
        let body = if n == 0 {
            frames(vec![Err("backend reset".into())])
        } else {
            full(format!("call {n}"))
        };
        now(Response::new(body))
    }));
    let reqs = (0..3).map(|_| get("/f")).collect();
    let reads = burst(&mut svc, &backend, reqs, 1).await;
    let reads: Vec<_> = reads.into_iter().map(Result::unwrap).collect();
    assert_eq!(reads[0].by, ServedBy::Leader);
    assert!(reads[0].data.is_empty());
    assert_eq!(reads[0].error.as_deref(), Some("backend reset"));
    for read in &reads[1..] {
        assert_eq!(read.by, ServedBy::Released);
        assert!(read.error.is_none());
        assert!(read.text().starts_with("call "));
    }
    assert_eq!(backend.calls(), 3);
}

/// HTTP + rule 5: a body that panics while the layer buffers it panics again in the leader;
/// the followers make their own calls; nobody hangs; the registry is clean afterwards.
#[tokio::test(start_paused = true)]
async fn http_body_panicking_while_buffered() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(backend.service(|n, _: Req| {
        let body = if n == 0 {
            Panicking { sent: false }.boxed_unsync()
        } else {
            full(format!("call {n}"))
        };
        now(Response::new(body))
    }));
    let leader = svc.call(get("/p"));
    let followers: Vec<_> = (0..3).map(|_| svc.call(get("/p"))).collect();
    backend.open();
    let (leader, followers) = settle(
        "panic",
        futures::future::join(AssertUnwindSafe(leader).catch_unwind(), join_all(followers)),
    )
    .await;
    assert!(leader.is_err(), "the leader sees the panic");
    for f in followers {
        let read = read(f.unwrap()).await;
        assert_eq!(read.by, ServedBy::Released);
        assert!(read.text().starts_with("call "));
    }
    assert_eq!(backend.calls(), 4);
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    // The key works again.
    let again = read(settle("again", svc.call(get("/p"))).await.unwrap()).await;
    assert_eq!(
        (again.by, again.text()),
        (ServedBy::Leader, "call 4".into())
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP: errors, cancellation, composition
// ---------------------------------------------------------------------------------------------

/// A non-`Clone` error of the inner service.
#[derive(Debug)]
struct Refused(usize);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// A backend whose calls wait for `gate` to open; the first fails with [`Refused`], the
/// others answer `call {n}`. Returns it, the gate, and its call counter.
#[allow(clippy::type_complexity)]
fn refusing_first_backend() -> (
    impl Service<Req, Response = Response<TestBody>, Error = Refused, Future = impl Send> + Clone,
    Arc<watch::Sender<bool>>,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(watch::channel(false).0);
    let (c, g) = (calls.clone(), gate.clone());
    let inner = service_fn(move |_: Req| {
        let n = c.fetch_add(1, SeqCst);
        let mut g = g.subscribe();
        async move {
            g.wait_for(|o| *o).await.unwrap();
            if n == 0 {
                Err(Refused(n))
            } else {
                Ok(Response::new(full(format!("call {n}"))))
            }
        }
    });
    (inner, gate, calls)
}

/// HTTP rule "the error type stays the inner service's": a non-`Clone` error comes back to the
/// leader as itself; followers make their own calls; and the layer goes on an axum `Router`
/// (`Infallible`) with no `HandleErrorLayer`.
#[tokio::test(start_paused = true)]
async fn http_error_type_is_the_inner_services() {
    let (inner, gate, calls) = refusing_first_backend();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(inner);
    fn error_is<S: Service<Req, Error = Refused>>(_: &S) {}
    error_is(&svc);
    let mut all = Box::pin(join_all((0..3).map(|_| svc.call(get("/e")))));
    assert!(poll!(&mut all).is_pending());
    gate.send_replace(true);
    let mut out = settle("errors", all).await.into_iter();
    let leader_err: Refused = out.next().unwrap().unwrap_err();
    assert_eq!(leader_err.0, 0);
    for f in out {
        assert_eq!(read(f.unwrap()).await.by, ServedBy::Released);
    }
    assert_eq!(calls.load(SeqCst), 3);

    // On an axum Router: the stacked service is still infallible.
    let router: axum::Router = axum::Router::new()
        .route("/", axum::routing::get(|| async { "hi" }))
        .layer(CoalesceHttpLayer::new());
    fn infallible<S: Service<Request<axum::body::Body>, Error = Infallible>>(_: &S) {}
    infallible(&router);
    let direct = CoalesceHttpLayer::new().layer(router);
    infallible(&direct);
}

/// Rule 4 for HTTP: when every waiter goes away — while the inner call is pending, or while
/// its body is being buffered — the call (or body) is dropped and the key freed; the next
/// request starts a new call.
#[tokio::test(start_paused = true)]
async fn http_last_waiter_gone_cancels_the_call_and_frees_the_key() {
    for during_body in [false, true] {
        let backend = Backend::opened();
        let dropped = Arc::new(AtomicBool::new(false));
        let d = dropped.clone();
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(backend.service(move |n, _: Req| -> Answer {
            let flag = DropFlag(d.clone());
            if n > 0 {
                return now(Response::new(full("fresh")));
            }
            if during_body {
                let stream = futures::stream::unfold((flag, false), |(flag, sent)| async move {
                    if sent {
                        futures::future::pending::<()>().await;
                    }
                    Some((data("first"), (flag, true)))
                });
                now(Response::new(StreamBody::new(stream).boxed_unsync()))
            } else {
                Box::pin(async move {
                    let _flag = flag;
                    futures::future::pending::<()>().await;
                    unreachable!()
                })
            }
        }));
        let mut leader = Box::pin(svc.call(get("/c")));
        let mut follower = Box::pin(svc.call(get("/c")));
        assert!(poll!(&mut leader).is_pending());
        assert!(poll!(&mut follower).is_pending());
        assert_eq!((layer.in_flight(), layer.waiting()), (1, 1));
        assert!(!dropped.load(SeqCst));
        drop(leader);
        // The follower carries the flight on.
        assert!(poll!(&mut follower).is_pending());
        assert!(!dropped.load(SeqCst), "a waiter is left: the call goes on");
        drop(follower);
        assert!(
            dropped.load(SeqCst),
            "during_body={during_body}: call not dropped"
        );
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
        let next = read(settle("next", svc.call(get("/c"))).await.unwrap()).await;
        assert_eq!((next.by, next.text()), (ServedBy::Leader, "fresh".into()));
        assert_eq!(backend.calls(), 2);
    }
}

/// Rule 4 for HTTP: a leader that goes away before its call failed leaves the followers to
/// make their own calls (the leader's error is not handed to them), all of them, none hangs.
#[tokio::test(start_paused = true)]
async fn http_leader_gone_then_inner_error_releases_followers() {
    let (inner, gate, calls) = refusing_first_backend();
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(inner);
    let mut leader = Box::pin(svc.call(get("/g")));
    assert!(poll!(&mut leader).is_pending());
    let mut followers = Box::pin(join_all((0..3).map(|_| svc.call(get("/g")))));
    assert!(poll!(&mut followers).is_pending());
    drop(leader);
    gate.send_replace(true);
    for f in settle("followers", followers).await {
        let read = read(f.expect("the leader's error is not shared")).await;
        assert_eq!(read.by, ServedBy::Released);
    }
    assert_eq!(calls.load(SeqCst), 4);
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

/// Rule 6 for HTTP: a `ConcurrencyLimit(1)` below the layer limits calls, not waiters: two hot
/// keys make two calls; and followers released by an unshareable response queue for the
/// permit one after another without deadlock.
#[tokio::test(start_paused = true)]
async fn http_concurrency_limit_one_below_does_not_defeat_coalescing() {
    for set_cookie in [false, true] {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new();
        let inner = backend.service(move |n, req: Req| {
            let mut res = Response::new(full(format!("{} {n}", req.uri())));
            if set_cookie {
                res.headers_mut()
                    .insert("set-cookie", "s=1".parse().unwrap());
            }
            now(res)
        });
        let mut svc = ServiceBuilder::new()
            .layer(layer.clone())
            .concurrency_limit(1)
            .service(inner);
        let reqs: Vec<_> = (0..20)
            .map(|i| get(if i % 2 == 0 { "/one" } else { "/two" }))
            .collect();
        let mut all = Box::pin(join_all(reqs.into_iter().map(|r| svc.call(r))));
        assert!(poll!(&mut all).is_pending());
        assert_eq!(backend.calls(), 1, "one permit: one call at a time");
        assert_eq!(layer.waiting(), 18);
        backend.open();
        let reads = settle("limit", all).await;
        for (i, r) in reads.into_iter().enumerate() {
            let read = read(r.unwrap()).await;
            let path = if i % 2 == 0 { "/one" } else { "/two" };
            assert!(
                read.text().starts_with(path),
                "request {i}: {}",
                read.text()
            );
        }
        let expected = if set_cookie { 20 } else { 2 };
        assert_eq!(backend.calls(), expected, "set_cookie={set_cookie}");
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------------

type GrpcReq = Request<TestBody>;
type InnerGrpcReq = Request<CoalesceBody<TestBody>>;

/// A gRPC call to `path` whose request message arrives in `chunks`.
fn grpc_call(path: &str, chunks: &[&[u8]], extra: &[(&str, &str)]) -> GrpcReq {
    let body = frames(
        chunks
            .iter()
            .map(|c| data(Bytes::copy_from_slice(c)))
            .collect(),
    );
    let mut req = Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    for (n, v) in extra {
        req.headers_mut().append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req
}

fn grpc_ok(message: impl Into<Bytes>) -> Response<TestBody> {
    Response::builder()
        .header("content-type", "application/grpc")
        .body(frames(vec![
            data(message),
            trailers(&[("grpc-status", "0")]),
        ]))
        .unwrap()
}

/// A gRPC backend that answers `OK` with the call number and the request message it got.
fn echo(n: usize, req: InnerGrpcReq) -> Answer {
    Box::pin(async move {
        let message = req.into_body().collect().await?.to_bytes();
        Ok(grpc_ok(format!(
            "call {n}: {}",
            String::from_utf8_lossy(&message)
        )))
    })
}

/// gRPC rule "only allow-listed unary method paths coalesce": near misses of the path (case,
/// trailing `/`, prefix), a `GET`, gRPC-Web and a doubled content type all bypass; a query on
/// an allow-listed path coalesces apart from the bare path.
#[tokio::test(start_paused = true)]
async fn grpc_allow_list_is_exact() {
    let layer = CoalesceGrpcLayer::new().method(GRPC_PATH);
    let near_misses: Vec<Box<dyn Fn() -> GrpcReq>> = vec![
        Box::new(|| grpc_call("/catalog.v1.catalog/GetItem", &[b"m"], &[])),
        Box::new(|| grpc_call("/catalog.v1.Catalog/GetItem/", &[b"m"], &[])),
        Box::new(|| grpc_call("/catalog.v1.Catalog/GetItems", &[b"m"], &[])),
        Box::new(|| grpc_call("/v2/catalog.v1.Catalog/GetItem", &[b"m"], &[])),
        Box::new(|| grpc_call("/catalog.v1.Catalog/Get%49tem", &[b"m"], &[])),
        Box::new(|| {
            let mut r = grpc_call(GRPC_PATH, &[b"m"], &[]);
            *r.method_mut() = Method::GET;
            r
        }),
        Box::new(|| {
            let mut r = grpc_call(GRPC_PATH, &[b"m"], &[]);
            r.headers_mut()
                .insert("content-type", "application/grpc-web".parse().unwrap());
            r
        }),
        Box::new(|| grpc_call(GRPC_PATH, &[b"m"], &[("content-type", "application/grpc")])),
        Box::new(|| grpc_call(GRPC_PATH, &[b"m"], &[("cookie", "a=b")])),
        Box::new(|| grpc_call(GRPC_PATH, &[b"m"], &[("pragma", "no-cache")])),
    ];
    for (i, make) in near_misses.iter().enumerate() {
        let backend = Backend::new();
        let mut svc = layer.layer(backend.service(echo));
        let reqs = (0..3).map(|_| make()).collect();
        let reads = burst(&mut svc, &backend, reqs, 3).await;
        for read in reads {
            assert_eq!(read.unwrap().by, ServedBy::Bypass, "near miss {i}");
        }
        assert_eq!(backend.calls(), 3, "near miss {i}");
    }
    let backend = Backend::new();
    let mut svc = layer.layer(backend.service(echo));
    let q = format!("{GRPC_PATH}?x=1");
    let reqs = vec![
        grpc_call(GRPC_PATH, &[b"m"], &[]),
        grpc_call(&q, &[b"m"], &[]),
        grpc_call(GRPC_PATH, &[b"m"], &[]),
        grpc_call(&q, &[b"m"], &[]),
    ];
    let reads = burst(&mut svc, &backend, reqs, 2).await;
    let by: Vec<_> = reads.iter().map(|r| r.as_ref().unwrap().by).collect();
    assert_eq!(
        by,
        [
            ServedBy::Leader,
            ServedBy::Leader,
            ServedBy::Follower,
            ServedBy::Follower
        ]
    );
}

/// gRPC rule "the key includes the request message bytes": messages differing in their last
/// byte, or in `grpc-encoding`, never share; the same bytes split into other frames do; the
/// request limit is inclusive, and a message one byte over it bypasses with every byte.
#[tokio::test(start_paused = true)]
async fn grpc_key_is_the_message_bytes_and_encoding() {
    let layer = CoalesceGrpcLayer::new().method(GRPC_PATH).request_limit(8);
    let backend = Backend::new();
    let mut svc = layer.layer(backend.service(echo));
    let reqs = vec![
        grpc_call(GRPC_PATH, &[b"\0\0\0\0\x03abc"], &[]),
        grpc_call(GRPC_PATH, &[b"\0\0\0\0\x03abd"], &[]),
        grpc_call(
            GRPC_PATH,
            &[b"\0\0\0\0\x03abc"],
            &[("grpc-encoding", "gzip")],
        ),
        // Same bytes as request 0, framed differently: a follower of request 0.
        grpc_call(GRPC_PATH, &[b"\0\0", b"\0\0\x03a", b"", b"bc"], &[]),
        grpc_call(GRPC_PATH, &[b"\0\0\0\0\x03abd"], &[]),
    ];
    let reads = burst(&mut svc, &backend, reqs, 3).await;
    let reads: Vec<_> = reads.into_iter().map(Result::unwrap).collect();
    assert!(reads[0].text().ends_with("abc"));
    assert!(reads[1].text().ends_with("abd"));
    assert!(reads[2].text().ends_with("abc"));
    assert_ne!(reads[0].text(), reads[2].text(), "encoding splits the key");
    assert_eq!(
        (reads[3].by, reads[3].text()),
        (ServedBy::Follower, reads[0].text())
    );
    assert_eq!(
        (reads[4].by, reads[4].text()),
        (ServedBy::Follower, reads[1].text())
    );

    // Limit boundary: 8 bytes coalesce, 9 bypass with the whole message.
    let backend = Backend::new();
    let mut svc = layer.layer(backend.service(echo));
    let reqs = vec![
        grpc_call(GRPC_PATH, &[b"12345678"], &[]),
        grpc_call(GRPC_PATH, &[b"12345678"], &[]),
        grpc_call(GRPC_PATH, &[b"1234", b"56789"], &[]),
        grpc_call(GRPC_PATH, &[b"1234", b"56789"], &[]),
    ];
    let mut all = Box::pin(join_all(reqs.into_iter().map(|r| svc.call(r))));
    assert!(poll!(&mut all).is_pending());
    backend.open();
    let reads = settle("limit", all).await;
    let mut out = Vec::new();
    for r in reads {
        out.push(read(r.unwrap()).await);
    }
    assert_eq!(out[1].by, ServedBy::Follower);
    assert!(out[2].text().ends_with(": 123456789"), "{}", out[2].text());
    assert!(out[3].text().ends_with(": 123456789"));
    assert_eq!((out[2].by, out[3].by), (ServedBy::Bypass, ServedBy::Bypass));
    assert_eq!(backend.calls(), 3);
}

/// gRPC rule "only OK is shared": a status in the headers, the trailers, or both (any non-0
/// value anywhere), a non-200 HTTP status, `Set-Cookie`, gRPC-Web or no content type: the
/// leader gets its own response, every follower is released to call, all at once.
#[tokio::test(start_paused = true)]
async fn grpc_non_ok_outcomes_release_all_followers_at_once() {
    const FOLLOWERS: usize = 3;
    type Case = (
        u16,
        &'static [(&'static str, &'static str)],
        Option<&'static [(&'static str, &'static str)]>,
    );
    const CT: (&str, &str) = ("content-type", "application/grpc");
    let cases: Vec<Case> = vec![
        // grpc-status 0 in the headers, an error in the trailers.
        (
            200,
            &[CT, ("grpc-status", "0")],
            Some(&[("grpc-status", "13")]),
        ),
        // Trailers-only errors.
        (200, &[CT, ("grpc-status", "14")], None),
        (200, &[CT, ("grpc-status", "0"), ("grpc-status", "2")], None),
        // Two statuses in the trailers.
        (
            200,
            &[CT],
            Some(&[("grpc-status", "0"), ("grpc-status", "5")]),
        ),
        // No status at all.
        (200, &[CT], Some(&[("grpc-message", "done")])),
        (200, &[CT], None),
        // OK, but not a 200, not gRPC, or with a cookie.
        (503, &[CT], Some(&[("grpc-status", "0")])),
        (
            200,
            &[("content-type", "application/grpc-web")],
            Some(&[("grpc-status", "0")]),
        ),
        (200, &[], Some(&[("grpc-status", "0")])),
        (
            200,
            &[CT, ("set-cookie", "s=1")],
            Some(&[("grpc-status", "0")]),
        ),
    ];
    for (i, (status, head, tail)) in cases.into_iter().enumerate() {
        let backend = Backend::new();
        let barrier = Arc::new(Barrier::new(FOLLOWERS));
        let layer = CoalesceGrpcLayer::new().method(GRPC_PATH);
        let mut svc = layer.layer(backend.service(move |n, _: InnerGrpcReq| -> Answer {
            let barrier = barrier.clone();
            let mut body = vec![data(format!("call {n}"))];
            body.extend(tail.map(trailers));
            let mut res = Response::new(frames(body));
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            *res.headers_mut() = headers(head);
            Box::pin(async move {
                if n > 0 {
                    barrier.wait().await;
                }
                Ok(res)
            })
        }));
        let reqs = (0..=FOLLOWERS)
            .map(|_| grpc_call(GRPC_PATH, &[b"m"], &[]))
            .collect();
        let reads = burst(&mut svc, &backend, reqs, 1).await;
        for (j, read) in reads.into_iter().enumerate() {
            let read = read.unwrap();
            if j == 0 {
                assert_eq!((read.by, read.text()), (ServedBy::Leader, "call 0".into()));
            } else {
                assert_eq!(read.by, ServedBy::Released, "case {i}, follower {j}");
                assert_ne!(read.text(), "call 0", "case {i}");
            }
        }
        assert_eq!(backend.calls(), FOLLOWERS + 1, "case {i}");
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    }
}

/// gRPC rule "only OK is shared": a response body whose first trailers frame says
/// `grpc-status: 13` (what an HTTP/2 server sends: it stops at the first trailers) and a later
/// frame says `0` failed; it must not be handed to followers, nor shown to its caller as OK.
#[tokio::test(start_paused = true)]
async fn grpc_error_status_is_not_overwritten_by_a_later_trailers_frame() {
    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new().method(GRPC_PATH);
    let mut svc = layer.layer(backend.service(|n, _: InnerGrpcReq| {
        now(Response::builder()
            .header("content-type", "application/grpc")
            .body(frames(vec![
                data(format!("call {n}")),
                trailers(&[("grpc-status", "13"), ("grpc-message", "internal")]),
                trailers(&[("grpc-status", "0")]),
            ]))
            .unwrap())
    }));
    let reqs: Vec<GrpcReq> = (0..2).map(|_| grpc_call(GRPC_PATH, &[b"m"], &[])).collect();
    let mut all = Box::pin(join_all(reqs.into_iter().map(|r| svc.call(r))));
    assert!(poll!(&mut all).is_pending());
    backend.open();
    let results = settle("two trailers", all).await;
    let mut reads = Vec::new();
    for r in results {
        reads.push(read(r.unwrap()).await);
    }
    assert!(
        reads[0]
            .trailer_values("grpc-status")
            .contains(&"13".to_owned()),
        "the leader's failure became {:?}",
        reads[0].trailers
    );
    assert_eq!(reads[1].by, ServedBy::Released, "a failed call was shared");
    assert_eq!(backend.calls(), 2);
}

/// gRPC edge "a body that errors midway": the leader gets the bytes read then the error,
/// never a complete-looking body; followers make their own calls; nothing hangs.
#[tokio::test(start_paused = true)]
async fn grpc_response_failing_midway_goes_to_the_leader_followers_call() {
    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new().method(GRPC_PATH);
    let mut svc = layer.layer(backend.service(|n, _: InnerGrpcReq| {
        if n == 0 {
            now(Response::builder()
                .header("content-type", "application/grpc")
                .body(frames(vec![
                    data("\0\0\0\0\x05he"),
                    Err("stream reset".into()),
                ]))
                .unwrap())
        } else {
            now(grpc_ok(format!("call {n}")))
        }
    }));
    let reqs = (0..3).map(|_| grpc_call(GRPC_PATH, &[b"m"], &[])).collect();
    let reads = burst(&mut svc, &backend, reqs, 1).await;
    let reads: Vec<_> = reads.into_iter().map(Result::unwrap).collect();
    assert_eq!(reads[0].by, ServedBy::Leader);
    assert_eq!(reads[0].data, b"\0\0\0\0\x05he");
    assert_eq!(reads[0].error.as_deref(), Some("stream reset"));
    assert!(reads[0].trailers.is_empty());
    for read in &reads[1..] {
        assert_eq!(read.by, ServedBy::Released);
        assert_eq!(read.trailer_values("grpc-status"), ["0"]);
    }
    assert_eq!(backend.calls(), 3);
}

/// Rule 4 and the error type for gRPC: the error type is the inner service's; when every
/// waiter goes away the inner call is dropped and the key freed.
#[tokio::test(start_paused = true)]
async fn grpc_last_waiter_gone_cancels_the_call() {
    let backend = Backend::opened();
    let dropped = Arc::new(AtomicBool::new(false));
    let d = dropped.clone();
    let layer = CoalesceGrpcLayer::new().method(GRPC_PATH);
    let mut svc = layer.layer(backend.service(move |n, req: InnerGrpcReq| -> Answer {
        if n > 0 {
            return echo(n, req);
        }
        let flag = DropFlag(d.clone());
        Box::pin(async move {
            let _flag = flag;
            futures::future::pending::<()>().await;
            unreachable!()
        })
    }));
    fn error_is<S: Service<GrpcReq, Error = BoxError>>(_: &S) {}
    error_is(&svc);
    let mut leader = Box::pin(svc.call(grpc_call(GRPC_PATH, &[b"m"], &[])));
    let mut follower = Box::pin(svc.call(grpc_call(GRPC_PATH, &[b"m"], &[])));
    assert!(poll!(&mut leader).is_pending());
    assert!(poll!(&mut follower).is_pending());
    assert_eq!((layer.in_flight(), layer.waiting()), (1, 1));
    drop(leader);
    assert!(poll!(&mut follower).is_pending());
    assert!(!dropped.load(SeqCst));
    drop(follower);
    assert!(dropped.load(SeqCst), "the inner call outlived its waiters");
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    let next = settle("next", svc.call(grpc_call(GRPC_PATH, &[b"m"], &[]))).await;
    let next = read(next.unwrap()).await;
    assert_eq!(
        (next.by, next.text()),
        (ServedBy::Leader, "call 1: m".into())
    );
}

/// Rule 2 for HTTP: once a flight's response is published, a new identical request starts a
/// new call even while a follower of the finished flight has not picked its copy up yet.
#[tokio::test(start_paused = true)]
async fn http_no_stale_join_after_publication() {
    let backend = Backend::opened();
    let layer = CoalesceHttpLayer::new();
    let mut svc =
        layer.layer(backend.service(|n, _: Req| now(Response::new(full(format!("call {n}"))))));
    let leader = svc.call(get("/s"));
    let mut follower = Box::pin(svc.call(get("/s")));
    let leader = read(settle("leader", leader).await.unwrap()).await;
    assert_eq!(leader.text(), "call 0");
    assert_eq!(
        layer.in_flight(),
        0,
        "the published flight left the registry"
    );
    let newcomer = read(settle("newcomer", svc.call(get("/s"))).await.unwrap()).await;
    assert_eq!(
        (newcomer.by, newcomer.text()),
        (ServedBy::Leader, "call 1".into())
    );
    let follower = read(settle("follower", &mut follower).await.unwrap()).await;
    assert_eq!(
        (follower.by, follower.text()),
        (ServedBy::Follower, "call 0".into())
    );
    assert_eq!(layer.waiting(), 0);
}
