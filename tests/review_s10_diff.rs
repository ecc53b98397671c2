//! Review of the session-10 diff (9bdd184..HEAD): the eager inner call made in the flight's
//! box, whole-built entries and waiters, `dropped_after` for user destructors, and the strict
//! `Cache-Control` / `Pragma` list reader. Black-box, through the public API only.
//!
//! Found (ignored, `BUG:`): `start` (src/flight/run.rs) now calls `Begin::begin` outside the
//! `catch_unwind` that covers `make`. `Call::begin` (src/future.rs) replaces the call's state
//! with `Pin::set` after its own `catch_unwind`, which drops the old state there: the clone of
//! the inner service (and, when `poll_ready` failed or panicked, the request). A panicking
//! destructor of either now unwinds out of `CoalesceService::call` after the flight's entry
//! was registered, with no waiter to end it: the key stays in flight for ever and every later
//! request for it joins a flight nobody drives (a hang). Over a capacity bound the same panic
//! escapes `call` instead of becoming the waiter's `CoalesceError::is_panic`.
//!
//! Deterministic: paused time (no sockets), semaphores and channels as gates, `yield_now` to
//! let a current-thread runtime run its tasks; timeouts are hang guards only.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower::{BoxError, Layer, Service};
use tower_coalesce::{CoalesceLayer, GroupBuilder};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(30);

type BoxFut<O> = Pin<Box<dyn Future<Output = O> + Send>>;

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("hangs: {what}"))
}

async fn settle() {
    for _ in 0..32 {
        tokio::task::yield_now().await;
    }
}

fn quiet<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    catch_unwind(AssertUnwindSafe(f))
}

/// Where user code panics.
#[allow(dead_code)] // The adapters' sites are used only with their features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Site {
    None,
    SvcClone,
    SvcDrop,
    PollReady,
    Call,
    ReqDrop,
    ResBodyDrop,
    Identity,
    KeyDrop,
}

/// Panics once, at the `at`-th event of its armed site (never while already unwinding).
struct Trip {
    armed: Mutex<(Site, usize, usize)>,
    fired: AtomicBool,
}

impl Trip {
    fn new() -> Arc<Self> {
        Arc::new(Trip {
            armed: Mutex::new((Site::None, 0, 0)),
            fired: AtomicBool::new(false),
        })
    }

    fn arm(&self, site: Site, at: usize) {
        *self.armed.lock().unwrap() = (site, at, 0);
        self.fired.store(false, SeqCst);
    }

    fn disarm(&self) {
        self.armed.lock().unwrap().0 = Site::None;
    }

    fn fired(&self) -> bool {
        self.fired.load(SeqCst)
    }

    fn hit(&self, site: Site) {
        if std::thread::panicking() {
            return;
        }
        let fire = {
            let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
            if armed.0 != site {
                false
            } else {
                armed.2 += 1;
                let fire = armed.2 == armed.1;
                if fire {
                    armed.0 = Site::None;
                }
                fire
            }
        };
        if fire {
            self.fired.store(true, SeqCst);
            panic!("boom at {site:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tower layer: an inner service and a request with destructors of their own
// ---------------------------------------------------------------------------------------------

/// A request whose destructor is user code.
struct Req {
    key: &'static str,
    trip: Arc<Trip>,
}

impl Drop for Req {
    fn drop(&mut self) {
        self.trip.hit(Site::ReqDrop);
    }
}

/// An inner service whose `Clone`, `Drop`, `poll_ready` and `call` are user code that may
/// panic; `fail_ready` makes `poll_ready` fail; each call waits for a permit of `gate`.
struct Inner {
    trip: Arc<Trip>,
    calls: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    fail_ready: bool,
}

impl Inner {
    fn new(trip: &Arc<Trip>) -> Self {
        Inner {
            trip: Arc::clone(trip),
            calls: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            fail_ready: false,
        }
    }
}

impl Clone for Inner {
    fn clone(&self) -> Self {
        self.trip.hit(Site::SvcClone);
        Inner {
            trip: Arc::clone(&self.trip),
            calls: Arc::clone(&self.calls),
            gate: Arc::clone(&self.gate),
            fail_ready: self.fail_ready,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.trip.hit(Site::SvcDrop);
    }
}

impl Service<Req> for Inner {
    type Response = usize;
    type Error = BoxError;
    type Future = BoxFut<Result<usize, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.trip.hit(Site::PollReady);
        match self.fail_ready {
            true => Poll::Ready(Err("not ready, ever".into())),
            false => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.trip.hit(Site::Call);
        let n = self.calls.fetch_add(1, SeqCst) + 1;
        let gate = Arc::clone(&self.gate);
        Box::pin(async move {
            let _permit = gate.acquire().await.unwrap();
            drop(req);
            Ok(n)
        })
    }
}

fn req(trip: &Arc<Trip>, key: &'static str) -> Req {
    Req {
        key,
        trip: Arc::clone(trip),
    }
}

fn by_key(r: &Req) -> Option<&'static str> {
    Some(r.key)
}

// ---------------------------------------------------------------------------------------------
// The eager inner call of a new flight: destructors run by `Call::begin`
// ---------------------------------------------------------------------------------------------

/// A destructor that `Call::begin` runs (the clone of the inner service it called, or the
/// request it could not send) panics. Before this diff `start` caught it with `make`'s panic
/// and ended the flight (every waiter got `is_panic`); now it unwinds out of `call` with the
/// flight registered and no waiter to end it.
#[tokio::test(start_paused = true)]
async fn eager_call_destructor_panic_leaves_no_orphan_flight() {
    // (what, site, fail_ready)
    let cases = [
        (
            "the called clone of the inner service drops",
            Site::SvcDrop,
            false,
        ),
        ("poll_ready fails, the clone drops", Site::SvcDrop, true),
        (
            "poll_ready fails, the unsent request drops",
            Site::ReqDrop,
            true,
        ),
    ];
    for (what, site, fail_ready) in cases {
        let trip = Trip::new();
        let mut inner = Inner::new(&trip);
        inner.fail_ready = fail_ready;
        let calls = Arc::clone(&inner.calls);
        let mut svc = CoalesceLayer::new(by_key).layer(inner);
        trip.arm(site, 1);
        let first = quiet(|| svc.call(req(&trip, "k")));
        assert!(trip.fired(), "{what}: the destructor never ran in call()");
        let call_panicked = first.is_err();
        let first = match first {
            Ok(fut) => Some(bounded(what, fut).await),
            Err(_) => None,
        };
        trip.disarm();
        let leaked = svc.in_flight();
        svc.get_mut().fail_ready = false;
        let before = calls.load(SeqCst);
        let later = tokio::time::timeout(WAIT, svc.call(req(&trip, "k"))).await;
        assert_eq!(leaked, 0, "{what}: the flight stays registered");
        let later = later.unwrap_or_else(|_| panic!("{what}: a later request for the key hangs"));
        assert_eq!(later.unwrap(), before + 1, "{what}: the later request");
        assert!(!call_panicked, "{what}: call() panicked");
        let err = first.unwrap().unwrap_err();
        assert!(err.is_panic(), "{what}: {err:?}");
    }
}

/// Over a capacity bound the call runs alone: the same destructor panic used to be the
/// caller's `is_panic` error (as a panic of `poll_ready` or `call` still is); now it escapes
/// `call`. Nothing is leaked here (the call is not registered).
#[tokio::test(start_paused = true)]
async fn over_capacity_eager_call_destructor_panic_is_the_callers_error() {
    for max_followers in [false, true] {
        let what = if max_followers {
            "max_followers(0)"
        } else {
            "max_in_flight(1)"
        };
        let trip = Trip::new();
        let inner = Inner::new(&trip);
        let (calls, gate) = (Arc::clone(&inner.calls), Arc::clone(&inner.gate));
        gate.forget_permits(Semaphore::MAX_PERMITS);
        let layer = CoalesceLayer::new(by_key);
        let layer = match max_followers {
            true => layer.max_followers(0),
            false => layer.max_in_flight(1),
        };
        let mut svc = layer.layer(inner);
        // One flight running (its call waits at the gate): the next request is over the bound.
        let running = tokio::spawn(svc.call(req(&trip, "k")));
        settle().await;
        assert_eq!(svc.in_flight(), 1, "{what}");
        trip.arm(Site::SvcDrop, 1);
        let key = if max_followers { "k" } else { "other" };
        let alone = quiet(|| svc.call(req(&trip, key)));
        trip.disarm();
        gate.add_permits(1000);
        assert_eq!(bounded(what, running).await.unwrap().unwrap(), 1, "{what}");
        assert_eq!(svc.in_flight(), 0, "{what}");
        let later = bounded(what, svc.call(req(&trip, "k"))).await;
        assert_eq!(later.unwrap(), calls.load(SeqCst), "{what}");
        let alone = alone.unwrap_or_else(|_| panic!("{what}: call() panicked"));
        assert!(alone.is_alone(), "{what}");
        let err = bounded(what, alone).await.unwrap_err();
        assert!(err.is_panic(), "{what}: {err:?}");
    }
}

/// A panic of `poll_ready` or `call` in the eager call is raised again on the flight's first
/// poll: every waiter that joined before then gets it, detached or not; the key recovers.
#[tokio::test(start_paused = true)]
async fn eager_call_panic_reaches_every_waiter_joined_before_the_first_poll() {
    for site in [Site::PollReady, Site::Call] {
        for detached in [false, true] {
            let what = format!("{site:?} detached={detached}");
            let trip = Trip::new();
            let inner = Inner::new(&trip);
            let calls = Arc::clone(&inner.calls);
            let mut svc = CoalesceLayer::new(by_key).detached(detached).layer(inner);
            trip.arm(site, 1);
            let leader = svc.call(req(&trip, "k"));
            assert!(trip.fired(), "{what}: not called in call()");
            let followers: Vec<_> = (0..2).map(|_| svc.call(req(&trip, "k"))).collect();
            assert!(leader.is_leader() && followers.iter().all(|f| f.is_follower()));
            let mut outs = vec![bounded(&what, leader).await];
            for f in followers {
                outs.push(bounded(&what, f).await);
            }
            for out in outs {
                let err = out.unwrap_err();
                assert!(err.is_panic(), "{what}: {err:?}");
                assert!(err.panic_message().unwrap().contains("boom"), "{what}");
            }
            settle().await;
            assert_eq!(svc.in_flight(), 0, "{what}");
            let before = calls.load(SeqCst);
            let later = bounded(&what, svc.call(req(&trip, "k"))).await.unwrap();
            assert_eq!(later, before + 1, "{what}");
        }
    }
}

/// A not-ready inner service: `call` does not send the request (a mock sees nothing), the
/// flight's first poll waits for readiness with its own waker, one request goes out for the
/// leader and its follower.
#[tokio::test(start_paused = true)]
async fn not_ready_inner_is_called_on_the_flights_own_wake() {
    use futures::FutureExt;
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, u32>();
    handle.allow(0);
    let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k)).layer(mock);
    let leader = svc.call("k");
    let follower = svc.call("k");
    assert!(leader.is_leader() && follower.is_follower());
    assert!(handle.next_request().now_or_never().is_none());
    let (leader, follower) = (tokio::spawn(leader), tokio::spawn(follower));
    settle().await;
    assert!(handle.next_request().now_or_never().is_none());
    handle.allow(1);
    let (got, send) = bounded("request", handle.next_request()).await.unwrap();
    assert_eq!(got, "k");
    send.send_response(7);
    assert_eq!(bounded("leader", leader).await.unwrap().unwrap(), 7);
    assert_eq!(bounded("follower", follower).await.unwrap().unwrap(), 7);
    assert_eq!(svc.in_flight(), 0);
    assert_eq!(svc.stats().followers, 1);
    // A later request is a new flight.
    handle.allow(1);
    let again = tokio::spawn(svc.call("k"));
    let (_, send) = bounded("second request", handle.next_request())
        .await
        .unwrap();
    send.send_response(8);
    assert_eq!(bounded("again", again).await.unwrap().unwrap(), 8);
}

/// A keyless request is sent in `call` (eagerly, in its own box) and registers nothing; a
/// not-ready inner service makes it wait for the first poll.
#[tokio::test(start_paused = true)]
async fn keyless_bypass_calls_eagerly_and_registers_nothing() {
    use futures::FutureExt;
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, u32>();
    let mut svc = CoalesceLayer::new(|k: &&'static str| (*k != "skip").then_some(*k)).layer(mock);
    let bypass = svc.call("skip");
    assert!(bypass.is_bypass() && !bypass.is_leader());
    let (got, send) = handle.next_request().now_or_never().unwrap().unwrap();
    assert_eq!(got, "skip");
    assert_eq!(svc.in_flight(), 0);
    send.send_response(1);
    assert_eq!(bounded("bypass", bypass).await.unwrap(), 1);
    handle.allow(0);
    let waiting = svc.call("skip");
    assert!(handle.next_request().now_or_never().is_none());
    let waiting = tokio::spawn(waiting);
    settle().await;
    handle.allow(1);
    let (_, send) = bounded("late request", handle.next_request())
        .await
        .unwrap();
    send.send_response(2);
    assert_eq!(bounded("late", waiting).await.unwrap().unwrap(), 2);
    assert_eq!(svc.stats().bypassed, 2);
    assert_eq!(svc.group().len(), 0);
}

/// A detached flight's call is made in `call` and runs to its end after every waiter left;
/// the key is freed then, and the next request makes a new call.
#[tokio::test(start_paused = true)]
async fn detached_eager_flight_completes_after_every_waiter_left() {
    use futures::FutureExt;
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, u32>();
    let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k))
        .detached(true)
        .layer(mock);
    let leader = svc.call("k");
    let follower = svc.call("k");
    assert!(leader.is_leader() && follower.is_follower());
    let (_, send) = handle.next_request().now_or_never().unwrap().unwrap();
    drop((leader, follower));
    settle().await;
    assert_eq!(svc.in_flight(), 1, "a detached call goes on");
    send.send_response(5);
    bounded("detached driver", async {
        while svc.in_flight() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(svc.group().len(), 0);
    let next = svc.call("k");
    assert!(next.is_leader());
    let (_, send) = handle.next_request().now_or_never().unwrap().unwrap();
    send.send_response(6);
    assert_eq!(bounded("next", next).await.unwrap(), 6);
}

/// A gated flight (its key's cancelled call still being dropped, on another thread) does not
/// call the inner service in `call`; its first poll after the gate opens does, and a
/// destructor panic there is every waiter's `is_panic` error; the key recovers.
#[tokio::test(start_paused = true)]
async fn gated_flight_calls_lazily_and_contains_a_destructor_panic() {
    /// Blocks its drop until released, telling the test it has begun.
    struct SlowDrop(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);
    impl Drop for SlowDrop {
        fn drop(&mut self) {
            self.0.send(()).unwrap();
            self.1.recv().unwrap();
        }
    }
    #[derive(Clone)]
    struct Slow {
        inner: Inner,
        first: Arc<Mutex<Option<SlowDrop>>>,
    }
    impl Service<Req> for Slow {
        type Response = usize;
        type Error = BoxError;
        type Future = BoxFut<Result<usize, BoxError>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx)
        }
        fn call(&mut self, req: Req) -> Self::Future {
            let call = self.inner.call(req);
            match self.first.lock().unwrap().take() {
                Some(slow) => Box::pin(async move {
                    let _slow = slow;
                    std::future::pending::<()>().await;
                    call.await
                }),
                None => call,
            }
        }
    }
    let trip = Trip::new();
    let inner = Inner::new(&trip);
    let calls = Arc::clone(&inner.calls);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let slow = Slow {
        inner,
        first: Arc::new(Mutex::new(Some(SlowDrop(started_tx, release_rx)))),
    };
    let mut svc = CoalesceLayer::new(by_key).layer(slow);
    let cancelled = svc.call(req(&trip, "k"));
    assert_eq!(calls.load(SeqCst), 1);
    let dropper = std::thread::spawn(move || drop(cancelled));
    started_rx
        .recv_timeout(WAIT)
        .expect("the cancelled call's drop began");
    trip.arm(Site::SvcDrop, 1);
    let gated = svc.call(req(&trip, "k"));
    let follower = svc.call(req(&trip, "k"));
    assert!(gated.is_leader() && follower.is_follower());
    assert_eq!(
        calls.load(SeqCst),
        1,
        "no call while the cancelled one is dropped"
    );
    assert!(
        !trip.fired(),
        "the gated call's clone was dropped in call()"
    );
    release_tx.send(()).unwrap();
    dropper.join().unwrap();
    let (gated, follower) = (tokio::spawn(gated), tokio::spawn(follower));
    for out in [
        bounded("gated", gated).await,
        bounded("follower", follower).await,
    ] {
        let err = out.unwrap().unwrap_err();
        assert!(err.is_panic(), "{err:?}");
    }
    assert!(trip.fired());
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(svc.in_flight(), 0);
    let later = bounded("later", svc.call(req(&trip, "k"))).await.unwrap();
    assert_eq!(later, 3);
}

// ---------------------------------------------------------------------------------------------
// The core: `dropped_after` on every path that returns a waiter
// ---------------------------------------------------------------------------------------------

/// A key whose destructor panics once armed.
struct TrapKey(u8, Arc<Trip>);

impl std::hash::Hash for TrapKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for TrapKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for TrapKey {}

impl Drop for TrapKey {
    fn drop(&mut self) {
        self.1.hit(Site::KeyDrop);
    }
}

/// A lingering hit and a caller over a capacity bound whose key's destructor panics: the
/// panic is the caller's, nobody is left in the flight's slots, the next caller is served.
#[tokio::test(start_paused = true)]
async fn group_key_drop_panic_on_hit_and_over_capacity_paths_strands_nobody() {
    let trip = Trip::new();
    let group = GroupBuilder::new()
        .linger(Duration::from_secs(10))
        .max_followers(1)
        .build::<TrapKey>();
    let first = group.run(TrapKey(1, Arc::clone(&trip)), || async { 10u32 });
    assert_eq!(bounded("first", first).await.unwrap(), 10);
    // A lingering hit.
    trip.arm(Site::KeyDrop, 1);
    let hit = quiet(|| group.run(TrapKey(1, Arc::clone(&trip)), || async { 11u32 }));
    assert!(trip.fired() && hit.is_err());
    let hit = group.run(TrapKey(1, Arc::clone(&trip)), || async { 12u32 });
    assert_eq!(bounded("hit", hit).await.unwrap(), 10);
    // Over `max_followers`: one follower waits, the next caller runs alone.
    let gate = Arc::new(Semaphore::new(0));
    let g = Arc::clone(&gate);
    let leader = group.run(TrapKey(2, Arc::clone(&trip)), move || async move {
        let _p = g.acquire().await.unwrap();
        20u32
    });
    let follower = group.run(TrapKey(2, Arc::clone(&trip)), || async { 21u32 });
    trip.arm(Site::KeyDrop, 1);
    let alone = quiet(|| group.run(TrapKey(2, Arc::clone(&trip)), || async { 22u32 }));
    assert!(trip.fired() && alone.is_err());
    let (leader, follower) = (tokio::spawn(leader), tokio::spawn(follower));
    settle().await;
    gate.add_permits(1);
    assert_eq!(bounded("leader", leader).await.unwrap().unwrap(), 20);
    assert_eq!(bounded("follower", follower).await.unwrap().unwrap(), 20);
    assert_eq!(group.in_flight(), 0);
    tokio::time::advance(Duration::from_secs(11)).await;
    group.purge_expired();
    assert!(group.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Tracing: the flight span, built once and shared by entry, flight state and meta
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "tracing")]
mod traced {
    use super::*;
    use std::collections::HashMap;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::Subscriber;
    use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};

    #[derive(Default, Debug, Clone)]
    struct Span {
        outcome: Option<String>,
        waiters: Option<u64>,
        closed: bool,
    }

    /// The flight spans made on one thread (the process's subscriber sees every test's).
    #[derive(Clone)]
    struct Spans(Arc<Mutex<HashMap<u64, Span>>>, std::thread::ThreadId);

    struct Fields<'a>(&'a mut Span);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "outcome" {
                self.0.outcome = Some(format!("{value:?}").trim_matches('"').to_owned());
            }
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "outcome" {
                self.0.outcome = Some(value.to_owned());
            }
        }
        fn record_u64(&mut self, field: &Field, value: u64) {
            if field.name() == "waiters" {
                self.0.waiters = Some(value);
            }
        }
    }

    impl<S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>>
        tracing_subscriber::Layer<S> for Spans
    {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: LayerContext<'_, S>) {
            if attrs.metadata().name() == "coalesce.flight" && std::thread::current().id() == self.1
            {
                let mut span = Span::default();
                attrs.record(&mut Fields(&mut span));
                self.0.lock().unwrap().insert(id.into_u64(), span);
            }
        }
        fn on_record(&self, id: &Id, values: &Record<'_>, _: LayerContext<'_, S>) {
            if let Some(span) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
                values.record(&mut Fields(span));
            }
        }
        fn on_close(&self, id: Id, _: LayerContext<'_, S>) {
            if let Some(span) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
                span.closed = true;
            }
        }
    }

    impl Spans {
        fn take(&self) -> Vec<Span> {
            self.0.lock().unwrap().drain().map(|(_, s)| s).collect()
        }
    }

    /// One span per flight, closed when it ends, with its outcome and waiters: shared by an
    /// eager flight with a follower, a detached flight whose waiters all left, a flight whose
    /// eager call panicked; none for a call over a capacity bound or a bypass.
    #[test]
    fn eager_detached_and_alone_flights_have_one_closed_span_each() {
        let spans = Spans(Arc::default(), std::thread::current().id());
        let subscriber = tracing_subscriber::registry().with(spans.clone());
        // The process's subscriber, not this thread's: a callsite that another test of this
        // binary registers meanwhile is then never judged against no subscriber at all.
        tracing::subscriber::set_global_default(subscriber).unwrap();
        tracing::callsite::rebuild_interest_cache();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let trip = Trip::new();
            // Eager flight with a follower.
            let mut svc = CoalesceLayer::new(by_key).layer(Inner::new(&trip));
            let (a, b) = (svc.call(req(&trip, "k")), svc.call(req(&trip, "k")));
            assert_eq!(bounded("a", a).await.unwrap(), 1);
            assert_eq!(bounded("b", b).await.unwrap(), 1);
            let got = spans.take();
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(got[0].closed, "{got:?}");
            assert_eq!(got[0].outcome.as_deref(), Some("ok"), "{got:?}");
            assert_eq!(got[0].waiters, Some(2), "{got:?}");
            // Detached, every waiter gone before the call ends.
            let inner = Inner::new(&trip);
            let gate = Arc::clone(&inner.gate);
            gate.forget_permits(Semaphore::MAX_PERMITS);
            let mut svc = CoalesceLayer::new(by_key).detached(true).layer(inner);
            drop((svc.call(req(&trip, "d")), svc.call(req(&trip, "d"))));
            settle().await;
            assert_eq!(svc.in_flight(), 1);
            gate.add_permits(10);
            bounded("detached", async {
                while svc.in_flight() != 0 {
                    tokio::task::yield_now().await;
                }
            })
            .await;
            let got = spans.take();
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(
                got[0].closed && got[0].outcome.as_deref() == Some("ok"),
                "{got:?}"
            );
            // The eager call panicked.
            let mut svc = CoalesceLayer::new(by_key).layer(Inner::new(&trip));
            trip.arm(Site::Call, 1);
            let (a, b) = (svc.call(req(&trip, "p")), svc.call(req(&trip, "p")));
            assert!(bounded("a", a).await.unwrap_err().is_panic());
            assert!(bounded("b", b).await.unwrap_err().is_panic());
            let got = spans.take();
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(got[0].closed, "{got:?}");
            assert_eq!(got[0].outcome.as_deref(), Some("panicked"), "{got:?}");
            // Over a bound, and keyless: no flight, no span.
            let inner = Inner::new(&trip);
            let gate = Arc::clone(&inner.gate);
            gate.forget_permits(Semaphore::MAX_PERMITS);
            let mut svc = CoalesceLayer::new(|r: &Req| (r.key != "skip").then_some(r.key))
                .max_in_flight(1)
                .layer(inner);
            let running = tokio::spawn(svc.call(req(&trip, "x")));
            let alone = svc.call(req(&trip, "y"));
            let skip = svc.call(req(&trip, "skip"));
            assert!(alone.is_alone() && skip.is_bypass());
            gate.add_permits(10);
            bounded("alone", alone).await.unwrap();
            bounded("skip", skip).await.unwrap();
            bounded("running", running).await.unwrap().unwrap();
            let got = spans.take();
            assert_eq!(got.len(), 1, "only the registered flight: {got:?}");
            assert!(got[0].closed, "{got:?}");
        });
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP and gRPC adapters: panics in user destructors (and closures) at every point
// ---------------------------------------------------------------------------------------------

#[cfg(all(feature = "http", feature = "grpc"))]
mod adapters {
    use super::*;
    use bytes::Bytes;
    use http::request::Parts;
    use http::{HeaderMap, Request, Response};
    use http_body::{Body, Frame, SizeHint};
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower_coalesce::grpc::CoalesceGrpcLayer;
    use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

    const GET_ITEM: &str = "/catalog.v1.Catalog/GetItem";

    /// A body whose destructor is user code (`site` of its trip).
    pub(super) struct BombBody {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
        trip: Arc<Trip>,
        site: Site,
    }

    impl Body for BombBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if let Some(data) = self.data.take() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if let Some(trailers) = self.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            Poll::Ready(None)
        }

        fn is_end_stream(&self) -> bool {
            self.data.is_none() && self.trailers.is_none()
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
        }
    }

    impl Drop for BombBody {
        fn drop(&mut self) {
            self.trip.hit(self.site);
        }
    }

    /// The owner of an identity's bytes: its destructor runs when the key is dropped.
    struct Owner(Arc<Trip>);

    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            b"user-1"
        }
    }

    impl Drop for Owner {
        fn drop(&mut self) {
            self.0.hit(Site::KeyDrop);
        }
    }

    fn identity(trip: &Arc<Trip>) -> impl Fn(&Parts) -> Option<Bytes> + Send + Sync + 'static {
        let trip = Arc::clone(trip);
        move |_: &Parts| {
            trip.hit(Site::Identity);
            Some(Bytes::from_owner(Owner(Arc::clone(&trip))))
        }
    }

    /// gRPC's length-prefixed message.
    fn lpm(payload: &[u8]) -> Bytes {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        framed.extend_from_slice(payload);
        framed.into()
    }

    /// The inner service: `Clone` and `Drop` are user code; each call waits at `gate`, then
    /// answers `v<n>` (the n-th call) with a body whose destructor is user code.
    struct Backend {
        trip: Arc<Trip>,
        gate: Arc<Semaphore>,
        calls: Arc<AtomicUsize>,
        grpc: bool,
    }

    impl Backend {
        fn new(trip: &Arc<Trip>, grpc: bool) -> Self {
            Backend {
                trip: Arc::clone(trip),
                gate: Arc::new(Semaphore::new(0)),
                calls: Arc::new(AtomicUsize::new(0)),
                grpc,
            }
        }
    }

    impl Clone for Backend {
        fn clone(&self) -> Self {
            self.trip.hit(Site::SvcClone);
            Backend {
                trip: Arc::clone(&self.trip),
                gate: Arc::clone(&self.gate),
                calls: Arc::clone(&self.calls),
                grpc: self.grpc,
            }
        }
    }

    impl Drop for Backend {
        fn drop(&mut self) {
            self.trip.hit(Site::SvcDrop);
        }
    }

    impl<B: Send + 'static> Service<Request<B>> for Backend {
        type Response = Response<BombBody>;
        type Error = Infallible;
        type Future = BoxFut<Result<Response<BombBody>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<B>) -> Self::Future {
            let n = self.calls.fetch_add(1, SeqCst) + 1;
            let (gate, trip, grpc) = (Arc::clone(&self.gate), Arc::clone(&self.trip), self.grpc);
            Box::pin(async move {
                let _permit = gate.acquire().await.unwrap();
                drop(req);
                let text = format!("v{n}");
                let (data, trailers) = match grpc {
                    true => {
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", "0".parse().unwrap());
                        (lpm(text.as_bytes()), Some(t))
                    }
                    false => (Bytes::from(text), None),
                };
                let body = BombBody {
                    data: Some(data),
                    trailers,
                    trip,
                    site: Site::ResBodyDrop,
                };
                let res = Response::builder()
                    .header("cache-control", "max-age=60")
                    .header(
                        "content-type",
                        if grpc {
                            "application/grpc"
                        } else {
                            "text/plain"
                        },
                    )
                    .body(body)
                    .unwrap();
                Ok(res)
            })
        }
    }

    fn http_request(trip: &Arc<Trip>) -> Request<BombBody> {
        Request::get("/item")
            .body(BombBody {
                data: None,
                trailers: None,
                trip: Arc::clone(trip),
                site: Site::ReqDrop,
            })
            .unwrap()
    }

    fn grpc_request(trip: &Arc<Trip>) -> Request<BombBody> {
        Request::post(GET_ITEM)
            .header("content-type", "application/grpc")
            .body(BombBody {
                data: Some(Bytes::from_static(b"\0\0\0\0\x01a")),
                trailers: None,
                trip: Arc::clone(trip),
                site: Site::ReqDrop,
            })
            .unwrap()
    }

    /// Reads a response whole: who served it, and its body.
    async fn read<B: Body<Data = Bytes>>(res: Response<B>) -> (ServedBy, Bytes)
    where
        B::Error: std::fmt::Debug,
    {
        let served = *res.extensions().get::<ServedBy>().expect("ServedBy");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (served, body)
    }

    const SITES: [Site; 6] = [
        Site::SvcClone,
        Site::SvcDrop,
        Site::ReqDrop,
        Site::ResBodyDrop,
        Site::Identity,
        Site::KeyDrop,
    ];

    type Task = tokio::task::JoinHandle<(ServedBy, Bytes)>;
    /// Calls the adapter's service and spawns the response's reading.
    type Caller = Box<dyn FnMut(Request<BombBody>) -> Task>;
    /// The adapter's `(in_flight(), waiting())`.
    type Gauges = Box<dyn Fn() -> (usize, usize)>;

    /// Variants: 0 plain, 1 detached, 2 `max_followers(1)` (the third request runs alone),
    /// 3 the leader's task aborted while its call waits.
    const VARIANTS: u8 = 4;

    /// Three requests for one key, with user code panicking at the `at`-th event of `site`;
    /// then every task ends, the registry is empty, nobody waits, and a later request for the
    /// key makes a new call. Returns whether the panic happened.
    async fn scenario(grpc: bool, site: Site, at: usize, variant: u8) -> bool {
        let what = format!("grpc={grpc} {site:?}#{at} variant {variant}");
        let trip = Trip::new();
        let backend = Backend::new(&trip, grpc);
        let (calls, gate) = (Arc::clone(&backend.calls), Arc::clone(&backend.gate));
        let request = |trip: &Arc<Trip>| match grpc {
            true => grpc_request(trip),
            false => http_request(trip),
        };
        let mut tasks: Vec<Task> = Vec::new();
        // Each adapter's own service, behind one interface: `call` and the gauges.
        let (mut call, gauges): (Caller, Gauges) = if grpc {
            let layer = CoalesceGrpcLayer::new()
                .method(GET_ITEM)
                .identity(identity(&trip));
            let layer = match variant {
                1 => layer.detached(true),
                2 => layer.max_followers(1),
                _ => layer,
            };
            let svc = layer.layer(backend);
            let probe = svc.clone();
            let mut svc = svc;
            (
                Box::new(move |req| {
                    let fut = svc.call(req);
                    tokio::spawn(async move { read(fut.await.unwrap()).await })
                }),
                Box::new(move || (probe.in_flight(), probe.waiting())),
            )
        } else {
            let layer = CoalesceHttpLayer::new().identity(identity(&trip));
            let layer = match variant {
                1 => layer.detached(true),
                2 => layer.max_followers(1),
                _ => layer,
            };
            let svc = layer.layer(backend);
            let probe = svc.clone();
            let mut svc = svc;
            (
                Box::new(move |req| {
                    let fut = svc.call(req);
                    tokio::spawn(async move { read(fut.await.unwrap()).await })
                }),
                Box::new(move || (probe.in_flight(), probe.waiting())),
            )
        };
        trip.arm(site, at);
        for _ in 0..3 {
            let req = request(&trip);
            if let Ok(task) = quiet(|| call(req)) {
                tasks.push(task);
            }
            // gRPC joins its flight when polled (after reading the message).
            settle().await;
        }
        if variant == 3 {
            if let Some(leader) = tasks.first() {
                leader.abort();
            }
            settle().await;
        }
        gate.add_permits(1000);
        for task in tasks {
            let _ = bounded(&what, task).await;
        }
        settle().await;
        let fired = trip.fired();
        trip.disarm();
        assert_eq!(
            gauges(),
            (0, 0),
            "{what}: (in_flight, waiting) after every task ended"
        );
        let before = calls.load(SeqCst);
        let later = call(request(&trip));
        let (served, body) = bounded(&what, later).await.unwrap();
        assert_eq!(served, ServedBy::Leader, "{what}");
        let expected = format!("v{}", before + 1);
        let expected = match grpc {
            true => lpm(expected.as_bytes()),
            false => Bytes::from(expected),
        };
        assert_eq!(body, expected, "{what}: a new call for the later request");
        assert_eq!(gauges(), (0, 0), "{what}");
        fired
    }

    async fn sweep(grpc: bool) {
        for site in SITES {
            for variant in 0..VARIANTS {
                let mut fired = 0;
                for at in 1..=4 {
                    fired += usize::from(scenario(grpc, site, at, variant).await);
                }
                assert!(
                    fired >= 1,
                    "grpc={grpc} {site:?} variant {variant}: never panicked"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn http_user_code_panic_at_every_point_strands_nobody() {
        sweep(false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_user_code_panic_at_every_point_strands_nobody() {
        sweep(true).await;
    }

    // -----------------------------------------------------------------------------------------
    // The strict directive-list reader: valid values are read as before
    // -----------------------------------------------------------------------------------------

    type Plain = Request<Full<Bytes>>;

    /// A gated backend answering with `headers`; counts its calls.
    #[allow(clippy::type_complexity)]
    fn plain_backend<RB: Send + 'static>(
        headers: &'static [(&'static str, &'static str)],
        grpc: bool,
    ) -> (
        impl Service<
                Request<RB>,
                Response = Response<Full<Bytes>>,
                Error = Infallible,
                Future = impl Send + 'static,
            > + Clone
            + Send
            + 'static,
        Arc<Semaphore>,
        Arc<AtomicUsize>,
    ) {
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let (g, c) = (Arc::clone(&gate), Arc::clone(&calls));
        let svc = tower::service_fn(move |_: Request<RB>| {
            let (g, c) = (Arc::clone(&g), Arc::clone(&c));
            async move {
                let n = c.fetch_add(1, SeqCst) + 1;
                let _permit = g.acquire().await.unwrap();
                let mut res = Response::builder();
                for (name, value) in headers {
                    res = res.header(*name, *value);
                }
                let body = match grpc {
                    true => {
                        res = res
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "0");
                        lpm(format!("v{n}").as_bytes())
                    }
                    false => Bytes::from(format!("v{n}")),
                };
                Ok::<_, Infallible>(res.body(Full::new(body)).unwrap())
            }
        });
        (svc, gate, calls)
    }

    fn plain_request(grpc: bool, headers: &[(&str, &str)]) -> Plain {
        let mut req = match grpc {
            true => Request::post(GET_ITEM).header("content-type", "application/grpc"),
            false => Request::get("/item"),
        };
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let body = match grpc {
            true => Bytes::from_static(b"\0\0\0\0\x01a"),
            false => Bytes::new(),
        };
        req.body(Full::new(body)).unwrap()
    }

    /// Two requests with `req_headers` against a response with `res_headers`: how the second
    /// was served, and the backend's calls.
    async fn pair(
        grpc: bool,
        req_headers: &[(&str, &str)],
        res_headers: &'static [(&'static str, &'static str)],
    ) -> (ServedBy, usize) {
        let mut tasks = Vec::new();
        let (gate, calls) = if grpc {
            let (backend, gate, calls) = plain_backend(res_headers, grpc);
            let mut svc = CoalesceGrpcLayer::new().method(GET_ITEM).layer(backend);
            for _ in 0..2 {
                let fut = svc.call(plain_request(grpc, req_headers));
                tasks.push(tokio::spawn(async move { read(fut.await.unwrap()).await }));
                settle().await;
            }
            (gate, calls)
        } else {
            let (backend, gate, calls) = plain_backend(res_headers, grpc);
            let mut svc = CoalesceHttpLayer::new().layer(backend);
            for _ in 0..2 {
                let fut = svc.call(plain_request(grpc, req_headers));
                tasks.push(tokio::spawn(async move { read(fut.await.unwrap()).await }));
                settle().await;
            }
            (gate, calls)
        };
        gate.add_permits(10);
        let mut served = Vec::new();
        for task in tasks {
            served.push(bounded("pair", task).await.unwrap().0);
        }
        (served[1], calls.load(SeqCst))
    }

    /// Real-world `Cache-Control` values, well formed (RFC 9110 §5.6, RFC 9111 §5.2): tabs,
    /// empty elements, quoted arguments with commas. On a response, shared as before.
    #[tokio::test(start_paused = true)]
    async fn valid_response_cache_control_is_still_shared() {
        const VALUES: [&[(&str, &str)]; 10] = [
            &[("cache-control", "public, max-age=31536000, immutable")],
            &[("cache-control", "s-maxage=60, stale-while-revalidate=30")],
            &[("cache-control", "max-age=600,\tmust-revalidate")],
            &[("cache-control", "public,max-age=60")],
            &[("cache-control", ", , public,, max-age=60 ,")],
            &[("cache-control", "max-age=\"60\"")],
            &[("cache-control", "max-age=60, ext=\"private, no-store\"")],
            &[(
                "cache-control",
                "must-revalidate, max-age=600, proxy-revalidate, no-transform",
            )],
            &[(
                "cache-control",
                "max-age=60, stale-if-error=86400, ext=\"a \\\" b\"",
            )],
            &[
                ("cache-control", "public"),
                ("cache-control", "max-age=60"),
                ("pragma", "x-akamai, x-y=\"1\""),
            ],
        ];
        for value in VALUES {
            assert_eq!(
                pair(false, &[], value).await,
                (ServedBy::Follower, 1),
                "{value:?}"
            );
        }
        // The reader still finds the directives it must (the test tells them apart).
        const PERSONAL: [&[(&str, &str)]; 3] = [
            &[("cache-control", "public, max-age=60, private")],
            &[("cache-control", "max-age=60,\tno-store")],
            &[("cache-control", "no-cache=\"Set-Cookie\", max-age=60")],
        ];
        for value in PERSONAL {
            assert_eq!(
                pair(false, &[], value).await,
                (ServedBy::Released, 2),
                "{value:?}"
            );
        }
    }

    /// On a request (HTTP and gRPC): a browser reload's `max-age=0` and other valid values
    /// that ask for no fresh answer still join the flight; `no-cache` / `no-store` still do not.
    #[tokio::test(start_paused = true)]
    async fn valid_request_cache_control_still_joins() {
        const OK: &[(&str, &str)] = &[("cache-control", "max-age=60")];
        const GRPC_OK: &[(&str, &str)] = &[];
        let values: [&[(&str, &str)]; 11] = [
            &[("cache-control", "max-age=0")],
            &[("cache-control", "max-age=0, must-revalidate")],
            &[("cache-control", "public, max-age=31536000, immutable")],
            &[("cache-control", "s-maxage=60, stale-while-revalidate=30")],
            &[("cache-control", "max-stale,\tmin-fresh=10")],
            &[("cache-control", ",, only-if-cached ,")],
            &[("cache-control", "stale-if-error=86400, ext=\"no-cache, x\"")],
            &[("cache-control", "max-age = 0")],
            &[("cache-control", "")],
            &[("pragma", "akamai-x-cache-on, akamai-x-get-cache-key")],
            &[("connection", "keep-alive, TE"), ("te", "trailers")],
        ];
        for grpc in [false, true] {
            let res = if grpc { GRPC_OK } else { OK };
            for value in values {
                if grpc && value[0].0 == "connection" {
                    continue;
                }
                let got = pair(grpc, value, res).await;
                assert_eq!(got, (ServedBy::Follower, 1), "grpc={grpc} {value:?}");
            }
            for value in [
                &[("cache-control", "max-age=0, no-cache")][..],
                &[("cache-control", "no-store,\tmax-age=0")][..],
                &[("pragma", "no-cache")][..],
            ] {
                let got = pair(grpc, value, res).await;
                assert_eq!(got, (ServedBy::Bypass, 2), "grpc={grpc} {value:?}");
            }
        }
    }
}
