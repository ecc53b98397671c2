//! Review (session 9, core): option interactions, re-entrancy, wakers and counters, through
//! the public API only.
//!
//! Each of these failed before its fix: a panicking waker `clone` in an adopter's `rejoin`
//! stranded the flight; a gated driver's waker was cloned under the shard lock; `forget` left
//! lingering expiry records queued for their whole window (for ever under
//! `linger(Duration::MAX)`); a waiter dropped during an unwind re-raised another task's waker
//! panic and aborted the process. (A follower's waker is still cloned under its flight's lock,
//! as tokio's `Notify` does; documented.) The other tests pin behaviour: a storm of every
//! option on worker threads (counters never go back, add up, registry empties), the gate of a key's
//! cancelled call, memory reuse after a finite linger window, an inner `Clone` re-entering
//! the registry with retries and wait limits, `Buffer` above with `ConcurrencyLimit` and
//! `Timeout` below. No sleep decides anything: paused clocks, hand polling, counters.

mod support;

use std::convert::Infallible;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::time::Duration;

use support::{poll, Boom};
use tower_coalesce::{CoalesceLayer, Group, GroupBuilder, OnTimeout, Run, Stats};

type R = Result<u32, &'static str>;

// ---------------------------------------------------------------------------------------------
// Live bytes allocated by this thread (tests run on threads of their own: no cross-talk)
// ---------------------------------------------------------------------------------------------

struct Counting;

thread_local! {
    static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

fn adjust(by: isize) {
    let _ = LIVE.try_with(|c| c.set(c.get() + by));
}

fn live_bytes() -> isize {
    LIVE.with(|c| c.get())
}

// SAFETY: every call is forwarded to `System`; the counter is a const thread-local.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            adjust(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(p, layout) };
        adjust(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let q = unsafe { std::alloc::System.realloc(p, layout, new) };
        if !q.is_null() {
            adjust(new as isize - layout.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn poll_with<F: std::future::Future + Unpin>(f: &mut F, waker: &Waker) -> Poll<F::Output> {
    std::pin::Pin::new(f).poll(&mut Context::from_waker(waker))
}

// ---------------------------------------------------------------------------------------------
// A waker whose `clone` is user code: armed, it panics (or runs a hook)
// ---------------------------------------------------------------------------------------------

struct CloneHook {
    panic_on_clone: AtomicBool,
    hook: Mutex<Option<Box<dyn Fn() + Send>>>,
    clones: AtomicUsize,
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(hook_clone, hook_noop, hook_noop, hook_drop);

fn hook_clone(p: *const ()) -> RawWaker {
    // SAFETY: `p` is an `Arc<CloneHook>` made by `hook_waker`.
    let arc = unsafe { Arc::from_raw(p as *const CloneHook) };
    arc.clones.fetch_add(1, SeqCst);
    let panic = arc.panic_on_clone.load(SeqCst);
    let hook = arc.hook.lock().unwrap().take();
    let again = Arc::clone(&arc);
    std::mem::forget(arc);
    if let Some(hook) = hook {
        hook();
    }
    if panic {
        drop(again);
        panic!("waker clone panicked");
    }
    RawWaker::new(Arc::into_raw(again) as *const (), &VTABLE)
}

fn hook_noop(_: *const ()) {}

fn hook_drop(p: *const ()) {
    // SAFETY: as in `hook_clone`.
    drop(unsafe { Arc::from_raw(p as *const CloneHook) });
}

fn hook_waker(state: &Arc<CloneHook>) -> Waker {
    let raw = RawWaker::new(Arc::into_raw(Arc::clone(state)) as *const (), &VTABLE);
    // SAFETY: the vtable upholds the `RawWaker` contract (no-op wake, Arc-counted data).
    unsafe { Waker::from_raw(raw) }
}

fn clone_hook() -> Arc<CloneHook> {
    Arc::new(CloneHook {
        panic_on_clone: AtomicBool::new(false),
        hook: Mutex::new(None),
        clones: AtomicUsize::new(0),
    })
}

/// Runs `f` on a thread of its own with a short watchdog: a deadlock fails the test.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("{what}: deadlock (no progress in {secs} s)"),
    }
}

/// The adopter of a failed call (its leader left) re-parks to let a maker retry; if the
/// waker it was polled with panics when cloned there, the call's output is already gone and
/// the flight must still end for the others (retry, or the failure), and the key be freed.
#[test]
fn panicking_waker_clone_in_an_adopters_rejoin_strands_nobody() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let (tx, rx) = tokio::sync::oneshot::channel::<R>();
    let mut leader = group.run_result(1, move || async move { rx.await.unwrap() });
    assert!(poll(&mut leader).is_pending());
    // The adopter keeps no `make` (run_result); the maker can retry.
    let mut adopter = group.run_result(1, || async { Ok::<u32, &str>(99) });
    let mut maker = group.run_retryable(1, || async { Ok::<u32, &str>(7) });
    assert!(poll(&mut adopter).is_pending());
    assert!(poll(&mut maker).is_pending());
    drop(leader);
    tx.send(Err("down")).unwrap();
    let hook = clone_hook();
    hook.panic_on_clone.store(true, SeqCst);
    let waker = hook_waker(&hook);
    let polled = catch_unwind(AssertUnwindSafe(|| poll_with(&mut adopter, &waker)));
    drop(adopter);
    // Whatever the adopter's poll did, the maker must get an answer and the key come free.
    let mut got = None;
    for _ in 0..16 {
        if let Poll::Ready(out) = poll(&mut maker) {
            got = Some(out);
            break;
        }
    }
    let _ = polled;
    assert!(got.is_some(), "the maker was stranded: {:?}", group.stats());
    assert_eq!(group.in_flight(), 0, "{:?}", group.stats());
    let mut next = group.run_result(1, || async { Ok::<u32, &str>(3) });
    assert!(
        matches!(poll(&mut next), Poll::Ready(Ok(Ok(3)))),
        "the key is usable again"
    );
}

/// The same for a new flight that waits at the gate of its key's cancelled call (its future
/// still being dropped): its waker is cloned under the shard's lock, so a clone that reads the
/// registry's counters (`in_flight()`, `stats()`) deadlocks.
#[test]
fn waker_clone_of_a_gated_flight_may_read_the_registry() {
    within(10, "waker clone at the gate", || {
        gated_flight_polled_from_the_old_calls_drop(true)
    });
}

/// Pin: the scenario above with a plain waker (the new flight waits at the gate, then runs).
#[test]
fn a_flight_started_from_its_cancelled_predecessors_drop_waits_then_runs() {
    within(10, "gate", || {
        gated_flight_polled_from_the_old_calls_drop(false)
    });
}

fn gated_flight_polled_from_the_old_calls_drop(reenter: bool) {
    let group: Group<u32> = Group::new();
    // The old call's future starts and polls the key's new flight from its destructor, while
    // it is being dropped (the entry is cancelling): the new flight is gated.
    struct OnDrop(Option<Box<dyn FnOnce() + Send>>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    let g = group.clone();
    let gated_polled = Arc::new(AtomicBool::new(false));
    let gp = gated_polled.clone();
    let newer: Arc<Mutex<Option<Run<u32, u32>>>> = Arc::default();
    let keep = newer.clone();
    let guard = OnDrop(Some(Box::new(move || {
        let mut next = g.run(1, || async { 2u32 });
        let hook = clone_hook();
        let g2 = g.clone();
        if reenter {
            *hook.hook.lock().unwrap() = Some(Box::new(move || {
                let _ = g2.in_flight();
            }));
        }
        let waker = hook_waker(&hook);
        assert!(poll_with(&mut next, &waker).is_pending(), "gated");
        assert!(hook.clones.load(SeqCst) >= 1, "its waker was kept");
        gp.store(true, SeqCst);
        *keep.lock().unwrap() = Some(next);
    })));
    let mut old = group.run(1, move || async move {
        let _guard = guard;
        std::future::pending::<u32>().await
    });
    assert!(poll(&mut old).is_pending());
    drop(old);
    assert!(gated_polled.load(SeqCst));
    let mut next = newer.lock().unwrap().take().unwrap();
    assert!(matches!(poll(&mut next), Poll::Ready(Ok(2))));
    assert_eq!((group.in_flight(), group.len()), (0, 0));
    let s = group.stats();
    assert_eq!((s.leaders, s.cancelled), (2, 1), "{s:?}");
}

/// Pin: a waker whose clone panics while a plain follower parks (or a gated flight waits)
/// loses nothing; the panic is the poller's, and the flight ends for everybody.
#[test]
fn panicking_waker_clone_while_parking_loses_nothing() {
    let group: Group<u32> = Group::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
    let mut leader = group.run(1, move || async move { rx.await.unwrap() });
    assert!(poll(&mut leader).is_pending());
    let mut follower = group.run(1, || async { 0u32 });
    let hook = clone_hook();
    hook.panic_on_clone.store(true, SeqCst);
    let waker = hook_waker(&hook);
    assert!(catch_unwind(AssertUnwindSafe(|| poll_with(&mut follower, &waker))).is_err());
    assert!(poll(&mut follower).is_pending());
    tx.send(4).unwrap();
    assert!(matches!(poll(&mut leader), Poll::Ready(Ok(4))));
    assert!(matches!(poll(&mut follower), Poll::Ready(Ok(4))));
    assert_eq!((group.in_flight(), group.len()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Every option at once, on worker threads: counters never go backwards, add up, and empty
// ---------------------------------------------------------------------------------------------

fn assert_no_counter_went_back(before: &Stats, after: &Stats) {
    for ((name, a), (_, b)) in before.fields().zip(after.fields()) {
        if name != "in_flight" {
            assert!(
                b >= a,
                "{name} went back from {a} to {b}: {before:?} -> {after:?}"
            );
        }
    }
}

type StormLayer = CoalesceLayer<fn(&(u8, u8, u16)) -> Option<u8>, u8>;

async fn storm(layer: StormLayer, seed: u64) {
    use rand::{Rng, SeedableRng};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |(_, how, work): (u8, u8, u16)| {
        c.fetch_add(1, SeqCst);
        async move {
            for _ in 0..work {
                tokio::task::yield_now().await;
            }
            match how {
                0 => Err(Boom("down")),
                1 => panic!("backend panicked"),
                _ => Ok(u32::from(how)),
            }
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(inner);
    let group = layer.group().clone();
    // An observer on a thread of its own: no counter ever goes back.
    let stop = Arc::new(AtomicBool::new(false));
    let observer = {
        let (group, stop) = (group.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = group.stats();
            let mut n = 0u64;
            while !stop.load(SeqCst) {
                let now = group.stats();
                assert_no_counter_went_back(&last, &now);
                assert_eq!(
                    now.fell_through,
                    now.over_capacity + now.timed_out + now.released
                );
                last = now;
                n += 1;
                std::thread::yield_now();
            }
            n
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tasks = Vec::new();
    const N: u64 = 3_000;
    for i in 0..N {
        let key: u8 = if rng.random_ratio(1, 20) {
            255
        } else {
            rng.random_range(0..6)
        };
        let how: u8 = match rng.random_range(0..10) {
            0 | 1 => 0,
            2 => 1,
            n => n,
        };
        // A bypassed request's panic is its caller's, untouched: none here.
        let how = if key == 255 && how == 1 { 7 } else { how };
        let work: u16 = rng.random_range(0..40);
        let give_up: Option<u64> = rng.random_ratio(1, 4).then(|| rng.random_range(0..300));
        let forget = rng.random_ratio(1, 30);
        let mut svc = svc.clone();
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            if forget {
                group.forget(&key);
            }
            use tower::Service;
            let fut = svc.call((key, how, work));
            match give_up {
                Some(us) => {
                    let _ = tokio::time::timeout(Duration::from_micros(us), fut).await;
                }
                None => {
                    let _ = fut.await;
                }
            }
        }));
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for t in tasks {
        t.await.expect("no caller panics");
    }
    // Detached calls may still run: bounded wait for them.
    for _ in 0..200_000 {
        if group.in_flight() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    stop.store(true, SeqCst);
    let snapshots = observer.join().expect("counters never went back");
    assert!(snapshots > 0);
    let s = group.stats();
    assert_eq!(s.in_flight, 0, "{s:?}");
    support::check_sum(&s, N);
    support::check_calls_end_once(&s);
    let started = calls.load(SeqCst) as u64;
    assert!(
        started <= s.leaders + s.over_capacity + s.timed_out + s.bypassed,
        "{started} inner calls: {s:?}"
    );
    for k in 0..6u8 {
        group.forget(&k);
    }
    assert_eq!(group.len(), 0, "{s:?}");
    assert_eq!(group.in_flight(), 0);
}

fn key_of(r: &(u8, u8, u16)) -> Option<u8> {
    (r.0 != 255).then_some(r.0)
}

#[test]
fn storm_of_every_option_on_worker_threads_adds_up_and_never_goes_back() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for seed in 0..2u64 {
        for variant in 0..3 {
            let base = CoalesceLayer::new(key_of as fn(&(u8, u8, u16)) -> Option<u8>);
            let layer = match variant {
                0 => base
                    .linger(Duration::from_micros(50))
                    .linger_errors(Duration::from_micros(20))
                    .retry_failed(1)
                    .max_in_flight(4)
                    .max_followers(3)
                    .follower_timeout(Duration::from_micros(150)),
                1 => base
                    .detached(true)
                    .retry_failed(2)
                    .max_followers(2)
                    .follower_timeout(Duration::from_micros(100))
                    .on_follower_timeout(OnTimeout::Error),
                _ => base
                    .detached(true)
                    .linger(Duration::from_micros(30))
                    .max_in_flight(2)
                    .retry_failed(1),
            };
            rt.block_on(storm(layer, seed * 10 + variant));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// linger + forget: memory stays bounded
// ---------------------------------------------------------------------------------------------

/// `linger(Duration::MAX)` lasts "for ever, in practice, until `Group::forget` drops it", and
/// "memory stays bounded". A cache-invalidation loop (fill, linger, forget on write) over one
/// key must then hold a constant amount of memory, whatever the number of cycles.
#[test]
fn linger_for_ever_with_forget_on_write_holds_constant_memory() {
    let group: Group<u64> = GroupBuilder::new().linger(Duration::MAX).build();
    let cycle = |i: u32| {
        let mut run = group.run(7, move || async move { i });
        assert!(matches!(poll(&mut run), Poll::Ready(Ok(v)) if v == i));
        drop(run);
        assert!(group.forget(&7), "the lingering output is dropped");
    };
    for i in 0..1_000 {
        cycle(i);
    }
    let before = live_bytes();
    for i in 0..50_000 {
        cycle(i);
    }
    let grown = live_bytes() - before;
    assert_eq!((group.len(), group.in_flight()), (0, 0));
    assert!(
        grown < 64 * 1024,
        "{grown} bytes still held after 50 000 fill/forget cycles of one key"
    );
}

/// The same with a finite window: records of forgotten outputs stay only until their window
/// ends; once purged, their room is reused, so a second round of as many cycles holds no more.
#[tokio::test(start_paused = true)]
async fn linger_with_forget_memory_is_reused_after_the_window() {
    let group: Group<u64> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
    let round = |group: Group<u64>| async move {
        for i in 0..5_000u32 {
            let v = group.run(7, move || async move { i }).await.unwrap();
            assert_eq!(v, i);
            assert!(group.forget(&7));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        group.purge_expired();
    };
    round(group.clone()).await;
    let before = live_bytes();
    round(group.clone()).await;
    let grown = live_bytes() - before;
    assert!(grown < 16 * 1024, "{grown} bytes more after a second round");
    assert_eq!(group.len(), 0);
}

// ---------------------------------------------------------------------------------------------
// A waiter dropped while its task unwinds: a panic passed on from another's waker aborts
// ---------------------------------------------------------------------------------------------

/// A waker that panics when woken.
struct Exploding;

impl std::task::Wake for Exploding {
    fn wake(self: Arc<Self>) {
        panic!("follower's waker exploded");
    }
}

/// Runs the test `name` of this binary in a child process (where an abort cannot take the
/// whole test run down) and returns whether it passed.
fn in_child(name: &str) -> (bool, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--include-ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("S9_CHILD", "1")
        .output()
        .expect("child ran");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), format!("{:?}: {text}", out.status))
}

/// A leader's task panics (its `Run` is dropped during the unwind): the call is handed to a
/// follower, whose waker panics. The crate catches that and passes it on from `Drop` with
/// `resume_unwind`; during an unwind that is a panic in a destructor, and the process aborts.
/// Contract 5: panics are contained; one task's panic plus another's waker must not kill the
/// process (`std::thread::panicking()` could decide to drop the waker's panic instead).
#[test]
fn a_waiter_dropped_by_an_unwinding_task_does_not_abort_the_process() {
    let (passed, out) = in_child("child_waiter_dropped_by_an_unwinding_task");
    assert!(passed, "the child aborted: {out}");
}

#[test]
fn child_waiter_dropped_by_an_unwinding_task() {
    if std::env::var_os("S9_CHILD").is_none() {
        return; // Run only as the child of the test above.
    }
    let group: Group<u32> = Group::new();
    let mut leader = group.run(1, std::future::pending::<u32>);
    assert!(poll(&mut leader).is_pending());
    let mut follower = group.run(1, || async { 0u32 });
    let bomb = Waker::from(Arc::new(Exploding));
    assert!(poll_with(&mut follower, &bomb).is_pending());
    let unwound = catch_unwind(AssertUnwindSafe(move || {
        let _held = leader;
        panic!("the leader's task failed");
    }));
    assert!(unwound.is_err());
    // The follower took nothing from that: it drives the call now.
    assert!(poll(&mut follower).is_pending());
    assert_eq!(group.in_flight(), 1);
    drop(follower);
    assert_eq!((group.in_flight(), group.len()), (0, 0));
}

/// Pin (no unwind in progress): the waker's panic reaches the dropper, after the call was
/// handed on, and nothing is stranded.
#[test]
fn a_followers_panicking_waker_reaches_the_dropping_leader_and_strands_nobody() {
    let group: Group<u32> = Group::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
    let mut leader = group.run(1, move || async move { rx.await.unwrap() });
    assert!(poll(&mut leader).is_pending());
    let mut follower = group.run(1, || async { 0u32 });
    let bomb = Waker::from(Arc::new(Exploding));
    assert!(poll_with(&mut follower, &bomb).is_pending());
    let dropped = catch_unwind(AssertUnwindSafe(move || drop(leader)));
    assert!(
        dropped.is_err(),
        "the waker's panic is passed on to the dropper"
    );
    tx.send(3).unwrap();
    assert!(matches!(poll(&mut follower), Poll::Ready(Ok(3))));
    assert_eq!((group.in_flight(), group.len()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Pins: tower stacks with options; user code re-entering the registry
// ---------------------------------------------------------------------------------------------

/// An inner service whose `Clone` reads the registry and forgets another key, cloned on
/// every path (`call` with and without kept `make`s, a bypass, a retry).
#[derive(Clone)]
struct Reentrant {
    group: Arc<Mutex<Option<Group<u8>>>>,
    calls: Arc<AtomicUsize>,
    clones_seen: Arc<AtomicUsize>,
}

struct ReentrantClone(Reentrant);

impl Clone for ReentrantClone {
    fn clone(&self) -> Self {
        if let Some(group) = self.0.group.lock().unwrap().clone() {
            let _ = (group.stats(), group.in_flight(), group.len());
            group.forget(&200);
            self.0.clones_seen.fetch_add(1, SeqCst);
        }
        ReentrantClone(self.0.clone())
    }
}

impl tower::Service<u8> for ReentrantClone {
    type Response = u8;
    type Error = Boom;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u8, Boom>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, k: u8) -> Self::Future {
        let n = self.0.calls.fetch_add(1, SeqCst);
        Box::pin(async move {
            tokio::task::yield_now().await;
            // The first call fails: its followers retry.
            if n == 0 {
                Err(Boom("first"))
            } else {
                Ok(k)
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn inner_clone_reentering_the_registry_on_every_path_with_retry_and_timeout() {
    use tower::{Service, ServiceExt};
    use tower_layer::Layer as _;
    let inner = Reentrant {
        group: Arc::default(),
        calls: Arc::default(),
        clones_seen: Arc::default(),
    };
    let layer = CoalesceLayer::new(|k: &u8| (*k != 0).then_some(*k))
        .retry_failed(1)
        .follower_timeout(Duration::from_secs(5));
    *inner.group.lock().unwrap() = Some(layer.group().clone());
    let svc = layer.layer(ReentrantClone(inner.clone()));
    let mut calls = Vec::new();
    for _ in 0..4 {
        calls.push(svc.clone().oneshot(7));
    }
    calls.push(svc.clone().oneshot(0));
    let outs = futures::future::join_all(calls).await;
    assert!(
        outs[0]
            .as_ref()
            .unwrap_err()
            .downcast_ref::<Boom>()
            .is_some(),
        "leader's own error"
    );
    for out in &outs[1..4] {
        assert_eq!(*out.as_ref().unwrap(), 7, "the followers share the retry");
    }
    assert_eq!(*outs[4].as_ref().unwrap(), 0, "bypass");
    assert!(inner.clones_seen.load(SeqCst) >= 5);
    assert_eq!(
        inner.calls.load(SeqCst),
        3,
        "the first call, one retry, one bypass"
    );
    let s = svc.stats();
    assert_eq!(
        (s.leaders, s.retried, s.errors, s.followers, s.bypassed),
        (2, 1, 1, 3, 1),
        "{s:?}"
    );
    assert_eq!((s.in_flight, svc.group().len()), (0, 0));
    let mut svc = svc;
    assert_eq!(
        svc.ready().await.unwrap().call(7).await.unwrap(),
        7,
        "no stale join"
    );
}

/// `Buffer` above and `ConcurrencyLimit(1)` + `Timeout` below, with a follower wait limit
/// (error) shorter than the backend: the followers time out with `is_timeout`, the leader
/// gets the backend's answer, the permit is given back, counters add up.
#[tokio::test(start_paused = true)]
async fn buffer_above_limit_and_timeout_below_with_follower_error_timeouts() {
    use tower::{ServiceBuilder, ServiceExt};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let backend = tower::service_fn(move |k: u8| {
        c.fetch_add(1, SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, Infallible>(k)
        }
    });
    let layer = CoalesceLayer::new(|k: &u8| Some(*k))
        .follower_timeout(Duration::from_secs(1))
        .on_follower_timeout(OnTimeout::Error);
    let group = layer.group().clone();
    let svc = ServiceBuilder::new()
        .buffer(8)
        .layer(layer)
        .concurrency_limit(1)
        .timeout(Duration::from_secs(3))
        .service(backend);
    let outs = futures::future::join_all((0..4).map(|_| svc.clone().oneshot(9))).await;
    assert_eq!(*outs[0].as_ref().unwrap(), 9);
    for out in &outs[1..] {
        let err = out.as_ref().unwrap_err();
        let err = err
            .downcast_ref::<tower_coalesce::CoalesceError>()
            .expect("the layer's error through Buffer's BoxError");
        assert!(err.is_timeout(), "{err}");
    }
    assert_eq!(calls.load(SeqCst), 1);
    let s = group.stats();
    assert_eq!(
        (s.leaders, s.followers, s.timed_out, s.fell_through),
        (1, 3, 3, 3),
        "{s:?}"
    );
    assert_eq!(s.in_flight, 0);
    // The permit came back: the next call goes through at once after the backend's time.
    assert_eq!(svc.clone().oneshot(9).await.unwrap(), 9);
    assert_eq!(calls.load(SeqCst), 2);
}
