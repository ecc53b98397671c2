#![cfg(all(feature = "http", feature = "grpc"))]
//! Black-box, end-to-end tests of the HTTP and gRPC adapters over real TCP on 127.0.0.1,
//! written from DESIGN.md and the crate's docs only.
//!
//! A stateless axum 0.8 `Router` is served with `axum::serve(listener, router)` (with
//! `CoalesceHttpLayer` next to the handlers) and a tonic server with `CoalesceGrpcLayer`.
//! Every client request opens a TCP connection of its own (raw `hyper::client::conn` for
//! HTTP/1.1 and h2c, one tonic `Channel` per gRPC call), so coalescing has to work across
//! connections. Served that way, axum turns the handlers into routes and applies the router's
//! layers again for every connection: the DESIGN.md trap where a registry made per `layer()`
//! call coalesces nothing. (Checked: a layer that makes a registry per `layer()` call fails
//! `gets_over_separate_connections_share_one_backend_call` with 24 backend calls.)
//!
//! Covered, end to end:
//! - identical GETs over separate connections make one backend call; everybody gets the same
//!   status, headers (multi-valued ones in order), body and HTTP/2 trailers; GET and HEAD are
//!   keyed apart; a request after the answer went out makes a new call;
//! - bodies exactly at the default 2 MiB buffering limit are shared whole; one byte over it,
//!   nobody loses a byte and the followers make their own calls;
//! - clients that disconnect (a follower, the leader, everybody) do not fail or stall the
//!   others; when everybody has gone the backend call is cancelled and the key freed;
//! - requests that must bypass (POST, credentials, Range, no-cache, upgrade) each reach the
//!   backend, concurrently; responses that must not be shared (Set-Cookie, private, no-store,
//!   no-cache, `Vary: *`) send every follower to the backend;
//! - a handler panic (behind tower-http's `CatchPanicLayer`) fails only its own caller and
//!   leaves the key coalescing again;
//! - gRPC: the same over separate channels, per request message, never for a method that is
//!   not allow-listed, and never sharing a non-OK status.
//!
//! Synchronisation uses no sleeps: handlers wait on a gate (a `watch` channel) that a test
//! opens only once every request is where it should be — in the handler (counted) or parked
//! as a follower (the layer's public `in_flight()` / `waiting()`). Client disconnects are
//! observed by a layer outside the coalescing one that counts response futures dropped before
//! they finished. Every wait is bounded by [`WAIT`], so a hang fails the test.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use axum::http::{Extensions, HeaderMap, HeaderValue, Request, Response, StatusCode};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Extension;
use axum::Router;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::Stream;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::{TcpConnectInfo, TcpIncoming};
use tonic::transport::{Endpoint, Server};
use tonic::Status;
use tower::Service;
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceHttpLayer, DEFAULT_MAX_BODY_BYTES};
use tower_http::catch_panic::CatchPanicLayer;

#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/catalog.v1.rs");
}

use pb::catalog_client::CatalogClient;
use pb::catalog_server::{Catalog, CatalogServer};
use pb::{GetItemRequest, Item};

/// The bound on every single wait (a condition, a reply). Real TCP needs real time, but a few
/// seconds is ages for loopback: running out of it means something hangs.
const WAIT: Duration = Duration::from_secs(10);

const GET_ITEM: &str = "/catalog.v1.Catalog/GetItem";

// ---------------------------------------------------------------------------------------------
// Shared helpers: bounded waits, the backend gate, the disconnect observer.
// ---------------------------------------------------------------------------------------------

/// Yields until `done(probe())` holds; fails with the last probed value after [`WAIT`].
async fn until<T: Debug>(what: &str, probe: impl Fn() -> T, done: impl Fn(&T) -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !done(&probe()) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out waiting until {what}; last state: {:?}",
        probe()
    );
}

/// Awaits a task, bounded by [`WAIT`].
async fn join<T: Send + 'static>(task: JoinHandle<T>) -> T {
    tokio::time::timeout(WAIT, task)
        .await
        .expect("a client hangs")
        .expect("client task")
}

/// Awaits every task, each bounded by [`WAIT`].
async fn join_all<T: Send + 'static>(tasks: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(join(task).await);
    }
    out
}

/// The whole test, bounded too (each wait inside already is; this catches what is not).
async fn within<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(90), test)
        .await
        .expect("test timed out: something hangs");
}

/// Adds one to a counter when dropped, unless disarmed first: tells a future that finished
/// from one that was dropped half-way (a cancelled handler, a client that went away).
struct CountIfDropped(Option<Arc<AtomicUsize>>);

impl CountIfDropped {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CountIfDropped {
    fn drop(&mut self) {
        if let Some(counter) = self.0.take() {
            counter.fetch_add(1, SeqCst);
        }
    }
}

/// The backend behind the layers: counts calls, holds each on a gate, and counts the calls
/// that were dropped (cancelled) while held.
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
    /// A second gate, in the middle of a response body (`/slow-body`): holds a flight while
    /// the layer is buffering the leader's body.
    body_gate: Arc<watch::Sender<bool>>,
    /// Bodies that reached `body_gate`.
    body_waits: Arc<AtomicUsize>,
    /// Bodies dropped while held at `body_gate`.
    body_dropped: Arc<AtomicUsize>,
}

impl Backend {
    fn new() -> Backend {
        Backend {
            calls: Arc::default(),
            cancelled: Arc::default(),
            gate: Arc::new(watch::channel(false).0),
            body_gate: Arc::new(watch::channel(false).0),
            body_waits: Arc::default(),
            body_dropped: Arc::default(),
        }
    }

    /// Counts the call, waits for the gate, returns this call's number (from 0).
    async fn enter(&self) -> usize {
        let n = self.calls.fetch_add(1, SeqCst);
        pass(&self.gate, &self.cancelled).await;
        n
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    /// Closes the gate again; only called once every call of a round has answered.
    fn close(&self) {
        self.gate.send_replace(false);
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn cancelled(&self) -> usize {
        self.cancelled.load(SeqCst)
    }

    /// Waits until a `/slow-body` response is held half-way, at the body gate.
    async fn until_body_held(&self) {
        until(
            "the body held half-way",
            || self.body_waits.load(SeqCst),
            |&n| n == 1,
        )
        .await;
    }
}

/// Waits for `gate` to open; counts in `dropped` if the wait is dropped before that.
async fn pass(gate: &watch::Sender<bool>, dropped: &Arc<AtomicUsize>) {
    let guard = CountIfDropped(Some(dropped.clone()));
    gate.subscribe()
        .wait_for(|open| *open)
        .await
        .expect("gate sender lives");
    guard.disarm();
}

/// What the observer layer records.
#[derive(Clone, Default)]
struct Observations {
    /// Response futures dropped before they finished: a client that went away.
    abandoned: Arc<AtomicUsize>,
    /// Distinct peer addresses seen (connections accepted, or gRPC requests' peers), to
    /// prove the requests came over separate connections.
    peers: Arc<Mutex<HashSet<SocketAddr>>>,
}

impl Observations {
    fn abandoned(&self) -> usize {
        self.abandoned.load(SeqCst)
    }

    fn peers(&self) -> usize {
        self.peers.lock().unwrap().len()
    }

    fn layer<S>(&self) -> impl tower::Layer<S, Service = Observed<S>> + Clone + Send + Sync {
        let seen = self.clone();
        tower::layer::layer_fn(move |inner| Observed {
            inner,
            seen: seen.clone(),
        })
    }
}

/// Sits outside the coalescing layer: sees every client's own request future.
#[derive(Clone)]
struct Observed<S> {
    inner: S,
    seen: Observations,
}

/// The peer of a gRPC request (tonic puts it in the extensions); HTTP peers are recorded by
/// the listener instead.
fn peer(extensions: &Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
}

impl<S, B> Service<Request<B>> for Observed<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(addr) = peer(req.extensions()) {
            self.seen.peers.lock().unwrap().insert(addr);
        }
        let fut = self.inner.call(req);
        let guard = CountIfDropped(Some(self.seen.abandoned.clone()));
        Box::pin(async move {
            let out = fut.await;
            guard.disarm();
            out
        })
    }
}

/// The coalescing layers' public gauges, so that one server type (and its waits) serves both
/// adapters.
trait Gauges {
    /// (keys in flight, followers waiting).
    fn gauges(&self) -> (usize, usize);
}

impl Gauges for CoalesceHttpLayer {
    fn gauges(&self) -> (usize, usize) {
        (self.in_flight(), self.waiting())
    }
}

impl Gauges for CoalesceGrpcLayer {
    fn gauges(&self) -> (usize, usize) {
        (self.in_flight(), self.waiting())
    }
}

/// A server on 127.0.0.1, with what a test looks at: its backend, its coalescing layer and
/// its observer. Dropping it stops the server.
struct TestServer<L> {
    addr: SocketAddr,
    backend: Backend,
    layer: L,
    seen: Observations,
    task: JoinHandle<()>,
}

impl<L> Drop for TestServer<L> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<L: Gauges> TestServer<L> {
    /// (backend calls, keys in flight, followers waiting).
    fn state(&self) -> (usize, usize, usize) {
        let (in_flight, waiting) = self.layer.gauges();
        (self.backend.calls(), in_flight, waiting)
    }

    async fn until_state(&self, what: &str, want: (usize, usize, usize)) {
        until(what, || self.state(), |s| *s == want).await;
    }

    /// Waits until `clients` identical requests, the server's first, are one backend call with
    /// the rest parked on it.
    async fn until_one_call(&self, clients: usize) {
        self.until_state("one call and N - 1 followers", (1, 1, clients - 1))
            .await;
    }

    /// Waits until the server has dropped `gone` clients' requests (they went away).
    async fn until_abandoned(&self, what: &str, gone: usize) {
        until(what, || self.seen.abandoned(), |&n| n == gone).await;
    }

    /// Starts the leader alone (so the test knows which client it is), then `followers` more.
    async fn leader_then_followers<T>(
        &self,
        start: impl Fn() -> JoinHandle<T>,
        followers: usize,
    ) -> (JoinHandle<T>, Vec<JoinHandle<T>>) {
        let leader = start();
        self.until_state("the leader in the handler", (1, 1, 0))
            .await;
        let rest = (0..followers).map(|_| start()).collect();
        self.until_state("every follower parked", (1, 1, followers))
            .await;
        (leader, rest)
    }

    /// The leader's client goes away; returns once the server has dropped its request.
    async fn abort_leader<T>(&self, leader: JoinHandle<T>) {
        leader.abort();
        self.until_abandoned("the server dropped the leader's request", 1)
            .await;
    }

    /// Opens the backend gate and waits for every client.
    async fn release<T: Send + 'static>(&self, clients: Vec<JoinHandle<T>>) -> Vec<T> {
        self.backend.open();
        join_all(clients).await
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: an axum app, and a client that opens one TCP connection per request.
// ---------------------------------------------------------------------------------------------

/// The response of `/hot`: a status, several headers (one multi-valued) and a body that names
/// the backend call that made it.
async fn hot(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-call", n.to_string())
        .header("x-multi", "first")
        .header("x-multi", "second")
        .body(Body::from(format!("hot #{n}")))
        .unwrap()
}

async fn unavailable(Extension(b): Extension<Backend>) -> (StatusCode, String) {
    let n = b.enter().await;
    (StatusCode::SERVICE_UNAVAILABLE, format!("down #{n}"))
}

async fn echo(Extension(b): Extension<Backend>) -> String {
    format!("echo #{}", b.enter().await)
}

/// A response that a shared cache must not store, by `kind` (some spelt the way a careless
/// parser would miss: upper case, a second header line, `*` inside a list).
async fn personal(Extension(b): Extension<Backend>, Path(kind): Path<String>) -> Response<Body> {
    let n = b.enter().await;
    let headers: Vec<(&str, String)> = match kind.as_str() {
        "set-cookie" => vec![("set-cookie", format!("session={n}"))],
        "private" => vec![("cache-control", "private, max-age=60".to_owned())],
        "no-store" => vec![("cache-control", "no-store".to_owned())],
        "no-cache" => vec![("cache-control", "no-cache".to_owned())],
        "vary-star" => vec![("vary", "*".to_owned())],
        "private-upper-case" => vec![("cache-control", "public, PRIVATE".to_owned())],
        "no-store-second-line" => vec![
            ("cache-control", "max-age=60".to_owned()),
            ("cache-control", "no-store".to_owned()),
        ],
        "vary-star-in-a-list" => vec![("vary", "Accept-Encoding, *".to_owned())],
        other => panic!("unknown kind {other}"),
    };
    let mut response = Response::builder();
    for (name, value) in headers {
        response = response.header(name, value);
    }
    response.body(Body::from(format!("{kind} #{n}"))).unwrap()
}

/// `len` bytes, tagged at the start with the backend call that made them.
fn big_bytes(n: usize, len: usize) -> Bytes {
    let mut data = format!("call {n:04} ").into_bytes();
    data.extend((0..len - data.len()).map(|i| b'a' + (i % 26) as u8));
    Bytes::from(data)
}

fn tag_of(body: &[u8]) -> usize {
    std::str::from_utf8(&body[5..9]).unwrap().parse().unwrap()
}

type Frames = Vec<Result<Frame<Bytes>, Infallible>>;

/// A body of `frames` with no known length: the layer only finds out its size by reading it.
fn streamed(frames: Frames) -> Body {
    Body::new(StreamBody::new(futures::stream::iter(frames)))
}

/// `data` in 16 KiB data frames.
fn chunks(data: &Bytes) -> Frames {
    data.chunks(16 * 1024)
        .map(|chunk| Ok(Frame::data(data.slice_ref(chunk))))
        .collect()
}

/// A big body in 16 KiB chunks, with no known length.
async fn big_streamed(Extension(b): Extension<Backend>, Path(len): Path<usize>) -> Body {
    streamed(chunks(&big_bytes(b.enter().await, len)))
}

/// A big body with a `Content-Length`.
async fn big_known(Extension(b): Extension<Backend>, Path(len): Path<usize>) -> Bytes {
    big_bytes(b.enter().await, len)
}

/// A body in two chunks followed by a trailer that names the call.
async fn with_trailers(Extension(b): Extension<Backend>) -> Body {
    let n = b.enter().await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", format!("sum-{n}").parse().unwrap());
    streamed(vec![
        Ok(Frame::data(Bytes::from("checked "))),
        Ok(Frame::data(Bytes::from(format!("body {n}")))),
        Ok(Frame::trailers(trailers)),
    ])
}

/// A body whose first chunk comes at once and whose second waits for the body gate.
async fn slow_body(Extension(b): Extension<Backend>) -> Body {
    let n = b.enter().await;
    let frames = futures::stream::unfold(0u8, move |step| {
        let b = b.clone();
        async move {
            let chunk = match step {
                0 => Bytes::from("part one "),
                1 => {
                    b.body_waits.fetch_add(1, SeqCst);
                    pass(&b.body_gate, &b.body_dropped).await;
                    Bytes::from(format!("part two #{n}"))
                }
                _ => return None,
            };
            Some((Ok::<_, Infallible>(Frame::data(chunk)), step + 1))
        }
    });
    Body::new(StreamBody::new(frames))
}

/// A big streamed body (unknown length) followed by trailers naming the call and the length.
async fn big_with_trailers(Extension(b): Extension<Backend>, Path(len): Path<usize>) -> Body {
    let n = b.enter().await;
    let mut frames = chunks(&big_bytes(n, len));
    let mut trailers = HeaderMap::new();
    trailers.insert("x-call", n.to_string().parse().unwrap());
    trailers.insert("x-len", len.to_string().parse().unwrap());
    frames.push(Ok(Frame::trailers(trailers)));
    streamed(frames)
}

/// Panics on the server's very first backend call only.
async fn panics_once(Extension(b): Extension<Backend>) -> String {
    let n = b.enter().await;
    if n == 0 {
        panic!("handler exploded on call 0");
    }
    format!("fine #{n}")
}

/// A stateless `Router<()>` whose routes are still handlers: `axum::serve` turns them into
/// routes, and applies the router's layers again, for every connection (the DESIGN.md trap).
/// The backend reaches the handlers as a request extension (see [`with_backend`]).
fn routes() -> Router {
    Router::new()
        .route("/hot", get(hot))
        .route("/echo", get(echo).post(echo))
        .route("/unavailable", get(unavailable))
        .route("/personal/{kind}", get(personal))
        .route("/big/{len}", get(big_streamed))
        .route("/big-known/{len}", get(big_known))
        .route("/trailers", get(with_trailers))
        .route("/slow-body", get(slow_body))
        .route("/big-trailers/{len}", get(big_with_trailers))
        .route("/panics-once", get(panics_once))
}

/// The outermost layer: hands every request the backend. Kept outside the coalescing layer
/// so that the router stays stateless (no `with_state`, which would turn the handlers into
/// routes once and hide the per-connection re-application of layers).
fn with_backend(app: Router, backend: Backend) -> Router {
    app.layer(Extension(backend))
}

type HttpServer = TestServer<CoalesceHttpLayer>;

/// A client's task: its reply, or what went wrong on the way.
type Client = JoinHandle<Result<Reply, String>>;

/// Serves [`routes`] on 127.0.0.1:0 with `axum::serve`, behind `layer` (with the
/// `Cache-Status` header turned on, so the client can see who was leader, follower, released
/// or bypassed).
async fn start_http(layer: CoalesceHttpLayer) -> HttpServer {
    start_app(layer, |backend, layer, seen| {
        let app = routes()
            // `Router::layer`: the last one added is the outermost. Coalescing next to the
            // handlers; the observer outside it sees each client's request; `CatchPanicLayer`
            // outside that turns a panic re-raised in the leader into a 500, as the docs advise.
            .layer(layer)
            .layer(seen.layer())
            .layer(CatchPanicLayer::new());
        with_backend(app, backend)
    })
    .await
}

/// Serves the router `app(backend, layer, observer)` builds on 127.0.0.1:0 with
/// `axum::serve(listener, router)` itself, the way that turns the router's handlers into
/// routes, applying its layers again, for every connection. (`into_make_service*` would do
/// that once, up front, and hide a registry made per `layer()` call.) The listener records
/// each accepted connection's peer.
async fn start_app(
    layer: CoalesceHttpLayer,
    app: impl FnOnce(Backend, CoalesceHttpLayer, &Observations) -> Router,
) -> HttpServer {
    let layer = layer.cache_status_header(true);
    let backend = Backend::new();
    let seen = Observations::default();
    let app = app(backend.clone(), layer.clone(), &seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peers = seen.peers.clone();
    let listener = listener.tap_io(move |tcp| {
        if let Ok(peer) = tcp.peer_addr() {
            peers.lock().unwrap().insert(peer);
        }
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    TestServer {
        addr,
        backend,
        layer,
        seen,
        task,
    }
}

impl HttpServer {
    /// Sends `req` on a TCP connection of its own, from a task of its own.
    fn send(&self, req: Request<Full<Bytes>>, proto: Proto) -> Client {
        tokio::spawn(exchange(self.addr, req, proto))
    }

    /// `n` clients at once, each sending a request `req` makes.
    fn burst(&self, n: usize, proto: Proto, req: impl Fn() -> Request<Full<Bytes>>) -> Vec<Client> {
        (0..n).map(|_| self.send(req(), proto)).collect()
    }

    /// A GET over HTTP/1.1.
    fn get(&self, path: &str) -> Client {
        self.send(get_req(path), Proto::Http1)
    }

    /// `n` identical GETs at once.
    fn gets(&self, n: usize, path: &str, proto: Proto) -> Vec<Client> {
        self.burst(n, proto, || get_req(path))
    }
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), as `axum::serve` accepts.
    Http2,
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Reply {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }

    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }

    fn is_leader(&self) -> bool {
        self.cache_status() == "tower-coalesce; fwd=miss"
    }

    fn is_follower(&self) -> bool {
        self.cache_status() == "tower-coalesce; fwd=miss; collapsed"
    }

    fn is_released(&self) -> bool {
        self.cache_status().contains("collapsed=?0")
    }

    fn is_bypass(&self) -> bool {
        !self.cache_status().contains("fwd=miss") && !self.cache_status().contains("collapsed")
    }

    /// The number of the backend call that made a body ending in `#<n>`.
    fn call(&self) -> &str {
        self.text().rsplit('#').next().unwrap()
    }
}

/// How many of `replies` are `is`.
fn count(replies: &[Reply], is: fn(&Reply) -> bool) -> usize {
    replies.iter().filter(|r| is(r)).count()
}

/// Different bodies among `replies`: one per backend call that answered them.
fn distinct_bodies(replies: &[Reply]) -> usize {
    replies
        .iter()
        .map(Reply::text)
        .collect::<HashSet<_>>()
        .len()
}

/// Different backend calls that made the big bodies among `replies`.
fn distinct_tags(replies: &[Reply]) -> usize {
    replies
        .iter()
        .map(|r| tag_of(&r.body))
        .collect::<HashSet<_>>()
        .len()
}

/// A big body arrived whole: every byte of the one its call made.
#[track_caller]
fn assert_whole(body: &Bytes, len: usize) {
    assert_eq!(body.len(), len, "nobody loses a byte");
    assert_eq!(body, &big_bytes(tag_of(body), len));
}

/// Aborts the connection task when the request's own task ends or is aborted, so that
/// aborting a request's task closes its TCP connection: the server sees the client go away.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a client connection until the request's task ends.
fn drive(conn: impl Future + Send + 'static) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }))
}

/// One request on a fresh TCP connection: connect, handshake, send, read the whole body and
/// its trailers.
async fn exchange(
    addr: SocketAddr,
    mut req: Request<Full<Bytes>>,
    proto: Proto,
) -> Result<Reply, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let io = TokioIo::new(stream);
    let _connection: AbortOnDrop;
    let sent = match proto {
        Proto::Http1 => {
            req.headers_mut()
                .entry(HOST)
                .or_insert(HeaderValue::from_str(&addr.to_string()).unwrap());
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            _connection = drive(conn);
            sender.send_request(req).await
        }
        Proto::Http2 => {
            // HTTP/2 needs the scheme and authority in the URI.
            *req.uri_mut() = format!("http://{addr}{}", req.uri()).parse().unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
            _connection = drive(conn);
            sender.send_request(req).await
        }
    };
    let (parts, body) = sent.map_err(|e| format!("request: {e}"))?.into_parts();
    let collected = body.collect().await.map_err(|e| format!("body: {e}"))?;
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    })
}

fn get_req(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::default()).unwrap()
}

fn get_with(path: &str, name: &'static str, value: &'static str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header(name, value)
        .body(Full::default())
        .unwrap()
}

fn ok_replies(replies: Vec<Result<Reply, String>>) -> Vec<Reply> {
    replies
        .into_iter()
        .map(|r| r.expect("every client gets a whole reply"))
        .collect()
}

fn header_values<'a>(r: &'a Reply, name: &str) -> Vec<&'a str> {
    r.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_over_separate_connections_share_one_backend_call() {
    within(async {
        const N: usize = 24;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let tasks = s.gets(N, "/hot", Proto::Http1);
        // Held at the gate: one handler call, everybody else parked on it. With a registry
        // per connection (the axum trap) this would be N handler calls and no follower.
        s.until_one_call(N).await;
        assert_eq!(
            s.seen.peers(),
            N,
            "every request came on its own connection"
        );
        let replies = ok_replies(s.release(tasks).await);

        assert_eq!(s.backend.calls(), 1, "{N} identical GETs, one backend call");
        for r in &replies {
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.text(), "hot #0");
            assert_eq!(r.headers["x-call"], "0");
            assert_eq!(r.headers[CONTENT_TYPE], "text/plain; charset=utf-8");
            // A rebuilt response keeps multi-valued headers whole and in order.
            assert_eq!(header_values(r, "x-multi"), ["first", "second"]);
            if let Some(len) = r.headers.get(CONTENT_LENGTH) {
                assert_eq!(len.to_str().unwrap(), r.body.len().to_string());
            }
        }
        assert_eq!(count(&replies, Reply::is_leader), 1);
        assert_eq!(count(&replies, Reply::is_follower), N - 1);
        assert_eq!(s.layer.gauges(), (0, 0));

        // No stale join: a request after the answer went out makes a new call.
        let later = exchange(s.addr, get_req("/hot"), Proto::Http1)
            .await
            .unwrap();
        assert_eq!(later.text(), "hot #1");
        assert!(later.is_leader(), "{}", later.cache_status());
    })
    .await;
}

/// The DESIGN.md trap, for each way of putting the layer on an axum app: `axum::serve`
/// re-applies layers per connection, so only a registry shared by the layer value coalesces
/// requests that come over different connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_axum_placement_coalesces_across_connections() {
    within(async {
        const N: usize = 8;
        type Place = fn(Backend, CoalesceHttpLayer, &Observations) -> Router;
        let placements: [(&str, &str, Place); 3] = [
            ("Router::route_layer", "/hot", |b, layer, _| {
                let app = Router::new().route("/hot", get(hot)).route_layer(layer);
                with_backend(app, b)
            }),
            ("MethodRouter::layer", "/hot", |b, layer, _| {
                with_backend(Router::new().route("/hot", get(hot).layer(layer)), b)
            }),
            ("a nested Router's layer", "/api/hot", |b, layer, _| {
                let api = Router::new().route("/hot", get(hot)).layer(layer);
                with_backend(Router::new().nest("/api", api), b)
            }),
        ];
        for (place, path, app) in placements {
            let s = start_app(CoalesceHttpLayer::new(), app).await;
            let tasks = s.gets(N, path, Proto::Http1);
            s.until_state(
                &format!("{place}: one call and N - 1 followers"),
                (1, 1, N - 1),
            )
            .await;
            for r in ok_replies(s.release(tasks).await) {
                assert_eq!(r.text(), "hot #0", "{place}");
            }
            assert_eq!(s.backend.calls(), 1, "{place}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_status_response_is_not_shared_its_followers_call() {
    within(async {
        const N: usize = 8;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let tasks = s.gets(N, "/unavailable", Proto::Http1);
        s.until_one_call(N).await;
        // RFC 9111 §3: a 503 with no explicit freshness is the failed call's own; its
        // followers are released at once, each to make its own call.
        let replies = ok_replies(s.release(tasks).await);
        let mut texts: Vec<_> = replies.iter().map(|r| r.text()).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), N, "each its own call: {texts:?}");
        assert!(replies
            .iter()
            .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(s.backend.calls(), N);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_get_are_coalesced_apart_and_each_kind_alike() {
    within(async {
        const N: usize = 6;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let gets = s.gets(N, "/hot", Proto::Http1);
        let heads = s.burst(N, Proto::Http1, || {
            Request::head("/hot").body(Full::default()).unwrap()
        });
        // Each method is its own key: two calls, each with N - 1 followers.
        s.until_state("a GET call and a HEAD call", (2, 2, 2 * N - 2))
            .await;
        let gets = ok_replies(s.release(gets).await);
        let heads = ok_replies(join_all(heads).await);
        assert_eq!(s.backend.calls(), 2);

        let get_body = gets[0].body.clone();
        assert!(gets.iter().all(|r| r.body == get_body && r.status == 200));
        // Every HEAD waiter gets the same head as the HEAD leader, and no body.
        let leader = heads.iter().find(|r| r.is_leader()).expect("a HEAD leader");
        for r in &heads {
            assert!(r.body.is_empty(), "HEAD with a body: {:?}", r.body);
            assert_eq!(r.status, leader.status);
            assert_eq!(r.headers.get("x-call"), leader.headers.get("x-call"));
            assert_eq!(
                r.headers.get(CONTENT_LENGTH),
                leader.headers.get(CONTENT_LENGTH),
                "a HEAD follower's Content-Length differs from the leader's"
            );
            // RFC 9110: a HEAD response's Content-Length is the GET body's length, not 0.
            if let Some(len) = r.headers.get(CONTENT_LENGTH) {
                assert_eq!(len.to_str().unwrap(), get_body.len().to_string());
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_every_waiter_over_separate_http2_connections() {
    within(async {
        const N: usize = 12;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let tasks = s.gets(N, "/trailers", Proto::Http2);
        s.until_one_call(N).await;
        assert_eq!(s.seen.peers(), N);
        let replies = ok_replies(s.release(tasks).await);
        assert_eq!(s.backend.calls(), 1);
        for r in &replies {
            assert_eq!(r.text(), "checked body 0");
            let trailers = r.trailers.as_ref().expect("trailers kept for every waiter");
            assert_eq!(trailers["x-checksum"], "sum-0");
        }
        assert_eq!(count(&replies, Reply::is_follower), N - 1);
    })
    .await;
}

/// Two routes, one streaming a body of unknown length and one with `Content-Length`, each hit
/// by `n` concurrent GETs of `len` bytes over separate connections; returns the replies.
async fn big_bodies(s: &HttpServer, n: usize, len: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..2 * n)
        .map(|i| {
            let path = if i % 2 == 0 {
                format!("/big/{len}")
            } else {
                format!("/big-known/{len}")
            };
            s.get(&path)
        })
        .collect();
    s.until_state("one call per route, the rest followers", (2, 2, 2 * n - 2))
        .await;
    ok_replies(s.release(tasks).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_exactly_at_the_default_limit_is_shared_whole() {
    within(async {
        const N: usize = 4;
        let len = DEFAULT_MAX_BODY_BYTES;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let replies = big_bodies(&s, N, len).await;
        // "a body within max_body_bytes" is shared: the limit itself is within.
        assert_eq!(s.backend.calls(), 2, "one call per route");
        for r in &replies {
            assert_whole(&r.body, len);
        }
        assert_eq!(
            distinct_tags(&replies),
            2,
            "each route's waiters got its one call's body"
        );
        assert_eq!(count(&replies, Reply::is_follower), 2 * N - 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_one_byte_over_the_default_limit_reaches_everyone_whole() {
    within(async {
        const N: usize = 4;
        let len = DEFAULT_MAX_BODY_BYTES + 1;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let replies = big_bodies(&s, N, len).await;
        assert_eq!(
            s.backend.calls(),
            2 * N,
            "the leaders' calls, then one per follower"
        );
        for r in &replies {
            assert_eq!(r.status, StatusCode::OK);
            assert_whole(&r.body, len);
        }
        assert_eq!(
            distinct_tags(&replies),
            2 * N,
            "each client got its own call's body"
        );
        assert_eq!(count(&replies, Reply::is_leader), 2);
        assert_eq!(count(&replies, Reply::is_released), 2 * N - 2);
        assert_eq!(s.layer.gauges(), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_that_disconnect_do_not_disturb_the_others() {
    within(async {
        const FOLLOWERS: usize = 10;
        const GONE: usize = 3;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let (leader, mut followers) = s.leader_then_followers(|| s.get("/hot"), FOLLOWERS).await;
        // Close three followers' connections mid-flight.
        for task in followers.drain(..GONE) {
            task.abort();
        }
        until(
            "the server dropped the gone followers' requests",
            || (s.seen.abandoned(), s.layer.waiting()),
            |&(gone, waiting)| gone == GONE && waiting == FOLLOWERS - GONE,
        )
        .await;
        assert_eq!(s.backend.cancelled(), 0, "the call goes on");
        s.backend.open();
        let leader = join(leader).await.expect("the leader's reply");
        assert_eq!(leader.text(), "hot #0");
        for r in ok_replies(join_all(followers).await) {
            assert_eq!(r.text(), "hot #0");
            assert!(r.is_follower(), "{}", r.cache_status());
        }
        assert_eq!(s.backend.calls(), 1);
        assert_eq!(s.layer.gauges(), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leaders_client_disconnects_the_followers_still_get_the_one_answer() {
    within(async {
        const FOLLOWERS: usize = 8;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let (leader, followers) = s.leader_then_followers(|| s.get("/hot"), FOLLOWERS).await;
        s.abort_leader(leader).await;
        // The leader's request is gone but its backend call is not: a follower carries it.
        assert_eq!(s.backend.cancelled(), 0, "the backend call was cancelled");
        assert_eq!(s.layer.in_flight(), 1);
        for r in ok_replies(s.release(followers).await) {
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.text(), "hot #0", "the call the leader started");
        }
        assert_eq!(s.backend.calls(), 1, "one backend call for everybody");
        assert_eq!(s.layer.gauges(), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_client_disconnects_the_backend_call_is_cancelled_and_the_key_freed() {
    within(async {
        const N: usize = 5;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let tasks = s.gets(N, "/hot", Proto::Http1);
        s.until_one_call(N).await;
        for task in &tasks {
            task.abort();
        }
        // Contract 4: the last waiter gone, the inner future is dropped and the key freed.
        until(
            "the backend call cancelled and the registry empty",
            || (s.seen.abandoned(), s.backend.cancelled(), s.layer.gauges()),
            |&st| st == (N, 1, (0, 0)),
        )
        .await;
        // The key works again, for a new call.
        let again = s.get("/hot");
        s.until_state("a new call for the key", (2, 1, 0)).await;
        s.backend.open();
        assert_eq!(join(again).await.unwrap().text(), "hot #1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_disconnects_while_its_body_is_buffered_does_not_cut_the_followers_off() {
    within(async {
        const FOLLOWERS: usize = 6;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let (leader, followers) = s
            .leader_then_followers(|| s.get("/slow-body"), FOLLOWERS)
            .await;
        // The handler answers; its body stops half-way: the layer is buffering it.
        s.backend.open();
        s.backend.until_body_held().await;
        s.abort_leader(leader).await;
        // Contract 4: the flight (the response, body included) goes on for the followers.
        assert_eq!(
            s.backend.body_dropped.load(SeqCst),
            0,
            "the body being buffered for the followers was dropped with the leader"
        );
        s.backend.body_gate.send_replace(true);
        for r in ok_replies(join_all(followers).await) {
            assert_eq!(r.text(), "part one part two #0");
        }
        assert_eq!(s.backend.calls(), 1, "one backend call for everybody");
        assert_eq!(s.layer.gauges(), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_client_disconnects_while_the_body_is_buffered_the_call_is_dropped() {
    within(async {
        const N: usize = 4;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let tasks = s.gets(N, "/slow-body", Proto::Http1);
        s.until_one_call(N).await;
        s.backend.open();
        s.backend.until_body_held().await;
        for task in &tasks {
            task.abort();
        }
        until(
            "the body dropped and the registry empty",
            || {
                (
                    s.seen.abandoned(),
                    s.backend.body_dropped.load(SeqCst),
                    s.layer.gauges(),
                )
            },
            |&st| st == (N, 1, (0, 0)),
        )
        .await;
        // The key works again.
        s.backend.body_gate.send_replace(true);
        let again = exchange(s.addr, get_req("/slow-body"), Proto::Http1)
            .await
            .unwrap();
        assert_eq!(again.text(), "part one part two #1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_disconnects_a_response_meant_for_it_alone_is_not_handed_on() {
    within(async {
        const FOLLOWERS: usize = 5;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let path = "/personal/set-cookie";
        let (leader, followers) = s.leader_then_followers(|| s.get(path), FOLLOWERS).await;
        s.abort_leader(leader).await;
        let replies = ok_replies(s.release(followers).await);
        for r in &replies {
            // Call 0 was the leader's: its cookie must not reach anybody else.
            assert_ne!(
                r.text(),
                "set-cookie #0",
                "the leader's cookie was handed on"
            );
            assert_eq!(r.headers["set-cookie"], format!("session={}", r.call()));
        }
        assert_eq!(
            distinct_bodies(&replies),
            FOLLOWERS,
            "each follower made its own call"
        );
        assert_eq!(s.backend.calls(), 1 + FOLLOWERS);
        assert_eq!(s.layer.gauges(), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_disconnects_on_an_oversized_body_the_followers_get_whole_bodies() {
    within(async {
        const FOLLOWERS: usize = 5;
        const LIMIT: usize = 64 * 1024;
        let len = LIMIT + 1;
        let s = start_http(CoalesceHttpLayer::new().max_body_bytes(LIMIT)).await;
        let path = format!("/big/{len}");
        let (leader, followers) = s.leader_then_followers(|| s.get(&path), FOLLOWERS).await;
        s.abort_leader(leader).await;
        for r in ok_replies(s.release(followers).await) {
            assert_whole(&r.body, len);
        }
        // The leader's call (maybe carried by a follower), and at most one per follower.
        let calls = s.backend.calls();
        assert!((2..=1 + FOLLOWERS).contains(&calls), "{calls} calls");
        assert_eq!(s.layer.gauges(), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_bodies_with_trailers_over_http2_at_and_over_the_limit() {
    within(async {
        const N: usize = 5;
        const LIMIT: usize = 64 * 1024;
        let s = start_http(CoalesceHttpLayer::new().max_body_bytes(LIMIT)).await;

        // At the limit: one call, shared whole with its trailers.
        let tasks = s.gets(N, &format!("/big-trailers/{LIMIT}"), Proto::Http2);
        s.until_one_call(N).await;
        let replies = ok_replies(s.release(tasks).await);
        s.backend.close();
        assert_eq!(s.backend.calls(), 1);
        for r in &replies {
            assert_eq!(r.body, big_bytes(0, LIMIT));
            let trailers = r.trailers.as_ref().expect("trailers kept");
            assert_eq!(
                (&trailers["x-call"], &trailers["x-len"]),
                (
                    &"0".parse::<HeaderValue>().unwrap(),
                    &LIMIT.to_string().parse::<HeaderValue>().unwrap()
                )
            );
        }

        // One byte over: the leader gets its body and trailers whole, as streamed; the
        // followers make their own calls and get theirs, trailers included.
        let len = LIMIT + 1;
        let tasks = s.gets(N, &format!("/big-trailers/{len}"), Proto::Http2);
        s.until_state("one call and N - 1 followers", (2, 1, N - 1))
            .await;
        let replies = ok_replies(s.release(tasks).await);
        assert_eq!(s.backend.calls(), 1 + N);
        for r in &replies {
            let n = tag_of(&r.body);
            assert_whole(&r.body, len);
            let trailers = r
                .trailers
                .as_ref()
                .unwrap_or_else(|| panic!("call {n}: trailers lost ({})", r.cache_status()));
            assert_eq!(trailers["x-call"], n.to_string());
            assert_eq!(trailers["x-len"], len.to_string());
        }
        assert_eq!(distinct_tags(&replies), N);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_must_bypass_each_reach_the_backend() {
    within(async {
        const K: usize = 4;
        type MakeRequest = fn() -> Request<Full<Bytes>>;
        let kinds: [(&str, MakeRequest); 10] = [
            ("GET with a body", || {
                Request::get("/echo")
                    .body(Full::new(Bytes::from("a body")))
                    .unwrap()
            }),
            ("POST", || {
                Request::post("/echo")
                    .body(Full::new(Bytes::from("order")))
                    .unwrap()
            }),
            ("Authorization", || {
                get_with("/echo", "authorization", "Bearer alice")
            }),
            ("Cookie", || get_with("/echo", "cookie", "session=alice")),
            ("Proxy-Authorization", || {
                get_with("/echo", "proxy-authorization", "Basic YWxpY2U6cHc=")
            }),
            ("Range", || get_with("/echo", "range", "bytes=0-3")),
            ("Cache-Control: no-cache", || {
                get_with("/echo", "cache-control", "no-cache")
            }),
            ("Cache-Control: no-store", || {
                get_with("/echo", "cache-control", "no-store")
            }),
            ("Pragma: no-cache", || {
                get_with("/echo", "pragma", "no-cache")
            }),
            ("Upgrade", || {
                Request::get("/echo")
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .body(Full::default())
                    .unwrap()
            }),
        ];
        let s = start_http(CoalesceHttpLayer::new()).await;
        for (kind, make) in kinds {
            let base = s.backend.calls();
            let tasks = s.burst(K, Proto::Http1, make);
            // All K held in the handler at once: none of them waits for another's call.
            until(
                &format!("{K} identical {kind} requests all in the handler"),
                || s.state(),
                |&(calls, _, _)| calls == base + K,
            )
            .await;
            assert_eq!(s.layer.gauges(), (0, 0), "{kind}: nothing registered");
            let replies = ok_replies(s.release(tasks).await);
            s.backend.close();
            assert_eq!(
                distinct_bodies(&replies),
                K,
                "{kind}: each got its own call's answer"
            );
            for r in &replies {
                assert_eq!(r.status, StatusCode::OK, "{kind}");
                assert!(r.is_bypass(), "{kind}: {}", r.cache_status());
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_that_must_not_be_shared_send_the_followers_to_the_backend() {
    within(async {
        const N: usize = 5;
        let s = start_http(CoalesceHttpLayer::new()).await;
        for (kind, header, value) in [
            ("set-cookie", "set-cookie", None),
            ("private", "cache-control", Some("private, max-age=60")),
            ("no-store", "cache-control", Some("no-store")),
            ("no-cache", "cache-control", Some("no-cache")),
            ("vary-star", "vary", Some("*")),
            (
                "private-upper-case",
                "cache-control",
                Some("public, PRIVATE"),
            ),
            ("no-store-second-line", "cache-control", Some("max-age=60")),
            ("vary-star-in-a-list", "vary", Some("Accept-Encoding, *")),
        ] {
            let base = s.backend.calls();
            let tasks = s.gets(N, &format!("/personal/{kind}"), Proto::Http1);
            s.until_state(
                &format!("{kind}: one call and N - 1 followers"),
                (base + 1, 1, N - 1),
            )
            .await;
            let replies = ok_replies(s.release(tasks).await);
            s.backend.close();
            assert_eq!(
                s.backend.calls(),
                base + N,
                "{kind}: every follower made its own call"
            );
            assert_eq!(
                distinct_bodies(&replies),
                N,
                "{kind}: nobody got another's response"
            );
            for r in &replies {
                let got = r.headers.get(header).map(|v| v.to_str().unwrap());
                match value {
                    Some(value) => assert_eq!(got, Some(value), "{kind}"),
                    // The cookie must be the one minted by the call whose body it came with.
                    None => {
                        let cookie = format!("session={}", r.call());
                        assert_eq!(got, Some(cookie.as_str()), "{kind}");
                    }
                }
            }
            assert_eq!(count(&replies, Reply::is_leader), 1, "{kind}");
            assert_eq!(count(&replies, Reply::is_released), N - 1, "{kind}");
            assert_eq!(s.layer.gauges(), (0, 0), "{kind}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_fails_only_its_caller_and_the_key_coalesces_again() {
    within(async {
        const N: usize = 5;
        let s = start_http(CoalesceHttpLayer::new()).await;
        let tasks = s.gets(N, "/panics-once", Proto::Http1);
        s.until_one_call(N).await;
        let replies = ok_replies(s.release(tasks).await);
        s.backend.close();
        // The leader's call panicked: its client gets CatchPanicLayer's 500; the followers
        // were released to make their own calls and got real answers.
        assert_eq!(
            count(&replies, |r| r.status == StatusCode::INTERNAL_SERVER_ERROR),
            1
        );
        let fine: Vec<&Reply> = replies.iter().filter(|r| r.status == 200).collect();
        assert_eq!(fine.len(), N - 1);
        assert!(fine.iter().all(|r| r.text().starts_with("fine #")));
        assert_eq!(s.backend.calls(), N);
        assert_eq!(s.layer.gauges(), (0, 0));

        // The key is not poisoned: a new burst coalesces into one call again.
        let tasks = s.gets(N, "/panics-once", Proto::Http1);
        s.until_state("a new burst coalesced", (N + 1, 1, N - 1))
            .await;
        for r in ok_replies(s.release(tasks).await) {
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.text(), format!("fine #{N}"));
        }
        assert_eq!(s.backend.calls(), N + 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// gRPC: a tonic server, and one channel (one TCP connection) per call.
// ---------------------------------------------------------------------------------------------

/// The handler: answers with the backend call's number, so a test can tell shared answers
/// from separate calls.
#[derive(Clone)]
struct Catalogue {
    backend: Backend,
}

#[tonic::async_trait]
impl Catalog for Catalogue {
    async fn get_item(
        &self,
        request: tonic::Request<GetItemRequest>,
    ) -> Result<tonic::Response<Item>, Status> {
        let n = self.backend.enter().await;
        let tenant = request
            .metadata()
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned());
        let id = request.into_inner().id;
        if id == "boom" && n == 0 {
            panic!("handler exploded on call 0");
        }
        if id == "flaky" && n == 0 {
            return Err(Status::unavailable("the first call fails"));
        }
        if let Some(what) = id.strip_prefix("missing:") {
            return Err(Status::not_found(format!("no item {what} (call {n})")));
        }
        let description = match tenant {
            Some(tenant) => format!("call #{n} for {tenant}"),
            None => format!("call #{n}"),
        };
        let mut response = tonic::Response::new(Item {
            description,
            id,
            payload: Vec::new(),
        });
        // Response metadata (an HTTP header) that every waiter must get too.
        response
            .metadata_mut()
            .insert("x-call", n.to_string().parse().unwrap());
        Ok(response)
    }

    type WatchItemStream = Pin<Box<dyn Stream<Item = Result<Item, Status>> + Send>>;

    async fn watch_item(
        &self,
        _request: tonic::Request<GetItemRequest>,
    ) -> Result<tonic::Response<Self::WatchItemStream>, Status> {
        Err(Status::unimplemented("not used here"))
    }
}

type GrpcServer = TestServer<CoalesceGrpcLayer>;

async fn start_grpc(layer: CoalesceGrpcLayer) -> GrpcServer {
    let backend = Backend::new();
    let seen = Observations::default();
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = incoming.local_addr().expect("local addr");
    // With `Server::builder()`, the first layer added is the outermost: a panic re-raised in
    // the leader becomes a 500 (an error status for its caller), the observer sees each
    // caller's own request, and coalescing sits next to the service.
    let router = Server::builder()
        .layer(CatchPanicLayer::new())
        .layer(seen.layer())
        .layer(layer.clone())
        .add_service(CatalogServer::new(Catalogue {
            backend: backend.clone(),
        }));
    let task = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.expect("server");
    });
    TestServer {
        addr,
        backend,
        layer,
        seen,
        task,
    }
}

impl GrpcServer {
    /// One `GetItem` call on a channel (a TCP connection) of its own, from a task of its own
    /// (aborting the task closes the channel: the caller goes away).
    fn call(&self, id: &str) -> JoinHandle<Result<Item, Status>> {
        let call = grpc_call(
            self.addr,
            tonic::Request::new(GetItemRequest {
                id: id.to_owned(),
                padding: Vec::new(),
            }),
        );
        tokio::spawn(async move { call.await.map(tonic::Response::into_inner) })
    }

    /// `n` identical calls at once.
    fn calls(&self, n: usize, id: &str) -> Vec<JoinHandle<Result<Item, Status>>> {
        (0..n).map(|_| self.call(id)).collect()
    }

    /// Like [`call`](Self::call), with a request of the test's own (metadata) and the whole
    /// response back.
    fn call_with(
        &self,
        request: tonic::Request<GetItemRequest>,
    ) -> JoinHandle<Result<tonic::Response<Item>, Status>> {
        tokio::spawn(grpc_call(self.addr, request))
    }
}

async fn grpc_call(
    addr: SocketAddr,
    request: tonic::Request<GetItemRequest>,
) -> Result<tonic::Response<Item>, Status> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("test client could not connect: {e}")))?;
    CatalogClient::new(channel).get_item(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_over_separate_channels_share_one_handler_call() {
    within(async {
        const N: usize = 16;
        let s = start_grpc(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let calls = s.calls(N, "hot");
        s.until_one_call(N).await;
        assert_eq!(s.seen.peers(), N, "every call came on its own connection");
        for item in s.release(calls).await {
            let item = item.expect("every caller gets the shared reply");
            assert_eq!(
                (item.id.as_str(), item.description.as_str()),
                ("hot", "call #0")
            );
        }
        assert_eq!(s.backend.calls(), 1);
        assert_eq!(s.layer.gauges(), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_only_listed_metadata_splits_the_key_and_response_metadata_reaches_everyone() {
    within(async {
        const EACH: usize = 3;
        let tenants = ["acme", "globex"];
        let s = start_grpc(
            CoalesceGrpcLayer::new()
                .method(GET_ITEM)
                .metadata("x-tenant"),
        )
        .await;
        let calls: Vec<_> = (0..2 * EACH)
            .map(|i| {
                let mut request = tonic::Request::new(GetItemRequest {
                    id: "hot".into(),
                    padding: Vec::new(),
                });
                let metadata = request.metadata_mut();
                metadata.insert("x-tenant", tenants[i % 2].parse().unwrap());
                // Not listed: differs per call and must not split the key.
                metadata.insert("x-trace", format!("trace-{i}").parse().unwrap());
                s.call_with(request)
            })
            .collect();
        s.until_state("one call per tenant", (2, 2, 2 * (EACH - 1)))
            .await;
        for (i, response) in s.release(calls).await.into_iter().enumerate() {
            let response = response.expect("reply");
            let call = response.metadata().get("x-call").expect("metadata kept");
            let call = call.to_str().unwrap();
            assert_eq!(
                response.get_ref().description,
                format!("call #{call} for {}", tenants[i % 2]),
                "call {i} got another tenant's answer, or metadata of another call"
            );
        }
        assert_eq!(s.backend.calls(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_different_messages_do_not_share() {
    within(async {
        const IDS: usize = 4;
        const EACH: usize = 3;
        let s = start_grpc(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let calls: Vec<_> = (0..IDS * EACH)
            .map(|i| s.call(&format!("item-{}", i % IDS)))
            .collect();
        s.until_state(
            "one call per message, the rest followers",
            (IDS, IDS, IDS * (EACH - 1)),
        )
        .await;
        let items: Vec<Item> = s
            .release(calls)
            .await
            .into_iter()
            .map(|r| r.expect("reply"))
            .collect();
        for (i, item) in items.iter().enumerate() {
            assert_eq!(
                item.id,
                format!("item-{}", i % IDS),
                "its own message's answer"
            );
        }
        // Each message had its own call, shared by exactly its own callers.
        for id in 0..IDS {
            let answers: HashSet<&str> = items
                .iter()
                .filter(|item| item.id == format!("item-{id}"))
                .map(|item| item.description.as_str())
                .collect();
            assert_eq!(answers.len(), 1, "item-{id}: {answers:?}");
        }
        let all: HashSet<&str> = items.iter().map(|i| i.description.as_str()).collect();
        assert_eq!(all.len(), IDS);
        assert_eq!(s.backend.calls(), IDS);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_a_failed_leader_call_is_not_shared_with_its_followers() {
    within(async {
        const N: usize = 6;
        let s = start_grpc(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let calls = s.calls(N, "flaky");
        s.until_one_call(N).await;
        let results = s.release(calls).await;
        // Only OK is shared: the leader gets its UNAVAILABLE, the followers call for
        // themselves (and succeed) instead of receiving it.
        let errors: Vec<&Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].code(), tonic::Code::Unavailable);
        assert_eq!(errors[0].message(), "the first call fails");
        let answers: HashSet<&str> = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|item| item.description.as_str())
            .collect();
        assert_eq!(answers.len(), N - 1, "each follower made its own call");
        assert_eq!(s.backend.calls(), N);
        assert_eq!(s.layer.gauges(), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_an_error_status_reaches_each_caller_from_its_own_call() {
    within(async {
        const N: usize = 6;
        let s = start_grpc(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let calls = s.calls(N, "missing:42");
        s.until_one_call(N).await;
        let mut messages = HashSet::new();
        for result in s.release(calls).await {
            let status = result.expect_err("the handler fails every call");
            assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
            messages.insert(status.message().to_owned());
        }
        assert_eq!(messages.len(), N, "no error was handed over: {messages:?}");
        assert_eq!(s.backend.calls(), N);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_a_method_not_on_the_allow_list_is_never_coalesced() {
    within(async {
        const N: usize = 6;
        // Another method of the same service is listed; GetItem is not.
        let s = start_grpc(CoalesceGrpcLayer::new().method("/catalog.v1.Catalog/Other")).await;
        let calls = s.calls(N, "hot");
        // Every identical call is in the handler at once, none registered or waiting.
        s.until_state("every call in the handler", (N, 0, 0)).await;
        let answers: HashSet<String> = s
            .release(calls)
            .await
            .into_iter()
            .map(|r| r.expect("reply").description)
            .collect();
        assert_eq!(answers.len(), N);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_a_handler_panic_fails_only_its_caller_and_the_key_coalesces_again() {
    within(async {
        const N: usize = 5;
        let s = start_grpc(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let calls = s.calls(N, "boom");
        s.until_one_call(N).await;
        let results = s.release(calls).await;
        s.backend.close();
        let errors = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(
            errors, 1,
            "only the panicking call's caller fails: {results:?}"
        );
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .all(|item| item.id == "boom"));
        assert_eq!(s.backend.calls(), N, "the followers made their own calls");
        assert_eq!(s.layer.gauges(), (0, 0));

        // The key is usable and coalesces again.
        let calls = s.calls(N, "boom");
        s.until_state("a new burst coalesced", (N + 1, 1, N - 1))
            .await;
        for item in s.release(calls).await {
            assert_eq!(item.expect("reply").description, format!("call #{N}"));
        }
        assert_eq!(s.backend.calls(), N + 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callers_that_go_away_leader_included_do_not_disturb_the_others() {
    within(async {
        const FOLLOWERS: usize = 6;
        let s = start_grpc(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let (leader, mut followers) = s.leader_then_followers(|| s.call("hot"), FOLLOWERS).await;
        // The leader's caller and one follower go away (their channels close).
        leader.abort();
        followers.remove(0).abort();
        s.until_abandoned("the server dropped both calls", 2).await;
        assert_eq!(s.backend.cancelled(), 0, "the handler call goes on");
        for item in s.release(followers).await {
            assert_eq!(item.expect("reply").description, "call #0");
        }
        assert_eq!(s.backend.calls(), 1);
        assert_eq!(s.layer.gauges(), (0, 0));
    })
    .await;
}
