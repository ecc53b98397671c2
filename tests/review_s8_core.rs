//! Review (session 8, core): black-box tests of `CoalesceLayer` / `Group` through the public API
//! only, as a tower or axum user would stack them.
//!
//! Groups:
//! - composition with tower middleware not covered elsewhere: `RateLimit` behind `Buffer`
//!   below (the README's recipe), `GlobalConcurrencyLimit` below several services of one layer,
//!   `AsyncFilter` below, `Filter` above, `Buffer` above (errors through `BoxError`), `Retry`
//!   above with a policy that downcasts the shared error, `Steer` below, `Timeout` above and
//!   below at once, `BoxCloneService` on both sides across worker threads;
//! - `tower_test::mock` handles: one request per key in first-arrival order, the inner
//!   service's readiness driven by the flight alone, a leader dropped at every stage of its
//!   call under `ConcurrencyLimit(1)`;
//! - registry scope (`ServiceBuilder` reused), keys (`String`/`Arc<str>` forgotten by `&str`,
//!   tuples, a panicking `Hash`), the inner error's own source chain, panics under a
//!   concurrency limit, a panicking response destructor;
//! - runtimes: stampedes on `current_thread` and multi-thread runtimes, runtimes dropped with
//!   flights in flight, `LocalSet` waiters of detached flights;
//! - compile-time auto traits of the public types, and the `Stats` relations of `src/stats.rs`
//!   after a mixed workload.
//!
//! No sleep decides anything: time is paused (current-thread tests), backends wait on a
//! semaphore gate or a mock handle, and progress is read from counters and `Stats`. Every wait
//! is bounded, so a hang fails instead of stalling.

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::timeout::error::Elapsed;
use tower::util::BoxCloneService;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_coalesce::{
    CoalesceError, CoalesceLayer, CoalesceService, Group, GroupBuilder, OnTimeout, Panicked,
    ResponseFuture, Run, ServiceBuilderExt, Stats,
};
use tower_layer::Layer;
use tower_test::mock;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Virtual-time bound on a wait (paused clock): a hang auto-advances to here and fails.
const LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Real-time bound for multi-thread runtimes, reached only by a hang.
const REAL_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// Lets the other tasks run until `cond` holds (the paused clock does not move meanwhile).
async fn settle(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..100_000 {
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
type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Decrements a live-futures counter when a backend future is dropped (completed or not).
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, SeqCst);
        Live(n.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// A backend that records its calls in order; call `n` (from 1) of key `k` answers `v:k#n`
/// once its gate is open. `live` counts its futures not yet dropped.
#[derive(Clone, Debug)]
struct Backend {
    calls: Arc<Mutex<Vec<&'static str>>>,
    live: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl Backend {
    fn closed() -> Self {
        Backend {
            calls: Arc::default(),
            live: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
    fn opened() -> Self {
        let b = Backend::closed();
        b.open();
        b
    }
    fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS >> 4);
    }
    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn live(&self) -> usize {
        self.live.load(SeqCst)
    }
}

impl Service<&'static str> for Backend {
    type Response = String;
    type Error = Infallible;
    type Future = BoxFut<Result<String, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, k: &'static str) -> Self::Future {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(k);
            calls.iter().filter(|c| **c == k).count()
        };
        let live = Live::new(&self.live);
        let gate = self.gate.clone();
        Box::pin(async move {
            let _live = live;
            drop(gate.acquire().await.unwrap());
            Ok(format!("v:{k}#{n}"))
        })
    }
}

/// An error type that is neither `Clone` nor `Copy`.
#[derive(Debug)]
struct Unclonable(&'static str);

impl fmt::Display for Unclonable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unclonable: {}", self.0)
    }
}

impl StdError for Unclonable {}

/// Every request counted once, as `src/stats.rs` documents.
fn requests(s: &Stats) -> u64 {
    s.leaders - s.retried + s.followers + s.lingered + s.bypassed + s.over_capacity
}

/// The relations `src/stats.rs` documents, once the requests are done.
fn assert_stats_relations(s: &Stats, requests_made: u64) {
    assert_eq!(
        requests(s),
        requests_made,
        "each request counted once: {s:?}"
    );
    assert_eq!(
        s.fell_through,
        s.over_capacity + s.timed_out + s.released,
        "{s:?}"
    );
    assert!(s.timed_out + s.released <= s.followers, "{s:?}");
    assert!(s.errors + s.panics <= s.leaders, "{s:?}");
    assert!(s.cancelled <= s.leaders - s.retried, "{s:?}");
    assert_eq!(s.released, 0, "never for the tower layer: {s:?}");
    assert_eq!(s.in_flight, 0, "{s:?}");
}

fn walk_to<'a, E: StdError + 'static>(mut e: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    loop {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        e = e.source()?;
    }
}

// ---------------------------------------------------------------------------------------------
// Composition with tower middleware
// ---------------------------------------------------------------------------------------------

/// The README's recipe for a rate limit: `RateLimit` (not `Clone`) behind a `Buffer`, below the
/// layer. It then limits calls, not waiters: key `a`'s followers are answered by `a`'s call at
/// once, key `b`'s call waits for the limiter's next period, and the backend sees two calls.
#[tokio::test(start_paused = true)]
async fn rate_limit_behind_buffer_below_limits_calls_not_waiters() {
    let t0 = Instant::now();
    let seen: Arc<Mutex<Vec<(String, Duration)>>> = Arc::default();
    let s = seen.clone();
    let backend = service_fn(move |k: String| {
        s.lock().unwrap().push((k.clone(), t0.elapsed()));
        async move { Ok::<_, Infallible>(format!("v:{k}")) }
    });
    let svc = ServiceBuilder::new()
        .coalesce(|k: &String| Some(k.clone()))
        .buffer(8)
        .rate_limit(1, Duration::from_secs(10))
        .service(backend);

    let mut tasks = Vec::new();
    for k in ["a", "b", "a", "b", "a", "b"] {
        let mut s = svc.clone();
        // The layer is always ready: `call` registers the request now.
        let fut = s.call(k.to_string());
        tasks.push((k, tokio::spawn(async move { (fut.await, t0.elapsed()) })));
    }
    assert_eq!((svc.stats().leaders, svc.stats().followers), (2, 4));
    let mut done: HashMap<&str, Vec<Duration>> = HashMap::new();
    for (k, task) in tasks {
        let (out, at) = bounded("waiter", task).await.unwrap();
        assert_eq!(out.unwrap(), format!("v:{k}"));
        done.entry(k).or_default().push(at);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        ["a", "b"],
        "one call per key, in order"
    );
    assert!(
        seen[1].1 >= seen[0].1 + Duration::from_secs(10),
        "the limiter spaced the calls: {seen:?}"
    );
    assert!(
        done["a"].iter().all(|at| *at < seen[1].1),
        "a's followers did not wait for the limiter: {done:?} {seen:?}"
    );
    assert!(done["b"].iter().all(|at| *at >= seen[1].1));
    let stats = svc.stats();
    assert_stats_relations(&stats, 6);
    assert_eq!((stats.leaders, stats.followers), (2, 4));
}

/// A `GlobalConcurrencyLimitLayer(1)` below two services made by one coalescing layer (their
/// route in the key): each route's flight takes the one permit in turn, and its followers hold
/// none, so route `b`'s flight reaches its backend only once route `a`'s call is answered.
#[tokio::test(start_paused = true)]
async fn global_concurrency_limit_below_is_shared_by_every_service_of_one_layer() {
    type RReq = (u8, &'static str);
    let limit = GlobalConcurrencyLimitLayer::new(1);
    let layer = CoalesceLayer::new(|r: &RReq| Some(*r));
    let (ma, mut ha) = mock::pair::<RReq, String>();
    let (mb, mut hb) = mock::pair::<RReq, String>();
    let a = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(limit.clone())
        .service(ma);
    let b = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(limit)
        .service(mb);

    let mut a_tasks = Vec::new();
    let mut b_tasks = Vec::new();
    for _ in 0..3 {
        a_tasks.push(tokio::spawn(a.clone().call((0, "k"))));
    }
    for _ in 0..3 {
        b_tasks.push(tokio::spawn(b.clone().call((1, "k"))));
    }
    assert_eq!((layer.stats().leaders, layer.stats().followers), (2, 4));

    let (req, send_a) = bounded("a's request", ha.next_request()).await.unwrap();
    assert_eq!(req, (0, "k"));
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        hb.poll_request().is_pending(),
        "b's flight waits for the global permit"
    );
    send_a.send_response("A".into());
    for t in a_tasks {
        assert_eq!(bounded("a waiter", t).await.unwrap().unwrap(), "A");
    }
    let (req, send_b) = bounded("b's request", hb.next_request()).await.unwrap();
    assert_eq!(req, (1, "k"));
    send_b.send_response("B".into());
    for t in b_tasks {
        assert_eq!(bounded("b waiter", t).await.unwrap().unwrap(), "B");
    }
    assert!(ha.poll_request().is_pending() && hb.poll_request().is_pending());
    assert_stats_relations(&layer.stats(), 6);
}

#[derive(Debug)]
struct Rejected(&'static str);

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rejected {}", self.0)
    }
}

impl StdError for Rejected {}

/// `AsyncFilter` below the layer runs once per flight; its rejection is one error shared by
/// every waiter, reachable by type; an accepted flight reaches the backend once.
#[tokio::test(start_paused = true)]
async fn async_filter_below_runs_once_per_flight_and_its_rejection_is_shared() {
    let backend = Backend::opened();
    let checks = Arc::new(AtomicUsize::new(0));
    let c = checks.clone();
    let mut svc = ServiceBuilder::new()
        .coalesce(key)
        .filter_async(move |k: &'static str| {
            c.fetch_add(1, SeqCst);
            async move {
                tokio::task::yield_now().await;
                if k == "bad" {
                    Err(Rejected(k))
                } else {
                    Ok(k)
                }
            }
        })
        .service(backend.clone());
    let bad: Vec<_> = (0..4).map(|_| svc.call("bad")).collect();
    let good: Vec<_> = (0..4).map(|_| svc.call("good")).collect();
    let (bad, good) = bounded("waiters", async {
        tokio::join!(join_all(bad), join_all(good))
    })
    .await;

    let first: *const Rejected = bad[0]
        .as_ref()
        .unwrap_err()
        .downcast_ref::<Rejected>()
        .expect("the rejection is reachable by type");
    for r in &bad {
        let e = r.as_ref().unwrap_err();
        assert!(!e.is_panic() && !e.is_timeout());
        assert!(std::ptr::eq(e.downcast_ref::<Rejected>().unwrap(), first));
    }
    assert!(good.iter().all(|r| r.as_deref().unwrap() == "v:good#1"));
    assert_eq!(checks.load(SeqCst), 2, "the predicate ran once per flight");
    assert_eq!(backend.calls(), ["good"]);
    let stats = svc.stats();
    assert_eq!((stats.leaders, stats.followers, stats.errors), (2, 6, 1));
    assert_stats_relations(&stats, 8);
}

/// `Filter` above the layer: a rejected request never reaches the registry (no counter moves
/// for it), accepted ones coalesce as usual.
#[tokio::test(start_paused = true)]
async fn filter_above_rejects_before_the_registry_and_is_not_counted() {
    let backend = Backend::opened();
    let mut svc = ServiceBuilder::new()
        .filter(|k: &'static str| {
            if k.starts_with('x') {
                Err(Rejected(k))
            } else {
                Ok(k)
            }
        })
        .coalesce(key)
        .service(backend.clone());
    let futs: Vec<_> = ["k", "x1", "k", "x1", "x2", "k"]
        .into_iter()
        .map(|k| svc.call(k))
        .collect();
    let out = bounded("waiters", join_all(futs)).await;
    let rejected = out.iter().filter(|r| r.is_err()).count();
    assert_eq!(rejected, 3);
    assert!(out.iter().flatten().all(|v| v == "v:k#1"));
    for r in out.iter().filter(|r| r.is_err()) {
        let e = r.as_ref().unwrap_err();
        assert!(e.downcast_ref::<Rejected>().is_some());
        assert!(e.downcast_ref::<CoalesceError>().is_none());
    }
    assert_eq!(backend.calls(), ["k"]);
    let stats = svc.get_ref().stats();
    assert_eq!((stats.leaders, stats.followers, stats.bypassed), (1, 2, 0));
    assert_stats_relations(&stats, 3);
}

/// `Buffer` above the layer: waiters get the layer's error boxed (`BoxError`); it downcasts to
/// `CoalesceError`, whose inner error is one shared value, reachable by walking `source()`.
#[tokio::test(start_paused = true)]
async fn buffer_above_errors_downcast_through_box_error_to_the_shared_inner_error() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    let coalescing = CoalesceLayer::new(key as KeyFn);
    let svc = ServiceBuilder::new()
        .buffer(8)
        .layer(coalescing.clone())
        .service(inner);
    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot("k")))
        .collect();
    let (_, send) = bounded("request", handle.next_request()).await.unwrap();
    settle("all three joined", || {
        let s = coalescing.stats();
        s.leaders + s.followers == 3
    })
    .await;
    send.send_error(Unclonable("down"));
    let mut inner_errors = Vec::new();
    for t in tasks {
        let e: BoxError = bounded("waiter", t).await.unwrap().unwrap_err();
        let ce = e
            .downcast_ref::<CoalesceError>()
            .expect("the layer's error, boxed by Buffer");
        assert!(!ce.is_panic());
        let u = ce
            .downcast_ref::<Unclonable>()
            .expect("inner error by type");
        let walked = walk_to::<Unclonable>(&*e).expect("inner error through source()");
        assert!(std::ptr::eq(u, walked));
        inner_errors.push(u as *const Unclonable as usize);
    }
    inner_errors.dedup();
    assert_eq!(
        inner_errors.len(),
        1,
        "one inner error shared by every waiter"
    );
    assert!(handle.poll_request().is_pending());
    let stats = coalescing.stats();
    assert_eq!((stats.leaders, stats.followers, stats.errors), (1, 2, 1));
    assert_stats_relations(&stats, 3);
}

#[derive(Debug)]
struct Transient;

impl fmt::Display for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("transient")
    }
}

impl StdError for Transient {}

/// Retries a request whose shared error downcasts to `Transient`, at most once.
#[derive(Clone)]
struct RetryTransient(usize);

impl tower::retry::Policy<&'static str, String, CoalesceError> for RetryTransient {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut &'static str,
        result: &mut Result<String, CoalesceError>,
    ) -> Option<Self::Future> {
        match result {
            Err(e) if e.downcast_ref::<Transient>().is_some() && self.0 > 0 => {
                self.0 -= 1;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &&'static str) -> Option<&'static str> {
        Some(*req)
    }
}

/// `Retry` above, with a policy that looks at the inner error through `CoalesceError`: every
/// waiter of the failed flight sees `Transient`, retries, and the retries form one new flight;
/// a permanent error is not retried, and its waiters all get it.
#[tokio::test(start_paused = true)]
async fn retry_above_policy_downcasts_the_shared_error_and_retries_as_one_flight() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    let layer = CoalesceLayer::new(key as KeyFn);
    let svc = layer.layer(inner);
    let mut t_tasks = Vec::new();
    let mut p_tasks = Vec::new();
    for (k, tasks) in [("t", &mut t_tasks), ("p", &mut p_tasks)] {
        for _ in 0..3 {
            let mut retrying = tower::retry::Retry::new(RetryTransient(1), svc.clone());
            let fut = retrying.ready().await.unwrap().call(k);
            tasks.push(tokio::spawn(fut));
        }
    }
    assert_eq!((layer.stats().leaders, layer.stats().followers), (2, 4));
    let mut first = Vec::new();
    for _ in 0..2 {
        first.push(
            bounded("first requests", handle.next_request())
                .await
                .unwrap(),
        );
    }
    first.sort_by_key(|(r, _)| *r);
    let mut first = first.into_iter();
    let (p, send_p) = first.next().unwrap();
    let (t, send_t) = first.next().unwrap();
    assert_eq!((p, t), ("p", "t"));
    send_t.send_error(Transient);
    send_p.send_error(Unclonable("permanent"));
    let (req, send) = bounded("the retry", handle.next_request()).await.unwrap();
    assert_eq!(req, "t");
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(handle.poll_request().is_pending(), "one retried request");
    send.send_response("t-ok".into());
    for t in t_tasks {
        assert_eq!(bounded("t waiter", t).await.unwrap().unwrap(), "t-ok");
    }
    for t in p_tasks {
        let e = bounded("p waiter", t).await.unwrap().unwrap_err();
        assert_eq!(e.downcast_ref::<Unclonable>().unwrap().0, "permanent");
    }
    let stats = layer.stats();
    assert_eq!((stats.leaders, stats.errors), (3, 2), "{stats:?}");
    assert_stats_relations(&stats, 9);
}

/// `Steer` below one layer whose key names the route: each flight goes to its route's backend,
/// once.
#[tokio::test(start_paused = true)]
async fn steer_below_routes_each_flight_to_one_backend_once() {
    type RReq = (usize, &'static str);
    fn route(
        name: &'static str,
        calls: Arc<Mutex<Vec<RReq>>>,
    ) -> BoxCloneService<RReq, String, Infallible> {
        BoxCloneService::new(service_fn(move |r: RReq| {
            calls.lock().unwrap().push(r);
            async move {
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(format!("{name}:{}", r.1))
            }
        }))
    }
    let calls: Arc<Mutex<Vec<RReq>>> = Arc::default();
    let steer = tower::steer::Steer::new(
        vec![route("A", calls.clone()), route("B", calls.clone())],
        |r: &RReq, _: &[_]| r.0,
    );
    let mut svc = CoalesceLayer::new(|r: &RReq| Some(*r)).layer(steer);
    let reqs = [(0, "k"), (1, "k"), (0, "k"), (0, "j"), (1, "k"), (0, "j")];
    let futs: Vec<_> = reqs.iter().map(|r| svc.call(*r)).collect();
    let out = bounded("waiters", join_all(futs)).await;
    for (r, o) in reqs.iter().zip(out) {
        let name = ["A", "B"][r.0];
        assert_eq!(o.unwrap(), format!("{name}:{}", r.1));
    }
    let mut calls = calls.lock().unwrap().clone();
    calls.sort();
    assert_eq!(calls, [(0, "j"), (0, "k"), (1, "k")]);
    assert_stats_relations(&svc.stats(), 6);
}

/// `Timeout` above for one impatient caller and `Timeout` below for the call itself: the
/// impatient leader gets the outer `Elapsed` (not a `CoalesceError`) and leaves; the patient
/// follower carries the call on and gets the inner `Elapsed`, shared as the call's error; the
/// backend was called once and its future dropped by the inner timeout.
#[tokio::test(start_paused = true)]
async fn timeout_above_and_below_at_once() {
    let backend = Backend::closed();
    let below = ServiceBuilder::new()
        .coalesce(key)
        .timeout(Duration::from_secs(3))
        .service(backend.clone());
    let mut impatient = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(below.clone());
    let t0 = Instant::now();
    let leader = tokio::spawn(impatient.call("k"));
    let follower = tokio::spawn(below.clone().call("k"));
    let err = bounded("leader", leader).await.unwrap().unwrap_err();
    assert!(err.is::<Elapsed>(), "the outer timeout: {err:?}");
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_secs(1) && at < Duration::from_secs(3),
        "{at:?}"
    );
    assert!(!follower.is_finished(), "the follower carries the call on");
    assert_eq!(backend.count(), 1);
    let err = bounded("follower", follower).await.unwrap().unwrap_err();
    assert!(
        err.downcast_ref::<Elapsed>().is_some(),
        "the inner timeout: {err:?}"
    );
    assert!(t0.elapsed() >= Duration::from_secs(3));
    assert_eq!((backend.count(), backend.live()), (1, 0));
    let stats = below.stats();
    assert_eq!(
        (
            stats.leaders,
            stats.followers,
            stats.errors,
            stats.cancelled
        ),
        (1, 1, 1, 0)
    );
    assert_stats_relations(&stats, 2);
}

/// `BoxCloneService` below and above, clones spread over the tasks of a multi-thread runtime:
/// a stampede of 64 requests over 4 keys makes 4 backend calls.
#[test]
fn box_clone_services_on_both_sides_coalesce_across_worker_threads() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let backend = Backend::closed();
        let b = backend.clone();
        let inner: BoxCloneService<String, String, BoxError> =
            BoxCloneService::new(service_fn(move |k: String| {
                let k: &'static str = Box::leak(k.into_boxed_str());
                let mut b = b.clone();
                async move { b.call(k).await.map_err(BoxError::from) }
            }));
        let layer = CoalesceLayer::new(|k: &String| Some(k.clone()));
        let svc: BoxCloneService<String, String, CoalesceError> =
            BoxCloneService::new(layer.layer(inner));
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let (svc, barrier) = (svc.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    svc.oneshot(format!("key{}", i % 4)).await
                })
            })
            .collect();
        tokio::time::timeout(REAL_LIMIT, async {
            loop {
                let s = layer.stats();
                if s.leaders + s.followers == 64 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every request registered");
        backend.open();
        for (i, t) in tasks.into_iter().enumerate() {
            let out = tokio::time::timeout(REAL_LIMIT, t).await.unwrap().unwrap();
            assert_eq!(out.unwrap(), format!("v:key{}#1", i % 4));
        }
        assert_eq!(backend.count(), 4);
        let stats = layer.stats();
        assert_eq!((stats.leaders, stats.followers), (4, 60));
        assert_stats_relations(&stats, 64);
    });
}

// ---------------------------------------------------------------------------------------------
// tower_test::mock handles and readiness
// ---------------------------------------------------------------------------------------------

/// Interleaved requests over three keys: the mock handle sees exactly one request per key, in
/// the order each key first arrived; answered in reverse, every waiter gets its key's answer.
#[tokio::test(start_paused = true)]
async fn mock_handle_sees_one_request_per_key_in_first_arrival_order() {
    let (inner, mut handle) = mock::pair::<&'static str, String>();
    let mut svc = CoalesceLayer::new(key).layer(inner);
    let order = ["b", "a", "b", "c", "a", "c", "b", "a"];
    let mut seen = Vec::new();
    let futs: Vec<_> = order
        .iter()
        .map(|k| {
            let fut = svc.call(*k);
            assert_eq!(fut.is_leader(), !seen.contains(k), "{k}");
            assert_eq!(fut.is_follower(), seen.contains(k), "{k}");
            seen.push(*k);
            fut
        })
        .collect();
    let all = tokio::spawn(join_all(futs));
    let mut sends = Vec::new();
    for expected in ["b", "a", "c"] {
        let (req, send) = bounded("request", handle.next_request()).await.unwrap();
        assert_eq!(req, expected);
        sends.push((req, send));
    }
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(handle.poll_request().is_pending(), "one request per key");
    for (req, send) in sends.into_iter().rev() {
        send.send_response(format!("resp-{req}"));
    }
    let out = bounded("waiters", all).await.unwrap();
    for (k, o) in order.iter().zip(out) {
        assert_eq!(o.unwrap(), format!("resp-{k}"));
    }
    assert_stats_relations(&svc.stats(), 8);
}

/// An inner service that is not ready until told, counting its `poll_ready` calls.
#[derive(Clone, Default)]
struct Unready {
    polls: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Unready {
    fn make_ready(&self) {
        self.ready.store(true, SeqCst);
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

impl Service<&'static str> for Unready {
    type Response = String;
    type Error = Infallible;
    type Future = std::future::Ready<Result<String, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.polls.fetch_add(1, SeqCst);
        if self.ready.load(SeqCst) {
            return Poll::Ready(Ok(()));
        }
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        Poll::Pending
    }

    fn call(&mut self, k: &'static str) -> Self::Future {
        self.calls.fetch_add(1, SeqCst);
        std::future::ready(Ok(format!("v:{k}")))
    }
}

/// The inner service's readiness is polled by the flight alone: the layer's own `poll_ready`
/// (on any clone) never touches it, and 20 waiters cost it exactly as many `poll_ready` calls
/// as one waiter does (one by the leader's `call`, with a no-op waker; one by the flight
/// while not ready; one once woken).
#[tokio::test(start_paused = true)]
async fn inner_readiness_is_polled_by_the_flight_alone_not_by_waiters() {
    let mut counts = Vec::new();
    for waiters in [1, 20] {
        let inner = Unready::default();
        let mut svc = CoalesceLayer::new(key).layer(inner.clone());
        for _ in 0..5 {
            let mut clone = svc.clone();
            let ready = std::future::poll_fn(|cx| clone.poll_ready(cx));
            assert!(matches!(
                futures::FutureExt::now_or_never(ready),
                Some(Ok(()))
            ));
        }
        assert_eq!(
            inner.polls.load(SeqCst),
            0,
            "the layer's poll_ready is its own"
        );
        let futs: Vec<_> = (0..waiters).map(|_| svc.call("k")).collect();
        let all = tokio::spawn(join_all(futs));
        settle("the flight polled readiness", || {
            inner.polls.load(SeqCst) > 0
        })
        .await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(inner.polls.load(SeqCst), 2, "followers never poll it");
        inner.make_ready();
        let out = bounded("waiters", all).await.unwrap();
        assert!(out.iter().all(|r| r.as_deref().unwrap() == "v:k"));
        assert_eq!(inner.calls.load(SeqCst), 1);
        counts.push(inner.polls.load(SeqCst));
    }
    assert_eq!(counts, [3, 3], "poll_ready calls for 1 and for 20 waiters");
}

/// Under `ConcurrencyLimit(1)` below, the leader goes away at each stage of its call (before
/// its first poll; while waiting for the permit; after its request reached the backend; after
/// the backend answered but before it read the answer): its follower carries the same call on,
/// the backend sees that key once, and the follower gets the answer.
#[tokio::test(start_paused = true)]
async fn leader_dropped_at_every_stage_under_a_concurrency_limit_follower_carries_one_call() {
    for stage in 0..4 {
        let (inner, mut handle) = mock::pair::<&'static str, String>();
        let mut svc = ServiceBuilder::new()
            .coalesce(key)
            .concurrency_limit(1)
            .service(inner);
        // Stage 1 needs the permit taken by another key's flight.
        let blocker = (stage == 1).then(|| tokio::spawn(svc.call("x")));
        let blocked = match blocker {
            Some(_) => {
                let (req, send) = bounded("x", handle.next_request()).await.unwrap();
                assert_eq!(req, "x");
                Some(send)
            }
            None => None,
        };
        let mut leader = Box::pin(svc.call("k"));
        let mut follower = Box::pin(svc.call("k"));
        assert!(leader.is_leader() && follower.is_follower());
        assert!(futures::poll!(follower.as_mut()).is_pending());
        let mut answered = None;
        match stage {
            0 => {}
            1 => {
                assert!(futures::poll!(leader.as_mut()).is_pending());
                assert!(handle.poll_request().is_pending(), "waiting for the permit");
            }
            _ => {
                assert!(futures::poll!(leader.as_mut()).is_pending());
                let (req, send) = bounded("k", handle.next_request()).await.unwrap();
                assert_eq!(req, "k");
                if stage == 3 {
                    send.send_response(format!("answer{stage}"));
                } else {
                    answered = Some(send);
                }
            }
        }
        drop(leader);
        let follower = tokio::spawn(follower);
        if let Some(send) = blocked {
            send.send_response("x".into());
        }
        if stage < 2 {
            let (req, send) = bounded("k", handle.next_request()).await.unwrap();
            assert_eq!(req, "k", "stage {stage}");
            answered = Some(send);
        }
        if let Some(send) = answered {
            send.send_response(format!("answer{stage}"));
        }
        let out = bounded("follower", follower).await.unwrap();
        assert_eq!(out.unwrap(), format!("answer{stage}"), "stage {stage}");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            handle.poll_request().is_pending(),
            "stage {stage}: one call"
        );
        let stats = svc.stats();
        assert_eq!(stats.cancelled, 0, "stage {stage}: {stats:?}");
        assert_eq!(svc.in_flight(), 0);
        assert!(svc.group().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Registry scope
// ---------------------------------------------------------------------------------------------

/// A `ServiceBuilder` holding `.coalesce(..)`, reused for two services, shares one registry
/// between them (the layer's documented scope); a new builder's layer does not.
#[tokio::test(start_paused = true)]
async fn service_builder_reused_shares_one_registry_and_a_new_one_does_not() {
    let builder = ServiceBuilder::new().coalesce(key);
    let (a, b) = (Backend::closed(), Backend::closed());
    let mut sa = builder.service(a.clone());
    let mut sb = builder.service(b.clone());
    let x = sa.call("k");
    let y = sb.call("k");
    assert!(x.is_leader() && y.is_follower(), "one registry");
    assert_eq!(sb.in_flight(), 1);

    let mut sc = ServiceBuilder::new().coalesce(key).service(b.clone());
    let z = sc.call("k");
    assert!(z.is_leader(), "a new layer has a registry of its own");
    a.open();
    b.open();
    let (x, y, z) = bounded("waiters", async { tokio::join!(x, y, z) }).await;
    assert_eq!((x.unwrap(), y.unwrap()), ("v:k#1".into(), "v:k#1".into()));
    assert_eq!(z.unwrap(), "v:k#1");
    assert_eq!((a.count(), b.count()), (1, 1));
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// `String` and `Arc<str>` keys are forgotten through `&str` (`Borrow`): the old waiters keep
/// the old call's answer, the next request starts a new call, and a second `forget` finds
/// nothing.
#[tokio::test(start_paused = true)]
async fn string_and_arc_str_keys_are_forgotten_by_str() {
    async fn check<K, F>(extract: F)
    where
        K: Hash + Eq + Send + std::borrow::Borrow<str> + 'static,
        F: Fn(&String) -> Option<K> + Clone + Send + 'static,
    {
        let (inner, mut handle) = mock::pair::<String, String>();
        let mut svc = CoalesceLayer::new(extract).layer(inner);
        let old = svc.call("k".to_string());
        let old_follower = svc.call("k".to_string());
        assert!(old_follower.is_follower());
        assert!(svc.forget("k"));
        assert!(!svc.forget("k"), "already forgotten");
        let new = svc.call("k".to_string());
        assert!(new.is_leader(), "a forgotten flight is never joined");
        let all = tokio::spawn(async move { tokio::join!(old, old_follower, new) });
        let (r1, s1) = bounded("old request", handle.next_request()).await.unwrap();
        let (r2, s2) = bounded("new request", handle.next_request()).await.unwrap();
        assert_eq!((r1.as_str(), r2.as_str()), ("k", "k"));
        s1.send_response("old".into());
        s2.send_response("new".into());
        let (a, b, c) = bounded("waiters", all).await.unwrap();
        assert_eq!(
            (a.unwrap(), b.unwrap(), c.unwrap()),
            ("old".into(), "old".into(), "new".into())
        );
        let stats = svc.stats();
        assert_eq!((stats.leaders, stats.followers, stats.forgotten), (2, 1, 1));
        assert_stats_relations(&stats, 3);
        assert!(svc.group().is_empty());
    }
    check(|r: &String| Some(r.clone())).await;
    check(|r: &String| Some(Arc::<str>::from(r.as_str()))).await;
}

/// Tuple keys coalesce only when every part is equal.
#[tokio::test(start_paused = true)]
async fn tuple_keys_coalesce_only_on_full_equality() {
    type TReq = (u8, &'static str, Option<u32>);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut svc = CoalesceLayer::new(|r: &TReq| Some((r.0, r.1.to_string(), r.2))).layer(
        service_fn(move |r: TReq| {
            c.fetch_add(1, SeqCst);
            async move {
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(format!("{r:?}"))
            }
        }),
    );
    let reqs: [TReq; 7] = [
        (1, "a", None),
        (1, "a", Some(0)),
        (2, "a", None),
        (1, "b", None),
        (1, "a", None),
        (1, "a", Some(0)),
        (1, "a", Some(1)),
    ];
    let futs: Vec<_> = reqs.iter().map(|r| svc.call(*r)).collect();
    let out = bounded("waiters", join_all(futs)).await;
    for (r, o) in reqs.iter().zip(out) {
        assert_eq!(o.unwrap(), format!("{r:?}"));
    }
    assert_eq!(calls.load(SeqCst), 5);
    assert_eq!(svc.stats().followers, 2);
}

/// A key whose `Hash` panics.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Touchy(&'static str);

impl Hash for Touchy {
    fn hash<H: Hasher>(&self, h: &mut H) {
        if self.0 == "boom" {
            panic!("hash of boom");
        }
        self.0.hash(h);
    }
}

/// A key whose `Hash` panics unwinds out of `call` (and `forget`), before the registry is
/// touched: the flight in progress, its followers and later requests are unaffected, and no
/// counter moved for it.
#[tokio::test(start_paused = true)]
async fn panicking_key_hash_unwinds_out_of_call_and_leaves_the_registry_usable() {
    let backend = Backend::closed();
    let mut svc = CoalesceLayer::new(|r: &&'static str| Some(Touchy(r))).layer(backend.clone());
    let leader = svc.call("k");
    let boom = catch_unwind(AssertUnwindSafe(|| drop(svc.call("boom"))));
    assert!(boom.is_err(), "the key's Hash panicked out of call");
    let forget = catch_unwind(AssertUnwindSafe(|| svc.forget(&Touchy("boom"))));
    assert!(forget.is_err());
    let follower = svc.call("k");
    assert!(follower.is_follower());
    backend.open();
    let (a, b) = bounded("waiters", async { tokio::join!(leader, follower) }).await;
    assert_eq!((a.unwrap(), b.unwrap()), ("v:k#1".into(), "v:k#1".into()));
    assert_eq!(backend.calls(), ["k"]);
    let stats = svc.stats();
    assert_stats_relations(&stats, 2);
    assert!(svc.group().is_empty());
    assert_eq!(bounded("again", svc.call("j")).await.unwrap(), "v:j#1");
}

// ---------------------------------------------------------------------------------------------
// Errors and panics
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Root;

impl fmt::Display for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("root cause")
    }
}

impl StdError for Root {}

#[derive(Debug)]
struct Wrapper(Root);

impl fmt::Display for Wrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("wrapper")
    }
}

impl StdError for Wrapper {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// The inner error's own `source()` chain stays whole behind `CoalesceError`: every waiter
/// walks from the layer's error to the same wrapper and on to the same root cause.
#[tokio::test(start_paused = true)]
async fn every_waiter_reaches_the_inner_errors_root_cause_through_source() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut svc = CoalesceLayer::new(key).layer(service_fn(move |_k: &'static str| {
        c.fetch_add(1, SeqCst);
        async {
            tokio::task::yield_now().await;
            Err::<String, _>(Wrapper(Root))
        }
    }));
    let futs: Vec<_> = (0..4).map(|_| svc.call("k")).collect();
    let out = bounded("waiters", join_all(futs)).await;
    let mut roots = Vec::new();
    for r in &out {
        let e = r.as_ref().unwrap_err();
        assert!(e.to_string().contains("wrapper"), "{e}");
        let wrapper = e.source().expect("the inner error");
        assert!(wrapper.is::<Wrapper>());
        let root = wrapper.source().expect("its own source");
        assert!(root.is::<Root>());
        assert!(walk_to::<Root>(e).is_some());
        assert!(e.get_ref().unwrap().is::<Wrapper>());
        roots.push(root as *const dyn StdError as *const u8 as usize);
    }
    roots.dedup();
    assert_eq!(roots.len(), 1, "the same root cause for everybody");
    assert_eq!(calls.load(SeqCst), 1);
}

/// A backend that panics in `call` for `boom-call` and in its future for `boom-fut` (once its
/// gate opens).
#[derive(Clone)]
struct Fragile {
    calls: Arc<Mutex<Vec<&'static str>>>,
    gate: Arc<Semaphore>,
}

impl Service<&'static str> for Fragile {
    type Response = String;
    type Error = Infallible;
    type Future = BoxFut<Result<String, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, k: &'static str) -> Self::Future {
        self.calls.lock().unwrap().push(k);
        if k == "boom-call" {
            panic!("call panicked");
        }
        let gate = self.gate.clone();
        Box::pin(async move {
            drop(gate.acquire().await.unwrap());
            if k == "boom-fut" {
                panic!("future panicked");
            }
            Ok(format!("v:{k}"))
        })
    }
}

/// Panics of the inner service in `call` and in its future, under `ConcurrencyLimit(1)` below:
/// every waiter of the flight gets `is_panic` with the message, the permit is given back (the
/// flight of another key waiting for it goes on), and the keys work again.
#[tokio::test(start_paused = true)]
async fn inner_panics_under_a_concurrency_limit_give_the_permit_back() {
    let fragile = Fragile {
        calls: Arc::default(),
        gate: Arc::new(Semaphore::new(0)),
    };
    let mut svc = ServiceBuilder::new()
        .coalesce(key)
        .concurrency_limit(1)
        .service(fragile.clone());

    let futs: Vec<_> = (0..3).map(|_| svc.call("boom-call")).collect();
    for r in bounded("boom-call", join_all(futs)).await {
        let e = r.unwrap_err();
        assert!(e.is_panic());
        assert_eq!(e.panic_message(), Some("call panicked"));
        assert!(e.source().unwrap().is::<Panicked>());
    }

    let boom: Vec<_> = (0..3).map(|_| tokio::spawn(svc.call("boom-fut"))).collect();
    settle("boom-fut called", || {
        fragile.calls.lock().unwrap().len() == 2
    })
    .await;
    let ok: Vec<_> = (0..3).map(|_| tokio::spawn(svc.call("ok"))).collect();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        fragile.calls.lock().unwrap().len(),
        2,
        "ok's flight waits for the permit"
    );
    fragile.gate.add_permits(Semaphore::MAX_PERMITS >> 4);
    for t in boom {
        let e = bounded("boom-fut", t).await.unwrap().unwrap_err();
        assert_eq!(e.panic_message(), Some("future panicked"));
    }
    for t in ok {
        assert_eq!(bounded("ok", t).await.unwrap().unwrap(), "v:ok");
    }
    assert_eq!(
        *fragile.calls.lock().unwrap(),
        ["boom-call", "boom-fut", "ok"]
    );
    // The keys that panicked are usable again.
    assert!(bounded("again", svc.call("boom-fut"))
        .await
        .unwrap_err()
        .is_panic());
    let stats = svc.stats();
    assert_eq!((stats.leaders, stats.panics, stats.errors), (4, 3, 0));
    assert_stats_relations(&stats, 10);
}

/// A response whose destructor panics once armed.
#[derive(Debug)]
struct Bomb {
    armed: Arc<AtomicBool>,
    value: u32,
}

impl Clone for Bomb {
    fn clone(&self) -> Self {
        Bomb {
            armed: self.armed.clone(),
            value: self.value,
        }
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        if self.armed.swap(false, SeqCst) {
            panic!("bomb dropped");
        }
    }
}

/// A follower served (its copy is in) and then dropped unread: its copy's destructor panics in
/// the dropping code only; the other follower still gets its copy, the registry is clean and the
/// key works again.
#[tokio::test(start_paused = true)]
async fn panicking_destructor_of_an_unread_copy_strands_nobody() {
    let armed = Arc::new(AtomicBool::new(false));
    let a = armed.clone();
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let mut svc = CoalesceLayer::new(key).layer(service_fn(move |_k: &'static str| {
        let (armed, gate) = (a.clone(), g.clone());
        async move {
            drop(gate.acquire().await.unwrap());
            Ok::<_, Infallible>(Bomb { armed, value: 7 })
        }
    }));
    let leader = svc.call("k");
    let unread = svc.call("k");
    let mut other = Box::pin(svc.call("k"));
    assert!(futures::poll!(other.as_mut()).is_pending());
    gate.add_permits(10);
    let got = bounded("leader", leader).await.unwrap();
    assert_eq!(got.value, 7);
    armed.store(true, SeqCst);
    let dropped = catch_unwind(AssertUnwindSafe(|| drop(unread)));
    assert!(dropped.is_err(), "the unread copy's destructor ran in drop");
    let got2 = bounded("other follower", other).await.unwrap();
    assert_eq!(got2.value, 7);
    assert!(svc.group().is_empty());
    assert_stats_relations(&svc.stats(), 3);
    gate.add_permits(10);
    assert_eq!(bounded("again", svc.call("k")).await.unwrap().value, 7);
    drop((got, got2));
}

// ---------------------------------------------------------------------------------------------
// Runtimes
// ---------------------------------------------------------------------------------------------

fn runtime(multi: bool) -> tokio::runtime::Runtime {
    if multi {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }
}

/// One spawned stampede per runtime flavour: each of the 3 keys is called once, whatever the
/// scheduling, and the registry is empty afterwards.
#[test]
fn stampede_on_current_thread_and_multi_thread_runtimes_calls_once_per_key() {
    for multi in [false, true] {
        let backend = Backend::closed();
        let layer = CoalesceLayer::new(key as KeyFn);
        let svc = layer.layer(backend.clone());
        runtime(multi).block_on(async {
            let tasks: Vec<_> = (0..300)
                .map(|i| tokio::spawn(svc.clone().oneshot(["a", "b", "c"][i % 3])))
                .collect();
            tokio::time::timeout(REAL_LIMIT, async {
                while requests(&layer.stats()) < 300 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("every request registered");
            backend.open();
            for (i, t) in tasks.into_iter().enumerate() {
                let out = tokio::time::timeout(REAL_LIMIT, t).await.unwrap().unwrap();
                assert_eq!(out.unwrap(), format!("v:{}#1", ["a", "b", "c"][i % 3]));
            }
        });
        assert_eq!(backend.count(), 3, "multi = {multi}");
        let stats = layer.stats();
        assert_eq!((stats.leaders, stats.followers), (3, 297));
        assert_stats_relations(&stats, 300);
        assert!(layer.group().is_empty());
    }
}

/// A runtime dropped while its tasks wait on flights: every flight is cancelled exactly once,
/// every backend future dropped, the registry emptied; the same layer then serves requests on
/// a new runtime.
#[test]
fn runtime_dropped_with_flights_in_flight_cancels_each_once_then_the_layer_works_again() {
    for multi in [false, true] {
        let backend = Backend::closed();
        let layer = CoalesceLayer::new(key as KeyFn);
        let svc = layer.layer(backend.clone());
        let rt = runtime(multi);
        rt.block_on(async {
            for i in 0..30 {
                tokio::spawn(svc.clone().oneshot(["a", "b", "c"][i % 3]));
            }
            tokio::time::timeout(REAL_LIMIT, async {
                while requests(&layer.stats()) < 30 || backend.live() < 3 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("every request registered and every call made");
        });
        drop(rt);
        assert_eq!(backend.live(), 0, "multi = {multi}: calls dropped");
        let stats = layer.stats();
        assert_eq!(stats.cancelled, 3, "multi = {multi}: {stats:?}");
        assert_stats_relations(&stats, 30);
        assert!(layer.group().is_empty());

        backend.open();
        let out = runtime(multi)
            .block_on(async { tokio::time::timeout(REAL_LIMIT, svc.clone().oneshot("a")).await });
        assert_eq!(out.unwrap().unwrap(), "v:a#2");
        assert!(layer.group().is_empty());
    }
}

/// Waiters on a `LocalSet` (`spawn_local`) of a detached flight: all of them aborted, the
/// spawned call still completes; the next request after it is a new flight.
#[tokio::test(start_paused = true)]
async fn local_set_waiters_of_a_detached_flight_can_all_leave() {
    let backend = Backend::closed();
    let layer = CoalesceLayer::new(key as KeyFn).detached(true);
    let svc = layer.layer(backend.clone());
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let tasks: Vec<_> = (0..4)
                .map(|_| tokio::task::spawn_local(svc.clone().oneshot("k")))
                .collect();
            settle("registered", || requests(&layer.stats()) == 4).await;
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                assert!(t.await.unwrap_err().is_cancelled());
            }
            assert_eq!(layer.in_flight(), 1, "a detached call outlives its waiters");
            backend.open();
            settle("the detached call completed", || layer.in_flight() == 0).await;
            assert_eq!(backend.count(), 1);
            assert_eq!(backend.live(), 0, "it ran to completion");
            let again = tokio::task::spawn_local(svc.clone().oneshot("k"));
            assert_eq!(bounded("again", again).await.unwrap().unwrap(), "v:k#2");
        })
        .await;
    let stats = layer.stats();
    assert_eq!((stats.leaders, stats.cancelled), (2, 0));
    assert_stats_relations(&stats, 5);
}

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

fn assert_clone_send_sync_debug<T: Clone + Send + Sync + fmt::Debug + 'static>() {}
fn assert_send_debug_unpin<T: Send + fmt::Debug + Unpin + 'static>() {}
fn assert_error<T: StdError + Clone + Send + Sync + 'static>() {}
fn assert_into_box_error<T: Into<BoxError>>() {}
fn assert_value<T: Copy + Eq + Default + fmt::Debug + Send + Sync + 'static>() {}

/// The public types carry the auto traits tower and axum rely on (checked at compile time), and
/// their `Debug` output says what they are.
#[test]
fn public_types_have_the_auto_traits_tower_and_axum_need() {
    type Svc = CoalesceService<Backend, KeyFn, &'static str>;
    assert_clone_send_sync_debug::<CoalesceLayer<KeyFn, &'static str>>();
    assert_clone_send_sync_debug::<Svc>();
    assert_clone_send_sync_debug::<Group<String>>();
    assert_clone_send_sync_debug::<Group<Arc<str>>>();
    assert_clone_send_sync_debug::<GroupBuilder>();
    assert_clone_send_sync_debug::<CoalesceError>();
    assert_clone_send_sync_debug::<Panicked>();
    assert_send_debug_unpin::<Run<String, String>>();
    assert_send_debug_unpin::<ResponseFuture<Backend, &'static str, &'static str>>();
    assert_error::<CoalesceError>();
    assert_error::<Panicked>();
    assert_into_box_error::<CoalesceError>();
    assert_value::<Stats>();
    assert_value::<OnTimeout>();
    // Boxed as tower users do (the inner one is Send but not Sync).
    fn boxable<S>(_: &S)
    where
        S: Service<String, Response = String, Error = CoalesceError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
    }
    let inner: BoxCloneService<String, String, BoxError> =
        BoxCloneService::new(service_fn(|k: String| async move { Ok::<_, BoxError>(k) }));
    let svc = CoalesceLayer::new(|k: &String| Some(k.clone())).layer(inner);
    boxable(&svc);

    assert_eq!(OnTimeout::default(), OnTimeout::CallInner);
    assert_eq!(Stats::default().leaders, 0);
    let layer = CoalesceLayer::new(key as KeyFn);
    assert!(format!("{layer:?}").contains("CoalesceLayer"));
    assert!(format!("{:?}", layer.layer(Backend::closed())).contains("CoalesceService"));
    assert!(format!("{:?}", Group::<u8>::new()).contains("Group"));
}

// ---------------------------------------------------------------------------------------------
// Stats
// ---------------------------------------------------------------------------------------------

/// A mixed workload through a stack (`Buffer` above, the layer, a panicking/failing/slow
/// backend below): bypasses, followers, errors, panics, a cancelled flight and a leader that
/// left. Afterwards every relation of `src/stats.rs` holds and each counter is exact.
#[tokio::test(start_paused = true)]
async fn stats_relations_hold_after_a_mixed_workload_through_a_stack() {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let backend = service_fn(move |k: &'static str| {
        c.fetch_add(1, SeqCst);
        let gate = g.clone();
        async move {
            drop(gate.acquire().await.unwrap());
            match k {
                "err" => Err(Unclonable("err")),
                "panic" => panic!("backend panicked"),
                _ => Ok(format!("v:{k}")),
            }
        }
    });
    let layer = CoalesceLayer::new(|k: &&'static str| (*k != "raw").then_some(*k));
    let mut svc = layer.layer(backend);
    let mut made = 0u64;
    let mut call = |k: &'static str| {
        made += 1;
        svc.call(k)
    };
    // ok: leader + 2 followers; err: leader + 1; panic: leader + 1; raw: 2 bypasses.
    let ok: Vec<_> = (0..3).map(|_| call("ok")).collect();
    let err: Vec<_> = (0..2).map(|_| call("err")).collect();
    let pan: Vec<_> = (0..2).map(|_| call("panic")).collect();
    let raw: Vec<_> = (0..2).map(|_| call("raw")).collect();
    // gone: a flight all of whose waiters leave before it ends (cancelled).
    let gone: Vec<_> = (0..2).map(|_| call("gone")).collect();
    // left: its leader leaves, its follower carries the call on.
    let mut left = call("left");
    let left_follower = call("left");
    assert!(futures::poll!(&mut left).is_pending());
    drop(left);
    drop(gone);
    gate.add_permits(100);
    let (ok, err, pan, raw, lf) = bounded("waiters", async {
        tokio::join!(
            join_all(ok),
            join_all(err),
            join_all(pan),
            join_all(raw),
            left_follower
        )
    })
    .await;
    assert!(ok.iter().all(|r| r.as_deref().unwrap() == "v:ok"));
    assert!(err.iter().all(|r| r
        .as_ref()
        .unwrap_err()
        .downcast_ref::<Unclonable>()
        .is_some()));
    assert!(pan.iter().all(|r| r.as_ref().unwrap_err().is_panic()));
    assert!(raw.iter().all(|r| r.as_deref().unwrap() == "v:raw"));
    assert_eq!(lf.unwrap(), "v:left");
    let s = layer.stats();
    assert_stats_relations(&s, made);
    assert_eq!(
        (
            s.leaders,
            s.followers,
            s.bypassed,
            s.errors,
            s.panics,
            s.cancelled
        ),
        (5, 6, 2, 1, 1, 1),
        "{s:?}"
    );
    assert_eq!(
        (
            s.lingered,
            s.over_capacity,
            s.timed_out,
            s.retried,
            s.forgotten
        ),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(
        calls.load(SeqCst),
        5 + 2,
        "ok, err, panic, left, gone (called by `call`, cancelled by the drop), two bypasses"
    );
    assert!(layer.group().is_empty());
}

// ---------------------------------------------------------------------------------------------
// `is_shared` when a follower leaves during publication
// ---------------------------------------------------------------------------------------------

type Victim = Arc<Mutex<Option<Box<dyn std::any::Any + Send>>>>;

/// A response whose `Clone` drops the waiter parked in `victim` (as a client that disconnects
/// while the response is being copied would).
#[derive(Debug)]
struct Hooked {
    victim: Victim,
}

impl Clone for Hooked {
    fn clone(&self) -> Self {
        let gone = self.victim.lock().unwrap().take();
        drop(gone);
        Hooked {
            victim: self.victim.clone(),
        }
    }
}

/// `is_shared` on a leader is documented as "once the output is ready, whether anybody else
/// got it" (`Run::is_shared`; `ResponseFuture::is_shared`: "given to more than one request").
/// Here the only follower leaves while the response is being copied for it, so nobody else got
/// it; yet the leader reports `true`: `publish` counts the followers present when it starts
/// and reports `true` whenever that count is not zero, even if no slot was filled.
#[tokio::test(start_paused = true)]

async fn leader_is_not_shared_when_its_only_follower_left_during_publication() {
    let victim: Victim = Arc::default();
    let v = victim.clone();
    let mut svc = CoalesceLayer::new(key).layer(service_fn(move |_k: &'static str| {
        let victim = v.clone();
        async move {
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(Hooked { victim })
        }
    }));
    let mut leader = Box::pin(svc.call("k"));
    let follower = svc.call("k");
    assert!(follower.is_follower());
    *victim.lock().unwrap() = Some(Box::new(follower));
    let out = bounded("leader", leader.as_mut()).await.unwrap();
    assert!(
        victim.lock().unwrap().is_none(),
        "the follower left during publication"
    );
    assert!(svc.group().is_empty());
    assert_stats_relations(&svc.stats(), 2);
    assert!(
        !leader.is_shared(),
        "nobody but the leader got the response, yet is_shared() is true"
    );
    drop(out);
}
