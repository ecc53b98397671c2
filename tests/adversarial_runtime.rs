//! Adversarial black-box tests of `tower-coalesce` under unusual runtimes, re-entrant user code
//! and unusual types, written from DESIGN.md and the crate's docs only:
//!
//! - executors other than a tokio multi-thread runtime: `futures`' `block_on` and `LocalPool`
//!   with no tokio runtime at all, current-thread runtimes, a flight led on one runtime and
//!   followed from another runtime and from a plain thread, a runtime shut down while its
//!   flights are in flight, detached flights whose runtime is dead or never runs them;
//! - re-entrancy: `make`, the inner future, an output's `Clone` and `Drop`, a key's `Hash` and
//!   `Drop` calling back into the group (a lock held around any of them deadlocks the thread);
//! - unusual types: zero-sized and `!Sync` outputs, large outputs, `Arc<str>`/`Vec<u8>`/tuple
//!   keys, an output whose `Clone` is slow;
//! - waiters cancelled in every order or moved between executors, woken only through counted
//!   wakers and polled by hand; the `Group` handle dropped while its flights run;
//! - the tower layer over `tower_test::mock` while the inner service's readiness stays pending.
//!
//! Deterministic: backends wait on gates (`watch` channels) and report through counters, and
//! nothing sleeps to synchronise. Every wait that could hang is bounded: async waits on a
//! single-thread runtime by a paused-clock timeout; waits across threads or runtimes (where a
//! paused clock would jump ahead while idle) and threads that a lock held around re-entrant
//! user code would deadlock, by a real-time `recv_timeout`/`timeout`.

use std::cell::Cell;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::executor::{block_on, LocalPool};
use futures::future::{join_all, BoxFuture};
use futures::task::LocalSpawnExt;
use futures::FutureExt;
use tokio::sync::watch;
use tower::{service_fn, Service};
use tower_coalesce::{CoalesceLayer, Group, GroupBuilder, Run};
use tower_layer::Layer;
use tower_test::mock;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Real-time bound for a thread that may deadlock, or for cross-runtime hand-offs.
const REAL_LIMIT: Duration = Duration::from_secs(10);
/// Paused-clock bound for async waits: a hang auto-advances the clock to it.
const LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Runs `f` on a thread of its own; fails if it panics or does not return within
/// [`REAL_LIMIT`] (a lock held while user code re-enters the group deadlocks that thread only).
fn on_thread<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(REAL_LIMIT) {
        Ok(out) => out,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlocked or hung: {what}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("panicked: {what}"),
    }
}

/// Receives from a thread or another runtime, failing after [`REAL_LIMIT`].
fn recv<T>(what: &str, rx: &mpsc::Receiver<T>) -> T {
    rx.recv_timeout(REAL_LIMIT)
        .unwrap_or_else(|e| panic!("hung: {what} ({e:?})"))
}

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

fn multi_thread_runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// A waker that counts its wake-ups: a follower must be woken once, by publication.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

impl CountingWaker {
    fn count(&self) -> usize {
        self.0.load(SeqCst)
    }
}

fn counting_waker() -> (Arc<CountingWaker>, Waker) {
    let count = Arc::new(CountingWaker::default());
    (count.clone(), Waker::from(count))
}

fn poll_with<F: Future + Unpin>(f: &mut F, waker: &Waker) -> Poll<F::Output> {
    Pin::new(f).poll(&mut Context::from_waker(waker))
}

/// A backend: each call (a `make` that is actually called) is counted, its future waits for
/// the gate to open and answers its value; `live` counts call futures not yet dropped, so a
/// cancelled call is seen to be dropped. Runtime-agnostic (`watch` needs no runtime).
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
    open: Arc<watch::Sender<bool>>,
    gate: watch::Receiver<bool>,
}

/// Decrements `live` when its call future is dropped.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Backend {
    fn new() -> Self {
        let (open, gate) = watch::channel(false);
        Backend {
            calls: Arc::default(),
            live: Arc::default(),
            open: Arc::new(open),
            gate,
        }
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn live(&self) -> usize {
        self.live.load(SeqCst)
    }

    /// A `make` for `Group::run` whose call answers `value` once the gate is open.
    fn call(&self, value: u32) -> impl FnOnce() -> BoxFuture<'static, u32> + Send + 'static {
        self.call_with(move || value)
    }

    /// A `make` whose call answers `value()` once the gate is open.
    fn call_with<T: Send + 'static>(
        &self,
        value: impl FnOnce() -> T + Send + 'static,
    ) -> impl FnOnce() -> BoxFuture<'static, T> + Send + 'static {
        let backend = self.clone();
        move || {
            backend.calls.fetch_add(1, SeqCst);
            backend.live.fetch_add(1, SeqCst);
            let live = Live(backend.live.clone());
            let mut gate = backend.gate.clone();
            Box::pin(async move {
                let _live = live;
                let _ = gate.wait_for(|&open| open).await;
                value()
            })
        }
    }
}

/// A one-time stall of user code on another thread: the first `stall()` tells the test it has
/// begun, then blocks until the test releases it (at most [`REAL_LIMIT`]); later calls pass.
struct Stall {
    entered: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<Option<mpsc::Receiver<()>>>,
}

impl Stall {
    /// The stall, the receiver told when it begins, and the sender that releases it.
    fn new() -> (Arc<Stall>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let stall = Stall {
            entered: Mutex::new(Some(entered_tx)),
            release: Mutex::new(Some(release_rx)),
        };
        (Arc::new(stall), entered_rx, release_tx)
    }

    fn stall(&self) {
        let Some(entered) = self.entered.lock().unwrap().take() else {
            return;
        };
        let release = self.release.lock().unwrap().take().unwrap();
        entered.send(()).unwrap();
        let _ = release.recv_timeout(REAL_LIMIT);
    }
}

/// Runs a test body in a child process (this test binary, filtered to `test`), so that a crash
/// that aborts the process (a stack overflow) fails this test instead of the whole binary.
fn in_child_process(test: &str, body: impl FnOnce()) {
    const CHILD: &str = "TOWER_COALESCE_ADVERSARIAL_RUNTIME_CHILD";
    if std::env::var(CHILD).as_deref() == Ok(test) {
        body();
        return;
    }
    let test_name = test.to_owned();
    // Bounded like every wait here: a child that hangs fails the test.
    let out = on_thread("child process", move || {
        Command::new(std::env::current_exe().unwrap())
            .args([
                &test_name,
                "--exact",
                "--include-ignored",
                "--test-threads=1",
            ])
            .env(CHILD, &test_name)
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child process failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

// ---------------------------------------------------------------------------------------------
// Executors other than a tokio multi-thread runtime
// ---------------------------------------------------------------------------------------------

/// `Group::run` promises nothing about tokio unless an option needs it: on a `LocalPool`, with
/// no runtime anywhere, followers park, are woken by publication, and take the call over when
/// the leader's task is cancelled.
#[test]
fn group_runs_on_a_local_pool_with_no_tokio_runtime() {
    on_thread("local pool", || {
        assert!(tokio::runtime::Handle::try_current().is_err());
        let group: Group<&'static str> = Group::new();
        let backend = Backend::new();
        let mut pool = LocalPool::new();
        let spawner = pool.spawner();
        let results = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for i in 0..6 {
            let run = group.run("k", backend.call(100 + i));
            assert_eq!(run.is_leader(), i == 0);
            let results = results.clone();
            let task = async move {
                let out = run.await.unwrap();
                results.lock().unwrap().push(out);
            };
            handles.push(spawner.spawn_local_with_handle(task).unwrap());
        }
        pool.run_until_stalled();
        assert_eq!(backend.calls(), 1);
        assert!(results.lock().unwrap().is_empty());

        // Cancel the leader's task: a follower takes the call over, still with no runtime.
        drop(handles.remove(0));
        pool.run_until_stalled();
        assert_eq!(
            (backend.calls(), backend.live()),
            (1, 1),
            "the call went on"
        );
        backend.open();
        pool.run_until_stalled();
        assert_eq!(*results.lock().unwrap(), vec![100; 5]);
        for handle in handles {
            assert!(handle.now_or_never().is_some());
        }
        assert_eq!((group.in_flight(), group.len(), backend.live()), (0, 0, 0));
    });
}

/// The layer and the registry options that need no timer (linger, retry, capacity bounds,
/// forget) work under `futures::executor::block_on` with no tokio runtime.
#[test]
fn layer_and_options_work_under_block_on_with_no_tokio_runtime() {
    on_thread("block_on", || {
        assert!(tokio::runtime::Handle::try_current().is_err());
        let backend = Backend::new();
        let b = backend.clone();
        let mut svc = CoalesceLayer::new(|k: &u32| Some(*k)).layer(service_fn(move |k: u32| {
            b.call(k)().map(Ok::<_, std::convert::Infallible>)
        }));
        let waiters: Vec<_> = (0..5).map(|_| svc.call(7)).collect();
        assert!(waiters[0].is_leader() && waiters[1..].iter().all(|w| w.is_follower()));
        let opener = async { backend.open() };
        let (responses, ()) = block_on(futures::future::join(join_all(waiters), opener));
        assert!(responses.into_iter().all(|r| r.unwrap() == 7));
        assert_eq!((backend.calls(), svc.in_flight()), (1, 0));

        // Linger: std's clock stands in for tokio's outside a runtime.
        let group: Group<u8> = GroupBuilder::new()
            .linger(Duration::from_secs(3600))
            .build();
        assert_eq!(block_on(group.run(1, || async { 1u32 })).unwrap(), 1);
        let hit = group.run(1, || async { 2u32 });
        assert!(!hit.is_leader());
        assert_eq!(block_on(hit).unwrap(), 1, "served from the linger window");
        assert!(group.forget(&1));
        assert_eq!(block_on(group.run(1, || async { 3u32 })).unwrap(), 3);

        // Retry of a failed flight by its retryable follower.
        let group = GroupBuilder::new().retry_failed(1).build::<&str>();
        let leader = group.run_retryable("k", || async { Err::<u32, &str>("flaky") });
        let follower = group.run_retryable("k", || async { Ok::<u32, &str>(9) });
        let (leader, follower) = block_on(futures::future::join(leader, follower));
        assert_eq!((leader.unwrap(), follower.unwrap()), (Err("flaky"), Ok(9)));

        // Capacity bounds: over them a caller runs alone.
        let group = GroupBuilder::new().max_followers(0).build::<&str>();
        let first = group.run("k", || async { 1u32 });
        let second = group.run("k", || async { 2u32 });
        assert!(second.is_alone());
        let (a, b) = block_on(futures::future::join(first, second));
        assert_eq!((a.unwrap(), b.unwrap()), (1, 2));
        assert_eq!(group.in_flight(), 0);
    });
}

/// Outside a tokio runtime a follower's wait limit cannot be armed: it waits with no limit (as
/// `follower_timeout` documents), rather than panicking in `call`, which would strike only once
/// a second request for a key arrived (a crash under load).
#[test]
fn follower_timeout_outside_a_runtime_does_not_panic_in_call() {
    on_thread("follower timeout without a runtime", || {
        assert!(tokio::runtime::Handle::try_current().is_err());
        let backend = Backend::new();
        let b = backend.clone();
        let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
            .follower_timeout(Duration::from_secs(60))
            .layer(service_fn(move |k: u32| {
                b.call(k)().map(Ok::<_, std::convert::Infallible>)
            }));
        let leader = svc.call(1);
        assert!(leader.is_leader());
        let follower = catch_unwind(AssertUnwindSafe(|| svc.call(1)));
        let follower = follower.expect("a follower's call panicked outside a tokio runtime");
        backend.open();
        let (a, b) = block_on(futures::future::join(leader, follower));
        assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
        assert_eq!(backend.calls(), 1);
    });
}

/// In the context of a runtime that has been shut down (a handle kept and entered after the
/// runtime was dropped) a follower's timer can be made, but its first poll panics ("A Tokio
/// 1.x context was found, but it is being shutdown"). That context is no runtime for
/// `detached` (see `detached_flight_on_a_dead_runtime_is_driven_by_its_waiters`), and a
/// follower with a limit waits there with no limit, as outside a runtime.
#[test]
fn follower_timeout_in_a_dead_runtimes_context_waits_without_a_limit() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let handle = rt.handle().clone();
            drop(rt);
            let _context = handle.enter();
            assert!(tokio::runtime::Handle::try_current().is_ok());

            let (open, gate) = futures::channel::oneshot::channel::<()>();
            let gate = Arc::new(Mutex::new(Some(gate)));
            let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
                .follower_timeout(Duration::from_secs(60))
                .layer(service_fn(move |k: u32| {
                    let gate = gate.lock().unwrap().take();
                    async move {
                        if let Some(gate) = gate {
                            let _ = gate.await;
                        }
                        Ok::<_, std::convert::Infallible>(k)
                    }
                }));
            let leader = svc.call(1);
            let follower = svc.call(1);
            assert!(leader.is_leader() && follower.is_follower());
            let opener = async move {
                let _ = open.send(());
            };
            let ((a, b), ()) = block_on(futures::future::join(
                futures::future::join(leader, follower),
                opener.boxed(),
            ));
            (a.unwrap(), b.unwrap())
        }));
        let _ = tx.send(outcome.map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        }));
    });
    let outcome = rx.recv_timeout(REAL_LIMIT).expect("hung");
    assert_eq!(outcome, Ok((1, 1)), "a follower with a limit panicked");
}

/// `detached(true)` with a tokio context whose runtime is gone: the spawn has nowhere to run,
/// and the caller (waiting as a follower of its own call) must not be left waiting for a task
/// that will never run. Flights are driven by their waiters instead, as outside a runtime.
#[test]
fn detached_flight_on_a_dead_runtime_is_driven_by_its_waiters() {
    on_thread("detached on a dead runtime", || {
        let rt = paused_runtime();
        let handle = rt.handle().clone();
        drop(rt);
        let _context = handle.enter();
        assert!(tokio::runtime::Handle::try_current().is_ok());
        let group: Group<&'static str> = GroupBuilder::new().detached(true).build();
        let backend = Backend::new();
        let caller = group.run("k", backend.call(1));
        let follower = group.run("k", backend.call(2));
        let opener = async { backend.open() };
        let ((a, b), ()) = block_on(futures::future::join(
            futures::future::join(caller, follower),
            opener,
        ));
        assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
        assert_eq!(
            (backend.calls(), backend.live(), group.in_flight()),
            (1, 0, 0)
        );
    });
}

/// A detached flight spawned on a current-thread runtime that nobody drives (entered from a
/// plain thread, never `block_on`'d) does not run: tokio's rules. The waiter is not lost,
/// though: when that runtime shuts down, the task (and its driver) is dropped, the caller is
/// woken once and drives the call itself.
#[test]
fn detached_flight_on_an_idle_runtime_is_taken_over_when_it_shuts_down() {
    on_thread("detached on an idle runtime", || {
        let rt = paused_runtime();
        let group: Group<&'static str> = GroupBuilder::new().detached(true).build();
        let backend = Backend::new();
        let mut caller = {
            let _context = rt.enter();
            group.run("k", backend.call(1))
        };
        let (wakes, waker) = counting_waker();
        assert!(poll_with(&mut caller, &waker).is_pending());
        assert_eq!(
            backend.calls(),
            1,
            "make is called when the flight registers"
        );
        assert_eq!(wakes.count(), 0, "the spawned driver never ran");
        drop(rt);
        assert_eq!(
            wakes.count(),
            1,
            "handed the call when its task was dropped"
        );
        assert!(poll_with(&mut caller, &waker).is_pending());
        backend.open();
        assert_eq!(block_on(caller).unwrap(), 1);
        assert_eq!(
            (backend.calls(), backend.live(), group.in_flight()),
            (1, 0, 0)
        );
    });
}

/// A flight led by a task of a current-thread runtime on one thread, followed by tasks of a
/// multi-thread runtime and by a plain thread blocking on its follower: one call, the same
/// answer everywhere, no runtime waits for another.
#[test]
fn flight_led_on_one_runtime_is_followed_from_another_and_a_plain_thread() {
    let group: Group<&'static str> = Group::new();
    let backend = Backend::new();
    let (tx, rx) = mpsc::channel();

    let leader = group.run("k", backend.call(1));
    assert!(leader.is_leader());
    let tx_a = tx.clone();
    let thread_a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tx_a.send(("current-thread leader", rt.block_on(leader).unwrap()))
            .unwrap();
    });

    let rt_b = multi_thread_runtime(2);
    for _ in 0..4 {
        let follower = group.run("k", backend.call(2));
        assert!(!follower.is_leader());
        let tx = tx.clone();
        rt_b.spawn(async move {
            tx.send(("multi-thread follower", follower.await.unwrap()))
                .unwrap();
        });
    }
    let follower = group.run("k", backend.call(3));
    let tx_c = tx.clone();
    let thread_c = std::thread::spawn(move || {
        tx_c.send(("plain-thread follower", block_on(follower).unwrap()))
            .unwrap();
    });

    backend.open();
    for _ in 0..6 {
        let (who, value) = recv("a waiter on another runtime", &rx);
        assert_eq!(value, 1, "{who} got another answer");
    }
    thread_a.join().unwrap();
    thread_c.join().unwrap();
    assert_eq!((backend.calls(), group.in_flight()), (1, 0));
}

/// The runtime whose task leads a flight shuts down mid-flight (dropping that task): followers
/// on a plain thread and on another runtime must not hang. The call is handed over and goes on
/// for them (its future does not need the dead runtime).
#[test]
fn runtime_shut_down_mid_flight_hands_the_call_to_followers_elsewhere() {
    let group: Group<&'static str> = Group::new();
    let backend = Backend::new();
    let (tx, rx) = mpsc::channel();

    let rt_a = multi_thread_runtime(1);
    let leader = group.run("k", backend.call(1));
    let (polled_tx, polled_rx) = mpsc::channel();
    rt_a.spawn(async move {
        // Poll once (the call starts), tell the test, then wait for ever.
        let mut leader = leader;
        let first = futures::poll!(&mut leader);
        polled_tx.send(first.is_pending()).unwrap();
        let _ = leader.await;
        unreachable!("the gate never opens while this task lives");
    });
    assert!(recv("the leader's first poll", &polled_rx));

    // Not paused: a paused clock would jump to the bound while runtime B idles, waiting for a
    // wake-up from another thread.
    let rt_b = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let follower_b = group.run("k", backend.call(2));
    let follower_c = group.run("k", backend.call(3));
    let tx_c = tx.clone();
    let thread_c = std::thread::spawn(move || {
        tx_c.send(block_on(follower_c).unwrap()).unwrap();
    });

    rt_a.shutdown_timeout(REAL_LIMIT);
    assert_eq!(
        (backend.calls(), backend.live()),
        (1, 1),
        "the call survives its leader's runtime"
    );
    backend.open();
    let b = rt_b.block_on(async { tokio::time::timeout(REAL_LIMIT, follower_b).await });
    assert_eq!(b.expect("hung: follower on runtime B").unwrap(), 1);
    assert_eq!(recv("follower on a plain thread", &rx), 1);
    thread_c.join().unwrap();
    assert_eq!(
        (backend.calls(), backend.live(), group.in_flight()),
        (1, 0, 0)
    );
}

/// As above, but the call's future is bound to the dead runtime's timer. Shutting down, tokio
/// fires its pending timers, and a timer polled after its driver has gone panics; which one
/// the follower that takes the call over meets is a race. Either way every follower gets the
/// same outcome (rule 3), a panic becomes an error for all (rule 5), nothing hangs, and the
/// key stays usable.
#[test]
fn call_bound_to_a_dead_runtimes_timer_fails_its_followers_instead_of_hanging() {
    let group: Group<&'static str> = Group::new();
    let rt_a = multi_thread_runtime(1);
    let (polled_tx, polled_rx) = mpsc::channel();
    let leader = {
        let _context = rt_a.enter();
        group.run("k", || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            1u32
        })
    };
    rt_a.spawn(async move {
        let mut leader = leader;
        polled_tx
            .send(futures::poll!(&mut leader).is_pending())
            .unwrap();
        let _ = leader.await;
    });
    assert!(recv("the leader's first poll", &polled_rx));

    let followers: Vec<_> = (0..3).map(|_| group.run("k", || async { 2u32 })).collect();
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = followers
        .into_iter()
        .map(|follower| {
            let tx = tx.clone();
            std::thread::spawn(move || tx.send(block_on(follower).map_err(|_| ())).unwrap())
        })
        .collect();
    rt_a.shutdown_timeout(REAL_LIMIT);
    let outcomes: Vec<_> = (0..3)
        .map(|_| recv("a follower of a call whose runtime died", &rx))
        .collect();
    assert!(
        outcomes.iter().all(|o| *o == outcomes[0]),
        "followers of one call got different outcomes: {outcomes:?}"
    );
    assert!(
        matches!(outcomes[0], Ok(1) | Err(())),
        "not the call's outcome: {outcomes:?}"
    );
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(group.in_flight(), 0);
    assert_eq!(block_on(group.run("k", || async { 3u32 })).unwrap(), 3);
}

/// A detached flight's driver task is dropped when its runtime shuts down: with followers on
/// other threads, they take the call over; with no waiter left, the call is cancelled and the
/// key freed (no entry left behind for a task that no longer exists).
#[test]
fn detached_driver_dropped_by_runtime_shutdown() {
    // With followers elsewhere.
    let group: Group<&'static str> = GroupBuilder::new().detached(true).build();
    let backend = Backend::new();
    let rt_a = multi_thread_runtime(1);
    let waiters: Vec<_> = {
        let _context = rt_a.enter();
        (0..3).map(|i| group.run("k", backend.call(i))).collect()
    };
    // The spawned driver makes the call once it runs (the `make` runs at registration).
    assert_eq!(backend.calls(), 1);
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = waiters
        .into_iter()
        .map(|run| {
            let tx = tx.clone();
            std::thread::spawn(move || tx.send(block_on(run).unwrap()).unwrap())
        })
        .collect();
    rt_a.shutdown_timeout(REAL_LIMIT);
    backend.open();
    for _ in 0..3 {
        assert_eq!(recv("a waiter of a detached call", &rx), 0);
    }
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(
        (backend.calls(), backend.live(), group.in_flight()),
        (1, 0, 0)
    );

    // With no waiter left: the runtime's shutdown is the last word on the call.
    let backend = Backend::new();
    let rt_a = multi_thread_runtime(1);
    {
        let _context = rt_a.enter();
        drop(group.run("k", backend.call(1)));
    }
    assert_eq!(group.in_flight(), 1, "detached: runs with nobody waiting");
    rt_a.shutdown_timeout(REAL_LIMIT);
    assert_eq!((backend.live(), group.in_flight(), group.len()), (0, 0, 0));
    let next = group.run("k", || async { 5u32 });
    assert!(next.is_leader());
    assert_eq!(block_on(next).unwrap(), 5);
}

// ---------------------------------------------------------------------------------------------
// Re-entrancy
// ---------------------------------------------------------------------------------------------

/// `make` runs "after registration and outside every lock": it may read the registry, forget
/// keys, join its own flight (which already exists, so it is a follower of itself) and start
/// another key's flight that its future then awaits.
#[test]
fn make_may_reenter_the_group_on_other_keys_and_its_own() {
    on_thread("re-entrant make", || {
        let group: Group<String> = Group::new();
        let backend = Backend::new();
        let (g, b) = (group.clone(), backend.clone());
        let leader = group.run("k".to_string(), move || {
            let _ = (g.len(), g.in_flight(), g.stats(), g.is_empty());
            assert!(!g.forget("unrelated"));
            let own = g.run("k".to_string(), || async { 999u32 });
            assert!(!own.is_leader(), "its own flight is registered before make");
            drop(own);
            let other = g.run("other".to_string(), b.call(5));
            assert!(other.is_leader());
            let own_call = b.call(1)();
            async move { other.await.unwrap() * 100 + own_call.await }
        });
        let follower = group.run("k".to_string(), || async { 0u32 });
        assert!(leader.is_leader() && !follower.is_leader());
        backend.open();
        let (a, b) = block_on(futures::future::join(leader, follower));
        assert_eq!((a.unwrap(), b.unwrap()), (501, 501));
        assert_eq!((backend.calls(), group.in_flight(), group.len()), (2, 0, 0));
    });
}

/// `make` forgets its own, just-registered flight and starts a new flight of the same key,
/// which its future awaits. Callers after the `forget` join the new flight, not the old one.
#[test]
fn make_may_forget_its_own_key_and_nest_a_new_flight_of_it() {
    on_thread("make forgets its own key", || {
        let group: Group<&'static str> = Group::new();
        let backend = Backend::new();
        let (g, b) = (group.clone(), backend.clone());
        let outer = group.run("k", move || {
            assert!(g.forget("k"), "its own flight is registered");
            let nested = g.run("k", b.call(2));
            assert!(nested.is_leader(), "a forgotten flight is never joined");
            async move { nested.await.unwrap() + 10 }
        });
        let late = group.run("k", || async { 0u32 });
        assert!(!late.is_leader(), "joins the nested flight");
        backend.open();
        let (outer, late) = block_on(futures::future::join(outer, late));
        assert_eq!((outer.unwrap(), late.unwrap()), (12, 2));
        assert_eq!((backend.calls(), group.in_flight(), group.len()), (1, 0, 0));
    });
}

/// An inner future that awaits its own key joins its own flight and waits for itself: a cycle
/// that hangs by design, as in Go's singleflight. But no lock may be held while it hangs (the
/// registry answers, other keys run), a timeout ends the wait, and `forget` (Go's remedy)
/// frees the key for later callers.
///
/// Observed and pinned here: when the outer caller leaves, the future is handed to the only
/// other waiter of its flight, the one inside the future itself, so it is never dropped and the
/// key stays registered until `forget`: the inner waiter is "kept alive but never polled",
/// which the docs of `Group::run` warn holds up a key.
#[test]
fn inner_future_awaiting_its_own_key_hangs_without_holding_a_lock() {
    on_thread("self-awaiting flight", || {
        paused_runtime().block_on(async {
            let group: Group<&'static str> = Group::new();
            let g = group.clone();
            let mut outer = group.run("k", move || async move {
                g.run("k", || async { 1u32 }).await.map_or(0, |v| v + 1)
            });
            let (_, waker) = counting_waker();
            assert!(poll_with(&mut outer, &waker).is_pending());
            assert_eq!((group.in_flight(), group.stats().followers), (1, 1));
            let other = group.run("other", || async { 2u32 });
            assert_eq!(bounded("another key", other).await.unwrap(), 2);
            let waited = tokio::time::timeout(Duration::from_secs(3600), &mut outer).await;
            assert!(waited.is_err(), "a flight awaiting itself cannot finish");
            drop(outer);

            assert_eq!(
                group.in_flight(),
                1,
                "held by the waiter inside its own future"
            );
            let joined = group.run("k", || async { 3u32 });
            assert!(!joined.is_leader());
            drop(joined);
            assert!(group.forget("k"));
            let fresh = group.run("k", || async { 7u32 });
            assert!(fresh.is_leader());
            assert_eq!(bounded("after forget", fresh).await.unwrap(), 7);
        })
    });
}

/// An output whose `Clone` re-enters the group: registry reads, `forget`, and a run of the very
/// key being published. Copies are made outside every lock (rule 8), and after the flight was
/// unregistered (rule 2), so that run starts a new flight. Under `linger`, the copy for a
/// lingering hit re-enters too.
#[test]
fn output_clone_may_reenter_the_group() {
    struct Noisy {
        value: u32,
        group: Group<&'static str>,
        clones: Arc<AtomicUsize>,
        nested_leaders: Arc<AtomicUsize>,
        check_nested: bool,
    }
    impl Clone for Noisy {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, SeqCst);
            let _ = (self.group.len(), self.group.in_flight(), self.group.stats());
            let _ = self.group.is_empty();
            self.group.forget("elsewhere");
            let again = self.group.run("k", std::future::pending::<Noisy>);
            if again.is_leader() {
                self.nested_leaders.fetch_add(1, SeqCst);
            }
            drop(again);
            Noisy {
                value: self.value,
                group: self.group.clone(),
                clones: self.clones.clone(),
                nested_leaders: self.nested_leaders.clone(),
                check_nested: self.check_nested,
            }
        }
    }

    on_thread("re-entrant clone", || {
        for linger in [false, true] {
            let group: Group<&'static str> = match linger {
                false => Group::new(),
                true => GroupBuilder::new()
                    .linger(Duration::from_secs(3600))
                    .build(),
            };
            let backend = Backend::new();
            let clones = Arc::new(AtomicUsize::new(0));
            let nested_leaders = Arc::new(AtomicUsize::new(0));
            let output = {
                let (group, clones, nested_leaders) =
                    (group.clone(), clones.clone(), nested_leaders.clone());
                move || Noisy {
                    value: 42,
                    group,
                    clones,
                    nested_leaders,
                    check_nested: !linger,
                }
            };
            let waiters: Vec<_> = (0..4)
                .map(|_| group.run("k", backend.call_with(output.clone())))
                .collect();
            let opener = async { backend.open() };
            let (outs, ()) = block_on(futures::future::join(join_all(waiters), opener));
            assert!(outs.into_iter().all(|o| o.unwrap().value == 42));
            assert!(clones.load(SeqCst) >= 3, "each follower gets a clone");
            if !linger {
                assert_eq!(
                    nested_leaders.load(SeqCst),
                    clones.load(SeqCst),
                    "a run during publication joined the published flight"
                );
                assert_eq!((group.in_flight(), group.len()), (0, 0));
            } else {
                let before = clones.load(SeqCst);
                let hit = block_on(group.run("k", backend.call_with(output.clone())));
                assert_eq!(hit.unwrap().value, 42);
                assert!(clones.load(SeqCst) > before, "the hit is a clone");
                assert_eq!(backend.calls(), 1);
                assert!(group.forget("k"));
                assert_eq!(group.len(), 0);
            }
        }
    });
}

/// Hooks for outputs and keys whose destructors re-enter the group: registry reads, a forget,
/// a nested flight started and cancelled, and the drop of a waiter of another flight (which
/// takes that flight's lock and its shard's).
struct Reentry {
    group: OnceLock<Group<&'static str>>,
    victims: Mutex<Vec<Run<&'static str, u32>>>,
    fired: AtomicUsize,
}

impl Reentry {
    fn new() -> Arc<Self> {
        Arc::new(Reentry {
            group: OnceLock::new(),
            victims: Mutex::default(),
            fired: AtomicUsize::new(0),
        })
    }

    fn fire(&self) {
        let Some(group) = self.group.get() else {
            return;
        };
        self.fired.fetch_add(1, SeqCst);
        let _ = (
            group.len(),
            group.in_flight(),
            group.stats(),
            group.is_empty(),
        );
        group.forget("nothing");
        drop(group.run("side", std::future::pending::<u32>));
        let victim = self.victims.lock().unwrap().pop();
        drop(victim);
    }

    fn fired(&self) -> usize {
        self.fired.load(SeqCst)
    }
}

/// Every place an output can be dropped by the registry (a follower's unclaimed copy, a
/// lingering output forgotten, purged by `purge_expired`, purged lazily by the next run of its
/// key) runs its destructor with no lock held.
#[test]
fn output_drop_may_reenter_the_group_on_every_path() {
    #[derive(Clone)]
    struct Dropper(u32, Arc<Reentry>);
    impl Drop for Dropper {
        fn drop(&mut self) {
            self.1.fire();
        }
    }

    on_thread("re-entrant output destructor", || {
        paused_runtime().block_on(async {
            let hook = Reentry::new();
            let group: Group<&'static str> =
                GroupBuilder::new().linger(Duration::from_secs(60)).build();
            hook.group.set(group.clone()).ok().unwrap();
            // Victims: followers of a flight of another key, dropped one per destructor.
            let victim_backend = Backend::new();
            let victim_leader = group.run("victim", victim_backend.call(9));
            for _ in 0..16 {
                let victim = group.run("victim", victim_backend.call(0));
                hook.victims.lock().unwrap().push(victim);
            }
            let victim_leader = tokio::spawn(victim_leader);
            tokio::task::yield_now().await;

            let make = |v: u32| {
                let hook = hook.clone();
                move || async move { Dropper(v, hook) }
            };
            // 1. A follower's copy, published but never taken: dropped with the follower.
            let leader = group.run("k", make(1));
            let mut unclaimed = group.run("k", make(2));
            assert!(poll_with(&mut unclaimed, Waker::noop()).is_pending());
            let out = bounded("first flight", leader).await.unwrap();
            assert_eq!(out.0, 1);
            let fired = hook.fired();
            drop(unclaimed);
            assert!(hook.fired() > fired, "the unclaimed copy was dropped");

            // 2. A lingering output dropped by `forget`.
            let fired = hook.fired();
            assert!(group.forget("k"));
            assert!(hook.fired() > fired, "forget drops the lingering output");

            // 3. One dropped by `purge_expired`.
            drop(bounded("second flight", group.run("k", make(3))).await);
            let fired = hook.fired();
            tokio::time::advance(Duration::from_secs(61)).await;
            group.purge_expired();
            assert!(hook.fired() > fired, "purged");
            assert_eq!(group.len(), 1, "only the victims' flight is left");

            // 4. One dropped lazily by the next run of its key.
            drop(bounded("third flight", group.run("k", make(4))).await);
            let fired = hook.fired();
            tokio::time::advance(Duration::from_secs(61)).await;
            let fresh = group.run("k", make(5));
            assert!(fresh.is_leader(), "the expired output is not served");
            assert!(hook.fired() > fired, "the expired output was dropped");
            assert_eq!(bounded("fourth flight", fresh).await.unwrap().0, 5);

            victim_backend.open();
            assert_eq!(
                bounded("victim flight", victim_leader)
                    .await
                    .unwrap()
                    .unwrap(),
                9
            );
            let survivors = std::mem::take(&mut *hook.victims.lock().unwrap());
            for survivor in survivors {
                assert_eq!(bounded("victim follower", survivor).await.unwrap(), 9);
            }
            assert_eq!(group.in_flight(), 0);
        })
    });
}

/// A key that re-enters its own group from `Hash` (`in_flight` takes every shard lock) and
/// from `Drop` (readers, `forget`, a nested flight started and cancelled). The crate docs
/// exempt only the key's `Eq` from rule 8 ("key `Eq` aside"), so `Hash` must run unlocked, also
/// while the table grows; and keys are dropped unlocked on every path: joining, cancellation,
/// lingering expiry, `forget`, capacity bounds.
#[test]
fn key_hash_and_drop_may_reenter_the_group_on_every_path() {
    #[derive(Default)]
    struct KeyHook {
        group: OnceLock<Group<Key>>,
        fired: AtomicUsize,
    }
    /// Keys made by the hook itself carry none, so the re-entry does not recurse.
    #[derive(Clone)]
    struct Key(u32, Option<Arc<KeyHook>>);
    impl Key {
        fn fire(&self) {
            let Some(group) = self.1.as_ref().and_then(|hook| hook.group.get()) else {
                return;
            };
            self.1.as_ref().unwrap().fired.fetch_add(1, SeqCst);
            let _ = (
                group.len(),
                group.in_flight(),
                group.stats(),
                group.is_empty(),
            );
            group.forget(&Key(u32::MAX, None));
            drop(group.run(Key(u32::MAX - 1, None), std::future::pending::<u32>));
        }
    }
    impl PartialEq for Key {
        fn eq(&self, other: &Self) -> bool {
            self.0 == other.0
        }
    }
    impl Eq for Key {}
    impl Hash for Key {
        fn hash<H: Hasher>(&self, state: &mut H) {
            self.fire();
            self.0.hash(state);
        }
    }
    impl Drop for Key {
        fn drop(&mut self) {
            self.fire();
        }
    }

    on_thread("re-entrant key", || {
        paused_runtime().block_on(async {
            for (name, builder) in [
                ("plain", GroupBuilder::new()),
                (
                    "linger",
                    GroupBuilder::new().linger(Duration::from_secs(60)),
                ),
                ("max_in_flight", GroupBuilder::new().max_in_flight(1)),
                ("max_followers", GroupBuilder::new().max_followers(0)),
            ] {
                let hook = Arc::new(KeyHook::default());
                let group: Group<Key> = builder.build();
                hook.group.set(group.clone()).ok().unwrap();
                let key = |n| Key(n, Some(hook.clone()));
                // Distinct keys, enough to make every shard's table grow.
                let many: Vec<_> = (0..2_000)
                    .map(|n| group.run(key(n), move || async move { n }))
                    .collect();
                for (n, run) in (0..).zip(many) {
                    assert_eq!(bounded(name, run).await.unwrap(), n, "{name}");
                }
                // Followers (their keys dropped on joining), a cancelled flight, forget.
                let backend = Backend::new();
                let waiters: Vec<_> = (0..3).map(|_| group.run(key(1), backend.call(1))).collect();
                drop(group.run(key(2), std::future::pending::<u32>));
                group.forget(&key(3));
                backend.open();
                for out in bounded(name, join_all(waiters)).await {
                    assert_eq!(out.unwrap(), 1, "{name}");
                }
                group.forget(&key(1));
                tokio::time::advance(Duration::from_secs(61)).await;
                group.purge_expired();
                drop(bounded(name, group.run(key(1), || async { 0u32 })).await);
                tokio::time::advance(Duration::from_secs(61)).await;
                drop(bounded(name, group.run(key(1), || async { 0u32 })).await);
                tokio::time::advance(Duration::from_secs(61)).await;
                group.purge_expired();
                assert!(hook.fired.load(SeqCst) > 4_000, "{name}");
                assert_eq!((group.in_flight(), group.len()), (0, 0), "{name}");
            }
        })
    });
}

/// A key whose `Hash` blocks (slow, or waiting on something) holds up nobody else: the crate
/// hashes keys before taking a shard lock (only `Eq` runs under one), so other keys, the
/// registry's readers and `forget` all proceed meanwhile.
#[test]
fn slow_key_hash_does_not_hold_up_other_keys() {
    #[derive(Clone)]
    struct SlowKey(u32, Option<Arc<Stall>>);
    impl PartialEq for SlowKey {
        fn eq(&self, other: &Self) -> bool {
            self.0 == other.0
        }
    }
    impl Eq for SlowKey {}
    impl Hash for SlowKey {
        fn hash<H: Hasher>(&self, state: &mut H) {
            if let Some(stall) = &self.1 {
                stall.stall();
            }
            self.0.hash(state);
        }
    }

    on_thread("slow hash", || {
        let group: Group<SlowKey> = Group::new();
        let (stall, hashing, release) = Stall::new();
        let slow = SlowKey(0, Some(stall));
        let g = group.clone();
        let slow_caller =
            std::thread::spawn(move || block_on(g.run(slow, || async { 0u32 })).unwrap());
        recv("the slow hash began", &hashing);
        for n in 1..=500 {
            let (a, b) = block_on(futures::future::join(
                group.run(SlowKey(n, None), move || async move { n }),
                group.run(SlowKey(n, None), || async { 0 }),
            ));
            assert_eq!((a.unwrap(), b.unwrap()), (n, n));
        }
        let _ = (group.len(), group.stats(), group.in_flight());
        group.forget(&SlowKey(1, None));
        release.send(()).unwrap();
        assert_eq!(slow_caller.join().unwrap(), 0);
        assert_eq!(group.in_flight(), 0);
    });
}

// ---------------------------------------------------------------------------------------------
// Unusual types
// ---------------------------------------------------------------------------------------------

/// Zero-sized outputs and keys: one call for many waiters, each follower a clone (counted by
/// a ZST whose `Clone` has a side effect), and the registry empty afterwards.
#[test]
fn zero_sized_outputs_and_keys() {
    static CLONES: AtomicUsize = AtomicUsize::new(0);
    #[derive(Debug, PartialEq)]
    struct Marker;
    impl Clone for Marker {
        fn clone(&self) -> Self {
            CLONES.fetch_add(1, SeqCst);
            Marker
        }
    }

    on_thread("zero-sized types", || {
        let group: Group<()> = Group::new();
        let backend = Backend::new();
        let waiters: Vec<_> = (0..100)
            .map(|_| group.run((), backend.call_with(|| Marker)))
            .collect();
        let units: Vec<_> = (0..10)
            .map(|_| group.run((), backend.call_with(|| ())))
            .collect();
        assert!(waiters[0].is_leader() && waiters[1..].iter().all(|w| !w.is_leader()));
        assert!(units[0].is_leader(), "another output type: its own flight");
        let opener = async { backend.open() };
        let ((markers, units), ()) = block_on(futures::future::join(
            futures::future::join(join_all(waiters), join_all(units)),
            opener,
        ));
        assert!(markers.into_iter().all(|m| m.unwrap() == Marker));
        assert!(units.into_iter().all(|u| u.is_ok()));
        assert_eq!(CLONES.load(SeqCst), 99, "one clone per follower");
        assert_eq!((backend.calls(), group.in_flight(), group.len()), (2, 0, 0));
    });
}

/// "The output need not be `Sync`": a `Cell` goes to followers on several worker threads, and
/// lingering hits from many tasks at once each get their own copy.
#[test]
fn non_sync_output_is_shared_across_threads_and_lingers() {
    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let group: Group<u8> = GroupBuilder::new()
            .linger(Duration::from_secs(3600))
            .build();
        let backend = Backend::new();
        let waiters: Vec<_> = (0..50)
            .map(|_| tokio::spawn(group.run(1, backend.call_with(|| Cell::new(7u32)))))
            .collect();
        backend.open();
        for waiter in waiters {
            let out = tokio::time::timeout(REAL_LIMIT, waiter).await.unwrap();
            assert_eq!(out.unwrap().unwrap().get(), 7);
        }
        let hits: Vec<_> = (0..50)
            .map(|_| tokio::spawn(group.run(1, backend.call_with(|| Cell::new(8u32)))))
            .collect();
        for hit in hits {
            let out = tokio::time::timeout(REAL_LIMIT, hit).await.unwrap();
            let cell = out.unwrap().unwrap();
            assert_eq!(cell.get(), 7);
            cell.set(0); // each caller owns its copy
        }
        assert_eq!(backend.calls(), 1);
    });
}

/// An output of 64 KiB (16 Ki `i32`s), returned by value, shared with three followers on a
/// thread with a 2 MiB stack (Rust's default thread stack and tokio's default worker stack),
/// in a debug build: publishing must not keep a batch of copies, nor several moved copies, on
/// the stack (`futures::future::Shared`, the baseline, fits it too). Run in a child process so
/// that a stack overflow, which no `catch_unwind` contains, fails only this test.
#[test]
fn large_output_with_followers_fits_a_default_stack() {
    const SIZE: usize = 16 * 1024; // of `i32`
    fn share() {
        // Baseline: the same sharing with `futures::future::Shared`.
        let shared = async { [7i32; SIZE] }.boxed().shared();
        let outs = block_on(join_all((0..4).map(|_| shared.clone())));
        assert!(outs.iter().all(|o| o[0] == 7));
        eprintln!("the baseline with futures::future::Shared fits the stack");

        let group: Group<u8> = Group::new();
        let waiters: Vec<_> = (0..4)
            .map(|i: i32| group.run(1, move || async move { [i; SIZE] }))
            .collect();
        let outs = block_on(join_all(waiters));
        assert!(outs.iter().all(|o| o.as_ref().unwrap()[SIZE - 1] == 0));
    }
    in_child_process("large_output_with_followers_fits_a_default_stack", || {
        let thread = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(share)
            .unwrap();
        thread.join().unwrap();
    });
}

/// Outputs that live on the heap may be large: a 1 MiB buffer for 16 waiters is cloned once per
/// follower and nothing more (no copy per batch or per wake-up).
#[test]
fn large_heap_output_is_cloned_once_per_follower() {
    static CLONES: AtomicUsize = AtomicUsize::new(0);
    struct Big(Vec<u8>);
    impl Clone for Big {
        fn clone(&self) -> Self {
            CLONES.fetch_add(1, SeqCst);
            Big(self.0.clone())
        }
    }
    on_thread("large heap output", || {
        let group: Group<u8> = Group::new();
        let backend = Backend::new();
        let waiters: Vec<_> = (0..16)
            .map(|_| group.run(1, backend.call_with(|| Big(vec![5; 1 << 20]))))
            .collect();
        backend.open();
        for out in block_on(join_all(waiters)) {
            let big = out.unwrap();
            assert_eq!((big.0.len(), big.0[1 << 19]), (1 << 20, 5));
        }
        assert_eq!(CLONES.load(SeqCst), 15);
    });
}

/// Keys of common owned types are compared by value (equal keys from distinct allocations
/// coalesce) and can be forgotten through their borrowed form.
#[test]
fn arc_str_vec_and_tuple_keys() {
    on_thread("unusual keys", || {
        let backend = Backend::new();

        let group: Group<Arc<str>> = Group::new();
        let a = group.run(Arc::from("key"), backend.call(1));
        let b = group.run(Arc::from(String::from("key")), backend.call(2));
        let c = group.run(Arc::from("kez"), backend.call(3));
        assert!(a.is_leader() && !b.is_leader() && c.is_leader());
        assert!(group.forget("key"), "forgotten by &str");
        let d = group.run(Arc::from("key"), backend.call(4));
        assert!(d.is_leader());

        let bytes: Group<Vec<u8>> = Group::new();
        let e = bytes.run(b"key".to_vec(), backend.call(5));
        let f = bytes.run(vec![b'k', b'e', b'y'], backend.call(6));
        assert!(e.is_leader() && !f.is_leader());
        assert!(bytes.forget(&b"key"[..]), "forgotten by &[u8]");

        let tuples: Group<(String, u32, bool)> = Group::new();
        let g = tuples.run(("a".into(), 1, true), backend.call(7));
        let h = tuples.run(("a".into(), 1, true), backend.call(8));
        let i = tuples.run(("a".into(), 1, false), backend.call(9));
        assert!(g.is_leader() && !h.is_leader() && i.is_leader());
        assert!(tuples.forget(&("a".to_string(), 1, false)));

        backend.open();
        let unwrap = |outs: Vec<Result<u32, _>>| -> Vec<u32> {
            outs.into_iter().map(Result::unwrap).collect()
        };
        assert_eq!(unwrap(block_on(join_all([a, b, c, d]))), [1, 1, 3, 4]);
        assert_eq!(unwrap(block_on(join_all([e, f]))), [5, 5]);
        assert_eq!(unwrap(block_on(join_all([g, h, i]))), [7, 7, 9]);
        assert_eq!(backend.calls(), 6);
        assert_eq!((group.len(), bytes.len(), tuples.len()), (0, 0, 0));
    });
}

/// While a slow `Clone` of a published output runs (blocked here on another thread), the
/// registry is not held: a newcomer for the same key starts a new flight (the old one was
/// unregistered before copying), other keys run, readers and `forget` answer.
#[test]
fn slow_output_clone_holds_up_no_other_caller() {
    struct Slow(u32, Option<Arc<Stall>>);
    impl Clone for Slow {
        fn clone(&self) -> Self {
            if let Some(stall) = &self.1 {
                stall.stall();
            }
            Slow(self.0, None)
        }
    }

    on_thread("slow clone", || {
        let group: Group<&'static str> = Group::new();
        let (stall, cloning, release) = Stall::new();
        let leader = group.run("k", move || async move { Slow(1, Some(stall)) });
        let follower = group.run("k", || async { Slow(2, None) });
        let publishing = std::thread::spawn(move || {
            let (a, b) = block_on(futures::future::join(leader, follower));
            (a.unwrap().0, b.unwrap().0)
        });
        recv("the follower's copy began", &cloning);
        assert_eq!(group.in_flight(), 0, "unregistered before copying");
        let newcomer = group.run("k", || async { Slow(3, None) });
        assert!(newcomer.is_leader(), "joined a flight already published");
        assert_eq!(block_on(newcomer).unwrap().0, 3);
        assert_eq!(block_on(group.run("other", || async { 4u32 })).unwrap(), 4);
        let _ = (group.len(), group.stats());
        group.forget("k");
        release.send(()).unwrap();
        assert_eq!(publishing.join().unwrap(), (1, 1));
        assert_eq!(group.in_flight(), 0);
    });
}

// ---------------------------------------------------------------------------------------------
// Cancellation in every order, counted wakers; the group dropped mid-flight
// ---------------------------------------------------------------------------------------------

/// All permutations of `0..n`.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut p = rest.clone();
            p.insert(at, n - 1);
            out.push(p);
        }
    }
    out
}

struct Waiter {
    run: Run<&'static str, u32>,
    wakes: Arc<CountingWaker>,
    waker: Waker,
    /// Wake-ups already answered by a poll.
    seen: usize,
}

/// One scenario: `N` waiters polled to park, `dropped` of them (in that order) dropped while
/// the call waits, every woken waiter polled as an executor would, then the gate opened.
fn cancellation_scenario(n: usize, dropped: &[usize]) {
    let what = format!("dropping {dropped:?} of {n}");
    let group: Group<&'static str> = Group::new();
    let backend = Backend::new();
    let mut waiters: Vec<Option<Waiter>> = (0..n)
        .map(|i| {
            let (wakes, waker) = counting_waker();
            let run = group.run("k", backend.call(100 + i as u32));
            Some(Waiter {
                run,
                wakes,
                waker,
                seen: 0,
            })
        })
        .collect();
    for waiter in waiters.iter_mut().flatten() {
        assert!(
            poll_with(&mut waiter.run, &waiter.waker).is_pending(),
            "{what}"
        );
    }
    // Polled again with nothing happened: nobody wakes itself (no busy loop).
    for waiter in waiters.iter_mut().flatten() {
        assert!(
            poll_with(&mut waiter.run, &waiter.waker).is_pending(),
            "{what}"
        );
        assert_eq!(waiter.wakes.count(), 0, "woke itself: {what}");
    }
    assert_eq!(backend.calls(), 1, "{what}");

    let mut driver = 0;
    for (step, &leaving) in dropped.iter().enumerate() {
        waiters[leaving] = None;
        let left = n - step - 1;
        // Run woken waiters as an executor would; count who was woken by this departure.
        let mut woken = Vec::new();
        for (i, waiter) in waiters.iter_mut().enumerate() {
            let Some(waiter) = waiter else { continue };
            if waiter.wakes.count() > waiter.seen {
                waiter.seen = waiter.wakes.count();
                woken.push(i);
                assert!(
                    poll_with(&mut waiter.run, &waiter.waker).is_pending(),
                    "{what}"
                );
            }
        }
        if leaving == driver && left > 0 {
            assert_eq!(woken.len(), 1, "exactly one follower takes over: {what}");
            driver = woken[0];
        } else {
            assert!(woken.is_empty(), "woken by a departure {woken:?}: {what}");
        }
        if left == 0 {
            assert_eq!(
                backend.live(),
                0,
                "the last waiter's departure cancels: {what}"
            );
            assert_eq!((group.in_flight(), group.len()), (0, 0), "{what}");
        } else {
            assert_eq!((backend.live(), group.in_flight()), (1, 1), "{what}");
        }
    }

    backend.open();
    if let Some(waiter) = waiters[driver].as_mut() {
        assert!(
            waiter.wakes.count() > waiter.seen,
            "the gate wakes the driver: {what}"
        );
        assert_eq!(
            poll_with(&mut waiter.run, &waiter.waker).map(Result::unwrap),
            Poll::Ready(100),
            "{what}"
        );
    }
    for (i, waiter) in waiters.iter_mut().enumerate() {
        let Some(waiter) = waiter.as_mut().filter(|_| i != driver) else {
            continue;
        };
        assert_eq!(
            (waiter.seen, waiter.wakes.count()),
            (0, 1),
            "a follower is woken once, by publication: {what}"
        );
        assert_eq!(
            poll_with(&mut waiter.run, &waiter.waker).map(Result::unwrap),
            Poll::Ready(100),
            "{what}"
        );
    }
    let stats = group.stats();
    let all_left = dropped.len() == n;
    assert_eq!(
        (stats.leaders, stats.followers, stats.cancelled),
        (1, n as u64 - 1, u64::from(all_left)),
        "{what}"
    );
    assert_eq!(
        (backend.calls(), backend.live(), group.len()),
        (1, 0, 0),
        "{what}"
    );
    // The key is free: a newcomer leads a new call.
    let next = group.run("k", || async { 7u32 });
    assert!(next.is_leader(), "{what}");
    assert_eq!(block_on(next).unwrap(), 7, "{what}");
}

/// Four waiters, every departure order and every number of departures (the leader first, last,
/// in the middle, alone, all of them), polled by hand with counting wakers and no runtime:
/// exactly one follower is woken to take the call over when its driver leaves, nobody else is
/// woken by a departure, each remaining follower is woken exactly once, by publication, and all
/// get the leader's answer; when everybody left, the call was dropped and the key freed.
#[test]
fn waiters_cancelled_in_every_order_are_woken_exactly_once() {
    on_thread("cancellation orders", || {
        const N: usize = 4;
        for order in permutations(N) {
            for dropped in 0..=N {
                cancellation_scenario(N, &order[..dropped]);
            }
        }
    });
}

/// A waiter moved to another executor between polls (first polled with waker `A`, then with
/// waker `B`) must be woken through `B`, the waker of its latest poll (the `Future` contract),
/// both to take the call over and for publication; the stale `A` belongs to a task that no
/// longer holds it and must not be woken.
#[test]
fn a_waiter_moved_between_executors_is_woken_through_its_latest_waker() {
    on_thread("moved waiters", || {
        let group: Group<&'static str> = Group::new();
        let backend = Backend::new();
        let mut leader = group.run("k", backend.call(1));
        assert!(poll_with(&mut leader, Waker::noop()).is_pending());
        let mut followers: Vec<_> = (0..2)
            .map(|i| {
                let mut run = group.run("k", backend.call(2 + i));
                let (old, old_waker) = counting_waker();
                let (new, new_waker) = counting_waker();
                assert!(poll_with(&mut run, &old_waker).is_pending());
                assert!(poll_with(&mut run, &new_waker).is_pending());
                (run, old, new, new_waker)
            })
            .collect();
        drop(leader);
        let woken: Vec<usize> = (0..2).filter(|&i| followers[i].2.count() > 0).collect();
        assert_eq!(
            woken,
            [woken[0]],
            "one follower takes over, through its new waker"
        );
        assert!(
            followers.iter().all(|f| f.1.count() == 0),
            "a stale waker was woken"
        );
        let driver = woken[0];
        let seen = followers[driver].2.count();
        {
            let (run, _, _, waker) = &mut followers[driver];
            assert!(poll_with(run, waker).is_pending());
        }
        backend.open();
        {
            let (run, _, new, waker) = &mut followers[driver];
            assert!(new.count() > seen, "the gate wakes the new driver");
            assert_eq!(poll_with(run, waker).map(Result::unwrap), Poll::Ready(1));
        }
        let (run, old, new, waker) = &mut followers[1 - driver];
        assert_eq!((old.count(), new.count()), (0, 1), "woken once, through B");
        assert_eq!(poll_with(run, waker).map(Result::unwrap), Poll::Ready(1));
        assert_eq!((backend.calls(), group.in_flight()), (1, 0));
    });
}

/// `Group` is a handle: dropping every handle while flights run neither fails nor strands
/// their waiters; the flights finish (or are cancelled) as if it were still there, and a
/// detached flight with no waiter and no handle left still completes.
#[test]
fn group_handles_dropped_while_flights_run() {
    on_thread("group dropped", || {
        // A flight with followers finishes for them.
        let group: Group<&'static str> = Group::new();
        let backend = Backend::new();
        let mut waiters: Vec<_> = (0..4).map(|i| group.run("k", backend.call(i))).collect();
        for waiter in &mut waiters {
            assert!(poll_with(waiter, Waker::noop()).is_pending());
        }
        drop(group);
        drop(waiters.remove(0)); // the leader too: a follower takes over
        backend.open();
        for out in block_on(join_all(waiters)) {
            assert_eq!(out.unwrap(), 0);
        }
        assert_eq!((backend.calls(), backend.live()), (1, 0));

        // A flight whose waiters all leave after the group is gone is cancelled.
        let group: Group<&'static str> = Group::new();
        let backend = Backend::new();
        let mut waiters: Vec<_> = (0..3).map(|i| group.run("k", backend.call(i))).collect();
        assert!(poll_with(&mut waiters[0], Waker::noop()).is_pending());
        drop(group);
        drop(waiters);
        assert_eq!((backend.calls(), backend.live()), (1, 0));

        // A detached flight with nobody left completes on its task.
        paused_runtime().block_on(async {
            let group: Group<&'static str> = GroupBuilder::new().detached(true).build();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let backend = Backend::new();
            let b = backend.clone();
            drop(group.run("k", move || {
                let call = b.call(1)();
                async move {
                    let out = call.await;
                    let _ = done_tx.send(out);
                    out
                }
            }));
            drop(group);
            backend.open();
            assert_eq!(bounded("detached flight", done_rx).await.unwrap(), 1);
        });
    });
}

// ---------------------------------------------------------------------------------------------
// The tower layer while the inner service's readiness stays pending (rule 6)
// ---------------------------------------------------------------------------------------------

fn by_str(k: &&'static str) -> Option<&'static str> {
    Some(*k)
}

/// The inner service granted one call and then stays unready for ever. Followers of the flight
/// that got that call are still served, woken exactly once by its response and never by
/// readiness changes; a flight of another key stuck on readiness holds up nobody else; after
/// publication, a new request for the hot key waits for readiness like any new flight.
#[tokio::test(start_paused = true)]
async fn followers_are_served_while_inner_readiness_stays_pending() {
    let (inner, mut handle) = mock::pair::<&'static str, &'static str>();
    handle.allow(1);
    let mut svc = CoalesceLayer::new(by_str).layer(inner);
    let mut hot = Box::pin(svc.call("hot"));
    let (_, hot_waker) = counting_waker();
    assert!(poll_with(&mut hot, &hot_waker).is_pending());
    let (req, respond) = bounded("the hot call", handle.next_request())
        .await
        .unwrap();
    assert_eq!(req, "hot");

    // Readiness is used up: another key's flight is stuck on it.
    let mut cold = Box::pin(svc.call("cold"));
    let (_, cold_waker) = counting_waker();
    assert!(poll_with(&mut cold, &cold_waker).is_pending());

    let mut followers: Vec<_> = (0..5)
        .map(|_| {
            let mut cx = Context::from_waker(Waker::noop());
            assert!(
                svc.poll_ready(&mut cx).is_ready(),
                "the layer is always ready"
            );
            let follower = Box::pin(svc.call("hot"));
            assert!(follower.is_follower());
            let (wakes, waker) = counting_waker();
            (follower, wakes, waker)
        })
        .collect();
    for (follower, wakes, waker) in &mut followers {
        assert!(poll_with(follower, waker).is_pending());
        assert_eq!(wakes.count(), 0);
    }
    // Readiness changes wake whoever waits on readiness (the cold flight), not followers.
    handle.allow(0);
    for (follower, wakes, waker) in &mut followers {
        assert!(poll_with(follower, waker).is_pending());
        assert_eq!(wakes.count(), 0, "a follower was woken by readiness");
    }

    respond.send_response("v");
    assert_eq!(
        poll_with(&mut hot, &hot_waker).map(Result::unwrap),
        Poll::Ready("v")
    );
    for (follower, wakes, waker) in &mut followers {
        assert_eq!(wakes.count(), 1, "woken once, by the response");
        assert_eq!(
            poll_with(follower, waker).map(Result::unwrap),
            Poll::Ready("v")
        );
    }

    // The hot key's next flight needs readiness of its own, which never comes.
    let mut next = Box::pin(svc.call("hot"));
    assert!(next.is_leader(), "no stale join after publication");
    assert!(poll_with(&mut next, Waker::noop()).is_pending());
    assert!(poll_with(&mut cold, &cold_waker).is_pending());
    assert!(
        handle.poll_request().is_pending(),
        "no call without readiness"
    );
    assert_eq!(svc.in_flight(), 2);
    drop((next, cold));
    assert_eq!(svc.in_flight(), 0);
}

/// The leader leaves while its flight still waits for readiness: one follower takes the
/// flight over (and with it the wait for readiness); when readiness comes, one inner call
/// serves everybody, and the other followers are woken once, by its response.
#[tokio::test(start_paused = true)]
async fn a_flight_waiting_for_readiness_survives_its_leader() {
    let (inner, mut handle) = mock::pair::<&'static str, &'static str>();
    handle.allow(0);
    let mut svc = CoalesceLayer::new(by_str).layer(inner);
    let mut leader = Box::pin(svc.call("k"));
    assert!(poll_with(&mut leader, Waker::noop()).is_pending());
    let mut followers: Vec<_> = (0..4)
        .map(|_| {
            let (wakes, waker) = counting_waker();
            (Box::pin(svc.call("k")), wakes, waker, 0usize)
        })
        .collect();
    for (follower, _, waker, _) in &mut followers {
        assert!(poll_with(follower, waker).is_pending());
    }
    drop(leader);
    let woken: Vec<usize> = (0..followers.len())
        .filter(|&i| followers[i].1.count() > 0)
        .collect();
    assert_eq!(woken.len(), 1, "one follower takes the flight over");
    let driver = woken[0];
    {
        let (follower, wakes, waker, seen) = &mut followers[driver];
        *seen = wakes.count();
        assert!(
            poll_with(follower, waker).is_pending(),
            "still no readiness"
        );
    }
    assert!(handle.poll_request().is_pending());

    handle.allow(1);
    {
        let (follower, wakes, waker, seen) = &mut followers[driver];
        assert!(wakes.count() > *seen, "readiness wakes the flight's driver");
        assert!(poll_with(follower, waker).is_pending());
    }
    let (req, respond) = bounded("the one call", handle.next_request())
        .await
        .unwrap();
    assert_eq!(req, "k");
    respond.send_response("v");
    {
        let (follower, _, waker, _) = &mut followers[driver];
        assert_eq!(
            poll_with(follower, waker).map(Result::unwrap),
            Poll::Ready("v")
        );
    }
    for (i, (follower, wakes, waker, _)) in followers.iter_mut().enumerate() {
        if i == driver {
            continue;
        }
        assert_eq!(wakes.count(), 1, "woken once, by the response");
        assert_eq!(
            poll_with(follower, waker).map(Result::unwrap),
            Poll::Ready("v")
        );
    }
    assert!(handle.poll_request().is_pending(), "exactly one inner call");
    assert_eq!(svc.in_flight(), 0);
}
