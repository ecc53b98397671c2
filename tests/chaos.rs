//! Chaos soak: requests over a Zipf key set through [`Group`] and [`CoalesceLayer`], with
//! random waiter cancellation (~30%), backend panics (~1%), errors (~1%), random latencies and
//! the registry options on and off, round after round.
//!
//! Invariants, checked as the load runs (not only at the end):
//!
//! - at most one backend call per key runs at a time: each call draws a per-key generation
//!   number when it starts and checks at the start and end of each of its polls that no newer
//!   call of its key has started; and a call never starts while a cancelled call of its key is
//!   still being dropped (checked in the cancelled call's destructor). Three kinds of rounds
//!   call beside a flight by design: capacity bounds (`max_followers`, `max_in_flight`: the
//!   requests over a bound call alone), a follower wait limit (`follower_timeout`: a follower
//!   past it calls alone) and `forget` (the next request starts a new flight at once). The
//!   public API does not tell such a call from a leader's (both report `is_leader()`), so
//!   those rounds count overlaps instead of failing on them, and check everything else;
//! - every waiter resolves with its own key's value, or an error or panic report naming its
//!   own key (a follower calling alone past its wait limit may instead have the panic unwind
//!   out of its future, as a bypassed request would: counted, and it must be its own key's);
//! - no waiter hangs (every request is bounded by a timeout, which counts as a violation);
//! - the registry never holds more entries than there are keys;
//! - after each round the registry is empty (expired lingering outputs purged first), every
//!   backend call has ended, and resident memory is back near where it started (`VmRSS` from
//!   `/proc/self/status`).
//!
//! Everything random comes from one fixed seed. The rounds on a paused clock (current-thread
//! runtime, virtual latencies and timeouts) replay exactly; the threaded rounds replay the same
//! requests under varying interleavings, and the invariants must hold under all of them.
//!
//! `cargo test --release --test chaos -- --nocapture` prints the totals; the large variant is
//! `cargo test --release --test chaos chaos_soak_large -- --ignored --nocapture`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tower::Service;
use tower_coalesce::{CoalesceError, CoalesceLayer, CoalesceService, Group, GroupBuilder};
use tower_layer::Layer;

const SEED: u64 = 0xC4A0_5EED_2026_0006;
/// Zipf exponent: the hottest key gets about a tenth of the requests, the coldest almost none.
const ZIPF_S: f64 = 1.07;
/// A request still pending after this long (real time in threaded rounds, virtual time on a
/// paused clock) has hung: a violation.
const HANG: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------------

/// How much load one run makes.
#[derive(Clone, Copy, Debug)]
struct Size {
    /// Requests per round (every round runs this many).
    requests: u64,
    /// Distinct keys.
    keys: u32,
    /// Client tasks issuing requests one after the other.
    clients: u32,
}

/// The run `cargo test` makes: about a minute in release (4M requests a round), under half a
/// minute in a debug build (150k a round), on two cores.
fn default_size() -> Size {
    if cfg!(debug_assertions) {
        Size {
            requests: 150_000,
            keys: 10_000,
            clients: 256,
        }
    } else {
        Size {
            requests: 4_000_000,
            keys: 100_000,
            clients: 512,
        }
    }
}

/// The ignored large run: 20M requests a round over a million keys in release (a debug build
/// makes a tenth of that).
fn big_size() -> Size {
    if cfg!(debug_assertions) {
        Size {
            requests: 2_000_000,
            keys: 100_000,
            clients: 1_024,
        }
    } else {
        Size {
            requests: 20_000_000,
            keys: 1_000_000,
            clients: 1_024,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------------

/// Samples ranks `0..n` with probability proportional to `1 / (rank + 1)^s`, by binary search
/// over the cumulative distribution.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u32, s: f64) -> Self {
        let mut total = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|rank| {
                total += 1.0 / f64::from(rank).powf(s);
                total
            })
            .collect();
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut StdRng) -> u32 {
        let u: f64 = rng.random();
        let rank = self.cdf.partition_point(|&c| c < u);
        rank.min(self.cdf.len() - 1) as u32
    }
}

/// What the backend does for one call; decided by the request that happens to lead.
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// Returns an error naming the key.
    Error,
    /// Panics while making the call (in `make`, or in `Service::call`).
    PanicInCall,
    /// Panics mid-flight, after its latency.
    PanicInPoll,
}

#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Yields (threaded rounds) or virtual milliseconds (paused rounds) before answering.
    latency: u32,
    fault: Fault,
}

/// How a caller gives up, if it does.
#[derive(Clone, Copy, Debug)]
enum Cancel {
    Never,
    /// Dropped after this many polls of its own (0: dropped before it is ever polled).
    AfterPolls(u32),
    /// `tokio::time::timeout` with this many milliseconds.
    Timeout(u64),
}

fn draw_plan(rng: &mut StdRng, paused: bool) -> Plan {
    let fault = match rng.random_range(0..1000) {
        0..=9 => Fault::Error,
        10..=12 => Fault::PanicInCall,
        13..=19 => Fault::PanicInPoll,
        _ => Fault::None,
    };
    let latency = if paused {
        rng.random_range(0..20)
    } else {
        rng.random_range(0..12)
    };
    Plan { latency, fault }
}

fn draw_cancel(rng: &mut StdRng) -> Cancel {
    match rng.random_range(0..100) {
        0..=4 => Cancel::AfterPolls(0),
        5..=19 => Cancel::AfterPolls(rng.random_range(1..6)),
        20..=29 => Cancel::Timeout(rng.random_range(0..15)),
        _ => Cancel::Never,
    }
}

// ---------------------------------------------------------------------------------------------
// The backend and its bookkeeping
// ---------------------------------------------------------------------------------------------

/// A backend value: the key it was made for and the number of the call that made it.
#[derive(Clone, Debug)]
struct Value {
    key: u32,
    #[allow(dead_code)] // Read through `Debug` in failure messages.
    call: u64,
}

/// A backend error naming its key.
#[derive(Clone, Debug)]
struct ChaosErr {
    key: u32,
}

impl std::fmt::Display for ChaosErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend failed for key {}", self.key)
    }
}

impl std::error::Error for ChaosErr {}

fn panic_message(key: u32) -> String {
    format!("chaos panic key={key};")
}

/// Violations seen so far: counted, and the first few kept for the failure message.
#[derive(Default)]
struct Violations {
    count: AtomicU64,
    first: Mutex<Vec<String>>,
}

impl Violations {
    fn report(&self, what: String) {
        self.count.fetch_add(1, SeqCst);
        let mut first = self.first.lock().unwrap();
        if first.len() < 8 {
            first.push(what);
        }
    }
}

/// Shared by every call of the backend in one round.
struct Tracker {
    /// Per key: calls alive now (started, and not yet finished or dropped).
    running: Vec<AtomicU32>,
    /// Per key: how many calls have started; a call is the key's current one while this still
    /// equals the number it drew.
    generation: Vec<AtomicU64>,
    /// Calls alive now, over all keys.
    live: AtomicUsize,
    /// Woken when `live` drops to zero.
    idle: Notify,
    calls: AtomicU64,
    /// Polls of a call after a newer call of its key started: two calls of one key running at
    /// once. A violation, except in the rounds with capacity bounds.
    stale_polls: AtomicU64,
    /// Calls that started while an older call of their key, cancelled, was still being
    /// dropped. A violation, except in the rounds with capacity bounds.
    started_beside_a_drop: AtomicU64,
    /// Whether two calls of one key running at once is a violation.
    exclusive: bool,
    completed: AtomicU64,
    dropped: AtomicU64,
    panics_injected: AtomicU64,
    errors_injected: AtomicU64,
    paused: bool,
    round: &'static str,
    violations: Arc<Violations>,
}

/// A call's stay in the backend; ends when the call's future finishes, is dropped or unwinds.
struct Running {
    tracker: Arc<Tracker>,
    key: u32,
    generation: u64,
    completed: bool,
}

impl Running {
    fn enter(tracker: Arc<Tracker>, key: u32) -> Self {
        tracker.calls.fetch_add(1, SeqCst);
        tracker.live.fetch_add(1, SeqCst);
        tracker.running[key as usize].fetch_add(1, SeqCst);
        let generation = tracker.generation[key as usize].fetch_add(1, SeqCst) + 1;
        Running {
            tracker,
            key,
            generation,
            completed: false,
        }
    }

    /// Called at the start and at the end of every poll of the call: if a newer call of the
    /// key has started, this one is running beside it.
    fn check_current(&self, when: &str) {
        let t = &self.tracker;
        let current = t.generation[self.key as usize].load(SeqCst);
        if current != self.generation {
            t.stale_polls.fetch_add(1, SeqCst);
            if t.exclusive {
                t.violations.report(format!(
                    "{}: call #{} of key {} polled ({when}) while call #{current} of it runs",
                    t.round, self.generation, self.key
                ));
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let t = &self.tracker;
        let key = self.key as usize;
        let current = t.generation[key].load(SeqCst);
        if !self.completed && current != self.generation {
            // Cancelled, and a newer call of the key started before this drop ended: the key
            // was freed before the cancelled call's future was dropped.
            t.started_beside_a_drop.fetch_add(1, SeqCst);
            if t.exclusive {
                t.violations.report(format!(
                    "{}: call #{current} of key {} started while cancelled call #{} was \
                     still being dropped",
                    t.round, self.key, self.generation
                ));
            }
        }
        t.running[key].fetch_sub(1, SeqCst);
        if self.completed {
            t.completed.fetch_add(1, SeqCst);
        } else {
            t.dropped.fetch_add(1, SeqCst);
        }
        if t.live.fetch_sub(1, SeqCst) == 1 {
            t.idle.notify_one();
        }
    }
}

type Answer = Result<Value, ChaosErr>;

/// One backend call: runs from its first poll to its end (or its drop, or its panic).
async fn backend_call(tracker: Arc<Tracker>, key: u32, plan: Plan) -> Answer {
    let mut running = Running::enter(Arc::clone(&tracker), key);
    let call = running.generation;
    if tracker.paused {
        running.check_current("before sleeping");
        tokio::time::sleep(Duration::from_millis(plan.latency.into())).await;
        running.check_current("after sleeping");
    } else {
        for _ in 0..plan.latency {
            running.check_current("before yielding");
            tokio::task::yield_now().await;
            running.check_current("after yielding");
        }
    }
    running.check_current("finishing");
    running.completed = true;
    match plan.fault {
        Fault::None | Fault::PanicInCall => Ok(Value { key, call }),
        Fault::Error => {
            tracker.errors_injected.fetch_add(1, SeqCst);
            Err(ChaosErr { key })
        }
        Fault::PanicInPoll => {
            tracker.panics_injected.fetch_add(1, SeqCst);
            panic!("{}", panic_message(key))
        }
    }
}

/// The backend as a tower service, for the layer rounds.
#[derive(Clone)]
struct Backend(Arc<Tracker>);

struct Req {
    key: u32,
    plan: Plan,
}

impl Service<Req> for Backend {
    type Response = Value;
    type Error = ChaosErr;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ChaosErr>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Fault::PanicInCall = req.plan.fault {
            self.0.panics_injected.fetch_add(1, SeqCst);
            panic!("{}", panic_message(req.key));
        }
        Box::pin(backend_call(Arc::clone(&self.0), req.key, req.plan))
    }
}

// ---------------------------------------------------------------------------------------------
// Rounds
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    Group,
    Layer,
}

#[derive(Clone, Copy, Debug)]
struct Round {
    name: &'static str,
    api: Api,
    /// Current-thread runtime on a paused clock; otherwise two worker threads, real time.
    paused: bool,
    detached: bool,
    linger: Option<Duration>,
    linger_errors: Option<Duration>,
    retries: u32,
    max_followers: Option<usize>,
    max_in_flight: Option<usize>,
    /// One request in a hundred first calls `forget` on its key.
    forget: bool,
    /// The layer's follower wait limit (followers past it call on their own).
    follower_timeout: Option<Duration>,
}

impl Round {
    const fn new(name: &'static str, api: Api, paused: bool) -> Self {
        Round {
            name,
            api,
            paused,
            detached: false,
            linger: None,
            linger_errors: None,
            retries: 0,
            max_followers: None,
            max_in_flight: None,
            forget: false,
            follower_timeout: None,
        }
    }

    fn capacity_bounded(&self) -> bool {
        self.max_followers.is_some() || self.max_in_flight.is_some()
    }

    /// Whether two calls of one key running at once is a violation: not where an option
    /// makes requests call beside the flight on purpose (capacity bounds, a follower's wait
    /// limit, `forget`, which lets the next request start a new flight at once).
    fn exclusive(&self) -> bool {
        !self.capacity_bounded() && !self.forget && self.follower_timeout.is_none()
    }

    fn builder(&self) -> GroupBuilder {
        let mut b = GroupBuilder::new()
            .detached(self.detached)
            .retry_failed(self.retries);
        if let Some(w) = self.linger {
            b = b.linger(w);
        }
        if let Some(w) = self.linger_errors {
            b = b.linger_errors(w);
        }
        if let Some(m) = self.max_followers {
            b = b.max_followers(m);
        }
        if let Some(m) = self.max_in_flight {
            b = b.max_in_flight(m);
        }
        b
    }
}

fn rounds(keys: u32) -> Vec<Round> {
    use Api::{Group as G, Layer as L};
    let linger = Some(Duration::from_millis(5));
    vec![
        Round::new("group, defaults", G, false),
        Round {
            detached: true,
            ..Round::new("group, detached", G, false)
        },
        Round {
            retries: 2,
            ..Round::new("group, retry_failed(2)", G, false)
        },
        Round {
            max_followers: Some(3),
            max_in_flight: Some(keys as usize / 8),
            ..Round::new("group, max_followers(3) + max_in_flight", G, false)
        },
        Round::new("group, defaults, paused clock", G, true),
        Round {
            linger,
            linger_errors: Some(Duration::from_millis(1)),
            ..Round::new("group, linger + linger_errors, paused clock", G, true)
        },
        Round {
            detached: true,
            retries: 1,
            ..Round::new("group, detached + retry_failed(1), paused clock", G, true)
        },
        Round::new("layer, defaults", L, false),
        Round {
            retries: 1,
            ..Round::new("layer, retry_failed(1)", L, false)
        },
        Round {
            max_followers: Some(2),
            ..Round::new("layer, max_followers(2)", L, false)
        },
        Round {
            detached: true,
            ..Round::new("layer, detached, paused clock", L, true)
        },
        Round {
            linger,
            ..Round::new("layer, linger, paused clock", L, true)
        },
        Round {
            forget: true,
            ..Round::new("group, forget (1%)", G, false)
        },
        Round {
            follower_timeout: Some(Duration::from_millis(8)),
            ..Round::new("layer, follower_timeout(8ms), paused clock", L, true)
        },
    ]
}

/// What the callers saw in one round (or in all of them).
#[derive(Clone, Copy, Default, Debug)]
struct Totals {
    requests: u64,
    values: u64,
    errors: u64,
    panics: u64,
    cancelled: u64,
    backend_calls: u64,
    overlaps: u64,
    beside_drop: u64,
    backend_dropped: u64,
    panics_injected: u64,
    errors_injected: u64,
    followers: u64,
    lingered: u64,
    retried: u64,
    over_capacity: u64,
    forgotten: u64,
    timed_out: u64,
    raised: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.values += o.values;
        self.errors += o.errors;
        self.panics += o.panics;
        self.cancelled += o.cancelled;
        self.backend_calls += o.backend_calls;
        self.overlaps += o.overlaps;
        self.beside_drop += o.beside_drop;
        self.backend_dropped += o.backend_dropped;
        self.panics_injected += o.panics_injected;
        self.errors_injected += o.errors_injected;
        self.followers += o.followers;
        self.lingered += o.lingered;
        self.retried += o.retried;
        self.over_capacity += o.over_capacity;
        self.forgotten += o.forgotten;
        self.timed_out += o.timed_out;
        self.raised += o.raised;
    }
}

/// How a request ended, as its caller saw it.
enum Seen {
    Value(Value),
    Error(u32),
    /// A panic reported as an error (`Panicked`, `CoalesceError::is_panic`).
    Panic(String),
    /// A panic that unwound out of the caller's future instead.
    Raised(String),
}

type Pending = Pin<Box<dyn Future<Output = Seen> + Send>>;
type LayerService = CoalesceService<Backend, fn(&Req) -> Option<u32>, u32>;

/// The thing requests go through in a round.
#[derive(Clone)]
enum Target {
    Group {
        group: Group<u32>,
        tracker: Arc<Tracker>,
        retryable: bool,
    },
    Layer(LayerService),
}

fn key_of(req: &Req) -> Option<u32> {
    Some(req.key)
}

impl Target {
    fn group(&self) -> &Group<u32> {
        match self {
            Target::Group { group, .. } => group,
            Target::Layer(svc) => svc.group(),
        }
    }

    /// Starts one request: registers it, synchronously, as `Group::run` and `Service::call`
    /// do.
    fn issue(&mut self, key: u32, plan: Plan) -> Pending {
        match self {
            Target::Group {
                group,
                tracker,
                retryable,
            } => {
                let t = Arc::clone(tracker);
                let make = move || {
                    if let Fault::PanicInCall = plan.fault {
                        t.panics_injected.fetch_add(1, SeqCst);
                        panic!("{}", panic_message(key));
                    }
                    backend_call(t, key, plan)
                };
                let run = if *retryable {
                    group.run_retryable(key, make)
                } else {
                    group.run_result(key, make)
                };
                Box::pin(async move {
                    match run.await {
                        Ok(Ok(v)) => Seen::Value(v),
                        Ok(Err(e)) => Seen::Error(e.key),
                        Err(p) => Seen::Panic(p.message().to_owned()),
                    }
                })
            }
            Target::Layer(svc) => {
                let fut = svc.call(Req { key, plan });
                Box::pin(async move {
                    // A follower past its wait limit calls on its own, and a panic there
                    // unwinds out of its future (as for a bypassed request): caught here so
                    // the client can check and count it.
                    match AssertUnwindSafe(fut).catch_unwind().await {
                        Ok(Ok(v)) => Seen::Value(v),
                        Ok(Err(e)) => seen_error(&e),
                        Err(payload) => Seen::Raised(
                            payload
                                .downcast_ref::<String>()
                                .cloned()
                                .unwrap_or_default(),
                        ),
                    }
                })
            }
        }
    }
}

fn seen_error(e: &CoalesceError) -> Seen {
    if e.is_panic() {
        return Seen::Panic(e.panic_message().unwrap_or("<no message>").to_owned());
    }
    match e.downcast_ref::<ChaosErr>() {
        Some(err) => Seen::Error(err.key),
        // Not one of ours: reported with an impossible key, so it counts as a violation.
        None => Seen::Error(u32::MAX),
    }
}

/// Polls `inner` at most `budget` times, then drops it: a caller that gives up after a while
/// in its own scheduler time. Between its own polls it asks to be polled again, so the budget
/// runs out even when nothing wakes it.
struct GiveUpAfter {
    inner: Option<Pending>,
    budget: u32,
}

impl Future for GiveUpAfter {
    type Output = Option<Seen>;

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
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

/// Checks what a caller got against the key it asked for.
fn check(key: u32, seen: &Seen, round: &Round, violations: &Violations) {
    match seen {
        Seen::Raised(msg) if *msg != panic_message(key) => {
            violations.report(format!("request for key {key} raised the panic {msg:?}"));
        }
        // Only a follower that stopped waiting makes a call of its own that may unwind.
        Seen::Raised(_) if round.follower_timeout.is_none() => {
            violations.report(format!(
                "{}: a panic for key {key} escaped the layer",
                round.name
            ));
        }
        Seen::Value(v) if v.key != key => {
            violations.report(format!("request for key {key} got the value {v:?}"));
        }
        Seen::Error(k) if *k != key => {
            violations.report(format!("request for key {key} got key {k}'s error"));
        }
        Seen::Panic(msg) if *msg != panic_message(key) => {
            violations.report(format!("request for key {key} got the panic {msg:?}"));
        }
        _ => {}
    }
}

/// One client: `count` requests one after the other, drawn from its own seeded generator.
async fn client(
    mut target: Target,
    round: Round,
    zipf: Arc<Zipf>,
    seed: u64,
    count: u64,
    violations: Arc<Violations>,
    keys: u32,
) -> Totals {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = Totals::default();
    for i in 0..count {
        let key = zipf.sample(&mut rng);
        let plan = draw_plan(&mut rng, round.paused);
        let cancel = draw_cancel(&mut rng);
        if round.forget && rng.random_range(0..100) == 0 {
            target.group().forget(&key);
        }
        let pending = target.issue(key, plan);
        t.requests += 1;
        let outcome = match cancel {
            Cancel::Never => Some(pending.await),
            Cancel::AfterPolls(budget) => {
                let give_up = GiveUpAfter {
                    inner: Some(pending),
                    budget,
                };
                match tokio::time::timeout(HANG, give_up).await {
                    Ok(out) => out,
                    Err(_) => {
                        violations.report(format!("request for key {key} hung"));
                        None
                    }
                }
            }
            Cancel::Timeout(ms) => tokio::time::timeout(Duration::from_millis(ms), pending)
                .await
                .ok(),
        };
        match outcome {
            None => t.cancelled += 1,
            Some(seen) => {
                check(key, &seen, &round, &violations);
                match seen {
                    Seen::Value(_) => t.values += 1,
                    Seen::Error(_) => t.errors += 1,
                    Seen::Panic(_) => t.panics += 1,
                    Seen::Raised(_) => t.raised += 1,
                }
            }
        }
        // The registry can never hold more entries than there are keys (one per key; a
        // cancelled one is replaced, not added to).
        if i % 256 == 0 {
            let group = target.group();
            let (len, in_flight) = (group.len(), group.in_flight());
            if len > keys as usize || in_flight > keys as usize {
                violations.report(format!(
                    "registry holds {len} entries, {in_flight} in flight, for {keys} keys"
                ));
            }
        }
    }
    t
}

/// A request that never resolves within [`HANG`] is a violation; so is the whole client.
async fn bounded_client(
    target: Target,
    round: Round,
    zipf: Arc<Zipf>,
    seed: u64,
    count: u64,
    violations: Arc<Violations>,
    keys: u32,
) -> Totals {
    // Requests that never give up are bounded here: a hang makes the client time out.
    let limit = HANG * 4;
    let v = Arc::clone(&violations);
    match tokio::time::timeout(
        limit,
        client(target, round, zipf, seed, count, violations, keys),
    )
    .await
    {
        Ok(t) => t,
        Err(_) => {
            v.report(format!("client {seed:#x} hung"));
            Totals::default()
        }
    }
}

/// Waits until every backend call has ended and no flight is registered as running: detached
/// flights finish on their own tasks after their waiters are gone.
async fn quiesce(target: &Target, tracker: &Tracker, violations: &Violations) {
    let group = target.group();
    let mut spins = 0u32;
    loop {
        if tracker.live.load(SeqCst) > 0 {
            if tokio::time::timeout(HANG, tracker.idle.notified())
                .await
                .is_err()
            {
                violations.report("backend calls still running long after the load".into());
                return;
            }
            continue;
        }
        if group.in_flight() == 0 {
            return;
        }
        // A flight's driver unregisters it just after its backend call ends, or a detached
        // flight's task has not polled its call yet: let them run.
        spins += 1;
        if spins > 1_000_000 {
            violations.report(format!(
                "{} flights registered with no backend call running",
                group.in_flight()
            ));
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// Runs one round to quiescence and checks the registry afterwards.
fn run_round(round: Round, size: Size, seed: u64, violations: &Arc<Violations>) -> Totals {
    let tracker = Arc::new(Tracker {
        running: (0..size.keys).map(|_| AtomicU32::new(0)).collect(),
        live: AtomicUsize::new(0),
        idle: Notify::new(),
        calls: AtomicU64::new(0),
        generation: (0..size.keys).map(|_| AtomicU64::new(0)).collect(),
        stale_polls: AtomicU64::new(0),
        started_beside_a_drop: AtomicU64::new(0),
        exclusive: round.exclusive(),
        completed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        panics_injected: AtomicU64::new(0),
        errors_injected: AtomicU64::new(0),
        paused: round.paused,
        round: round.name,
        violations: Arc::clone(violations),
    });
    let runtime = if round.paused {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    }
    .expect("runtime");
    let zipf = Arc::new(Zipf::new(size.keys, ZIPF_S));
    let (tracker_in, violations_in) = (Arc::clone(&tracker), Arc::clone(violations));
    let mut totals = runtime.block_on(async move {
        let (tracker, violations) = (tracker_in, violations_in);
        let target = match round.api {
            Api::Group => Target::Group {
                group: round.builder().build(),
                tracker: Arc::clone(&tracker),
                retryable: round.retries > 0,
            },
            Api::Layer => {
                let mut layer = CoalesceLayer::new(key_of as fn(&Req) -> Option<u32>)
                    .detached(round.detached)
                    .retry_failed(round.retries);
                if let Some(w) = round.linger {
                    layer = layer.linger(w);
                }
                if let Some(w) = round.linger_errors {
                    layer = layer.linger_errors(w);
                }
                if let Some(m) = round.max_followers {
                    layer = layer.max_followers(m);
                }
                if let Some(m) = round.max_in_flight {
                    layer = layer.max_in_flight(m);
                }
                if let Some(limit) = round.follower_timeout {
                    layer = layer.follower_timeout(limit);
                }
                Target::Layer(layer.layer(Backend(Arc::clone(&tracker))))
            }
        };
        let per_client = size.requests / u64::from(size.clients);
        let mut clients = tokio::task::JoinSet::new();
        for c in 0..size.clients {
            let extra = u64::from(u64::from(c) < size.requests % u64::from(size.clients));
            clients.spawn(bounded_client(
                target.clone(),
                round,
                Arc::clone(&zipf),
                seed ^ (u64::from(c) << 32),
                per_client + extra,
                Arc::clone(&violations),
                size.keys,
            ));
        }
        let mut totals = Totals::default();
        while let Some(t) = clients.join_next().await {
            totals.add(&t.expect("a client task panicked"));
        }
        quiesce(&target, &tracker, &violations).await;

        let group = target.group();
        if group.in_flight() != 0 {
            violations.report(format!(
                "{}: {} flights still running after the load",
                round.name,
                group.in_flight()
            ));
        }
        if round.linger.is_some() || round.linger_errors.is_some() {
            // Lingering outputs stay until their window ends (virtual time: no real wait).
            let window = round.linger.max(round.linger_errors).unwrap_or_default();
            tokio::time::sleep(window + Duration::from_millis(1)).await;
            group.purge_expired();
        }
        if !group.is_empty() {
            violations.report(format!(
                "{}: the registry holds {} entries after the load",
                round.name,
                group.len()
            ));
        }
        for (key, n) in tracker.running.iter().enumerate() {
            if n.load(SeqCst) != 0 {
                violations.report(format!("key {key} still counts a running backend call"));
            }
        }
        let stats = group.stats();
        totals.followers = stats.followers;
        totals.lingered = stats.lingered;
        totals.retried = stats.retried;
        totals.over_capacity = stats.over_capacity;
        totals.forgotten = stats.forgotten;
        totals.timed_out = stats.timed_out;
        // Every backend call that started belongs to a flight, a retry, or a request that
        // called on its own (past a capacity bound or its wait limit).
        let started = tracker.calls.load(SeqCst);
        if started > stats.leaders + stats.retried + stats.fell_through {
            violations.report(format!(
                "{}: {started} backend calls for {} leaders, {} retries, {} lone calls",
                round.name, stats.leaders, stats.retried, stats.fell_through
            ));
        }
        drop(target);
        totals
    });
    drop(runtime);
    totals.backend_calls = tracker.calls.load(SeqCst);
    totals.overlaps = tracker.stale_polls.load(SeqCst);
    totals.beside_drop = tracker.started_beside_a_drop.load(SeqCst);
    totals.backend_dropped = tracker.dropped.load(SeqCst);
    totals.panics_injected = tracker.panics_injected.load(SeqCst);
    totals.errors_injected = tracker.errors_injected.load(SeqCst);
    let ended = tracker.completed.load(SeqCst) + tracker.dropped.load(SeqCst);
    if ended != totals.backend_calls {
        violations.report(format!(
            "{}: {} backend calls started, {ended} ended",
            round.name, totals.backend_calls
        ));
    }
    totals
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Resident set size in bytes (Linux; `None` elsewhere).
fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

// ---------------------------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------------------------

/// The injected panics are expected: keep their messages out of the output, pass others on.
fn quiet_chaos_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|m| m.starts_with("chaos panic"));
            if !ours {
                default(info);
            }
        }));
    });
}

/// The soaks share the process's memory figures: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn soak(size: Size) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    quiet_chaos_panics();
    let started = Instant::now();
    let violations = Arc::new(Violations::default());
    let rounds = rounds(size.keys);
    println!(
        "chaos soak: {} rounds x {} requests over {} Zipf(s={ZIPF_S}) keys, {} clients, seed {SEED:#x}",
        rounds.len(),
        size.requests,
        size.keys,
        size.clients
    );
    let mut all = Totals::default();
    // The first round warms up the allocator, the runtimes and the Zipf table; memory is
    // measured against where it stands after it.
    let mut baseline = None;
    let mut last_rss = 0;
    for (i, round) in rounds.iter().enumerate() {
        let before = rss_bytes().unwrap_or(0);
        let t0 = Instant::now();
        let t = run_round(*round, size, SEED.wrapping_add(i as u64), &violations);
        let after = rss_bytes().unwrap_or(0);
        println!(
            "  {:<48} {:>8} req {:>7} cancelled {:>6} errors {:>5} panics {:>7} backend calls \
             ({} dropped, {} stale polls, {} beside a drop) {:>7} followers {:>6} lingered {:>5} retried | rss {} -> {} | {:.1?}",
            round.name,
            t.requests,
            t.cancelled,
            t.errors,
            t.panics,
            t.backend_calls,
            t.backend_dropped,
            t.overlaps,
            t.beside_drop,
            t.followers,
            t.lingered,
            t.retried,
            mib(before),
            mib(after),
            t0.elapsed()
        );
        // Each round must have exercised what it is about.
        assert_eq!(t.requests, size.requests, "{}", round.name);
        assert!(t.cancelled > 0, "{}: no request was cancelled", round.name);
        assert!(t.panics_injected > 0, "{}: no panic injected", round.name);
        assert!(t.errors_injected > 0, "{}: no error injected", round.name);
        if round.linger.is_some() {
            assert!(t.lingered > 0, "{}: nothing lingered", round.name);
        } else {
            assert!(t.followers > 0, "{}: nothing coalesced", round.name);
        }
        if round.retries > 0 {
            assert!(t.retried > 0, "{}: nothing retried", round.name);
        }
        if round.capacity_bounded() {
            assert!(t.over_capacity > 0, "{}: no capacity bound hit", round.name);
        }
        if round.forget {
            assert!(t.forgotten > 0, "{}: nothing forgotten", round.name);
        }
        if round.follower_timeout.is_some() {
            assert!(t.timed_out > 0, "{}: no follower timed out", round.name);
        }
        baseline.get_or_insert(after);
        last_rss = after;
        all.add(&t);
    }
    let count = violations.count.load(SeqCst);
    let peak = proc_status_kib("VmHWM:").map_or(0, |k| k * 1024);
    let baseline = baseline.unwrap_or(0);
    println!("chaos totals ({:.1?}):", started.elapsed());
    println!("  requests         {}", all.requests);
    println!("  cancelled        {}", all.cancelled);
    println!("  values           {}", all.values);
    println!(
        "  errors seen      {} ({} injected; followers share them)",
        all.errors, all.errors_injected
    );
    println!(
        "  panics seen      {} as errors, {} raised by followers calling alone past their wait \
         limit ({} injected; followers share them)",
        all.panics, all.raised, all.panics_injected
    );
    println!(
        "  backend calls    {} ({} dropped mid-call)",
        all.backend_calls, all.backend_dropped
    );
    println!(
        "  coalescing       {} followers, {} lingered, {} retried, {} over capacity, \
         {} forgotten, {} followers timed out",
        all.followers, all.lingered, all.retried, all.over_capacity, all.forgotten, all.timed_out
    );
    println!(
        "  beside others    {} polls beside a newer call of their key, {} calls started while \
         a cancelled call of their key was being dropped (capacity, forget and wait-limit rounds only)",
        all.overlaps, all.beside_drop
    );
    println!("  violations       {count}");
    println!(
        "  memory           rss after warm-up {}, at the end {}, peak {}",
        mib(baseline),
        mib(last_rss),
        mib(peak)
    );
    assert_eq!(
        count,
        0,
        "invariant violations (first ones): {:#?}",
        violations.first.lock().unwrap()
    );
    // Memory back to its level: no growth with the number of requests. Generous, since the
    // allocator keeps freed pages and thread caches as it likes; a leak of one allocation per
    // request would blow far past it.
    if baseline > 0 {
        let bound = baseline + 64 * 1_048_576;
        assert!(
            last_rss <= bound,
            "resident memory grew from {} to {} (bound {})",
            mib(baseline),
            mib(last_rss),
            mib(bound)
        );
    }
}

/// Fourteen rounds of Zipf load with cancellations, panics and errors, options on and off.
#[test]
fn chaos_soak() {
    soak(default_size());
}

/// The large variant: millions of requests (run with `--release -- --ignored`).
#[test]
#[ignore = "large: run with `cargo test --release --test chaos chaos_soak_large -- --ignored --nocapture`"]
fn chaos_soak_large() {
    soak(big_size());
}

/// When the last waiter of a flight goes away, its call's future is dropped before the key is
/// freed: a new call of the key that arrives while the old future's `Drop` still runs (a
/// backend closing a connection, aborting a query) does not start until that is done, so the
/// backend never sees two calls of one key.
#[test]
fn a_cancelled_call_is_dropped_before_its_key_is_freed() {
    use std::sync::mpsc;

    /// Held by the first call's future: its `Drop` tells the other thread it has begun, then
    /// waits (bounded) to learn whether a new call of the key started meanwhile.
    struct DropProbe {
        dropping: mpsc::Sender<()>,
        new_call: mpsc::Receiver<()>,
        overlapped: Arc<AtomicBool>,
    }
    impl Drop for DropProbe {
        fn drop(&mut self) {
            let _ = self.dropping.send(());
            let started = self.new_call.recv_timeout(Duration::from_millis(500));
            self.overlapped.store(started.is_ok(), SeqCst);
        }
    }

    let group: Group<u8> = Group::new();
    let (dropping_tx, dropping_rx) = mpsc::channel();
    let (new_call_tx, new_call_rx) = mpsc::channel();
    let overlapped = Arc::new(AtomicBool::new(false));
    let probe = DropProbe {
        dropping: dropping_tx,
        new_call: new_call_rx,
        overlapped: Arc::clone(&overlapped),
    };
    let first = group.run(1, move || async move {
        let _probe = probe;
        std::future::pending::<u8>().await
    });
    let other = group.clone();
    let second = std::thread::spawn(move || {
        dropping_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the first call is being dropped");
        // If the key is still held by the cancelled call, this new flight is made but does
        // not start (is not polled) until that call's future is dropped and its entry gone.
        let run = other.run(1, move || async move {
            let _ = new_call_tx.send(());
            2u8
        });
        assert_eq!(futures::executor::block_on(run).ok(), Some(2));
    });
    // Polled once and dropped: the last (only) waiter leaves, cancelling the call.
    assert_eq!(first.now_or_never().map(|r| r.ok()), None);
    second.join().expect("second caller");
    assert!(
        !overlapped.load(SeqCst),
        "a new call of the key started while the cancelled call's future was being dropped"
    );
}

/// The same, when the new flight changes hands before it starts: its leader is dropped while
/// the key's cancelled call is still being dropped, and a follower takes the new call over. The
/// wait goes with the call, so the follower does not start it beside the old one (before the
/// fix, the soak's threaded rounds saw that about once in 4 million requests).
#[test]
fn a_follower_taking_over_a_waiting_flight_waits_for_the_drop_too() {
    use std::sync::mpsc;

    struct DropProbe {
        dropping: mpsc::Sender<()>,
        new_call: mpsc::Receiver<()>,
        overlapped: Arc<AtomicBool>,
    }
    impl Drop for DropProbe {
        fn drop(&mut self) {
            let _ = self.dropping.send(());
            let started = self.new_call.recv_timeout(Duration::from_millis(500));
            self.overlapped.store(started.is_ok(), SeqCst);
        }
    }

    let group: Group<u8> = Group::new();
    let (dropping_tx, dropping_rx) = mpsc::channel();
    let (new_call_tx, new_call_rx) = mpsc::channel();
    let overlapped = Arc::new(AtomicBool::new(false));
    let probe = DropProbe {
        dropping: dropping_tx,
        new_call: new_call_rx,
        overlapped: Arc::clone(&overlapped),
    };
    let first = group.run(1, move || async move {
        let _probe = probe;
        std::future::pending::<u8>().await
    });
    let other = group.clone();
    let second = std::thread::spawn(move || {
        dropping_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the first call is being dropped");
        // A new flight, waiting for the cancelled call's drop; a follower joins it...
        let leader = other.run(1, move || async move {
            let _ = new_call_tx.send(());
            2u8
        });
        let follower = other.run(1, || async { 3u8 });
        assert!(leader.is_leader() && !follower.is_leader());
        // ...and its leader leaves before the call has started: the follower takes it over.
        drop(leader);
        assert_eq!(futures::executor::block_on(follower).ok(), Some(2));
    });
    assert_eq!(first.now_or_never().map(|r| r.ok()), None);
    second.join().expect("second caller");
    assert!(
        !overlapped.load(SeqCst),
        "the new call started while the cancelled call's future was being dropped"
    );
}
