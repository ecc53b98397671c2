//! Review of bcf6993: a flight's `tracing` span is made once its shard's lock is let go and is
//! shared by its entry, driver and followers through one `Arc<OnceLock<Span>>`.
//!
//! In a test binary of its own: `tracing`'s callsite interest is process-wide. Tests that
//! install a subscriber run one at a time (`SERIAL`), each on a thread of its own with a
//! watchdog: a subscriber called under a registry lock that calls back into the registry
//! deadlocks, which no timeout inside the test could catch.
//!
//! Deterministic: futures are polled by hand with a no-op waker; gates are oneshot channels;
//! the one clock used is tokio's paused one, moved by `advance`.
//!
//! It found, fixed since: a lingering flight's span stayed open until its entry was purged
//! (the linger window, or for ever on a shard never used again); it closes as the flight ends.
#![cfg(feature = "tracing")]

mod support;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use support::recorder::{clear_hook, install, serial, set_hook, Callback, Rec};
use support::{gated, now, paused_runtime, pending, ready, within, BoxFut, Res};
use tower_coalesce::{Group, GroupBuilder, Run};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn boom() -> Res {
    panic!("inner future panicked")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Every subscriber method (span made, entered, exited, recorded, cloned, closed; events)
/// calls back into two groups (every shard's lock: `stats`, `len`, `in_flight`) while flights
/// take every path of the fixes: shared, adopted and retried with the adopter's own `make`,
/// adopted and re-parked for a maker's retry, cancelled, forgotten, over `max_in_flight`,
/// panicked, lingering (hit, expired, purged). Nothing deadlocks; exactly one span is made per
/// registered flight (retries share it), only such spans are entered, and every one of them
/// is closed exactly once by the end.
#[test]
fn a_reentrant_subscriber_sees_one_span_per_flight_each_closed_once_and_never_deadlocks() {
    let _serial = serial();
    within("reentrant subscriber", || {
        let rec = Rec::default();
        let _default = install(&rec);
        let rt = paused_runtime();
        rt.block_on(async {
            let g: Group<u32> = GroupBuilder::new().retry_failed(1).max_in_flight(4).build();
            let gl: Group<u32> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
            let (hg, hgl) = (g.clone(), gl.clone());
            set_hook(move |_| {
                let _ = (hg.stats(), hg.len(), hg.in_flight());
                let _ = (hgl.stats(), hgl.len(), hgl.in_flight());
            });

            // Shared.
            let (tx, make) = gated();
            let mut l = g.run_retryable(1, make);
            let mut fs: Vec<Run<u32, Res>> =
                (0..2).map(|_| g.run_retryable(1, now(Ok(0)))).collect();
            pending(&mut l, "l");
            for f in &mut fs {
                pending(f, "f");
            }
            tx.send(Ok(1)).unwrap();
            assert_eq!(ready(&mut l, "l").unwrap(), Ok(1));
            for f in &mut fs {
                assert_eq!(ready(f, "f").unwrap(), Ok(1));
            }
            drop((l, fs));

            // Adopted, retried with the adopter's own make.
            let (tx, make) = gated();
            let mut l = g.run_retryable(2, make);
            let (a_tx, a_make) = gated();
            let mut a = g.run_retryable(2, a_make);
            let mut f = g.run_result(2, now(Ok(0)));
            pending(&mut l, "l");
            pending(&mut a, "a");
            pending(&mut f, "f");
            drop(l);
            pending(&mut a, "a adopts");
            tx.send(Err("first")).unwrap();
            pending(&mut a, "a retries");
            a_tx.send(Ok(22)).unwrap();
            assert_eq!(ready(&mut a, "a").unwrap(), Ok(22));
            assert_eq!(ready(&mut f, "f").unwrap(), Ok(22));
            drop((a, f));

            // Adopted by a follower without make, which re-parks; a maker retries.
            let (tx, make) = gated();
            let mut l = g.run_retryable(3, make);
            let mut a = g.run_result(3, now(Ok(0)));
            let (f_tx, f_make) = gated();
            let mut f = g.run_retryable(3, f_make);
            pending(&mut l, "l");
            pending(&mut a, "a");
            pending(&mut f, "f");
            drop(l);
            pending(&mut a, "a adopts");
            tx.send(Err("first")).unwrap();
            pending(&mut a, "a re-parks");
            pending(&mut f, "f retries");
            f_tx.send(Ok(33)).unwrap();
            assert_eq!(ready(&mut f, "f").unwrap(), Ok(33));
            assert_eq!(ready(&mut a, "a").unwrap(), Ok(33));
            drop((a, f));

            // Cancelled.
            let (_tx, make) = gated();
            let mut l = g.run_retryable(4, make);
            pending(&mut l, "l");
            drop(l);

            // Forgotten while it runs; a newer flight of the key.
            let (tx, make) = gated();
            let mut old = g.run_retryable(5, make);
            pending(&mut old, "old");
            assert!(g.forget(&5));
            let mut new = g.run_retryable(5, now(Ok(55)));
            assert_eq!(ready(&mut new, "new").unwrap(), Ok(55));
            tx.send(Ok(5)).unwrap();
            assert_eq!(ready(&mut old, "old").unwrap(), Ok(5));
            drop((old, new));

            // Over max_in_flight: alone, with no span of its own.
            let mut held = Vec::new();
            let mut gates = Vec::new();
            for k in 10..14 {
                let (tx, make) = gated();
                let mut r = g.run_retryable(k, make);
                pending(&mut r, "held");
                held.push(r);
                gates.push(tx);
            }
            let mut alone = g.run_retryable(14, now(Ok(14)));
            assert!(alone.is_alone());
            assert_eq!(ready(&mut alone, "alone").unwrap(), Ok(14));
            for tx in gates {
                tx.send(Ok(0)).unwrap();
            }
            for r in &mut held {
                assert_eq!(ready(r, "held").unwrap(), Ok(0));
            }
            drop((alone, held));

            // A panicking call, with a follower that cannot retry.
            let mut l = g.run_retryable(6, || -> BoxFut<Res> { Box::pin(async { boom() }) });
            let mut f = g.run_result(6, now(Ok(0)));
            assert!(ready(&mut l, "l").is_err());
            assert!(ready(&mut f, "f").is_err());
            drop((l, f));

            // Lingering: a hit, then expiry and purge.
            let mut l = gl.run_result(1, now(Ok(7)));
            assert_eq!(ready(&mut l, "l").unwrap(), Ok(7));
            let mut hit = gl.run_result(1, now(Ok(8)));
            assert_eq!(ready(&mut hit, "hit").unwrap(), Ok(7));
            drop((l, hit));
            tokio::time::advance(Duration::from_secs(2)).await;
            gl.purge_expired();

            assert_eq!((g.len(), gl.len()), (0, 0));
            let (s, sl) = (g.stats(), gl.stats());
            let flights = (s.leaders - s.retried) + (sl.leaders - sl.retried);
            let (made, closed) = rec.flights();
            assert_eq!(
                made.len() as u64,
                flights,
                "one span per registered flight: {s:?} {sl:?}"
            );
            assert_eq!(closed, made, "every flight span closed exactly once");
            let book = rec.book();
            assert!(
                book.entered.iter().all(|id| made.contains(id)),
                "only flight spans entered"
            );
            for cb in [
                Callback::NewFlightSpan,
                Callback::Enter,
                Callback::Exit,
                Callback::Record,
                Callback::Event,
                Callback::Close,
            ] {
                assert!(
                    book.hooked.get(&cb).copied().unwrap_or(0) > 0,
                    "the hook ran from {cb:?}: {:?}",
                    book.hooked
                );
            }
        });
        clear_hook();
    });
}

/// A follower that joins before the flight's span is made (on another thread, while the
/// registering caller, which has let the shard's lock go, is in the subscriber's `new_span`
/// of that very span) logs its join
/// without the span, with the key's hash; the flight then runs in its span, and the follower
/// gets the output.
#[test]
fn a_follower_joining_before_the_span_is_made_logs_without_it_and_is_served() {
    let _serial = serial();
    within("join from new_span", || {
        let rec = Rec::default();
        let _default = install(&rec);
        let group: Group<u32> = Group::new();
        let joined: Rc<RefCell<Option<Run<u32, Res>>>> = Rc::default();
        let (g, slot, sub) = (group.clone(), joined.clone(), rec.clone());
        set_hook(move |cb| {
            if cb == Callback::NewFlightSpan && slot.borrow().is_none() {
                // On another thread, with the same subscriber: `tracing` drops what a
                // subscriber's own callback logs on this one.
                let (g, sub) = (g.clone(), sub.clone());
                let run = std::thread::spawn(move || {
                    let _default = tracing::subscriber::set_default(sub);
                    g.run_result(1, now(Ok(0)))
                })
                .join()
                .expect("the joining thread");
                *slot.borrow_mut() = Some(run);
            }
        });
        let (tx, make) = gated();
        let mut leader = group.run_result(1, make);
        clear_hook();
        let mut follower = joined.borrow_mut().take().expect("joined from new_span");
        assert!(!follower.is_leader());
        let (made, _) = rec.flights();
        assert_eq!(made.len(), 1);
        let joins = rec.events("follower joined");
        assert_eq!(joins.len(), 1, "{joins:?}");
        assert!(
            joins[0].parent.is_none() && joins[0].key_hash,
            "logged without the span, with the key's hash: {joins:?}"
        );
        pending(&mut leader, "leader");
        pending(&mut follower, "follower");
        assert!(rec.book().entered.contains(&made[0]), "polled in its span");
        tx.send(Ok(5)).unwrap();
        assert_eq!(ready(&mut leader, "leader").unwrap(), Ok(5));
        assert_eq!(ready(&mut follower, "follower").unwrap(), Ok(5));
        let finished = rec.events("flight finished");
        assert_eq!(finished.len(), 1);
        assert_eq!(finished[0].parent, Some(made[0]));
        drop((leader, follower));
        let (made, closed) = rec.flights();
        assert_eq!(closed, made);
    });
}

/// The subscriber's `new_span` panics for flights: each flight runs with an empty span cell
/// (nothing entered), through adoption and the adopter's own retry, and its end is logged
/// without a span.
#[test]
fn an_empty_span_cell_through_adoption_and_retry_enters_nothing() {
    let _serial = serial();
    within("no span", || {
        let rec = Rec::default();
        rec.0.explode.store(true, SeqCst);
        let _default = install(&rec);
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let (tx, make) = gated();
        let mut l = group.run_retryable(1, make);
        let (a_tx, a_make) = gated();
        let mut a = group.run_retryable(1, a_make);
        let mut f = group.run_result(1, now(Ok(0)));
        pending(&mut l, "l");
        pending(&mut a, "a");
        pending(&mut f, "f");
        drop(l);
        pending(&mut a, "a adopts");
        tx.send(Err("first")).unwrap();
        pending(&mut a, "a retries");
        a_tx.send(Ok(9)).unwrap();
        assert_eq!(ready(&mut a, "a").unwrap(), Ok(9));
        assert_eq!(ready(&mut f, "f").unwrap(), Ok(9));
        let book = rec.book();
        assert!(book.flights_made.is_empty());
        assert!(book.entered.is_empty(), "{:?}", book.entered);
        let finished: Vec<_> = book
            .events
            .iter()
            .filter(|e| e.message == "flight finished")
            .collect();
        assert_eq!(finished.len(), 1, "{finished:?}");
        assert!(finished[0].parent.is_none());
        drop(book);
        let s = group.stats();
        assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 1), "{s:?}");
        assert_eq!(group.len(), 0);
    });
}

/// A flight's span is held by its entry, so a flight whose output lingers keeps its span
/// open until the lingering entry is purged: the whole `linger` window after the flight
/// ended (30 years for `Duration::MAX`), and for ever if the shard is never used again
/// (purging is lazy). A subscriber that times or exports spans on close (OpenTelemetry)
/// reports the flight as lasting the window, or never exports it. (Pre-existing: before
/// bcf6993 the entry held a `Span` clone; the `Arc` keeps that.)
#[test]
fn a_lingering_flights_span_closes_when_the_flight_ends() {
    let _serial = serial();
    within("linger span", || {
        let rec = Rec::default();
        let _default = install(&rec);
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new().linger(Duration::from_secs(60)).build();
            let mut l = group.run_result(1, now(Ok(1)));
            let mut f = group.run_result(1, now(Ok(2)));
            assert_eq!(ready(&mut l, "l").unwrap(), Ok(1));
            assert_eq!(ready(&mut f, "f").unwrap(), Ok(1));
            drop((l, f));
            tokio::time::advance(Duration::from_secs(120)).await;
            let (made, closed) = rec.flights();
            assert_eq!(made.len(), 1);
            let still_open = closed.is_empty();
            group.purge_expired();
            let (_, closed_after_purge) = rec.flights();
            assert_eq!(
                closed_after_purge, made,
                "closed by the purge at the latest"
            );
            assert!(
                !still_open,
                "the flight ended 120 s ago and its waiters are gone, but its span is open \
                 until the lingering entry is purged"
            );
        });
    });
}
