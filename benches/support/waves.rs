//! Waves of concurrent requests timed by criterion, shared by the benches that run them under
//! different global allocators (`overhead`: the system's; `mimalloc`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use tokio::runtime::Runtime;

use super::{
    for_each, wave, zipf_keys, Backend, CallLog, Client, Kind, Latency, Visit, YieldOnce,
    WAITERS_KEY,
};

pub const UNIQUE_REQUESTS: usize = 100_000;
pub const HOT_REQUESTS: usize = 10_000;
pub const HOT_LATENCY: Duration = Duration::from_millis(5);
pub const ZIPF_REQUESTS: usize = 100_000;
pub const ZIPF_KEYS: usize = 1_000;
pub const ZIPF_S: f64 = 1.0;
pub const ZIPF_LATENCY: Duration = Duration::from_millis(1);

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
        let (ctx, workload, keys) = (self.ctx, self.workload, &self.keys);
        self.group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (client, keys) = (client.clone(), keys.clone());
                let requests = keys.len() as u64;
                ctx.timed(
                    workload.to_string(),
                    name,
                    requests,
                    backend,
                    iters,
                    move || {
                        let (client, keys) = (client.clone(), keys.clone());
                        async move { wave(&client, &keys).await }
                    },
                )
            })
        });
    }
}

impl Ctx<'_> {
    /// Runs `iters` waves made by `wave`, one after the other from one spawned task (a
    /// server's requests are tasks, not `block_on`), logging each wave's backend calls under
    /// (`workload`, `name`). Returns the waves' summed time, as each wave measured it.
    pub fn timed<K, W, F>(
        &self,
        workload: String,
        name: &'static str,
        requests: u64,
        backend: Backend<K>,
        iters: u64,
        mut wave: W,
    ) -> Duration
    where
        K: Kind,
        W: FnMut() -> F + Send + 'static,
        F: Future<Output = Duration> + Send,
    {
        let log = self.log;
        self.rt.block_on(async move {
            tokio::spawn(async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let before = backend.calls();
                    total += wave().await;
                    log.record(&workload, name, requests, 1, backend.calls() - before);
                }
                total
            })
            .await
            .expect("wave driver")
        })
    }
}

/// Criterion as every bench here runs it: fewer bootstrap resamples than the default 100k,
/// so the suite stays within minutes.
pub fn criterion() -> Criterion {
    Criterion::default()
        .nresamples(20_000)
        .configure_from_args()
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
