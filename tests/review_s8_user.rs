//! Review session 8, as a first-time user: programs that use the crate the way an axum or tonic
//! service would, written from the README, the rustdoc and the examples only.
//!
//! Synchronisation: handlers wait on a `watch` gate; the tests open it once the layer's own
//! gauges (`CoalesceHttpLayer::waiting`, `Stats::followers`) say every request has joined.
//! Tests over real sockets use real time and never assert durations; the others run on
//! tokio's paused clock.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::error::Error as _;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, VARY};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tower::timeout::error::Elapsed;
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};
use tower_coalesce::{
    CoalesceError, CoalesceLayer, Group, GroupBuilder, OnTimeout, Panicked, ServiceBuilderExt,
    Stats,
};
use tower_http::catch_panic::CatchPanicLayer;

// ---------------------------------------------------------------------------------------------
// Harness: a gated backend, a real server, a real client.
// ---------------------------------------------------------------------------------------------

/// Long enough never to fire on a healthy run: it only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(out) => out,
        Err(_) => panic!("hung waiting for {what}"),
    }
}

/// Waits for a condition on the layer's own gauges (no sleeping: it yields to the runtime).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// The slow thing behind the handlers: counts calls, reports entries, waits for a gate.
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    max_active: Arc<AtomicUsize>,
    entered: mpsc::UnboundedSender<String>,
    gate: watch::Receiver<bool>,
}

struct Controls {
    entered: mpsc::UnboundedReceiver<String>,
    open: watch::Sender<bool>,
}

impl Controls {
    async fn next_entry(&mut self) -> String {
        within("a handler call", self.entered.recv())
            .await
            .expect("backend alive")
    }

    fn open_gate(&self) {
        self.open.send_replace(true);
    }
}

fn backend() -> (Backend, Controls) {
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let (open, gate) = watch::channel(false);
    let backend = Backend {
        calls: Arc::default(),
        active: Arc::default(),
        max_active: Arc::default(),
        entered: entered_tx,
        gate,
    };
    (backend, Controls { entered, open })
}

impl Backend {
    /// One backend call: counted, announced, then held until the gate opens. Returns its
    /// number, from 0.
    async fn call(&self, what: impl Into<String>) -> usize {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let active = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(active, Ordering::SeqCst);
        // Counted out when the call ends or is cancelled (a `Timeout` drops it).
        let _active = Active(&self.active);
        let _ = self.entered.send(what.into());
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open).await.expect("gate kept");
        n
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An axum app served on 127.0.0.1:0; aborted when dropped.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(app: Router) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server { addr, task }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    /// The headers a client compares: without the per-response ones (`Date`, and what says
    /// how the response was served).
    fn content_headers(&self) -> Vec<(String, String)> {
        let mut out: Vec<_> = self
            .headers
            .iter()
            .filter(|(name, _)| !["date", "cache-status", "x-served-by"].contains(&name.as_str()))
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        out.sort();
        out
    }
}

fn request(method: Method, addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap()
}

/// Sends `req` on its own task, as an independent client would.
fn send(client: &HttpClient, req: Request<Empty<Bytes>>) -> JoinHandle<Reply> {
    let client = client.clone();
    tokio::spawn(async move {
        let res = client.request(req).await.expect("request");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    })
}

async fn join_all(tasks: Vec<JoinHandle<Reply>>) -> Vec<Reply> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(within("a reply", task).await.expect("client task"));
    }
    out
}

/// What a user would write to see `ServedBy` in logs or on the wire: an outer
/// `map_response` copying the extension into a header.
async fn export_served_by(mut res: axum::response::Response) -> axum::response::Response {
    if let Some(by) = res.extensions().get::<ServedBy>().copied() {
        res.headers_mut()
            .insert("x-served-by", HeaderValue::from_static(by.as_str()));
    }
    res
}

fn count<'a>(replies: &'a [Reply], header: &str) -> std::collections::BTreeMap<&'a str, usize> {
    let mut tally = std::collections::BTreeMap::new();
    for r in replies {
        *tally.entry(r.header(header)).or_default() += 1;
    }
    tally
}

/// Every request counted once (the `Stats` docs): leaders (minus retries), followers,
/// lingering hits, bypasses and calls over capacity.
fn requests_counted(s: &Stats) -> u64 {
    s.leaders - s.retried + s.followers + s.lingered + s.bypassed + s.over_capacity
}

// ---------------------------------------------------------------------------------------------
// CoalesceHttpLayer on an axum Router.
// ---------------------------------------------------------------------------------------------

async fn report(State(backend): State<Backend>, uri: Uri) -> impl IntoResponse {
    let n = backend.call(uri.to_string()).await;
    (
        [(CACHE_CONTROL, "public, max-age=5")],
        format!("report #{n} for {}", uri.query().unwrap_or("all")),
    )
}

async fn item(State(backend): State<Backend>, Path(id): Path<u32>) -> String {
    let n = backend.call(format!("item {id}")).await;
    format!("item {id} (call #{n})")
}

async fn write_report(State(backend): State<Backend>) -> &'static str {
    backend.calls.fetch_add(1, Ordering::SeqCst);
    "written"
}

/// README "HTTP": the layer on a `Router` with state and several routes, served for real.
/// One burst of identical GETs makes one handler call; every client gets the same status,
/// body and headers; `ServedBy` and `Cache-Status` say who led. A request after the burst
/// starts a new call (coalescing is not caching).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_router_layer_one_handler_call_per_burst() {
    const N: usize = 16;
    let (backend, mut controls) = backend();
    let coalesce = CoalesceHttpLayer::new().cache_status_header(true);
    let app = Router::new()
        .route("/report", get(report))
        .route("/items/{id}", get(item))
        .route("/health", get(|| async { "ok" }))
        .with_state(backend.clone())
        .layer(coalesce.clone())
        .layer(axum::middleware::map_response(export_served_by));
    let server = serve(app).await;
    let client = client();

    let mut tasks = vec![send(
        &client,
        request(Method::GET, server.addr, "/report?year=2024"),
    )];
    assert_eq!(controls.next_entry().await, "/report?year=2024");
    for _ in 1..N {
        tasks.push(send(
            &client,
            request(Method::GET, server.addr, "/report?year=2024"),
        ));
    }
    // Another key, and a route that is not slow, in the same burst.
    let health = send(&client, request(Method::GET, server.addr, "/health"));
    wait_until("the followers to join", || coalesce.waiting() == N - 1).await;
    assert_eq!(coalesce.in_flight(), 1);
    let health = within("/health", health).await.unwrap();
    assert_eq!(
        (health.status, &health.body[..]),
        (StatusCode::OK, &b"ok"[..])
    );
    controls.open_gate();
    let replies = join_all(tasks).await;

    assert_eq!(backend.calls(), 1, "one handler call for the burst");
    let first = &replies[0];
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(&first.body[..], b"report #0 for year=2024");
    for r in &replies {
        assert_eq!(r.status, first.status);
        assert_eq!(r.body, first.body);
        assert_eq!(r.content_headers(), first.content_headers());
    }
    assert_eq!(first.header("cache-control"), "public, max-age=5");
    let by = count(&replies, "x-served-by");
    assert_eq!(by.get("leader"), Some(&1), "{by:?}");
    assert_eq!(by.get("follower"), Some(&(N - 1)), "{by:?}");
    let status = count(&replies, "cache-status");
    assert_eq!(
        status.get("tower-coalesce; fwd=miss"),
        Some(&1),
        "{status:?}"
    );
    assert_eq!(
        status.get("tower-coalesce; fwd=miss; collapsed"),
        Some(&(N - 1)),
        "{status:?}"
    );
    assert_eq!(replies[0].header("x-served-by"), "leader");

    // After the burst: a new call, even for the same key within its max-age.
    let again = within(
        "a later request",
        send(
            &client,
            request(Method::GET, server.addr, "/report?year=2024"),
        ),
    )
    .await
    .unwrap();
    assert_eq!(&again.body[..], b"report #1 for year=2024");
    assert_eq!(again.header("x-served-by"), "leader");
    assert_eq!(backend.calls(), 2);

    let stats = coalesce.stats();
    assert_eq!(stats.leaders, 3, "{stats:?}"); // the burst, /health, the later request
    assert_eq!(stats.followers, (N - 1) as u64, "{stats:?}");
    assert_eq!(requests_counted(&stats), (N + 2) as u64, "{stats:?}");
    assert_eq!((coalesce.in_flight(), coalesce.waiting()), (0, 0));
}

/// `route_layer`: one layer value applied per route shares one registry; the path keeps the
/// routes apart. A `POST` bypasses, and invalidates its URI: a `GET` after it starts a new
/// call instead of joining the one that began before the write (README, security rule 4).
/// The fallback (404) is not wrapped by `route_layer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_route_layer_shares_one_registry_and_keeps_paths_apart() {
    let (backend, mut controls) = backend();
    let coalesce = CoalesceHttpLayer::new().cache_status_header(true);
    let app = Router::new()
        .route("/a", get(report).post(write_report))
        .route("/b", get(report))
        .route("/items/{id}", get(item))
        .route_layer(coalesce.clone())
        .with_state(backend.clone())
        .layer(axum::middleware::map_response(export_served_by));
    let server = serve(app).await;
    let client = client();
    let get = |path: &str| send(&client, request(Method::GET, server.addr, path));

    let mut tasks = Vec::new();
    for path in ["/a", "/b", "/items/1", "/items/2"] {
        tasks.push(get(path));
        controls.next_entry().await;
    }
    for path in ["/a", "/b", "/items/1", "/items/2"] {
        for _ in 0..3 {
            tasks.push(get(path));
        }
    }
    wait_until("12 followers", || coalesce.waiting() == 12).await;
    assert_eq!(coalesce.in_flight(), 4);
    assert_eq!(backend.calls(), 4);

    // A write to /a, answered at once, while the GET /a flight is held.
    let post = within(
        "POST /a",
        send(&client, request(Method::POST, server.addr, "/a")),
    )
    .await
    .unwrap();
    assert_eq!(&post.body[..], b"written");
    assert_eq!(post.header("x-served-by"), "bypass");
    assert_eq!(
        post.header("cache-status"),
        "tower-coalesce; fwd=method; detail=method"
    );
    // A read after the write does not join the read that began before it.
    let after_write = get("/a");
    assert_eq!(controls.next_entry().await, "/a");

    let missing = within("GET /nope", get("/nope")).await.unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        missing.header("cache-status"),
        "",
        "fallback is not layered"
    );

    controls.open_gate();
    let replies = join_all(tasks).await;
    let after_write = within("GET /a after the write", after_write).await.unwrap();
    // 4 flights + the POST + the GET after the write.
    assert_eq!(backend.calls(), 6);
    for (i, path) in ["/a", "/b", "/items/1", "/items/2"].iter().enumerate() {
        let leader = &replies[i];
        let followers = &replies[4 + 3 * i..4 + 3 * i + 3];
        assert_eq!(leader.header("x-served-by"), "leader", "{path}");
        for f in followers {
            assert_eq!(f.body, leader.body, "{path}");
            assert_eq!(f.header("x-served-by"), "follower", "{path}");
        }
    }
    assert_eq!(&replies[2].body[..], b"item 1 (call #2)");
    assert_eq!(after_write.header("x-served-by"), "leader");
    assert_ne!(after_write.body, replies[0].body);
    let stats = coalesce.stats();
    assert_eq!((stats.leaders, stats.followers, stats.bypassed), (5, 12, 1));
    assert_eq!(requests_counted(&stats), 18);
}

/// A response that names a request header in `Vary` is shared only with followers that
/// agree on it; the others are released (`fwd=vary-miss`) and call for themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_vary_releases_followers_that_differ() {
    async fn localized(State(backend): State<Backend>, headers: HeaderMap) -> impl IntoResponse {
        let tenant = headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        backend.call(tenant.clone()).await;
        ([(VARY, "x-tenant")], format!("page for {tenant}"))
    }
    let (backend, mut controls) = backend();
    let coalesce = CoalesceHttpLayer::new().cache_status_header(true);
    let app = Router::new()
        .route("/page", get(localized))
        .with_state(backend.clone())
        .layer(coalesce.clone());
    let server = serve(app).await;
    let client = client();
    let req = |tenant: &str| {
        let mut r = request(Method::GET, server.addr, "/page");
        r.headers_mut()
            .insert("x-tenant", HeaderValue::from_str(tenant).unwrap());
        send(&client, r)
    };
    let mut tasks = vec![req("acme")];
    assert_eq!(controls.next_entry().await, "acme");
    tasks.push(req("acme"));
    tasks.push(req("globex"));
    wait_until("2 followers", || coalesce.waiting() == 2).await;
    controls.open_gate();
    let replies = join_all(tasks).await;
    assert_eq!(&replies[1].body[..], b"page for acme");
    assert_eq!(&replies[2].body[..], b"page for globex");
    assert_eq!(
        replies[1].header("cache-status"),
        "tower-coalesce; fwd=miss; collapsed"
    );
    assert_eq!(
        replies[2].header("cache-status"),
        "tower-coalesce; fwd=vary-miss; collapsed=?0; detail=vary"
    );
    assert_eq!(backend.calls(), 2);
    assert_eq!(coalesce.stats().released, 1);
}

/// README "security rules" 6 / module docs "Errors and panics": the leader's panic reaches
/// `CatchPanicLayer` outside (a 500), the followers make their own calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_http_layer_panic_reaches_catch_panic_and_followers_call_again() {
    async fn fragile(State(backend): State<Backend>) -> String {
        let n = backend.call("fragile").await;
        if n == 0 {
            panic!("first call fails");
        }
        format!("call #{n}")
    }
    let (backend, mut controls) = backend();
    let coalesce = CoalesceHttpLayer::new().cache_status_header(true);
    let app = Router::new()
        .route("/fragile", get(fragile))
        .with_state(backend.clone())
        .layer(coalesce.clone())
        .layer(CatchPanicLayer::new())
        .layer(axum::middleware::map_response(export_served_by));
    let server = serve(app).await;
    let client = client();
    let mut tasks = vec![send(&client, request(Method::GET, server.addr, "/fragile"))];
    controls.next_entry().await;
    for _ in 0..3 {
        tasks.push(send(&client, request(Method::GET, server.addr, "/fragile")));
    }
    wait_until("3 followers", || coalesce.waiting() == 3).await;
    controls.open_gate();
    let replies = join_all(tasks).await;
    assert_eq!(replies[0].status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(replies[0].header("x-served-by"), "", "CatchPanic made it");
    for r in &replies[1..] {
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-served-by"), "released");
        assert_eq!(
            r.header("cache-status"),
            "tower-coalesce; fwd=miss; collapsed=?0; detail=panic"
        );
    }
    assert_eq!(
        backend.calls(),
        4,
        "each released follower calls for itself"
    );
    let stats = coalesce.stats();
    assert_eq!((stats.panics, stats.released), (1, 3), "{stats:?}");
    assert_eq!(stats.fell_through, 3);
}

// ---------------------------------------------------------------------------------------------
// The generic CoalesceLayer on an axum handler, with HandleErrorLayer and friends.
// ---------------------------------------------------------------------------------------------

/// An axum `Response` is not `Clone`, so the generic layer needs the response buffered into
/// something that is, below it, and turned back into a response above it.
#[derive(Clone, Debug)]
struct Buffered {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Buffered {
    async fn read(res: Response<Body>) -> Result<Buffered, BoxError> {
        let (parts, body) = res.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Buffered {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

impl IntoResponse for Buffered {
    fn into_response(self) -> axum::response::Response {
        (self.status, self.headers, self.body).into_response()
    }
}

/// The key: method GET only, path and query.
fn path_and_query(req: &Request<Body>) -> Option<String> {
    (req.method() == Method::GET).then(|| {
        req.uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned()
    })
}

async fn coalesce_error_to_response(err: CoalesceError) -> (StatusCode, String) {
    if err.is_panic() {
        let msg = err.panic_message().unwrap_or_default();
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("panicked: {msg}"),
        )
    } else if err.downcast_ref::<Elapsed>().is_some() {
        (StatusCode::GATEWAY_TIMEOUT, "backend timed out".to_owned())
    } else if err.is_timeout() {
        (StatusCode::SERVICE_UNAVAILABLE, err.to_string())
    } else {
        (StatusCode::BAD_GATEWAY, err.to_string())
    }
}

async fn slow_report(State(backend): State<Backend>, uri: Uri) -> String {
    let query = uri.query().unwrap_or("").to_owned();
    let n = backend.call(uri.to_string()).await;
    if query.contains("panic") {
        panic!("report generator crashed");
    }
    format!("report #{n} ({query})")
}

/// The stack README "With other tower layers" describes, for one route: CatchPanic and
/// HandleError outside, coalescing, then Timeout and ConcurrencyLimit below it (they count
/// calls), then the buffering the generic layer needs.
fn coalesced_route(backend: Backend, layer: ReportLayer, timeout: Duration) -> Router {
    use axum::handler::Handler;
    let svc = ServiceBuilder::new()
        .layer(CatchPanicLayer::new())
        .layer(HandleErrorLayer::new(coalesce_error_to_response))
        .map_response(<Buffered as IntoResponse>::into_response)
        .layer(layer)
        .timeout(timeout)
        .concurrency_limit(1)
        .and_then(Buffered::read)
        .service(slow_report.with_state(backend));
    Router::new().route_service("/report", svc)
}

/// To hand a `CoalesceLayer` to a function its extractor's type must be named: a closure's
/// cannot be, so a `fn` pointer it is.
type ReportLayer = CoalesceLayer<KeyFn, String>;
type KeyFn = fn(&Request<Body>) -> Option<String>;

fn core_layer() -> ReportLayer {
    CoalesceLayer::new(path_and_query as KeyFn)
}

/// Over a real socket: one handler call per burst through the generic layer; a panic below
/// it is an error for every waiter (`is_panic`, mapped by `HandleErrorLayer`), while a
/// bypassed request's panic (no key) goes up to `CatchPanicLayer`, as without the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_layer_under_handle_error_in_axum() {
    let (backend, mut controls) = backend();
    let layer = core_layer();
    let app = coalesced_route(backend.clone(), layer.clone(), PATIENCE * 2);
    let server = serve(app).await;
    let client = client();
    let get = |path: &str| send(&client, request(Method::GET, server.addr, path));

    let mut ok = vec![get("/report?q=sales")];
    controls.next_entry().await;
    for _ in 0..4 {
        ok.push(get("/report?q=sales"));
    }
    wait_until("4 followers", || layer.stats().followers == 4).await;
    controls.open_gate();
    let ok = join_all(ok).await;
    for r in &ok {
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], b"report #0 (q=sales)");
        assert_eq!(r.content_headers(), ok[0].content_headers());
    }
    assert_eq!(backend.calls(), 1);

    // A panicking call, gate open: 3 waiters share it only if they are there in time, so
    // hold it: close the gate again.
    controls.open.send_replace(false);
    let mut boom = vec![get("/report?panic")];
    controls.next_entry().await;
    for _ in 0..2 {
        boom.push(get("/report?panic"));
    }
    wait_until("2 more followers", || layer.stats().followers == 6).await;
    controls.open_gate();
    for r in join_all(boom).await {
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(&r.body[..], b"panicked: report generator crashed");
    }
    assert_eq!(backend.calls(), 2);
    assert_eq!(layer.stats().panics, 1);

    // No key (not a GET): straight through, and the panic is CatchPanicLayer's.
    let post = within(
        "POST",
        send(&client, request(Method::POST, server.addr, "/report?panic")),
    )
    .await
    .unwrap();
    assert_eq!(post.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_ne!(&post.body[..], b"panicked: report generator crashed");
    let stats = layer.stats();
    assert_eq!((stats.bypassed, stats.panics), (1, 1), "{stats:?}");
    assert_eq!(requests_counted(&stats), 9);
}

/// Paused clock, no sockets (`Router::oneshot`): `ConcurrencyLimit(1)` below the layer limits
/// calls, not waiters (README guarantee 6); a `Timeout` below it fails the whole flight and
/// every waiter gets that `Elapsed` back through `downcast_ref`.
#[tokio::test(start_paused = true)]
async fn core_layer_timeout_and_concurrency_limit_below_count_calls() {
    let (backend, mut controls) = backend();
    let layer = core_layer();
    let app = coalesced_route(backend.clone(), layer.clone(), Duration::from_secs(10));
    let mut tasks = Vec::new();
    for id in [1, 2] {
        for _ in 0..3 {
            let req = Request::get(format!("/report?id={id}"))
                .body(Body::empty())
                .unwrap();
            tasks.push(tokio::spawn(app.clone().oneshot(req)));
        }
    }
    wait_until("4 followers", || layer.stats().followers == 4).await;
    assert_eq!(layer.in_flight(), 2);
    assert_eq!(controls.next_entry().await, "/report?id=1");
    // The gate stays shut: both calls time out, one after the other.
    let mut statuses = Vec::new();
    for task in tasks {
        let res = within("a response", task).await.unwrap().unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"backend timed out");
        statuses.push(status);
    }
    assert!(statuses.iter().all(|s| *s == StatusCode::GATEWAY_TIMEOUT));
    assert_eq!(controls.next_entry().await, "/report?id=2");
    assert_eq!(backend.calls(), 2);
    assert_eq!(backend.max_active.load(Ordering::SeqCst), 1);
    let stats = layer.stats();
    assert_eq!(
        (stats.leaders, stats.followers, stats.errors),
        (2, 4, 2),
        "{stats:?}"
    );
    drop(controls);
}

// ---------------------------------------------------------------------------------------------
// Group as a cache-fill helper inside a handler.
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Profiles {
    group: Group<String>,
    backend: Backend,
}

async fn fetch_profile(backend: Backend, id: String) -> String {
    let n = backend.call(format!("profile {id}")).await;
    format!("profile of {id} (fetch #{n})")
}

async fn profile(
    State(state): State<Profiles>,
    Path(id): Path<String>,
) -> Result<String, (StatusCode, String)> {
    let backend = state.backend.clone();
    state
        .group
        .run(id.clone(), || fetch_profile(backend, id))
        .await
        .map_err(|panicked| (StatusCode::INTERNAL_SERVER_ERROR, panicked.to_string()))
}

/// `group.run(key, || fetch(key))` inside an axum handler, with `linger`: a burst makes one
/// fetch, a request after it is served the lingering value, `forget` drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_as_cache_fill_in_axum_handler_with_linger() {
    let (backend, mut controls) = backend();
    let group: Group<String> = GroupBuilder::new()
        .linger(Duration::from_secs(3600))
        .build();
    let state = Profiles {
        group: group.clone(),
        backend: backend.clone(),
    };
    let app = Router::new()
        .route("/users/{id}", get(profile))
        .with_state(state);
    let server = serve(app).await;
    let client = client();
    let get = |path: &str| send(&client, request(Method::GET, server.addr, path));

    let mut tasks = vec![get("/users/7")];
    controls.next_entry().await;
    for _ in 0..5 {
        tasks.push(get("/users/7"));
    }
    wait_until("5 followers", || group.stats().followers == 5).await;
    controls.open_gate();
    for r in join_all(tasks).await {
        assert_eq!(&r.body[..], b"profile of 7 (fetch #0)");
    }
    // Within the window: served with no fetch.
    let later = within("a later request", get("/users/7")).await.unwrap();
    assert_eq!(&later.body[..], b"profile of 7 (fetch #0)");
    assert_eq!(backend.calls(), 1);
    let stats = group.stats();
    assert_eq!(
        (stats.leaders, stats.followers, stats.lingered),
        (1, 5, 1),
        "{stats:?}"
    );
    assert_eq!(
        (group.in_flight(), group.len()),
        (0, 1),
        "one lingering entry"
    );
    // `forget` takes a `&str` for a `Group<String>`.
    assert!(group.forget("7"));
    let fresh = within("after forget", get("/users/7")).await.unwrap();
    assert_eq!(&fresh.body[..], b"profile of 7 (fetch #1)");
    assert_eq!(group.stats().forgotten, 1);
}

/// `GroupBuilder::linger`: "served while less than `window` has passed since the flight
/// finished; at `window` it is gone"; expired entries stay in `len()` until purged.
#[tokio::test(start_paused = true)]
async fn group_linger_window_is_exact_and_purge_expired_empties() {
    let window = Duration::from_secs(10);
    let group: Group<&str> = GroupBuilder::new().linger(window).build();
    let calls = Arc::new(AtomicUsize::new(0));
    let fetch = || {
        let calls = calls.clone();
        async move { calls.fetch_add(1, Ordering::SeqCst) }
    };
    assert_eq!(group.run("k", fetch).await.unwrap(), 0);
    tokio::time::advance(window - Duration::from_millis(1)).await;
    let hit = group.run("k", fetch);
    assert!(!hit.is_leader() && hit.is_shared(), "a lingering hit");
    assert_eq!(hit.await.unwrap(), 0);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(group.len(), 1, "expired, not yet purged");
    group.purge_expired();
    assert!(group.is_empty());
    assert_eq!(
        group.run("k", fetch).await.unwrap(),
        1,
        "at `window` it is gone"
    );
    assert_eq!(group.stats().lingered, 1);
}

// ---------------------------------------------------------------------------------------------
// Errors as a user sees them.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct NotFound(u32);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "user {} not found", self.0)
    }
}

impl std::error::Error for NotFound {}

fn crash(msg: &'static str) -> Result<String, Infallible> {
    panic!("{msg}")
}

/// `CoalesceError` for an inner error, a panic, a follower wait limit and a `Timeout`
/// below: `Display`, `source()`, `downcast_ref`, `is_panic`, `is_timeout`, `Debug`; every
/// waiter of a flight gets the same one.
#[tokio::test(start_paused = true)]
async fn coalesce_error_as_a_user_sees_it() {
    // Inner error, shared by leader and follower.
    let mut svc =
        CoalesceLayer::new(|id: &u32| Some(*id)).layer(service_fn(|id: u32| async move {
            tokio::task::yield_now().await;
            Err::<String, _>(NotFound(id))
        }));
    let (a, b) = tokio::join!(svc.call(7), svc.call(7));
    for err in [a.unwrap_err(), b.unwrap_err()] {
        assert_eq!(err.to_string(), "inner service failed: user 7 not found");
        assert_eq!(err.downcast_ref::<NotFound>().unwrap().0, 7);
        assert!(err.source().unwrap().downcast_ref::<NotFound>().is_some());
        assert!(!err.is_panic() && !err.is_timeout());
        assert_eq!(err.panic_message(), None);
        assert_eq!(format!("{err:?}"), "CoalesceError::Inner(NotFound(7))");
        // Into a BoxError (for `?` in a handler returning one), and back.
        let boxed: BoxError = err.clone().into();
        assert!(boxed.downcast_ref::<CoalesceError>().is_some());
    }
    assert_eq!(svc.stats().errors, 1);

    // A panic.
    let svc = CoalesceLayer::new(|id: &u32| Some(*id))
        .layer(service_fn(|_: u32| async { crash("db driver bug") }));
    let err = svc.oneshot(1).await.unwrap_err();
    assert!(err.is_panic());
    assert_eq!(err.panic_message(), Some("db driver bug"));
    assert_eq!(err.to_string(), "coalesced call panicked: db driver bug");
    assert!(err.get_ref().is_none());
    let panicked = err.source().unwrap().downcast_ref::<Panicked>().unwrap();
    assert_eq!(panicked.message(), "db driver bug");

    // A follower wait limit with `OnTimeout::Error`.
    let (open, gate) = watch::channel(false);
    let mut svc = CoalesceLayer::new(|id: &u32| Some(*id))
        .follower_timeout(Duration::from_secs(2))
        .on_follower_timeout(OnTimeout::Error)
        .layer(service_fn(move |id: u32| {
            let mut gate = gate.clone();
            async move {
                gate.wait_for(|o| *o).await.unwrap();
                Ok::<_, Infallible>(id)
            }
        }));
    let leader = tokio::spawn(svc.call(3));
    let follower = svc.call(3);
    assert!(follower.is_follower());
    let err = follower.await.unwrap_err();
    assert!(err.is_timeout() && !err.is_panic());
    assert_eq!(
        err.to_string(),
        "gave up waiting for a coalesced call after 2s"
    );
    assert!(err.source().is_none() && err.get_ref().is_none());
    open.send_replace(true);
    assert_eq!(leader.await.unwrap().unwrap(), 3);
    assert_eq!(svc.stats().timed_out, 1);

    // tower's `Timeout` below the layer: not `is_timeout()` (that is the follower limit),
    // but the `Elapsed` is there by type.
    let svc = ServiceBuilder::new()
        .coalesce(|id: &u32| Some(*id))
        .timeout(Duration::from_secs(1))
        .service(service_fn(|_: u32| {
            std::future::pending::<Result<u32, Infallible>>()
        }));
    let err = svc.oneshot(1).await.unwrap_err();
    assert!(!err.is_timeout());
    assert!(err.downcast_ref::<Elapsed>().is_some());
    assert_eq!(err.to_string(), "inner service failed: request timed out");
}

// ---------------------------------------------------------------------------------------------
// Stats as a user would export them; README claims about the core layer.
// ---------------------------------------------------------------------------------------------

/// A Prometheus text export written by hand from `Stats`: the fields must be listed one by
/// one (the struct is `#[non_exhaustive]`, with no way to iterate them).
fn prometheus(name: &str, s: &Stats) -> String {
    let mut out = String::new();
    for (metric, value) in [
        ("leaders_total", s.leaders),
        ("followers_total", s.followers),
        ("lingered_total", s.lingered),
        ("bypassed_total", s.bypassed),
        ("fell_through_total", s.fell_through),
        ("over_capacity_total", s.over_capacity),
        ("timed_out_total", s.timed_out),
        ("released_total", s.released),
        ("retried_total", s.retried),
        ("errors_total", s.errors),
        ("panics_total", s.panics),
        ("cancelled_total", s.cancelled),
        ("forgotten_total", s.forgotten),
        ("in_flight", s.in_flight as u64),
    ] {
        writeln!(out, "tower_coalesce_{metric}{{layer=\"{name}\"}} {value}").unwrap();
    }
    out
}

/// Every kind of request once, through the core layer, and the accounting identity of the
/// `Stats` docs checked on the export.
#[tokio::test(start_paused = true)]
async fn stats_export_accounts_for_every_request() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (open, gate) = watch::channel(false);
    let backend = {
        let calls = calls.clone();
        service_fn(move |id: u64| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate.clone();
            async move {
                if id == 1 {
                    gate.wait_for(|o| *o).await.unwrap();
                }
                Ok::<_, Infallible>(format!("user {id}"))
            }
        })
    };
    let layer = CoalesceLayer::new(|id: &u64| (*id != 0).then_some(*id))
        .max_followers(2)
        .linger(Duration::from_secs(10))
        .follower_timeout(Duration::from_secs(5));
    let mut svc = layer.layer(backend);

    let leader = svc.call(1);
    let followers = [svc.call(1), svc.call(1)];
    let over = svc.call(1); // third follower: over `max_followers`
    let bypass = svc.call(0);
    assert!(leader.is_leader() && !leader.is_alone());
    assert!(followers.iter().all(|f| f.is_follower()));
    assert!(over.is_alone() && over.is_bypass() && !over.is_leader());
    assert!(bypass.is_bypass());
    let leader = tokio::spawn(leader);
    let followers = followers.map(tokio::spawn);
    let over = tokio::spawn(over);
    assert_eq!(bypass.await.unwrap(), "user 0");
    // Followers give up at 5 s and call alone; their calls are gated too.
    tokio::time::advance(Duration::from_secs(5)).await;
    wait_until("2 timeouts", || layer.stats().timed_out == 2).await;
    open.send_replace(true);
    assert_eq!(leader.await.unwrap().unwrap(), "user 1");
    for f in followers {
        assert_eq!(f.await.unwrap().unwrap(), "user 1");
    }
    assert_eq!(over.await.unwrap().unwrap(), "user 1");
    assert_eq!(svc.call(1).await.unwrap(), "user 1", "lingering");
    assert_eq!(svc.call(9).await.unwrap(), "user 9");
    assert!(svc.forget(&9));

    let s = layer.stats();
    let text = prometheus("users", &s);
    assert!(
        text.contains("tower_coalesce_leaders_total{layer=\"users\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("tower_coalesce_followers_total{layer=\"users\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("tower_coalesce_timed_out_total{layer=\"users\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("tower_coalesce_over_capacity_total{layer=\"users\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("tower_coalesce_fell_through_total{layer=\"users\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("tower_coalesce_in_flight{layer=\"users\"} 0\n"),
        "{text}"
    );
    // leader + 2 followers (timed out, called alone) + over capacity + bypass + lingering + 9
    assert_eq!(requests_counted(&s), 7, "{s:?}");
    // 1 flight, 2 follower calls, 1 over capacity, 1 bypass, key 9.
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(
        s,
        svc.stats(),
        "the layer and its services share one registry"
    );
    assert_eq!(Stats::default().leaders, 0);
}

/// README "Use" and the spawning paragraph: `tokio::spawn(svc.oneshot(req))`, with a
/// `BoxError` inner error; and the `ServiceBuilderExt` spelling.
#[tokio::test]
async fn readme_spawning_and_service_builder_ext() {
    let svc = ServiceBuilder::new()
        .coalesce(|user_id: &u64| Some(*user_id))
        .service(service_fn(|user_id: u64| async move {
            if user_id == 0 {
                return Err::<String, BoxError>("no user 0".into());
            }
            Ok(format!("profile of {user_id}"))
        }));
    let ok = tokio::spawn(svc.clone().oneshot(42));
    let err = tokio::spawn(svc.clone().oneshot(0));
    assert_eq!(ok.await.unwrap().unwrap(), "profile of 42");
    let err = err.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "inner service failed: no user 0");
    assert_eq!(svc.in_flight(), 0);
}

/// `CoalesceLayer::with_group` then a registry option: the option replaces the shared group
/// (documented on `with_group`), so the layer and the group no longer coalesce together.
#[tokio::test]
async fn with_group_then_option_silently_drops_the_shared_group() {
    let (open, gate) = watch::channel(false);
    let calls = Arc::new(AtomicUsize::new(0));
    let fetch = {
        let calls = calls.clone();
        move || {
            let (calls, mut gate) = (calls.clone(), gate.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                gate.wait_for(|o| *o).await.unwrap();
                // The layer's output type, so that the two could share a flight.
                Ok::<_, CoalesceError>("shared".to_owned())
            }
        }
    };
    let shared: Group<u64> = Group::new();
    let layer = CoalesceLayer::with_group(|k: &u64| Some(*k), shared.clone())
        .linger(Duration::from_secs(1));
    let svc = layer.layer(service_fn({
        let fetch = fetch.clone();
        move |_: u64| fetch()
    }));
    let direct = tokio::spawn(shared.run(1, fetch));
    let via_layer = tokio::spawn(svc.oneshot(1));
    wait_until("both requests registered", || {
        shared.stats().leaders + layer.stats().leaders + layer.stats().followers == 2
    })
    .await;
    open.send_replace(true);
    assert_eq!(direct.await.unwrap().unwrap().unwrap(), "shared");
    assert_eq!(via_layer.await.unwrap().unwrap(), "shared");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the layer's `.linger` gave it a registry of its own"
    );
    assert_eq!((layer.stats().leaders, shared.stats().leaders), (1, 1));
    assert_eq!(layer.stats().followers + shared.stats().followers, 0);
}

/// `follower_timeout` with the default `OnTimeout::CallInner`: the follower calls for itself
/// and the flight goes on; the leader's response then went to nobody else (`is_shared`).
#[tokio::test(start_paused = true)]
async fn follower_timeout_calls_inner_and_leader_is_not_shared() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (open, gate) = watch::channel(false);
    let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k))
        .follower_timeout(Duration::from_secs(2))
        .layer(service_fn({
            let calls = calls.clone();
            move |k: &'static str| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let mut gate = gate.clone();
                async move {
                    if n == 0 {
                        gate.wait_for(|o| *o).await.unwrap();
                    }
                    Ok::<_, Infallible>(format!("{k} #{n}"))
                }
            }
        }));
    let mut leader = Box::pin(svc.call("k"));
    let follower = svc.call("k");
    let (leader_out, follower_out) = tokio::join!(leader.as_mut(), async {
        let out = follower.await;
        open.send_replace(true);
        out
    });
    assert_eq!(follower_out.unwrap(), "k #1");
    assert_eq!(leader_out.unwrap(), "k #0");
    assert!(!leader.is_shared());
    let s = svc.stats();
    assert_eq!((s.timed_out, s.fell_through, s.followers), (1, 1, 1));
}

// ---------------------------------------------------------------------------------------------
// Small API checks a user runs into.
// ---------------------------------------------------------------------------------------------

/// `Debug` everywhere a user logs or `dbg!`s, `Default`, `Clone`.
#[test]
fn public_types_are_debug_clone_default() {
    fn debug<T: std::fmt::Debug>(_: &T) {}
    fn clone<T: Clone>(_: &T) {}
    let layer = CoalesceLayer::new(|k: &u8| Some(*k));
    debug(&layer);
    clone(&layer);
    let http = CoalesceHttpLayer::default();
    debug(&http);
    clone(&http);
    let group: Group<u8> = Group::default();
    debug(&group);
    clone(&group);
    debug(&GroupBuilder::default());
    clone(&GroupBuilder::default());
    debug(&OnTimeout::default());
    assert_eq!(OnTimeout::default(), OnTimeout::CallInner);
    debug(&Stats::default());
    debug(&ServedBy::Leader);
    assert_eq!(ServedBy::Released.to_string(), "released");
    let grpc = tower_coalesce_grpc_layer();
    debug(&grpc);
}

#[cfg(feature = "grpc")]
fn tower_coalesce_grpc_layer() -> impl std::fmt::Debug + Clone {
    tower_coalesce::grpc::CoalesceGrpcLayer::default().method("/catalog.v1.Catalog/GetItem")
}

#[cfg(not(feature = "grpc"))]
fn tower_coalesce_grpc_layer() -> impl std::fmt::Debug + Clone {}

// ---------------------------------------------------------------------------------------------
// CoalesceHttpLayer's bounds, in process on the paused clock.
// ---------------------------------------------------------------------------------------------

fn http_get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn cache_status(res: &Response<impl http_body::Body>) -> &str {
    res.headers()
        .get("cache-status")
        .map_or("", |v| v.to_str().unwrap())
}

/// `max_followers(1)` and `follower_timeout`: the request over the bound calls on its own
/// (`ServedBy::Bypass`, `fwd=bypass; detail=over-capacity`), the follower past its limit is
/// released (`ServedBy::Released`, `detail=timeout`); the `Stats` identity still holds and
/// `fell_through` counts each once.
#[tokio::test(start_paused = true)]
async fn http_layer_bounds_and_stats_identity() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (open, gate) = watch::channel(false);
    let layer = CoalesceHttpLayer::new()
        .cache_status_header(true)
        .max_followers(1)
        .follower_timeout(Duration::from_secs(2));
    let mut svc = layer.layer(service_fn({
        let calls = calls.clone();
        move |_req: Request<Body>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate.clone();
            async move {
                if n == 0 {
                    gate.wait_for(|o| *o).await.unwrap();
                }
                Ok::<_, Infallible>(Response::new(Body::from(format!("call #{n}"))))
            }
        }
    }));
    let leader = svc.call(http_get("/r"));
    let follower = svc.call(http_get("/r"));
    let over = svc.call(http_get("/r"));
    assert_eq!(leader.served_by(), ServedBy::Leader);
    assert_eq!(follower.served_by(), ServedBy::Follower);
    assert_eq!(over.served_by(), ServedBy::Bypass, "its own call");
    // The inner service is ready: the leader's call and the one over capacity are made in
    // `call`, before anything is polled (as the core layer and tower's own middleware do).
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let leader = tokio::spawn(leader);
    let over = within("over capacity", over).await.unwrap();
    assert_eq!(
        cache_status(&over),
        "tower-coalesce; fwd=bypass; detail=over-capacity"
    );
    let follower = within("the follower's limit", follower).await.unwrap();
    assert_eq!(
        follower.extensions().get::<ServedBy>(),
        Some(&ServedBy::Released)
    );
    assert_eq!(
        cache_status(&follower),
        "tower-coalesce; fwd=miss; collapsed=?0; detail=timeout"
    );
    open.send_replace(true);
    let leader = leader.await.unwrap().unwrap();
    assert_eq!(cache_status(&leader), "tower-coalesce; fwd=miss");
    let body = leader.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"call #0");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let s = layer.stats();
    assert_eq!(requests_counted(&s), 3, "{s:?}");
    assert_eq!(
        (s.over_capacity, s.timed_out, s.released, s.fell_through),
        (1, 1, 0, 2),
        "{s:?}"
    );
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

/// Module docs, "Errors and panics": if the leader's request is dropped, a follower takes
/// over the call; a shareable response then reaches it as a copy.
#[tokio::test(start_paused = true)]
async fn http_layer_leader_dropped_follower_takes_over() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CoalesceHttpLayer::new();
    let mut svc = layer.layer(service_fn({
        let calls = calls.clone();
        move |_req: Request<Body>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, Infallible>(Response::new(Body::from(format!("call #{n}"))))
            }
        }
    }));
    let mut leader = Box::pin(svc.call(http_get("/r")));
    // The leader starts its call, then its client goes away.
    assert!(futures::poll!(leader.as_mut()).is_pending());
    let follower = svc.call(http_get("/r"));
    drop(leader);
    let res = within("the follower", follower).await.unwrap();
    assert_eq!(
        res.extensions().get::<ServedBy>(),
        Some(&ServedBy::Follower)
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"call #0");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().cancelled, 0);
}

/// `HEAD` through an axum `Router` (answered by the `GET` handler): one handler call per
/// burst, separate from `GET`'s, and every copy carries the `GET` body's `Content-Length`
/// with no body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_head_burst_is_coalesced_apart_from_get() {
    let (backend, mut controls) = backend();
    let coalesce = CoalesceHttpLayer::new().cache_status_header(true);
    let app = Router::new()
        .route("/report", get(report))
        .with_state(backend.clone())
        .layer(coalesce.clone());
    let server = serve(app).await;
    let client = client();
    let mut heads = vec![send(&client, request(Method::HEAD, server.addr, "/report"))];
    controls.next_entry().await;
    let get_task = send(&client, request(Method::GET, server.addr, "/report"));
    controls.next_entry().await;
    for _ in 0..3 {
        heads.push(send(&client, request(Method::HEAD, server.addr, "/report")));
    }
    wait_until("3 HEAD followers", || coalesce.waiting() == 3).await;
    controls.open_gate();
    let heads = join_all(heads).await;
    let got = within("GET", get_task).await.unwrap();
    assert_eq!(backend.calls(), 2, "one HEAD flight, one GET flight");
    for h in &heads {
        assert_eq!(h.status, StatusCode::OK);
        assert!(h.body.is_empty());
        assert_eq!(
            h.header("content-length"),
            "report #0 for all".len().to_string()
        );
    }
    assert_eq!(&got.body[..], b"report #1 for all");
    assert_eq!(
        count(&heads, "cache-status").get("tower-coalesce; fwd=miss; collapsed"),
        Some(&3)
    );
}

/// A coalesced service whose inner error is `BoxError`, called from an axum handler: the
/// handler's future is not provably `Send` (rustc #64552, as the README warns for
/// `tokio::spawn(async move { .. })`), so `get(handler)` fails to compile with "implementation
/// of `From` is not general enough" unless the call is boxed as a `dyn Future + Send` first.
type ProfileService = tower_coalesce::CoalesceService<
    tower::util::BoxCloneSyncService<u64, String, BoxError>,
    fn(&u64) -> Option<u64>,
    u64,
>;

async fn profile_via_service(
    State(svc): State<ProfileService>,
    Path(id): Path<u64>,
) -> Result<String, (StatusCode, String)> {
    // `svc.oneshot(id).await` directly here does not compile (see above).
    let call: std::pin::Pin<Box<dyn Future<Output = Result<String, CoalesceError>> + Send>> =
        Box::pin(svc.oneshot(id));
    call.await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))
}

#[tokio::test]
async fn axum_handler_calling_a_coalesced_box_error_service() {
    let inner = tower::util::BoxCloneSyncService::new(service_fn(|id: u64| async move {
        if id == 0 {
            return Err::<String, BoxError>("no user 0".into());
        }
        Ok(format!("profile of {id}"))
    }));
    let svc: ProfileService =
        CoalesceLayer::new((|id: &u64| Some(*id)) as fn(&u64) -> Option<u64>).layer(inner);
    let app = Router::new()
        .route("/users/{id}", get(profile_via_service))
        .with_state(svc.clone());
    let res = app.clone().oneshot(http_get("/users/4")).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"profile of 4");
    let res = app.oneshot(http_get("/users/0")).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"inner service failed: no user 0");
    assert_eq!(svc.stats().errors, 1);
}

// ---------------------------------------------------------------------------------------------
// CoalesceGrpcLayer on a tonic server.
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "grpc")]
mod grpc {
    use super::*;
    use std::pin::Pin;

    use futures::Stream;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::{Channel, Server};
    use tower_coalesce::grpc::CoalesceGrpcLayer;

    #[allow(clippy::all, missing_docs)]
    mod pb {
        include!("../proto/generated/catalog.v1.rs");
    }

    use pb::catalog_client::CatalogClient;
    use pb::catalog_server::{Catalog, CatalogServer};
    use pb::{GetItemRequest, Item};

    struct GatedCatalog(Backend);

    #[tonic::async_trait]
    impl Catalog for GatedCatalog {
        async fn get_item(
            &self,
            request: tonic::Request<GetItemRequest>,
        ) -> Result<tonic::Response<Item>, tonic::Status> {
            let id = request.into_inner().id;
            let n = self.0.call(id.clone()).await;
            if id.starts_with("gone") {
                return Err(tonic::Status::not_found(format!("no item {id}")));
            }
            Ok(tonic::Response::new(Item {
                description: format!("item {id}, call #{n}"),
                id,
                payload: Vec::new(),
            }))
        }

        type WatchItemStream =
            Pin<Box<dyn Stream<Item = Result<Item, tonic::Status>> + Send + 'static>>;

        async fn watch_item(
            &self,
            _request: tonic::Request<GetItemRequest>,
        ) -> Result<tonic::Response<Self::WatchItemStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
    }

    fn get_item(id: &str) -> tonic::Request<GetItemRequest> {
        tonic::Request::new(GetItemRequest {
            id: id.to_owned(),
            padding: Vec::new(),
        })
    }

    /// README "gRPC": identical unary calls share one handler call; a failed call
    /// (`NOT_FOUND`) is not shared: every follower calls for itself and gets its own status.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tonic_unary_calls_coalesce_and_errors_are_not_shared() {
        let (backend, mut controls) = backend();
        let coalesce = CoalesceGrpcLayer::new().method("/catalog.v1.Catalog/GetItem");
        let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = incoming.local_addr().unwrap();
        let server = Server::builder()
            .layer(coalesce.clone())
            .add_service(CatalogServer::new(GatedCatalog(backend.clone())))
            .serve_with_incoming(incoming);
        let server = tokio::spawn(server);
        let client = CatalogClient::<Channel>::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let call = |id: &'static str| {
            let mut client = client.clone();
            tokio::spawn(async move { client.get_item(get_item(id)).await })
        };

        let mut hot = vec![call("hot")];
        assert_eq!(controls.next_entry().await, "hot");
        let mut gone = vec![call("gone")];
        assert_eq!(controls.next_entry().await, "gone");
        for _ in 0..4 {
            hot.push(call("hot"));
            gone.push(call("gone"));
        }
        wait_until("8 followers", || coalesce.waiting() == 8).await;
        controls.open_gate();
        for task in hot {
            let item = within("GetItem(hot)", task).await.unwrap().unwrap();
            assert_eq!(item.get_ref().description, "item hot, call #0");
        }
        for task in gone {
            let status = within("GetItem(gone)", task).await.unwrap().unwrap_err();
            assert_eq!(status.code(), tonic::Code::NotFound);
            assert_eq!(status.message(), "no item gone");
        }
        // hot: 1; gone: the leader's call and one per released follower.
        assert_eq!(backend.calls(), 1 + 5);
        let s = coalesce.stats();
        assert_eq!((s.leaders, s.followers, s.released), (2, 8, 4), "{s:?}");
        assert_eq!(requests_counted(&s), 10, "{s:?}");
        assert_eq!((coalesce.in_flight(), coalesce.waiting()), (0, 0));
        server.abort();
    }
}
