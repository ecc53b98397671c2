//! Review session 7: black-box tests of option COMBINATIONS (`linger`, `linger_errors`,
//! `retry_failed`, `detached`, `max_followers`, `max_in_flight`, `follower_timeout` /
//! `OnTimeout`, `forget`, `stats()` / `in_flight()`), through `CoalesceLayer` over a
//! `tower_test::mock` backend and through the tower-free `Group`.
//!
//! Deterministic: the clock is paused and only moved by `tokio::time::advance`; every backend
//! call is seen by the test (the mock's handle, or a gate) and counted; every wait that could
//! hang is bounded on the paused clock, and the few tests that run user code re-entering the
//! registry synchronously run on a thread of their own with a watchdog. After each scenario
//! the counters are checked against the sum rules `Stats` documents, and the registry must be
//! empty once the load stops.

mod support;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use support::{check_calls_end_once, check_sum, paused_runtime, within, Boom, BoxFut, Calls, Res};
use tokio::task::JoinHandle;
use tower::{BoxError, Service};
use tower_coalesce::{
    CoalesceError, CoalesceLayer, CoalesceService, Group, GroupBuilder, OnTimeout, Panicked, Stats,
};
use tower_layer::Layer;
use tower_test::mock::{self, Handle, Mock, SendResponse};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
/// Far beyond every window used here, on the paused clock: a wait that hangs fails.
const LIMIT: Duration = Duration::from_secs(24 * 3600);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// Lets the spawned tasks run until they are parked (no clock involved).
async fn settle() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

/// Moves the paused clock by `d`, then lets the woken tasks run.
async fn advance(d: Duration) {
    tokio::time::advance(d).await;
    settle().await;
}

/// Polls `fut` once; it must stay pending.
async fn pending<F: Future + Unpin>(fut: &mut F) {
    assert!(futures::poll!(fut).is_pending(), "expected to be pending");
}

/// The sum rules of `Stats`: every keyed or bypassed request is counted exactly once (as the
/// leader of a flight, a follower, a lingering hit, a bypass or over capacity; `leaders` also
/// counts retries, which are no requests), `fell_through = over_capacity + timed_out +
/// released`, and each call ends at most once.
fn check(s: &Stats, requests: u64) {
    check_sum(s, requests);
    assert_eq!(
        s.released, 0,
        "only the HTTP and gRPC layers release: {s:?}"
    );
    assert!(s.timed_out <= s.followers, "{s:?}");
    check_calls_end_once(s);
}

/// Nothing in flight, by every view, and no entry left.
fn assert_clean<K: std::hash::Hash + Eq + Send + 'static>(group: &Group<K>) {
    assert_eq!(group.in_flight(), 0, "in_flight()");
    assert_eq!(group.stats().in_flight, 0, "stats().in_flight");
    assert_eq!(group.len(), 0, "entries left: {:?}", group.stats());
    assert!(group.is_empty());
}

/// `in_flight()` and `stats().in_flight` must agree; returns the value.
fn in_flight<K: std::hash::Hash + Eq + Send + 'static>(group: &Group<K>) -> usize {
    let n = group.in_flight();
    assert_eq!(
        n,
        group.stats().in_flight,
        "the two views of in_flight differ"
    );
    n
}

// --- the tower side: a `tower_test::mock` backend, tracked -----------------------------------

/// A request: its key (0 bypasses), an id to tell requests apart at the backend, and whether
/// the inner service's `call` panics for it (a "make" that panics, seen from the layer).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Req {
    key: u32,
    id: u32,
    panic: bool,
}

fn req(key: u32, id: u32) -> Req {
    Req {
        key,
        id,
        panic: false,
    }
}

fn panicking(key: u32, id: u32) -> Req {
    Req {
        key,
        id,
        panic: true,
    }
}

#[derive(Default)]
struct Counts {
    calls: AtomicUsize,
    live: AtomicUsize,
    completed: AtomicUsize,
    cancelled: AtomicUsize,
}

/// Counts a call's future: dropped before it completed is a cancellation.
struct Live {
    counts: Arc<Counts>,
    done: bool,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.counts.live.fetch_sub(1, SeqCst);
        if self.done {
            self.counts.completed.fetch_add(1, SeqCst);
        } else {
            self.counts.cancelled.fetch_add(1, SeqCst);
        }
    }
}

/// The mock, with every call counted and a panic in `call` on request.
#[derive(Clone)]
struct Tracked {
    inner: Mock<Req, &'static str>,
    counts: Arc<Counts>,
}

impl Service<Req> for Tracked {
    type Response = &'static str;
    type Error = BoxError;
    type Future = BoxFut<Result<&'static str, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, r: Req) -> Self::Future {
        if r.panic {
            panic!("call panicked for request {}", r.id);
        }
        self.counts.calls.fetch_add(1, SeqCst);
        self.counts.live.fetch_add(1, SeqCst);
        let live = Live {
            counts: self.counts.clone(),
            done: false,
        };
        let fut = self.inner.call(r);
        Box::pin(async move {
            let mut live = live;
            let out = fut.await;
            live.done = true;
            out
        })
    }
}

type KeyFn = fn(&Req) -> Option<u32>;
type Svc = CoalesceService<Tracked, KeyFn, u32>;
type Out = Result<&'static str, CoalesceError>;

fn key_of(r: &Req) -> Option<u32> {
    (r.key != 0).then_some(r.key)
}

fn layer() -> CoalesceLayer<KeyFn, u32> {
    CoalesceLayer::new(key_of as KeyFn)
}

struct Ctl {
    handle: Handle<Req, &'static str>,
    counts: Arc<Counts>,
}

impl Ctl {
    async fn next(&mut self) -> (Req, SendResponse<&'static str>) {
        bounded("a backend call", self.handle.next_request())
            .await
            .expect("the mock closed")
    }
    fn no_more(&mut self) {
        if let Some(Some((r, _))) = self.handle.next_request().now_or_never() {
            panic!("an unexpected backend call: {r:?}");
        }
    }
    fn calls(&self) -> usize {
        self.counts.calls.load(SeqCst)
    }
    fn live(&self) -> usize {
        self.counts.live.load(SeqCst)
    }
    fn cancelled(&self) -> usize {
        self.counts.cancelled.load(SeqCst)
    }
    fn completed(&self) -> usize {
        self.counts.completed.load(SeqCst)
    }
}

fn mocked(layer: CoalesceLayer<KeyFn, u32>) -> (Svc, Ctl) {
    let (mock, handle) = mock::pair::<Req, &'static str>();
    let counts = Arc::new(Counts::default());
    let svc = layer.layer(Tracked {
        inner: mock,
        counts: counts.clone(),
    });
    (svc, Ctl { handle, counts })
}

fn spawn<F>(f: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(f)
}

async fn done(what: &str, task: JoinHandle<Out>) -> Out {
    bounded(what, task).await.expect("a request task panicked")
}

fn ok(out: Out) -> &'static str {
    out.expect("expected a response")
}

fn boom(out: Out) -> Boom {
    out.expect_err("expected an error")
        .downcast_ref::<Boom>()
        .expect("expected the inner error")
        .clone()
}

// --- the Group side: gated calls, counted ----------------------------------------------------

// =============================================================================================
// Layer (tower_test::mock): retry + follower_timeout + panics
// =============================================================================================

/// `retry_failed(1)` + `follower_timeout(Error)`: the leader's call fails after two followers
/// gave up; the remaining followers' retry panics in its make (the inner `call`). Everybody
/// resolves: the leader with its error, the timed-out ones with `is_timeout`, the retry's
/// waiters with one and the same panic; the counters add up and the key is usable again.
#[tokio::test(start_paused = true)]
async fn retry_make_panics_while_other_followers_time_out() {
    bounded("test", async {
        let (mut svc, mut ctl) = mocked(
            layer()
                .retry_failed(1)
                .follower_timeout(SEC)
                .on_follower_timeout(OnTimeout::Error),
        );
        let leader = spawn(svc.call(req(1, 0)));
        let (first, reply) = ctl.next().await;
        assert_eq!(first.id, 0);
        let early: Vec<_> = [2, 3]
            .into_iter()
            .map(|id| spawn(svc.call(req(1, id))))
            .collect();
        advance(600 * MS).await;
        let late: Vec<_> = [1, 4]
            .into_iter()
            .map(|id| spawn(svc.call(panicking(1, id))))
            .collect();
        advance(500 * MS).await; // t = 1.1 s: the early followers' limit has passed
        for e in early {
            let err = done("early follower", e).await.unwrap_err();
            assert!(err.is_timeout(), "{err:?}");
        }
        reply.send_error(Boom("first"));
        assert_eq!(boom(done("leader", leader).await), Boom("first"));
        let mut messages = Vec::new();
        for l in late {
            let err = done("late follower", l).await.unwrap_err();
            assert!(err.is_panic(), "the retry panicked: {err:?}");
            messages.push(err.panic_message().map(str::to_owned));
        }
        assert_eq!(messages[0], messages[1], "one retry, one panic for all");
        assert!(messages[0]
            .as_deref()
            .is_some_and(|m| m.starts_with("call panicked for request")));
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 1, "the retry never reached the backend");
        let s = svc.stats();
        assert_eq!(
            (
                s.leaders,
                s.retried,
                s.errors,
                s.panics,
                s.timed_out,
                s.followers
            ),
            (2, 1, 1, 1, 2, 4),
            "{s:?}"
        );
        check(&s, 5);
        assert_clean(svc.group());

        let again = spawn(svc.call(req(1, 9)));
        let (r, reply) = ctl.next().await;
        assert_eq!(r.id, 9, "a new flight, for the new request");
        reply.send_response("fresh");
        assert_eq!(ok(done("again", again).await), "fresh");
        assert_clean(svc.group());
    })
    .await;
}

/// `retry_failed(2)`: a retrier whose make panics gets its own panic, and the flight is
/// retried once more by the other follower. Whoever the registry elects first, the outcome is
/// consistent with who made which call, and the counters agree.
#[tokio::test(start_paused = true)]
async fn second_retry_after_a_retriers_make_panicked() {
    bounded("test", async {
        let (mut svc, mut ctl) = mocked(layer().retry_failed(2));
        let leader = spawn(svc.call(req(1, 0)));
        let (_, reply) = ctl.next().await;
        let bad = spawn(svc.call(panicking(1, 1)));
        let good = spawn(svc.call(req(1, 2)));
        settle().await;
        reply.send_error(Boom("first"));
        assert_eq!(boom(done("leader", leader).await), Boom("first"));
        let (retry, reply) = ctl.next().await;
        assert_eq!(
            retry.id, 2,
            "only the good follower's call reaches the backend"
        );
        let retried = svc.stats().retried;
        reply.send_response("second");
        let good = ok(done("good", good).await);
        assert_eq!(good, "second");
        let bad = done("bad", bad).await;
        match retried {
            // The bad follower retried first: its call panicked, so it gets its panic (the
            // request whose call failed gets its error); the good one retried again.
            2 => {
                let err = bad.unwrap_err();
                assert!(err.is_panic(), "{err:?}");
                assert_eq!(svc.stats().panics, 1);
            }
            // The good follower retried first, and it worked: both get its response.
            1 => {
                assert_eq!(ok(bad), "second");
                assert_eq!(svc.stats().panics, 0);
            }
            n => panic!("{n} retries"),
        }
        settle().await;
        ctl.no_more();
        let s = svc.stats();
        assert_eq!(s.leaders, 1 + s.retried);
        assert_eq!(s.errors, 1);
        check(&s, 3);
        assert_clean(svc.group());
    })
    .await;
}

/// `retry_failed(1)` + `follower_timeout(CallInner)` with the leader gone: the leader leaves,
/// a follower drives its call, which fails. The request whose call failed is gone, so the
/// followers retry; the follower not running the retry reaches its limit and calls alone.
/// Nobody gets the first error.
#[tokio::test(start_paused = true)]
async fn retry_after_the_leader_left_and_a_follower_calls_alone() {
    bounded("test", async {
        let (mut svc, mut ctl) = mocked(layer().retry_failed(1).follower_timeout(SEC));
        let mut leader = Box::pin(svc.call(req(1, 0)));
        pending(&mut leader).await;
        let (_, first) = ctl.next().await;
        let f1 = spawn(svc.call(req(1, 1)));
        advance(100 * MS).await;
        drop(leader);
        settle().await;
        assert_eq!(ctl.live(), 1, "the call goes on for the follower");
        advance(400 * MS).await;
        let f2 = spawn(svc.call(req(1, 2)));
        advance(300 * MS).await; // t = 0.8 s
        first.send_error(Boom("first"));
        settle().await;
        let (retry, retry_reply) = ctl.next().await;
        assert!(
            [1, 2].contains(&retry.id),
            "a follower's request: {retry:?}"
        );
        settle().await;
        assert!(
            !f1.is_finished(),
            "the follower that drove the departed leader's call must wait for the retry, not \
             get that call's error: {:?}",
            done("f1", f1).await
        );
        advance(800 * MS).await; // t = 1.6 s: both limits have passed
        let (own, own_reply) = ctl.next().await;
        assert_eq!(
            own.id,
            3 - retry.id,
            "the follower not running the retry calls alone"
        );
        settle().await;
        ctl.no_more();
        retry_reply.send_response("retry");
        own_reply.send_response("own");
        let (o1, o2) = (done("f1", f1).await, done("f2", f2).await);
        let (by_retrier, alone) = if retry.id == 1 { (o1, o2) } else { (o2, o1) };
        assert_eq!(ok(by_retrier), "retry");
        assert_eq!(ok(alone), "own");
        assert_eq!((ctl.calls(), ctl.cancelled()), (3, 0));
        let s = svc.stats();
        assert_eq!(
            (s.leaders, s.retried, s.errors, s.timed_out, s.followers),
            (2, 1, 1, 1, 2),
            "{s:?}"
        );
        check(&s, 3);
        assert_clean(svc.group());
    })
    .await;
}

/// `retry_failed` + leader gone (Group): the leader leaves, its only follower takes its call
/// over, and the call fails. The follower did not make that call (`is_leader()` is false):
/// `retry_failed` says followers of a failed call retry it and only "the caller whose call
/// failed" gets its error, so the follower must retry with its own `make`.
#[tokio::test(start_paused = true)]
async fn lone_follower_driving_a_departed_leaders_failed_call_retries_it() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let calls = Calls::default();
        let (l_tx, l_make) = calls.gated::<Res>();
        let mut leader = group.run_retryable(1, l_make);
        let mut follower = group.run_retryable(1, calls.ready::<Res>(Ok(7)));
        assert!(leader.is_leader() && !follower.is_leader());
        pending(&mut leader).await;
        pending(&mut follower).await;
        drop(leader);
        pending(&mut follower).await; // it takes the call over
        l_tx.send(Err("first")).unwrap();
        let out = bounded("follower", &mut follower).await.unwrap();
        assert_eq!(
            out,
            Ok(7),
            "the follower's retry; made {} call(s), stats {:?}",
            calls.made(),
            group.stats()
        );
        let s = group.stats();
        assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 1), "{s:?}");
        check(&s, 2);
        assert_clean(&group);
    })
    .await;
}

/// The same with two followers (Group): rule 3 with `retry_failed` ("followers get the
/// retry's output"): the follower that drove the departed leader's call and the one that
/// retried must end with the same output.
#[tokio::test(start_paused = true)]
async fn followers_of_a_departed_leaders_failed_call_share_the_retry() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let calls = Calls::default();
        let (l_tx, l_make) = calls.gated::<Res>();
        let mut leader = group.run_retryable(1, l_make);
        let mut f1 = group.run_retryable(1, calls.ready::<Res>(Ok(7)));
        let mut f2 = group.run_retryable(1, calls.ready::<Res>(Ok(8)));
        pending(&mut leader).await;
        pending(&mut f1).await;
        pending(&mut f2).await;
        drop(leader);
        pending(&mut f1).await; // one of them takes the call over
        pending(&mut f2).await;
        l_tx.send(Err("first")).unwrap();
        let (f1, f2) = (spawn(f1), spawn(f2));
        let o1 = bounded("f1", f1).await.unwrap().unwrap();
        let o2 = bounded("f2", f2).await.unwrap().unwrap();
        assert_eq!(o1, o2, "one retry, one output for both followers");
        assert!(o1.is_ok(), "nobody whose call failed is left: {o1:?}");
        assert_eq!(calls.made(), 2, "the failed call and one retry");
        check(&group.stats(), 3);
        assert_clean(&group);
    })
    .await;
}

// =============================================================================================
// Layer: capacity bounds with takeover, timeouts and linger
// =============================================================================================

/// `max_followers(2)` reached, then the leader leaves and a follower drives the call: the
/// flight still has two followers, so a newcomer runs alone; once one follower leaves, a
/// newcomer joins. The call is never cancelled, and the counters add up.
#[tokio::test(start_paused = true)]
async fn max_followers_reached_then_the_leader_leaves() {
    bounded("test", async {
        let (mut svc, mut ctl) = mocked(layer().max_followers(2));
        let mut leader = Box::pin(svc.call(req(1, 0)));
        pending(&mut leader).await;
        let (_, reply) = ctl.next().await;
        let mut f1 = Box::pin(svc.call(req(1, 1)));
        let mut f2 = Box::pin(svc.call(req(1, 2)));
        assert!(f1.is_follower() && f2.is_follower());
        pending(&mut f1).await;
        pending(&mut f2).await;
        let extra = svc.call(req(1, 3));
        assert!(extra.is_alone(), "over max_followers");
        let extra = spawn(extra);
        let (r, extra_reply) = ctl.next().await;
        assert_eq!(r.id, 3);

        drop(leader);
        settle().await;
        assert_eq!(ctl.cancelled(), 0, "the call goes on for the followers");
        let n1 = svc.call(req(1, 4));
        assert!(
            n1.is_alone(),
            "two followers still wait: no room for a third (max_followers(2))"
        );
        let n1 = spawn(n1);
        let (r, n1_reply) = ctl.next().await;
        assert_eq!(r.id, 4);

        drop(f1);
        settle().await;
        let n2 = svc.call(req(1, 5));
        assert!(
            n2.is_follower() && !n2.is_alone(),
            "a follower left: its place is free"
        );
        let n2 = spawn(n2);
        settle().await;
        reply.send_response("v");
        assert_eq!(ok(bounded("f2", f2).await), "v");
        assert_eq!(ok(done("n2", n2).await), "v");
        extra_reply.send_response("x");
        n1_reply.send_response("n1");
        assert_eq!(ok(done("extra", extra).await), "x");
        assert_eq!(ok(done("n1", n1).await), "n1");
        settle().await;
        ctl.no_more();
        assert_eq!((ctl.calls(), ctl.cancelled()), (3, 0));
        let s = svc.stats();
        assert_eq!(
            (s.leaders, s.followers, s.over_capacity, s.cancelled),
            (1, 3, 2, 0),
            "{s:?}"
        );
        check(&s, 6);
        assert_clean(svc.group());
    })
    .await;
}

/// `max_in_flight(1)` + `follower_timeout(CallInner)` + `linger`: a follower that calls alone
/// takes no place; the flight's output lingers and holds none; the alone call's output does
/// not linger; and exactly one place exists at every step.
#[tokio::test(start_paused = true)]
async fn max_in_flight_with_a_follower_calling_alone_and_linger() {
    bounded("test", async {
        let (mut svc, mut ctl) = mocked(
            layer()
                .max_in_flight(1)
                .follower_timeout(SEC)
                .linger(10 * SEC),
        );
        let a = spawn(svc.call(req(1, 0)));
        let (_, a_reply) = ctl.next().await;
        let f = svc.call(req(1, 1));
        assert!(f.is_follower());
        let f = spawn(f);
        settle().await;
        advance(1100 * MS).await;
        let (r, f_reply) = ctl.next().await;
        assert_eq!(r.id, 1, "the follower called alone at its limit");
        assert_eq!(in_flight(svc.group()), 1, "an alone call is not registered");

        let b = svc.call(req(2, 2));
        assert!(b.is_alone(), "key 1 holds the only place");
        let b = spawn(b);
        let (_, b_reply) = ctl.next().await;

        a_reply.send_response("a");
        assert_eq!(ok(done("a", a).await), "a");
        assert_eq!(in_flight(svc.group()), 0);
        assert_eq!(svc.group().len(), 1, "the output lingers");

        let c = svc.call(req(3, 3));
        assert!(!c.is_alone(), "a lingering output holds no place");
        let c = spawn(c);
        let (_, c_reply) = ctl.next().await;
        let d = svc.call(req(4, 4));
        assert!(d.is_alone(), "key 3 holds the only place");
        drop(d);
        // Its call was made by `call` (the mock is ready), and cancelled by the drop.
        let (r, _) = ctl.next().await;
        assert_eq!(r.id, 4);

        f_reply.send_response("own");
        assert_eq!(ok(done("f", f).await), "own");
        b_reply.send_response("b");
        assert_eq!(ok(done("b", b).await), "b");
        c_reply.send_response("c");
        assert_eq!(ok(done("c", c).await), "c");

        let hit = svc.call(req(1, 5));
        assert!(hit.is_follower() && hit.is_shared());
        assert_eq!(
            ok(bounded("hit", hit).await),
            "a",
            "the flight's output, not the follower's own"
        );
        let two = svc.call(req(2, 6));
        assert!(
            two.is_leader() && !two.is_alone(),
            "an alone output never lingers"
        );
        drop(two);
        let (r, _) = ctl.next().await;
        assert_eq!(r.id, 6, "made by `call`, cancelled by the drop");
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 6);
        let s = svc.stats();
        assert_eq!(
            (
                s.over_capacity,
                s.timed_out,
                s.lingered,
                s.leaders,
                s.cancelled
            ),
            (2, 1, 1, 3, 1),
            "{s:?}"
        );
        check(&s, 7);
        advance(11 * SEC).await;
        svc.group().purge_expired();
        assert_clean(svc.group());
    })
    .await;
}

// =============================================================================================
// Layer: detached with forget, timeouts, retry, capacity
// =============================================================================================

/// `detached` + `forget` + `follower_timeout(CallInner)` + `linger`: the leader leaves a
/// detached flight, it is forgotten, a newcomer starts a new flight, the old flight's follower
/// reaches its limit and calls alone, and the old flight ends last with nobody waiting. Only
/// the newer flight's output may linger.
#[tokio::test(start_paused = true)]
async fn forget_a_detached_flight_whose_follower_times_out() {
    bounded("test", async {
        let (mut svc, mut ctl) =
            mocked(layer().detached(true).follower_timeout(SEC).linger(5 * SEC));
        drop(svc.call(req(1, 0)));
        let (_, old_reply) = ctl.next().await;
        let f = svc.call(req(1, 1));
        assert!(f.is_follower());
        let f = spawn(f);
        advance(500 * MS).await;
        assert!(svc.forget(&1));
        assert_eq!(in_flight(svc.group()), 0);
        let n = svc.call(req(1, 2));
        assert!(
            n.is_leader() && !n.is_alone(),
            "a forgotten flight is never joined"
        );
        let n = spawn(n);
        let (r, new_reply) = ctl.next().await;
        assert_eq!(r.id, 2);
        assert_eq!(in_flight(svc.group()), 1);
        advance(600 * MS).await;
        let (r, own_reply) = ctl.next().await;
        assert_eq!(
            r.id, 1,
            "the old flight's follower calls alone at its limit"
        );

        new_reply.send_response("new");
        assert_eq!(ok(done("newcomer", n).await), "new");
        own_reply.send_response("own");
        assert_eq!(ok(done("follower", f).await), "own");
        old_reply.send_response("old");
        settle().await;
        assert_eq!(
            (ctl.completed(), ctl.cancelled()),
            (3, 0),
            "the detached call ran to its end"
        );
        assert_eq!(svc.group().len(), 1, "only the newer output lingers");
        let hit = svc.call(req(1, 3));
        assert!(hit.is_follower() && hit.is_shared());
        assert_eq!(ok(bounded("hit", hit).await), "new");
        settle().await;
        ctl.no_more();
        let s = svc.stats();
        assert_eq!(
            (s.leaders, s.followers, s.timed_out, s.forgotten, s.lingered),
            (2, 1, 1, 1, 1),
            "{s:?}"
        );
        assert_eq!(s.cancelled, 0);
        check(&s, 4);
        advance(5 * SEC).await;
        svc.group().purge_expired();
        assert_clean(svc.group());
    })
    .await;
}

/// `detached` + `max_followers(1)` + `retry_failed(1)`: the detached caller counts as no
/// follower, one follower joins, one more runs alone; the failed call is retried once and the
/// detached caller and the follower both get the retry's output.
#[tokio::test(start_paused = true)]
async fn detached_max_followers_retry() {
    bounded("test", async {
        let (mut svc, mut ctl) = mocked(layer().detached(true).max_followers(1).retry_failed(1));
        let leader = svc.call(req(1, 0));
        let f = svc.call(req(1, 1));
        let x = svc.call(req(1, 2));
        assert!(leader.is_leader() && f.is_follower() && x.is_alone());
        let (leader, f, x) = (spawn(leader), spawn(f), spawn(x));
        let mut replies = Vec::new();
        for _ in 0..2 {
            replies.push(ctl.next().await);
        }
        replies.sort_by_key(|(r, _)| r.id);
        let (x_reply, first_reply) = (replies.pop().unwrap().1, replies.pop().unwrap().1);
        first_reply.send_error(Boom("first"));
        let (retry, retry_reply) = ctl.next().await;
        assert_eq!(retry.key, 1);
        assert_ne!(retry.id, 2, "the alone request takes no part");
        retry_reply.send_response("retry");
        x_reply.send_response("x");
        assert_eq!(ok(done("detached caller", leader).await), "retry");
        assert_eq!(ok(done("follower", f).await), "retry");
        assert_eq!(ok(done("alone", x).await), "x");
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 3);
        let s = svc.stats();
        assert_eq!(
            (s.leaders, s.retried, s.errors, s.over_capacity, s.followers),
            (2, 1, 1, 1, 1),
            "{s:?}"
        );
        check(&s, 3);
        assert_clean(svc.group());
    })
    .await;
}

/// `detached` + `retry_failed` + `follower_timeout(CallInner)`: while the retry of a failed
/// detached flight runs, the followers that are not running it reach their limit and call
/// alone; the one running it is not cut. Every waiter resolves with its own or the retry's
/// output and the counters agree with the calls seen.
#[tokio::test(start_paused = true)]
async fn detached_retry_with_followers_calling_alone_during_it() {
    bounded("test", async {
        let (mut svc, mut ctl) =
            mocked(layer().detached(true).retry_failed(1).follower_timeout(SEC));
        let leader = spawn(svc.call(req(1, 0)));
        let (_, first) = ctl.next().await;
        let f1 = spawn(svc.call(req(1, 1)));
        advance(200 * MS).await;
        first.send_error(Boom("first"));
        settle().await;
        let (retry, retry_reply) = ctl.next().await;
        assert_eq!(retry.key, 1);
        advance(300 * MS).await; // t = 0.5 s
        let f2 = svc.call(req(1, 2));
        assert!(f2.is_follower(), "joins the retry");
        let f2 = spawn(f2);
        advance(1100 * MS).await; // t = 1.6 s: every follower's limit has passed
        let mut alone = Vec::new();
        while let Some(Some((r, reply))) = ctl.handle.next_request().now_or_never() {
            alone.push((r.id, reply));
        }
        let mut ids: Vec<u32> = alone.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        let expected: Vec<u32> = [1, 2].into_iter().filter(|id| *id != retry.id).collect();
        assert_eq!(
            ids, expected,
            "exactly the followers not running the retry (retry by {})",
            retry.id
        );
        for (_, reply) in alone {
            reply.send_response("own");
        }
        retry_reply.send_response("retry");
        let outs = [
            (0, done("leader", leader).await),
            (1, done("f1", f1).await),
            (2, done("f2", f2).await),
        ];
        for (id, out) in outs {
            let want = if ids.contains(&id) { "own" } else { "retry" };
            assert_eq!(ok(out), want, "request {id}");
        }
        settle().await;
        let s = svc.stats();
        assert_eq!(s.timed_out, ids.len() as u64, "{s:?}");
        assert_eq!(ctl.calls(), 2 + ids.len());
        assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 1), "{s:?}");
        check(&s, 3);
        assert_clean(svc.group());
    })
    .await;
}

/// `retry_failed` + `linger_errors` + `follower_timeout(Error)`: a follower of the retry gives
/// up at its limit; the retry's final error is shared by the rest and lingers; a later hit on
/// that lingering error is served it, never timed out, even with a tiny limit.
#[tokio::test(start_paused = true)]
async fn lingering_retry_error_is_served_not_timed_out() {
    bounded("test", async {
        let (mut svc, mut ctl) = mocked(
            layer()
                .retry_failed(1)
                .linger_errors(10 * SEC)
                .follower_timeout(SEC)
                .on_follower_timeout(OnTimeout::Error),
        );
        let leader = spawn(svc.call(req(1, 0)));
        let (_, first) = ctl.next().await;
        let f1 = spawn(svc.call(req(1, 1)));
        settle().await;
        first.send_error(Boom("first"));
        assert_eq!(boom(done("leader", leader).await), Boom("first"));
        let (retry, reply) = ctl.next().await;
        assert_eq!(retry.id, 1);
        let f2 = spawn(svc.call(req(1, 2)));
        advance(1100 * MS).await;
        let err = done("f2", f2).await.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        reply.send_error(Boom("second"));
        assert_eq!(boom(done("f1", f1).await), Boom("second"));
        let hit = svc.call(req(1, 3));
        assert!(hit.is_follower() && hit.is_shared());
        let mut hit = Box::pin(hit);
        advance(2 * SEC).await;
        assert_eq!(boom(bounded("hit", &mut hit).await), Boom("second"));
        settle().await;
        ctl.no_more();
        let s = svc.stats();
        assert_eq!(
            (s.leaders, s.retried, s.errors, s.timed_out, s.lingered),
            (2, 1, 2, 1, 1),
            "{s:?}"
        );
        check(&s, 4);
        advance(10 * SEC).await;
        svc.group().purge_expired();
        assert_clean(svc.group());
    })
    .await;
}

// =============================================================================================
// Layer: follower limits at the instant of publication
// =============================================================================================

/// One run: a call that ends exactly when 100 followers reach their limit.
async fn limit_at_publication(mode: OnTimeout, leader_leaves: bool) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_k: u32| {
        let n = c.fetch_add(1, SeqCst) as u32;
        async move {
            tokio::time::sleep(SEC).await;
            Ok::<u32, Boom>(n)
        }
    });
    let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
        .follower_timeout(SEC)
        .on_follower_timeout(mode)
        .layer(inner);
    let mut leader = Box::pin(svc.call(1));
    pending(&mut leader).await;
    assert_eq!(calls.load(SeqCst), 1);
    let followers: Vec<_> = (0..100)
        .map(|_| {
            let f = svc.call(1);
            assert!(f.is_follower());
            spawn(async move {
                let mut f = pin!(f);
                let out = f.as_mut().await;
                (out, f.is_shared(), f.is_alone())
            })
        })
        .collect();
    settle().await;
    let leader = if leader_leaves {
        drop(leader);
        None
    } else {
        Some(spawn(leader))
    };
    // The call's sleep and every follower's limit end at the same instant.
    advance(SEC).await;
    advance(SEC).await; // lets the calls made alone at the limit end
    let mut served = 0u64;
    let mut gave_up = 0u64;
    let mut own_values = Vec::new();
    for f in followers {
        let (out, shared, alone) = bounded("a follower", f).await.expect("no panic");
        match out {
            Ok(0) => {
                assert!(shared && !alone, "served the flight's response");
                served += 1;
            }
            Ok(n) => {
                assert_eq!(mode, OnTimeout::CallInner, "an own call: {n}");
                assert!(alone && !shared, "its own call");
                own_values.push(n);
                gave_up += 1;
            }
            Err(e) => {
                assert_eq!(mode, OnTimeout::Error, "{e:?}");
                assert!(e.is_timeout(), "{e:?}");
                assert!(!shared);
                gave_up += 1;
            }
        }
    }
    if let Some(leader) = leader {
        let out = bounded("leader", leader).await.expect("no panic");
        assert_eq!(out.expect("the leader's response"), 0);
    }
    own_values.sort_unstable();
    own_values.dedup();
    assert_eq!(
        own_values.len() as u64,
        gave_up.min(own_values.len() as u64)
    );
    let s = svc.stats();
    assert_eq!(
        s.timed_out, gave_up,
        "{mode:?}, leader leaves: {leader_leaves}: timed_out must count exactly the followers \
         that gave up ({served} served): {s:?}"
    );
    let own_calls = if mode == OnTimeout::CallInner {
        gave_up
    } else {
        0
    };
    assert_eq!(calls.load(SeqCst) as u64, 1 + own_calls);
    assert_eq!((s.leaders, s.followers, s.cancelled), (1, 100, 0), "{s:?}");
    check(&s, 101);
    assert_clean(svc.group());
}

/// `follower_timeout` firing at the very instant the call's response is published, with and
/// without the leader (a follower drives the call), for both `OnTimeout` actions: every
/// follower either gets the flight's response (shared) or gives up (its own call, or
/// `is_timeout`), never both, and `timed_out` counts exactly the ones that gave up.
#[tokio::test(start_paused = true)]
async fn follower_limit_at_the_instant_of_publication() {
    bounded("test", async {
        for mode in [OnTimeout::Error, OnTimeout::CallInner] {
            for leader_leaves in [false, true] {
                limit_at_publication(mode, leader_leaves).await;
            }
        }
    })
    .await;
}

type HookedOut = Result<Hooked, CoalesceError>;
type HookedWaiter = BoxFut<HookedOut>;

/// A response whose `Clone` polls waiting followers while the response is being published
/// (user code, run with no lock held), one per copy made.
struct PublishHook {
    armed: AtomicBool,
    order: Mutex<VecDeque<usize>>,
    waiting: Mutex<Vec<Option<HookedWaiter>>>,
    results: Mutex<Vec<Option<HookedOut>>>,
    polled: AtomicUsize,
}

#[derive(Clone)]
struct HookRef(Arc<PublishHook>);

impl fmt::Debug for HookRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HookRef")
    }
}

#[derive(Debug)]
struct Hooked {
    value: u32,
    hook: HookRef,
}

impl Clone for Hooked {
    fn clone(&self) -> Self {
        let hook = &self.hook.0;
        if hook.armed.load(SeqCst) {
            let next = hook.order.lock().unwrap().pop_front();
            if let Some(i) = next {
                let fut = hook.waiting.lock().unwrap()[i].take();
                if let Some(mut fut) = fut {
                    hook.polled.fetch_add(1, SeqCst);
                    let waker = futures::task::noop_waker();
                    match fut.as_mut().poll(&mut Context::from_waker(&waker)) {
                        Poll::Ready(out) => hook.results.lock().unwrap()[i] = Some(out),
                        Poll::Pending => hook.waiting.lock().unwrap()[i] = Some(fut),
                    }
                }
            }
        }
        Hooked {
            value: self.value,
            hook: self.hook.clone(),
        }
    }
}

/// Rule 3 + `follower_timeout(Error)`, at publication time: 70 followers whose limits passed
/// while they were not polled are polled one by one *while* the response is being copied to
/// them (from the response's `Clone`, in an order that hits both the batch being copied and
/// later batches). Each must end with the response or `is_timeout`, nothing is lost or
/// counted twice, and the registry ends empty.
#[test]
fn followers_reaching_their_limit_while_the_response_is_published() {
    within("publication with followers timing out", || {
        paused_runtime().block_on(async {
            const N: usize = 70;
            let hook = Arc::new(PublishHook {
                armed: AtomicBool::new(false),
                order: Mutex::new(VecDeque::new()),
                waiting: Mutex::new((0..N).map(|_| None).collect()),
                results: Mutex::new((0..N).map(|_| None).collect()),
                polled: AtomicUsize::new(0),
            });
            let h = HookRef(hook.clone());
            let calls = Arc::new(AtomicUsize::new(0));
            let c = calls.clone();
            let inner = tower::service_fn(move |_k: u32| {
                c.fetch_add(1, SeqCst);
                let hook = h.clone();
                async move {
                    tokio::time::sleep(2 * SEC).await;
                    Ok::<_, Boom>(Hooked { value: 7, hook })
                }
            });
            let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
                .follower_timeout(SEC)
                .on_follower_timeout(OnTimeout::Error)
                .layer(inner);
            let mut leader = Box::pin(svc.call(1));
            pending(&mut leader).await;
            for i in 0..N {
                let mut f: HookedWaiter = Box::pin(svc.call(1));
                pending(&mut f).await;
                hook.waiting.lock().unwrap()[i] = Some(f);
            }
            // Alternate ends: the first batch (being copied) and the last ones.
            let mut order = VecDeque::new();
            for k in 0..N / 2 {
                order.push_back(N - 1 - k);
                order.push_back(k);
            }
            *hook.order.lock().unwrap() = order;
            tokio::time::advance(1500 * MS).await; // every limit passes, unpolled
            hook.armed.store(true, SeqCst);
            tokio::time::advance(500 * MS).await; // the call's response is in
            let out = bounded("leader", leader.as_mut()).await;
            hook.armed.store(false, SeqCst);
            assert_eq!(out.expect("the leader's response").value, 7);
            assert!(
                hook.polled.load(SeqCst) > 0,
                "the scenario polled followers mid-publication"
            );
            let rest: Vec<_> = hook
                .waiting
                .lock()
                .unwrap()
                .iter_mut()
                .map(Option::take)
                .collect();
            for (i, fut) in rest.into_iter().enumerate() {
                if let Some(fut) = fut {
                    let out = bounded("a follower", fut).await;
                    hook.results.lock().unwrap()[i] = Some(out);
                }
            }
            let results: Vec<_> = std::mem::take(&mut *hook.results.lock().unwrap());
            let mut timeouts = 0u64;
            for (i, r) in results.into_iter().enumerate() {
                match r.unwrap_or_else(|| panic!("follower {i} never resolved")) {
                    Ok(v) => assert_eq!(v.value, 7),
                    Err(e) => {
                        assert!(e.is_timeout(), "follower {i}: {e:?}");
                        timeouts += 1;
                    }
                }
            }
            let s = svc.stats();
            assert!(
                timeouts > 0 && timeouts < N as u64,
                "both outcomes were exercised: {timeouts} of {N} timed out"
            );
            assert_eq!(s.timed_out, timeouts, "{s:?}");
            assert_eq!(calls.load(SeqCst), 1);
            check(&s, N as u64 + 1);
            assert_clean(svc.group());
        })
    });
}

// =============================================================================================
// Layer: bypasses under every option, and followers never busy-wait
// =============================================================================================

/// A bypassed request goes to the inner service untouched, whatever the options: under
/// `detached` it is cancelled when dropped, under `retry_failed` its error is not retried,
/// under `linger`/`linger_errors` nothing is kept, under `max_in_flight(0)` it is not counted
/// over capacity, and the registry counts it only as bypassed.
#[tokio::test(start_paused = true)]
async fn bypasses_are_untouched_by_every_option() {
    bounded("test", async {
        let (mut svc, mut ctl) = mocked(
            layer()
                .detached(true)
                .retry_failed(2)
                .linger(10 * SEC)
                .linger_errors(10 * SEC)
                .max_in_flight(0)
                .follower_timeout(MS)
                .on_follower_timeout(OnTimeout::Error),
        );
        let b1 = svc.call(req(0, 0));
        assert!(b1.is_bypass() && !b1.is_alone() && !b1.is_leader() && !b1.is_follower());
        let b1 = spawn(b1);
        let (_, reply) = ctl.next().await;
        advance(SEC).await;
        reply.send_error(Boom("bypass"));
        assert_eq!(boom(done("b1", b1).await), Boom("bypass"));
        settle().await;
        ctl.no_more();

        let mut b2 = Box::pin(svc.call(req(0, 1)));
        pending(&mut b2).await;
        let (_, _b2_reply) = ctl.next().await;
        drop(b2);
        settle().await;
        assert_eq!(ctl.cancelled(), 1, "a bypass is never detached");

        let b3 = spawn(svc.call(req(0, 2)));
        ctl.next().await.1.send_response("three");
        assert_eq!(ok(done("b3", b3).await), "three");
        let b4 = spawn(svc.call(req(0, 3)));
        ctl.next().await.1.send_response("four");
        assert_eq!(ok(done("b4", b4).await), "four", "nothing lingers");
        settle().await;
        ctl.no_more();
        let s = svc.stats();
        assert_eq!(
            (s.bypassed, s.leaders, s.over_capacity, s.errors, s.lingered),
            (4, 0, 0, 0, 0),
            "{s:?}"
        );
        check(&s, 4);
        assert_clean(svc.group());
    })
    .await;
}

/// Counts its polls.
struct Counted<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, SeqCst);
        self.inner.as_mut().poll(cx)
    }
}

/// Rule 6 under `detached` + `retry_failed` + `follower_timeout` + `linger`: followers of a
/// detached flight that fails and is retried, with a wait limit armed, are polled a handful of
/// times over ten seconds of activity, not in a loop.
#[tokio::test(start_paused = true)]
async fn followers_never_busy_wait_under_detached_retry_and_limits() {
    bounded("test", async {
        let (mut svc, mut ctl) = mocked(
            layer()
                .detached(true)
                .retry_failed(1)
                .follower_timeout(60 * SEC)
                .linger(SEC),
        );
        let leader = spawn(svc.call(req(1, 0)));
        let (_, first) = ctl.next().await;
        let polls: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
        let followers: Vec<_> = polls
            .iter()
            .enumerate()
            .map(|(i, p)| {
                spawn(Counted {
                    inner: Box::pin(svc.call(req(1, i as u32 + 1))),
                    polls: p.clone(),
                })
            })
            .collect();
        for _ in 0..50 {
            advance(100 * MS).await;
        }
        first.send_error(Boom("first"));
        settle().await;
        let (_, retry) = ctl.next().await;
        for _ in 0..50 {
            advance(100 * MS).await;
        }
        let total: usize = polls.iter().map(|p| p.load(SeqCst)).sum();
        assert!(total <= 12, "followers polled {total} times while waiting");
        retry.send_response("retry");
        assert_eq!(ok(done("leader", leader).await), "retry");
        for f in followers {
            assert_eq!(ok(done("follower", f).await), "retry");
        }
        let total: usize = polls.iter().map(|p| p.load(SeqCst)).sum();
        assert!(total <= 16, "followers polled {total} times in all");
        check(&svc.stats(), 4);
    })
    .await;
}

// =============================================================================================
// Group: forget with retry, detached, capacity and linger
// =============================================================================================

/// `retry_failed` + `forget` + `linger`: a newer flight's output lingers while the forgotten
/// flight's retry is still pending; the retry's output, when it comes, goes to its own
/// follower only and never replaces the newer lingering output.
#[tokio::test(start_paused = true)]
async fn lingering_output_while_a_forgotten_flights_retry_is_pending() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).linger(10 * SEC).build();
        let calls = Calls::default();
        let (l_tx, l_make) = calls.gated::<Res>();
        let (f_tx, f_make) = calls.gated::<Res>();
        let mut leader = group.run_retryable(1, l_make);
        let mut follower = group.run_retryable(1, f_make);
        pending(&mut leader).await;
        pending(&mut follower).await;
        l_tx.send(Err("first")).unwrap();
        assert_eq!(bounded("leader", &mut leader).await.unwrap(), Err("first"));
        pending(&mut follower).await;
        assert_eq!(calls.made(), 2, "the follower's retry runs");
        assert!(group.forget(&1));
        assert_eq!(in_flight(&group), 0);

        let (n_tx, n_make) = calls.gated::<Res>();
        let mut newcomer = group.run_retryable(1, n_make);
        assert!(newcomer.is_leader() && !newcomer.is_alone());
        pending(&mut newcomer).await;
        n_tx.send(Ok(9)).unwrap();
        assert_eq!(bounded("newcomer", newcomer).await.unwrap(), Ok(9));
        // `len` counts the forgotten flight too while it runs (its retry), beside the newer
        // lingering output; `in_flight` counts neither.
        assert_eq!((group.len(), in_flight(&group)), (2, 0));

        f_tx.send(Ok(7)).unwrap();
        assert_eq!(bounded("follower", follower).await.unwrap(), Ok(7));
        assert_eq!(
            group.len(),
            1,
            "the forgotten flight removed its own entry only"
        );
        let hit = group.run_retryable(1, calls.never::<Res>());
        assert!(!hit.is_leader() && hit.is_shared());
        assert_eq!(
            bounded("hit", hit).await.unwrap(),
            Ok(9),
            "the newer flight's output, not the forgotten retry's"
        );
        assert_eq!(calls.made(), 3);
        let s = group.stats();
        assert_eq!(
            (s.leaders, s.retried, s.errors, s.forgotten, s.lingered),
            (3, 1, 1, 1, 1),
            "{s:?}"
        );
        check(&s, 4);
        advance(11 * SEC).await;
        group.purge_expired();
        assert_clean(&group);
    })
    .await;
}

/// `retry_failed(2)` + `forget` + `max_in_flight(1)`: a forgotten flight's second retry stays
/// out of the registry: it takes no place and is not counted in flight, the only place is
/// given back exactly once, and the first retrier (whose call failed) gets its error.
#[tokio::test(start_paused = true)]
async fn second_retry_of_a_forgotten_flight_takes_no_place() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().retry_failed(2).max_in_flight(1).build();
        let calls = Calls::default();
        let (ca, cb) = (Calls::default(), Calls::default());
        let (l_tx, l_make) = calls.gated::<Res>();
        let (a_tx, a_make) = ca.gated::<Res>();
        let (b_tx, b_make) = cb.gated::<Res>();
        let mut leader = group.run_retryable(1, l_make);
        let mut a = group.run_retryable(1, a_make);
        let mut b = group.run_retryable(1, b_make);
        pending(&mut leader).await;
        pending(&mut a).await;
        pending(&mut b).await;
        l_tx.send(Err("first")).unwrap();
        assert_eq!(bounded("leader", leader).await.unwrap(), Err("first"));
        pending(&mut a).await;
        pending(&mut b).await;
        assert_eq!(ca.made() + cb.made(), 1, "one retry");
        assert_eq!(group.stats().retried, 1);
        assert!(group.forget(&1));
        assert_eq!(in_flight(&group), 0);

        let (n_tx, n_make) = calls.gated::<Res>();
        let mut newcomer = group.run_retryable(1, n_make);
        assert!(newcomer.is_leader() && !newcomer.is_alone());
        pending(&mut newcomer).await;
        assert_eq!(in_flight(&group), 1);

        // The first retry fails: its retrier gets that error (its own call failed), and the
        // other follower retries the forgotten flight again.
        let a_first = ca.made() == 1;
        let (first_tx, second_tx, second) = if a_first {
            (a_tx, b_tx, cb.clone())
        } else {
            (b_tx, a_tx, ca.clone())
        };
        let (first_w, mut second_w) = if a_first { (a, b) } else { (b, a) };
        first_tx.send(Err("second")).unwrap();
        assert_eq!(
            bounded("first retrier", first_w).await.unwrap(),
            Err("second"),
            "the follower whose retry failed gets its error"
        );
        pending(&mut second_w).await;
        assert_eq!(second.made(), 1, "the other follower retries again");
        let s = group.stats();
        assert_eq!(s.retried, 2, "{s:?}");
        assert_eq!(
            in_flight(&group),
            1,
            "only the newcomer's flight is registered: {s:?}"
        );
        let other = group.run(2, calls.never::<u32>());
        assert!(other.is_alone(), "the newcomer holds the only place");
        drop(other);

        n_tx.send(Ok(9)).unwrap();
        assert_eq!(bounded("newcomer", newcomer).await.unwrap(), Ok(9));
        assert_eq!(in_flight(&group), 0);
        second_tx.send(Ok(7)).unwrap();
        assert_eq!(
            bounded("second retrier", second_w).await.unwrap(),
            Ok(7),
            "the second retry's own output"
        );
        assert_eq!(in_flight(&group), 0);
        let x = group.run(3, calls.never::<u32>());
        let y = group.run(4, calls.never::<u32>());
        assert!(
            !x.is_alone() && y.is_alone(),
            "exactly one place was given back"
        );
        drop((x, y));
        let s = group.stats();
        assert_eq!((s.leaders, s.retried, s.errors), (5, 2, 2), "{s:?}");
        check(&s, 7);
        assert_clean(&group);
    })
    .await;
}

/// `detached` + `max_in_flight(1)` + `linger` + `forget`: forgetting a detached flight with
/// nobody waiting gives its place to a newer flight of the same key; when the detached call
/// ends it neither lingers nor frees the newer flight's place.
#[tokio::test(start_paused = true)]
async fn forgotten_detached_flight_ending_frees_no_place_and_does_not_linger() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new()
            .detached(true)
            .max_in_flight(1)
            .linger(10 * SEC)
            .build();
        let calls = Calls::default();
        let (a_tx, a_make) = calls.gated::<u32>();
        drop(group.run(1, a_make));
        settle().await;
        assert_eq!(
            in_flight(&group),
            1,
            "the detached flight runs with nobody waiting"
        );
        let b = group.run(2, calls.never::<u32>());
        assert!(b.is_alone());
        drop(b);
        assert!(group.forget(&1));
        assert_eq!(in_flight(&group), 0);
        let (c_tx, c_make) = calls.gated::<u32>();
        let mut c = group.run(1, c_make);
        assert!(c.is_leader() && !c.is_alone());
        pending(&mut c).await;
        let d = group.run(3, calls.never::<u32>());
        assert!(d.is_alone());
        drop(d);

        a_tx.send(1).unwrap();
        settle().await;
        assert_eq!(calls.finished(), 1, "the detached call ran to its end");
        assert_eq!(in_flight(&group), 1, "the newer flight is still registered");
        let e = group.run(4, calls.never::<u32>());
        assert!(e.is_alone(), "the newer flight still holds the only place");
        drop(e);

        c_tx.send(2).unwrap();
        assert_eq!(bounded("c", c).await.unwrap(), 2);
        let hit = group.run(1, calls.never::<u32>());
        assert!(!hit.is_leader());
        assert_eq!(bounded("hit", hit).await.unwrap(), 2, "the newer output");
        // (Detached: a flight dropped by its caller runs on, so this one must end.)
        let f = group.run(5, calls.ready(5u32));
        assert!(!f.is_alone(), "the place is free again");
        assert_eq!(bounded("f", f).await.unwrap(), 5);
        let s = group.stats();
        assert_eq!(
            (
                s.forgotten,
                s.over_capacity,
                s.lingered,
                s.leaders,
                s.cancelled
            ),
            (1, 3, 1, 3, 0),
            "{s:?}"
        );
        check(&s, 7);
        advance(11 * SEC).await;
        group.purge_expired();
        assert_clean(&group);
    })
    .await;
}

/// `forget` + leader gone + `max_in_flight(1)`: the old flight, forgotten, is taken over by
/// its follower; the newer flight of the key holds the place until its only waiter leaves,
/// which cancels it; the old call is never cancelled.
#[tokio::test(start_paused = true)]
async fn forget_then_takeover_and_the_newer_flight_cancelled() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().max_in_flight(1).build();
        let old = Calls::default();
        let new = Calls::default();
        let (l_tx, l_make) = old.gated::<u32>();
        let mut leader = group.run(1, l_make);
        let mut follower = group.run(1, old.never::<u32>());
        pending(&mut leader).await;
        pending(&mut follower).await;
        assert!(group.forget(&1));
        let mut newcomer = group.run(1, new.never::<u32>());
        assert!(newcomer.is_leader() && !newcomer.is_alone());
        pending(&mut newcomer).await;
        assert_eq!(in_flight(&group), 1);
        let x = group.run(2, new.never::<u32>());
        assert!(x.is_alone());
        drop(x);

        drop(leader);
        pending(&mut follower).await; // it takes the old call over
        assert_eq!(old.dropped(), 0, "the old call goes on for its follower");
        drop(newcomer);
        assert_eq!(in_flight(&group), 0, "the newer flight was cancelled");
        let (y_tx, y_make) = new.gated::<u32>();
        let y = group.run(2, y_make);
        assert!(!y.is_alone(), "its place is free");
        y_tx.send(5).unwrap();
        assert_eq!(bounded("y", y).await.unwrap(), 5);

        l_tx.send(1).unwrap();
        assert_eq!(bounded("follower", follower).await.unwrap(), 1);
        assert_eq!((old.made(), old.dropped(), old.finished()), (1, 0, 1));
        let s = group.stats();
        assert_eq!(
            (
                s.forgotten,
                s.cancelled,
                s.over_capacity,
                s.leaders,
                s.followers
            ),
            (1, 1, 1, 3, 1),
            "{s:?}"
        );
        check(&s, 5);
        assert_clean(&group);
    })
    .await;
}

// =============================================================================================
// Group: retry with capacity, detached, linger
// =============================================================================================

/// `max_followers(1)` + `retry_failed(1)`: newcomers during the retry respect the bound: at
/// most one of two newcomers joins the retry, the other runs alone; everybody resolves.
#[tokio::test(start_paused = true)]
async fn newcomers_during_a_retry_respect_max_followers() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().max_followers(1).retry_failed(1).build();
        let calls = Calls::default();
        let (l_tx, l_make) = calls.gated::<Res>();
        let (f_tx, f_make) = calls.gated::<Res>();
        let mut leader = group.run_retryable(1, l_make);
        let mut f = group.run_retryable(1, f_make);
        let x = group.run_retryable(1, calls.ready::<Res>(Ok(3)));
        assert!(x.is_alone(), "over max_followers(1)");
        assert_eq!(bounded("x", x).await.unwrap(), Ok(3));
        pending(&mut leader).await;
        pending(&mut f).await;
        l_tx.send(Err("first")).unwrap();
        assert_eq!(bounded("leader", leader).await.unwrap(), Err("first"));
        pending(&mut f).await;
        assert_eq!(group.stats().retried, 1);
        let n1 = group.run_retryable(1, calls.ready::<Res>(Ok(11)));
        let n2 = group.run_retryable(1, calls.ready::<Res>(Ok(12)));
        let joined = [&n1, &n2].iter().filter(|n| !n.is_alone()).count();
        assert!(
            joined <= 1,
            "max_followers(1): at most one newcomer joins the retry"
        );
        let (n1_alone, n2_alone) = (n1.is_alone(), n2.is_alone());
        let n1 = spawn(n1);
        let n2 = spawn(n2);
        settle().await;
        f_tx.send(Ok(7)).unwrap();
        assert_eq!(bounded("f", f).await.unwrap(), Ok(7));
        let n1 = bounded("n1", n1).await.unwrap().unwrap();
        let n2 = bounded("n2", n2).await.unwrap().unwrap();
        assert_eq!(n1, if n1_alone { Ok(11) } else { Ok(7) });
        assert_eq!(n2, if n2_alone { Ok(12) } else { Ok(7) });
        let s = group.stats();
        assert_eq!(s.over_capacity, 1 + (2 - joined) as u64, "{s:?}");
        check(&s, 5);
        assert_clean(&group);
    })
    .await;
}

/// `retry_failed(2)` + a retrier leaving mid-retry: the retry's call is handed to the other
/// follower (no new call), then fails. One retry is left, and the follower now driving it did
/// not make that call: it retries with its own make and gets that output.
#[tokio::test(start_paused = true)]
async fn handed_over_retry_that_fails_is_retried_again() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().retry_failed(2).build();
        let calls = Calls::default();
        let (ca, cb) = (Calls::default(), Calls::default());
        let (l_tx, l_make) = calls.gated::<Res>();
        let (a_tx, a_make) = ca.gated::<Res>();
        let (b_tx, b_make) = cb.gated::<Res>();
        let mut leader = group.run_retryable(1, l_make);
        let mut a = group.run_retryable(1, a_make);
        let mut b = group.run_retryable(1, b_make);
        pending(&mut leader).await;
        pending(&mut a).await;
        pending(&mut b).await;
        l_tx.send(Err("first")).unwrap();
        assert_eq!(bounded("leader", leader).await.unwrap(), Err("first"));
        pending(&mut a).await;
        pending(&mut b).await;
        assert_eq!(ca.made() + cb.made(), 1, "one retry runs");
        let a_retried = ca.made() == 1;
        let (retrier, mut stays, retry_tx, own_tx, own) = if a_retried {
            (a, b, a_tx, b_tx, cb.clone())
        } else {
            (b, a, b_tx, a_tx, ca.clone())
        };
        drop(retrier);
        pending(&mut stays).await; // it takes the retry's call over
        assert_eq!(own.made(), 0, "handed over: no new call");
        retry_tx.send(Err("second")).unwrap();
        // Its own gate is open already: if it retries, that call ends at once. (A closed gate
        // means the registry dropped this follower's make: it cannot retry any more.)
        let make_kept = own_tx.send(Ok(7)).is_ok();
        let out = bounded("the follower left", &mut stays).await.unwrap();
        let s = group.stats();
        assert_eq!(
            out,
            Ok(7),
            "one retry is left and this follower's call did not fail (its make kept: \
             {make_kept}): {s:?}"
        );
        assert_eq!(own.made(), 1);
        assert_eq!((s.leaders, s.retried, s.errors), (3, 2, 2), "{s:?}");
        check(&s, 3);
        assert_clean(&group);
    })
    .await;
}

/// `retry_failed(1)` + `max_in_flight(1)` + `linger_errors`: the retry's make panics; the
/// flight ends with that panic, which lingers for its window, and the flight's one place is
/// given back exactly once.
#[tokio::test(start_paused = true)]
async fn retry_make_panic_under_capacity_and_linger_errors() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new()
            .retry_failed(1)
            .max_in_flight(1)
            .linger_errors(5 * SEC)
            .build();
        let calls = Calls::default();
        let (l_tx, l_make) = calls.gated::<Res>();
        let mut leader = group.run_retryable(1, l_make);
        let mut retrier = group.run_retryable(1, || -> BoxFut<Res> { panic!("retry make") });
        pending(&mut leader).await;
        pending(&mut retrier).await;
        l_tx.send(Err("first")).unwrap();
        assert_eq!(bounded("leader", leader).await.unwrap(), Err("first"));
        let err = bounded("retrier", retrier).await.unwrap_err();
        assert_eq!(err.message(), "retry make");
        assert_eq!(in_flight(&group), 0);
        assert_eq!(group.len(), 1, "the panic lingers under linger_errors");
        let hit = group.run_retryable(1, calls.never::<Res>());
        assert!(!hit.is_leader());
        assert_eq!(
            bounded("hit", hit).await.unwrap_err().message(),
            "retry make"
        );
        let x = group.run(2, calls.never::<u32>());
        let y = group.run(3, calls.never::<u32>());
        assert!(!x.is_alone() && y.is_alone(), "exactly one place");
        drop((x, y));
        let s = group.stats();
        assert_eq!(
            (s.leaders, s.retried, s.errors, s.panics, s.lingered),
            (3, 1, 1, 1, 1),
            "{s:?}"
        );
        check(&s, 5);
        advance(5 * SEC).await;
        group.purge_expired();
        assert_clean(&group);
    })
    .await;
}

/// `detached` + `retry_failed` + `linger`: a failed detached flight whose follower started the
/// retry, then every waiter left: the retry runs to its end and its output (not the first
/// error) lingers for later callers.
#[tokio::test(start_paused = true)]
async fn detached_retry_with_nobody_left_lingers_its_output() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new()
            .detached(true)
            .retry_failed(1)
            .linger(10 * SEC)
            .build();
        let calls = Calls::default();
        let mut leader = group.run_retryable(1, calls.ready::<Res>(Err("first")));
        let (f_tx, f_make) = calls.gated::<Res>();
        let mut follower = group.run_retryable(1, f_make);
        pending(&mut leader).await;
        pending(&mut follower).await;
        settle().await;
        pending(&mut follower).await;
        assert_eq!(group.stats().retried, 1, "the retry started");
        drop(follower);
        drop(leader);
        settle().await;
        f_tx.send(Ok(7)).unwrap();
        settle().await;
        assert_eq!(calls.finished(), 2, "the detached retry ran to its end");
        assert_eq!(calls.dropped(), 0);
        assert_eq!(in_flight(&group), 0);
        let hit = group.run_retryable(1, calls.never::<Res>());
        assert!(!hit.is_leader());
        assert_eq!(bounded("hit", hit).await.unwrap(), Ok(7));
        let s = group.stats();
        assert_eq!(
            (s.leaders, s.retried, s.errors, s.lingered, s.cancelled),
            (2, 1, 1, 1, 0),
            "{s:?}"
        );
        check(&s, 3);
        advance(11 * SEC).await;
        group.purge_expired();
        assert_clean(&group);
    })
    .await;
}

/// `retry_failed` + `linger_errors` + `max_in_flight(1)`: every follower leaves while the
/// retry runs. The retry is cancelled, its place given back once, nobody hangs, and a later
/// caller is served promptly (a new call, or the error if it lingers).
#[tokio::test(start_paused = true)]
async fn retry_abandoned_mid_call_under_linger_errors_and_capacity() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new()
            .retry_failed(1)
            .linger_errors(10 * SEC)
            .max_in_flight(1)
            .build();
        let calls = Calls::default();
        let (l_tx, l_make) = calls.gated::<Res>();
        let mut leader = group.run_retryable(1, l_make);
        let mut f1 = group.run_retryable(1, calls.never::<Res>());
        let mut f2 = group.run_retryable(1, calls.never::<Res>());
        pending(&mut leader).await;
        pending(&mut f1).await;
        pending(&mut f2).await;
        l_tx.send(Err("first")).unwrap();
        assert_eq!(bounded("leader", leader).await.unwrap(), Err("first"));
        pending(&mut f1).await;
        pending(&mut f2).await;
        assert_eq!(calls.made(), 2, "the retry runs");
        assert_eq!(in_flight(&group), 1);
        drop(f1);
        drop(f2);
        assert_eq!(calls.dropped(), 1, "the retry's call was cancelled");
        assert_eq!(in_flight(&group), 0);
        let x = group.run(2, calls.never::<u32>());
        let y = group.run(3, calls.never::<u32>());
        assert!(!x.is_alone() && y.is_alone(), "exactly one place");
        drop((x, y));
        let next = group.run_retryable(1, calls.ready::<Res>(Ok(5)));
        let from_window = !next.is_leader();
        let out = bounded("next", next).await.unwrap();
        if from_window {
            assert_eq!(out, Err("first"));
        } else {
            assert_eq!(out, Ok(5));
        }
        let s = group.stats();
        assert!(s.cancelled >= 1, "{s:?}");
        check(&s, 6);
        advance(11 * SEC).await;
        group.purge_expired();
        assert_clean(&group);
    })
    .await;
}

/// `detached` + `max_followers(2)` + `linger`, followers bounded by `tokio::time::timeout`:
/// followers that give up free their places; the detached call completes with nobody waiting
/// and lingers; the counters add up.
#[tokio::test(start_paused = true)]
async fn detached_followers_giving_up_free_their_places_and_the_output_lingers() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new()
            .detached(true)
            .max_followers(2)
            .linger(10 * SEC)
            .build();
        let calls = Calls::default();
        let (tx, make) = calls.gated::<u32>();
        drop(group.run(1, make));
        let impatient: Vec<_> = (0..2)
            .map(|_| {
                let f = group.run(1, calls.never::<u32>());
                assert!(!f.is_alone());
                spawn(tokio::time::timeout(SEC, f))
            })
            .collect();
        let extra = group.run(1, calls.never::<u32>());
        assert!(extra.is_alone());
        drop(extra);
        advance(2 * SEC).await;
        for f in impatient {
            assert!(bounded("impatient", f).await.unwrap().is_err(), "gave up");
        }
        let later: Vec<_> = (0..2)
            .map(|_| {
                let f = group.run(1, calls.never::<u32>());
                assert!(!f.is_alone(), "the places were given back");
                f
            })
            .collect();
        drop(later);
        let extra = group.run(1, calls.never::<u32>());
        assert!(!extra.is_alone(), "still room after the later ones left");
        drop(extra);
        tx.send(4).unwrap();
        settle().await;
        assert_eq!((calls.finished(), in_flight(&group)), (1, 0));
        assert_eq!(
            bounded("hit", group.run(1, calls.never::<u32>()))
                .await
                .unwrap(),
            4
        );
        let s = group.stats();
        assert_eq!(
            (
                s.leaders,
                s.followers,
                s.over_capacity,
                s.lingered,
                s.cancelled
            ),
            (1, 5, 1, 1, 0),
            "{s:?}"
        );
        check(&s, 8);
        advance(11 * SEC).await;
        group.purge_expired();
        assert_clean(&group);
    })
    .await;
}

// =============================================================================================
// Group: linger + forget while a lingering output is being copied (user code re-entering)
// =============================================================================================

type Action = Box<dyn FnOnce() + Send>;

/// An output whose next `Clone` runs a one-shot action (user code, run with no lock held).
#[derive(Clone, Default)]
struct OnClone(Arc<Mutex<Option<Action>>>);

impl fmt::Debug for OnClone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnClone")
    }
}

#[derive(Debug)]
struct Val {
    v: u32,
    hook: OnClone,
}

impl Clone for Val {
    fn clone(&self) -> Self {
        let action = self.hook.0.lock().unwrap().take();
        if let Some(action) = action {
            action();
        }
        Val {
            v: self.v,
            hook: self.hook.clone(),
        }
    }
}

/// A make for a caller that must be served without a call.
async fn no_call() -> Val {
    panic!("no call expected")
}

/// A group whose output 1 for key 1 lingers, and its hook.
fn lingering_val() -> (Group<u32>, OnClone) {
    let group: Group<u32> = GroupBuilder::new().linger(3600 * SEC).build();
    let hook = OnClone::default();
    let h = hook.clone();
    let first =
        futures::executor::block_on(group.run(1, move || async move { Val { v: 1, hook: h } }));
    assert_eq!(first.expect("first").v, 1);
    assert_eq!((group.in_flight(), group.len()), (0, 1));
    (group, hook)
}

/// `linger` + `forget` during a lingering copy: while a hit copies the lingering output, the
/// key is forgotten. The entry must stay gone once the copy is done: the next caller makes a
/// new call rather than getting the forgotten output back.
#[test]
fn forget_while_a_lingering_output_is_copied() {
    within("forget during a lingering copy", || {
        let (group, hook) = lingering_val();
        let g = group.clone();
        *hook.0.lock().unwrap() = Some(Box::new(move || {
            assert!(g.forget(&1), "the lingering entry is there to forget");
        }));
        let hit = futures::executor::block_on(group.run(1, no_call));
        assert_eq!(hit.expect("hit").v, 1);
        assert_eq!(group.stats().forgotten, 1);
        assert_eq!(
            group.len(),
            0,
            "forget dropped the lingering output: it must not be put back"
        );
        let h = OnClone::default();
        let next = group.run(1, move || async move { Val { v: 3, hook: h } });
        assert!(next.is_leader(), "a forgotten output is not served again");
        assert_eq!(futures::executor::block_on(next).expect("next").v, 3);
        check(&group.stats(), 3);
    });
}

/// `linger` + `forget` + a new flight that completes, all during a lingering copy: the newer
/// output must survive the copy being put back.
#[test]
fn newer_output_published_while_a_forgotten_lingering_output_is_copied() {
    within("new flight during a lingering copy", || {
        let (group, hook) = lingering_val();
        let g = group.clone();
        *hook.0.lock().unwrap() = Some(Box::new(move || {
            assert!(g.forget(&1));
            let h = OnClone::default();
            let mut newer = g.run(1, move || async move { Val { v: 2, hook: h } });
            assert!(newer.is_leader(), "nothing left to join");
            // Not `block_on`: this may run inside the outer `block_on`.
            let waker = futures::task::noop_waker();
            match Pin::new(&mut newer).poll(&mut Context::from_waker(&waker)) {
                Poll::Ready(out) => assert_eq!(out.expect("newer").v, 2),
                Poll::Pending => panic!("a ready call is done at its first poll"),
            }
        }));
        let hit = futures::executor::block_on(group.run(1, no_call));
        assert_eq!(hit.expect("hit").v, 1);
        assert_eq!(group.len(), 1, "the newer output lingers");
        let later = group.run(1, no_call);
        assert!(!later.is_leader());
        assert_eq!(
            futures::executor::block_on(later).expect("later").v,
            2,
            "the newer output, not the forgotten one put back"
        );
        check(&group.stats(), 4);
        assert_eq!(group.in_flight(), 0);
    });
}

/// `linger` + `forget` while another caller waits for the lingering output to be put back:
/// the waiting caller must be woken and served (the copy, or a new call of its own), never
/// left waiting for an output that is gone.
#[test]
fn caller_waiting_for_a_lingering_copy_when_the_key_is_forgotten() {
    within("waiter during a forgotten lingering copy", || {
        let (group, hook) = lingering_val();
        let g = group.clone();
        type Waiting = tower_coalesce::Run<u32, Val>;
        type Stash = Option<(Waiting, Arc<AtomicUsize>)>;
        let stash: Arc<Mutex<Stash>> = Arc::default();
        let st = stash.clone();
        *hook.0.lock().unwrap() = Some(Box::new(move || {
            let h = OnClone::default();
            let mut waiting: Waiting = g.run(1, move || async move { Val { v: 2, hook: h } });
            let wakes = Arc::new(AtomicUsize::new(0));
            let waker = futures::task::waker(Arc::new(WakeCount(wakes.clone())));
            let polled = Pin::new(&mut waiting).poll(&mut Context::from_waker(&waker));
            assert!(polled.is_pending(), "the output is out being copied");
            assert!(g.forget(&1));
            *st.lock().unwrap() = Some((waiting, wakes));
        }));
        let hit = futures::executor::block_on(group.run(1, no_call));
        assert_eq!(hit.expect("hit").v, 1);
        let (waiting, wakes) = stash.lock().unwrap().take().expect("the hook ran");
        assert!(
            wakes.load(SeqCst) >= 1,
            "the waiting caller must be woken once the copy is done"
        );
        let v = futures::executor::block_on(waiting).expect("waiting").v;
        assert!(v == 1 || v == 2, "{v}");
        assert_eq!(group.in_flight(), 0);
        check(&group.stats(), 3);
    });
}

struct WakeCount(Arc<AtomicUsize>);

impl futures::task::ArcWake for WakeCount {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.fetch_add(1, SeqCst);
    }
}

// =============================================================================================
// Group: a seeded storm of every option, then accounting and cleanup
// =============================================================================================

/// Every option at once on a `Group`, driven by a seeded sequence of `run_result` /
/// `run_retryable` calls (succeeding, failing, panicking, slow), `forget`s, callers that give
/// up through `tokio::time::timeout` or are dropped unpolled, and clock moves. No caller
/// hangs or panics, every request is counted once, and the registry ends empty.
#[tokio::test(start_paused = true)]
async fn seeded_storm_of_every_option_adds_up_and_empties() {
    use rand::{Rng, SeedableRng};
    bounded("test", async {
        for seed in 0..4u64 {
            for detached in [false, true] {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let group: Group<u32> = GroupBuilder::new()
                    .detached(detached)
                    .linger(50 * MS)
                    .linger_errors(20 * MS)
                    .retry_failed(2)
                    .max_in_flight(3)
                    .max_followers(2)
                    .build();
                let calls = Arc::new(AtomicUsize::new(0));
                let mut tasks = Vec::new();
                let mut requests = 0u64;
                for _ in 0..300 {
                    let key = rng.random_range(0..5u32);
                    let delay = Duration::from_millis(rng.random_range(0..40));
                    let fate = rng.random_range(0..10u32);
                    let c = calls.clone();
                    let make = move || {
                        c.fetch_add(1, SeqCst);
                        async move {
                            tokio::time::sleep(delay).await;
                            match fate {
                                0..=1 => Err::<u32, u8>(fate as u8),
                                2 => panic!("storm"),
                                _ => Ok(fate),
                            }
                        }
                    };
                    let op = rng.random_range(0..10u32);
                    let patience = Duration::from_millis(rng.random_range(0..60));
                    match op {
                        0 => {
                            group.forget(&key);
                        }
                        1 => advance(Duration::from_millis(rng.random_range(0..30))).await,
                        2 => {
                            requests += 1;
                            drop(group.run_retryable(key, make));
                        }
                        3..=5 => {
                            requests += 1;
                            let run = group.run_result(key, make);
                            tasks.push(spawn(async move {
                                let _ = tokio::time::timeout(patience, run).await;
                            }));
                        }
                        _ => {
                            requests += 1;
                            let run = group.run_retryable(key, make);
                            tasks.push(spawn(async move {
                                let _ = run.await;
                            }));
                        }
                    }
                    let s = group.stats();
                    assert_eq!(group.in_flight(), s.in_flight);
                    assert!(s.in_flight <= 3, "max_in_flight(3): {s:?}");
                }
                for t in tasks {
                    bounded("a caller", t)
                        .await
                        .expect("a caller's task panicked");
                }
                advance(5 * SEC).await;
                assert_eq!(in_flight(&group), 0, "seed {seed}, detached {detached}");
                group.purge_expired();
                assert_clean(&group);
                let s = group.stats();
                check(&s, requests);
                assert!(
                    calls.load(SeqCst) as u64 >= s.leaders,
                    "each registered call was made: {s:?}"
                );
            }
        }
    })
    .await;
}

/// The "make" of a follower that may have to retry is kept; a panic of the spare's retry
/// through `run_retryable` while other (plain) followers give up through timeouts: the plain
/// followers that stay get the retry's panic, nobody hangs, and the key is usable.
#[tokio::test(start_paused = true)]
async fn group_retry_make_panics_while_plain_followers_give_up() {
    bounded("test", async {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let calls = Calls::default();
        let (l_tx, l_make) = calls.gated::<Res>();
        let mut leader = group.run_retryable(1, l_make);
        pending(&mut leader).await;
        let retrier = group.run_retryable(1, || -> BoxFut<Res> { panic!("retry make") });
        let patient = spawn(group.run_result(1, calls.never::<Res>()));
        let impatient: Vec<_> = (0..3)
            .map(|_| {
                spawn(tokio::time::timeout(
                    SEC,
                    group.run_result(1, calls.never::<Res>()),
                ))
            })
            .collect();
        let retrier = spawn(retrier);
        settle().await;
        advance(2 * SEC).await;
        for i in impatient {
            assert!(bounded("impatient", i).await.unwrap().is_err(), "gave up");
        }
        l_tx.send(Err("first")).unwrap();
        assert_eq!(bounded("leader", leader).await.unwrap(), Err("first"));
        let r: Result<Res, Panicked> = bounded("retrier", retrier).await.unwrap();
        assert_eq!(r.unwrap_err().message(), "retry make");
        let p = bounded("patient", patient).await.unwrap();
        assert_eq!(
            p.unwrap_err().message(),
            "retry make",
            "the plain follower gets the retry's panic"
        );
        assert_eq!(calls.made(), 1);
        let s = group.stats();
        assert_eq!(
            (s.leaders, s.retried, s.errors, s.panics, s.followers),
            (2, 1, 1, 1, 5),
            "{s:?}"
        );
        check(&s, 6);
        assert_clean(&group);
        let again = group.run_retryable(1, calls.ready::<Res>(Ok(8)));
        assert!(again.is_leader());
        assert_eq!(bounded("again", again).await.unwrap(), Ok(8));
    })
    .await;
}
