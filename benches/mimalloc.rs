//! The wave workloads of `overhead` (unique, hot, zipf) again, with mimalloc as the global
//! allocator instead of the system's (glibc's malloc here).
//!
//! A request is a tokio task; under glibc's malloc, tasks allocated on one worker and freed on
//! the other contend for the allocating worker's arena lock. A coalescer finishes the waiters
//! of a flight together, so their tasks are freed in bursts: most context switches of a
//! coalesced zipf wave are waits for that lock in `free`, not the coalescer's own work. This
//! run shows each contender without that effect. Criterion groups `mimalloc-unique`,
//! `mimalloc-hot`, `mimalloc-zipf`; `cargo run --release --example bench_report` reports them.
//!
//! `cargo bench --bench mimalloc`

#[allow(dead_code)]
mod support;

use mimalloc::MiMalloc;

use support::waves::{run_wave_workloads, Ctx};
use support::CallLog;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    let rt = support::runtime();
    let log: &'static CallLog = Box::leak(Box::default());
    let ctx = Ctx { rt: &rt, log };
    let mut c = support::waves::criterion();
    run_wave_workloads(
        &mut c,
        &ctx,
        ["mimalloc-unique", "mimalloc-hot", "mimalloc-zipf"],
    );
    c.final_summary();
    log.print();
    if support::bench_mode() {
        log.write("tower-coalesce-calls.json");
    }
}
