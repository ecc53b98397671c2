//! Adversarial tests of `tower_coalesce::Run` as a Rust future: polling and waker discipline,
//! wake counts, re-entrancy from user code (make, Clone, key Drop, wakers), drop discipline,
//! role flags, and unusual outputs. Black-box: judged against the rustdoc and DESIGN.md.
//!
//! No sleeps for synchronisation: manual polls with counting wakers, latches, channels and
//! barriers; anything that could deadlock runs on a thread joined with a bound.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::noop_waker;
use tower_coalesce::{Group, GroupBuilder, Panicked, Run};

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type Slot<K, T> = Arc<Mutex<Option<Run<K, T>>>>;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A waker that counts its wakes.
#[derive(Default)]
struct CountWaker(AtomicUsize);

impl Wake for CountWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

impl CountWaker {
    fn count(&self) -> usize {
        self.0.load(SeqCst)
    }
}

fn counting() -> (Arc<CountWaker>, Waker) {
    let counter = Arc::new(CountWaker::default());
    let waker = Waker::from(Arc::clone(&counter));
    (counter, waker)
}

/// A waker that runs a closure when woken (user code inside `wake`).
struct FnWaker<F>(F);

impl<F: Fn() + Send + Sync + 'static> Wake for FnWaker<F> {
    fn wake(self: Arc<Self>) {
        (self.0)()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        (self.0)()
    }
}

fn fn_waker(f: impl Fn() + Send + Sync + 'static) -> Waker {
    Waker::from(Arc::new(FnWaker(f)))
}

/// A waker that runs a closure when its last reference is dropped (user code inside `Drop`).
struct DropHookWaker(Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl Wake for DropHookWaker {
    fn wake(self: Arc<Self>) {}
}

impl Drop for DropHookWaker {
    fn drop(&mut self) {
        let hook = self.0.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(hook) = hook {
            hook();
        }
    }
}

fn poll_with<F: Future + Unpin>(fut: &mut F, waker: &Waker) -> Poll<F::Output> {
    Pin::new(fut).poll(&mut Context::from_waker(waker))
}

fn poll_noop<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    poll_with(fut, &noop_waker())
}

/// The value of a ready, successful `Run` poll.
fn ready<T>(polled: Poll<Result<T, Panicked>>) -> T {
    match polled {
        Poll::Ready(Ok(v)) => v,
        Poll::Ready(Err(p)) => panic!("flight panicked: {p}"),
        Poll::Pending => panic!("expected Ready, got Pending"),
    }
}

/// A manually opened gate for inner futures; counts how often it is polled.
#[derive(Clone, Default)]
struct Latch(Arc<LatchInner>);

#[derive(Default)]
struct LatchInner {
    open: AtomicBool,
    waker: Mutex<Option<Waker>>,
    polls: AtomicUsize,
}

impl Latch {
    fn open(&self) {
        self.0.open.store(true, SeqCst);
        let waker = self.0.waker.lock().unwrap().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn polls(&self) -> usize {
        self.0.polls.load(SeqCst)
    }

    fn wait(&self) -> LatchWait {
        LatchWait(self.clone())
    }
}

struct LatchWait(Latch);

impl Future for LatchWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &(self.0).0;
        inner.polls.fetch_add(1, SeqCst);
        if inner.open.load(SeqCst) {
            return Poll::Ready(());
        }
        *inner.waker.lock().unwrap() = Some(cx.waker().clone());
        if inner.open.load(SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A `make` whose future waits for `latch` and then yields `value`; counts calls in `makes`.
fn latched<T: Send + 'static>(
    latch: &Latch,
    makes: &Arc<AtomicUsize>,
    value: T,
) -> impl FnOnce() -> BoxFut<T> {
    let (latch, makes) = (latch.clone(), Arc::clone(makes));
    move || {
        makes.fetch_add(1, SeqCst);
        Box::pin(async move {
            latch.wait().await;
            value
        })
    }
}

/// A `make` whose future never completes; counts calls in `makes`.
fn never<T: Send + 'static>(makes: &Arc<AtomicUsize>) -> impl FnOnce() -> BoxFut<T> {
    let makes = Arc::clone(makes);
    move || {
        makes.fetch_add(1, SeqCst);
        Box::pin(std::future::pending())
    }
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// Runs `f` on a thread of its own and fails (instead of hanging) if it does not finish.
fn within<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => panic!("{what}: no progress in 20 s (deadlock)"),
    }
}

/// Sets a flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// Counts its polls; a follower woken exactly once by completion is polled exactly twice.
struct Counted<F> {
    inner: F,
    polls: Arc<AtomicUsize>,
}

impl<F: Future + Unpin> Future for Counted<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, SeqCst);
        Pin::new(&mut self.inner).poll(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Laziness and registration
// ---------------------------------------------------------------------------------------------

/// Rustdoc of `Group::run`: "The registry is consulted when `run` is called, not when the
/// future is first polled; `make` is called only by the caller that registers a flight".
#[test]
fn run_registers_and_makes_at_call_time_not_at_first_poll() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 7u32));
    assert_eq!(
        makes.load(SeqCst),
        1,
        "make runs inside run(), before any poll"
    );
    assert_eq!(latch.polls(), 0, "the inner future is not polled by run()");
    assert_eq!((group.len(), group.in_flight()), (1, 1));

    let mut follower = group.run(1, latched(&latch, &makes, 8u32));
    assert_eq!(
        makes.load(SeqCst),
        1,
        "an unpolled leader's flight is joinable"
    );
    assert!(leader.is_leader() && !follower.is_leader());
    assert!(follower.is_shared(), "a follower is always shared");
    assert!(
        !leader.is_shared(),
        "the leader is not shared before its output is ready"
    );

    let (fc, fw) = counting();
    assert!(poll_with(&mut follower, &fw).is_pending());
    assert_eq!(
        latch.polls(),
        0,
        "a follower does not poll the leader's future"
    );
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 7);
    assert!(leader.is_shared());
    assert_eq!(fc.count(), 1);
    assert_eq!(ready(poll_with(&mut follower, &fw)), 7);
    assert_eq!(
        (group.len(), group.stats().leaders, group.stats().followers),
        (0, 1, 1)
    );
}

/// A never-polled leader that is the only waiter: dropping it cancels the call (its future is
/// dropped without ever being polled) and frees the key.
#[test]
fn never_polled_leader_dropped_cancels_and_frees_key() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(Arc::clone(&dropped));
    let l2 = latch.clone();
    let m2 = Arc::clone(&makes);
    let leader = group.run(1, move || {
        m2.fetch_add(1, SeqCst);
        async move {
            let _flag = flag;
            l2.wait().await;
            1u32
        }
    });
    assert!(!dropped.load(SeqCst));
    drop(leader);
    assert!(
        dropped.load(SeqCst),
        "the inner future is dropped with its last waiter"
    );
    assert_eq!(latch.polls(), 0);
    assert_eq!((group.len(), group.in_flight()), (0, 0));
    assert_eq!(group.stats().cancelled, 1);

    let mut again = group.run(1, || async { 2u32 });
    assert!(again.is_leader(), "no stale join of a cancelled flight");
    assert_eq!(ready(poll_noop(&mut again)), 2);
    assert_eq!(makes.load(SeqCst), 1);
}

/// A follower created and dropped without a single poll leaves no trace on the flight.
#[test]
fn never_polled_follower_dropped_does_not_disturb_leader() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 3u32));
    assert!(poll_noop(&mut leader).is_pending());
    let follower = group.run(1, never::<u32>(&makes));
    drop(follower);
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 3);
    assert!(
        !leader.is_shared(),
        "the only follower left before the output was ready: nobody else got it"
    );
    let stats = group.stats();
    assert_eq!(
        (stats.followers, stats.cancelled, stats.in_flight),
        (1, 0, 0)
    );
    assert_eq!(makes.load(SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Wake counts and busy-waiting
// ---------------------------------------------------------------------------------------------

/// Contract 6: "Waiters are woken once, by the call's completion".
#[test]
fn follower_is_woken_exactly_once_by_completion() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 11u32));
    let mut follower = group.run(1, never::<u32>(&makes));
    let (fc, fw) = counting();
    for _ in 0..3 {
        assert!(poll_with(&mut follower, &fw).is_pending());
    }
    assert!(poll_noop(&mut leader).is_pending());
    assert_eq!(fc.count(), 0, "no wake before completion");
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 11);
    assert_eq!(fc.count(), 1, "woken exactly once by completion");
    assert_eq!(ready(poll_with(&mut follower, &fw)), 11);
    assert_eq!(fc.count(), 1, "taking the output wakes nobody");
}

/// A follower polled 1000 times without progress stays pending, keeps one waker (no clone per
/// poll), never wakes itself (no busy loop) and never polls or makes the call.
#[test]
fn follower_repolled_1000_times_stays_pending_and_cheap() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 5u32));
    assert!(poll_noop(&mut leader).is_pending());
    let mut follower = group.run(1, never::<u32>(&makes));
    let (fc, fw) = counting();
    for _ in 0..1000 {
        assert!(poll_with(&mut follower, &fw).is_pending());
    }
    assert_eq!(fc.count(), 0, "a waiting follower must not wake itself");
    assert_eq!(
        Arc::strong_count(&fc),
        3,
        "ours + our Waker + one stored clone: not one per poll"
    );
    assert_eq!(
        latch.polls(),
        1,
        "only the leader's one poll reached the inner future"
    );
    assert_eq!(makes.load(SeqCst), 1);
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 5);
    assert_eq!(fc.count(), 1);
    assert_eq!(ready(poll_with(&mut follower, &fw)), 5);
    assert_eq!(Arc::strong_count(&fc), 2, "the stored waker is released");
}

/// A leader polled repeatedly while its inner future is pending polls that future each time
/// but never calls `make` again, and wakes nobody.
#[test]
fn leader_repolled_while_pending_never_remakes() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 9u32));
    let (lc, lw) = counting();
    for _ in 0..100 {
        assert!(poll_with(&mut leader, &lw).is_pending());
    }
    assert_eq!(makes.load(SeqCst), 1);
    assert_eq!(latch.polls(), 100);
    assert_eq!(lc.count(), 0);
    latch.open();
    assert_eq!(
        lc.count(),
        1,
        "the inner future's own waker registration reaches the leader"
    );
    assert_eq!(ready(poll_with(&mut leader, &lw)), 9);
    assert_eq!(group.stats().leaders, 1);
}

/// A follower polled with a different waker each time (moved between tasks): only the last one
/// is woken, and the earlier ones are released, not accumulated.
#[test]
fn follower_last_waker_wins_and_old_wakers_are_released() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 4u32));
    let mut follower = group.run(1, never::<u32>(&makes));
    let wakers: Vec<_> = (0..5).map(|_| counting()).collect();
    for (_, w) in &wakers {
        assert!(poll_with(&mut follower, w).is_pending());
    }
    for (c, _) in &wakers[..4] {
        assert_eq!(Arc::strong_count(c), 2, "a replaced waker is dropped");
    }
    assert_eq!(Arc::strong_count(&wakers[4].0), 3);
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 4);
    assert_eq!(wakers[4].0.count(), 1, "the last waker is woken");
    let stale: usize = wakers[..4].iter().map(|(c, _)| c.count()).sum();
    assert_eq!(stale, 0, "replaced wakers are not woken");
    assert_eq!(ready(poll_with(&mut follower, &wakers[4].1)), 4);
}

/// Polled first with a noop waker (e.g. a `now_or_never` probe), then with a real one.
#[test]
fn follower_polled_with_noop_then_real_waker_is_woken() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 6u32));
    let mut follower = group.run(1, never::<u32>(&makes));
    assert!(poll_noop(&mut follower).is_pending());
    let (fc, fw) = counting();
    assert!(poll_with(&mut follower, &fw).is_pending());
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 6);
    assert_eq!(fc.count(), 1);
    // A follower polled only with the noop waker still gets its output when re-polled.
    let mut late = group.run(1, || async { 60u32 });
    assert!(late.is_leader(), "output published: no stale join");
    assert_eq!(ready(poll_noop(&mut late)), 60);
    assert_eq!(ready(poll_noop(&mut follower)), 6);
}

/// Polling a completed `Run` again must not return `Pending` (which would hang a task that
/// never gets woken); `Future` allows a panic. The group stays usable.
#[test]
fn poll_after_completion_never_returns_pending() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 1u32));
    let mut follower = group.run(1, never::<u32>(&makes));
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 1);
    assert_eq!(ready(poll_noop(&mut follower)), 1);
    for run in [&mut leader, &mut follower] {
        let again = catch_unwind(AssertUnwindSafe(|| poll_noop(run).is_pending()));
        assert!(
            !matches!(again, Ok(true)),
            "a finished Run returned Pending"
        );
    }
    drop((leader, follower));
    assert_eq!(group.len(), 0);
    let mut next = group.run(1, || async { 2u32 });
    assert_eq!(ready(poll_noop(&mut next)), 2);
}

// ---------------------------------------------------------------------------------------------
// Moving a Run: Send, Unpin, threads, FuturesUnordered, select loops
// ---------------------------------------------------------------------------------------------

#[test]
fn run_is_send_and_unpin_and_survives_moves_after_first_poll() {
    fn assert_send<T: Send>() {}
    fn assert_unpin<T: Unpin>() {}
    assert_send::<Run<u32, u32>>();
    assert_send::<Run<String, Cell<u32>>>(); // a !Sync output
    assert_unpin::<Run<String, Vec<u8>>>();

    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 8u32));
    let mut follower = group.run(1, never::<u32>(&makes));
    assert!(poll_noop(&mut leader).is_pending());
    let (fc, fw) = counting();
    assert!(poll_with(&mut follower, &fw).is_pending());
    // Move both after their first poll: into a Vec, then a Box.
    let mut moved: Vec<Run<u32, u32>> = vec![leader, follower];
    let mut follower = Box::new(moved.pop().unwrap());
    let mut leader = moved.pop().unwrap();
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 8);
    assert_eq!(fc.count(), 1);
    assert_eq!(ready(poll_with(&mut *follower, &fw)), 8);
}

/// A follower polled on one thread, moved to another and polled there with another waker: the
/// second thread's waker is the one woken, then a third thread takes the output.
#[test]
fn follower_polled_from_different_threads_in_turn() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 21u32));
    assert!(poll_noop(&mut leader).is_pending());
    let follower = group.run(1, never::<u32>(&makes));
    let (ca, wa) = counting();
    let (cb, wb) = counting();
    let (follower, pending_a) = std::thread::spawn(move || {
        let mut f = follower;
        let p = poll_with(&mut f, &wa).is_pending();
        (f, p)
    })
    .join()
    .unwrap();
    let (follower, pending_b) = std::thread::spawn(move || {
        let mut f = follower;
        let p = poll_with(&mut f, &wb).is_pending();
        (f, p)
    })
    .join()
    .unwrap();
    assert!(pending_a && pending_b);
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 21);
    assert_eq!((ca.count(), cb.count()), (0, 1));
    let out = std::thread::spawn(move || {
        let mut f = follower;
        ready(poll_noop(&mut f))
    })
    .join()
    .unwrap();
    assert_eq!(out, 21);
}

/// Followers in a `FuturesUnordered` (each with its own waker): each is polled exactly twice,
/// once to park and once, after its single wake, to take the output.
#[test]
fn followers_in_futures_unordered_are_each_polled_exactly_twice() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 33u32));
    assert!(poll_noop(&mut leader).is_pending());
    let polls: Vec<_> = (0..16).map(|_| counter()).collect();
    let mut set: FuturesUnordered<_> = polls
        .iter()
        .map(|p| Counted {
            inner: group.run(1, never::<u32>(&makes)),
            polls: Arc::clone(p),
        })
        .collect();
    let (sc, sw) = counting();
    for _ in 0..5 {
        assert!(poll_with(&mut set.next(), &sw).is_pending());
    }
    assert!(
        polls.iter().all(|p| p.load(SeqCst) == 1),
        "no child re-polled without a wake"
    );
    // (FuturesUnordered wakes its own task once it has polled every child: not counted.)
    let before = sc.count();
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 33);
    assert!(
        sc.count() > before,
        "the set's task was woken by the publish"
    );
    let mut outs = Vec::new();
    loop {
        match poll_with(&mut set.next(), &sw) {
            Poll::Ready(Some(out)) => outs.push(out.unwrap()),
            Poll::Ready(None) => break,
            Poll::Pending => panic!("every follower was served"),
        }
    }
    assert_eq!(outs, vec![33; 16]);
    for p in &polls {
        assert_eq!(p.load(SeqCst), 2, "each follower woken once, polled twice");
    }
    assert_eq!(makes.load(SeqCst), 1);
}

/// A follower raced in a `tokio::select!` loop against a ticking timer (re-polled on every
/// tick) resolves once, to the flight's output, and never makes its own call.
#[tokio::test(start_paused = true)]
async fn follower_in_select_loop_with_ticking_timer() {
    let group: Group<u32> = Group::new();
    let makes = counter();
    let m = Arc::clone(&makes);
    let leader = group.run(1, move || {
        m.fetch_add(1, SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            42u32
        }
    });
    let leader = tokio::spawn(leader);
    let mut follower = group.run(1, never::<u32>(&makes));
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0;
    let out = tokio::time::timeout(Duration::from_secs(100), async {
        loop {
            tokio::select! {
                r = &mut follower => break r,
                _ = interval.tick() => ticks += 1,
            }
        }
    })
    .await
    .expect("follower resolves");
    assert_eq!(out.unwrap(), 42);
    assert!((10..=12).contains(&ticks), "ticks: {ticks}");
    assert_eq!(leader.await.unwrap().unwrap(), 42);
    assert_eq!(makes.load(SeqCst), 1);
    assert_eq!(group.len(), 0);
}

// ---------------------------------------------------------------------------------------------
// Takeover after the leader left
// ---------------------------------------------------------------------------------------------

/// Contract 4: "If the leader goes away, the flight goes on for the followers." Exactly one
/// follower is woken to take over; it drives the same inner future (no new `make`), keeps
/// `is_leader() == false`; the other is woken once, by completion.
#[test]
fn leader_dropped_one_follower_takes_over_others_woken_once() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 13u32));
    assert!(poll_noop(&mut leader).is_pending());
    let mut f1 = group.run(1, never::<u32>(&makes));
    let mut f2 = group.run(1, never::<u32>(&makes));
    let (c1, w1) = counting();
    let (c2, w2) = counting();
    assert!(poll_with(&mut f1, &w1).is_pending());
    assert!(poll_with(&mut f2, &w2).is_pending());
    drop(leader);
    assert_eq!(
        c1.count() + c2.count(),
        1,
        "exactly one follower woken to take over"
    );
    let (mut taker, tw, mut other, oc, ow) = if c1.count() == 1 {
        (f1, w1, f2, c2, w2)
    } else {
        (f2, w2, f1, c1, w1)
    };
    assert!(poll_with(&mut taker, &tw).is_pending());
    assert_eq!(latch.polls(), 2, "the taker polled the same inner future");
    assert!(!taker.is_leader() && taker.is_shared());
    assert_eq!(oc.count(), 0);
    latch.open();
    assert_eq!(ready(poll_with(&mut taker, &tw)), 13);
    assert_eq!(
        oc.count(),
        1,
        "the other follower woken once, by completion"
    );
    assert_eq!(ready(poll_with(&mut other, &ow)), 13);
    let stats = group.stats();
    assert_eq!((stats.leaders, stats.cancelled, stats.in_flight), (1, 0, 0));
    assert_eq!(makes.load(SeqCst), 1);
}

/// A follower whose waker, woken for a takeover, drops that very follower: the takeover passes
/// to the next follower, who is woken in turn; nothing is cancelled.
#[test]
fn follower_dropping_itself_in_its_takeover_wake_passes_it_on() {
    within("takeover hand-on", || {
        let group: Group<u32> = Group::new();
        let (latch, makes) = (Latch::default(), counter());
        let mut leader = group.run(1, latched(&latch, &makes, 17u32));
        assert!(poll_noop(&mut leader).is_pending());
        let slot1: Slot<u32, u32> = Arc::new(Mutex::new(Some(group.run(1, never(&makes)))));
        let slot2: Slot<u32, u32> = Arc::new(Mutex::new(Some(group.run(1, never(&makes)))));
        let woken = [counter(), counter()];
        // Each follower's waker drops its own follower when woken.
        for (slot, woken) in [(&slot1, &woken[0]), (&slot2, &woken[1])] {
            let (s, w) = (Arc::clone(slot), Arc::clone(woken));
            let waker = fn_waker(move || {
                w.fetch_add(1, SeqCst);
                let run = s.lock().unwrap().take();
                drop(run);
            });
            let mut guard = slot.lock().unwrap();
            assert!(poll_with(guard.as_mut().unwrap(), &waker).is_pending());
        }
        // Keep a third follower that stays.
        let mut f3 = group.run(1, never::<u32>(&makes));
        let (c3, w3) = counting();
        assert!(poll_with(&mut f3, &w3).is_pending());
        drop(leader);
        let self_dropped = woken[0].load(SeqCst) + woken[1].load(SeqCst);
        assert!(self_dropped >= 1, "a follower was woken to take over");
        assert_eq!(c3.count(), 1, "the hand-on reached the remaining follower");
        assert!(poll_with(&mut f3, &w3).is_pending());
        latch.open();
        assert_eq!(ready(poll_with(&mut f3, &w3)), 17);
        assert_eq!(group.stats().cancelled, 0);
        assert_eq!(group.len(), 0);
    });
}

/// The only follower's waker drops it while it is woken for a takeover (inside the leader's
/// drop): that was the last waiter, so the call is cancelled and the key freed.
#[test]
fn last_follower_dropping_itself_in_takeover_wake_cancels_flight() {
    within("takeover cancel", || {
        let group: Group<u32> = Group::new();
        let makes = counter();
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = DropFlag(Arc::clone(&dropped));
        let mut leader = group.run(1, move || async move {
            let _flag = flag;
            std::future::pending::<u32>().await
        });
        assert!(poll_noop(&mut leader).is_pending());
        let slot: Slot<u32, u32> = Arc::new(Mutex::new(Some(group.run(1, never(&makes)))));
        let s = Arc::clone(&slot);
        let waker = fn_waker(move || drop(s.lock().unwrap().take()));
        assert!(poll_with(slot.lock().unwrap().as_mut().unwrap(), &waker).is_pending());
        drop(leader);
        assert!(slot.lock().unwrap().is_none(), "the follower's waker ran");
        assert!(
            dropped.load(SeqCst),
            "last waiter gone: inner future dropped"
        );
        assert_eq!((group.len(), group.in_flight()), (0, 0));
        assert_eq!(group.stats().cancelled, 1);
        let mut next = group.run(1, || async { 1u32 });
        assert!(next.is_leader());
        assert_eq!(ready(poll_noop(&mut next)), 1);
    });
}

// ---------------------------------------------------------------------------------------------
// Re-entrancy: wakers, make, Clone, key Drop (contract 8)
// ---------------------------------------------------------------------------------------------

/// A follower's waker that, inside `wake` (during the publish), polls that follower inline and
/// calls into the group: `run` for the same key (must start a new flight: no stale join),
/// `len`, `stats`, `forget`. No lock may be held while the waker runs.
#[test]
fn waker_reenters_group_and_polls_inline_during_publish() {
    within("publish wake re-entry", || {
        let group: Group<u32> = Group::new();
        let (latch, makes) = (Latch::default(), counter());
        let mut leader = group.run(1, latched(&latch, &makes, 7u32));
        assert!(poll_noop(&mut leader).is_pending());
        let slot: Slot<u32, u32> = Arc::new(Mutex::new(Some(group.run(1, never(&makes)))));
        type Seen = (u32, bool, usize, usize, bool);
        let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
        let (s, g, seen2) = (Arc::clone(&slot), group.clone(), Arc::clone(&seen));
        let waker = fn_waker(move || {
            let mut guard = s.lock().unwrap();
            let Some(run) = guard.as_mut() else { return };
            let out = ready(poll_noop(run));
            *guard = None;
            drop(guard);
            let fresh = g.run(1, || async { 99u32 });
            let record = (
                out,
                fresh.is_leader(),
                g.len(),
                g.stats().in_flight,
                g.forget(&1u32),
            );
            drop(fresh);
            *seen2.lock().unwrap() = Some(record);
        });
        assert!(poll_with(slot.lock().unwrap().as_mut().unwrap(), &waker).is_pending());
        latch.open();
        assert_eq!(ready(poll_noop(&mut leader)), 7);
        let (out, fresh_leads, len, in_flight, forgot) =
            seen.lock().unwrap().take().expect("the waker ran");
        assert_eq!(out, 7, "the follower's copy was in before its wake");
        assert!(fresh_leads, "a run after the publish starts a new flight");
        assert_eq!(
            (len, in_flight),
            (1, 1),
            "only the fresh flight is registered"
        );
        assert!(forgot);
        assert_eq!(group.len(), 0);
    });
}

/// A follower's waker, woken to take over inside the leader's drop, polls the follower inline:
/// it takes over and polls the inner future right there, with no lock held.
#[test]
fn waker_polls_follower_inline_during_takeover() {
    within("takeover wake re-entry", || {
        let group: Group<u32> = Group::new();
        let (latch, makes) = (Latch::default(), counter());
        let mut leader = group.run(1, latched(&latch, &makes, 23u32));
        assert!(poll_noop(&mut leader).is_pending());
        let slot: Slot<u32, u32> = Arc::new(Mutex::new(Some(group.run(1, never(&makes)))));
        let inline_pending = Arc::new(AtomicBool::new(false));
        let (s, p) = (Arc::clone(&slot), Arc::clone(&inline_pending));
        let waker = fn_waker(move || {
            if let Some(run) = s.lock().unwrap().as_mut() {
                p.store(poll_noop(run).is_pending(), SeqCst);
            }
        });
        assert!(poll_with(slot.lock().unwrap().as_mut().unwrap(), &waker).is_pending());
        drop(leader);
        assert!(
            inline_pending.load(SeqCst),
            "inline poll ran and stayed pending"
        );
        assert_eq!(
            latch.polls(),
            2,
            "the inline poll took over and polled the inner future"
        );
        latch.open();
        let mut follower = slot.lock().unwrap().take().unwrap();
        assert_eq!(ready(poll_noop(&mut follower)), 23);
        assert_eq!(makes.load(SeqCst), 1);
        assert_eq!(group.len(), 0);
    });
}

/// Contract 8: no lock is held while user code runs. Dropping a waker is user code (a `Wake`
/// type's destructor). A follower re-polled with a new waker drops its old one: if that happens
/// under the flight's lock, a destructor that calls `group.run` for the same key deadlocks.
#[test]
fn replaced_waker_dropped_outside_locks() {
    within("waker drop re-entry", || {
        let group: Group<u32> = Group::new();
        let (latch, makes) = (Latch::default(), counter());
        let mut leader = group.run(1, latched(&latch, &makes, 5u32));
        assert!(poll_noop(&mut leader).is_pending());
        let mut follower = group.run(1, never::<u32>(&makes));
        let hook_ran = Arc::new(AtomicBool::new(false));
        let (g, ran, m) = (group.clone(), Arc::clone(&hook_ran), Arc::clone(&makes));
        let hook = Arc::new(DropHookWaker(Mutex::new(Some(Box::new(move || {
            let joined = g.run(1, never::<u32>(&m));
            assert!(!joined.is_leader());
            drop(joined);
            ran.store(true, SeqCst);
        })))));
        let first = Waker::from(hook); // the only strong reference to the hook
        assert!(poll_with(&mut follower, &first).is_pending());
        drop(first); // now the follower's stored clone is the last reference
        assert!(poll_noop(&mut follower).is_pending()); // replaces (drops) the stored waker
        assert!(hook_ran.load(SeqCst));
        latch.open();
        assert_eq!(ready(poll_noop(&mut leader)), 5);
        assert_eq!(ready(poll_noop(&mut follower)), 5);
    });
}

/// `make` runs after registration and outside every lock: calling `group.run` for the same key
/// from inside `make` joins the flight being made (as a follower) instead of deadlocking.
#[test]
fn make_reentering_same_key_joins_as_follower() {
    within("make re-entry (same key)", || {
        let group: Group<u32> = Group::new();
        let inner_makes = counter();
        let slot: Slot<u32, u32> = Arc::default();
        let (g, s, im) = (group.clone(), Arc::clone(&slot), Arc::clone(&inner_makes));
        let mut leader = group.run(1, move || {
            let nested = g.run(1, never::<u32>(&im));
            *s.lock().unwrap() = Some(nested);
            async { 1u32 }
        });
        let mut nested = slot.lock().unwrap().take().expect("make ran inside run()");
        assert!(!nested.is_leader() && nested.is_shared());
        assert_eq!(inner_makes.load(SeqCst), 0);
        assert_eq!(ready(poll_noop(&mut leader)), 1);
        assert!(leader.is_shared());
        assert_eq!(ready(poll_noop(&mut nested)), 1);
        assert_eq!(group.len(), 0);
    });
}

/// `make` that starts a flight of another key: two independent leaders.
#[test]
fn make_reentering_other_key_leads_independently() {
    within("make re-entry (other key)", || {
        let group: Group<u32> = Group::new();
        let slot: Slot<u32, u32> = Arc::default();
        let (g, s) = (group.clone(), Arc::clone(&slot));
        let mut outer = group.run(1, move || {
            *s.lock().unwrap() = Some(g.run(2, || async { 2u32 }));
            async { 1u32 }
        });
        let mut nested = slot.lock().unwrap().take().unwrap();
        assert!(nested.is_leader() && !nested.is_shared());
        assert_eq!(group.in_flight(), 2);
        assert_eq!(ready(poll_noop(&mut nested)), 2);
        assert_eq!(ready(poll_noop(&mut outer)), 1);
        assert_eq!(group.len(), 0);
    });
}

thread_local! {
    static CLONE_HOOK: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
}

/// An output whose `Clone` runs a one-shot, thread-local hook (user code in `Clone`).
#[derive(Debug, PartialEq)]
struct Hooked(u32);

impl Clone for Hooked {
    fn clone(&self) -> Self {
        let hook = CLONE_HOOK.with(|h| h.borrow_mut().take());
        if let Some(hook) = hook {
            hook();
        }
        Hooked(self.0)
    }
}

/// A response `Clone` made for a follower during the publish calls into the group: `run` for
/// the same key starts a new flight (the entry is gone before copies are made), polls another
/// follower of the same flight; no lock is held (contract 8).
#[test]
fn response_clone_reenters_group_during_publish() {
    within("clone re-entry (publish)", || {
        let group: Group<u32> = Group::new();
        let (latch, makes) = (Latch::default(), counter());
        let mut leader = group.run(1, latched(&latch, &makes, Hooked(5)));
        assert!(poll_noop(&mut leader).is_pending());
        let mut f1 = group.run(1, never::<Hooked>(&makes));
        let slot: Slot<u32, Hooked> = Arc::new(Mutex::new(Some(group.run(1, never(&makes)))));
        let seen: Arc<Mutex<Option<(bool, bool)>>> = Arc::default();
        let (g, s, seen2, m) = (
            group.clone(),
            Arc::clone(&slot),
            Arc::clone(&seen),
            Arc::clone(&makes),
        );
        CLONE_HOOK.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                let fresh = g.run(1, never::<Hooked>(&m));
                let other = poll_noop(s.lock().unwrap().as_mut().unwrap());
                *seen2.lock().unwrap() = Some((fresh.is_leader(), other.is_pending()));
                drop(fresh);
            }))
        });
        latch.open();
        assert_eq!(ready(poll_noop(&mut leader)), Hooked(5));
        let (fresh_leads, _) = seen.lock().unwrap().take().expect("a clone ran the hook");
        assert!(
            fresh_leads,
            "a run during the publish must not join the published flight"
        );
        assert_eq!(ready(poll_noop(&mut f1)), Hooked(5));
        let mut f2 = slot.lock().unwrap().take().unwrap();
        assert_eq!(ready(poll_noop(&mut f2)), Hooked(5));
        assert_eq!(group.len(), 0);
        assert_eq!(
            makes.load(SeqCst),
            2,
            "the leader's and the fresh flight's make"
        );
    });
}

/// A lingering hit's `Clone` (made while the output is taken out of the flight) calls `run`
/// for the same key: that second hit waits for the output to be put back, and its waker (set
/// from inside the hook) is woken exactly once when it is.
#[test]
fn lingering_clone_reenters_same_key_second_hit_waits_and_is_woken_once() {
    within("clone re-entry (linger)", || {
        let group: Group<u32> = GroupBuilder::new()
            .linger(Duration::from_secs(3600))
            .build();
        let makes = counter();
        let m = Arc::clone(&makes);
        let mut leader = group.run(1, move || {
            m.fetch_add(1, SeqCst);
            async { Hooked(8) }
        });
        assert_eq!(ready(poll_noop(&mut leader)), Hooked(8));
        let slot: Slot<u32, Hooked> = Arc::default();
        let (c2, w2) = counting();
        let (g, s, m) = (group.clone(), Arc::clone(&slot), Arc::clone(&makes));
        CLONE_HOOK.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                let mut second = g.run(1, never::<Hooked>(&m));
                assert!(!second.is_leader() && second.is_shared());
                assert!(
                    poll_with(&mut second, &w2).is_pending(),
                    "output is out being cloned"
                );
                *s.lock().unwrap() = Some(second);
            }))
        });
        let mut first = group.run(1, never::<Hooked>(&makes));
        assert!(!first.is_leader() && !first.is_alone() && first.is_shared());
        assert_eq!(ready(poll_noop(&mut first)), Hooked(8));
        assert_eq!(
            c2.count(),
            1,
            "the waiting hit is woken once the output is back"
        );
        let mut second = slot.lock().unwrap().take().expect("hook ran");
        assert_eq!(ready(poll_noop(&mut second)), Hooked(8));
        assert_eq!(makes.load(SeqCst), 1);
        assert_eq!(group.stats().lingered, 2);
    });
}

thread_local! {
    static KEY_GROUP: RefCell<Option<Group<DropKey>>> = const { RefCell::new(None) };
    static IN_KEY_DROP: Cell<bool> = const { Cell::new(false) };
    static KEY_DROP_CALLS: Cell<usize> = const { Cell::new(0) };
}

/// A key whose destructor calls into the group it is a key of.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DropKey(u32);

impl std::borrow::Borrow<u32> for DropKey {
    fn borrow(&self) -> &u32 {
        &self.0
    }
}

impl Drop for DropKey {
    fn drop(&mut self) {
        if IN_KEY_DROP.with(|f| f.replace(true)) {
            return;
        }
        let group = KEY_GROUP.try_with(|g| g.borrow().clone()).ok().flatten();
        if let Some(g) = group {
            let _ = (g.len(), g.in_flight(), g.stats());
            let _ = g.forget(&1_000_000u32);
            let mut other = g.run(DropKey(1_000_001), || async { 0u32 });
            let _ = poll_noop(&mut other);
            KEY_DROP_CALLS.with(|c| c.set(c.get() + 1));
        }
        IN_KEY_DROP.with(|f| f.set(false));
    }
}

/// Contract 8: a key's destructor (user code) runs with no lock held: when a follower's key is
/// dropped, when a finished flight's entry goes, and when a cancelled one does.
#[test]
fn key_drop_reenters_group_without_deadlock() {
    within("key drop re-entry", || {
        let group: Group<DropKey> = Group::new();
        KEY_GROUP.with(|g| *g.borrow_mut() = Some(group.clone()));
        let (latch, makes) = (Latch::default(), counter());
        let mut leader = group.run(DropKey(1), latched(&latch, &makes, 1u32));
        let mut follower = group.run(DropKey(1), never::<u32>(&makes));
        assert!(poll_noop(&mut leader).is_pending());
        assert!(poll_noop(&mut follower).is_pending());
        latch.open();
        assert_eq!(ready(poll_noop(&mut leader)), 1);
        assert_eq!(ready(poll_noop(&mut follower)), 1);
        let cancelled = group.run(DropKey(2), never::<u32>(&makes));
        drop(cancelled);
        let calls = KEY_DROP_CALLS.with(Cell::get);
        KEY_GROUP.with(|g| g.borrow_mut().take());
        assert!(
            calls >= 3,
            "follower key, finished entry, cancelled entry: {calls}"
        );
        assert_eq!(group.len(), 0);
        assert_eq!(group.stats().cancelled, 1);
    });
}

// ---------------------------------------------------------------------------------------------
// Drop discipline
// ---------------------------------------------------------------------------------------------

/// The inner future drops a follower of its own flight while it is being polled.
#[test]
fn follower_dropped_from_inside_inner_future_poll() {
    within("drop follower inside poll", || {
        let group: Group<u32> = Group::new();
        let makes = counter();
        let slot: Slot<u32, u32> = Arc::default();
        let s = Arc::clone(&slot);
        let mut leader = group.run(1, move || async move {
            let run = s.lock().unwrap().take();
            drop(run);
            3u32
        });
        *slot.lock().unwrap() = Some(group.run(1, never(&makes)));
        assert_eq!(ready(poll_noop(&mut leader)), 3);
        assert!(slot.lock().unwrap().is_none());
        assert!(
            !leader.is_shared(),
            "its only follower left before the output"
        );
        let stats = group.stats();
        assert_eq!((stats.followers, stats.cancelled), (1, 0));
        assert_eq!(group.len(), 0);
    });
}

/// A follower dropped on another thread at the same moment the leader completes: no deadlock,
/// the leader gets its output, nothing leaks. Repeated to hit different interleavings.
#[test]
fn follower_dropped_on_other_thread_while_flight_completes() {
    within("concurrent drop", || {
        let group: Group<u32> = Group::new();
        let makes = counter();
        for i in 0..300u32 {
            let latch = Latch::default();
            let mut leader = group.run(i, latched(&latch, &makes, i));
            assert!(poll_noop(&mut leader).is_pending());
            let mut follower = group.run(i, never::<u32>(&makes));
            assert!(poll_noop(&mut follower).is_pending());
            let barrier = Arc::new(Barrier::new(2));
            let b = Arc::clone(&barrier);
            let t = std::thread::spawn(move || {
                b.wait();
                drop(follower);
            });
            barrier.wait();
            latch.open();
            assert_eq!(ready(poll_noop(&mut leader)), i);
            t.join().unwrap();
        }
        assert_eq!(group.len(), 0);
        let stats = group.stats();
        assert_eq!(
            (stats.leaders, stats.followers, stats.cancelled),
            (300, 300, 0)
        );
        assert_eq!(makes.load(SeqCst), 300);
    });
}

struct PanicOnDrop;

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("inner future destructor panicked");
        }
    }
}

/// The inner future's destructor panics when the last waiter leaves: the key is freed anyway
/// and the group stays usable (contract 5/7), whether the last waiter was a leader or a
/// follower that took over.
#[test]
fn inner_future_drop_panic_on_cancel_still_frees_key() {
    let group: Group<u32> = Group::new();
    let makes = counter();
    let pending_with_bomb = || {
        let bomb = PanicOnDrop;
        async move {
            let _bomb = bomb;
            std::future::pending::<u32>().await
        }
    };
    // The leader is the last waiter.
    let mut leader = group.run(1, pending_with_bomb);
    assert!(poll_noop(&mut leader).is_pending());
    let _ = catch_unwind(AssertUnwindSafe(move || drop(leader)));
    assert_eq!((group.len(), group.in_flight()), (0, 0));
    assert_eq!(group.stats().cancelled, 1);

    // A follower took over, then is the last waiter.
    let mut leader = group.run(1, pending_with_bomb);
    assert!(poll_noop(&mut leader).is_pending());
    let mut follower = group.run(1, never::<u32>(&makes));
    assert!(poll_noop(&mut follower).is_pending());
    drop(leader); // hands the future on, does not drop it
    assert_eq!(group.len(), 1);
    assert!(poll_noop(&mut follower).is_pending());
    let _ = catch_unwind(AssertUnwindSafe(move || drop(follower)));
    assert_eq!((group.len(), group.in_flight()), (0, 0));
    assert_eq!(group.stats().cancelled, 2);

    let mut next = group.run(1, || async { 4u32 });
    assert!(next.is_leader());
    assert_eq!(ready(poll_noop(&mut next)), 4);
    assert_eq!(makes.load(SeqCst), 0);
}

/// An inner future that completes and then panics in its destructor: the output was produced,
/// so every waiter gets it.
#[test]
fn inner_future_drop_panic_after_ready_is_contained() {
    struct ReadyThenBomb(u32);
    impl Future for ReadyThenBomb {
        type Output = u32;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<u32> {
            Poll::Ready(self.0)
        }
    }
    impl Drop for ReadyThenBomb {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("destructor of a finished future");
            }
        }
    }
    let group: Group<u32> = Group::new();
    let makes = counter();
    let mut leader = group.run(1, || ReadyThenBomb(12));
    let mut follower = group.run(1, never::<u32>(&makes));
    let (fc, fw) = counting();
    assert!(poll_with(&mut follower, &fw).is_pending());
    let polled = catch_unwind(AssertUnwindSafe(|| poll_noop(&mut leader)));
    let polled = polled.expect("a destructor panic of a finished future escaped poll()");
    assert_eq!(ready(polled), 12);
    assert_eq!(fc.count(), 1);
    assert_eq!(ready(poll_with(&mut follower, &fw)), 12);
    assert_eq!(group.len(), 0);
    assert_eq!(group.stats().panics, 0);
}

// ---------------------------------------------------------------------------------------------
// Role flags under options
// ---------------------------------------------------------------------------------------------

/// `max_in_flight`: a call past the bound runs alone (`is_alone`, its own leader, never shared)
/// and nobody can join it: a second call of the same key makes its own call too.
#[test]
fn flags_of_calls_run_alone_under_max_in_flight() {
    let group: Group<u32> = GroupBuilder::new().max_in_flight(1).build();
    let (latch, makes) = (Latch::default(), counter());
    let mut a = group.run(1, latched(&latch, &makes, 10u32));
    assert!(a.is_leader() && !a.is_alone() && !a.is_shared());
    let b_makes = counter();
    let bm = Arc::clone(&b_makes);
    let mut b = group.run(2, move || {
        bm.fetch_add(1, SeqCst);
        async { 20u32 }
    });
    let bm = Arc::clone(&b_makes);
    let mut b2 = group.run(2, move || {
        bm.fetch_add(1, SeqCst);
        async { 21u32 }
    });
    for run in [&b, &b2] {
        assert!(run.is_alone() && run.is_leader() && !run.is_shared());
    }
    assert_eq!(b_makes.load(SeqCst), 2, "nobody joins a call run alone");
    assert_eq!(ready(poll_noop(&mut b2)), 21);
    assert_eq!(ready(poll_noop(&mut b)), 20);
    assert!(
        b.is_alone() && !b.is_shared(),
        "flags hold after completion"
    );
    assert_eq!(group.in_flight(), 1);
    latch.open();
    assert_eq!(ready(poll_noop(&mut a)), 10);
    assert_eq!(group.stats().over_capacity, 2);
    assert_eq!(group.len(), 0);
}

/// `max_followers(1)`: the second follower runs alone with its own output; the first gets the
/// leader's.
#[test]
fn flags_under_max_followers() {
    let group: Group<u32> = GroupBuilder::new().max_followers(1).build();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 1u32));
    let mut f1 = group.run(1, never::<u32>(&makes));
    let mut f2 = group.run(1, || async { 2u32 });
    assert!(!f1.is_leader() && !f1.is_alone() && f1.is_shared());
    assert!(f2.is_leader() && f2.is_alone() && !f2.is_shared());
    assert_eq!(ready(poll_noop(&mut f2)), 2);
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), 1);
    assert!(leader.is_shared() && !leader.is_alone());
    assert_eq!(ready(poll_noop(&mut f1)), 1);
    assert_eq!(makes.load(SeqCst), 1);
}

/// A lingering hit: no `make`, ready on its first poll, not a leader, not alone, shared; a hit
/// dropped unpolled changes nothing.
#[test]
fn flags_of_lingering_hits() {
    let group: Group<u32> = GroupBuilder::new()
        .linger(Duration::from_secs(3600))
        .build();
    let makes = counter();
    let m = Arc::clone(&makes);
    let mut leader = group.run(1, move || {
        m.fetch_add(1, SeqCst);
        async { 31u32 }
    });
    assert_eq!(ready(poll_noop(&mut leader)), 31);
    assert!(!leader.is_shared(), "no hit yet");
    drop(group.run(1, never::<u32>(&makes))); // a hit dropped unpolled
    let mut hit = group.run(1, never::<u32>(&makes));
    assert!(!hit.is_leader() && !hit.is_alone() && hit.is_shared());
    let (hc, hw) = counting();
    assert_eq!(ready(poll_with(&mut hit, &hw)), 31);
    assert_eq!(hc.count(), 0, "a ready hit needs no wake");
    assert_eq!(makes.load(SeqCst), 1);
    assert_eq!((group.len(), group.in_flight()), (1, 0));
    assert_eq!(group.stats().lingered, 2);
}

/// Detached: the caller is still the leader; it is woken once, by the spawned driver's publish,
/// as is a follower; afterwards the leader is shared.
#[tokio::test(flavor = "current_thread")]
async fn detached_leader_flags_and_single_wake() {
    let group: Group<u32> = GroupBuilder::new().detached(true).build();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 44u32));
    assert!(leader.is_leader() && !leader.is_alone() && !leader.is_shared());
    let mut follower = group.run(1, never::<u32>(&makes));
    let (lc, lw) = counting();
    let (fc, fw) = counting();
    for _ in 0..3 {
        assert!(poll_with(&mut leader, &lw).is_pending());
        assert!(poll_with(&mut follower, &fw).is_pending());
    }
    latch.open();
    for _ in 0..100 {
        if lc.count() > 0 && fc.count() > 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        (lc.count(), fc.count()),
        (1, 1),
        "each waiter woken exactly once"
    );
    assert_eq!(ready(poll_with(&mut leader, &lw)), 44);
    assert!(leader.is_leader() && leader.is_shared());
    assert_eq!(ready(poll_with(&mut follower, &fw)), 44);
    assert_eq!(makes.load(SeqCst), 1);
    assert_eq!(group.len(), 0);
}

/// Detached: a leader dropped without ever being polled still gets its call run to completion.
#[tokio::test(flavor = "current_thread")]
async fn detached_never_polled_leader_call_still_completes() {
    let group: Group<u32> = GroupBuilder::new().detached(true).build();
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let leader = group.run(1, move || async move {
        tokio::task::yield_now().await;
        d.store(true, SeqCst);
        1u32
    });
    drop(leader);
    for _ in 0..100 {
        if done.load(SeqCst) && group.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(done.load(SeqCst), "a detached call runs to completion");
    assert_eq!(group.len(), 0);
    assert_eq!(group.stats().cancelled, 0);
}

// ---------------------------------------------------------------------------------------------
// Gated start: a new flight of a key whose cancelled call is still being dropped
// ---------------------------------------------------------------------------------------------

/// Rustdoc of `Group::run`: "if the key's previous flight was just cancelled and its future is
/// still being dropped, the new future is not polled until that is done." The new leader is
/// then woken exactly once (even if polled twice meanwhile) when the old future is gone.
#[test]
fn gated_leader_is_not_polled_until_old_future_dropped_then_woken_once() {
    struct BlockOnDrop {
        entered: mpsc::Sender<()>,
        release: Mutex<mpsc::Receiver<()>>,
    }
    impl Drop for BlockOnDrop {
        fn drop(&mut self) {
            let _ = self.entered.send(());
            let _ = self
                .release
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
        }
    }
    let group: Group<u32> = Group::new();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let blocker = BlockOnDrop {
        entered: entered_tx,
        release: Mutex::new(release_rx),
    };
    let mut old = group.run(1, move || async move {
        let _blocker = blocker;
        std::future::pending::<u32>().await
    });
    assert!(poll_noop(&mut old).is_pending());
    let dropper = std::thread::spawn(move || drop(old));
    entered_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("old future's drop started");

    let inner_polls = counter();
    let (makes, ip) = (counter(), Arc::clone(&inner_polls));
    let m = Arc::clone(&makes);
    let mut new = group.run(1, move || {
        m.fetch_add(1, SeqCst);
        async move {
            ip.fetch_add(1, SeqCst);
            9u32
        }
    });
    assert!(new.is_leader(), "a cancelled flight is never joined");
    assert_eq!(makes.load(SeqCst), 1);
    let (c, w) = counting();
    assert!(poll_with(&mut new, &w).is_pending());
    assert!(poll_with(&mut new, &w).is_pending());
    assert_eq!(
        inner_polls.load(SeqCst),
        0,
        "not polled while the old one is dropping"
    );
    release_tx.send(()).unwrap();
    dropper.join().unwrap();
    assert_eq!(
        c.count(),
        1,
        "woken exactly once when the old future is gone"
    );
    assert_eq!(ready(poll_with(&mut new, &w)), 9);
    assert_eq!(inner_polls.load(SeqCst), 1);
    assert_eq!(group.len(), 0);
}

// ---------------------------------------------------------------------------------------------
// Unusual outputs
// ---------------------------------------------------------------------------------------------

static ZST_CLONES: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, PartialEq)]
struct Zst;

impl Clone for Zst {
    fn clone(&self) -> Self {
        ZST_CLONES.fetch_add(1, SeqCst);
        Zst
    }
}

#[test]
fn zero_sized_output_shared_to_every_follower() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, Zst));
    let mut followers: Vec<Run<u32, Zst>> = (0..40).map(|_| group.run(1, never(&makes))).collect();
    for f in &mut followers {
        assert!(poll_noop(f).is_pending());
    }
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)), Zst);
    for f in &mut followers {
        assert_eq!(ready(poll_noop(f)), Zst);
    }
    assert_eq!(ZST_CLONES.load(SeqCst), 40, "one clone per follower");
    let mut unit = group.run(2, || async {});
    assert!(matches!(poll_noop(&mut unit), Poll::Ready(Ok(()))));
}

/// A `!Sync` output (`Cell`): each waiter gets its own independent copy.
#[test]
fn not_sync_output_gives_independent_copies() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, Cell::new(5u32)));
    let mut f1 = group.run(1, never::<Cell<u32>>(&makes));
    let mut f2 = group.run(1, never::<Cell<u32>>(&makes));
    latch.open();
    let a = ready(poll_noop(&mut leader));
    let b = ready(poll_noop(&mut f1));
    let c = ready(poll_noop(&mut f2));
    a.set(100);
    b.set(200);
    assert_eq!((a.get(), b.get(), c.get()), (100, 200, 5));
}

static COUNTED_CLONES: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
struct CountedClone(u32);

impl Clone for CountedClone {
    fn clone(&self) -> Self {
        COUNTED_CLONES.fetch_add(1, SeqCst);
        CountedClone(self.0)
    }
}

/// Without linger, one clone per follower (the leader keeps the original), across more
/// followers than fit in one batch, including some that left before the publish.
#[test]
fn exactly_one_clone_per_remaining_follower() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, CountedClone(3)));
    let mut followers: Vec<Run<u32, CountedClone>> =
        (0..70).map(|_| group.run(1, never(&makes))).collect();
    // Ten leave before the publish.
    followers.truncate(60);
    latch.open();
    assert_eq!(ready(poll_noop(&mut leader)).0, 3);
    assert!(leader.is_shared());
    for f in &mut followers {
        assert_eq!(ready(poll_noop(f)).0, 3);
    }
    assert_eq!(
        COUNTED_CLONES.load(SeqCst),
        60,
        "one clone per follower still waiting"
    );
    assert_eq!(makes.load(SeqCst), 1);
}

/// A large output (32 KiB by value) shared with more followers than one batch.
#[test]
fn large_output_shared_across_batches() {
    within("large output", || {
        let group: Group<u32> = Group::new();
        let (latch, makes) = (Latch::default(), counter());
        let mut big = [0u64; 4096];
        for (i, v) in big.iter_mut().enumerate() {
            *v = i as u64 * 7;
        }
        let mut leader = group.run(1, latched(&latch, &makes, big));
        let mut followers: Vec<Run<u32, [u64; 4096]>> =
            (0..70).map(|_| group.run(1, never(&makes))).collect();
        let wakers: Vec<_> = (0..70).map(|_| counting()).collect();
        for (f, (_, w)) in followers.iter_mut().zip(&wakers) {
            assert!(poll_with(f, w).is_pending());
        }
        latch.open();
        assert!(ready(poll_noop(&mut leader)) == big);
        for (f, (c, w)) in followers.iter_mut().zip(&wakers) {
            assert_eq!(c.count(), 1);
            assert!(ready(poll_with(f, w)) == big);
        }
        assert_eq!(group.len(), 0);
    });
}

/// A follower's waker that panics when woken (it is the executor's code) strands no other
/// follower: the batches after it are still served and woken, and the panic is passed on to
/// the driver afterwards.
#[test]
fn a_panicking_waker_strands_no_other_follower() {
    let group: Group<u32> = Group::new();
    let (latch, makes) = (Latch::default(), counter());
    let mut leader = group.run(1, latched(&latch, &makes, 5u32));
    assert!(poll_noop(&mut leader).is_pending());
    let mut bomb = group.run(1, never::<u32>(&makes));
    let exploding = fn_waker(|| panic!("waker exploded"));
    assert!(poll_with(&mut bomb, &exploding).is_pending());
    // Past the first batch of 32, so that later lock sections must still happen.
    let mut others: Vec<_> = (0..70)
        .map(|_| group.run(1, never::<u32>(&makes)))
        .collect();
    let wakers: Vec<_> = others
        .iter_mut()
        .map(|follower| {
            let (count, waker) = counting();
            assert!(poll_with(follower, &waker).is_pending());
            count
        })
        .collect();
    latch.open();
    let driven = catch_unwind(AssertUnwindSafe(|| poll_noop(&mut leader)));
    assert!(driven.is_err(), "the waker's panic reaches the driver");
    assert!(
        wakers.iter().all(|w| w.count() == 1),
        "every other follower woken once"
    );
    for follower in &mut others {
        assert_eq!(ready(poll_noop(follower)), 5);
    }
    assert_eq!(
        ready(poll_noop(&mut bomb)),
        5,
        "its follower was served too"
    );
    assert_eq!(makes.load(SeqCst), 1);
    assert_eq!((group.len(), group.in_flight()), (0, 0));
}

/// The same when a failed call is handed to its followers to retry: a panicking waker keeps
/// none of the others from being woken to elect the next driver.
#[test]
fn a_panicking_waker_strands_no_retry() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let (latch, makes) = (Latch::default(), counter());
    let failing = {
        let (latch, makes) = (latch.clone(), Arc::clone(&makes));
        move || -> BoxFut<Result<u32, &'static str>> {
            makes.fetch_add(1, SeqCst);
            Box::pin(async move {
                latch.wait().await;
                Err("first attempt")
            })
        }
    };
    let mut leader = group.run_retryable(1, failing);
    assert!(poll_noop(&mut leader).is_pending());
    let retry = || {
        let makes = Arc::clone(&makes);
        move || -> BoxFut<Result<u32, &'static str>> {
            makes.fetch_add(1, SeqCst);
            Box::pin(async { Ok(9) })
        }
    };
    let mut bomb = group.run_retryable(1, retry());
    let exploding = fn_waker(|| panic!("waker exploded"));
    assert!(poll_with(&mut bomb, &exploding).is_pending());
    let mut other = group.run_retryable(1, retry());
    let (count, waker) = counting();
    assert!(poll_with(&mut other, &waker).is_pending());
    latch.open();
    let driven = catch_unwind(AssertUnwindSafe(|| poll_noop(&mut leader)));
    assert!(
        driven.is_err(),
        "the waker's panic reaches the failed driver"
    );
    assert_eq!(count.count(), 1, "the other follower is woken to retry");
    assert_eq!(ready(poll_noop(&mut other)), Ok(9));
    assert_eq!(ready(poll_noop(&mut bomb)), Ok(9));
    assert_eq!(makes.load(SeqCst), 2, "one failed call, one retry");
    assert_eq!((group.len(), group.in_flight()), (0, 0));
}
