//! The solo, unique, hot, zipf and waiters workloads of `overhead` again, as paired rounds:
//! each round runs one batch (solo: 20,000 sequential calls; waiters: 21 waves, of which the
//! median counts; the others: one wave) of every contender, back to back, starting with a
//! different contender each round. A ratio is taken within a round, between runs seconds
//! apart, and the report gives the median over the rounds.
//!
//! Criterion (in `overhead`) times each contender for a few seconds, one after the other, so
//! a shared machine's load can shift between the baseline and the contender; here every ratio
//! compares runs made under the same load. Writes
//! `target/criterion/tower-coalesce-paired.json`, which
//! `cargo run --release --example bench_report` reports.
//!
//! `cargo bench --bench paired` (about a minute; `PAIRED_ROUNDS` sets the rounds, 15 by
//! default; `PAIRED_ONLY=<workload prefix>` and `PAIRED_CONTENDERS=<name prefix>,...` narrow
//! it, e.g. to profile one contender under `perf stat`; `BENCH_WORKERS` sets the runtime's
//! workers, 2 by default. A run with either of the last two set only prints its results.)

#[allow(dead_code)]
mod support;

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::runtime::Runtime;

use support::waves::{
    HOT_LATENCY, HOT_REQUESTS, UNIQUE_REQUESTS, ZIPF_KEYS, ZIPF_LATENCY, ZIPF_REQUESTS, ZIPF_S,
};
use support::{
    for_each, waiters_wave, wave, zipf_keys, Backend, Client, Gate, Gated, Immediate, Kind,
    Latency, Visit, YieldOnce, WAITERS_KEY,
};

/// Waiters waves per batch: one wave at small N takes microseconds, at the mercy of a worker's
/// wake-up; the batch counts its median wave.
const WAITERS_WAVES: usize = 21;

/// Sequential calls per solo batch: long enough (about a millisecond) that the clock's cost
/// and a stray preemption do not count.
const SOLO_CALLS: u64 = 20_000;

type Batch = Pin<Box<dyn Future<Output = Duration> + Send>>;

/// What one batch of a workload is.
#[derive(Clone)]
enum Work {
    /// `SOLO_CALLS` sequential calls from one task, distinct keys.
    Solo,
    /// One wave of concurrent requests, one task each.
    Wave(Arc<[u64]>),
    /// `WAITERS_WAVES` waves of a leader and this many followers of one gated flight, each
    /// timed from the gate opening to the last waiter's answer.
    Waiters(&'static Gate, usize),
}

/// One contender on one workload.
struct Runner {
    name: &'static str,
    /// Makes the future that runs and times one batch.
    batch: Box<dyn Fn() -> Batch>,
    backend_calls: Box<dyn Fn() -> u64>,
}

struct Collect {
    work: Work,
    runners: Vec<Runner>,
}

impl<K: Kind> Visit<K> for Collect {
    fn visit<C: Client>(&mut self, name: &'static str, client: C, backend: Backend<K>) {
        let work = self.work.clone();
        let batch = move || -> Batch {
            let (client, work) = (client.clone(), work.clone());
            Box::pin(async move {
                match work {
                    Work::Solo => {
                        let start = Instant::now();
                        for key in 0..SOLO_CALLS {
                            black_box(client.clone().call(key).await);
                        }
                        start.elapsed()
                    }
                    Work::Wave(keys) => wave(&client, &keys).await,
                    Work::Waiters(gate, followers) => {
                        let mut waves = Vec::with_capacity(WAITERS_WAVES);
                        for _ in 0..WAITERS_WAVES {
                            waves.push(waiters_wave(&client, gate, followers).await);
                        }
                        waves.sort();
                        waves[WAITERS_WAVES / 2]
                    }
                }
            })
        };
        self.runners.push(Runner {
            name,
            batch: Box::new(batch),
            backend_calls: Box::new(move || backend.calls()),
        });
    }
}

/// Runs `rounds` rounds of one batch per contender and returns, per contender, the time of
/// each round's batch (per call for solo) and the backend calls per batch.
fn rounds_of<K: Kind>(rt: &Runtime, work: Work, kind: K, rounds: usize) -> Value {
    let (per_call, with_bare) = match &work {
        Work::Solo => (SOLO_CALLS as f64, true),
        Work::Wave(_) => (1.0, true),
        // Nothing to coalesce without a coalescer: no bare service.
        Work::Waiters(..) => (1.0, false),
    };
    let mut collect = Collect {
        work,
        runners: Vec::new(),
    };
    for_each(kind, with_bare, &mut collect);
    let wanted = std::env::var("PAIRED_CONTENDERS").unwrap_or_default();
    let runners: Vec<Runner> = collect
        .runners
        .into_iter()
        .filter(|r| wanted.is_empty() || wanted.split(',').any(|w| r.name.starts_with(w)))
        .collect();
    // A batch is spawned, as a server's requests are tasks (not `block_on`).
    let run = |runner: &Runner| {
        let batch = (runner.batch)();
        rt.block_on(async move { tokio::spawn(batch).await.expect("batch task") })
    };
    for runner in &runners {
        run(runner); // warm-up: allocator, runtime, registry
    }
    let before: Vec<u64> = runners.iter().map(|r| (r.backend_calls)()).collect();
    let n = runners.len();
    let mut times = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for i in 0..n {
            let which = (round + i) % n;
            let elapsed = run(&runners[which]);
            times[which].push(elapsed.as_nanos() as f64 / per_call);
        }
    }
    let mut out = serde_json::Map::new();
    for (i, runner) in runners.iter().enumerate() {
        let calls = ((runner.backend_calls)() - before[i]) as f64 / rounds as f64;
        out.insert(
            runner.name.to_string(),
            json!({ "ns": times[i], "backend_calls_per_batch": calls }),
        );
    }
    Value::Object(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() % 2 {
        1 => v[mid],
        _ => (v[mid - 1] + v[mid]) / 2.0,
    }
}

fn main() {
    // `cargo test --benches` runs this once without `--bench`: one round shows it works.
    let rounds: usize = match support::bench_mode() {
        true => std::env::var("PAIRED_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(15),
        false => 1,
    };
    let rt = support::runtime();
    let unique: Arc<[u64]> = (0..UNIQUE_REQUESTS as u64).collect();
    let hot: Arc<[u64]> = vec![WAITERS_KEY; HOT_REQUESTS].into();
    let zipf = zipf_keys(ZIPF_REQUESTS, ZIPF_KEYS, ZIPF_S, 0x5eed);
    let gate = Gate::leak();
    let waiters = |n| rounds_of(&rt, Work::Waiters(gate, n), Gated(gate), rounds);
    // `PAIRED_ONLY=waiters` (a prefix) runs only the matching workloads.
    let only = std::env::var("PAIRED_ONLY").unwrap_or_default();
    type Run<'a> = Box<dyn Fn() -> Value + 'a>;
    let workloads: Vec<(&str, Run)> = vec![
        (
            "solo",
            Box::new(|| rounds_of(&rt, Work::Solo, Immediate, rounds)),
        ),
        (
            "unique",
            Box::new(|| rounds_of(&rt, Work::Wave(unique.clone()), YieldOnce, rounds)),
        ),
        (
            "hot",
            Box::new(|| rounds_of(&rt, Work::Wave(hot.clone()), Latency(HOT_LATENCY), rounds)),
        ),
        (
            "zipf",
            Box::new(|| rounds_of(&rt, Work::Wave(zipf.clone()), Latency(ZIPF_LATENCY), rounds)),
        ),
        ("waiters/10", Box::new(|| waiters(10))),
        ("waiters/100", Box::new(|| waiters(100))),
        ("waiters/1000", Box::new(|| waiters(1_000))),
    ];
    let results = workloads
        .into_iter()
        .filter(|(name, _)| name.starts_with(&only))
        .map(|(name, run)| (name, run()));
    let mut doc = serde_json::Map::new();
    for (workload, result) in results {
        println!("{workload} ({rounds} rounds; median of the per-round ratios to bare):");
        let bare: Option<Vec<f64>> =
            serde_json::from_value(result[support::BARE]["ns"].clone()).ok();
        for name in support::CONTENDERS {
            let row = &result[name];
            let Ok(ns) = serde_json::from_value::<Vec<f64>>(row["ns"].clone()) else {
                continue;
            };
            let ratio = bare.as_ref().map_or(f64::NAN, |bare| {
                median(ns.iter().zip(bare).map(|(t, b)| t / b).collect())
            });
            println!(
                "  {name:<28} median {:>12.0} ns   {ratio:>6.2}x bare   {:>9.1} backend calls",
                median(ns.clone()),
                row["backend_calls_per_batch"].as_f64().unwrap_or(0.0),
            );
        }
        doc.insert(workload.to_string(), result);
    }
    // A run narrowed to some contenders or to another worker count is for looking at, not for
    // the report (`bench_report` reads this file as a whole run on 2 workers).
    let narrowed = ["PAIRED_CONTENDERS", "BENCH_WORKERS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if narrowed {
        println!("not written for the report: PAIRED_CONTENDERS or BENCH_WORKERS is set");
    } else if support::bench_mode() {
        doc.insert("rounds".to_string(), json!(rounds));
        doc.insert("machine".to_string(), support::machine());
        let dir = support::criterion_dir();
        std::fs::create_dir_all(&dir).expect("criterion dir");
        let path = dir.join("tower-coalesce-paired.json");
        let text = serde_json::to_string_pretty(&Value::Object(doc)).expect("json");
        std::fs::write(&path, text).expect("write paired results");
        println!("wrote {}", path.display());
    }
}
