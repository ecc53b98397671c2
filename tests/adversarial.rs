//! Adversarial black-box tests: the contract of DESIGN.md pushed through the public API only,
//! in compositions and orders the other suites do not try (tower_test mocks polled by hand,
//! counting wakers, tower's Timeout/Buffer/Retry/ConcurrencyLimit around and below the layer,
//! hostile keys, forget racing cancellation, HTTP bodies that stall or fail mid-buffering).
//!
//! Deterministic: time is paused, backends wait on semaphores or mock handles, and progress is
//! observed through counters; every wait is bounded so a hang fails instead of stalling.

use std::convert::Infallible;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::Semaphore;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_coalesce::{CoalesceLayer, Group, GroupBuilder};
use tower_layer::Layer;
use tower_test::mock;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Virtual-time bound on any wait: a hang (no busy loop) auto-advances the paused clock here.
const LIMIT: Duration = Duration::from_secs(24 * 3600);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// A waker that counts its wake-ups.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

fn counting_waker() -> (Arc<CountingWaker>, Waker) {
    let count = Arc::new(CountingWaker::default());
    (count.clone(), Waker::from(count))
}

fn poll_with<F: Future + ?Sized>(f: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(waker))
}

/// A gate backends wait on: closed until `open`.
#[derive(Clone)]
struct Gate(Arc<Semaphore>);

impl Gate {
    fn new() -> Self {
        Gate(Arc::new(Semaphore::new(0)))
    }
    async fn pass(&self) {
        self.0.acquire().await.unwrap().forget();
    }
    fn open(&self) {
        self.0.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

/// Sets its flag when dropped: tells whether a backend call's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// A backend that counts its calls; call `n` (from 1) answers `k#n` once `wait()` is done.
fn counting_backend<W, Fut>(
    wait: W,
) -> (
    impl Service<&'static str, Response = String, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
)
where
    W: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = service_fn(move |k: &'static str| {
        let n = c.fetch_add(1, SeqCst) + 1;
        let waited = wait();
        async move {
            waited.await;
            Ok::<_, Infallible>(format!("{k}#{n}"))
        }
    });
    (svc, calls)
}

/// A [`counting_backend`] whose calls wait on `gate`.
fn gated_backend(
    gate: &Gate,
) -> (
    impl Service<&'static str, Response = String, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
) {
    let gate = gate.clone();
    counting_backend(move || {
        let gate = gate.clone();
        async move { gate.pass().await }
    })
}

fn by_str(k: &&'static str) -> Option<&'static str> {
    Some(*k)
}

// ---------------------------------------------------------------------------------------------
// Core / tower layer
// ---------------------------------------------------------------------------------------------

/// Rule 6: a parked follower is woken exactly once, by publication; never by the leader's own
/// progress, never by being polled again.
#[tokio::test]
async fn follower_waker_fires_once_on_publication_only() {
    let (mock, mut handle) = mock::pair::<&'static str, String>();
    let mut svc = CoalesceLayer::new(by_str).layer(mock);
    let mut leader = Box::pin(svc.call("k"));
    let mut follower = Box::pin(svc.call("k"));
    assert!(leader.is_leader() && follower.is_follower());
    let (follower_wakes, follower_waker) = counting_waker();
    let (_, leader_waker) = counting_waker();
    for _ in 0..5 {
        assert!(poll_with(follower.as_mut(), &follower_waker).is_pending());
    }
    assert!(poll_with(leader.as_mut(), &leader_waker).is_pending());
    let (req, send) = bounded("request", handle.next_request()).await.unwrap();
    assert_eq!(req, "k");
    for _ in 0..5 {
        assert!(poll_with(leader.as_mut(), &leader_waker).is_pending());
        assert!(poll_with(follower.as_mut(), &follower_waker).is_pending());
    }
    assert_eq!(follower_wakes.0.load(SeqCst), 0, "woken before publication");
    send.send_response("v".into());
    match poll_with(leader.as_mut(), &leader_waker) {
        Poll::Ready(r) => assert_eq!(r.unwrap(), "v"),
        Poll::Pending => panic!("leader not ready after the response"),
    }
    assert_eq!(
        follower_wakes.0.load(SeqCst),
        1,
        "woken once by publication"
    );
    match poll_with(follower.as_mut(), &follower_waker) {
        Poll::Ready(r) => assert_eq!(r.unwrap(), "v"),
        Poll::Pending => panic!("follower not ready after being woken"),
    }
    assert!(handle.poll_request().is_pending(), "one backend call");
    assert_eq!(svc.in_flight(), 0);
}

/// Rule 4: the leader is dropped after the backend answered but before it polled that answer;
/// the followers still get it, and the backend is not called again.
#[tokio::test(start_paused = true)]
async fn leader_dropped_with_its_answer_unread_followers_get_it() {
    let (mock, mut handle) = mock::pair::<&'static str, String>();
    let mut svc = CoalesceLayer::new(by_str).layer(mock);
    let mut leader = Box::pin(svc.call("k"));
    let (_, waker) = counting_waker();
    assert!(poll_with(leader.as_mut(), &waker).is_pending());
    let followers: Vec<_> = (0..3).map(|_| svc.call("k")).collect();
    let (_, send) = bounded("request", handle.next_request()).await.unwrap();
    send.send_response("answer".into());
    drop(leader);
    for r in bounded("followers", join_all(followers)).await {
        assert_eq!(r.unwrap(), "answer");
    }
    assert!(handle.poll_request().is_pending(), "no second backend call");
    assert_eq!((svc.in_flight(), svc.group().len()), (0, 0));
}

/// Rule 2: once the leader has its result, a newcomer starts a new flight even while earlier
/// followers have not picked theirs up yet; each gets its own flight's answer.
#[tokio::test(start_paused = true)]
async fn newcomer_after_publish_with_unpolled_followers_starts_a_new_flight() {
    let (mock, mut handle) = mock::pair::<&'static str, String>();
    let mut svc = CoalesceLayer::new(by_str).layer(mock);
    let mut leader = Box::pin(svc.call("k"));
    let old_follower = svc.call("k");
    let (_, waker) = counting_waker();
    assert!(poll_with(leader.as_mut(), &waker).is_pending());
    let (_, send) = bounded("first", handle.next_request()).await.unwrap();
    send.send_response("first".into());
    assert_eq!(bounded("leader", leader).await.unwrap(), "first");
    let newcomer = svc.call("k");
    assert!(newcomer.is_leader(), "joined a published flight");
    let newcomer = tokio::spawn(newcomer);
    let (_, send) = bounded("second", handle.next_request()).await.unwrap();
    send.send_response("second".into());
    assert_eq!(bounded("old", old_follower).await.unwrap(), "first");
    assert_eq!(
        bounded("new", newcomer).await.unwrap().unwrap(),
        "second".to_string()
    );
    assert_eq!(svc.in_flight(), 0);
}

/// Rule 4 through tower's `Timeout` above the layer: the leader's short deadline ends only
/// the leader; a follower with a longer one gets the one backend call's answer.
#[tokio::test(start_paused = true)]
async fn timeout_above_the_layer_cuts_only_the_impatient_leader() {
    let gate = Gate::new();
    let (backend, calls) = gated_backend(&gate);
    let svc = CoalesceLayer::new(by_str).layer(backend);
    let mut short = tower::timeout::Timeout::new(svc.clone(), Duration::from_secs(1));
    let mut long = tower::timeout::Timeout::new(svc.clone(), Duration::from_secs(3600));
    let leader = short.ready().await.unwrap().call("k");
    let follower = long.ready().await.unwrap().call("k");
    let leader = tokio::spawn(leader);
    let follower = tokio::spawn(follower);
    let err = bounded("leader", leader).await.unwrap().unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    gate.open();
    assert_eq!(bounded("follower", follower).await.unwrap().unwrap(), "k#1");
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(svc.in_flight(), 0);
}

/// Rule 3 through tower's `Timeout` below the layer: the timeout error is shared by every
/// waiter (reachable by downcast), and the key is free for a new call afterwards.
#[tokio::test(start_paused = true)]
async fn timeout_below_the_layer_is_one_shared_error() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let backend = service_fn(move |k: &'static str| {
        let n = c.fetch_add(1, SeqCst) + 1;
        async move {
            if n == 1 {
                std::future::pending::<()>().await;
            }
            Ok::<_, Infallible>(format!("{k}#{n}"))
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(by_str))
        .timeout(Duration::from_secs(5))
        .service(backend);
    let waiters: Vec<_> = (0..5).map(|_| svc.call("k")).collect();
    let errors: Vec<_> = bounded("waiters", join_all(waiters)).await;
    let first = errors[0].as_ref().unwrap_err();
    let elapsed: *const _ = first
        .downcast_ref::<tower::timeout::error::Elapsed>()
        .expect("the timeout error is reachable");
    for e in &errors {
        let e = e.as_ref().unwrap_err();
        assert!(!e.is_panic() && !e.is_timeout());
        let same = e.downcast_ref::<tower::timeout::error::Elapsed>().unwrap();
        assert!(std::ptr::eq(same, elapsed), "one error shared by all");
    }
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(bounded("again", svc.call("k")).await.unwrap(), "k#2");
}

/// A [`counting_backend`] whose calls take a second of (paused, virtual) time, which passes
/// only once every task is idle.
fn sleeping_backend() -> (
    impl Service<&'static str, Response = String, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
) {
    counting_backend(|| tokio::time::sleep(Duration::from_secs(1)))
}

/// Composition: `Buffer` above and below the layer still makes one backend call per key.
#[tokio::test(start_paused = true)]
async fn buffers_above_and_below_still_coalesce() {
    let (backend, calls) = sleeping_backend();
    let svc = ServiceBuilder::new()
        .buffer(64)
        .layer(CoalesceLayer::new(by_str))
        .buffer(2)
        .service(backend);
    let waiters: Vec<_> = (0..20)
        .map(|i| tokio::spawn(svc.clone().oneshot(if i % 2 == 0 { "a" } else { "b" })))
        .collect();
    let mut answers: Vec<String> = Vec::new();
    for w in waiters {
        answers.push(bounded("waiter", w).await.unwrap().unwrap());
    }
    assert_eq!(calls.load(SeqCst), 2, "{answers:?}");
    let a = &answers[0];
    let b = &answers[1];
    assert!(a.starts_with("a#") && b.starts_with("b#"));
    for (i, x) in answers.iter().enumerate() {
        assert_eq!(x, if i % 2 == 0 { a } else { b });
    }
}

/// A `tower::retry` policy that retries each request once on error.
#[derive(Clone)]
struct RetryOnce(bool);

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for RetryOnce {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        if result.is_err() && !self.0 {
            self.0 = true;
            Some(std::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// Rules 2 and 3 under tower's `Retry` above the layer: a failed flight is never joined
/// again; the retries of its waiters form one new flight.
#[tokio::test(start_paused = true)]
async fn retry_above_the_layer_retries_as_one_new_flight() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let backend = service_fn(move |k: &'static str| {
        let n = c.fetch_add(1, SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match n {
                1 => Err::<String, BoxError>("flaky".into()),
                _ => Ok(format!("{k}#{n}")),
            }
        }
    });
    let svc = CoalesceLayer::new(by_str).layer(backend);
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let retrying = tower::retry::Retry::new(RetryOnce(false), svc.clone());
            tokio::spawn(retrying.oneshot("k"))
        })
        .collect();
    for w in waiters {
        assert_eq!(bounded("waiter", w).await.unwrap().unwrap(), "k#2");
    }
    assert_eq!(
        calls.load(SeqCst),
        2,
        "one failed flight, one retried flight"
    );
    let stats = svc.stats();
    assert_eq!((stats.leaders, stats.errors, stats.in_flight), (2, 1, 0));
}

/// Rules 1 and 6: with `ConcurrencyLimit(1)` below the layer, a second hot key's flight waits
/// for the permit while still gathering its followers; one backend call per key.
#[tokio::test(start_paused = true)]
async fn concurrency_limit_one_below_with_two_hot_keys() {
    let (backend, calls) = sleeping_backend();
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(by_str))
        .concurrency_limit(1)
        .service(backend);
    let waiters: Vec<_> = (0..10)
        .map(|i| tokio::spawn(svc.clone().oneshot(if i < 5 { "a" } else { "b" })))
        .collect();
    let mut answers = Vec::new();
    for w in waiters {
        answers.push(bounded("waiter", w).await.unwrap().unwrap());
    }
    assert_eq!(calls.load(SeqCst), 2, "{answers:?}");
    assert!(answers[..5].iter().all(|a| a.starts_with("a#")));
    assert!(answers[5..].iter().all(|a| a.starts_with("b#")));
    let stats = svc.stats();
    assert_eq!((stats.leaders, stats.followers, stats.in_flight), (2, 8, 0));
}

/// Rules 5 and 8: a key extractor that panics takes down only its own `call`; the running
/// flight, the registry and later requests are unaffected.
#[tokio::test(start_paused = true)]
async fn panicking_key_extractor_leaves_the_registry_usable() {
    let gate = Gate::new();
    let (backend, calls) = gated_backend(&gate);
    let mut svc = CoalesceLayer::new(|k: &&'static str| {
        if *k == "boom" {
            panic!("extractor exploded");
        }
        Some(*k)
    })
    .layer(backend);
    let leader = svc.call("k");
    let panicked = catch_unwind(AssertUnwindSafe(|| drop(svc.call("boom"))));
    assert!(panicked.is_err());
    let follower = svc.call("k");
    assert!(follower.is_follower(), "the registry still coalesces");
    gate.open();
    let (a, b) = bounded("waiters", async { tokio::join!(leader, follower) }).await;
    assert_eq!((a.unwrap(), b.unwrap()), ("k#1".into(), "k#1".into()));
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(bounded("again", svc.call("k")).await.unwrap(), "k#2");
    assert_eq!((svc.in_flight(), svc.group().len()), (0, 0));
}

/// A key whose `Eq` panics when either side is marked: its `Hash` ignores the mark, so the
/// registry must compare it with the stored key of the same id.
#[derive(Clone, Debug)]
struct Touchy {
    id: u32,
    explode: bool,
}

impl Hash for Touchy {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl PartialEq for Touchy {
    fn eq(&self, other: &Self) -> bool {
        if self.explode || other.explode {
            panic!("key Eq exploded");
        }
        self.id == other.id
    }
}

impl Eq for Touchy {}

/// Rules 5 and 8: a key `Eq` that panics inside the registry's lookup does not poison the
/// registry: the running flight finishes for its waiters and the key is reusable.
#[tokio::test(start_paused = true)]
async fn panicking_key_eq_does_not_poison_the_registry() {
    let gate = Gate::new();
    let (backend, calls) = gated_backend(&gate);
    let mut svc = CoalesceLayer::new(|k: &&'static str| {
        Some(Touchy {
            id: 1,
            explode: *k == "boom",
        })
    })
    .layer(backend);
    let leader = svc.call("k");
    assert!(catch_unwind(AssertUnwindSafe(|| drop(svc.call("boom")))).is_err());
    let follower = svc.call("k");
    assert!(follower.is_follower());
    gate.open();
    let (a, b) = bounded("waiters", async { tokio::join!(leader, follower) }).await;
    assert_eq!((a.unwrap(), b.unwrap()), ("k#1".into(), "k#1".into()));
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(bounded("again", svc.call("k")).await.unwrap(), "k#2");
    assert_eq!((svc.in_flight(), svc.group().len()), (0, 0));
}

/// A key whose destructor panics once armed.
struct Bomb {
    id: u32,
    armed: Arc<AtomicBool>,
}

impl Hash for Bomb {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl PartialEq for Bomb {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Bomb {}

impl Drop for Bomb {
    fn drop(&mut self) {
        if self.armed.swap(false, SeqCst) && !std::thread::panicking() {
            panic!("key destructor exploded");
        }
    }
}

/// Rule 5 ("nobody hangs"): a key destructor that panics when the driver unregisters the
/// flight must not leave the flight's followers parked for ever: they are served first, and
/// the panic is the driver's alone.
#[tokio::test(start_paused = true)]
async fn panicking_key_destructor_does_not_strand_followers() {
    let group: Group<Bomb> = Group::new();
    let armed = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();
    let key = || Bomb {
        id: 7,
        armed: armed.clone(),
    };
    let g = gate.clone();
    let leader = group.run(key(), move || async move {
        g.pass().await;
        5u32
    });
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(group.run(key(), || async { 0u32 })))
        .collect();
    // Every follower has joined (and its own key was dropped): the only live key is the
    // registry's copy, dropped by the driver when it unregisters the flight.
    tokio::task::yield_now().await;
    assert_eq!(group.stats().followers, 3);
    armed.store(true, SeqCst);
    gate.open();
    let leader = tokio::spawn(leader);
    let led = bounded("leader", leader).await;
    assert!(
        led.unwrap_err().is_panic(),
        "the key's panic is the driver's"
    );
    for f in followers {
        assert_eq!(bounded("follower", f).await.unwrap().unwrap(), 5);
    }
    assert!(group.is_empty());
    // The key is usable again.
    assert_eq!(group.run(key(), || async { 6u32 }).await.unwrap(), 6);
}

/// Rules 5 and 7: an expired lingering entry is dropped by the next call of its shard; if its
/// key's destructor panics there, that call panics, but leaves no flight registered without a
/// waiter (which would hang every later caller of the key).
#[tokio::test(start_paused = true)]
async fn panicking_expired_key_leaves_no_orphan_flight() {
    let group: Group<Bomb> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
    let armed = Arc::new(AtomicBool::new(false));
    let kept = Bomb {
        id: 7,
        armed: armed.clone(),
    };
    assert_eq!(group.run(kept, || async { 1u32 }).await.unwrap(), 1);
    assert_eq!(group.len(), 1, "the output lingers");
    armed.store(true, SeqCst);
    tokio::time::advance(Duration::from_secs(2)).await;
    let calm = || Bomb {
        id: 7,
        armed: Arc::new(AtomicBool::new(false)),
    };
    let caught = catch_unwind(AssertUnwindSafe(|| group.run(calm(), || async { 2u32 })));
    assert!(
        caught.is_err(),
        "the expired key's panic reaches the caller that purged it"
    );
    assert_eq!(group.in_flight(), 0, "its flight went with it");
    let again = bounded("a later caller", group.run(calm(), || async { 3u32 })).await;
    assert_eq!(again.unwrap(), 3);
}

/// Rules 4 and 7: `forget` on a running flight, then every waiter leaves: the backend call is
/// dropped, the entry removed once, and a newer flight of the key is untouched.
#[tokio::test(start_paused = true)]
async fn forget_then_cancel_frees_the_entry_without_touching_the_new_flight() {
    let group: Group<&'static str> = Group::new();
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(dropped.clone());
    let old_leader = group.run("k", move || async move {
        let _flag = flag;
        std::future::pending::<u32>().await
    });
    let old_follower = group.run("k", || async { 0u32 });
    assert!(group.forget("k"));
    let gate = Gate::new();
    let g = gate.clone();
    let new_leader = group.run("k", move || async move {
        g.pass().await;
        2u32
    });
    assert!(new_leader.is_leader());
    let new_follower = group.run("k", || async { 0u32 });
    assert!(!new_follower.is_leader(), "joins the new flight");
    assert_eq!(group.len(), 2);
    drop(old_leader);
    assert!(!dropped.load(SeqCst), "a follower still waits");
    drop(old_follower);
    assert!(
        dropped.load(SeqCst),
        "last waiter gone: the call is dropped"
    );
    assert_eq!(group.len(), 1, "only the new flight is left");
    gate.open();
    let (a, b) = bounded("new flight", async {
        tokio::join!(new_leader, new_follower)
    })
    .await;
    assert_eq!((a.unwrap(), b.unwrap()), (2, 2));
    assert!(group.is_empty());
    let stats = group.stats();
    assert_eq!(
        (stats.in_flight, stats.cancelled, stats.forgotten),
        (0, 1, 1)
    );
}

/// Rule 7 (exact accounting): under `max_in_flight(1)`, a forgotten flight gives its place up
/// once: when it later finishes, it does not give it up again.
#[tokio::test(start_paused = true)]
async fn forget_gives_up_a_max_in_flight_place_exactly_once() {
    let group: Group<&'static str> = GroupBuilder::new().max_in_flight(1).build();
    let (gate_a, gate_b) = (Gate::new(), Gate::new());
    let g = gate_a.clone();
    let a = group.run("a", move || async move {
        g.pass().await;
        1u32
    });
    assert!(a.is_leader() && !a.is_alone());
    assert!(group.forget("a"));
    let g = gate_b.clone();
    let b = group.run("b", move || async move {
        g.pass().await;
        2u32
    });
    assert!(!b.is_alone(), "the forgotten flight gave its place up");
    gate_a.open();
    assert_eq!(bounded("a", a).await.unwrap(), 1);
    let c = group.run("c", || async { 3u32 });
    assert!(c.is_alone(), "b still holds the only place");
    assert_eq!(bounded("c", c).await.unwrap(), 3);
    gate_b.open();
    assert_eq!(bounded("b", b).await.unwrap(), 2);
    let d = group.run("d", || async { 4u32 });
    assert!(!d.is_alone(), "the place is free again, counted once");
    assert_eq!(bounded("d", d).await.unwrap(), 4);
    assert!(group.is_empty());
    assert_eq!(group.in_flight(), 0);
}

/// Rule 2: a zero linger window keeps nothing: the next caller, at the same instant, starts
/// a new flight rather than getting the published output.
#[tokio::test(start_paused = true)]
async fn zero_linger_window_serves_nothing_stale() {
    let group: Group<&'static str> = GroupBuilder::new().linger(Duration::ZERO).build();
    let calls = Arc::new(AtomicUsize::new(0));
    let call = || {
        let calls = calls.clone();
        move || async move { calls.fetch_add(1, SeqCst) + 1 }
    };
    assert_eq!(bounded("first", group.run("k", call())).await.unwrap(), 1);
    let second = group.run("k", call());
    assert!(second.is_leader(), "served a zero-window output");
    assert_eq!(bounded("second", second).await.unwrap(), 2);
    group.purge_expired();
    assert!(group.is_empty());
}

/// What a [`Hooked`] output's next clone runs.
type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// An output whose `Clone` runs a hook, once, while its lingering copy is taken out.
struct Hooked {
    hook: Hook,
}

impl Clone for Hooked {
    fn clone(&self) -> Self {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        Hooked {
            hook: self.hook.clone(),
        }
    }
}

/// A group whose output for "k" lingers, and the hook its next clone runs.
fn lingering_hooked() -> (Group<&'static str>, Hook) {
    let group: Group<&'static str> = GroupBuilder::new()
        .linger(Duration::from_secs(3600))
        .build();
    let hook: Hook = Arc::new(Mutex::new(None));
    let value = Hooked { hook: hook.clone() };
    let first = futures::executor::block_on(group.run("k", move || async move { value }));
    assert!(first.is_ok());
    assert_eq!(
        (group.in_flight(), group.len()),
        (0, 1),
        "the output lingers"
    );
    (group, hook)
}

/// Rule 8 (no lock held while a response is cloned): a lingering output's `Clone` that looks
/// its own key up again neither deadlocks nor starts a call; that nested caller gets its copy
/// once the output is back.
#[test]
fn lingering_clone_may_reenter_the_registry() {
    let (tx, rx) = std::sync::mpsc::channel();
    // On a thread of its own: on failure it deadlocks, and the bounded wait below reports it.
    std::thread::spawn(move || {
        let (group, hook) = lingering_hooked();
        let stash = Arc::new(Mutex::new(None));
        let (g, st) = (group.clone(), stash.clone());
        *hook.lock().unwrap() = Some(Box::new(move || {
            let nested = g.run("k", std::future::pending::<Hooked>);
            assert!(!nested.is_leader(), "a lingering hit, not a new call");
            *st.lock().unwrap() = Some(nested);
        }));
        let outer = group.run("k", std::future::pending::<Hooked>);
        assert!(!outer.is_leader());
        let nested = stash
            .lock()
            .unwrap()
            .take()
            .expect("the clone ran its hook");
        assert!(futures::executor::block_on(outer).is_ok());
        assert!(futures::executor::block_on(nested).is_ok());
        assert_eq!(group.in_flight(), 0);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("deadlocked: a lingering clone re-entered its own flight's lock");
}

/// Rules 4 and 6: callers that find a lingering output taken out wait, and are woken one at
/// a time as it is put back; one that is woken and leaves passes its turn on.
#[test]
fn lingering_waiters_take_turns_and_pass_them_on() {
    let (group, hook) = lingering_hooked();
    let stash = Arc::new(Mutex::new(Vec::new()));
    let (g, st) = (group.clone(), stash.clone());
    *hook.lock().unwrap() = Some(Box::new(move || {
        // While the output is out: two more callers, each polled once.
        for _ in 0..2 {
            let mut hit = Box::pin(g.run("k", std::future::pending::<Hooked>));
            let (count, waker) = counting_waker();
            assert!(
                poll_with(hit.as_mut(), &waker).is_pending(),
                "the output is out"
            );
            st.lock().unwrap().push((hit, count, waker));
        }
    }));
    let outer = group.run("k", std::future::pending::<Hooked>);
    let mut waiting = std::mem::take(&mut *stash.lock().unwrap());
    assert_eq!(waiting.len(), 2, "the clone ran its hook");
    let wakes = |w: &Vec<(_, Arc<CountingWaker>, Waker)>| -> Vec<usize> {
        w.iter().map(|(_, c, _)| c.0.load(SeqCst)).collect()
    };
    assert_eq!(wakes(&waiting), [1, 0], "put back: the first waiter's turn");
    let (first, ..) = waiting.remove(0);
    drop(first);
    assert_eq!(
        wakes(&waiting),
        [1],
        "left without taking it: the next one's turn"
    );
    let (mut second, _, waker) = waiting.remove(0);
    assert!(matches!(
        poll_with(second.as_mut(), &waker),
        Poll::Ready(Ok(_))
    ));
    assert!(futures::executor::block_on(outer).is_ok());
    assert_eq!((group.in_flight(), group.len()), (0, 1));
}

/// A lingering hit that waits for another hit's copy is not a follower: the layer's
/// `follower_timeout` does not apply to it (it would fail a request whose answer is there).
#[tokio::test(start_paused = true)]
async fn a_lingering_hit_waiting_for_a_copy_is_not_timed_out() {
    let hook: Hook = Arc::new(Mutex::new(None));
    let h = hook.clone();
    // A new output per call (not a clone: cloning one would run the hook).
    let inner = service_fn(move |_: &'static str| {
        let value = Hooked { hook: h.clone() };
        async move { Ok::<_, Infallible>(value) }
    });
    let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k))
        .linger(Duration::from_secs(3600))
        .follower_timeout(Duration::from_millis(20))
        .layer(inner);
    assert!(svc.clone().oneshot("k").await.is_ok());
    // The next copy of the lingering output blocks, on another thread, until `go`.
    let (copying, in_copy) = std::sync::mpsc::channel();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    *hook.lock().unwrap() = Some(Box::new(move || {
        copying.send(()).unwrap();
        wait.recv().unwrap();
    }));
    let mut other = svc.clone();
    let copier = std::thread::spawn(move || futures::executor::block_on(other.call("k")).is_ok());
    in_copy.recv().unwrap();
    let mut hit = Box::pin(svc.call("k"));
    assert!(hit.is_follower() && !hit.is_leader());
    let (_, waker) = counting_waker();
    assert!(
        poll_with(hit.as_mut(), &waker).is_pending(),
        "the output is out"
    );
    tokio::time::advance(Duration::from_millis(30)).await;
    assert!(
        poll_with(hit.as_mut(), &waker).is_pending(),
        "past the follower limit, still waiting for the copy"
    );
    go.send(()).unwrap();
    assert!(copier.join().unwrap());
    assert!(matches!(
        poll_with(hit.as_mut(), &waker),
        Poll::Ready(Ok(_))
    ));
}

/// Rule 3 with retries: a call is judged by the failure test of the caller whose `make` made
/// it. A follower's retry that fails is an error (not kept without `linger_errors`), even when
/// the flight's shared state was made by a plain `run` that counts nothing as a failure.
#[tokio::test]
async fn a_retried_call_is_judged_by_its_own_callers_failure_test() {
    let group: Group<u8> = GroupBuilder::new()
        .retry_failed(1)
        .linger(Duration::from_secs(3600))
        .build();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let leader = group.run_result(1, move || async move {
        g.notified().await;
        Err::<u32, &str>("a")
    });
    // A plain `run` joins first (it makes the flight's shared state), then a retrying one.
    let plain = group.run(1, || async { Ok::<u32, &str>(0) });
    let retrying = group.run_retryable(1, || async { Err::<u32, &str>("b") });
    assert!(!plain.is_leader() && !retrying.is_leader());
    let tasks = [
        tokio::spawn(leader),
        tokio::spawn(plain),
        tokio::spawn(retrying),
    ];
    gate.notify_one();
    let outs: Vec<_> = join_all(tasks).await;
    assert_eq!(outs[0].as_ref().unwrap().as_ref().unwrap(), &Err("a"));
    assert_eq!(outs[2].as_ref().unwrap().as_ref().unwrap(), &Err("b"));
    assert_eq!(group.stats().retried, 1);
    let later = group.run_result(1, || async { Ok::<u32, &str>(9) }).await;
    assert_eq!(later.unwrap(), Ok(9), "the retry's error did not linger");
}

/// Rules 4 and 7: waiters aborted while they lead, follow or take over, on worker threads,
/// never strand the call: the last one standing gets its flight's answer, the registry empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_aborted_in_turn_on_worker_threads() {
    let gate = Gate::new();
    let (backend, calls) = gated_backend(&gate);
    let svc = CoalesceLayer::new(by_str).layer(backend);
    let mut tasks: Vec<_> = (0..8)
        .map(|_| {
            let fut = svc.clone().oneshot("k");
            tokio::spawn(fut)
        })
        .collect();
    let last = tasks.pop().unwrap();
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    gate.open();
    let out = tokio::time::timeout(Duration::from_secs(30), last)
        .await
        .expect("the last waiter hung")
        .unwrap()
        .unwrap();
    assert!(out.starts_with("k#"));
    assert!(
        calls.load(SeqCst) <= 2,
        "at most a cancelled call and one more"
    );
    assert_eq!((svc.in_flight(), svc.group().len()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// HTTP adapter
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "http")]
mod http_adapter {
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body::Frame;
    use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
    use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, ServedBy};

    use super::*;

    type Body = BoxBody<Bytes, BoxError>;
    type Req = Request<Full<Bytes>>;
    /// Makes one of a test's requests, again for every caller.
    type MakeReq = Box<dyn Fn() -> Req>;

    fn get(uri: &str) -> Req {
        Request::get(uri).body(Full::new(Bytes::new())).unwrap()
    }

    fn text(text: String) -> Body {
        Full::new(Bytes::from(text)).map_err(BoxError::from).boxed()
    }

    /// A backend that counts its calls and answers each after a second with `respond(n)`, `n`
    /// counting calls from 0.
    fn slow_backend<R>(
        respond: R,
    ) -> (
        Arc<AtomicUsize>,
        impl Service<Req, Response = Response<Body>, Error = Infallible, Future: Send>
            + Clone
            + Send
            + 'static,
    )
    where
        R: Fn(usize) -> Response<Body> + Clone + Send + Sync + 'static,
    {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let inner = service_fn(move |_req: Req| {
            let n = c.fetch_add(1, SeqCst);
            let respond = respond.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, Infallible>(respond(n))
            }
        });
        (calls, inner)
    }

    async fn read_body(res: Response<CoalesceBody<Body>>) -> (ServedBy, Result<String, String>) {
        let by = *res.extensions().get::<ServedBy>().expect("marked");
        let mut body = res.into_body();
        let mut text = String::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        text.push_str(std::str::from_utf8(data).unwrap());
                    }
                }
                Err(e) => return (by, Err(format!("{text}|error: {e}"))),
            }
        }
        (by, Ok(text))
    }

    /// A response body fed through a channel, one chunk per message; `Err` ends it with an error.
    fn channel_body() -> (
        tokio::sync::mpsc::UnboundedSender<Result<&'static str, &'static str>>,
        Body,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<&'static str, &'static str>>();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            let frame = item
                .map(|s| Frame::data(Bytes::from_static(s.as_bytes())))
                .map_err(BoxError::from);
            Some((frame, rx))
        });
        (tx, StreamBody::new(stream).boxed())
    }

    /// Every bypass rule: identical concurrent requests that must bypass each reach the backend.
    #[tokio::test(start_paused = true)]
    async fn http_every_bypass_rule_reaches_the_backend_per_request() {
        let (calls, inner) = slow_backend(|n| Response::new(text(format!("call {n}"))));
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(inner);
        // Requests that bypass by a header: (label, headers).
        let by_header: [(&str, &[(&str, &str)]); 8] = [
            ("authorization", &[("authorization", "Bearer x")]),
            ("cookie", &[("cookie", "s=1")]),
            (
                "proxy-authorization",
                &[("proxy-authorization", "Basic eA==")],
            ),
            ("range", &[("range", "bytes=0-1")]),
            (
                "cache-control no-cache",
                &[("cache-control", "max-age=5, No-Cache")],
            ),
            ("cache-control no-store", &[("cache-control", "no-store")]),
            ("pragma no-cache", &[("pragma", "no-cache")]),
            (
                "upgrade",
                &[
                    ("connection", "keep-alive, Upgrade"),
                    ("upgrade", "websocket"),
                ],
            ),
        ];
        let mut variants: Vec<(&str, MakeReq)> = by_header
            .iter()
            .map(|&(name, headers)| {
                let make = move || {
                    let mut req = Request::get("/a");
                    for (header, value) in headers {
                        req = req.header(*header, *value);
                    }
                    req.body(Full::new(Bytes::new())).unwrap()
                };
                (name, Box::new(make) as MakeReq)
            })
            .collect();
        variants.push((
            "post",
            Box::new(|| Request::post("/a").body(Full::new(Bytes::new())).unwrap()),
        ));
        variants.push((
            "body",
            Box::new(|| {
                Request::get("/a")
                    .body(Full::new(Bytes::from_static(b"payload")))
                    .unwrap()
            }),
        ));
        variants.push((
            "connect",
            Box::new(|| {
                Request::connect("example.com:443")
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }),
        ));
        for (name, make) in variants {
            let before = calls.load(SeqCst);
            let futures: Vec<_> = (0..3).map(|_| svc.call(make())).collect();
            assert_eq!(layer.in_flight(), 0, "{name}: nothing registered");
            for f in bounded(name, join_all(futures)).await {
                let (by, body) = read_body(f.unwrap()).await;
                assert_eq!(by, ServedBy::Bypass, "{name}");
                assert!(body.unwrap().starts_with("call "));
            }
            assert_eq!(calls.load(SeqCst) - before, 3, "{name}: one call each");
        }
        // Control: the same request without the trigger is coalesced.
        let before = calls.load(SeqCst);
        let futures: Vec<_> = (0..3).map(|_| svc.call(get("/a"))).collect();
        bounded("control", join_all(futures)).await;
        assert_eq!(calls.load(SeqCst) - before, 1);
    }

    /// Rule 4 for HTTP: the leader goes away while its response body is half buffered; the
    /// follower that takes over gets the whole body, not a truncated one, from the one call.
    #[tokio::test(start_paused = true)]
    async fn http_leader_dropped_mid_body_follower_gets_the_whole_body() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, body) = channel_body();
        let body = Arc::new(std::sync::Mutex::new(Some(body)));
        let c = calls.clone();
        let inner = service_fn(move |_req: Req| {
            c.fetch_add(1, SeqCst);
            let body = body.lock().unwrap().take().expect("called once");
            async move { Ok::<_, Infallible>(Response::new(body)) }
        });
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(inner);
        let mut leader = Box::pin(svc.call(get("/a")));
        let follower = svc.call(get("/a"));
        assert_eq!(follower.served_by(), ServedBy::Follower);
        tx.send(Ok("hello ")).unwrap();
        let (_, waker) = counting_waker();
        for _ in 0..3 {
            assert!(poll_with(leader.as_mut(), &waker).is_pending());
        }
        drop(leader);
        tx.send(Ok("world")).unwrap();
        drop(tx);
        let res = bounded("follower", follower).await.unwrap();
        let (by, text) = read_body(res).await;
        assert_eq!(by, ServedBy::Follower);
        assert_eq!(text.unwrap(), "hello world");
        assert_eq!(calls.load(SeqCst), 1);
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    }

    /// "Nothing is lost": a body that fails while being buffered reaches the leader as it was
    /// (the bytes read, then the error); followers are released to make their own calls.
    #[tokio::test(start_paused = true)]
    async fn http_body_failing_mid_buffering_goes_to_the_leader_followers_call() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, body) = channel_body();
        let first = Arc::new(std::sync::Mutex::new(Some(body)));
        let c = calls.clone();
        let inner = service_fn(move |_req: Req| {
            let n = c.fetch_add(1, SeqCst);
            let body = match first.lock().unwrap().take() {
                Some(body) => body,
                None => text(format!("own {n}")),
            };
            async move { Ok::<_, Infallible>(Response::new(body)) }
        });
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(inner);
        let futures: Vec<_> = (0..4).map(|_| svc.call(get("/a"))).collect();
        tx.send(Ok("part")).unwrap();
        tx.send(Err("backend body broke")).unwrap();
        let results = bounded("waiters", join_all(futures)).await;
        let mut own = Vec::new();
        for (i, res) in results.into_iter().enumerate() {
            let (by, text) = read_body(res.unwrap()).await;
            if i == 0 {
                assert_eq!(by, ServedBy::Leader);
                let text = text.unwrap_err();
                assert!(text.starts_with("part|error: backend body broke"), "{text}");
            } else {
                assert_eq!(by, ServedBy::Released);
                own.push(text.unwrap());
            }
        }
        own.sort();
        assert_eq!(own, ["own 1", "own 2", "own 3"]);
        assert_eq!(calls.load(SeqCst), 4);
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    }

    /// Unshareable responses are never handed to a follower even with many of them waiting;
    /// every follower's response comes from its own call.
    #[tokio::test(start_paused = true)]
    async fn http_private_and_cookie_responses_never_reach_followers() {
        for (name, value) in [
            ("set-cookie", "sid=leader"),
            ("cache-control", "public, PRIVATE"),
            ("cache-control", "no-store"),
            ("vary", "accept, *"),
        ] {
            let (calls, inner) = slow_backend(move |n| {
                Response::builder()
                    .header(name, value)
                    .body(text(format!("for call {n}")))
                    .unwrap()
            });
            let layer = CoalesceHttpLayer::new();
            let mut svc = layer.layer(inner);
            let futures: Vec<_> = (0..5).map(|_| svc.call(get("/a"))).collect();
            let results = bounded(name, join_all(futures)).await;
            let mut bodies = Vec::new();
            for (i, res) in results.into_iter().enumerate() {
                let (by, text) = read_body(res.unwrap()).await;
                let want = if i == 0 {
                    ServedBy::Leader
                } else {
                    ServedBy::Released
                };
                assert_eq!(by, want, "{name}: {value}");
                bodies.push(text.unwrap());
            }
            assert_eq!(bodies[0], "for call 0", "{name}: the leader keeps its own");
            bodies.sort();
            bodies.dedup();
            assert_eq!(bodies.len(), 5, "{name}: {value}: every body its own");
            assert_eq!(calls.load(SeqCst), 5);
            assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
        }
    }

    /// Over the size limit with the length unknown up front: the leader still gets every byte
    /// (and the trailers), the followers their own calls.
    #[tokio::test(start_paused = true)]
    async fn http_streamed_body_over_the_limit_reaches_the_leader_whole_with_trailers() {
        let (calls, inner) = slow_backend(|n| {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-checksum", n.to_string().parse().unwrap());
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"0123456789"))),
                Ok(Frame::data(Bytes::from_static(b"abcdefghij"))),
                Ok(Frame::data(Bytes::from(format!("-{n}")))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::new(StreamBody::new(futures::stream::iter(frames)).boxed())
        });
        let layer = CoalesceHttpLayer::new().max_body_bytes(15);
        let mut svc = layer.layer(inner);
        let futures: Vec<_> = (0..3).map(|_| svc.call(get("/a"))).collect();
        let results = bounded("waiters", join_all(futures)).await;
        for (i, res) in results.into_iter().enumerate() {
            let res = res.unwrap();
            let by = *res.extensions().get::<ServedBy>().unwrap();
            let collected = res.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().expect("trailers kept");
            let n = trailers["x-checksum"].to_str().unwrap().to_owned();
            let text = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
            assert_eq!(text, format!("0123456789abcdefghij-{n}"));
            if i == 0 {
                assert_eq!((by, n.as_str()), (ServedBy::Leader, "0"));
            } else {
                assert_eq!(by, ServedBy::Released);
            }
        }
        assert_eq!(calls.load(SeqCst), 3);
    }
}
