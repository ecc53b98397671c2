//! `loom` models of the registry's races: join vs. complete, join vs. last-waiter drop, driver
//! hand-over, panics. Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.

use std::future::Future;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use loom::future::block_on;
use loom::sync::atomic::AtomicUsize;
use loom::thread;

use crate::flight::Group;

/// Counts inner futures made and dropped: every one made must be dropped by the end.
#[derive(Clone)]
struct Ledger {
    made: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

struct Tracked(Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

impl Ledger {
    fn new() -> Self {
        Ledger {
            made: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A `make` closure whose future resolves to `value` at its first poll.
    fn make(
        &self,
        value: u32,
    ) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>> {
        self.make_with(Some(value))
    }

    /// A `make` closure whose future never resolves: the call stays in flight until dropped.
    fn make_pending(&self) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>> {
        self.make_with(None)
    }

    /// Counts the future made, and its drop; it resolves to `value` at its first poll, or
    /// never.
    fn make_with(
        &self,
        value: Option<u32>,
    ) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>> {
        let ledger = self.clone();
        move || {
            ledger.made.fetch_add(1, SeqCst);
            let guard = Tracked(ledger.dropped.clone());
            Box::pin(async move {
                let _guard = guard;
                match value {
                    Some(value) => value,
                    None => std::future::pending().await,
                }
            })
        }
    }

    fn assert_balanced(&self) {
        assert_eq!(
            self.made.load(SeqCst),
            self.dropped.load(SeqCst),
            "an inner future leaked"
        );
    }
}

#[test]
fn loom_join_races_complete() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let ledger = Ledger::new();
        let (g, l) = (group.clone(), ledger.clone());
        let other = thread::spawn(move || block_on(g.run(1, l.make(7))).unwrap());
        let mine = block_on(group.run(1, ledger.make(7))).unwrap();
        assert_eq!((mine, other.join().unwrap()), (7, 7));
        let made = ledger.made.load(SeqCst);
        assert!(
            made == 1 || made == 2,
            "each caller makes at most one flight"
        );
        assert_eq!(group.in_flight(), 0);
        ledger.assert_balanced();
    });
}

#[test]
fn loom_last_waiter_drop_races_join() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let ledger = Ledger::new();
        let (g, l) = (group.clone(), ledger.clone());
        // Registers (or joins) and leaves without polling.
        let quitter = thread::spawn(move || drop(g.run(1, l.make(5))));
        let got = block_on(group.run(1, ledger.make(9))).unwrap();
        quitter.join().unwrap();
        // Joined the quitter's flight and took it over (5), or led its own (9).
        assert!(got == 5 || got == 9, "got {got}");
        assert_eq!(group.in_flight(), 0);
        ledger.assert_balanced();
    });
}

#[test]
fn loom_driver_drop_hands_over_to_one_of_two() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let ledger = Ledger::new();
        let leader = group.run(1, ledger.make(3));
        let followers: Vec<_> = (0..2)
            .map(|_| {
                let fut = group.run(1, ledger.make(4));
                thread::spawn(move || block_on(fut).unwrap())
            })
            .collect();
        drop(leader);
        for f in followers {
            assert_eq!(f.join().unwrap(), 3, "followers share the leader's flight");
        }
        assert_eq!(ledger.made.load(SeqCst), 1);
        assert_eq!(group.in_flight(), 0);
        ledger.assert_balanced();
    });
}

#[test]
fn loom_follower_drop_races_complete() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let ledger = Ledger::new();
        let leader = group.run(1, ledger.make(6));
        let follower = group.run(1, ledger.make(0));
        let quitter = thread::spawn(move || drop(follower));
        assert_eq!(block_on(leader).unwrap(), 6);
        quitter.join().unwrap();
        assert_eq!(group.in_flight(), 0);
        ledger.assert_balanced();
    });
}

/// A publish spans batches (one follower each under loom): a follower served by the first
/// batch takes its copy, and another leaves, while the rest are still being served.
#[test]
fn loom_publish_in_batches_races_takers_and_quitters() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let ledger = Ledger::new();
        let leader = group.run(1, ledger.make(5));
        let taker = group.run(1, ledger.make(0));
        let quitter = group.run(1, ledger.make(0));
        let last = group.run(1, ledger.make(0));
        let taker = thread::spawn(move || block_on(taker).unwrap());
        let quitter = thread::spawn(move || drop(quitter));
        assert_eq!(block_on(leader).unwrap(), 5);
        assert_eq!(taker.join().unwrap(), 5);
        quitter.join().unwrap();
        assert_eq!(
            block_on(last).unwrap(),
            5,
            "a later batch still serves the rest"
        );
        assert_eq!(ledger.made.load(SeqCst), 1);
        assert_eq!(group.in_flight(), 0);
        ledger.assert_balanced();
    });
}

#[test]
fn loom_panic_reaches_every_waiter_and_frees_the_key() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let leader = group.run(1, || async { panic!("boom") });
        let follower = group.run(1, || async { 0u32 });
        let t = thread::spawn(move || block_on(follower));
        let mine: Result<u32, _> = block_on(leader);
        assert_eq!(mine.unwrap_err().message(), "boom");
        assert_eq!(t.join().unwrap().unwrap_err().message(), "boom");
        assert_eq!(group.in_flight(), 0);
        assert_eq!(block_on(group.run(1, || async { 1u32 })).unwrap(), 1);
    });
}

#[test]
fn loom_retry_is_one_new_call_by_one_follower() {
    loom::model(|| {
        let group = crate::flight::GroupBuilder::new()
            .retry_failed(1)
            .build::<u8>();
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let leader = group.run_retryable(1, move || {
            m.fetch_add(1, SeqCst);
            async { Err::<u32, u32>(0) }
        });
        let followers: Vec<_> = (1..=2)
            .map(|id| {
                let m = made.clone();
                let fut = group.run_retryable(1, move || {
                    m.fetch_add(1, SeqCst);
                    async move { Ok::<u32, u32>(id) }
                });
                thread::spawn(move || block_on(fut).unwrap())
            })
            .collect();
        assert_eq!(block_on(leader).unwrap(), Err(0));
        let got: Vec<_> = followers.into_iter().map(|f| f.join().unwrap()).collect();
        assert!(
            got[0].is_ok() && got[0] == got[1],
            "one retry for both: {got:?}"
        );
        assert_eq!(made.load(SeqCst), 2, "the failed call and one retry");
        assert_eq!(group.in_flight(), 0);
    });
}

/// A follower that took over the call of a leader that left did not make it: when it fails,
/// the followers still retry it as one new call, and both get the retry's output (the one
/// that drove the failed call among them).
#[test]
fn loom_a_taken_over_call_that_fails_is_retried_for_everybody() {
    loom::model(|| {
        let group = crate::flight::GroupBuilder::new()
            .retry_failed(1)
            .build::<u8>();
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let leader = group.run_retryable(1, move || {
            m.fetch_add(1, SeqCst);
            async { Err::<u32, u32>(0) }
        });
        let followers: Vec<_> = (1..=2)
            .map(|id| {
                let m = made.clone();
                let fut = group.run_retryable(1, move || {
                    m.fetch_add(1, SeqCst);
                    async move { Ok::<u32, u32>(id) }
                });
                thread::spawn(move || block_on(fut).unwrap())
            })
            .collect();
        drop(leader);
        let got: Vec<_> = followers.into_iter().map(|f| f.join().unwrap()).collect();
        assert!(
            got[0].is_ok() && got[0] == got[1],
            "one retry for both: {got:?}"
        );
        assert_eq!(made.load(SeqCst), 2, "the failed call and one retry");
        assert_eq!(group.in_flight(), 0);
    });
}

#[test]
fn loom_linger_never_starts_a_second_call() {
    loom::model(|| {
        let group = crate::flight::GroupBuilder::new()
            .linger(std::time::Duration::from_secs(3600))
            .build::<u8>();
        let ledger = Ledger::new();
        let (g, l) = (group.clone(), ledger.clone());
        let other = thread::spawn(move || block_on(g.run(1, l.make(7))).unwrap());
        let mine = block_on(group.run(1, ledger.make(8))).unwrap();
        let theirs = other.join().unwrap();
        assert_eq!(mine, theirs, "joined or served the lingering output");
        assert_eq!(ledger.made.load(SeqCst), 1);
        assert_eq!(group.in_flight(), 0);
        assert_eq!(group.len(), 1, "the output lingers");
    });
}

/// A group whose key 1 lingers with the output 7, made by `ledger`.
fn lingering(ledger: &Ledger) -> Group<u8> {
    let group = crate::flight::GroupBuilder::new()
        .linger(std::time::Duration::from_secs(3600))
        .build::<u8>();
    assert_eq!(block_on(group.run(1, ledger.make(7))).unwrap(), 7);
    group
}

/// Lingering hits copy the output unlocked, one at a time: a hit that finds it taken out
/// waits, and is woken when it is put back, or by a waiter that was woken for it and left.
#[test]
fn loom_lingering_hits_take_turns() {
    loom::model(|| {
        let ledger = Ledger::new();
        let group = lingering(&ledger);
        let (g, l) = (group.clone(), ledger.clone());
        let other = thread::spawn(move || block_on(g.run(1, l.make(8))).unwrap());
        let early = group.run(1, ledger.make(9));
        drop(early);
        let mine = block_on(group.run(1, ledger.make(10))).unwrap();
        assert_eq!((mine, other.join().unwrap()), (7, 7));
        assert_eq!(
            ledger.made.load(SeqCst),
            1,
            "every hit was served the output"
        );
        ledger.assert_balanced();
    });
}

/// A lingering hit that was woken to take its turn and leaves instead passes the turn on: the
/// third caller is not left parked.
#[test]
fn loom_a_woken_lingerer_that_leaves_passes_its_turn() {
    use std::pin::Pin;
    use std::task::{Context, Waker};
    loom::model(|| {
        let ledger = Ledger::new();
        let group = lingering(&ledger);
        let (g, l) = (group.clone(), ledger.clone());
        let copier = thread::spawn(move || block_on(g.run(1, l.make(8))).unwrap());
        let (g, l) = (group.clone(), ledger.clone());
        let quitter = thread::spawn(move || {
            let mut hit = g.run(1, l.make(9));
            let _ = Pin::new(&mut hit).poll(&mut Context::from_waker(Waker::noop()));
            drop(hit);
        });
        let mine = block_on(group.run(1, ledger.make(10))).unwrap();
        quitter.join().unwrap();
        assert_eq!((mine, copier.join().unwrap()), (7, 7));
        assert_eq!(ledger.made.load(SeqCst), 1);
    });
}

#[test]
fn loom_forget_races_join() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let ledger = Ledger::new();
        let first = group.run(1, ledger.make(1));
        let g = group.clone();
        let forgetter = thread::spawn(move || g.forget(&1));
        let second = group.run(1, ledger.make(2));
        let forgot = forgetter.join().unwrap();
        let (a, b) = (block_on(first).unwrap(), block_on(second).unwrap());
        assert!(forgot);
        assert_eq!(a, 1);
        // Joined before the forget (1), or started anew after it (2).
        assert!(b == 1 || b == 2);
        assert_eq!(group.in_flight(), 0);
        ledger.assert_balanced();
    });
}

/// `forget` races a new caller and the flight's own completion: the new caller joins the old
/// flight or starts its own, every call made is dropped, and nothing is left registered.
#[test]
fn loom_forget_races_a_new_caller_and_completion() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let ledger = Ledger::new();
        let first = group.run(1, ledger.make(1));
        let (g, l) = (group.clone(), ledger.clone());
        let newcomer = thread::spawn(move || block_on(g.run(1, l.make(2))).unwrap());
        let g = group.clone();
        let forgetter = thread::spawn(move || g.forget(&1));
        assert_eq!(block_on(first).unwrap(), 1);
        let got = newcomer.join().unwrap();
        forgetter.join().unwrap();
        let made = ledger.made.load(SeqCst);
        // Joined the first flight (1, one call), or started its own (2, two calls).
        assert!((got == 1 && made == 1) || (got == 2 && made == 2));
        assert_eq!(group.in_flight(), 0);
        assert!(group.is_empty(), "a forgotten entry was left behind");
        ledger.assert_balanced();
    });
}

/// The leader and the only follower of a pending call leave at the same time: the call is
/// dropped exactly once, by whichever leaves last, and the key is free again.
#[test]
fn loom_leader_and_follower_leave_together() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let ledger = Ledger::new();
        let mut leader = group.run(1, ledger.make_pending());
        assert!(futures::FutureExt::now_or_never(&mut leader).is_none());
        let follower = group.run(1, ledger.make_pending());
        let quitter = thread::spawn(move || drop(follower));
        drop(leader);
        quitter.join().unwrap();
        assert_eq!(ledger.made.load(SeqCst), 1);
        ledger.assert_balanced();
        assert_eq!(group.in_flight(), 0);
        assert!(group.is_empty());
        let again = group.run(1, ledger.make(3));
        assert!(
            again.is_leader(),
            "the key is free after the cancelled call"
        );
        assert_eq!(block_on(again).unwrap(), 3);
    });
}

/// A call that records, when first polled, whether another call of its key was running (made,
/// polled and not yet dropped): the registry must never let that happen.
struct Exclusive {
    live: Arc<AtomicUsize>,
    overlaps: Arc<AtomicUsize>,
    started: bool,
    value: u32,
}

impl Future for Exclusive {
    type Output = u32;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<u32> {
        if !self.started {
            self.started = true;
            if self.live.fetch_add(1, SeqCst) != 0 {
                self.overlaps.fetch_add(1, SeqCst);
            }
            if self.value == 1 {
                // The first call is still running when its driver leaves.
                return std::task::Poll::Pending;
            }
        }
        std::task::Poll::Ready(self.value)
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        if self.started {
            self.live.fetch_sub(1, SeqCst);
        }
    }
}

#[test]
fn loom_no_call_starts_while_a_cancelled_one_is_dropped() {
    loom::model(|| {
        let group: Group<u8> = Group::new();
        let live = Arc::new(AtomicUsize::new(0));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let call = |value| {
            let (live, overlaps) = (live.clone(), overlaps.clone());
            move || Exclusive {
                live,
                overlaps,
                started: false,
                value,
            }
        };
        // Started by its driver, which then leaves: cancelled, or handed to the other caller.
        let mut first = group.run(1, call(1));
        let g = group.clone();
        let second = call(2);
        let other = thread::spawn(move || block_on(g.run(1, second)).unwrap());
        let polled = futures::FutureExt::now_or_never(&mut first);
        drop(first);
        let got = other.join().unwrap();
        assert!(polled.is_none());
        // Took the first call over (1), or made its own after the first was dropped (2).
        assert!(got == 1 || got == 2);
        assert_eq!(overlaps.load(SeqCst), 0, "a call started beside a live one");
        assert_eq!(group.in_flight(), 0);
    });
}
