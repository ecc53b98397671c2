//! Memory soak: a million distinct-key requests through `CoalesceLayer`, in waves.
//!
//! After every wave the registry must be empty again (contract item 7), including the keys
//! whose only caller gave up mid-flight. Resident memory is read from `/proc/self/statm` and
//! printed (`cargo test --test soak_memory -- --nocapture`), not
//! asserted: the allocator is free to keep pages it got back.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_coalesce::CoalesceLayer;

/// Requests per wave, all in flight together.
const WAVE: u64 = 10_000;
/// One request in this many is dropped after its first poll: a leader cancelled mid-flight,
/// which must free its key as surely as a completed flight does.
const CANCEL_EVERY: u64 = 10;

/// Resident set size in bytes, from `/proc/self/statm` (Linux only).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // The kernel's page size for this process's mappings; 4 KiB where smaps is unreadable.
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("KernelPageSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4096, |kb| kb * 1024)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

/// Sends `total` distinct keys through the layer in waves of [`WAVE`], checking the registry
/// after each wave. Returns the number of backend calls.
async fn soak(total: u64) -> usize {
    let calls = Arc::new(AtomicUsize::new(0));
    let backend_calls = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(|key: &u64| Some(*key)))
        .service(service_fn(move |key: u64| {
            backend_calls.fetch_add(1, Ordering::Relaxed);
            async move {
                // Pending once, so a request dropped after its first poll is still in flight.
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(key)
            }
        }));

    let start = rss_bytes();
    let mut after_first = None;
    for wave in 0..total.div_ceil(WAVE) {
        let keys = wave * WAVE..((wave + 1) * WAVE).min(total);
        let tasks: Vec<_> = keys
            .map(|key| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    let mut call = Box::pin(svc.oneshot(key));
                    if key % CANCEL_EVERY == 0 {
                        let first = futures::poll!(call.as_mut());
                        assert!(first.is_pending(), "the backend yields once");
                        drop(call);
                    } else {
                        assert_eq!(call.await.expect("backend answers"), key);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("request task");
        }
        assert_eq!(svc.in_flight(), 0, "registry not empty after wave {wave}");
        if wave == 0 {
            after_first = rss_bytes();
        }
    }
    let end = rss_bytes();
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
    println!(
        "soak {total} requests in waves of {WAVE}: RSS start {}, after wave 1 {}, end {}, peak {}; \
         registry {} entries",
        mib(start),
        mib(after_first),
        mib(end),
        mib(peak),
        svc.in_flight()
    );
    calls.load(Ordering::Relaxed)
}

/// The full million, always on: a few seconds in a debug build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_distinct_keys_leave_the_registry_empty() {
    let total = 1_000_000;
    let calls = tokio::time::timeout(Duration::from_secs(300), soak(total))
        .await
        .expect("soak did not finish");
    // Distinct keys: nothing to coalesce, every request (cancelled or not) calls the backend.
    assert_eq!(calls, total as usize);
}
