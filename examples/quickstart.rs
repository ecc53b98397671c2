//! A burst of concurrent requests over a handful of keys at a slow backend, with and without
//! the layer. Run: `cargo run --release --example quickstart`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tower::{service_fn, BoxError, Service, ServiceExt};
use tower_coalesce::CoalesceLayer;
use tower_layer::Layer;

const REQUESTS: usize = 10_000;
/// User ids: the key of each request.
const KEYS: [u64; 3] = [1, 2, 3];
const LATENCY: Duration = Duration::from_millis(100);

/// Fires every request at once (one task each) and waits for all of them.
async fn burst<S>(svc: S) -> Result<Duration, BoxError>
where
    S: Service<u64, Response = String> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let key = KEYS[i % KEYS.len()];
            let svc = svc.clone();
            tokio::spawn(async move {
                let value = svc.oneshot(key).await.map_err(Into::into)?;
                assert_eq!(value, format!("profile of user {key}"));
                Ok::<_, BoxError>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let calls = Arc::new(AtomicUsize::new(0));
    let backend = {
        let calls = calls.clone();
        service_fn(move |key: u64| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(LATENCY).await;
                Ok::<_, Infallible>(format!("profile of user {key}"))
            }
        })
    };

    println!(
        "{REQUESTS} concurrent requests over {} keys, backend latency {} ms\n",
        KEYS.len(),
        LATENCY.as_millis()
    );
    println!(
        "{:<16}{:>10}{:>16}{:>12}",
        "", "requests", "backend calls", "wall time"
    );

    let bare_time = burst(backend.clone()).await?;
    let bare_calls = calls.swap(0, Ordering::SeqCst);
    row("without layer", bare_calls, bare_time);

    let coalesced = CoalesceLayer::new(|user: &u64| Some(*user)).layer(backend);
    let time = burst(coalesced.clone()).await?;
    let coalesced_calls = calls.load(Ordering::SeqCst);
    row("with layer", coalesced_calls, time);

    println!(
        "\n{REQUESTS} requests -> {coalesced_calls} backend calls; keys in flight at the end: {}",
        coalesced.in_flight()
    );
    assert_eq!(coalesced.in_flight(), 0);
    Ok(())
}

fn row(label: &str, calls: usize, time: Duration) {
    println!(
        "{label:<16}{REQUESTS:>10}{calls:>16}{:>9.1} ms",
        time.as_secs_f64() * 1e3
    );
}
