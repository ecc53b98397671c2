//! The `tracing` feature: one `coalesce.flight` span per flight, with the key's hash, the
//! number of waiters and the outcome.
//!
//! One global subscriber serves the whole binary and routes each span to the collector of the
//! thread that made it. Every test here installs it first, before any flight exists: a span
//! callsite registered by another thread while the global subscriber is being set can keep a
//! stale "never" interest (seen once in 200 runs when these tests shared a binary with others).
#![cfg(feature = "tracing")]

use tower_layer::Layer;

mod options_support;
use options_support::*;

#[allow(dead_code)]
#[path = "span_capture/mod.rs"]
mod span_capture;
use span_capture::{field, Flights};

#[tokio::test(start_paused = true)]
async fn one_span_per_flight_with_key_hash_waiters_and_outcome() {
    let installed = Flights::install();
    let flights = &installed.0;
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().layer(backend);
        let w: Vec<_> = (0..3).map(|_| spawn(start(&mut svc, 1))).collect();
        ctl.next().await.ok("one");
        for w in w {
            ok(done("key 1", w).await);
        }
        let w = spawn(start(&mut svc, 2));
        ctl.next().await.err("two");
        boom(done("key 2", w).await);
        let w: Vec<_> = (0..2).map(|_| spawn(start(&mut svc, 3))).collect();
        ctl.next().await.panic("three");
        for w in w {
            assert!(done("key 3", w).await.unwrap_err().is_panic());
        }
        let bypass = spawn(start(&mut svc, 0));
        ctl.next().await.ok("bypass");
        ok(done("bypass", bypass).await);
    })
    .await;

    let closed = flights.closed();
    assert_eq!(
        closed.len(),
        3,
        "one span per flight, none for a bypass: {closed:?}"
    );
    let expected = [("3", "ok"), ("1", "error"), ("2", "panicked")];
    for (span, (waiters, outcome)) in closed.iter().zip(expected) {
        assert_eq!(field(span, "waiters"), waiters, "{span:?}");
        assert_eq!(field(span, "outcome"), outcome, "{span:?}");
        field(span, "key_hash")
            .parse::<u64>()
            .expect("a u64 key hash");
    }
    // Keys 1, 2 and 3 hash apart; equal keys of one registry hash alike.
    assert_ne!(field(&closed[0], "key_hash"), field(&closed[1], "key_hash"));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_flight_span_records_its_outcome() {
    let installed = Flights::install();
    let flights = &installed.0;
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().layer(backend);
        let mut leader = Box::pin(start(&mut svc, 1));
        assert!(futures::poll!(leader.as_mut()).is_pending());
        let _call = ctl.next().await;
        drop(leader);
    })
    .await;
    let closed = flights.closed();
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(field(&closed[0], "outcome"), "cancelled", "{closed:?}");
}

#[tokio::test(start_paused = true)]
async fn a_detached_flight_span_counts_its_waiters() {
    let installed = Flights::install();
    let flights = &installed.0;
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().detached(true).layer(backend);
        let w: Vec<_> = (0..3).map(|_| spawn(start(&mut svc, 1))).collect();
        ctl.next().await.ok("one");
        for w in w {
            ok(done("key 1", w).await);
        }
        until("the flight span closed", || !flights.closed().is_empty()).await;
    })
    .await;
    let closed = flights.closed();
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(field(&closed[0], "outcome"), "ok");
    assert_eq!(
        field(&closed[0], "waiters"),
        "3",
        "a leader and two followers"
    );
}
