//! Review round 10: option combinations under cancellation at every point, the layer's eager
//! inner call with tower-test mocks and tower middleware, follower wake counts, panics in user
//! code at every point, and one flight per key on a multi-thread runtime.
//!
//! Every test is deterministic: paused time, semaphores as gates, counted wakes, no sleeps
//! for synchronisation; each is bounded so that a hang fails.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};
use tower_coalesce::{CoalesceError, CoalesceLayer, Group, GroupBuilder, OnTimeout, Panicked};
use tower_test::assert_request_eq;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A waker that counts its wakes.
#[derive(Default)]
struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

fn counting() -> (Arc<Count>, Waker) {
    let count = Arc::new(Count::default());
    let waker = Waker::from(Arc::clone(&count));
    (count, waker)
}

type BoxFut<O> = Pin<Box<dyn Future<Output = O> + Send>>;

/// A waiter polled by hand with a counting waker: polled only when never polled yet or woken
/// since its last poll, so that a lost wake-up shows as a hang.
struct Waiter<O> {
    fut: Option<BoxFut<O>>,
    count: Arc<Count>,
    waker: Waker,
    seen: usize,
    polls: usize,
    out: Option<O>,
}

impl<O> Waiter<O> {
    fn new(fut: BoxFut<O>) -> Self {
        let (count, waker) = counting();
        Waiter {
            fut: Some(fut),
            count,
            waker,
            seen: 0,
            polls: 0,
            out: None,
        }
    }

    fn live(&self) -> bool {
        self.fut.is_some()
    }

    /// Polls it if it is live and unfinished (whether woken or not).
    fn poll(&mut self) {
        let Some(fut) = self.fut.as_mut() else {
            return;
        };
        self.seen = self.count.0.load(SeqCst);
        self.polls += 1;
        if let Poll::Ready(out) = fut.as_mut().poll(&mut Context::from_waker(&self.waker)) {
            self.out = Some(out);
            self.fut = None;
        }
    }

    /// Polls it only if it was woken since its last poll (or never polled).
    fn poll_if_woken(&mut self) -> bool {
        if self.fut.is_some() && (self.polls == 0 || self.count.0.load(SeqCst) > self.seen) {
            self.poll();
            return true;
        }
        false
    }

    fn drop_it(&mut self) {
        self.fut = None;
    }
}

/// Runs the live waiters to the end, each polled only when woken; fails if one never is.
async fn settle<O>(waiters: &mut [Waiter<O>], what: &str) {
    for _ in 0..200 {
        let mut any = false;
        for w in waiters.iter_mut() {
            any |= w.poll_if_woken();
        }
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        if !any && waiters.iter().all(|w| !w.live()) {
            return;
        }
    }
    let stuck: Vec<_> = waiters
        .iter()
        .enumerate()
        .filter(|(_, w)| w.live())
        .map(|(i, _)| i)
        .collect();
    panic!("{what}: waiters {stuck:?} were never woken to finish (lost wake-up or hang)");
}

/// A backend whose calls each wait for a permit of `gate`; counts calls, live calls and the
/// most live at once, and fails the calls whose number is in `fail`.
#[derive(Clone)]
struct Backend {
    gate: Arc<Semaphore>,
    calls: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
    max_live: Arc<AtomicUsize>,
    fail: Arc<Vec<usize>>,
}

struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Backend {
    fn new(fail: &[usize]) -> Self {
        Backend {
            gate: Arc::new(Semaphore::new(0)),
            calls: Arc::default(),
            live: Arc::default(),
            max_live: Arc::default(),
            fail: Arc::new(fail.to_vec()),
        }
    }

    fn call(&self) -> impl Future<Output = Result<u32, String>> + Send + 'static {
        let this = self.clone();
        async move {
            let n = this.calls.fetch_add(1, SeqCst) + 1;
            let now = this.live.fetch_add(1, SeqCst) + 1;
            this.max_live.fetch_max(now, SeqCst);
            let _live = Live(Arc::clone(&this.live));
            this.gate.acquire().await.unwrap().forget();
            match this.fail.contains(&n) {
                true => Err(format!("call {n} failed")),
                false => Ok(n as u32),
            }
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
}

/// Bounds a test's body: under paused time a hang turns into this failure at once.
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(3600), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung"))
}

/// A std-thread watchdog for tests on real threads.
fn watchdog<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let out = f();
        let _ = tx.send(());
        out
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => handle.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what}: hung"),
    }
}

// ---------------------------------------------------------------------------------------------
// Group: retry + linger (+ detached), a waiter dropped at every point of the script
// ---------------------------------------------------------------------------------------------

type GroupOut = Result<Result<u32, String>, Panicked>;

#[derive(Clone, Copy, Debug)]
enum Step {
    Poll(usize),
    Release,
    Yield,
}

/// Leader `L` (0) and follower `F1` (1) can run the call (`run_retryable`), follower `F2` (2)
/// cannot (`run`). The first call fails, the second succeeds.
const SCRIPT: &[Step] = &[
    Step::Poll(0),
    Step::Poll(1),
    Step::Poll(2),
    Step::Release,
    Step::Yield,
    Step::Poll(0),
    Step::Poll(2),
    Step::Poll(1),
    Step::Release,
    Step::Yield,
    Step::Poll(1),
    Step::Poll(2),
    Step::Poll(0),
];

/// The same with `F2` polled first: when the leader leaves, the follower that cannot run the
/// call takes it over (and must hand a failure on to `F1` to retry).
const SCRIPT2: &[Step] = &[
    Step::Poll(0),
    Step::Poll(2),
    Step::Release,
    Step::Poll(2),
    Step::Yield,
    Step::Poll(1),
    Step::Poll(0),
    Step::Poll(2),
    Step::Release,
    Step::Yield,
    Step::Poll(2),
    Step::Poll(1),
    Step::Poll(0),
];

async fn group_sweep(script: &[Step], detached: bool, victim: Option<(usize, usize)>) {
    let what = format!(
        "script {} detached={detached} victim={victim:?}",
        script.len()
    );
    let group: Group<&'static str> = GroupBuilder::new()
        .retry_failed(1)
        .linger(Duration::from_secs(10))
        .detached(detached)
        .build();
    let backend = Backend::new(&[1]);
    let mk = |b: &Backend| {
        let b = b.clone();
        move || b.call()
    };
    let l: BoxFut<GroupOut> = Box::pin(group.run_retryable("k", mk(&backend)));
    let f1: BoxFut<GroupOut> = Box::pin(group.run_retryable("k", mk(&backend)));
    let f2: BoxFut<GroupOut> = Box::pin(group.run("k", mk(&backend)));
    let mut ws = vec![Waiter::new(l), Waiter::new(f1), Waiter::new(f2)];
    for (at, step) in script.iter().enumerate() {
        if let Some((who, when)) = victim {
            if when == at {
                ws[who].drop_it();
            }
        }
        match *step {
            Step::Poll(i) => ws[i].poll(),
            Step::Release => backend.gate.add_permits(1),
            Step::Yield => {
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    backend.gate.add_permits(100);
    settle(&mut ws, &what).await;
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }

    assert!(
        backend.max_live.load(SeqCst) <= 1,
        "{what}: two calls at once"
    );
    assert!(backend.calls() <= 2, "{what}: {} calls", backend.calls());
    assert_eq!(group.in_flight(), 0, "{what}");
    let victim_is = |i| victim.is_some_and(|(who, _)| who == i);
    let out = |i: usize| ws[i].out.clone().map(|o| o.expect("no panic"));
    // F1 can retry: alive, it never gets the failure, and F2 gets what it gets.
    if !victim_is(1) {
        let f1 = out(1).expect("F1 finished");
        assert!(f1.is_ok(), "{what}: F1 got {f1:?}");
        if !victim_is(2) {
            assert_eq!(out(2), Some(f1.clone()), "{what}: F2 differs from F1");
        }
        if detached && !victim_is(0) {
            assert_eq!(out(0), Some(f1), "{what}: a detached caller gets the retry");
        }
    }
    let stats = group.stats();
    assert!(
        stats.cancelled <= stats.leaders - stats.retried,
        "{what}: {stats:?}"
    );
    assert!(
        stats.errors + stats.panics <= stats.leaders,
        "{what}: {stats:?}"
    );
    // A request in the linger window after a success gets it with no call.
    let calls = backend.calls();
    let hit = group.run("k", mk(&backend));
    let got = bounded(&what, hit).await.unwrap();
    let succeeded = (0..3).any(|i| matches!(out(i), Some(Ok(_))));
    if succeeded {
        assert!(got.is_ok(), "{what}: {got:?}");
        assert_eq!(
            backend.calls(),
            calls,
            "{what}: lingering success re-called"
        );
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    group.purge_expired();
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    assert_eq!(group.len(), 0, "{what}: registry not empty");
}

#[tokio::test(start_paused = true)]
async fn group_retry_linger_detached_any_waiter_dropped_at_any_point() {
    for script in [SCRIPT, SCRIPT2] {
        for detached in [false, true] {
            group_sweep(script, detached, None).await;
            for who in 0..3 {
                for when in 0..=script.len() {
                    group_sweep(script, detached, Some((who, when))).await;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layer: retry + linger + follower_timeout + detached + max_followers + forget, a waiter
// dropped at every point of the script
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct BackendError(String);

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BackendError {}

type LayerOut = Result<u32, CoalesceError>;

#[derive(Clone, Copy, Debug)]
enum LStep {
    Call(usize),
    Poll(usize),
    Release,
    Yield,
    Forget,
    Advance,
}

const LSCRIPT: &[LStep] = &[
    LStep::Call(0),
    LStep::Call(1),
    LStep::Call(2),
    LStep::Poll(0),
    LStep::Poll(1),
    LStep::Poll(2),
    LStep::Release,
    LStep::Yield,
    LStep::Forget,
    LStep::Call(3),
    LStep::Poll(0),
    LStep::Poll(2),
    LStep::Poll(1),
    LStep::Poll(3),
    LStep::Advance,
    LStep::Poll(2),
    LStep::Poll(3),
    LStep::Release,
    LStep::Yield,
    LStep::Poll(1),
    LStep::Poll(2),
    LStep::Poll(0),
    LStep::Poll(3),
    LStep::Release,
    LStep::Yield,
];

#[derive(Clone, Copy, Debug)]
struct LConfig {
    detached: bool,
    on_timeout: OnTimeout,
    max_followers: Option<usize>,
    forget: bool,
}

async fn layer_sweep(cfg: LConfig, victim: Option<(usize, usize)>) {
    let what = format!("{cfg:?} victim={victim:?}");
    let backend = Backend::new(&[1]);
    let b = backend.clone();
    let inner = tower::service_fn(move |_k: &'static str| {
        let call = b.call();
        async move { call.await.map_err(BackendError) }
    });
    let mut layer = CoalesceLayer::new(|k: &&'static str| Some(*k))
        .retry_failed(1)
        .linger(Duration::from_secs(10))
        .max_in_flight(2)
        .detached(cfg.detached);
    if let Some(max) = cfg.max_followers {
        layer = layer.max_followers(max);
    }
    let layer = layer
        .follower_timeout(Duration::from_secs(5))
        .on_follower_timeout(cfg.on_timeout);
    let mut svc = layer.layer(inner);
    let mut ws: Vec<Option<Waiter<LayerOut>>> = (0..4).map(|_| None).collect();
    let mut dropped = [false; 4];
    let mut made = 0u64;
    for (at, step) in LSCRIPT.iter().enumerate() {
        if let Some((who, when)) = victim {
            if when == at {
                dropped[who] = true;
                if let Some(w) = ws[who].as_mut() {
                    w.drop_it();
                }
            }
        }
        match *step {
            LStep::Call(i) if !dropped[i] => {
                made += 1;
                ws[i] = Some(Waiter::new(Box::pin(svc.call("k"))));
            }
            LStep::Call(_) => {}
            LStep::Poll(i) => {
                if let Some(w) = ws[i].as_mut() {
                    w.poll();
                }
            }
            LStep::Release => backend.gate.add_permits(1),
            LStep::Yield => {
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                }
            }
            LStep::Forget => {
                if cfg.forget {
                    svc.forget("k");
                }
            }
            LStep::Advance => tokio::time::advance(Duration::from_secs(6)).await,
        }
    }
    backend.gate.add_permits(100);
    let mut ws: Vec<Waiter<LayerOut>> = ws.into_iter().flatten().collect();
    settle(&mut ws, &what).await;
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    let stats = svc.stats();
    assert_eq!(svc.in_flight(), 0, "{what}: {stats:?}");
    assert!(
        backend.calls() as u64 <= 3 + stats.timed_out + stats.over_capacity,
        "{what}: {} calls, {stats:?}",
        backend.calls()
    );
    if !cfg.forget && cfg.on_timeout == OnTimeout::Error && cfg.max_followers.is_none() {
        assert!(
            backend.max_live.load(SeqCst) <= 1,
            "{what}: two calls at once"
        );
    }
    for w in &ws {
        if let Some(Err(e)) = &w.out {
            assert!(
                e.is_timeout() || e.downcast_ref::<BackendError>().is_some(),
                "{what}: unexpected error {e:?}"
            );
        }
    }
    assert!(
        stats.cancelled <= stats.leaders - stats.retried,
        "{what}: {stats:?}"
    );
    assert!(
        stats.errors + stats.panics <= stats.leaders,
        "{what}: {stats:?}"
    );
    assert!(stats.timed_out <= stats.followers, "{what}: {stats:?}");
    let counted = stats.leaders - stats.retried
        + stats.followers
        + stats.lingered
        + stats.bypassed
        + stats.over_capacity;
    assert_eq!(
        counted, made,
        "{what}: every request counted once: {stats:?}"
    );
    assert_eq!(
        stats.fell_through,
        stats.over_capacity + stats.timed_out + stats.released,
        "{what}"
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    svc.group().purge_expired();
    assert_eq!(svc.group().len(), 0, "{what}: registry not empty");
    // The key works normally afterwards.
    // Every place under `max_in_flight` was given back.
    let calls = backend.calls();
    let (one, two) = (svc.call("k"), svc.call("other"));
    assert!(
        one.is_leader() && two.is_leader(),
        "{what}: {:?}",
        svc.stats()
    );
    backend.gate.add_permits(2);
    let fresh = bounded(&what, one).await;
    assert!(fresh.is_ok(), "{what}: {fresh:?}");
    assert!(bounded(&what, two).await.is_ok(), "{what}");
    assert_eq!(backend.calls(), calls + 2, "{what}");
}

#[tokio::test(start_paused = true)]
async fn layer_every_option_any_waiter_dropped_at_any_point() {
    for detached in [false, true] {
        for on_timeout in [OnTimeout::CallInner, OnTimeout::Error] {
            for max_followers in [None, Some(1)] {
                for forget in [false, true] {
                    let cfg = LConfig {
                        detached,
                        on_timeout,
                        max_followers,
                        forget,
                    };
                    layer_sweep(cfg, None).await;
                    for who in 0..4 {
                        for when in 0..=LSCRIPT.len() {
                            layer_sweep(cfg, Some((who, when))).await;
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Followers never busy-wait: counted wakes and polls
// ---------------------------------------------------------------------------------------------

/// An inner service whose call wakes its own task 50 times, then waits for a permit.
fn restless(
    gate: &Arc<Semaphore>,
    calls: &Arc<AtomicUsize>,
) -> impl Service<
    &'static str,
    Response = u32,
    Error = Infallible,
    Future = impl Future<Output = Result<u32, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    let (gate, calls) = (Arc::clone(gate), Arc::clone(calls));
    tower::service_fn(move |_k: &'static str| {
        let (gate, calls) = (Arc::clone(&gate), Arc::clone(&calls));
        async move {
            let n = calls.fetch_add(1, SeqCst) as u32 + 1;
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            gate.acquire().await.unwrap().forget();
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            Ok(n)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn followers_are_woken_once_whatever_the_options() {
    for variant in 0..6 {
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut layer = CoalesceLayer::new(|k: &&'static str| Some(*k));
        layer = match variant {
            0 => layer,
            1 => layer.retry_failed(3),
            2 => layer.linger(Duration::from_secs(60)),
            3 => layer.detached(true),
            4 => layer.max_followers(10).max_in_flight(10),
            _ => layer
                .retry_failed(1)
                .linger(Duration::from_secs(1))
                .detached(true),
        };
        let layer = layer.follower_timeout(Duration::from_secs(3600));
        let mut svc = layer.layer(restless(&gate, &calls));
        let leader = svc.call("k");
        let leader = tokio::spawn(leader);
        let mut followers: Vec<_> = (0..3)
            .map(|_| Waiter::new(Box::pin(svc.call("k")) as BoxFut<LayerOut>))
            .collect();
        for f in followers.iter_mut() {
            f.poll();
        }
        // The call makes progress (waking its own task a hundred times) and ends.
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        for f in &followers {
            assert_eq!(f.count.0.load(SeqCst), 0, "variant {variant}: woken early");
        }
        gate.add_permits(1);
        bounded("leader", leader).await.unwrap().unwrap();
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        for (i, f) in followers.iter_mut().enumerate() {
            assert_eq!(f.count.0.load(SeqCst), 1, "variant {variant} follower {i}");
            f.poll();
            assert_eq!(f.polls, 2, "variant {variant} follower {i}");
            assert_eq!(f.out.as_ref().unwrap().as_ref().unwrap(), &1);
        }
        assert_eq!(calls.load(SeqCst), 1, "variant {variant}");
        assert_eq!(svc.in_flight(), 0, "variant {variant}");
    }
}

/// The leader goes away: exactly one follower is woken to take the call over; the others are
/// woken once, by the response.
#[tokio::test(start_paused = true)]
async fn a_dropped_leader_wakes_exactly_one_follower_to_take_over() {
    for retry in [0, 2] {
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k))
            .retry_failed(retry)
            .follower_timeout(Duration::from_secs(3600))
            .layer(restless(&gate, &calls));
        let mut leader = Waiter::new(Box::pin(svc.call("k")) as BoxFut<LayerOut>);
        leader.poll();
        let mut followers: Vec<_> = (0..4)
            .map(|_| Waiter::new(Box::pin(svc.call("k")) as BoxFut<LayerOut>))
            .collect();
        for f in followers.iter_mut() {
            f.poll();
        }
        leader.drop_it();
        let woken: Vec<_> = followers.iter().map(|f| f.count.0.load(SeqCst)).collect();
        assert_eq!(woken.iter().sum::<usize>(), 1, "retry={retry}: {woken:?}");
        gate.add_permits(1);
        settle(&mut followers, "after hand-over").await;
        for f in &followers {
            assert_eq!(f.out.as_ref().unwrap().as_ref().unwrap(), &1);
            assert!(
                f.count.0.load(SeqCst) <= 200,
                "driver wakes are its own call's"
            );
        }
        let passive: Vec<_> = followers
            .iter()
            .filter(|f| f.polls == 2)
            .map(|f| f.count.0.load(SeqCst))
            .collect();
        assert_eq!(
            passive,
            vec![1; 3],
            "retry={retry}: three followers woken once each"
        );
        assert_eq!(calls.load(SeqCst), 1);
        assert_eq!(svc.in_flight(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Panics in a key's Drop / Eq
// ---------------------------------------------------------------------------------------------

/// A key whose `Drop` panics when `armed`; equal and hashed by `id` alone.
struct TrapKey {
    id: u8,
    armed: bool,
}

impl std::hash::Hash for TrapKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.id.hash(h);
    }
}

impl PartialEq for TrapKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for TrapKey {}

impl Drop for TrapKey {
    fn drop(&mut self) {
        if self.armed && !std::thread::panicking() {
            panic!("key drop");
        }
    }
}

fn quiet<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
}

/// A follower whose key's destructor panics as it joins: the panic is its caller's, and the
/// flight is not left with a phantom follower (the leader's departure must still cancel the
/// call and free the key).
#[tokio::test(start_paused = true)]
async fn follower_key_drop_panic_leaves_no_phantom_follower() {
    let group: Group<TrapKey> = Group::new();
    let backend = Backend::new(&[]);
    let b = backend.clone();
    let mut leader = Waiter::new(Box::pin(group.run(
        TrapKey {
            id: 1,
            armed: false,
        },
        move || b.call(),
    )) as BoxFut<_>);
    leader.poll();
    let b = backend.clone();
    let joined = quiet(|| group.run(TrapKey { id: 1, armed: true }, move || b.call()));
    assert!(joined.is_err(), "the key's destructor panicked in run");
    assert_eq!(group.in_flight(), 1);
    // The only real waiter leaves: the call is cancelled and the key freed.
    leader.drop_it();
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    assert_eq!(backend.live.load(SeqCst), 0, "the call was not cancelled");
    assert_eq!(group.in_flight(), 0, "a phantom follower holds the key");
    assert_eq!(group.len(), 0);
}

/// A key whose `Eq` panics under the shard lock: the caller's panic; the registry goes on.
#[tokio::test(start_paused = true)]
async fn key_eq_panic_under_the_shard_lock_leaves_the_registry_usable() {
    static ARMED: AtomicBool = AtomicBool::new(false);
    struct EqTrap(u8);
    impl std::hash::Hash for EqTrap {
        fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
            self.0.hash(h);
        }
    }
    impl PartialEq for EqTrap {
        fn eq(&self, other: &Self) -> bool {
            if ARMED.swap(false, SeqCst) {
                panic!("key eq");
            }
            self.0 == other.0
        }
    }
    impl Eq for EqTrap {}
    let group: Group<EqTrap> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
    let backend = Backend::new(&[]);
    let b = backend.clone();
    let mut leader: Waiter<GroupOut> =
        Waiter::new(Box::pin(group.run(EqTrap(1), move || b.call())));
    leader.poll();
    ARMED.store(true, SeqCst);
    let b = backend.clone();
    assert!(quiet(|| group.run(EqTrap(1), move || b.call())).is_err());
    // Joins normally now.
    let b = backend.clone();
    let mut follower = Waiter::new(Box::pin(group.run(EqTrap(1), move || b.call())) as BoxFut<_>);
    follower.poll();
    backend.gate.add_permits(10);
    let mut ws = vec![leader, follower];
    settle(&mut ws, "eq panic").await;
    let outs: Vec<_> = ws.iter().map(|w| w.out.clone().unwrap().unwrap()).collect();
    assert_eq!(outs, vec![Ok(1), Ok(1)]);
    assert_eq!(backend.calls(), 1);
    assert_eq!(group.in_flight(), 0);
    tokio::time::advance(Duration::from_secs(2)).await;
    group.purge_expired();
    assert_eq!(group.len(), 0);
}

/// The same through the layer, on the over-capacity path: the request's key is dropped after
/// its call was begun (the layer calls the inner service in `call`), and a panic there leaks
/// that call: what it reserved below (a `ConcurrencyLimit` place in the queue) is never given
/// back, and every later request waits for ever.
#[tokio::test(start_paused = true)]
async fn over_capacity_key_drop_panic_does_not_leak_the_call_it_began() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let inner = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(tower::service_fn(move |_r: (u8, bool)| {
            c.fetch_add(1, SeqCst);
            async move {
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(7u32)
            }
        }));
    let mut svc = CoalesceLayer::new(|r: &(u8, bool)| {
        Some(TrapKey {
            id: r.0,
            armed: r.1,
        })
    })
    .max_in_flight(1)
    .layer(inner);
    let running = svc.call((1, false));
    // Over capacity: runs alone; its key's destructor panics in `call`.
    assert!(quiet(|| svc.call((2, true))).is_err());
    assert_eq!(bounded("running", running).await.unwrap(), 7);
    let later = tokio::time::timeout(Duration::from_secs(60), svc.call((3, false))).await;
    assert!(
        matches!(later, Ok(Ok(7))),
        "a later request hangs: {later:?}"
    );
    assert_eq!(svc.in_flight(), 0);
}

// ---------------------------------------------------------------------------------------------
// The layer's eager inner call with tower-test mocks and tower middleware
// ---------------------------------------------------------------------------------------------

/// `allow(0)`: nothing reaches the mock until it is allowed; then exactly one request per
/// flight, seen with `assert_request_eq!`; a request after the response starts a new flight.
#[tokio::test(start_paused = true)]
async fn mock_allow_gates_one_request_per_flight_and_no_stale_join() {
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, u32>();
    handle.allow(0);
    let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k))
        .follower_timeout(Duration::from_secs(3600))
        .retry_failed(1)
        .layer(mock);
    let mut leader: Waiter<LayerOut> = Waiter::new(Box::pin(svc.call("a")));
    let mut follower: Waiter<LayerOut> = Waiter::new(Box::pin(svc.call("a")));
    assert!(handle.poll_request().is_pending());
    follower.poll();
    leader.poll();
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    assert_eq!(
        leader.count.0.load(SeqCst),
        1,
        "the flight waits on readiness"
    );
    assert_eq!(follower.count.0.load(SeqCst), 0, "a follower never does");
    leader.poll();
    let send = assert_request_eq!(handle, "a");
    assert!(handle.poll_request().is_pending(), "one request per flight");
    send.send_response(7);
    let mut ws = vec![leader, follower];
    settle(&mut ws, "allow").await;
    for w in &ws {
        assert_eq!(w.out.as_ref().unwrap().as_ref().unwrap(), &7);
    }
    assert_eq!(ws[1].polls, 2, "the follower was polled twice in all");
    // After the response: a new flight, called at once.
    handle.allow(1);
    let again = svc.call("a");
    assert_request_eq!(handle, "a").send_response(8);
    assert_eq!(bounded("again", again).await.unwrap(), 8);
    assert_eq!(svc.in_flight(), 0);
}

/// `send_error` on the handle (the next `poll_ready` fails, here the eager one in `call`) and
/// on a request: every waiter gets the same error, downcastable to the mock's error value.
#[tokio::test(start_paused = true)]
async fn mock_send_error_is_shared_and_downcastable_and_the_key_recovers() {
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, u32>();
    let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k))
        .linger(Duration::from_secs(5))
        .layer(mock);
    handle.send_error(BackendError("not ready".into()));
    let leader = svc.call("a");
    let follower = svc.call("a");
    assert!(
        handle.poll_request().is_pending(),
        "readiness failed: no request"
    );
    let (l, f) = bounded("ready error", async { tokio::join!(leader, follower) }).await;
    for e in [l.unwrap_err(), f.unwrap_err()] {
        assert_eq!(e.downcast_ref::<BackendError>().unwrap().0, "not ready");
    }
    // A failure does not linger (no `linger_errors`): a new flight.
    let leader = svc.call("a");
    let follower = svc.call("a");
    assert_request_eq!(handle, "a").send_error(BackendError("boom".into()));
    let (l, f) = bounded("call error", async { tokio::join!(leader, follower) }).await;
    for e in [l.unwrap_err(), f.unwrap_err()] {
        assert_eq!(e.downcast_ref::<BackendError>().unwrap().0, "boom");
        assert!(!e.is_panic() && !e.is_timeout());
    }
    let leader = svc.call("a");
    assert_request_eq!(handle, "a").send_response(9);
    assert_eq!(bounded("ok", leader).await.unwrap(), 9);
    // Lingers: no request.
    assert_eq!(bounded("hit", svc.call("a")).await.unwrap(), 9);
    assert!(handle.poll_request().is_pending());
    assert_eq!(svc.stats().lingered, 1);
}

/// Response futures dropped before their first poll: the eager call already reached the mock;
/// a follower that is polled takes it over (no second request); when all are dropped unpolled
/// the call is cancelled and the key freed.
#[tokio::test(start_paused = true)]
async fn response_futures_dropped_before_first_poll() {
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, u32>();
    let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k)).layer(mock);
    let leader = svc.call("a");
    let follower = svc.call("a");
    let send = assert_request_eq!(handle, "a");
    drop(leader);
    send.send_response(1);
    assert_eq!(bounded("follower", follower).await.unwrap(), 1);
    assert!(handle.poll_request().is_pending());
    // All dropped unpolled: cancelled, the key freed, the next request calls anew.
    let leader = svc.call("b");
    let follower = svc.call("b");
    let send = assert_request_eq!(handle, "b");
    drop(follower);
    drop(leader);
    assert_eq!(svc.in_flight(), 0);
    assert_eq!(svc.stats().cancelled, 1);
    send.send_response(2);
    let again = svc.call("b");
    assert_request_eq!(handle, "b").send_response(3);
    assert_eq!(bounded("again", again).await.unwrap(), 3);
}

/// `ConcurrencyLimit(1)` below, two keys: the second key's flight waits for the permit in its
/// own call (its leader dropped before its first poll, a follower takes over); neither key's
/// followers hold it up; one request per key at the mock.
#[tokio::test(start_paused = true)]
async fn concurrency_limit_below_second_key_leader_dropped_unpolled() {
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, u32>();
    let inner = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(mock);
    let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k)).layer(inner);
    let a_leader = tokio::spawn(svc.call("a"));
    let a_follower = tokio::spawn(svc.call("a"));
    let b_leader = svc.call("b");
    let b_follower = tokio::spawn(svc.call("b"));
    let send_a = assert_request_eq!(handle, "a");
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    assert!(handle.poll_request().is_pending(), "b waits for the permit");
    drop(b_leader);
    send_a.send_response(1);
    assert_request_eq!(handle, "b").send_response(2);
    assert_eq!(bounded("a", a_leader).await.unwrap().unwrap(), 1);
    assert_eq!(bounded("a", a_follower).await.unwrap().unwrap(), 1);
    assert_eq!(bounded("b", b_follower).await.unwrap().unwrap(), 2);
    assert!(handle.poll_request().is_pending());
    assert_eq!(svc.in_flight(), 0);
}

/// `Buffer` above the layer (its worker calls the layer, which calls the mock at once),
/// `ConcurrencyLimit(1)` and `Timeout` below: twenty concurrent requests over two keys make
/// two requests; a follower timed out by a `Timeout` above leaves the others undisturbed.
#[tokio::test(start_paused = true)]
async fn buffer_above_limit_and_timeout_below_one_request_per_key() {
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, u32>();
    let layer = CoalesceLayer::new(|k: &&'static str| Some(*k));
    let svc = tower::ServiceBuilder::new()
        .buffer(64)
        .layer(layer.clone())
        .concurrency_limit(1)
        .timeout(Duration::from_secs(30))
        .service(mock);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let key = if i % 2 == 0 { "x" } else { "y" };
        let svc = svc.clone();
        tasks.push(tokio::spawn(svc.oneshot(key)));
    }
    let impatient = tokio::spawn(
        tower::ServiceBuilder::new()
            .timeout(Duration::from_secs(1))
            .service(svc.clone())
            .oneshot("x"),
    );
    let (first, send) = handle.next_request().await.unwrap();
    // The other key waits for the permit; time passes (the impatient one gives up).
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(bounded("impatient", impatient).await.unwrap().is_err());
    send.send_response(if first == "x" { 1 } else { 2 });
    let (second, send) = handle.next_request().await.unwrap();
    assert_ne!(first, second);
    send.send_response(if second == "x" { 1 } else { 2 });
    for (i, t) in tasks.into_iter().enumerate() {
        let want = if i % 2 == 0 { 1 } else { 2 };
        assert_eq!(bounded("task", t).await.unwrap().unwrap(), want);
    }
    assert!(handle.poll_request().is_pending());
    assert_eq!(layer.in_flight(), 0);
    assert_eq!(layer.stats().leaders, 2);
}

// ---------------------------------------------------------------------------------------------
// Multi-thread: one call per key at a time, no stale joins
// ---------------------------------------------------------------------------------------------

/// Many tasks on worker threads, random early drops: never two calls of one key at once, and
/// a request made after anybody received call `n` of its key never gets `n` (no stale join).
#[test]
fn multi_thread_one_call_per_key_and_no_stale_join() {
    watchdog(120, "multi-thread", || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        const KEYS: usize = 8;
        let live: Arc<Vec<AtomicUsize>> =
            Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
        let seen: Arc<Vec<AtomicUsize>> =
            Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
        let numbers = Arc::new(AtomicUsize::new(0));
        let violations = Arc::new(AtomicUsize::new(0));
        let (l, n, v) = (
            Arc::clone(&live),
            Arc::clone(&numbers),
            Arc::clone(&violations),
        );
        let inner = tower::service_fn(move |k: usize| {
            let (l, n, v) = (Arc::clone(&l), Arc::clone(&n), Arc::clone(&v));
            async move {
                let number = n.fetch_add(1, SeqCst) + 1;
                if l[k].fetch_add(1, SeqCst) != 0 {
                    v.fetch_add(1, SeqCst);
                }
                let _live = LiveAt(Arc::clone(&l), k);
                for _ in 0..(number % 5) {
                    tokio::task::yield_now().await;
                }
                Ok::<_, Infallible>(number)
            }
        });
        let svc = CoalesceLayer::new(|k: &usize| Some(*k)).layer(inner);
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..64usize {
                let (svc, seen, v) = (svc.clone(), Arc::clone(&seen), Arc::clone(&violations));
                tasks.push(tokio::spawn(async move {
                    for i in 0..200usize {
                        let k = (t * 7 + i * 3) % KEYS;
                        let before = seen[k].load(SeqCst);
                        let mut fut = std::pin::pin!(svc.clone().oneshot(k));
                        if (t + i) % 9 == 0 {
                            // Polled once, then dropped.
                            let _ = futures::poll!(fut.as_mut());
                            continue;
                        }
                        let got = fut.await.unwrap();
                        if got <= before {
                            v.fetch_add(1000, SeqCst);
                        }
                        seen[k].fetch_max(got, SeqCst);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        assert_eq!(
            violations.load(SeqCst),
            0,
            "overlapping calls (1 each) or stale joins (1000 each)"
        );
        assert_eq!(svc.in_flight(), 0);
        assert_eq!(svc.group().len(), 0);
        let stats = svc.stats();
        assert!(stats.followers > 0, "{stats:?}");
        assert_eq!(stats.leaders as usize, numbers.load(SeqCst), "{stats:?}");
        drop(rt);
    });
}

struct LiveAt(Arc<Vec<AtomicUsize>>, usize);

impl Drop for LiveAt {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Panics in the inner service and the response, at every point, under every option
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Site {
    InnerClone,
    PollReady,
    Call,
    Future,
    ResponseClone,
}

/// Panics once at `site` while armed (the trigger is one-shot).
#[derive(Debug)]
struct Trigger {
    site: Site,
    armed: AtomicBool,
}

impl Trigger {
    fn fire(&self, at: Site) {
        if self.site == at && self.armed.swap(false, SeqCst) {
            panic!("boom at {at:?}");
        }
    }
}

#[derive(Debug)]
struct Resp(u32, Arc<Trigger>);

impl Clone for Resp {
    fn clone(&self) -> Self {
        self.1.fire(Site::ResponseClone);
        Resp(self.0, Arc::clone(&self.1))
    }
}

#[derive(Debug)]
struct Bomb {
    trigger: Arc<Trigger>,
    gate: Arc<Semaphore>,
    calls: Arc<AtomicUsize>,
}

impl Clone for Bomb {
    fn clone(&self) -> Self {
        self.trigger.fire(Site::InnerClone);
        Bomb {
            trigger: Arc::clone(&self.trigger),
            gate: Arc::clone(&self.gate),
            calls: Arc::clone(&self.calls),
        }
    }
}

impl Service<&'static str> for Bomb {
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFut<Result<Resp, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.trigger.fire(Site::PollReady);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: &'static str) -> Self::Future {
        self.trigger.fire(Site::Call);
        let n = self.calls.fetch_add(1, SeqCst) as u32 + 1;
        let (trigger, gate) = (Arc::clone(&self.trigger), Arc::clone(&self.gate));
        Box::pin(async move {
            gate.acquire().await.unwrap().forget();
            trigger.fire(Site::Future);
            Ok(Resp(n, trigger))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_at_every_point_under_every_option_strands_nobody() {
    let sites = [
        Site::InnerClone,
        Site::PollReady,
        Site::Call,
        Site::Future,
        Site::ResponseClone,
    ];
    for site in sites {
        for variant in 0..5 {
            let what = format!("{site:?} variant {variant}");
            let trigger = Arc::new(Trigger {
                site,
                armed: AtomicBool::new(false),
            });
            let gate = Arc::new(Semaphore::new(0));
            let calls = Arc::new(AtomicUsize::new(0));
            let bomb = Bomb {
                trigger: Arc::clone(&trigger),
                gate: Arc::clone(&gate),
                calls: Arc::clone(&calls),
            };
            let layer = CoalesceLayer::new(|k: &&'static str| Some(*k));
            let layer = match variant {
                0 => layer,
                1 => layer.retry_failed(1),
                2 => layer
                    .linger(Duration::from_secs(5))
                    .linger_errors(Duration::from_secs(1)),
                3 => layer.detached(true).retry_failed(1),
                _ => layer
                    .follower_timeout(Duration::from_secs(100))
                    .max_followers(1)
                    .linger(Duration::from_secs(5)),
            };
            let mut svc = layer.layer(bomb);
            trigger.armed.store(true, SeqCst);
            let mut ws: Vec<Waiter<Result<Resp, CoalesceError>>> = Vec::new();
            for _ in 0..3 {
                match quiet(|| svc.call("k")) {
                    Ok(fut) => ws.push(Waiter::new(Box::pin(fut))),
                    Err(_) => panic!("{what}: call() panicked"),
                }
            }
            for w in ws.iter_mut() {
                let _ = quiet(|| w.poll());
            }
            gate.add_permits(100);
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            let polled = quiet(|| {
                let mut ws = std::mem::take(&mut ws);
                for _ in 0..50 {
                    for w in ws.iter_mut() {
                        w.poll_if_woken();
                    }
                }
                ws
            });
            let mut ws = polled.unwrap_or_else(|_| panic!("{what}: a waiter's poll panicked"));
            settle(&mut ws, &what).await;
            let mut panics = 0;
            for w in &ws {
                match w.out.as_ref().unwrap() {
                    Ok(r) => assert!(r.0 >= 1, "{what}"),
                    Err(e) => {
                        assert!(e.is_panic(), "{what}: {e:?}");
                        assert!(e.panic_message().unwrap().contains("boom"), "{what}: {e:?}");
                        panics += 1;
                    }
                }
            }
            // Detached with retry: the caller is a follower and gets the retry's output.
            let retried_for_all = variant == 3;
            assert!(
                panics >= 1 || site == Site::ResponseClone || retried_for_all,
                "{what}: nobody saw the panic"
            );
            assert!(
                !trigger.armed.load(SeqCst),
                "{what}: the panic never happened"
            );
            assert_eq!(svc.in_flight(), 0, "{what}");
            tokio::time::advance(Duration::from_secs(6)).await;
            svc.group().purge_expired();
            assert_eq!(svc.group().len(), 0, "{what}");
            // The key works normally afterwards.
            let before = calls.load(SeqCst);
            let fresh = svc.call("k");
            let fresh = bounded(&what, fresh).await.unwrap();
            assert_eq!(fresh.0 as usize, before + 1, "{what}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linger: callers that come while another copies the output, dropped at each point
// ---------------------------------------------------------------------------------------------

type Gate = (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

/// The next copy blocks (on whichever thread makes it) until released.
static SLOW_GATE: Mutex<Option<Gate>> = Mutex::new(None);

#[derive(Debug, PartialEq)]
struct Slow(u32);

impl Clone for Slow {
    fn clone(&self) -> Self {
        let gate = SLOW_GATE.lock().unwrap().take();
        if let Some((entered, release)) = gate {
            entered.send(()).unwrap();
            release.recv().unwrap();
        }
        Slow(self.0)
    }
}

#[test]
fn lingering_copy_in_progress_hands_its_turn_on_once_to_a_live_caller() {
    watchdog(60, "lingering copy", || {
        for drop_b_early in [false, true] {
            let group: Group<u8> = GroupBuilder::new()
                .linger(Duration::from_secs(3600))
                .build();
            let mut leader = Waiter::new(
                Box::pin(group.run(1, || async { Slow(7) })) as BoxFut<Result<Slow, Panicked>>
            );
            leader.poll();
            assert_eq!(leader.out.take().unwrap().unwrap(), Slow(7));
            let (entered_tx, entered_rx) = std::sync::mpsc::channel();
            let (release_tx, release_rx) = std::sync::mpsc::channel();
            *SLOW_GATE.lock().unwrap() = Some((entered_tx, release_rx));
            let g = group.clone();
            let copier = std::thread::spawn(move || {
                let mut a: Waiter<Result<Slow, Panicked>> =
                    Waiter::new(Box::pin(g.run(1, || async { Slow(0) })));
                a.poll();
                a.out.take().unwrap().unwrap()
            });
            entered_rx.recv().unwrap();
            // Two callers find the output out being copied: they wait.
            let mut b: Waiter<Result<Slow, Panicked>> =
                Waiter::new(Box::pin(group.run(1, || async { Slow(0) })));
            let mut c: Waiter<Result<Slow, Panicked>> =
                Waiter::new(Box::pin(group.run(1, || async { Slow(0) })));
            b.poll();
            c.poll();
            assert!(b.live() && c.live(), "they wait for the copy in progress");
            if drop_b_early {
                b.drop_it();
            }
            release_tx.send(()).unwrap();
            assert_eq!(copier.join().unwrap(), Slow(7));
            if !drop_b_early {
                assert_eq!(b.count.0.load(SeqCst), 1, "the next caller is woken");
                assert_eq!(c.count.0.load(SeqCst), 0, "one at a time");
                // Woken, it leaves without copying: its turn goes to the next one.
                b.drop_it();
            }
            assert_eq!(c.count.0.load(SeqCst), 1, "drop_b_early={drop_b_early}");
            c.poll();
            assert_eq!(c.out.take().unwrap().unwrap(), Slow(7));
            assert_eq!(c.polls, 2);
            let stats = group.stats();
            assert_eq!((stats.leaders, stats.lingered), (1, 3), "{stats:?}");
            assert_eq!(group.in_flight(), 0);
            assert!(group.forget(&1));
            assert!(group.is_empty());
        }
    });
}

/// The key extractor's and the key's `Hash` panics unwind out of `call`, before anything is
/// registered or called: the key and the registry go on as if the request never came.
#[tokio::test(start_paused = true)]
async fn extractor_and_key_hash_panics_touch_nothing() {
    static HASH_ARMED: AtomicBool = AtomicBool::new(false);
    #[derive(PartialEq, Eq)]
    struct HashTrap(u8);
    impl std::hash::Hash for HashTrap {
        fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
            if HASH_ARMED.swap(false, SeqCst) {
                panic!("key hash");
            }
            self.0.hash(h);
        }
    }
    let backend = Backend::new(&[]);
    let b = backend.clone();
    let inner = tower::service_fn(move |_r: (u8, bool)| {
        let call = b.call();
        async move { call.await.map_err(BackendError) }
    });
    let mut svc = CoalesceLayer::new(|r: &(u8, bool)| {
        assert!(!r.1, "extractor");
        Some(HashTrap(r.0))
    })
    .linger(Duration::from_secs(1))
    .retry_failed(1)
    .detached(true)
    .max_in_flight(1)
    .follower_timeout(Duration::from_secs(10))
    .layer(inner);
    let leader = svc.call((1, false));
    assert!(quiet(|| svc.call((1, true))).is_err());
    HASH_ARMED.store(true, SeqCst);
    assert!(quiet(|| svc.call((1, false))).is_err());
    let follower = svc.call((1, false));
    assert!(follower.is_follower());
    backend.gate.add_permits(1);
    let (l, f) = bounded("after key panics", async { tokio::join!(leader, follower) }).await;
    assert_eq!((l.unwrap(), f.unwrap()), (1, 1));
    let stats = svc.stats();
    assert_eq!(
        (stats.leaders, stats.followers, stats.over_capacity),
        (1, 1, 0)
    );
    assert_eq!(backend.calls(), 1);
    assert_eq!(svc.in_flight(), 0);
    // The linger window ends exactly at its length.
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(bounded("hit", svc.call((1, false))).await.unwrap(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    backend.gate.add_permits(1);
    assert_eq!(bounded("expired", svc.call((1, false))).await.unwrap(), 2);
}

/// An output whose destructor panics when its flag is armed (then disarms it).
struct Bang(u8, Arc<AtomicBool>);

impl Clone for Bang {
    fn clone(&self) -> Self {
        Bang(self.0, Arc::clone(&self.1))
    }
}

impl Drop for Bang {
    fn drop(&mut self) {
        if self.1.swap(false, SeqCst) && !std::thread::panicking() {
            panic!("output drop");
        }
    }
}

/// Same hash for every key: all in one shard, so that a join purges the other keys' expired
/// outputs.
#[derive(PartialEq, Eq)]
struct OneShard(u8);

impl std::hash::Hash for OneShard {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        0u8.hash(h);
    }
}

/// The same leak, set off by an expired lingering output purged as a follower joins another
/// key: its destructor runs after the follower's waiter was built, and that waiter is lost.
#[tokio::test(start_paused = true)]
async fn expired_output_drop_panic_during_a_join_leaves_no_phantom_follower() {
    let armed = Arc::new(AtomicBool::new(false));
    let group: Group<OneShard> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
    let a = Arc::clone(&armed);
    let first = bounded(
        "first",
        group.run(OneShard(1), move || async move { Bang(1, a) }),
    )
    .await
    .unwrap();
    tokio::time::advance(Duration::from_millis(500)).await;
    let (gate, live) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
    let (g, l, a) = (Arc::clone(&gate), Arc::clone(&live), Arc::clone(&armed));
    let mut leader: Waiter<Result<Bang, Panicked>> =
        Waiter::new(Box::pin(group.run(OneShard(2), move || async move {
            l.fetch_add(1, SeqCst);
            let _live = Live(l);
            g.acquire().await.unwrap().forget();
            Bang(2, a)
        })));
    leader.poll();
    assert_eq!(live.load(SeqCst), 1);
    // Key 1's output has expired; the next join of key 2 purges it.
    tokio::time::advance(Duration::from_secs(1)).await;
    armed.store(true, SeqCst);
    let a = Arc::clone(&armed);
    let joined = quiet(|| group.run(OneShard(2), move || async move { Bang(0, a) }));
    assert!(
        joined.is_err(),
        "the expired output's destructor panicked in run"
    );
    armed.store(false, SeqCst);
    drop(first);
    leader.drop_it();
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    assert_eq!(live.load(SeqCst), 0, "the call was not cancelled");
    assert_eq!(group.in_flight(), 0, "a phantom follower holds the key");
}

/// A keyless request's response future, kept after it answered, no longer holds what its call
/// reserved below (a `ConcurrencyLimit` permit): the inner future is dropped once it answers,
/// as tower's `Oneshot` drops it.
#[tokio::test]
async fn a_kept_bypass_future_releases_its_concurrency_permit() {
    let inner = tower::service_fn(|n: u32| async move { Ok::<_, Infallible>(n) });
    let limited = tower::limit::ConcurrencyLimit::new(inner, 1);
    let mut svc = CoalesceLayer::new(|_: &u32| None::<u32>).layer(limited);
    let mut first = Box::pin(svc.call(1));
    let one = tokio::time::timeout(Duration::from_secs(10), first.as_mut())
        .await
        .expect("the first call answers")
        .unwrap();
    assert_eq!(one, 1);
    assert!(first.is_bypass());
    // `first` is still alive: the second call must get the permit all the same.
    let two = tokio::time::timeout(Duration::from_secs(10), svc.call(2))
        .await
        .expect("the permit was given back when the first call answered")
        .unwrap();
    assert_eq!(two, 2);
}
