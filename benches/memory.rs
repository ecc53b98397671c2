//! Heap cost of an in-flight key and of a follower, for tower-coalesce and every peer, counted
//! by an instrumented global allocator (`stats_alloc`).
//!
//! Each request's future is boxed and polled once with a no-op waker (the backend never
//! answers), so what is counted is everything a request holds while it waits: its own future
//! (what a server's task would hold), the registry entry, the shared state and its waiter
//! slot. The bare service's row is the baseline: one backend call in flight and nothing else.
//! After the futures are dropped (every caller cancelled), what is still allocated is the
//! registry's table capacity plus any entry that cancellation did not remove; more rounds on
//! other keys tell the two apart (capacity is reused, kept entries pile up: "leaked" is what
//! the last round added).
//!
//! `cargo bench --bench memory`; results also go to `target/criterion/tower-coalesce-memory.json`.

#[allow(dead_code)]
mod support;

use std::alloc::System;
use std::collections::BTreeMap;
use std::future::Future;

use serde_json::json;
use stats_alloc::{Stats, StatsAlloc, INSTRUMENTED_SYSTEM};

use support::{for_each, poll_once, Backend, Client, Never, Visit};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Distinct keys in flight at once; also the number of followers of the one hot key.
const REQUESTS: usize = 100_000;
const HOT_KEY: u64 = u64::MAX;
/// Rounds of cancelled in-flight keys after the first; "leaked" is what the last one added
/// (a table that grows past its tombstones does so in the first rounds).
const ROUNDS: u64 = 5;

/// Bytes live and allocation calls so far.
fn snapshot() -> Stats {
    GLOBAL.stats()
}

fn live(s: &Stats) -> i64 {
    s.bytes_allocated as i64 - s.bytes_deallocated as i64
}

/// Boxes and polls `n` calls made by `call`, returning them (still pending) and the heap they
/// added: (bytes per call, allocations per call).
fn park<F: Future + Unpin>(
    keys: std::ops::Range<u64>,
    mut call: impl FnMut(u64) -> F,
) -> (Vec<F>, f64, f64) {
    let n = keys.clone().count();
    let mut parked = Vec::with_capacity(n);
    let before = snapshot();
    for key in keys {
        let mut fut = call(key);
        assert!(
            poll_once(&mut fut).is_pending(),
            "the backend never answers"
        );
        parked.push(fut);
    }
    let after = snapshot();
    let bytes = (live(&after) - live(&before)) as f64 / n as f64;
    let allocs = (after.allocations - before.allocations) as f64 / n as f64;
    (parked, bytes, allocs)
}

#[derive(Default)]
struct Memory {
    rows: BTreeMap<String, serde_json::Value>,
}

impl Visit<Never> for Memory {
    fn visit<C: Client>(&mut self, name: &'static str, client: C, _backend: Backend<Never>) {
        // What a task holds inline for one request, before anything is allocated.
        let future_bytes = std::mem::size_of_val(&client.clone().call(u64::MAX - 1));
        let start = live(&snapshot());

        let n = REQUESTS as u64;
        let (leaders, key_bytes, key_allocs) = park(0..n, |key| Box::pin(client.clone().call(key)));
        drop(leaders);
        let retained = live(&snapshot());
        // More rounds on other keys: a registry that keeps cancelled entries grows by the same
        // amount every round; one that only keeps its table's capacity settles (a hash table
        // may still grow once, e.g. to make room past the tombstones of removed entries).
        let mut after = Vec::new();
        for round in 1..=ROUNDS {
            let keys = round * n..(round + 1) * n;
            let (leaders, _, _) = park(keys, |key| Box::pin(client.clone().call(key)));
            drop(leaders);
            after.push(live(&snapshot()));
        }
        // Bytes per key each later round added: settles at 0 unless entries are kept.
        let growth: Vec<i64> = after
            .windows(2)
            .map(|w| (w[1] - w[0]) / REQUESTS as i64)
            .collect();
        let leaked =
            (after[ROUNDS as usize - 1] - after[ROUNDS as usize - 2]) as f64 / REQUESTS as f64;
        let retained = (retained - start) as f64 / REQUESTS as f64;

        // Followers of one key (the bare service has none: every call is its own).
        let mut leader = Box::pin(client.clone().call(HOT_KEY));
        assert!(poll_once(&mut leader).is_pending());
        let (followers, follower_bytes, follower_allocs) =
            park(0..n, |_| Box::pin(client.clone().call(HOT_KEY)));
        drop(followers);
        drop(leader);

        println!(
            "memory  {name:<27} future {future_bytes:>4} B | in-flight key {key_bytes:>8.1} B {key_allocs:>5.2} allocs | \
             follower {follower_bytes:>8.1} B {follower_allocs:>5.2} allocs | \
             after cancelling: retained {retained:>6.1} B/key, leaked {leaked:>6.1} B/key \
             (per round {growth:?})"
        );
        self.rows.insert(
            name.to_string(),
            json!({
                "requests": REQUESTS,
                "future_bytes": future_bytes,
                "bytes_per_inflight_key": key_bytes,
                "allocs_per_inflight_key": key_allocs,
                "bytes_per_follower": follower_bytes,
                "allocs_per_follower": follower_allocs,
                "bytes_retained_per_cancelled_key": retained,
                "bytes_leaked_per_cancelled_key": leaked,
                "bytes_added_per_later_round": growth,
            }),
        );
    }
}

fn main() {
    // Tokio's sync primitives need no runtime, but a context keeps any that look for one happy.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let _context = rt.enter();
    let mut memory = Memory::default();
    for_each(Never, true, &mut memory);
    if support::bench_mode() {
        support::merge_json(
            "tower-coalesce-memory.json",
            &BTreeMap::from([("memory".to_string(), memory.rows)]),
        );
    }
}
