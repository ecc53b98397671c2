//! The waiters workload at N = 1,000 again, recording which of the two workers finished each
//! follower: a wave is either run by one worker alone or split between both, and on a small
//! virtual machine the two kinds of wave take very different times (a worker woken to steal
//! tasks may wait for a CPU). Prints, per contender whose followers sleep until woken, how many
//! waves were of each kind and their median time from the backend's answer to the last
//! follower. Nothing is written for the report.
//!
//! `cargo bench --bench worker_split` (about ten seconds; `SPLIT_WAVES` sets the waves, 41 by
//! default, the first of which warms up)

#[allow(dead_code)]
mod support;

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Runtime;
use tokio::sync::Notify;

use support::{epoch_nanos, for_each, waiters_settle, Backend, Client, Gate, Gated, Visit};
use support::{Kind, RESILIENCE, WAITERS_KEY};

const FOLLOWERS: usize = 1_000;

thread_local! {
    /// The runtime worker this thread is (0 or 1); `usize::MAX` elsewhere.
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// One wave: when each waiter finished (ns after the gate opened) and on which worker.
type Finished = Vec<(u64, usize)>;

async fn wave<C: Client>(client: &C, gate: &'static Gate) -> Finished {
    gate.reset();
    let total = FOLLOWERS + 1;
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
            let last = finished.iter().map(|f| f.0).max().unwrap_or(0);
            let on_first = finished.iter().filter(|f| f.1 == 0).count();
            match on_first == 0 || on_first == finished.len() {
                true => alone.push(last),
                false => split.push(last),
            }
        }
        let median = |mut v: Vec<u64>| {
            v.sort_unstable();
            v.get(v.len() / 2).map_or(0.0, |&ns| ns as f64 / 1e3)
        };
        let (a, s) = (alone.len(), split.len());
        println!(
            "{name:28} one worker: {a:3} waves, median {:7.1} µs    both workers: {s:3} waves, median {:7.1} µs",
            median(alone),
            median(split),
        );
    }
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
    let gate = Gate::leak();
    println!("waiters, N = {FOLLOWERS}, 2 workers: time from the answer to the last follower");
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
