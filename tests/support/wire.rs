//! The HTTP adapter on the wire: an axum app served on 127.0.0.1:0 with `CoalesceHttpLayer`
//! next to the handlers, a backend whose calls are counted and held on a gate, hyper clients
//! (HTTP/1.1 and h2c) and a raw HTTP/1.x client, every wait bounded.

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode, Version};
use axum::{Extension, Router};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::Service;
use tower_coalesce::http::CoalesceHttpLayer;

/// The bound on each single wait: ages for loopback, so running out of it means a hang.
pub const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Bounded waits
// ---------------------------------------------------------------------------------------------

/// Yields until `done(probe())`; fails with the last probed value after [`WAIT`].
pub async fn until<T: Debug>(what: &str, probe: impl Fn() -> T, done: impl Fn(&T) -> bool) {
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

/// `f`, bounded by [`WAIT`].
pub async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("hangs: {what}"))
}

/// Awaits a client task, bounded.
pub async fn join<T: Send + 'static>(task: JoinHandle<T>) -> T {
    bounded("a client task", task).await.expect("client task")
}

pub async fn join_all<T: Send + 'static>(tasks: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(join(task).await);
    }
    out
}

/// The whole test, bounded too.
pub async fn within<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(90), test)
        .await
        .expect("test timed out: something hangs");
}

// ---------------------------------------------------------------------------------------------
// Backend: counted calls held on a gate
// ---------------------------------------------------------------------------------------------

/// Adds one to a counter when dropped, unless disarmed: tells a finished future from one
/// dropped half-way.
pub struct CountIfDropped(Option<Arc<AtomicUsize>>);

impl CountIfDropped {
    pub fn new(counter: &Arc<AtomicUsize>) -> Self {
        CountIfDropped(Some(counter.clone()))
    }

    pub fn disarm(mut self) {
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

/// Waits for `gate` to open; counts in `dropped` if dropped before.
pub async fn pass(gate: &watch::Sender<bool>, dropped: &Arc<AtomicUsize>) {
    let guard = CountIfDropped::new(dropped);
    gate.subscribe()
        .wait_for(|open| *open)
        .await
        .expect("gate sender lives");
    guard.disarm();
}

#[derive(Clone)]
pub struct Backend {
    pub calls: Arc<AtomicUsize>,
    /// Calls dropped while they waited for the gate.
    pub cancelled: Arc<AtomicUsize>,
    pub gate: Arc<watch::Sender<bool>>,
    /// A second gate, for a handler to hold its body half-way.
    pub body_gate: Arc<watch::Sender<bool>>,
    pub body_held: Arc<AtomicUsize>,
    pub body_dropped: Arc<AtomicUsize>,
}

impl Backend {
    pub fn new() -> Backend {
        Backend {
            calls: Arc::default(),
            cancelled: Arc::default(),
            gate: Arc::new(watch::channel(false).0),
            body_gate: Arc::new(watch::channel(false).0),
            body_held: Arc::default(),
            body_dropped: Arc::default(),
        }
    }

    /// Counts the call, waits for the gate, returns the call's number (from 0).
    pub async fn enter(&self) -> usize {
        let n = self.calls.fetch_add(1, SeqCst);
        pass(&self.gate, &self.cancelled).await;
        n
    }

    pub fn open(&self) {
        self.gate.send_replace(true);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    pub fn cancelled(&self) -> usize {
        self.cancelled.load(SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies and handlers
// ---------------------------------------------------------------------------------------------

pub type Frames = Vec<Result<Frame<Bytes>, Infallible>>;

/// A body of `frames`, length unknown.
pub fn streamed(frames: Frames) -> Body {
    Body::new(StreamBody::new(futures::stream::iter(frames)))
}

pub fn data(text: impl Into<Bytes>) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(text.into()))
}

pub fn trailer_frame(fields: &[(&'static str, String)]) -> Result<Frame<Bytes>, Infallible> {
    let mut t = HeaderMap::new();
    for (k, v) in fields {
        t.insert(*k, v.parse().unwrap());
    }
    Ok(Frame::trailers(t))
}

/// `len` bytes tagged at the start with the call that made them.
pub fn tagged(n: usize, len: usize) -> Bytes {
    let mut data = format!("call {n:04} ").into_bytes();
    data.extend((0..len - data.len()).map(|i| b'a' + (i % 26) as u8));
    Bytes::from(data)
}

/// Not gated: for follow-up requests on a connection.
pub async fn plain() -> &'static str {
    "plain"
}

/// Two chunks and a trailer naming the call, announced in `Trailer`.
pub async fn trailers(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header("trailer", "x-checksum")
        .body(streamed(vec![
            data("checked "),
            data(format!("body {n}")),
            trailer_frame(&[("x-checksum", format!("sum-{n}"))]),
        ]))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The observer: request futures the server dropped before they finished
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    abandoned: Arc<AtomicUsize>,
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
        let fut = self.inner.call(req);
        let guard = CountIfDropped::new(&self.abandoned);
        Box::pin(async move {
            let out = fut.await;
            guard.disarm();
            out
        })
    }
}

pub fn observer<S>(
    abandoned: &Arc<AtomicUsize>,
) -> impl tower::Layer<S, Service = Observed<S>> + Clone + Send + Sync + 'static {
    let abandoned = abandoned.clone();
    tower::layer::layer_fn(move |inner| Observed {
        inner,
        abandoned: abandoned.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------------

/// Where a handler finds the upstream server, if there is one.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
}

/// A server behind the app, with a backend of its own; aborted when dropped.
pub struct UpstreamServer {
    pub addr: SocketAddr,
    pub backend: Backend,
    pub task: JoinHandle<()>,
}

impl Drop for UpstreamServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct HttpServer {
    pub addr: SocketAddr,
    pub backend: Backend,
    pub layer: CoalesceHttpLayer,
    /// Request futures the server dropped before they finished.
    pub abandoned: Arc<AtomicUsize>,
    pub upstream: Option<UpstreamServer>,
    pub task: JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `axum::serve` on 127.0.0.1:0: the router's handlers become routes, and its layers are
/// applied again, per connection. `Cache-Status` is on, so clients can tell who was what. The
/// handlers find the backend (and the upstream) as extensions; the observer outside the layer
/// counts the request futures the server dropped.
pub async fn serve(
    routes: Router,
    layer: CoalesceHttpLayer,
    upstream: Option<UpstreamServer>,
) -> HttpServer {
    let layer = layer.cache_status_header(true);
    let backend = Backend::new();
    let abandoned = Arc::new(AtomicUsize::new(0));
    let up = Upstream {
        addr: upstream
            .as_ref()
            .map_or(([127, 0, 0, 1], 9).into(), |u| u.addr),
    };
    let app = routes
        .layer(layer.clone())
        .layer(observer(&abandoned))
        .layer(Extension(backend.clone()))
        .layer(Extension(up));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    HttpServer {
        addr,
        backend,
        layer,
        abandoned,
        upstream,
        task,
    }
}

impl HttpServer {
    /// Calls made by the handler, or by the upstream when there is one.
    pub fn calls(&self) -> usize {
        match &self.upstream {
            Some(up) => up.backend.calls(),
            None => self.backend.calls(),
        }
    }

    /// Opens the backend's gate, and the upstream's.
    pub fn open(&self) {
        self.backend.open();
        if let Some(up) = &self.upstream {
            up.backend.open();
        }
    }

    /// (calls, keys in flight, followers waiting).
    pub fn state(&self) -> (usize, usize, usize) {
        (self.calls(), self.layer.in_flight(), self.layer.waiting())
    }

    pub async fn until_state(&self, what: &str, want: (usize, usize, usize)) {
        until(what, || self.state(), |s| *s == want).await;
    }

    /// Until `total` requests are each in a call or parked as followers.
    pub async fn until_settled(&self, total: usize) {
        until(
            "every request in a call or parked",
            || self.state(),
            |&(calls, _, waiting)| calls + waiting == total,
        )
        .await;
    }

    pub async fn until_abandoned(&self, n: usize) {
        until(
            "the server dropped the gone clients' requests",
            || self.abandoned.load(SeqCst),
            |&a| a == n,
        )
        .await;
    }

    /// Registry gauges once the load is gone: nothing in flight, nobody waiting.
    pub async fn until_empty(&self) {
        until(
            "the registry empty",
            || {
                (
                    self.layer.in_flight(),
                    self.layer.waiting(),
                    self.layer.stats().in_flight,
                )
            },
            |&g| g == (0, 0, 0),
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// hyper clients
// ---------------------------------------------------------------------------------------------

pub type Sender1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
pub type Sender2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// Aborts the connection task when dropped: dropping the client closes its connection.
pub struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn drive(conn: impl Future + Send + 'static) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }))
}

pub async fn h1(addr: SocketAddr) -> (Sender1, AbortOnDrop) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    (tx, drive(conn))
}

pub async fn h2(addr: SocketAddr) -> (Sender2, AbortOnDrop) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    (tx, drive(conn))
}

/// An HTTP/1.1 GET: origin-form target, `Host` header.
pub fn get1(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(path).header("host", addr.to_string());
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::default()).unwrap()
}

/// An HTTP/2 request: scheme and authority in the URI (`:scheme`, `:authority`).
pub fn req2(
    method: &str,
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::default()).unwrap()
}

/// An HTTP/2 GET.
pub fn get2(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    req2("GET", addr, path, extra)
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }

    pub fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }
}

pub async fn read_reply(res: Response<Incoming>) -> Reply {
    let (parts, body) = res.into_parts();
    let collected = bounded("a response body", body.collect())
        .await
        .expect("whole body");
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    }
}

/// One GET on an HTTP/1.1 connection of its own, from a task of its own.
pub fn spawn_h1(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> JoinHandle<Reply> {
    let req = get1(addr, path, extra);
    tokio::spawn(async move {
        let (mut tx, _conn) = h1(addr).await;
        read_reply(tx.send_request(req).await.expect("response")).await
    })
}

/// One GET as a new stream of the h2 connection `tx`.
pub fn spawn_h2(tx: &Sender2, req: Request<Full<Bytes>>) -> JoinHandle<Reply> {
    let mut tx = tx.clone();
    tokio::spawn(async move { read_reply(tx.send_request(req).await.expect("response")).await })
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.x client
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Head {
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    pub fn cache_status(&self) -> &str {
        self.get("cache-status").unwrap_or("")
    }

    pub fn follower(&self) -> bool {
        self.cache_status().ends_with("; collapsed")
    }
}

/// How a body was framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length,
    Chunked,
    Close,
}

/// A response read by [`Raw::response`].
#[derive(Debug)]
pub struct RawReply {
    pub head: Head,
    pub body: Vec<u8>,
    /// Trailer fields of a chunked body.
    pub trailers: Vec<(String, String)>,
    pub framing: Framing,
}

impl RawReply {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Never both framings at once, and a `Content-Length` that matches the body.
    #[track_caller]
    pub fn assert_framed_once(&self) {
        assert!(
            !(self.head.chunked() && self.head.has("content-length")),
            "two framings: {:?}",
            self.head
        );
        assert!(
            self.head.all("content-length").len() <= 1,
            "{:?}",
            self.head
        );
        if self.framing == Framing::Length {
            assert_eq!(
                self.head.get("content-length"),
                Some(self.body.len().to_string().as_str())
            );
        }
    }
}

pub fn request_text(
    method: &str,
    version: &str,
    addr: SocketAddr,
    path: &str,
    extra: &[&str],
) -> String {
    let mut text = format!("{method} {path} {version}\r\nhost: {addr}\r\n");
    for line in extra {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text
}

pub struct Raw {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).await.unwrap();
    }

    /// Reads more bytes; returns how many (0 at EOF or on a reset).
    pub async fn more(&mut self) -> usize {
        let mut chunk = vec![0; 64 * 1024];
        let n = bounded("reading from the socket", self.stream.read(&mut chunk))
            .await
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    pub async fn line(&mut self) -> String {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf[..at].to_vec()).unwrap();
                self.buf.drain(..at + 2);
                return line;
            }
            assert!(
                self.more().await > 0,
                "EOF in the middle of a line (read so far: {:?})",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    pub async fn fields(&mut self) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                return fields;
            }
            let (k, v) = line.split_once(':').expect("a field line");
            fields.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }

    pub async fn head(&mut self) -> Head {
        let status_line = self.line().await;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap().to_owned();
        let status = parts.next().unwrap().parse().unwrap();
        Head {
            version,
            status,
            headers: self.fields().await,
        }
    }

    pub async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.more().await > 0, "EOF before {n} bytes");
        }
        self.buf.drain(..n).collect()
    }

    /// One chunk of a chunked body; `None` at the last chunk (the trailer section follows).
    pub async fn chunk(&mut self) -> Option<Vec<u8>> {
        let size_line = self.line().await;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            return None;
        }
        let data = self.exact(size).await;
        assert_eq!(self.exact(2).await, b"\r\n", "CRLF after a chunk");
        Some(data)
    }

    pub async fn chunked(&mut self) -> (Vec<u8>, Vec<(String, String)>) {
        let mut body = Vec::new();
        while let Some(data) = self.chunk().await {
            body.extend(data);
        }
        (body, self.fields().await)
    }

    pub async fn read_to_eof(&mut self) -> Vec<u8> {
        while self.more().await > 0 {}
        std::mem::take(&mut self.buf)
    }

    /// A whole response to a request with `method`, framed as its head says.
    pub async fn response(&mut self, method: &str) -> RawReply {
        let head = self.head().await;
        let (body, trailers, framing) =
            if method == "HEAD" || head.status == 204 || head.status == 304 {
                (Vec::new(), Vec::new(), Framing::None)
            } else if head.chunked() {
                let (body, trailers) = self.chunked().await;
                (body, trailers, Framing::Chunked)
            } else if let Some(len) = head.get("content-length") {
                let body = self.exact(len.parse().unwrap()).await;
                (body, Vec::new(), Framing::Length)
            } else {
                (self.read_to_eof().await, Vec::new(), Framing::Close)
            };
        RawReply {
            head,
            body,
            trailers,
            framing,
        }
    }

    /// Whether the server closed the connection (nothing more to read). Only call it when
    /// either EOF or more bytes are due, as it waits for one of them.
    pub async fn closed(&mut self) -> bool {
        self.buf.is_empty() && self.more().await == 0
    }

    /// An HTTP/1.1 request with no extra fields on this (kept-alive) connection, and its whole
    /// response.
    pub async fn exchange(&mut self, method: &str, path: &str, addr: SocketAddr) -> RawReply {
        self.exchange_with(method, "HTTP/1.1", path, addr, &[])
            .await
    }

    /// A follow-up request on this connection and its whole response.
    pub async fn exchange_with(
        &mut self,
        method: &str,
        version: &str,
        path: &str,
        addr: SocketAddr,
        extra: &[&str],
    ) -> RawReply {
        self.send(&request_text(method, version, addr, path, extra))
            .await;
        self.response(method).await
    }

    /// The connection serves another (plain) request, in sync.
    pub async fn assert_in_sync(&mut self, version: &str, addr: SocketAddr, extra: &[&str]) {
        let next = self
            .exchange_with("GET", version, "/plain", addr, extra)
            .await;
        assert_eq!((next.head.status, next.text()), (200, "plain"), "{next:?}");
    }
}

/// A raw client on its own connection that sends `text` and reads the response, from a task
/// of its own; returns the connection too, for follow-up requests.
pub fn spawn_raw(
    addr: SocketAddr,
    text: String,
    method: &'static str,
) -> JoinHandle<(RawReply, Raw)> {
    tokio::spawn(async move {
        let mut raw = Raw::connect(addr).await;
        raw.send(&text).await;
        let reply = raw.response(method).await;
        (reply, raw)
    })
}
