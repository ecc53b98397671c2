//! Review: places where the crate's own code panics (or lets a panic of user code escape
//! half-way through a flight) on inputs a user can choose — option values, the clock, the
//! runtime, and user callbacks (`Drop`, `Clone`, the `metrics` recorder, the `tracing`
//! subscriber). Each test but the `extreme_*` controls failed before its fix (SECURITY.md,
//! finding 15).
//!
//! Deterministic: futures are polled by hand with a no-op waker, paused time moves only by
//! `tokio::time::advance`, and gates are oneshot channels. No sleep synchronises anything.

use std::convert::Infallible;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::oneshot;
use tower::{service_fn, Service};
use tower_coalesce::{CoalesceLayer, Group, GroupBuilder};
use tower_layer::Layer;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const YEAR: u64 = 365 * 86_400;

/// One poll with a no-op waker; `Err` if the poll panicked.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Result<Poll<F::Output>, ()> {
    let mut cx = Context::from_waker(Waker::noop());
    catch_unwind(AssertUnwindSafe(|| Pin::new(f).poll(&mut cx))).map_err(|_| ())
}

/// Whether `f` is ready within a few polls (its call is ready at once; no timer involved).
fn ready_soon<F: Future + Unpin>(f: &mut F) -> bool {
    (0..8).any(|_| matches!(poll_once(f), Ok(Poll::Ready(_))))
}

/// Moves the paused clock until only `room` is left before the end of `Instant`'s range.
async fn advance_to_clock_end(room: Duration) {
    let now = tokio::time::Instant::now();
    let (mut lo, mut hi) = (0u64, u64::MAX);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if now.checked_add(Duration::from_secs(mid)).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    tokio::time::advance(Duration::from_secs(lo) - room).await;
    assert!(tokio::time::Instant::now().checked_add(room * 2).is_none());
}

/// An error value whose destructor panics once, the first time any clone of it is dropped
/// while its fuse is lit.
#[derive(Clone, Debug)]
struct Fused(Arc<AtomicBool>);

impl Drop for Fused {
    fn drop(&mut self) {
        if self.0.swap(false, SeqCst) && !std::thread::panicking() {
            panic!("error destructor exploded");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The clock and the runtime
// ---------------------------------------------------------------------------------------------

/// flight.rs `keep_copy`: the fallback for a window past the clock's range is
/// `now + 30 years`, which overflows (panics) when the clock itself is within 30 years of its
/// end (paused time advanced that far). The panic is in the driver's `complete`, before the
/// flight is unregistered: the same hang as the `linger(Duration::MAX)` bug.
#[tokio::test(start_paused = true)]
async fn linger_max_near_the_clock_end_does_not_hang_followers() {
    advance_to_clock_end(Duration::from_secs(10 * YEAR)).await;
    let group: Group<u32> = GroupBuilder::new().linger(Duration::MAX).build();
    let (tx, rx) = oneshot::channel::<()>();
    let mut leader = group.run(1, move || async move {
        let _ = rx.await;
        7u32
    });
    let mut follower = group.run(1, || async { 0u32 });
    assert!(matches!(poll_once(&mut leader), Ok(Poll::Pending)));
    assert!(matches!(poll_once(&mut follower), Ok(Poll::Pending)));
    tx.send(()).unwrap();
    let led = poll_once(&mut leader);
    let served = matches!(poll_once(&mut follower), Ok(Poll::Ready(Ok(7))));
    let mut later = group.run(1, || async { 2u32 });
    let later_ready = ready_soon(&mut later);
    assert!(
        served,
        "the follower hangs (leader panicked: {})",
        led.is_err()
    );
    assert!(later_ready, "a later caller hangs on the dead flight");
    assert!(matches!(led, Ok(Poll::Ready(Ok(7)))), "the leader panicked");
}

/// Same clock, the layer's follower wait limit: `tokio::time::sleep(Duration::MAX)` is
/// `now + 30 years` in tokio, which panics there; the follower's `call` panics (the crate
/// already shields the timer's other failure, a shut-down runtime, at poll).
#[tokio::test(start_paused = true)]
async fn follower_timeout_max_near_the_clock_end_does_not_panic_the_follower() {
    advance_to_clock_end(Duration::from_secs(10 * YEAR)).await;
    let (tx, rx) = oneshot::channel::<()>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
        .follower_timeout(Duration::MAX)
        .layer(service_fn(move |k: u32| {
            let rx = rx.lock().unwrap().take();
            async move {
                if let Some(rx) = rx {
                    let _ = rx.await;
                }
                Ok::<_, Infallible>(k)
            }
        }));
    let mut leader = svc.call(1);
    assert!(matches!(poll_once(&mut leader), Ok(Poll::Pending)));
    let follower = catch_unwind(AssertUnwindSafe(|| svc.call(1)));
    assert!(follower.is_ok(), "the second request for a key panicked");
    tx.send(()).unwrap();
    assert!(matches!(poll_once(&mut leader), Ok(Poll::Ready(Ok(1)))));
    assert!(matches!(
        poll_once(&mut follower.unwrap()),
        Ok(Poll::Ready(Ok(1)))
    ));
}

/// future.rs `ResponseFuture::coalesced`: inside a runtime built without `enable_time`, the
/// wait limit's `tokio::time::sleep` panics ("timers are disabled") in the follower's `call`:
/// only once a second request for a key comes, a crash under load — the case the crate avoids
/// outside a runtime and on a shut-down one by waiting with no limit.
#[test]
fn follower_timeout_in_a_runtime_without_timers_does_not_panic_the_follower() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
            .follower_timeout(Duration::from_secs(1))
            .layer(service_fn(|k: u32| async move {
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(k)
            }));
        let leader = svc.call(1);
        let follower = catch_unwind(AssertUnwindSafe(|| svc.call(1)));
        assert!(follower.is_ok(), "the second request for a key panicked");
        let (a, b) = tokio::join!(leader, follower.unwrap());
        assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
    });
}

// ---------------------------------------------------------------------------------------------
// A failed output whose `Drop` panics, under `retry_failed`
// ---------------------------------------------------------------------------------------------

/// flight.rs `retry`: the spare copy of a failed output is dropped (`drop(spare)`) when
/// nobody can retry, before the flight is finished; its panic leaves the flight registered
/// and undriven: the follower and every later caller of the key hang.
#[tokio::test(start_paused = true)]
async fn panicking_drop_of_the_unused_retry_spare_does_not_hang_followers() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let fuse = Arc::new(AtomicBool::new(true));
    let (tx, rx) = oneshot::channel::<()>();
    let lit = fuse.clone();
    let mut leader = group.run_result(1, move || async move {
        let _ = rx.await;
        Err::<u32, _>(Fused(lit))
    });
    // `run_result` keeps no `make`: nobody can retry, so the spare is dropped.
    let mut follower = group.run_result(1, || async { Ok::<u32, Fused>(0) });
    assert!(matches!(poll_once(&mut leader), Ok(Poll::Pending)));
    assert!(matches!(poll_once(&mut follower), Ok(Poll::Pending)));
    tx.send(()).unwrap();
    let _ = poll_once(&mut leader); // its own error, or (arguably) the destructor's panic
    let served = matches!(poll_once(&mut follower), Ok(Poll::Ready(_)));
    let mut later = group.run_result(1, || async { Ok::<u32, Fused>(3) });
    let later_ready = ready_soon(&mut later);
    fuse.store(false, SeqCst);
    assert!(served, "the follower hangs");
    assert!(later_ready, "a later caller hangs on the dead flight");
}

/// flight.rs `leave_following`: when the last follower of a failed attempt handed on for
/// retry leaves, the flight is marked `Cancelled`, then the kept failure is dropped before
/// the entry is marked cancelling and removed. A panic there leaves a `Cancelled` entry for
/// ever; the next caller's flight waits for it to be removed: the key is dead.
#[tokio::test(start_paused = true)]
async fn panicking_drop_of_a_handed_on_failure_does_not_brick_the_key() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let fuse = Arc::new(AtomicBool::new(false));
    let (tx, rx) = oneshot::channel::<()>();
    let lit = fuse.clone();
    let mut leader = group.run_retryable(1, move || async move {
        let _ = rx.await;
        Err::<u32, _>(Fused(lit))
    });
    let mut follower = group.run_retryable(1, || async { Ok::<u32, Fused>(0) });
    assert!(matches!(poll_once(&mut leader), Ok(Poll::Pending)));
    assert!(matches!(poll_once(&mut follower), Ok(Poll::Pending)));
    tx.send(()).unwrap();
    let own = poll_once(&mut leader);
    assert!(matches!(own, Ok(Poll::Ready(Ok(Err(_))))), "its own error");
    fuse.store(true, SeqCst);
    // The only follower leaves before taking the retry on.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(follower)));
    let mut later = group.run_retryable(1, || async { Ok::<u32, Fused>(9) });
    let later_ready = ready_soon(&mut later);
    fuse.store(false, SeqCst);
    assert!(later_ready, "the key's next flight waits for ever");
    assert_eq!(group.in_flight(), 0);
}

/// flight.rs `poll_following`: the follower elected to retry sets `driven` and takes the
/// kept failure, then drops it; a panic there leaves a flight that is "driven" by nobody:
/// the other followers and every later caller of the key hang.
#[tokio::test(start_paused = true)]
async fn panicking_drop_of_the_failure_taken_by_the_retrier_does_not_hang_the_others() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let fuse = Arc::new(AtomicBool::new(false));
    let (tx, rx) = oneshot::channel::<()>();
    let lit = fuse.clone();
    let mut leader = group.run_retryable(1, move || async move {
        let _ = rx.await;
        Err::<u32, _>(Fused(lit))
    });
    let mut first = group.run_retryable(1, || async { Ok::<u32, Fused>(4) });
    let mut second = group.run_retryable(1, || async { Ok::<u32, Fused>(5) });
    for run in [&mut leader, &mut first, &mut second] {
        assert!(matches!(poll_once(run), Ok(Poll::Pending)));
    }
    tx.send(()).unwrap();
    assert!(matches!(
        poll_once(&mut leader),
        Ok(Poll::Ready(Ok(Err(_))))
    ));
    fuse.store(true, SeqCst);
    let _ = poll_once(&mut first); // elected: takes the failure and drops it
    let _ = catch_unwind(AssertUnwindSafe(move || drop(first)));
    let second_ready = ready_soon(&mut second);
    let mut later = group.run_retryable(1, || async { Ok::<u32, Fused>(6) });
    let later_ready = ready_soon(&mut later);
    fuse.store(false, SeqCst);
    assert!(second_ready, "the other follower hangs");
    assert!(later_ready, "a later caller hangs on the dead flight");
}

// ---------------------------------------------------------------------------------------------
// A panicking `Clone` whose panic payload's `Drop` panics, under `linger`
// ---------------------------------------------------------------------------------------------

/// A panic payload whose destructor panics too.
struct PayloadBomb;

impl Drop for PayloadBomb {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("payload destructor exploded");
        }
    }
}

/// An output whose `Clone` panics with a [`PayloadBomb`] while its flag is set.
#[derive(Debug)]
struct Flaky(Arc<AtomicBool>);

impl Clone for Flaky {
    fn clone(&self) -> Self {
        if self.0.load(SeqCst) {
            std::panic::panic_any(PayloadBomb);
        }
        Flaky(self.0.clone())
    }
}

/// flight.rs `keep_copy`: `catch_unwind(..).ok()?` drops the panic payload of the output's
/// `Clone` unguarded (everywhere else the crate drops payloads through `Panicked::new`, which
/// contains their destructor). The payload's panic escapes `complete` before the flight is
/// unregistered: the follower and the key hang.
#[tokio::test(start_paused = true)]
async fn panicking_payload_of_a_lingering_copy_does_not_hang_followers() {
    let group: Group<u32> = GroupBuilder::new().linger(Duration::from_secs(1)).build();
    let failing = Arc::new(AtomicBool::new(false));
    let (tx, rx) = oneshot::channel::<()>();
    let flag = failing.clone();
    let mut leader = group.run(1, move || async move {
        let _ = rx.await;
        Flaky(flag)
    });
    let spare = Arc::new(AtomicBool::new(false));
    let mut follower = group.run(1, move || async move { Flaky(spare) });
    assert!(matches!(poll_once(&mut leader), Ok(Poll::Pending)));
    assert!(matches!(poll_once(&mut follower), Ok(Poll::Pending)));
    failing.store(true, SeqCst);
    tx.send(()).unwrap();
    let _ = poll_once(&mut leader);
    let served = matches!(poll_once(&mut follower), Ok(Poll::Ready(_)));
    failing.store(false, SeqCst);
    let mut later = group.run(1, {
        let flag = failing.clone();
        move || async move { Flaky(flag) }
    });
    assert!(served, "the follower hangs");
    assert!(
        ready_soon(&mut later),
        "a later caller hangs on the dead flight"
    );
}

// ---------------------------------------------------------------------------------------------
// A `metrics` recorder that panics (feature `metrics`)
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "metrics")]
mod recorder {
    use metrics::{with_local_recorder, Unit};
    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString};

    /// Panics when the counter `name` is registered (any other is a no-op).
    pub struct Exploding(pub &'static str);

    impl Recorder for Exploding {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            if key.name() == self.0 {
                panic!("metrics recorder exploded on {}", self.0);
            }
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    /// Runs `f` with a recorder that panics on the counter `name`; `None` if it panicked.
    pub fn exploding_on<T>(name: &'static str, f: impl FnOnce() -> T) -> Option<T> {
        let recorder = Exploding(name);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_local_recorder(&recorder, f)
        }))
        .ok()
    }
}

/// flight.rs `run_classified`: `emit("tower_coalesce_leaders_total")` runs after the entry is
/// registered and before its driver exists (`make` is never called). A recorder panic there
/// leaves a registered flight nobody drives: every later caller joins it and hangs.
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn panicking_recorder_on_a_new_flight_does_not_brick_the_key() {
    let group: Group<u32> = Group::new();
    let first = recorder::exploding_on("tower_coalesce_leaders_total", || {
        group.run(1, || async { 1u32 })
    });
    let first = first.expect("a recorder's panic is contained: the request goes on");
    assert_eq!(first.await.unwrap(), 1);
    let mut later = group.run(1, || async { 2u32 });
    assert!(
        ready_soon(&mut later),
        "a later caller joins a flight nobody drives"
    );
    assert_eq!(group.in_flight(), 0);
}

/// flight.rs `run_classified`: `emit("tower_coalesce_followers_total")` runs after the
/// follower's slot is inserted and before its `Run` exists: the slot leaks, so the flight is
/// never cancelled when its real waiters leave — the call is not dropped and the entry stays.
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn panicking_recorder_on_a_new_follower_does_not_leak_its_slot() {
    struct Dropped(Arc<AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }
    let group: Group<u32> = Group::new();
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    let mut leader = group.run(1, move || async move {
        let _guard = Dropped(flag);
        std::future::pending::<u32>().await
    });
    assert!(matches!(poll_once(&mut leader), Ok(Poll::Pending)));
    let follower = recorder::exploding_on("tower_coalesce_followers_total", || {
        group.run(1, || async { 0u32 })
    });
    drop(follower.expect("a recorder's panic is contained: the request goes on"));
    drop(leader); // the last waiter
    assert!(dropped.load(SeqCst), "the cancelled call was not dropped");
    assert_eq!(group.in_flight(), 0, "the entry stays registered");
}

/// flight.rs `start_retry`: `emit` runs after the elected follower set `driven` and took its
/// `make`, before it drives: a recorder panic leaves a flight driven by nobody.
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn panicking_recorder_on_a_retry_does_not_hang_the_others() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let (tx, rx) = oneshot::channel::<()>();
    let mut leader = group.run_retryable(1, move || async move {
        let _ = rx.await;
        Err::<u32, &'static str>("flaky")
    });
    let mut first = group.run_retryable(1, || async { Ok::<u32, &'static str>(4) });
    let mut second = group.run_retryable(1, || async { Ok::<u32, &'static str>(5) });
    for run in [&mut leader, &mut first, &mut second] {
        assert!(matches!(poll_once(run), Ok(Poll::Pending)));
    }
    tx.send(()).unwrap();
    assert!(matches!(
        poll_once(&mut leader),
        Ok(Poll::Ready(Ok(Err("flaky"))))
    ));
    let elected = recorder::exploding_on("tower_coalesce_retried_total", || poll_once(&mut first));
    assert!(
        matches!(elected, Some(Ok(Poll::Ready(Ok(Ok(4)))))),
        "the recorder's panic is contained: the elected follower's retry runs"
    );
    drop(first);
    assert!(ready_soon(&mut second), "the other follower hangs");
    let mut later = group.run_retryable(1, || async { Ok::<u32, &'static str>(6) });
    assert!(
        ready_soon(&mut later),
        "a later caller hangs on the dead flight"
    );
}

// ---------------------------------------------------------------------------------------------
// A `tracing` subscriber that panics (feature `tracing`)
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "tracing")]
mod subscriber {
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    /// Panics when a span is created.
    pub struct Exploding;

    impl Subscriber for Exploding {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            panic!("tracing subscriber exploded")
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}

/// flight.rs `run_classified`: the flight's span (`debug_span!`: the subscriber, user code)
/// is made inside the shard lock, after `max_in_flight`'s place was taken. A subscriber panic
/// there leaked the place for good: with `max_in_flight(1)` every later call ran alone.
#[cfg(feature = "tracing")]
#[tokio::test(start_paused = true)]
async fn panicking_subscriber_on_a_new_flight_does_not_leak_a_max_in_flight_place() {
    let group: Group<u32> = GroupBuilder::new().max_in_flight(1).build();
    let first = catch_unwind(AssertUnwindSafe(|| {
        tracing::subscriber::with_default(subscriber::Exploding, || group.run(1, || async { 1u32 }))
    }));
    let first = first.expect("the subscriber's panic is contained: the request goes on");
    assert_eq!(first.await.unwrap(), 1);
    let mut later = group.run(2, || async { 2u32 });
    assert!(
        !later.is_alone(),
        "the place of the flight that never started is gone"
    );
    assert!(ready_soon(&mut later));
}

// ---------------------------------------------------------------------------------------------
// Controls (not bugs): extreme option values that must not, and do not, panic
// ---------------------------------------------------------------------------------------------

/// Every registry option at 0 / `MAX`, with a failing and a succeeding call per key.
#[tokio::test(start_paused = true)]
async fn extreme_group_options_do_not_panic() {
    let builders = [
        GroupBuilder::new().max_followers(0),
        GroupBuilder::new().max_followers(usize::MAX),
        GroupBuilder::new().max_in_flight(0),
        GroupBuilder::new().max_in_flight(usize::MAX),
        GroupBuilder::new().retry_failed(u32::MAX),
        GroupBuilder::new().linger(Duration::ZERO),
        GroupBuilder::new().linger(Duration::MAX),
        GroupBuilder::new().linger_errors(Duration::MAX),
        GroupBuilder::new().linger_errors(Duration::ZERO),
        GroupBuilder::new().detached(true).retry_failed(u32::MAX),
    ];
    for builder in builders {
        let group: Group<u32> = builder.build();
        for _ in 0..2 {
            let a = group.run_retryable(1, || async { Err::<u32, &str>("no") });
            let b = group.run_retryable(1, || async { Ok::<u32, &str>(1) });
            let c = group.run_retryable(1, || async { Ok::<u32, &str>(2) });
            let (a, b, c) = tokio::join!(a, b, c);
            assert!(a.is_ok() && b.is_ok() && c.is_ok());
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        group.purge_expired();
        assert_eq!(group.in_flight(), 0);
    }
}

/// The layer's wait limit at `ZERO` and `MAX`, both actions (normal clock).
#[tokio::test(start_paused = true)]
async fn extreme_follower_timeouts_do_not_panic() {
    use tower_coalesce::OnTimeout;
    for limit in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
        for action in [OnTimeout::CallInner, OnTimeout::Error] {
            let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
                .follower_timeout(limit)
                .on_follower_timeout(action)
                .retry_failed(u32::MAX)
                .layer(service_fn(|k: u32| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok::<_, Infallible>(k)
                }));
            let (a, b) = tokio::join!(svc.call(1), svc.call(1));
            assert_eq!(a.unwrap(), 1);
            assert!(b.is_ok() || b.unwrap_err().is_timeout());
        }
    }
}

/// The HTTP body limit and the gRPC message limits at 0 and `usize::MAX`.
#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn extreme_adapter_limits_do_not_panic() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower_coalesce::grpc::CoalesceGrpcLayer;
    use tower_coalesce::http::CoalesceHttpLayer;

    for limit in [0, 1, usize::MAX] {
        let mut svc = CoalesceHttpLayer::new()
            .max_body_bytes(limit)
            .layer(service_fn(|_: http::Request<Full<Bytes>>| async {
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"hi"))))
            }));
        let get = || http::Request::get("/a").body(Full::default()).unwrap();
        let (a, b) = tokio::join!(svc.call(get()), svc.call(get()));
        for res in [a, b] {
            let body = res.unwrap().into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hi");
        }

        let method = "/a.B/C";
        let mut svc = CoalesceGrpcLayer::new()
            .method(method)
            .request_limit(limit)
            .response_limit(limit)
            .layer(service_fn(|_: http::Request<_>| async {
                tokio::task::yield_now().await;
                let res = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                    .unwrap();
                Ok::<_, Infallible>(res)
            }));
        let call = || {
            http::Request::post(method)
                .header("content-type", "application/grpc")
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01x")))
                .unwrap()
        };
        let (a, b) = tokio::join!(svc.call(call()), svc.call(call()));
        for res in [a, b] {
            let body = res.unwrap().into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 5);
        }
    }
}
