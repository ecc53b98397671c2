//! The waiters workload again, recording which of the two workers finished each follower: a
//! wave is either run by one worker alone or split between both, and on a small virtual
//! machine the two kinds of wave take very different times (a worker woken to steal tasks may
//! wait for a CPU). Prints, per contender whose followers sleep until woken, how many waves were
//! of each kind, and their median times from the backend's answer to the first waiter done and
//! to the last. Nothing is written for the report.
//!
//! It first measures the runtime alone: how long a task's `Waker::wake` takes when the other
//! worker is parked, for the first task it wakes (which goes to the worker's own next-task
//! slot) and the second (which tokio follows by waking the parked worker to steal it). That
//! second wake is on the path of every coalescer that wakes its followers together.
//!
//! `cargo bench --bench worker_split` (about ten seconds; `SPLIT_WAVES` sets the waves, 41 by
//! default, the first of which warms up; `SPLIT_FOLLOWERS` the followers, 1,000 by default)

#[allow(dead_code)]
mod support;

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::sync::Notify;

use support::{epoch_nanos, for_each, waiters_settle, Backend, Client, Gate, Gated, Visit};
use support::{Kind, RESILIENCE, WAITERS_KEY};

/// Followers per wave: `SPLIT_FOLLOWERS`, or 1,000.
fn followers() -> usize {
    std::env::var("SPLIT_FOLLOWERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000)
}

thread_local! {
    /// The runtime worker this thread is (0 or 1); `usize::MAX` elsewhere.
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// One wave: when each waiter finished (ns after the gate opened) and on which worker.
type Finished = Vec<(u64, usize)>;

async fn wave<C: Client>(client: &C, gate: &'static Gate) -> Finished {
    gate.reset();
    let total = followers() + 1;
    let entered = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(Notify::new());
    let left = Arc::new(AtomicUsize::new(total));
    let all_done = Arc::new(Notify::new());
    // Lock-free, so that recording does not make the followers contend: each takes the next
    // cell and stores its time and worker in it.
    let finished: Arc<[AtomicU64]> = (0..total).map(|_| AtomicU64::new(0)).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let released = Arc::new(AtomicU64::new(0));
    for _ in 0..total {
        let client = client.clone();
        let (entered, all_in) = (entered.clone(), all_in.clone());
        let (left, all_done) = (left.clone(), all_done.clone());
        let (finished, next, released) = (finished.clone(), next.clone(), released.clone());
        tokio::spawn(async move {
            let mut call = pin!(client.call(WAITERS_KEY));
            let mut first = true;
            let out = poll_fn(|cx| {
                let poll = call.as_mut().poll(cx);
                if std::mem::take(&mut first) && entered.fetch_add(1, Ordering::AcqRel) + 1 == total
                {
                    all_in.notify_one();
                }
                poll
            })
            .await;
            black_box(out);
            let at = epoch_nanos().saturating_sub(released.load(Ordering::Acquire));
            let worker = WORKER.with(Cell::get) as u64 & 1;
            finished[next.fetch_add(1, Ordering::Relaxed)]
                .store(at << 1 | worker, Ordering::Release);
            if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                all_done.notify_one();
            }
        });
    }
    all_in.notified().await;
    tokio::time::sleep(waiters_settle(total)).await;
    released.store(epoch_nanos(), Ordering::Release);
    gate.release();
    all_done.notified().await;
    let finished = finished.iter().map(|f| f.load(Ordering::Acquire));
    finished.map(|f| (f >> 1, (f & 1) as usize)).collect()
}

struct Split<'a> {
    rt: &'a Runtime,
    gate: &'static Gate,
    waves: usize,
}

impl<K: Kind> Visit<K> for Split<'_> {
    fn visit<C: Client>(&mut self, name: &'static str, client: C, _: Backend<K>) {
        // Its followers poll themselves: every wave keeps both workers busy.
        if name == RESILIENCE {
            return;
        }
        let (mut alone, mut split) = (Vec::new(), Vec::new());
        for i in 0..self.waves {
            let (client, gate) = (client.clone(), self.gate);
            let finished = self
                .rt
                .block_on(
                    async move { tokio::spawn(async move { wave(&client, gate).await }).await },
                )
                .expect("wave task");
            if i == 0 {
                continue; // warm-up
            }
            let first = finished.iter().map(|f| f.0).min().unwrap_or(0);
            let last = finished.iter().map(|f| f.0).max().unwrap_or(0);
            let on_first = finished.iter().filter(|f| f.1 == 0).count();
            match on_first == 0 || on_first == finished.len() {
                true => alone.push((first, last)),
                false => split.push((first, last)),
            }
        }
        let (a, s) = (alone.len(), split.len());
        println!(
            "{name:28} one worker: {a:3} waves, {}    both workers: {s:3} waves, {}",
            medians(alone),
            medians(split),
        );
    }
}

/// "median first / last" of waves' (first, last) times, in µs.
fn medians(waves: Vec<(u64, u64)>) -> String {
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).map_or(0.0, |&ns| ns as f64 / 1e3)
    };
    let first = median(waves.iter().map(|w| w.0).collect());
    let last = median(waves.iter().map(|w| w.1).collect());
    format!("median first {first:6.1} µs, last {last:7.1} µs")
}

/// A task that parks until `open`, leaving its waker in `waker`.
async fn parked(waker: Arc<Mutex<Option<Waker>>>, open: Arc<AtomicBool>) {
    poll_fn(|cx| {
        *waker.lock().unwrap() = Some(cx.waker().clone());
        match open.load(Ordering::Acquire) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    })
    .await
}

/// How long `wake` takes, from a worker, for the first and the second of two parked tasks,
/// once the other worker has parked too (after the same settling pause as a waiters wave).
async fn wake_pair() -> (Duration, Duration) {
    let open = Arc::new(AtomicBool::new(false));
    let wakers: Vec<_> = (0..2).map(|_| Arc::new(Mutex::new(None))).collect();
    let tasks: Vec<_> = wakers
        .iter()
        .map(|w| tokio::spawn(parked(w.clone(), open.clone())))
        .collect();
    while wakers.iter().any(|w| w.lock().unwrap().is_none()) {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(waiters_settle(2)).await;
    open.store(true, Ordering::Release);
    let taken: Vec<Waker> = wakers
        .iter()
        .filter_map(|w| w.lock().unwrap().take())
        .collect();
    let mut took = [Duration::ZERO; 2];
    for (waker, took) in taken.into_iter().zip(&mut took) {
        let start = Instant::now();
        waker.wake();
        *took = start.elapsed();
    }
    for task in tasks {
        task.await.expect("parked task");
    }
    (took[0], took[1])
}

fn main() {
    let waves = match support::bench_mode() {
        true => std::env::var("SPLIT_WAVES")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(41),
        // `cargo test --benches`: one wave after the warm-up shows it works.
        false => 2,
    };
    let next = AtomicUsize::new(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || WORKER.with(|w| w.set(next.fetch_add(1, Ordering::Relaxed))))
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Only the two workers start threads here (nothing runs on the blocking pool), so they are
    // numbered 0 and 1.
    let pairs: Vec<_> = (0..waves)
        .map(|_| rt.block_on(async { tokio::spawn(wake_pair()).await.expect("wake task") }))
        .collect();
    let median = |mut v: Vec<Duration>| {
        v.sort_unstable();
        v[v.len() / 2].as_nanos() as f64 / 1e3
    };
    println!(
        "tokio alone, 2 workers, one idle: Waker::wake of a first parked task {:.1} µs, of a \
         second {:.1} µs (medians of {waves})",
        median(pairs.iter().map(|p| p.0).collect()),
        median(pairs.iter().map(|p| p.1).collect()),
    );
    let gate = Gate::leak();
    println!(
        "waiters, N = {}, 2 workers: time from the answer to the first and the last waiter done",
        followers()
    );
    for_each(
        Gated(gate),
        false,
        &mut Split {
            rt: &rt,
            gate,
            waves,
        },
    );
}
