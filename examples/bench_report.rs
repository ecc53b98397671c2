//! Turns a bench run into `docs/performance.md` (tables), `docs/performance.svg` (chart) and
//! the summary table in `README.md`'s Performance section (between its `bench-report`
//! markers).
//!
//! ```text
//! cargo bench --bench overhead && cargo bench --bench memory && cargo bench --bench mimalloc
//! cargo bench --bench paired  # optional: ratios taken within rounds run under the same load
//! bash benches/callgrind.sh   # optional: instruction counts (valgrind)
//! cargo run --release --example bench_report
//! ```
//!
//! Reads criterion's `sample.json` (the fastest sample, the headline time) and
//! `estimates.json` (the median) files, and the JSON files the
//! benches write next to them in `target/criterion`: backend calls per wave
//! (`tower-coalesce-calls.json`), heap per request (`tower-coalesce-memory.json`), paired
//! rounds (`tower-coalesce-paired.json`), instruction counts
//! (`tower-coalesce-callgrind.json`) and the machine (`tower-coalesce-meta.json`). A missing
//! result shows as "–".

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

/// Bench ids and how the report names them; the first is the baseline, then ours, then peers.
const CONTENDERS: [(&str, &str); 7] = [
    ("bare", "bare service"),
    ("tower-coalesce", "tower-coalesce (layer)"),
    ("tower-coalesce-group", "tower-coalesce (Group::run)"),
    (
        "tower-resilience-coalesce",
        "tower-resilience-coalesce 0.14",
    ),
    ("singleflight-async", "singleflight-async 0.2"),
    ("async_singleflight", "async_singleflight 0.6"),
    ("blog-mutex-shared", "blog post (Mutex<HashMap<Shared>>)"),
];
const OURS: [&str; 2] = ["tower-coalesce", "tower-coalesce-group"];
const PEERS: [&str; 4] = [
    "tower-resilience-coalesce",
    "singleflight-async",
    "async_singleflight",
    "blog-mutex-shared",
];

/// Timed workloads with a bare baseline: id, description, requests per iteration.
const WORKLOADS: [(&str, &str, u64); 4] = [
    (
        "solo",
        "solo: 1 task, sequential, distinct keys, instant backend (per call)",
        1,
    ),
    (
        "unique",
        "unique: 100k concurrent, distinct keys, backend yields once (per wave)",
        100_000,
    ),
    (
        "hot",
        "hot: 10k concurrent, 1 key, 5 ms backend (per wave)",
        10_000,
    ),
    (
        "zipf",
        "zipf: 100k concurrent, 1,000 keys Zipf(1.0), 1 ms backend (per wave)",
        100_000,
    ),
];
const WAITERS: [u64; 5] = [10, 100, 1_000, 10_000, 100_000];

/// Workloads of the paired rounds (`cargo bench --bench paired`): the four above, then waiters
/// at small N (no bare service there).
fn paired_workloads() -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = WORKLOADS
        .iter()
        .map(|(id, desc, _)| (id.to_string(), desc.to_string()))
        .collect();
    for n in [10, 100, 1_000] {
        all.push((
            format!("waiters/{n}"),
            format!("waiters, N = {n} (answer → last follower, median of 21 waves)"),
        ));
    }
    all
}

const COLORS: [RGBColor; 7] = [
    RGBColor(120, 120, 120),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion")
}

fn read_json(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

struct Results {
    dir: PathBuf,
    calls: Value,
    memory: Value,
    meta: Value,
    callgrind: Value,
    paired: Value,
}

/// What a paired ratio divides by, within each round.
#[derive(Clone, Copy)]
enum Baseline {
    Bare,
    /// The fastest of the four peers in that round.
    FastestPeer,
    /// The fastest in that round of the peers whose followers sleep until woken (all but
    /// tower-resilience-coalesce, whose followers re-poll themselves).
    FastestSleepingPeer,
}

/// The peer whose followers never sleep: they wake themselves to poll again.
const BUSY_PEER: &str = "tower-resilience-coalesce";

/// The median and the quartiles of a sample.
fn quartiles(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let pos = q * (v.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
    };
    Some((at(0.5), at(0.25), at(0.75)))
}

impl Results {
    fn load() -> Self {
        let dir = criterion_dir();
        Results {
            calls: read_json(&dir.join("tower-coalesce-calls.json")),
            memory: read_json(&dir.join("tower-coalesce-memory.json")),
            meta: read_json(&dir.join("tower-coalesce-meta.json")),
            callgrind: read_json(&dir.join("tower-coalesce-callgrind.json")),
            paired: read_json(&dir.join("tower-coalesce-paired.json")),
            dir,
        }
    }

    /// Time of one iteration in nanoseconds: the fastest of criterion's samples (each
    /// sample's time over its iterations). On a machine shared with other work, interference
    /// only ever adds time, so the fastest sample is the closest to the code's own cost; the
    /// median is in [`Results::median`].
    fn time(&self, group: &str, id: &str) -> Option<f64> {
        let sample = read_json(&self.dir.join(group).join(id).join("new/sample.json"));
        let (iters, times) = (sample["iters"].as_array()?, sample["times"].as_array()?);
        iters
            .iter()
            .zip(times)
            .filter_map(|(i, t)| Some(t.as_f64()? / i.as_f64()?))
            .min_by(f64::total_cmp)
    }

    /// Criterion's median estimate of one iteration, in nanoseconds.
    fn median(&self, group: &str, id: &str) -> Option<f64> {
        let path = self.dir.join(group).join(id).join("new/estimates.json");
        read_json(&path)["median"]["point_estimate"].as_f64()
    }

    /// One contender's times in the paired rounds (`cargo bench --bench paired`), in
    /// nanoseconds, round by round.
    fn paired_times(&self, workload: &str, id: &str) -> Option<Vec<f64>> {
        let times = self.paired[workload][id]["ns"].as_array()?;
        times.iter().map(Value::as_f64).collect()
    }

    /// The median and quartiles of `id`'s time over `baseline`'s, taken within each round.
    fn paired_ratio(
        &self,
        workload: &str,
        id: &str,
        baseline: Baseline,
    ) -> Option<(f64, f64, f64)> {
        let ours = self.paired_times(workload, id)?;
        let base: Vec<f64> = match baseline {
            Baseline::Bare => self.paired_times(workload, "bare")?,
            Baseline::FastestPeer | Baseline::FastestSleepingPeer => {
                let sleeping_only = matches!(baseline, Baseline::FastestSleepingPeer);
                let peers: Vec<Vec<f64>> = PEERS
                    .iter()
                    .filter(|c| !(sleeping_only && **c == BUSY_PEER))
                    .filter_map(|c| self.paired_times(workload, c))
                    .collect();
                (0..ours.len())
                    .map(|i| {
                        peers
                            .iter()
                            .filter_map(|p| p.get(i))
                            .copied()
                            .fold(f64::MAX, f64::min)
                    })
                    .collect()
            }
        };
        quartiles(ours.iter().zip(&base).map(|(t, b)| t / b).collect())
    }

    fn calls(&self, workload: &str, id: &str) -> Option<(f64, u64, u64)> {
        let row = &self.calls[workload][id];
        Some((
            row["calls_per_wave_mean"].as_f64()?,
            row["calls_per_wave_min"].as_u64()?,
            row["calls_per_wave_max"].as_u64()?,
        ))
    }

    fn memory(&self, id: &str, field: &str) -> Option<f64> {
        self.memory["memory"][id][field].as_f64()
    }

    fn machine(&self, field: &str) -> String {
        match &self.meta["machine"]["overhead"][field] {
            Value::String(s) => s.clone(),
            Value::Null => "?".into(),
            v => v.to_string(),
        }
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

fn name(id: &str) -> &'static str {
    CONTENDERS
        .iter()
        .find(|(i, _)| *i == id)
        .map_or("?", |(_, n)| n)
}

/// The fastest peer on a measure, with its value.
fn best_peer(value: impl Fn(&str) -> Option<f64>) -> Option<(&'static str, f64)> {
    PEERS
        .iter()
        .filter_map(|&id| value(id).map(|v| (id, v)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Performance\n");
    let _ = writeln!(
        w,
        "Generated by `cargo run --release --example bench_report` from \
         `cargo bench --bench overhead`, `cargo bench --bench mimalloc`, \
         `cargo bench --bench paired`, `cargo bench --bench memory` and \
         `bash benches/callgrind.sh`.\n"
    );
    let _ = writeln!(
        w,
        "Machine: {} ({} CPUs as seen by `nproc`), Linux {}, {}; {}. Run {} at commit {}; \
         load average when the run started: {} (the machine was shared with other builds, so \
         read small differences as noise).\n",
        r.machine("cpu"),
        r.machine("nproc"),
        r.machine("kernel"),
        r.machine("rustc"),
        r.machine("runtime"),
        r.machine("date_utc"),
        r.machine("commit"),
        r.machine("loadavg_at_start"),
    );
    let _ = writeln!(
        w,
        "Every contender serves the same `u64 → u64` request through the same simulated \
         backend; a request is a tokio task, as in a server. Times are the fastest of \
         criterion's samples (interference from other work only adds time), with the median \
         under it in the first table. \
         \"blog post\" is the request-coalescing blog post this crate started from, its \
         approach (`Mutex<HashMap<Shared>>`, remove after await) re-implemented as written \
         (`benches/support/blog.rs`).\n"
    );

    // Time and ratio to bare.
    let _ = writeln!(
        w,
        "## Time, and ratio to the bare service (lower is better)\n"
    );
    let _ = write!(w, "| workload |");
    for (_, n) in CONTENDERS {
        let _ = write!(w, " {n} |");
    }
    let _ = writeln!(w, "\n|---|{}", "---:|".repeat(CONTENDERS.len()));
    for (id, desc, _) in WORKLOADS {
        let bare = r.time(id, "bare");
        let _ = write!(w, "| {desc} |");
        for (c, _) in CONTENDERS {
            match (r.time(id, c), bare) {
                (Some(t), Some(b)) => {
                    let median = r.median(id, c).map_or(String::new(), |m| {
                        format!(
                            "<br>median {} ({:.2}×)",
                            fmt_ns(m),
                            m / r.median(id, "bare").unwrap_or(f64::NAN)
                        )
                    });
                    let _ = write!(w, " {} ({:.2}×){median} |", fmt_ns(t), t / b);
                }
                (Some(t), None) => {
                    let _ = write!(w, " {} |", fmt_ns(t));
                }
                _ => {
                    let _ = write!(w, " – |");
                }
            }
        }
        let _ = writeln!(w);
    }

    // The wave workloads again under mimalloc, when `cargo bench --bench mimalloc` was run.
    if WORKLOADS[1..]
        .iter()
        .any(|(id, _, _)| r.time(&format!("mimalloc-{id}"), "bare").is_some())
    {
        let _ = writeln!(
            w,
            "\n### The same waves with mimalloc as the global allocator (`cargo bench --bench \
             mimalloc`)\n\nUnder glibc's malloc, a task allocated on one worker and freed on \
             the other waits for the allocating worker's arena lock. A coalescer completes a \
             flight's waiters together, so their tasks are freed in bursts: in a zipf wave of \
             `Group::run` most context switches are those waits in `free` (measured with \
             `perf record -e context-switches --call-graph dwarf`). With a thread-caching \
             allocator that cost goes away for every contender:\n"
        );
        let _ = write!(w, "| workload |");
        for (_, n) in CONTENDERS {
            let _ = write!(w, " {n} |");
        }
        let _ = writeln!(w, "\n|---|{}", "---:|".repeat(CONTENDERS.len()));
        for (id, desc, _) in &WORKLOADS[1..] {
            let group = format!("mimalloc-{id}");
            let bare = r.time(&group, "bare");
            let _ = write!(w, "| {desc} |");
            for (c, _) in CONTENDERS {
                let calls = r
                    .calls(&group, c)
                    .map_or(String::new(), |(mean, _, _)| format!("<br>{mean:.0} calls"));
                match (r.time(&group, c), bare) {
                    (Some(t), Some(b)) => {
                        let _ = write!(w, " {} ({:.2}×){calls} |", fmt_ns(t), t / b);
                    }
                    _ => {
                        let _ = write!(w, " – |");
                    }
                }
            }
            let _ = writeln!(w);
        }
    }

    // Paired rounds, when `cargo bench --bench paired` was run.
    if r.paired.is_object() {
        let _ = writeln!(
            w,
            "\n## Paired rounds: every ratio measured under the same load\n\n\
             `cargo bench --bench paired` (from {} on {}): criterion above times one contender \
             after the other, so the machine's load may differ between a contender and its \
             baseline. Here each round runs one batch of every contender back to back (solo: \
             20,000 sequential calls; the others: one wave), starting with a different one each \
             round, and each ratio is taken within a round. Median over {} rounds, quartiles \
             in brackets:\n",
            paired_field(r, "commit"),
            paired_field(r, "date_utc"),
            r.paired["rounds"],
        );
        let _ = write!(w, "| workload |");
        for (_, n) in CONTENDERS {
            let _ = write!(w, " {n} |");
        }
        let _ = writeln!(w, "\n|---|{}", "---:|".repeat(CONTENDERS.len()));
        for (id, desc) in paired_workloads() {
            let _ = write!(w, "| {desc} |");
            for (c, _) in CONTENDERS {
                let time = r.paired_times(&id, c).and_then(quartiles);
                let ratio = r.paired_ratio(&id, c, Baseline::Bare);
                match (time, ratio) {
                    (Some((t, _, _)), Some((m, lo, hi))) => {
                        let _ = write!(w, " {}<br>{m:.2}× [{lo:.2}–{hi:.2}] |", fmt_ns(t));
                    }
                    (Some((t, _, _)), None) => {
                        let _ = write!(w, " {} |", fmt_ns(t));
                    }
                    _ => {
                        let _ = write!(w, " – |");
                    }
                }
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(
            w,
            "\nOurs over the fastest peer of each round, and over the fastest of those whose \
             followers sleep until woken (all but tower-resilience-coalesce):\n\n\
             | workload | layer / fastest peer | `Group::run` / fastest peer | layer / fastest \
             sleeping peer | `Group::run` / fastest sleeping peer |\n|---|---:|---:|---:|---:|"
        );
        for (id, desc) in paired_workloads() {
            let cell = |c: &str, b| paired_cell(r.paired_ratio(&id, c, b));
            let _ = writeln!(
                w,
                "| {desc} | {} | {} | {} | {} |",
                cell(OURS[0], Baseline::FastestPeer),
                cell(OURS[1], Baseline::FastestPeer),
                cell(OURS[0], Baseline::FastestSleepingPeer),
                cell(OURS[1], Baseline::FastestSleepingPeer),
            );
        }
    }

    // Instructions per call, when `benches/callgrind.sh` was run.
    if r.callgrind["solo"].is_object() {
        let _ = writeln!(
            w,
            "\nInstructions per `solo` call, counted by callgrind (`bash benches/callgrind.sh`; \
             independent of the machine's load):\n"
        );
        let _ = write!(w, "|");
        for (_, n) in CONTENDERS {
            let _ = write!(w, " {n} |");
        }
        let _ = writeln!(w, "\n|{}", "---:|".repeat(CONTENDERS.len()));
        let _ = write!(w, "|");
        let bare = r.callgrind["solo"]["bare"]["instructions_per_call"].as_f64();
        for (c, _) in CONTENDERS {
            match (
                r.callgrind["solo"][c]["instructions_per_call"].as_f64(),
                bare,
            ) {
                (Some(i), Some(b)) => {
                    let _ = write!(w, " {i:.0} ({:.1}×) |", i / b);
                }
                _ => {
                    let _ = write!(w, " – |");
                }
            }
        }
        let _ = writeln!(w);
    }

    // Backend calls.
    let _ = writeln!(
        w,
        "\n## Backend calls per wave (mean, [min–max] over the measured waves; lower is better)\n"
    );
    let _ = write!(w, "| workload | requests/wave |");
    for (_, n) in CONTENDERS {
        let _ = write!(w, " {n} |");
    }
    let _ = writeln!(w, "\n|---|---:|{}", "---:|".repeat(CONTENDERS.len()));
    let call_rows = WORKLOADS
        .iter()
        .map(|(id, _, n)| (id.to_string(), *n))
        .chain(WAITERS.iter().map(|n| (format!("waiters/{n}"), n + 1)));
    for (id, requests) in call_rows {
        let _ = write!(w, "| {id} | {requests} |");
        for (c, _) in CONTENDERS {
            match r.calls(&id, c) {
                Some((mean, min, max)) if min == max => {
                    let _ = write!(w, " {mean:.0} |");
                }
                Some((mean, min, max)) => {
                    let _ = write!(w, " {mean:.1} [{min}–{max}] |");
                }
                None => {
                    let _ = write!(w, " – |");
                }
            }
        }
        let _ = writeln!(w);
    }

    // Waiters, with and without a runtime.
    let fanout_tables = [
        (
            "waiters",
            "Waiters: from the backend's answer to the last of N followers getting it",
            "N followers and their leader, each a task on the 2-worker runtime, wait on one \
             flight whose backend waits on a gate; timed from the gate opening (the backend's \
             answer exists) to the last of the N+1 getting it, so waking the leader, publishing, \
             and tokio waking and scheduling N tasks are all in. tower-resilience-coalesce's \
             followers never sleep (they re-poll themselves), which is fast here and costly \
             everywhere else (see hot).",
        ),
        (
            "fanout",
            "Fan-out without a runtime: the coalescer's own cost",
            "Same flight on one thread with a no-op waker: the leader is polled to its answer, \
             then each follower until it has its copy (freeing them is not timed).",
        ),
    ];
    for (group, title, note) in fanout_tables {
        let _ = writeln!(w, "\n## {title}\n\n{note}\n");
        let _ = write!(w, "| N |");
        for (_, n) in &CONTENDERS[1..] {
            let _ = write!(w, " {n} |");
        }
        let _ = writeln!(w, "\n|---:|{}", "---:|".repeat(CONTENDERS.len() - 1));
        for n in WAITERS {
            let _ = write!(w, "| {n} |");
            for (c, _) in &CONTENDERS[1..] {
                match r.time(group, &format!("{c}/{n}")) {
                    Some(t) => {
                        let _ = write!(w, " {} ({}/follower) |", fmt_ns(t), fmt_ns(t / n as f64));
                    }
                    None => {
                        let _ = write!(w, " – |");
                    }
                }
            }
            let _ = writeln!(w);
        }
    }

    if let Some(n) = r.callgrind["fanout"]["followers"].as_u64() {
        let _ = writeln!(
            w,
            "\nInstructions per waiter, {n} followers of one flight, counted by callgrind \
             (`bash benches/callgrind.sh`): to join (make the request, box it, poll it once) \
             and to publish (the leader's answer handed to every follower, each taking its \
             copy):\n"
        );
        let _ = write!(w, "| |");
        for (_, name) in &CONTENDERS[1..] {
            let _ = write!(w, " {name} |");
        }
        let _ = writeln!(w, "\n|---|{}", "---:|".repeat(CONTENDERS.len() - 1));
        for (label, field) in [
            ("join", "join_instructions_per_waiter"),
            ("publish", "instructions_per_waiter"),
        ] {
            let _ = write!(w, "| {label} |");
            for (c, _) in &CONTENDERS[1..] {
                match r.callgrind["fanout"][c][field].as_f64() {
                    Some(i) => {
                        let _ = write!(w, " {i:.0} |");
                    }
                    None => {
                        let _ = write!(w, " – |");
                    }
                }
            }
            let _ = writeln!(w);
        }
    }

    // Memory.
    let _ = writeln!(
        w,
        "\n## Memory (heap per request while it waits, counted by an instrumented allocator)\n\n\
         Each request's future is boxed and counted with everything it holds (the bare row is \
         the baseline: just the backend call). \"Kept after cancel\" is what stays allocated \
         per key once every caller dropped its request: table capacity, reused later; \
         \"leaked\" is what the last of five more rounds on other keys added again (entries \
         never removed).\n"
    );
    let _ = writeln!(
        w,
        "| contender | request future (B, inline in its task) | bytes per in-flight key | \
         allocations per key | bytes per follower | allocations per follower | \
         kept after cancel (B/key) | leaked (B/key) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (c, n) in CONTENDERS {
        let f = |field: &str, prec: usize| {
            r.memory(c, field)
                .map_or("–".to_string(), |v| format!("{v:.prec$}"))
        };
        let _ = writeln!(
            w,
            "| {n} | {} | {} | {} | {} | {} | {} | {} |",
            f("future_bytes", 0),
            f("bytes_per_inflight_key", 0),
            f("allocs_per_inflight_key", 1),
            f("bytes_per_follower", 0),
            f("allocs_per_follower", 1),
            f("bytes_retained_per_cancelled_key", 0),
            f("bytes_leaked_per_cancelled_key", 0),
        );
    }

    // Ours against the rest.
    let _ = writeln!(
        w,
        "\n## tower-coalesce against the bare service and the best peer\n"
    );
    let _ = writeln!(
        w,
        "| workload | layer / bare | Group::run / bare | best peer | layer / best peer | \
         Group::run / best peer |\n|---|---:|---:|---|---:|---:|"
    );
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}×", a / b),
        _ => "–".into(),
    };
    for (id, _, _) in WORKLOADS {
        let bare = r.time(id, "bare");
        let (layer, group) = (r.time(id, OURS[0]), r.time(id, OURS[1]));
        let best = best_peer(|c| r.time(id, c));
        let _ = writeln!(
            w,
            "| {id} | {} | {} | {} | {} | {} |",
            ratio(layer, bare),
            ratio(group, bare),
            best.map_or("–".into(), |(c, t)| format!(
                "{} ({})",
                name(c),
                fmt_ns(t)
            )),
            ratio(layer, best.map(|b| b.1)),
            ratio(group, best.map(|b| b.1)),
        );
    }
    for (kind, n) in ["waiters", "fanout"]
        .into_iter()
        .flat_map(|k| WAITERS.map(|n| (k, n)))
    {
        let time = |c: &str| r.time(kind, &format!("{c}/{n}"));
        let (layer, group) = (time(OURS[0]), time(OURS[1]));
        let best = best_peer(time);
        let _ = writeln!(
            w,
            "| {kind}/{n} | – | – | {} | {} | {} |",
            best.map_or("–".into(), |(c, t)| format!(
                "{} ({})",
                name(c),
                fmt_ns(t)
            )),
            ratio(layer, best.map(|b| b.1)),
            ratio(group, best.map(|b| b.1)),
        );
    }
    let _ = writeln!(
        w,
        "\n![ratios to the bare service, and waiters](performance.svg)"
    );
    md
}

fn chart(r: &Results, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1280, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);

    // Left: ratio to bare per workload, one bar per contender, log scale.
    let mut ratios = Vec::new();
    for (wi, (id, _, _)) in WORKLOADS.iter().enumerate() {
        let Some(bare) = r.time(id, "bare") else {
            continue;
        };
        for (ci, (c, _)) in CONTENDERS.iter().enumerate() {
            if let Some(t) = r.time(id, c) {
                ratios.push((wi, ci, t / bare));
            }
        }
    }
    // Headroom above the tallest bar (log scale) for the legend.
    let hi = ratios.iter().map(|x| x.2).fold(2.0f64, f64::max) * 10.0;
    let lo = ratios.iter().map(|x| x.2).fold(1.0f64, f64::min) / 1.5;
    let mut bars = ChartBuilder::on(&left)
        .caption(
            "time / bare service (log scale, lower is better)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..WORKLOADS.len() as f64, (lo..hi).log_scale())?;
    bars.configure_mesh()
        .disable_x_mesh()
        .x_labels(WORKLOADS.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 && i < WORKLOADS.len() {
                WORKLOADS[i].0.to_string()
            } else {
                String::new()
            }
        })
        .y_labels(12)
        .y_label_formatter(&|y| format!("{y}×"))
        .draw()?;
    let width = 0.8 / CONTENDERS.len() as f64;
    for (ci, (_, n)) in CONTENDERS.iter().enumerate() {
        let color = COLORS[ci];
        bars.draw_series(ratios.iter().filter(|x| x.1 == ci).map(|&(wi, _, ratio)| {
            let x0 = wi as f64 + 0.1 + ci as f64 * width;
            Rectangle::new([(x0, lo), (x0 + width * 0.9, ratio)], color.filled())
        }))?
        .label(*n)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    bars.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()?;

    // Right: time from the answer to the last follower, log-log; with tokio tasks (waiters,
    // thick lines) and on one thread without a runtime (fanout, thin lines).
    let series = |group: &str| -> Vec<(usize, Vec<(f64, f64)>)> {
        (1..CONTENDERS.len())
            .map(|ci| {
                let pts = WAITERS
                    .iter()
                    .filter_map(|&n| {
                        r.time(group, &format!("{}/{n}", CONTENDERS[ci].0))
                            .map(|t| (n as f64, t / 1e3))
                    })
                    .collect();
                (ci, pts)
            })
            .collect()
    };
    let (waiters, fanout) = (series("waiters"), series("fanout"));
    let all = waiters
        .iter()
        .chain(&fanout)
        .flat_map(|(_, p)| p.iter().map(|x| x.1));
    let (ylo, yhi) = all.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let (ylo, yhi) = if ylo <= yhi {
        (ylo / 2.0, yhi * 2.0)
    } else {
        (1.0, 10.0)
    };
    let mut lines = ChartBuilder::on(&right)
        .caption("answer → last of N followers (µs)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d((5f64..200_000f64).log_scale(), (ylo..yhi).log_scale())?;
    lines
        .configure_mesh()
        .x_desc("N followers")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    for (ci, pts) in waiters {
        let color = COLORS[ci];
        lines.draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?;
        lines.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    for (ci, pts) in fanout {
        let color = COLORS[ci];
        lines.draw_series(LineSeries::new(pts.clone(), color.stroke_width(1)))?;
        lines.draw_series(
            pts.into_iter()
                .map(|p| Cross::new(p, 4, color.stroke_width(1))),
        )?;
    }
    lines
        .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
        .label("thick, ●: tasks on the 2-worker runtime (waiters)")
        .legend(|(x, y)| Circle::new((x + 5, y), 3, BLACK.filled()));
    lines
        .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
        .label("thin, ×: one thread, no runtime (fanout)")
        .legend(|(x, y)| Cross::new((x + 5, y), 4, BLACK.stroke_width(1)));
    lines
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Where the README's generated summary goes.
const README_BEGIN: &str = "<!-- bench-report:begin (generated by examples/bench_report.rs) -->";
const README_END: &str = "<!-- bench-report:end -->";

/// `a / b` as a ratio cell, or "–".
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// A paired ratio as a cell: median, quartiles in brackets.
fn paired_cell(q: Option<(f64, f64, f64)>) -> String {
    q.map_or("–".into(), |(m, lo, hi)| {
        format!("{m:.2}× [{lo:.2}–{hi:.2}]")
    })
}

/// A field of the machine the paired rounds ran on.
fn paired_field(r: &Results, field: &str) -> String {
    match &r.paired["machine"][field] {
        Value::String(s) => s.clone(),
        Value::Null => "?".into(),
        v => v.to_string(),
    }
}

/// The README's summary: ours against the bare service and the best peer, per workload.
fn readme_summary(r: &Results) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(
        w,
        "On {} ({} CPUs), run {} at commit {} (load average at the start: {}); times are the \
         fastest criterion sample, \"best peer\" the fastest of the four peers on that row:\n",
        r.machine("cpu"),
        r.machine("nproc"),
        r.machine("date_utc"),
        r.machine("commit"),
        r.machine("loadavg_at_start"),
    );
    let _ = writeln!(
        w,
        "| workload | layer / bare | `Group::run` / bare | best peer | layer / best peer | \
         `Group::run` / best peer |\n|---|---:|---:|---|---:|---:|"
    );
    for (id, desc, _) in WORKLOADS {
        let desc = desc.split(" (per").next().unwrap_or(desc);
        let bare = r.time(id, "bare");
        let desc = match (id, bare) {
            ("solo", Some(b)) => format!("{desc} (bare call: {})", fmt_ns(b)),
            _ => desc.to_string(),
        };
        let (layer, group) = (r.time(id, OURS[0]), r.time(id, OURS[1]));
        let best = best_peer(|c| r.time(id, c));
        let with_ns = |t: Option<f64>| match (t, id) {
            (Some(t), "solo") => format!(" ({})", fmt_ns(t)),
            _ => String::new(),
        };
        let _ = writeln!(
            w,
            "| {desc} | {}{} | {}{} | {} | {} | {} |",
            ratio(layer, bare),
            with_ns(layer),
            ratio(group, bare),
            with_ns(group),
            best.map_or("–".into(), |(c, t)| format!(
                "{}{}",
                name(c),
                with_ns(Some(t))
            )),
            ratio(layer, best.map(|b| b.1)),
            ratio(group, best.map(|b| b.1)),
        );
    }
    for (id, desc, _) in &WORKLOADS[1..] {
        let group = format!("mimalloc-{id}");
        let desc = desc.split(':').next().unwrap_or(desc);
        let bare = r.time(&group, "bare");
        if bare.is_none() {
            continue;
        }
        let (layer, ours) = (r.time(&group, OURS[0]), r.time(&group, OURS[1]));
        let best = best_peer(|c| r.time(&group, c));
        let _ = writeln!(
            w,
            "| {desc}, mimalloc as the global allocator | {} | {} | {} | {} | {} |",
            ratio(layer, bare),
            ratio(ours, bare),
            best.map_or("–", |(c, _)| name(c)),
            ratio(layer, best.map(|b| b.1)),
            ratio(ours, best.map(|b| b.1)),
        );
    }
    for (group_id, desc) in [
        (
            "waiters",
            "waiters, N = 10 … 100k (answer → last follower, tasks)",
        ),
        ("fanout", "fan-out, N = 10 … 100k (one thread, no runtime)"),
    ] {
        let range = |ours: &str| {
            let ratios: Vec<f64> = WAITERS
                .iter()
                .filter_map(|n| {
                    let best = best_peer(|c| r.time(group_id, &format!("{c}/{n}")))?;
                    Some(r.time(group_id, &format!("{ours}/{n}"))? / best.1)
                })
                .collect();
            let lo = ratios.iter().copied().fold(f64::MAX, f64::min);
            let hi = ratios.iter().copied().fold(f64::MIN, f64::max);
            match ratios.is_empty() {
                true => "–".into(),
                false => format!("{lo:.2}–{hi:.2}×"),
            }
        };
        let _ = writeln!(
            w,
            "| {desc} | – | – | fastest peer at each N | {} | {} |",
            range(OURS[0]),
            range(OURS[1])
        );
    }
    if r.paired.is_object() {
        let _ = writeln!(
            w,
            "\nPaired rounds (`cargo bench --bench paired`, at commit {}): {} rounds, each \
             running every contender back to back, so that a ratio compares runs made under the \
             same load; median of the per-round ratios, quartiles in brackets:\n\n\
             | workload | layer / bare | `Group::run` / bare | layer / fastest peer | \
             `Group::run` / fastest peer |\n|---|---:|---:|---:|---:|",
            paired_field(r, "commit"),
            r.paired["rounds"],
        );
        for (id, _) in paired_workloads() {
            let desc = match id.strip_prefix("waiters/") {
                Some(n) => format!("waiters, N = {n}"),
                None => id.clone(),
            };
            let cell = |c: &str, b| paired_cell(r.paired_ratio(&id, c, b));
            let _ = writeln!(
                w,
                "| {desc} | {} | {} | {} | {} |",
                cell(OURS[0], Baseline::Bare),
                cell(OURS[1], Baseline::Bare),
                cell(OURS[0], Baseline::FastestPeer),
                cell(OURS[1], Baseline::FastestPeer),
            );
        }
        let sleeping = |c: &str| {
            [10, 100, 1_000]
                .iter()
                .map(|n| {
                    r.paired_ratio(&format!("waiters/{n}"), c, Baseline::FastestSleepingPeer)
                        .map_or("–".into(), |(m, _, _)| format!("{m:.2}×"))
                })
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let _ = writeln!(
            w,
            "\nWaiters against the fastest peer whose followers sleep until woken (all but \
             tower-resilience-coalesce, whose followers poll themselves again and again), at \
             N = 10 / 100 / 1,000: layer {}, `Group::run` {}.",
            sleeping(OURS[0]),
            sleeping(OURS[1]),
        );
    }
    let calls = |workload: &str, id: &str| {
        r.calls(workload, id)
            .map_or("–".into(), |(mean, _, _)| match mean < 100.0 {
                true => format!("{mean:.1}"),
                false => format!("{:.1}k", mean / 1e3),
            })
    };
    for (workload, requests) in [("hot", "10k"), ("zipf", "100k")] {
        let fewest = PEERS
            .iter()
            .filter_map(|&c| r.calls(workload, c).map(|(m, _, _)| (c, m)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let _ = writeln!(
            w,
            "\nBackend calls per {workload} wave of {requests} requests: layer {}, `Group::run` {}; \
             fewest among the peers: {}.",
            calls(workload, OURS[0]),
            calls(workload, OURS[1]),
            fewest.map_or("–".into(), |(c, _)| format!("{} {}", name(c), calls(workload, c))),
        );
    }
    md
}

/// Replaces the README's summary between its markers; leaves the file alone without them.
fn update_readme(path: &Path, summary: &str) -> std::io::Result<bool> {
    let readme = std::fs::read_to_string(path)?;
    let (Some(begin), Some(end)) = (readme.find(README_BEGIN), readme.find(README_END)) else {
        return Ok(false);
    };
    let head = &readme[..begin + README_BEGIN.len()];
    let tail = &readme[end..];
    std::fs::write(path, format!("{head}\n{summary}{tail}"))?;
    Ok(true)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let results = Results::load();
    if results.meta.is_null() {
        return Err(format!(
            "no bench results in {}: run `cargo bench --bench overhead` and \
             `cargo bench --bench memory` first",
            results.dir.display()
        )
        .into());
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&docs)?;
    let md = markdown(&results);
    std::fs::write(docs.join("performance.md"), &md)?;
    chart(&results, &docs.join("performance.svg"))?;
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let summary = readme_summary(&results);
    if !update_readme(&readme, &summary)? {
        eprintln!("README.md has no bench-report markers: its summary was not updated");
    }
    println!("{md}");
    println!("{summary}");
    println!(
        "wrote {} and performance.svg",
        docs.join("performance.md").display()
    );
    Ok(())
}
