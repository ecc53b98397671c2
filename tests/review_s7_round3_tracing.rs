//! Third review of the flight span's lifetime (e4de30b, 25a873c): `leave_driving`,
//! `Registry::finish`, `publish`, `take_span`, `Run::rejoin`. Every path a flight ends by
//! must close its span exactly once, record its `outcome` and `waiters` on it (once), log its
//! "flight finished" event in it, and do all that with no lock held (a subscriber is user
//! code: one that calls back into the registry must not deadlock).
//!
//! In a test binary of its own: `tracing`'s callsite interest is process-wide. Tests that
//! install a subscriber run one at a time (`SERIAL`), each on a thread of its own with a
//! watchdog (`within`): a deadlock under a registry lock cannot be caught by a timeout inside
//! the test.
//!
//! Deterministic: futures are polled by hand with a no-op waker; gates are oneshot channels;
//! the one clock is tokio's paused one. No sleeps.
//!
//! Every flight path checked ends its span as it should. Found, minor and older than these
//! fixes, fixed since: a call run alone past a capacity bound, which is no flight, logged
//! "flight finished" (with no span) and, with `metrics`, counted in
//! `tower_coalesce_flights_total`, "one per flight when it ends".
#![cfg(feature = "tracing")]

mod support;

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use support::recorder::{ended, on_flight_end, traced};
use support::{gated, now, out, paused_runtime, pending, poll, ready, Waiter};
use tower_coalesce::{Group, GroupBuilder};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SEC: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// 25a873c: a flight nobody joined, whose output lingers, records its outcome (the previous
/// fix took the entry's span before the output's holder was made from it, so the holder had
/// none to record on). It closes as the call ends, not at expiry; one waiter, the leader. The
/// same for a lingering failure (`linger_errors`), and for an output that does not linger.
#[test]
fn a_flight_nobody_joined_records_its_end_lingering_or_not() {
    traced("nobody joined", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new()
                .linger(30 * SEC)
                .linger_errors(30 * SEC)
                .build();
            assert_eq!(
                out(ready(&mut group.run_result(1, now(Ok(1))), "ok")),
                Ok(1)
            );
            assert_eq!(
                out(ready(&mut group.run_result(2, now(Err("e"))), "err")),
                Err("e")
            );
            let plain: Group<u32> = Group::new();
            assert_eq!(
                out(ready(&mut plain.run_result(3, now(Ok(3))), "plain")),
                Ok(3)
            );
            assert_eq!(group.len(), 2, "both outputs linger");
            assert_eq!(
                rec.spans(),
                [ended("ok", 1), ended("error", 1), ended("ok", 1)],
                "closed as each call ended, the outcome on the span"
            );
            // Lingering hits make no span and record nothing.
            assert_eq!(
                out(ready(&mut group.run_result(1, now(Ok(9))), "hit")),
                Ok(1)
            );
            tokio::time::advance(31 * SEC).await;
            group.purge_expired();
            assert_eq!(group.len(), 0);
            assert_eq!(rec.spans().len(), 3);
            assert!(rec.orphan_events().is_empty(), "{:?}", rec.orphan_events());
        });
    });
}

/// A lingering flight with followers held, unpolled: closed at publication with the waiters
/// it was handed to (three followers and the leader).
#[test]
fn a_lingering_flight_with_followers_records_every_waiter() {
    traced("lingering with followers", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new().linger_errors(30 * SEC).build();
            let (tx, make) = gated();
            let mut l = group.run_result(1, make);
            let mut fs: Vec<Waiter> = (0..3).map(|_| group.run_result(1, now(Ok(0)))).collect();
            pending(&mut l, "l");
            assert_eq!(rec.open(), 1);
            tx.send(Err("boom")).unwrap();
            assert_eq!(out(ready(&mut l, "l")), Err("boom"));
            assert_eq!(rec.spans(), [ended("error", 4)]);
            for f in &mut fs {
                assert_eq!(out(ready(f, "f")), Err("boom"));
            }
            assert_eq!(group.stats().errors, 1);
        });
    });
}

/// The driver leaves with followers (the call is orphaned, nobody polled it since); then the
/// followers leave, the last one cancelling the call: the span closes then, once, `cancelled`
/// with no waiter, the inner future dropped, the key free.
#[test]
fn an_orphaned_call_cancelled_by_its_last_follower_closes_once() {
    traced("orphan cancelled", |rec| {
        let group: Group<u32> = Group::new();
        let (tx, make) = gated();
        let mut l = group.run_result(1, make);
        let mut f1 = group.run_result(1, now(Ok(0)));
        let mut f2 = group.run_result(1, now(Ok(0)));
        pending(&mut l, "l");
        pending(&mut f1, "f1");
        pending(&mut f2, "f2");
        drop(l);
        assert_eq!(rec.open(), 1, "orphaned, not over");
        drop(f1);
        assert_eq!(rec.open(), 1, "one follower left");
        drop(f2);
        assert!(tx.is_closed(), "the call was dropped");
        assert_eq!(rec.spans(), [ended("cancelled", 0)]);
        assert!(group.is_empty());
        assert_eq!(group.stats().cancelled, 1);
    });
}

/// A follower that took the call over from a leader that left then leaves in turn, with
/// another follower still there: the call goes on (not cancelled); it ends once, `ok`, with
/// its two remaining waiters (the adopter and the follower).
#[test]
fn a_call_orphaned_twice_ends_once_with_its_last_waiters() {
    traced("orphaned twice", |rec| {
        let group: Group<u32> = Group::new();
        let (tx, make) = gated();
        let mut l = group.run_result(1, make);
        let mut a = group.run_result(1, now(Ok(0)));
        let mut b = group.run_result(1, now(Ok(0)));
        let mut c = group.run_result(1, now(Ok(0)));
        pending(&mut l, "l");
        for f in [&mut a, &mut b, &mut c] {
            pending(f, "follower");
        }
        drop(l);
        pending(&mut a, "a adopts");
        drop(a);
        pending(&mut b, "b adopts");
        assert_eq!(rec.open(), 1);
        tx.send(Ok(7)).unwrap();
        assert_eq!(out(ready(&mut b, "b")), Ok(7));
        assert_eq!(out(ready(&mut c, "c")), Ok(7));
        assert_eq!(rec.spans(), [ended("ok", 2)]);
        assert_eq!(group.stats().cancelled, 0);
    });
}

/// A forgotten flight whose driver then leaves, while a follower that joined before `forget`
/// stays: the follower takes the call over and the flight ends once, `ok`; a newer flight of
/// the key has a span of its own. Then a forgotten flight whose every waiter leaves: cancelled.
#[test]
fn forgotten_flights_end_once_whether_finished_or_cancelled() {
    traced("forgotten", |rec| {
        let group: Group<u32> = Group::new();
        let (tx, make) = gated();
        let mut l = group.run_result(1, make);
        let mut f = group.run_result(1, now(Ok(0)));
        pending(&mut l, "l");
        pending(&mut f, "f");
        assert!(group.forget(&1));
        let mut newer = group.run_result(1, now(Ok(2)));
        assert!(newer.is_leader());
        assert_eq!(out(ready(&mut newer, "newer")), Ok(2));
        drop(l);
        pending(&mut f, "f adopts the forgotten call");
        tx.send(Ok(1)).unwrap();
        assert_eq!(out(ready(&mut f, "f")), Ok(1));
        assert_eq!(rec.spans(), [ended("ok", 1), ended("ok", 1)]);

        let (tx, make) = gated();
        let mut l = group.run_result(3, make);
        let mut f = group.run_result(3, now(Ok(0)));
        pending(&mut l, "l");
        pending(&mut f, "f");
        assert!(group.forget(&3));
        drop(f);
        drop(l);
        assert!(tx.is_closed());
        assert_eq!(rec.spans()[2], ended("cancelled", 0));
        assert!(group.is_empty());
        let s = group.stats();
        assert_eq!((s.forgotten, s.cancelled, s.in_flight), (2, 1, 0), "{s:?}");
    });
}

/// `Run::rejoin`: a follower with no `make` of its own took the call over and it failed; it
/// parks again and another follower runs the retry. One span for the flight and its retry,
/// ended once (`ok`), with the waiters the retry's output went to: the re-parked adopter and
/// the retry's driver.
#[test]
fn an_adopted_failure_retried_by_another_follower_ends_once() {
    traced("rejoin", |rec| {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let (l_tx, l_make) = gated();
        let mut l = group.run_retryable(1, l_make);
        let mut a = group.run_result(1, now(Ok(0)));
        let (m_tx, m_make) = gated();
        let mut m = group.run_retryable(1, m_make);
        pending(&mut l, "l");
        pending(&mut a, "a");
        pending(&mut m, "m");
        drop(l);
        pending(&mut a, "a adopts");
        l_tx.send(Err("l's call")).unwrap();
        pending(&mut a, "a parks again");
        assert_eq!(rec.open(), 1, "retried: not over");
        assert!(rec.spans()[0].outcomes.is_empty(), "no outcome yet");
        pending(&mut m, "m runs the retry");
        m_tx.send(Ok(5)).unwrap();
        assert_eq!(out(ready(&mut m, "m")), Ok(5));
        assert_eq!(out(ready(&mut a, "a")), Ok(5));
        assert_eq!(rec.spans(), [ended("ok", 2)]);
        let s = group.stats();
        assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 1), "{s:?}");
    });
}

/// `Run::rejoin` with the adopter's own `make`: the retry is its own call. One span, ended
/// once with the retry's failure (no retry left), with the follower that waited and the
/// adopter.
#[test]
fn an_adopted_failure_retried_by_the_adopters_make_ends_once() {
    traced("rejoin with make", |rec| {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let (l_tx, l_make) = gated();
        let mut l = group.run_retryable(1, l_make);
        let (a_tx, a_make) = gated();
        let mut a = group.run_retryable(1, a_make);
        let mut f = group.run_result(1, now(Ok(0)));
        pending(&mut l, "l");
        pending(&mut a, "a");
        pending(&mut f, "f");
        drop(l);
        pending(&mut a, "a adopts");
        l_tx.send(Err("l's call")).unwrap();
        pending(&mut a, "a retries with its make");
        assert!(rec.spans()[0].outcomes.is_empty());
        a_tx.send(Err("a's call")).unwrap();
        assert_eq!(out(ready(&mut a, "a")), Err("a's call"));
        assert_eq!(out(ready(&mut f, "f")), Err("a's call"));
        assert_eq!(rec.spans(), [ended("error", 2)]);
        let s = group.stats();
        assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 2), "{s:?}");
    });
}

/// A detached flight whose caller and followers all left: its task publishes to nobody, so
/// zero waiters (the task is no waiter), `ok`.
#[test]
fn a_detached_flight_left_by_everybody_records_no_waiter() {
    traced("detached", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new().detached(true).build();
            let (tx, make) = gated();
            let mut l = group.run_result(1, make);
            let mut f = group.run_result(1, now(Ok(0)));
            pending(&mut l, "l");
            pending(&mut f, "f");
            drop(l);
            drop(f);
            tokio::task::yield_now().await;
            assert_eq!(rec.open(), 1, "the call still runs");
            tx.send(Ok(1)).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(group.in_flight(), 0);
            assert_eq!(rec.spans(), [ended("ok", 0)]);
        });
    });
}

/// A subscriber that calls back into the registry on every record, event and close of a
/// flight span (stats, len, and a call of the very key, which copies a lingering output under
/// its flight's lock or starts a flight) never deadlocks, on every path a flight ends by:
/// nobody joined (lingering), published to followers, a driver's cancel, a follower's
/// cancel, the last maker leaving a retry, an adopted retry, a forgotten flight. Each span
/// ends as `ended` says.
#[test]
fn a_subscriber_calling_back_on_record_never_deadlocks() {
    traced("reentrant record", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new().retry_failed(1).linger(30 * SEC).build();
            let key = Rc::new(Cell::new(0_u32));
            let calls = Rc::new(Cell::new(0_u32));
            let (g, k, c) = (group.clone(), key.clone(), calls.clone());
            on_flight_end(move || {
                c.set(c.get() + 1);
                let _ = (g.stats(), g.len(), g.in_flight());
                let mut again = g.run_result(k.get(), now(Ok(99)));
                let _ = poll(&mut again);
            });

            // 1. Nobody joined, lingering.
            key.set(1);
            assert_eq!(out(ready(&mut group.run_result(1, now(Ok(1))), "1")), Ok(1));

            // 2. Published to followers.
            key.set(2);
            let (tx, make) = gated();
            let mut l = group.run_result(2, make);
            let mut f = group.run_result(2, now(Ok(0)));
            pending(&mut l, "l2");
            tx.send(Ok(2)).unwrap();
            assert_eq!(out(ready(&mut l, "l2")), Ok(2));
            assert_eq!(out(ready(&mut f, "f2")), Ok(2));

            // 3. A driver's cancel.
            key.set(3);
            let (_tx, make) = gated();
            let mut l = group.run_result(3, make);
            pending(&mut l, "l3");
            drop(l);

            // 4. A follower's cancel (orphaned first).
            key.set(4);
            let (_tx, make) = gated();
            let mut l = group.run_result(4, make);
            let mut f = group.run_result(4, now(Ok(0)));
            pending(&mut l, "l4");
            pending(&mut f, "f4");
            drop(l);
            drop(f);

            // 5. The last maker leaves a retry: the failure goes to the others.
            key.set(5);
            let (tx, make) = gated();
            let mut l = group.run_retryable(5, make);
            let (_m_tx, m_make) = gated();
            let mut m = group.run_retryable(5, m_make);
            let mut f = group.run_result(5, now(Ok(0)));
            pending(&mut l, "l5");
            pending(&mut m, "m5");
            pending(&mut f, "f5");
            tx.send(Err("e5")).unwrap();
            assert_eq!(out(ready(&mut l, "l5")), Err("e5"));
            drop(m);
            assert_eq!(out(ready(&mut f, "f5")), Err("e5"));

            // 6. An adopted call retried with the adopter's make.
            key.set(6);
            let (tx, make) = gated();
            let mut l = group.run_retryable(6, make);
            let (a_tx, a_make) = gated();
            let mut a = group.run_retryable(6, a_make);
            pending(&mut l, "l6");
            pending(&mut a, "a6");
            drop(l);
            pending(&mut a, "a6 adopts");
            tx.send(Err("e6")).unwrap();
            pending(&mut a, "a6 retries");
            a_tx.send(Ok(6)).unwrap();
            assert_eq!(out(ready(&mut a, "a6")), Ok(6));

            // 7. A forgotten flight.
            key.set(7);
            let (tx, make) = gated();
            let mut l = group.run_result(7, make);
            let mut f = group.run_result(7, now(Ok(0)));
            pending(&mut l, "l7");
            assert!(group.forget(&7));
            tx.send(Ok(7)).unwrap();
            assert_eq!(out(ready(&mut l, "l7")), Ok(7));
            assert_eq!(out(ready(&mut f, "f7")), Ok(7));

            assert!(calls.get() > 0, "the hook ran");
            let spans = rec.spans();
            assert_eq!(rec.open(), 0, "{spans:#?}");
            for s in &spans {
                assert_eq!(s.closed, 1, "closed once: {s:?}");
                assert_eq!(s.outcomes.len(), 1, "one outcome per flight: {s:?}");
                assert_eq!(s.waiters.len(), 1, "{s:?}");
                assert_eq!(s.finished, [(s.outcomes[0].clone(), s.waiters[0])], "{s:?}");
            }
            let outcomes: Vec<&str> = spans.iter().map(|s| s.outcomes[0].as_str()).collect();
            for expected in ["cancelled", "error"] {
                assert!(outcomes.contains(&expected), "{outcomes:?}");
            }
            tokio::time::advance(31 * SEC).await;
            group.purge_expired();
            assert_eq!(group.len(), 0);
        });
    });
}

/// A call run alone past `max_in_flight` is no flight: it has no entry, no span, and `Stats`
/// leaves it out of `leaders` and `errors` ("`Stats` counts registered flights"). Yet it ends
/// through the same `trace_end` as a flight: a "flight finished" event with no span (and, with
/// `metrics`, one more `tower_coalesce_flights_total{outcome}`, documented as "one per flight
/// when it ends"), so the flights counted by the metric and the events no longer match the
/// flights `Stats` and the spans count.
#[test]

fn a_call_run_alone_ends_no_flight() {
    traced("alone", |rec| {
        let group: Group<u32> = GroupBuilder::new().max_in_flight(1).build();
        let (tx, make) = gated();
        let mut l = group.run_result(1, make);
        pending(&mut l, "l");
        let mut alone = group.run_result(2, now(Err("alone")));
        assert!(alone.is_alone());
        assert_eq!(out(ready(&mut alone, "alone")), Err("alone"));
        tx.send(Ok(1)).unwrap();
        assert_eq!(out(ready(&mut l, "l")), Ok(1));
        let s = group.stats();
        assert_eq!((s.leaders, s.errors, s.over_capacity), (1, 0, 1), "{s:?}");
        assert_eq!(rec.spans(), [ended("ok", 1)], "one flight, one span");
        assert_eq!(
            rec.orphan_events(),
            [],
            "a call that is no flight logged `flight finished`"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// The HTTP adapter: a response released for a Set-Cookie trailer did not fail
// ---------------------------------------------------------------------------------------------

/// A flight whose response goes to its leader alone for a `Set-Cookie` trailer ended `ok`
/// (it is counted as no error); one whose inner service returned an error, `error`. The
/// released followers' own calls are not flights: no span.
#[cfg(feature = "http")]
#[test]
fn an_http_flight_released_for_a_set_cookie_trailer_ends_ok() {
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, Request, Response};
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::convert::Infallible;
    use tower::{Layer, Service};
    use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

    traced("http set-cookie trailer", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            for fail in [false, true] {
                let svc = tower::service_fn(move |_: Request<Full<Bytes>>| async move {
                    if fail {
                        return Err("inner error");
                    }
                    let mut trailers = HeaderMap::new();
                    trailers.insert("set-cookie", HeaderValue::from_static("s=1"));
                    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = vec![
                        Ok(http_body::Frame::data(Bytes::from_static(b"d"))),
                        Ok(http_body::Frame::trailers(trailers)),
                    ];
                    Ok(Response::new(BoxBody::new(StreamBody::new(
                        futures::stream::iter(frames),
                    ))))
                });
                let mut svc = CoalesceHttpLayer::new().layer(svc);
                let req = || {
                    Request::get("http://example.test/x")
                        .body(Full::new(Bytes::new()))
                        .unwrap()
                };
                let futs = vec![svc.call(req()), svc.call(req())];
                let done = futures::future::join_all(futs).await;
                if fail {
                    assert!(done.iter().all(Result::is_err));
                } else {
                    for (res, by) in done.into_iter().zip([ServedBy::Leader, ServedBy::Released]) {
                        let res = res.unwrap();
                        assert_eq!(res.extensions().get::<ServedBy>(), Some(&by));
                        let body = res.into_body().collect().await.unwrap();
                        assert_eq!(body.trailers().unwrap()["set-cookie"], "s=1");
                    }
                }
                assert_eq!(svc.stats().errors, u64::from(fail));
            }
            // One flight each, handed to its leader and its follower (which then calls).
            assert_eq!(rec.spans(), [ended("ok", 2), ended("error", 2)]);
        });
    });
}
