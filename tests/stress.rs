//! Load with cancellations: the registry's invariants under many concurrent requests.
//!
//! Randomness comes from a fixed seed, so every run makes the same requests with the same
//! cancellation points; thread interleavings vary, and the assertions are invariants that must
//! hold under all of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tower::{Service, ServiceExt};
use tower_coalesce::{CoalesceLayer, Group};
use tower_layer::Layer;

const REQUESTS: usize = 100_000;
const KEYS: u32 = 10_000;
const SEED: u64 = 0x00C0_A1E5_CE5E_ED00;
/// How many later requests a backend call waits for (see `Backend::call`).
const WINDOW: usize = 2_000;

/// A backend that tracks, per key, how many of its calls are running at once.
#[derive(Clone)]
struct Backend(Arc<Tracker>);

struct Tracker {
    /// Per-key count of running calls (started and neither finished nor dropped).
    running: Vec<AtomicUsize>,
    /// The highest per-key count ever seen.
    max_running: AtomicUsize,
    /// (key, running) of the first overlap seen, for the failure message.
    first_overlap: Mutex<Option<(u32, usize)>>,
    calls: AtomicUsize,
    finished: AtomicUsize,
    dropped: AtomicUsize,
    /// How many requests have joined or started a flight so far.
    registered: Arc<watch::Sender<usize>>,
}

/// Ends a call's "running" span when the call's future completes or is dropped.
struct Running {
    tracker: Arc<Tracker>,
    key: u32,
    finished: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.tracker.running[self.key as usize].fetch_sub(1, SeqCst);
        let done = if self.finished {
            &self.tracker.finished
        } else {
            &self.tracker.dropped
        };
        done.fetch_add(1, SeqCst);
    }
}

/// Responses carry the key and the number of the call that produced them.
#[derive(Clone, Debug, PartialEq)]
struct Answer {
    key: u32,
    call: usize,
}

#[derive(Debug)]
struct Unlucky(u32);

impl std::fmt::Display for Unlucky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key {} is unlucky", self.0)
    }
}

impl std::error::Error for Unlucky {}

impl Service<(u32, u32)> for Backend {
    type Response = Answer;
    type Error = Unlucky;
    type Future = BoxFuture<'static, Result<Answer, Unlucky>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Unlucky>> {
        Poll::Ready(Ok(()))
    }

    /// `(key, yields)`: the call yields `yields` times before answering.
    fn call(&mut self, (key, yields): (u32, u32)) -> Self::Future {
        let tracker = Arc::clone(&self.0);
        Box::pin(async move {
            let call = tracker.calls.fetch_add(1, SeqCst) + 1;
            let now = tracker.running[key as usize].fetch_add(1, SeqCst) + 1;
            tracker.max_running.fetch_max(now, SeqCst);
            if now > 1 {
                tracker
                    .first_overlap
                    .lock()
                    .unwrap()
                    .get_or_insert((key, now));
            }
            let mut running = Running {
                tracker,
                key,
                finished: false,
            };
            // Stay in flight while the next `WINDOW` requests arrive, so that many of them
            // meet this call whatever the scheduler does.
            let target = (*running.tracker.registered.borrow() + WINDOW).min(REQUESTS);
            let mut registered = running.tracker.registered.subscribe();
            let _ = registered.wait_for(|&n| n >= target).await;
            for _ in 0..yields {
                tokio::task::yield_now().await;
            }
            running.finished = true;
            if key % 97 == 0 {
                Err(Unlucky(key))
            } else {
                Ok(Answer { key, call })
            }
        })
    }
}

/// Resolves to `None` when the wrapped future has been polled `budget` times without
/// finishing, dropping it then: a caller that gives up (a timeout, a closed connection).
struct GiveUpAfter<F> {
    inner: Option<Pin<Box<F>>>,
    budget: u32,
}

impl<F: Future> Future for GiveUpAfter<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.budget == 0 {
            self.inner = None;
            return Poll::Ready(None);
        }
        self.budget -= 1;
        let inner = self.inner.as_mut().expect("polled after completion");
        match inner.as_mut().poll(cx) {
            Poll::Ready(out) => {
                self.inner = None;
                Poll::Ready(Some(out))
            }
            Poll::Pending => {
                // Come back even if not woken, so the budget runs out.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

#[derive(Default)]
struct Outcome {
    leaders: usize,
    followers: usize,
    answered: usize,
    failed: usize,
    gave_up: usize,
}

/// 100,000 requests over 10,000 keys; a quarter of the callers give up after a random number
/// of polls (zero included: dropped before ever being polled). At the end the registry is empty,
/// every backend call has ended, no key ever had two backend calls running at once, and every
/// answer belongs to the key it was asked for.
#[test]
fn hundred_thousand_requests_over_ten_thousand_keys_with_cancellations() {
    // On a thread of its own, bounded in real time: a lock held forever would block the
    // runtime's workers, and with them the runtime's own timers.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(hundred_thousand_requests());
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(180)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("requests hung"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the load failed"),
    }
}

async fn hundred_thousand_requests() {
    let tracker = Arc::new(Tracker {
        running: (0..KEYS).map(|_| AtomicUsize::new(0)).collect(),
        max_running: AtomicUsize::new(0),
        first_overlap: Mutex::new(None),
        calls: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        registered: Arc::new(watch::Sender::new(0)),
    });
    let svc =
        CoalesceLayer::new(|&(key, _): &(u32, u32)| Some(key)).layer(Backend(tracker.clone()));
    let outcome = Arc::new(Mutex::new(Outcome::default()));

    let mut rng = StdRng::seed_from_u64(SEED);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..REQUESTS {
        let key = rng.random_range(0..KEYS);
        let yields = rng.random_range(0..8);
        let give_up = rng.random_bool(0.25).then(|| rng.random_range(0..4));
        let mut svc = svc.clone();
        let outcome = outcome.clone();
        let registered = tracker.registered.clone();
        tasks.spawn(async move {
            let fut = svc.ready().await.unwrap().call((key, yields));
            registered.send_modify(|n| *n += 1);
            {
                let mut o = outcome.lock().unwrap();
                if fut.is_leader() {
                    o.leaders += 1;
                } else {
                    assert!(fut.is_follower());
                    o.followers += 1;
                }
            }
            let result = match give_up {
                Some(budget) => {
                    GiveUpAfter {
                        inner: Some(Box::pin(fut)),
                        budget,
                    }
                    .await
                }
                None => Some(fut.await),
            };
            let mut o = outcome.lock().unwrap();
            match result {
                None => o.gave_up += 1,
                Some(Ok(answer)) => {
                    assert_eq!(answer.key, key, "answer of another key");
                    o.answered += 1;
                }
                Some(Err(err)) => {
                    assert!(!err.is_panic());
                    assert_eq!(err.downcast_ref::<Unlucky>().unwrap().0, key);
                    o.failed += 1;
                }
            }
        });
    }
    let joined = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(r) = tasks.join_next().await {
            r.expect("a request task panicked");
        }
    })
    .await;
    assert!(joined.is_ok(), "requests hung");

    let o = outcome.lock().unwrap();
    let calls = tracker.calls.load(SeqCst);
    let (finished, dropped) = (tracker.finished.load(SeqCst), tracker.dropped.load(SeqCst));
    eprintln!(
        "{REQUESTS} requests over {KEYS} keys: {} leaders, {} followers, {} answered, {} failed, \
         {} gave up; {calls} backend calls ({finished} finished, {dropped} cancelled)",
        o.leaders, o.followers, o.answered, o.failed, o.gave_up
    );
    assert_eq!(svc.in_flight(), 0, "no flight may be left running");
    assert!(
        svc.group().is_empty(),
        "the registry must be empty after the load"
    );
    assert_eq!(
        tracker.max_running.load(SeqCst),
        1,
        "two backend calls of one key ran at once (first: {:?})",
        tracker.first_overlap.lock().unwrap()
    );
    assert!(tracker.running.iter().all(|r| r.load(SeqCst) == 0));
    assert_eq!(finished + dropped, calls, "every backend call ended");
    assert_eq!(o.leaders + o.followers, REQUESTS);
    assert_eq!(o.answered + o.failed + o.gave_up, REQUESTS);
    assert!(o.followers > 0 && o.gave_up > 0 && o.failed > 0);
    assert!(calls <= o.leaders, "a backend call without a leader");
}

/// Threads released together on one key, round after round: within a round every caller
/// registers before the call may finish, so each round must make exactly one call. Two
/// leaders in a round means the check and the insert were not one step.
#[test]
fn simultaneous_callers_on_one_key_make_one_call_per_round() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 5_000;
    let group: Group<u32> = Group::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let (registered, _) = tokio::sync::watch::channel(0usize);
    let registered = Arc::new(registered);
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (group, calls, start, registered) = (
                group.clone(),
                calls.clone(),
                start.clone(),
                registered.clone(),
            );
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    start.wait();
                    let mut all_in = registered.subscribe();
                    let target = (round + 1) * THREADS;
                    let run = group.run(round as u32, || {
                        calls.fetch_add(1, SeqCst);
                        async move {
                            let _ = all_in.wait_for(|&n| n >= target).await;
                            round
                        }
                    });
                    registered.send_modify(|n| *n += 1);
                    assert_eq!(futures::executor::block_on(run).unwrap(), round);
                }
            })
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let all_ok = threads.into_iter().all(|t| t.join().is_ok());
        let _ = tx.send(all_ok);
    });
    let all_ok = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("callers hung");
    assert!(all_ok, "a caller panicked");
    assert_eq!(calls.load(SeqCst), ROUNDS, "one call per round");
    assert_eq!(group.in_flight(), 0);
    assert!(group.is_empty());
}
