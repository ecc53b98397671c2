//! Review of session 6's fixes, the `tracing` part: a subscriber's `clone_span` (user code)
//! panicking where the crate clones a flight's span. Each test failed before its fix. In a
//! test binary of its own: `tracing`'s callsite interest is process-wide, and tests without a
//! subscriber running beside these could leave their spans disabled (nothing then proved).
//!
//! Deterministic: futures are polled by hand with a no-op waker; gates are oneshot channels.
#![cfg(feature = "tracing")]

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::oneshot;
use tower_coalesce::Group;

/// One poll with a no-op waker; `Err` if the poll panicked.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Result<Poll<F::Output>, ()> {
    let mut cx = Context::from_waker(Waker::noop());
    catch_unwind(AssertUnwindSafe(|| Pin::new(f).poll(&mut cx))).map_err(|_| ())
}

/// Whether `f` is ready within a few polls (nothing it waits for needs a timer).
fn ready_soon<F: Future + Unpin>(f: &mut F) -> bool {
    (0..8).any(|_| matches!(poll_once(f), Ok(Poll::Ready(_))))
}

// ---------------------------------------------------------------------------------------------
// `contained` misses `Span::clone` (the subscriber's `clone_span`, user code)
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "tracing")]
mod clone_span {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::time::Duration;
    use tower_coalesce::GroupBuilder;
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    /// Makes spans normally; panics in `clone_span` while `armed`.
    struct CloneBomb {
        armed: Arc<AtomicBool>,
        /// Spans made so far; ids count from 1.
        spans: Arc<AtomicU64>,
    }

    impl Subscriber for CloneBomb {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(self.spans.fetch_add(1, SeqCst) + 1)
        }
        fn clone_span(&self, id: &Id) -> Id {
            if self.armed.load(SeqCst) {
                panic!("tracing subscriber exploded in clone_span");
            }
            id.clone()
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    /// Tests that set a thread's default subscriber run one at a time: `tracing`'s callsite
    /// interest is global, and another thread's guard coming or going can leave a span of
    /// this one disabled (no `clone_span` to panic).
    pub(super) static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// What a test holds while the subscriber is this thread's default.
    struct Installed {
        armed: Arc<AtomicBool>,
        spans: Arc<AtomicU64>,
        _default: tracing::subscriber::DefaultGuard,
        _serial: std::sync::MutexGuard<'static, ()>,
    }

    impl Installed {
        /// Panics in `clone_span` from now on.
        fn arm(&self) {
            self.armed.store(true, SeqCst);
        }

        /// Stops panicking; checks that a span was made (else nothing was proved).
        fn disarm(&self) {
            self.armed.store(false, SeqCst);
            assert!(
                self.spans.load(SeqCst) > 0,
                "the flight's span was not made"
            );
        }
    }

    fn install() -> Installed {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let armed = Arc::new(AtomicBool::new(false));
        let spans = Arc::new(AtomicU64::new(0));
        let subscriber = CloneBomb {
            armed: armed.clone(),
            spans: spans.clone(),
        };
        let default = tracing::subscriber::set_default(subscriber);
        // Another test thread may have made this crate's callsites' interest "never" while no
        // subscriber was set: ask again now that this one is.
        tracing::callsite::rebuild_interest_cache();
        Installed {
            armed,
            spans,
            _default: default,
            _serial: serial,
        }
    }

    /// Site: flight.rs `start_retry`, `meta` (`span: flight.span.clone()`), called after the
    /// elected follower set `driven`, cleared `needs_driver`, left its slot and took its
    /// `make`. `contained` covers `new_span`, `record` and events, not `clone_span`: its panic
    /// leaves a registered flight that nobody drives and nobody will retry; the other
    /// follower and every later caller of the key hang (the commit's own claim, "a tracing
    /// subscriber no longer strands followers or the key", with `emit` in the same spot).
    #[test]
    fn panicking_clone_span_on_a_retry_does_not_hang_the_others() {
        let tracer = install();
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let (tx, rx) = oneshot::channel::<()>();
        let mut leader = group.run_retryable(1, move || async move {
            let _ = rx.await;
            Err::<u32, &'static str>("flaky")
        });
        let mut first = group.run_retryable(1, || async { Ok::<u32, &'static str>(4) });
        let mut second = group.run_retryable(1, || async { Ok::<u32, &'static str>(5) });
        for run in [&mut leader, &mut first, &mut second] {
            assert!(matches!(poll_once(run), Ok(Poll::Pending)));
        }
        tx.send(()).unwrap();
        assert!(matches!(
            poll_once(&mut leader),
            Ok(Poll::Ready(Ok(Err("flaky"))))
        ));
        tracer.arm();
        let elected = poll_once(&mut first);
        tracer.disarm();
        drop(first);
        let second_ready = ready_soon(&mut second);
        let mut later = group.run_retryable(1, || async { Ok::<u32, &'static str>(6) });
        let later_ready = ready_soon(&mut later);
        assert!(
            second_ready,
            "the other follower hangs (elected follower panicked: {})",
            elected.is_err()
        );
        assert!(later_ready, "a later caller hangs on the dead flight");
    }

    /// Site: flight.rs `finish` (inside `complete`), lingering path of a flight nobody joined:
    /// `Flight::with_cloner` clones the entry's span under the shard lock, after the end was
    /// counted and before the entry is marked lingering or unregistered. A `clone_span` panic
    /// leaves the entry registered, without a flight and with nobody to drive it: every later
    /// caller of the key joins it and hangs, and `in_flight` stays 1.
    #[test]
    fn panicking_clone_span_when_an_output_starts_lingering_does_not_brick_the_key() {
        let tracer = install();
        let group: Group<u32> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
        let mut leader = group.run(1, || async { 1u32 });
        tracer.arm();
        let led = poll_once(&mut leader);
        tracer.disarm();
        drop(leader);
        let mut later = group.run(1, || async { 2u32 });
        let later_ready = ready_soon(&mut later);
        assert!(
            later_ready,
            "a later caller joins a flight nobody drives (leader panicked: {})",
            led.is_err()
        );
        drop(later);
        assert_eq!(group.in_flight(), 0, "the dead entry stays registered");
    }

    /// Site: flight.rs `run_classified`, `let span = entry.span.clone()`: under the shard
    /// lock, after `max_in_flight`'s place was taken (`running.fetch_add`) and the span made
    /// (now contained). The commit fixed exactly this leak for `new_span`
    /// (`panicking_subscriber_on_a_new_flight_does_not_leak_a_max_in_flight_place`); a panic
    /// of `clone_span` one line later leaks the place for good: with `max_in_flight(1)` every
    /// later call runs alone, while `in_flight()` says 0.
    #[test]
    fn panicking_clone_span_on_a_new_flight_does_not_leak_a_max_in_flight_place() {
        let tracer = install();
        let group: Group<u32> = GroupBuilder::new().max_in_flight(1).build();
        tracer.arm();
        let first = catch_unwind(AssertUnwindSafe(|| group.run(1, || async { 1u32 })));
        tracer.disarm();
        let first_panicked = first.is_err();
        drop(first);
        let mut later = group.run(2, || async { 2u32 });
        assert!(
            !later.is_alone(),
            "the place of the flight that never started is gone (first call panicked: {first_panicked}, in_flight: {})",
            group.in_flight()
        );
        assert!(ready_soon(&mut later));
    }
}

// ---------------------------------------------------------------------------------------------
// A subscriber is user code: no registry lock may be held while it runs (rule 8)
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "tracing")]
mod reentrant {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::sync::{mpsc, OnceLock};
    use std::time::Duration;
    use tower_coalesce::GroupBuilder;
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    /// Calls back into the group (every shard's lock) from each of its methods: a subscriber
    /// called under a shard's lock deadlocks on it.
    struct Reentrant {
        group: Arc<OnceLock<Group<u32>>>,
        spans: Arc<AtomicU64>,
        calls: Arc<AtomicU64>,
    }

    impl Reentrant {
        fn call_back(&self) {
            if let Some(group) = self.group.get() {
                self.calls.fetch_add(1, SeqCst);
                let _ = (group.in_flight(), group.len());
            }
        }
    }

    impl Subscriber for Reentrant {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            self.call_back();
            Id::from_u64(self.spans.fetch_add(1, SeqCst) + 1)
        }
        fn clone_span(&self, id: &Id) -> Id {
            self.call_back();
            id.clone()
        }
        fn try_close(&self, _: Id) -> bool {
            self.call_back();
            true
        }
        fn record(&self, _: &Id, _: &Record<'_>) {
            self.call_back();
        }
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {
            self.call_back();
        }
        fn enter(&self, _: &Id) {
            self.call_back();
        }
        fn exit(&self, _: &Id) {
            self.call_back();
        }
    }

    /// Runs `scenario` on a thread whose default subscriber calls back into `group`; fails
    /// (instead of hanging the suite) if it does not finish: a deadlock never does.
    fn with_reentrant_subscriber(
        group: Group<u32>,
        scenario: impl FnOnce(Group<u32>) + Send + 'static,
    ) {
        let _serial = super::clone_span::SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (done, finished) = mpsc::channel();
        let spans = Arc::new(AtomicU64::new(0));
        let calls = Arc::new(AtomicU64::new(0));
        let (s, c) = (spans.clone(), calls.clone());
        std::thread::spawn(move || {
            let cell = Arc::new(OnceLock::new());
            let subscriber = Reentrant {
                group: cell.clone(),
                spans: s,
                calls: c,
            };
            let _default = tracing::subscriber::set_default(subscriber);
            tracing::callsite::rebuild_interest_cache();
            let _ = cell.set(group.clone());
            scenario(group);
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("a subscriber calling back into the group deadlocked on a registry lock");
        assert!(
            spans.load(SeqCst) > 0,
            "no flight span was made: nothing proved"
        );
        assert!(calls.load(SeqCst) > 0, "the subscriber never called back");
    }

    /// A flight with followers, from registration to publish: the span is made, entered,
    /// recorded and closed, and a follower's join is logged, all without a shard's lock.
    #[test]
    fn a_subscriber_may_call_into_the_group_during_a_shared_flight() {
        with_reentrant_subscriber(Group::new(), |group| {
            let (tx, rx) = oneshot::channel::<()>();
            let mut leader = group.run(1, move || async move {
                let _ = rx.await;
                7u32
            });
            let mut followers: Vec<_> = (0..3).map(|_| group.run(1, || async { 0u32 })).collect();
            assert!(matches!(poll_once(&mut leader), Ok(Poll::Pending)));
            for f in &mut followers {
                assert!(matches!(poll_once(f), Ok(Poll::Pending)));
            }
            tx.send(()).unwrap();
            assert!(matches!(poll_once(&mut leader), Ok(Poll::Ready(Ok(7)))));
            for f in &mut followers {
                assert!(matches!(poll_once(f), Ok(Poll::Ready(Ok(7)))));
            }
            drop((leader, followers));
            assert_eq!(group.len(), 0);
        });
    }

    /// Lingering outputs, a cancelled flight and `forget`: each path that ends or drops a
    /// flight (and so its span) runs the subscriber unlocked.
    #[test]
    fn a_subscriber_may_call_into_the_group_when_flights_linger_cancel_or_are_forgotten() {
        let group = GroupBuilder::new()
            .linger(Duration::from_secs(3600))
            .build();
        with_reentrant_subscriber(group, |group| {
            let mut first = group.run(1, || async { 1u32 });
            assert!(matches!(poll_once(&mut first), Ok(Poll::Ready(Ok(1)))));
            let mut copy = group.run(1, || async { 2u32 });
            assert!(ready_soon(&mut copy));
            assert!(group.forget(&1));
            let (_tx, rx) = oneshot::channel::<()>();
            let mut cancelled = group.run(2, move || async move {
                let _ = rx.await;
                3u32
            });
            let mut follower = group.run(2, || async { 4u32 });
            assert!(matches!(poll_once(&mut cancelled), Ok(Poll::Pending)));
            assert!(matches!(poll_once(&mut follower), Ok(Poll::Pending)));
            drop((cancelled, follower));
            assert_eq!(group.in_flight(), 0);
            drop((first, copy));
        });
    }
}
