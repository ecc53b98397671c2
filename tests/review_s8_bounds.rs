//! Review (session 8, bounds): black-box tests of the HTTP and gRPC layers' `follower_timeout`,
//! `max_in_flight` and `max_followers` (commit 6ec9b55), through the public API only.
//!
//! Groups:
//! - `follower_timeout` with `detached(true)` (the caller of a detached flight made the call and
//!   has no limit; its followers do, even once it left), with a leader dropped at the moment
//!   the limits pass, with many followers timing out at once, with `Vary` mismatches, responses
//!   that are not shared, inner errors and panics (before and after the limit), `HEAD`,
//!   `Duration::MAX`, a timer whose runtime is gone, a runtime without timers;
//! - `max_in_flight(0)`, `max_followers(0)`, places given back (a follower timed out or took the
//!   call over, a flight cancelled or done, a detached flight's caller that left), one bound for
//!   every service of a layer, configured layers with registries apart from their base;
//! - an over-bound response marked `ServedBy::Bypass` (`fwd=bypass; detail=over-capacity`, a
//!   real leader stays `Leader`) and passed on frame by frame (data, trailers, headers, framing
//!   fields), its errors and panics reaching its caller uncounted but in `over_capacity`;
//! - the `Stats` sum rule and gauges (`waiting`, `in_flight`) after mixed loads, and under
//!   timeouts racing the flight on worker threads (`calls == leaders + fell_through`);
//! - the same over real servers: axum served by hyper (HTTP/1.1 and h2c clients, raw HTTP/1.1
//!   bytes for framing) and a tonic server with its generated client.
//!
//! Found: README says the gRPC layer's bounds "work as for HTTP", whose over-bound response is
//! "passed on as it streams, unbuffered"; a gRPC call over a bound is buffered whole (ignored
//! test `grpc_over_bound_response_is_unbuffered_as_for_http`).
//!
//! No sleep decides anything. In-process tests run on paused time, advanced by hand, and poll
//! their futures by hand; the backend holds its call 0 behind a gate the test opens. The server
//! tests run in real time, with the leader's call held on a gate and a short follower limit:
//! they assert outcomes (who called, what came back), never durations; every wait is bounded.
#![cfg(feature = "grpc")]

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::{poll, FutureExt};
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tokio::sync::{mpsc, watch};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, ServedBy};
use tower_coalesce::Stats;

type Out = UnsyncBoxBody<Bytes, BoxError>;
type Reply = Response<CoalesceBody<Out>>;
type Fut = Pin<Box<dyn Future<Output = Result<Reply, String>> + Send>>;
/// A boxed service of either layer, with its layer's `stats` and `waiting`.
type Svc = tower::util::BoxCloneService<Request<Full<Bytes>>, Reply, String>;
type Probe = (Svc, Box<dyn Fn() -> Stats>, Box<dyn Fn() -> usize>);
type Answer = Arc<dyn Fn(usize, &Parts) -> Result<Response<Out>, String> + Send + Sync>;

const METHOD: &str = "/catalog.v1.Catalog/GetItem";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---------------------------------------------------------------------------------------------
// In-process backend
// ---------------------------------------------------------------------------------------------

/// Counts its calls; call 0 waits for the gate, later calls answer at once. What a call
/// answers is `answer(n, request head)`.
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
    answer: Answer,
}

impl Backend {
    fn new() -> Self {
        Backend::with(|n, _| Ok(Response::new(full(format!("call {n}")))))
    }

    fn grpc() -> Self {
        Backend::with(|n, _| Ok(grpc_ok(format!("call {n}"))))
    }

    fn with(
        answer: impl Fn(usize, &Parts) -> Result<Response<Out>, String> + Send + Sync + 'static,
    ) -> Self {
        Backend {
            calls: Arc::default(),
            gate: Arc::new(watch::channel(false).0),
            answer: Arc::new(answer),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    fn serve<B>(
        &self,
        req: Request<B>,
    ) -> impl Future<Output = Result<Response<Out>, String>> + Send + 'static {
        let n = self.calls.fetch_add(1, SeqCst);
        let (parts, body) = req.into_parts();
        drop(body);
        let mut gate = self.gate.subscribe();
        let answer = Arc::clone(&self.answer);
        async move {
            if n == 0 {
                gate.wait_for(|open| *open).await.unwrap();
            }
            answer(n, &parts)
        }
    }
}

fn full(text: impl Into<Bytes>) -> Out {
    Full::new(text.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

fn grpc_ok(text: String) -> Response<Out> {
    Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", "0")
        .body(full(text))
        .unwrap()
}

/// A body of these frames, length unknown.
fn frames(frames: Vec<Frame<Bytes>>) -> Out {
    StreamBody::new(futures::stream::iter(
        frames.into_iter().map(Ok::<_, BoxError>),
    ))
    .boxed_unsync()
}

fn trailers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(*k, v.parse().unwrap());
    }
    map
}

fn http(
    layer: &CoalesceHttpLayer,
    backend: &Backend,
) -> impl Service<Request<Full<Bytes>>, Response = Reply, Error = String, Future: Send + 'static>
       + Clone
       + Send
       + 'static {
    let backend = backend.clone();
    layer.layer(service_fn(move |req: Request<Full<Bytes>>| {
        backend.serve(req)
    }))
}

fn grpc(
    layer: &CoalesceGrpcLayer,
    backend: &Backend,
) -> impl Service<Request<Full<Bytes>>, Response = Reply, Error = String, Future: Send + 'static>
       + Clone
       + Send
       + 'static {
    let backend = backend.clone();
    layer.layer(service_fn(
        move |req: Request<CoalesceBody<Full<Bytes>>>| backend.serve(req),
    ))
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::default()).unwrap()
}

fn get_with(path: &str, name: &'static str, value: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header(name, value)
        .body(Full::default())
        .unwrap()
}

fn head(path: &str) -> Request<Full<Bytes>> {
    Request::head(path).body(Full::default()).unwrap()
}

fn grpc_call() -> Request<Full<Bytes>> {
    Request::post(METHOD)
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01k")))
        .unwrap()
}

/// Calls `svc` once (readiness first, as tower asks), boxed to be polled by hand.
async fn call<S>(svc: &mut S, req: Request<Full<Bytes>>) -> Pin<Box<S::Future>>
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    Box::pin(svc.ready().await.unwrap().call(req))
}

async fn text<B: Body>(res: Response<B>) -> String
where
    B::Error: std::fmt::Debug,
{
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

fn served<B>(res: &Response<B>) -> ServedBy {
    *res.extensions().get::<ServedBy>().expect("a ServedBy")
}

fn cache_status<B>(res: &Response<B>) -> &str {
    res.headers()["cache-status"].to_str().unwrap()
}

/// Polls `fut` once, which must be ready.
async fn ready<F: Future + Unpin>(what: &str, fut: &mut F) -> F::Output {
    match poll!(fut) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("{what}: still pending"),
    }
}

/// Yields until `cond` holds (spawned tasks run meanwhile); a bounded number of turns, never
/// time.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

/// The relations `src/stats.rs` documents, once every request is done.
fn assert_sums(s: &Stats, requests: u64) {
    assert_eq!(
        s.leaders - s.retried + s.followers + s.lingered + s.bypassed + s.over_capacity,
        requests,
        "every request counted once: {s:?}"
    );
    assert_eq!(
        s.fell_through,
        s.over_capacity + s.timed_out + s.released,
        "{s:?}"
    );
    assert!(s.timed_out + s.released <= s.followers, "{s:?}");
    assert!(s.errors + s.panics <= s.leaders, "{s:?}");
    assert!(s.cancelled <= s.leaders - s.retried, "{s:?}");
    assert_eq!(s.in_flight, 0, "{s:?}");
}

// =============================================================================================
// HTTP: follower_timeout
// =============================================================================================

/// A detached flight's caller waits for its flight as a follower would, inside; but it made
/// the call: no limit. A follower of that flight has one.
#[tokio::test(start_paused = true)]
async fn http_detached_caller_has_no_limit_its_followers_do() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .detached(true)
        .follower_timeout(secs(1))
        .cache_status_header(true);
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    until("the detached call starts", || b.calls() == 1).await;
    let mut follower = call(&mut svc, get("/a")).await;
    assert!(poll!(follower.as_mut()).is_pending());
    assert_eq!(layer.waiting(), 1, "the caller is not counted as waiting");

    tokio::time::advance(secs(30)).await;
    assert!(
        poll!(leader.as_mut()).is_pending(),
        "the caller of a detached flight never times out"
    );
    let res = ready("follower past its limit", &mut follower)
        .await
        .unwrap();
    assert_eq!(served(&res), ServedBy::Released);
    assert!(cache_status(&res).ends_with("detail=timeout"));
    assert_eq!(text(res).await, "call 1");
    assert_eq!((b.calls(), layer.waiting(), layer.in_flight()), (2, 0, 1));

    b.open();
    let res = leader.await.unwrap();
    assert_eq!(served(&res), ServedBy::Leader);
    assert_eq!(cache_status(&res), "tower-coalesce; fwd=miss");
    assert_eq!(text(res).await, "call 0");
    let s = layer.stats();
    assert_eq!(
        (s.leaders, s.followers, s.timed_out, s.released),
        (1, 1, 1, 0)
    );
    assert_eq!((s.cancelled, b.calls()), (0, 2));
    assert_sums(&s, 2);
}

/// In a detached flight nobody takes the call over when the caller leaves (a task drives it):
/// its followers keep their limit, time out, and the flight still completes, once.
#[tokio::test(start_paused = true)]
async fn http_detached_followers_keep_their_limit_after_the_caller_left() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .detached(true)
        .follower_timeout(secs(2));
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    until("the detached call starts", || b.calls() == 1).await;
    let mut followers = Vec::new();
    for _ in 0..3 {
        let mut f = call(&mut svc, get("/a")).await;
        assert!(poll!(f.as_mut()).is_pending());
        followers.push(f);
    }
    drop(leader);
    for f in &mut followers {
        assert!(poll!(f.as_mut()).is_pending(), "nothing to take over");
    }
    tokio::time::advance(secs(2)).await;
    let mut bodies = Vec::new();
    for f in &mut followers {
        let res = ready("past its limit", f).await.unwrap();
        assert_eq!(served(&res), ServedBy::Released);
        bodies.push(text(res).await);
    }
    bodies.sort();
    assert_eq!(bodies, ["call 1", "call 2", "call 3"]);
    assert_eq!(layer.in_flight(), 1, "the detached call goes on for nobody");
    b.open();
    until("the detached flight ends", || layer.in_flight() == 0).await;
    let s = layer.stats();
    assert_eq!(
        (s.timed_out, s.cancelled, s.released, b.calls()),
        (3, 0, 0, 4)
    );
    assert_eq!(layer.waiting(), 0);
    assert_sums(&s, 4);
}

/// Many followers past their limit at once: each makes exactly one call of its own, the
/// flight completes once for the leader, nobody hangs, and the gauges return to 0.
#[tokio::test(start_paused = true)]
async fn http_many_followers_time_out_at_once_each_calls_once() {
    const N: usize = 32;
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new().follower_timeout(secs(1));
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut followers = Vec::new();
    for _ in 0..N {
        let mut f = call(&mut svc, get("/a")).await;
        assert!(poll!(f.as_mut()).is_pending());
        followers.push(f);
    }
    assert_eq!(layer.waiting(), N);
    tokio::time::advance(secs(1)).await;
    let mut bodies = std::collections::BTreeSet::new();
    for f in &mut followers {
        let res = ready("past its limit", f).await.unwrap();
        assert_eq!(served(&res), ServedBy::Released);
        assert!(bodies.insert(text(res).await), "one call each");
    }
    assert_eq!(
        (b.calls(), layer.waiting(), layer.in_flight()),
        (N + 1, 0, 1)
    );
    assert!(!bodies.contains("call 0"));
    b.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    let s = layer.stats();
    assert_eq!(
        (s.followers, s.timed_out, s.released),
        (N as u64, N as u64, 0)
    );
    assert_eq!((s.fell_through, s.cancelled, s.errors), (N as u64, 0, 0));
    assert_sums(&s, N as u64 + 1);
}

/// The limits pass and the leader drops at the same moment: the first follower polled takes
/// the call over (it then has no limit), every other one makes its own call, the flight
/// completes once and is handed to the one that drove it.
#[tokio::test(start_paused = true)]
async fn http_followers_time_out_as_the_leader_drops() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .follower_timeout(secs(1))
        .cache_status_header(true);
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut a = call(&mut svc, get("/a")).await;
    let mut c = call(&mut svc, get("/a")).await;
    let mut d = call(&mut svc, get("/a")).await;
    assert!(poll!(a.as_mut()).is_pending());
    assert!(poll!(c.as_mut()).is_pending());
    assert!(poll!(d.as_mut()).is_pending());
    tokio::time::advance(secs(1)).await;
    drop(leader);
    // `c` first: it takes the orphaned call over even though its limit passed.
    assert!(poll!(c.as_mut()).is_pending(), "c drives the call now");
    for f in [&mut a, &mut d] {
        let res = ready("a follower past its limit", f).await.unwrap();
        assert_eq!(served(&res), ServedBy::Released);
        assert!(cache_status(&res).ends_with("detail=timeout"));
    }
    assert_eq!((b.calls(), layer.waiting()), (3, 1));
    tokio::time::advance(secs(60)).await;
    assert!(poll!(c.as_mut()).is_pending(), "no limit while it drives");
    b.open();
    let res = c.await.unwrap();
    assert_eq!(served(&res), ServedBy::Follower);
    assert_eq!(text(res).await, "call 0");
    let s = layer.stats();
    assert_eq!((s.timed_out, s.cancelled, b.calls()), (2, 0, 3));
    assert_eq!(layer.waiting(), 0);
    assert_sums(&s, 4);
}

/// A follower past its limit and a follower released for a `Vary` mismatch are counted apart,
/// each in its own counter, and a follower whose headers match gets its copy.
#[tokio::test(start_paused = true)]
async fn http_timed_out_and_vary_released_followers_are_counted_apart() {
    let b = Backend::with(|n, _| {
        Ok(Response::builder()
            .header("vary", "x-v")
            .body(full(format!("call {n}")))
            .unwrap())
    });
    let layer = CoalesceHttpLayer::new()
        .follower_timeout(secs(5))
        .cache_status_header(true);
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get_with("/a", "x-v", "0")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut early = call(&mut svc, get_with("/a", "x-v", "1")).await;
    assert!(poll!(early.as_mut()).is_pending());
    tokio::time::advance(secs(3)).await;
    let mut other = call(&mut svc, get_with("/a", "x-v", "2")).await;
    let mut same = call(&mut svc, get_with("/a", "x-v", "0")).await;
    assert!(poll!(other.as_mut()).is_pending());
    assert!(poll!(same.as_mut()).is_pending());
    tokio::time::advance(secs(2)).await;
    let res = ready("5 s after it came", &mut early).await.unwrap();
    assert_eq!(
        cache_status(&res),
        "tower-coalesce; fwd=miss; collapsed=?0; detail=timeout"
    );
    assert_eq!(text(res).await, "call 1");
    assert!(poll!(other.as_mut()).is_pending(), "2 s after it came");

    b.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    let res = other.await.unwrap();
    assert_eq!(served(&res), ServedBy::Released);
    assert_eq!(
        cache_status(&res),
        "tower-coalesce; fwd=vary-miss; collapsed=?0; detail=vary"
    );
    assert_eq!(text(res).await, "call 2");
    let res = same.await.unwrap();
    assert_eq!(served(&res), ServedBy::Follower);
    assert_eq!(text(res).await, "call 0");
    let s = layer.stats();
    assert_eq!(
        (s.followers, s.timed_out, s.released, s.fell_through),
        (3, 1, 1, 2)
    );
    assert_sums(&s, 4);
}

/// For each way a flight's response is not handed on (not shareable, too large, an inner
/// error, a panic): a follower that timed out before made one call, a follower still waiting
/// is released to make one, and each is counted once, in its own counter.
#[tokio::test(start_paused = true)]
async fn http_unshared_outcomes_after_a_follower_timed_out() {
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Private,
        Cookie,
        TooLarge,
        Error,
        Panic,
    }
    for kind in [
        Kind::Private,
        Kind::Cookie,
        Kind::TooLarge,
        Kind::Error,
        Kind::Panic,
    ] {
        let b = Backend::with(move |n, _| {
            let res = Response::builder();
            let res = match (n, kind) {
                (0, Kind::Private) => res.header("cache-control", "private"),
                (0, Kind::Cookie) => res.header("set-cookie", "s=0"),
                (0, Kind::Error) => return Err("boom 0".to_owned()),
                (0, Kind::Panic) => panic!("backend panicked on call 0"),
                _ => res,
            };
            let body = match (n, kind) {
                (0, Kind::TooLarge) => "call 0, a body over the limit".to_owned(),
                _ => format!("call {n}"),
            };
            Ok(res.body(full(body)).unwrap())
        });
        let layer = CoalesceHttpLayer::new()
            .follower_timeout(secs(5))
            .max_body_bytes(10)
            .cache_status_header(true);
        let mut svc = http(&layer, &b);
        let mut leader = call(&mut svc, get("/a")).await;
        assert!(poll!(leader.as_mut()).is_pending());
        let mut early = call(&mut svc, get("/a")).await;
        assert!(poll!(early.as_mut()).is_pending());
        tokio::time::advance(secs(5)).await;
        let mut late = call(&mut svc, get("/a")).await;
        assert!(poll!(late.as_mut()).is_pending());
        let res = ready("past its limit", &mut early).await.unwrap();
        assert!(cache_status(&res).ends_with("detail=timeout"), "{kind:?}");
        assert_eq!(text(res).await, "call 1", "{kind:?}");

        b.open();
        let led = AssertUnwindSafe(leader).catch_unwind().await;
        match kind {
            Kind::Panic => assert!(led.is_err(), "the leader's future panics again"),
            Kind::Error => assert_eq!(led.unwrap().unwrap_err(), "boom 0"),
            _ => {
                let res = led.unwrap().unwrap();
                assert_eq!(served(&res), ServedBy::Leader, "{kind:?}");
                assert!(text(res).await.starts_with("call 0"), "{kind:?}");
            }
        }
        let res = late.await.unwrap();
        assert_eq!(served(&res), ServedBy::Released, "{kind:?}");
        let detail = match kind {
            Kind::Private => "cache-control",
            Kind::Cookie => "set-cookie",
            Kind::TooLarge => "too-large",
            Kind::Error => "error",
            Kind::Panic => "panic",
        };
        assert_eq!(
            cache_status(&res),
            format!("tower-coalesce; fwd=miss; collapsed=?0; detail={detail}"),
        );
        assert_eq!(text(res).await, "call 2", "{kind:?}");
        let s = layer.stats();
        assert_eq!(
            (s.timed_out, s.released, s.fell_through, b.calls()),
            (1, 1, 2, 3),
            "{kind:?}: {s:?}"
        );
        assert_eq!(
            (s.errors, s.panics),
            (
                u64::from(matches!(kind, Kind::Error)),
                u64::from(matches!(kind, Kind::Panic))
            ),
            "{kind:?}"
        );
        assert_eq!(layer.waiting(), 0);
        assert_sums(&s, 3);
    }
}

/// `HEAD` followers time out as `GET` ones do; an over-bound `HEAD` calls alone; the leader's
/// shared `HEAD` response keeps its length.
#[tokio::test(start_paused = true)]
async fn http_head_requests_time_out_and_go_over_bounds() {
    let b = Backend::with(|n, _| Ok(Response::new(full(format!("call {n}")))));
    let layer = CoalesceHttpLayer::new()
        .follower_timeout(secs(1))
        .max_followers(1)
        .cache_status_header(true);
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, head("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = call(&mut svc, head("/a")).await;
    assert!(poll!(follower.as_mut()).is_pending());
    let mut over = call(&mut svc, head("/a")).await;
    let res = ready("over max_followers, its own call", &mut over)
        .await
        .unwrap();
    assert_eq!(served(&res), ServedBy::Bypass);
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!res.body().is_buffered());
    tokio::time::advance(secs(1)).await;
    let res = ready("past its limit", &mut follower).await.unwrap();
    assert_eq!(served(&res), ServedBy::Released);
    assert!(cache_status(&res).ends_with("detail=timeout"));
    b.open();
    let res = leader.await.unwrap();
    assert_eq!(served(&res), ServedBy::Leader);
    assert_eq!(res.headers()["content-length"], "6");
    assert_eq!(text(res).await, "", "a HEAD copy has no body");
    let s = layer.stats();
    assert_eq!((s.over_capacity, s.timed_out, b.calls()), (1, 1, 3));
    assert_sums(&s, 3);
}

/// An outcome in by the time the limit passes is taken, whatever it is: a copy, or a release
/// for its reason (not shareable, an error, a panic), never a timeout.
#[tokio::test(start_paused = true)]
async fn http_and_grpc_outcome_in_by_the_limit_wins_over_the_timeout() {
    for is_grpc in [false, true] {
        for kind in ["shared", "private", "error", "panic"] {
            let b = Backend::with(move |n, _| {
                if n > 0 {
                    return Ok(grpc_ok(format!("call {n}")));
                }
                match kind {
                    "error" => Err("boom".to_owned()),
                    "panic" => panic!("boom"),
                    "private" => Ok(Response::builder()
                        .status(if is_grpc { 500 } else { 200 })
                        .header("cache-control", "private")
                        .body(full("call 0"))
                        .unwrap()),
                    _ => Ok(grpc_ok("call 0".to_owned())),
                }
            });
            let mut svc: Svc;
            let stats: Box<dyn Fn() -> Stats>;
            let req: fn() -> Request<Full<Bytes>>;
            if is_grpc {
                let layer = CoalesceGrpcLayer::new()
                    .method(METHOD)
                    .follower_timeout(secs(1));
                svc = tower::util::BoxCloneService::new(grpc(&layer, &b));
                stats = Box::new(move || layer.stats());
                req = grpc_call;
            } else {
                let layer = CoalesceHttpLayer::new().follower_timeout(secs(1));
                svc = tower::util::BoxCloneService::new(http(&layer, &b));
                stats = Box::new(move || layer.stats());
                req = || get("/a");
            }
            let mut leader = call(&mut svc, req()).await;
            assert!(poll!(leader.as_mut()).is_pending());
            let mut follower = call(&mut svc, req()).await;
            assert!(poll!(follower.as_mut()).is_pending());
            b.open();
            let _ = AssertUnwindSafe(leader).catch_unwind().await;
            tokio::time::advance(secs(5)).await;
            let res = ready("in by then", &mut follower).await.unwrap();
            let want = match kind {
                "shared" => ServedBy::Follower,
                _ => ServedBy::Released,
            };
            assert_eq!(served(&res), want, "grpc={is_grpc} {kind}");
            let s = stats();
            assert_eq!(
                (s.timed_out, s.released, b.calls()),
                (
                    0,
                    u64::from(kind != "shared"),
                    1 + usize::from(kind != "shared")
                ),
                "grpc={is_grpc} {kind}: {s:?}"
            );
            assert_sums(&s, 2);
        }
    }
}

/// A limit past the clock's range is no limit (and no panic).
#[tokio::test(start_paused = true)]
async fn http_follower_timeout_of_duration_max_is_no_limit() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new().follower_timeout(Duration::MAX);
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = call(&mut svc, get("/a")).await;
    assert!(poll!(follower.as_mut()).is_pending());
    tokio::time::advance(secs(365 * 24 * 3600)).await;
    assert!(poll!(follower.as_mut()).is_pending());
    b.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    let res = follower.await.unwrap();
    assert_eq!(served(&res), ServedBy::Follower);
    assert_eq!((layer.stats().timed_out, b.calls()), (0, 1));
}

// =============================================================================================
// HTTP: max_in_flight, max_followers
// =============================================================================================

/// `max_in_flight(0)`: every request calls alone, at once, marked `ServedBy::Bypass` and
/// `fwd=bypass; detail=over-capacity`; nothing is registered, nobody waits, nobody times out.
#[tokio::test(start_paused = true)]
async fn http_max_in_flight_zero_sends_every_request_alone() {
    let b = Backend::new();
    b.open();
    let layer = CoalesceHttpLayer::new()
        .max_in_flight(0)
        .follower_timeout(secs(1))
        .cache_status_header(true);
    let mut svc = http(&layer, &b);
    let mut futs = Vec::new();
    for _ in 0..5 {
        futs.push(call(&mut svc, get("/a")).await);
    }
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    let mut bodies = Vec::new();
    for f in futs {
        let res = f.await.unwrap();
        assert_eq!(served(&res), ServedBy::Bypass);
        assert_eq!(
            cache_status(&res),
            "tower-coalesce; fwd=bypass; detail=over-capacity"
        );
        assert!(!res.body().is_buffered(), "over the bound: unbuffered");
        bodies.push(text(res).await);
    }
    bodies.sort();
    assert_eq!(bodies, ["call 0", "call 1", "call 2", "call 3", "call 4"]);
    let s = layer.stats();
    assert_eq!((s.leaders, s.followers, s.over_capacity), (0, 0, 5));
    assert_eq!((s.fell_through, s.timed_out), (5, 0));
    assert_sums(&s, 5);
}

/// `max_followers(0)`: the leader's flight is registered, everybody after it calls alone
/// (`ServedBy::Bypass`).
#[tokio::test(start_paused = true)]
async fn http_max_followers_zero_lets_nobody_join() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new().max_followers(0);
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    for n in 1..=3 {
        let mut over = call(&mut svc, get("/a")).await;
        let res = ready("alone, at once", &mut over).await.unwrap();
        assert_eq!(served(&res), ServedBy::Bypass);
        assert_eq!(text(res).await, format!("call {n}"));
    }
    assert_eq!((layer.in_flight(), layer.waiting()), (1, 0));
    b.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    let s = layer.stats();
    assert_eq!((s.leaders, s.followers, s.over_capacity), (1, 0, 3));
    assert_sums(&s, 4);
}

/// A follower that timed out gives its place under `max_followers` back.
#[tokio::test(start_paused = true)]
async fn http_timed_out_follower_frees_its_place_under_max_followers() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .max_followers(1)
        .follower_timeout(secs(1));
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut first = call(&mut svc, get("/a")).await;
    assert!(poll!(first.as_mut()).is_pending());
    tokio::time::advance(secs(1)).await;
    assert_eq!(
        text(ready("timed out", &mut first).await.unwrap()).await,
        "call 1"
    );
    let mut second = call(&mut svc, get("/a")).await;
    assert!(
        poll!(second.as_mut()).is_pending(),
        "a follower again: the place was given back"
    );
    b.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    assert_eq!(text(second.await.unwrap()).await, "call 0");
    let s = layer.stats();
    assert_eq!((s.followers, s.over_capacity, s.timed_out), (2, 0, 1));
    assert_sums(&s, 3);
}

/// A detached flight's caller waits in a slot of its flight but is no follower: it takes no
/// place under `max_followers`, before or after it leaves.
#[tokio::test(start_paused = true)]
async fn http_detached_caller_takes_no_place_under_max_followers() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new().detached(true).max_followers(1);
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    until("the detached call starts", || b.calls() == 1).await;
    let mut follower = call(&mut svc, get("/a")).await;
    assert!(poll!(follower.as_mut()).is_pending(), "one follower fits");
    let mut over = call(&mut svc, get("/a")).await;
    assert_eq!(
        text(ready("over", &mut over).await.unwrap()).await,
        "call 1"
    );
    drop(leader);
    let mut over = call(&mut svc, get("/a")).await;
    assert_eq!(
        text(ready("still over", &mut over).await.unwrap()).await,
        "call 2"
    );
    drop(follower);
    let mut again = call(&mut svc, get("/a")).await;
    assert!(
        poll!(again.as_mut()).is_pending(),
        "the place is free again"
    );
    b.open();
    assert_eq!(text(again.await.unwrap()).await, "call 0");
    let s = layer.stats();
    assert_eq!(
        (s.leaders, s.followers, s.over_capacity, s.cancelled),
        (1, 2, 2, 0)
    );
    assert_sums(&s, 5);
}

/// A flight's place under `max_in_flight` comes back when it is cancelled and when it ends;
/// the bound holds for every service made by one layer.
#[tokio::test(start_paused = true)]
async fn http_max_in_flight_places_return_and_are_shared_by_the_layers_services() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new().max_in_flight(1);
    let mut one = http(&layer, &b);
    let mut two = http(&layer, &b);
    let mut a = call(&mut one, get("/a")).await;
    assert!(poll!(a.as_mut()).is_pending());
    let mut over = call(&mut two, get("/b")).await;
    assert_eq!(
        text(
            ready("another service, same bound", &mut over)
                .await
                .unwrap()
        )
        .await,
        "call 1"
    );
    drop(a);
    assert_eq!(layer.in_flight(), 0, "cancelled: its place is back");
    b.open();
    let mut c = call(&mut two, get("/c")).await;
    let mut joined = call(&mut one, get("/c")).await;
    let (c, joined) = (c.as_mut().await.unwrap(), joined.as_mut().await.unwrap());
    assert_eq!(served(&c), ServedBy::Leader);
    assert_eq!(served(&joined), ServedBy::Follower);
    assert_eq!(text(c).await, text(joined).await);
    let d = call(&mut one, get("/d")).await.await.unwrap();
    assert_eq!(served(&d), ServedBy::Leader);
    let s = layer.stats();
    assert_eq!(
        (s.leaders, s.followers, s.over_capacity, s.cancelled),
        (3, 1, 1, 1)
    );
    assert_sums(&s, 5);
}

/// Each builder call gives a registry of its own: a bounded or limited layer made from a layer
/// shares neither its bound, its limit nor its counters with it; and an option set after a
/// bound keeps the bound.
#[tokio::test(start_paused = true)]
async fn http_configured_layers_have_registries_apart_from_their_base() {
    // A backend per layer, each holding its call 0.
    let (b_base, b_timed, b_bounded, b_later) = (
        Backend::new(),
        Backend::new(),
        Backend::new(),
        Backend::new(),
    );
    b_bounded.open();
    let base = CoalesceHttpLayer::new();
    let bounded = base.clone().max_in_flight(0);
    let timed = base.clone().follower_timeout(secs(1));
    let later = CoalesceHttpLayer::new()
        .max_followers(0)
        .cache_status_header(true)
        .detached(false)
        .key_header(http::header::HeaderName::from_static("x-k"));

    let mut base_svc = http(&base, &b_base);
    let mut timed_svc = http(&timed, &b_timed);
    let mut leader = call(&mut base_svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut base_follower = call(&mut base_svc, get("/a")).await;
    assert!(poll!(base_follower.as_mut()).is_pending());
    // `timed` has its own registry: its `/a` leads there, and its follower has the limit.
    let mut timed_leader = call(&mut timed_svc, get("/a")).await;
    assert!(poll!(timed_leader.as_mut()).is_pending());
    let mut timed_follower = call(&mut timed_svc, get("/a")).await;
    assert!(poll!(timed_follower.as_mut()).is_pending());
    let over = call(&mut http(&bounded, &b_bounded), get("/a"))
        .await
        .await
        .unwrap();
    assert_eq!(served(&over), ServedBy::Bypass);
    let mut later_leader = call(&mut http(&later, &b_later), get("/a")).await;
    assert!(poll!(later_leader.as_mut()).is_pending());
    let mut over = call(&mut http(&later, &b_later), get("/a")).await;
    let over = ready("max_followers(0) kept through later options", &mut over)
        .await
        .unwrap();
    assert_eq!(
        cache_status(&over),
        "tower-coalesce; fwd=bypass; detail=over-capacity"
    );
    assert_eq!(text(over).await, "call 1");

    tokio::time::advance(secs(10)).await;
    assert!(poll!(base_follower.as_mut()).is_pending(), "base: no limit");
    let res = ready("timed: limited", &mut timed_follower).await.unwrap();
    assert_eq!(served(&res), ServedBy::Released);
    for b in [&b_base, &b_timed, &b_later] {
        b.open();
    }
    for f in [leader, base_follower, timed_leader, later_leader] {
        assert_eq!(text(f.await.unwrap()).await, "call 0");
    }
    let (s, t, o, l) = (base.stats(), timed.stats(), bounded.stats(), later.stats());
    assert_eq!(
        (s.leaders, s.followers, s.over_capacity, s.timed_out),
        (1, 1, 0, 0)
    );
    assert_eq!(
        (t.leaders, t.followers, t.over_capacity, t.timed_out),
        (1, 1, 0, 1)
    );
    assert_eq!((o.leaders, o.over_capacity), (0, 1));
    assert_eq!((l.leaders, l.followers, l.over_capacity), (1, 0, 1));
    assert_sums(&s, 2);
    assert_sums(&t, 2);
    assert_sums(&o, 1);
    assert_sums(&l, 2);
}

/// An over-bound response is the inner service's, frame by frame: the same data frames (an
/// empty one too), the trailers, the headers (but for a `Content-Length` beside a
/// `Transfer-Encoding`, which the docs say is dropped), the size hint.
#[tokio::test(start_paused = true)]
async fn http_over_bound_response_is_passed_on_frame_by_frame() {
    let sent = || {
        vec![
            Frame::data(Bytes::from_static(b"one ")),
            Frame::data(Bytes::new()),
            Frame::data(Bytes::from_static(b"two\r\n0\r\n\r\n")),
            Frame::trailers(trailers(&[
                ("x-sum", "42"),
                ("x-more", "a"),
                ("x-more", "b"),
            ])),
        ]
    };
    let b = Backend::with(move |_, parts| {
        let res = Response::builder()
            .header("x-own", "kept")
            .header("trailer", "x-sum, x-more")
            .header("cache-control", "max-age=60");
        let res = match parts.uri.path() {
            "/te" => res
                .header("transfer-encoding", "chunked")
                .header("content-length", "1"),
            "/known" => {
                return Ok(res
                    .header("content-length", "5")
                    .body(full("known"))
                    .unwrap())
            }
            _ => res,
        };
        Ok(res.body(frames(sent())).unwrap())
    });
    b.open();
    let layer = CoalesceHttpLayer::new().max_in_flight(0);
    let mut svc = http(&layer, &b);
    for path in ["/plain", "/te"] {
        let res = call(&mut svc, get(path)).await.await.unwrap();
        assert_eq!(served(&res), ServedBy::Bypass);
        assert!(!res.body().is_buffered());
        assert_eq!(res.headers()["x-own"], "kept");
        assert_eq!(res.headers()["trailer"], "x-sum, x-more");
        match path {
            "/te" => {
                assert_eq!(res.headers()["transfer-encoding"], "chunked");
                assert!(!res.headers().contains_key("content-length"), "dropped");
            }
            _ => assert!(!res.headers().contains_key("transfer-encoding")),
        }
        let mut body = res.into_body();
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            got.push(frame.unwrap());
        }
        let got: Vec<_> = got
            .into_iter()
            .map(|f| match f.into_data() {
                Ok(d) => format!("data {d:?}"),
                Err(f) => format!("trailers {:?}", f.into_trailers().unwrap()),
            })
            .collect();
        let want: Vec<_> = sent()
            .into_iter()
            .map(|f| match f.into_data() {
                Ok(d) => format!("data {d:?}"),
                Err(f) => format!("trailers {:?}", f.into_trailers().unwrap()),
            })
            .collect();
        assert_eq!(got, want, "{path}");
    }
    for req in [get("/known"), head("/known")] {
        let res = call(&mut svc, req).await.await.unwrap();
        assert_eq!(res.headers()["content-length"], "5");
        assert_eq!(res.body().size_hint().exact(), Some(5));
        assert_eq!(text(res).await, "known", "passed on as the service gave it");
    }
    let s = layer.stats();
    assert_eq!((s.over_capacity, s.leaders), (4, 0));
    assert_sums(&s, 4);
}

/// A mixed load through one layer with every bound: bypasses, leaders, followers that get a
/// copy, time out or are released, requests over each bound. Once all are done the `Stats`
/// relations hold and the gauges are back at 0.
#[tokio::test(start_paused = true)]
async fn http_stats_relations_hold_after_a_mixed_bounded_load() {
    let b = Backend::with(|n, parts| match parts.uri.path() {
        "/err" => Err(format!("err {n}")),
        "/private" => Ok(Response::builder()
            .header("cache-control", "private")
            .body(full(format!("call {n}")))
            .unwrap()),
        _ => Ok(Response::new(full(format!("call {n}")))),
    });
    let layer = CoalesceHttpLayer::new()
        .max_in_flight(3)
        .max_followers(2)
        .follower_timeout(secs(2));
    let mut svc = http(&layer, &b);
    let mut futs = Vec::new();
    // `/a` (call 0, held): a leader, two followers, one over `max_followers`; a `POST`
    // bypasses (to another URI: a write to `/a` would keep later reads out of its flight).
    // `/private` and `/err` fill `max_in_flight` (with a follower each); `/z` is over.
    let post = Request::post("/w").body(Full::default()).unwrap();
    let reqs = [
        get("/a"),
        get("/a"),
        get("/a"),
        get("/a"),
        post,
        get("/private"),
        get("/err"),
        get("/private"),
        get("/err"),
        get("/z"),
    ];
    for req in reqs {
        futs.push(call(&mut svc, req).await);
    }
    assert_eq!(layer.in_flight(), 3);
    let mut done = Vec::new();
    for (i, f) in futs.iter_mut().enumerate() {
        if let Poll::Ready(out) = poll!(f.as_mut()) {
            done.push((i, out.map(|r| served(&r)).unwrap_or(ServedBy::Bypass)));
        }
    }
    // Everything is done but `/a`'s leader and followers.
    assert_eq!(done.len(), 7, "{done:?}");
    tokio::time::advance(secs(2)).await;
    for i in [1, 2] {
        let res = ready("past its limit", &mut futs[i]).await.unwrap();
        assert_eq!(served(&res), ServedBy::Released);
    }
    // Their places are free again: one more `/a` follows.
    let mut last = call(&mut svc, get("/a")).await;
    assert!(poll!(last.as_mut()).is_pending());
    b.open();
    futs[0].as_mut().await.unwrap();
    last.await.unwrap();
    let s = layer.stats();
    assert_eq!((s.leaders, s.followers, s.bypassed), (3, 5, 1), "{s:?}");
    assert_eq!(
        (s.over_capacity, s.timed_out, s.released, s.errors),
        (2, 2, 2, 1),
        "{s:?}"
    );
    assert_eq!((layer.waiting(), layer.in_flight(), s.cancelled), (0, 0, 0));
    assert_sums(&s, 11);
}

/// A follower that took the call over from a leader that left drives it, and so no longer
/// holds a place under `max_followers` (as `Stats` documents): one more request may follow.
#[tokio::test(start_paused = true)]
async fn http_follower_that_took_over_frees_its_place_under_max_followers() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new().max_followers(1);
    let mut svc = http(&layer, &b);
    let mut leader = call(&mut svc, get("/a")).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut driver = call(&mut svc, get("/a")).await;
    assert!(poll!(driver.as_mut()).is_pending());
    drop(leader);
    assert!(poll!(driver.as_mut()).is_pending(), "it drives now");
    let mut next = call(&mut svc, get("/a")).await;
    assert!(
        poll!(next.as_mut()).is_pending(),
        "a follower: the place is free"
    );
    let mut over = call(&mut svc, get("/a")).await;
    assert_eq!(
        text(ready("over", &mut over).await.unwrap()).await,
        "call 1"
    );
    b.open();
    assert_eq!(text(driver.await.unwrap()).await, "call 0");
    assert_eq!(text(next.await.unwrap()).await, "call 0");
    let s = layer.stats();
    assert_eq!(
        (s.leaders, s.followers, s.over_capacity, s.cancelled),
        (1, 2, 1, 0)
    );
    assert_sums(&s, 4);
}

/// A call run alone that fails or panics: its request gets the error or the panic, as without
/// the layer, and it is counted in `over_capacity` only (not in `errors` or `panics`).
#[tokio::test(start_paused = true)]
async fn over_bound_errors_and_panics_reach_their_caller_and_count_only_as_over_capacity() {
    let b = Backend::with(|n, parts| match parts.uri.path() {
        "/err" => Err(format!("err {n}")),
        "/panic" => panic!("panic {n}"),
        _ => Ok(grpc_ok(format!("call {n}"))),
    });
    b.open();
    let layer = CoalesceHttpLayer::new().max_in_flight(0);
    let mut svc = http(&layer, &b);
    assert_eq!(
        call(&mut svc, get("/err")).await.await.unwrap_err(),
        "err 0"
    );
    let panicked = AssertUnwindSafe(call(&mut svc, get("/panic")).await)
        .catch_unwind()
        .await;
    let Err(message) = panicked else {
        panic!("the caller's future panics");
    };
    assert_eq!(
        message.downcast_ref::<String>().map(String::as_str),
        Some("panic 1")
    );
    let s = layer.stats();
    assert_eq!(
        (s.over_capacity, s.leaders, s.errors, s.panics),
        (2, 0, 0, 0)
    );
    assert_sums(&s, 2);

    let layer = CoalesceGrpcLayer::new().method(METHOD).max_in_flight(0);
    let failing = Backend::with(|n, _| Err(format!("grpc err {n}")));
    failing.open();
    let mut fsvc = grpc(&layer, &failing);
    assert_eq!(
        call(&mut fsvc, grpc_call()).await.await.unwrap_err(),
        "grpc err 0"
    );
    let bad_status = Backend::with(|_, _| {
        Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "13")
            .body(full(""))
            .unwrap())
    });
    bad_status.open();
    let res = call(&mut grpc(&layer, &bad_status), grpc_call())
        .await
        .await
        .unwrap();
    assert_eq!(served(&res), ServedBy::Bypass);
    assert_eq!(res.headers()["grpc-status"], "13");
    drop(svc);
    let s = layer.stats();
    assert_eq!(
        (s.over_capacity, s.leaders, s.errors, s.panics),
        (2, 0, 0, 0)
    );
    assert_sums(&s, 2);
}

/// `detached(true)` makes a *flight* complete when its requests have gone; a call over a bound
/// is no flight: it is its request's own, and dropping the request drops the call. (Not said
/// by the docs of `detached` or of the bounds; this pins what happens.)
#[tokio::test(start_paused = true)]
async fn http_detached_over_bound_call_is_cancelled_with_its_request() {
    let b = Backend::new();
    let layer = CoalesceHttpLayer::new().detached(true).max_in_flight(0);
    let mut svc = http(&layer, &b);
    let mut over = call(&mut svc, get("/a")).await;
    assert!(poll!(over.as_mut()).is_pending());
    assert_eq!(b.calls(), 1);
    // The call's future holds the gate's receiver: dropping it drops the receiver.
    assert_eq!(b.gate.receiver_count(), 1);
    drop(over);
    assert_eq!(
        b.gate.receiver_count(),
        0,
        "the call is dropped with its request"
    );
    let s = layer.stats();
    assert_eq!((s.over_capacity, s.leaders, s.cancelled), (1, 0, 0));
}

/// A follower's timer made in one runtime, polled after that runtime is gone: it waits with no
/// limit rather than panicking, and gets its copy.
#[test]
fn http_and_grpc_follower_whose_timer_runtime_is_gone_waits_with_no_limit() {
    for is_grpc in [false, true] {
        let b = if is_grpc {
            Backend::grpc()
        } else {
            Backend::new()
        };
        let (mut leader, mut follower) = {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let futs = rt.block_on(async {
                let (mut leader, mut follower) = if is_grpc {
                    let layer = CoalesceGrpcLayer::new()
                        .method(METHOD)
                        .follower_timeout(secs(3600));
                    let mut svc = grpc(&layer, &b);
                    let l = Box::pin(svc.call(grpc_call())) as Fut;
                    let f = Box::pin(svc.call(grpc_call())) as Fut;
                    (l, f)
                } else {
                    let layer = CoalesceHttpLayer::new().follower_timeout(secs(3600));
                    let mut svc = http(&layer, &b);
                    let l = Box::pin(svc.call(get("/a"))) as Fut;
                    let f = Box::pin(svc.call(get("/a"))) as Fut;
                    (l, f)
                };
                assert!(poll!(leader.as_mut()).is_pending());
                assert!(poll!(follower.as_mut()).is_pending());
                (leader, follower)
            });
            drop(rt);
            futs
        };
        futures::executor::block_on(async {
            assert!(poll!(follower.as_mut()).is_pending(), "grpc={is_grpc}");
            b.open();
            let res: Reply = leader.as_mut().await.unwrap();
            assert_eq!(text(res).await, "call 0");
            let res: Reply = follower.as_mut().await.unwrap();
            assert_eq!(served(&res), ServedBy::Follower, "grpc={is_grpc}");
            assert_eq!(text(res).await, "call 0");
        });
        assert_eq!(b.calls(), 1);
    }
}

/// In a tokio runtime without a time driver (`tokio::time` panics there) a follower waits with
/// no limit: no panic out of `call`, and it gets its copy.
#[test]
fn http_and_grpc_follower_in_a_runtime_without_timers_waits_with_no_limit() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for is_grpc in [false, true] {
        let b = if is_grpc {
            Backend::grpc()
        } else {
            Backend::new()
        };
        let (mut svc, stats): (Svc, Box<dyn Fn() -> Stats>) = if is_grpc {
            let layer = CoalesceGrpcLayer::new()
                .method(METHOD)
                .follower_timeout(Duration::from_nanos(1));
            let svc = Svc::new(grpc(&layer, &b));
            (svc, Box::new(move || layer.stats()))
        } else {
            let layer = CoalesceHttpLayer::new().follower_timeout(Duration::from_nanos(1));
            let svc = Svc::new(http(&layer, &b));
            (svc, Box::new(move || layer.stats()))
        };
        let req = move || if is_grpc { grpc_call() } else { get("/a") };
        rt.block_on(async {
            let mut leader = call(&mut svc, req()).await;
            assert!(poll!(leader.as_mut()).is_pending());
            let mut follower = call(&mut svc, req()).await;
            assert!(poll!(follower.as_mut()).is_pending());
            tokio::task::yield_now().await;
            assert!(poll!(follower.as_mut()).is_pending(), "no limit");
            b.open();
            assert_eq!(text(leader.await.unwrap()).await, "call 0");
            let res = follower.await.unwrap();
            assert_eq!(served(&res), ServedBy::Follower, "grpc={is_grpc}");
        });
        assert_eq!((stats().timed_out, b.calls()), (0, 1));
    }
}

/// Followers' limits racing the flight's end on a multi-thread runtime, many rounds: whatever
/// the timing, every request gets one answer, each request that fell through made exactly one
/// call (`calls == leaders + fell_through`), the counters add up and the gauges return to 0.
#[test]
fn timeouts_racing_the_flight_on_worker_threads_keep_every_count() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for round in 0..40u64 {
            let limit = Duration::from_micros(50 + 37 * round);
            for is_grpc in [false, true] {
                let b = if is_grpc {
                    Backend::grpc()
                } else {
                    Backend::new()
                };
                let (svc, stats, waiting): Probe = if is_grpc {
                    let layer = CoalesceGrpcLayer::new()
                        .method(METHOD)
                        .follower_timeout(limit)
                        .max_followers(12);
                    let l2 = layer.clone();
                    (
                        tower::util::BoxCloneService::new(grpc(&layer, &b)),
                        Box::new(move || layer.stats()),
                        Box::new(move || l2.waiting()),
                    )
                } else {
                    let layer = CoalesceHttpLayer::new()
                        .follower_timeout(limit)
                        .max_followers(12);
                    let l2 = layer.clone();
                    (
                        tower::util::BoxCloneService::new(http(&layer, &b)),
                        Box::new(move || layer.stats()),
                        Box::new(move || l2.waiting()),
                    )
                };
                let req = || if is_grpc { grpc_call() } else { get("/a") };
                let mut tasks = vec![tokio::spawn(svc.clone().oneshot(req()))];
                settle("the leader calls", || b.calls() >= 1).await;
                for _ in 0..16 {
                    tasks.push(tokio::spawn(svc.clone().oneshot(req())));
                }
                for _ in 0..(round % 5) {
                    tokio::task::yield_now().await;
                }
                b.open();
                // Every call's answer reaches exactly one request that is not a follower (its
                // leader, or the request that made it on its own); a follower gets a leader's.
                let mut own = std::collections::BTreeSet::new();
                let mut led = std::collections::BTreeSet::new();
                let mut copies = Vec::new();
                for task in tasks {
                    let res = bounded("a request", task).await.unwrap().unwrap();
                    let by = served(&res);
                    let body = text(res).await;
                    match by {
                        ServedBy::Follower => copies.push(body),
                        _ => {
                            if by == ServedBy::Leader {
                                led.insert(body.clone());
                            }
                            assert!(own.insert(body), "one request per call");
                        }
                    }
                }
                assert!(led.contains("call 0"));
                assert!(copies.iter().all(|c| led.contains(c)), "{copies:?} {led:?}");
                assert_eq!(own.len(), b.calls(), "every call answered one request");
                let s = stats();
                assert_eq!(
                    b.calls() as u64,
                    s.leaders + s.fell_through,
                    "grpc={is_grpc}: {s:?}"
                );
                assert_sums(&s, 17);
                assert_eq!(waiting(), 0);
            }
        }
    });
}

// =============================================================================================
// gRPC
// =============================================================================================

#[tokio::test(start_paused = true)]
async fn grpc_detached_caller_has_no_limit_its_followers_do() {
    let b = Backend::grpc();
    let layer = CoalesceGrpcLayer::new()
        .method(METHOD)
        .detached(true)
        .follower_timeout(secs(1));
    let mut svc = grpc(&layer, &b);
    let mut leader = call(&mut svc, grpc_call()).await;
    assert!(poll!(leader.as_mut()).is_pending());
    until("the detached call starts", || b.calls() == 1).await;
    let mut followers = Vec::new();
    for _ in 0..3 {
        let mut f = call(&mut svc, grpc_call()).await;
        assert!(poll!(f.as_mut()).is_pending());
        followers.push(f);
    }
    assert_eq!(layer.waiting(), 3);
    tokio::time::advance(secs(30)).await;
    assert!(
        poll!(leader.as_mut()).is_pending(),
        "no limit for the caller"
    );
    let mut bodies = Vec::new();
    for f in &mut followers {
        let res = ready("past its limit", f).await.unwrap();
        assert_eq!(served(&res), ServedBy::Released);
        bodies.push(text(res).await);
    }
    bodies.sort();
    assert_eq!(bodies, ["call 1", "call 2", "call 3"]);
    b.open();
    let res = leader.await.unwrap();
    assert_eq!(served(&res), ServedBy::Leader);
    assert_eq!(text(res).await, "call 0");
    let s = layer.stats();
    assert_eq!(
        (s.timed_out, s.released, s.cancelled, b.calls()),
        (3, 0, 0, 4)
    );
    assert_eq!(layer.waiting(), 0);
    assert_sums(&s, 4);
}

/// The limits pass as the leader drops: one follower takes the call over, the others call on
/// their own; each once.
#[tokio::test(start_paused = true)]
async fn grpc_followers_time_out_as_the_leader_drops() {
    let b = Backend::grpc();
    let layer = CoalesceGrpcLayer::new()
        .method(METHOD)
        .follower_timeout(secs(1));
    let mut svc = grpc(&layer, &b);
    let mut leader = call(&mut svc, grpc_call()).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut followers = Vec::new();
    for _ in 0..4 {
        let mut f = call(&mut svc, grpc_call()).await;
        assert!(poll!(f.as_mut()).is_pending());
        followers.push(f);
    }
    tokio::time::advance(secs(1)).await;
    drop(leader);
    let mut driver = followers.pop().unwrap();
    assert!(poll!(driver.as_mut()).is_pending(), "it drives now");
    for f in &mut followers {
        let res = ready("past its limit", f).await.unwrap();
        assert_eq!(served(&res), ServedBy::Released);
    }
    tokio::time::advance(secs(60)).await;
    assert!(poll!(driver.as_mut()).is_pending());
    b.open();
    let res = driver.await.unwrap();
    assert_eq!(served(&res), ServedBy::Follower);
    assert_eq!(text(res).await, "call 0");
    let s = layer.stats();
    assert_eq!((s.timed_out, s.cancelled, b.calls()), (3, 0, 4));
    assert_sums(&s, 5);
}

/// A failed call (`grpc-status` not OK, or an inner error) releases its waiting followers;
/// one that timed out before is counted as timed out only.
#[tokio::test(start_paused = true)]
async fn grpc_failed_call_after_a_follower_timed_out() {
    for inner_error in [false, true] {
        let b = Backend::with(move |n, _| match (n, inner_error) {
            (0, true) => Err("boom 0".to_owned()),
            (0, false) => Ok(Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "5")
                .body(full(""))
                .unwrap()),
            _ => Ok(grpc_ok(format!("call {n}"))),
        });
        let layer = CoalesceGrpcLayer::new()
            .method(METHOD)
            .follower_timeout(secs(2));
        let mut svc = grpc(&layer, &b);
        let mut leader = call(&mut svc, grpc_call()).await;
        assert!(poll!(leader.as_mut()).is_pending());
        let mut early = call(&mut svc, grpc_call()).await;
        assert!(poll!(early.as_mut()).is_pending());
        tokio::time::advance(secs(2)).await;
        let mut late = call(&mut svc, grpc_call()).await;
        assert!(poll!(late.as_mut()).is_pending());
        assert_eq!(
            text(ready("timed out", &mut early).await.unwrap()).await,
            "call 1"
        );
        b.open();
        match leader.await {
            Err(e) => assert!(inner_error && e == "boom 0"),
            Ok(res) => {
                assert!(!inner_error);
                assert_eq!(res.headers()["grpc-status"], "5");
            }
        }
        let res = late.await.unwrap();
        assert_eq!(served(&res), ServedBy::Released);
        assert_eq!(text(res).await, "call 2");
        let s = layer.stats();
        assert_eq!((s.timed_out, s.released, s.errors, b.calls()), (1, 1, 1, 3));
        assert_sums(&s, 3);
    }
}

/// `max_in_flight(0)` and `max_followers(0)` on the gRPC layer, each a registry apart from the
/// layer it was made from; a call over either bound is marked `ServedBy::Bypass`.
#[tokio::test(start_paused = true)]
async fn grpc_zero_bounds_and_registries_apart() {
    let (b_base, b_none, b_nf) = (Backend::grpc(), Backend::grpc(), Backend::grpc());
    b_none.open();
    let base = CoalesceGrpcLayer::new().method(METHOD);
    let none_in_flight = base.clone().max_in_flight(0);
    let no_followers = base.clone().max_followers(0);
    let mut base_svc = grpc(&base, &b_base);
    let mut leader = call(&mut base_svc, grpc_call()).await;
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = call(&mut base_svc, grpc_call()).await;
    assert!(poll!(follower.as_mut()).is_pending());

    let mut svc = grpc(&none_in_flight, &b_none);
    for n in 0..2 {
        let mut f = call(&mut svc, grpc_call()).await;
        let res = ready("alone", &mut f).await.unwrap();
        assert_eq!(served(&res), ServedBy::Bypass);
        assert_eq!(text(res).await, format!("call {n}"));
    }
    let mut svc = grpc(&no_followers, &b_nf);
    let mut nf_leader = call(&mut svc, grpc_call()).await;
    assert!(
        poll!(nf_leader.as_mut()).is_pending(),
        "a leader in its own registry"
    );
    for n in 1..=2 {
        let mut f = call(&mut svc, grpc_call()).await;
        let res = ready("nobody may follow", &mut f).await.unwrap();
        assert_eq!(served(&res), ServedBy::Bypass);
        assert_eq!(text(res).await, format!("call {n}"));
    }
    assert_eq!((base.waiting(), no_followers.waiting()), (1, 0));
    b_base.open();
    b_nf.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    assert_eq!(text(follower.await.unwrap()).await, "call 0");
    assert_eq!(text(nf_leader.await.unwrap()).await, "call 0");
    let (s, i, f) = (base.stats(), none_in_flight.stats(), no_followers.stats());
    assert_eq!((s.leaders, s.followers, s.over_capacity), (1, 1, 0));
    assert_eq!((i.leaders, i.over_capacity), (0, 2));
    assert_eq!((f.leaders, f.followers, f.over_capacity), (1, 0, 2));
    assert_sums(&s, 2);
    assert_sums(&i, 2);
    assert_sums(&f, 3);
}

/// README: on the gRPC layer `max_in_flight(n)` and `max_followers(n)` "work as for HTTP",
/// where an over-bound response is "passed on as it streams, unbuffered" (nobody can share
/// it). A gRPC call over a bound whose response body has sent its first frame and not ended:
/// does its response come before the body ends, unbuffered?
#[tokio::test(start_paused = true)]

async fn grpc_over_bound_response_is_unbuffered_as_for_http() {
    let hold: Arc<Mutex<Option<mpsc::Sender<Bytes>>>> = Arc::default();
    let keep = Arc::clone(&hold);
    let b = Backend::with(move |_, _| {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Bytes::from_static(b"\0\0\0\0\x01x")).unwrap();
        *keep.lock().unwrap() = Some(tx);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok::<_, BoxError>(Frame::data(data)), rx))
        });
        Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(stream).boxed_unsync())
            .unwrap())
    });
    b.open();
    let layer = CoalesceGrpcLayer::new().method(METHOD).max_in_flight(0);
    let mut svc = grpc(&layer, &b);
    let mut over = call(&mut svc, grpc_call()).await;
    let outcome = poll!(over.as_mut());
    hold.lock().unwrap().take();
    let res = match outcome {
        Poll::Ready(res) => res.unwrap(),
        Poll::Pending => {
            let res = over.await.unwrap();
            assert!(
                !res.body().is_buffered(),
                "the response waited for its whole body, and came buffered"
            );
            res
        }
    };
    assert!(!res.body().is_buffered());
    assert_eq!(layer.stats().over_capacity, 1);
}

// =============================================================================================
// Over real servers: axum + hyper
// =============================================================================================

const WAIT: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("hangs: {what}"))
}

async fn settle(what: &str, cond: impl Fn() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Counts handler calls; call 0 waits for the gate.
#[derive(Clone)]
struct Gated {
    calls: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
}

impl Gated {
    fn new() -> Self {
        Gated {
            calls: Arc::default(),
            gate: Arc::new(watch::channel(false).0),
        }
    }

    async fn enter(&self) -> usize {
        let n = self.calls.fetch_add(1, SeqCst);
        if n == 0 {
            let mut gate = self.gate.subscribe();
            gate.wait_for(|open| *open).await.unwrap();
        }
        n
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

fn app(g: &Gated, layer: Option<CoalesceHttpLayer>) -> axum::Router {
    use axum::routing::get;
    let (a, b, c, d) = (g.clone(), g.clone(), g.clone(), g.clone());
    let router = axum::Router::new()
        .route(
            "/slow",
            get(move || {
                let g = a.clone();
                async move { format!("call {}", g.enter().await) }
            }),
        )
        .route(
            "/known",
            get(move || {
                let g = b.clone();
                async move { Bytes::from(format!("known body {}", g.enter().await)) }
            }),
        )
        .route(
            "/trailers",
            get(move || {
                let g = c.clone();
                async move {
                    let n = g.enter().await;
                    Response::builder()
                        .header("trailer", "x-sum")
                        .body(axum::body::Body::new(frames(vec![
                            Frame::data(Bytes::from("part one, ")),
                            Frame::data(Bytes::from(format!("call {n}"))),
                            Frame::trailers(trailers(&[("x-sum", &format!("sum-{n}"))])),
                        ])))
                        .unwrap()
                }
            }),
        )
        .route(
            "/te-stale",
            get(move || {
                let g = d.clone();
                async move {
                    let n = g.enter().await;
                    Response::builder()
                        .header("transfer-encoding", "chunked")
                        .header("content-length", "1")
                        .body(axum::body::Body::new(frames(vec![
                            Frame::data(Bytes::from("stale ")),
                            Frame::data(Bytes::from(format!("call {n}"))),
                        ])))
                        .unwrap()
                }
            }),
        );
    match layer {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Got {
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Got {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }
}

async fn collect(res: Response<hyper::body::Incoming>) -> Got {
    let (parts, body) = res.into_parts();
    let collected = bounded("the body", body.collect()).await.unwrap();
    Got {
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    }
}

/// One request on a connection of its own: HTTP/1.1 or h2c.
async fn fetch(addr: SocketAddr, h2: bool, path: &str, te: bool) -> Got {
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let mut req = Request::get(format!("http://{addr}{path}"));
    if te {
        req = req.header("te", "trailers");
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let res = if h2 {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        bounded("h2 response", tx.send_request(req)).await.unwrap()
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.uri = path.parse().unwrap();
        parts
            .headers
            .insert("host", addr.to_string().parse().unwrap());
        let req = Request::from_parts(parts, body);
        bounded("h1 response", tx.send_request(req)).await.unwrap()
    };
    collect(res).await
}

/// A follower over the wire (HTTP/1.1, then h2c) that waited past its limit gets its own call's
/// response, marked `detail=timeout`; the leader, held until then, gets the flight's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_axum_follower_past_its_limit_gets_its_own_call() {
    for h2 in [false, true] {
        let g = Gated::new();
        let layer = CoalesceHttpLayer::new()
            .follower_timeout(Duration::from_millis(50))
            .cache_status_header(true);
        let addr = serve(app(&g, Some(layer.clone()))).await;
        let leader = tokio::spawn(async move { fetch(addr, h2, "/slow", false).await });
        settle("the leader in the handler", || g.calls() == 1).await;
        let follower = fetch(addr, h2, "/slow", false).await;
        assert_eq!(follower.text(), "call 1", "h2={h2}");
        assert_eq!(
            follower.cache_status(),
            "tower-coalesce; fwd=miss; collapsed=?0; detail=timeout"
        );
        g.open();
        let leader = bounded("the leader", leader).await.unwrap();
        assert_eq!(
            (leader.text(), leader.cache_status()),
            ("call 0", "tower-coalesce; fwd=miss")
        );
        settle("the flight ends", || layer.in_flight() == 0).await;
        let s = layer.stats();
        assert_eq!((s.timed_out, s.followers, g.calls()), (1, 1, 2), "h2={h2}");
        assert_eq!(layer.waiting(), 0);
        assert_sums(&s, 2);
    }
}

/// Raw HTTP/1.1: one request, `Connection: close`, read to the end.
async fn raw(addr: SocketAddr, method: &str, path: &str, extra: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    bounded("raw read", s.read_to_end(&mut all)).await.unwrap();
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let head = String::from_utf8(all[..end].to_vec())
        .unwrap()
        .to_ascii_lowercase();
    (head, all[end..].to_vec())
}

fn header_lines<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .collect()
}

fn dechunk(mut body: &[u8]) -> (Vec<u8>, String) {
    let mut out = Vec::new();
    loop {
        let line = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = std::str::from_utf8(&body[..line]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        body = &body[line + 2..];
        if size == 0 {
            return (out, String::from_utf8(body.to_vec()).unwrap());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Over the wire, an over-bound response is what the server would send without the layer: the
/// same `HEAD` and `GET` framing and length for a body of known length, a chunked body with its
/// trailers (HTTP/1.1 with `TE: trailers`, and h2c), and one framing only for a handler's
/// `Transfer-Encoding` beside a stale `Content-Length`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_axum_over_bound_responses_are_framed_as_without_the_layer() {
    let g = Gated::new();
    g.open();
    let bounded_layer = CoalesceHttpLayer::new().max_in_flight(0);
    let plain = serve(app(&g, None)).await;
    let over = serve(app(&g, Some(bounded_layer.clone()))).await;
    let shared = serve(app(&g, Some(CoalesceHttpLayer::new()))).await;

    // HEAD and GET of a known length: the same `Content-Length` everywhere, no body for HEAD.
    let mut lengths = Vec::new();
    for addr in [plain, over, shared] {
        let (head_head, head_body) = raw(addr, "HEAD", "/known", "").await;
        let (get_head, get_body) = raw(addr, "GET", "/known", "").await;
        assert!(head_body.is_empty(), "{head_head}");
        assert!(header_lines(&head_head, "transfer-encoding").is_empty());
        assert_eq!(
            header_lines(&head_head, "content-length"),
            header_lines(&get_head, "content-length"),
            "HEAD and GET agree: {head_head} / {get_head}"
        );
        assert!(String::from_utf8(get_body)
            .unwrap()
            .starts_with("known body "));
        lengths.push(header_lines(&head_head, "content-length").join(","));
    }
    assert!(
        lengths.iter().all(|l| l == &lengths[0] && !l.is_empty()),
        "{lengths:?}"
    );

    // Trailers over HTTP/1.1 (asked for) and over h2c.
    for addr in [plain, over] {
        let (head, body) = raw(addr, "GET", "/trailers", "te: trailers\r\n").await;
        assert_eq!(
            header_lines(&head, "transfer-encoding"),
            ["chunked"],
            "{head}"
        );
        assert!(header_lines(&head, "content-length").is_empty(), "{head}");
        let (data, trailer) = dechunk(&body);
        assert!(
            String::from_utf8(data)
                .unwrap()
                .starts_with("part one, call "),
            "{head}"
        );
        assert!(
            trailer.to_ascii_lowercase().starts_with("x-sum: sum-"),
            "{trailer:?}"
        );
        let got = fetch(addr, true, "/trailers", true).await;
        assert!(got.text().starts_with("part one, call "));
        let t = got.trailers.expect("trailers over h2c");
        assert!(t["x-sum"].to_str().unwrap().starts_with("sum-"));
    }

    // A stale `Content-Length` beside `Transfer-Encoding`: one framing, the whole body.
    let (head, body) = raw(over, "GET", "/te-stale", "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(
        header_lines(&head, "transfer-encoding"),
        ["chunked"],
        "{head}"
    );
    assert!(header_lines(&head, "content-length").is_empty(), "{head}");
    let (data, _) = dechunk(&body);
    assert!(String::from_utf8(data).unwrap().starts_with("stale call "));

    let s = bounded_layer.stats();
    assert_eq!((s.leaders, s.over_capacity), (0, 5));
    assert_sums(&s, 5);
}

// =============================================================================================
// Over real servers: tonic
// =============================================================================================

#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/catalog.v1.rs");
}

#[derive(Clone)]
struct Catalog {
    g: Gated,
}

#[tonic::async_trait]
impl pb::catalog_server::Catalog for Catalog {
    async fn get_item(
        &self,
        request: tonic::Request<pb::GetItemRequest>,
    ) -> Result<tonic::Response<pb::Item>, tonic::Status> {
        let n = self.g.enter().await;
        Ok(tonic::Response::new(pb::Item {
            id: request.into_inner().id,
            description: format!("call {n}"),
            payload: Vec::new(),
        }))
    }

    type WatchItemStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::Item, tonic::Status>> + Send>>;

    async fn watch_item(
        &self,
        _: tonic::Request<pb::GetItemRequest>,
    ) -> Result<tonic::Response<Self::WatchItemStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
}

async fn tonic_server(
    g: &Gated,
    layer: CoalesceGrpcLayer,
) -> pb::catalog_client::CatalogClient<tonic::transport::Channel> {
    let incoming =
        tonic::transport::server::TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = incoming.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .layer(layer)
        .add_service(pb::catalog_server::CatalogServer::new(Catalog {
            g: g.clone(),
        }));
    tokio::spawn(async move { router.serve_with_incoming(incoming).await.unwrap() });
    bounded(
        "connect",
        pb::catalog_client::CatalogClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap()
}

fn item(id: &str) -> pb::GetItemRequest {
    pb::GetItemRequest {
        id: id.to_owned(),
        padding: Vec::new(),
    }
}

/// tonic: a follower past its limit gets its own call's answer; the leader, held until then,
/// gets the flight's; the counters add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_tonic_follower_past_its_limit_gets_its_own_call() {
    let g = Gated::new();
    let layer = CoalesceGrpcLayer::new()
        .method(METHOD)
        .follower_timeout(Duration::from_millis(50));
    let client = tonic_server(&g, layer.clone()).await;
    let mut c = client.clone();
    let leader = tokio::spawn(async move { c.get_item(item("k")).await });
    settle("the leader in the handler", || g.calls() == 1).await;
    let timed_out = bounded("the follower", client.clone().get_item(item("k")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(timed_out.description, "call 1");
    g.open();
    let led = bounded("the leader", leader)
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(led.description, "call 0");
    settle("the flight ends", || layer.in_flight() == 0).await;
    let s = layer.stats();
    assert_eq!(
        (s.leaders, s.followers, s.timed_out, s.released),
        (1, 1, 1, 0)
    );
    assert_eq!((layer.waiting(), g.calls()), (0, 2));
    assert_sums(&s, 2);
}

/// tonic: a call over `max_followers` gets its own answer at once while the follower that fits
/// waits for the leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_tonic_call_over_max_followers_answers_alone() {
    let g = Gated::new();
    let layer = CoalesceGrpcLayer::new().method(METHOD).max_followers(1);
    let client = tonic_server(&g, layer.clone()).await;
    let mut c = client.clone();
    let leader = tokio::spawn(async move { c.get_item(item("k")).await });
    settle("the leader in the handler", || g.calls() == 1).await;
    let mut c = client.clone();
    let follower = tokio::spawn(async move { c.get_item(item("k")).await });
    settle("a follower waits", || layer.waiting() == 1).await;
    let over = bounded("over the bound", client.clone().get_item(item("k")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(over.description, "call 1");
    g.open();
    for task in [leader, follower] {
        let item = bounded("a waiter", task)
            .await
            .unwrap()
            .unwrap()
            .into_inner();
        assert_eq!(item.description, "call 0");
    }
    settle("the flight ends", || layer.in_flight() == 0).await;
    let s = layer.stats();
    assert_eq!((s.leaders, s.followers, s.over_capacity), (1, 1, 1));
    assert_eq!((layer.waiting(), g.calls()), (0, 2));
    assert_sums(&s, 3);
}
