//! Publishing an output to followers: every follower served once through heap batches (large
//! outputs) with clones that panic or followers that leave mid-publish; how much stack the
//! copying paths take for an output returned by value (a 64 KiB and an 80 KiB output with
//! followers on a 2 MiB stack, in a debug build); which outputs publish with no allocation;
//! and the HTTP layer's counters (`Stats` and `metrics`) for bypasses and released followers.
//!
//! Deterministic: waiters are polled by hand with counting wakers, inner calls wait on gates,
//! and every wait that could hang is bounded.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tower_coalesce::{Group, GroupBuilder, Run};

/// Real-time bound for work done on a thread of its own.
const REAL_LIMIT: Duration = Duration::from_secs(20);

/// Runs `f` on a thread with a `stack`-byte stack; fails if it panics or hangs.
fn on_thread<T: Send + 'static>(stack: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .stack_size(stack)
        .spawn(move || {
            let _ = tx.send(f());
        })
        .unwrap();
    rx.recv_timeout(REAL_LIMIT).expect("hung or panicked")
}

struct CountWaker(AtomicUsize);

impl Wake for CountWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

fn counting() -> (Arc<CountWaker>, Waker) {
    let w = Arc::new(CountWaker(AtomicUsize::new(0)));
    (w.clone(), Waker::from(w))
}

fn poll<F: Future + Unpin>(f: &mut F, waker: &Waker) -> Poll<F::Output> {
    let d = depth();
    IN_HELPER.with(|c| c.set(c.get().max(d)));
    Pin::new(f).poll(&mut Context::from_waker(waker))
}

/// A future that is pending until `gate` is set, then yields `make()`.
fn gated<T>(gate: Arc<AtomicUsize>, make: impl Fn() -> T) -> impl Future<Output = T> {
    std::future::poll_fn(move |_| {
        if gate.load(SeqCst) == 0 {
            Poll::Pending
        } else {
            Poll::Ready(make())
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Live-instance accounting for outputs
// ---------------------------------------------------------------------------------------------

/// Instances alive of `Tracked` per test (each test has its own counters).
#[derive(Default)]
struct Ledger {
    live: AtomicIsize,
    clones: AtomicUsize,
    /// Panic in the clone with this 1-based number (0: never).
    panic_at: AtomicUsize,
    /// Followers to drop from inside the clone with this 1-based number.
    drop_at: AtomicUsize,
    victims: Mutex<Vec<Run<u8, Tracked>>>,
}

/// An output of some 200 bytes (so its batches of copies go on the heap) that counts itself.
struct Tracked {
    ledger: Arc<Ledger>,
    value: u32,
    _pad: [u8; 200],
}

impl Tracked {
    fn new(ledger: &Arc<Ledger>, value: u32) -> Self {
        ledger.live.fetch_add(1, SeqCst);
        Tracked {
            ledger: ledger.clone(),
            value,
            _pad: [0; 200],
        }
    }
}

impl Clone for Tracked {
    fn clone(&self) -> Self {
        let n = self.ledger.clones.fetch_add(1, SeqCst) + 1;
        if n == self.ledger.drop_at.load(SeqCst) {
            // User code run during publish drops other followers (no lock may be held).
            let victims = std::mem::take(&mut *self.ledger.victims.lock().unwrap());
            drop(victims);
        }
        if n == self.ledger.panic_at.load(SeqCst) {
            panic!("clone {n} panics");
        }
        Tracked::new(&self.ledger, self.value)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.ledger.live.fetch_sub(1, SeqCst);
    }
}

/// A publish to `followers` followers of a `Tracked` output (heap batches), with `victims`
/// of them dropped from inside the `drop_at`-th clone, and the `panic_at`-th clone panicking.
/// Checks every remaining follower is woken once and gets one answer, and no copy leaks.
fn publish_scenario(followers: usize, victims: usize, drop_at: usize, panic_at: usize) {
    let ledger = Arc::new(Ledger::default());
    ledger.drop_at.store(drop_at, SeqCst);
    ledger.panic_at.store(panic_at, SeqCst);
    let group: Group<u8> = Group::new();
    let gate = Arc::new(AtomicUsize::new(0));
    let (l, g) = (ledger.clone(), gate.clone());
    let mut leader = group.run(1, move || gated(g, move || Tracked::new(&l, 7)));
    let mut waiters = Vec::new();
    for _ in 0..followers {
        let mut run = group.run(1, || async { unreachable!("a follower's make") });
        assert!(!run.is_leader());
        let (count, waker) = counting();
        assert!(poll(&mut run, &waker).is_pending());
        waiters.push((run, count, waker));
    }
    // The victims are followers spread over the batches.
    let step = (followers / victims.max(1)).max(1);
    let mut kept = Vec::new();
    for (i, w) in waiters.into_iter().enumerate() {
        if i % step == step - 1 && ledger.victims.lock().unwrap().len() < victims {
            ledger.victims.lock().unwrap().push(w.0);
        } else {
            kept.push(w);
        }
    }
    let (_, lw) = counting();
    assert!(poll(&mut leader, &lw).is_pending());
    gate.store(1, SeqCst);
    let mine = match poll(&mut leader, &lw) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the leader's call is ready"),
    };
    assert_eq!(mine.as_ref().ok().map(|t| t.value), Some(7));
    drop(mine);
    let mut answers = 0;
    for (mut run, count, waker) in kept {
        assert_eq!(
            count.0.load(SeqCst),
            1,
            "each follower is woken exactly once"
        );
        match poll(&mut run, &waker) {
            Poll::Ready(Ok(t)) => assert_eq!(t.value, 7),
            Poll::Ready(Err(p)) => assert!(p.message().contains("panics"), "{p:?}"),
            Poll::Pending => panic!("a woken follower has its answer"),
        }
        answers += 1;
    }
    assert!(ledger.victims.lock().unwrap().is_empty() || drop_at == 0);
    drop(std::mem::take(&mut *ledger.victims.lock().unwrap()));
    assert_eq!(answers, followers - victims.min(followers));
    assert_eq!(
        ledger.live.load(SeqCst),
        0,
        "a copy leaked or was dropped twice"
    );
    assert_eq!((group.in_flight(), group.len()), (0, 0));
}

#[test]
fn heap_batches_serve_every_follower_once() {
    on_thread(8 << 20, || publish_scenario(75, 0, 0, 0));
}

#[test]
fn heap_batches_followers_leaving_mid_publish_leak_nothing() {
    // Followers of later batches leave from inside a clone of the first batch.
    on_thread(8 << 20, || publish_scenario(75, 10, 3, 0));
    // ... and from inside a clone of the second batch.
    on_thread(8 << 20, || publish_scenario(75, 10, 40, 0));
}

#[test]
fn heap_batches_clone_panic_reaches_everyone() {
    on_thread(8 << 20, || publish_scenario(75, 0, 0, 5));
    on_thread(8 << 20, || publish_scenario(75, 0, 0, 40));
    on_thread(8 << 20, || publish_scenario(75, 10, 3, 40));
}

// ---------------------------------------------------------------------------------------------
// Stack used along publish by a large output returned by value
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// The stack address at the top of the probing thread.
    static TOP: Cell<usize> = const { Cell::new(0) };
    /// The deepest stack depth seen in the inner future's poll and in the output's `Clone`.
    static IN_POLL: Cell<usize> = const { Cell::new(0) };
    static IN_CLONE: Cell<usize> = const { Cell::new(0) };
}

#[inline(never)]
fn depth() -> usize {
    let here = 0u8;
    let at = std::hint::black_box(&here) as *const u8 as usize;
    TOP.with(Cell::get).wrapping_sub(at)
}

const BIG: usize = 32 * 1024;

/// A 32 KiB output returned by value, whose `Clone` records how deep the stack is.
struct Big([u8; BIG]);

impl Clone for Big {
    fn clone(&self) -> Self {
        let d = depth();
        IN_CLONE.with(|c| c.set(c.get().max(d)));
        Big(self.0)
    }
}

thread_local! {
    static IN_HELPER: Cell<usize> = const { Cell::new(0) };
    static IN_EQ: Cell<usize> = const { Cell::new(0) };
}

/// A key whose `Eq` (run by a joining caller inside `run`) records how deep the stack is.
struct ProbeKey(u8);

impl std::hash::Hash for ProbeKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for ProbeKey {
    fn eq(&self, other: &Self) -> bool {
        let d = depth();
        IN_EQ.with(|c| c.set(c.get().max(d)));
        self.0 == other.0
    }
}

impl Eq for ProbeKey {}

/// Runs `f` and returns the deepest stack seen (in outputs) in the inner poll, a clone, a
/// key comparison.
fn probe_paths(f: impl FnOnce()) -> (f64, f64, f64) {
    TOP.with(|t| t.set(0));
    let top = depth().wrapping_neg();
    TOP.with(|t| t.set(top));
    for c in [&IN_POLL, &IN_CLONE, &IN_EQ, &IN_HELPER] {
        c.with(|c| c.set(0));
    }
    f();
    let base = IN_HELPER.with(Cell::get);
    let get = |c: &'static std::thread::LocalKey<Cell<usize>>| {
        c.with(Cell::get).saturating_sub(base) as f64 / BIG as f64
    };
    (get(&IN_POLL), get(&IN_CLONE), get(&IN_EQ))
}

fn big_call() -> impl Future<Output = Big> {
    std::future::poll_fn(|_| {
        let d = depth();
        IN_POLL.with(|c| c.set(c.get().max(d)));
        Poll::Ready(Big([3; BIG]))
    })
}

fn big_fail() -> impl Future<Output = Result<u8, Big>> {
    std::future::poll_fn(|_| {
        let d = depth();
        IN_POLL.with(|c| c.set(c.get().max(d)));
        Poll::Ready(Err(Big([4; BIG])))
    })
}

/// Deepest stack (in 32 KiB outputs, below the test's `poll` call) in the inner poll, a clone
/// and a key comparison, for each path that copies an output.
fn stack_paths() -> Vec<(&'static str, (f64, f64, f64))> {
    on_thread(64 << 20, || {
        let mut lines = Vec::new();
        let (_, w) = counting();
        lines.push((
            "publish to a follower",
            probe_paths(|| {
                let group: Group<ProbeKey> = Group::new();
                let mut leader = group.run(ProbeKey(1), big_call);
                let mut follower = group.run(ProbeKey(1), big_call);
                assert!(poll(&mut follower, &w).is_pending());
                assert!(matches!(poll(&mut leader, &w), Poll::Ready(Ok(_))));
                assert!(matches!(poll(&mut follower, &w), Poll::Ready(Ok(_))));
            }),
        ));
        lines.push((
            "linger copy, then a lingering hit",
            probe_paths(|| {
                let group: Group<ProbeKey> =
                    GroupBuilder::new().linger(Duration::from_secs(60)).build();
                let mut leader = group.run(ProbeKey(1), big_call);
                assert!(matches!(poll(&mut leader, &w), Poll::Ready(Ok(_))));
                let mut hit = group.run(ProbeKey(1), big_call);
                assert!(matches!(poll(&mut hit, &w), Poll::Ready(Ok(_))));
            }),
        ));
        lines.push((
            "retry: spare copy, then publish",
            probe_paths(|| {
                let group: Group<ProbeKey> = GroupBuilder::new().retry_failed(1).build();
                let mut leader = group.run_retryable(ProbeKey(1), big_fail);
                let mut follower = group.run_retryable(ProbeKey(1), big_fail);
                assert!(poll(&mut follower, &w).is_pending());
                assert!(matches!(poll(&mut leader, &w), Poll::Ready(Ok(Err(_)))));
                assert!(matches!(poll(&mut follower, &w), Poll::Ready(Ok(Err(_)))));
            }),
        ));
        lines.push((
            "failure published from a leaving follower's drop",
            probe_paths(|| {
                let group: Group<ProbeKey> = GroupBuilder::new().retry_failed(1).build();
                let mut leader = group.run_retryable(ProbeKey(1), big_fail);
                let maker = group.run_retryable(ProbeKey(1), big_fail);
                let mut plain = group.run_result(ProbeKey(1), big_fail);
                assert!(poll(&mut plain, &w).is_pending());
                assert!(matches!(poll(&mut leader, &w), Poll::Ready(Ok(Err(_)))));
                drop(maker);
                assert!(matches!(poll(&mut plain, &w), Poll::Ready(Ok(Err(_)))));
            }),
        ));
        lines.push((
            "a boxed call polled in catch_unwind (no Run)",
            probe_paths(|| {
                let mut call: Pin<Box<dyn Future<Output = Big> + Send>> = Box::pin(big_call());
                let mut wrapper = std::future::poll_fn(move |cx| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        call.as_mut().poll(cx)
                    }))
                    .unwrap()
                });
                assert!(matches!(poll(&mut wrapper, &w), Poll::Ready(_)));
            }),
        ));
        lines.push((
            "futures::Shared (baseline)",
            probe_paths(|| {
                use futures::FutureExt;
                let shared = big_call().boxed().shared();
                let mut a = shared.clone();
                let mut b = shared;
                assert!(matches!(poll(&mut a, &w), Poll::Ready(_)));
                assert!(matches!(poll(&mut b, &w), Poll::Ready(_)));
            }),
        ));
        for (what, (p, c, e)) in &lines {
            eprintln!("{what:50} poll {p:6.2} clone {c:6.2} key-eq {e:6.2}  (32 KiB outputs)");
        }
        lines
    })
}

/// Every path that copies an output (publish, linger, retry, a failure published by a leaving
/// follower) adds a few outputs of stack below the driver's poll of its inner future (measured
/// at most 2.1; there were 25 to 55 when a batch of copies lived on the stack). The bound
/// leaves room for another compiler's debug frames and still catches that regression.
#[test]
fn copying_paths_add_little_stack_below_the_driver_poll() {
    for (what, (p, c, _)) in stack_paths().into_iter().take(4) {
        assert!(c - p <= 8.0, "{what}: poll {p:.2}, clone {c:.2} outputs");
    }
}

/// A debug build keeps a slot for every value of a function in its frame, however the paths
/// run: `Run::poll` once kept a dozen output-sized slots (every role's moved outputs), all on
/// the stack while the driver published. Each role is now polled by a function of its own; the
/// driver's inner poll runs about 6 outputs deeper than a boxed call polled inside
/// `catch_unwind` with no `Run` (measured 15.05 against 9.02; `futures::future::Shared`: 8;
/// 22 before). The bound leaves room for another compiler's debug frames.
#[test]
fn the_driver_poll_frame_holds_few_copies_of_the_output() {
    let paths = stack_paths();
    let (ours, _, _) = paths[0].1;
    let (bare, _, _) = paths[4].1;
    assert!(
        ours <= bare + 10.0,
        "the driver's inner poll runs {ours:.2} outputs deep, a bare catch_unwind poll {bare:.2}"
    );
}

/// Joining a flight runs `run_classified`, whose frame holds four output-sized slots in a
/// debug build (the lingering hit's copy and its `Box::new` argument, and a `Slot::Parked`
/// temporary, which is as large as the output, for each of two inserts), on every call.
#[test]
fn report_the_join_frame() {
    let paths = stack_paths();
    let (_, _, eq) = paths[0].1;
    eprintln!("a joining caller's key comparison runs {eq:.2} outputs deep");
    assert!(eq < 10.0);
}

// ---------------------------------------------------------------------------------------------
// Large outputs on a default (2 MiB) stack, in a child process
// ---------------------------------------------------------------------------------------------

/// Runs `body` in a child process (this test binary, filtered to `test`), so that a stack
/// overflow (an abort) fails only this test.
fn in_child_process(test: &str, body: impl FnOnce()) {
    const CHILD: &str = "TOWER_COALESCE_PUBLISH_CHILD";
    if std::env::var(CHILD).as_deref() == Ok(test) {
        body();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--include-ignored", "--test-threads=1"])
        .env(CHILD, test)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child process failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

#[derive(Clone)]
struct Blob<const N: usize>([u8; N]);

/// `N`-byte outputs returned by value, shared by a leader and three followers polled by
/// `futures`' `block_on` on a thread with a 2 MiB stack (Rust's and tokio's default).
fn share_on_default_stack<const N: usize>(shared: bool) {
    use futures::future::join_all;
    use futures::FutureExt;
    let work = move || {
        if shared {
            let call = async { Blob([7u8; N]) }.boxed().shared();
            let outs = futures::executor::block_on(join_all((0..4).map(|_| call.clone())));
            assert!(outs.iter().all(|o| o.0[N - 1] == 7));
        } else {
            let group: Group<u8> = Group::new();
            let waiters: Vec<_> = (0..4)
                .map(|_| group.run(1, || async { Blob([7u8; N]) }))
                .collect();
            let outs = futures::executor::block_on(join_all(waiters));
            assert!(outs.iter().all(|o| o.as_ref().unwrap().0[N - 1] == 7));
        }
    };
    on_thread(2 << 20, work);
}

/// Baseline: `futures::future::Shared` shares a 96 KiB output on a 2 MiB stack.
#[test]
fn shared_baseline_96k_output_fits_a_default_stack() {
    in_child_process("shared_baseline_96k_output_fits_a_default_stack", || {
        share_on_default_stack::<{ 96 << 10 }>(true)
    });
}

/// A 64 KiB output with followers fits a 2 MiB stack (debug).
#[test]
fn group_64k_output_fits_a_default_stack() {
    in_child_process("group_64k_output_fits_a_default_stack", || {
        share_on_default_stack::<{ 64 << 10 }>(false)
    });
}

/// What the CHANGELOG promises: an 80 KiB output with followers fits a 2 MiB stack in a debug
/// build (`Shared` fits 96 KiB). It once aborted the process with a stack overflow: the
/// publishing driver was ~24 outputs deep, `Run::poll`'s frame alone ~13.
#[test]
fn group_80k_output_fits_a_default_stack() {
    in_child_process("group_80k_output_fits_a_default_stack", || {
        share_on_default_stack::<{ 80 << 10 }>(false)
    });
}

// ---------------------------------------------------------------------------------------------
// Allocation per publish
// ---------------------------------------------------------------------------------------------

/// Counts this thread's allocations.
struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Allocations made by the leader's poll that ends a flight of an `N`-byte output with no
/// follower (with feature `metrics`, labelled counters allocate their key).
fn allocations_to_finish_alone<const N: usize>() -> usize {
    let group: Group<u8> = Group::new();
    let mut leader = group.run(1, || async { [1u8; N] });
    let (_, w) = counting();
    let before = ALLOCS.with(Cell::get);
    assert!(matches!(poll(&mut leader, &w), Poll::Ready(Ok(_))));
    ALLOCS.with(Cell::get) - before
}

/// Allocations made by the leader's poll that publishes an `N`-byte output to one follower,
/// beyond those of a flight with no follower.
fn allocations_to_publish<const N: usize>() -> usize {
    let alone = allocations_to_finish_alone::<N>();
    let group: Group<u8> = Group::new();
    let mut leader = group.run(1, || async { [1u8; N] });
    let mut follower = group.run(1, || async { [2u8; N] });
    let (_, w) = counting();
    assert!(poll(&mut follower, &w).is_pending());
    let before = ALLOCS.with(Cell::get);
    assert!(matches!(poll(&mut leader, &w), Poll::Ready(Ok(_))));
    let made = ALLOCS.with(Cell::get) - before;
    assert!(matches!(poll(&mut follower, &w), Poll::Ready(Ok(o)) if o[0] == 1));
    made - alone
}

/// README: "a batch's copies live on the stack, with no allocation, unless 32 of them would
/// take over 4 KiB (an output over about 120 bytes)". A 112-byte output publishes with no
/// allocation...
#[test]
fn a_112_byte_output_publishes_with_no_allocation() {
    assert_eq!(allocations_to_publish::<112>(), 0);
}

/// ... and a 256-byte one with one (its batch of copies, on the heap).
#[test]
fn a_256_byte_output_publishes_with_one_allocation() {
    assert_eq!(allocations_to_publish::<256>(), 1);
}

// ---------------------------------------------------------------------------------------------
// HTTP layer counters: every bypass and release counted once, in `Stats` and in `metrics`
// ---------------------------------------------------------------------------------------------

#[cfg(all(feature = "http", feature = "metrics"))]
#[path = "counting_recorder/mod.rs"]
mod counting_recorder;

#[cfg(all(feature = "http", feature = "metrics"))]
mod http_counters {
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use tokio::sync::watch;
    use tower::{service_fn, Layer, Service};
    use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

    type Res = Response<Full<Bytes>>;

    fn get(path: &str) -> Request<Full<Bytes>> {
        Request::get(path).body(Full::default()).unwrap()
    }

    async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(3600), f)
            .await
            .unwrap_or_else(|_| panic!("hung: {what}"))
    }

    #[test]
    fn bypasses_and_releases_are_counted_once() {
        let recorder = counting_recorder::Counting::default();
        metrics::with_local_recorder(&recorder, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let (open, gate) = watch::channel(false);
                let calls = Arc::new(AtomicUsize::new(0));
                let c = calls.clone();
                let inner = service_fn(move |req: Request<Full<Bytes>>| {
                    let mut gate = gate.clone();
                    c.fetch_add(1, SeqCst);
                    async move {
                        let _ = gate.wait_for(|open| *open).await;
                        match req.uri().path() {
                            "/err" => Err(std::io::Error::other("refused")),
                            "/cookie" => Ok::<Res, _>(
                                Response::builder()
                                    .header("set-cookie", "s=1")
                                    .body(Full::from("c"))
                                    .unwrap(),
                            ),
                            _ => Ok(Response::new(Full::from("ok"))),
                        }
                    }
                });
                let layer = CoalesceHttpLayer::new();
                let mut svc = layer.layer(inner);

                // A bypass.
                let post = Request::post("/a").body(Full::default()).unwrap();
                let post = tokio::spawn(svc.call(post));
                // A response that may not be shared: two followers released.
                let mut tasks = Vec::new();
                for _ in 0..3 {
                    let f = svc.call(get("/cookie"));
                    tasks.push(tokio::spawn(f));
                }
                // A failed call: one follower released.
                for _ in 0..2 {
                    let f = svc.call(get("/err"));
                    tasks.push(tokio::spawn(f));
                }
                // A leader that leaves: its follower takes the call over and is served.
                let mut leader = Box::pin(svc.call(get("/a")));
                let follower = svc.call(get("/a"));
                assert_eq!(follower.served_by(), ServedBy::Follower);
                assert!(futures::poll!(leader.as_mut()).is_pending());
                let follower = tokio::spawn(follower);
                tokio::task::yield_now().await;
                drop(leader);
                open.send(true).unwrap();

                assert!(bounded("post", post).await.unwrap().is_ok());
                let mut by = Vec::new();
                for t in tasks {
                    let res = bounded("waiter", t).await.unwrap();
                    by.push(res.map(|r| *r.extensions().get::<ServedBy>().unwrap()).ok());
                }
                assert_eq!(
                    by,
                    [
                        Some(ServedBy::Leader),
                        Some(ServedBy::Released),
                        Some(ServedBy::Released),
                        None,
                        None
                    ]
                );
                let res = bounded("follower", follower).await.unwrap().unwrap();
                assert_eq!(
                    res.extensions().get::<ServedBy>(),
                    Some(&ServedBy::Follower)
                );

                let stats = layer.stats();
                assert_eq!(
                    (
                        stats.leaders,
                        stats.followers,
                        stats.bypassed,
                        stats.released,
                        stats.fell_through,
                        stats.in_flight
                    ),
                    (3, 4, 1, 3, 3, 0),
                    "{stats:?}"
                );
                // 1 bypass + 3 flights + 3 released followers' own calls.
                assert_eq!(calls.load(SeqCst), 7);
            });
        });
        let totals = recorder.totals();
        let get = |name: &str| totals.get(name).copied().unwrap_or(0);
        assert_eq!(get("tower_coalesce_bypassed_total"), 1, "{totals:?}");
        assert_eq!(get("tower_coalesce_released_total"), 3, "{totals:?}");
        assert_eq!(get("tower_coalesce_leaders_total"), 3, "{totals:?}");
        assert_eq!(get("tower_coalesce_followers_total"), 4, "{totals:?}");
    }
}
