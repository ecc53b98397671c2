use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Wake;

struct CountWaker(AtomicUsize);
impl Wake for CountWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn poll<F: Future + Unpin>(f: &mut F, w: &Arc<CountWaker>) -> Poll<F::Output> {
    let waker = Waker::from(w.clone());
    Pin::new(f).poll(&mut Context::from_waker(&waker))
}

#[test]
fn follower_is_woken_once_and_gets_a_clone() {
    let group: Group<u8> = Group::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
    let mut leader = group.run(1, || async move { rx.await.unwrap() });
    let mut follower = group.run(1, std::future::pending::<u32>);
    assert!(leader.is_leader() && !follower.is_leader());
    let (wl, wf) = (
        Arc::new(CountWaker(0.into())),
        Arc::new(CountWaker(0.into())),
    );
    assert!(poll(&mut follower, &wf).is_pending());
    assert!(poll(&mut follower, &wf).is_pending());
    assert!(poll(&mut leader, &wl).is_pending());
    tx.send(7).unwrap();
    assert_eq!(
        wf.0.load(Ordering::SeqCst),
        0,
        "follower not woken by the inner future"
    );
    assert!(matches!(poll(&mut leader, &wl), Poll::Ready(Ok(7))));
    assert_eq!(wf.0.load(Ordering::SeqCst), 1);
    assert!(matches!(poll(&mut follower, &wf), Poll::Ready(Ok(7))));
    assert_eq!(group.in_flight(), 0);
}

#[test]
fn dropped_driver_hands_the_future_over() {
    let group: Group<u8> = Group::new();
    let polled = Arc::new(AtomicUsize::new(0));
    let p = polled.clone();
    let mut leader = group.run(1, move || {
        std::future::poll_fn(move |_| {
            if p.fetch_add(1, Ordering::SeqCst) == 0 {
                Poll::Pending
            } else {
                Poll::Ready(5u32)
            }
        })
    });
    let mut follower = group.run(1, std::future::pending::<u32>);
    let w = Arc::new(CountWaker(0.into()));
    assert!(poll(&mut leader, &w).is_pending());
    assert!(poll(&mut follower, &w).is_pending());
    drop(leader);
    assert_eq!(
        w.0.load(Ordering::SeqCst),
        1,
        "the follower is woken to take over"
    );
    assert!(matches!(poll(&mut follower, &w), Poll::Ready(Ok(5))));
    assert_eq!(
        polled.load(Ordering::SeqCst),
        2,
        "the same inner future went on"
    );
    assert_eq!(group.in_flight(), 0);
}

/// Key 1 caught in the window between "last waiter gone" and "its future dropped, entry
/// removed": the next caller of the key leads a new flight gated on the old entry.
struct CancelledKey<T: Send + 'static = u32> {
    group: Group<u8>,
    /// The old flight's waiters and shared state, its phase forced to `Cancelled`.
    waiters: (Run<u8, T>, Run<u8, T>),
    flight: Arc<Flight<T>>,
}

impl CancelledKey {
    fn new() -> Self {
        Self::in_group(Group::new())
    }
}

impl<T: Clone + Send + 'static> CancelledKey<T> {
    fn in_group(group: Group<u8>) -> Self {
        let first = group.run(1, std::future::pending::<T>);
        let follower = group.run(1, std::future::pending::<T>);
        let flight = follower
            .flight
            .clone()
            .expect("a follower has the shared state");
        flight.state.lock().phase = Phase::Cancelled;
        CancelledKey {
            group,
            waiters: (first, follower),
            flight,
        }
    }

    /// The old call's future is dropped: its entry goes.
    fn dropped(&self) {
        let (hash, id) = (self.flight.hash, self.flight.id);
        self.group.registry.shard(hash).cancelled(hash, id);
    }

    /// Ends the old flight for real; returns the group, for its last checks.
    fn end(self) -> Group<u8> {
        self.flight.state.lock().phase = Phase::Running;
        drop(self.waiters);
        self.group
    }
}

#[test]
fn a_new_flight_waits_for_a_cancelled_one_to_be_dropped() {
    let old = CancelledKey::new();
    let mut second = old.group.run(1, || async { 2u32 });
    assert!(second.is_leader(), "a cancelled flight is not joined");
    let gate = match &second.role {
        Role::Driver(fut) => fut.meta().gate,
        _ => panic!("a leader drives its flight"),
    };
    assert_eq!(gate.map(NonZeroU64::get), Some(old.flight.id));
    let w = Arc::new(CountWaker(0.into()));
    assert!(
        poll(&mut second, &w).is_pending(),
        "it does not start while the old call is being dropped"
    );
    assert!(
        poll(&mut second, &w).is_pending(),
        "polled again, still waiting"
    );
    let cell = old.group.registry.shard(old.flight.hash);
    assert_eq!(cell.lock().gated.len(), 1, "its waker is queued once");
    old.dropped();
    assert_eq!(
        w.0.load(Ordering::SeqCst),
        1,
        "woken when the old entry goes"
    );
    assert!(cell.lock().gated.is_empty());
    assert!(matches!(poll(&mut second, &w), Poll::Ready(Ok(2))));
    let group = old.end();
    assert_eq!(group.in_flight(), 0);
    assert!(group.is_empty());
}

/// A gated call (its key's cancelled call still being dropped) handed to a follower keeps its
/// gate: the follower does not poll it before the old call is gone.
#[test]
fn a_gated_call_handed_over_keeps_its_gate() {
    let old = CancelledKey::new();
    let mut second = old.group.run(1, || async { 2u32 });
    assert!(second.is_leader());
    let mut taker = old.group.run(1, || async { 3u32 });
    assert!(!taker.is_leader());
    let w = Arc::new(CountWaker(0.into()));
    assert!(poll(&mut second, &w).is_pending());
    assert!(poll(&mut taker, &w).is_pending());
    drop(second);
    assert!(
        poll(&mut taker, &w).is_pending(),
        "taken over, still waiting for the old call"
    );
    old.dropped();
    assert!(matches!(poll(&mut taker, &w), Poll::Ready(Ok(2))));
    assert_eq!(old.end().in_flight(), 0);
}

/// A gated leader whose `make` panics hands the retry to a follower with its gate: the retry
/// does not start before the key's cancelled call is gone either.
#[test]
fn a_retry_after_a_gated_make_panicked_keeps_the_gate() {
    type Out = Result<u32, ()>;
    let old = CancelledKey::<Out>::in_group(GroupBuilder::new().retry_failed(1).build());
    let joined: Arc<std::sync::Mutex<Option<Run<u8, Out>>>> = Arc::default();
    let (group, slot) = (old.group.clone(), joined.clone());
    let mut leader = old.group.run_retryable(1, move || {
        // `make` runs unlocked, after registration: a follower able to retry joins here.
        *slot.lock().unwrap() = Some(group.run_retryable(1, || async { Ok::<u32, ()>(3) }));
        panic!("make failed");
        #[allow(unreachable_code)]
        async {
            Ok::<u32, ()>(2)
        }
    });
    let mut retrier = joined.lock().unwrap().take().expect("joined inside make");
    assert!(leader.is_leader() && !retrier.is_leader());
    let w = Arc::new(CountWaker(0.into()));
    assert!(
        matches!(poll(&mut leader, &w), Poll::Ready(Err(_))),
        "the leader gets its own panic"
    );
    assert!(
        poll(&mut retrier, &w).is_pending(),
        "the retry waits for the old call to be dropped"
    );
    old.dropped();
    assert!(matches!(poll(&mut retrier, &w), Poll::Ready(Ok(Ok(3)))));
    assert_eq!(old.end().in_flight(), 0);
}

#[test]
fn equal_keys_of_different_output_types_do_not_meet() {
    let group: Group<u8> = Group::new();
    let a = group.run(1, std::future::pending::<u32>);
    let b = group.run(1, std::future::pending::<String>);
    assert!(a.is_leader() && b.is_leader());
    assert_eq!(group.in_flight(), 2);
}

/// Every waiting request holds a `Run` (in its task): what a driver alone needs (the entry's
/// hash and id, the failure test, the gate, the flight's span) lives in the inner future's box
/// instead, and a follower's own `make` in its role.
#[cfg(target_pointer_width = "64")]
#[test]
fn a_waiter_is_small() {
    assert!(std::mem::size_of::<Run<u64, u64>>() <= 48);
    assert!(std::mem::size_of::<Run<u64, Result<String, std::io::Error>>>() <= 48);
}
