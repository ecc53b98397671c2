//! Waves of concurrent requests timed by criterion, shared by the benches that run them under
//! different global allocators (`overhead`: the system's; `mimalloc`).

use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use tokio::runtime::Runtime;

use super::{
    for_each, wave, zipf_keys, Backend, CallLog, Client, Kind, Latency, Visit, YieldOnce,
    WAITERS_KEY,
};

const UNIQUE_REQUESTS: usize = 100_000;
const HOT_REQUESTS: usize = 10_000;
const HOT_LATENCY: Duration = Duration::from_millis(5);
const ZIPF_REQUESTS: usize = 100_000;
const ZIPF_KEYS: usize = 1_000;
const ZIPF_S: f64 = 1.0;
const ZIPF_LATENCY: Duration = Duration::from_millis(1);

pub struct Ctx<'a> {
    pub rt: &'a Runtime,
    pub log: &'static CallLog,
}

/// Runs waves of concurrent requests over `keys`; criterion's iteration is one wave.
struct Waves<'a, 'g> {
    ctx: &'a Ctx<'a>,
    group: &'a mut BenchmarkGroup<'g, WallTime>,
    workload: &'static str,
    keys: Arc<[u64]>,
}

impl<K: Kind> Visit<K> for Waves<'_, '_> {
    fn visit<C: Client>(&mut self, name: &'static str, client: C, backend: Backend<K>) {
        let Ctx { rt, log } = *self.ctx;
        let workload = self.workload;
        let keys = &self.keys;
        self.group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let client = client.clone();
                let keys = keys.clone();
                rt.block_on(async move {
                    tokio::spawn(async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let before = backend.calls();
                            total += wave(&client, &keys).await;
                            log.record(
                                workload,
                                name,
                                keys.len() as u64,
                                1,
                                backend.calls() - before,
                            );
                        }
                        total
                    })
                    .await
                    .expect("wave driver")
                })
            })
        });
    }
}

/// Few samples of long iterations: a wave takes milliseconds to a second.
pub fn heavy(group: &mut BenchmarkGroup<'_, WallTime>, measurement: Duration) {
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(measurement);
}

/// The unique, hot and zipf workloads, as the criterion groups `names`.
pub fn run_wave_workloads(c: &mut Criterion, ctx: &Ctx<'_>, names: [&'static str; 3]) {
    let unique: Arc<[u64]> = (0..UNIQUE_REQUESTS as u64).collect();
    let hot: Arc<[u64]> = vec![WAITERS_KEY; HOT_REQUESTS].into();
    let zipf = zipf_keys(ZIPF_REQUESTS, ZIPF_KEYS, ZIPF_S, 0x5eed);
    run_waves(c, ctx, names[0], unique, YieldOnce);
    run_waves(c, ctx, names[1], hot, Latency(HOT_LATENCY));
    run_waves(c, ctx, names[2], zipf, Latency(ZIPF_LATENCY));
}

/// Times waves of `keys` for every contender, as the criterion group `workload`.
fn run_waves<K: Kind>(
    c: &mut Criterion,
    ctx: &Ctx<'_>,
    workload: &'static str,
    keys: Arc<[u64]>,
    kind: K,
) {
    let mut group = c.benchmark_group(workload);
    heavy(&mut group, Duration::from_secs(1));
    // The report takes each contender's fastest sample: twenty make that floor steadier
    // between runs than ten (a wave is one sample).
    group.sample_size(20);
    for_each(
        kind,
        true,
        &mut Waves {
            ctx,
            group: &mut group,
            workload,
            keys,
        },
    );
    group.finish();
}
