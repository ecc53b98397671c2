//! Black-box adversarial tests of the HTTP and gRPC layers' builder options, their interplay,
//! the registry's scope under axum and `ServiceBuilder`, the RFC 9211 `Cache-Status` entries,
//! and the `tracing` / `metrics` observability, through the public API only.
//!
//! No real time passes: tests run on a paused clock, backends hold every call behind a gate
//! (`watch`) until the test opens it, and every wait is bounded by a (virtual) timeout, so a
//! hang fails the test instead of stalling it.
#![cfg(feature = "grpc")]

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use futures::poll;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::watch;
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, HttpServiceBuilderExt, ServedBy};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;
type Answer = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;
type GrpcBody = UnsyncBoxBody<Bytes, BoxError>;
type GrpcAnswer = Pin<Box<dyn Future<Output = Result<Response<GrpcBody>, BoxError>> + Send>>;
type InnerGrpcReq = Request<CoalesceBody<Full<Bytes>>>;

const GRPC_PATH: &str = "/catalog.v1.Catalog/GetItem";

/// Fails the test if `f` does not finish within a minute of (virtual) time: a hang.
async fn settle<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung"))
}

/// Lets spawned tasks run until `cond` holds, in a bounded number of scheduler turns.
#[cfg(any(feature = "tracing", feature = "metrics"))]
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

/// A backend that numbers its calls from 0 and holds each behind a gate until the test opens
/// it; then answers with the test's `answer(n, &request)` (which may panic or fail).
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
}

impl Backend {
    fn new() -> Self {
        #[cfg(feature = "tracing")]
        spans::init();
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
    ) -> impl Service<Req, Response = Res, Error = BoxError, Future = Answer> + Clone + Send + 'static
    where
        F: Fn(usize, &Req) -> Result<Res, BoxError> + Send + Sync + 'static,
    {
        let calls = self.calls.clone();
        let gate = self.gate.clone();
        let answer = Arc::new(answer);
        service_fn(move |req: Req| -> Answer {
            let n = calls.fetch_add(1, SeqCst);
            let mut gate = gate.subscribe();
            let answer = answer.clone();
            Box::pin(async move {
                gate.wait_for(|open| *open).await.expect("gate");
                answer(n, &req)
            })
        })
    }

    fn grpc_service<F>(
        &self,
        answer: F,
    ) -> impl Service<
        InnerGrpcReq,
        Response = Response<GrpcBody>,
        Error = BoxError,
        Future = GrpcAnswer,
    > + Clone
           + Send
           + 'static
    where
        F: Fn(usize, Bytes) -> Result<Response<GrpcBody>, BoxError> + Send + Sync + 'static,
    {
        let calls = self.calls.clone();
        let gate = self.gate.clone();
        let answer = Arc::new(answer);
        service_fn(move |req: InnerGrpcReq| -> GrpcAnswer {
            let n = calls.fetch_add(1, SeqCst);
            let mut gate = gate.subscribe();
            let answer = answer.clone();
            Box::pin(async move {
                let message = req.into_body().collect().await?.to_bytes();
                gate.wait_for(|open| *open).await.expect("gate");
                answer(n, message)
            })
        })
    }
}

fn req(method: Method, uri: &str, pairs: &[(&str, &str)]) -> Req {
    let mut req = Request::builder().method(method).uri(uri);
    for (name, value) in pairs {
        req = req.header(*name, *value);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

fn get(uri: &str, pairs: &[(&str, &str)]) -> Req {
    req(Method::GET, uri, pairs)
}

fn ok(body: impl Into<Bytes>, pairs: &[(&str, &str)]) -> Result<Res, BoxError> {
    let mut res = Response::builder();
    for (name, value) in pairs {
        res = res.header(*name, *value);
    }
    Ok(res.body(Full::new(body.into())).unwrap())
}

/// Everything a waiter got.
#[derive(Debug)]
struct Read {
    by: ServedBy,
    status: StatusCode,
    headers: HeaderMap,
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Read {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    fn cache_status(&self) -> Vec<String> {
        self.headers
            .get_all("cache-status")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }
}

async fn read<B>(res: Response<CoalesceBody<B>>) -> Read
where
    B: Body,
    B::Error: fmt::Debug,
{
    let by = *res
        .extensions()
        .get::<ServedBy>()
        .expect("every response carries ServedBy");
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Read {
        by,
        status: parts.status,
        headers: parts.headers,
        data: collected.to_bytes(),
        trailers,
    }
}

/// Calls `svc` with every request before polling any (so each request after the first of a
/// key joins that key's flight), polls them once with the gate shut, checks that
/// `expect_calls` calls reached the backend, opens the gate and reads every response.
async fn burst<S, R, B>(
    svc: &mut S,
    backend: &Backend,
    reqs: Vec<R>,
    expect_calls: usize,
) -> Vec<Result<Read, S::Error>>
where
    S: Service<R, Response = Response<CoalesceBody<B>>>,
    B: Body,
    B::Error: fmt::Debug,
{
    let mut all = Box::pin(join_all(reqs.into_iter().map(|r| svc.call(r))));
    assert!(poll!(&mut all).is_pending(), "the gate holds every call");
    assert_eq!(
        backend.calls(),
        expect_calls,
        "backend calls before the gate opens"
    );
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

fn unwrap_all<E: fmt::Debug>(reads: Vec<Result<Read, E>>) -> Vec<Read> {
    reads.into_iter().map(|r| r.expect("a response")).collect()
}

/// A gRPC call to `GRPC_PATH` with `message` as its (framed) body.
fn grpc_call(message: &'static [u8], pairs: &[(&str, &str)]) -> Req {
    let mut req = Request::post(format!("http://example.test{GRPC_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in pairs {
        req = req.header(*name, *value);
    }
    req.body(Full::new(Bytes::from_static(message))).unwrap()
}

/// A gRPC response: optional message bytes, then `grpc-status` in the trailers; with no
/// message, a trailers-only response (status in the headers).
fn grpc_ok(message: Option<Bytes>) -> Result<Response<GrpcBody>, BoxError> {
    let res = Response::builder().header("content-type", "application/grpc");
    let body = match message {
        Some(message) => {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            let frames: Vec<Result<Frame<Bytes>, BoxError>> =
                vec![Ok(Frame::data(message)), Ok(Frame::trailers(t))];
            return Ok(res
                .body(StreamBody::new(futures::stream::iter(frames)).boxed_unsync())
                .unwrap());
        }
        None => Full::new(Bytes::new())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    };
    Ok(res.header("grpc-status", "0").body(body).unwrap())
}

#[derive(Debug)]
struct Refused;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("refused")
    }
}

impl std::error::Error for Refused {}

#[derive(Clone, Debug)]
struct UserId(&'static str);

// ---------------------------------------------------------------------------------------------
// HTTP: Cache-Status (RFC 9211) and ServedBy
// ---------------------------------------------------------------------------------------------

/// `cache_status_header` doc table: leader `fwd=miss`, follower `fwd=miss; collapsed`, released
/// follower `fwd=miss; collapsed=?0; detail=<reason>` (`fwd=vary-miss` for a Vary mismatch).
#[tokio::test(start_paused = true)]
async fn http_cache_status_entries_for_leader_follower_and_released() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().cache_status_header(true);
    let mut svc = layer.layer(backend.service(|n, req| match req.uri().path() {
        "/shared" => ok(format!("shared {n}"), &[]),
        "/cookie" => ok(format!("cookie {n}"), &[("set-cookie", "s=1")]),
        "/private" => ok(format!("private {n}"), &[("cache-control", "private")]),
        "/vary" => ok(format!("vary {n}"), &[("vary", "X-Theme")]),
        "/big" => ok(vec![b'x'; 3 * 1024 * 1024], &[]),
        "/error" if n < 6 => Err(Box::new(Refused)),
        _ => ok(format!("own {n}"), &[]),
    }));
    let reqs = vec![
        get("/shared", &[]),
        get("/shared", &[]),
        get("/cookie", &[]),
        get("/cookie", &[]),
        get("/private", &[]),
        get("/private", &[]),
        get("/vary", &[("x-theme", "dark")]),
        get("/vary", &[("x-theme", "light")]),
        get("/big", &[]),
        get("/big", &[]),
        get("/error", &[]),
        get("/error", &[]),
    ];
    let out = burst(&mut svc, &backend, reqs, 6).await;
    let entry = |i: usize| -> (ServedBy, Vec<String>) {
        let r = out[i].as_ref().expect("a response");
        (r.by, r.cache_status())
    };
    let one = |s: &str| vec![s.to_owned()];
    assert_eq!(
        entry(0),
        (ServedBy::Leader, one("tower-coalesce; fwd=miss"))
    );
    assert_eq!(
        entry(1),
        (
            ServedBy::Follower,
            one("tower-coalesce; fwd=miss; collapsed")
        )
    );
    let released = |detail: &str| {
        (
            ServedBy::Released,
            one(&format!(
                "tower-coalesce; fwd=miss; collapsed=?0; detail={detail}"
            )),
        )
    };
    for (leader, detail) in [(2, "set-cookie"), (4, "cache-control"), (8, "too-large")] {
        assert_eq!(
            entry(leader),
            (ServedBy::Leader, one("tower-coalesce; fwd=miss"))
        );
        assert_eq!(entry(leader + 1), released(detail));
    }
    assert_eq!(
        entry(6),
        (ServedBy::Leader, one("tower-coalesce; fwd=miss"))
    );
    assert_eq!(
        entry(7),
        (
            ServedBy::Released,
            one("tower-coalesce; fwd=vary-miss; collapsed=?0; detail=vary")
        )
    );
    assert!(out[10].is_err(), "the leader gets its own error");
    assert_eq!(entry(11), released("error"));
    // The leader of an over-limit body got it whole.
    assert_eq!(out[8].as_ref().unwrap().data.len(), 3 * 1024 * 1024);
    assert_eq!(
        backend.calls(),
        6 + 5,
        "every released follower made its own call"
    );
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

/// `cache_status_header` doc table, bypass row: `fwd=bypass; detail=<reason>`, with
/// `fwd=method` and `fwd=request` for those reasons (RFC 9211 §2.2 `fwd` values).
#[tokio::test(start_paused = true)]
async fn http_cache_status_entries_for_every_bypass_reason() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().cache_status_header(true);
    let mut svc = layer.layer(backend.service(|n, _| ok(format!("call {n}"), &[])));
    let mut with_body = get("/a", &[]);
    *with_body.body_mut() = Full::new(Bytes::from_static(b"body"));
    let reqs = vec![
        req(Method::POST, "/a", &[]),
        get("/a", &[("authorization", "Bearer x")]),
        get("/a", &[("range", "bytes=0-1")]),
        get("/a", &[("upgrade", "websocket"), ("connection", "upgrade")]),
        get("/a", &[("cache-control", "no-cache")]),
        with_body,
    ];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 6).await);
    let expected = [
        "fwd=method; detail=method",
        "fwd=bypass; detail=credentials",
        "fwd=bypass; detail=range",
        "fwd=bypass; detail=upgrade",
        "fwd=request; detail=no-cache",
        "fwd=bypass; detail=body",
    ];
    for (r, want) in out.iter().zip(expected) {
        assert_eq!(r.by, ServedBy::Bypass, "{want}");
        assert_eq!(r.cache_status(), vec![format!("tower-coalesce; {want}")]);
    }
}

/// RFC 9211 §2: each cache appends its entry, the one nearest the client last; a shared
/// response is rebuilt per waiter, so one waiter's entry never shows up in another's copy.
/// With the option off (the default) no header is added, but `ServedBy` is always set.
#[tokio::test(start_paused = true)]
async fn http_cache_status_is_appended_after_an_inner_entry_and_never_leaks_between_waiters() {
    for enabled in [true, false] {
        let backend = Backend::new();
        let mut layer = CoalesceHttpLayer::new();
        if enabled {
            layer = layer.cache_status_header(true);
        }
        let mut svc = layer.layer(
            backend.service(|n, _| ok(format!("call {n}"), &[("cache-status", "origin; hit")])),
        );
        let reqs = (0..4).map(|_| get("/a", &[])).collect();
        let out = unwrap_all(burst(&mut svc, &backend, reqs, 1).await);
        for (i, r) in out.iter().enumerate() {
            let mut want = vec!["origin; hit".to_owned()];
            if enabled {
                want.push(
                    if i == 0 {
                        "tower-coalesce; fwd=miss"
                    } else {
                        "tower-coalesce; fwd=miss; collapsed"
                    }
                    .to_owned(),
                );
            }
            assert_eq!(r.cache_status(), want, "waiter {i}, enabled {enabled}");
            assert_eq!(r.text(), "call 0");
            let by = if i == 0 {
                ServedBy::Leader
            } else {
                ServedBy::Follower
            };
            assert_eq!(r.by, by);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: builder options and their interplay
// ---------------------------------------------------------------------------------------------

/// `CoalesceHttpLayer` docs: each builder method changes one option; options set earlier
/// survive later builder calls, whatever their order (identity, key headers, methods, body
/// limit, `Cache-Status`).
#[tokio::test(start_paused = true)]
async fn http_options_compose_in_any_order() {
    fn identify(parts: &http::request::Parts) -> Option<&'static str> {
        parts.extensions.get::<UserId>().map(|u| u.0)
    }
    let tenant = HeaderName::from_static("x-tenant");
    let one_way = CoalesceHttpLayer::new()
        .identity(identify)
        .key_headers([tenant.clone()])
        .methods([Method::GET])
        .max_body_bytes(4)
        .cache_status_header(true);
    let other_way = CoalesceHttpLayer::new()
        .cache_status_header(true)
        .max_body_bytes(4)
        .methods([Method::GET])
        .key_headers([tenant])
        .identity(identify);
    for layer in [one_way, other_way] {
        let backend = Backend::new();
        let mut svc = layer.layer(backend.service(|n, req| match req.uri().path() {
            "/big" => ok("12345", &[]),
            // Within the 4-byte limit.
            _ => ok(format!("c{n}"), &[]),
        }));
        let authed = |who: &'static str, tenant: &str, accept: &str| {
            let mut r = get(
                "/me",
                &[
                    ("authorization", "Bearer t"),
                    ("x-tenant", tenant),
                    ("accept", accept),
                ],
            );
            r.extensions_mut().insert(UserId(who));
            r
        };
        let reqs = vec![
            authed("alice", "t1", "text/html"),
            // Accept is no longer keyed: shares with the first.
            authed("alice", "t1", "application/json"),
            // Another tenant, another identity: own calls.
            authed("alice", "t2", "text/html"),
            authed("bob", "t1", "text/html"),
            // HEAD is not among the methods any more.
            req(Method::HEAD, "/me", &[]),
            // Over the 4-byte limit.
            get("/big", &[]),
            get("/big", &[]),
        ];
        let out = unwrap_all(burst(&mut svc, &backend, reqs, 5).await);
        let by: Vec<_> = out.iter().map(|r| r.by).collect();
        assert_eq!(
            by,
            [
                ServedBy::Leader,
                ServedBy::Follower,
                ServedBy::Leader,
                ServedBy::Leader,
                ServedBy::Bypass,
                ServedBy::Leader,
                ServedBy::Released,
            ]
        );
        assert_eq!(out[1].text(), out[0].text());
        assert_ne!(out[2].text(), out[0].text());
        assert_ne!(out[3].text(), out[0].text());
        assert_eq!(
            out[4].cache_status(),
            ["tower-coalesce; fwd=method; detail=method"]
        );
        assert_eq!(out[5].text(), "12345");
        assert_eq!(
            out[6].cache_status(),
            ["tower-coalesce; fwd=miss; collapsed=?0; detail=too-large"]
        );
    }
}

/// `key_headers` doc: it replaces the default key headers, but the conditional and authority
/// headers (`If-*`, `Host`, `Forwarded`, `X-Forwarded-*`) are always in the key, even with an
/// empty list.
#[tokio::test(start_paused = true)]
async fn http_empty_key_headers_still_key_conditional_and_authority_headers() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().key_headers([]);
    let mut svc = layer.layer(backend.service(|n, _| ok(format!("call {n}"), &[])));
    let reqs = vec![
        get("/a", &[("accept", "text/html"), ("accept-language", "fr")]),
        // Differs only in the (configured-away) default key headers: shares.
        get(
            "/a",
            &[("accept", "application/json"), ("accept-encoding", "br")],
        ),
        get("/a", &[("if-none-match", "\"v1\"")]),
        get(
            "/a",
            &[("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT")],
        ),
        get("/a", &[("host", "other.test")]),
        get("/a", &[("x-forwarded-host", "evil.test")]),
        get("/a", &[("x-forwarded-prefix", "/evil")]),
        get("/a", &[("forwarded", "host=evil.test")]),
    ];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 7).await);
    assert_eq!(out[1].by, ServedBy::Follower);
    assert_eq!(out[1].text(), out[0].text());
    for (i, r) in out.iter().enumerate().skip(2) {
        assert_eq!(r.by, ServedBy::Leader, "request {i} has a key of its own");
        assert_ne!(r.text(), out[0].text(), "request {i}");
    }
}

/// `key_headers` / `key_header` docs: a header named twice (or an always-keyed one added
/// again) is still keyed once by value: equal requests share, and a request that repeats the
/// header's value does not share with one that sends it once.
#[tokio::test(start_paused = true)]
async fn http_duplicated_key_headers_key_each_value_once() {
    let backend = Backend::new();
    let tenant = HeaderName::from_static("x-tenant");
    let layer = CoalesceHttpLayer::new()
        .key_headers([
            tenant.clone(),
            tenant.clone(),
            header::ACCEPT,
            tenant.clone(),
        ])
        .key_header(tenant.clone())
        .key_header(header::HOST)
        .key_header(header::IF_NONE_MATCH);
    let mut svc = layer.layer(backend.service(|n, _| ok(format!("call {n}"), &[])));
    let mut twice = get("/a", &[("x-tenant", "1")]);
    twice
        .headers_mut()
        .append("x-tenant", HeaderValue::from_static("1"));
    let reqs = vec![
        get("/a", &[("x-tenant", "1")]),
        get("/a", &[("x-tenant", "1")]),
        get("/a", &[("x-tenant", "2")]),
        twice,
        get("/a", &[("x-tenant", "1"), ("host", "h.test")]),
        get("/a", &[("x-tenant", "1"), ("if-none-match", "\"x\"")]),
    ];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 5).await);
    let by: Vec<_> = out.iter().map(|r| r.by).collect();
    assert_eq!(
        by,
        [
            ServedBy::Leader,
            ServedBy::Follower,
            ServedBy::Leader,
            ServedBy::Leader,
            ServedBy::Leader,
            ServedBy::Leader,
        ]
    );
}

/// `methods` doc: "Each method is coalesced apart from the others"; unlisted methods (HEAD
/// here) and requests with a body bypass; an empty list coalesces nothing.
#[tokio::test(start_paused = true)]
async fn http_methods_option_keys_methods_apart_and_bypasses_the_rest() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .methods([Method::GET, Method::POST])
        .cache_status_header(true);
    let mut svc = layer.layer(backend.service(|n, req| ok(format!("{} {n}", req.method()), &[])));
    let mut post_body = req(Method::POST, "/r", &[]);
    *post_body.body_mut() = Full::new(Bytes::from_static(b"x"));
    let reqs = vec![
        get("/r", &[]),
        req(Method::POST, "/r", &[]),
        get("/r", &[]),
        req(Method::POST, "/r", &[("content-length", "0")]),
        req(Method::HEAD, "/r", &[]),
        post_body,
    ];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 4).await);
    assert!(out[0].text().starts_with("GET"));
    assert!(out[1].text().starts_with("POST"));
    assert_eq!(
        (out[2].by, out[2].text()),
        (ServedBy::Follower, out[0].text())
    );
    assert_eq!(
        (out[3].by, out[3].text()),
        (ServedBy::Follower, out[1].text())
    );
    assert_eq!(
        (out[4].by, out[4].cache_status()),
        (
            ServedBy::Bypass,
            vec!["tower-coalesce; fwd=method; detail=method".to_owned()]
        )
    );
    assert_eq!(
        (out[5].by, out[5].cache_status()),
        (
            ServedBy::Bypass,
            vec!["tower-coalesce; fwd=bypass; detail=body".to_owned()]
        )
    );

    let backend = Backend::new();
    let none = CoalesceHttpLayer::new().methods([]);
    let mut svc = none.layer(backend.service(|n, _| ok(format!("call {n}"), &[])));
    let reqs = vec![get("/r", &[]), get("/r", &[])];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 2).await);
    assert!(out.iter().all(|r| r.by == ServedBy::Bypass));
}

/// `max_body_bytes` doc + shareability rules: with a limit of 0 only responses without a body
/// are shared (an empty `200`, a `HEAD` whose `Content-Length` describes the `GET`, a `304`);
/// a one-byte body reaches its leader whole and releases the follower.
#[tokio::test(start_paused = true)]
async fn http_zero_body_limit_shares_only_bodiless_responses() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().max_body_bytes(0);
    let mut svc = layer.layer(backend.service(|n, req| {
        match req.uri().path() {
            "/empty" => ok("", &[("x-call", n.to_string().as_str())]),
            "/head" => ok(
                "",
                &[
                    ("content-length", "1000"),
                    ("x-call", n.to_string().as_str()),
                ],
            ),
            "/304" => Ok(Response::builder()
                .status(304)
                .header("content-length", "1000")
                .header("x-call", n.to_string())
                .body(Full::new(Bytes::new()))
                .unwrap()),
            _ => ok(format!("{n}"), &[]),
        }
    }));
    let inm = [("if-none-match", "\"v\"")];
    let reqs = vec![
        get("/empty", &[]),
        get("/empty", &[]),
        req(Method::HEAD, "/head", &[]),
        req(Method::HEAD, "/head", &[]),
        get("/304", &inm),
        get("/304", &inm),
        get("/one", &[]),
        get("/one", &[]),
    ];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 4).await);
    for pair in [0, 2, 4] {
        assert_eq!(out[pair].by, ServedBy::Leader, "request {pair}");
        assert_eq!(out[pair + 1].by, ServedBy::Follower, "request {}", pair + 1);
        assert_eq!(out[pair].headers["x-call"], out[pair + 1].headers["x-call"]);
        assert!(out[pair + 1].data.is_empty());
    }
    assert_eq!(out[3].headers["content-length"], "1000");
    assert_eq!(out[5].status, StatusCode::NOT_MODIFIED);
    assert_eq!((out[6].by, out[6].data.len()), (ServedBy::Leader, 1));
    assert_eq!((out[7].by, out[7].data.len()), (ServedBy::Released, 1));
    assert_eq!(backend.calls(), 5);
    assert!(out.iter().all(|r| r.trailers.is_none()));
}

/// Rule 5 and `identity` doc: a panicking identity function is user code; its panic stays in
/// that request's `call`, holds no lock, leaves no entry, and a flight of the same key in
/// progress goes on undisturbed for its waiters; the registry stays usable.
#[tokio::test(start_paused = true)]
async fn http_identity_panic_is_contained_and_registry_stays_usable() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().identity(|parts: &http::request::Parts| {
        if parts.headers.contains_key("x-boom") {
            panic!("identity exploded");
        }
        Some("anyone")
    });
    let mut svc = layer.layer(backend.service(|n, _| ok(format!("call {n}"), &[])));
    let mut leader = Box::pin(svc.call(get("/a", &[])));
    assert!(poll!(leader.as_mut()).is_pending());
    assert_eq!(layer.in_flight(), 1);
    let boom =
        std::panic::catch_unwind(AssertUnwindSafe(|| svc.call(get("/a", &[("x-boom", "1")]))));
    assert!(boom.is_err(), "the identity's panic reaches its own caller");
    assert_eq!(layer.in_flight(), 1, "the running flight is untouched");
    let mut follower = Box::pin(svc.call(get("/a", &[])));
    assert!(poll!(follower.as_mut()).is_pending());
    assert_eq!(layer.waiting(), 1);
    backend.open();
    let (l, f) = settle("waiters", async { tokio::join!(leader, follower) }).await;
    let (l, f) = (read(l.unwrap()).await, read(f.unwrap()).await);
    assert_eq!((l.by, f.by), (ServedBy::Leader, ServedBy::Follower));
    assert_eq!(f.text(), "call 0");
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    let again = settle("again", svc.call(get("/a", &[]))).await.unwrap();
    assert_eq!(read(again).await.text(), "call 1");
    assert_eq!(backend.calls(), 2);
}

/// `identity` doc + Vary rule: an identity makes credentialed requests coalescible per
/// identity, but a response whose `Vary` names `Authorization` is still not handed to a
/// follower of the same identity with a different token.
#[tokio::test(start_paused = true)]
async fn http_identity_does_not_override_vary() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .identity(|parts: &http::request::Parts| parts.extensions.get::<UserId>().map(|u| u.0))
        .cache_status_header(true);
    let mut svc =
        layer.layer(backend.service(|n, _| ok(format!("call {n}"), &[("vary", "authorization")])));
    let authed = |token: &str| {
        let mut r = get("/me", &[("authorization", token)]);
        r.extensions_mut().insert(UserId("alice"));
        r
    };
    let reqs = vec![authed("Bearer 1"), authed("Bearer 1"), authed("Bearer 2")];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 1).await);
    assert_eq!(out[1].by, ServedBy::Follower);
    assert_eq!(out[2].by, ServedBy::Released);
    assert_eq!(
        out[2].cache_status(),
        ["tower-coalesce; fwd=vary-miss; collapsed=?0; detail=vary"]
    );
    assert_ne!(out[2].text(), out[0].text());
}

// ---------------------------------------------------------------------------------------------
// HTTP: registry scope (DESIGN "Known traps", layer docs "Registry scope")
// ---------------------------------------------------------------------------------------------

/// "Registry scope" doc: every service of a layer, from every `layer` call and every clone,
/// shares one registry (and its `in_flight`/`waiting` gauges); changing an option makes a new
/// registry, so a reconfigured clone never coalesces with the original.
#[tokio::test(start_paused = true)]
async fn http_clones_share_a_registry_and_option_changes_do_not() {
    let backend = Backend::new();
    let answer = |n: usize, _: &Req| ok(format!("call {n}"), &[]);
    let layer = CoalesceHttpLayer::new();
    let mut a = layer.layer(backend.service(answer));
    let mut b = layer.clone().layer(backend.service(answer));
    let reconfigured = layer.clone().cache_status_header(false);
    let mut c = reconfigured.layer(backend.service(answer));
    let mut fa = Box::pin(a.call(get("/k", &[])));
    let mut fb = Box::pin(b.call(get("/k", &[])));
    let mut fc = Box::pin(c.call(get("/k", &[])));
    assert!(poll!(fa.as_mut()).is_pending());
    assert!(poll!(fb.as_mut()).is_pending());
    assert!(poll!(fc.as_mut()).is_pending());
    assert_eq!(backend.calls(), 2, "a and b share; c has its own registry");
    assert_eq!((layer.in_flight(), layer.waiting()), (1, 1));
    assert_eq!((b.in_flight(), b.waiting()), (1, 1));
    assert_eq!((reconfigured.in_flight(), reconfigured.waiting()), (1, 0));
    backend.open();
    let (ra, rb, rc) = settle("all", async { tokio::join!(fa, fb, fc) }).await;
    let (ra, rb, rc) = (
        read(ra.unwrap()).await,
        read(rb.unwrap()).await,
        read(rc.unwrap()).await,
    );
    assert_eq!(
        (ra.by, rb.by, rc.by),
        (ServedBy::Leader, ServedBy::Follower, ServedBy::Leader)
    );
    assert_eq!(ra.text(), rb.text());
    assert_ne!(ra.text(), rc.text());
}

/// `HttpServiceBuilderExt` doc + DESIGN "Known traps": `.coalesce_http()` in a `ServiceBuilder`
/// used as an axum `Router::layer` coalesces across requests even though axum applies the
/// layer again for every request when the router is called as a service.
#[tokio::test(start_paused = true)]
async fn axum_service_builder_coalesce_http_coalesces_across_router_calls() {
    let backend = Backend::new();
    let calls = backend.calls.clone();
    let gate = backend.gate.clone();
    let app = axum::Router::new()
        .route(
            "/r",
            axum::routing::get(move || {
                let n = calls.fetch_add(1, SeqCst);
                let mut gate = gate.subscribe();
                async move {
                    gate.wait_for(|o| *o).await.unwrap();
                    format!("call {n}")
                }
            }),
        )
        .layer(ServiceBuilder::new().coalesce_http());
    let req = || Request::get("/r").body(axum::body::Body::empty()).unwrap();
    let mut all = Box::pin(join_all((0..4).map(|_| app.clone().oneshot(req()))));
    assert!(poll!(&mut all).is_pending());
    assert_eq!(backend.calls(), 1, "one handler call for four requests");
    backend.open();
    let out = settle("requests", all).await;
    let mut by = Vec::new();
    for res in out {
        let res = res.unwrap();
        by.push(*res.extensions().get::<ServedBy>().unwrap());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "call 0");
    }
    assert_eq!(by.iter().filter(|b| **b == ServedBy::Leader).count(), 1);
    assert_eq!(by.iter().filter(|b| **b == ServedBy::Follower).count(), 3);
}

/// `HttpServiceBuilderExt` + "Registry scope" docs: every service a `ServiceBuilder` with
/// `.coalesce_http()` makes shares the one registry its layer was created with.
#[tokio::test(start_paused = true)]
async fn service_builder_coalesce_http_services_share_one_registry() {
    let backend = Backend::new();
    let builder = ServiceBuilder::new().coalesce_http();
    let answer = |n: usize, _: &Req| ok(format!("call {n}"), &[]);
    let mut a = builder.service(backend.service(answer));
    let mut b = builder.clone().service(backend.service(answer));
    let mut fa = Box::pin(a.call(get("/k", &[])));
    let mut fb = Box::pin(b.call(get("/k", &[])));
    assert!(poll!(fa.as_mut()).is_pending());
    assert!(poll!(fb.as_mut()).is_pending());
    assert_eq!(backend.calls(), 1);
    assert_eq!((a.in_flight(), a.waiting()), (1, 1));
    backend.open();
    let (ra, rb) = settle("both", async { tokio::join!(fa, fb) }).await;
    let (ra, rb) = (read(ra.unwrap()).await, read(rb.unwrap()).await);
    assert_eq!((ra.by, rb.by), (ServedBy::Leader, ServedBy::Follower));
    assert_eq!(rb.text(), "call 0");
    assert_eq!((b.in_flight(), b.waiting()), (0, 0));
}

/// README "Where to put the layer": with the layer on the outer router, nested routers'
/// `/v1/users` and `/v2/users` are keyed by their full path and never share.
#[tokio::test(start_paused = true)]
async fn axum_layer_on_outer_router_keeps_nested_prefixes_apart() {
    let backend = Backend::new();
    let handler = |name: &'static str| {
        let calls = backend.calls.clone();
        let gate = backend.gate.clone();
        axum::routing::get(move || {
            calls.fetch_add(1, SeqCst);
            let mut gate = gate.subscribe();
            async move {
                gate.wait_for(|o| *o).await.unwrap();
                name
            }
        })
    };
    let app = axum::Router::new()
        .nest("/v1", axum::Router::new().route("/users", handler("v1")))
        .nest("/v2", axum::Router::new().route("/users", handler("v2")))
        .layer(CoalesceHttpLayer::new());
    let req = |uri: &str| Request::get(uri).body(axum::body::Body::empty()).unwrap();
    let uris = ["/v1/users", "/v2/users", "/v1/users", "/v2/users"];
    let mut all = Box::pin(join_all(uris.iter().map(|u| app.clone().oneshot(req(u)))));
    assert!(poll!(&mut all).is_pending());
    assert_eq!(backend.calls(), 2, "one call per prefix");
    backend.open();
    let out = settle("requests", all).await;
    for (res, uri) in out.into_iter().zip(uris) {
        let body = res.unwrap().into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, &uri[1..3], "{uri}");
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC: builder options and their interplay
// ---------------------------------------------------------------------------------------------

/// `request_limit` doc: a request message larger than the limit bypasses with its body passed
/// on whole; with a limit of 0, only empty request bodies are keyed and coalesced.
#[tokio::test(start_paused = true)]
async fn grpc_zero_request_limit_coalesces_only_empty_messages() {
    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new().method(GRPC_PATH).request_limit(0);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let mut svc = layer.layer(backend.grpc_service(move |n, message| {
        log.lock().unwrap().push(message);
        grpc_ok(Some(Bytes::from(format!("call {n}"))))
    }));
    let reqs = vec![
        grpc_call(b"", &[]),
        grpc_call(b"", &[]),
        grpc_call(b"\0\0\0\0\x01x", &[]),
        grpc_call(b"\0\0\0\0\x01x", &[]),
    ];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 3).await);
    let by: Vec<_> = out.iter().map(|r| r.by).collect();
    assert_eq!(
        by,
        [
            ServedBy::Leader,
            ServedBy::Follower,
            ServedBy::Bypass,
            ServedBy::Bypass
        ]
    );
    assert_eq!(out[1].data, out[0].data);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter()
            .filter(|m| m.as_ref() == b"\0\0\0\0\x01x")
            .count(),
        2,
        "both oversized messages reached the backend whole: {seen:?}"
    );
}

/// `response_limit` doc: over the limit the caller that made the call gets its whole response
/// and the followers make their own calls; a trailers-only `OK` (no body) fits in a limit of 0
/// and is shared.
#[tokio::test(start_paused = true)]
async fn grpc_zero_response_limit_shares_only_trailers_only_ok() {
    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new()
        .method(GRPC_PATH)
        .metadata("x-kind")
        .response_limit(0);
    let mut svc = layer.layer(backend.grpc_service(|n, message| {
        if message.is_empty() {
            grpc_ok(None)
        } else {
            grpc_ok(Some(Bytes::from(format!("call {n}"))))
        }
    }));
    let reqs = vec![
        grpc_call(b"", &[]),
        grpc_call(b"", &[]),
        grpc_call(b"\0\0\0\0\x01m", &[]),
        grpc_call(b"\0\0\0\0\x01m", &[]),
    ];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 2).await);
    assert_eq!(
        (out[0].by, out[1].by),
        (ServedBy::Leader, ServedBy::Follower)
    );
    assert_eq!(out[1].headers["grpc-status"], "0");
    assert_eq!(
        (out[2].by, out[3].by),
        (ServedBy::Leader, ServedBy::Released)
    );
    assert_eq!(out[2].text(), "call 1", "the leader's response, whole");
    assert_eq!(
        out[2].trailers.as_ref().map(|t| t["grpc-status"].clone()),
        Some(HeaderValue::from_static("0"))
    );
    assert_eq!(out[3].text(), "call 2", "the released follower's own call");
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

/// `CoalesceGrpcLayer` docs: builder calls compose in any order (metadata, identity, limits,
/// allow-list); configured metadata splits calls, the identity lets credentialed calls share
/// per identity only.
#[tokio::test(start_paused = true)]
async fn grpc_options_compose_in_any_order() {
    fn identify(parts: &http::request::Parts) -> Option<&'static str> {
        parts.extensions.get::<UserId>().map(|u| u.0)
    }
    let one_way = CoalesceGrpcLayer::new()
        .metadata("x-tenant")
        .identity(identify)
        .request_limit(64)
        .method(GRPC_PATH);
    let other_way = CoalesceGrpcLayer::new()
        .method(GRPC_PATH)
        .request_limit(64)
        .identity(identify)
        .metadata("X-Tenant");
    for layer in [one_way, other_way] {
        let backend = Backend::new();
        let mut svc = layer
            .layer(backend.grpc_service(|n, _| grpc_ok(Some(Bytes::from(format!("call {n}"))))));
        let authed = |who: &'static str, tenant: &str| {
            let mut r = grpc_call(
                b"\0\0\0\0\x01m",
                &[("authorization", "Bearer t"), ("x-tenant", tenant)],
            );
            r.extensions_mut().insert(UserId(who));
            r
        };
        let reqs = vec![
            authed("alice", "t1"),
            authed("alice", "t1"),
            authed("alice", "t2"),
            authed("bob", "t1"),
            grpc_call(b"\0\0\0\0\x01m", &[("authorization", "Bearer ?")]),
        ];
        let out = unwrap_all(burst(&mut svc, &backend, reqs, 4).await);
        let by: Vec<_> = out.iter().map(|r| r.by).collect();
        assert_eq!(
            by,
            [
                ServedBy::Leader,
                ServedBy::Follower,
                ServedBy::Leader,
                ServedBy::Leader,
                ServedBy::Bypass,
            ]
        );
        assert_eq!(out[1].text(), out[0].text());
    }
}

/// Rule 5 for the gRPC identity: its panic stays in its own `call`; a flight of the same key
/// goes on for its waiters and the registry stays usable.
#[tokio::test(start_paused = true)]
async fn grpc_identity_panic_is_contained_and_registry_stays_usable() {
    let backend = Backend::new();
    let layer =
        CoalesceGrpcLayer::new()
            .method(GRPC_PATH)
            .identity(|parts: &http::request::Parts| {
                if parts.headers.contains_key("x-boom") {
                    panic!("identity exploded");
                }
                Some("anyone")
            });
    let mut svc =
        layer.layer(backend.grpc_service(|n, _| grpc_ok(Some(Bytes::from(format!("call {n}"))))));
    let mut leader = Box::pin(svc.call(grpc_call(b"\0\0\0\0\x01m", &[])));
    assert!(poll!(leader.as_mut()).is_pending());
    assert_eq!(layer.in_flight(), 1);
    let boom = std::panic::catch_unwind(AssertUnwindSafe(|| {
        svc.call(grpc_call(b"\0\0\0\0\x01m", &[("x-boom", "1")]))
    }));
    assert!(boom.is_err());
    let mut follower = Box::pin(svc.call(grpc_call(b"\0\0\0\0\x01m", &[])));
    assert!(poll!(follower.as_mut()).is_pending());
    assert_eq!((layer.in_flight(), layer.waiting()), (1, 1));
    backend.open();
    let (l, f) = settle("waiters", async { tokio::join!(leader, follower) }).await;
    let (l, f) = (read(l.unwrap()).await, read(f.unwrap()).await);
    assert_eq!((l.by, f.by), (ServedBy::Leader, ServedBy::Follower));
    assert_eq!(f.text(), "call 0");
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    let again = settle("again", svc.call(grpc_call(b"\0\0\0\0\x01m", &[])))
        .await
        .unwrap();
    assert_eq!(read(again).await.text(), "call 1");
}

// ---------------------------------------------------------------------------------------------
// tracing
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "tracing")]
#[allow(dead_code)]
#[path = "span_capture/mod.rs"]
mod spans;

/// CHANGELOG / lib docs, feature `tracing`: one `coalesce.flight` span per flight (key hash,
/// waiters, outcome) through the HTTP layer: none for a bypass, none for a released follower's
/// own call; a flight whose only waiter left is `cancelled`, one whose handler panicked is
/// `panicked`.
#[cfg(feature = "tracing")]
#[tokio::test(start_paused = true)]
async fn http_tracing_one_span_per_flight_with_waiters_and_outcome() {
    let installed = spans::install();
    let flights = installed.0.clone();
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new();
    let svc = layer.layer(backend.service(|n, req| match req.uri().path() {
        "/cookie" => ok(format!("{n}"), &[("set-cookie", "s=1")]),
        "/panic" if req.headers().contains_key("x-panic") => panic!("handler exploded"),
        _ => ok(format!("{n}"), &[]),
    }));

    // A flight nobody waits for any more.
    let mut cancelled = Box::pin(svc.clone().oneshot(get("/cancel", &[])));
    assert!(poll!(cancelled.as_mut()).is_pending());
    drop(cancelled);
    until("the cancelled span closed", || flights.closed().len() == 1).await;
    assert_eq!(spans::field(&flights.closed()[0], "outcome"), "cancelled");

    // A panicking flight (its leader re-panics; its follower is released), a shared one with
    // three waiters, an unshareable one with two, and a bypass.
    let spawn = |r: Req| tokio::spawn(svc.clone().oneshot(r));
    let panicking = vec![
        spawn(get("/panic", &[("x-panic", "1")])),
        spawn(get("/panic", &[])),
    ];
    until("the panicking flight started", || backend.calls() == 2).await;
    let others = vec![
        spawn(get("/ok", &[])),
        spawn(get("/ok", &[])),
        spawn(get("/ok", &[])),
        spawn(get("/cookie", &[])),
        spawn(get("/cookie", &[])),
        spawn(req(Method::POST, "/ok", &[])),
    ];
    until("every call started", || backend.calls() == 5).await;
    until("every follower joined", || layer.waiting() == 4).await;
    backend.open();
    let mut panics = 0;
    for w in panicking.into_iter().chain(others) {
        match settle("waiter", w).await {
            Ok(res) => drop(res.expect("a response")),
            Err(e) => {
                assert!(e.is_panic());
                panics += 1;
            }
        }
    }
    assert_eq!(panics, 1, "only the panicking flight's leader re-panics");
    until("every span closed", || flights.closed().len() == 4).await;
    assert_eq!(
        backend.calls(),
        5 + 2,
        "two released followers made their own calls"
    );

    let mut got: Vec<(String, String)> = flights.closed()[1..]
        .iter()
        .map(|s| {
            (
                spans::field(s, "outcome").to_owned(),
                spans::field(s, "waiters").to_owned(),
            )
        })
        .collect();
    got.sort();
    let want = [("ok", "2"), ("ok", "3"), ("panicked", "2")];
    let want: Vec<_> = want
        .iter()
        .map(|(o, w)| (o.to_string(), w.to_string()))
        .collect();
    assert_eq!(got, want, "{:?}", flights.closed());
    for s in flights.closed() {
        spans::field(&s, "key_hash").parse::<u64>().expect("a u64");
    }
}

/// Feature `tracing` through the gRPC layer: one `coalesce.flight` span per flight, counting
/// the leader and its followers; none for a call that bypasses (message over the limit).
#[cfg(feature = "tracing")]
#[tokio::test(start_paused = true)]
async fn grpc_tracing_one_span_per_flight_none_for_bypass() {
    let installed = spans::install();
    let flights = installed.0.clone();
    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new().method(GRPC_PATH).request_limit(8);
    let mut svc =
        layer.layer(backend.grpc_service(|n, _| grpc_ok(Some(Bytes::from(format!("call {n}"))))));
    let reqs = vec![
        grpc_call(b"\0\0\0\0\x01m", &[]),
        grpc_call(b"\0\0\0\0\x01m", &[]),
        grpc_call(b"\0\0\0\0\x01m", &[]),
        grpc_call(b"\0\0\0\0\x05large", &[]),
    ];
    let out = unwrap_all(burst(&mut svc, &backend, reqs, 2).await);
    assert_eq!(out[3].by, ServedBy::Bypass);
    until("the span closed", || flights.closed().len() == 1).await;
    let closed = flights.closed();
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(spans::field(&closed[0], "waiters"), "3");
    assert_eq!(spans::field(&closed[0], "outcome"), "ok");
}

/// Feature `tracing` ("outcome") and `metrics` (`tower_coalesce_flights_total{outcome}`): a
/// flight whose inner service returned an error must be reported as `error`, as the core layer
/// reports it, not as `ok` — for the HTTP and the gRPC layer alike.
#[cfg(all(feature = "tracing", feature = "metrics"))]
#[test]
fn http_and_grpc_failed_calls_are_traced_and_counted_as_errors() {
    let recorder = counting::Counting::default();
    let installed = spans::install();
    let flights = installed.0.clone();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let backend = Backend::new();
            backend.open();
            let http =
                CoalesceHttpLayer::new().layer(backend.service(
                    |_: usize, _: &Req| -> Result<Res, BoxError> { Err(Box::new(Refused)) },
                ));
            let res = settle("http", http.oneshot(get("/a", &[]))).await;
            assert!(res.is_err());
            let grpc = CoalesceGrpcLayer::new()
                .method(GRPC_PATH)
                .layer(backend.grpc_service(
                    |_: usize, _: Bytes| -> Result<Response<GrpcBody>, BoxError> {
                        Err(Box::new(Refused))
                    },
                ));
            let res = settle("grpc", grpc.oneshot(grpc_call(b"\0\0\0\0\x01m", &[]))).await;
            assert!(res.is_err());
        });
    });
    let outcomes: Vec<String> = flights
        .closed()
        .iter()
        .map(|s| spans::field(s, "outcome").to_owned())
        .collect();
    let totals = recorder.totals();
    assert_eq!(outcomes, ["error", "error"], "span outcomes");
    assert_eq!(
        totals.get("tower_coalesce_flights_total{outcome=error}"),
        Some(&2),
        "{totals:?}"
    );
    assert_eq!(
        totals.get("tower_coalesce_flights_total{outcome=ok}"),
        None,
        "{totals:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// metrics
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "metrics")]
#[path = "counting_recorder/mod.rs"]
mod counting;

/// Runs `test` on a paused current-thread runtime with `recorder` as the local recorder.
#[cfg(feature = "metrics")]
fn with_metrics<F: Future<Output = ()>>(recorder: &counting::Counting, test: impl FnOnce() -> F) {
    metrics::with_local_recorder(recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(settle("test", test()));
    });
}

/// Feature `metrics`: the HTTP layer's flights are counted by the `tower_coalesce_*` counters:
/// one leader and its followers per shared flight, a released follower counted as a follower
/// (it joined) and not as a leader, and a flight whose only waiter left as `cancelled`.
#[cfg(feature = "metrics")]
#[test]
fn http_metrics_count_leaders_followers_and_cancelled_flights() {
    let recorder = counting::Counting::default();
    with_metrics(&recorder, || async {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(backend.service(|n, req| match req.uri().path() {
            "/cookie" => ok(format!("{n}"), &[("set-cookie", "s=1")]),
            _ => ok(format!("{n}"), &[]),
        }));
        let mut gone = Box::pin(svc.call(get("/gone", &[])));
        assert!(poll!(gone.as_mut()).is_pending());
        drop(gone);
        let reqs = vec![
            get("/ok", &[]),
            get("/ok", &[]),
            get("/ok", &[]),
            get("/cookie", &[]),
            get("/cookie", &[]),
        ];
        let out = unwrap_all(burst(&mut svc, &backend, reqs, 3).await);
        assert_eq!(out[4].by, ServedBy::Released);
        assert_eq!(backend.calls(), 4);
    });
    let totals = recorder.totals();
    let get = |name: &str| totals.get(name).copied().unwrap_or(0);
    assert_eq!(get("tower_coalesce_leaders_total"), 3, "{totals:?}");
    assert_eq!(get("tower_coalesce_followers_total"), 3, "{totals:?}");
    assert_eq!(
        get("tower_coalesce_flights_total{outcome=cancelled}"),
        1,
        "{totals:?}"
    );
    assert_eq!(
        get("tower_coalesce_flights_total{outcome=ok}"),
        2,
        "{totals:?}"
    );
}

/// Feature `metrics` vs `Stats` docs ("leaders: Calls started: flights, and retries of failed
/// ones"): after a `retry_failed` retry and a `follower_timeout`, every `tower_coalesce_*`
/// counter equals the `stats()` field of the same name.
#[cfg(feature = "metrics")]
#[test]
fn core_metrics_match_stats_after_retry_and_timeout() {
    use tower_coalesce::CoalesceLayer;

    #[cfg(feature = "tracing")]
    spans::init();
    let recorder = counting::Counting::default();
    let stats = Arc::new(std::sync::Mutex::new(None));
    let keep = stats.clone();
    with_metrics(&recorder, || async move {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(watch::channel(false).0);
        let (c, g) = (calls.clone(), gate.clone());
        let backend = service_fn(move |key: u32| {
            let n = c.fetch_add(1, SeqCst);
            let mut gate = g.subscribe();
            async move {
                match (key, n) {
                    (1, 0) => {
                        gate.wait_for(|o| *o).await.unwrap();
                        Err(Refused)
                    }
                    (2, 2) => {
                        gate.wait_for(|o| *o).await.unwrap();
                        Ok(n)
                    }
                    _ => Ok(n),
                }
            }
        });
        let svc = CoalesceLayer::new(|k: &u32| Some(*k))
            .retry_failed(1)
            .follower_timeout(Duration::from_secs(1))
            .layer(backend);
        // Key 1: the first call fails and a follower retries it.
        let leader = tokio::spawn(svc.clone().oneshot(1));
        until("leader called", || calls.load(SeqCst) == 1).await;
        let followers: Vec<_> = (0..2)
            .map(|_| tokio::spawn(svc.clone().oneshot(1)))
            .collect();
        until("followers joined", || svc.stats().followers == 2).await;
        gate.send_replace(true);
        assert!(settle("leader", leader).await.unwrap().is_err());
        for f in followers {
            assert_eq!(settle("follower", f).await.unwrap().unwrap(), 1);
        }
        // Key 2: a follower gives up waiting after a second and calls alone.
        gate.send_replace(false);
        let leader = tokio::spawn(svc.clone().oneshot(2));
        until("leader 2 called", || calls.load(SeqCst) == 3).await;
        let follower = tokio::spawn(svc.clone().oneshot(2));
        until("follower 2 joined", || svc.stats().followers == 3).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(settle("follower 2", follower).await.unwrap().unwrap(), 3);
        gate.send_replace(true);
        assert_eq!(settle("leader 2", leader).await.unwrap().unwrap(), 2);
        *keep.lock().unwrap() = Some(svc.stats());
    });
    let stats = stats.lock().unwrap().expect("the scenario ran");
    assert_eq!(
        (stats.retried, stats.timed_out, stats.errors),
        (1, 1, 1),
        "{stats:?}"
    );
    let totals = recorder.totals();
    let get = |name: &str| totals.get(name).copied().unwrap_or(0);
    assert_eq!(
        get("tower_coalesce_followers_total"),
        stats.followers,
        "{totals:?}"
    );
    assert_eq!(
        get("tower_coalesce_retried_total"),
        stats.retried,
        "{totals:?}"
    );
    assert_eq!(
        get("tower_coalesce_timed_out_total"),
        stats.timed_out,
        "{totals:?}"
    );
    assert_eq!(
        get("tower_coalesce_leaders_total"),
        stats.leaders,
        "{stats:?} {totals:?}"
    );
}
