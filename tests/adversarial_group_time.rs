//! Black-box adversarial tests of option interplay over time, and of the registry and its
//! counters afterwards: `linger` / `linger_errors` windows at their boundaries, `forget` and
//! `purge_expired` racing new flights, `max_in_flight` / `max_followers` places being taken and
//! given back, `retry_failed` with followers that come and go, the layer's follower wait
//! limit, and `detached` flights with nobody waiting.
//!
//! Deterministic: time is paused and moved only by `tokio::time::advance`; every backend call
//! is counted, and the gated ones end when the test opens their gate. No sleep synchronises
//! anything. Every test ends by checking that the registry is empty (`len`, `in_flight`,
//! `is_empty`, `Stats::in_flight`) once its flights are over and its windows have passed, and
//! that the counters add up as `Stats` documents them.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::poll;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower::{Service, ServiceExt};
use tower_coalesce::{
    CoalesceError, CoalesceLayer, CoalesceService, Group, GroupBuilder, OnTimeout, Panicked, Run,
    Stats,
};
use tower_layer::Layer;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

const NS: Duration = Duration::from_nanos(1);
const MS: Duration = Duration::from_millis(1);
const WINDOW: Duration = Duration::from_millis(100);
/// Far beyond every window used here, on the paused clock: a wait that hangs fails.
const LIMIT: Duration = Duration::from_secs(24 * 3600);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// Lets the spawned tasks run until they are all parked (no clock involved).
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

/// Moves the paused clock by `d`, then lets the woken tasks run.
async fn advance(d: Duration) {
    tokio::time::advance(d).await;
    settle().await;
}

#[derive(Default)]
struct Tally {
    made: AtomicUsize,
    finished: AtomicUsize,
    dropped: AtomicUsize,
}

/// Counts every call made through it; gated calls end when the test says so.
#[derive(Clone, Default)]
struct Backend(Arc<Tally>);

/// Ends one gated call.
struct Gate<T>(oneshot::Sender<Option<T>>);

impl<T> Gate<T> {
    fn open(self, v: T) {
        let _ = self.0.send(Some(v));
    }
    fn panic(self) {
        let _ = self.0.send(None);
    }
}

/// Alive while a call's future is; tells a call that ended from one dropped unfinished.
struct Live {
    tally: Arc<Tally>,
    done: bool,
}

impl Drop for Live {
    fn drop(&mut self) {
        let counter = match self.done {
            true => &self.tally.finished,
            false => &self.tally.dropped,
        };
        counter.fetch_add(1, SeqCst);
    }
}

impl Backend {
    /// Calls made (each `make` called).
    fn made(&self) -> usize {
        self.0.made.load(SeqCst)
    }
    /// Calls whose future ran to its end (output or panic).
    fn finished(&self) -> usize {
        self.0.finished.load(SeqCst)
    }
    /// Calls whose future was dropped before its end: cancelled.
    fn dropped(&self) -> usize {
        self.0.dropped.load(SeqCst)
    }

    /// A call that ends when the returned gate is opened (or panics when told to).
    fn gated<T: Send + 'static>(&self) -> (Gate<T>, impl FnOnce() -> BoxFut<T> + Send + 'static) {
        let (tx, rx) = oneshot::channel::<Option<T>>();
        let tally = self.0.clone();
        let make = move || {
            tally.made.fetch_add(1, SeqCst);
            let live = Live { tally, done: false };
            Box::pin(async move {
                let mut live = live;
                let out = rx.await;
                live.done = true;
                match out {
                    Ok(Some(v)) => v,
                    _ => panic!("told to panic"),
                }
            }) as BoxFut<T>
        };
        (Gate(tx), make)
    }

    /// A `u32` call that ends when the returned gate is opened.
    fn gate(&self) -> (Gate<u32>, impl FnOnce() -> BoxFut<u32> + Send + 'static) {
        self.gated()
    }

    /// A `u32` call that answers `v` at once.
    fn val(&self, v: u32) -> impl FnOnce() -> BoxFut<u32> + Send + 'static {
        self.ready(v)
    }

    /// A call that answers `v` at once.
    fn ready<T: Send + 'static>(&self, v: T) -> impl FnOnce() -> BoxFut<T> + Send + 'static {
        let tally = self.0.clone();
        move || {
            tally.made.fetch_add(1, SeqCst);
            let live = Live { tally, done: false };
            Box::pin(async move {
                let mut live = live;
                live.done = true;
                v
            }) as BoxFut<T>
        }
    }

    /// A call whose future panics with `msg` when polled.
    fn panics<T: Send + 'static>(
        &self,
        msg: &'static str,
    ) -> impl FnOnce() -> BoxFut<T> + Send + 'static {
        let tally = self.0.clone();
        move || {
            tally.made.fetch_add(1, SeqCst);
            let live = Live { tally, done: false };
            Box::pin(explode::<T>(live, msg)) as BoxFut<T>
        }
    }
}

async fn explode<T>(mut live: Live, msg: &'static str) -> T {
    live.done = true;
    panic!("{msg}")
}

type Res = Result<u32, &'static str>;

fn spawn<T: Clone + Send + 'static>(run: Run<u32, T>) -> JoinHandle<Result<T, Panicked>> {
    tokio::spawn(run)
}

async fn join<T>(what: &str, task: JoinHandle<T>) -> T {
    bounded(what, task).await.expect("task panicked")
}

/// Requests accounted for by the counters, as `Stats` documents them: each keyed request led a
/// flight, followed one, hit a lingering output or ran alone over capacity; `leaders` also
/// counts retries, which are not requests.
fn requests(s: &Stats) -> u64 {
    s.leaders - s.retried + s.followers + s.lingered + s.bypassed + s.over_capacity
}

/// The counters' own identities, true of every snapshot.
fn assert_adds_up(s: &Stats, requests_made: u64) {
    assert_eq!(
        s.fell_through,
        s.over_capacity + s.timed_out + s.released,
        "fell_through = over_capacity + timed_out + released: {s:?}"
    );
    assert!(s.retried <= s.leaders, "retries are leaders: {s:?}");
    assert_eq!(
        requests(s),
        requests_made,
        "every request counted once: {s:?}"
    );
}

/// Nothing left: no flight, no entry, once windows have passed and are purged.
fn assert_clean<K>(group: &Group<K>) {
    group.purge_expired();
    assert_eq!(group.len(), 0, "entries left in the registry");
    assert!(group.is_empty());
    assert_eq!(group.in_flight(), 0, "flights left running");
    assert_eq!(group.stats().in_flight, 0);
}

// ---------------------------------------------------------------------------------------------
// linger: the window's boundaries
// ---------------------------------------------------------------------------------------------

/// A success lingers for exactly `window`: a hit 1ns before its end, a new flight at its end.
#[tokio::test(start_paused = true)]
async fn linger_serves_until_window_minus_1ns_and_calls_again_at_the_window() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    assert_eq!(group.run(1, b.val(10)).await.unwrap(), 10);
    assert_eq!(
        (group.len(), group.in_flight()),
        (1, 0),
        "lingering, not running"
    );

    advance(WINDOW - NS).await;
    let mut hit = group.run(1, b.val(11));
    assert!(
        !hit.is_leader() && hit.is_shared(),
        "a lingering hit is shared, no leader"
    );
    assert_eq!((&mut hit).await.unwrap(), 10);
    assert_eq!(b.made(), 1, "no call within the window");

    advance(NS).await;
    let mut fresh = group.run(1, b.val(12));
    assert!(
        fresh.is_leader(),
        "at the window's end a caller leads a new flight"
    );
    assert_eq!((&mut fresh).await.unwrap(), 12);
    assert_eq!(b.made(), 2);

    let s = group.stats();
    assert_eq!((s.leaders, s.lingered, s.followers), (2, 1, 0));
    assert_adds_up(&s, 3);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// The window starts when the flight finishes, not when it started: a 50ms call lingers until
/// 150ms.
#[tokio::test(start_paused = true)]
async fn linger_window_counts_from_completion_not_from_start() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    let leader = spawn(group.run(1, make));
    advance(Duration::from_millis(50)).await;
    gate.open(1);
    assert_eq!(join("leader", leader).await.unwrap(), 1);

    advance(WINDOW - NS).await; // 150ms - 1ns from the start
    assert_eq!(
        group.run(1, b.val(2)).await.unwrap(),
        1,
        "still in its window"
    );
    advance(NS).await;
    assert_eq!(group.run(1, b.val(3)).await.unwrap(), 3, "window over");
    assert_eq!(b.made(), 2);
    assert_adds_up(&group.stats(), 3);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// `len` counts an expired output until it is purged; `purge_expired` before the window ends
/// keeps it, at the window's end drops it. `in_flight` never counts it.
#[tokio::test(start_paused = true)]
async fn purge_expired_drops_at_the_window_not_before_and_len_counts_until_then() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    group.run(7, b.val(7)).await.unwrap();

    advance(WINDOW - NS).await;
    group.purge_expired();
    assert_eq!((group.len(), group.in_flight()), (1, 0), "not expired yet");

    advance(NS).await;
    assert_eq!(
        group.len(),
        1,
        "expired but not purged: still counted by len"
    );
    assert_eq!(group.in_flight(), 0);
    group.purge_expired();
    assert!(
        group.is_empty(),
        "purge_expired drops it at the window's end"
    );
    assert_eq!(group.stats().lingered, 0);
    assert_clean(&group);
}

/// A caller right at the expiry starts a new flight; that flight's entry replaces the expired
/// output (len 1, not 2), survives `purge_expired` while it runs, is joined (no stale join to
/// the old output) and then lingers with its own output for its own window.
#[tokio::test(start_paused = true)]
async fn new_flight_at_expiry_replaces_the_old_output_and_survives_purges() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    group.run(1, b.val(1)).await.unwrap();
    advance(WINDOW).await;

    let (gate, make) = b.gate();
    let second = group.run(1, make);
    assert!(second.is_leader(), "expired output is never joined");
    let second = spawn(second);
    assert_eq!((group.len(), group.in_flight()), (1, 1));
    advance(WINDOW * 3).await; // long past the old output's expiry, several times over
    group.purge_expired();
    assert_eq!(
        (group.len(), group.in_flight()),
        (1, 1),
        "purge leaves a running flight"
    );

    let joiner = group.run(1, b.val(99));
    assert!(!joiner.is_leader(), "joins the running flight");
    let joiner = spawn(joiner);
    settle().await;
    gate.open(2);
    assert_eq!(join("second", second).await.unwrap(), 2);
    assert_eq!(join("joiner", joiner).await.unwrap(), 2);
    assert_eq!(b.made(), 2);

    advance(WINDOW - NS).await;
    assert_eq!(
        group.run(1, b.val(3)).await.unwrap(),
        2,
        "lingers its own window"
    );
    let s = group.stats();
    assert_eq!((s.leaders, s.followers, s.lingered), (2, 1, 1));
    assert_adds_up(&s, 4);
    advance(NS).await;
    assert_clean(&group);
}

/// `linger_errors` is its own, shorter window; successes keep `linger`'s.
#[tokio::test(start_paused = true)]
async fn linger_errors_window_is_distinct_from_linger() {
    let short = Duration::from_millis(10);
    let group: Group<u32> = GroupBuilder::new()
        .linger(WINDOW)
        .linger_errors(short)
        .build();
    let b = Backend::default();
    let out: Res = group.run_result(1, b.ready(Err("e1"))).await.unwrap();
    assert_eq!(out, Err("e1"));
    advance(short - NS).await;
    let out: Res = group.run_result(1, b.ready(Ok(5))).await.unwrap();
    assert_eq!(out, Err("e1"), "error lingers within linger_errors' window");
    advance(NS).await;
    let out: Res = group.run_result(1, b.ready(Ok(5))).await.unwrap();
    assert_eq!(out, Ok(5), "error window over: new flight");
    advance(WINDOW - NS).await;
    let out: Res = group.run_result(1, b.ready(Err("e2"))).await.unwrap();
    assert_eq!(
        out,
        Ok(5),
        "success lingers for linger's window, not linger_errors'"
    );
    advance(NS).await;
    let out: Res = group.run_result(1, b.ready(Err("e3"))).await.unwrap();
    assert_eq!(out, Err("e3"));
    assert_eq!(b.made(), 3);

    let s = group.stats();
    assert_eq!((s.leaders, s.lingered, s.errors), (3, 2, 2));
    assert_adds_up(&s, 5);
    advance(short).await;
    assert_clean(&group);
}

/// Through `run` (not `run_result`), an `Err` output is not judged a failure: it counts no
/// error and lingers for `linger`'s window, with no `linger_errors` set.
#[tokio::test(start_paused = true)]
async fn err_output_through_run_is_a_success_for_linger_and_stats() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    let out: Res = group.run(1, b.ready(Err("plain"))).await.unwrap();
    assert_eq!(out, Err("plain"));
    advance(WINDOW - NS).await;
    let out: Res = group.run(1, b.ready(Ok(1))).await.unwrap();
    assert_eq!(out, Err("plain"), "lingers as a success");
    assert_eq!(group.stats().errors, 0);
    assert_eq!(b.made(), 1);
    advance(NS).await;
    assert_clean(&group);
}

/// A panicking leader: with `linger` alone nothing lingers (the next caller calls anew); with
/// `linger_errors` the panic lingers for that window, same message, no call.
#[tokio::test(start_paused = true)]
async fn panic_lingers_only_under_linger_errors() {
    let b = Backend::default();
    let plain: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let err = plain
        .run::<u32, _, _>(1, b.panics("kaboom"))
        .await
        .unwrap_err();
    assert_eq!(err.message(), "kaboom");
    assert!(
        plain.is_empty(),
        "a panic does not linger under linger alone"
    );
    assert_eq!(plain.run(1, b.val(2)).await.unwrap(), 2);
    assert_eq!(b.made(), 2);
    assert_eq!(plain.stats().panics, 1);
    advance(WINDOW).await;
    assert_clean(&plain);

    let b = Backend::default();
    let short = Duration::from_millis(10);
    let keeps: Group<u32> = GroupBuilder::new()
        .linger(WINDOW)
        .linger_errors(short)
        .build();
    keeps
        .run::<u32, _, _>(1, b.panics("kaboom"))
        .await
        .unwrap_err();
    advance(short - NS).await;
    let again = keeps.run(1, b.val(3)).await.unwrap_err();
    assert_eq!(again.message(), "kaboom", "the same panic, lingering");
    assert_eq!(b.made(), 1);
    advance(NS).await;
    assert_eq!(keeps.run(1, b.val(4)).await.unwrap(), 4);
    let s = keeps.stats();
    assert_eq!((s.panics, s.lingered, s.leaders), (1, 1, 2));
    assert_adds_up(&s, 3);
    advance(WINDOW).await;
    assert_clean(&keeps);
}

/// Followers still waiting when the flight ends all get its output; then the output lingers
/// (no flight counted running) and serves hits until its window ends.
#[tokio::test(start_paused = true)]
async fn linger_after_waiting_followers_then_hits_then_expiry() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    let leader = spawn(group.run(1, make));
    let followers: Vec<_> = (0..3).map(|_| spawn(group.run(1, b.val(0)))).collect();
    settle().await;
    assert_eq!((group.len(), group.in_flight()), (1, 1));
    advance(Duration::from_millis(30)).await;
    gate.open(42);
    assert_eq!(join("leader", leader).await.unwrap(), 42);
    for f in followers {
        assert_eq!(join("follower", f).await.unwrap(), 42);
    }
    assert_eq!((group.len(), group.in_flight()), (1, 0));
    for _ in 0..4 {
        advance(Duration::from_millis(20)).await;
        assert_eq!(group.run(1, b.val(0)).await.unwrap(), 42);
    }
    advance(Duration::from_millis(20)).await; // 100ms after completion
    assert_eq!(group.run(1, b.val(43)).await.unwrap(), 43);
    assert_eq!(b.made(), 2);
    let s = group.stats();
    assert_eq!((s.leaders, s.followers, s.lingered), (2, 3, 4));
    assert_adds_up(&s, 9);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// A flight whose waiters all left is cancelled: nothing lingers, the key is free at once.
#[tokio::test(start_paused = true)]
async fn cancelled_flight_leaves_nothing_to_linger() {
    let group: Group<u32> = GroupBuilder::new()
        .linger(WINDOW)
        .linger_errors(WINDOW)
        .build();
    let b = Backend::default();
    let (_gate, make) = b.gate();
    let mut leader = group.run(1, make);
    let mut follower = group.run(1, b.val(0));
    assert!(poll!(&mut leader).is_pending());
    assert!(poll!(&mut follower).is_pending());
    drop(leader);
    assert_eq!(b.dropped(), 0, "the follower still wants it");
    drop(follower);
    assert_eq!(b.dropped(), 1, "last waiter gone: the call is dropped");
    assert!(group.is_empty(), "and nothing lingers");
    assert_eq!(group.run(1, b.val(5)).await.unwrap(), 5);
    let s = group.stats();
    assert_eq!(
        (s.cancelled, s.leaders, s.followers, s.lingered),
        (1, 2, 1, 0)
    );
    assert_adds_up(&s, 3);
    advance(WINDOW).await;
    assert_clean(&group);
}

// ---------------------------------------------------------------------------------------------
// forget
// ---------------------------------------------------------------------------------------------

/// `forget` mid-flight: its waiters still get its output; the next caller starts a new flight;
/// the old flight ending removes neither the new entry nor lets the new one be replaced.
#[tokio::test(start_paused = true)]
async fn forget_mid_flight_old_completion_leaves_the_new_flight_registered() {
    let group: Group<u32> = Group::new();
    let b = Backend::default();
    let (old_gate, old_make) = b.gate();
    let old_leader = spawn(group.run(1, old_make));
    let old_follower = spawn(group.run(1, b.val(0)));
    settle().await;
    assert!(group.forget(&1));

    let (new_gate, new_make) = b.gate();
    let new_leader = group.run(1, new_make);
    assert!(
        new_leader.is_leader(),
        "after forget a caller starts a new flight"
    );
    let new_leader = spawn(new_leader);
    settle().await;
    assert_eq!(b.made(), 2);
    // `len` counts running flights: the forgotten one runs on (for its waiters) beside the new
    // one; `in_flight` counts only the registered one.
    assert_eq!((group.len(), group.in_flight()), (2, 1));

    old_gate.open(1);
    assert_eq!(join("old leader", old_leader).await.unwrap(), 1);
    assert_eq!(join("old follower", old_follower).await.unwrap(), 1);
    assert_eq!(group.in_flight(), 1, "the new flight is still counted");
    assert_eq!(group.len(), 1, "the old flight removed its own entry only");

    let joiner = group.run(1, b.val(0));
    assert!(!joiner.is_leader(), "the new flight is still joinable");
    let joiner = spawn(joiner);
    settle().await;
    new_gate.open(2);
    assert_eq!(join("new leader", new_leader).await.unwrap(), 2);
    assert_eq!(join("joiner", joiner).await.unwrap(), 2);
    assert_eq!(b.made(), 2);
    let s = group.stats();
    assert_eq!((s.leaders, s.followers, s.forgotten), (2, 2, 1));
    assert_adds_up(&s, 4);
    assert_clean(&group);
}

/// Under `linger`, a flight forgotten mid-flight publishes to its waiters but leaves no
/// lingering output: forgetting means the next caller calls anew.
#[tokio::test(start_paused = true)]
async fn forgotten_flight_output_does_not_linger() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    let leader = spawn(group.run(1, make));
    settle().await;
    assert!(group.forget(&1));
    gate.open(1);
    assert_eq!(join("leader", leader).await.unwrap(), 1);
    assert!(group.is_empty(), "a forgotten flight does not linger");
    assert_eq!(group.run(1, b.val(2)).await.unwrap(), 2, "a fresh call");
    assert_eq!(b.made(), 2);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// Under `linger`, the forgotten flight ending while a newer flight of the key runs must not
/// put its output in the registry over the newer one: the newer flight's own output lingers.
#[tokio::test(start_paused = true)]
async fn forgotten_flight_ending_under_linger_does_not_shadow_the_newer_flight() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    let (old_gate, old_make) = b.gate();
    let old = spawn(group.run(1, old_make));
    settle().await;
    group.forget(&1);
    let (new_gate, new_make) = b.gate();
    let new = spawn(group.run(1, new_make));
    settle().await;
    old_gate.open(1);
    assert_eq!(join("old", old).await.unwrap(), 1);
    assert_eq!((group.len(), group.in_flight()), (1, 1));
    let joiner = group.run(1, b.val(0));
    assert!(!joiner.is_leader(), "the newer flight, not the old output");
    let joiner = spawn(joiner);
    settle().await;
    new_gate.open(2);
    assert_eq!(join("new", new).await.unwrap(), 2);
    assert_eq!(join("joiner", joiner).await.unwrap(), 2);
    assert_eq!(
        group.run(1, b.val(0)).await.unwrap(),
        2,
        "the newer output lingers"
    );
    assert_eq!(b.made(), 2);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// A lingering output forgotten, then a new flight that outlives the old output's expiry and
/// lingers with its own: the old expiry removes nothing of it; its own expiry does.
#[tokio::test(start_paused = true)]
async fn old_expiry_after_forget_spares_the_newer_lingering_output() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    group.run(1, b.val(1)).await.unwrap(); // lingers until t=100
    advance(Duration::from_millis(40)).await;
    assert!(group.forget(&1));
    assert!(group.is_empty(), "forget drops a lingering output at once");
    let (gate, make) = b.gate();
    let newer = spawn(group.run(1, make));
    advance(Duration::from_millis(20)).await;
    gate.open(2); // ends at t=60, lingers until t=160
    assert_eq!(join("newer", newer).await.unwrap(), 2);
    advance(Duration::from_millis(40)).await; // t=100: the old output's expiry
    group.purge_expired();
    assert_eq!(group.len(), 1, "the old expiry spares the newer output");
    assert_eq!(group.run(1, b.val(3)).await.unwrap(), 2);
    advance(Duration::from_millis(60) - NS).await; // t=160-1ns
    assert_eq!(group.run(1, b.val(3)).await.unwrap(), 2);
    advance(NS).await;
    group.purge_expired();
    assert!(group.is_empty(), "gone at its own expiry");
    assert_eq!(b.made(), 2);
    let s = group.stats();
    assert_eq!((s.forgotten, s.lingered), (1, 2));
    assert_adds_up(&s, 4);
    assert_clean(&group);
}

/// `forget` reports whether it removed something: a running flight once (a second `forget`
/// finds nothing joinable to remove), nothing for an unknown key or a finished flight.
#[tokio::test(start_paused = true)]
async fn forget_returns_true_once_per_entry_and_counts_once() {
    let group: Group<u32> = Group::new();
    let b = Backend::default();
    assert!(!group.forget(&1), "nothing there");
    let (gate, make) = b.gate();
    let leader = spawn(group.run(1, make));
    settle().await;
    assert!(group.forget(&1));
    assert!(!group.forget(&1), "already forgotten");
    gate.open(1);
    join("leader", leader).await.unwrap();
    assert!(!group.forget(&1), "finished: nothing there");
    assert_eq!(group.stats().forgotten, 1);
    assert_clean(&group);
}

// ---------------------------------------------------------------------------------------------
// max_in_flight
// ---------------------------------------------------------------------------------------------

/// At the bound, a new key runs alone: unregistered, unjoinable (a second caller of that key
/// runs alone too), never waiting; followers of a registered key still join.
#[tokio::test(start_paused = true)]
async fn max_in_flight_new_keys_run_alone_and_unjoinable_followers_still_join() {
    let group: Group<u32> = GroupBuilder::new().max_in_flight(1).build();
    let b = Backend::default();
    let (gate_a, make_a) = b.gate();
    let a = spawn(group.run(1, make_a));
    let a_follower = group.run(1, b.val(0));
    assert!(!a_follower.is_leader() && !a_follower.is_alone());
    let a_follower = spawn(a_follower);

    let (gate_b, make_b) = b.gate();
    let b1 = group.run(2, make_b);
    assert!(b1.is_alone() && b1.is_leader(), "over max_in_flight: alone");
    let b1 = spawn(b1);
    let (gate_c, make_c) = b.gate();
    let b2 = group.run(2, make_c);
    assert!(b2.is_alone(), "an alone call cannot be joined");
    let b2 = spawn(b2);
    settle().await;
    assert_eq!(b.made(), 3);
    assert_eq!(
        (group.len(), group.in_flight()),
        (1, 1),
        "alone calls are not registered"
    );

    gate_c.open(22);
    gate_b.open(21);
    assert_eq!(join("b1", b1).await.unwrap(), 21, "its own output");
    assert_eq!(join("b2", b2).await.unwrap(), 22, "its own output");
    gate_a.open(1);
    assert_eq!(join("a", a).await.unwrap(), 1);
    assert_eq!(join("a follower", a_follower).await.unwrap(), 1);

    let s = group.stats();
    assert_eq!(
        (s.leaders, s.followers, s.over_capacity, s.fell_through),
        (1, 1, 2, 2)
    );
    assert_adds_up(&s, 4);
    assert_clean(&group);
}

/// The place frees when the flight completes, and when it is cancelled (last waiter gone);
/// a lingering output holds none.
#[tokio::test(start_paused = true)]
async fn max_in_flight_place_frees_on_completion_cancellation_and_linger() {
    let group: Group<u32> = GroupBuilder::new().max_in_flight(1).linger(WINDOW).build();
    let b = Backend::default();
    let (_gate, make) = b.gate();
    let mut a = group.run(1, make);
    assert!(poll!(&mut a).is_pending());
    assert!(group.run(2, Backend::default().val(0)).is_alone());
    drop(a); // cancelled
    assert_eq!(b.dropped(), 1);
    assert_eq!(group.in_flight(), 0);

    let c = group.run(2, b.val(2));
    assert!(!c.is_alone(), "a cancelled flight gave its place back");
    assert_eq!(c.await.unwrap(), 2);
    assert_eq!(
        (group.len(), group.in_flight()),
        (1, 0),
        "key 2 lingers, holding no place"
    );
    let d = group.run(3, b.val(3));
    assert!(!d.is_alone(), "a lingering output holds no place");
    assert_eq!(d.await.unwrap(), 3);

    let s = group.stats();
    assert_eq!((s.over_capacity, s.cancelled, s.leaders), (1, 1, 3));
    assert_adds_up(&s, 4);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// `forget`'s doc: the next call for the key starts a new flight. At `max_in_flight(1)` that
/// must still be a registered flight (joinable), not a call alone behind the forgotten one.
#[tokio::test(start_paused = true)]
async fn max_in_flight_after_forget_the_key_gets_a_registered_flight() {
    let group: Group<u32> = GroupBuilder::new().max_in_flight(1).build();
    let b = Backend::default();
    let (old_gate, old_make) = b.gate();
    let old = spawn(group.run(1, old_make));
    settle().await;
    assert!(group.forget(&1));
    assert_eq!(
        group.in_flight(),
        0,
        "a forgotten flight is no longer counted"
    );
    let (new_gate, new_make) = b.gate();
    let new = group.run(1, new_make);
    assert!(new.is_leader() && !new.is_alone());
    let new = spawn(new);
    let joiner = group.run(1, b.val(0));
    assert!(!joiner.is_alone() && !joiner.is_leader());
    let joiner = spawn(joiner);
    settle().await;
    old_gate.open(1);
    new_gate.open(2);
    assert_eq!(join("old", old).await.unwrap(), 1);
    assert_eq!(join("new", new).await.unwrap(), 2);
    assert_eq!(join("joiner", joiner).await.unwrap(), 2);
    let s = group.stats();
    assert_eq!((s.over_capacity, s.leaders, s.followers), (0, 2, 1));
    assert_adds_up(&s, 3);
    assert_clean(&group);
}

/// A call run alone (over `max_in_flight`) is nobody's flight: its output does not linger.
#[tokio::test(start_paused = true)]
async fn max_in_flight_alone_output_does_not_linger() {
    let group: Group<u32> = GroupBuilder::new().max_in_flight(1).linger(WINDOW).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    let a = spawn(group.run(1, make));
    settle().await;
    let alone = group.run(2, b.val(20));
    assert!(alone.is_alone());
    assert_eq!(alone.await.unwrap(), 20);
    assert_eq!(group.len(), 1, "only key 1's flight");
    gate.open(1);
    join("a", a).await.unwrap();
    let next = group.run(2, b.val(21));
    assert!(next.is_leader() && !next.is_alone());
    assert_eq!(
        next.await.unwrap(),
        21,
        "no lingering copy of the alone call"
    );
    assert_eq!(b.made(), 3);
    advance(WINDOW).await;
    assert_clean(&group);
}

// ---------------------------------------------------------------------------------------------
// max_followers
// ---------------------------------------------------------------------------------------------

/// Over `max_followers` a caller runs alone with its own output; a follower leaving frees its
/// place for the next one.
#[tokio::test(start_paused = true)]
async fn max_followers_extra_runs_alone_and_a_leaving_follower_frees_its_place() {
    let group: Group<u32> = GroupBuilder::new().max_followers(2).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    let leader = spawn(group.run(1, make));
    let f1 = spawn(group.run(1, b.val(0)));
    let mut f2 = group.run(1, b.val(0));
    assert!(!f2.is_alone());
    assert!(poll!(&mut f2).is_pending());
    let extra = group.run(1, b.val(30));
    assert!(extra.is_alone() && extra.is_leader());
    assert_eq!(extra.await.unwrap(), 30, "its own call");
    drop(f2);
    let f3 = group.run(1, b.val(0));
    assert!(!f3.is_alone(), "the place f2 left is free");
    let f3 = spawn(f3);
    settle().await;
    gate.open(1);
    assert_eq!(join("leader", leader).await.unwrap(), 1);
    assert_eq!(join("f1", f1).await.unwrap(), 1);
    assert_eq!(join("f3", f3).await.unwrap(), 1);
    assert_eq!(b.made(), 2);
    let s = group.stats();
    assert_eq!((s.followers, s.over_capacity, s.fell_through), (3, 1, 1));
    assert_adds_up(&s, 5);
    assert_clean(&group);
}

/// `max_followers(0)` with `linger`: a concurrent second caller runs alone, but lingering hits
/// are not followers and are all served from the window.
#[tokio::test(start_paused = true)]
async fn max_followers_zero_does_not_limit_lingering_hits() {
    let group: Group<u32> = GroupBuilder::new().max_followers(0).linger(WINDOW).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    let leader = spawn(group.run(1, make));
    let second = group.run(1, b.val(2));
    assert!(second.is_alone());
    assert_eq!(second.await.unwrap(), 2);
    gate.open(1);
    join("leader", leader).await.unwrap();
    for _ in 0..5 {
        let hit = group.run(1, b.val(9));
        assert!(!hit.is_alone() && !hit.is_leader());
        assert_eq!(hit.await.unwrap(), 1);
    }
    assert_eq!(b.made(), 2);
    let s = group.stats();
    assert_eq!((s.lingered, s.over_capacity, s.followers), (5, 1, 0));
    assert_adds_up(&s, 7);
    advance(WINDOW).await;
    assert_clean(&group);
}

// ---------------------------------------------------------------------------------------------
// retry_failed
// ---------------------------------------------------------------------------------------------

/// The leader's call fails; one follower retries for all; the leader keeps its error, the
/// followers get the retry's success, which is what lingers.
#[tokio::test(start_paused = true)]
async fn retry_success_lingers_not_the_leaders_error() {
    let group: Group<u32> = GroupBuilder::new()
        .retry_failed(1)
        .linger(WINDOW)
        .linger_errors(WINDOW)
        .build();
    let b = Backend::default();
    let (lead_gate, lead_make) = b.gated::<Res>();
    let leader = spawn(group.run_retryable(1, lead_make));
    let (g1, m1) = b.gated::<Res>();
    let (g2, m2) = b.gated::<Res>();
    let f1 = spawn(group.run_retryable(1, m1));
    let f2 = spawn(group.run_retryable(1, m2));
    settle().await;
    lead_gate.open(Err("flaky"));
    assert_eq!(join("leader", leader).await.unwrap(), Err("flaky"));
    settle().await;
    assert_eq!(b.made(), 2, "exactly one follower retries");
    assert_eq!(group.in_flight(), 1, "the retry is the same flight's place");
    g1.open(Ok(7));
    g2.open(Ok(7));
    assert_eq!(join("f1", f1).await.unwrap(), Ok(7));
    assert_eq!(join("f2", f2).await.unwrap(), Ok(7));
    let out: Res = group.run_result(1, b.ready(Err("x"))).await.unwrap();
    assert_eq!(out, Ok(7), "the retry's success lingers");
    let s = group.stats();
    assert_eq!((s.leaders, s.retried, s.errors, s.followers), (2, 1, 1, 2));
    assert_eq!(s.lingered, 1);
    assert_adds_up(&s, 4);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// `retry_failed(2)`: three attempts fail. Each retrier gets its own call's error; the
/// follower that never retried gets the last attempt's error; nothing is left behind.
#[tokio::test(start_paused = true)]
async fn retries_exhausted_retriers_get_their_own_error_the_rest_the_last() {
    const ERRS: [&str; 3] = ["a0", "a1", "a2"];
    let group: Group<u32> = GroupBuilder::new().retry_failed(2).build();
    let b0 = Backend::default();
    let leader = spawn(group.run_retryable(1, b0.ready(Err::<u32, _>("e0"))));
    // One backend and gate per follower, to see who retries when.
    let backends: Vec<Backend> = (0..3).map(|_| Backend::default()).collect();
    let mut gates = Vec::new();
    let mut followers = Vec::new();
    for b in &backends {
        let (gate, make) = b.gated::<Res>();
        gates.push(Some(gate));
        followers.push(spawn(group.run_retryable(1, make)));
    }
    assert_eq!(join("leader", leader).await.unwrap(), Err("e0"));
    let mut order = Vec::new();
    for _attempt in 0..2 {
        settle().await;
        let now: Vec<usize> = (0..3)
            .filter(|i| backends[*i].made() == 1 && !order.contains(i))
            .collect();
        assert_eq!(now.len(), 1, "one retry at a time: {now:?}");
        order.push(now[0]);
        gates[now[0]].take().unwrap().open(Err(ERRS[now[0]]));
    }
    settle().await;
    let total: usize = backends.iter().map(Backend::made).sum();
    assert_eq!(total, 2, "two retries, no third");
    let last = ERRS[order[1]];
    for (i, f) in followers.into_iter().enumerate() {
        let out = join("follower", f).await.unwrap();
        let want = if order.contains(&i) { ERRS[i] } else { last };
        assert_eq!(out, Err(want), "follower {i} (retriers: {order:?})");
    }
    let s = group.stats();
    assert_eq!((s.leaders, s.retried, s.errors, s.followers), (3, 2, 3, 3));
    assert_adds_up(&s, 4);
    assert_clean(&group);
}

/// A caller arriving while a retry runs joins the retry: no third call, and with
/// `linger_errors` it is not served the failed attempt's error.
#[tokio::test(start_paused = true)]
async fn caller_arriving_during_a_retry_joins_it_and_never_gets_the_failed_attempt() {
    let group: Group<u32> = GroupBuilder::new()
        .retry_failed(1)
        .linger_errors(WINDOW)
        .build();
    let b = Backend::default();
    let (lead_gate, lead_make) = b.gated::<Res>();
    let leader = spawn(group.run_retryable(1, lead_make));
    let (retry_gate, retry_make) = b.gated::<Res>();
    let follower = spawn(group.run_retryable(1, retry_make));
    settle().await;
    lead_gate.open(Err("first"));
    assert_eq!(join("leader", leader).await.unwrap(), Err("first"));
    settle().await;
    assert_eq!(b.made(), 2, "the retry runs");
    assert_eq!(group.len(), 1);

    let late = group.run_retryable(1, b.ready(Ok::<u32, &str>(99)));
    assert!(!late.is_leader(), "joins the running retry");
    let late = spawn(late);
    settle().await;
    assert_eq!(b.made(), 2);
    retry_gate.open(Ok(5));
    assert_eq!(join("follower", follower).await.unwrap(), Ok(5));
    assert_eq!(join("late", late).await.unwrap(), Ok(5));
    let s = group.stats();
    assert_eq!((s.followers, s.retried, s.lingered), (2, 1, 0));
    assert_adds_up(&s, 3);
    assert_clean(&group);
}

/// The follower running the retry leaves: another follower takes over the same call (no new
/// call, the retry not cancelled), as when a leader leaves.
#[tokio::test(start_paused = true)]
async fn retrier_leaving_hands_the_retry_to_another_follower_without_a_new_call() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let b0 = Backend::default();
    let leader = spawn(group.run_retryable(1, b0.ready(Err::<u32, _>("first"))));
    // One backend per follower, to see which one retries.
    let (b1, b2) = (Backend::default(), Backend::default());
    let (g1, m1) = b1.gated::<Res>();
    let (g2, m2) = b2.gated::<Res>();
    let mut f1 = group.run_retryable(1, m1);
    let mut f2 = group.run_retryable(1, m2);
    assert_eq!(join("leader", leader).await.unwrap(), Err("first"));
    assert!(poll!(&mut f1).is_pending());
    assert!(poll!(&mut f2).is_pending());
    assert_eq!(b1.made() + b2.made(), 1, "one retry call");
    let (retrier, other, retrier_b, other_b, gate, other_gate) = match b1.made() {
        1 => (f1, f2, &b1, &b2, g1, g2),
        _ => (f2, f1, &b2, &b1, g2, g1),
    };
    drop(retrier);
    let other = spawn(other);
    settle().await;
    assert_eq!(
        retrier_b.dropped(),
        0,
        "the retry goes on for the other follower"
    );
    assert_eq!(other_b.made(), 0, "no second retry call");
    gate.open(Ok(11));
    other_gate.open(Ok(22));
    assert_eq!(
        join("other", other).await.unwrap(),
        Ok(11),
        "the taken-over retry's output"
    );
    let s = group.stats();
    assert_eq!((s.leaders, s.retried, s.cancelled), (2, 1, 0));
    assert_adds_up(&s, 3);
    assert_clean(&group);
}

/// Every follower leaves during the retry: the retry call is dropped, the key freed, the next
/// caller calls anew.
#[tokio::test(start_paused = true)]
async fn all_followers_leaving_during_a_retry_cancel_it_and_free_the_key() {
    let group: Group<u32> = GroupBuilder::new()
        .retry_failed(3)
        .linger_errors(WINDOW)
        .build();
    let b = Backend::default();
    let leader = spawn(group.run_retryable(1, b.ready(Err::<u32, _>("first"))));
    let (_g1, m1) = b.gated::<Res>();
    let (_g2, m2) = b.gated::<Res>();
    let mut f1 = group.run_retryable(1, m1);
    let mut f2 = group.run_retryable(1, m2);
    assert_eq!(join("leader", leader).await.unwrap(), Err("first"));
    assert!(poll!(&mut f1).is_pending());
    assert!(poll!(&mut f2).is_pending());
    assert_eq!(b.made(), 2);
    drop(f1);
    drop(f2);
    assert_eq!(b.dropped(), 1, "the retry call is cancelled");
    assert!(
        group.is_empty(),
        "nothing left, not even the failed attempt's error"
    );
    let out: Res = group.run_result(1, b.ready(Ok(3))).await.unwrap();
    assert_eq!(out, Ok(3));
    let s = group.stats();
    assert_eq!((s.cancelled, s.errors, s.retried), (1, 1, 1));
    assert_adds_up(&s, 4);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// The retry panics with no retries left: the remaining followers get the panic, the key stays
/// usable, counters count one error and one panic.
#[tokio::test(start_paused = true)]
async fn panic_during_the_retry_is_contained() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let b = Backend::default();
    let leader = spawn(group.run_retryable(1, b.ready(Err::<u32, _>("first"))));
    let (g1, m1) = b.gated::<Res>();
    let (g2, m2) = b.gated::<Res>();
    let f1 = spawn(group.run_retryable(1, m1));
    let f2 = spawn(group.run_retryable(1, m2));
    assert_eq!(join("leader", leader).await.unwrap(), Err("first"));
    settle().await;
    g1.panic();
    g2.panic();
    let e1 = join("f1", f1).await.unwrap_err();
    let e2 = join("f2", f2).await.unwrap_err();
    assert_eq!(
        (e1.message(), e2.message()),
        ("told to panic", "told to panic")
    );
    assert_eq!(b.made(), 2);
    assert!(group.is_empty());
    let out: Res = group.run_result(1, b.ready(Ok(4))).await.unwrap();
    assert_eq!(out, Ok(4));
    let s = group.stats();
    assert_eq!((s.errors, s.panics, s.retried, s.leaders), (1, 1, 1, 3));
    assert_adds_up(&s, 4);
    assert_clean(&group);
}

// ---------------------------------------------------------------------------------------------
// detached
// ---------------------------------------------------------------------------------------------

/// A detached flight with nobody waiting keeps its entry and its place until it completes,
/// is not cancelled, and leaves nothing behind.
#[tokio::test(start_paused = true)]
async fn detached_with_no_waiter_is_counted_until_done_then_gone() {
    let group: Group<u32> = GroupBuilder::new().detached(true).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    drop(group.run(1, make));
    settle().await;
    assert_eq!(b.made(), 1);
    assert_eq!((group.len(), group.in_flight()), (1, 1), "still running");
    assert_eq!(b.dropped(), 0, "not cancelled");
    let joiner = group.run(1, b.val(0));
    assert!(
        !joiner.is_leader(),
        "a later caller joins the detached flight"
    );
    drop(joiner);
    advance(Duration::from_secs(5)).await;
    assert_eq!(group.in_flight(), 1);
    gate.open(1);
    settle().await;
    assert_eq!(b.finished(), 1);
    assert_eq!(b.dropped(), 0);
    let s = group.stats();
    assert_eq!((s.cancelled, s.leaders, s.followers), (0, 1, 1));
    assert_adds_up(&s, 2);
    assert_clean(&group);
}

/// A detached flight with no waiter fills the linger window, measured from its completion.
#[tokio::test(start_paused = true)]
async fn detached_with_no_waiter_lingers_from_its_completion() {
    let group: Group<u32> = GroupBuilder::new().detached(true).linger(WINDOW).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    drop(group.run(1, make));
    advance(Duration::from_millis(70)).await;
    gate.open(9);
    settle().await;
    assert_eq!((group.len(), group.in_flight()), (1, 0));
    advance(WINDOW - NS).await;
    assert_eq!(group.run(1, b.val(1)).await.unwrap(), 9);
    advance(NS).await;
    assert_eq!(group.run(1, b.val(1)).await.unwrap(), 1);
    assert_eq!(b.made(), 2);
    assert_adds_up(&group.stats(), 3);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// A detached flight forgotten mid-flight, a new flight of its key, then the old one ending:
/// the new entry stays, its joiner gets the new output, and nothing is left afterwards.
#[tokio::test(start_paused = true)]
async fn detached_forgotten_flight_ending_spares_the_new_flight() {
    let group: Group<u32> = GroupBuilder::new().detached(true).linger(WINDOW).build();
    let b = Backend::default();
    let (old_gate, old_make) = b.gate();
    drop(group.run(1, old_make));
    settle().await;
    assert!(group.forget(&1));
    let (new_gate, new_make) = b.gate();
    let new = spawn(group.run(1, new_make));
    settle().await;
    old_gate.open(1);
    settle().await;
    assert_eq!((group.len(), group.in_flight()), (1, 1));
    let joiner = spawn(group.run(1, b.val(0)));
    settle().await;
    assert_eq!(b.made(), 2);
    new_gate.open(2);
    assert_eq!(join("new", new).await.unwrap(), 2);
    assert_eq!(join("joiner", joiner).await.unwrap(), 2);
    assert_eq!(b.dropped(), 0);
    assert_eq!(
        group.run(1, b.val(0)).await.unwrap(),
        2,
        "the new output lingers"
    );
    assert_eq!(b.made(), 2);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// A detached flight that panics with no waiter: contained, counted, the key usable; under
/// `linger_errors` the panic lingers for its window only.
#[tokio::test(start_paused = true)]
async fn detached_panic_with_no_waiter_is_contained_and_lingers_its_window() {
    let group: Group<u32> = GroupBuilder::new()
        .detached(true)
        .linger_errors(WINDOW)
        .build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    drop(group.run(1, make));
    settle().await;
    gate.panic();
    settle().await;
    assert_eq!(
        (group.len(), group.in_flight()),
        (1, 0),
        "the panic lingers"
    );
    let err = group.run(1, b.val(1)).await.unwrap_err();
    assert_eq!(err.message(), "told to panic");
    advance(WINDOW).await;
    assert_eq!(group.run(1, b.val(1)).await.unwrap(), 1);
    let s = group.stats();
    assert_eq!((s.panics, s.lingered, s.leaders, s.cancelled), (1, 1, 2, 0));
    assert_adds_up(&s, 3);
    assert_clean(&group);
}

// ---------------------------------------------------------------------------------------------
// The layer's follower wait limit
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct Boom;

impl fmt::Display for Boom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("boom")
    }
}

impl Error for Boom {}

/// One backend call through the layer, answered by the test.
struct Call {
    reply: oneshot::Sender<u32>,
}

#[derive(Clone)]
struct Inner {
    tx: mpsc::UnboundedSender<Call>,
    tally: Arc<Tally>,
}

impl Service<u32> for Inner {
    type Response = u32;
    type Error = Boom;
    type Future = BoxFut<Result<u32, Boom>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _key: u32) -> Self::Future {
        self.tally.made.fetch_add(1, SeqCst);
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Call { reply });
        let live = Live {
            tally: self.tally.clone(),
            done: false,
        };
        Box::pin(async move {
            let mut live = live;
            let out = rx.await.map_err(|_| Boom);
            live.done = true;
            out
        })
    }
}

type Key = fn(&u32) -> Option<u32>;
type Svc = CoalesceService<Inner, Key, u32>;
type Out = Result<u32, CoalesceError>;

fn key_of(k: &u32) -> Option<u32> {
    Some(*k)
}

fn layered(layer: CoalesceLayer<Key, u32>) -> (Svc, mpsc::UnboundedReceiver<Call>, Backend) {
    let (tx, rx) = mpsc::unbounded_channel();
    let b = Backend::default();
    let svc = layer.layer(Inner {
        tx,
        tally: b.0.clone(),
    });
    (svc, rx, b)
}

fn request(svc: &Svc, key: u32) -> JoinHandle<Out> {
    tokio::spawn(svc.clone().oneshot(key))
}

async fn next_call(rx: &mut mpsc::UnboundedReceiver<Call>) -> Call {
    bounded("a backend call", rx.recv())
        .await
        .expect("backend gone")
}

/// `OnTimeout::Error`: a follower is still waiting 1ms before its limit and fails with a
/// timeout at it; the flight goes on for the leader and for followers that join later.
#[tokio::test(start_paused = true)]
async fn follower_timeout_error_at_its_limit_leaves_the_flight_undisturbed() {
    let limit = Duration::from_millis(50);
    let (svc, mut rx, b) = layered(
        CoalesceLayer::new(key_of as Key)
            .follower_timeout(limit)
            .on_follower_timeout(OnTimeout::Error),
    );
    let leader = request(&svc, 1);
    let call = next_call(&mut rx).await;
    let f1 = request(&svc, 1);
    let f2 = request(&svc, 1);
    settle().await;
    advance(limit - MS).await;
    assert!(
        !f1.is_finished() && !f2.is_finished(),
        "not yet at the limit"
    );
    advance(MS).await;
    assert!(f1.is_finished() && f2.is_finished(), "at the limit");
    let e1 = join("f1", f1).await.unwrap_err();
    let e2 = join("f2", f2).await.unwrap_err();
    assert!(e1.is_timeout() && e2.is_timeout());
    assert_eq!(b.dropped(), 0, "the flight goes on");
    assert!(!leader.is_finished());

    let late = request(&svc, 1);
    settle().await;
    call.reply.send(8).unwrap();
    assert_eq!(join("leader", leader).await.unwrap(), 8);
    assert_eq!(join("late", late).await.unwrap(), 8);
    assert_eq!(b.made(), 1);
    let s = svc.stats();
    assert_eq!((s.timed_out, s.fell_through, s.followers), (2, 2, 3));
    assert_adds_up(&s, 4);
    assert_clean(svc.group());
}

/// `OnTimeout::CallInner`: the follower makes its own call at its limit; the two calls end
/// independently, each with its own response; a follower joining later joins the first.
#[tokio::test(start_paused = true)]
async fn follower_timeout_call_inner_is_its_own_call_beside_the_flight() {
    let limit = Duration::from_millis(50);
    let (svc, mut rx, b) = layered(CoalesceLayer::new(key_of as Key).follower_timeout(limit));
    let leader = request(&svc, 1);
    let first = next_call(&mut rx).await;
    let f1 = request(&svc, 1);
    settle().await;
    advance(limit).await;
    let own = next_call(&mut rx).await;
    assert_eq!(b.made(), 2);
    assert_eq!(
        svc.in_flight(),
        1,
        "the follower's own call is not a flight"
    );
    let late = request(&svc, 1);
    settle().await;
    assert_eq!(b.made(), 2, "joins the first call");
    own.reply.send(2).unwrap();
    assert_eq!(join("f1", f1).await.unwrap(), 2, "its own response");
    assert!(!leader.is_finished());
    first.reply.send(1).unwrap();
    assert_eq!(join("leader", leader).await.unwrap(), 1);
    assert_eq!(join("late", late).await.unwrap(), 1);
    let s = svc.stats();
    assert_eq!((s.timed_out, s.over_capacity, s.fell_through), (1, 0, 1));
    assert_eq!((s.leaders, s.followers), (1, 2));
    assert_adds_up(&s, 3);
    assert_clean(svc.group());
}

/// Every follower timed out (`Error`), then the leader leaves: it was the last waiter, so the
/// call is cancelled and the key freed.
#[tokio::test(start_paused = true)]
async fn timed_out_followers_do_not_keep_a_flight_alive_after_the_leader_leaves() {
    let limit = Duration::from_millis(50);
    let (svc, mut rx, b) = layered(
        CoalesceLayer::new(key_of as Key)
            .follower_timeout(limit)
            .on_follower_timeout(OnTimeout::Error),
    );
    let leader = request(&svc, 1);
    let _call = next_call(&mut rx).await;
    let followers: Vec<_> = (0..3).map(|_| request(&svc, 1)).collect();
    settle().await;
    advance(limit).await;
    for f in followers {
        assert!(join("follower", f).await.unwrap_err().is_timeout());
    }
    leader.abort();
    settle().await;
    assert_eq!(b.dropped(), 1, "the call is cancelled with its last waiter");
    assert_clean(svc.group());
    let s = svc.stats();
    assert_eq!((s.cancelled, s.timed_out), (1, 3));
    assert_adds_up(&s, 4);
}

/// Under `linger`, a request in the window is served at once: no wait limit applies, nothing
/// times out, even far past the limit.
#[tokio::test(start_paused = true)]
async fn follower_timeout_never_fires_for_a_lingering_hit() {
    let limit = Duration::from_millis(10);
    let (svc, mut rx, b) = layered(
        CoalesceLayer::new(key_of as Key)
            .linger(WINDOW)
            .follower_timeout(limit)
            .on_follower_timeout(OnTimeout::Error),
    );
    let leader = request(&svc, 1);
    next_call(&mut rx).await.reply.send(3).unwrap();
    assert_eq!(join("leader", leader).await.unwrap(), 3);
    advance(WINDOW - MS).await;
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 3);
    let s = svc.stats();
    assert_eq!((s.lingered, s.timed_out, s.fell_through), (1, 0, 0));
    assert_eq!(b.made(), 1);
    assert_adds_up(&s, 2);
    advance(MS).await;
    assert_clean(svc.group());
}

/// A follower that timed out with `CallInner` while a `linger` window is set: its own call's
/// response is its own and does not replace the flight's lingering output.
#[tokio::test(start_paused = true)]
async fn timed_out_followers_own_call_does_not_linger_over_the_flight() {
    let limit = Duration::from_millis(10);
    let (svc, mut rx, _b) = layered(
        CoalesceLayer::new(key_of as Key)
            .linger(WINDOW)
            .follower_timeout(limit),
    );
    let leader = request(&svc, 1);
    let first = next_call(&mut rx).await;
    let f = request(&svc, 1);
    settle().await;
    advance(limit).await;
    let own = next_call(&mut rx).await;
    first.reply.send(1).unwrap();
    assert_eq!(join("leader", leader).await.unwrap(), 1);
    own.reply.send(2).unwrap();
    assert_eq!(join("follower", f).await.unwrap(), 2);
    assert_eq!(
        svc.clone().oneshot(1).await.unwrap(),
        1,
        "the flight's output lingers"
    );
    assert_eq!(svc.group().len(), 1);
    advance(WINDOW).await;
    assert_clean(svc.group());
}

/// A follower whose output was handed to it keeps it however late it is polled: expiry and
/// `purge_expired` concern the lingering copy, not a waiter's own.
#[tokio::test(start_paused = true)]
async fn slow_follower_gets_its_output_after_the_window_and_a_purge() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    let leader = spawn(group.run(1, make));
    let mut follower = group.run(1, b.val(0));
    assert!(poll!(&mut follower).is_pending());
    settle().await;
    gate.open(6);
    assert_eq!(join("leader", leader).await.unwrap(), 6);
    advance(WINDOW * 2).await;
    group.purge_expired();
    assert!(group.is_empty());
    assert_eq!(bounded("follower", follower).await.unwrap(), 6);
    assert_eq!(b.made(), 1);
    assert_clean(&group);
}

/// A leader panicking while followers wait: every waiter gets the same panic, counted once;
/// under `linger_errors` a caller in the window gets it too, with no call.
#[tokio::test(start_paused = true)]
async fn panic_with_waiting_followers_is_shared_counted_once_and_lingers() {
    let group: Group<u32> = GroupBuilder::new()
        .linger(WINDOW)
        .linger_errors(WINDOW / 2)
        .build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    let leader = spawn(group.run(1, make));
    let followers: Vec<_> = (0..2).map(|_| spawn(group.run(1, b.val(0)))).collect();
    settle().await;
    gate.panic();
    assert_eq!(
        join("leader", leader).await.unwrap_err().message(),
        "told to panic"
    );
    for f in followers {
        assert_eq!(join("f", f).await.unwrap_err().message(), "told to panic");
    }
    advance(WINDOW / 2 - NS).await;
    assert_eq!(
        group.run(1, b.val(1)).await.unwrap_err().message(),
        "told to panic"
    );
    advance(NS).await;
    assert_eq!(group.run(1, b.val(1)).await.unwrap(), 1);
    let s = group.stats();
    assert_eq!((s.panics, s.errors, s.followers, s.lingered), (1, 0, 2, 1));
    assert_adds_up(&s, 5);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// Successes and errors expire from their own windows: a success made first and an error made
/// after it (with a shorter window) are each dropped at their own expiry by `purge_expired`.
#[tokio::test(start_paused = true)]
async fn purge_expired_honours_each_window_independently() {
    let group: Group<u32> = GroupBuilder::new()
        .linger(WINDOW)
        .linger_errors(Duration::from_millis(10))
        .build();
    let b = Backend::default();
    let ok: Res = group.run_result(1, b.ready(Ok(1))).await.unwrap(); // expires at 100
    assert_eq!(ok, Ok(1));
    advance(Duration::from_millis(5)).await;
    let err: Res = group.run_result(2, b.ready(Err("e"))).await.unwrap(); // expires at 15
    assert_eq!(err, Err("e"));
    advance(Duration::from_millis(10) - NS).await;
    group.purge_expired();
    assert_eq!(group.len(), 2);
    advance(NS).await;
    group.purge_expired();
    assert_eq!(
        group.len(),
        1,
        "the error's window is over, the success's is not"
    );
    let hit: Res = group.run_result(1, b.ready(Ok(9))).await.unwrap();
    assert_eq!(hit, Ok(1));
    advance(Duration::from_millis(85) - NS).await; // 100ms - 1ns
    group.purge_expired();
    assert_eq!(group.len(), 1);
    advance(NS).await;
    group.purge_expired();
    assert!(group.is_empty());
    assert_adds_up(&group.stats(), 3);
    assert_clean(&group);
}

/// Over `max_followers` with `linger`: whichever finishes first, only the flight's output
/// lingers, never the output of the call run alone.
#[tokio::test(start_paused = true)]
async fn max_followers_alone_output_never_lingers_whatever_the_order() {
    for alone_first in [true, false] {
        let group: Group<u32> = GroupBuilder::new().max_followers(0).linger(WINDOW).build();
        let b = Backend::default();
        let (lead_gate, lead_make) = b.gate();
        let leader = spawn(group.run(1, lead_make));
        let (alone_gate, alone_make) = b.gate();
        let alone = group.run(1, alone_make);
        assert!(alone.is_alone());
        let alone = spawn(alone);
        settle().await;
        if alone_first {
            alone_gate.open(2);
            assert_eq!(join("alone", alone).await.unwrap(), 2);
            assert_eq!((group.len(), group.in_flight()), (1, 1));
            lead_gate.open(1);
            assert_eq!(join("leader", leader).await.unwrap(), 1);
        } else {
            lead_gate.open(1);
            assert_eq!(join("leader", leader).await.unwrap(), 1);
            alone_gate.open(2);
            assert_eq!(join("alone", alone).await.unwrap(), 2);
        }
        assert_eq!(group.len(), 1);
        assert_eq!(
            group.run(1, b.val(3)).await.unwrap(),
            1,
            "the flight's output lingers"
        );
        assert_eq!(b.made(), 2);
        advance(WINDOW).await;
        assert_clean(&group);
    }
}

/// `forget` removes the key's entries of every output type, each counted in `forgotten`.
#[tokio::test(start_paused = true)]
async fn forget_removes_every_output_type_and_counts_each_entry() {
    let group: Group<u32> = GroupBuilder::new().linger(WINDOW).build();
    let b = Backend::default();
    assert_eq!(group.run(1, b.val(1)).await.unwrap(), 1); // a lingering u32
    let (gate, make) = b.gated::<u64>();
    let running = group.run(1, make); // a running u64 flight of the same key
    assert!(running.is_leader(), "other output type: its own flight");
    let running = spawn(running);
    settle().await;
    assert_eq!((group.len(), group.in_flight()), (2, 1));
    assert!(group.forget(&1));
    assert_eq!(group.stats().forgotten, 2, "two entries removed");
    assert_eq!(group.run(1, b.val(2)).await.unwrap(), 2, "u32: a new call");
    assert!(
        group.run(1, b.gated::<u64>().1).is_leader(),
        "u64: a new flight"
    );
    gate.open(64);
    assert_eq!(join("running", running).await.unwrap(), 64);
    advance(WINDOW).await;
    assert_clean(&group);
}

/// The wait limit runs from `call`, not from the first poll: a follower first polled after its
/// limit fails at once (`OnTimeout::Error`) rather than waiting a full limit more.
#[tokio::test(start_paused = true)]
async fn follower_limit_is_armed_at_call_not_at_first_poll() {
    let limit = Duration::from_millis(50);
    let (mut svc, mut rx, b) = layered(
        CoalesceLayer::new(key_of as Key)
            .follower_timeout(limit)
            .on_follower_timeout(OnTimeout::Error),
    );
    let leader = request(&svc, 1);
    let call = next_call(&mut rx).await;
    let mut follower = svc.ready().await.unwrap().call(1);
    assert!(follower.is_follower());
    advance(limit).await;
    let out = poll!(&mut follower);
    match out {
        Poll::Ready(Err(e)) => assert!(e.is_timeout(), "{e:?}"),
        other => panic!("expected a timeout at the first poll, got {other:?}"),
    }
    call.reply.send(1).unwrap();
    assert_eq!(join("leader", leader).await.unwrap(), 1);
    assert_eq!(b.made(), 1);
    assert_eq!(svc.stats().timed_out, 1);
    assert_clean(svc.group());
}

/// A follower whose response came in before its limit gets it even when first polled after
/// the limit: it did not wait `limit` for nothing.
#[tokio::test(start_paused = true)]
async fn response_in_before_the_limit_wins_over_a_late_poll() {
    let limit = Duration::from_millis(50);
    let (mut svc, mut rx, b) = layered(
        CoalesceLayer::new(key_of as Key)
            .follower_timeout(limit)
            .on_follower_timeout(OnTimeout::Error),
    );
    let leader = request(&svc, 1);
    let call = next_call(&mut rx).await;
    let mut follower = svc.ready().await.unwrap().call(1);
    assert!(poll!(&mut follower).is_pending());
    advance(limit - MS).await;
    call.reply.send(5).unwrap();
    assert_eq!(join("leader", leader).await.unwrap(), 5);
    advance(limit).await;
    assert_eq!(bounded("follower", follower).await.unwrap(), 5);
    let s = svc.stats();
    assert_eq!((s.timed_out, s.followers), (0, 1));
    assert_eq!(b.made(), 1);
    assert_clean(svc.group());
}

// ---------------------------------------------------------------------------------------------
// Regressions: both failed before their fixes
// ---------------------------------------------------------------------------------------------

/// `max_followers` doc: "At most `max` followers per flight. The ones after that run their
/// call alone." A detached flight whose caller has left must still allow only `max` followers.
#[tokio::test(start_paused = true)]
async fn detached_flight_whose_caller_left_admits_only_max_followers() {
    let group: Group<u32> = GroupBuilder::new().detached(true).max_followers(1).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    drop(group.run(1, make)); // the detached flight goes on with nobody waiting
    settle().await;
    let f1 = group.run(1, b.val(0));
    assert!(!f1.is_alone(), "one follower is allowed");
    let f2 = group.run(1, b.val(2));
    let f2_alone = f2.is_alone();
    let (f1, f2) = (spawn(f1), spawn(f2));
    settle().await;
    gate.open(1);
    assert_eq!(join("f1", f1).await.unwrap(), 1);
    let f2_out = join("f2", f2).await.unwrap();
    let s = group.stats();
    assert_clean(&group);
    assert!(
        f2_alone,
        "the second follower is over max_followers(1): {s:?}"
    );
    assert_eq!(f2_out, 2, "and runs its own call");
    assert_eq!((s.followers, s.over_capacity), (1, 1));
}

/// `linger(window)` takes any `Duration`; `Duration::MAX` ("keep for ever") must not panic in
/// the driver, hang the followers and brick the key (contracts 5 and 7: nobody hangs, the
/// registry stays usable).
#[tokio::test(start_paused = true)]
async fn huge_linger_window_does_not_hang_followers_or_brick_the_key() {
    let group: Group<u32> = GroupBuilder::new().linger(Duration::MAX).build();
    let b = Backend::default();
    let (gate, make) = b.gate();
    let leader = spawn(group.run(1, make));
    let follower = spawn(group.run(1, b.val(0)));
    settle().await;
    gate.open(1);
    let leader = bounded("leader", leader).await;
    let follower = bounded("follower", follower).await;
    assert_eq!(leader.expect("leader task panicked").unwrap(), 1);
    assert_eq!(follower.unwrap().unwrap(), 1);
    assert_eq!(
        bounded("a later caller", group.run(1, b.val(2)))
            .await
            .unwrap(),
        1
    );
}
