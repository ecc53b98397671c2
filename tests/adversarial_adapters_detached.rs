//! Adversarial black-box tests of `detached(true)` and `stats()` on the HTTP and gRPC layers,
//! in the combinations the other suites leave out: detached flights whose responses cannot be
//! shared (cookies, `private`, `Vary: *`, too large, failing or panicking bodies, inner
//! errors, panicking handlers), whose every request left or whose leader left while its
//! followers stayed; `GET`/`HEAD` and identities kept apart; the option methods called in any
//! order; and the counters of `stats()` adding up on every path (bypasses, releases,
//! cancellations, errors, panics).
//!
//! Only the public API is used. Deterministic: the clock is paused, the backend holds every
//! call behind a gate (`watch`) until the test opens it, slow bodies are fed by the test
//! through channels, and every wait is bounded (a paused-clock timeout, or a bounded number of
//! scheduler turns while spawned tasks run), so a hang fails the test.
#![cfg(all(feature = "http", feature = "grpc"))]

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use futures::{poll, FutureExt};
use http::header::{HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::{mpsc, watch};
use tower::{service_fn, BoxError, Layer, Service};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, ServedBy};
use tower_coalesce::Stats;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

const PATH: &str = "/catalog.v1.Catalog/GetItem";
/// The HTTP `max_body_bytes` and gRPC `response_limit` of most tests: the normal answers
/// ("call N for WHO") fit, the long ones (`long`) do not.
const LIMIT: usize = 24;

type Answer = Pin<Box<dyn Future<Output = Result<Response<ChanBody>, BoxError>> + Send>>;
type GrpcReq = Request<BoxBody<Bytes, BoxError>>;

/// Fails the test if `f` does not finish within a minute of (paused, virtual) time: a hang.
async fn settle<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// Lets spawned tasks run until `cond` holds, in a bounded number of scheduler turns (a busy
/// runtime never lets the paused clock advance, so a timeout would not fire).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

/// One frame (or failure) of a [`ChanBody`].
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    Fail,
    Panic,
}

fn data(text: impl Into<Bytes>) -> Step {
    Step::Data(text.into())
}

fn grpc_status(code: &'static str) -> Step {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(code));
    Step::Trailers(trailers)
}

/// A body text padded to 40 bytes: over `LIMIT`.
fn long(text: &str) -> String {
    format!("{text:-<40}")
}

/// What the backend did, shared by its handlers and bodies.
struct Probe {
    /// Calls of the inner service (counted when called, before the future is polled).
    calls: AtomicUsize,
    /// Handlers first polled.
    started: AtomicUsize,
    /// Handlers that got through the gate (their work done; the answer may still panic).
    finished: AtomicUsize,
    /// Handlers dropped before the gate opened for them (cancelled).
    dropped: AtomicUsize,
    /// Bodies read to their end (`poll_frame` returned `None`).
    bodies_ended: AtomicUsize,
    gate: watch::Sender<bool>,
    /// The senders of the bodies made with `slow_body`, in order; `None` once closed.
    feeds: Mutex<Vec<Option<mpsc::UnboundedSender<Step>>>>,
}

/// A test backend: counts, gates, and answers with the test's `answer`.
#[derive(Clone)]
struct Backend(Arc<Probe>);

impl Backend {
    fn new() -> Self {
        Backend(Arc::new(Probe {
            calls: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            bodies_ended: AtomicUsize::new(0),
            gate: watch::channel(false).0,
            feeds: Mutex::new(Vec::new()),
        }))
    }

    fn calls(&self) -> usize {
        self.0.calls.load(SeqCst)
    }
    fn started(&self) -> usize {
        self.0.started.load(SeqCst)
    }
    fn finished(&self) -> usize {
        self.0.finished.load(SeqCst)
    }
    fn dropped(&self) -> usize {
        self.0.dropped.load(SeqCst)
    }
    fn bodies_ended(&self) -> usize {
        self.0.bodies_ended.load(SeqCst)
    }

    fn open(&self) {
        self.0.gate.send_replace(true);
    }

    fn shut(&self) {
        self.0.gate.send_replace(false);
    }

    /// A body that yields `steps` and ends.
    fn body(&self, steps: Vec<Step>) -> ChanBody {
        let (tx, rx) = mpsc::unbounded_channel();
        for step in steps {
            tx.send(step).unwrap_or_else(|_| unreachable!());
        }
        ChanBody {
            rx,
            probe: self.clone(),
        }
    }

    /// A body that yields `steps`, then whatever the test feeds it with `feed`, until `close`.
    fn slow_body(&self, steps: Vec<Step>) -> ChanBody {
        let (tx, rx) = mpsc::unbounded_channel();
        for step in steps {
            tx.send(step).unwrap_or_else(|_| unreachable!());
        }
        self.0.feeds.lock().unwrap().push(Some(tx));
        ChanBody {
            rx,
            probe: self.clone(),
        }
    }

    fn slow_bodies(&self) -> usize {
        self.0.feeds.lock().unwrap().len()
    }

    /// Feeds the `i`th slow body; returns whether its reader is still there.
    fn feed(&self, i: usize, step: Step) -> bool {
        let feeds = self.0.feeds.lock().unwrap();
        feeds[i].as_ref().expect("not closed").send(step).is_ok()
    }

    fn close(&self, i: usize) {
        self.0.feeds.lock().unwrap()[i] = None;
    }

    /// The inner service: numbers its calls from 0, holds each at the gate, then answers with
    /// `answer(n, request head, self)` (which may fail or panic).
    fn service<B, F>(
        &self,
        answer: F,
    ) -> impl Service<Request<B>, Response = Response<ChanBody>, Error = BoxError, Future = Answer>
           + Clone
           + Send
           + 'static
    where
        B: Send + 'static,
        F: Fn(usize, &Parts, &Backend) -> Result<Response<ChanBody>, BoxError>
            + Send
            + Sync
            + 'static,
    {
        let backend = self.clone();
        let answer = Arc::new(answer);
        service_fn(move |req: Request<B>| -> Answer {
            let n = backend.0.calls.fetch_add(1, SeqCst);
            let (backend, answer) = (backend.clone(), answer.clone());
            Box::pin(async move {
                let (parts, _body) = req.into_parts();
                let mut running = Running(backend.clone(), false);
                backend.0.started.fetch_add(1, SeqCst);
                let mut gate = backend.0.gate.subscribe();
                gate.wait_for(|open| *open).await.expect("gate");
                running.1 = true;
                backend.0.finished.fetch_add(1, SeqCst);
                answer(n, &parts, &backend)
            })
        })
    }
}

/// Counts a handler as dropped (cancelled) unless it got through its gate.
struct Running(Backend, bool);

impl Drop for Running {
    fn drop(&mut self) {
        if !self.1 {
            self.0 .0.dropped.fetch_add(1, SeqCst);
        }
    }
}

/// A response body fed through a channel: it can be slow, fail or panic on the test's word.
struct ChanBody {
    rx: mpsc::UnboundedReceiver<Step>,
    probe: Backend,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(match std::task::ready!(self.rx.poll_recv(cx)) {
            None => {
                self.probe.0.bodies_ended.fetch_add(1, SeqCst);
                None
            }
            Some(Step::Data(bytes)) => Some(Ok(Frame::data(bytes))),
            Some(Step::Trailers(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Some(Step::Fail) => Some(Err("the body failed".into())),
            Some(Step::Panic) => panic!("the body panicked"),
        })
    }
}

/// The `x-who` header: who sent a request (not part of any key), echoed in its answer.
fn who(parts: &Parts) -> &str {
    parts
        .headers
        .get("x-who")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
}

/// What a waiter ended with.
#[derive(Debug)]
enum Got {
    Read(Box<Read>),
    /// The service returned an error.
    Failed(String),
    /// The response body failed while read.
    BodyFailed(String),
    /// The response future panicked.
    Panicked(String),
}

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
}

impl Got {
    fn read(&self) -> &Read {
        match self {
            Got::Read(read) => read,
            other => panic!("expected a response, got {other:?}"),
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Awaits a response future and reads its body, catching a panic of either.
async fn outcome<F, B>(fut: F) -> Got
where
    F: Future<Output = Result<Response<CoalesceBody<B>>, BoxError>>,
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    let res = match AssertUnwindSafe(fut).catch_unwind().await {
        Err(payload) => return Got::Panicked(panic_message(payload)),
        Ok(Err(error)) => return Got::Failed(error.to_string()),
        Ok(Ok(res)) => res,
    };
    let by = *res
        .extensions()
        .get::<ServedBy>()
        .expect("every response carries ServedBy");
    let (parts, body) = res.into_parts();
    match AssertUnwindSafe(body.collect()).catch_unwind().await {
        Err(payload) => Got::Panicked(panic_message(payload)),
        Ok(Err(error)) => Got::BodyFailed(error.to_string()),
        Ok(Ok(collected)) => Got::Read(Box::new(Read {
            by,
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            data: collected.to_bytes(),
        })),
    }
}

type Waiter<'a> = Pin<Box<dyn Future<Output = Got> + 'a>>;

/// Starts one flight: calls `svc` with `leader`, then with each of `followers` (all of one key),
/// polls each once with the gate shut (a gRPC call joins only once its message is read), waits
/// for the handler to start, drops the leader if `leader_leaves`, opens the gate and awaits
/// everyone still there. Returns the leader's outcome (if it stayed) and the followers'.
async fn flight<S, R>(
    svc: &mut S,
    backend: &Backend,
    leader: R,
    followers: Vec<R>,
    leader_leaves: bool,
) -> (Option<Got>, Vec<Got>)
where
    S: Service<R, Response = Response<CoalesceBody<ChanBody>>, Error = BoxError>,
{
    backend.shut();
    let started = backend.started();
    let mut first: Waiter<'_> = Box::pin(outcome(svc.call(leader)));
    assert!(poll!(&mut first).is_pending(), "the gate holds the leader");
    let mut rest: Vec<Waiter<'_>> = followers
        .into_iter()
        .map(|r| Box::pin(outcome(svc.call(r))) as Waiter<'_>)
        .collect();
    for follower in &mut rest {
        assert!(poll!(follower).is_pending(), "the gate holds the followers");
    }
    until("the flight's handler starts", || {
        backend.started() > started
    })
    .await;
    assert_eq!(
        backend.started(),
        started + 1,
        "one handler for the whole flight"
    );
    let first = if leader_leaves {
        drop(first);
        None
    } else {
        Some(first)
    };
    backend.open();
    let all = async {
        let leader = match first {
            Some(first) => Some(first.await),
            None => None,
        };
        (leader, join_all(rest).await)
    };
    settle("the waiters", all).await
}

/// Starts one flight with `reqs` (all of one key), lets its handler start, drops every request,
/// then opens the gate and lets spawned tasks run until the handler has finished or been
/// dropped and `in_flight()` is 0.
async fn abandon<S, R>(svc: &mut S, backend: &Backend, reqs: Vec<R>, in_flight: impl Fn() -> usize)
where
    S: Service<R, Response = Response<CoalesceBody<ChanBody>>, Error = BoxError>,
{
    backend.shut();
    let (started, ended) = (backend.started(), backend.finished() + backend.dropped());
    let mut calls: Vec<Waiter<'_>> = reqs
        .into_iter()
        .map(|r| Box::pin(outcome(svc.call(r))) as Waiter<'_>)
        .collect();
    for call in &mut calls {
        assert!(poll!(call).is_pending(), "the gate holds every request");
    }
    until("the flight's handler starts", || {
        backend.started() > started
    })
    .await;
    drop(calls);
    backend.open();
    until("the handler ends and the registry empties", || {
        backend.finished() + backend.dropped() > ended && in_flight() == 0
    })
    .await;
}

/// The counters of a layer that saw `requests` requests, all finished: every request counted
/// once as a leader, a follower or a bypass; releases are followers; nothing the HTTP and gRPC
/// layers do not use.
fn assert_accounted(stats: Stats, requests: u64) {
    assert_eq!(
        stats.leaders + stats.followers + stats.bypassed,
        requests,
        "every request counted once: {stats:?}"
    );
    assert!(
        stats.released <= stats.followers,
        "only followers are released: {stats:?}"
    );
    assert_eq!(
        stats.fell_through,
        stats.over_capacity + stats.timed_out + stats.released,
        "{stats:?}"
    );
    assert_eq!(
        (
            stats.lingered,
            stats.over_capacity,
            stats.timed_out,
            stats.retried,
            stats.forgotten,
            stats.in_flight
        ),
        (0, 0, 0, 0, 0, 0),
        "{stats:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP harness
// ---------------------------------------------------------------------------------------------

type HttpReq = Request<Full<Bytes>>;

fn http(method: Method, uri: &str, who: &str, headers: &[(&str, &str)]) -> HttpReq {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("x-who", who);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Full::default()).unwrap()
}

fn get(uri: &str, who: &str) -> HttpReq {
    http(Method::GET, uri, who, &[])
}

/// Something wrong with a response, for the HTTP layer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum HttpTrouble {
    SetCookie,
    Private,
    NoStore,
    VaryAny,
    /// `Vary: x-variant`: shared only with followers of the same `x-variant`.
    VaryOn,
    EventStream,
    /// Over the limit by `Content-Length`.
    LongByLength,
    /// Over the limit, found while reading (no length known up front).
    LongWhileReading,
    BodyFails,
    BodyPanics,
    InnerError,
    HandlerPanics,
}

const UNSHAREABLE: [HttpTrouble; 11] = [
    HttpTrouble::SetCookie,
    HttpTrouble::Private,
    HttpTrouble::NoStore,
    HttpTrouble::VaryAny,
    HttpTrouble::EventStream,
    HttpTrouble::LongByLength,
    HttpTrouble::LongWhileReading,
    HttpTrouble::BodyFails,
    HttpTrouble::BodyPanics,
    HttpTrouble::InnerError,
    HttpTrouble::HandlerPanics,
];

/// Answers "call N for WHO" (`x-method` says the method; a `HEAD` gets no body but a
/// `Content-Length` over the limit), with the trouble `pick` chooses for the request.
fn http_answer(
    pick: impl Fn(&Parts) -> Option<HttpTrouble> + Send + Sync + 'static,
) -> impl Fn(usize, &Parts, &Backend) -> Result<Response<ChanBody>, BoxError> + Send + Sync + 'static
{
    move |n, parts, backend| {
        let text = format!("call {n} for {}", who(parts));
        let res = Response::builder()
            .header("x-method", parts.method.as_str())
            .header("x-call", n.to_string());
        if parts.method == Method::HEAD {
            let res = res.header("content-length", "4000");
            return Ok(res.body(backend.body(vec![])).unwrap());
        }
        let plain = vec![data(text.clone())];
        let (header, steps) = match pick(parts) {
            None => (None, plain),
            Some(HttpTrouble::SetCookie) => (Some(("set-cookie", format!("session={n}"))), plain),
            Some(HttpTrouble::Private) => (Some(("cache-control", "private".into())), plain),
            Some(HttpTrouble::NoStore) => (Some(("cache-control", "no-store".into())), plain),
            Some(HttpTrouble::VaryAny) => (Some(("vary", "*".into())), plain),
            Some(HttpTrouble::VaryOn) => (Some(("vary", "x-variant".into())), plain),
            Some(HttpTrouble::EventStream) => {
                (Some(("content-type", "text/event-stream".into())), plain)
            }
            Some(HttpTrouble::LongByLength) => (
                Some(("content-length", "40".into())),
                vec![data(long(&text))],
            ),
            Some(HttpTrouble::LongWhileReading) => {
                let long = Bytes::from(long(&text));
                (None, vec![data(long.slice(..20)), data(long.slice(20..))])
            }
            Some(HttpTrouble::BodyFails) => (None, vec![data(text), Step::Fail]),
            Some(HttpTrouble::BodyPanics) => (None, vec![data(text), Step::Panic]),
            Some(HttpTrouble::InnerError) => return Err(format!("refused call {n}").into()),
            Some(HttpTrouble::HandlerPanics) => panic!("the handler panicked on call {n}"),
        };
        let res = match header {
            Some((name, value)) => res.header(name, value),
            None => res,
        };
        Ok(res.body(backend.body(steps)).unwrap())
    }
}

/// The trouble goes to the request sent by "leader" only: followers' own calls answer well.
fn leader_gets(
    trouble: HttpTrouble,
) -> impl Fn(&Parts) -> Option<HttpTrouble> + Send + Sync + 'static {
    move |parts| (who(parts) == "leader").then_some(trouble)
}

/// What the leader that stayed must get for `trouble`: its own response, whole, or its own
/// error or panic.
fn assert_leader_got_its_own(trouble: HttpTrouble, got: &Got) {
    let own = "call 0 for leader";
    match trouble {
        HttpTrouble::InnerError => {
            assert!(
                matches!(got, Got::Failed(e) if e == "refused call 0"),
                "{got:?}"
            )
        }
        HttpTrouble::HandlerPanics => {
            assert!(
                matches!(got, Got::Panicked(m) if m.contains("the handler panicked on call 0")),
                "{got:?}"
            )
        }
        HttpTrouble::BodyPanics => {
            assert!(
                matches!(got, Got::Panicked(m) if m.contains("the body panicked")),
                "{got:?}"
            )
        }
        HttpTrouble::BodyFails => {
            assert!(
                matches!(got, Got::BodyFailed(e) if e == "the body failed"),
                "{got:?}"
            )
        }
        HttpTrouble::LongByLength | HttpTrouble::LongWhileReading => {
            let read = got.read();
            assert_eq!((read.by, read.text()), (ServedBy::Leader, long(own)));
        }
        _ => {
            let read = got.read();
            assert_eq!((read.by, read.text()), (ServedBy::Leader, own.to_owned()));
            if trouble == HttpTrouble::SetCookie {
                assert_eq!(read.headers["set-cookie"], "session=0");
            }
        }
    }
}

/// Lets a new request of the key in: it must start a new flight of its own (rule 2, no stale
/// join), served as the leader with call number `call`.
async fn http_new_flight_after<S>(svc: &mut S, backend: &Backend, uri: &str, call: usize)
where
    S: Service<HttpReq, Response = Response<CoalesceBody<ChanBody>>, Error = BoxError>,
{
    backend.open();
    let got = settle(
        "a request after the flight",
        outcome(svc.call(get(uri, "late"))),
    )
    .await;
    let read = got.read();
    assert_eq!(
        (read.by, read.text()),
        (ServedBy::Leader, format!("call {call} for late")),
        "a new flight, not a stale join"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP: detached flights whose every request left
// ---------------------------------------------------------------------------------------------

/// Every unshareable outcome, with every request gone: the detached flight still runs its
/// handler to the end (a panic contained on the flight's task), frees the key, counts no
/// cancellation, and the next request starts a new flight.
#[tokio::test(start_paused = true)]
async fn http_detached_unshareable_flights_with_no_one_left_end_and_free_the_key() {
    for trouble in UNSHAREABLE {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new()
            .detached(true)
            .max_body_bytes(LIMIT);
        let mut svc = layer.layer(backend.service(http_answer(leader_gets(trouble))));
        let reqs = vec![get("/r", "leader"), get("/r", "follower")];
        abandon(&mut svc, &backend, reqs, || layer.in_flight()).await;
        assert_eq!(
            (backend.finished(), backend.dropped(), backend.calls()),
            (1, 0, 1),
            "{trouble:?}: the handler ran to its end, once"
        );
        let stats = layer.stats();
        assert_eq!(
            (
                stats.leaders,
                stats.followers,
                stats.released,
                stats.cancelled
            ),
            (1, 1, 0, 0),
            "{trouble:?}: {stats:?}"
        );
        let expect = |t| u64::from(trouble == t);
        assert_eq!(stats.errors, expect(HttpTrouble::InnerError), "{trouble:?}");
        assert_eq!(
            stats.panics,
            expect(HttpTrouble::HandlerPanics) + expect(HttpTrouble::BodyPanics),
            "{trouble:?}"
        );
        assert_eq!(layer.waiting(), 0, "{trouble:?}");
        http_new_flight_after(&mut svc, &backend, "/r", 1).await;
        assert_eq!(layer.in_flight(), 0, "{trouble:?}");
        assert_accounted(layer.stats(), 3);
        assert_eq!(
            svc.stats(),
            layer.stats(),
            "the service shares the layer's counters"
        );
    }
}

/// A slow, shareable body with every request gone: the flight's task keeps reading it to its
/// end; a request that comes while it is still being read joins and gets the whole body; one
/// that comes after it was published starts a new flight.
#[tokio::test(start_paused = true)]
async fn http_detached_slow_body_is_read_to_its_end_and_late_joiners_get_it_whole() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .detached(true)
        .max_body_bytes(LIMIT);
    let mut svc = layer.layer(backend.service(|n, parts: &Parts, backend: &Backend| {
        let first = format!("{n}{}:", who(parts));
        // Only the first call is slow: the test feeds it.
        let body = match n {
            0 => backend.slow_body(vec![data(first)]),
            _ => backend.body(vec![data(first)]),
        };
        Ok(Response::new(body))
    }));
    backend.open();
    let mut leader = Box::pin(outcome(svc.call(get("/slow", "a"))));
    assert!(poll!(&mut leader).is_pending());
    until("the handler answers with its slow body", || {
        backend.slow_bodies() == 1
    })
    .await;
    drop(leader);
    // Nobody waits now; the flight goes on reading the body.
    assert!(
        backend.feed(0, data("bb")),
        "the flight still reads the body"
    );
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(layer.in_flight(), 1, "the body is not over yet");
    assert_eq!(layer.stats().in_flight, 1);
    let mut late = Box::pin(outcome(svc.call(get("/slow", "late"))));
    assert!(poll!(&mut late).is_pending());
    assert!(backend.feed(0, data("cc")));
    backend.close(0);
    let got = settle("the late joiner", late).await;
    let read = got.read();
    assert_eq!(
        (read.by, read.text()),
        (ServedBy::Follower, "0a:bbcc".into())
    );
    assert_eq!((backend.bodies_ended(), backend.calls()), (1, 1));
    until("the registry empties", || layer.in_flight() == 0).await;
    // Published: the next request is a new flight.
    let got = settle("a new flight", outcome(svc.call(get("/slow", "next")))).await;
    let read = got.read();
    assert_eq!((read.by, read.text()), (ServedBy::Leader, "1next:".into()));
    let stats = layer.stats();
    assert_eq!((stats.leaders, stats.followers, stats.cancelled), (2, 1, 0));
    assert_accounted(stats, 3);
}

/// Over the limit found while reading a slow body, every request gone: the flight stops
/// buffering at the limit (the rest was the leader's alone, and the leader is gone), frees the
/// key, and no later request ever gets those bytes.
#[tokio::test(start_paused = true)]
async fn http_detached_oversized_slow_body_with_no_one_left_frees_the_key() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().detached(true).max_body_bytes(4);
    let mut svc = layer.layer(backend.service(|n, _: &Parts, backend: &Backend| {
        let body = match n {
            0 => backend.slow_body(vec![data("abc")]),
            _ => backend.body(vec![data(format!("n{n}"))]),
        };
        Ok(Response::new(body))
    }));
    backend.open();
    let leader = Box::pin(outcome(svc.call(get("/big", "a"))));
    let follower = Box::pin(outcome(svc.call(get("/big", "b"))));
    let mut both = Box::pin(async { futures::join!(leader, follower) });
    assert!(poll!(&mut both).is_pending());
    until("the slow body is made", || backend.slow_bodies() == 1).await;
    drop(both);
    backend.feed(0, data("defgh"));
    until("the flight gives up at the limit", || {
        layer.in_flight() == 0
    })
    .await;
    let got = settle("a new flight", outcome(svc.call(get("/big", "c")))).await;
    let read = got.read();
    assert_eq!((read.by, read.text()), (ServedBy::Leader, "n1".into()));
    let stats = layer.stats();
    assert_eq!(
        (
            stats.leaders,
            stats.followers,
            stats.released,
            stats.cancelled
        ),
        (2, 1, 0, 0)
    );
    assert_accounted(stats, 3);
}

/// Many keys at once, each flight with three requests that all leave, some answering well and
/// some in trouble: every handler runs to its end, the registry ends empty, nothing cancelled,
/// and the counters add up.
#[tokio::test(start_paused = true)]
async fn http_detached_many_abandoned_flights_leave_an_empty_registry() {
    const KEYS: usize = 48;
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .detached(true)
        .max_body_bytes(LIMIT);
    let mut svc = layer.layer(backend.service(http_answer(|parts: &Parts| {
        let key: usize = parts.uri.path()[1..].parse().unwrap();
        // One key in twelve answers well; the others cycle through every trouble.
        UNSHAREABLE.get(key % (UNSHAREABLE.len() + 1)).copied()
    })));
    let mut calls: Vec<Waiter<'_>> = Vec::new();
    for key in 0..KEYS {
        for who in ["leader", "f1", "f2"] {
            calls.push(Box::pin(outcome(svc.call(get(&format!("/{key}"), who)))));
        }
    }
    for call in &mut calls {
        assert!(poll!(call).is_pending());
    }
    until("every handler starts", || backend.started() == KEYS).await;
    assert_eq!(layer.in_flight(), KEYS);
    drop(calls);
    backend.open();
    until("every flight ends", || {
        backend.finished() == KEYS && layer.in_flight() == 0
    })
    .await;
    let stats = layer.stats();
    assert_eq!(
        (
            stats.leaders,
            stats.followers,
            stats.released,
            stats.cancelled
        ),
        (KEYS as u64, 2 * KEYS as u64, 0, 0),
        "{stats:?}"
    );
    assert_eq!(
        (backend.calls(), backend.dropped(), layer.waiting()),
        (KEYS, 0, 0)
    );
    assert_accounted(stats, 3 * KEYS as u64);
}

// ---------------------------------------------------------------------------------------------
// HTTP: detached flights whose leader left, or stayed, with followers
// ---------------------------------------------------------------------------------------------

/// A shareable response of a detached flight whose leader left: the followers get it, one call.
#[tokio::test(start_paused = true)]
async fn http_detached_leader_leaves_and_followers_share_a_shareable_response() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().detached(true);
    let mut svc = layer.layer(backend.service(http_answer(|_: &Parts| None)));
    let followers = vec![get("/r", "f1"), get("/r", "f2")];
    let (_, got) = flight(&mut svc, &backend, get("/r", "leader"), followers, true).await;
    for got in &got {
        let read = got.read();
        assert_eq!(
            (read.by, read.text()),
            (ServedBy::Follower, "call 0 for leader".into())
        );
    }
    assert_eq!(backend.calls(), 1);
    until("the registry empties", || layer.in_flight() == 0).await;
    let stats = layer.stats();
    assert_eq!((stats.leaders, stats.followers, stats.released), (1, 2, 0));
    assert_accounted(stats, 3);
}

/// Every unshareable outcome of a flight, its leader gone or there: the leader (if there) gets
/// its own response, error or panic; the followers are released at once to make their own calls
/// and never see the leader's response. Detached, a task drives the flight; otherwise a
/// follower takes it over when the leader leaves.
async fn http_unshareable_with_followers(detached: bool, leader_leaves: bool) {
    for trouble in UNSHAREABLE {
        let backend = Backend::new();
        let layer = CoalesceHttpLayer::new()
            .detached(detached)
            .max_body_bytes(LIMIT);
        let mut svc = layer.layer(backend.service(http_answer(leader_gets(trouble))));
        let followers = vec![get("/r", "f1"), get("/r", "f2")];
        let (leader, got) = flight(
            &mut svc,
            &backend,
            get("/r", "leader"),
            followers,
            leader_leaves,
        )
        .await;
        if let Some(leader) = &leader {
            assert_leader_got_its_own(trouble, leader);
        }
        for (got, follower) in got.iter().zip(["f1", "f2"]) {
            let read = got.read();
            assert_eq!(read.by, ServedBy::Released, "{trouble:?}");
            assert_eq!(read.headers.get("set-cookie"), None, "{trouble:?}");
            assert_own_call(&read.text(), follower);
        }
        assert_eq!(backend.calls(), 3, "{trouble:?}");
        until("the registry empties", || layer.in_flight() == 0).await;
        let stats = layer.stats();
        assert_eq!(
            (
                stats.leaders,
                stats.followers,
                stats.released,
                stats.cancelled
            ),
            (1, 2, 2, 0),
            "{trouble:?}: {stats:?}"
        );
        assert_eq!(layer.waiting(), 0);
        assert_accounted(stats, 3);
        http_new_flight_after(&mut svc, &backend, "/r", 3).await;
    }
}

/// A released follower's answer must come from a call of its own (call 1 or 2: both are
/// released at once, in either order), never from the leader's call 0.
fn assert_own_call(text: &str, follower: &str) {
    let own = [1, 2].map(|n| format!("call {n} for {follower}"));
    assert!(own.contains(&text.to_owned()), "{follower} got {text:?}");
}

#[tokio::test(start_paused = true)]
async fn http_detached_leader_leaves_and_followers_are_released_from_unshareable_responses() {
    http_unshareable_with_followers(true, true).await;
}

#[tokio::test(start_paused = true)]
async fn http_detached_leader_stays_and_gets_its_own_unshareable_response() {
    http_unshareable_with_followers(true, false).await;
}

#[tokio::test(start_paused = true)]
async fn http_leader_leaves_and_the_follower_driving_the_flight_is_released_all_the_same() {
    http_unshareable_with_followers(false, true).await;
}

/// A `Vary` response of a detached flight whose leader left: the follower that matches the
/// leader's request gets it; the one that does not makes its own call.
#[tokio::test(start_paused = true)]
async fn http_detached_vary_is_judged_against_a_leader_that_left() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().detached(true);
    let mut svc = layer.layer(backend.service(http_answer(leader_gets(HttpTrouble::VaryOn))));
    let variant = |who, v| http(Method::GET, "/v", who, &[("x-variant", v)]);
    let followers = vec![variant("same", "a"), variant("other", "b")];
    let (_, got) = flight(&mut svc, &backend, variant("leader", "a"), followers, true).await;
    let (same, other) = (got[0].read(), got[1].read());
    assert_eq!(
        (same.by, same.text()),
        (ServedBy::Follower, "call 0 for leader".into())
    );
    assert_eq!(
        (other.by, other.text()),
        (ServedBy::Released, "call 1 for other".into())
    );
    until("the registry empties", || layer.in_flight() == 0).await;
    let stats = layer.stats();
    assert_eq!((stats.leaders, stats.followers, stats.released), (1, 2, 1));
    assert_accounted(stats, 3);
}

/// `GET` and `HEAD` of one URI are two flights, detached or not; with both leaders gone, each
/// follower gets the answer to its own method (a `HEAD` response's `Content-Length` over the
/// limit describes a body it does not have, so it is still shared).
#[tokio::test(start_paused = true)]
async fn http_detached_get_and_head_are_keyed_apart_after_their_leaders_leave() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .detached(true)
        .max_body_bytes(LIMIT);
    let mut svc = layer.layer(backend.service(http_answer(|_: &Parts| None)));
    backend.shut();
    let mut leaders: Vec<Waiter<'_>> = vec![
        Box::pin(outcome(svc.call(get("/m", "get-leader")))),
        Box::pin(outcome(svc.call(http(
            Method::HEAD,
            "/m",
            "head-leader",
            &[],
        )))),
    ];
    let followers: Vec<Waiter<'_>> = vec![
        Box::pin(outcome(svc.call(get("/m", "get-follower")))),
        Box::pin(outcome(svc.call(http(
            Method::HEAD,
            "/m",
            "head-follower",
            &[],
        )))),
    ];
    for leader in &mut leaders {
        assert!(poll!(leader).is_pending());
    }
    until("both handlers start", || backend.started() == 2).await;
    assert_eq!(layer.in_flight(), 2, "GET and HEAD are two flights");
    drop(leaders);
    backend.open();
    let got = settle("the followers", join_all(followers)).await;
    let (get, head) = (got[0].read(), got[1].read());
    assert_eq!(get.by, ServedBy::Follower);
    assert_eq!(get.headers["x-method"], "GET");
    assert_eq!(get.text(), "call 0 for get-leader");
    assert_eq!(head.by, ServedBy::Follower);
    assert_eq!(head.headers["x-method"], "HEAD");
    assert_eq!(head.data, Bytes::new());
    assert_eq!(backend.calls(), 2);
    until("the registry empties", || layer.in_flight() == 0).await;
    let stats = layer.stats();
    assert_eq!((stats.leaders, stats.followers, stats.released), (2, 2, 0));
    assert_accounted(stats, 4);
}

/// A response extension whose first clone panics: user code that runs when a shared response
/// is copied for a waiter.
struct Explosive;

static EXPLOSIVE_ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

impl Clone for Explosive {
    fn clone(&self) -> Self {
        if EXPLOSIVE_ARMED.swap(false, SeqCst) {
            panic!("the extension's clone panicked");
        }
        Explosive
    }
}

/// A panic while a shared response is copied for one waiter (an extension's `Clone`) stays with
/// that waiter: the others get the response, nobody hangs, the registry empties, and the key
/// takes a new flight afterwards.
#[tokio::test(start_paused = true)]
async fn http_detached_panicking_response_copy_stays_with_one_waiter() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new().detached(true);
    let mut svc = layer.layer(backend.service(|n, parts: &Parts, backend: &Backend| {
        let text = format!("call {n} for {}", who(parts));
        let mut res = Response::new(backend.body(vec![data(text)]));
        if who(parts) == "leader" {
            res.extensions_mut().insert(Explosive);
        }
        Ok(res)
    }));
    let followers = vec![get("/x", "f1"), get("/x", "f2")];
    let (leader, got) = flight(&mut svc, &backend, get("/x", "leader"), followers, false).await;
    let all: Vec<Got> = leader.into_iter().chain(got).collect();
    let panicked = all
        .iter()
        .filter(|g| matches!(g, Got::Panicked(m) if m.contains("extension's clone")))
        .count();
    assert_eq!(panicked, 1, "{all:?}");
    for got in all.iter().filter(|g| !matches!(g, Got::Panicked(_))) {
        assert_eq!(got.read().text(), "call 0 for leader");
    }
    until("the registry empties", || layer.in_flight() == 0).await;
    assert_eq!(layer.waiting(), 0);
    http_new_flight_after(&mut svc, &backend, "/x", 1).await;
    assert_accounted(layer.stats(), 4);
}

#[derive(Clone, Debug)]
struct UserId(&'static str);

fn as_user(who: &str, user: Option<&'static str>) -> HttpReq {
    let mut req = http(Method::GET, "/me", who, &[("authorization", "Bearer x")]);
    if let Some(user) = user {
        req.extensions_mut().insert(UserId(user));
    }
    req
}

/// Detached + identity: the flights of two identities stay apart when their leaders leave;
/// each follower gets its own identity's answer; a credentialed request with no identity
/// bypasses and is counted so.
#[tokio::test(start_paused = true)]
async fn http_detached_identity_keeps_callers_apart_after_their_leaders_leave() {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .detached(true)
        .identity(|parts: &Parts| parts.extensions.get::<UserId>().map(|u| u.0));
    let mut svc = layer.layer(backend.service(|n, parts: &Parts, backend: &Backend| {
        let user = parts.extensions.get::<UserId>().map_or("nobody", |u| u.0);
        let text = format!("call {n} for user {user}");
        Ok(Response::new(backend.body(vec![data(text)])))
    }));
    backend.shut();
    let mut leaders: Vec<Waiter<'_>> = vec![
        Box::pin(outcome(svc.call(as_user("l", Some("alice"))))),
        Box::pin(outcome(svc.call(as_user("l", Some("bob"))))),
    ];
    let followers: Vec<Waiter<'_>> = vec![
        Box::pin(outcome(svc.call(as_user("f", Some("alice"))))),
        Box::pin(outcome(svc.call(as_user("f", Some("bob"))))),
    ];
    for leader in &mut leaders {
        assert!(poll!(leader).is_pending());
    }
    until("both handlers start", || backend.started() == 2).await;
    drop(leaders);
    backend.open();
    let got = settle("the followers", join_all(followers)).await;
    let (alice, bob) = (got[0].read(), got[1].read());
    assert_eq!(alice.by, ServedBy::Follower);
    assert!(alice.text().ends_with("user alice"), "{alice:?}");
    assert_eq!(bob.by, ServedBy::Follower);
    assert!(bob.text().ends_with("user bob"), "{bob:?}");
    let anonymous = settle("no identity", outcome(svc.call(as_user("x", None)))).await;
    assert_eq!(anonymous.read().by, ServedBy::Bypass);
    assert_eq!(backend.calls(), 3);
    until("the registry empties", || layer.in_flight() == 0).await;
    let stats = layer.stats();
    assert_eq!((stats.leaders, stats.followers, stats.bypassed), (2, 2, 1));
    assert_accounted(stats, 5);
}

// ---------------------------------------------------------------------------------------------
// HTTP: stats on every path
// ---------------------------------------------------------------------------------------------

/// Every way through the HTTP layer, counted: nine bypass reasons, a shared flight, four
/// kinds of release, a `Vary` mismatch, a flight with no request left and one whose leader
/// left. With `detached` the flight with no request left completes instead of being cancelled.
async fn http_stats_add_up(detached: bool) {
    let backend = Backend::new();
    let layer = CoalesceHttpLayer::new()
        .detached(detached)
        .max_body_bytes(LIMIT);
    let mut svc = layer.layer(backend.service(http_answer(|parts: &Parts| {
        if who(parts) != "leader" {
            return None;
        }
        match parts.uri.path() {
            "/cookie" => Some(HttpTrouble::SetCookie),
            "/error" => Some(HttpTrouble::InnerError),
            "/panic" => Some(HttpTrouble::HandlerPanics),
            "/big" => Some(HttpTrouble::LongWhileReading),
            "/vary" => Some(HttpTrouble::VaryOn),
            _ => None,
        }
    })));

    // Bypasses, one per reason.
    backend.open();
    let mut with_body = get("/a", "b");
    *with_body.body_mut() = Full::from("a body");
    let bypasses = vec![
        ("POST", http(Method::POST, "/a", "b", &[])),
        (
            "Authorization",
            http(Method::GET, "/a", "b", &[("authorization", "x")]),
        ),
        ("Cookie", http(Method::GET, "/a", "b", &[("cookie", "s=1")])),
        (
            "Range",
            http(Method::GET, "/a", "b", &[("range", "bytes=0-1")]),
        ),
        (
            "no-cache",
            http(Method::GET, "/a", "b", &[("cache-control", "no-cache")]),
        ),
        (
            "Pragma",
            http(Method::GET, "/a", "b", &[("pragma", "no-cache")]),
        ),
        (
            "Upgrade",
            http(
                Method::GET,
                "/a",
                "b",
                &[("connection", "upgrade"), ("upgrade", "websocket")],
            ),
        ),
        ("userinfo", get("http://u:p@example.test/a", "b")),
        ("a request body", with_body),
    ];
    let count = bypasses.len() as u64;
    for (n, (why, req)) in bypasses.into_iter().enumerate() {
        let got = settle(why, outcome(svc.call(req))).await;
        assert_eq!(got.read().by, ServedBy::Bypass, "{why}");
        assert_eq!(layer.stats().bypassed, n as u64 + 1, "{why}: counted once");
        assert_eq!(layer.stats().leaders, 0, "{why}");
    }

    let two = |path: &str| vec![get(path, "f1"), get(path, "f2")];
    let one = |path: &str| vec![get(path, "f1")];

    let (_, got) = flight(
        &mut svc,
        &backend,
        get("/shared", "leader"),
        two("/shared"),
        false,
    )
    .await;
    assert!(got.iter().all(|g| g.read().by == ServedBy::Follower));
    for path in ["/cookie", "/error", "/panic", "/big"] {
        let followers = if path == "/cookie" {
            two(path)
        } else {
            one(path)
        };
        let (leader, got) = flight(&mut svc, &backend, get(path, "leader"), followers, false).await;
        assert!(
            got.iter().all(|g| g.read().by == ServedBy::Released),
            "{path}"
        );
        match path {
            "/error" => assert!(matches!(leader, Some(Got::Failed(_)))),
            "/panic" => assert!(matches!(leader, Some(Got::Panicked(_)))),
            _ => assert_eq!(leader.unwrap().read().by, ServedBy::Leader, "{path}"),
        }
    }
    let variant = |who, v| http(Method::GET, "/vary", who, &[("x-variant", v)]);
    let (_, got) = flight(
        &mut svc,
        &backend,
        variant("leader", "a"),
        vec![variant("f1", "a"), variant("f2", "b")],
        false,
    )
    .await;
    assert_eq!(
        (got[0].read().by, got[1].read().by),
        (ServedBy::Follower, ServedBy::Released)
    );
    abandon(&mut svc, &backend, two("/gone"), || layer.in_flight()).await;
    let (_, got) = flight(
        &mut svc,
        &backend,
        get("/left", "leader"),
        one("/left"),
        true,
    )
    .await;
    assert_eq!(got[0].read().by, ServedBy::Follower);

    until("the registry empties", || layer.in_flight() == 0).await;
    let stats = layer.stats();
    // Flights: shared, cookie, error, panic, big, vary, gone, left.
    // Followers: 2 + 2 + 1 + 1 + 1 + 2 + 1 + 1; released: 2 + 1 + 1 + 1 + 1 (vary).
    assert_eq!(
        (
            stats.bypassed,
            stats.leaders,
            stats.followers,
            stats.released
        ),
        (count, 8, 11, 6),
        "{stats:?}"
    );
    assert_eq!((stats.errors, stats.panics), (1, 1), "{stats:?}");
    assert_eq!(stats.cancelled, u64::from(!detached), "{stats:?}");
    assert_eq!(
        (backend.finished(), backend.dropped()),
        (
            count as usize + 7 + 6 + usize::from(detached),
            usize::from(!detached)
        ),
        "the abandoned flight's handler runs to its end only when detached"
    );
    assert_eq!(layer.waiting(), 0);
    assert_accounted(stats, count + 8 + 11);
    assert_eq!(svc.stats(), stats);
}

#[tokio::test(start_paused = true)]
async fn http_stats_add_up_on_every_path() {
    http_stats_add_up(false).await;
}

#[tokio::test(start_paused = true)]
async fn http_detached_stats_add_up_on_every_path() {
    http_stats_add_up(true).await;
}

// ---------------------------------------------------------------------------------------------
// HTTP: option order, and no runtime
// ---------------------------------------------------------------------------------------------

fn user(parts: &Parts) -> Option<&'static str> {
    parts.extensions.get::<UserId>().map(|u| u.0)
}

/// Whatever the order of the option methods, the layer keeps `detached`: a flight with no
/// request left still completes (and the last `detached` call wins); the other options are
/// kept too (checked through `Cache-Status`).
#[tokio::test(start_paused = true)]
async fn http_detached_survives_any_option_order() {
    use http::header::HeaderName;
    let tenant = || HeaderName::from_static("x-tenant");
    type Build = fn(HeaderName) -> CoalesceHttpLayer;
    let builds: Vec<(&str, Build, bool)> = vec![
        (
            "detached first",
            |h| {
                CoalesceHttpLayer::new()
                    .detached(true)
                    .max_body_bytes(64)
                    .key_header(h)
                    .methods([Method::GET])
                    .identity(user)
                    .cache_status_header(true)
            },
            true,
        ),
        (
            "detached last",
            |h| {
                CoalesceHttpLayer::new()
                    .cache_status_header(true)
                    .identity(user)
                    .key_headers([h])
                    .methods([Method::GET, Method::HEAD])
                    .max_body_bytes(64)
                    .detached(true)
            },
            true,
        ),
        (
            "detached in the middle",
            |h| {
                CoalesceHttpLayer::new()
                    .max_body_bytes(64)
                    .identity(user)
                    .detached(true)
                    .key_header(h)
                    .cache_status_header(true)
            },
            true,
        ),
        (
            "detached, then turned off",
            |h| {
                CoalesceHttpLayer::new()
                    .detached(true)
                    .key_header(h)
                    .detached(false)
                    .cache_status_header(true)
            },
            false,
        ),
        (
            "off, then on",
            |h| {
                CoalesceHttpLayer::new()
                    .detached(false)
                    .cache_status_header(true)
                    .detached(true)
                    .key_header(h)
            },
            true,
        ),
        (
            "never",
            |h| {
                CoalesceHttpLayer::new()
                    .key_header(h)
                    .cache_status_header(true)
            },
            false,
        ),
    ];
    for (what, build, detached) in builds {
        let backend = Backend::new();
        let layer = build(tenant());
        let mut svc = layer.layer(backend.service(http_answer(|_: &Parts| None)));
        let reqs = vec![get("/o", "leader"), get("/o", "follower")];
        abandon(&mut svc, &backend, reqs, || layer.in_flight()).await;
        assert_eq!(
            (backend.finished(), backend.dropped()),
            (usize::from(detached), usize::from(!detached)),
            "{what}: the flight with no request left completes only when detached"
        );
        assert_eq!(layer.stats().cancelled, u64::from(!detached), "{what}");
        backend.open();
        let got = settle(what, outcome(svc.call(get("/o", "late")))).await;
        let read = got.read();
        assert_eq!(
            (read.by, read.text()),
            (ServedBy::Leader, "call 1 for late".into()),
            "{what}"
        );
        assert_eq!(
            read.headers["cache-status"], "tower-coalesce; fwd=miss",
            "{what}: the other options are kept"
        );
        assert_accounted(layer.stats(), 3);
    }
}

/// Outside a tokio runtime a detached layer cannot spawn: its flights are driven by their
/// requests (polled here by hand, a bounded number of times), still coalesced, and the registry
/// is emptied when they end or all leave.
#[test]
fn http_detached_outside_a_runtime_is_driven_by_its_requests() {
    fn drive<F: Future>(f: F) -> F::Output {
        let mut f = Box::pin(f);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..100 {
            if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
                return out;
            }
        }
        panic!("hung outside a runtime");
    }
    let backend = Backend::new();
    backend.open();
    let layer = CoalesceHttpLayer::new().detached(true);
    let mut svc = layer.layer(backend.service(http_answer(|_: &Parts| None)));
    let a = outcome(svc.call(get("/n", "leader")));
    let b = outcome(svc.call(get("/n", "follower")));
    let (a, b) = drive(async { futures::join!(a, b) });
    assert_eq!(a.read().text(), "call 0 for leader");
    assert_eq!(
        (b.read().by, b.read().text()),
        (ServedBy::Follower, "call 0 for leader".into())
    );
    assert_eq!((backend.calls(), layer.in_flight()), (1, 0));
    // Every request gone: nobody drives the flight, and it must not stay registered.
    backend.shut();
    let mut gone = Box::pin(outcome(svc.call(get("/n", "gone"))));
    let waker = futures::task::noop_waker();
    assert!(gone
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    drop(gone);
    assert_eq!(layer.in_flight(), 0);
    backend.open();
    let c = drive(outcome(svc.call(get("/n", "again"))));
    assert_eq!(
        (c.read().by, c.read().text()),
        (ServedBy::Leader, "call 2 for again".into())
    );
    assert_accounted(layer.stats(), 4);
}

// ---------------------------------------------------------------------------------------------
// gRPC harness
// ---------------------------------------------------------------------------------------------

fn boxed<B>(body: B) -> BoxBody<Bytes, BoxError>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

fn grpc_with(
    path: &str,
    who: &str,
    headers: &[(&str, &str)],
    body: BoxBody<Bytes, BoxError>,
) -> GrpcReq {
    let mut req = Request::post(path)
        .header("content-type", "application/grpc")
        .header("x-who", who);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(body).unwrap()
}

fn grpc(who: &str) -> GrpcReq {
    grpc_with(PATH, who, &[], boxed(Full::from("\0\0\0\0\x01m")))
}

/// Something wrong with a gRPC response.
#[derive(Clone, Copy, Debug, PartialEq)]
enum GrpcTrouble {
    NotOk,
    TrailersOnlyError,
    NoStatus,
    Http500,
    SetCookie,
    TooLarge,
    BodyFails,
    InnerError,
    HandlerPanics,
}

const GRPC_UNSHAREABLE: [GrpcTrouble; 9] = [
    GrpcTrouble::NotOk,
    GrpcTrouble::TrailersOnlyError,
    GrpcTrouble::NoStatus,
    GrpcTrouble::Http500,
    GrpcTrouble::SetCookie,
    GrpcTrouble::TooLarge,
    GrpcTrouble::BodyFails,
    GrpcTrouble::InnerError,
    GrpcTrouble::HandlerPanics,
];

/// Answers the message "call N for WHO" with status `OK`, or with the trouble, for the call
/// sent by "leader" only.
fn grpc_answer(
    trouble: Option<GrpcTrouble>,
) -> impl Fn(usize, &Parts, &Backend) -> Result<Response<ChanBody>, BoxError> + Send + Sync + 'static
{
    move |n, parts, backend| {
        let text = format!("call {n} for {}", who(parts));
        let res = Response::builder().header("content-type", "application/grpc");
        let trouble = trouble.filter(|_| who(parts) == "leader");
        let ok = || vec![data(text.clone()), grpc_status("0")];
        let (res, steps) = match trouble {
            None => (res, ok()),
            Some(GrpcTrouble::NotOk) => (res, vec![data(text.clone()), grpc_status("5")]),
            Some(GrpcTrouble::TrailersOnlyError) => (res.header("grpc-status", "5"), vec![]),
            Some(GrpcTrouble::NoStatus) => (res, vec![data(text.clone())]),
            Some(GrpcTrouble::Http500) => (res.status(500), ok()),
            Some(GrpcTrouble::SetCookie) => (res.header("set-cookie", format!("s={n}")), ok()),
            Some(GrpcTrouble::TooLarge) => (res, vec![data(long(&text)), grpc_status("0")]),
            Some(GrpcTrouble::BodyFails) => (res, vec![data(text.clone()), Step::Fail]),
            Some(GrpcTrouble::InnerError) => return Err(format!("refused call {n}").into()),
            Some(GrpcTrouble::HandlerPanics) => panic!("the handler panicked on call {n}"),
        };
        Ok(res.body(backend.body(steps)).unwrap())
    }
}

fn grpc_layer() -> CoalesceGrpcLayer {
    CoalesceGrpcLayer::new()
        .method(PATH)
        .response_limit(LIMIT)
        .detached(true)
}

// ---------------------------------------------------------------------------------------------
// gRPC: detached flights
// ---------------------------------------------------------------------------------------------

/// Every gRPC outcome (shared or not), every call gone: the detached flight runs its handler to
/// the end, frees the key, counts no cancellation; the next call starts a new flight.
#[tokio::test(start_paused = true)]
async fn grpc_detached_flights_with_no_one_left_end_and_free_the_key() {
    let cases = std::iter::once(None).chain(GRPC_UNSHAREABLE.map(Some));
    for trouble in cases {
        let backend = Backend::new();
        let layer = grpc_layer();
        let mut svc = layer.layer(backend.service(grpc_answer(trouble)));
        let reqs = vec![grpc("leader"), grpc("follower")];
        abandon(&mut svc, &backend, reqs, || layer.in_flight()).await;
        assert_eq!(
            (backend.finished(), backend.dropped(), backend.calls()),
            (1, 0, 1),
            "{trouble:?}"
        );
        let stats = layer.stats();
        assert_eq!(
            (
                stats.leaders,
                stats.followers,
                stats.released,
                stats.cancelled
            ),
            (1, 1, 0, 0),
            "{trouble:?}: {stats:?}"
        );
        assert_eq!(
            stats.panics,
            u64::from(trouble == Some(GrpcTrouble::HandlerPanics)),
            "{trouble:?}"
        );
        // Failed flights (CHANGELOG): an inner error, an HTTP status other than 200, a
        // `grpc-status` other than OK, a body that failed while read. Not a cookie or a size.
        use GrpcTrouble::*;
        match trouble {
            Some(InnerError | Http500 | NotOk | TrailersOnlyError | BodyFails) => {
                assert_eq!(stats.errors, 1, "{trouble:?}: {stats:?}")
            }
            None | Some(SetCookie | TooLarge) => {
                assert_eq!(stats.errors, 0, "{trouble:?}: {stats:?}")
            }
            Some(NoStatus | HandlerPanics) => {}
        }
        backend.open();
        let got = settle("a new call", outcome(svc.call(grpc("late")))).await;
        let read = got.read();
        assert_eq!(
            (read.by, read.text()),
            (ServedBy::Leader, "call 1 for late".into()),
            "{trouble:?}: a new flight, not a stale join"
        );
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
        assert_accounted(layer.stats(), 3);
        assert_eq!(svc.stats(), layer.stats());
    }
}

/// A gRPC flight whose caller left (or stayed), detached or not: an `OK` response reaches the
/// followers; any other outcome releases them to their own calls, and the caller that stayed
/// gets its own response, error or panic.
async fn grpc_with_followers(detached: bool, leader_leaves: bool) {
    let cases = std::iter::once(None).chain(GRPC_UNSHAREABLE.map(Some));
    for trouble in cases {
        let backend = Backend::new();
        let layer = grpc_layer().detached(detached);
        let mut svc = layer.layer(backend.service(grpc_answer(trouble)));
        let followers = vec![grpc("f1"), grpc("f2")];
        let (leader, got) =
            flight(&mut svc, &backend, grpc("leader"), followers, leader_leaves).await;
        let own = "call 0 for leader";
        if let Some(leader) = &leader {
            match trouble {
                Some(GrpcTrouble::InnerError) => {
                    assert!(
                        matches!(leader, Got::Failed(e) if e == "refused call 0"),
                        "{leader:?}"
                    )
                }
                Some(GrpcTrouble::HandlerPanics) => {
                    assert!(matches!(leader, Got::Panicked(m) if m.contains("panicked on call 0")))
                }
                Some(GrpcTrouble::BodyFails) => {
                    assert!(matches!(leader, Got::BodyFailed(_)), "{leader:?}")
                }
                Some(GrpcTrouble::TooLarge) => {
                    let read = leader.read();
                    assert_eq!((read.by, read.text()), (ServedBy::Leader, long(own)));
                    assert_eq!(read.trailers.as_ref().unwrap()["grpc-status"], "0");
                }
                Some(GrpcTrouble::TrailersOnlyError) => {
                    let read = leader.read();
                    assert_eq!(read.by, ServedBy::Leader);
                    assert_eq!(read.headers["grpc-status"], "5");
                }
                Some(GrpcTrouble::Http500) => {
                    assert_eq!(leader.read().status, StatusCode::INTERNAL_SERVER_ERROR)
                }
                _ => {
                    let read = leader.read();
                    assert_eq!((read.by, read.text()), (ServedBy::Leader, own.into()));
                }
            }
        }
        let released = trouble.is_some();
        for (got, follower) in got.iter().zip(["f1", "f2"]) {
            let read = got.read();
            assert_eq!(read.trailers.as_ref().unwrap()["grpc-status"], "0");
            assert_eq!(read.headers.get("set-cookie"), None, "{trouble:?}");
            if released {
                assert_eq!(read.by, ServedBy::Released, "{trouble:?}");
                assert_own_call(&read.text(), follower);
            } else {
                assert_eq!((read.by, read.text()), (ServedBy::Follower, own.into()));
            }
        }
        assert_eq!(backend.calls(), if released { 3 } else { 1 }, "{trouble:?}");
        until("the registry empties", || layer.in_flight() == 0).await;
        let stats = layer.stats();
        assert_eq!(
            (
                stats.leaders,
                stats.followers,
                stats.released,
                stats.cancelled
            ),
            (1, 2, if released { 2 } else { 0 }, 0),
            "{trouble:?}: {stats:?}"
        );
        assert_eq!(layer.waiting(), 0);
        assert_accounted(stats, 3);
    }
}

#[tokio::test(start_paused = true)]
async fn grpc_detached_caller_leaves_and_followers_share_or_are_released() {
    grpc_with_followers(true, true).await;
}

#[tokio::test(start_paused = true)]
async fn grpc_detached_caller_stays_and_gets_its_own_outcome() {
    grpc_with_followers(true, false).await;
}

#[tokio::test(start_paused = true)]
async fn grpc_caller_leaves_and_the_follower_driving_the_flight_shares_or_is_released() {
    grpc_with_followers(false, true).await;
}

// ---------------------------------------------------------------------------------------------
// gRPC: bypass reasons and option order
// ---------------------------------------------------------------------------------------------

type Frames = futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>;

fn streamed(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> BoxBody<Bytes, BoxError> {
    boxed(StreamBody::new(futures::stream::iter(frames)) as StreamBody<Frames>)
}

/// Each bypass reason of the gRPC layer is counted once in `bypassed`, as nothing else, and the
/// call reaches the inner service once; a message exactly at the request limit is coalesced.
#[tokio::test(start_paused = true)]
async fn grpc_bypass_reasons_are_counted_once_each() {
    let backend = Backend::new();
    backend.open();
    let layer = grpc_layer().request_limit(8).detached(true);
    let mut svc = layer.layer(backend.service(grpc_answer(None)));
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trailer", HeaderValue::from_static("1"));
    let other = "/catalog.v1.Catalog/ListItems";
    let mut not_post = grpc("b");
    *not_post.method_mut() = Method::GET;
    let mut grpc_web = grpc("b");
    let web = HeaderValue::from_static("application/grpc-web+proto");
    grpc_web.headers_mut().insert("content-type", web);
    let cases: Vec<(&str, GrpcReq)> = vec![
        (
            "method not listed",
            grpc_with(other, "b", &[], boxed(Full::from("m"))),
        ),
        ("not a POST", not_post),
        ("gRPC-Web", grpc_web),
        (
            "credentials",
            grpc_with(PATH, "b", &[("authorization", "x")], boxed(Full::from("m"))),
        ),
        (
            "no-cache",
            grpc_with(
                PATH,
                "b",
                &[("cache-control", "no-cache")],
                boxed(Full::from("m")),
            ),
        ),
        (
            "request over the limit (size hint)",
            grpc_with(PATH, "b", &[], boxed(Full::from("123456789"))),
        ),
        (
            "request over the limit (found while reading)",
            grpc_with(
                PATH,
                "b",
                &[],
                streamed(vec![
                    Ok(Frame::data(Bytes::from("12345"))),
                    Ok(Frame::data(Bytes::from("6789"))),
                ]),
            ),
        ),
        (
            "request trailers",
            grpc_with(
                PATH,
                "b",
                &[],
                streamed(vec![
                    Ok(Frame::data(Bytes::from("m"))),
                    Ok(Frame::trailers(trailers)),
                ]),
            ),
        ),
        (
            "request body fails",
            grpc_with(
                PATH,
                "b",
                &[],
                streamed(vec![
                    Ok(Frame::data(Bytes::from("m"))),
                    Err("request failed".into()),
                ]),
            ),
        ),
    ];
    let count = cases.len() as u64;
    for (n, (why, req)) in cases.into_iter().enumerate() {
        let got = settle(why, outcome(svc.call(req))).await;
        assert_eq!(got.read().by, ServedBy::Bypass, "{why}");
        let stats = layer.stats();
        assert_eq!(
            stats.bypassed,
            n as u64 + 1,
            "{why}: counted once: {stats:?}"
        );
        assert_eq!((stats.leaders, stats.followers), (0, 0), "{why}");
        assert_eq!(backend.calls(), n + 1, "{why}: one call");
    }
    // At the limit exactly: coalesced, a leader.
    let at_limit = grpc_with(PATH, "b", &[], boxed(Full::from("12345678")));
    let got = settle("at the limit", outcome(svc.call(at_limit))).await;
    assert_eq!(got.read().by, ServedBy::Leader);
    let stats = layer.stats();
    assert_eq!((stats.bypassed, stats.leaders), (count, 1));
    assert_accounted(stats, count + 1);
}

/// Whatever the order of the gRPC option methods, the layer keeps `detached` (and the last
/// call wins), and keeps the methods it allow-lists.
#[tokio::test(start_paused = true)]
async fn grpc_detached_survives_any_option_order() {
    type Build = fn() -> CoalesceGrpcLayer;
    let builds: Vec<(&str, Build, bool)> = vec![
        (
            "detached first",
            || {
                CoalesceGrpcLayer::new()
                    .detached(true)
                    .method(PATH)
                    .metadata("x-tenant")
                    .identity(user)
                    .request_limit(64)
                    .response_limit(64)
            },
            true,
        ),
        (
            "detached last",
            || {
                CoalesceGrpcLayer::new()
                    .methods([PATH, "/a.B/C"])
                    .response_limit(64)
                    .request_limit(64)
                    .identity(user)
                    .metadata("x-tenant")
                    .detached(true)
            },
            true,
        ),
        (
            "detached in the middle",
            || {
                CoalesceGrpcLayer::new()
                    .request_limit(64)
                    .detached(true)
                    .metadata("x-tenant")
                    .metadata("x-tenant")
                    .method(PATH)
            },
            true,
        ),
        (
            "detached, then turned off",
            || {
                CoalesceGrpcLayer::new()
                    .detached(true)
                    .method(PATH)
                    .detached(false)
            },
            false,
        ),
        (
            "off, then on",
            || {
                CoalesceGrpcLayer::new()
                    .detached(false)
                    .method(PATH)
                    .detached(true)
                    .response_limit(64)
            },
            true,
        ),
        ("never", || CoalesceGrpcLayer::new().method(PATH), false),
    ];
    for (what, build, detached) in builds {
        let backend = Backend::new();
        let layer = build();
        let mut svc = layer.layer(backend.service(grpc_answer(None)));
        let reqs = vec![grpc("leader"), grpc("follower")];
        abandon(&mut svc, &backend, reqs, || layer.in_flight()).await;
        assert_eq!(
            (backend.finished(), backend.dropped()),
            (usize::from(detached), usize::from(!detached)),
            "{what}: the flight with no call left completes only when detached"
        );
        let stats = layer.stats();
        assert_eq!(
            (stats.leaders, stats.followers, stats.cancelled),
            (1, 1, u64::from(!detached)),
            "{what}: the method is still allow-listed: {stats:?}"
        );
        backend.open();
        let got = settle(what, outcome(svc.call(grpc("late")))).await;
        assert_eq!(
            (got.read().by, got.read().text()),
            (ServedBy::Leader, "call 1 for late".into()),
            "{what}"
        );
        assert_accounted(layer.stats(), 3);
    }
}
