//! Second review of e4de30b and bcf6993: a flight's `tracing` span is held by its entry, its
//! followers' state and its driver, each giving it up when the flight ends, so that it closes
//! then, exactly once, and never under a lock.
//!
//! In a test binary of its own: `tracing`'s callsite interest is process-wide. Tests that
//! install a subscriber run one at a time (`SERIAL`), each on a thread of its own with a
//! watchdog (`within`): a subscriber called under a registry lock that calls back into the
//! registry deadlocks, which no timeout inside the test could catch.
//!
//! Deterministic: futures are polled by hand with a no-op waker; gates are oneshot channels;
//! the one clock is tokio's paused one.
//!
//! It found, fixed since: a flight cancelled by its driver leaving (`leave_driving`, no
//! follower left) did not take the span from its followers' state, so the span stayed open
//! while any finished waiter's future that holds that state was kept: the failed leader of a
//! retried call (`complete` looked the state up), or a follower that stopped at its wait
//! limit (`give_up`).
#![cfg(feature = "tracing")]

mod support;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use support::recorder::{on_flight_close, traced};
use support::{gated, now, out, paused_runtime, pending, poll, ready, BoxFut, Res, Waiter};
use tower_coalesce::{Group, GroupBuilder, Panicked};

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The flight's span closes when the flight is published, while its waiters' futures are still
/// held (followers not yet polled, the leader's future kept after it resolved): with and
/// without a linger window. The lingering output is still served afterwards, with no span.
#[test]
fn the_span_closes_at_publication_while_waiters_are_still_held() {
    traced("publication", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            for linger in [None, Some(Duration::from_secs(30))] {
                let mut builder = GroupBuilder::new();
                if let Some(window) = linger {
                    builder = builder.linger(window);
                }
                let group: Group<u32> = builder.build();
                let (tx, make) = gated();
                let mut l = group.run_result(1, make);
                let mut fs: Vec<Waiter> = (0..3).map(|_| group.run_result(1, now(Ok(0)))).collect();
                pending(&mut l, "l");
                assert_eq!(rec.open_flights(), 1);
                tx.send(Ok(4)).unwrap();
                assert_eq!(out(ready(&mut l, "l")), Ok(4));
                assert_eq!(
                    rec.open_flights(),
                    0,
                    "{linger:?}: published, but the span is still open"
                );
                for f in &mut fs {
                    assert_eq!(out(ready(f, "f")), Ok(4));
                }
                if linger.is_some() {
                    let mut hit = group.run_result(1, now(Ok(9)));
                    assert_eq!(out(ready(&mut hit, "hit")), Ok(4));
                    assert_eq!(rec.open_flights(), 0);
                }
                drop((l, fs));
            }
            let (made, closed) = rec.flights();
            assert_eq!((made.len(), &closed), (2, &made));
            let finished = rec.finished();
            assert_eq!(finished.len(), 2, "{finished:?}");
            for (i, (parent, outcome)) in finished.iter().enumerate() {
                assert_eq!((*parent, outcome.as_str()), (Some(made[i]), "ok"));
            }
        });
    });
}

/// A call retried by a follower (`retry_failed`): the failed leader's future, resolved with
/// its error, is kept by its caller (as `join!` or `select!` keep a finished branch). The
/// retrying follower then leaves: the flight is cancelled ("flight finished", outcome
/// `cancelled`), but its span stays open for as long as the leader's finished future is kept:
/// the followers' state, which holds it, is given up on publication and on a follower's
/// cancel, not when the driver cancels (`leave_driving`), and the kept `Run` still holds that
/// state (looked up by `complete` to hand the retry on).
#[test]
fn a_cancelled_retrys_span_closes_though_the_failed_leaders_future_is_kept() {
    traced("cancelled retry", |rec| {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let (l_tx, l_make) = gated();
        let mut l = group.run_retryable(1, l_make);
        let (_m_tx, m_make) = gated();
        let mut m = group.run_retryable(1, m_make);
        pending(&mut l, "l");
        pending(&mut m, "m");
        l_tx.send(Err("l's call")).unwrap();
        assert_eq!(out(ready(&mut l, "l")), Err("l's call"));
        pending(&mut m, "m drives the retry");
        drop(m);
        assert_eq!(group.len(), 0, "the flight is over");
        let finished = rec.finished();
        assert_eq!(finished.len(), 1, "{finished:?}");
        assert_eq!(finished[0].1, "cancelled");
        let open = rec.open_flights();
        drop(l);
        assert_eq!(
            rec.open_flights(),
            0,
            "closed once `l` is dropped at the latest"
        );
        assert_eq!(
            open, 0,
            "the flight was cancelled, but its span is open while `l`'s finished future is kept"
        );
    });
}

/// The contrast: the same kept leader's future, but the retry succeeds. The span closes at
/// publication, with one "flight finished" (`ok`) for the flight and its retry, in the span.
#[test]
fn a_published_retrys_span_closes_though_the_failed_leaders_future_is_kept() {
    traced("published retry", |rec| {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let (l_tx, l_make) = gated();
        let mut l = group.run_retryable(1, l_make);
        let (m_tx, m_make) = gated();
        let mut m = group.run_retryable(1, m_make);
        pending(&mut l, "l");
        pending(&mut m, "m");
        l_tx.send(Err("l's call")).unwrap();
        assert_eq!(out(ready(&mut l, "l")), Err("l's call"));
        pending(&mut m, "m drives the retry");
        m_tx.send(Ok(2)).unwrap();
        assert_eq!(out(ready(&mut m, "m")), Ok(2));
        assert_eq!(
            rec.open_flights(),
            0,
            "published: closed, `l` and `m` still held"
        );
        let (made, _) = rec.flights();
        assert_eq!(rec.finished(), [(Some(made[0]), "ok".to_owned())]);
        drop((l, m));
        assert_eq!(group.len(), 0);
    });
}

/// A call that panics, with followers held unpolled: the span closes at publication, its
/// end logged in it as `panicked`; every follower gets the panic.
#[test]
fn a_panicked_flights_span_closes_at_publication() {
    traced("panicked", |rec| {
        let group: Group<u32> = Group::new();
        let mut l = group.run_result(1, || -> BoxFut<Res> {
            Box::pin(async { panic!("inner future panicked") })
        });
        let mut fs: Vec<Waiter> = (0..2).map(|_| group.run_result(1, now(Ok(0)))).collect();
        assert!(ready(&mut l, "l").is_err());
        assert_eq!(rec.open_flights(), 0, "published: closed");
        let (made, _) = rec.flights();
        assert_eq!(rec.finished(), [(Some(made[0]), "panicked".to_owned())]);
        for f in &mut fs {
            assert!(ready(f, "f").is_err());
        }
        drop((l, fs));
        assert_eq!(group.len(), 0);
    });
}

/// The same through the tower layer: a follower stops waiting at its limit
/// (`OnTimeout::Error`) and its response future, resolved with the timeout, is kept; the
/// leader then goes away, cancelling the call. The span stays open until the follower's
/// finished future is dropped.
#[test]
fn a_cancelled_flights_span_closes_though_a_timed_out_followers_future_is_kept() {
    use tower::{Layer, Service};
    use tower_coalesce::{CoalesceLayer, OnTimeout};
    use tower_test::mock;

    traced("timed out follower", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let (mock, mut handle) = mock::pair::<u32, u32>();
            let mut svc = CoalesceLayer::new((|r: &u32| Some(*r)) as fn(&u32) -> Option<u32>)
                .follower_timeout(Duration::from_millis(100))
                .on_follower_timeout(OnTimeout::Error)
                .layer(mock);
            let mut leader = Box::pin(svc.call(1));
            assert!(futures::poll!(leader.as_mut()).is_pending());
            let (_, _reply) = handle.next_request().await.expect("the leader's call");
            let mut follower = Box::pin(svc.call(1));
            assert!(follower.is_follower());
            assert!(futures::poll!(follower.as_mut()).is_pending());
            tokio::time::advance(Duration::from_millis(100)).await;
            match futures::poll!(follower.as_mut()) {
                Poll::Ready(Err(e)) => assert!(e.is_timeout(), "{e:?}"),
                other => panic!("the follower times out: {other:?}"),
            }
            drop(leader);
            assert_eq!(svc.group().len(), 0, "cancelled");
            assert_eq!(svc.stats().cancelled, 1);
            let open = rec.open_flights();
            drop(follower);
            assert_eq!(rec.open_flights(), 0);
            assert_eq!(
                open, 0,
                "the call was cancelled, but its span is open while the follower's future is kept"
            );
        });
    });
}

/// When a flight's span closes, the subscriber (user code) calls back into the registry:
/// every shard (`stats`), the key again (a lingering hit copies the output under the
/// flight's own lock), and a follower of that very flight still held (polling it takes the
/// flight's lock). On every path a flight ends by (publication, lingering publication, a
/// publication by the last follower able to retry leaving, an adopted retry's publication,
/// a follower's cancel, a driver's cancel, a forgotten flight's end) this must not deadlock,
/// and the span closes exactly once, at the flight's end.
#[test]
fn a_subscriber_reentering_the_registry_as_a_span_closes_never_deadlocks() {
    traced("reentrant close", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new()
                .retry_failed(1)
                .linger(Duration::from_secs(30))
                .build();
            let held: Rc<RefCell<Option<Waiter>>> = Rc::default();
            let got: Rc<RefCell<Vec<Result<Res, Panicked>>>> = Rc::default();
            let hits: Rc<RefCell<Vec<Result<Res, Panicked>>>> = Rc::default();
            let closes = Rc::new(Cell::new(0));
            let (g, h, o, x, c) = (
                group.clone(),
                held.clone(),
                got.clone(),
                hits.clone(),
                closes.clone(),
            );
            on_flight_close(move || {
                c.set(c.get() + 1);
                let _ = (g.stats(), g.len(), g.in_flight());
                // Key 1's lingering output: copied under its flight's lock.
                let mut hit = g.run_result(1, now(Ok(99)));
                if let Poll::Ready(r) = poll(&mut hit) {
                    x.borrow_mut().push(r);
                }
                drop(hit);
                let taken = h.borrow_mut().take();
                if let Some(mut f) = taken {
                    match poll(&mut f) {
                        Poll::Ready(r) => o.borrow_mut().push(r),
                        Poll::Pending => *h.borrow_mut() = Some(f),
                    }
                }
            });
            let expect_close = |n: usize, what: &str| {
                assert_eq!(closes.get(), n, "{what}: span closes so far");
                assert_eq!(rec.open_flights(), 0, "{what}: open spans");
                let seen: Vec<Res> = hits.borrow_mut().drain(..).map(out).collect();
                assert_eq!(
                    seen,
                    [Ok(10)],
                    "{what}: the hook hit key 1's lingering output"
                );
            };

            // 1. Lingering publication (key 1 lingers for the whole test), a follower held.
            let (tx, make) = gated();
            let mut l = group.run_result(1, make);
            *held.borrow_mut() = Some(group.run_result(1, now(Ok(0))));
            pending(&mut l, "l");
            tx.send(Ok(10)).unwrap();
            assert_eq!(out(ready(&mut l, "l")), Ok(10));
            drop(l);
            expect_close(1, "lingering publication");
            let seen: Vec<Res> = got.borrow_mut().drain(..).map(out).collect();
            assert_eq!(seen, [Ok(10)], "the held follower got the output");

            // 2. The last follower able to retry leaves: the failure is published to the
            //    follower without a make (held).
            let (tx, make) = gated();
            let mut l = group.run_retryable(2, make);
            let (_m_tx, m_make) = gated();
            let mut m = group.run_retryable(2, m_make);
            let mut f = group.run_result(2, now(Ok(0)));
            pending(&mut l, "l");
            pending(&mut m, "m");
            pending(&mut f, "f");
            *held.borrow_mut() = Some(f);
            tx.send(Err("l's call")).unwrap();
            assert_eq!(out(ready(&mut l, "l")), Err("l's call"));
            drop(l);
            drop(m);
            expect_close(2, "last maker left");
            let seen: Vec<Res> = got.borrow_mut().drain(..).map(out).collect();
            assert_eq!(seen, [Err("l's call")], "the held follower got the failure");

            // 3. An adopted call retried with the adopter's make, a follower held.
            let (tx, make) = gated();
            let mut l = group.run_retryable(3, make);
            let (a_tx, a_make) = gated();
            let mut a = group.run_retryable(3, a_make);
            let mut f = group.run_result(3, now(Ok(0)));
            pending(&mut l, "l");
            pending(&mut a, "a");
            pending(&mut f, "f");
            *held.borrow_mut() = Some(f);
            drop(l);
            pending(&mut a, "a adopts");
            tx.send(Err("l's call")).unwrap();
            pending(&mut a, "a retries");
            a_tx.send(Ok(33)).unwrap();
            assert_eq!(out(ready(&mut a, "a")), Ok(33));
            drop(a);
            expect_close(3, "adopted retry");
            let seen: Vec<Res> = got.borrow_mut().drain(..).map(out).collect();
            assert_eq!(seen, [Ok(33)]);
            assert!(group.forget(&3));

            // 4. A follower's cancel: the retry's only follower leaves before it starts.
            let (tx, make) = gated();
            let mut l = group.run_retryable(4, make);
            let (_m_tx, m_make) = gated();
            let mut m = group.run_retryable(4, m_make);
            pending(&mut l, "l");
            pending(&mut m, "m");
            tx.send(Err("l's call")).unwrap();
            assert_eq!(out(ready(&mut l, "l")), Err("l's call"));
            drop(l);
            drop(m);
            expect_close(4, "a follower's cancel");

            // 5. A driver's cancel, after a follower came and went.
            let (_tx, make) = gated();
            let mut l = group.run_result(5, make);
            let mut f = group.run_result(5, now(Ok(0)));
            pending(&mut l, "l");
            pending(&mut f, "f");
            drop(f);
            drop(l);
            expect_close(5, "a driver's cancel");

            // 6. A forgotten flight with a follower held: it ends (not lingering).
            let (tx, make) = gated();
            let mut l = group.run_result(6, make);
            *held.borrow_mut() = Some(group.run_result(6, now(Ok(0))));
            pending(&mut l, "l");
            assert!(group.forget(&6));
            tx.send(Ok(60)).unwrap();
            assert_eq!(out(ready(&mut l, "l")), Ok(60));
            drop(l);
            expect_close(6, "forgotten");
            let seen: Vec<Res> = got.borrow_mut().drain(..).map(out).collect();
            assert_eq!(seen, [Ok(60)]);

            assert!(held.borrow().is_none());
            let (made, closed) = rec.flights();
            assert_eq!(
                made.len(),
                6,
                "one span per flight, retries included, none for hits"
            );
            assert_eq!(closed, made, "each closed once");
            tokio::time::advance(Duration::from_secs(31)).await;
            group.purge_expired();
            assert_eq!(group.len(), 0);
        });
    });
}

/// A detached flight whose caller left: its span closes when the task publishes, not before
/// (the call is still running) and not later.
#[test]
fn a_detached_flights_span_closes_when_its_task_publishes() {
    traced("detached", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new().detached(true).build();
            let (tx, make) = gated();
            let mut l = group.run_result(1, make);
            pending(&mut l, "l");
            drop(l);
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(rec.open_flights(), 1, "the call still runs, in its span");
            assert_eq!(group.in_flight(), 1);
            tx.send(Ok(1)).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(group.in_flight(), 0);
            assert_eq!(rec.open_flights(), 0, "the task published: the span closed");
            let (made, closed) = rec.flights();
            assert_eq!((made.len(), closed), (1, made.clone()));
            let finished = rec.finished();
            assert_eq!(finished, [(Some(made[0]), "ok".to_owned())]);
        });
    });
}
