//! HTTP under real load: an axum app behind [`CoalesceHttpLayer`] on 127.0.0.1, driven by
//! hyper-util's pooled client from 256 concurrent connections.
//!
//! The app mixes everything the layer must get right at once: users with different
//! credentials (a test authentication layer in front verifies a bearer token and hands the
//! layer an identity), cookies, `Vary`, `Set-Cookie` and `private` responses, bodies over the
//! sharing limit, slow, failing and panicking handlers; and clients that give up before the
//! response head or drop the body after its first frame.
//!
//! Every body is tagged with the identity and the key it was produced for (and, for responses
//! that must never be shared, with the request's own nonce), and is long enough to tell a
//! truncation: the client knows the exact body it must get. Asserted: zero responses delivered
//! to a caller they were not meant for, zero truncated bodies, zero hung requests, zero
//! transport errors other than the disconnects the test makes; and, in synchronised bursts,
//! exactly one handler call per distinct key per flight.
//!
//! `cargo test --all-features --test http_load -- --nocapture` prints the figures; the full
//! size is `cargo test --release --all-features --test http_load -- --ignored --nocapture`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tower::Service;
use tower_coalesce::http::CoalesceHttpLayer;

const SEED: u64 = 0x4854_5450_104D;
/// Bodies up to this size are shared; `/big` bodies are larger.
const LIMIT: usize = 16 * 1024;
const BIG: usize = 40 * 1024;
/// Users the authentication layer knows; `""` is anonymous (no `Authorization`).
const USERS: [&str; 4] = ["", "alice", "bob", "carol"];
/// A request still unanswered after this long has hung.
const HANG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The app
// ---------------------------------------------------------------------------------------------

/// The user an authentication layer verified, read by the coalescing layer's identity.
#[derive(Clone, Debug)]
struct UserId(String);

#[derive(Default)]
struct Calls {
    shared_routes: AtomicU64,
    unshared_routes: AtomicU64,
    gate: AtomicU64,
}

#[derive(Clone)]
struct App {
    calls: Arc<Calls>,
    /// `/gate` handlers wait until this reaches their wave.
    wave: watch::Receiver<u64>,
}

/// The body every tagged response carries: who and what it was made for, then filler derived
/// from both, to exactly `len` bytes, then an end mark. Any mix-up or truncation shows.
fn tagged(who: &str, key: &str, len: usize) -> Bytes {
    let mut body = format!("who={who};key={key};len={len};").into_bytes();
    let seed = body
        .iter()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(*b));
    let mut i = 0u8;
    while body.len() < len {
        body.push(b'a' + (seed.wrapping_add(i) % 26));
        i = i.wrapping_add(1);
    }
    body.extend_from_slice(b";end");
    body.into()
}

fn who(user: Option<Extension<UserId>>, headers: &HeaderMap) -> String {
    match (user, headers.get("cookie")) {
        (Some(Extension(UserId(u))), _) => u,
        (None, Some(cookie)) => format!("cookie:{}", cookie.to_str().unwrap_or("?")),
        (None, None) => "anonymous".into(),
    }
}

/// The key a handler was called for: its path and query, as the client sent them.
fn key_of(uri: &axum::http::Uri) -> String {
    uri.path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned()
}

/// A `name=value` parameter of the query.
fn param(uri: &axum::http::Uri, name: &str) -> Option<usize> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
        .parse()
        .ok()
}

fn nonce(headers: &HeaderMap) -> String {
    headers
        .get("x-nonce")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

type User = Option<Extension<UserId>>;

/// A millisecond or two of work, so that identical requests meet: a latency, not a
/// synchronisation (nothing waits for it to end).
async fn work(uri: &axum::http::Uri) {
    let ms = 1 + uri.path().len() as u64 % 2;
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

async fn item(State(app): State<App>, uri: axum::http::Uri, h: HeaderMap, u: User) -> Bytes {
    app.calls.shared_routes.fetch_add(1, SeqCst);
    work(&uri).await;
    tagged(
        &who(u, &h),
        &key_of(&uri),
        param(&uri, "size").unwrap_or(64),
    )
}

async fn vary(State(app): State<App>, uri: axum::http::Uri, h: HeaderMap, u: User) -> Response {
    app.calls.shared_routes.fetch_add(1, SeqCst);
    work(&uri).await;
    let theme = h
        .get("x-theme")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none");
    let body = tagged(&format!("{}/{theme}", who(u, &h)), &key_of(&uri), 256);
    ([("vary", "x-theme")], body).into_response()
}

async fn cookie(State(app): State<App>, uri: axum::http::Uri, h: HeaderMap, u: User) -> Response {
    app.calls.unshared_routes.fetch_add(1, SeqCst);
    work(&uri).await;
    let who = format!("{}#{}", who(u, &h), nonce(&h));
    let body = tagged(&who, &key_of(&uri), 256);
    ([("set-cookie", format!("session={who}"))], body).into_response()
}

async fn private(State(app): State<App>, uri: axum::http::Uri, h: HeaderMap, u: User) -> Response {
    app.calls.unshared_routes.fetch_add(1, SeqCst);
    work(&uri).await;
    let who = format!("{}#{}", who(u, &h), nonce(&h));
    let body = tagged(&who, &key_of(&uri), 256);
    ([("cache-control", "private, max-age=60")], body).into_response()
}

/// A streamed body over the sharing limit, with no `Content-Length`: the layer finds out
/// while buffering, and must still deliver it whole.
async fn big(State(app): State<App>, uri: axum::http::Uri, h: HeaderMap, u: User) -> Response {
    app.calls.shared_routes.fetch_add(1, SeqCst);
    work(&uri).await;
    let body = tagged(&who(u, &h), &key_of(&uri), BIG);
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = body
        .chunks(4096)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let stream = futures::stream::iter(chunks);
    Response::new(Body::new(StreamBody::new(stream)))
}

async fn slow(State(app): State<App>, uri: axum::http::Uri, h: HeaderMap, u: User) -> Bytes {
    app.calls.shared_routes.fetch_add(1, SeqCst);
    // A latency, not a synchronisation: nothing waits for it to end.
    let ms = param(&uri, "ms").unwrap_or(1) as u64;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    tagged(&who(u, &h), &key_of(&uri), 512)
}

async fn fail(State(app): State<App>, uri: axum::http::Uri, h: HeaderMap, u: User) -> Response {
    app.calls.shared_routes.fetch_add(1, SeqCst);
    work(&uri).await;
    let body = tagged(&who(u, &h), &key_of(&uri), 128);
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn panics(State(app): State<App>, uri: axum::http::Uri) -> Bytes {
    app.calls.unshared_routes.fetch_add(1, SeqCst);
    panic!("handler panic for {}", key_of(&uri))
}

/// Waits for its wave's gate, so that a whole burst has joined before any flight ends.
async fn gate(State(app): State<App>, uri: axum::http::Uri, h: HeaderMap, u: User) -> Bytes {
    app.calls.gate.fetch_add(1, SeqCst);
    let wave = param(&uri, "w").unwrap_or(0) as u64;
    let mut gate = app.wave.clone();
    gate.wait_for(|open| *open >= wave)
        .await
        .expect("gate kept");
    tagged(&who(u, &h), &key_of(&uri), 96)
}

/// The test's authentication: a known bearer token becomes a verified [`UserId`]; an unknown
/// one is refused. Placed outside the coalescing layer, as its documentation asks.
async fn authenticate(mut req: Request, next: Next) -> Response {
    if let Some(auth) = req.headers().get("authorization") {
        let user = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|u| USERS[1..].contains(u));
        match user {
            Some(user) => {
                let user = UserId(user.to_owned());
                req.extensions_mut().insert(user);
            }
            None => return StatusCode::UNAUTHORIZED.into_response(),
        }
    }
    next.run(req).await
}

/// Counts requests whose `call` into the coalescing service has returned: from then on they
/// have joined or started their flight.
#[derive(Clone)]
struct Entered<S> {
    inner: S,
    count: Arc<AtomicUsize>,
    changed: Arc<watch::Sender<usize>>,
}

impl<S: Service<Request>> Service<Request> for Entered<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> S::Future {
        let fut = self.inner.call(req);
        let n = self.count.fetch_add(1, SeqCst) + 1;
        self.changed.send_replace(n);
        fut
    }
}

struct Server {
    addr: SocketAddr,
    calls: Arc<Calls>,
    wave: watch::Sender<u64>,
    entered: watch::Receiver<usize>,
    layer: CoalesceHttpLayer,
}

async fn serve() -> Server {
    let (wave, wave_rx) = watch::channel(0u64);
    let (entered_tx, entered) = watch::channel(0usize);
    let calls = Arc::new(Calls::default());
    let app = App {
        calls: Arc::clone(&calls),
        wave: wave_rx,
    };
    let layer = CoalesceHttpLayer::new()
        .max_body_bytes(LIMIT)
        .cache_status_header(true)
        .identity(|parts: &http::request::Parts| {
            parts.extensions.get::<UserId>().map(|UserId(u)| u.clone())
        });
    let count = Arc::new(AtomicUsize::new(0));
    let changed = Arc::new(entered_tx);
    // `Entered` wraps the coalescing service directly (see `Entered`).
    let coalescing = tower::ServiceBuilder::new()
        .layer(tower::layer::layer_fn(move |inner| Entered {
            inner,
            count: Arc::clone(&count),
            changed: Arc::clone(&changed),
        }))
        .layer(layer.clone());
    let router = Router::new()
        .route("/item/{id}", get(item))
        .route("/vary/{id}", get(vary))
        .route("/cookie/{id}", get(cookie))
        .route("/private/{id}", get(private))
        .route("/big/{id}", get(big))
        .route("/slow/{id}", get(slow))
        .route("/fail/{id}", get(fail))
        .route("/panic/{id}", get(panics))
        .route("/gate/{id}", get(gate))
        .with_state(app)
        .layer(coalescing)
        .layer(axum::middleware::from_fn(authenticate))
        .layer(tower_http::catch_panic::CatchPanicLayer::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server {
        addr,
        calls,
        wave,
        entered,
        layer,
    }
}

// ---------------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http()
}

/// How a client gives up on a request, if it does.
#[derive(Clone, Copy, Debug)]
enum Disconnect {
    Never,
    /// Drops the request if the response head has not come within this many milliseconds.
    BeforeHead(u64),
    /// Reads the first body frame, checks it, and drops the rest (closing the connection).
    AfterFirstFrame,
}

/// One request and everything the client must get back for it.
struct Plan {
    path: String,
    headers: Vec<(&'static str, String)>,
    status: StatusCode,
    /// The exact body; `None` where only the status is known (a panic's 500).
    body: Option<Bytes>,
    disconnect: Disconnect,
    shared_route: bool,
}

fn plan(rng: &mut StdRng, client: u32, seq: u64, ids: u32) -> Plan {
    // Hot ids come up far more often than cold ones.
    let id = (ids as f64).powf(rng.random::<f64>()) as u32 - 1;
    let route = rng.random_range(0..100);
    let nonce = format!("{client}-{seq}");
    let mut headers = vec![("x-nonce", nonce.clone())];
    // A cookie without credentials the authentication layer knows: no identity, so the
    // layer must let it bypass.
    let cookie = rng.random_bool(0.1);
    let user = USERS[rng.random_range(0..USERS.len())];
    let who = if cookie {
        let c = format!("c{}", client % 7);
        headers.push(("cookie", c.clone()));
        format!("cookie:{c}")
    } else if user.is_empty() {
        "anonymous".to_owned()
    } else {
        headers.push(("authorization", format!("Bearer {user}")));
        user.to_owned()
    };
    let disconnect = match rng.random_range(0..100) {
        0..=2 => Disconnect::BeforeHead(rng.random_range(0..3)),
        3..=5 => Disconnect::AfterFirstFrame,
        _ => Disconnect::Never,
    };
    let ok = StatusCode::OK;
    let (path, status, body, shared_route) = match route {
        0..=39 => {
            let size = [0, 10, 1000, LIMIT - 100][rng.random_range(0..4)];
            let path = format!("/item/{id}?size={size}");
            let body = tagged(&who, &path, size);
            (path, ok, Some(body), true)
        }
        40..=49 => {
            let theme = ["light", "dark"][rng.random_range(0..2)];
            headers.push(("x-theme", theme.to_owned()));
            let path = format!("/vary/{id}");
            let body = tagged(&format!("{who}/{theme}"), &path, 256);
            (path, ok, Some(body), true)
        }
        50..=57 => {
            let path = format!("/cookie/{id}");
            let body = tagged(&format!("{who}#{nonce}"), &path, 256);
            (path, ok, Some(body), false)
        }
        58..=64 => {
            let path = format!("/private/{id}");
            let body = tagged(&format!("{who}#{nonce}"), &path, 256);
            (path, ok, Some(body), false)
        }
        65..=72 => {
            let path = format!("/big/{id}");
            let body = tagged(&who, &path, BIG);
            (path, ok, Some(body), true)
        }
        73..=87 => {
            let path = format!("/slow/{id}?ms={}", 1 + id % 4);
            let body = tagged(&who, &path, 512);
            (path, ok, Some(body), true)
        }
        88..=96 => {
            let path = format!("/fail/{id}");
            let body = tagged(&who, &path, 128);
            (path, StatusCode::SERVICE_UNAVAILABLE, Some(body), true)
        }
        _ => {
            let path = format!("/panic/{id}");
            (path, StatusCode::INTERNAL_SERVER_ERROR, None, false)
        }
    };
    Plan {
        path,
        headers,
        status,
        body,
        disconnect,
        shared_route,
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    complete: AtomicU64,
    shared_route_requests: AtomicU64,
    gave_up_before_head: AtomicU64,
    dropped_mid_body: AtomicU64,
    misdelivered: AtomicU64,
    truncated: AtomicU64,
    wrong_status: AtomicU64,
    transport_errors: AtomicU64,
    hung: AtomicU64,
    /// Responses served as a copy of another request's (`Cache-Status: ...; collapsed`).
    collapsed: AtomicU64,
    /// Followers released to make their own call (`collapsed=?0`).
    released: AtomicU64,
    first_problems: Mutex<Vec<String>>,
}

impl Tally {
    fn problem(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, SeqCst);
        let mut first = self.first_problems.lock().unwrap();
        if first.len() < 10 {
            first.push(what);
        }
    }

    /// Compares a received body (or its first frame: `whole == false`) with the expected one.
    fn check_body(&self, plan: &Plan, got: &[u8], whole: bool) {
        let Some(want) = &plan.body else { return };
        if got == want.as_ref() || (!whole && want.starts_with(got)) {
            return;
        }
        let head = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned();
        if want.starts_with(got) {
            self.problem(
                &self.truncated,
                format!(
                    "{}: {} of {} bytes: {}",
                    plan.path,
                    got.len(),
                    want.len(),
                    head(got)
                ),
            );
        } else {
            self.problem(
                &self.misdelivered,
                format!("{} wanted {:?}, got {:?}", plan.path, head(want), head(got)),
            );
        }
    }
}

async fn exchange(client: &HttpClient, base: &str, plan: &Plan, tally: &Tally) {
    let mut req = http::Request::get(format!("{base}{}", plan.path));
    for (name, value) in &plan.headers {
        req = req.header(*name, value);
    }
    let req = req.body(Empty::new()).unwrap();
    let res = match plan.disconnect {
        Disconnect::BeforeHead(ms) => {
            match tokio::time::timeout(Duration::from_millis(ms), client.request(req)).await {
                Ok(res) => res,
                Err(_) => {
                    tally.gave_up_before_head.fetch_add(1, SeqCst);
                    return;
                }
            }
        }
        _ => client.request(req).await,
    };
    let res = match res {
        Ok(res) => res,
        Err(e) => {
            return tally.problem(&tally.transport_errors, format!("{}: {e:?}", plan.path));
        }
    };
    if res.status() != plan.status {
        return tally.problem(
            &tally.wrong_status,
            format!(
                "{}: status {} instead of {}",
                plan.path,
                res.status(),
                plan.status
            ),
        );
    }
    let status = res
        .headers()
        .get_all("cache-status")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("tower-coalesce"))
        .unwrap_or("");
    if status.contains("collapsed=?0") {
        tally.released.fetch_add(1, SeqCst);
    } else if status.contains("collapsed") {
        tally.collapsed.fetch_add(1, SeqCst);
    }
    let mut body = res.into_body();
    if let Disconnect::AfterFirstFrame = plan.disconnect {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    tally.check_body(plan, data, false);
                }
            }
            Some(Err(e)) => tally.problem(&tally.transport_errors, format!("{e:?}")),
            None => tally.check_body(plan, b"", true),
        }
        tally.dropped_mid_body.fetch_add(1, SeqCst);
        return;
    }
    match body.collect().await {
        Ok(collected) => {
            tally.check_body(plan, &collected.to_bytes(), true);
            tally.complete.fetch_add(1, SeqCst);
        }
        Err(e) => tally.problem(
            &tally.transport_errors,
            format!("{}: body: {e:?}", plan.path),
        ),
    }
}

/// One connection's worth of requests, one after the other.
async fn run_client(
    client: HttpClient,
    base: Arc<str>,
    id: u32,
    count: u64,
    ids: u32,
    tally: Arc<Tally>,
) {
    let mut rng = StdRng::seed_from_u64(SEED ^ (u64::from(id) << 20));
    for seq in 0..count {
        let plan = plan(&mut rng, id, seq, ids);
        tally.requests.fetch_add(1, SeqCst);
        if plan.shared_route {
            tally.shared_route_requests.fetch_add(1, SeqCst);
        }
        if tokio::time::timeout(HANG, exchange(&client, &base, &plan, &tally))
            .await
            .is_err()
        {
            tally.problem(&tally.hung, format!("{} hung", plan.path));
        }
    }
}

/// Bursts: every connection asks at once for one of a few `/gate` keys (id x user), and the
/// handlers answer only once every request of the burst has joined its flight. Each burst must
/// then call the handler exactly once per distinct key. Returns (requests, calls).
async fn bursts(server: &Server, base: &str, clients: &[HttpClient], waves: u64) -> (u64, u64) {
    let connections = clients.len() as u32;
    let mut requests = 0;
    let mut calls = 0;
    let mut rng = StdRng::seed_from_u64(SEED ^ 0xB0B);
    for wave in 1..=waves {
        let entered_before = *server.entered.borrow();
        let calls_before = server.calls.gate.load(SeqCst);
        let mut distinct = HashSet::new();
        let mut tasks = tokio::task::JoinSet::new();
        for client in clients {
            let id = rng.random_range(0..4u32);
            let user = USERS[rng.random_range(0..USERS.len())];
            distinct.insert((id, user));
            let path = format!("/gate/{id}?w={wave}");
            let who = if user.is_empty() { "anonymous" } else { user };
            let want = tagged(who, &path, 96);
            let mut req = http::Request::get(format!("{base}{path}"));
            if !user.is_empty() {
                req = req.header("authorization", format!("Bearer {user}"));
            }
            let req = req.body(Empty::new()).unwrap();
            let client = client.clone();
            tasks.spawn(async move {
                let res = client.request(req).await.expect("burst request");
                assert_eq!(res.status(), StatusCode::OK);
                let got = res.into_body().collect().await.expect("burst body");
                assert_eq!(got.to_bytes(), want, "burst body for {path} as {who:?}");
            });
        }
        let target = entered_before + connections as usize;
        let mut entered = server.entered.clone();
        tokio::time::timeout(HANG, entered.wait_for(|n| *n >= target))
            .await
            .expect("burst requests never reached the layer")
            .expect("server alive");
        server.wave.send_replace(wave);
        tokio::time::timeout(HANG, async {
            while let Some(done) = tasks.join_next().await {
                done.expect("burst client");
            }
        })
        .await
        .expect("burst hung");
        let made = server.calls.gate.load(SeqCst) - calls_before;
        assert_eq!(
            made,
            distinct.len() as u64,
            "wave {wave}: one handler call per distinct key"
        );
        requests += u64::from(connections);
        calls += made;
    }
    (requests, calls)
}

/// The handler panics are expected: keep their messages out of the output.
fn quiet_handler_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|m| m.starts_with("handler panic for"));
            if !ours {
                default(info);
            }
        }));
    });
}

fn load(requests: u64, connections: u32) {
    quiet_handler_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = serve().await;
        let base: Arc<str> = format!("http://{}", server.addr).into();
        let tally = Arc::new(Tally::default());
        let started = Instant::now();
        let per_client = requests / u64::from(connections);
        // A client (a pool) per connection, so no request waits for another client's
        // connection; kept for the bursts, which reuse the connections rather than open as
        // many again.
        let http_clients: Vec<HttpClient> = (0..connections).map(|_| client()).collect();
        let mut clients = tokio::task::JoinSet::new();
        for id in 0..connections {
            let extra = u64::from(u64::from(id) < requests % u64::from(connections));
            clients.spawn(run_client(
                http_clients[id as usize].clone(),
                Arc::clone(&base),
                id,
                per_client + extra,
                12,
                Arc::clone(&tally),
            ));
        }
        while let Some(done) = clients.join_next().await {
            done.expect("client task");
        }
        let elapsed = started.elapsed();
        let shared_calls = server.calls.shared_routes.load(SeqCst);
        let unshared_calls = server.calls.unshared_routes.load(SeqCst);
        let (burst_requests, burst_calls) = bursts(&server, &base, &http_clients, 10).await;
        let t = &tally;
        let get = |c: &AtomicU64| c.load(SeqCst);
        println!(
            "http load: {} requests from {connections} connections in {elapsed:.2?} ({:.0} req/s)",
            get(&t.requests),
            get(&t.requests) as f64 / elapsed.as_secs_f64()
        );
        println!(
            "  complete {}, gave up before the head {}, dropped mid-body {}",
            get(&t.complete),
            get(&t.gave_up_before_head),
            get(&t.dropped_mid_body)
        );
        println!(
            "  handler calls: shareable routes {shared_calls} for {} requests ({:.1}% of them); \
             unshareable routes {unshared_calls}",
            get(&t.shared_route_requests),
            100.0 * shared_calls as f64 / get(&t.shared_route_requests).max(1) as f64
        );
        println!(
            "  served as a follower's copy {}, followers released to call on their own {}",
            get(&t.collapsed),
            get(&t.released)
        );
        println!(
            "  bursts: {burst_requests} requests, {burst_calls} handler calls (= distinct keys per flight)"
        );
        println!(
            "  misdelivered {}, truncated {}, wrong status {}, transport errors {}, hung {}",
            get(&t.misdelivered),
            get(&t.truncated),
            get(&t.wrong_status),
            get(&t.transport_errors),
            get(&t.hung)
        );
        let problems = t.first_problems.lock().unwrap().clone();
        assert_eq!(get(&t.misdelivered), 0, "responses to the wrong caller: {problems:#?}");
        assert_eq!(get(&t.truncated), 0, "truncated bodies: {problems:#?}");
        assert_eq!(get(&t.hung), 0, "hung requests: {problems:#?}");
        assert_eq!(get(&t.wrong_status), 0, "{problems:#?}");
        assert_eq!(get(&t.transport_errors), 0, "{problems:#?}");
        assert_eq!(get(&t.requests), requests);
        assert!(get(&t.complete) > 0 && get(&t.dropped_mid_body) > 0);
        assert!(
            shared_calls < get(&t.shared_route_requests) && get(&t.collapsed) > 0,
            "nothing was coalesced"
        );
        assert!(get(&t.released) > 0, "no follower was released");
        assert_eq!(server.layer.waiting(), 0, "followers left waiting");
        // Every flight ended: its waiters' responses were all written before the bursts ended.
        assert_eq!(server.layer.in_flight(), 0, "flights left running");
        // The layer's counters account for every request that reached it, once: as a flight's
        // leader, a follower, or a bypass. A follower a client saw released was counted as
        // released (some released followers' clients gave up before seeing it).
        let stats = server.layer.stats();
        let entered = *server.entered.borrow() as u64;
        assert_eq!(stats.leaders + stats.followers + stats.bypassed, entered, "{stats:?}");
        assert!(stats.released >= get(&t.released), "{stats:?}");
        assert!(stats.released <= stats.followers, "{stats:?}");
        assert_eq!(stats.fell_through, stats.released, "{stats:?}");
        // `/panic` handlers panic through the layer (caught outside it); a `/fail` 500 is a
        // response, not a failed call.
        assert!(stats.panics > 0 && stats.errors == 0, "{stats:?}");
        assert_eq!(stats.in_flight, 0, "{stats:?}");
    });
}

/// Debug builds (the CI run) make 20k requests; release 50k.
#[test]
fn http_load() {
    let requests = if cfg!(debug_assertions) {
        20_000
    } else {
        50_000
    };
    load(requests, 256);
}

/// The full size: 200k requests from 256 connections.
#[test]
#[ignore = "large: run with `cargo test --release --all-features --test http_load -- --ignored --nocapture`"]
fn http_load_full() {
    load(200_000, 256);
}
