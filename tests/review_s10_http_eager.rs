//! Review (session 10): the HTTP adapter's eager call (43c706a): a leader's and a bypassed
//! request's inner call is made in `CoalesceHttpService::call` when the inner clone is ready.
//! Black-box tests through the public API only: tower-test mocks and a scripted backend whose
//! readiness, panics, calls and future drops are counted. Every wait is bounded; nothing is
//! decided by a sleep.
#![cfg(feature = "http")]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service};
use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, ServedBy};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type MockReq = Request<Full<Bytes>>;
type MockRes = Response<Full<Bytes>>;

const WAIT: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("hangs: {what}"))
}

fn get(path: &str) -> MockReq {
    Request::get(path).body(Full::default()).unwrap()
}

async fn body_of(res: Response<CoalesceBody<Full<Bytes>>>) -> Bytes {
    res.into_body().collect().await.unwrap().to_bytes()
}

fn served(res: &Response<CoalesceBody<Full<Bytes>>>) -> ServedBy {
    *res.extensions().get::<ServedBy>().expect("ServedBy")
}

fn cache_status(res: &Response<CoalesceBody<Full<Bytes>>>) -> String {
    res.headers()
        .get_all("cache-status")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

fn ok(body: &'static str) -> MockRes {
    Response::new(Full::new(Bytes::from_static(body.as_bytes())))
}

/// Polls `f` once with a no-op waker.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
}

// ---------------------------------------------------------------------------------------------
// A scripted backend
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct St {
    /// Calls of `call` (requests that reached the backend).
    calls: AtomicUsize,
    /// Inner futures dropped before they completed (cancelled calls).
    cancelled: AtomicUsize,
    /// Inner futures dropped after they completed.
    completed: AtomicUsize,
    /// `poll_ready` answers `Pending` until set; its last waker is kept.
    not_ready: AtomicBool,
    ready_waker: Mutex<Option<Waker>>,
    /// One-shot faults.
    fail_ready: AtomicBool,
    panic_ready: AtomicBool,
    panic_call: AtomicBool,
    panic_clone_drop: AtomicBool,
    /// The next inner future's drop reports on `drop_started` and blocks until `drop_release`.
    block_drop: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

/// Answers `200 "<path> #<n>"`, holding calls with an `x-hold` header until `gate` opens;
/// `x-status`, `x-cookie` and `x-vary` shape the response.
#[derive(Clone)]
struct Backend {
    st: Arc<St>,
    gate: watch::Receiver<bool>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.st.panic_clone_drop.swap(false, SeqCst) && !std::thread::panicking() {
            panic!("clone drop panic");
        }
    }
}

fn backend() -> (Backend, Arc<St>, watch::Sender<bool>) {
    let st = Arc::new(St::default());
    let (tx, rx) = watch::channel(false);
    (
        Backend {
            st: st.clone(),
            gate: rx,
        },
        st,
        tx,
    )
}

struct Guard {
    st: Arc<St>,
    done: bool,
    block: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.done {
            self.st.completed.fetch_add(1, SeqCst);
            return;
        }
        if let Some((started, release)) = self.block.take() {
            started.send(()).unwrap();
            release.recv_timeout(WAIT).expect("drop released");
        }
        self.st.cancelled.fetch_add(1, SeqCst);
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<MockRes, BoxError>> + Send>>;

impl Service<MockReq> for Backend {
    type Response = MockRes;
    type Error = BoxError;
    type Future = BoxFut;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.st.panic_ready.swap(false, SeqCst) {
            panic!("poll_ready panic");
        }
        if self.st.fail_ready.swap(false, SeqCst) {
            return Poll::Ready(Err("not ready: broken".into()));
        }
        if self.st.not_ready.load(SeqCst) {
            *self.st.ready_waker.lock().unwrap() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: MockReq) -> BoxFut {
        if self.st.panic_call.swap(false, SeqCst) {
            panic!("call panic");
        }
        let n = self.st.calls.fetch_add(1, SeqCst) + 1;
        let mut guard = Guard {
            st: self.st.clone(),
            done: false,
            block: self.st.block_drop.lock().unwrap().take(),
        };
        let mut gate = self.gate.clone();
        Box::pin(async move {
            let h = req.headers();
            if h.contains_key("x-hold") {
                let _ = gate.wait_for(|open| *open).await;
            }
            let mut res = Response::builder().status(
                h.get("x-status")
                    .map(|s| s.to_str().unwrap().parse::<u16>().unwrap())
                    .unwrap_or(200),
            );
            if h.contains_key("x-cookie") {
                res = res.header("set-cookie", "id=1");
            }
            if let Some(v) = h.get("x-vary") {
                res = res.header("vary", v);
            }
            let body = format!("{} {} #{n}", req.method(), req.uri().path());
            guard.done = true;
            drop(guard);
            Ok(res.body(Full::new(Bytes::from(body))).unwrap())
        })
    }
}

impl St {
    fn set_ready(&self) {
        self.not_ready.store(false, SeqCst);
        if let Some(w) = self.ready_waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

fn req(path: &str, headers: &[(&str, &str)]) -> MockReq {
    let mut b = Request::get(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::default()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// tower-test idioms
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn mock_sees_leader_and_bypassed_post_at_call_time_responses_intact() {
    bounded("mock idioms", async {
        let (mock, mut handle) = tower_test::mock::pair::<MockReq, MockRes>();
        let mut svc = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .layer(mock);
        let leader = svc.call(get("/r"));
        let follower = svc.call(get("/r"));
        let post = svc.call(Request::post("/w").body(Full::default()).unwrap());
        let (r1, send1) = handle.next_request().await.unwrap();
        assert_eq!((r1.method(), r1.uri().path()), (&http::Method::GET, "/r"));
        let (r2, send2) = handle.next_request().await.unwrap();
        assert_eq!((r2.method(), r2.uri().path()), (&http::Method::POST, "/w"));
        assert!(
            handle.poll_request().is_pending(),
            "the follower made no call"
        );
        send2.send_response(ok("posted"));
        send1.send_response(ok("shared"));
        let post = post.await.unwrap();
        assert_eq!(served(&post), ServedBy::Bypass);
        assert!(
            cache_status(&post).contains("detail=method"),
            "{}",
            cache_status(&post)
        );
        assert_eq!(body_of(post).await, "posted");
        let (l, f) = tokio::join!(leader, follower);
        let (l, f) = (l.unwrap(), f.unwrap());
        assert_eq!(
            (served(&l), served(&f)),
            (ServedBy::Leader, ServedBy::Follower)
        );
        assert_eq!(body_of(l).await, "shared");
        assert_eq!(body_of(f).await, "shared");
        assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
    })
    .await;
}

#[tokio::test]
async fn mock_not_ready_is_not_called_early_and_the_flight_waker_drives_it() {
    bounded("not ready mock", async {
        let (mock, mut handle) = tower_test::mock::pair::<MockReq, MockRes>();
        handle.allow(0);
        let mut svc = CoalesceHttpLayer::new().layer(mock);
        let leader = svc.call(get("/r"));
        let follower = svc.call(get("/r"));
        let post = svc.call(Request::post("/w").body(Full::default()).unwrap());
        assert!(handle.poll_request().is_pending(), "not ready: not called");
        let tasks = tokio::spawn(async move { tokio::join!(leader, follower, post) });
        tokio::task::yield_now().await;
        assert!(handle.poll_request().is_pending(), "still not ready");
        handle.allow(1);
        let (r, send) = handle.next_request().await.unwrap();
        assert!(handle.poll_request().is_pending(), "one allowed, one call");
        handle.allow(1);
        let (r2, send2) = handle.next_request().await.unwrap();
        let mut paths = [r.uri().path().to_owned(), r2.uri().path().to_owned()];
        paths.sort();
        assert_eq!(paths, ["/r", "/w"]);
        send.send_response(ok("one"));
        send2.send_response(ok("one"));
        let (l, f, p) = tasks.await.unwrap();
        assert_eq!(body_of(l.unwrap()).await, "one");
        assert_eq!(body_of(f.unwrap()).await, "one");
        assert_eq!(body_of(p.unwrap()).await, "one");
        assert!(handle.poll_request().is_pending());
    })
    .await;
}

#[tokio::test]
async fn poll_ready_error_goes_to_the_leader_and_followers_make_their_own_calls() {
    bounded("poll_ready error", async {
        let (mock, mut handle) = tower_test::mock::pair::<MockReq, MockRes>();
        let mut svc = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .layer(mock);
        handle.send_error("no backend");
        let leader = svc.call(get("/r"));
        let f1 = svc.call(get("/r"));
        let f2 = svc.call(get("/r"));
        assert!(
            handle.poll_request().is_pending(),
            "readiness failed: no call"
        );
        let responder = async {
            for _ in 0..2 {
                let (r, send) = handle.next_request().await.unwrap();
                assert_eq!(r.uri().path(), "/r");
                send.send_response(ok("own"));
            }
        };
        let ((l, a, b), ()) = tokio::join!(async { tokio::join!(leader, f1, f2) }, responder);
        assert_eq!(l.unwrap_err().to_string(), "no backend");
        for f in [a.unwrap(), b.unwrap()] {
            assert_eq!(served(&f), ServedBy::Released);
            assert!(
                cache_status(&f).contains("detail=error"),
                "{}",
                cache_status(&f)
            );
            assert_eq!(body_of(f).await, "own");
        }
        assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Panics during the eager call
// ---------------------------------------------------------------------------------------------

async fn panics_during_the_eager_call(arm: fn(&St)) {
    let (be, st, gate) = backend();
    gate.send_replace(true);
    let mut svc = CoalesceHttpLayer::new().layer(be);
    arm(&st);
    let leader = AssertUnwindSafe(svc.call(get("/p"))).catch_unwind();
    let follower = svc.call(get("/p"));
    let (l, f) = bounded("panicked leader", async { tokio::join!(leader, follower) }).await;
    assert!(l.is_err(), "the leader panics");
    // A follower that joined a flight already ended is a leader of its own; either way served.
    let f = f.unwrap();
    assert_ne!(served(&f), ServedBy::Follower);
    assert_eq!(body_of(f).await, "GET /p #1");
    assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
    let again = bounded("again", svc.call(get("/p"))).await.unwrap();
    assert_eq!(served(&again), ServedBy::Leader);
    assert_eq!(body_of(again).await, "GET /p #2");
    assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
}

#[tokio::test]
async fn panic_in_poll_ready_during_the_eager_call() {
    panics_during_the_eager_call(|st| st.panic_ready.store(true, SeqCst)).await;
}

#[tokio::test]
async fn panic_in_call_during_the_eager_call() {
    panics_during_the_eager_call(|st| st.panic_call.store(true, SeqCst)).await;
}

#[tokio::test]
async fn panic_in_the_inner_clone_drop_during_the_eager_call() {
    // The clone's drop panics after the call was made: that call is cancelled, so the next
    // served request is call #2.
    let (be, st, gate) = backend();
    gate.send_replace(true);
    let mut svc = CoalesceHttpLayer::new().layer(be);
    st.panic_clone_drop.store(true, SeqCst);
    let leader = std::panic::catch_unwind(AssertUnwindSafe(|| svc.call(get("/p"))));
    if let Ok(leader) = leader {
        let l = bounded("leader", AssertUnwindSafe(leader).catch_unwind()).await;
        assert!(l.is_err(), "the leader panics");
    }
    assert_eq!(st.calls.load(SeqCst), 1);
    assert_eq!(st.cancelled.load(SeqCst), 1, "the call made is cancelled");
    assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
    let (a, b) = bounded("again", async {
        tokio::join!(svc.call(get("/p")), svc.call(get("/p")))
    })
    .await;
    assert_eq!(body_of(a.unwrap()).await, "GET /p #2");
    assert_eq!(body_of(b.unwrap()).await, "GET /p #2");
    assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Leaders dropped before their first poll
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn leader_dropped_before_first_poll_cancels_its_eager_call() {
    let (be, st, _gate) = backend();
    let mut svc = CoalesceHttpLayer::new().layer(be);
    let leader = svc.call(req("/d", &[("x-hold", "1")]));
    assert_eq!(st.calls.load(SeqCst), 1, "called in `call`");
    drop(leader);
    assert_eq!(st.cancelled.load(SeqCst), 1, "its call is cancelled");
    assert_eq!(svc.in_flight(), 0);
    // Bypassed too.
    let post = svc.call(Request::post("/w").body(Full::default()).unwrap());
    assert_eq!(st.calls.load(SeqCst), 2);
    drop(post);
    assert_eq!(st.cancelled.load(SeqCst), 2);
}

#[tokio::test]
async fn leader_dropped_before_first_poll_a_follower_takes_over_the_same_call() {
    bounded("takeover", async {
        let (be, st, gate) = backend();
        let mut svc = CoalesceHttpLayer::new().layer(be);
        let leader = svc.call(req("/d", &[("x-hold", "1")]));
        let follower = svc.call(req("/d", &[("x-hold", "1")]));
        drop(leader);
        assert_eq!(st.cancelled.load(SeqCst), 0, "handed to the follower");
        gate.send_replace(true);
        let f = follower.await.unwrap();
        assert_eq!(body_of(f).await, "GET /d #1");
        assert_eq!((st.calls.load(SeqCst), st.cancelled.load(SeqCst)), (1, 0));
        assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));

        // Not shareable: the follower that took over makes its own call.
        gate.send_replace(false);
        let leader = svc.call(req("/c", &[("x-hold", "1"), ("x-cookie", "1")]));
        let follower = svc.call(req("/c", &[("x-hold", "1"), ("x-cookie", "1")]));
        drop(leader);
        gate.send_replace(true);
        let f = follower.await.unwrap();
        assert_eq!(served(&f), ServedBy::Released);
        assert_eq!(body_of(f).await, "GET /c #3");
        assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
    })
    .await;
}

#[tokio::test]
async fn not_ready_backend_leader_dropped_makes_no_call() {
    let (be, st, _gate) = backend();
    st.not_ready.store(true, SeqCst);
    let mut svc = CoalesceHttpLayer::new().layer(be);
    let mut leader = svc.call(get("/n"));
    let mut follower = svc.call(get("/n"));
    assert_eq!(st.calls.load(SeqCst), 0);
    assert!(poll_once(&mut follower).is_pending());
    drop(leader);
    // The follower, now driving, polls readiness with its own waker.
    assert!(poll_once(&mut follower).is_pending());
    assert_eq!(st.calls.load(SeqCst), 0);
    st.set_ready();
    let f = bounded("follower", &mut follower).await.unwrap();
    assert_eq!(body_of(f).await, "GET /n #1");
    leader = svc.call(get("/n"));
    drop(leader);
    assert_eq!((st.calls.load(SeqCst), st.cancelled.load(SeqCst)), (2, 1));
}

// ---------------------------------------------------------------------------------------------
// ConcurrencyLimit below the layer
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn concurrency_limit_one_below_the_layer_in_any_await_order() {
    bounded("concurrency limit", async {
        let (be, st, _gate) = backend();
        let mut svc = CoalesceHttpLayer::new().layer(ConcurrencyLimit::new(be, 1));
        // `b` (and `c`) wait for the permit `a` took in `call`; awaited first, they are woken
        // when `a` completes.
        let a = svc.call(get("/a"));
        let b = svc.call(get("/b"));
        let c = svc.call(Request::post("/c").body(Full::default()).unwrap());
        assert_eq!(st.calls.load(SeqCst), 1);
        let (c, b, a) = tokio::join!(c, b, a);
        assert_eq!(body_of(a.unwrap()).await, "GET /a #1");
        let mut rest = [body_of(b.unwrap()).await, body_of(c.unwrap()).await];
        rest.sort();
        assert!(rest[0].ends_with(b"#2") || rest[0].ends_with(b"#3"));

        // A 500 releases the followers: their own calls need the leader's permit, freed by
        // the leader's call ending.
        let l = svc.call(req("/e", &[("x-status", "500")]));
        let f1 = svc.call(req("/e", &[("x-status", "500")]));
        let f2 = svc.call(req("/e", &[("x-status", "500")]));
        let (f2, f1, l) = tokio::join!(f2, f1, l);
        let (l, f1, f2) = (l.unwrap(), f1.unwrap(), f2.unwrap());
        assert_eq!(l.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            (served(&f1), served(&f2)),
            (ServedBy::Released, ServedBy::Released)
        );
        assert_eq!(st.calls.load(SeqCst), 6);
        assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Options: capacity, detached, follower timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn over_capacity_requests_are_called_eagerly_and_passed_on_unbuffered() {
    bounded("over capacity", async {
        let (mock, mut handle) = tower_test::mock::pair::<MockReq, MockRes>();
        let mut svc = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .max_in_flight(1)
            .max_followers(1)
            .layer(mock);
        let a = svc.call(get("/a"));
        let a2 = svc.call(get("/a"));
        let a3 = svc.call(get("/a")); // over max_followers
        let b = svc.call(get("/b")); // over max_in_flight
        let mut sends = Vec::new();
        for want in ["/a", "/a", "/b"] {
            let (r, send) = handle.next_request().await.unwrap();
            assert_eq!(r.uri().path(), want);
            sends.push(send);
        }
        assert!(handle.poll_request().is_pending());
        for (i, send) in sends.into_iter().enumerate() {
            send.send_response(ok(["a", "a-alone", "b-alone"][i]));
        }
        let (a, a2, a3, b) = tokio::join!(a, a2, a3, b);
        let (a, a2, a3, b) = (a.unwrap(), a2.unwrap(), a3.unwrap(), b.unwrap());
        assert_eq!(
            (served(&a), served(&a2)),
            (ServedBy::Leader, ServedBy::Follower)
        );
        for r in [&a3, &b] {
            assert_eq!(served(r), ServedBy::Bypass);
            assert_eq!(
                cache_status(r),
                "tower-coalesce; fwd=bypass; detail=over-capacity"
            );
        }
        assert_eq!(body_of(a3).await, "a-alone");
        assert_eq!(body_of(b).await, "b-alone");
        assert_eq!(body_of(a2).await, "a");
        assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
    })
    .await;
}

#[tokio::test]
async fn detached_flight_is_called_eagerly_and_completes_after_its_leader_left() {
    bounded("detached", async {
        let (be, st, gate) = backend();
        let mut svc = CoalesceHttpLayer::new().detached(true).layer(be);
        let leader = svc.call(req("/x", &[("x-hold", "1")]));
        assert_eq!(st.calls.load(SeqCst), 1);
        drop(leader);
        assert_eq!(st.cancelled.load(SeqCst), 0, "detached: not cancelled");
        gate.send_replace(true);
        let probe = svc.clone();
        while probe.in_flight() != 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            (st.completed.load(SeqCst), st.cancelled.load(SeqCst)),
            (1, 0)
        );
        let again = svc.call(get("/x")).await.unwrap();
        assert_eq!(body_of(again).await, "GET /x #2");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn follower_timeout_with_an_eager_leader() {
    let (be, st, gate) = backend();
    let mut svc = CoalesceHttpLayer::new()
        .cache_status_header(true)
        .follower_timeout(Duration::from_secs(1))
        .layer(be);
    let leader = svc.call(req("/t", &[("x-hold", "1")]));
    let follower = svc.call(get("/t"));
    assert_eq!(st.calls.load(SeqCst), 1);
    let leader = tokio::spawn(leader);
    let f = bounded("follower", follower).await.unwrap();
    assert_eq!(served(&f), ServedBy::Released);
    assert!(
        cache_status(&f).contains("detail=timeout"),
        "{}",
        cache_status(&f)
    );
    assert_eq!(body_of(f).await, "GET /t #2");
    gate.send_replace(true);
    let l = bounded("leader", leader).await.unwrap().unwrap();
    assert_eq!(body_of(l).await, "GET /t #1");
    assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Shareability: HEAD, Vary, Set-Cookie, 500
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn head_vary_and_unshareable_responses_release_followers() {
    bounded("shareability", async {
        let (be, st, gate) = backend();
        let mut svc = CoalesceHttpLayer::new().cache_status_header(true).layer(be);
        // HEAD and GET of one path: two flights, each called in `call`.
        let head = |svc: &mut tower_coalesce::http::CoalesceHttpService<Backend>| {
            svc.call(
                Request::head("/h")
                    .header("x-hold", "1")
                    .body(Full::default())
                    .unwrap(),
            )
        };
        let h1 = head(&mut svc);
        let h2 = head(&mut svc);
        let g = svc.call(req("/h", &[("x-hold", "1")]));
        assert_eq!(st.calls.load(SeqCst), 2);
        // Vary on a header not in the key: the follower with another value is released.
        let v1 = svc.call(req(
            "/v",
            &[("x-hold", "1"), ("x-vary", "x-lang"), ("x-lang", "en")],
        ));
        let v2 = svc.call(req(
            "/v",
            &[("x-hold", "1"), ("x-vary", "x-lang"), ("x-lang", "fr")],
        ));
        let v3 = svc.call(req(
            "/v",
            &[("x-hold", "1"), ("x-vary", "x-lang"), ("x-lang", "en")],
        ));
        // Set-Cookie and 500.
        let c1 = svc.call(req("/c", &[("x-hold", "1"), ("x-cookie", "1")]));
        let c2 = svc.call(req("/c", &[("x-hold", "1"), ("x-cookie", "1")]));
        let e1 = svc.call(req("/e", &[("x-hold", "1"), ("x-status", "500")]));
        let e2 = svc.call(req("/e", &[("x-hold", "1"), ("x-status", "500")]));
        assert_eq!(st.calls.load(SeqCst), 5);
        gate.send_replace(true);
        let (h1, h2, g, v1, v2, v3, c1, c2, e1, e2) =
            tokio::join!(h1, h2, g, v1, v2, v3, c1, c2, e1, e2);
        let (h1, h2) = (h1.unwrap(), h2.unwrap());
        assert_eq!(
            (served(&h1), served(&h2)),
            (ServedBy::Leader, ServedBy::Follower)
        );
        assert_eq!(served(&g.unwrap()), ServedBy::Leader);
        let (v1, v2, v3) = (v1.unwrap(), v2.unwrap(), v3.unwrap());
        assert_eq!(
            (served(&v1), served(&v2), served(&v3)),
            (ServedBy::Leader, ServedBy::Released, ServedBy::Follower)
        );
        assert!(cache_status(&v2).contains("detail=vary"));
        assert_eq!(body_of(v3).await, body_of(v1).await);
        let (c1, c2, e1, e2) = (c1.unwrap(), c2.unwrap(), e1.unwrap(), e2.unwrap());
        assert!(c1.headers().contains_key("set-cookie"));
        assert_eq!(served(&c2), ServedBy::Released);
        assert!(cache_status(&c2).contains("detail=set-cookie"));
        assert_eq!(e1.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(served(&e2), ServedBy::Released);
        assert_eq!(body_of(c1).await, "GET /c #4");
        assert_ne!(body_of(c2).await, "GET /c #4");
        assert_eq!(st.calls.load(SeqCst), 8);
        assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The gated case
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_new_flight_is_not_called_while_the_keys_cancelled_call_is_being_dropped() {
    let (be, st, gate) = backend();
    let mut svc = CoalesceHttpLayer::new().layer(be);
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    *st.block_drop.lock().unwrap() = Some((started_tx, release_rx));
    let old = svc.call(req("/g", &[("x-hold", "1")]));
    assert_eq!(st.calls.load(SeqCst), 1);
    let dropper = std::thread::spawn(move || drop(old));
    started_rx
        .recv_timeout(WAIT)
        .expect("the old call's drop began");
    // The key's cancelled call is still being dropped: the new flight is not called yet.
    let mut new = svc.call(get("/g"));
    assert_eq!(
        st.calls.load(SeqCst),
        1,
        "called while the old call is dropped"
    );
    assert!(poll_once(&mut new).is_pending());
    assert_eq!(
        st.calls.load(SeqCst),
        1,
        "polled while the old call is dropped"
    );
    release_tx.send(()).unwrap();
    dropper.join().unwrap();
    assert_eq!(st.cancelled.load(SeqCst), 1);
    gate.send_replace(true);
    let res = bounded("gated flight", new).await.unwrap();
    assert_eq!(body_of(res).await, "GET /g #2");
    assert_eq!((svc.in_flight(), svc.waiting()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// What the finished inner call holds while the flight buffers the body
// ---------------------------------------------------------------------------------------------

type StreamRes = Response<http_body_util::combinators::BoxBody<Bytes, BoxError>>;

/// `GET /stream` answers at once with a body fed by `POST /publish` (a relay, a long poll).
#[derive(Clone)]
struct Relay {
    tx: Arc<Mutex<Option<tokio::sync::mpsc::Sender<Bytes>>>>,
    rx: Arc<Mutex<Option<tokio::sync::mpsc::Receiver<Bytes>>>>,
}

impl Service<MockReq> for Relay {
    type Response = StreamRes;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<StreamRes, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: MockReq) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if req.method() == http::Method::POST {
                let tx = this.tx.lock().unwrap().take().expect("one publish");
                tx.send(Bytes::from_static(b"published")).await.unwrap();
                drop(tx);
                let body = BodyExt::boxed(Full::new(Bytes::new()).map_err(|e| match e {}));
                return Ok(Response::new(body));
            }
            let mut rx = this.rx.lock().unwrap().take().expect("one stream");
            let frames = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
                .map(|b| Ok::<_, BoxError>(http_body::Frame::data(b)));
            let body = BodyExt::boxed(http_body_util::StreamBody::new(frames));
            Ok(Response::new(body))
        })
    }
}

#[tokio::test]
async fn a_finished_call_releases_its_concurrency_permit_before_the_body_is_buffered() {
    // Without the layer (or with the lazy call of 3357407), ConcurrencyLimit's permit goes when
    // its response future is dropped, once the head is in: the publish below runs and the
    // stream's body completes. The eager `Flight` first kept `Eager::Called { fut }` until the
    // flight ended, through the body's buffering, and the publish waited for the permit for
    // ever; it now drops the call once it has the head.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let relay = Relay {
        tx: Arc::new(Mutex::new(Some(tx))),
        rx: Arc::new(Mutex::new(Some(rx))),
    };
    let mut svc = CoalesceHttpLayer::new().layer(ConcurrencyLimit::new(relay, 1));
    let stream = svc.call(get("/stream"));
    let publish = svc.call(Request::post("/publish").body(Full::default()).unwrap());
    let (s, p) = bounded("stream + publish under ConcurrencyLimit(1)", async {
        tokio::join!(stream, publish)
    })
    .await;
    p.unwrap();
    let body = s.unwrap().into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "published");
}

/// A bypassed request's response future, kept after it answered (to ask `served_by`, say), no
/// longer holds what its call reserved: its inner future is dropped once it has the response,
/// as tower's `Oneshot` drops it.
#[tokio::test]
async fn a_kept_bypass_future_releases_its_concurrency_permit() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = tower::service_fn({
        let calls = calls.clone();
        move |_req: MockReq| {
            calls.fetch_add(1, SeqCst);
            async { Ok::<_, std::convert::Infallible>(ok("done")) }
        }
    });
    let mut svc = CoalesceHttpLayer::new().layer(ConcurrencyLimit::new(inner, 1));
    let post = || Request::post("/w").body(Full::default()).unwrap();
    let mut first = Box::pin(svc.call(post()));
    let res = bounded("the first POST", first.as_mut()).await.unwrap();
    assert_eq!(served(&res), ServedBy::Bypass);
    // `first` is still alive: the second POST must get the permit all the same.
    let second = bounded("the second POST", svc.call(post())).await.unwrap();
    assert_eq!(body_of(second).await, "done");
    assert_eq!(calls.load(SeqCst), 2);
    drop(first);
}
