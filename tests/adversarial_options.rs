//! Black-box adversarial tests of the options and their interplay (`linger`, `linger_errors`,
//! `max_in_flight`, `max_followers`, `retry_failed`, `follower_timeout`/`OnTimeout`,
//! `detached`, `forget`, `purge_expired`, `stats`), through the public API only.
//!
//! Deterministic: time is paused and moved on purpose with `tokio::time::advance`; every
//! backend call is reported to the test and answered by it through a oneshot gate; every wait
//! that could hang is bounded on the paused clock, so a hang fails instead of blocking.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower::Service;
use tower_coalesce::{
    CoalesceError, CoalesceLayer, CoalesceService, Group, GroupBuilder, OnTimeout, Stats,
};
use tower_layer::Layer;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Far beyond every window used here, on the paused clock.
const LIMIT: Duration = Duration::from_secs(24 * 3600);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// Lets spawned tasks run a while (no clock involved).
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

#[derive(Debug, Clone, PartialEq, Eq)]
struct Boom(&'static str);

impl fmt::Display for Boom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "boom: {}", self.0)
    }
}

impl Error for Boom {}

enum Reply {
    Ok(&'static str),
    Err(&'static str),
    Panic(&'static str),
}

/// One backend call, waiting for the test's answer.
struct Pending {
    n: usize,
    key: u32,
    reply: oneshot::Sender<Reply>,
}

impl Pending {
    fn ok(self, v: &'static str) {
        let _ = self.reply.send(Reply::Ok(v));
    }
    fn err(self, e: &'static str) {
        let _ = self.reply.send(Reply::Err(e));
    }
    fn panic(self, m: &'static str) {
        let _ = self.reply.send(Reply::Panic(m));
    }
}

#[derive(Default)]
struct Counts {
    calls: AtomicUsize,
    live: AtomicUsize,
    completed: AtomicUsize,
    cancelled: AtomicUsize,
}

/// A backend whose every call is reported to the test and answered by it.
#[derive(Clone)]
struct Backend {
    tx: mpsc::UnboundedSender<Pending>,
    counts: Arc<Counts>,
}

struct Ctl {
    rx: mpsc::UnboundedReceiver<Pending>,
    counts: Arc<Counts>,
}

impl Ctl {
    async fn next(&mut self) -> Pending {
        bounded("a backend call", self.rx.recv())
            .await
            .expect("backend gone")
    }
    fn no_more(&mut self) {
        assert!(self.rx.try_recv().is_err(), "an unexpected backend call");
    }
    fn calls(&self) -> usize {
        self.counts.calls.load(SeqCst)
    }
    fn live(&self) -> usize {
        self.counts.live.load(SeqCst)
    }
    fn completed(&self) -> usize {
        self.counts.completed.load(SeqCst)
    }
    fn cancelled(&self) -> usize {
        self.counts.cancelled.load(SeqCst)
    }
}

struct Live {
    counts: Arc<Counts>,
    done: bool,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.counts.live.fetch_sub(1, SeqCst);
        if !self.done {
            self.counts.cancelled.fetch_add(1, SeqCst);
        }
    }
}

impl Service<u32> for Backend {
    type Response = &'static str;
    type Error = Boom;
    type Future = Pin<Box<dyn Future<Output = Result<&'static str, Boom>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u32) -> Self::Future {
        let counts = self.counts.clone();
        let n = counts.calls.fetch_add(1, SeqCst) + 1;
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Pending { n, key, reply });
        counts.live.fetch_add(1, SeqCst);
        let live = Live {
            counts: counts.clone(),
            done: false,
        };
        Box::pin(async move {
            let mut live = live;
            let reply = rx.await;
            live.done = true;
            counts.completed.fetch_add(1, SeqCst);
            match reply {
                Ok(Reply::Ok(v)) => Ok(v),
                Ok(Reply::Err(e)) => Err(Boom(e)),
                Ok(Reply::Panic(m)) => panic!("{m}"),
                Err(_) => Err(Boom("reply dropped")),
            }
        })
    }
}

fn backend() -> (Backend, Ctl) {
    let (tx, rx) = mpsc::unbounded_channel();
    let counts = Arc::new(Counts::default());
    (
        Backend {
            tx,
            counts: counts.clone(),
        },
        Ctl { rx, counts },
    )
}

type Key = fn(&u32) -> Option<u32>;
type Svc = CoalesceService<Backend, Key, u32>;
type Out = Result<&'static str, CoalesceError>;

/// Key 0 bypasses; every other key is its own.
fn key_of(k: &u32) -> Option<u32> {
    (*k != 0).then_some(*k)
}

fn layer() -> CoalesceLayer<Key, u32> {
    CoalesceLayer::new(key_of as Key)
}

fn spawn<F>(f: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(f)
}

async fn done(what: &str, task: JoinHandle<Out>) -> Out {
    bounded(what, task).await.expect("task panicked")
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

/// Polls `fut` once (it must stay pending).
async fn pending<F: Future + Unpin>(fut: &mut F) {
    assert!(futures::poll!(fut).is_pending());
}

/// The number of requests the counters account for, as `Stats` documents them: every
/// keyed request is a leader of a flight, a follower, a lingering hit or over capacity, and
/// `leaders` also counts the retries (`retried`), which are no requests.
fn requests(s: &Stats) -> u64 {
    s.leaders - s.retried + s.followers + s.lingered + s.bypassed + s.over_capacity
}

// ---------------------------------------------------------------------------------------------
// max_in_flight with detached, linger, retry
// ---------------------------------------------------------------------------------------------

/// `max_in_flight` + `detached`: a detached flight whose waiters all left keeps its place
/// while it runs and gives it up exactly once when it completes.
#[tokio::test(start_paused = true)]
async fn detached_flight_with_no_waiter_holds_its_max_in_flight_place_until_done() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer().detached(true).max_in_flight(1).layer(backend);
        drop(svc.call(1));
        let first = ctl.next().await;
        assert_eq!(svc.in_flight(), 1, "the detached flight still runs");

        let other = svc.call(2);
        assert!(other.is_alone(), "its place is taken");
        let other = spawn(other);
        ctl.next().await.ok("two");
        assert_eq!(ok(done("alone", other).await), "two");

        first.ok("one");
        settle().await;
        assert_eq!(ctl.completed(), 2);
        assert_eq!(ctl.cancelled(), 0);
        assert_eq!(svc.in_flight(), 0);
        assert!(svc.group().is_empty());

        // The place was given up once: one new flight fits, a second one does not.
        let a = svc.call(3);
        let b = svc.call(4);
        assert!(a.is_leader() && !a.is_alone(), "the place is free again");
        assert!(b.is_alone(), "only one place was given back");
        let (a, b) = (spawn(a), spawn(b));
        for _ in 0..2 {
            let c = ctl.next().await;
            let v = if c.key == 3 { "three" } else { "four" };
            c.ok(v);
        }
        assert_eq!(ok(done("a", a).await), "three");
        assert_eq!(ok(done("b", b).await), "four");
        let s = svc.stats();
        assert_eq!((s.in_flight, s.over_capacity, s.leaders), (0, 2, 2));
        assert!(svc.group().is_empty());
    })
    .await;
}

/// `max_in_flight` + `linger`: a lingering output holds no place, and a hit on it is served
/// even when every place is taken (it needs no call).
#[tokio::test(start_paused = true)]
async fn lingering_output_holds_no_place_and_is_served_at_capacity() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .linger(Duration::from_secs(5))
            .max_in_flight(1)
            .layer(backend);
        let one = spawn(svc.call(1));
        ctl.next().await.ok("one");
        assert_eq!(ok(done("one", one).await), "one");
        assert_eq!((svc.in_flight(), svc.group().len()), (0, 1));

        let two = svc.call(2);
        assert!(!two.is_alone(), "a lingering output must not hold a place");
        let two = spawn(two);
        let call2 = ctl.next().await;

        let hit = svc.call(1);
        assert!(!hit.is_alone() && !hit.is_leader() && hit.is_shared());
        assert_eq!(ok(bounded("hit", hit).await), "one");
        let three = svc.call(3);
        assert!(three.is_alone(), "key 2 holds the only place");
        // The inner service is called by `call` (it is ready): dropping the future cancels it.
        drop(three);
        drop(ctl.next().await);
        call2.ok("two");
        assert_eq!(ok(done("two", two).await), "two");
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.calls(), 3);
        let s = svc.stats();
        assert_eq!((s.lingered, s.over_capacity, s.in_flight), (1, 1, 0));
    })
    .await;
}

/// `max_in_flight` + `retry_failed`: the retry runs in its flight's place (no second one),
/// and that place is given up exactly once at the end.
#[tokio::test(start_paused = true)]
async fn retry_keeps_one_max_in_flight_place_and_frees_it_once() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer().retry_failed(1).max_in_flight(1).layer(backend);
        let leader = spawn(svc.call(1));
        let follower = spawn(svc.call(1));
        ctl.next().await.err("first");
        assert_eq!(boom(done("leader", leader).await), Boom("first"));
        let retry = ctl.next().await;
        assert_eq!((retry.n, retry.key), (2, 1));
        assert_eq!(svc.in_flight(), 1);
        let other = svc.call(2);
        assert!(other.is_alone(), "the retry still holds the place");
        drop(other);
        retry.ok("second");
        assert_eq!(ok(done("follower", follower).await), "second");
        assert_eq!(svc.in_flight(), 0);
        let a = svc.call(3);
        let b = svc.call(4);
        assert!(!a.is_alone() && b.is_alone(), "exactly one place was freed");
        drop((a, b));
        assert_eq!(svc.in_flight(), 0);
        assert!(svc.group().is_empty());
    })
    .await;
}

/// `max_in_flight(0)` + `linger`: every call runs alone and unregistered, so nothing lingers
/// and the registry stays empty.
#[tokio::test(start_paused = true)]
async fn max_in_flight_zero_with_linger_keeps_nothing() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .linger(Duration::from_secs(5))
            .max_in_flight(0)
            .layer(backend);
        for round in 0..3 {
            let a = svc.call(1);
            assert!(a.is_alone() && a.is_bypass() && !a.is_leader() && !a.is_shared());
            let a = spawn(a);
            ctl.next().await.ok("v");
            assert_eq!(ok(done("alone", a).await), "v");
            assert!(svc.group().is_empty(), "round {round}");
        }
        let s = svc.stats();
        assert_eq!((s.lingered, s.over_capacity, s.leaders), (0, 3, 0));
        assert_eq!(requests(&s), 3);
        assert_eq!(ctl.calls(), 3);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// forget with linger, linger_errors, retry
// ---------------------------------------------------------------------------------------------

/// `linger_errors` + `forget`: an error of a flight forgotten while it ran is not kept, and a
/// lingering error is dropped by `forget`: no caller after `forget` is served that error.
#[tokio::test(start_paused = true)]
async fn linger_errors_never_serves_an_error_after_forget() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .linger_errors(Duration::from_secs(10))
            .layer(backend);
        // Forgotten while running.
        let mut leader = Box::pin(svc.call(1));
        pending(&mut leader).await;
        let call = ctl.next().await;
        assert!(svc.forget(&1));
        call.err("old");
        assert_eq!(boom(bounded("leader", leader).await), Boom("old"));
        assert!(svc.group().is_empty(), "a forgotten flight does not linger");
        let next = spawn(svc.call(1));
        ctl.next().await.ok("fresh");
        assert_eq!(ok(done("next", next).await), "fresh");

        // Forgotten while lingering.
        let a = spawn(svc.call(2));
        ctl.next().await.err("kept");
        assert_eq!(boom(done("a", a).await), Boom("kept"));
        assert_eq!(svc.group().len(), 1, "the error lingers");
        assert!(svc.forget(&2));
        assert!(svc.group().is_empty());
        let b = spawn(svc.call(2));
        ctl.next().await.ok("fresh two");
        assert_eq!(ok(done("b", b).await), "fresh two");
        let s = svc.stats();
        assert_eq!((s.lingered, s.forgotten, s.errors), (0, 2, 2));
        assert!(!svc.forget(&2), "nothing left to forget");
    })
    .await;
}

/// `forget` during a retry round: the forgotten flight's followers still get the retry's
/// output, a newcomer starts a new flight, and the registry ends empty with no place given up
/// twice.
#[tokio::test(start_paused = true)]
async fn forget_during_a_retry_round() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().retry_failed(1).max_in_flight(2).build();
        let calls = Arc::new(AtomicUsize::new(0));
        let gated = |gate: oneshot::Receiver<Result<u32, &'static str>>| {
            let calls = calls.clone();
            move || async move {
                calls.fetch_add(1, SeqCst);
                gate.await.unwrap()
            }
        };
        let (l_tx, l_rx) = oneshot::channel();
        let (f_tx, f_rx) = oneshot::channel();
        let mut leader = group.run_retryable(1, gated(l_rx));
        let mut follower = group.run_retryable(1, gated(f_rx));
        assert!(leader.is_leader() && !follower.is_leader());
        pending(&mut leader).await;
        pending(&mut follower).await;
        l_tx.send(Err("first")).unwrap();
        assert_eq!(bounded("leader", leader).await.unwrap(), Err("first"));

        assert!(group.forget(&1), "the failed flight awaits its retry");
        assert_eq!(group.in_flight(), 0);
        let (n_tx, n_rx) = oneshot::channel();
        let mut newcomer = group.run_retryable(1, gated(n_rx));
        assert!(newcomer.is_leader(), "a forgotten flight is never joined");
        assert!(!newcomer.is_alone());
        pending(&mut newcomer).await;
        pending(&mut follower).await;
        assert_eq!(
            calls.load(SeqCst),
            3,
            "first call, the newcomer's, the retry"
        );

        f_tx.send(Ok(7)).unwrap();
        n_tx.send(Ok(9)).unwrap();
        assert_eq!(bounded("follower", follower).await.unwrap(), Ok(7));
        assert_eq!(bounded("newcomer", newcomer).await.unwrap(), Ok(9));
        assert_eq!(group.in_flight(), 0);
        assert!(group.is_empty());
        let s = group.stats();
        assert_eq!((s.forgotten, s.retried, s.errors), (1, 1, 1));
        // Both places are free: two new flights fit.
        let a = group.run(10, std::future::pending::<u32>);
        let b = group.run(11, std::future::pending::<u32>);
        assert!(!a.is_alone() && !b.is_alone());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// follower_timeout with retry, capacity, detached, handover
// ---------------------------------------------------------------------------------------------

/// `follower_timeout` (`CallInner`) + `retry_failed`: a follower that called alone takes no
/// part in the retry, which is still one call for the remaining followers (rule 1).
#[tokio::test(start_paused = true)]
async fn retry_after_a_follower_called_alone_is_still_one_call() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .retry_failed(1)
            .follower_timeout(Duration::from_secs(1))
            .layer(backend);
        let leader = spawn(svc.call(1));
        let first = ctl.next().await;
        let early = spawn(svc.call(1));
        settle().await;
        advance(Duration::from_millis(1100)).await;
        let own = ctl.next().await;
        assert_eq!((own.n, own.key), (2, 1), "the early follower called alone");
        let late: Vec<_> = (0..3)
            .map(|_| {
                let f = svc.call(1);
                assert!(f.is_follower());
                spawn(f)
            })
            .collect();
        settle().await;
        first.panic("first");
        let err = done("leader", leader).await.unwrap_err();
        assert_eq!(err.panic_message(), Some("first"));
        let retry = ctl.next().await;
        assert_eq!(retry.n, 3);
        settle().await;
        ctl.no_more();
        assert_eq!(ctl.live(), 2, "the lone call and one retry");
        assert_eq!(svc.in_flight(), 1);
        retry.ok("retry");
        for f in late {
            assert_eq!(ok(done("late follower", f).await), "retry");
        }
        own.ok("own");
        assert_eq!(ok(done("early follower", early).await), "own");
        let s = svc.stats();
        assert_eq!((s.leaders, s.retried, s.timed_out, s.panics), (2, 1, 1, 1));
        assert_eq!(requests(&s), 5);
        assert!(svc.group().is_empty());
    })
    .await;
}

/// `follower_timeout` (`Error`) + `retry_failed`: a follower that gave up (and was dropped)
/// does not stop the others from retrying.
#[tokio::test(start_paused = true)]
async fn timed_out_follower_does_not_block_the_retry() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .retry_failed(1)
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::Error)
            .layer(backend);
        let leader = spawn(svc.call(1));
        let first = ctl.next().await;
        let early = spawn(svc.call(1));
        advance(Duration::from_millis(600)).await;
        let late = spawn(svc.call(1));
        advance(Duration::from_millis(600)).await;
        let err = done("early", early).await.unwrap_err();
        assert!(err.is_timeout());
        first.err("first");
        assert_eq!(boom(done("leader", leader).await), Boom("first"));
        ctl.next().await.ok("retry");
        assert_eq!(ok(done("late", late).await), "retry");
        assert_eq!(ctl.calls(), 2);
        assert!(svc.group().is_empty());
        assert_eq!(svc.stats().timed_out, 1);
    })
    .await;
}

/// Rule 4 with `OnTimeout::Error`: a follower that gave up but whose (finished) response
/// future is kept alive must not stall the others when the leader leaves.
#[tokio::test(start_paused = true)]
async fn timed_out_follower_kept_alive_does_not_stall_a_handover() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::Error)
            .layer(backend);
        let mut leader = Box::pin(svc.call(1));
        pending(&mut leader).await;
        let first = ctl.next().await;
        let mut early = pin!(svc.call(1));
        assert!(early.is_follower());
        assert!(futures::poll!(early.as_mut()).is_pending());
        advance(Duration::from_millis(500)).await;
        let late = spawn(svc.call(1));
        settle().await;
        advance(Duration::from_millis(600)).await;
        // The early follower's limit passed: it fails (and is kept, e.g. pinned in a scope).
        let err = bounded("early", early.as_mut()).await.unwrap_err();
        assert!(err.is_timeout());
        // The leader goes away: the late follower must carry the call on at once, not only
        // when its own limit (0.4 s from now) wakes it.
        drop(leader);
        first.ok("first");
        let out = tokio::time::timeout(Duration::from_millis(100), late)
            .await
            .expect("the late follower stalled after the leader left")
            .expect("task panicked");
        assert_eq!(ok(out), "first");
        assert_eq!(ctl.cancelled(), 0);
    })
    .await;
}

/// Rule 4 with `OnTimeout::Error`, the control case: a follower that gave up and was dropped
/// leaves the handover to the others, who carry the call on at once.
#[tokio::test(start_paused = true)]
async fn timed_out_follower_dropped_leaves_the_handover_to_the_others() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::Error)
            .layer(backend);
        let mut leader = Box::pin(svc.call(1));
        pending(&mut leader).await;
        let first = ctl.next().await;
        let early = spawn(svc.call(1));
        advance(Duration::from_millis(500)).await;
        let late = spawn(svc.call(1));
        advance(Duration::from_millis(600)).await;
        assert!(done("early", early).await.unwrap_err().is_timeout());
        drop(leader);
        first.ok("first");
        let out = tokio::time::timeout(Duration::from_millis(100), late)
            .await
            .expect("the late follower took the call over at once")
            .expect("task panicked");
        assert_eq!(ok(out), "first");
        assert_eq!((ctl.calls(), ctl.cancelled()), (1, 0));
        assert!(svc.group().is_empty());
    })
    .await;
}

/// `max_followers` + `OnTimeout::Error`: a follower that gave up no longer takes one of the
/// flight's follower places, even while its finished future is held.
#[tokio::test(start_paused = true)]
async fn timed_out_follower_kept_alive_frees_its_follower_place() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .max_followers(1)
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::Error)
            .layer(backend);
        let leader = spawn(svc.call(1));
        let first = ctl.next().await;
        let mut early = pin!(svc.call(1));
        assert!(futures::poll!(early.as_mut()).is_pending());
        advance(Duration::from_millis(1100)).await;
        assert!(bounded("early", early.as_mut())
            .await
            .unwrap_err()
            .is_timeout());
        let next = svc.call(1);
        assert!(
            next.is_follower() && !next.is_alone(),
            "the only follower gave up: there is room for one"
        );
        let next = spawn(next);
        first.ok("first");
        assert_eq!(ok(done("next", next).await), "first");
        assert_eq!(ok(done("leader", leader).await), "first");
    })
    .await;
}

/// Rule 7 with `OnTimeout::Error` + `retry_failed`: once every request has its answer, the
/// registry is empty, even if a timed-out follower's finished future is still held.
#[tokio::test(start_paused = true)]
async fn timed_out_follower_kept_alive_leaves_no_registered_flight() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .retry_failed(1)
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::Error)
            .layer(backend);
        let mut leader = Box::pin(svc.call(1));
        pending(&mut leader).await;
        let first = ctl.next().await;
        let mut follower = pin!(svc.call(1));
        assert!(futures::poll!(follower.as_mut()).is_pending());
        advance(Duration::from_millis(1100)).await;
        let err = bounded("follower", follower.as_mut()).await.unwrap_err();
        assert!(err.is_timeout());
        first.err("first");
        assert_eq!(boom(bounded("leader", leader).await), Boom("first"));
        // Every request has its answer.
        assert_eq!(svc.in_flight(), 0, "no flight should still be running");
        assert!(svc.group().is_empty(), "no entry should be left");
    })
    .await;
}

/// `max_followers` + `follower_timeout` (`CallInner`): a follower that stopped waiting frees
/// its follower place for the next request.
#[tokio::test(start_paused = true)]
async fn follower_that_called_alone_frees_its_follower_place() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .max_followers(1)
            .follower_timeout(Duration::from_secs(1))
            .layer(backend);
        let leader = spawn(svc.call(1));
        let first = ctl.next().await;
        let f1 = svc.call(1);
        assert!(f1.is_follower() && !f1.is_alone());
        let extra = svc.call(1);
        assert!(extra.is_alone() && extra.is_bypass(), "over max_followers");
        drop(extra);
        // Its call, made by `call`, cancelled by the drop.
        drop(ctl.next().await);
        let f1 = spawn(f1);
        settle().await;
        advance(Duration::from_millis(1100)).await;
        let own = ctl.next().await;
        let f2 = svc.call(1);
        assert!(
            f2.is_follower() && !f2.is_alone(),
            "the place was given back"
        );
        let f2 = spawn(f2);
        own.ok("own");
        first.ok("first");
        assert_eq!(ok(done("f1", f1).await), "own");
        assert_eq!(ok(done("f2", f2).await), "first");
        assert_eq!(ok(done("leader", leader).await), "first");
        let s = svc.stats();
        assert_eq!((s.over_capacity, s.timed_out, s.fell_through), (1, 1, 2));
        assert_eq!(requests(&s), 4);
    })
    .await;
}

/// `detached` + `follower_timeout` (`Error`): a real follower of a detached flight gives up
/// at its limit; the flight goes on for the leader.
#[tokio::test(start_paused = true)]
async fn detached_flight_follower_times_out_flight_goes_on() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .detached(true)
            .follower_timeout(Duration::from_secs(1))
            .on_follower_timeout(OnTimeout::Error)
            .layer(backend);
        let leader = svc.call(1);
        let follower = svc.call(1);
        assert!(leader.is_leader() && follower.is_follower());
        let (leader, follower) = (spawn(leader), spawn(follower));
        let call = ctl.next().await;
        advance(Duration::from_millis(1100)).await;
        assert!(done("follower", follower).await.unwrap_err().is_timeout());
        assert_eq!(ctl.live(), 1);
        advance(Duration::from_secs(5)).await;
        call.ok("v");
        assert_eq!(ok(done("leader", leader).await), "v");
        let s = svc.stats();
        assert_eq!(
            (s.timed_out, s.followers, s.cancelled, s.in_flight),
            (1, 1, 0, 0)
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Leader gone, takeover, linger, roles
// ---------------------------------------------------------------------------------------------

/// Rule 4 + `linger` + stats: a follower that takes over from a departed leader publishes to
/// everybody, the output lingers, and the counters show one flight, no cancellation.
#[tokio::test(start_paused = true)]
async fn takeover_then_linger_keeps_counters_consistent() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer().linger(Duration::from_secs(5)).layer(backend);
        let mut leader = Box::pin(svc.call(1));
        pending(&mut leader).await;
        let call = ctl.next().await;
        let followers: Vec<_> = (0..2).map(|_| spawn(svc.call(1))).collect();
        settle().await;
        drop(leader);
        settle().await;
        assert_eq!(ctl.live(), 1, "the call goes on for the followers");
        call.ok("v");
        for f in followers {
            assert_eq!(ok(done("follower", f).await), "v");
        }
        let s = svc.stats();
        assert_eq!(
            (s.leaders, s.followers, s.cancelled, s.in_flight),
            (1, 2, 0, 0)
        );
        assert_eq!(svc.group().len(), 1, "the output lingers");
        let hit = svc.call(1);
        assert!(hit.is_follower() && hit.is_shared() && !hit.is_alone() && !hit.is_bypass());
        assert_eq!(ok(bounded("hit", hit).await), "v");
        assert_eq!(ctl.calls(), 1);
        advance(Duration::from_secs(6)).await;
        assert_eq!(svc.group().len(), 1, "expired, not yet purged");
        svc.group().purge_expired();
        assert!(svc.group().is_empty());
        assert_eq!(svc.stats().lingered, 1);
        assert_eq!(requests(&svc.stats()), 4);
    })
    .await;
}

/// The role flags, for each way a keyed request can be served under the options.
#[tokio::test(start_paused = true)]
async fn role_flags_under_every_option() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .max_followers(1)
            .follower_timeout(Duration::from_secs(1))
            .linger(Duration::from_secs(10))
            .layer(backend);
        let leader = svc.call(1);
        assert!(leader.is_leader() && !leader.is_follower());
        assert!(!leader.is_alone() && !leader.is_bypass() && !leader.is_shared());
        let follower = svc.call(1);
        assert!(follower.is_follower() && follower.is_shared());
        assert!(!follower.is_leader() && !follower.is_alone() && !follower.is_bypass());
        let extra = svc.call(1);
        assert!(extra.is_alone() && extra.is_bypass() && !extra.is_shared());
        assert!(
            !extra.is_leader() && !extra.is_follower(),
            "over a bound: no flight's"
        );
        let bypass = svc.call(0);
        assert!(bypass.is_bypass() && !bypass.is_alone() && !bypass.is_leader());
        drop((extra, bypass));

        let mut leader = Box::pin(leader);
        let mut follower = Box::pin(follower);
        pending(&mut leader).await;
        pending(&mut follower).await;
        let call = ctl.next().await;
        // The extra's and the bypass's calls, made by `call`, cancelled by their drops.
        drop((ctl.next().await, ctl.next().await));
        advance(Duration::from_millis(1100)).await;
        pending(&mut follower).await;
        assert!(
            follower.is_alone() && follower.is_bypass(),
            "it calls alone"
        );
        assert!(!follower.is_follower() && !follower.is_shared());
        ctl.next().await.ok("own");
        assert_eq!(ok(bounded("follower", follower.as_mut()).await), "own");
        call.ok("v");
        assert_eq!(ok(bounded("leader", leader.as_mut()).await), "v");
        assert!(!leader.is_shared(), "its follower left before the response");
        let hit = svc.call(1);
        assert!(hit.is_shared() && !hit.is_leader() && !hit.is_alone());
        assert_eq!(ok(bounded("hit", hit).await), "v");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// linger + retry, linger + panicking Clone
// ---------------------------------------------------------------------------------------------

/// `linger_errors` + `retry_failed`: a request arriving during the retry joins it (the failed
/// attempt is not served from the window), and only the final error lingers.
#[tokio::test(start_paused = true)]
async fn only_the_final_error_of_a_retried_flight_lingers() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .retry_failed(1)
            .linger_errors(Duration::from_secs(5))
            .layer(backend);
        let leader = spawn(svc.call(1));
        let follower = spawn(svc.call(1));
        ctl.next().await.err("first");
        assert_eq!(boom(done("leader", leader).await), Boom("first"));
        let retry = ctl.next().await;
        let during = svc.call(1);
        assert!(
            during.is_follower(),
            "joins the retry, not a lingering error"
        );
        let during = spawn(during);
        settle().await;
        retry.err("second");
        assert_eq!(boom(done("follower", follower).await), Boom("second"));
        assert_eq!(boom(done("during", during).await), Boom("second"));
        let hit = svc.call(1);
        assert!(!hit.is_leader());
        assert_eq!(boom(bounded("hit", hit).await), Boom("second"));
        settle().await;
        ctl.no_more();
        let s = svc.stats();
        assert_eq!((s.leaders, s.retried, s.errors, s.lingered), (2, 1, 2, 1));
        assert_eq!(requests(&s), 4);
    })
    .await;
}

/// A response whose `Clone` panics when it is only cloned to be kept for `linger`.
#[derive(Debug)]
struct Touchy {
    value: u32,
    /// Clones that are to panic, from now on.
    panics: Arc<AtomicUsize>,
}

impl Clone for Touchy {
    fn clone(&self) -> Self {
        if self
            .panics
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("clone refused");
        }
        Touchy {
            value: self.value,
            panics: self.panics.clone(),
        }
    }
}

/// Rule 5 + `linger`: a `Clone` that panics while the output is copied to linger is contained
/// (every waiter gets the output), nothing is kept, and the next caller gets a fresh call.
#[tokio::test(start_paused = true)]
async fn panicking_linger_copy_is_contained_and_the_next_caller_calls_fresh() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().linger(Duration::from_secs(5)).build();
        let panics = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let make = |value: u32| {
            let (panics, calls) = (panics.clone(), calls.clone());
            move || async move {
                calls.fetch_add(1, SeqCst);
                tokio::task::yield_now().await;
                panics.store(1, SeqCst);
                Touchy { value, panics }
            }
        };
        let leader = group.run(1, make(1));
        let follower = group.run(1, make(2));
        let (leader, follower) = bounded("both", async { tokio::join!(leader, follower) }).await;
        // The linger copy is the only clone that panics: what the waiters get is unaffected.
        assert_eq!(leader.expect("leader").value, 1);
        assert_eq!(follower.expect("follower").value, 1);
        assert!(group.is_empty(), "a copy that panicked is not kept");
        assert_eq!(group.in_flight(), 0);
        let next = bounded("next", group.run(1, make(3))).await;
        assert_eq!(next.expect("next").value, 3, "a fresh call");
        assert_eq!(calls.load(SeqCst), 2);
        assert_eq!(group.stats().lingered, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// retry abandoned by every follower that could retry
// ---------------------------------------------------------------------------------------------

/// Sets up a failed flight whose only retrier leaves before it retries; returns the group and
/// what the plain follower got. The one call made failed once.
async fn abandoned_retry(group: &Group<u8>) -> Result<u32, &'static str> {
    let (tx, rx) = oneshot::channel::<Result<u32, &'static str>>();
    let mut leader = group.run_retryable(1, move || async move { rx.await.unwrap() });
    let retrier = group.run_retryable(1, || async { Ok::<u32, &'static str>(2) });
    let mut plain = group.run_result(1, || async { Ok::<u32, &'static str>(3) });
    pending(&mut leader).await;
    pending(&mut plain).await;
    tx.send(Err("first")).unwrap();
    assert_eq!(bounded("leader", leader).await.unwrap(), Err("first"));
    drop(retrier);
    bounded("plain", plain).await.expect("no panic")
}

/// `stats().errors` ("Calls whose output was an error"): a flight whose retry was abandoned
/// made one call, which failed once; it is counted once.
#[tokio::test(start_paused = true)]
async fn abandoned_retry_counts_its_failed_call_once() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().retry_failed(1).build();
        assert_eq!(abandoned_retry(&group).await, Err("first"));
        let s = group.stats();
        assert_eq!((s.leaders, s.retried), (1, 0), "one call, no retry");
        assert_eq!(s.errors, 1, "one call failed, once");
        assert!(group.is_empty());
    })
    .await;
}

/// `linger_errors`: the error a failed flight hands its followers lingers for the window, also
/// when its retry was abandoned.
#[tokio::test(start_paused = true)]
async fn abandoned_retry_error_lingers_under_linger_errors() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new()
            .retry_failed(1)
            .linger_errors(Duration::from_secs(10))
            .build();
        assert_eq!(abandoned_retry(&group).await, Err("first"));
        let called = Arc::new(AtomicBool::new(false));
        let c = called.clone();
        let hit = group.run_result(1, move || async move {
            c.store(true, SeqCst);
            Ok::<u32, &'static str>(4)
        });
        assert_eq!(bounded("hit", hit).await.unwrap(), Err("first"));
        assert!(!called.load(SeqCst), "served from the window");
        assert_eq!(group.stats().lingered, 1);
    })
    .await;
}

/// The same abandoned retry, without `linger_errors`: the plain follower gets the failed
/// call's error, nobody hangs, and the registry ends empty (rules 3, 5, 7).
#[tokio::test(start_paused = true)]
async fn abandoned_retry_hands_the_error_on_and_empties_the_registry() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().retry_failed(3).max_in_flight(1).build();
        assert_eq!(abandoned_retry(&group).await, Err("first"));
        assert_eq!(group.in_flight(), 0);
        assert!(group.is_empty());
        let next = group.run_retryable(1, || async { Ok::<u32, &'static str>(5) });
        assert!(next.is_leader() && !next.is_alone(), "its place is free");
        assert_eq!(bounded("next", next).await.unwrap(), Ok(5));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// detached + retry
// ---------------------------------------------------------------------------------------------

/// `detached` + `retry_failed`: the detached caller gets the retry's output, as
/// `GroupBuilder::retry_failed` documents.
#[tokio::test(start_paused = true)]
async fn detached_caller_gets_the_retrys_output() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().detached(true).retry_failed(1).build();
        let leader = group.run_result(1, || async {
            tokio::task::yield_now().await;
            Err::<u32, &'static str>("first")
        });
        let follower = group.run_retryable(1, || async { Ok::<u32, &'static str>(7) });
        assert!(leader.is_leader() && !follower.is_leader());
        let (leader, follower) = bounded("both", async { tokio::join!(leader, follower) }).await;
        assert_eq!(leader.unwrap(), Ok(7));
        assert_eq!(follower.unwrap(), Ok(7));
        let s = group.stats();
        assert_eq!((s.leaders, s.retried, s.errors, s.in_flight), (2, 1, 1, 0));
        assert!(group.is_empty());
    })
    .await;
}

/// `is_shared` (Go's `shared`: "whether the output was handed to more than one caller") for a
/// detached caller whose output came from a follower's retry, which the follower got too.
#[tokio::test(start_paused = true)]
async fn detached_caller_served_by_a_retry_is_shared() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().detached(true).retry_failed(1).build();
        let mut leader = group.run_result(1, || async {
            tokio::task::yield_now().await;
            Err::<u32, &'static str>("first")
        });
        let mut follower = group.run_retryable(1, || async { Ok::<u32, &'static str>(7) });
        let (a, b) = bounded("both", async { tokio::join!(&mut leader, &mut follower) }).await;
        assert_eq!((a.unwrap(), b.unwrap()), (Ok(7), Ok(7)));
        assert!(follower.is_shared());
        assert!(leader.is_shared(), "the follower got the same output");
    })
    .await;
}

/// `detached`: "each call runs on a spawned task and completes even when every waiter has
/// gone"; a retry (`retry_failed`: "one new call") of a detached flight too.
#[tokio::test(start_paused = true)]
async fn detached_retry_completes_when_every_waiter_left() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().detached(true).retry_failed(1).build();
        let completed = Arc::new(AtomicBool::new(false));
        let (gate_tx, gate_rx) = oneshot::channel::<()>();
        let mut leader = group.run_result(1, || async {
            tokio::task::yield_now().await;
            Err::<u32, &'static str>("first")
        });
        let c = completed.clone();
        let mut follower = group.run_retryable(1, move || async move {
            let _ = gate_rx.await;
            c.store(true, SeqCst);
            Ok::<u32, &'static str>(7)
        });
        pending(&mut leader).await;
        pending(&mut follower).await;
        settle().await; // the detached task runs the first call, which fails
        pending(&mut follower).await; // the follower starts the retry
        assert_eq!(group.stats().retried, 1);
        drop(follower);
        drop(leader);
        let _ = gate_tx.send(());
        settle().await;
        assert!(
            completed.load(SeqCst),
            "a detached flight's retry should complete with nobody waiting"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Counters and cleanup over a mixed scenario
// ---------------------------------------------------------------------------------------------

/// `stats()`: over a scenario touching every option, the counters account for every request
/// exactly once (leaders − retried + followers + lingered + bypassed + over_capacity), and
/// `fell_through = over_capacity + timed_out`.
#[tokio::test(start_paused = true)]
async fn counters_add_up_with_every_option() {
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc: Svc = layer()
            .linger(Duration::from_millis(500))
            .max_followers(1)
            .follower_timeout(Duration::from_secs(1))
            .retry_failed(1)
            .layer(backend);
        // A bypass.
        let b = spawn(svc.call(0));
        ctl.next().await.ok("bypass");
        ok(done("bypass", b).await);
        // Key 1: leader, follower, one over max_followers.
        let w: Vec<_> = (0..3).map(|_| spawn(svc.call(1))).collect();
        for _ in 0..2 {
            ctl.next().await.ok("one");
        }
        for w in w {
            assert_eq!(ok(done("key 1", w).await), "one");
        }
        // A lingering hit.
        assert_eq!(ok(bounded("hit", svc.call(1)).await), "one");
        // Key 2: the leader fails, its follower retries.
        let l2 = spawn(svc.call(2));
        let f2 = spawn(svc.call(2));
        ctl.next().await.err("two");
        ctl.next().await.ok("two again");
        assert_eq!(boom(done("l2", l2).await), Boom("two"));
        assert_eq!(ok(done("f2", f2).await), "two again");
        // Key 3: the follower times out and calls alone.
        let l3 = spawn(svc.call(3));
        let first = ctl.next().await;
        let f3 = spawn(svc.call(3));
        settle().await;
        advance(Duration::from_millis(1100)).await;
        ctl.next().await.ok("three alone");
        first.ok("three");
        assert_eq!(ok(done("l3", l3).await), "three");
        assert_eq!(ok(done("f3", f3).await), "three alone");

        let s = svc.stats();
        assert_eq!(requests(&s), 9, "{s:?}");
        assert_eq!(s.fell_through, s.over_capacity + s.timed_out);
        assert_eq!((s.over_capacity, s.timed_out), (1, 1));
        assert_eq!((s.leaders, s.retried, s.followers), (4, 1, 3));
        assert_eq!((s.lingered, s.bypassed, s.errors), (1, 1, 1));
        assert_eq!(ctl.calls(), 7);
        advance(Duration::from_secs(2)).await;
        svc.group().purge_expired();
        assert!(svc.group().is_empty());
        assert_eq!(svc.stats().in_flight, 0);
    })
    .await;
}

/// Rules 5 and 7: requests dropped at every stage under all options at once (detached,
/// lingers, retries, capacity bounds, wait limits, forget) never hang, and once the load stops
/// and the windows expire the registry is empty and nothing is in flight.
#[tokio::test(start_paused = true)]
async fn registry_empties_after_a_storm_of_options_and_drops() {
    bounded("test", async {
        for detached in [false, true] {
            let calls = Arc::new(AtomicUsize::new(0));
            let c = calls.clone();
            let inner = tower::service_fn(move |k: u32| {
                let n = c.fetch_add(1, SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(k % 7))).await;
                    match n % 5 {
                        0 => Err(Boom("flaky")),
                        // Bypassed requests (k % 11 == 0) would get the panic as is.
                        1 if k % 3 == 0 && k % 11 != 0 => panic!("kaboom"),
                        _ => Ok(k),
                    }
                }
            });
            let svc = CoalesceLayer::new(|k: &u32| (k % 11 != 0).then_some(k % 13))
                .detached(detached)
                .linger(Duration::from_millis(300))
                .linger_errors(Duration::from_millis(100))
                .retry_failed(2)
                .max_in_flight(5)
                .max_followers(3)
                .follower_timeout(Duration::from_millis(250))
                .on_follower_timeout(OnTimeout::Error)
                .layer(inner);
            let mut tasks = Vec::new();
            for i in 0..200u32 {
                let mut s = svc.clone();
                // Some requests give up early, some are dropped unpolled, the rest wait.
                let fut = s.call(i);
                match i % 4 {
                    0 => drop(fut),
                    1 => tasks.push(tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_millis(50), fut).await;
                    })),
                    _ => tasks.push(tokio::spawn(async move {
                        let _ = fut.await;
                    })),
                }
                if i % 17 == 0 {
                    svc.forget(&(i % 13));
                }
                if i % 10 == 0 {
                    tokio::time::advance(Duration::from_millis(30)).await;
                }
            }
            for t in tasks {
                bounded("a request", t)
                    .await
                    .expect("no request task panics");
            }
            tokio::time::advance(Duration::from_secs(5)).await;
            settle().await;
            assert_eq!(svc.in_flight(), 0, "detached: {detached}");
            // A detached retry may have finished just now (it outlives its waiters): its
            // output lingers for the window from then.
            tokio::time::advance(Duration::from_secs(1)).await;
            svc.group().purge_expired();
            assert!(svc.group().is_empty(), "detached: {detached}");
            let s = svc.stats();
            assert_eq!(s.in_flight, 0);
            assert_eq!(s.fell_through, s.over_capacity + s.timed_out);
            assert_eq!(requests(&s), 200, "detached: {detached}: {s:?}");
        }
    })
    .await;
}

/// `follower_timeout` + `detached` + `retry_failed`: the follower whose own request is the
/// retry a spawned task runs waits for it, as a follower driving a retry does, and is not
/// timed out by its own wait limit.
#[tokio::test(start_paused = true)]
async fn detached_retrier_is_not_timed_out_while_its_retry_runs() {
    bounded("test", async {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let inner = tower::service_fn(move |_: u32| {
            let n = c.fetch_add(1, SeqCst);
            async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(Boom("first"))
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(7u32)
                }
            }
        });
        let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
            .detached(true)
            .retry_failed(1)
            .follower_timeout(Duration::from_millis(110))
            .layer(inner);
        let leader = tokio::spawn(svc.call(1));
        settle().await;
        advance(Duration::from_millis(10)).await;
        let follower = tokio::spawn(svc.call(1));
        settle().await;
        for _ in 0..20 {
            advance(Duration::from_millis(10)).await;
        }
        let out = bounded("follower", follower).await.expect("no panic");
        assert_eq!(out.expect("its own retry's answer"), 7);
        // The detached caller waits for the flight like a follower: the retry serves it too.
        let out = bounded("leader", leader).await.expect("no panic");
        assert_eq!(out.expect("the retry's answer"), 7);
        assert_eq!(calls.load(SeqCst), 2, "the first call and its retry");
        assert_eq!(svc.stats().timed_out, 0);
    })
    .await;
}

/// A follower that gives up at its limit (`OnTimeout::Error`) and is kept: no output was
/// shared with it.
#[tokio::test(start_paused = true)]
async fn follower_that_gave_up_is_not_shared() {
    bounded("test", async {
        let inner = tower::service_fn(|_: u32| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<u32, Boom>(1)
        });
        let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
            .follower_timeout(Duration::from_millis(100))
            .on_follower_timeout(OnTimeout::Error)
            .layer(inner);
        let leader = tokio::spawn(svc.call(1));
        settle().await;
        let mut follower = Box::pin(svc.call(1));
        assert!(futures::poll!(&mut follower).is_pending());
        advance(Duration::from_millis(150)).await;
        let err = bounded("follower", &mut follower)
            .await
            .expect_err("timed out");
        assert!(err.is_timeout());
        assert!(!follower.is_shared(), "nothing was shared with it");
        advance(Duration::from_secs(1)).await;
        assert_eq!(
            bounded("leader", leader).await.expect("no panic").unwrap(),
            1
        );
    })
    .await;
}

/// `detached` + `retry_failed`: a retry runs on a task of its own even when the first attempt
/// never had one (its `make` panicked), so it completes after every waiter left.
#[tokio::test(start_paused = true)]
async fn detached_retry_after_a_make_panic_completes_without_waiters() {
    bounded("test", async {
        let group: Group<u8> = GroupBuilder::new().detached(true).retry_failed(1).build();
        let (done_tx, done_rx) = oneshot::channel::<u32>();
        type Waiter = tower_coalesce::Run<u8, Result<u32, ()>>;
        let joined: Arc<std::sync::Mutex<Option<Waiter>>> = Arc::default();
        let (g, slot) = (group.clone(), joined.clone());
        let mut leader = group.run_retryable(1, move || {
            // `make` runs unlocked, after registration: a follower able to retry joins here.
            *slot.lock().unwrap() = Some(g.run_retryable(1, move || async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = done_tx.send(7);
                Ok::<u32, ()>(7)
            }));
            panic!("no first call");
            #[allow(unreachable_code)]
            async {
                Ok::<u32, ()>(0)
            }
        });
        let mut follower = joined.lock().unwrap().take().expect("joined inside make");
        assert!(
            (&mut leader).await.is_err(),
            "the leader gets its own panic"
        );
        assert!(futures::poll!(&mut follower).is_pending(), "the retry runs");
        drop(follower);
        advance(Duration::from_secs(2)).await;
        assert_eq!(bounded("retry", done_rx).await, Ok(7), "completed");
        assert_eq!(group.in_flight(), 0);
        assert!(group.is_empty());
    })
    .await;
}
