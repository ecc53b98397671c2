//! Time and backend calls of tower-coalesce against the bare service and every peer, side by
//! side in one run, on a 2-worker multi-thread tokio runtime.
//!
//! Workloads (see `docs/performance.md` for the results):
//! - `solo`: one task, sequential calls, distinct keys, backend answers at once;
//! - `unique`: 100k concurrent requests, distinct keys, backend yields once;
//! - `hot`: 10k concurrent requests on one key, backend latency 5 ms;
//! - `zipf`: 100k concurrent requests over 1,000 keys drawn from Zipf(1.0), latency 1 ms;
//! - `waiters/N`: time from the flight's answer to the last of N followers getting it;
//! - `fanout/N`: the same on one thread without a runtime (no-op waker, followers polled in
//!   turn): the coalescer's own cost per follower, without tokio's scheduling of N tasks.
//!
//! `cargo bench --bench overhead` (filters work: `cargo bench --bench overhead -- hot`), then
//! `cargo run --release --example bench_report`. Backend calls per wave go to
//! `target/criterion/tower-coalesce-calls.json`, the machine to `tower-coalesce-meta.json`.

#[allow(dead_code)]
mod support;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId};

use support::waves::{heavy, run_wave_workloads, Ctx};
use support::{
    fanout, for_each, waiters_wave, Backend, CallLog, Client, Gate, Gated, Immediate, Kind, Visit,
};

const WAITERS: [usize; 5] = [10, 100, 1_000, 10_000, 100_000];

/// Runs `requests` sequentially from one task; criterion's iteration is one call.
struct Solo<'a, 'g> {
    ctx: &'a Ctx<'a>,
    group: &'a mut BenchmarkGroup<'g, WallTime>,
}

impl<K: Kind> Visit<K> for Solo<'_, '_> {
    fn visit<C: Client>(&mut self, name: &'static str, client: C, backend: Backend<K>) {
        let Ctx { rt, log } = *self.ctx;
        self.group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let client = client.clone();
                let before = backend.calls();
                let elapsed = rt.block_on(async move {
                    tokio::spawn(async move {
                        let start = Instant::now();
                        for key in 0..iters {
                            black_box(client.clone().call(key).await);
                        }
                        start.elapsed()
                    })
                    .await
                    .expect("solo task")
                });
                // Each call is a "wave" of one request.
                log.record("solo", name, 1, iters, backend.calls() - before);
                elapsed
            })
        });
    }
}

/// Waiters: time from the backend's answer (the gate opening) to the last of `followers`
/// followers getting it.
struct Waiters<'a, 'g> {
    ctx: &'a Ctx<'a>,
    group: &'a mut BenchmarkGroup<'g, WallTime>,
    gate: &'static Gate,
    followers: usize,
}

impl Visit<Gated> for Waiters<'_, '_> {
    fn visit<C: Client>(&mut self, name: &'static str, client: C, backend: Backend<Gated>) {
        let (ctx, gate, followers) = (self.ctx, self.gate, self.followers);
        self.group
            .bench_function(BenchmarkId::new(name, followers), |b| {
                b.iter_custom(|iters| {
                    let client = client.clone();
                    let workload = format!("waiters/{followers}");
                    let requests = followers as u64 + 1;
                    ctx.timed(workload, name, requests, backend, iters, move || {
                        let client = client.clone();
                        async move { waiters_wave(&client, gate, followers).await }
                    })
                })
            });
    }
}

/// Fan-out on one thread, without a runtime: the coalescer's own cost per follower.
struct Fanout<'a, 'g> {
    group: &'a mut BenchmarkGroup<'g, WallTime>,
    gate: &'static Gate,
    followers: usize,
}

impl Visit<Gated> for Fanout<'_, '_> {
    fn visit<C: Client>(&mut self, name: &'static str, client: C, _: Backend<Gated>) {
        let (gate, followers) = (self.gate, self.followers);
        self.group
            .bench_function(BenchmarkId::new(name, followers), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| fanout(&client, gate, followers)).sum())
            });
    }
}

fn main() {
    let rt = support::runtime();
    let log: &'static CallLog = Box::leak(Box::default());
    let ctx = Ctx { rt: &rt, log };
    let mut c = support::waves::criterion();

    {
        let mut group = c.benchmark_group("solo");
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for_each(
            Immediate,
            true,
            &mut Solo {
                ctx: &ctx,
                group: &mut group,
            },
        );
        group.finish();
    }

    run_wave_workloads(&mut c, &ctx, ["unique", "hot", "zipf"]);

    {
        let gate = Gate::leak();
        let mut group = c.benchmark_group("waiters");
        for followers in WAITERS {
            // Criterion sizes samples from the measured time (the fan-out), not from the wall
            // time of a wave (spawning and joining N tasks): keep the target short. Small
            // waves are cheap and noisy (a parked worker's wake-up is in them): take more.
            heavy(&mut group, Duration::from_millis(2));
            group
                .warm_up_time(Duration::from_millis(1))
                .sample_size(if followers <= 1_000 { 40 } else { 10 });
            for_each(
                Gated(gate),
                false,
                &mut Waiters {
                    ctx: &ctx,
                    group: &mut group,
                    gate,
                    followers,
                },
            );
        }
        group.finish();
    }

    {
        let gate = Gate::leak();
        let mut group = c.benchmark_group("fanout");
        for followers in WAITERS {
            heavy(&mut group, Duration::from_millis(2));
            group.warm_up_time(Duration::from_millis(1));
            for_each(
                Gated(gate),
                false,
                &mut Fanout {
                    group: &mut group,
                    gate,
                    followers,
                },
            );
        }
        group.finish();
    }

    c.final_summary();
    log.print();
    if support::bench_mode() {
        log.write("tower-coalesce-calls.json");
        let mut meta = BTreeMap::new();
        meta.insert(
            "machine".to_string(),
            BTreeMap::from([("overhead".to_string(), support::machine())]),
        );
        support::merge_json("tower-coalesce-meta.json", &meta);
    }
}
