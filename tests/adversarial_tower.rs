//! Adversarial black-box tests: `CoalesceLayer` composed with tower's own middleware and held to
//! tower's service contract (readiness, clones, oneshot, call_all, Buffer, ConcurrencyLimit,
//! LoadShed, Timeout, Retry, Steer, Map*, boxing, CatchPanic, stacked coalescing layers).
//!
//! Deterministic: time is paused, backends wait on a gate or on a `tower_test` mock handle,
//! progress is observed through counters and `Stats`, and every wait is bounded so that a hang
//! fails instead of stalling.

use std::cell::Cell;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::load_shed::error::Overloaded;
use tower::timeout::error::Elapsed;
use tower::util::{BoxCloneService, BoxCloneSyncService, BoxService};
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_coalesce::{
    CoalesceError, CoalesceLayer, CoalesceService, Group, OnTimeout, Panicked, ResponseFuture,
    ServiceBuilderExt, Stats,
};
use tower_layer::Layer;
use tower_test::mock;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Virtual-time bound on any wait: a hang auto-advances the paused clock to here and fails.
const LIMIT: Duration = Duration::from_secs(24 * 3600);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// Lets the other tasks of this (current-thread) runtime run until `cond` holds. Time does not
/// move meanwhile: a yielding task keeps the paused clock from auto-advancing.
async fn settle(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never settled: {what}");
}

fn key(r: &&'static str) -> Option<&'static str> {
    Some(*r)
}

type KeyFn = fn(&&'static str) -> Option<&'static str>;

/// A gate backends wait on: closed until `open`.
#[derive(Clone, Debug)]
struct Gate(Arc<Semaphore>);

impl Gate {
    fn closed() -> Self {
        Gate(Arc::new(Semaphore::new(0)))
    }
    fn opened() -> Self {
        let gate = Gate::closed();
        gate.open();
        gate
    }
    async fn pass(&self) {
        self.0.acquire().await.unwrap().forget();
    }
    fn open(&self) {
        self.0.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

/// Counts a backend future dropped before it completed.
struct CancelGuard(Option<Arc<AtomicUsize>>);

impl CancelGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.fetch_add(1, SeqCst);
        }
    }
}

/// A backend that counts its calls and its cancelled calls; call `n` (from 1) of key `k`
/// answers `{name}{k}#{n}` after `delay` (virtual time) and once the gate is open.
#[derive(Clone, Debug)]
struct Backend {
    name: &'static str,
    calls: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    gate: Gate,
    delay: Duration,
}

impl Backend {
    fn gated(name: &'static str) -> Self {
        Backend {
            name,
            calls: Arc::default(),
            cancelled: Arc::default(),
            gate: Gate::closed(),
            delay: Duration::ZERO,
        }
    }
    fn sleeping(name: &'static str) -> Self {
        Backend {
            gate: Gate::opened(),
            delay: Duration::from_secs(1),
            ..Backend::gated(name)
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
    fn cancelled(&self) -> usize {
        self.cancelled.load(SeqCst)
    }
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl Service<&'static str> for Backend {
    type Response = String;
    type Error = Infallible;
    type Future = BoxFut<Result<String, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, k: &'static str) -> Self::Future {
        let n = self.calls.fetch_add(1, SeqCst) + 1;
        let mut guard = CancelGuard(Some(self.cancelled.clone()));
        let (gate, delay, name) = (self.gate.clone(), self.delay, self.name);
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            gate.pass().await;
            guard.disarm();
            Ok(format!("{name}{k}#{n}"))
        })
    }
}

/// An error type that is neither `Clone` nor `Copy`.
#[derive(Debug)]
struct Unclonable(String);

impl fmt::Display for Unclonable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unclonable: {}", self.0)
    }
}

impl StdError for Unclonable {}

// ---------------------------------------------------------------------------------------------
// Types and boxing
// ---------------------------------------------------------------------------------------------

#[allow(dead_code)]
fn assert_clone_send_sync_debug<T: Clone + Send + Sync + fmt::Debug + 'static>() {}
#[allow(dead_code)]
fn assert_send_debug_static<T: Send + fmt::Debug + 'static>() {}
#[allow(dead_code)]
fn assert_error<T: StdError + Clone + Send + Sync + 'static + Into<BoxError>>() {}
#[allow(dead_code)]
fn assert_layer<L: Layer<S> + Clone, S>() {}

/// Public types have the auto traits tower and axum need (compile time), and every boxed form
/// of the service (`BoxService`, `BoxCloneService`, `BoxCloneSyncService`) still coalesces.
#[tokio::test(start_paused = true)]
async fn public_types_are_send_sync_clone_debug_and_boxable() {
    type Layer0 = CoalesceLayer<KeyFn, &'static str>;
    type Svc = CoalesceService<Backend, KeyFn, &'static str>;
    assert_clone_send_sync_debug::<Layer0>();
    assert_clone_send_sync_debug::<Svc>();
    assert_send_debug_static::<ResponseFuture<Backend, &'static str, &'static str>>();
    assert_error::<CoalesceError>();
    assert_clone_send_sync_debug::<Group<&'static str>>();
    assert_clone_send_sync_debug::<Stats>();
    assert_clone_send_sync_debug::<OnTimeout>();
    fn panicked<T: StdError + Send + Sync + 'static>() {}
    panicked::<Panicked>();
    assert_layer::<Layer0, Backend>();

    let backend = Backend::sleeping("");
    let layer: Layer0 = CoalesceLayer::new(key as KeyFn);
    let boxed = BoxService::new(layer.layer(backend.clone()));
    let clone_boxed = BoxCloneService::new(layer.layer(backend.clone()));
    let sync_boxed = BoxCloneSyncService::new(layer.layer(backend.clone()));
    let (a, b, c, d) = bounded("boxed", async {
        tokio::join!(
            boxed.oneshot("k"),
            clone_boxed.clone().oneshot("k"),
            clone_boxed.oneshot("k"),
            sync_boxed.oneshot("k"),
        )
    })
    .await;
    for r in [a, b, c, d] {
        assert_eq!(r.unwrap(), "k#1");
    }
    assert_eq!(backend.calls(), 1, "the boxed services share one registry");
    assert_eq!(layer.group().in_flight(), 0);
}

/// A `Send` but `!Sync` response, request and inner future still give a `Send` response
/// future (it can be spawned, as axum and hyper do), and followers get clones.
#[tokio::test(start_paused = true)]
async fn non_sync_response_request_and_inner_future_still_spawn() {
    #[derive(Clone, Debug)]
    struct Req(Cell<u32>);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let backend = service_fn(move |r: Req| {
        c.fetch_add(1, SeqCst);
        let local = Cell::new(r.0.get() * 2); // held across an await: the future is !Sync
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, Infallible>(Cell::new(local.get()))
        }
    });
    let svc = CoalesceLayer::new(|r: &Req| Some(r.0.get())).layer(backend);
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(Req(Cell::new(21)))))
        .collect();
    for t in tasks {
        assert_eq!(bounded("spawned", t).await.unwrap().unwrap().get(), 42);
    }
    assert_eq!(calls.load(SeqCst), 1);
    let stats = svc.stats();
    assert_eq!((stats.leaders, stats.followers, stats.in_flight), (1, 3, 0));
}

// ---------------------------------------------------------------------------------------------
// poll_ready and tower's service contract
// ---------------------------------------------------------------------------------------------

/// `poll_ready` is ready although the inner mock never is; a clone that was never polled ready
/// may `call` (no "service not ready" panic in the mock); a follower joins the flight that is
/// still waiting for the inner service's readiness; once it is ready, exactly one request
/// reaches the backend and both get its answer.
#[tokio::test(start_paused = true)]
async fn ready_while_inner_is_not_and_followers_join_a_flight_waiting_for_readiness() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    handle.allow(0);
    let mut svc = CoalesceLayer::new(key).layer(inner);
    let ready = std::future::poll_fn(|cx| svc.poll_ready(cx)).now_or_never();
    assert!(matches!(ready, Some(Ok(()))), "always ready: {ready:?}");
    assert!(svc.ready().now_or_never().is_some());

    let mut leader = pin!(svc.call("k"));
    assert!(leader.is_leader());
    assert!(futures::poll!(leader.as_mut()).is_pending());
    assert!(handle.poll_request().is_pending(), "inner not ready yet");

    let mut never_readied = svc.clone();
    let mut follower = pin!(never_readied.call("k"));
    assert!(follower.is_follower());
    assert!(futures::poll!(follower.as_mut()).is_pending());

    handle.allow(1);
    let both = async { tokio::join!(leader.as_mut(), follower.as_mut()) };
    let mut both = pin!(both);
    assert!(futures::poll!(both.as_mut()).is_pending());
    let (req, send) = bounded("request", handle.next_request()).await.unwrap();
    assert_eq!(req, "k");
    send.send_response("v".to_string());
    let (a, b) = bounded("waiters", both).await;
    assert_eq!((a.unwrap(), b.unwrap()), ("v".to_string(), "v".to_string()));
    assert!(handle.poll_request().is_pending(), "one request only");
    assert_eq!(svc.in_flight(), 0);
}

/// The inner service dead (mock handle dropped: `poll_ready` errs `Closed`): the coalescing
/// service itself stays ready, and every waiter gets one shared `Closed` error.
#[tokio::test(start_paused = true)]
async fn inner_closed_error_is_shared_and_the_layer_stays_ready() {
    let (inner, handle) = mock::pair::<&'static str, String>();
    drop(handle);
    let mut svc = CoalesceLayer::new(key).layer(inner);
    assert!(matches!(
        std::future::poll_fn(|cx| svc.poll_ready(cx)).now_or_never(),
        Some(Ok(()))
    ));
    let leader = svc.call("k");
    let follower = svc.call("k");
    assert!(follower.is_follower());
    let (a, b) = bounded("waiters", async { tokio::join!(leader, follower) }).await;
    let (a, b) = (a.unwrap_err(), b.unwrap_err());
    let closed = a
        .downcast_ref::<mock::error::Closed>()
        .expect("Closed reachable");
    let closed_b = b.downcast_ref::<mock::error::Closed>().unwrap();
    assert!(std::ptr::eq(closed, closed_b), "one error, shared");
    assert!(!a.is_panic() && !a.is_timeout());
    assert_eq!(svc.stats().errors, 1);
    assert_eq!(svc.in_flight(), 0);
}

/// Readiness reserved, call made, then the service and its layer dropped: the pending waiters
/// do not depend on them and still get the answer; the registry empties.
#[tokio::test(start_paused = true)]
async fn dropping_the_service_and_layer_keeps_pending_waiters_alive() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    let layer = CoalesceLayer::new(key);
    let mut svc = layer.layer(inner);
    let group = svc.group().clone();
    let leader = svc.ready().await.unwrap().call("k");
    let follower = svc.clone().call("k");
    assert!(follower.is_follower());
    drop(svc);
    drop(layer);
    let (leader, follower) = (tokio::spawn(leader), tokio::spawn(follower));
    let (req, send) = bounded("request", handle.next_request()).await.unwrap();
    assert_eq!(req, "k");
    send.send_response("v".into());
    assert_eq!(bounded("leader", leader).await.unwrap().unwrap(), "v");
    assert_eq!(bounded("follower", follower).await.unwrap().unwrap(), "v");
    assert_eq!((group.in_flight(), group.len()), (0, 0));
}

/// An error the inner service returns after it was ready (and whose type is not `Clone`) is
/// one shared error; the failed flight is never joined again: the next request is a new call.
#[tokio::test(start_paused = true)]
async fn response_error_is_shared_and_never_joined_again() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    let mut svc = CoalesceLayer::new(key).layer(inner);
    let waiters: Vec<_> = (0..3).map(|_| svc.call("k")).collect();
    let waiters = tokio::spawn(join_all(waiters));
    let (_, send) = bounded("request", handle.next_request()).await.unwrap();
    send.send_error(Unclonable("backend down".into()));
    let results = bounded("waiters", waiters).await.unwrap();
    let first: *const Unclonable = results[0]
        .as_ref()
        .unwrap_err()
        .downcast_ref::<Unclonable>()
        .expect("inner error reachable by type");
    for r in &results {
        let e = r.as_ref().unwrap_err();
        let u = e.downcast_ref::<Unclonable>().unwrap();
        assert!(std::ptr::eq(u, first), "the same inner error");
        assert!(e.to_string().contains("backend down"), "{e}");
        assert!(e.source().is_some());
    }
    let again = tokio::spawn(svc.call("k"));
    let (req, send) = bounded("second request", handle.next_request())
        .await
        .unwrap();
    assert_eq!(req, "k");
    send.send_response("ok".into());
    assert_eq!(bounded("again", again).await.unwrap().unwrap(), "ok");
    let stats = svc.stats();
    assert_eq!((stats.leaders, stats.followers, stats.errors), (2, 2, 1));
}

/// All waiters dropped while the flight still waits for the inner service's readiness: the
/// reserved-but-unused inner clone goes, nothing ever reaches the backend, the key is free.
#[tokio::test(start_paused = true)]
async fn cancelled_while_waiting_for_readiness_never_reaches_the_backend() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    handle.allow(0);
    let mut svc = CoalesceLayer::new(key).layer(inner);
    {
        let mut leader = pin!(svc.call("k"));
        let mut follower = pin!(svc.call("k"));
        assert!(futures::poll!(leader.as_mut()).is_pending());
        assert!(futures::poll!(follower.as_mut()).is_pending());
        assert_eq!(svc.in_flight(), 1);
    }
    assert_eq!(svc.in_flight(), 0, "key freed when the last waiter left");
    handle.allow(1);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        handle.poll_request().is_pending(),
        "a cancelled flight must not call the backend once ready"
    );
    let again = tokio::spawn(svc.call("k"));
    let (req, send) = bounded("new flight", handle.next_request()).await.unwrap();
    assert_eq!(req, "k");
    send.send_response("fresh".into());
    assert_eq!(bounded("again", again).await.unwrap().unwrap(), "fresh");
    assert_eq!(svc.stats().cancelled, 1);
}

/// `call_all` (ordered and unordered) over a stream of identical requests: one backend call,
/// every item answered, in order.
#[tokio::test(start_paused = true)]
async fn call_all_coalesces_a_stream_of_identical_requests() {
    for unordered in [false, true] {
        let backend = Backend::gated("");
        let svc = CoalesceLayer::new(key).layer(backend.clone());
        let requests = futures::stream::iter(vec!["k"; 10]);
        let all = svc.clone().call_all(requests);
        let collector = async {
            if unordered {
                all.unordered().collect::<Vec<_>>().await
            } else {
                all.collect::<Vec<_>>().await
            }
        };
        let opener = async {
            settle("stream called", || svc.stats().followers == 9).await;
            assert_eq!(backend.calls(), 1);
            backend.gate.open();
        };
        let (out, ()) = bounded("collector", async { tokio::join!(collector, opener) }).await;
        assert_eq!(out.len(), 10);
        assert!(
            out.iter().all(|r| r.as_deref().unwrap() == "k#1"),
            "{out:?}"
        );
        assert_eq!((backend.calls(), svc.in_flight()), (1, 0));
    }
}

/// Requests are independent of the registry's scope: clones and second `layer` calls of one
/// layer share it; two `CoalesceService::new`, or a clone reconfigured with a registry option,
/// do not.
#[tokio::test(start_paused = true)]
async fn registry_scope_of_clones_layers_and_new() {
    let backend = Backend::sleeping("");
    let layer = CoalesceLayer::new(key);
    let a = layer.layer(backend.clone());
    let b = layer.clone().layer(backend.clone());
    let (x, y) = tokio::join!(a.oneshot("k"), b.oneshot("k"));
    assert_eq!((x.unwrap(), y.unwrap()), ("k#1".into(), "k#1".into()));
    assert_eq!(backend.calls(), 1);

    let c = CoalesceService::new(backend.clone(), key);
    let d = CoalesceService::new(backend.clone(), key);
    let (x, y) = tokio::join!(c.oneshot("k"), d.oneshot("k"));
    assert_ne!(x.unwrap(), y.unwrap());
    assert_eq!(backend.calls(), 3, "separate registries");

    let e = layer.layer(backend.clone());
    let f = layer.clone().max_followers(1_000).layer(backend.clone());
    let (x, y) = tokio::join!(e.oneshot("k"), f.oneshot("k"));
    assert_ne!(x.unwrap(), y.unwrap());
    assert_eq!(
        backend.calls(),
        5,
        "a registry option gives the clone its own registry"
    );
}

// ---------------------------------------------------------------------------------------------
// ConcurrencyLimit, LoadShed, Buffer
// ---------------------------------------------------------------------------------------------

/// `ConcurrencyLimit(1)` below: key `b`'s flight waits for the permit held by key `a`; its
/// leader gives up while waiting; its follower takes over, gets the permit once `a` is done,
/// and makes the one call for `b`.
#[tokio::test(start_paused = true)]
async fn leader_waiting_for_an_inner_permit_leaves_and_its_follower_takes_over() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(key))
        .concurrency_limit(1)
        .service(inner);
    let a = tokio::spawn(svc.clone().oneshot("a"));
    let (req_a, send_a) = bounded("a", handle.next_request()).await.unwrap();
    assert_eq!(req_a, "a");

    let mut s = svc.clone();
    let b_leader = s.call("b");
    let b_follower = s.call("b");
    assert!(b_follower.is_follower());
    let b_leader = tokio::spawn(b_leader);
    let b_follower = tokio::spawn(b_follower);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(handle.poll_request().is_pending(), "b waits for the permit");
    b_leader.abort();
    assert!(bounded("abort", b_leader).await.unwrap_err().is_cancelled());
    assert_eq!(svc.in_flight(), 2, "b's flight goes on for its follower");

    send_a.send_response("A".into());
    assert_eq!(bounded("a", a).await.unwrap().unwrap(), "A");
    let (req_b, send_b) = bounded("b request", handle.next_request()).await.unwrap();
    assert_eq!(req_b, "b");
    send_b.send_response("B".into());
    assert_eq!(
        bounded("b follower", b_follower).await.unwrap().unwrap(),
        "B"
    );
    assert!(handle.poll_request().is_pending());
    let stats = svc.stats();
    assert_eq!(
        (
            stats.leaders,
            stats.followers,
            stats.cancelled,
            stats.in_flight
        ),
        (2, 1, 0, 0)
    );
}

/// `ConcurrencyLimit(1)` below: a flight that holds the permit and is cancelled (all waiters
/// gone) drops the backend call and gives the permit back, so the next key is not starved.
#[tokio::test(start_paused = true)]
async fn cancelled_flight_gives_the_inner_permit_back() {
    let backend = Backend::gated("");
    let mut svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(key))
        .concurrency_limit(1)
        .service(backend.clone());
    {
        let mut a1 = pin!(svc.call("a"));
        let mut a2 = pin!(svc.call("a"));
        assert!(futures::poll!(a1.as_mut()).is_pending());
        assert!(futures::poll!(a2.as_mut()).is_pending());
        assert_eq!(backend.calls(), 1);
    }
    assert_eq!(backend.cancelled(), 1, "the backend call was dropped");
    assert_eq!(svc.in_flight(), 0);
    backend.gate.open();
    let b = bounded(
        "b after a cancelled permit holder",
        svc.clone().oneshot("b"),
    )
    .await;
    assert_eq!(b.unwrap(), "b#2");
    assert_eq!(svc.stats().cancelled, 1);
}

/// `ConcurrencyLimit(1)` above the layer serialises requests before they reach it, so a second
/// request for the same key waits for the permit and then starts a fresh flight (no stale join);
/// below the layer, the same two requests share one call.
#[tokio::test(start_paused = true)]
async fn concurrency_limit_above_serialises_below_coalesces() {
    let backend = Backend::gated("");
    let above = ServiceBuilder::new()
        .concurrency_limit(1)
        .coalesce(key)
        .service(backend.clone());
    let r1 = tokio::spawn(above.clone().oneshot("k"));
    let r2 = tokio::spawn(above.clone().oneshot("k"));
    settle("first call", || backend.calls() == 1).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        above.get_ref().stats().followers,
        0,
        "r2 waits for the permit"
    );
    backend.gate.open();
    assert_eq!(bounded("r1", r1).await.unwrap().unwrap(), "k#1");
    assert_eq!(bounded("r2", r2).await.unwrap().unwrap(), "k#2");

    let backend = Backend::gated("");
    let below = ServiceBuilder::new()
        .coalesce(key)
        .concurrency_limit(1)
        .service(backend.clone());
    let r1 = tokio::spawn(below.clone().oneshot("k"));
    let r2 = tokio::spawn(below.clone().oneshot("k"));
    settle("joined", || below.stats().followers == 1).await;
    backend.gate.open();
    assert_eq!(bounded("r1", r1).await.unwrap().unwrap(), "k#1");
    assert_eq!(bounded("r2", r2).await.unwrap().unwrap(), "k#1");
    assert_eq!(backend.calls(), 1);
}

/// `LoadShed` + `ConcurrencyLimit(1)` below: a flight that is shed gives every one of its
/// waiters the same `Overloaded`; the flight holding the permit is untouched; the shed key is
/// free at once.
#[tokio::test(start_paused = true)]
async fn load_shed_below_sheds_a_whole_flight_with_one_error() {
    let backend = Backend::gated("");
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(key))
        .load_shed()
        .concurrency_limit(1)
        .service(backend.clone());
    let a = tokio::spawn(svc.clone().oneshot("a"));
    settle("a called", || backend.calls() == 1).await;
    let mut s = svc.clone();
    let bs: Vec<_> = (0..4).map(|_| s.call("b")).collect();
    let shed = bounded("shed", join_all(bs)).await;
    let first: *const Overloaded = shed[0]
        .as_ref()
        .unwrap_err()
        .downcast_ref::<Overloaded>()
        .expect("Overloaded reachable");
    for r in &shed {
        let o = r
            .as_ref()
            .unwrap_err()
            .downcast_ref::<Overloaded>()
            .unwrap();
        assert!(std::ptr::eq(o, first));
    }
    assert_eq!(backend.calls(), 1);
    assert_eq!(svc.in_flight(), 1, "only a's flight is left");
    backend.gate.open();
    assert_eq!(bounded("a", a).await.unwrap().unwrap(), "a#1");
    assert_eq!(svc.clone().oneshot("b").await.unwrap(), "b#2");
    assert_eq!(svc.stats().errors, 1);
}

/// `LoadShed` above the layer never sheds: the layer is always ready, so requests (for the busy
/// key and for another key that waits for the inner permit) queue under it rather than fail.
#[tokio::test(start_paused = true)]
async fn load_shed_above_never_sheds_because_the_layer_is_always_ready() {
    let backend = Backend::gated("");
    let coalesced = ServiceBuilder::new()
        .coalesce(key)
        .concurrency_limit(1)
        .service(backend.clone());
    let group = coalesced.group().clone();
    let svc = ServiceBuilder::new().load_shed().service(coalesced);
    let a1 = tokio::spawn(svc.clone().oneshot("a"));
    settle("a called", || backend.calls() == 1).await;
    let a2 = tokio::spawn(svc.clone().oneshot("a"));
    let b1 = tokio::spawn(svc.clone().oneshot("b"));
    let b2 = tokio::spawn(svc.clone().oneshot("b"));
    settle("joined", || group.stats().followers == 2).await;
    backend.gate.open();
    let mut out = Vec::new();
    for t in [a1, a2, b1, b2] {
        out.push(
            bounded("waiter", t)
                .await
                .unwrap()
                .map_err(|e| e.to_string()),
        );
    }
    assert_eq!(
        out,
        vec![
            Ok("a#1".to_string()),
            Ok("a#1".to_string()),
            Ok("b#2".to_string()),
            Ok("b#2".to_string())
        ]
    );
}

/// `Buffer(1)` above: the buffer's worker hands each request to the layer and moves on (the
/// layer is always ready), so ten callers of one key never back up behind the leader's call.
#[tokio::test(start_paused = true)]
async fn buffer_of_one_above_does_not_serialise_followers() {
    let backend = Backend::gated("");
    let inner = CoalesceLayer::new(key).layer(backend.clone());
    let stats = inner.group().clone();
    let buffered = ServiceBuilder::new().buffer(1).service(inner);
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(buffered.clone().oneshot("k")))
        .collect();
    settle("all joined", || stats.stats().followers == 9).await;
    backend.gate.open();
    for t in tasks {
        assert_eq!(bounded("waiter", t).await.unwrap().unwrap(), "k#1");
    }
    assert_eq!((backend.calls(), stats.in_flight()), (1, 0));
}

/// `Buffer` above: a caller that leaves after its request was dispatched does not disturb the
/// others; when every caller leaves, the backend call is dropped and the key freed.
#[tokio::test(start_paused = true)]
async fn buffer_above_callers_leaving() {
    let backend = Backend::gated("");
    let inner = CoalesceLayer::new(key).layer(backend.clone());
    let group = inner.group().clone();
    let buffered = ServiceBuilder::new().buffer(8).service(inner);

    let leader = tokio::spawn(buffered.clone().oneshot("k"));
    settle("leader called", || backend.calls() == 1).await;
    let follower = tokio::spawn(buffered.clone().oneshot("k"));
    settle("follower joined", || group.stats().followers == 1).await;
    leader.abort();
    assert!(bounded("abort", leader).await.unwrap_err().is_cancelled());
    backend.gate.open();
    assert_eq!(bounded("follower", follower).await.unwrap().unwrap(), "k#1");
    assert_eq!(backend.calls(), 1);

    let backend = Backend::gated("");
    let inner = CoalesceLayer::new(key).layer(backend.clone());
    let group = inner.group().clone();
    let buffered = ServiceBuilder::new().buffer(8).service(inner);
    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(buffered.clone().oneshot("k")))
        .collect();
    settle("all joined", || group.stats().followers == 2).await;
    assert_eq!(backend.calls(), 1);
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        assert!(bounded("abort", t).await.unwrap_err().is_cancelled());
    }
    assert_eq!(backend.cancelled(), 1, "the backend call was dropped");
    assert_eq!((group.in_flight(), group.len()), (0, 0));
    assert_eq!(group.stats().cancelled, 1);
}

/// `Buffer` below: the flight holds the buffer's response future, so when every waiter leaves
/// the backend call (run by the buffer's worker) is dropped too.
#[tokio::test(start_paused = true)]
async fn buffer_below_cancellation_reaches_the_backend() {
    let backend = Backend::gated("");
    let svc = ServiceBuilder::new()
        .coalesce(key)
        .buffer(4)
        .service(backend.clone());
    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot("k")))
        .collect();
    settle("called", || {
        backend.calls() == 1 && svc.stats().followers == 2
    })
    .await;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        assert!(bounded("abort", t).await.unwrap_err().is_cancelled());
    }
    settle("backend call dropped", || backend.cancelled() == 1).await;
    assert_eq!(svc.in_flight(), 0);
    backend.gate.open();
    assert_eq!(svc.clone().oneshot("k").await.unwrap(), "k#2");
}

// ---------------------------------------------------------------------------------------------
// Timeout, select!, Retry
// ---------------------------------------------------------------------------------------------

/// `Timeout` above: when every waiter times out the backend call is dropped, the flight counts
/// as cancelled, and the key is free for a fresh call.
#[tokio::test(start_paused = true)]
async fn timeout_above_every_waiter_timing_out_cancels_the_call() {
    let backend = Backend::gated("");
    let svc = CoalesceLayer::new(key).layer(backend.clone());
    let timed = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(svc.clone());
    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(timed.clone().oneshot("k")))
        .collect();
    for t in tasks {
        let err = bounded("timed out", t).await.unwrap().unwrap_err();
        assert!(err.is::<Elapsed>(), "{err}");
    }
    assert_eq!(backend.cancelled(), 1);
    let stats = svc.stats();
    assert_eq!(
        (
            stats.leaders,
            stats.followers,
            stats.cancelled,
            stats.in_flight
        ),
        (1, 2, 1, 0)
    );
    backend.gate.open();
    assert_eq!(timed.clone().oneshot("k").await.unwrap(), "k#2");
}

/// `Timeout` below: the inner deadline belongs to the flight, not to a waiter. The leader
/// leaves at 2s; the follower that takes over gets the same call's `Elapsed` at 5s after the
/// call started (not 5s after it took over, which would mean a second call).
#[tokio::test(start_paused = true)]
async fn timeout_below_leader_leaves_follower_inherits_the_same_deadline() {
    let backend = Backend::gated("");
    let svc = ServiceBuilder::new()
        .coalesce(key)
        .timeout(Duration::from_secs(5))
        .service(backend.clone());
    let t0 = Instant::now();
    let leader = tokio::spawn(svc.clone().oneshot("k"));
    settle("leader called", || backend.calls() == 1).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    let follower = tokio::spawn(svc.clone().oneshot("k"));
    settle("follower joined", || svc.stats().followers == 1).await;
    leader.abort();
    assert!(bounded("abort", leader).await.unwrap_err().is_cancelled());
    let err = bounded("follower", follower).await.unwrap().unwrap_err();
    assert!(err.downcast_ref::<Elapsed>().is_some(), "{err}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_millis(5_050),
        "waited {waited:?}"
    );
    assert_eq!((backend.calls(), backend.cancelled()), (1, 1));
    assert_eq!(svc.in_flight(), 0);
}

/// A leader that loses a `select!` against a timer is dropped mid-flight: its follower still
/// gets the answer of the one request the backend saw.
#[tokio::test(start_paused = true)]
async fn leader_lost_in_select_follower_served_by_the_same_call() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    let mut svc = CoalesceLayer::new(key).layer(inner);
    let leader = svc.call("k");
    let follower = tokio::spawn(svc.call("k"));
    tokio::select! {
        _ = leader => panic!("the backend has not answered"),
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
    let (req, send) = bounded("request", handle.next_request()).await.unwrap();
    assert_eq!(req, "k");
    send.send_response("v".into());
    assert_eq!(bounded("follower", follower).await.unwrap().unwrap(), "v");
    assert!(handle.poll_request().is_pending(), "one request only");
    let stats = svc.stats();
    assert_eq!((stats.leaders, stats.cancelled, stats.in_flight), (1, 0, 0));
}

/// The leader's own task panics (handler code after a first poll, not the inner service): the
/// leader's future is dropped while unwinding, and its follower takes the call over and gets
/// the one backend call's answer.
#[tokio::test(start_paused = true)]
async fn leader_task_panicking_after_a_poll_leaves_the_flight_to_its_follower() {
    let backend = Backend::gated("");
    let mut svc = CoalesceLayer::new(key).layer(backend.clone());
    let leader = svc.call("k");
    let follower = tokio::spawn(svc.call("k"));
    let mut leader = Box::pin(leader);
    let mut polled = false;
    let crashing = tokio::spawn(std::future::poll_fn(move |cx| {
        if !polled {
            polled = true;
            assert!(leader.as_mut().poll(cx).is_pending());
            cx.waker().wake_by_ref();
            return Poll::<()>::Pending;
        }
        panic!("handler bug after polling the leader");
    }));
    assert!(bounded("crash", crashing).await.unwrap_err().is_panic());
    assert_eq!(backend.calls(), 1);
    backend.gate.open();
    assert_eq!(bounded("follower", follower).await.unwrap().unwrap(), "k#1");
    assert_eq!((backend.calls(), backend.cancelled()), (1, 0));
    assert_eq!((svc.in_flight(), svc.group().len()), (0, 0));
    assert_eq!(bounded("again", svc.call("k")).await.unwrap(), "k#2");
}

/// A `tower::retry` policy that retries each request once on error.
#[derive(Clone)]
struct RetryOnce(bool);

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for RetryOnce {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        if result.is_err() && !self.0 {
            self.0 = true;
            Some(std::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// `Retry` above, the inner service's *readiness* failing once: every waiter gets that error,
/// each retries, and the retries form one new flight: the backend sees one request.
#[tokio::test(start_paused = true)]
async fn retry_above_a_readiness_error_retries_as_one_flight() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    handle.send_error(Unclonable("not ready".into()));
    let svc = CoalesceLayer::new(key).layer(inner);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        // `call` now (the layer is always ready): all three wait on the first flight.
        let mut retrying = tower::retry::Retry::new(RetryOnce(false), svc.clone());
        tasks.push(tokio::spawn(retrying.ready().await.unwrap().call("k")));
    }
    assert_eq!(svc.stats().followers, 2);
    let (req, send) = bounded("retried request", handle.next_request())
        .await
        .unwrap();
    assert_eq!(req, "k");
    send.send_response("v".into());
    for t in tasks {
        assert_eq!(bounded("retrying", t).await.unwrap().unwrap(), "v");
    }
    assert!(handle.poll_request().is_pending(), "one retried request");
    let stats = svc.stats();
    assert_eq!(
        (
            stats.leaders,
            stats.followers,
            stats.errors,
            stats.in_flight
        ),
        (2, 4, 1, 0)
    );
}

// ---------------------------------------------------------------------------------------------
// Map*, Steer, response types, nesting
// ---------------------------------------------------------------------------------------------

/// `MapRequest` below runs once per flight (followers' requests never reach it); `MapResponse`
/// above runs once per waiter; `MapRequest` above decides the key.
#[tokio::test(start_paused = true)]
async fn map_layers_run_per_flight_below_and_per_waiter_above() {
    let backend = Backend::sleeping("");
    let (req_maps, rsp_maps) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (q, r) = (req_maps.clone(), rsp_maps.clone());
    let svc = ServiceBuilder::new()
        .map_response(move |s: String| {
            r.fetch_add(1, SeqCst);
            s.len()
        })
        .map_request(|k: &'static str| if k == "K" { "k" } else { k })
        .coalesce(key)
        .map_request(move |k: &'static str| {
            q.fetch_add(1, SeqCst);
            k
        })
        .service(backend.clone());
    let waiters = ["k", "K", "k", "K", "k"].map(|k| svc.clone().oneshot(k));
    let out = bounded("waiters", join_all(waiters)).await;
    assert!(out.iter().all(|r| *r.as_ref().unwrap() == "k#1".len()));
    assert_eq!(
        backend.calls(),
        1,
        "\"K\" was mapped to \"k\" above the layer"
    );
    assert_eq!(
        req_maps.load(SeqCst),
        1,
        "map_request below: once per flight"
    );
    assert_eq!(
        rsp_maps.load(SeqCst),
        5,
        "map_response above: once per waiter"
    );
}

/// One layer wrapping two routes (`Steer`) shares one registry, as documented: a key that does
/// not name the route lets route `b` receive route `a`'s response; a key that does keeps them
/// apart.
#[tokio::test(start_paused = true)]
async fn steer_over_one_layer_needs_the_route_in_the_key() {
    type Req = (usize, &'static str);
    #[derive(Clone)]
    struct Route(Backend);
    impl Service<Req> for Route {
        type Response = String;
        type Error = Infallible;
        type Future = BoxFut<Result<String, Infallible>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            self.0.poll_ready(cx)
        }
        fn call(&mut self, (_, k): Req) -> Self::Future {
            self.0.call(k)
        }
    }
    fn pick<S>(r: &Req, _: &[S]) -> usize {
        r.0
    }

    let (a, b) = (Backend::sleeping("A:"), Backend::sleeping("B:"));
    let layer = CoalesceLayer::new(|r: &Req| Some(r.1));
    let mut steer = tower::steer::Steer::new(
        [layer.layer(Route(a.clone())), layer.layer(Route(b.clone()))],
        pick,
    );
    let x = steer.ready().await.unwrap().call((0, "k"));
    let y = steer.ready().await.unwrap().call((1, "k"));
    let (x, y) = tokio::join!(x, y);
    assert_eq!((x.unwrap(), y.unwrap()), ("A:k#1".into(), "A:k#1".into()));
    assert_eq!(
        (a.calls(), b.calls()),
        (1, 0),
        "documented: routes share the registry"
    );

    let layer = CoalesceLayer::new(|r: &Req| Some(*r));
    let mut steer = tower::steer::Steer::new(
        [layer.layer(Route(a.clone())), layer.layer(Route(b.clone()))],
        pick,
    );
    let x = steer.ready().await.unwrap().call((0, "k"));
    let y = steer.ready().await.unwrap().call((1, "k"));
    let (x, y) = tokio::join!(x, y);
    assert_eq!((x.unwrap(), y.unwrap()), ("A:k#2".into(), "B:k#1".into()));
}

/// One layer wrapping services of different response types: equal keys never meet across
/// them ("flights of different output types never meet").
#[tokio::test(start_paused = true)]
async fn one_layer_over_different_response_types_never_mixes_them() {
    let strings = Backend::sleeping("");
    let lens = Backend::sleeping("");
    let layer = CoalesceLayer::new(key);
    let s = layer.layer(strings.clone());
    let n = layer.layer(lens.clone().map_response(|s: String| s.len() as u64));
    let (a, b, c, d) = tokio::join!(
        s.clone().oneshot("k"),
        n.clone().oneshot("k"),
        s.oneshot("k"),
        n.oneshot("k")
    );
    assert_eq!(
        (a.unwrap(), c.unwrap()),
        ("k#1".to_string(), "k#1".to_string())
    );
    assert_eq!((b.unwrap(), d.unwrap()), (3, 3));
    assert_eq!((strings.calls(), lens.calls()), (1, 1));
    let stats = layer.group().stats();
    assert_eq!((stats.leaders, stats.followers, stats.in_flight), (2, 2, 0));
}

/// A flight's backend calls the same coalescing service for another key (no lock is held
/// while the inner service runs): an outside request for that key joins the nested flight.
#[tokio::test(start_paused = true)]
async fn nested_request_from_inside_a_flight_coalesces_with_outside_callers() {
    type Boxed = BoxCloneService<String, String, CoalesceError>;
    let slot: Arc<Mutex<Option<Boxed>>> = Arc::default();
    let gate = Gate::closed();
    let inner_calls = Arc::new(AtomicUsize::new(0));
    let (sl, g, ic) = (slot.clone(), gate.clone(), inner_calls.clone());
    let backend = service_fn(move |k: String| {
        let (slot, gate, inner_calls) = (sl.clone(), g.clone(), ic.clone());
        async move {
            if k == "outer" {
                let me = slot.lock().unwrap().clone().expect("installed");
                let v = me
                    .oneshot("inner".to_string())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(format!("outer({v})"))
            } else {
                inner_calls.fetch_add(1, SeqCst);
                gate.pass().await;
                Ok(format!("{k}-v"))
            }
        }
    });
    let svc = CoalesceLayer::new(|k: &String| Some(k.clone())).layer(backend);
    *slot.lock().unwrap() = Some(BoxCloneService::new(svc.clone()));
    let outer = tokio::spawn(svc.clone().oneshot("outer".to_string()));
    settle("nested call made", || inner_calls.load(SeqCst) == 1).await;
    let direct = tokio::spawn(svc.clone().oneshot("inner".to_string()));
    settle("direct joined", || svc.stats().followers == 1).await;
    gate.open();
    assert_eq!(
        bounded("outer", outer).await.unwrap().unwrap(),
        "outer(inner-v)"
    );
    assert_eq!(bounded("direct", direct).await.unwrap().unwrap(), "inner-v");
    assert_eq!(inner_calls.load(SeqCst), 1);
    assert_eq!(svc.in_flight(), 0);
    slot.lock().unwrap().take(); // break the cycle
}

/// Two coalescing layers stacked with different keys: the outer one keeps one flight per exact
/// request, the inner one merges them by bucket into one backend call; an inner panic reaches
/// the outer waiters as an inner error that is itself a `CoalesceError` with `is_panic`.
#[tokio::test(start_paused = true)]
async fn stacked_layers_with_coarser_inner_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let backend = service_fn(move |n: u32| {
        c.fetch_add(1, SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if n >= 90 {
                panic!("bucket {} exploded", n / 10);
            }
            Ok::<_, Infallible>(format!("v{n}"))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(|n: &u32| Some(*n)))
        .layer(CoalesceLayer::new(|n: &u32| Some(*n / 10)))
        .service(backend);
    let out = join_all([11, 12, 13, 11].map(|n| svc.clone().oneshot(n))).await;
    assert!(
        out.iter().all(|r| r.as_deref().unwrap() == "v11"),
        "{out:?}"
    );
    assert_eq!(calls.load(SeqCst), 1);
    let (outer, inner) = (svc.stats(), svc.get_ref().stats());
    assert_eq!((outer.leaders, outer.followers), (3, 1));
    assert_eq!((inner.leaders, inner.followers), (1, 2));

    let out = join_all([99, 98].map(|n| svc.clone().oneshot(n))).await;
    for r in out {
        let e = r.unwrap_err();
        assert!(
            !e.is_panic(),
            "the outer layer's inner service returned an error"
        );
        let nested = e.downcast_ref::<CoalesceError>().expect("nested error");
        assert!(nested.is_panic());
        assert_eq!(nested.panic_message(), Some("bucket 9 exploded"));
    }
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!((svc.in_flight(), svc.get_ref().in_flight()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------------------------

/// `tower_http`'s `CatchPanic` below the layer turns a panic (in `call` or in its future) into
/// a 500 response, which is then shared like any response: one call, no panic counted.
#[tokio::test(start_paused = true)]
async fn catch_panic_below_turns_panics_into_one_shared_500() {
    use axum::http::{Request, Response, StatusCode};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let backend = service_fn(move |req: Request<()>| {
        c.fetch_add(1, SeqCst);
        if req.uri().path() == "/sync" {
            panic!("panicked in call");
        }
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if req.uri().path() == "/async" {
                panic!("panicked in the future");
            }
            Ok::<_, Infallible>(Response::new(String::from("fine")))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(|r: &Request<()>| {
            Some(r.uri().path().to_owned())
        }))
        .map_response(|r: Response<_>| r.status())
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .service(backend);
    let req = |p: &str| Request::get(p).body(()).unwrap();
    let paths = ["/sync", "/async", "/ok", "/sync", "/async", "/ok"];
    // Registered before any is polled: the `/sync` call answers on its first poll.
    let mut s = svc.clone();
    let out = join_all(paths.map(|p| s.call(req(p)))).await;
    let out: Vec<_> = out.into_iter().map(Result::unwrap).collect();
    let e500 = StatusCode::INTERNAL_SERVER_ERROR;
    assert_eq!(
        out,
        vec![e500, e500, StatusCode::OK, e500, e500, StatusCode::OK]
    );
    assert_eq!(calls.load(SeqCst), 3);
    let stats = svc.stats();
    assert_eq!((stats.panics, stats.errors, stats.followers), (0, 0, 3));
}

/// An inner service whose `poll_ready` panics once: every waiter of that flight gets a panic
/// error; the key and the service stay usable.
#[tokio::test(start_paused = true)]
async fn panic_in_inner_poll_ready_is_contained() {
    #[derive(Clone)]
    struct PanicReady(Arc<AtomicBool>, Backend);
    impl Service<&'static str> for PanicReady {
        type Response = String;
        type Error = Infallible;
        type Future = BoxFut<Result<String, Infallible>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.0.swap(false, SeqCst) {
                panic!("poll_ready exploded");
            }
            self.1.poll_ready(cx)
        }
        fn call(&mut self, k: &'static str) -> Self::Future {
            self.1.call(k)
        }
    }
    let backend = Backend::sleeping("");
    let mut svc =
        CoalesceLayer::new(key).layer(PanicReady(Arc::new(AtomicBool::new(true)), backend.clone()));
    let leader = svc.call("k");
    let follower = svc.call("k");
    let (a, b) = bounded("waiters", async { tokio::join!(leader, follower) }).await;
    for e in [a.unwrap_err(), b.unwrap_err()] {
        assert!(e.is_panic(), "{e}");
        assert_eq!(e.panic_message(), Some("poll_ready exploded"));
    }
    assert_eq!(bounded("again", svc.call("k")).await.unwrap(), "k#1");
    assert_eq!(svc.stats().panics, 1);
    assert_eq!(svc.in_flight(), 0);
}

/// An inner service whose `Clone` panics (once): the layer clones the inner service for each
/// flight, so that clone is the inner service's code, and its panic must be contained like any
/// other: an error for the waiters, the key reusable.
async fn panicking_inner_clone(layer: CoalesceLayer<KeyFn, &'static str>) {
    struct PanicClone(Arc<AtomicBool>, Backend);
    impl Clone for PanicClone {
        fn clone(&self) -> Self {
            if self.0.swap(false, SeqCst) {
                panic!("clone exploded");
            }
            PanicClone(self.0.clone(), self.1.clone())
        }
    }
    impl Service<&'static str> for PanicClone {
        type Response = String;
        type Error = Infallible;
        type Future = BoxFut<Result<String, Infallible>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            self.1.poll_ready(cx)
        }
        fn call(&mut self, k: &'static str) -> Self::Future {
            self.1.call(k)
        }
    }
    let backend = Backend::sleeping("");
    let armed = Arc::new(AtomicBool::new(true));
    let mut svc = layer.layer(PanicClone(armed.clone(), backend.clone()));
    let first = match catch_unwind(AssertUnwindSafe(|| svc.call("k"))) {
        Ok(first) => first,
        Err(_) => {
            // Report whether the registry survived the escaped panic, then fail.
            let after = bounded("after the escaped panic", svc.call("k")).await;
            panic!(
                "the inner service's clone panic escaped `call` (next call: {after:?}, \
                 in flight: {})",
                svc.in_flight()
            );
        }
    };
    let err = bounded("first", first).await.unwrap_err();
    assert!(err.is_panic(), "{err}");
    assert_eq!(err.panic_message(), Some("clone exploded"));
    assert!(!armed.load(SeqCst));
    assert_eq!(bounded("again", svc.call("k")).await.unwrap(), "k#1");
    assert_eq!(svc.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn panic_in_inner_clone_is_contained() {
    panicking_inner_clone(CoalesceLayer::new(key as KeyFn)).await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_inner_clone_is_contained_when_detached() {
    panicking_inner_clone(CoalesceLayer::new(key as KeyFn).detached(true)).await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_inner_clone_is_contained_with_follower_timeout() {
    panicking_inner_clone(
        CoalesceLayer::new(key as KeyFn).follower_timeout(Duration::from_secs(60)),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_inner_clone_is_contained_with_retry_failed() {
    panicking_inner_clone(CoalesceLayer::new(key as KeyFn).retry_failed(1)).await;
}

// ---------------------------------------------------------------------------------------------
// Wakers across tasks
// ---------------------------------------------------------------------------------------------

/// A waker that counts its wake-ups.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// `ConcurrencyLimit(1)` below: a follower of a flight that waits for the inner permit is not
/// woken when the permit frees up or the request goes out (that is its driver's business), only
/// once, when the response is published.
#[tokio::test(start_paused = true)]
async fn follower_is_woken_once_by_completion_not_by_inner_readiness() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    let svc = ServiceBuilder::new()
        .coalesce(key)
        .concurrency_limit(1)
        .service(inner);
    let a = tokio::spawn(svc.clone().oneshot("a"));
    let (_, send_a) = bounded("a", handle.next_request()).await.unwrap();

    let mut s = svc.clone();
    let b_leader = tokio::spawn(s.call("b"));
    let mut follower = Box::pin(s.call("b"));
    assert!(follower.is_follower());
    let count = Arc::new(CountingWaker::default());
    let waker = std::task::Waker::from(count.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(follower.as_mut().poll(&mut cx).is_pending());
    settle("b waits for the permit", || svc.in_flight() == 2).await;

    send_a.send_response("A".into());
    assert_eq!(bounded("a", a).await.unwrap().unwrap(), "A");
    let (req_b, send_b) = bounded("b", handle.next_request()).await.unwrap();
    assert_eq!(req_b, "b");
    assert_eq!(
        count.0.load(SeqCst),
        0,
        "not woken by the flight's progress"
    );
    send_b.send_response("B".into());
    assert_eq!(bounded("b leader", b_leader).await.unwrap().unwrap(), "B");
    assert_eq!(count.0.load(SeqCst), 1, "woken once, by the completion");
    match follower.as_mut().poll(&mut cx) {
        Poll::Ready(r) => assert_eq!(r.unwrap(), "B"),
        Poll::Pending => panic!("woken but not ready"),
    }
    assert_eq!(count.0.load(SeqCst), 1);
}

/// A follower first polled in one task and then moved into another (as `Buffer`, `spawn` after
/// a first `poll!`, or a `select!` loop handing it on do): the flight wakes the task that polled
/// it last, not the first one.
#[tokio::test(start_paused = true)]
async fn follower_moved_to_another_task_after_a_poll_is_woken_there() {
    let backend = Backend::gated("");
    let mut svc = CoalesceLayer::new(key).layer(backend.clone());
    let leader = tokio::spawn(svc.call("k"));
    settle("leader called", || backend.calls() == 1).await;
    let mut follower = Box::pin(svc.call("k"));
    assert!(follower.is_follower());
    let stale = Arc::new(CountingWaker::default());
    let stale_waker = std::task::Waker::from(stale.clone());
    assert!(follower
        .as_mut()
        .poll(&mut Context::from_waker(&stale_waker))
        .is_pending());
    let moved = tokio::spawn(follower);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    backend.gate.open();
    assert_eq!(bounded("leader", leader).await.unwrap().unwrap(), "k#1");
    assert_eq!(
        bounded("moved follower", moved).await.unwrap().unwrap(),
        "k#1"
    );
}

/// A follower that is neither polled nor dropped does not hold up its leader or the registry:
/// the leader completes, the key is free, and the follower's answer is ready when it is polled.
#[tokio::test(start_paused = true)]
async fn an_unpolled_follower_holds_up_nobody() {
    let backend = Backend::sleeping("");
    let mut svc = CoalesceLayer::new(key).layer(backend.clone());
    let leader = svc.call("k");
    let idle = svc.call("k");
    assert!(idle.is_follower());
    assert_eq!(bounded("leader", leader).await.unwrap(), "k#1");
    assert_eq!((svc.in_flight(), svc.group().len()), (0, 0));
    assert_eq!(bounded("new flight", svc.call("k")).await.unwrap(), "k#2");
    assert_eq!(idle.now_or_never().expect("ready").unwrap(), "k#1");
    assert_eq!(backend.calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// Many threads
// ---------------------------------------------------------------------------------------------

/// Many tasks on a multi-threaded runtime, five hot keys, `ConcurrencyLimit(2)` below and a
/// third of the callers aborted at once: every survivor gets its own key's answer, the
/// backend is never called more often than flights were started, and once every task has
/// ended the registry is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_threads_limit_below_with_aborted_callers() {
    const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let backend = service_fn(move |k: &'static str| {
        let n = c.fetch_add(1, SeqCst) + 1;
        async move {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            Ok::<_, Infallible>(format!("{k}#{n}"))
        }
    });
    let svc = ServiceBuilder::new()
        .coalesce(key)
        .concurrency_limit(2)
        .service(backend);
    let group = svc.group().clone();
    for round in 0..20 {
        let tasks: Vec<_> = (0..200)
            .map(|i| tokio::spawn(svc.clone().oneshot(KEYS[i % KEYS.len()])))
            .collect();
        for (i, t) in tasks.iter().enumerate() {
            if i % 3 == 0 {
                t.abort();
            }
        }
        let all = async {
            for (i, t) in tasks.into_iter().enumerate() {
                match t.await {
                    Ok(r) => {
                        let v = r.unwrap();
                        assert!(v.starts_with(KEYS[i % KEYS.len()]), "{i}: {v}");
                    }
                    Err(e) => assert!(e.is_cancelled() && i % 3 == 0, "{i}: {e}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .unwrap_or_else(|_| panic!("round {round} hung"));
        assert_eq!(
            (group.in_flight(), group.len()),
            (0, 0),
            "round {round}: registry not empty once every task ended"
        );
    }
    let stats = group.stats();
    assert!(calls.load(SeqCst) as u64 <= stats.leaders, "{stats:?}");
    assert_eq!(stats.in_flight, 0);
}
