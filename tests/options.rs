//! The options of issue 4, pinned down through the public API: detached flights, the follower
//! wait limit, the linger window, retry of failed flights, capacity bounds, forget, stats and
//! the shared flag, and (behind their features) tracing spans and metrics counters.
//!
//! Every test is deterministic: time is paused (`start_paused`) and only moved on purpose;
//! backend calls are reported to the test through a channel and answered by the test (a gate
//! per call), so the test decides when and how each call ends; progress is observed through
//! counters. Every async test is bounded by a timeout, so a hang fails instead of stalling.
//!
//! The helpers are in `options_support`; the tracing tests are in `options_tracing.rs`.

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::sync::oneshot;
use tower::{service_fn, Service};
use tower_coalesce::{CoalesceLayer, Group, GroupBuilder, OnTimeout};
use tower_layer::Layer;

mod options_support;
use options_support::*;

// ---------------------------------------------------------------------------------------------
// 1. Detached flights
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn detached_call_completes_after_every_waiter_left_and_frees_the_key() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().detached(true).layer(backend);
        let leader = start(&mut svc, 1);
        let follower = start(&mut svc, 1);
        assert!(leader.is_leader() && follower.is_follower());
        // Never polled, both gone: nobody waits any more.
        drop(follower);
        drop(leader);
        let call = ctl.next().await;
        assert_eq!((call.n, call.key), (1, 1));
        assert_eq!(ctl.live(), 1, "the detached call runs with no waiter");
        assert_eq!(
            svc.in_flight(),
            1,
            "the key stays registered while the call runs"
        );
        call.ok("filled");
        until("the detached call completed", || ctl.completed() == 1).await;
        until("the key is freed", || svc.in_flight() == 0).await;
        until("the entry is removed", || svc.group().is_empty()).await;
        assert_eq!(ctl.cancelled(), 0, "the call was not cancelled");
        assert_eq!(svc.stats().cancelled, 0);
        assert_eq!(svc.stats().leaders, 1);

        // The key is free: the next request makes a new call (no stale join, no lingering).
        let next = spawn(start(&mut svc, 1));
        let call = ctl.next().await;
        assert_eq!(call.n, 2);
        call.ok("second");
        assert_eq!(ok(done("next", next).await), "second");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn default_last_waiter_gone_cancels_the_call_promptly() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().layer(backend);
        let mut leader = Box::pin(start(&mut svc, 1));
        let follower = start(&mut svc, 1);
        assert!(futures::poll!(leader.as_mut()).is_pending());
        let call = ctl.next().await;
        assert_eq!(ctl.live(), 1);
        drop(follower);
        assert_eq!(ctl.live(), 1, "a waiter is left: the call goes on");
        drop(leader);
        // Synchronously: no task had to run for the cancellation to happen.
        assert_eq!(ctl.live(), 0, "the backend future was dropped");
        assert_eq!(ctl.cancelled(), 1);
        assert_eq!(svc.in_flight(), 0, "the key is freed");
        assert!(svc.group().is_empty());
        assert_eq!(svc.stats().cancelled, 1);
        assert!(
            call.reply.is_closed(),
            "nobody listens to the call's answer"
        );

        let next = spawn(start(&mut svc, 1));
        let call = ctl.next().await;
        assert_eq!(call.n, 2, "a new request makes a new call");
        call.ok("fresh");
        assert_eq!(ok(done("next", next).await), "fresh");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn detached_short_deadline_leader_does_not_cancel_longer_followers() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().detached(true).layer(backend);
        let leader = tokio::spawn(tokio::time::timeout(
            Duration::from_secs(1),
            start(&mut svc, 1),
        ));
        let follower = tokio::spawn(tokio::time::timeout(
            Duration::from_secs(10),
            start(&mut svc, 1),
        ));
        let call = ctl.next().await;
        wait(Duration::from_secs(2)).await;
        assert!(
            bounded("leader", leader).await.unwrap().is_err(),
            "the leader gave up at its deadline"
        );
        assert_eq!(ctl.live(), 1, "the call goes on");
        assert_eq!(ctl.cancelled(), 0);
        call.ok("late");
        let out = bounded("follower", follower).await.unwrap();
        assert_eq!(
            ok(out.expect("the follower is within its deadline")),
            "late"
        );
        assert_eq!(ctl.calls(), 1);
        assert_eq!(svc.stats().cancelled, 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn core_detached_group_completes_with_no_waiter() {
    bounded("test", async {
        let group: Group<&str> = GroupBuilder::new().detached(true).build();
        let (done_tx, done_rx) = oneshot::channel();
        let run = group.run("fill", move || async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = done_tx.send("filled");
            1u8
        });
        assert!(run.is_leader());
        drop(run);
        assert_eq!(group.in_flight(), 1);
        assert_eq!(bounded("fill", done_rx).await.unwrap(), "filled");
        until("the key is freed", || group.is_empty()).await;
        assert_eq!(group.in_flight(), 0);
        assert_eq!(group.stats().cancelled, 0);

        // Not detached: the same drop cancels the call, so its side effect never happens.
        let group: Group<&str> = Group::new();
        let (done_tx, mut done_rx) = oneshot::channel::<&str>();
        let run = group.run("fill", move || async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = done_tx.send("filled");
            1u8
        });
        drop(run);
        assert_eq!(group.in_flight(), 0);
        assert_eq!(group.stats().cancelled, 1);
        assert!(done_rx.try_recv().is_err(), "dropped, never completed");
    })
    .await;
}

/// A panic in a detached call is contained like any other: its waiters get the panic, the key
/// is freed, and a detached call that panics with nobody waiting leaves nothing behind.
#[tokio::test(start_paused = true)]
async fn detached_call_that_panics() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().detached(true).layer(backend);
        let leader = spawn(start(&mut svc, 1));
        let follower = spawn(start(&mut svc, 1));
        ctl.next().await.panic("detached boom");
        for w in [leader, follower] {
            let err = done("waiter", w).await.unwrap_err();
            assert_eq!(err.panic_message(), Some("detached boom"));
        }
        assert_eq!(svc.in_flight(), 0);
        assert_eq!(svc.stats().panics, 1);

        drop(start(&mut svc, 2));
        ctl.next().await.panic("nobody waits");
        until("the key is freed", || svc.group().is_empty()).await;
        assert_eq!(svc.stats().panics, 2);

        let next = spawn(start(&mut svc, 1));
        ctl.next().await.ok("fine");
        assert_eq!(ok(done("next", next).await), "fine");
    })
    .await;
}

/// The cache-fill use: nobody waits, the detached call completes and its response lingers,
/// so the next request is served with no call.
#[tokio::test(start_paused = true)]
async fn detached_call_with_no_waiter_fills_the_linger_window() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .detached(true)
            .linger(Duration::from_secs(10))
            .layer(backend);
        drop(start(&mut svc, 1));
        ctl.next().await.ok("filled");
        until("the call completed", || svc.in_flight() == 0).await;
        assert_eq!(svc.group().len(), 1, "the response lingers");
        let hit = start(&mut svc, 1);
        assert!(!hit.is_leader());
        assert_eq!(ok(bounded("hit", hit).await), "filled");
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 1);
        assert_eq!(svc.stats().lingered, 1);
    })
    .await;
}

/// Outside a tokio runtime there is nothing to spawn on: a detached group's flights are driven
/// by their waiters, as without the option (and do not panic or hang).
#[test]
fn detached_outside_a_runtime_is_driven_by_its_waiters() {
    let group: Group<u8> = GroupBuilder::new().detached(true).build();
    let a = group.run(1, || async { 1u32 });
    let b = group.run(1, || async { 2u32 });
    assert!(a.is_leader() && !b.is_leader());
    let (a, b) = futures::executor::block_on(futures::future::join(a, b));
    assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
    assert_eq!(group.in_flight(), 0);
    // No task drives it: dropping the only waiter cancels the flight.
    let run = group.run(2, std::future::pending::<u32>);
    drop(run);
    assert_eq!(group.in_flight(), 0);
    assert_eq!(group.stats().cancelled, 1);
}

// ---------------------------------------------------------------------------------------------
// 2. Follower wait limit
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn follower_past_its_limit_calls_inner_itself_flight_undisturbed() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::CallInner)
            .layer(backend);
        let leader = spawn(start(&mut svc, 1));
        let early = start(&mut svc, 1);
        assert!(early.is_follower());
        let early = spawn(early);
        let first = ctl.next().await;
        wait(Duration::from_millis(500)).await;
        // Joins at 0.5 s: its own limit runs until 1.5 s.
        let late = start(&mut svc, 1);
        assert!(late.is_follower());
        let late = spawn(late);
        wait(Duration::from_millis(600)).await;

        // 1.1 s: the early follower gave up waiting and made its own call.
        let own = ctl.next().await;
        assert_eq!((own.n, own.key), (2, 1));
        assert_eq!(svc.stats().timed_out, 1);
        assert_eq!(svc.stats().fell_through, 1);
        own.ok("own");
        assert_eq!(ok(done("early follower", early).await), "own");
        assert_eq!(ctl.live(), 1, "the first call still runs");
        assert_eq!(ctl.cancelled(), 0);
        assert_eq!(svc.in_flight(), 1);

        first.ok("first");
        assert_eq!(ok(done("leader", leader).await), "first");
        assert_eq!(ok(done("late follower", late).await), "first");
        assert_eq!(ctl.calls(), 2);
        assert_eq!(ctl.cancelled(), 0);
        assert_eq!(svc.stats().timed_out, 1, "the late follower was in time");
        assert_eq!(svc.in_flight(), 0);
        ctl.no_more();
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn follower_timeout_defaults_to_calling_inner() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .follower_timeout(Duration::from_secs(1))
            .layer(backend);
        let leader = spawn(start(&mut svc, 1));
        let follower = spawn(start(&mut svc, 1));
        let first = ctl.next().await;
        wait(Duration::from_secs(2)).await;
        let own = ctl.next().await;
        assert_eq!(own.n, 2);
        own.ok("own");
        assert_eq!(ok(done("follower", follower).await), "own");
        first.ok("first");
        assert_eq!(ok(done("leader", leader).await), "first");
    })
    .await;
}

/// A follower past its limit calls the inner service on its own; if that call panics, the
/// panic is its error (as for every request that came in with a key), and the flight it left
/// goes on for the leader.
#[tokio::test(start_paused = true)]
async fn follower_calling_alone_after_its_limit_gets_its_panic_as_an_error() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::CallInner)
            .layer(backend);
        let leader = spawn(start(&mut svc, 1));
        let follower = spawn(start(&mut svc, 1));
        let first = ctl.next().await;
        wait(Duration::from_secs(2)).await;
        let own = ctl.next().await;
        assert_eq!(own.n, 2, "the follower's own call");
        own.panic("alone and panicking");
        let err = done("follower", follower)
            .await
            .expect_err("its own call panicked");
        assert!(err.is_panic(), "{err:?}");
        assert_eq!(err.panic_message(), Some("alone and panicking"));
        first.ok("first");
        assert_eq!(ok(done("leader", leader).await), "first");
        assert_eq!(svc.in_flight(), 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn follower_past_its_limit_errors_with_timeout_flight_undisturbed() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::Error)
            .layer(backend);
        let leader = spawn(start(&mut svc, 1));
        let impatient = spawn(start(&mut svc, 1));
        let first = ctl.next().await;
        wait(Duration::from_millis(500)).await;
        let patient = spawn(start(&mut svc, 1));
        wait(Duration::from_millis(600)).await;

        let err = done("impatient follower", impatient)
            .await
            .expect_err("timed out");
        assert!(err.is_timeout(), "{err:?}");
        assert!(!err.is_panic());
        assert!(err.get_ref().is_none());
        assert_eq!(svc.stats().timed_out, 1);
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 1, "no call of its own");
        assert_eq!(ctl.live(), 1, "the flight is undisturbed");

        first.ok("first");
        assert_eq!(ok(done("leader", leader).await), "first");
        assert_eq!(ok(done("patient follower", patient).await), "first");
        assert_eq!(ctl.cancelled(), 0);
        assert_eq!(svc.stats().timed_out, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn follower_served_before_its_limit_is_unaffected_and_leader_has_no_limit() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .follower_timeout(Duration::from_secs(1))
            .layer(backend.clone());
        let leader = spawn(start(&mut svc, 1));
        let follower = spawn(start(&mut svc, 1));
        let first = ctl.next().await;
        wait(Duration::from_millis(900)).await;
        first.ok("first");
        assert_eq!(ok(done("follower", follower).await), "first");
        assert_eq!(ok(done("leader", leader).await), "first");
        wait(Duration::from_secs(5)).await;
        ctl.no_more();
        assert_eq!(svc.stats().timed_out, 0);
        assert_eq!(svc.stats().fell_through, 0);

        // A leader alone waits as long as its call takes.
        let leader = spawn(start(&mut svc, 2));
        let call = ctl.next().await;
        wait(Duration::from_secs(60)).await;
        call.ok("slow");
        assert_eq!(ok(done("leader", leader).await), "slow");
        assert_eq!(svc.stats().timed_out, 0);
        assert_eq!(ctl.calls(), 2);
    })
    .await;
}

/// A follower that took over driving the flight (its leader left) is the flight now: its wait
/// limit must not cancel the call everybody waits for and start it again.
#[tokio::test(start_paused = true)]
async fn follower_driving_after_its_leader_left_is_not_cut_by_its_limit() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .follower_timeout(Duration::from_secs(1))
            .layer(backend);
        let leader = tokio::spawn(tokio::time::timeout(
            Duration::from_millis(500),
            start(&mut svc, 1),
        ));
        let follower = spawn(start(&mut svc, 1));
        let first = ctl.next().await;
        wait(Duration::from_millis(600)).await;
        assert!(
            bounded("leader", leader).await.unwrap().is_err(),
            "left at 0.5 s"
        );
        assert_eq!(
            (ctl.live(), ctl.cancelled()),
            (1, 0),
            "handed over, not cancelled"
        );
        wait(Duration::from_millis(600)).await;
        // 1.2 s: past the follower's limit.
        assert_eq!(
            ctl.cancelled(),
            0,
            "the flight is not disturbed by a wait limit"
        );
        first.ok("first");
        assert_eq!(ok(done("follower", follower).await), "first");
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 1);
    })
    .await;
}

/// A follower elected to run the retry of a failed flight makes its own call already: at its
/// wait limit it must neither fail with a timeout (`CallInner` never fails for the limit) nor
/// cancel the retry the others wait for.
#[tokio::test(start_paused = true)]
async fn follower_running_the_retry_is_not_cut_by_its_limit() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .retry_failed(1)
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::CallInner)
            .layer(backend);
        let leader = spawn(start(&mut svc, 1));
        let follower = spawn(start(&mut svc, 1));
        let first = ctl.next().await;
        wait(Duration::from_millis(500)).await;
        first.err("flaky");
        let second = ctl.next().await;
        assert_eq!(second.n, 2, "the follower runs the retry");
        assert_eq!(boom(done("leader", leader).await), Boom("flaky"));
        wait(Duration::from_secs(1)).await;
        // 1.5 s: past the follower's limit, while its own retry call runs.
        assert_eq!(ctl.cancelled(), 0, "the retry call is not cancelled");
        second.ok("second");
        assert_eq!(ok(done("follower", follower).await), "second");
        assert_eq!(ctl.calls(), 2);
    })
    .await;
}

/// A detached flight's leader waits for its call the way a follower does, but the wait limit
/// is for followers only.
#[tokio::test(start_paused = true)]
async fn detached_leader_has_no_wait_limit() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .detached(true)
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::Error)
            .layer(backend);
        let leader = start(&mut svc, 1);
        assert!(leader.is_leader());
        let leader = spawn(leader);
        let call = ctl.next().await;
        wait(Duration::from_secs(5)).await;
        call.ok("slow");
        assert_eq!(ok(done("leader", leader).await), "slow");
        assert_eq!(svc.stats().timed_out, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Linger window
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn linger_serves_the_result_within_the_window_only() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().linger(Duration::from_secs(1)).layer(backend);
        let first = spawn(start(&mut svc, 1));
        ctl.next().await.ok("v1");
        assert_eq!(ok(done("first", first).await), "v1");
        assert_eq!(svc.in_flight(), 0, "a lingering result is not in flight");
        assert_eq!(svc.group().len(), 1, "it is in the registry");

        wait(Duration::from_millis(500)).await;
        let hit = start(&mut svc, 1);
        assert!(!hit.is_leader());
        assert!(hit.is_shared());
        assert_eq!(ok(bounded("hit", hit).await), "v1");
        ctl.no_more();
        assert_eq!(ctl.calls(), 1);
        assert_eq!(svc.stats().lingered, 1);
        assert_eq!(svc.stats().leaders, 1);

        // Another key is not served the lingering result.
        let other = spawn(start(&mut svc, 2));
        ctl.next().await.ok("other");
        assert_eq!(ok(done("other", other).await), "other");

        wait(Duration::from_millis(500)).await;
        // 1.0 s after the call ended: the window is over.
        let after = start(&mut svc, 1);
        assert!(after.is_leader(), "a new flight after the window");
        let after = spawn(after);
        let call = ctl.next().await;
        assert_eq!((call.n, call.key), (3, 1));
        call.ok("v2");
        assert_eq!(ok(done("after", after).await), "v2");
        assert_eq!(svc.stats().lingered, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn errors_do_not_linger_by_default() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().linger(Duration::from_secs(10)).layer(backend);
        let first = spawn(start(&mut svc, 1));
        ctl.next().await.err("down");
        assert_eq!(boom(done("first", first).await), Boom("down"));
        assert!(svc.group().is_empty(), "the error is not kept");

        let second = start(&mut svc, 1);
        assert!(second.is_leader());
        let second = spawn(second);
        let call = ctl.next().await;
        assert_eq!(call.n, 2);
        call.ok("up");
        assert_eq!(ok(done("second", second).await), "up");
        assert_eq!(svc.stats().lingered, 0);

        // Panics neither.
        let third = spawn(start(&mut svc, 2));
        ctl.next().await.panic("kaboom");
        assert!(done("third", third).await.unwrap_err().is_panic());
        assert!(start(&mut svc, 2).is_leader());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn linger_errors_keeps_errors_for_their_own_window() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer()
            .linger(Duration::from_secs(10))
            .linger_errors(Duration::from_secs(1))
            .layer(backend);
        let first = spawn(start(&mut svc, 1));
        ctl.next().await.err("down");
        assert_eq!(boom(done("first", first).await), Boom("down"));

        wait(Duration::from_millis(500)).await;
        let hit = start(&mut svc, 1);
        assert!(!hit.is_leader());
        assert_eq!(boom(bounded("hit", hit).await), Boom("down"));
        ctl.no_more();
        assert_eq!(svc.stats().lingered, 1);

        wait(Duration::from_millis(500)).await;
        // 1 s after the error: its window is over although the success window is 10 s.
        let retry = start(&mut svc, 1);
        assert!(retry.is_leader());
        let retry = spawn(retry);
        let call = ctl.next().await;
        assert_eq!(call.n, 2);
        call.ok("up");
        assert_eq!(ok(done("retry", retry).await), "up");

        // The success lingers for its own, longer window.
        wait(Duration::from_secs(9)).await;
        assert_eq!(ok(bounded("hit", start(&mut svc, 1)).await), "up");
        assert_eq!(svc.stats().lingered, 2);
        wait(Duration::from_secs(1)).await;
        assert!(start(&mut svc, 1).is_leader());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn linger_errors_alone_keeps_errors_not_successes() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new()
            .linger_errors(Duration::from_secs(1))
            .build();
        let out = group
            .run_result(1, || async { Err::<u8, _>("down") })
            .await
            .unwrap();
        assert_eq!(out, Err("down"));
        let hit = group.run_result(1, || async { Ok::<u8, &str>(1) });
        assert!(!hit.is_leader(), "the error lingers");
        assert_eq!(hit.await.unwrap(), Err("down"));

        let out = group
            .run_result(2, || async { Ok::<u8, &str>(2) })
            .await
            .unwrap();
        assert_eq!(out, Ok(2));
        assert!(
            group
                .run_result(2, || async { Ok::<u8, &str>(3) })
                .is_leader(),
            "successes do not linger without `linger`"
        );
        assert_eq!(group.stats().lingered, 1);
    })
    .await;
}

/// Key `i` of a test: spread over all 64 bits. Runs of small integers can all fall into one
/// shard of the registry for some of foldhash's per-process seeds (seen in about 1 process in
/// 200); then traffic on other keys never cleans the other shards and the test below would
/// measure the hasher, not the purge.
fn spread(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i << 7)
}

/// An output whose `Clone` panics while `fail` is set.
struct Brittle {
    value: u32,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl Clone for Brittle {
    fn clone(&self) -> Self {
        assert!(!self.fail.load(SeqCst), "clone refused");
        Brittle {
            value: self.value,
            fail: self.fail.clone(),
        }
    }
}

/// A lingering output is cloned for each hit; a `Clone` that panics fails that hit only, and
/// the registry (and the kept output) stay usable.
#[tokio::test(start_paused = true)]
async fn linger_hit_whose_clone_panics() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fail.clone();
        let first = group
            .run(1, move || async move { Brittle { value: 7, fail: f } })
            .await;
        assert_eq!(first.unwrap().value, 7);
        fail.store(true, SeqCst);
        let hit = group.run(1, || async {
            unreachable!("served from the linger window")
        });
        assert!(!hit.is_leader());
        let err = hit.await.map(|b: Brittle| b.value).unwrap_err();
        assert_eq!(err.message(), "clone refused");
        fail.store(false, SeqCst);
        let hit = group.run(1, || async {
            unreachable!("served from the linger window")
        });
        assert_eq!(hit.await.map(|b: Brittle| b.value).unwrap(), 7);
        assert_eq!(group.stats().lingered, 2);
        assert_eq!(group.in_flight(), 0);
    })
    .await;
}

/// A call whose output type is `()`, and that panics.
async fn explode() {
    panic!("kaboom")
}

#[tokio::test(start_paused = true)]
async fn linger_errors_keeps_panics_too() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new()
            .linger_errors(Duration::from_secs(1))
            .build();
        let err = group.run(1, explode).await.unwrap_err();
        assert_eq!(err.message(), "kaboom");
        let hit = group.run(1, || async {});
        assert!(!hit.is_leader(), "the panic lingers");
        assert_eq!(hit.await.unwrap_err().message(), "kaboom");
        wait(Duration::from_secs(1)).await;
        let after = group.run(1, || async {});
        assert!(after.is_leader());
        assert!(after.await.is_ok());
        assert_eq!(group.stats().panics, 1);
    })
    .await;
}

/// Fills the registry with lingering results for keys `spread(i)`, `i` in `range`.
async fn fill(group: &Group<u64>, range: std::ops::Range<u64>) {
    for i in range {
        let k = spread(i);
        let out = bounded("fill", group.run(k, || async move { k })).await;
        assert_eq!(out.unwrap(), k);
    }
}

#[tokio::test(start_paused = true)]
async fn expired_results_are_removed_lazily_by_later_traffic() {
    bounded("test", async {
        let group: Group<u64> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
        fill(&group, 0..1000).await;
        assert_eq!(group.len(), 1000);
        assert_eq!(group.in_flight(), 0, "lingering results are not in flight");

        wait(Duration::from_secs(2)).await;
        // One request cleans up its own shard only: no sweep over the whole map. (Key 0's
        // shard holds at least key 0's expired result.)
        drop(group.run(spread(0), std::future::pending::<u64>));
        let after_one = group.len();
        assert!(after_one < 1000, "expired entries removed: {after_one}");
        assert!(after_one > 0, "not a full sweep on one call: {after_one}");

        // More traffic, over other keys (each call is cancelled at once: it leaves nothing).
        for i in 10_000..11_000 {
            drop(group.run(spread(i), std::future::pending::<u64>));
        }
        assert_eq!(group.len(), 0, "every expired result was removed");
        assert!(group.is_empty());
    })
    .await;
}

/// Distinct keys window after window: the registry holds about one window's worth of
/// results, not everything ever seen.
#[tokio::test(start_paused = true)]
async fn linger_memory_stays_bounded_under_churn() {
    bounded("test", async {
        const PER_WINDOW: u64 = 200;
        let group: Group<u64> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
        let mut peak = 0;
        for window in 0..10 {
            fill(&group, window * PER_WINDOW..(window + 1) * PER_WINDOW).await;
            peak = peak.max(group.len());
            wait(Duration::from_secs(1)).await;
        }
        assert!(
            peak <= 2 * PER_WINDOW as usize,
            "2000 keys seen, {peak} entries at the peak"
        );
        assert_eq!(group.in_flight(), 0);
        group.purge_expired();
        assert!(group.is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn expired_results_are_removed_by_purge_expired_not_before() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().linger(Duration::from_secs(1)).layer(backend);
        let mut calls = Vec::new();
        for k in 1..=100 {
            calls.push(spawn(start(&mut svc, k)));
        }
        for _ in 1..=100 {
            let call = ctl.next().await;
            let v = call.key.to_string();
            call.ok(&v);
        }
        for c in calls {
            ok(done("fill", c).await);
        }
        assert_eq!(svc.group().len(), 100);
        assert_eq!(svc.in_flight(), 0);

        wait(Duration::from_millis(999)).await;
        svc.group().purge_expired();
        assert_eq!(svc.group().len(), 100, "nothing expired yet");
        wait(Duration::from_millis(1)).await;
        svc.group().purge_expired();
        assert_eq!(svc.group().len(), 0);
        assert!(start(&mut svc, 7).is_leader());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn forget_drops_a_lingering_result() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().linger(Duration::from_secs(60)).layer(backend);
        let first = spawn(start(&mut svc, 1));
        ctl.next().await.ok("old");
        assert_eq!(ok(done("first", first).await), "old");
        assert_eq!(svc.group().len(), 1);
        assert!(svc.forget(&1));
        assert!(svc.group().is_empty());
        assert_eq!(svc.stats().forgotten, 1);
        assert_eq!(svc.in_flight(), 0);

        let next = start(&mut svc, 1);
        assert!(next.is_leader());
        let next = spawn(next);
        let call = ctl.next().await;
        assert_eq!(call.n, 2);
        call.ok("new");
        assert_eq!(ok(done("next", next).await), "new");
        assert_eq!(svc.stats().lingered, 0);
        assert!(!svc.forget(&2), "unknown key");
    })
    .await;
}

/// A lingering entry's expiry record survives `forget`; it must not take a later flight of the
/// same key with it when it comes due.
#[tokio::test(start_paused = true)]
async fn forgotten_lingering_expiry_does_not_remove_a_newer_flight() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
        // Several rounds: an expiry matched by the flight's address (as it once was) hits a
        // new flight allocated where the forgotten one was.
        for key in 0..20u32 {
            assert_eq!(group.run(key, || async { 1u32 }).await.unwrap(), 1);
            assert!(group.forget(&key));
            let (tx, rx) = oneshot::channel::<u32>();
            let mut running = group.run(key, move || async move { rx.await.unwrap_or(0) });
            assert!(running.is_leader());
            assert!(futures::poll!(&mut running).is_pending());
            wait(Duration::from_secs(2)).await;
            let joiner = group.run(key, || async { 3u32 });
            assert!(
                !joiner.is_leader(),
                "round {key}: the running flight was removed by the forgotten entry's expiry"
            );
            assert_eq!(group.in_flight(), 1);
            tx.send(2).unwrap();
            let (a, b) = tokio::join!(running, joiner);
            assert_eq!((a.unwrap(), b.unwrap()), (2, 2));
            assert_eq!(group.in_flight(), 0, "round {key}");
            group.purge_expired();
            wait(Duration::from_secs(2)).await;
            group.purge_expired();
            assert!(group.is_empty());
        }
    })
    .await;
}

/// The test above while a lingering hit keeps the forgotten flight alive, so the new flight
/// cannot take its address: it passed even when the test above failed.
#[tokio::test(start_paused = true)]
async fn forgotten_lingering_expiry_with_the_old_flight_still_held() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
        assert_eq!(group.run(1, || async { 1u32 }).await.unwrap(), 1);
        let hit = group.run(1, || async { 9u32 });
        assert!(!hit.is_leader(), "a lingering hit holds the old flight");
        assert!(group.forget(&1));
        let (tx, rx) = oneshot::channel::<u32>();
        let mut running = group.run(1, move || async move { rx.await.unwrap_or(0) });
        assert!(running.is_leader());
        assert!(futures::poll!(&mut running).is_pending());
        wait(Duration::from_secs(2)).await;
        let joiner = group.run(1, || async { 3u32 });
        assert!(!joiner.is_leader(), "joins the running flight");
        assert_eq!(group.in_flight(), 1);
        tx.send(2).unwrap();
        let (a, b) = tokio::join!(running, joiner);
        assert_eq!((a.unwrap(), b.unwrap()), (2, 2));
        assert_eq!(hit.await.unwrap(), 1);
        assert_eq!(group.in_flight(), 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Retry of failed flights
// ---------------------------------------------------------------------------------------------

const FOLLOWERS: usize = 4;

/// Starts a leader and [`FOLLOWERS`] followers of key 1 and fails the first call with `fail`;
/// then checks that the followers retry as one flight, gated at its backend call.
async fn followers_retry_as_one_flight(fail: impl FnOnce(Pending)) {
    let (backend, mut ctl) = backend();
    let mut svc = layer().retry_failed(1).layer(backend);
    let leader = spawn(start(&mut svc, 1));
    let followers: Vec<_> = (0..FOLLOWERS)
        .map(|_| {
            let f = start(&mut svc, 1);
            assert!(f.is_follower());
            spawn(f)
        })
        .collect();
    let first = ctl.next().await;
    fail(first);
    let second = ctl.next().await;
    assert_eq!((second.n, second.key), (2, 1));
    // While the second call is held, every follower waits on it: one of them runs it, the
    // others wait in the same flight. Nobody else calls the backend.
    until("all followers joined the retry", || {
        let s = svc.stats();
        s.leaders == 2 && s.followers == FOLLOWERS as u64 && s.retried == 1
    })
    .await;
    settle().await;
    ctl.no_more();
    assert_eq!(ctl.calls(), 2);
    assert_eq!(svc.in_flight(), 1, "the retry is the only flight");
    assert_eq!(ctl.live(), 1);
    assert_eq!(svc.stats().retried, 1, "one retry, made by one follower");
    let leader = done("leader", leader).await;

    second.ok("second");
    for f in followers {
        assert_eq!(ok(done("follower", f).await), "second");
    }
    assert_eq!(ctl.calls(), 2, "not one call per follower");
    assert_eq!(svc.in_flight(), 0);
    let _ = leader.expect_err("the leader gets its own error");
}

#[tokio::test(start_paused = true)]
async fn retry_failed_followers_retry_an_error_as_one_new_flight() {
    bounded("test", async {
        followers_retry_as_one_flight(|first| first.err("flaky")).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn retry_failed_followers_retry_a_panic_as_one_new_flight() {
    bounded("test", async {
        followers_retry_as_one_flight(|first| first.panic("flaky panic")).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn retry_failed_leader_keeps_its_own_error() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().retry_failed(3).layer(backend);
        let leader = spawn(start(&mut svc, 1));
        let follower = spawn(start(&mut svc, 1));
        ctl.next().await.err("first");
        ctl.next().await.ok("second");
        assert_eq!(boom(done("leader", leader).await), Boom("first"));
        assert_eq!(ok(done("follower", follower).await), "second");
        assert_eq!(svc.stats().retried, 1);
        assert_eq!(svc.stats().errors, 1);

        // A panicking first call: the leader gets the panic, the follower the retry's response.
        let leader = spawn(start(&mut svc, 2));
        let follower = spawn(start(&mut svc, 2));
        ctl.next().await.panic("first");
        ctl.next().await.ok("second");
        let err = done("leader", leader).await.unwrap_err();
        assert!(err.is_panic());
        assert_eq!(err.panic_message(), Some("first"));
        assert_eq!(ok(done("follower", follower).await), "second");
        assert_eq!(svc.stats().panics, 1);
        settle().await;
        ctl.no_more();
    })
    .await;
}

/// The leader of a failed flight whose followers retried gets its own error; nobody else got
/// that error, so it was not shared (Go's `shared`).
#[tokio::test(start_paused = true)]
async fn retry_failed_leader_error_is_not_shared() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().retry_failed(1).layer(backend);
        let mut leader = pin!(start(&mut svc, 1));
        let follower = spawn(start(&mut svc, 1));
        let (out, ()) = tokio::join!(leader.as_mut(), async {
            ctl.next().await.err("first");
        });
        assert_eq!(boom(out), Boom("first"));
        ctl.next().await.ok("second");
        assert_eq!(ok(done("follower", follower).await), "second");
        assert!(!leader.is_shared(), "its error went to nobody else");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn retry_failed_is_bounded() {
    bounded("test", async {
        const RETRIES: usize = 2;
        const N: usize = 5;
        let (backend, mut ctl) = backend();
        let mut svc = layer().retry_failed(RETRIES as u32).layer(backend);
        let mut all = vec![spawn(start(&mut svc, 1))];
        all.extend((0..N).map(|_| spawn(start(&mut svc, 1))));
        for n in 1..=1 + RETRIES {
            let call = ctl.next().await;
            assert_eq!(call.n, n);
            call.err("always");
        }
        for w in all {
            assert_eq!(boom(done("waiter", w).await), Boom("always"));
        }
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 1 + RETRIES, "one call, then one per retry");
        // One retry call per failed call, as long as retries were left.
        assert_eq!(svc.stats().retried, RETRIES as u64);
        assert_eq!(svc.stats().errors, 1 + RETRIES as u64);
        assert_eq!(svc.in_flight(), 0);
    })
    .await;
}

/// The core: only `run_retryable` followers can run a retry; a plain `run_result` follower
/// waits for it all the same, and with no retryable follower everybody gets the error.
#[tokio::test(start_paused = true)]
async fn core_retry_failed_with_retryable_and_plain_followers() {
    bounded("test", async {
        let group = GroupBuilder::new().retry_failed(1).build::<&str>();
        let made = Arc::new(AtomicUsize::new(0));
        let call = |result: Result<u32, &'static str>| {
            let made = made.clone();
            move || {
                made.fetch_add(1, SeqCst);
                async move {
                    tokio::task::yield_now().await;
                    result
                }
            }
        };
        let leader = group.run_retryable("k", call(Err("flaky")));
        let plain = group.run_result("k", call(Ok(1)));
        let retryable = group.run_retryable("k", call(Ok(2)));
        assert!(leader.is_leader() && !plain.is_leader() && !retryable.is_leader());
        let (l, p, r) = tokio::join!(leader, plain, retryable);
        assert_eq!(l.unwrap(), Err("flaky"));
        assert_eq!(r.unwrap(), Ok(2), "the retryable follower ran the retry");
        assert_eq!(
            p.unwrap(),
            Ok(2),
            "the plain follower got the retry's output"
        );
        assert_eq!(made.load(SeqCst), 2);
        assert_eq!(group.stats().retried, 1);

        // Plain followers only: nobody can retry, everybody gets the error.
        let leader = group.run_retryable("j", call(Err("down")));
        let plain = group.run_result("j", call(Ok(3)));
        let (l, p) = tokio::join!(leader, plain);
        assert_eq!((l.unwrap(), p.unwrap()), (Err("down"), Err("down")));
        assert_eq!(made.load(SeqCst), 3);
        assert_eq!(group.stats().retried, 1);
        assert_eq!(group.in_flight(), 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn by_default_followers_share_the_leaders_error() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().layer(backend);
        let leader = spawn(start(&mut svc, 1));
        let follower = spawn(start(&mut svc, 1));
        ctl.next().await.err("shared");
        let a = done("leader", leader).await.unwrap_err();
        let b = done("follower", follower).await.unwrap_err();
        assert_eq!(a.downcast_ref::<Boom>(), Some(&Boom("shared")));
        // One inner error, shared through an `Arc`, not two equal ones.
        let (pa, pb) = (
            a.get_ref().unwrap() as *const _ as *const (),
            b.get_ref().unwrap() as *const _ as *const (),
        );
        assert_eq!(pa, pb, "the same inner error");
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 1);
        assert_eq!(svc.stats().retried, 0);
    })
    .await;
}

/// A backend whose first call waits for a gate and fails, and whose later calls answer at
/// once, as a cache or a circuit breaker does. The followers of the failed flight must still
/// retry as one flight: two calls in all.
#[tokio::test(start_paused = true)]
async fn retry_with_a_backend_that_answers_at_once_still_makes_one_flight() {
    bounded("test", async {
        let calls = Arc::new(AtomicUsize::new(0));
        let (gate_tx, gate_rx) = oneshot::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(Some(gate_rx)));
        let c = calls.clone();
        let backend = service_fn(move |_k: u32| {
            let n = c.fetch_add(1, SeqCst) + 1;
            let gate = gate.lock().unwrap().take();
            async move {
                match gate {
                    Some(gate) if n == 1 => {
                        let _ = gate.await;
                        Err(Boom("first"))
                    }
                    _ => Ok(format!("call {n}")),
                }
            }
        });
        let svc = CoalesceLayer::new(|k: &u32| Some(*k))
            .retry_failed(1)
            .layer(backend);
        let mut svc = svc;
        let mut cx = Context::from_waker(Waker::noop());
        assert!(svc.poll_ready(&mut cx).is_ready());
        let waiters: Vec<_> = (0..=FOLLOWERS).map(|_| tokio::spawn(svc.call(1))).collect();
        until("the first call", || calls.load(SeqCst) == 1).await;
        gate_tx.send(()).unwrap();
        let mut outs = Vec::new();
        for w in waiters {
            outs.push(bounded("waiter", w).await.unwrap());
        }
        assert!(outs[0].is_err());
        assert_eq!(
            calls.load(SeqCst),
            2,
            "followers retried one at a time, one call each"
        );
        for out in &outs[1..] {
            assert_eq!(out.as_deref().unwrap(), "call 2");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Capacity bounds
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn max_in_flight_runs_new_keys_alone_never_waiting() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().max_in_flight(2).layer(backend);
        let a = spawn(start(&mut svc, 1));
        let b = spawn(start(&mut svc, 2));
        let call_a = ctl.next().await;
        let call_b = ctl.next().await;
        assert_eq!(svc.in_flight(), 2);

        let c1 = start(&mut svc, 3);
        let c2 = start(&mut svc, 3);
        assert!(
            !c1.is_follower() && !c2.is_follower(),
            "calls alone are not joinable"
        );
        let (c1, c2) = (spawn(c1), spawn(c2));
        let own1 = ctl.next().await;
        let own2 = ctl.next().await;
        assert_eq!((own1.key, own2.key), (3, 3));
        assert_eq!(svc.in_flight(), 2, "calls alone are not registered");
        own1.ok("c1");
        own2.ok("c2");
        assert_eq!(ok(done("c1", c1).await), "c1", "it did not wait for a or b");
        assert_eq!(ok(done("c2", c2).await), "c2");
        let s = svc.stats();
        assert_eq!((s.over_capacity, s.fell_through), (2, 2));
        assert_eq!(s.leaders, 2);

        // A key already in flight is still joined over capacity.
        let join_a = start(&mut svc, 1);
        assert!(join_a.is_follower());
        let join_a = spawn(join_a);
        settle().await;
        ctl.no_more();
        call_a.ok("a");
        call_b.ok("b");
        assert_eq!(ok(done("a", a).await), "a");
        assert_eq!(ok(done("join a", join_a).await), "a");
        assert_eq!(ok(done("b", b).await), "b");
        assert_eq!(svc.in_flight(), 0);

        // Room again: key 3 is coalesced as usual.
        let c = start(&mut svc, 3);
        assert!(c.is_leader());
        assert!(start(&mut svc, 3).is_follower());
        assert_eq!(svc.in_flight(), 1);
        drop(c);
        assert_eq!(svc.stats().over_capacity, 2);
    })
    .await;
}

/// A request over capacity runs its own call; dropping it cancels that call (it is its only
/// waiter), and leaves the flights in the registry alone.
#[tokio::test(start_paused = true)]
async fn a_call_run_alone_is_cancelled_when_dropped() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().max_in_flight(1).layer(backend);
        let registered = spawn(start(&mut svc, 1));
        let first = ctl.next().await;
        let mut alone = Box::pin(start(&mut svc, 2));
        assert!(futures::poll!(alone.as_mut()).is_pending());
        let _own = ctl.next().await;
        assert_eq!(ctl.live(), 2);
        drop(alone);
        assert_eq!(ctl.live(), 1, "its own call was dropped");
        assert_eq!(ctl.cancelled(), 1);
        assert_eq!(svc.in_flight(), 1);
        first.ok("one");
        assert_eq!(ok(done("registered", registered).await), "one");
        assert_eq!(svc.in_flight(), 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn max_followers_extra_followers_make_their_own_call() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().max_followers(2).layer(backend);
        let leader = spawn(start(&mut svc, 1));
        let f1 = start(&mut svc, 1);
        let f2 = start(&mut svc, 1);
        let extra = start(&mut svc, 1);
        assert!(f1.is_follower() && f2.is_follower());
        assert!(!extra.is_follower(), "the third follower runs alone");
        let (f1, f2, extra) = (spawn(f1), spawn(f2), spawn(extra));
        let first = ctl.next().await;
        let own = ctl.next().await;
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 2);
        assert_eq!(svc.in_flight(), 1);
        let s = svc.stats();
        assert_eq!((s.leaders, s.followers), (1, 2));
        assert_eq!((s.over_capacity, s.fell_through), (1, 1));
        own.ok("own");
        assert_eq!(ok(done("extra", extra).await), "own");
        first.ok("first");
        for w in [leader, f1, f2] {
            assert_eq!(ok(done("waiter", w).await), "first");
        }
    })
    .await;
}

/// A detached flight's caller waits as a follower of the task that drives its call; it must
/// not take one of the `max_followers` places.
#[tokio::test(start_paused = true)]
async fn max_followers_counts_followers_only_when_detached() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().detached(true).max_followers(1).layer(backend);
        let leader = start(&mut svc, 1);
        let follower = start(&mut svc, 1);
        assert!(leader.is_leader());
        assert!(follower.is_follower(), "one follower is allowed");
        let (leader, follower) = (spawn(leader), spawn(follower));
        ctl.next().await.ok("v");
        assert_eq!(ok(done("leader", leader).await), "v");
        assert_eq!(ok(done("follower", follower).await), "v");
        assert_eq!(svc.stats().over_capacity, 0);
        assert_eq!(ctl.calls(), 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn core_capacity_bounds() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new()
            .max_in_flight(1)
            .max_followers(1)
            .build();
        let a = group.run(1, std::future::pending::<u8>);
        assert!(a.is_leader());
        let joined = group.run(1, std::future::pending::<u8>);
        assert!(!joined.is_leader());
        let extra = group.run(1, || async { 5u8 });
        assert!(extra.is_leader(), "over max_followers: alone");
        let other = group.run(2, || async { 6u8 });
        assert!(other.is_leader(), "over max_in_flight: alone");
        assert_eq!(group.in_flight(), 1);
        assert_eq!((extra.await.unwrap(), other.await.unwrap()), (5, 6));
        assert_eq!(group.stats().over_capacity, 2);
        drop((a, joined));
        assert_eq!(group.in_flight(), 0);
        assert!(group.run(2, std::future::pending::<u8>).is_leader());
        assert_eq!(group.stats().over_capacity, 2, "room again");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Forget
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn forget_starts_a_new_flight_while_current_waiters_keep_the_first() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().layer(backend);
        let old_leader = spawn(start(&mut svc, 1));
        let old_follower = spawn(start(&mut svc, 1));
        let first = ctl.next().await;
        assert!(svc.forget(&1));
        assert_eq!(svc.in_flight(), 0);
        assert_eq!(svc.stats().forgotten, 1);

        let new_leader = start(&mut svc, 1);
        assert!(new_leader.is_leader(), "a new flight after forget");
        let new_leader = spawn(new_leader);
        let second = ctl.next().await;
        assert_eq!(second.n, 2);
        let new_follower = start(&mut svc, 1);
        assert!(new_follower.is_follower());
        let new_follower = spawn(new_follower);
        assert_eq!(svc.in_flight(), 1);

        first.ok("first");
        assert_eq!(ok(done("old leader", old_leader).await), "first");
        assert_eq!(ok(done("old follower", old_follower).await), "first");
        assert_eq!(
            svc.in_flight(),
            1,
            "the forgotten flight's end does not remove the new one"
        );
        let late = start(&mut svc, 1);
        assert!(late.is_follower(), "joins the new flight");
        let late = spawn(late);

        second.ok("second");
        for w in [new_leader, new_follower, late] {
            assert_eq!(ok(done("new waiter", w).await), "second");
        }
        assert_eq!(svc.in_flight(), 0);
        assert!(svc.group().is_empty());
        assert_eq!(ctl.calls(), 2);
        assert!(!svc.forget(&1), "nothing left to forget");
        assert!(!svc.forget(&42), "unknown key");
        assert_eq!(svc.stats().forgotten, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn forget_with_a_tower_test_mock() {
    bounded("test", async {
        let (mock, mut handle) = tower_test::mock::pair::<u32, String>();
        let mut svc = CoalesceLayer::new(|k: &u32| Some(*k)).layer(mock);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(svc.poll_ready(&mut cx).is_ready());
        let old = tokio::spawn(svc.call(1));
        let (req, old_reply) = bounded("request", handle.next_request()).await.unwrap();
        assert_eq!(req, 1);
        assert!(svc.forget(&1));
        let new = tokio::spawn(svc.call(1));
        let (_, new_reply) = bounded("request", handle.next_request()).await.unwrap();
        old_reply.send_response("old".to_string());
        assert_eq!(bounded("old", old).await.unwrap().unwrap(), "old");
        assert_eq!(svc.in_flight(), 1);
        new_reply.send_response("new".to_string());
        assert_eq!(bounded("new", new).await.unwrap().unwrap(), "new");
        assert_eq!(svc.in_flight(), 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn core_forget_by_borrowed_key() {
    bounded("test", async {
        let group: Group<String> = Group::new();
        let (tx, rx) = oneshot::channel::<&str>();
        let mut old = group.run(
            "config".to_string(),
            move || async move { rx.await.unwrap() },
        );
        assert!(futures::poll!(&mut old).is_pending());
        assert!(group.forget("config"));
        assert!(!group.forget("config"));
        assert!(!group.forget("other"));
        let new = group.run("config".to_string(), || async { "new" });
        assert!(new.is_leader());
        assert_eq!(group.in_flight(), 1);
        tx.send("old").unwrap();
        assert_eq!(old.await.unwrap(), "old");
        assert_eq!(group.in_flight(), 1);
        assert_eq!(new.await.unwrap(), "new");
        assert_eq!(group.in_flight(), 0);
        assert_eq!(group.stats().forgotten, 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. Stats and the shared flag
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn stats_are_exact_after_a_scripted_scenario() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().layer(backend);
        assert_eq!(svc.stats(), Default::default());

        // A bypass (key 0).
        let bypass = start(&mut svc, 0);
        assert!(bypass.is_bypass());
        let bypass = spawn(bypass);
        ctl.next().await.ok("bypass");
        ok(done("bypass", bypass).await);

        // Key 1: a leader and two followers, Ok.
        let w: Vec<_> = (0..3).map(|_| spawn(start(&mut svc, 1))).collect();
        ctl.next().await.ok("one");
        for w in w {
            ok(done("key 1", w).await);
        }
        // Key 2: a leader alone, Err.
        let w = spawn(start(&mut svc, 2));
        ctl.next().await.err("two");
        boom(done("key 2", w).await);
        // Key 3: a leader and a follower, panic.
        let w: Vec<_> = (0..2).map(|_| spawn(start(&mut svc, 3))).collect();
        ctl.next().await.panic("three");
        for w in w {
            assert!(done("key 3", w).await.unwrap_err().is_panic());
        }
        // Key 4: a leader and a follower, both dropped while the call runs.
        let mut leader = Box::pin(start(&mut svc, 4));
        let follower = start(&mut svc, 4);
        assert!(futures::poll!(leader.as_mut()).is_pending());
        let _call = ctl.next().await;
        drop((leader, follower));
        // Key 5: still running at the end.
        let running = spawn(start(&mut svc, 5));
        let call5 = ctl.next().await;

        let s = svc.stats();
        assert_eq!(s.leaders, 5);
        assert_eq!(s.followers, 4);
        assert_eq!(s.bypassed, 1);
        assert_eq!(s.errors, 1);
        assert_eq!(s.panics, 1);
        assert_eq!(s.cancelled, 1);
        assert_eq!(s.in_flight, 1);
        assert_eq!(s.in_flight, svc.in_flight());
        assert_eq!(s.lingered, 0);
        assert_eq!(s.fell_through, 0);
        assert_eq!(s.over_capacity, 0);
        assert_eq!(s.timed_out, 0);
        assert_eq!(s.retried, 0);
        assert_eq!(s.forgotten, 0);
        assert_eq!(ctl.calls(), 6);

        call5.ok("five");
        ok(done("key 5", running).await);
        let s = svc.stats();
        assert_eq!((s.in_flight, s.leaders, s.errors), (0, 5, 1));
        // A clone of the service, and the layer's group, see the same registry.
        assert_eq!(svc.clone().stats(), s);
        assert_eq!(svc.group().stats(), s);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shared_flag_on_the_response_future() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().layer(backend);

        // A leader alone: not shared.
        let mut alone = pin!(start(&mut svc, 1));
        assert!(!alone.is_shared());
        let (out, call) = tokio::join!(alone.as_mut(), async {
            ctl.next().await.ok("alone");
        });
        let () = call;
        ok(out);
        assert!(!alone.is_shared());

        // A leader with a follower: shared once the response is out, the follower at once.
        let mut leader = pin!(start(&mut svc, 2));
        let follower = start(&mut svc, 2);
        assert!(follower.is_shared() && follower.is_follower());
        assert!(!leader.is_shared(), "not known before completion");
        let follower = spawn(follower);
        let (out, ()) = tokio::join!(leader.as_mut(), async {
            ctl.next().await.ok("two");
        });
        assert_eq!(ok(out), "two");
        assert!(leader.is_shared());
        ok(done("follower", follower).await);

        // A leader whose only follower left before the response: not shared.
        let mut leader = pin!(start(&mut svc, 3));
        let follower = start(&mut svc, 3);
        assert!(futures::poll!(leader.as_mut()).is_pending());
        drop(follower);
        let (out, ()) = tokio::join!(leader.as_mut(), async {
            ctl.next().await.ok("three");
        });
        ok(out);
        assert!(!leader.is_shared());

        // A bypass is never shared.
        let mut bypass = pin!(start(&mut svc, 0));
        let (out, ()) = tokio::join!(bypass.as_mut(), async {
            ctl.next().await.ok("bypass");
        });
        ok(out);
        assert!(!bypass.is_shared() && !bypass.is_leader() && !bypass.is_follower());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shared_flag_of_a_detached_leader() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().detached(true).layer(backend);
        let mut leader = pin!(start(&mut svc, 1));
        let follower = spawn(start(&mut svc, 1));
        assert!(leader.is_leader());
        let (out, ()) = tokio::join!(leader.as_mut(), async {
            ctl.next().await.ok("v");
        });
        assert_eq!(ok(out), "v");
        assert_eq!(ok(done("follower", follower).await), "v");
        assert!(
            leader.is_shared(),
            "the detached leader's response went to the follower too"
        );

        let mut alone = pin!(start(&mut svc, 2));
        let (out, ()) = tokio::join!(alone.as_mut(), async {
            ctl.next().await.ok("w");
        });
        ok(out);
        assert!(!alone.is_shared());
    })
    .await;
}

/// A detached leader whose `make` panics has no task to wait for: it gets the panic at once,
/// shared with nobody unless somebody joined.
#[tokio::test(start_paused = true)]
async fn detached_leader_whose_make_panics() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().detached(true).build();
        let mut alone = group.run(1, || -> std::future::Ready<u8> { panic!("no call") });
        let err = (&mut alone).await.expect_err("make panicked");
        assert_eq!(err.message(), "no call");
        assert!(alone.is_leader());
        assert!(!alone.is_shared(), "nobody else got the panic");

        let joined = Arc::new(std::sync::Mutex::new(None));
        let (g, slot) = (group.clone(), joined.clone());
        let mut leader = group.run(1, move || -> std::future::Ready<u8> {
            // `make` runs unlocked, after registration: a follower may join meanwhile.
            *slot.lock().unwrap() = Some(g.run(1, || std::future::ready(2u8)));
            panic!("no call")
        });
        let follower = joined.lock().unwrap().take().expect("joined inside make");
        assert!((&mut leader).await.is_err());
        assert!(leader.is_shared(), "the follower got the panic too");
        assert_eq!(
            follower.await.expect_err("shared panic").message(),
            "no call"
        );
        assert!(group.is_empty());
        assert_eq!(group.stats().panics, 2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn core_run_roles_and_shared_flag() {
    bounded("test", async {
        let group: Group<u8> = Group::new();
        let (tx, rx) = oneshot::channel::<u32>();
        let mut leader = group.run(1, move || async move { rx.await.unwrap() });
        let mut follower = group.run(1, || async { 99u32 });
        assert!(leader.is_leader() && !follower.is_leader());
        assert!(follower.is_shared());
        assert!(!leader.is_shared());
        assert!(futures::poll!(&mut leader).is_pending());
        tx.send(7).unwrap();
        let (a, b) = tokio::join!(&mut leader, &mut follower);
        assert_eq!(
            (a.unwrap(), b.unwrap()),
            (7, 7),
            "the follower's own future never ran"
        );
        assert!(leader.is_shared() && follower.is_shared());

        let mut alone = group.run(2, || async { 1u32 });
        assert!(alone.is_leader());
        assert_eq!((&mut alone).await.unwrap(), 1);
        assert!(!alone.is_shared());

        // A lingering hit is shared and not a leader.
        let group: Group<u8> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
        assert_eq!(group.run(1, || async { 1u32 }).await.unwrap(), 1);
        let hit = group.run(1, || async { 2u32 });
        assert!(!hit.is_leader() && hit.is_shared());
        assert_eq!(hit.await.unwrap(), 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 8. Tracing and metrics
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "metrics")]
#[path = "counting_recorder/mod.rs"]
mod counting;

#[cfg(feature = "metrics")]
mod metrics_counters {
    use super::counting::Counting;
    use super::*;

    #[test]
    fn counters_for_leaders_followers_bypasses_and_outcomes() {
        let recorder = Counting::default();
        metrics::with_local_recorder(&recorder, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(bounded("test", async {
                let (backend, mut ctl) = backend();
                let mut svc = layer()
                    .linger(Duration::from_secs(1))
                    .max_followers(1)
                    .layer(backend);
                let w: Vec<_> = (0..3).map(|_| spawn(start(&mut svc, 1))).collect();
                ctl.next().await.ok("one");
                ctl.next().await.ok("alone");
                for w in w {
                    ok(done("key 1", w).await);
                }
                ok(bounded("lingered", start(&mut svc, 1)).await);
                let b = spawn(start(&mut svc, 0));
                ctl.next().await.ok("bypass");
                ok(done("bypass", b).await);
                let w = spawn(start(&mut svc, 2));
                ctl.next().await.err("two");
                boom(done("key 2", w).await);
            }));
        });
        let totals = recorder.totals();
        let get = |name: &str| totals.get(name).copied().unwrap_or(0);
        assert_eq!(get("tower_coalesce_leaders_total"), 2, "{totals:?}");
        assert_eq!(get("tower_coalesce_followers_total"), 1, "{totals:?}");
        assert_eq!(get("tower_coalesce_over_capacity_total"), 1, "{totals:?}");
        assert_eq!(get("tower_coalesce_lingered_total"), 1, "{totals:?}");
        assert_eq!(get("tower_coalesce_bypassed_total"), 1, "{totals:?}");
        assert_eq!(
            get("tower_coalesce_flights_total{outcome=error}"),
            1,
            "{totals:?}"
        );
        assert!(
            get("tower_coalesce_flights_total{outcome=ok}") >= 1,
            "{totals:?}"
        );
    }
}

/// `Stats::fields` lists every field of `Stats`, by its name, with its value: checked against
/// the derived `Debug`, so a field added to the struct and not to `fields` fails here.
#[tokio::test]
async fn stats_fields_name_every_field_with_its_value() {
    let group = Group::<u64>::new();
    let held = group.run(1, std::future::pending::<u64>);
    let alone = group.run(2, || async { 2 });
    assert_eq!(alone.await.unwrap(), 2);
    let stats = group.stats();
    let debug = format!("{stats:?}");
    let inner = debug
        .strip_prefix("Stats { ")
        .and_then(|d| d.strip_suffix(" }"))
        .expect("derived Debug");
    let from_debug: Vec<(String, u64)> = inner
        .split(", ")
        .map(|pair| {
            let (name, value) = pair.split_once(": ").expect("name: value");
            (name.to_owned(), value.parse().expect("a number"))
        })
        .collect();
    let listed: Vec<(String, u64)> = stats.fields().map(|(n, v)| (n.to_owned(), v)).collect();
    assert_eq!(listed, from_debug);
    assert!(listed.contains(&("leaders".to_owned(), 2)));
    assert!(listed.contains(&("in_flight".to_owned(), 1)));
    drop(held);
}
