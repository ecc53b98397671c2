//! The HTTP and gRPC layers' capacity bounds and follower wait limit: `max_in_flight`,
//! `max_followers`, `follower_timeout`.
//!
//! No real time passes: the clock is paused and advanced by hand, the backend holds its first
//! call behind a gate the test opens, and every future is polled by hand, so each step is
//! known to have happened when it is asserted.
#![cfg(feature = "grpc")]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::poll;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::{mpsc, watch};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_coalesce::grpc::{self, CoalesceGrpcLayer};
use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

type Out = UnsyncBoxBody<Bytes, BoxError>;

/// A backend whose call 0 waits for the gate and whose later calls answer at once; each
/// answers `call <n>`. Call 0 of a [`streaming`](Backend::streaming) backend instead answers
/// at once with a body that sends one frame and stays open while the test holds `frames`.
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
    frames: Option<Arc<std::sync::Mutex<Option<mpsc::Sender<Bytes>>>>>,
}

impl Backend {
    fn new() -> Self {
        Backend {
            calls: Arc::default(),
            gate: Arc::new(watch::channel(false).0),
            frames: None,
        }
    }

    fn streaming() -> (Self, Arc<std::sync::Mutex<Option<mpsc::Sender<Bytes>>>>) {
        let frames = Arc::default();
        let backend = Backend {
            frames: Some(Arc::clone(&frames)),
            ..Backend::new()
        };
        (backend, frames)
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    fn answer(&self, grpc: bool) -> impl Future<Output = Result<Response<Out>, Infallible>> {
        let n = self.calls.fetch_add(1, SeqCst);
        let mut gate = self.gate.subscribe();
        let frames = self.frames.clone();
        async move {
            let res = Response::builder();
            let res = match grpc {
                true => res
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0"),
                false => res,
            };
            if let (0, Some(frames)) = (n, frames) {
                let (tx, rx) = mpsc::channel(4);
                tx.try_send(Bytes::from("first")).unwrap();
                *frames.lock().unwrap() = Some(tx);
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    let data = rx.recv().await?;
                    Some((Ok::<_, BoxError>(Frame::data(data)), rx))
                });
                return Ok(res.body(StreamBody::new(stream).boxed_unsync()).unwrap());
            }
            if n == 0 {
                gate.wait_for(|open| *open).await.unwrap();
            }
            let body = Full::new(Bytes::from(format!("call {n}")))
                .map_err(|e| match e {})
                .boxed_unsync();
            Ok(res.body(body).unwrap())
        }
    }
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::default()).unwrap()
}

fn grpc_call() -> Request<Full<Bytes>> {
    Request::post("/catalog.v1.Catalog/GetItem")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01k")))
        .unwrap()
}

async fn text<B: Body>(res: Response<B>) -> String
where
    B::Error: std::fmt::Debug,
{
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

fn cache_status<B>(res: &Response<B>) -> String {
    res.headers()["cache-status"].to_str().unwrap().to_owned()
}

type Reply = Response<tower_coalesce::http::CoalesceBody<Out>>;

/// `layer` over `backend`, as an HTTP service.
fn http(
    layer: &CoalesceHttpLayer,
    backend: &Backend,
) -> impl Service<Request<Full<Bytes>>, Response = Reply, Error = Infallible> + Clone {
    let backend = backend.clone();
    layer.layer(service_fn(move |_: Request<Full<Bytes>>| {
        backend.answer(false)
    }))
}

/// `layer` over `backend`, as a gRPC service.
fn grpc(
    layer: &CoalesceGrpcLayer,
    backend: &Backend,
) -> impl Service<Request<Full<Bytes>>, Response = Reply, Error = Infallible> + Clone {
    let backend = backend.clone();
    layer.layer(service_fn(
        move |_: Request<tower_coalesce::http::CoalesceBody<Full<Bytes>>>| backend.answer(true),
    ))
}

/// Calls `svc` once (readiness first, as tower asks).
async fn call<S>(svc: &mut S, req: Request<Full<Bytes>>) -> S::Future
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(req)
}

// ---------------------------------------------------------------------------------------------
// HTTP: follower_timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn http_follower_past_its_limit_calls_on_its_own_and_the_flight_goes_on() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .follower_timeout(Duration::from_secs(5))
        .cache_status_header(true);
    let mut svc = http(&layer, &backend);
    let mut leader = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(follower.as_mut()).is_pending());
    assert_eq!((backend.calls(), layer.waiting()), (1, 1));

    tokio::time::advance(Duration::from_millis(4_999)).await;
    assert!(
        poll!(follower.as_mut()).is_pending(),
        "still within its limit"
    );
    assert_eq!(backend.calls(), 1);

    tokio::time::advance(Duration::from_millis(1)).await;
    let Poll::Ready(res) = poll!(follower.as_mut()) else {
        panic!("past its limit, the follower makes its own call, which answers at once");
    };
    let res = res.unwrap();
    assert_eq!(
        res.extensions().get::<ServedBy>(),
        Some(&ServedBy::Released)
    );
    assert_eq!(
        cache_status(&res),
        "tower-coalesce; fwd=miss; collapsed=?0; detail=timeout"
    );
    assert_eq!(text(res).await, "call 1");
    assert_eq!((backend.calls(), layer.waiting()), (2, 0));

    let stats = layer.stats();
    assert_eq!(
        (
            stats.followers,
            stats.timed_out,
            stats.released,
            stats.fell_through
        ),
        (1, 1, 0, 1),
        "a timed-out follower is counted once, as timed out: {stats:?}"
    );
    assert_eq!(stats.in_flight, 1, "the leader's flight goes on");

    backend.open();
    let res = leader.await.unwrap();
    assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));
    assert_eq!(text(res).await, "call 0");
    let stats = layer.stats();
    assert_eq!(
        (stats.in_flight, stats.cancelled, backend.calls()),
        (0, 0, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn http_response_in_by_the_limit_is_taken_not_dropped() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().follower_timeout(Duration::from_secs(5));
    let mut svc = http(&layer, &backend);
    let mut leader = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(follower.as_mut()).is_pending());

    backend.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    // The follower's limit passes before it is polled again; the response was in by then.
    tokio::time::advance(Duration::from_secs(60)).await;
    let res = follower.await.unwrap();
    assert_eq!(
        res.extensions().get::<ServedBy>(),
        Some(&ServedBy::Follower)
    );
    assert_eq!(text(res).await, "call 0");
    assert_eq!((backend.calls(), layer.stats().timed_out), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn http_follower_that_took_the_call_over_has_no_limit() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().follower_timeout(Duration::from_secs(5));
    let mut svc = http(&layer, &backend);
    let mut leader = Box::pin(call(&mut svc, get("/a")).await);
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(follower.as_mut()).is_pending());
    drop(leader);
    // Polled, it takes the leader's call over, for itself and any later follower.
    assert!(poll!(follower.as_mut()).is_pending());
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(
        poll!(follower.as_mut()).is_pending(),
        "it drives the call: no limit of its own"
    );
    assert_eq!(backend.calls(), 1, "no call of its own");

    backend.open();
    let res = follower.await.unwrap();
    assert_eq!(text(res).await, "call 0");
    let stats = layer.stats();
    assert_eq!(
        (stats.timed_out, stats.cancelled, backend.calls()),
        (0, 0, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn http_followers_limits_run_from_their_own_arrival() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().follower_timeout(Duration::from_secs(5));
    let mut svc = http(&layer, &backend);
    let mut leader = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(leader.as_mut()).is_pending());
    let mut early = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(early.as_mut()).is_pending());
    tokio::time::advance(Duration::from_secs(3)).await;
    let mut late = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(late.as_mut()).is_pending());
    tokio::time::advance(Duration::from_secs(2)).await;

    assert!(poll!(early.as_mut()).is_ready(), "5 s after it came");
    assert!(poll!(late.as_mut()).is_pending(), "2 s after it came");
    assert_eq!((backend.calls(), layer.waiting()), (2, 1));
    backend.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    assert_eq!(text(late.await.unwrap()).await, "call 0");
    assert_eq!(layer.stats().timed_out, 1);
}

#[test]
fn http_follower_outside_a_tokio_runtime_waits_with_no_limit() {
    futures::executor::block_on(async {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new().follower_timeout(Duration::from_nanos(1));
        let mut svc = http(&layer, &backend);
        let mut leader = pin!(call(&mut svc, get("/a")).await);
        assert!(poll!(leader.as_mut()).is_pending());
        let mut follower = pin!(call(&mut svc, get("/a")).await);
        assert!(poll!(follower.as_mut()).is_pending());
        backend.open();
        assert_eq!(text(leader.await.unwrap()).await, "call 0");
        let res = follower.await.unwrap();
        assert_eq!(
            res.extensions().get::<ServedBy>(),
            Some(&ServedBy::Follower)
        );
        assert_eq!((backend.calls(), layer.stats().timed_out), (1, 0));
    });
}

// ---------------------------------------------------------------------------------------------
// HTTP: max_followers, max_in_flight
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn http_followers_over_max_followers_call_on_their_own() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().max_followers(1);
    let mut svc = http(&layer, &backend);
    let mut leader = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(follower.as_mut()).is_pending());
    let over = call(&mut svc, get("/a")).await;
    let res = over.await.unwrap();
    assert_eq!(text(res).await, "call 1", "its own call, at once");

    backend.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    assert_eq!(text(follower.await.unwrap()).await, "call 0");
    let stats = layer.stats();
    assert_eq!(
        (
            stats.leaders,
            stats.followers,
            stats.over_capacity,
            stats.fell_through
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(backend.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn http_keys_over_max_in_flight_call_on_their_own_and_are_not_joined() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().max_in_flight(1);
    let mut svc = http(&layer, &backend);
    let mut first = pin!(call(&mut svc, get("/a")).await);
    assert!(poll!(first.as_mut()).is_pending());
    // `/b` would be a second key in flight: its call runs alone, unregistered, so a second
    // `/b` request cannot join it either.
    let b1 = call(&mut svc, get("/b")).await;
    let b2 = call(&mut svc, get("/b")).await;
    let (b1, b2) = tokio::join!(b1, b2);
    let mut bodies = [text(b1.unwrap()).await, text(b2.unwrap()).await];
    bodies.sort();
    assert_eq!(bodies, ["call 1", "call 2"]);
    assert_eq!(layer.in_flight(), 1);
    backend.open();
    assert_eq!(text(first.await.unwrap()).await, "call 0");
    let stats = layer.stats();
    assert_eq!(
        (stats.leaders, stats.over_capacity, stats.in_flight),
        (1, 2, 0)
    );
}

/// A call over a bound has nobody to share with: its response is passed on as it streams,
/// where a leader's shared response waits for its whole body.
#[tokio::test(start_paused = true)]
async fn http_call_over_a_bound_streams_its_body_unbuffered() {
    for bounded in [false, true] {
        let (backend, frames) = Backend::streaming();
        let layer = match bounded {
            true => CoalesceHttpLayer::new().max_in_flight(0),
            false => CoalesceHttpLayer::new(),
        };
        let mut svc = http(&layer, &backend);
        let mut res = pin!(call(&mut svc, get("/a")).await);
        match poll!(res.as_mut()) {
            Poll::Ready(res) => {
                assert!(bounded, "a leader buffers the body it may share");
                let mut body = res.unwrap().into_body();
                let frame = body.frame().await.unwrap().unwrap();
                assert_eq!(frame.into_data().unwrap(), "first");
                assert!(!body.is_end_stream());
                frames.lock().unwrap().take();
                assert!(body.frame().await.is_none(), "the stream's end passed on");
            }
            Poll::Pending => {
                assert!(!bounded, "over the bound the response is passed on at once");
                frames.lock().unwrap().take();
                assert_eq!(text(res.await.unwrap()).await, "first");
            }
        }
        assert_eq!(layer.stats().over_capacity, u64::from(bounded));
        assert_eq!(layer.in_flight(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------------

const METHOD: &str = "/catalog.v1.Catalog/GetItem";

#[tokio::test(start_paused = true)]
async fn grpc_follower_past_its_limit_calls_on_its_own_and_the_flight_goes_on() {
    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new()
        .method(METHOD)
        .follower_timeout(Duration::from_secs(2));
    let mut svc = grpc(&layer, &backend);
    let mut leader = pin!(call(&mut svc, grpc_call()).await);
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = pin!(call(&mut svc, grpc_call()).await);
    assert!(poll!(follower.as_mut()).is_pending());
    assert_eq!((backend.calls(), layer.waiting()), (1, 1));

    tokio::time::advance(Duration::from_secs(2)).await;
    let Poll::Ready(res) = poll!(follower.as_mut()) else {
        panic!("past its limit, the follower makes its own call, which answers at once");
    };
    let res = res.unwrap();
    assert_eq!(
        res.extensions().get::<ServedBy>(),
        Some(&ServedBy::Released)
    );
    assert_eq!(text(res).await, "call 1");
    let stats = layer.stats();
    assert_eq!(
        (
            stats.timed_out,
            stats.released,
            stats.in_flight,
            layer.waiting()
        ),
        (1, 0, 1, 0)
    );

    backend.open();
    let res = leader.await.unwrap();
    assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));
    assert_eq!(text(res).await, "call 0");
    assert_eq!((backend.calls(), layer.stats().cancelled), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn grpc_follower_that_took_the_call_over_has_no_limit() {
    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new()
        .method(METHOD)
        .follower_timeout(Duration::from_secs(2));
    let mut svc = grpc(&layer, &backend);
    let mut leader = Box::pin(call(&mut svc, grpc_call()).await);
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = pin!(call(&mut svc, grpc_call()).await);
    assert!(poll!(follower.as_mut()).is_pending());
    drop(leader);
    assert!(poll!(follower.as_mut()).is_pending());
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(poll!(follower.as_mut()).is_pending());
    backend.open();
    assert_eq!(text(follower.await.unwrap()).await, "call 0");
    assert_eq!((backend.calls(), layer.stats().timed_out), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn grpc_bounds_send_calls_on_their_own() {
    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new().method(METHOD).max_followers(1);
    let mut svc = grpc(&layer, &backend);
    let mut leader = pin!(call(&mut svc, grpc_call()).await);
    assert!(poll!(leader.as_mut()).is_pending());
    let mut follower = pin!(call(&mut svc, grpc_call()).await);
    assert!(poll!(follower.as_mut()).is_pending());
    let over = call(&mut svc, grpc_call()).await.await.unwrap();
    assert_eq!(text(over).await, "call 1");
    backend.open();
    assert_eq!(text(leader.await.unwrap()).await, "call 0");
    assert_eq!(text(follower.await.unwrap()).await, "call 0");
    assert_eq!(layer.stats().over_capacity, 1);

    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new().method(METHOD).max_in_flight(0);
    let mut svc = grpc(&layer, &backend);
    backend.open();
    let (a, b) = tokio::join!(
        call(&mut svc.clone(), grpc_call()).await,
        call(&mut svc, grpc_call()).await
    );
    let mut bodies = [text(a.unwrap()).await, text(b.unwrap()).await];
    bodies.sort();
    assert_eq!(bodies, ["call 0", "call 1"]);
    let stats = layer.stats();
    assert_eq!((stats.leaders, stats.over_capacity), (0, 2));
}

#[test]
fn grpc_default_limits_are_exported() {
    assert_eq!(grpc::DEFAULT_REQUEST_LIMIT, 64 * 1024);
    assert_eq!(grpc::DEFAULT_RESPONSE_LIMIT, 4 * 1024 * 1024);
}
