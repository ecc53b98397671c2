//! Review of the session 9 diff (3d8b97e..HEAD): the eager inner call in
//! `CoalesceService::call` (`Call::begin`), over-capacity requests as bypasses, the HTTP
//! status rule (RFC 9111 §3), the gRPC write counter, and the core fixes.
//!
//! It found two consequences of calling the inner service in `call` (as tower's own
//! middleware does), kept and documented on `CoalesceService` rather than changed: a response
//! future that is never polled holds whatever the inner `call` reserved (a `ConcurrencyLimit`
//! permit below the layer), so futures must be polled (joined, spawned) rather than awaited
//! one after another out of order; and a future must be made where the inner service's `call`
//! can run (inside the runtime, for tower's `Timeout` below). The tests here pin what held.
//! No sleep decides anything: every wait is bounded (paused clocks, `tokio::time::timeout`,
//! or a watchdog thread).

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_coalesce::{CoalesceError, CoalesceLayer};

/// An inner service counting its calls (at `call`, not at poll), answering its request.
fn counting() -> (
    impl Service<u32, Response = u32, Error = Infallible, Future = impl Send> + Clone + Send,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = service_fn(move |k: u32| {
        c.fetch_add(1, SeqCst);
        async move { Ok::<_, Infallible>(k) }
    });
    (svc, calls)
}

// ---------------------------------------------------------------------------------------------
// (1) The eager call
// ---------------------------------------------------------------------------------------------

/// Control: with tower's `ConcurrencyLimit(1)` and no coalescing layer, two response futures
/// made with `oneshot` (the usual way to call a clone) can be awaited in any order.
#[tokio::test(start_paused = true)]
async fn control_concurrency_limit_without_the_layer_awaits_in_any_order() {
    let (inner, _) = counting();
    let svc = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(1))
        .service(inner);
    let a = svc.clone().oneshot(1);
    let b = svc.clone().oneshot(2);
    let b = tokio::time::timeout(Duration::from_secs(5), b).await;
    assert_eq!(b.expect("b").unwrap(), 2);
    assert_eq!(a.await.unwrap(), 1);
}

/// Control for the permit case: when every future is polled (join), the eager call's
/// `Pending` readiness (seen with a no-op waker) is polled again with the flight's waker, and
/// the second key runs once the first gives its permit back.
#[tokio::test(start_paused = true)]
async fn concurrency_limit_below_with_every_future_polled_completes() {
    let (inner, calls) = counting();
    let mut svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(|k: &u32| Some(*k)))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(inner);
    let futs: Vec<_> = [1, 2, 3, 1, 2, 3]
        .into_iter()
        .map(|k| svc.call(k))
        .collect();
    let out = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(futs))
        .await
        .expect("join");
    let out: Vec<u32> = out.into_iter().map(Result::unwrap).collect();
    assert_eq!(out, [1, 2, 3, 1, 2, 3]);
    assert_eq!(calls.load(SeqCst), 3);
    assert_eq!(svc.in_flight(), 0);
}

/// Control: the same service polled where it is made works.
#[tokio::test]
async fn future_made_inside_the_runtime_with_a_timeout_below() {
    let (inner, _) = counting();
    let mut svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(|k: &u32| Some(*k)))
        .timeout(Duration::from_secs(5))
        .service(inner);
    assert_eq!(svc.call(1).await.unwrap(), 1);
}

/// A service whose `call` panics synchronously: the panic is kept until the leader's first
/// poll, so followers that joined before it all get a panic error; the key is usable after.
#[tokio::test(start_paused = true)]
async fn synchronous_call_panic_reaches_followers_that_joined_before_the_first_poll() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |k: u32| {
        if c.fetch_add(1, SeqCst) == 0 {
            panic!("sync boom");
        }
        async move { Ok::<_, Infallible>(k) }
    });
    let mut svc = CoalesceLayer::new(|k: &u32| Some(*k)).layer(inner);
    let leader = svc.call(1); // the panic happens here, caught
    assert_eq!(calls.load(SeqCst), 1);
    let followers: Vec<_> = (0..3).map(|_| svc.call(1)).collect();
    assert!(followers.iter().all(|f| f.is_follower()));
    assert!(leader.is_leader());
    let (l, f) = tokio::join!(leader, futures::future::join_all(followers));
    assert!(l.unwrap_err().is_panic());
    for r in f {
        let e: CoalesceError = r.unwrap_err();
        assert!(e.is_panic(), "{e}");
    }
    assert_eq!(svc.in_flight(), 0);
    assert_eq!(svc.call(1).await.unwrap(), 1);
    assert_eq!(calls.load(SeqCst), 2);
    support::check_sum(&svc.stats(), 5);
}

/// The leader's eager call, its future never polled, then the leader dropped: the follower
/// takes the begun call over (one request reaches the mock), and gets its response.
#[tokio::test(start_paused = true)]
async fn unpolled_leader_dropped_hands_its_begun_call_to_a_follower() {
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<u32, u32, _>(CoalesceLayer::new(|k: &u32| Some(*k)));
    assert!(svc.poll_ready().is_ready());
    let leader = svc.call(4);
    let mut follower = svc.call(4);
    let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("begun at call")
        .unwrap();
    assert_eq!(req, 4);
    drop(leader);
    assert!(support::poll(&mut follower).is_pending());
    send.send_response(40);
    assert_eq!(support::ready(&mut follower, "follower").unwrap(), 40);
    // Nothing else reached the mock.
    assert!(
        tokio::time::timeout(Duration::from_millis(10), handle.next_request())
            .await
            .is_err()
    );
}

/// The same leader alone: dropping it cancels the begun call and frees the key; the next request begins a call of its own.
#[tokio::test(start_paused = true)]
async fn unpolled_leader_dropped_alone_cancels_the_begun_call_and_frees_the_key() {
    let layer = CoalesceLayer::new(|k: &u32| Some(*k));
    let (mut svc, mut handle) = tower_test::mock::spawn_layer::<u32, u32, _>(layer.clone());
    assert!(svc.poll_ready().is_ready());
    let leader = svc.call(4);
    let (_, send) = handle.next_request().await.unwrap();
    assert_eq!(layer.in_flight(), 1);
    drop(leader);
    assert_eq!(layer.in_flight(), 0);
    send.send_response(0); // to a dropped call: nobody gets it
    let mut again = svc.call(4);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 4);
    send.send_response(41);
    assert_eq!(support::ready(&mut again, "again").unwrap(), 41);
    assert_eq!(layer.in_flight(), 0);
}

/// Readiness `Pending` when `call` polls it with a no-op waker: the flight's first poll asks
/// again with its own waker, and the mock's later `allow` wakes that one.
#[tokio::test(start_paused = true)]
async fn readiness_pending_at_call_is_polled_again_with_the_real_waker() {
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<u32, u32, _>(CoalesceLayer::new(|k: &u32| Some(*k)));
    handle.allow(0);
    assert!(svc.poll_ready().is_ready());
    let leader = svc.call(9);
    let follower = svc.call(9);
    let bypassed = {
        // A key-less request through a second layer over the same mock: eager too.
        let (mut svc2, mut handle2) =
            tower_test::mock::spawn_layer::<u32, u32, _>(CoalesceLayer::new(|_: &u32| None::<u32>));
        handle2.allow(0);
        let f = svc2.call(3);
        assert!(handle2.poll_request().is_pending());
        let task = tokio::spawn(f);
        tokio::task::yield_now().await;
        handle2.allow(1);
        let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle2.next_request())
            .await
            .expect("the bypass's readiness woke its task")
            .unwrap();
        assert_eq!(req, 3);
        send.send_response(30);
        task
    };
    assert!(handle.poll_request().is_pending(), "not ready: not called");
    let task = tokio::spawn(async move { tokio::join!(leader, follower) });
    tokio::task::yield_now().await;
    handle.allow(1);
    let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("allow() woke the flight's real waker")
        .unwrap();
    assert_eq!(req, 9);
    send.send_response(90);
    let (a, b) = tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.unwrap(), b.unwrap()), (90, 90));
    assert_eq!(bypassed.await.unwrap().unwrap(), 30);
}

/// A request without a key, and one over `max_in_flight`, reach the mock at `call` too; the
/// over-bound one is `is_bypass()`/`is_alone()`, not `is_leader()`.
#[tokio::test(start_paused = true)]
async fn bypassed_and_over_capacity_requests_are_called_at_call() {
    let layer = CoalesceLayer::new(|k: &u32| (*k != 0).then_some(*k)).max_in_flight(1);
    let (mut svc, mut handle) = tower_test::mock::spawn_layer::<u32, u32, _>(layer.clone());
    assert!(svc.poll_ready().is_ready());
    let mut leader = svc.call(1);
    let mut over = svc.call(2);
    let mut none = svc.call(0);
    assert!(leader.is_leader() && !leader.is_bypass());
    assert!(over.is_bypass() && over.is_alone() && !over.is_leader() && !over.is_follower());
    assert!(none.is_bypass() && !none.is_leader());
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
            .await
            .expect("every request was called at call")
            .unwrap();
        seen.push(req);
        send.send_response(req * 10);
    }
    assert_eq!(seen, [1, 2, 0]);
    assert_eq!(support::ready(&mut leader, "leader").unwrap(), 10);
    assert_eq!(support::ready(&mut over, "over").unwrap(), 20);
    assert_eq!(support::ready(&mut none, "none").unwrap(), 0);
    let s = layer.stats();
    assert_eq!((s.leaders, s.over_capacity, s.bypassed), (1, 1, 1));
    assert_eq!(layer.in_flight(), 0);
}

/// `poll_ready` failing at `call`: every waiter gets that error (shared), the key is freed.
#[tokio::test(start_paused = true)]
async fn readiness_error_at_call_reaches_every_waiter() {
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<u32, u32, _>(CoalesceLayer::new(|k: &u32| Some(*k)));
    handle.send_error("not ready");
    let mut a = svc.call(5);
    let mut b = svc.call(5);
    assert!(b.is_follower());
    let ea = support::ready(&mut a, "a").unwrap_err();
    let eb = support::ready(&mut b, "b").unwrap_err();
    assert!(!ea.is_panic() && !eb.is_panic());
    assert_eq!(ea.to_string(), eb.to_string());
    assert_eq!(svc.get_ref().in_flight(), 0);
}

/// `retry_failed`: the leader's call panics synchronously (kept until its first poll); a
/// follower retries with its own request and everybody gets the retry's response.
#[tokio::test(start_paused = true)]
async fn retry_after_a_synchronous_call_panic() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |k: u32| {
        if c.fetch_add(1, SeqCst) == 0 {
            panic!("sync boom");
        }
        async move { Ok::<_, Infallible>(k + 100) }
    });
    let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
        .retry_failed(1)
        .layer(inner);
    let leader = svc.call(1);
    let follower = svc.call(1);
    assert_eq!(calls.load(SeqCst), 1);
    let (l, f) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(leader, follower)
    })
    .await
    .expect("bounded");
    assert_eq!(f.unwrap(), 101);
    // The leader's own attempt panicked; it may get the retry's output or its panic.
    match l {
        Ok(v) => assert_eq!(v, 101),
        Err(e) => assert!(e.is_panic()),
    }
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(svc.in_flight(), 0);
}

/// A detached flight begun at `call`, its caller gone at once: the spawned driver completes
/// the call (once), and the registry empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_flight_begun_at_call_completes_after_its_caller_left() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |k: u32| {
        c.fetch_add(1, SeqCst);
        let rx = rx.lock().unwrap().take();
        let d = d.clone();
        async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            d.fetch_add(1, SeqCst);
            Ok::<_, Infallible>(k)
        }
    });
    let layer = CoalesceLayer::new(|k: &u32| Some(*k)).detached(true);
    let mut svc = layer.layer(inner);
    drop(svc.call(1));
    assert_eq!(calls.load(SeqCst), 1, "called at call");
    let f = svc.call(1);
    assert!(f.is_follower(), "the detached flight is still there");
    drop(f);
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while done.load(SeqCst) == 0 || layer.in_flight() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the detached flight finished");
    assert_eq!(calls.load(SeqCst), 1);
}

/// The leader's `call` panicked synchronously (kept), the leader dropped before its first
/// poll: the follower takes the begun call over and gets its panic; with `retry_failed`, it
/// retries with its own request instead.
#[tokio::test(start_paused = true)]
async fn unpolled_leader_with_a_kept_panic_dropped_before_its_first_poll() {
    for retries in [0, 1] {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let inner = service_fn(move |k: u32| {
            if c.fetch_add(1, SeqCst) == 0 {
                panic!("sync boom");
            }
            async move { Ok::<_, Infallible>(k) }
        });
        let mut svc = CoalesceLayer::new(|k: &u32| Some(*k))
            .retry_failed(retries)
            .layer(inner);
        let leader = svc.call(2);
        let mut follower = svc.call(2);
        drop(leader);
        let out = support::ready(&mut follower, "follower");
        match retries {
            0 => assert!(out.unwrap_err().is_panic()),
            _ => assert_eq!(out.unwrap(), 2),
        }
        assert_eq!(calls.load(SeqCst), 1 + retries as usize);
        assert_eq!(svc.in_flight(), 0);
        support::check_sum(&svc.stats(), 2);
    }
}

// ---------------------------------------------------------------------------------------------
// (3) HTTP: statuses a cache may not reuse without explicit freshness
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "http")]
mod http_status {
    use super::*;
    use http::Method;
    use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

    use crate::support::adapter::{self, map, streamed, Read, Req};

    /// Three equal requests held at the inner service until all have joined; every call
    /// answers `status` with `headers`. Returns the inner calls and what each caller got.
    async fn three(
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        req: fn() -> Req,
    ) -> (usize, Vec<Read>) {
        let (inner, calls, open) = adapter::gated_counted(move |_, _| {
            adapter::response(status, map(headers), streamed(&[b"body"], None))
        });
        let mut svc = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .layer(inner);
        let futs: Vec<_> = (0..3).map(|_| svc.call(req())).collect();
        open.send(true).unwrap();
        let mut reads = Vec::new();
        for res in futures::future::join_all(futs).await {
            reads.push(adapter::read(res.unwrap()).await);
        }
        assert_eq!(svc.in_flight(), 0);
        (calls.load(SeqCst), reads)
    }

    fn assert_shared(what: &str, (calls, reads): (usize, Vec<Read>)) {
        assert_eq!(calls, 1, "{what}: one call");
        assert_eq!(reads[0].by, ServedBy::Leader, "{what}");
        for r in &reads[1..] {
            assert_eq!(r.by, ServedBy::Follower, "{what}: {}", r.cache_status());
        }
    }

    fn assert_released(what: &str, detail: &str, (calls, reads): (usize, Vec<Read>)) {
        assert_eq!(calls, 3, "{what}: every follower called on its own");
        assert_eq!(reads[0].by, ServedBy::Leader, "{what}");
        for r in &reads[1..] {
            assert_eq!(r.by, ServedBy::Released, "{what}");
            assert!(
                r.cache_status().contains(&format!("detail={detail}")),
                "{what}: {}",
                r.cache_status()
            );
        }
    }

    fn conditional() -> Req {
        adapter::request(Method::GET, &[("if-none-match", "\"v1\"")])
    }

    fn head() -> Req {
        adapter::request(Method::HEAD, &[])
    }

    #[tokio::test(start_paused = true)]
    async fn answers_to_validators_and_heuristic_statuses_are_shared() {
        assert_shared("304", three(304, &[("etag", "\"v1\"")], conditional).await);
        assert_shared("412", three(412, &[], conditional).await);
        assert_shared(
            "206 to a non-range GET",
            three(206, &[], adapter::get).await,
        );
        assert_shared("HEAD 200", three(200, &[], head).await);
        assert_shared("404", three(404, &[], adapter::get).await);
        assert_shared("501", three(501, &[], adapter::get).await);
    }

    #[tokio::test(start_paused = true)]
    async fn error_statuses_without_freshness_release_the_followers() {
        assert_released(
            "302",
            "status",
            three(302, &[("location", "/x")], adapter::get).await,
        );
        assert_released("HEAD 503", "status", three(503, &[], head).await);
        assert_released(
            "429",
            "status",
            three(429, &[("retry-after", "1")], adapter::get).await,
        );
        assert_released(
            "500 must-revalidate only",
            "status",
            three(500, &[("cache-control", "must-revalidate")], adapter::get).await,
        );
    }

    #[tokio::test(start_paused = true)]
    async fn error_statuses_with_explicit_freshness_are_shared() {
        assert_shared(
            "500 public",
            three(500, &[("cache-control", "public")], adapter::get).await,
        );
        assert_shared(
            "503 max-age=5",
            three(503, &[("cache-control", "max-age=5")], adapter::get).await,
        );
        assert_shared(
            "500 s-maxage wins over max-age=0",
            three(
                500,
                &[("cache-control", "max-age=0, s-maxage=5")],
                adapter::get,
            )
            .await,
        );
        assert_shared(
            "500 Expires after Date",
            three(
                500,
                &[
                    ("date", "Thu, 01 Jan 2099 00:00:00 GMT"),
                    ("expires", "Thu, 01 Jan 2099 00:01:00 GMT"),
                ],
                adapter::get,
            )
            .await,
        );
    }

    #[tokio::test(start_paused = true)]
    async fn error_statuses_with_zero_or_invalid_freshness_release_the_followers() {
        for (what, headers) in [
            ("500 max-age=0", &[("cache-control", "max-age=0")][..]),
            (
                "500 public, no-store",
                &[("cache-control", "public, no-store")][..],
            ),
            (
                "500 public, max-age=0",
                &[("cache-control", "public, max-age=0")][..],
            ),
            ("500 max-age=abc", &[("cache-control", "max-age=abc")][..]),
            ("500 bare s-maxage", &[("cache-control", "s-maxage")][..]),
            ("500 Expires invalid", &[("expires", "soon")][..]),
            ("500 Expires 0", &[("expires", "0")][..]),
            (
                "500 max-age=10 but Age 20",
                &[("cache-control", "max-age=10"), ("age", "20")][..],
            ),
        ] {
            let headers: &'static [(&'static str, &'static str)] = headers;
            let (calls, reads) = three(500, headers, adapter::get).await;
            assert_eq!(calls, 3, "{what}");
            for r in &reads[1..] {
                assert_eq!(r.by, ServedBy::Released, "{what}");
                assert!(
                    r.cache_status().contains("detail=cache-control"),
                    "{what}: {}",
                    r.cache_status()
                );
            }
        }
    }

    /// Over `max_followers`, an HTTP request is `ServedBy::Bypass` (`fwd=bypass;
    /// detail=over-capacity`) on every path: a shareable 200 and a released 500 alike.
    #[tokio::test(start_paused = true)]
    async fn over_max_followers_is_bypass_whatever_the_status() {
        for status in [200, 500] {
            let (inner, calls, open) = adapter::gated_counted(move |_, _| {
                adapter::response(status, map(&[]), streamed(&[b"x"], None))
            });
            let mut svc = CoalesceHttpLayer::new()
                .cache_status_header(true)
                .max_followers(1)
                .layer(inner);
            let futs: Vec<_> = (0..3).map(|_| svc.call(adapter::get())).collect();
            assert_eq!(futs[2].served_by(), ServedBy::Bypass);
            open.send(true).unwrap();
            let mut reads = Vec::new();
            for res in futures::future::join_all(futs).await {
                reads.push(adapter::read(res.unwrap()).await);
            }
            assert_eq!(reads[0].by, ServedBy::Leader);
            assert_eq!(reads[2].by, ServedBy::Bypass, "{status}");
            assert!(
                reads[2]
                    .cache_status()
                    .contains("fwd=bypass; detail=over-capacity"),
                "{status}: {}",
                reads[2].cache_status()
            );
            assert_eq!(calls.load(SeqCst), if status == 200 { 2 } else { 3 });
            let s = svc.stats();
            assert_eq!(s.over_capacity, 1);
            support::check_sum(&s, 3);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (4) gRPC: calls of methods not allow-listed count as writes
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "grpc")]
mod grpc_writes {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, Request, Response};
    use http_body_util::Full;
    use tokio::sync::watch;
    use tower_coalesce::grpc::CoalesceGrpcLayer;
    use tower_coalesce::http::{CoalesceBody, ServedBy};

    use crate::support::adapter::{self, B, GRPC_PATH};

    const SET: &str = "/catalog.v1.Catalog/SetItem";

    fn call_of(path: &str, method: http::Method) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01a")))
            .unwrap()
    }

    fn status(code: &str) -> Response<B> {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        adapter::response(
            200,
            adapter::map(&[("content-type", "application/grpc")]),
            adapter::grpc_body(t),
        )
    }

    /// Reads (`GRPC_PATH`) wait for `gate`; `SetItem` answers at once with `write_answer`: an
    /// inner error (`None`) or a gRPC status. Returns the service, the read count, the gate.
    #[allow(clippy::type_complexity)]
    fn store(
        write_answer: Option<&'static str>,
    ) -> (
        impl Service<
                Request<CoalesceBody<Full<Bytes>>>,
                Response = Response<B>,
                Error = &'static str,
                Future = impl Send,
            > + Clone
            + Send,
        Arc<AtomicUsize>,
        watch::Sender<bool>,
    ) {
        let reads = Arc::new(AtomicUsize::new(0));
        let r = reads.clone();
        let (open, gate) = watch::channel(false);
        let svc = service_fn(move |req: Request<CoalesceBody<Full<Bytes>>>| {
            let write = req.uri().path() != GRPC_PATH;
            if !write {
                r.fetch_add(1, SeqCst);
            }
            let mut gate = gate.clone();
            async move {
                if write {
                    return match write_answer {
                        None => Err("write failed"),
                        Some(code) => Ok(status(code)),
                    };
                }
                gate.wait_for(|o| *o).await.unwrap();
                Ok(status("0"))
            }
        });
        (svc, reads, open)
    }

    async fn settle(what: &str, done: impl Fn() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{what}: not reached");
    }

    /// A write that fails (inner error, or a gRPC error status) still counts: it may have
    /// changed something. A later read does not join the read flight begun before it.
    #[tokio::test]
    async fn failed_writes_still_end_joinability_of_older_reads() {
        for answer in [None, Some("13"), Some("0")] {
            let (inner, reads, open) = store(answer);
            let layer = CoalesceGrpcLayer::new().method(GRPC_PATH);
            let svc = layer.layer(inner);
            let before = tokio::spawn(svc.clone().oneshot(adapter::grpc_request()));
            settle("first read called", || reads.load(SeqCst) == 1).await;
            let w = svc.clone().oneshot(call_of(SET, http::Method::POST)).await;
            assert_eq!(w.is_err(), answer.is_none());
            let after = tokio::spawn(svc.clone().oneshot(adapter::grpc_request()));
            settle("later read placed", || {
                layer.waiting() == 1 || reads.load(SeqCst) == 2
            })
            .await;
            assert_eq!(
                reads.load(SeqCst),
                2,
                "{answer:?}: the later read joined the older flight"
            );
            open.send(true).unwrap();
            before.await.unwrap().unwrap();
            after.await.unwrap().unwrap();
        }
    }

    /// A non-POST request (not a gRPC call) passing through is not a write: a later read still
    /// joins the running flight. So is a read over a capacity bound (its own call): it is
    /// `ServedBy::Bypass` and bumps nothing.
    #[tokio::test]
    async fn non_post_and_over_capacity_calls_are_not_writes() {
        let (inner, reads, open) = store(Some("0"));
        let layer = CoalesceGrpcLayer::new().method(GRPC_PATH).max_followers(1);
        let svc = layer.layer(inner);
        let first = tokio::spawn(svc.clone().oneshot(adapter::grpc_request()));
        settle("first read called", || reads.load(SeqCst) == 1).await;
        let get = svc.clone().oneshot(call_of(SET, http::Method::GET)).await;
        assert!(get.is_ok());
        let second = tokio::spawn(svc.clone().oneshot(adapter::grpc_request()));
        settle("second read placed", || {
            layer.waiting() == 1 || reads.load(SeqCst) == 2
        })
        .await;
        assert_eq!(layer.waiting(), 1, "a GET is no write: the read joined");
        let third = tokio::spawn(svc.clone().oneshot(adapter::grpc_request()));
        settle("third read called alone", || reads.load(SeqCst) == 2).await;
        open.send(true).unwrap();
        let by = |r: Response<CoalesceBody<B>>| *r.extensions().get::<ServedBy>().unwrap();
        assert_eq!(by(first.await.unwrap().unwrap()), ServedBy::Leader);
        assert_eq!(by(second.await.unwrap().unwrap()), ServedBy::Follower);
        assert_eq!(by(third.await.unwrap().unwrap()), ServedBy::Bypass);
        // None of those was a write: a new read and a follower share one flight again.
        let open2 = open.clone();
        open2.send(false).unwrap();
        let a = tokio::spawn(svc.clone().oneshot(adapter::grpc_request()));
        settle("a called", || reads.load(SeqCst) == 3).await;
        let b = tokio::spawn(svc.clone().oneshot(adapter::grpc_request()));
        settle("b joined", || layer.waiting() == 1).await;
        open.send(true).unwrap();
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        assert_eq!(reads.load(SeqCst), 3);
        assert_eq!(layer.in_flight(), 0);
    }
}
