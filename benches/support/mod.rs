//! What the bench binaries share: simulated backends, one client per contender, the
//! workloads' request patterns, and where results go next to criterion's.
//!
//! Every contender serves the same request: a `u64` key in, a `u64` value out, through the same
//! backend future (a `&'static` call counter and a backend kind chosen at compile time, so the
//! bare service pays nothing it would not pay in production).

pub mod blog;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

pub mod waves;

// ---------------------------------------------------------------------------------------------
// Backends

/// What the backend does between being called and answering.
pub trait Kind: Copy + Send + Sync + 'static {
    fn run(self) -> impl Future<Output = ()> + Send + 'static;
}

/// Answers at once (solo).
#[derive(Clone, Copy)]
pub struct Immediate;
impl Kind for Immediate {
    fn run(self) -> impl Future<Output = ()> + Send + 'static {
        std::future::ready(())
    }
}

/// Yields to the scheduler once (unique).
#[derive(Clone, Copy)]
pub struct YieldOnce;
impl Kind for YieldOnce {
    fn run(self) -> impl Future<Output = ()> + Send + 'static {
        tokio::task::yield_now()
    }
}

/// Answers after a tokio sleep (hot, zipf).
#[derive(Clone, Copy)]
pub struct Latency(pub Duration);
impl Kind for Latency {
    fn run(self) -> impl Future<Output = ()> + Send + 'static {
        tokio::time::sleep(self.0)
    }
}

/// Answers when the bench opens the gate (waiters).
#[derive(Clone, Copy)]
pub struct Gated(pub &'static Gate);
impl Kind for Gated {
    fn run(self) -> impl Future<Output = ()> + Send + 'static {
        self.0.wait()
    }
}

/// Never answers (memory: keeps flights in flight).
#[derive(Clone, Copy)]
pub struct Never;
impl Kind for Never {
    fn run(self) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }
}

/// The simulated backend: counts its calls, then behaves as its kind says.
#[derive(Clone, Copy)]
pub struct Backend<K> {
    calls: &'static AtomicU64,
    kind: K,
}

impl<K: Kind> Backend<K> {
    /// A backend with a counter of its own. The counter is leaked so that the backend is
    /// `Copy` and calling it costs no reference-count traffic; a bench makes a few dozen.
    pub fn new(kind: K) -> Self {
        Backend {
            calls: Box::leak(Box::new(AtomicU64::new(0))),
            kind,
        }
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// One backend call. Counted when first polled, so a future that is made but never run
    /// (async_singleflight takes the future of every caller) is not a call.
    pub async fn call(self, key: u64) -> Result<u64, Infallible> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.kind.run().await;
        Ok(key)
    }
}

/// A one-shot gate for the waiters and fanout workloads, reset before each wave.
pub struct Gate {
    open: AtomicBool,
    notify: Notify,
}

impl Gate {
    pub fn leak() -> &'static Gate {
        Box::leak(Box::new(Gate {
            open: AtomicBool::new(false),
            notify: Notify::new(),
        }))
    }

    async fn wait(&'static self) {
        let mut notified = pin!(self.notify.notified());
        notified.as_mut().enable();
        // A flight started after the release (a peer that let a late caller lead again)
        // must not hang the bench: it answers at once, and its call is counted.
        if !self.open.load(Ordering::Acquire) {
            notified.await;
        }
    }

    pub fn reset(&self) {
        self.open.store(false, Ordering::Release);
    }

    pub fn release(&self) {
        self.open.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// Monotonic nanoseconds since the first call in this process.
pub fn epoch_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------------------------
// Contenders

/// One way of serving a request: a clone is taken per request, as a server does per task.
pub trait Client: Clone + Send + Sync + 'static {
    fn call(self, key: u64) -> impl Future<Output = u64> + Send + 'static;
}

pub const BARE: &str = "bare";
pub const OURS_LAYER: &str = "tower-coalesce";
pub const OURS_GROUP: &str = "tower-coalesce-group";
pub const RESILIENCE: &str = "tower-resilience-coalesce";
pub const SFA: &str = "singleflight-async";
pub const ASF: &str = "async_singleflight";
pub const BLOG: &str = "blog-mutex-shared";

/// Every contender, in report order (the bare service first).
pub const CONTENDERS: [&str; 7] = [BARE, OURS_LAYER, OURS_GROUP, RESILIENCE, SFA, ASF, BLOG];

/// A `tower::Service` called the way a server calls it: a clone, `ready()`, `call()`.
#[derive(Clone)]
pub struct Tower<S>(S);

impl<S> Client for Tower<S>
where
    S: Service<u64, Response = u64> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Debug + Send,
{
    fn call(self, key: u64) -> impl Future<Output = u64> + Send + 'static {
        let call = self.0.oneshot(key);
        async move { call.await.expect("the backend does not fail") }
    }
}

#[derive(Clone)]
pub struct OursGroup<K> {
    group: tower_coalesce::Group<u64>,
    backend: Backend<K>,
}

impl<K: Kind> Client for OursGroup<K> {
    fn call(self, key: u64) -> impl Future<Output = u64> + Send + 'static {
        let backend = self.backend;
        let run = self.group.run(key, move || backend.call(key));
        async move {
            let Ok(out) = run.await.expect("the backend does not panic");
            out
        }
    }
}

#[derive(Clone)]
pub struct Sfa<K> {
    flights: Arc<singleflight_async::SingleFlight<u64, Result<u64, Infallible>>>,
    backend: Backend<K>,
}

impl<K: Kind> Client for Sfa<K> {
    fn call(self, key: u64) -> impl Future<Output = u64> + Send + 'static {
        let backend = self.backend;
        let work = self.flights.work(key, move || backend.call(key));
        async move {
            let Ok(out) = work.await;
            out
        }
    }
}

#[derive(Clone)]
pub struct Asf<K> {
    group: Arc<async_singleflight::Group<u64, u64, Infallible>>,
    backend: Backend<K>,
}

impl<K: Kind> Client for Asf<K> {
    async fn call(self, key: u64) -> u64 {
        self.group
            .work(&key, self.backend.call(key))
            .await
            .expect("the backend does not fail")
    }
}

#[derive(Clone)]
pub struct Blog<K> {
    registry: Arc<blog::Registry<u64, Result<u64, Infallible>>>,
    backend: Backend<K>,
}

impl<K: Kind> Client for Blog<K> {
    async fn call(self, key: u64) -> u64 {
        let backend = self.backend;
        let Ok(out) = self.registry.get(key, move || backend.call(key)).await;
        out
    }
}

pub fn bare<K: Kind>(backend: Backend<K>) -> impl Client {
    Tower(service_fn(move |key: u64| backend.call(key)))
}

pub fn ours_layer<K: Kind>(backend: Backend<K>) -> impl Client {
    Tower(
        ServiceBuilder::new()
            .layer(tower_coalesce::CoalesceLayer::new(|key: &u64| Some(*key)))
            .service(service_fn(move |key: u64| backend.call(key))),
    )
}

pub fn ours_group<K: Kind>(backend: Backend<K>) -> impl Client {
    OursGroup {
        group: tower_coalesce::Group::new(),
        backend,
    }
}

pub fn resilience<K: Kind>(backend: Backend<K>) -> impl Client {
    Tower(
        ServiceBuilder::new()
            .layer(tower_resilience_coalesce::CoalesceLayer::new(
                |key: &u64| *key,
            ))
            .service(service_fn(move |key: u64| backend.call(key))),
    )
}

pub fn sfa<K: Kind>(backend: Backend<K>) -> impl Client {
    Sfa {
        flights: Arc::new(singleflight_async::SingleFlight::new()),
        backend,
    }
}

pub fn asf<K: Kind>(backend: Backend<K>) -> impl Client {
    Asf {
        group: Arc::new(async_singleflight::Group::new()),
        backend,
    }
}

pub fn blog<K: Kind>(backend: Backend<K>) -> impl Client {
    Blog {
        registry: Arc::new(blog::Registry::new()),
        backend,
    }
}

/// Called once per contender with a fresh client over a fresh backend.
pub trait Visit<K: Kind> {
    fn visit<C: Client>(&mut self, name: &'static str, client: C, backend: Backend<K>);
}

/// Visits every contender in [`CONTENDERS`] order; `with_bare: false` skips the bare service
/// (the waiters workload has no meaning without coalescing).
pub fn for_each<K: Kind, V: Visit<K>>(kind: K, with_bare: bool, v: &mut V) {
    let fresh = || Backend::new(kind);
    if with_bare {
        let b = fresh();
        v.visit(BARE, bare(b), b);
    }
    let b = fresh();
    v.visit(OURS_LAYER, ours_layer(b), b);
    let b = fresh();
    v.visit(OURS_GROUP, ours_group(b), b);
    let b = fresh();
    v.visit(RESILIENCE, resilience(b), b);
    let b = fresh();
    v.visit(SFA, sfa(b), b);
    let b = fresh();
    v.visit(ASF, asf(b), b);
    let b = fresh();
    v.visit(BLOG, blog(b), b);
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// The runtime's workers: 2, or `BENCH_WORKERS` (`BENCH_WORKERS=1` reruns a workload on one
/// worker, to tell the coalescer's cost from the runtime's cost of waking a second one; see
/// "waiters" in the README's Performance section).
pub fn workers() -> usize {
    std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2)
}

/// The runtime every timed workload runs on: multi-thread, 2 workers.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers())
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Counts finished request tasks and wakes the wave's driver once, when the last one ends:
/// a driver awaiting each `JoinHandle` in turn would be woken (and compete for the workers)
/// up to once per request.
struct Finish {
    left: AtomicUsize,
    failed: AtomicBool,
    all_done: Notify,
}

impl Finish {
    fn new(tasks: usize) -> Arc<Self> {
        Arc::new(Finish {
            left: AtomicUsize::new(tasks),
            failed: AtomicBool::new(false),
            all_done: Notify::new(),
        })
    }

    async fn wait(&self) {
        self.all_done.notified().await;
        assert!(
            !self.failed.load(Ordering::Acquire),
            "a request task panicked"
        );
    }
}

/// Held by a request task; counts it as finished when dropped, even by a panic.
struct Done(Arc<Finish>);

impl Drop for Done {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::Release);
        }
        if self.0.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_done.notify_one();
        }
    }
}

/// One wave: a task per request (as a server has per connection), all spawned at once.
/// Returns the wall time from the first spawn to the end of the last request.
pub async fn wave<C: Client>(client: &C, keys: &[u64]) -> Duration {
    let finish = Finish::new(keys.len());
    let start = Instant::now();
    for &key in keys {
        let client = client.clone();
        let done = Done(finish.clone());
        tokio::spawn(async move {
            black_box(client.call(key).await);
            drop(done);
        });
    }
    finish.wait().await;
    start.elapsed()
}

/// The key every waiter asks for.
pub const WAITERS_KEY: u64 = 7;

/// How long the waiters workload lets joiners settle after their first poll: a peer that
/// takes an async lock on its way in may not be registered yet when first polled, and its
/// lock's queue drains one task at a time (1 ms, plus 100 ns per waiter).
pub fn waiters_settle(waiters: usize) -> Duration {
    Duration::from_millis(1) + Duration::from_nanos(100 * waiters as u64)
}

/// One waiters wave: a leader and `followers` followers of one gated flight. Returns the time
/// from the gate opening (the backend's answer) to the last waiter getting its result.
pub async fn waiters_wave<C: Client>(
    client: &C,
    gate: &'static Gate,
    followers: usize,
) -> Duration {
    gate.reset();
    let total = followers + 1;
    let entered = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(Notify::new());
    let last = Arc::new(AtomicU64::new(0));
    let finish = Finish::new(total);
    for _ in 0..total {
        let client = client.clone();
        let (entered, all_in, last) = (entered.clone(), all_in.clone(), last.clone());
        let done = Done(finish.clone());
        tokio::spawn(async move {
            let mut call = pin!(client.call(WAITERS_KEY));
            let mut first = true;
            let out = poll_fn(|cx| {
                let poll = call.as_mut().poll(cx);
                if first {
                    first = false;
                    if entered.fetch_add(1, Ordering::AcqRel) + 1 == total {
                        all_in.notify_one();
                    }
                }
                poll
            })
            .await;
            last.fetch_max(epoch_nanos(), Ordering::AcqRel);
            black_box(out);
            drop(done);
        });
    }
    all_in.notified().await;
    tokio::time::sleep(waiters_settle(total)).await;
    // The answer exists from the moment the gate opens (the backend's I/O completing): from
    // there, waking the leader, publishing and waking the followers are all the coalescer's
    // (and the runtime's) doing. A design that wakes every waiter on the backend's event
    // (`Shared`) and one that wakes only its driver are then timed alike.
    let released = epoch_nanos();
    gate.release();
    finish.wait().await;
    Duration::from_nanos(last.load(Ordering::Acquire).saturating_sub(released))
}

/// Fan-out without a scheduler: a leader and `followers` followers of one gated flight are
/// made and polled once on this thread (no-op waker); the gate opens; returns the time to
/// poll the leader to its answer and then every follower until it has its copy. This is the
/// coalescer's own cost per follower, without tokio waking and scheduling N tasks.
pub fn fanout<C: Client>(client: &C, gate: &'static Gate, followers: usize) -> Duration {
    gate.reset();
    // The first to join leads.
    let mut waiting = fanout_join(client, followers + 1);
    let leader = waiting.remove(0);
    gate.release();
    let start = Instant::now();
    let done = fanout_timed(leader, waiting);
    let elapsed = start.elapsed();
    drop(done);
    elapsed
}

/// `waiters` requests for one key join its flight, each made, boxed and polled once. A
/// function of its own so that a profiler can count it (`--toggle-collect='*fanout_join*'`).
#[inline(never)]
fn fanout_join<C: Client>(
    client: &C,
    waiters: usize,
) -> Vec<Pin<Box<impl Future<Output = u64> + Send + 'static>>> {
    (0..waiters)
        .map(|_| {
            let mut follower = Box::pin(client.clone().call(WAITERS_KEY));
            assert!(poll_once(&mut follower).is_pending(), "the gate is closed");
            follower
        })
        .collect()
}

/// The timed part of [`fanout`], a function of its own so that a profiler can count just it
/// (`valgrind --tool=callgrind --toggle-collect='*fanout_timed*'`). Returns the finished
/// futures, so that freeing them is not timed.
#[inline(never)]
fn fanout_timed<F: Future + Unpin>(mut leader: F, mut waiting: Vec<F>) -> Vec<F> {
    assert!(poll_once(&mut leader).is_ready(), "the gate is open");
    let mut done = Vec::with_capacity(waiting.len() + 1);
    done.push(leader);
    // Peers that hand a lock from waiter to waiter answer in their queue's order: poll in
    // passes until everyone has answered (one pass for the others).
    for _ in 0..=waiting.len() {
        let mut still = Vec::new();
        for mut follower in waiting.drain(..) {
            match poll_once(&mut follower).is_ready() {
                true => done.push(follower),
                false => still.push(follower),
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
    }
    assert!(waiting.is_empty(), "every follower answered");
    done
}

/// Zipf(s) over `n` keys (rank 1 most popular), sampled by inverting the CDF.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let weights: Vec<f64> = (1..=n).map(|rank| 1.0 / (rank as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Zipf { cdf }
    }

    /// A key in `0..n`; key 0 is the most popular.
    pub fn sample<R: Rng>(&self, rng: &mut R) -> u64 {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as u64
    }
}

/// `requests` keys drawn from Zipf(s) over `keys` keys, the same sequence in every run.
pub fn zipf_keys(requests: usize, keys: usize, s: f64, seed: u64) -> Arc<[u64]> {
    let zipf = Zipf::new(keys, s);
    let mut rng = StdRng::seed_from_u64(seed);
    (0..requests).map(|_| zipf.sample(&mut rng)).collect()
}

// ---------------------------------------------------------------------------------------------
// Results next to criterion's

/// Where criterion writes (`CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else
/// `target/criterion` in this package).
pub fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion")
}

/// Whether this process is a real bench run (`cargo bench`), not `cargo test`'s one-shot nor
/// a profiling run (`--profile-time`): only a real run writes results for the report.
pub fn bench_mode() -> bool {
    let mut args = std::env::args();
    args.any(|a| a == "--bench") && !std::env::args().any(|a| a == "--profile-time")
}

/// Merges `update` (workload → contender → value) into the JSON file `name` in
/// [`criterion_dir`], so a filtered run keeps the results of the others.
pub fn merge_json(name: &str, update: &BTreeMap<String, BTreeMap<String, Value>>) {
    let path = criterion_dir().join(name);
    let mut doc: Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    for (workload, rows) in update {
        let slot = doc
            .as_object_mut()
            .expect("object")
            .entry(workload.clone())
            .or_insert_with(|| json!({}));
        if !slot.is_object() {
            *slot = json!({});
        }
        for (contender, value) in rows {
            slot.as_object_mut()
                .expect("object")
                .insert(contender.clone(), value.clone());
        }
    }
    std::fs::create_dir_all(criterion_dir()).expect("criterion dir");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).expect("json")).expect("write json");
}

/// Backend calls seen per wave, per workload and contender.
#[derive(Default)]
pub struct CallLog {
    rows: Mutex<BTreeMap<String, BTreeMap<String, WaveCalls>>>,
}

#[derive(Clone, Copy)]
pub struct WaveCalls {
    pub requests_per_wave: u64,
    pub waves: u64,
    pub calls: u64,
    pub min: u64,
    pub max: u64,
}

impl CallLog {
    /// Records `waves` waves of `requests_per_wave` requests that made `calls` backend calls.
    pub fn record(
        &self,
        workload: &str,
        contender: &str,
        requests_per_wave: u64,
        waves: u64,
        calls: u64,
    ) {
        if waves == 0 {
            return;
        }
        let mut rows = self.rows.lock().expect("call log");
        let row = rows
            .entry(workload.to_string())
            .or_default()
            .entry(contender.to_string())
            .or_insert(WaveCalls {
                requests_per_wave,
                waves: 0,
                calls: 0,
                min: u64::MAX,
                max: 0,
            });
        row.waves += waves;
        row.calls += calls;
        row.min = row.min.min(calls / waves);
        row.max = row.max.max(calls.div_ceil(waves));
    }

    pub fn write(&self, name: &str) {
        let rows = self.rows.lock().expect("call log");
        let update = rows
            .iter()
            .map(|(workload, by)| {
                let by = by
                    .iter()
                    .map(|(contender, w)| {
                        let value = json!({
                            "requests_per_wave": w.requests_per_wave,
                            "waves": w.waves,
                            "calls_total": w.calls,
                            "calls_per_wave_mean": w.calls as f64 / w.waves as f64,
                            "calls_per_wave_min": w.min,
                            "calls_per_wave_max": w.max,
                        });
                        (contender.clone(), value)
                    })
                    .collect();
                (workload.clone(), by)
            })
            .collect();
        merge_json(name, &update);
    }

    /// One line per workload and contender, for the terminal.
    pub fn print(&self) {
        let rows = self.rows.lock().expect("call log");
        for (workload, by) in rows.iter() {
            for (contender, w) in by {
                println!(
                    "backend calls  {workload:<14} {contender:<27} {:>10.1} per wave of {} (min {}, max {}, {} waves)",
                    w.calls as f64 / w.waves as f64,
                    w.requests_per_wave,
                    w.min,
                    w.max,
                    w.waves
                );
            }
        }
    }
}

/// Which machine ran the benches, for the report.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let rustc =
        std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .arg("-V")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let mut commit = git(&["rev-parse", "--short", "HEAD"]);
    if !git(&["status", "--porcelain", "--", "src"]).is_empty() {
        commit.push_str(" + uncommitted src/ changes");
    }
    json!({
        "commit": commit,
        "cpu": cpu,
        "nproc": nproc,
        "kernel": kernel,
        "rustc": rustc,
        "date_utc": utc_now(),
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        "runtime": format!("tokio multi-thread, {} workers", workers()),
    })
}

/// `YYYY-MM-DD HH:MM UTC`, without a date crate (Howard Hinnant's civil-from-days).
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Polls `fut` once with a waker that does nothing; for the memory bench, which parks
/// futures in place without a runtime driving them.
pub fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(fut).poll(&mut cx)
}
