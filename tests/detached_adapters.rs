//! `detached(true)` on the HTTP and gRPC layers: a flight whose every request has gone still
//! completes (the handler runs to its end, the body is read, the registry is left empty),
//! where by default it is cancelled (the handler's future is dropped).
//!
//! Deterministic: the handler waits on a gate (`watch`) and reports through counters and a
//! `Notify`; every wait is bounded by a paused-clock timeout, so a hang fails the test.
#![cfg(all(feature = "http", feature = "grpc"))]

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::poll;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use tokio::sync::{watch, Notify};
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer};
use tower_coalesce::Stats;

const PATH: &str = "/catalog.v1.Catalog/GetItem";

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(3600), f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// What the handler did: started, ran to its end, or was dropped before its end.
#[derive(Default)]
struct Handler {
    started: AtomicUsize,
    finished: AtomicUsize,
    dropped: AtomicUsize,
    changed: Notify,
}

impl Handler {
    async fn until(&self, what: &str, done: impl Fn(&Handler) -> bool) {
        bounded(what, async {
            loop {
                let changed = self.changed.notified();
                if done(self) {
                    return;
                }
                changed.await;
            }
        })
        .await;
    }

    fn note(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, SeqCst);
        self.changed.notify_waiters();
    }
}

/// Counts the handler's future as dropped unless it ran to its end.
struct Running(Arc<Handler>, bool);

impl Drop for Running {
    fn drop(&mut self) {
        if !self.1 {
            self.0.note(&self.0.dropped);
        }
    }
}

/// The handler's work: counted from its first poll, held at `gate`, then finished.
async fn handle(handler: Arc<Handler>, mut gate: watch::Receiver<bool>) {
    let mut running = Running(handler.clone(), false);
    handler.note(&handler.started);
    gate.wait_for(|open| *open).await.expect("gate");
    running.1 = true;
    handler.note(&handler.finished);
}

/// Calls `svc` once, polls the call until the handler has started, drops it, opens the gate,
/// and returns once the handler has either finished or been dropped.
async fn leave_a_started_call<S, R>(svc: S, req: R, handler: &Handler, gate: &watch::Sender<bool>)
where
    S: Service<R> + Send + 'static,
    S::Future: Send + 'static,
{
    let mut call = Box::pin(svc.oneshot(req));
    assert!(poll!(&mut call).is_pending());
    handler
        .until("the handler starts", |h| h.started.load(SeqCst) == 1)
        .await;
    drop(call);
    gate.send_replace(true);
    handler
        .until("the handler ends", |h| {
            h.finished.load(SeqCst) + h.dropped.load(SeqCst) == 1
        })
        .await;
}

/// Lets the flight's task run until the registry is empty: it ends once the response is read.
/// Bounded by a count of turns rather than the clock, which a busy runtime never advances.
async fn until_empty(in_flight: impl Fn() -> usize) {
    for _ in 0..1_000 {
        if in_flight() == 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        in_flight(),
        0,
        "the detached flight never left the registry"
    );
}

fn get() -> Request<Full<Bytes>> {
    Request::get("/report").body(Full::default()).unwrap()
}

async fn http_flight_with_no_one_left(detached: bool) -> (Arc<Handler>, CoalesceHttpLayer) {
    let handler = Arc::new(Handler::default());
    let (gate, gate_rx) = watch::channel(false);
    let layer = CoalesceHttpLayer::new().detached(detached);
    let h = handler.clone();
    let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let (h, gate_rx) = (h.clone(), gate_rx.clone());
        async move {
            handle(h, gate_rx).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"report"))))
        }
    }));
    leave_a_started_call(svc, get(), &handler, &gate).await;
    (handler, layer)
}

/// What became of a flight every request left: detached, it ran to its end and then left the
/// registry (its task ends once the body is read), with nothing cancelled; by default its
/// handler was dropped, and the flight counted as cancelled.
async fn assert_outcome(
    detached: bool,
    handler: &Handler,
    in_flight: impl Fn() -> usize,
    stats: impl Fn() -> Stats,
) {
    let ended = (handler.finished.load(SeqCst), handler.dropped.load(SeqCst));
    if detached {
        assert_eq!(ended, (1, 0), "(finished, dropped)");
        until_empty(in_flight).await;
        assert_eq!(stats().cancelled, 0);
    } else {
        assert_eq!(ended, (0, 1), "(finished, dropped)");
        assert_eq!((in_flight(), stats().cancelled), (0, 1));
    }
}

#[tokio::test(start_paused = true)]
async fn http_detached_flight_completes_when_every_request_has_gone() {
    let (handler, layer) = http_flight_with_no_one_left(true).await;
    assert_outcome(true, &handler, || layer.in_flight(), || layer.stats()).await;
}

#[tokio::test(start_paused = true)]
async fn http_flight_is_cancelled_by_default_when_every_request_has_gone() {
    let (handler, layer) = http_flight_with_no_one_left(false).await;
    assert_outcome(false, &handler, || layer.in_flight(), || layer.stats()).await;
}

fn grpc_call() -> Request<Full<Bytes>> {
    Request::post(PATH)
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01m")))
        .unwrap()
}

type GrpcBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn grpc_ok() -> Response<GrpcBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01r"))),
        Ok(Frame::trailers(trailers)),
    ];
    Response::new(StreamBody::new(futures::stream::iter(frames)))
}

async fn grpc_flight_with_no_one_left(detached: bool) -> (Arc<Handler>, CoalesceGrpcLayer) {
    let handler = Arc::new(Handler::default());
    let (gate, gate_rx) = watch::channel(false);
    let layer = CoalesceGrpcLayer::new().method(PATH).detached(detached);
    let h = handler.clone();
    let svc = layer.layer(service_fn(
        move |_req: Request<CoalesceBody<Full<Bytes>>>| {
            let (h, gate_rx) = (h.clone(), gate_rx.clone());
            async move {
                handle(h, gate_rx).await;
                Ok::<_, Infallible>(grpc_ok())
            }
        },
    ));
    leave_a_started_call(svc, grpc_call(), &handler, &gate).await;
    (handler, layer)
}

#[tokio::test(start_paused = true)]
async fn grpc_detached_flight_completes_when_every_call_has_gone() {
    let (handler, layer) = grpc_flight_with_no_one_left(true).await;
    assert_outcome(true, &handler, || layer.in_flight(), || layer.stats()).await;
}

#[tokio::test(start_paused = true)]
async fn grpc_flight_is_cancelled_by_default_when_every_call_has_gone() {
    let (handler, layer) = grpc_flight_with_no_one_left(false).await;
    assert_outcome(false, &handler, || layer.in_flight(), || layer.stats()).await;
}

fn call_body(n: usize) -> Full<Bytes> {
    Full::new(Bytes::from(format!("call {n}")))
}

type HttpService =
    BoxCloneService<Request<Full<Bytes>>, Response<CoalesceBody<Full<Bytes>>>, Infallible>;

/// A detached HTTP layer over a handler that counts its calls, waits at the gate, and answers
/// its `n`th call with `respond(n)`: (calls, gate, layer, service).
fn gated_detached(
    respond: impl Fn(usize) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
) -> (
    Arc<AtomicUsize>,
    watch::Sender<bool>,
    CoalesceHttpLayer,
    HttpService,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (gate, gate_rx) = watch::channel(false);
    let layer = CoalesceHttpLayer::new().detached(true);
    let c = calls.clone();
    let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let (c, mut gate_rx, respond) = (c.clone(), gate_rx.clone(), respond.clone());
        async move {
            let n = c.fetch_add(1, SeqCst) + 1;
            gate_rx.wait_for(|open| *open).await.expect("gate");
            Ok::<_, Infallible>(respond(n))
        }
    }));
    (calls, gate, layer, BoxCloneService::new(svc))
}

/// A detached flight still serves its followers, each with the one response.
#[tokio::test(start_paused = true)]
async fn http_detached_flight_serves_its_followers_once() {
    let (calls, gate, _layer, svc) = gated_detached(|n| Response::new(call_body(n)));
    let mut waiters: Vec<_> = (0..3)
        .map(|_| Box::pin(svc.clone().oneshot(get())))
        .collect();
    for waiter in &mut waiters {
        assert!(poll!(waiter).is_pending());
    }
    gate.send_replace(true);
    let responses = bounded("the waiters", futures::future::join_all(waiters)).await;
    for response in responses {
        let body = http_body_util::BodyExt::collect(response.unwrap().into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, "call 1");
    }
    assert_eq!(calls.load(SeqCst), 1);
}

/// A response that may not be shared (it sets a cookie) still reaches the detached flight's
/// own caller, and its follower makes a call of its own.
#[tokio::test(start_paused = true)]
async fn http_detached_flight_hands_an_unshareable_response_to_its_caller() {
    let (calls, gate, layer, svc) = gated_detached(|n| {
        let mut response = Response::new(call_body(n));
        let cookie = HeaderValue::from_str(&format!("session={n}")).unwrap();
        response.headers_mut().insert("set-cookie", cookie);
        response
    });
    let mut leader = Box::pin(svc.clone().oneshot(get()));
    let mut follower = Box::pin(svc.clone().oneshot(get()));
    assert!(poll!(&mut leader).is_pending());
    assert!(poll!(&mut follower).is_pending());
    gate.send_replace(true);
    let (leader, follower) = bounded("both", async { tokio::join!(leader, follower) }).await;
    let (leader, follower) = (leader.unwrap(), follower.unwrap());
    assert_eq!(leader.headers()["set-cookie"], "session=1");
    assert_eq!(follower.headers()["set-cookie"], "session=2");
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(layer.stats().released, 1);
}
