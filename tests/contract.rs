//! The contract of `tower-coalesce` (DESIGN.md, items 1–8, and its "Known traps"), pinned down
//! through the public API.
//!
//! Every test is deterministic: time is paused (`start_paused`), backends wait on gates
//! (`watch` channels) rather than on the clock, and progress is observed through counters.
//! Every async wait is bounded by a timeout, so a hang fails the test instead of stalling it.
//! Tests that could deadlock a thread (a lock held while user code re-enters the registry) run
//! on a thread of their own, bounded by a real-time deadline.

use std::convert::Infallible;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::future::{join_all, BoxFuture};
use tokio::sync::watch;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_coalesce::{
    CoalesceError, CoalesceLayer, CoalesceService, Group, Panicked, ResponseFuture, Run,
    ServiceBuilderExt,
};
use tower_layer::Layer;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Virtual time under `start_paused`; long enough for the hour-long flights below.
const LIMIT: Duration = Duration::from_secs(4 * 3600);
/// Real time, for multi-thread runtimes and for threads that may deadlock.
const REAL_LIMIT: Duration = Duration::from_secs(30);

/// Bounds `f` by [`LIMIT`] of the runtime's clock and by [`REAL_LIMIT`] of real time: with a
/// paused clock, a runtime kept busy (a waiter polling itself in a loop) never idles, so its
/// clock never advances and only the real-time bound can end the wait.
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::select! {
        biased;
        out = tokio::time::timeout(LIMIT, f) => out.unwrap_or_else(|_| panic!("hung: {what}")),
        () = RealDeadline::after(REAL_LIMIT) => panic!("hung (real time): {what}"),
    }
}

/// Resolves once `REAL_LIMIT` of real time has passed, woken by a watchdog thread.
struct RealDeadline {
    deadline: std::time::Instant,
    waker: Arc<Mutex<Option<Waker>>>,
    armed: bool,
}

impl RealDeadline {
    fn after(limit: Duration) -> Self {
        RealDeadline {
            deadline: std::time::Instant::now() + limit,
            waker: Arc::default(),
            armed: false,
        }
    }
}

impl Future for RealDeadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if std::time::Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        if !self.armed {
            self.armed = true;
            let (deadline, waker) = (self.deadline, Arc::downgrade(&self.waker));
            // A watchdog, not synchronisation: it only ever ends a test that already hung.
            std::thread::spawn(move || {
                std::thread::sleep(deadline.saturating_duration_since(std::time::Instant::now()));
                if let Some(waker) = waker.upgrade().and_then(|w| w.lock().unwrap().take()) {
                    waker.wake();
                }
            });
        }
        Poll::Pending
    }
}

async fn bounded_real<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(REAL_LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// Runs `f` on a thread of its own and fails if it does not return within [`REAL_LIMIT`]: a
/// lock held while user code re-enters the registry deadlocks that thread, not the test.
fn on_thread<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(REAL_LIMIT) {
        Ok(out) => out,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlocked: {what}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("panicked: {what}"),
    }
}

/// A paused current-thread runtime, for use inside [`on_thread`].
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Calls `svc` synchronously, so the request joins or registers its flight right now, in the
/// order the test says (`oneshot` would wait for the first poll).
fn start<S, R>(svc: &mut S, req: R) -> S::Future
where
    S: Service<R>,
    S::Error: fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => svc.call(req),
        other => panic!("the coalescing service must always be ready, got {other:?}"),
    }
}

// `&String`, not `&str`: the extractor takes a reference to the request type.
#[allow(clippy::ptr_arg)]
fn by_key(key: &String) -> Option<String> {
    Some(key.clone())
}

type ByKey = fn(&String) -> Option<String>;
type Svc = CoalesceService<Backend, ByKey, String>;
type Fut = ResponseFuture<Backend, String, String>;

fn coalesced(backend: &Backend) -> Svc {
    CoalesceLayer::new(by_key as ByKey).layer(backend.clone())
}

/// A backend that counts its calls, waits on a gate (and, optionally, a delay) and answers
/// `"{key}#{call number}"`, so responses of different calls differ. Keys starting with
/// `forever` never complete. A guard inside each call's future counts the calls dropped before
/// they completed.
#[derive(Clone, Debug)]
struct Backend(Arc<BackendState>);

#[derive(Debug)]
struct BackendState {
    calls: watch::Sender<usize>,
    cancelled: AtomicUsize,
    open: watch::Sender<bool>,
    delay: Duration,
}

impl Backend {
    fn with(open: bool, delay: Duration) -> Self {
        Backend(Arc::new(BackendState {
            calls: watch::Sender::new(0),
            cancelled: AtomicUsize::new(0),
            open: watch::Sender::new(open),
            delay,
        }))
    }

    /// Calls wait until [`open`](Self::open).
    fn gated() -> Self {
        Self::with(false, Duration::ZERO)
    }

    /// Calls take `delay` (of virtual time, under a paused clock).
    fn sleeping(delay: Duration) -> Self {
        Self::with(true, delay)
    }

    fn open(&self) {
        self.0.open.send_replace(true);
    }

    fn calls(&self) -> usize {
        *self.0.calls.borrow()
    }

    fn cancelled(&self) -> usize {
        self.0.cancelled.load(SeqCst)
    }

    async fn wait_calls(&self, n: usize) {
        let mut calls = self.0.calls.subscribe();
        bounded("backend calls", calls.wait_for(|&c| c >= n))
            .await
            .unwrap();
    }
}

struct CancelGuard {
    state: Arc<BackendState>,
    armed: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            self.state.cancelled.fetch_add(1, SeqCst);
        }
    }
}

impl Service<String> for Backend {
    type Response = String;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<String, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: String) -> Self::Future {
        let mut n = 0;
        self.0.calls.send_modify(|c| {
            *c += 1;
            n = *c;
        });
        // Made here, not in the async block: a future dropped before its first poll counts.
        let guard = CancelGuard {
            state: Arc::clone(&self.0),
            armed: true,
        };
        let mut open = self.0.open.subscribe();
        let delay = self.0.delay;
        Box::pin(async move {
            let mut guard = guard;
            if key.starts_with("forever") {
                std::future::pending::<()>().await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = open.wait_for(|&o| o).await;
            guard.armed = false;
            Ok(format!("{key}#{n}"))
        })
    }
}

/// Counts how often the wrapped future is polled.
struct CountPolls<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for CountPolls<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, SeqCst);
        self.inner.as_mut().poll(cx)
    }
}

/// Runs `f` when dropped.
struct OnDrop(Option<Box<dyn FnOnce() + Send>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Finds an `E` in `err`'s `source()` chain.
fn find_source<'a, E: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

async fn join_spawned<T: Send + 'static>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    bounded("spawned waiters", join_all(handles))
        .await
        .into_iter()
        .map(|r| r.expect("a waiter's task panicked"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. At most one flight per key; other keys never wait
// ---------------------------------------------------------------------------------------------

/// The blog post this crate started from: eight concurrent requests over two keys make two
/// remote calls, and each key's callers all get the same data. The second round checks the
/// seed's trap: a finished round must not leave anything behind that a later round joins.
#[tokio::test(start_paused = true)]
async fn seed_scenario_eight_requests_over_two_keys() {
    #[derive(Clone, Debug, PartialEq)]
    struct SpecialData {
        key: String,
        data: usize,
    }

    let spy = Arc::new(Mutex::new(Vec::<String>::new()));
    let ids = Arc::new(AtomicUsize::new(0));
    let remote = {
        let (spy, ids) = (spy.clone(), ids.clone());
        service_fn(move |key: String| {
            let (spy, ids) = (spy.clone(), ids.clone());
            async move {
                let data = ids.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_secs(2)).await;
                spy.lock()
                    .unwrap()
                    .push(format!("Request from client {key}, returning {data}"));
                Ok::<_, Infallible>(SpecialData { key, data })
            }
        })
    };
    let svc = CoalesceLayer::new(|key: &String| Some(key.clone())).layer(remote);
    let (key1, key2) = ("Some key", "Some other key");
    let order = [key1, key1, key2, key2, key1, key2, key2, key2];

    for round in 1..=2 {
        let all = bounded(
            "seed round",
            join_all(order.iter().map(|k| svc.clone().oneshot(k.to_string()))),
        )
        .await;
        let all: Vec<SpecialData> = all.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            spy.lock().unwrap().len(),
            2 * round,
            "one remote call per key"
        );
        for (got, key) in all.iter().zip(order) {
            assert_eq!(got.key, key);
        }
        let first = |k: &str| all.iter().find(|d| d.key == k).unwrap().data;
        assert!(all.iter().all(|d| d.data == first(&d.key)));
        assert_ne!(first(key1), first(key2));
        assert!(
            first(key1) >= 2 * (round - 1),
            "round {round} reused an old result"
        );
        assert_eq!(svc.in_flight(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn one_backend_call_per_key_while_in_flight() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let waiters: Vec<Fut> = (0..100).map(|_| start(&mut svc, "k".into())).collect();
    assert!(waiters[0].is_leader());
    assert!(waiters[1..].iter().all(|w| w.is_follower()));
    let handles: Vec<_> = waiters.into_iter().map(tokio::spawn).collect();
    backend.wait_calls(1).await;
    assert_eq!(svc.in_flight(), 1);
    // More requests while the call runs still join it.
    let late: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot("k".to_string())))
        .collect();
    tokio::task::yield_now().await;
    backend.open();
    for r in join_spawned(handles)
        .await
        .into_iter()
        .chain(join_spawned(late).await)
    {
        assert_eq!(r.unwrap(), "k#1");
    }
    assert_eq!(backend.calls(), 1);
    assert_eq!(svc.in_flight(), 0);
}

/// Key A's call never completes; key B's requests neither join it nor wait for it.
#[tokio::test(start_paused = true)]
async fn different_keys_never_wait_on_each_other() {
    let backend = Backend::sleeping(Duration::from_secs(1));
    let mut svc = coalesced(&backend);
    let stuck: Vec<_> = (0..3)
        .map(|_| tokio::spawn(start(&mut svc, "forever-a".into())))
        .collect();
    backend.wait_calls(1).await;
    let b: Vec<Fut> = (0..3).map(|_| start(&mut svc, "b".into())).collect();
    assert!(b[0].is_leader(), "key b must not join key a's flight");
    for r in bounded("key b", join_all(b)).await {
        assert_eq!(r.unwrap(), "b#2");
    }
    assert_eq!(backend.calls(), 2);
    assert_eq!(svc.in_flight(), 1, "key a is still in flight");
    assert!(stuck.iter().all(|h| !h.is_finished()));
    for h in &stuck {
        h.abort();
    }
    for h in stuck {
        assert!(h.await.unwrap_err().is_cancelled());
    }
    assert_eq!(svc.in_flight(), 0);
    assert_eq!(backend.cancelled(), 1);
}

/// The same through the core, with a flight that is never even polled.
#[test]
fn group_different_keys_never_wait_on_each_other() {
    on_thread("group_different_keys_never_wait_on_each_other", || {
        let group: Group<&'static str> = Group::new();
        let a = group.run("a", std::future::pending::<u32>);
        let b = group.run("b", || async { 2u32 });
        assert!(a.is_leader() && b.is_leader());
        assert_eq!(futures::executor::block_on(b).unwrap(), 2);
        assert_eq!(group.in_flight(), 1);
        drop(a);
        assert_eq!(group.in_flight(), 0);
    });
}

/// Check-then-insert is one step: a caller that arrives while the leader is still making its
/// future (user code, run after registration) joins instead of becoming a second leader.
#[test]
fn a_caller_arriving_while_the_leader_makes_its_future_joins() {
    on_thread("join during make", || {
        let group: Group<&'static str> = Group::new();
        let makes = Arc::new(AtomicUsize::new(0));
        let (in_make_tx, in_make_rx) = mpsc::channel::<()>();
        let (joined_tx, joined_rx) = mpsc::channel::<bool>();

        let second = {
            let (group, makes) = (group.clone(), makes.clone());
            std::thread::spawn(move || {
                in_make_rx.recv().unwrap();
                let run = group.run("k", || {
                    makes.fetch_add(1, SeqCst);
                    async { 2u32 }
                });
                joined_tx.send(run.is_leader()).unwrap();
                futures::executor::block_on(run).unwrap()
            })
        };
        let first = group.run("k", || {
            makes.fetch_add(1, SeqCst);
            in_make_tx.send(()).unwrap();
            // Give the second caller every chance to look the key up while this runs; a
            // second leader would show up as a second `make`.
            let second_is_leader = joined_rx.recv_timeout(Duration::from_secs(2));
            async move {
                assert_eq!(
                    second_is_leader,
                    Ok(false),
                    "the second caller must join the registered flight"
                );
                1u32
            }
        });
        assert!(first.is_leader());
        assert_eq!(futures::executor::block_on(first).unwrap(), 1);
        assert_eq!(second.join().unwrap(), 1, "the follower shares the result");
        assert_eq!(makes.load(SeqCst), 1);
        assert_eq!(group.in_flight(), 0);
    });
}

// ---------------------------------------------------------------------------------------------
// 2. No stale joins
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn request_after_publication_starts_a_new_flight() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let first: Vec<Fut> = (0..3).map(|_| start(&mut svc, "k".into())).collect();
    backend.open();
    for r in bounded("first flight", join_all(first)).await {
        assert_eq!(r.unwrap(), "k#1");
    }
    assert_eq!(svc.in_flight(), 0);
    let again = start(&mut svc, "k".into());
    assert!(again.is_leader(), "a request after publication must lead");
    assert_eq!(bounded("second flight", again).await.unwrap(), "k#2");
    assert_eq!(backend.calls(), 2);
}

/// A response whose `Clone` runs a hook once.
struct Hooked {
    value: u32,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Hooked {
    fn new(value: u32, hook: Option<Box<dyn FnOnce() + Send>>) -> Self {
        Hooked {
            value,
            hook: Mutex::new(hook),
        }
    }
}

impl fmt::Debug for Hooked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooked")
            .field("value", &self.value)
            .finish()
    }
}

impl Clone for Hooked {
    fn clone(&self) -> Self {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        Hooked::new(self.value, None)
    }
}

/// The sharpest form of "no stale joins": a request issued while the result is being handed to
/// the followers (here, from inside the response's `Clone`) comes after publication began, so
/// it must start a new flight rather than join the finished one.
#[test]
fn request_during_publication_starts_a_new_flight() {
    on_thread("request during publication", || {
        let group: Group<&'static str> = Group::new();
        let late: Arc<Mutex<Option<Run<&'static str, Hooked>>>> = Arc::default();
        let hook: Box<dyn FnOnce() + Send> = {
            let (group, late) = (group.clone(), late.clone());
            Box::new(move || {
                let run = group.run("k", || async { Hooked::new(2, None) });
                *late.lock().unwrap() = Some(run);
            })
        };
        let leader = group.run("k", move || async move { Hooked::new(1, Some(hook)) });
        let follower = group.run("k", || async { Hooked::new(99, None) });
        let (a, b) = futures::executor::block_on(futures::future::join(leader, follower));
        assert_eq!((a.unwrap().value, b.unwrap().value), (1, 1));
        let late = late.lock().unwrap().take().expect("the hook ran");
        assert!(
            late.is_leader(),
            "joined a flight whose result was published"
        );
        assert_eq!(group.in_flight(), 1);
        assert_eq!(futures::executor::block_on(late).unwrap().value, 2);
        assert_eq!(group.in_flight(), 0);
    });
}

// ---------------------------------------------------------------------------------------------
// 3. Same result for all
// ---------------------------------------------------------------------------------------------

/// Followers get clones of the leader's response: with an `Arc` response, literally the same
/// allocation.
#[tokio::test(start_paused = true)]
async fn every_waiter_gets_a_clone_of_the_same_response() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (open, gate) = watch::channel(false);
    let inner = {
        let calls = calls.clone();
        service_fn(move |key: String| {
            let n = calls.fetch_add(1, SeqCst) + 1;
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|&o| o).await;
                Ok::<_, Infallible>(Arc::new(format!("{key}#{n}")))
            }
        })
    };
    let mut svc = CoalesceLayer::new(by_key as ByKey).layer(inner);
    let waiters: Vec<_> = (0..8).map(|_| start(&mut svc, "k".into())).collect();
    open.send_replace(true);
    let all: Vec<Arc<String>> = bounded("waiters", join_all(waiters))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(*all[0], "k#1");
    assert!(all.iter().all(|r| Arc::ptr_eq(r, &all[0])));
    assert_eq!(calls.load(SeqCst), 1);
}

/// Deliberately not `Clone`: the crate must share it, not copy it.
#[derive(Debug)]
struct Teapot {
    call: usize,
}

impl fmt::Display for Teapot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "I'm a teapot (call {})", self.call)
    }
}

impl Error for Teapot {}

#[tokio::test(start_paused = true)]
async fn every_waiter_gets_the_same_inner_error() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (open, gate) = watch::channel(false);
    let inner = {
        let calls = calls.clone();
        service_fn(move |_key: String| {
            let call = calls.fetch_add(1, SeqCst) + 1;
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|&o| o).await;
                Err::<String, _>(Teapot { call })
            }
        })
    };
    let mut svc = CoalesceLayer::new(by_key as ByKey).layer(inner);
    let waiters: Vec<_> = (0..5).map(|_| start(&mut svc, "k".into())).collect();
    open.send_replace(true);
    let errors: Vec<CoalesceError> = bounded("waiters", join_all(waiters))
        .await
        .into_iter()
        .map(Result::unwrap_err)
        .collect();
    assert_eq!(calls.load(SeqCst), 1);
    let shared: *const Teapot = errors[0].downcast_ref::<Teapot>().unwrap();
    for err in &errors {
        assert!(!err.is_panic());
        assert_eq!(err.panic_message(), None);
        let by_downcast = err.downcast_ref::<Teapot>().expect("downcast_ref");
        let by_source = err
            .source()
            .and_then(|s| s.downcast_ref::<Teapot>())
            .expect("source()");
        let by_chain = find_source::<Teapot>(err).expect("source() chain");
        let by_get_ref = err.get_ref().and_then(|e| e.downcast_ref::<Teapot>());
        assert_eq!(by_downcast.call, 1);
        for found in [by_source, by_chain, by_get_ref.unwrap()] {
            assert!(std::ptr::eq(found, shared), "one error, shared via Arc");
        }
        assert!(err.to_string().contains("I'm a teapot"), "{err}");
    }
    assert_eq!(svc.in_flight(), 0);
}

/// An inner service whose error is already a `BoxError` keeps its concrete error reachable.
#[tokio::test(start_paused = true)]
async fn boxed_inner_error_stays_reachable() {
    let inner =
        service_fn(|_key: String| async { Err::<String, BoxError>(Box::new(Teapot { call: 7 })) });
    let svc = CoalesceLayer::new(by_key as ByKey).layer(inner);
    let err = bounded("call", svc.oneshot("k".into())).await.unwrap_err();
    assert_eq!(err.downcast_ref::<Teapot>().unwrap().call, 7);
    assert_eq!(find_source::<Teapot>(&err).unwrap().call, 7);
}

// ---------------------------------------------------------------------------------------------
// 4. Cancellation is local
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn dropping_a_follower_does_not_disturb_the_others() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let mut waiters: Vec<Fut> = (0..4).map(|_| start(&mut svc, "k".into())).collect();
    let dropped = waiters.remove(2);
    let handles: Vec<_> = waiters.into_iter().map(tokio::spawn).collect();
    backend.wait_calls(1).await;
    drop(dropped);
    assert_eq!(svc.in_flight(), 1, "the flight is still registered");
    let late = start(&mut svc, "k".into());
    assert!(late.is_follower(), "and still joinable");
    backend.open();
    assert_eq!(bounded("late", late).await.unwrap(), "k#1");
    for r in join_spawned(handles).await {
        assert_eq!(r.unwrap(), "k#1");
    }
    assert_eq!((backend.calls(), backend.cancelled()), (1, 0));
    assert_eq!(svc.in_flight(), 0);
}

/// The leader goes away mid-call: the call goes on (same backend call, not cancelled, not
/// repeated) and the followers get its result.
#[tokio::test(start_paused = true)]
async fn leader_dropped_mid_flight_followers_still_get_the_result() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let mut leader = start(&mut svc, "k".into());
    assert!(leader.is_leader());
    assert!(futures::poll!(&mut leader).is_pending());
    assert_eq!(
        backend.calls(),
        1,
        "the leader's first poll calls the backend"
    );
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(start(&mut svc, "k".into())))
        .collect();
    tokio::task::yield_now().await;
    drop(leader);
    assert_eq!(backend.cancelled(), 0, "the call must outlive its leader");
    assert_eq!(svc.in_flight(), 1);
    // A request arriving after the leader left still joins the same call.
    let late = tokio::spawn(start(&mut svc, "k".into()));
    backend.open();
    for r in join_spawned(followers).await {
        assert_eq!(r.unwrap(), "k#1");
    }
    assert_eq!(join_spawned(vec![late]).await[0].as_deref().unwrap(), "k#1");
    assert_eq!((backend.calls(), backend.cancelled()), (1, 0));
    assert_eq!(svc.in_flight(), 0);
}

/// The leader goes away while its followers are parked in tasks of their own and nobody else
/// arrives: one of them must be woken to take the call over (a lost wake-up hangs them all).
#[tokio::test(start_paused = true)]
async fn parked_followers_are_woken_to_take_over() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let mut leader = start(&mut svc, "k".into());
    assert!(futures::poll!(&mut leader).is_pending());
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(start(&mut svc, "k".into())))
        .collect();
    tokio::task::yield_now().await;
    backend.open();
    // The gate is open, but only the call's driver can see it: after the leader leaves, that
    // must be a follower, and it is parked.
    drop(leader);
    for r in join_spawned(followers).await {
        assert_eq!(r.unwrap(), "k#1");
    }
    assert_eq!((backend.calls(), backend.cancelled()), (1, 0));
    assert!(svc.group().is_empty());
}

/// The leader goes away before any follower was polled; the first follower polled takes over.
#[tokio::test(start_paused = true)]
async fn leader_dropped_before_followers_were_polled() {
    let backend = Backend::sleeping(Duration::from_secs(10));
    let mut svc = coalesced(&backend);
    let mut leader = start(&mut svc, "k".into());
    assert!(futures::poll!(&mut leader).is_pending());
    let followers: Vec<Fut> = (0..3).map(|_| start(&mut svc, "k".into())).collect();
    drop(leader);
    for r in bounded("followers", join_all(followers)).await {
        assert_eq!(r.unwrap(), "k#1");
    }
    assert_eq!((backend.calls(), backend.cancelled()), (1, 0));
    assert_eq!(svc.in_flight(), 0);
}

/// Handing over repeatedly: every driver but the last goes away.
#[tokio::test(start_paused = true)]
async fn flight_survives_a_chain_of_departing_drivers() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let mut waiters: Vec<Fut> = (0..5).map(|_| start(&mut svc, "k".into())).collect();
    for _ in 0..4 {
        // Poll everybody once: exactly one of them drives the call.
        for w in waiters.iter_mut() {
            assert!(futures::poll!(w).is_pending());
        }
        waiters.remove(0);
    }
    assert_eq!((backend.calls(), backend.cancelled()), (1, 0));
    backend.open();
    let last = waiters.pop().unwrap();
    assert_eq!(bounded("last waiter", last).await.unwrap(), "k#1");
    assert_eq!(svc.in_flight(), 0);
}

async fn assert_key_free_and_reusable(svc: &mut Svc, backend: &Backend, calls_before: usize) {
    assert_eq!(svc.in_flight(), 0, "the key must be freed");
    assert!(svc.group().is_empty(), "no entry left behind");
    backend.open();
    let next = start(svc, "k".into());
    assert!(next.is_leader());
    let expected = format!("k#{}", calls_before + 1);
    assert_eq!(bounded("next request", next).await.unwrap(), expected);
    assert_eq!(backend.calls(), calls_before + 1);
}

/// Every waiter goes away: the backend call is dropped at once (its drop guard runs during the
/// last waiter's drop) and the key is freed; the next request starts a new call.
#[tokio::test(start_paused = true)]
async fn all_waiters_dropped_cancels_the_call_and_frees_the_key() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let mut leader = start(&mut svc, "k".into());
    assert!(futures::poll!(&mut leader).is_pending());
    let mut followers: Vec<Fut> = (0..3).map(|_| start(&mut svc, "k".into())).collect();
    for f in followers.iter_mut() {
        assert!(futures::poll!(f).is_pending());
    }
    drop(followers);
    assert_eq!(backend.cancelled(), 0, "the leader still waits");
    drop(leader);
    assert_eq!(backend.cancelled(), 1, "the call must be dropped promptly");
    assert_key_free_and_reusable(&mut svc, &backend, 1).await;
}

/// Same, when the last waiter is a follower holding a handed-over call.
#[tokio::test(start_paused = true)]
async fn last_follower_dropped_after_the_leader_cancels_the_call() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let mut leader = start(&mut svc, "k".into());
    assert!(futures::poll!(&mut leader).is_pending());
    let mut a = start(&mut svc, "k".into());
    let mut b = start(&mut svc, "k".into());
    assert!(futures::poll!(&mut a).is_pending());
    drop(leader);
    assert!(futures::poll!(&mut a).is_pending(), "a takes the call over");
    assert!(futures::poll!(&mut b).is_pending());
    drop(a);
    assert_eq!(backend.cancelled(), 0, "b still waits");
    drop(b);
    assert_eq!(backend.cancelled(), 1);
    assert_key_free_and_reusable(&mut svc, &backend, 1).await;
}

/// Same, when the call was handed over but nobody had polled it since.
#[tokio::test(start_paused = true)]
async fn orphaned_call_is_cancelled_when_its_followers_go() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let mut leader = start(&mut svc, "k".into());
    assert!(futures::poll!(&mut leader).is_pending());
    let followers: Vec<Fut> = (0..2).map(|_| start(&mut svc, "k".into())).collect();
    drop(leader);
    assert_eq!(backend.cancelled(), 0);
    drop(followers);
    assert_eq!(backend.cancelled(), 1);
    assert_key_free_and_reusable(&mut svc, &backend, 1).await;
}

/// Tasks aborted by the runtime are dropped like any other waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_tasks_cancel_the_call() {
    let backend = Backend::gated();
    let mut svc = coalesced(&backend);
    let handles: Vec<_> = (0..8)
        .map(|_| tokio::spawn(start(&mut svc, "k".into())))
        .collect();
    let mut calls = backend.0.calls.subscribe();
    bounded_real("first call", calls.wait_for(|&c| c == 1))
        .await
        .unwrap();
    for h in &handles {
        h.abort();
    }
    for h in handles {
        assert!(bounded_real("abort", h).await.unwrap_err().is_cancelled());
    }
    assert_eq!(backend.cancelled(), 1);
    assert_eq!(svc.in_flight(), 0);
    backend.open();
    let again = bounded_real("next", svc.oneshot("k".into())).await;
    assert_eq!(again.unwrap(), "k#2");
}

/// DESIGN.md trap: "removing the key unconditionally deletes a newer flight of the same key".
/// The old flight's cleanup runs after its inner future is dropped; here that drop (user code)
/// starts a newer flight of the same key, so the cleanup runs while the newer flight is
/// registered. It must leave it alone: later requests still join the newer flight.
#[tokio::test(start_paused = true)]
async fn old_flights_cleanup_does_not_remove_a_newer_flight() {
    let backend = Backend::gated();
    let svc = coalesced(&backend);
    let newer: Arc<Mutex<Option<Fut>>> = Arc::default();
    let on_drop = {
        let (mut svc, newer) = (svc.clone(), newer.clone());
        OnDrop(Some(Box::new(move || {
            *newer.lock().unwrap() = Some(start(&mut svc, "k".into()));
        })))
    };
    // The old flight's inner future holds `on_drop`.
    let group = svc.group().clone();
    let old = group.run("k".to_string(), move || async move {
        let _on_drop = on_drop;
        std::future::pending::<Result<String, CoalesceError>>().await
    });
    drop(old);
    let newer = newer
        .lock()
        .unwrap()
        .take()
        .expect("the old call was dropped");
    assert!(newer.is_leader());
    assert_eq!(
        svc.in_flight(),
        1,
        "the newer flight must still be registered"
    );
    assert_eq!(svc.group().len(), 1);
    let mut svc2 = svc.clone();
    let joiner = start(&mut svc2, "k".into());
    assert!(joiner.is_follower(), "a request must join the newer flight");
    backend.open();
    let (a, b) = bounded("newer flight", futures::future::join(newer, joiner)).await;
    assert_eq!((a.unwrap(), b.unwrap()), ("k#1".into(), "k#1".into()));
    assert_eq!(backend.calls(), 1, "one backend call for the newer flight");
    assert_eq!(svc.in_flight(), 0);
}

/// The same trap through the core alone, with the newer flight started from the old inner
/// future's destructor.
#[test]
fn group_old_flights_cleanup_does_not_remove_a_newer_flight() {
    on_thread("cleanup vs newer flight", || {
        let group: Group<&'static str> = Group::new();
        let newer: Arc<Mutex<Option<Run<&'static str, u32>>>> = Arc::default();
        let on_drop = {
            let (group, newer) = (group.clone(), newer.clone());
            OnDrop(Some(Box::new(move || {
                *newer.lock().unwrap() = Some(group.run("k", || async { 2u32 }));
            })))
        };
        let old = group.run("k", move || async move {
            let _on_drop = on_drop;
            std::future::pending::<u32>().await
        });
        drop(old);
        let newer = newer.lock().unwrap().take().unwrap();
        assert_eq!(group.in_flight(), 1);
        let makes = AtomicUsize::new(0);
        let joiner = group.run("k", || {
            makes.fetch_add(1, SeqCst);
            async { 3u32 }
        });
        assert!(!joiner.is_leader());
        let (a, b) = futures::executor::block_on(futures::future::join(newer, joiner));
        assert_eq!((a.unwrap(), b.unwrap()), (2, 2));
        assert_eq!(makes.load(SeqCst), 0);
        assert_eq!(group.in_flight(), 0);
    });
}

// ---------------------------------------------------------------------------------------------
// 5. Panics are contained
// ---------------------------------------------------------------------------------------------

/// Panics in `call` (when `in_call`) or in the future of its first call only.
#[derive(Clone, Debug)]
struct Panicky {
    calls: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
    in_call: bool,
}

impl Service<String> for Panicky {
    type Response = String;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<String, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: String) -> Self::Future {
        let n = self.calls.fetch_add(1, SeqCst) + 1;
        if n == 1 && self.in_call {
            panic!("boom in call for {key}");
        }
        let panic_in_future = n == 1;
        let mut gate = self.gate.clone();
        Box::pin(async move {
            if panic_in_future {
                let _ = gate.wait_for(|&o| o).await;
                panic!("boom in future for {key}");
            }
            Ok(format!("{key}#{n}"))
        })
    }
}

async fn panic_is_contained(in_call: bool, expected: &str) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (open, gate) = watch::channel(false);
    let inner = Panicky {
        calls: calls.clone(),
        gate,
        in_call,
    };
    let mut svc = CoalesceLayer::new(by_key as ByKey).layer(inner);
    let waiters: Vec<_> = (0..4).map(|_| start(&mut svc, "k".into())).collect();
    assert!(waiters[0].is_leader());
    // The leader runs in a task of its own: the panic must not unwind through it either.
    let handles: Vec<_> = waiters.into_iter().map(tokio::spawn).collect();
    tokio::task::yield_now().await;
    open.send_replace(true);
    for r in join_spawned(handles).await {
        let err = r.unwrap_err();
        assert!(err.is_panic(), "{err:?}");
        assert!(err.panic_message().unwrap().contains(expected), "{err:?}");
        assert!(err.to_string().contains("panic"), "{err}");
        assert!(err.get_ref().is_none());
        let panicked = find_source::<Panicked>(&err).expect("Panicked in source()");
        assert!(panicked.message().contains(expected));
    }
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(svc.in_flight(), 0);
    let next: Vec<_> = (0..3).map(|_| start(&mut svc, "k".into())).collect();
    for r in bounded("after the panic", join_all(next)).await {
        assert_eq!(r.unwrap(), "k#2", "the key works again");
    }
    assert_eq!(calls.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn panic_in_inner_call_is_an_error_for_every_waiter() {
    panic_is_contained(true, "boom in call for k").await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_inner_future_is_an_error_for_every_waiter() {
    panic_is_contained(false, "boom in future for k").await;
}

#[tokio::test(start_paused = true)]
async fn panic_with_a_non_string_payload_is_contained() {
    let svc = CoalesceLayer::new(by_key as ByKey).layer(service_fn(|_key: String| async {
        std::panic::panic_any(42_u32);
        #[allow(unreachable_code)]
        Ok::<String, Infallible>(String::new())
    }));
    let err = bounded("call", svc.clone().oneshot("k".into()))
        .await
        .unwrap_err();
    assert!(err.is_panic());
    assert_eq!(svc.in_flight(), 0);
}

#[test]
fn group_panic_in_make_or_future_is_an_error_for_every_waiter() {
    on_thread(
        "group_panic_in_make_or_future_is_an_error_for_every_waiter",
        || {
            let group: Group<&'static str> = Group::new();
            let run = group.run("make", || -> std::future::Ready<u32> {
                panic!("boom in make")
            });
            let err = futures::executor::block_on(run).unwrap_err();
            assert!(err.message().contains("boom in make"), "{err}");
            assert!(err.to_string().contains("panicked"), "{err}");
            assert_eq!(group.in_flight(), 0);

            let (open, mut gate) = watch::channel(false);
            let leader = group.run("future", move || async move {
                let _ = gate.wait_for(|&o| o).await;
                panic!("boom in future");
                #[allow(unreachable_code)]
                0u32
            });
            let follower = group.run("future", || async { 1u32 });
            open.send_replace(true);
            let (a, b) = futures::executor::block_on(futures::future::join(leader, follower));
            for err in [a.unwrap_err(), b.unwrap_err()] {
                assert!(err.message().contains("boom in future"), "{err}");
            }
            assert_eq!(group.in_flight(), 0);
            let again = group.run("future", || async { 2u32 });
            assert_eq!(futures::executor::block_on(again).unwrap(), 2);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Followers never busy-wait and never wait on the inner service's readiness
// ---------------------------------------------------------------------------------------------

/// However long the call takes, a follower is polled once to park and once when woken (one
/// spare poll allowed for a spurious wakeup), never in a loop.
#[tokio::test(start_paused = true)]
async fn followers_are_woken_not_polled_in_a_loop() {
    let backend = Backend::sleeping(Duration::from_secs(3600));
    let mut svc = coalesced(&backend);
    let leader_polls = Arc::new(AtomicUsize::new(0));
    let leader = tokio::spawn(CountPolls {
        inner: Box::pin(start(&mut svc, "k".into())),
        polls: leader_polls.clone(),
    });
    let counters: Vec<Arc<AtomicUsize>> = (0..10).map(|_| Arc::default()).collect();
    let followers: Vec<_> = counters
        .iter()
        .map(|polls| {
            tokio::spawn(CountPolls {
                inner: Box::pin(start(&mut svc, "k".into())),
                polls: polls.clone(),
            })
        })
        .collect();
    // Drive the clock by hand in bounded steps, so a busy follower (which would keep the
    // runtime from idling, and so from auto-advancing) still lets this test finish and fail.
    for _ in 0..200 {
        if followers.iter().all(|f| f.is_finished()) {
            break;
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        tokio::task::yield_now().await;
    }
    for r in join_spawned(followers).await {
        assert_eq!(r.unwrap(), "k#1");
    }
    assert_eq!(
        join_spawned(vec![leader]).await[0].as_deref().unwrap(),
        "k#1"
    );
    for polls in &counters {
        let polls = polls.load(SeqCst);
        assert!(polls <= 3, "a follower was polled {polls} times");
    }
    let polls = leader_polls.load(SeqCst);
    assert!(polls <= 3, "the leader was polled {polls} times");
}

/// `tower_test::mock`: readiness is granted for one call only. The layer stays ready, the one
/// flight takes that readiness, and followers (even those arriving after it was used up)
/// resolve with the flight.
#[tokio::test(start_paused = true)]
async fn followers_never_wait_on_inner_readiness() {
    let layer = CoalesceLayer::new(|key: &String| Some(key.clone()));
    let (mut svc, mut handle) = tower_test::mock::spawn_layer::<String, String, _>(layer);
    handle.allow(0);
    assert!(
        svc.poll_ready().is_ready(),
        "the layer must not wait on inner readiness"
    );
    let early: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.call("k".to_string())))
        .collect();
    tokio::task::yield_now().await;
    assert!(handle.poll_request().is_pending(), "no readiness, no call");
    handle.allow(1);
    let (req, respond) = bounded("the flight's call", handle.next_request())
        .await
        .unwrap();
    assert_eq!(req, "k");
    // Readiness is used up now; these must not need any.
    assert!(svc.poll_ready().is_ready());
    let late: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.call("k".to_string())))
        .collect();
    tokio::task::yield_now().await;
    respond.send_response("v".to_string());
    for r in join_spawned(early)
        .await
        .into_iter()
        .chain(join_spawned(late).await)
    {
        assert_eq!(r.unwrap(), "v");
    }
    assert!(handle.poll_request().is_pending(), "exactly one inner call");
    assert_eq!(svc.get_ref().in_flight(), 0);

    // A new flight does wait for readiness: the flight drives it, not the caller.
    let next = tokio::spawn(svc.call("k".to_string()));
    tokio::task::yield_now().await;
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    let (_, respond) = bounded("second call", handle.next_request()).await.unwrap();
    respond.send_response("w".to_string());
    assert_eq!(join_spawned(vec![next]).await[0].as_deref().unwrap(), "w");
}

/// A readiness error is the flight's error, shared like any other.
#[tokio::test(start_paused = true)]
async fn inner_readiness_error_is_shared() {
    let layer = CoalesceLayer::new(|key: &String| Some(key.clone()));
    let (mut svc, mut handle) = tower_test::mock::spawn_layer::<String, String, _>(layer);
    handle.allow(0);
    let waiters: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.call("k".to_string())))
        .collect();
    tokio::task::yield_now().await;
    handle.send_error(Teapot { call: 0 });
    for r in join_spawned(waiters).await {
        assert!(r.unwrap_err().downcast_ref::<Teapot>().is_some());
    }
    assert!(handle.poll_request().is_pending());
    assert_eq!(svc.get_ref().in_flight(), 0);
}

/// `ConcurrencyLimit(1)` under the layer limits flights, not waiters.
#[tokio::test(start_paused = true)]
async fn concurrency_limit_below_the_layer_does_not_defeat_coalescing() {
    let backend = Backend::gated();
    let mut svc = ServiceBuilder::new()
        .coalesce(by_key as ByKey)
        .concurrency_limit(1)
        .service(backend.clone());
    let mut handles = Vec::new();
    for key in ["a", "b"] {
        for _ in 0..50 {
            // `ready` would hang here if the layer passed the limit's readiness through.
            let svc = bounded("ready", svc.ready()).await.unwrap();
            handles.push(tokio::spawn(svc.call(key.to_string())));
        }
    }
    backend.wait_calls(1).await;
    tokio::task::yield_now().await;
    assert_eq!(backend.calls(), 1, "b's flight waits for the permit");
    assert_eq!(svc.in_flight(), 2);
    backend.open();
    let results = join_spawned(handles).await;
    assert_eq!(backend.calls(), 2, "one call per key");
    let (a, b) = results.split_at(50);
    assert!(a
        .iter()
        .all(|r| r.as_deref().unwrap() == a[0].as_deref().unwrap()));
    assert!(b
        .iter()
        .all(|r| r.as_deref().unwrap() == b[0].as_deref().unwrap()));
    assert_ne!(a[0].as_deref().unwrap(), b[0].as_deref().unwrap());
    assert_eq!(svc.in_flight(), 0);
}

/// The same with `oneshot` in spawned tasks, the way a server drives a service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_with_spawned_oneshots() {
    let backend = Backend::gated();
    let svc = ServiceBuilder::new()
        .coalesce(by_key as ByKey)
        .concurrency_limit(1)
        .service(backend.clone());
    let registered = Arc::new(watch::Sender::new(0usize));
    let handles: Vec<_> = (0..64)
        .map(|_| {
            let (svc, registered) = (svc.clone(), registered.clone());
            tokio::spawn(async move {
                let call = svc.oneshot("k".to_string());
                tokio::pin!(call);
                // The first poll reaches the registry (and, for the leader, the limit).
                if let Poll::Ready(out) = futures::poll!(call.as_mut()) {
                    return out;
                }
                registered.send_modify(|n| *n += 1);
                call.await
            })
        })
        .collect();
    let mut all_in = registered.subscribe();
    bounded_real("registration", all_in.wait_for(|&n| n == 64))
        .await
        .unwrap();
    assert_eq!(backend.calls(), 1);
    backend.open();
    for r in bounded_real("waiters", join_all(handles)).await {
        assert_eq!(r.unwrap().unwrap(), "k#1");
    }
    assert_eq!(backend.calls(), 1, "coalescing defeated");
    assert_eq!(svc.in_flight(), 0);
}

// ---------------------------------------------------------------------------------------------
// Bypass
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn none_key_bypasses_coalescing() {
    let backend = Backend::gated();
    let mut svc =
        CoalesceLayer::new(|key: &String| (!key.starts_with("nocache")).then(|| key.clone()))
            .layer(backend.clone());
    let bypass: Vec<_> = (0..10).map(|_| start(&mut svc, "nocache".into())).collect();
    assert!(bypass
        .iter()
        .all(|f| f.is_bypass() && !f.is_leader() && !f.is_follower()));
    let keyed: Vec<_> = (0..10).map(|_| start(&mut svc, "k".into())).collect();
    let bypass: Vec<_> = bypass.into_iter().map(tokio::spawn).collect();
    let keyed: Vec<_> = keyed.into_iter().map(tokio::spawn).collect();
    backend.wait_calls(11).await;
    assert_eq!(svc.in_flight(), 1, "bypassed requests are never registered");
    backend.open();
    let mut seen: Vec<String> = join_spawned(bypass)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 10, "each bypassed request got its own call");
    let keyed = join_spawned(keyed).await;
    assert!(keyed
        .iter()
        .all(|r| r.as_deref().unwrap() == keyed[0].as_deref().unwrap()));
    assert_eq!(backend.calls(), 11);
    assert_eq!(svc.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn bypassed_errors_and_panics_pass_through() {
    let svc = CoalesceLayer::new(|_: &String| None::<String>).layer(service_fn(
        |key: String| async move {
            if key == "panic" {
                panic!("bypassed panic");
            }
            Err::<String, _>(Teapot { call: 3 })
        },
    ));
    let err = bounded("bypass", svc.clone().oneshot("err".into()))
        .await
        .unwrap_err();
    assert_eq!(err.downcast_ref::<Teapot>().unwrap().call, 3);
    // A bypassed request is the inner service's alone: its panic is not caught for anybody.
    let panicked = tokio::spawn(svc.oneshot("panic".into())).await;
    assert!(panicked.unwrap_err().is_panic());
}

// ---------------------------------------------------------------------------------------------
// 7. The registry cleans up after itself
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_is_empty_after_many_distinct_keys() {
    let svc = CoalesceLayer::new(|key: &u32| Some(*key)).layer(service_fn(|key: u32| async move {
        tokio::task::yield_now().await;
        Ok::<_, Infallible>(key)
    }));
    let handles: Vec<_> = (0..50_000u32)
        .map(|key| tokio::spawn(svc.clone().oneshot(key % 20_000)))
        .collect();
    for r in bounded_real("requests", join_all(handles)).await {
        r.unwrap().unwrap();
    }
    assert_eq!(svc.in_flight(), 0);
    assert!(svc.group().is_empty(), "no entry left behind");
}

// ---------------------------------------------------------------------------------------------
// 8. No lock held across an .await or while user code runs
// ---------------------------------------------------------------------------------------------

/// The key extractor, the inner service's `poll_ready`, `call`, future and clone all re-enter
/// the registry: `in_flight` takes every shard lock, a nested request takes a shard lock and a
/// flight lock. A lock held around any of them deadlocks this thread (std mutexes are not
/// re-entrant), which `on_thread` turns into a failure.
#[test]
fn user_code_may_reenter_the_registry() {
    #[derive(Debug)]
    struct Inner(Group<String>);
    impl Clone for Inner {
        fn clone(&self) -> Self {
            // The layer clones the inner service for every flight: user code.
            let _ = self.0.in_flight();
            Inner(self.0.clone())
        }
    }
    impl Service<String> for Inner {
        type Response = String;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<String, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            let _ = self.0.in_flight();
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, key: String) -> Self::Future {
            let _ = self.0.in_flight();
            let group = self.0.clone();
            Box::pin(async move {
                let _ = group.in_flight();
                // A nested flight of the same registry, awaited inside the inner future.
                let nested = group
                    .run(format!("nested-{key}"), || async {
                        tokio::task::yield_now().await;
                        7u32
                    })
                    .await
                    .unwrap();
                let _ = group.in_flight();
                Ok(format!("{key}({nested})"))
            })
        }
    }

    on_thread("re-entrant user code", || {
        paused_runtime().block_on(async {
            let group: Group<String> = Group::new();
            let in_extractor = group.clone();
            let layer = CoalesceLayer::with_group(
                move |req: &String| {
                    let _ = in_extractor.in_flight();
                    Some(req.clone())
                },
                group.clone(),
            );
            let mut svc = layer.layer(Inner(group.clone()));
            let waiters: Vec<_> = (0..3).map(|_| start(&mut svc, "k".into())).collect();
            for r in bounded("waiters", join_all(waiters)).await {
                assert_eq!(r.unwrap(), "k(7)");
            }
            assert_eq!(group.in_flight(), 0);
        })
    });
}

/// A key whose destructor re-enters the registry: keys are dropped outside every lock.
#[test]
fn key_destructor_may_reenter_the_registry() {
    #[derive(Clone)]
    struct Key {
        name: &'static str,
        group: Arc<std::sync::OnceLock<Group<Key>>>,
    }
    impl PartialEq for Key {
        fn eq(&self, other: &Self) -> bool {
            self.name == other.name
        }
    }
    impl Eq for Key {}
    impl std::hash::Hash for Key {
        fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
            self.name.hash(state);
        }
    }
    impl Drop for Key {
        fn drop(&mut self) {
            if let Some(group) = self.group.get() {
                let _ = group.in_flight();
            }
        }
    }

    on_thread("key destructor", || {
        let cell = Arc::new(std::sync::OnceLock::new());
        let group: Group<Key> = Group::new();
        cell.set(group.clone()).ok().unwrap();
        let key = || Key {
            name: "k",
            group: cell.clone(),
        };
        // Completed flight (entry dropped on completion), with a follower (its key dropped on
        // joining), then a cancelled flight (entry dropped on cancellation).
        let leader = group.run(key(), || async { 1u32 });
        let follower = group.run(key(), || async { 2u32 });
        let (a, b) = futures::executor::block_on(futures::future::join(leader, follower));
        assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
        drop(group.run(key(), std::future::pending::<u32>));
        assert_eq!(group.in_flight(), 0);
    });
}

/// A waker that re-enters the flight it is woken by: on wake it drops another waiter of the
/// same flight (which takes that flight's lock) and reads the registry. Wakers run outside
/// every lock, both on completion and on handing the call over.
#[test]
fn waker_may_reenter_the_flight() {
    struct Reentrant {
        group: Group<&'static str>,
        victim: Mutex<Option<Run<&'static str, u32>>>,
        woken: AtomicUsize,
    }
    impl Wake for Reentrant {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.woken.fetch_add(1, SeqCst);
            let _ = self.group.in_flight();
            let victim = self.victim.lock().unwrap().take();
            drop(victim);
        }
    }

    on_thread("re-entrant waker", || {
        for hand_over in [false, true] {
            let group: Group<&'static str> = Group::new();
            let (open, mut gate) = watch::channel(false);
            let mut leader = group.run("k", move || async move {
                let _ = gate.wait_for(|&o| o).await;
                1u32
            });
            let mut woken = group.run("k", || async { 2u32 });
            let probe = Arc::new(Reentrant {
                group: group.clone(),
                victim: Mutex::new(Some(group.run("k", || async { 3u32 }))),
                woken: AtomicUsize::new(0),
            });
            let waker = Waker::from(probe.clone());
            let mut cx = Context::from_waker(&waker);
            let mut noop = Context::from_waker(Waker::noop());
            assert!(Pin::new(&mut leader).poll(&mut noop).is_pending());
            assert!(Pin::new(&mut woken).poll(&mut cx).is_pending());
            if hand_over {
                drop(leader);
            } else {
                open.send_replace(true);
                assert_eq!(futures::executor::block_on(leader).unwrap(), 1);
            }
            assert_eq!(probe.woken.load(SeqCst), 1, "woken exactly once");
            assert!(probe.victim.lock().unwrap().is_none());
            open.send_replace(true);
            assert_eq!(futures::executor::block_on(woken).unwrap(), 1);
            assert_eq!(group.in_flight(), 0);
        }
    });
}

/// The response is cloned for the followers outside the flight's lock: while one clone is in
/// progress (here: slow, and waiting on another thread) a waiter of the same flight can leave.
#[test]
fn slow_response_clone_does_not_block_waiters_leaving() {
    on_thread("slow clone", || {
        let group: Group<&'static str> = Group::new();
        let (cloning_tx, cloning_rx) = mpsc::channel::<()>();
        let (left_tx, left_rx) = mpsc::channel::<()>();
        let left_in_time = Arc::new(AtomicBool::new(false));
        let hook: Box<dyn FnOnce() + Send> = {
            let left_in_time = left_in_time.clone();
            Box::new(move || {
                cloning_tx.send(()).unwrap();
                let left = left_rx.recv_timeout(Duration::from_secs(3)).is_ok();
                left_in_time.store(left, SeqCst);
            })
        };
        let leader = group.run("k", move || async move { Hooked::new(1, Some(hook)) });
        let mut stays = group.run("k", || async { Hooked::new(2, None) });
        let mut leaves = group.run("k", || async { Hooked::new(3, None) });
        let mut noop = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut stays).poll(&mut noop).is_pending());
        assert!(Pin::new(&mut leaves).poll(&mut noop).is_pending());
        let leaver = std::thread::spawn(move || {
            cloning_rx.recv().unwrap();
            drop(leaves);
            let _ = left_tx.send(());
        });
        assert_eq!(futures::executor::block_on(leader).unwrap().value, 1);
        leaver.join().unwrap();
        assert!(
            left_in_time.load(SeqCst),
            "a waiter could not leave while the response was being cloned"
        );
        assert_eq!(futures::executor::block_on(stays).unwrap().value, 1);
        assert_eq!(group.in_flight(), 0);
    });
}

// ---------------------------------------------------------------------------------------------
// Composition: spawning, traits, layer scope, ServiceBuilder, the core used directly
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_oneshot_compiles_for_concrete_and_boxed_errors() {
    let concrete =
        CoalesceLayer::new(|id: &u32| Some(*id)).layer(service_fn(|id: u32| async move {
            if id == 0 {
                Err(Teapot { call: 0 })
            } else {
                Ok(id * 2)
            }
        }));
    let boxed = CoalesceLayer::new(|id: &u32| Some(*id)).layer(service_fn(|id: u32| async move {
        if id == 0 {
            Err::<u32, BoxError>("zero".into())
        } else {
            Ok(id * 3)
        }
    }));
    let svc = concrete.clone();
    let a = tokio::spawn(async move { svc.oneshot(21).await });
    let svc = concrete.clone();
    let c = tokio::spawn(async move { svc.oneshot(0).await });
    // With a `BoxError` inner error, `tokio::spawn(async move { svc.oneshot(req).await })` does
    // not compile ("implementation of `From` is not general enough", rust-lang/rust#64552): the
    // `Send` check of the async block must prove `CoalesceService: Service` (a where-clause of
    // tower's `Oneshot`) with erased lifetimes, and `BoxError: Into<BoxError>` does not hold
    // for every lifetime of the `dyn Error`. tower's own `Timeout` fails the same way. These two
    // spellings compile and are what we document:
    let svc = boxed.clone();
    let b = tokio::spawn(svc.oneshot(7));
    let mut svc = boxed.clone();
    let d = tokio::spawn(async move { svc.ready().await?.call(0).await });
    let (a, b, c, d) = bounded_real("spawned", async { tokio::join!(a, b, c, d) }).await;
    assert_eq!(a.unwrap().unwrap(), 42);
    assert_eq!(b.unwrap().unwrap(), 21);
    assert!(c.unwrap().unwrap_err().downcast_ref::<Teapot>().is_some());
    assert_eq!(
        d.unwrap().unwrap_err().to_string(),
        "inner service failed: zero"
    );
}

fn assert_clone_send_sync_debug<T: Clone + Send + Sync + fmt::Debug + 'static>(_: &T) {}
fn assert_send_debug<T: Send + fmt::Debug + 'static>(_: &T) {}
fn assert_error<T: Error + Clone + Send + Sync + 'static>() {}

#[test]
fn public_types_are_clone_send_sync_debug() {
    let layer = CoalesceLayer::new(|key: &String| Some(key.clone()));
    assert_clone_send_sync_debug(&layer);
    let mut svc = layer.layer(Backend::gated());
    assert_clone_send_sync_debug(&svc);
    let built = ServiceBuilder::new()
        .coalesce(|id: &u32| Some(*id))
        .service(service_fn(|id: u32| async move { Ok::<_, Infallible>(id) }));
    assert_clone_send_sync_debug(&built);
    assert_clone_send_sync_debug(&Group::<String>::new());
    assert_error::<CoalesceError>();
    assert_error::<Panicked>();
    let fut = start(&mut svc, "k".into());
    assert_send_debug(&fut);
    assert!(format!("{fut:?}").contains("ResponseFuture"));
    assert_send_debug(&Group::<u8>::new().run(1, || async { 1u8 }));
    assert!(format!("{svc:?}").contains("CoalesceService"));
    assert!(format!("{layer:?}").contains("CoalesceLayer"));
}

/// One layer, two `layer()` calls (as axum does per route and per connection): one registry.
#[tokio::test(start_paused = true)]
async fn one_layer_shares_its_registry_across_layer_calls() {
    let backend = Backend::gated();
    let layer = CoalesceLayer::new(by_key as ByKey);
    let mut first = layer.layer(backend.clone());
    let mut second = layer.clone().layer(backend.clone());
    let a = start(&mut first, "k".into());
    let b = start(&mut second, "k".into());
    assert!(a.is_leader() && b.is_follower());
    assert_eq!(layer.group().in_flight(), 1);
    // A layer of its own is a registry of its own.
    let mut separate = CoalesceLayer::new(by_key as ByKey).layer(backend.clone());
    let c = start(&mut separate, "k".into());
    assert!(c.is_leader());
    backend.open();
    let (a, b, c) = bounded("three", async { tokio::join!(a, b, c) }).await;
    assert_eq!(a.unwrap(), b.unwrap());
    assert!(c.is_ok());
    assert_eq!(backend.calls(), 2);
    assert_eq!(
        first.in_flight() + second.in_flight() + separate.in_flight(),
        0
    );
}

/// `with_group`: two layers and a direct `Group::run` caller sharing one registry meet when
/// their keys and output types are equal.
#[tokio::test(start_paused = true)]
async fn layers_and_direct_callers_sharing_a_group_coalesce() {
    let backend = Backend::gated();
    let group: Group<String> = Group::new();
    let mut one = CoalesceLayer::with_group(by_key as ByKey, group.clone()).layer(backend.clone());
    let mut two = CoalesceLayer::with_group(by_key as ByKey, group.clone()).layer(backend.clone());
    let a = start(&mut one, "k".into());
    let b = start(&mut two, "k".into());
    let direct = group.run("k".to_string(), || async {
        Ok::<String, CoalesceError>("direct".into())
    });
    assert!(a.is_leader() && b.is_follower() && !direct.is_leader());
    backend.open();
    let (a, b, direct) = bounded("three", async { tokio::join!(a, b, direct) }).await;
    assert_eq!(a.unwrap(), "k#1");
    assert_eq!(b.unwrap(), "k#1");
    assert_eq!(direct.unwrap().unwrap(), "k#1");
    assert_eq!(group.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn service_builder_ext_coalesces() {
    let backend = Backend::gated();
    let mut svc = ServiceBuilder::new()
        .coalesce(|key: &String| Some(key.clone()))
        .service(backend.clone());
    let waiters: Vec<_> = (0..10).map(|_| start(&mut svc, "k".into())).collect();
    backend.open();
    for r in bounded("waiters", join_all(waiters)).await {
        assert_eq!(r.unwrap(), "k#1");
    }
    assert_eq!(backend.calls(), 1);
    assert_eq!(svc.get_ref().calls(), 1);
    assert_eq!(svc.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn group_run_shares_one_call() {
    let group: Group<&'static str> = Group::new();
    let makes = Arc::new(AtomicUsize::new(0));
    let (open, gate) = watch::channel(false);
    let make = || {
        let (makes, mut gate) = (makes.clone(), gate.clone());
        move || {
            let n = makes.fetch_add(1, SeqCst) + 1;
            async move {
                let _ = gate.wait_for(|&o| o).await;
                n
            }
        }
    };
    let runs: Vec<_> = (0..5).map(|_| group.run("k", make())).collect();
    assert!(runs[0].is_leader() && runs[1..].iter().all(|r| !r.is_leader()));
    assert_eq!(group.in_flight(), 1);
    open.send_replace(true);
    for r in bounded("runs", join_all(runs)).await {
        assert_eq!(r.unwrap(), 1);
    }
    assert_eq!(makes.load(SeqCst), 1);
    assert_eq!(group.in_flight(), 0);
    assert_eq!(bounded("again", group.run("k", make())).await.unwrap(), 2);
}

/// Flights of different output types never meet, even under one key.
#[tokio::test(start_paused = true)]
async fn group_output_types_do_not_meet() {
    let group: Group<&'static str> = Group::new();
    let (open, gate) = watch::channel(false);
    let mut g1 = gate.clone();
    let number = group.run("k", move || async move {
        let _ = g1.wait_for(|&o| o).await;
        1u32
    });
    let mut g2 = gate.clone();
    let text = group.run("k", move || async move {
        let _ = g2.wait_for(|&o| o).await;
        "one".to_string()
    });
    let number_follower = group.run("k", || async { 2u32 });
    let text_follower = group.run("k", || async { "two".to_string() });
    assert!(number.is_leader() && text.is_leader());
    assert!(!number_follower.is_leader() && !text_follower.is_leader());
    assert_eq!(group.in_flight(), 2);
    open.send_replace(true);
    let (n, t, nf, tf) = bounded("runs", async {
        tokio::join!(number, text, number_follower, text_follower)
    })
    .await;
    assert_eq!((n.unwrap(), nf.unwrap()), (1, 1));
    assert_eq!(
        (t.unwrap(), tf.unwrap()),
        ("one".to_string(), "one".to_string())
    );
    assert_eq!(group.in_flight(), 0);
}

// ---------------------------------------------------------------------------------------------
// Panicking user code around the flight (response clone, inner future's destructor)
// ---------------------------------------------------------------------------------------------

/// A response whose `Clone` panics (user code, run while the result is handed out).
#[derive(Debug)]
struct CloneBomb(u32);

impl Clone for CloneBomb {
    fn clone(&self) -> Self {
        panic!("clone bomb");
    }
}

/// Nobody hangs: when cloning the response for the followers panics, the followers still
/// resolve (with an error), and the key stays usable.
#[tokio::test(start_paused = true)]
async fn panicking_response_clone_does_not_hang_followers() {
    let group: Group<&'static str> = Group::new();
    let (open, mut gate) = watch::channel(false);
    let leader = group.run("k", move || async move {
        let _ = gate.wait_for(|&o| o).await;
        CloneBomb(1)
    });
    let followers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(group.run("k", || async { CloneBomb(2) })))
        .collect();
    let leader = tokio::spawn(leader);
    tokio::task::yield_now().await;
    open.send_replace(true);
    // The leader's task sees the panic of its own response type; that is the caller's.
    let _ = bounded("leader", leader).await;
    for f in followers {
        let out = bounded("a follower after a panicking clone", f).await;
        assert!(
            !matches!(out, Ok(Ok(_))),
            "a follower cannot get a clone that panicked"
        );
    }
    assert_eq!(group.in_flight(), 0);
    let again = group.run("k", || async { CloneBomb(3) });
    assert!(again.is_leader());
    assert_eq!(bounded("again", again).await.unwrap().0, 3);
}

/// A response whose `Clone` panics once `CLONES_BEFORE_BOMB` clones were made.
#[derive(Debug)]
struct LateBomb(u32, Arc<AtomicUsize>);

const CLONES_BEFORE_BOMB: usize = 70;

impl Clone for LateBomb {
    fn clone(&self) -> Self {
        if self.1.fetch_add(1, SeqCst) >= CLONES_BEFORE_BOMB {
            panic!("late clone bomb");
        }
        LateBomb(self.0, self.1.clone())
    }
}

/// Hundreds of followers are served a batch at a time; when the response's `Clone` starts to
/// panic part-way, the followers served before keep their copies, every later one gets the
/// panic as an error, nobody hangs, and the key is freed.
#[tokio::test(start_paused = true)]
async fn a_clone_that_panics_part_way_through_a_large_fan_out_still_answers_everybody() {
    let group: Group<&'static str> = Group::new();
    let clones = Arc::new(AtomicUsize::new(0));
    let (open, mut gate) = watch::channel(false);
    let bomb = LateBomb(9, clones.clone());
    let leader = group.run("k", move || async move {
        let _ = gate.wait_for(|&o| o).await;
        bomb
    });
    let followers: Vec<_> = (0..300)
        .map(|_| tokio::spawn(group.run("k", std::future::pending::<LateBomb>)))
        .collect();
    let leader = tokio::spawn(leader);
    tokio::task::yield_now().await;
    open.send_replace(true);
    assert_eq!(bounded("leader", leader).await.unwrap().unwrap().0, 9);
    let (mut copies, mut panics) = (0, 0);
    for f in followers {
        match bounded("a follower of a large fan-out", f).await.unwrap() {
            Ok(copy) => {
                assert_eq!(copy.0, 9, "a copy of the leader's response");
                copies += 1;
            }
            Err(panicked) => {
                assert_eq!(panicked.message(), "late clone bomb");
                panics += 1;
            }
        }
    }
    assert_eq!(copies + panics, 300);
    assert!(
        copies <= CLONES_BEFORE_BOMB,
        "no copy is made after the panic"
    );
    assert!(panics >= 300 - CLONES_BEFORE_BOMB, "the rest get the panic");
    assert_eq!(
        clones.load(SeqCst),
        CLONES_BEFORE_BOMB + 1,
        "Clone is not called again once it panicked"
    );
    assert_eq!(group.in_flight(), 0);
}

/// Dropping the last waiter drops the call; if the call's destructor panics, that panic is
/// the dropper's, but the key must still be freed and usable.
#[test]
fn panicking_destructor_of_a_cancelled_call_still_frees_the_key() {
    on_thread(
        "panicking_destructor_of_a_cancelled_call_still_frees_the_key",
        || {
            struct Bomb;
            impl Drop for Bomb {
                fn drop(&mut self) {
                    panic!("destructor bomb");
                }
            }
            let group: Group<&'static str> = Group::new();
            let run = group.run("k", || async {
                let _bomb = Bomb;
                std::future::pending::<u32>().await
            });
            let mut run = Box::pin(run);
            let mut noop = Context::from_waker(Waker::noop());
            assert!(run.as_mut().poll(&mut noop).is_pending());
            let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(run)));
            assert!(
                dropped.is_err(),
                "the destructor's panic reaches the dropper"
            );
            let again = group.run("k", || async { 2u32 });
            assert!(again.is_leader(), "the key is usable");
            assert_eq!(futures::executor::block_on(again).unwrap(), 2);
            assert_eq!(group.in_flight(), 0, "no entry left behind");
        },
    );
}

/// DESIGN.md trap: "keys reduced to a 64-bit hash serve one request's response to another on a
/// collision". Keys whose hashes all collide still never meet unless they are equal.
#[tokio::test(start_paused = true)]
async fn colliding_keys_do_not_share_a_flight() {
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Colliding(&'static str);
    impl std::hash::Hash for Colliding {
        fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
            0u8.hash(state);
        }
    }
    let group: Group<Colliding> = Group::new();
    let (open, gate) = watch::channel(false);
    let fetch = |name: &'static str| {
        let mut gate = gate.clone();
        move || async move {
            let _ = gate.wait_for(|&o| o).await;
            name
        }
    };
    let a = group.run(Colliding("a"), fetch("a"));
    let b = group.run(Colliding("b"), fetch("b"));
    let a2 = group.run(Colliding("a"), fetch("a2"));
    assert!(a.is_leader() && b.is_leader() && !a2.is_leader());
    assert_eq!(group.in_flight(), 2);
    open.send_replace(true);
    let (a, b, a2) = bounded("colliding", async { tokio::join!(a, b, a2) }).await;
    assert_eq!((a.unwrap(), b.unwrap(), a2.unwrap()), ("a", "b", "a"));
    assert_eq!(group.in_flight(), 0);
}

/// With a linger window the output is cloned once more, to keep it: a panic there must not
/// leave the key registered to a flight that never ends.
#[tokio::test(start_paused = true)]
async fn panicking_clone_under_linger_does_not_brick_the_key() {
    let group: Group<&'static str> = tower_coalesce::GroupBuilder::new()
        .linger(Duration::from_secs(1))
        .build();
    let first = tokio::spawn(group.run("k", || async { CloneBomb(1) }));
    let _ = bounded("first", first).await;
    let again = group.run("k", || async { CloneBomb(2) });
    let out = bounded("a request after the panicking clone", again).await;
    assert!(!matches!(out, Ok(CloneBomb(1))));
}

/// Item 1 as the backend sees it: a cancelled call's inner future is still being dropped (its
/// destructor runs) when the key is already free again. A flight started in that window must
/// not reach the backend before the cancelled call is gone, or the backend serves two calls of
/// one key at once. The window is forced open here: the old call's destructor itself starts,
/// and polls, the next flight.
#[test]
fn next_flight_waits_until_the_cancelled_call_is_dropped() {
    on_thread("next flight vs cancelled call", || {
        let group: Group<&'static str> = Group::new();
        let polled_during_drop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        let next: Arc<Mutex<Option<Run<&'static str, u32>>>> = Arc::default();
        let on_drop = {
            let (group, started, next) = (group.clone(), started.clone(), next.clone());
            let polled_during_drop = polled_during_drop.clone();
            OnDrop(Some(Box::new(move || {
                let started_in_make = started.clone();
                let mut run = group.run("k", move || async move {
                    started_in_make.fetch_add(1, SeqCst);
                    2u32
                });
                let mut noop = Context::from_waker(Waker::noop());
                let _ = Pin::new(&mut run).poll(&mut noop);
                polled_during_drop.store(started.load(SeqCst) > 0, SeqCst);
                *next.lock().unwrap() = Some(run);
            })))
        };
        let old = group.run("k", move || async move {
            let _on_drop = on_drop;
            std::future::pending::<u32>().await
        });
        drop(old);
        assert!(
            !polled_during_drop.load(SeqCst),
            "the next call started while the cancelled one was still being dropped"
        );
        let next = next.lock().unwrap().take().expect("the hook ran");
        assert_eq!(futures::executor::block_on(next).unwrap(), 2);
        assert_eq!(started.load(SeqCst), 1);
        assert!(group.is_empty());
    });
}
