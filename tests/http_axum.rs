//! The HTTP layer on a real axum server over 127.0.0.1, driven by a real hyper client.
//!
//! Synchronisation without sleeps: handlers wait on a gate that the test opens only once every
//! request has entered the coalescing layer (counted by a layer placed outside it, which sees
//! `call` return — the point where a request has joined or started its flight).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tower::{Layer, Service};
use tower_coalesce::http::CoalesceHttpLayer;

/// What every test shares: a count of handler calls, a gate handlers wait on, and a count of
/// requests that have entered the coalescing layer.
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
}

impl Backend {
    /// Counts the call, waits for the gate, returns this call's number (from 0).
    async fn enter(&self) -> usize {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open).await.expect("gate kept");
        n
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

struct Harness {
    addr: SocketAddr,
    backend: Backend,
    gate: watch::Sender<bool>,
    entered: watch::Receiver<usize>,
    /// The layer the app runs (with `Cache-Status` on), for its counters.
    layer: CoalesceHttpLayer,
}

impl Harness {
    /// Waits until `n` requests have entered the coalescing layer, then lets handlers answer.
    async fn open_when_entered(&mut self, n: usize) {
        self.entered
            .wait_for(|entered| *entered >= n)
            .await
            .expect("server alive");
        self.gate.send_replace(true);
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// Counts requests whose `call` into the wrapped service has returned.
#[derive(Clone)]
struct Entered<S> {
    inner: S,
    count: Arc<watch::Sender<usize>>,
}

impl<S: Service<Request<Body>>> Service<Request<Body>> for Entered<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> S::Future {
        let fut = self.inner.call(req);
        self.count.send_modify(|n| *n += 1);
        fut
    }
}

/// Serves `routes(backend)` behind `coalesce` (and `outer`, outside it) on 127.0.0.1:0.
async fn serve_with<L>(
    routes: impl FnOnce(Backend) -> Router,
    coalesce: CoalesceHttpLayer,
    outer: L,
) -> Harness
where
    L: Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
    L::Service: Service<Request<Body>, Error = Infallible> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request<Body>>>::Response: axum::response::IntoResponse + 'static,
    <L::Service as Service<Request<Body>>>::Future: Send + 'static,
{
    let (gate, gate_rx) = watch::channel(false);
    let (entered_tx, entered) = watch::channel(0usize);
    let backend = Backend {
        calls: Arc::new(AtomicUsize::new(0)),
        gate: gate_rx,
    };
    let count = Arc::new(entered_tx);
    // A changed option makes a new registry: this one is the layer whose counters count.
    let layer = coalesce.cache_status_header(true);
    // `Entered` must wrap the coalescing service directly: a `Router::layer` of its own would
    // put an axum `Route` in between, which calls the service only when first polled.
    let counted = tower::ServiceBuilder::new()
        .layer(tower::layer::layer_fn(move |inner| Entered {
            inner,
            count: count.clone(),
        }))
        .layer(layer.clone());
    let app = routes(backend.clone()).layer(counted).layer(outer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Harness {
        addr,
        backend,
        gate,
        entered,
        layer,
    }
}

async fn serve(routes: impl FnOnce(Backend) -> Router, coalesce: CoalesceHttpLayer) -> Harness {
    serve_with(routes, coalesce, tower::layer::util::Identity::new()).await
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
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
        std::str::from_utf8(&self.body).unwrap()
    }

    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }
}

/// Sends `reqs` all at once, each on the client's pool (one connection per request in
/// flight), and returns the replies in order; a failed exchange is an `Err`.
async fn fire(client: &HttpClient, reqs: Vec<Request<Empty<Bytes>>>) -> Vec<Result<Reply, String>> {
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let client = client.clone();
            tokio::spawn(async move {
                let res = client.request(req).await.map_err(|e| e.to_string())?;
                let (parts, body) = res.into_parts();
                let collected = body.collect().await.map_err(|e| e.to_string())?;
                let trailers = collected.trailers().cloned();
                Ok(Reply {
                    status: parts.status,
                    headers: parts.headers,
                    body: collected.to_bytes(),
                    trailers,
                })
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(tasks.len());
    for task in tasks {
        replies.push(task.await.expect("client task"));
    }
    replies
}

fn get_req(url: &str) -> Request<Empty<Bytes>> {
    Request::get(url).body(Empty::new()).unwrap()
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out: something hangs")
}

fn count(replies: &[Reply], cache_status: &str) -> usize {
    replies
        .iter()
        .filter(|r| r.cache_status() == cache_status)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_identical_gets_reach_the_handler_once() {
    bounded(async {
        const N: usize = 300;
        let mut h = serve(
            |b| {
                Router::new()
                    .route(
                        "/report",
                        get(|State(b): State<Backend>| async move {
                            format!("report #{}", b.enter().await)
                        }),
                    )
                    .with_state(b)
            },
            CoalesceHttpLayer::new(),
        )
        .await;
        let client = client();
        let url = h.url("/report");
        let replies = tokio::spawn({
            let client = client.clone();
            async move { fire(&client, (0..N).map(|_| get_req(&url)).collect()).await }
        });
        h.open_when_entered(N).await;
        let replies: Vec<Reply> = replies
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let mut st: Vec<String> = replies
            .iter()
            .map(|r| format!("{} {}", r.cache_status(), r.text()))
            .collect();
        st.sort();
        st.dedup();
        eprintln!("DEBUG {st:?}");
        assert_eq!(h.backend.calls(), 1, "{N} requests, one handler call");
        assert!(replies
            .iter()
            .all(|r| r.status == 200 && r.text() == "report #0"));
        assert_eq!(count(&replies, "tower-coalesce; fwd=miss"), 1);
        assert_eq!(
            count(&replies, "tower-coalesce; fwd=miss; collapsed"),
            N - 1
        );

        // After the burst the key is free: the next request calls the handler again.
        let again = fire(&client, vec![get_req(&h.url("/report"))]).await;
        assert_eq!(again[0].as_ref().unwrap().text(), "report #1");
    })
    .await
}

fn whoami_routes(b: Backend) -> Router {
    Router::new()
        .route(
            "/me",
            get(|State(b): State<Backend>, headers: HeaderMap| async move {
                b.enter().await;
                let who = headers["authorization"].to_str().unwrap().to_owned();
                format!("private page of {who}")
            }),
        )
        .with_state(b)
}

fn authed(url: &str, who: &str) -> Request<Empty<Bytes>> {
    Request::get(url)
        .header("authorization", format!("Bearer {who}"))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_never_get_each_others_body() {
    bounded(async {
        const N: usize = 100;
        let users = ["alice", "bob"];

        // No identity configured: every authorized request bypasses.
        let mut h = serve(whoami_routes, CoalesceHttpLayer::new()).await;
        let url = h.url("/me");
        let reqs = (0..N).map(|i| authed(&url, users[i % 2])).collect();
        let client = client();
        let replies = tokio::spawn(async move { fire(&client, reqs).await });
        h.open_when_entered(N).await;
        let replies: Vec<Reply> = replies
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(h.backend.calls(), N);
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(r.text(), format!("private page of Bearer {}", users[i % 2]));
            assert_eq!(
                r.cache_status(),
                "tower-coalesce; fwd=bypass; detail=credentials"
            );
        }

        // An identity (here the token itself, as if verified): coalesced per user, never across.
        let layer = CoalesceHttpLayer::new().identity(|parts: &http::request::Parts| {
            parts
                .headers
                .get("authorization")
                .map(|v| v.as_bytes().to_vec())
        });
        let mut h = serve(whoami_routes, layer).await;
        let url = h.url("/me");
        let reqs = (0..N).map(|i| authed(&url, users[i % 2])).collect();
        let client = self::client();
        let replies = tokio::spawn(async move { fire(&client, reqs).await });
        h.open_when_entered(N).await;
        let replies: Vec<Reply> = replies
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(h.backend.calls(), 2, "one call per user");
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(r.text(), format!("private page of Bearer {}", users[i % 2]));
        }
        assert_eq!(count(&replies, "tower-coalesce; fwd=miss"), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_and_private_responses_are_never_shared() {
    bounded(async {
        const N: usize = 50;
        let mut h = serve(
            |b| {
                Router::new()
                    .route(
                        "/login",
                        get(|State(b): State<Backend>| async move {
                            let n = b.enter().await;
                            (
                                [("set-cookie", format!("session={n}"))],
                                format!("welcome {n}"),
                            )
                        }),
                    )
                    .route(
                        "/account",
                        get(|State(b): State<Backend>| async move {
                            let n = b.enter().await;
                            (
                                [("cache-control", "private, max-age=60")],
                                format!("account {n}"),
                            )
                        }),
                    )
                    .with_state(b)
            },
            CoalesceHttpLayer::new(),
        )
        .await;
        let (login, account) = (h.url("/login"), h.url("/account"));
        let reqs = (0..2 * N)
            .map(|i| get_req(if i % 2 == 0 { &login } else { &account }))
            .collect();
        let client = client();
        let replies = tokio::spawn(async move { fire(&client, reqs).await });
        h.open_when_entered(2 * N).await;
        let replies: Vec<Reply> = replies
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(h.backend.calls(), 2 * N, "every request made its own call");
        let mut bodies: Vec<&str> = replies.iter().map(Reply::text).collect();
        bodies.sort_unstable();
        bodies.dedup();
        assert_eq!(bodies.len(), 2 * N, "no two requests got the same response");
        for r in replies.iter().filter(|r| r.text().starts_with("welcome")) {
            let n = r.text().strip_prefix("welcome ").unwrap();
            assert_eq!(
                r.headers["set-cookie"],
                format!("session={n}"),
                "cookie matches body"
            );
        }
        assert_eq!(
            count(&replies, "tower-coalesce; fwd=miss"),
            2,
            "one leader per path"
        );
        let released = replies
            .iter()
            .filter(|r| r.cache_status().contains("collapsed=?0"))
            .count();
        assert_eq!(released, 2 * N - 2);
        let stats = h.layer.stats();
        let followers = (2 * N - 2) as u64;
        assert_eq!(
            (stats.leaders, stats.followers, stats.released),
            (2, followers, followers),
            "{stats:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_always_bypasses() {
    bounded(async {
        const N: usize = 50;
        let mut h = serve(
            |b| {
                Router::new()
                    .route(
                        "/orders",
                        axum::routing::post(|State(b): State<Backend>| async move {
                            format!("order {}", b.enter().await)
                        }),
                    )
                    .with_state(b)
            },
            CoalesceHttpLayer::new(),
        )
        .await;
        let url = h.url("/orders");
        let reqs = (0..N)
            .map(|_| Request::post(&url).body(Empty::new()).unwrap())
            .collect();
        let client = client();
        let replies = tokio::spawn(async move { fire(&client, reqs).await });
        h.open_when_entered(N).await;
        let replies: Vec<Reply> = replies
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(h.backend.calls(), N);
        assert_eq!(
            count(&replies, "tower-coalesce; fwd=method; detail=method"),
            N
        );
        let stats = h.layer.stats();
        assert_eq!((stats.bypassed, stats.leaders), (N as u64, 0), "{stats:?}");
    })
    .await
}

/// A body of `len` bytes in 1 KiB chunks of unknown total length, tagged with the call number
/// at its start, with a trailer.
fn big_streamed_body(n: usize, len: usize) -> Body {
    let mut data = format!("call {n:04} ").into_bytes();
    data.extend((0..len - data.len()).map(|i| b'a' + (i % 26) as u8));
    let data = Bytes::from(data);
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = (0..len)
        .step_by(1024)
        .map(|start| Ok(Frame::data(data.slice(start..(start + 1024).min(len)))))
        .collect();
    Body::new(StreamBody::new(futures::stream::iter(frames)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_reaches_everyone_whole() {
    bounded(async {
        const N: usize = 20;
        const LEN: usize = 64 * 1024;
        let mut h = serve(
            |b| {
                Router::new()
                    .route(
                        "/big",
                        get(|State(b): State<Backend>| async move {
                            big_streamed_body(b.enter().await, LEN)
                        }),
                    )
                    .route(
                        "/big-known",
                        get(|State(b): State<Backend>| async move {
                            // Known length: judged from `Content-Length` without reading.
                            let n = b.enter().await;
                            let body = big_streamed_body(n, LEN).collect().await.unwrap();
                            body.to_bytes()
                        }),
                    )
                    .with_state(b)
            },
            CoalesceHttpLayer::new().max_body_bytes(16 * 1024),
        )
        .await;
        let (big, known) = (h.url("/big"), h.url("/big-known"));
        let reqs = (0..2 * N)
            .map(|i| get_req(if i % 2 == 0 { &big } else { &known }))
            .collect();
        let client = client();
        let replies = tokio::spawn(async move { fire(&client, reqs).await });
        h.open_when_entered(2 * N).await;
        let replies: Vec<Reply> = replies
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(h.backend.calls(), 2 * N, "nobody shares an oversized body");
        let mut tags = Vec::new();
        for r in &replies {
            assert_eq!(r.body.len(), LEN, "untruncated");
            let n: usize = r.text()[5..9].parse().unwrap();
            assert_eq!(
                r.body,
                big_streamed_body(n, LEN)
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
            );
            tags.push(n);
        }
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), 2 * N, "each got its own call's body");
        assert_eq!(
            count(&replies, "tower-coalesce; fwd=miss"),
            2,
            "the two leaders"
        );
        let released = count(
            &replies,
            "tower-coalesce; fwd=miss; collapsed=?0; detail=too-large",
        );
        assert_eq!(released, 2 * N - 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_survive_sharing_over_http2() {
    bounded(async {
        const N: usize = 40;
        let mut h = serve(
            |b| {
                Router::new()
                    .route(
                        "/checked",
                        get(|State(b): State<Backend>| async move {
                            let n = b.enter().await;
                            let mut trailers = HeaderMap::new();
                            trailers.insert("x-checksum", format!("sum-{n}").parse().unwrap());
                            let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                                Ok(Frame::data(Bytes::from("checked "))),
                                Ok(Frame::data(Bytes::from(format!("body {n}")))),
                                Ok(Frame::trailers(trailers)),
                            ];
                            Body::new(StreamBody::new(futures::stream::iter(frames)))
                        }),
                    )
                    .with_state(b)
            },
            CoalesceHttpLayer::new(),
        )
        .await;
        let url = h.url("/checked");
        let reqs = (0..N).map(|_| get_req(&url)).collect();
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let replies = tokio::spawn(async move { fire(&client, reqs).await });
        h.open_when_entered(N).await;
        let replies: Vec<Reply> = replies
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(h.backend.calls(), 1);
        for r in &replies {
            assert_eq!(r.text(), "checked body 0");
            let trailers = r.trailers.as_ref().expect("trailers arrive");
            assert_eq!(trailers["x-checksum"], "sum-0");
        }
    })
    .await
}

fn panicking_routes(b: Backend) -> Router {
    Router::new()
        .route(
            "/fragile",
            get(|State(b): State<Backend>| async move {
                let n = b.enter().await;
                if n == 0 {
                    panic!("handler exploded on call 0");
                }
                format!("fine {n}")
            }),
        )
        .with_state(b)
}

async fn panic_does_not_hang_followers(catch: bool) {
    const N: usize = 30;
    let layer = CoalesceHttpLayer::new();
    let mut h = if catch {
        serve_with(
            panicking_routes,
            layer,
            tower_http::catch_panic::CatchPanicLayer::new(),
        )
        .await
    } else {
        serve(panicking_routes, layer).await
    };
    let url = h.url("/fragile");
    let reqs = (0..N).map(|_| get_req(&url)).collect();
    let client = client();
    let replies = tokio::spawn(async move { fire(&client, reqs).await });
    h.open_when_entered(N).await;
    let replies = replies.await.unwrap();
    assert_eq!(
        h.backend.calls(),
        N,
        "the leader's call, then one per follower"
    );
    let fine: Vec<&Reply> = replies
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.status == 200)
        .collect();
    assert_eq!(fine.len(), N - 1, "every follower answered by its own call");
    assert!(fine.iter().all(|r| r.text().starts_with("fine ")));
    let leader: Vec<_> = replies
        .iter()
        .filter(|r| !matches!(r, Ok(r) if r.status == 200))
        .collect();
    assert_eq!(leader.len(), 1);
    match leader[0] {
        // CatchPanicLayer turned the leader's re-raised panic into a 500.
        Ok(r) => assert!(catch && r.status == 500, "{r:?}"),
        // No CatchPanicLayer: the connection task died, as it would without coalescing.
        Err(_) => assert!(!catch),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_behind_catch_panic_does_not_hang_followers() {
    bounded(panic_does_not_hang_followers(true)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_without_catch_panic_does_not_hang_followers() {
    bounded(panic_does_not_hang_followers(false)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_differences_are_not_shared() {
    bounded(async {
        const N: usize = 40;
        let mut h = serve(
            |b| {
                Router::new()
                    .route(
                        "/themed",
                        get(|State(b): State<Backend>, headers: HeaderMap| async move {
                            let n = b.enter().await;
                            let theme = headers["x-theme"].to_str().unwrap().to_owned();
                            ([("vary", "X-Theme")], format!("{theme} page {n}"))
                        }),
                    )
                    .with_state(b)
            },
            CoalesceHttpLayer::new(),
        )
        .await;
        let url = h.url("/themed");
        let themes = ["dark", "light"];
        let reqs = (0..N)
            .map(|i| {
                Request::get(&url)
                    .header("x-theme", themes[i % 2])
                    .body(Empty::new())
                    .unwrap()
            })
            .collect();
        let client = client();
        let replies = tokio::spawn(async move { fire(&client, reqs).await });
        h.open_when_entered(N).await;
        let replies: Vec<Reply> = replies
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // The leader's theme is shared with its half; the other half each call on their own.
        assert_eq!(h.backend.calls(), 1 + N / 2);
        for (i, r) in replies.iter().enumerate() {
            assert!(
                r.text().starts_with(&format!("{} page ", themes[i % 2])),
                "{}",
                r.text()
            );
        }
        let vary_miss = count(
            &replies,
            "tower-coalesce; fwd=vary-miss; collapsed=?0; detail=vary",
        );
        assert_eq!(vary_miss, N / 2);
    })
    .await
}

/// `route_layer`, and a `Router` called directly as a service (axum then applies the layer
/// again for every request): one registry all the same, and no `HandleErrorLayer` needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_layer_on_a_router_called_as_a_service() {
    use tower::ServiceExt;
    bounded(async {
        const N: usize = 100;
        let (gate, gate_rx) = watch::channel(false);
        let backend = Backend {
            calls: Arc::new(AtomicUsize::new(0)),
            gate: gate_rx,
        };
        let layer = CoalesceHttpLayer::new();
        let router: Router = Router::new()
            .route(
                "/hot",
                get(|State(b): State<Backend>| async move { format!("hot {}", b.enter().await) }),
            )
            .route_layer(layer.clone())
            .with_state(backend.clone());
        let tasks: Vec<_> = (0..N)
            .map(|_| {
                let req = Request::get("/hot").body(Body::empty()).unwrap();
                tokio::spawn(router.clone().oneshot(req))
            })
            .collect();
        // Wait (bounded) until every request has joined: one flight, N - 1 followers.
        let mut polls = 0;
        while (layer.in_flight(), layer.waiting()) != (1, N - 1) {
            polls += 1;
            assert!(polls < 1_000_000, "requests never joined");
            tokio::task::yield_now().await;
        }
        gate.send_replace(true);
        for task in tasks {
            let res = task.await.unwrap().unwrap();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hot 0");
        }
        assert_eq!(backend.calls(), 1);
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    })
    .await
}
