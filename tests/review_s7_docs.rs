//! Review session 7: the documentation checked against the behaviour, through the public API.
//!
//! Each test is named after a documented claim and quotes it (file, a few words). It found four
//! contradictions, resolved since: the docs of `panic_message`, of a `HEAD` body's
//! `Content-Length` and of HTTP/1.1 vs HTTP/2 keys were corrected, and a lingering flight
//! nobody joined closed its span without its outcome (fixed).
//!
//! Deterministic: futures are polled by hand with a no-op waker; the backend is
//! `tower_test::mock` (every call seen and answered by the test) or a counting service whose
//! answers wait on a oneshot gate; the one clock used is tokio's paused one, moved by
//! `tokio::time::advance`. The two tests whose user code re-enters the registry run on a
//! thread of their own with a watchdog (a deadlock no timeout inside the test could catch).

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::future::FutureExt;
use support::{check_sum, pending, poll, ready, Boom};
use tokio::sync::oneshot;
use tower::Service;
use tower_coalesce::{
    CoalesceError, CoalesceLayer, CoalesceService, Group, GroupBuilder, OnTimeout, Stats,
};
use tower_layer::Layer;
use tower_test::mock::{self, Handle, Mock, SendResponse};

#[cfg(feature = "tracing")]
mod span_capture;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// Every test calls this first: with `tracing`, the binary's one global subscriber is set
/// before any flight is made (a callsite registered while it is being set could keep a stale
/// interest).
fn setup() {
    #[cfg(feature = "tracing")]
    span_capture::init();
}

/// Runs `f` on a thread of its own (set up first); fails if it makes no progress for a minute
/// (a deadlock).
fn within<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    support::within(what, move || {
        setup();
        f()
    })
}

/// The sum rules `Stats` documents (src/stats.rs), once the requests are done.
fn check_sums(s: &Stats, requests: u64) {
    check_sum(s, requests);
    assert!(s.timed_out + s.released <= s.followers, "{s:?}");
    assert!(s.errors + s.panics <= s.leaders, "{s:?}");
    assert!(s.cancelled <= s.leaders - s.retried, "{s:?}");
}

// --- the tower layer over a mock ---

type KeyFn = fn(&u32) -> Option<u32>;
type Svc = CoalesceService<Mock<u32, String>, KeyFn, u32>;
type Fut = Pin<Box<<Svc as Service<u32>>::Future>>;

/// Key 0 bypasses; every other request is its own key.
fn key(k: &u32) -> Option<u32> {
    (*k != 0).then_some(*k)
}

fn layer() -> CoalesceLayer<KeyFn, u32> {
    CoalesceLayer::new(key as KeyFn)
}

fn service(layer: &CoalesceLayer<KeyFn, u32>) -> (Svc, Handle<u32, String>) {
    let (mock, handle) = mock::pair::<u32, String>();
    (layer.layer(mock), handle)
}

fn call(svc: &mut Svc, k: u32) -> Fut {
    assert!(
        poll(&mut std::future::poll_fn(|cx| svc.poll_ready(cx))).is_ready(),
        "the layer is always ready"
    );
    Box::pin(svc.call(k))
}

fn next_request(h: &mut Handle<u32, String>) -> (u32, SendResponse<String>) {
    match h.poll_request() {
        Poll::Ready(Some(r)) => r,
        _ => panic!("expected a call to reach the backend"),
    }
}

fn no_request(h: &mut Handle<u32, String>) {
    assert!(
        h.poll_request().is_pending(),
        "no call should have reached the backend"
    );
}

fn boom(e: &CoalesceError) -> &'static str {
    e.downcast_ref::<Boom>()
        .unwrap_or_else(|| panic!("not the inner error: {e:?}"))
        .0
}

// =============================================================================================
// retry_failed (src/layer.rs, README options table) — changed today
// =============================================================================================

/// src/layer.rs `retry_failed`: "a follower that took a call over from a request that went
/// away did not make it, and retries."
#[test]
fn retry_failed_follower_that_took_over_retries_with_its_own_call() {
    setup();
    let layer = layer().retry_failed(1);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 7);
    let mut follower = call(&mut svc, 7);
    pending(&mut leader, "leader");
    let (req, first) = next_request(&mut h);
    assert_eq!(req, 7);
    drop(leader);
    pending(&mut follower, "follower, now driving the call");
    no_request(&mut h);
    first.send_error(Boom("first"));
    pending(&mut follower, "follower, retrying");
    let (req, second) = next_request(&mut h);
    assert_eq!(req, 7, "the retry is the follower's own request");
    second.send_response("second".into());
    assert_eq!(ready(&mut follower, "follower").unwrap(), "second");
    let s = layer.stats();
    assert_eq!((s.leaders, s.retried, s.followers, s.errors), (2, 1, 1, 1));
    check_sums(&s, 2);
    assert!(layer.group().is_empty());
}

/// README options table, `.retry_failed(n)`: "its followers retry it as one new call (one of
/// them calls, the others wait) ... the request whose call failed gets its error".
#[test]
fn retry_failed_request_whose_call_failed_gets_its_error_followers_share_one_retry() {
    setup();
    let layer = layer().retry_failed(1);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 3);
    let mut f1 = call(&mut svc, 3);
    let mut f2 = call(&mut svc, 3);
    pending(&mut leader, "leader");
    let (_, first) = next_request(&mut h);
    first.send_error(Boom("first"));
    let err = ready(&mut leader, "leader").unwrap_err();
    assert_eq!(boom(&err), "first");
    pending(&mut f1, "f1 runs the retry");
    pending(&mut f2, "f2 waits for it");
    let (_, second) = next_request(&mut h);
    no_request(&mut h);
    second.send_response("retried".into());
    assert_eq!(ready(&mut f1, "f1").unwrap(), "retried");
    assert_eq!(ready(&mut f2, "f2").unwrap(), "retried");
    let s = layer.stats();
    assert_eq!((s.leaders, s.retried, s.followers, s.errors), (2, 1, 2, 1));
    check_sums(&s, 3);
}

/// src/layer.rs `retry_failed`: "up to `retries` times per call ... The default, 0, hands every
/// follower the error"; README guarantee 3: "an error that carries the same inner error".
#[test]
fn retry_failed_default_hands_every_follower_the_same_error() {
    setup();
    let layer = layer();
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut follower = call(&mut svc, 1);
    pending(&mut leader, "leader");
    let (_, tx) = next_request(&mut h);
    tx.send_error(Boom("once"));
    let a = ready(&mut leader, "leader").unwrap_err();
    let b = ready(&mut follower, "follower").unwrap_err();
    no_request(&mut h);
    assert!(
        std::ptr::addr_eq(a.get_ref().unwrap(), b.get_ref().unwrap()),
        "the same inner error, shared"
    );
    assert_eq!(boom(&b), "once");
}

/// src/layer.rs `retry_failed`: "up to `retries` times per call".
#[test]
fn retry_failed_retries_at_most_n_times() {
    setup();
    let layer = layer().retry_failed(1);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut f1 = call(&mut svc, 1);
    let mut f2 = call(&mut svc, 1);
    pending(&mut leader, "leader");
    next_request(&mut h).1.send_error(Boom("1st"));
    assert_eq!(boom(&ready(&mut leader, "leader").unwrap_err()), "1st");
    pending(&mut f1, "f1");
    pending(&mut f2, "f2");
    next_request(&mut h).1.send_error(Boom("2nd"));
    assert_eq!(boom(&ready(&mut f1, "f1").unwrap_err()), "2nd");
    assert_eq!(boom(&ready(&mut f2, "f2").unwrap_err()), "2nd");
    no_request(&mut h);
    let s = layer.stats();
    assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 2));
    check_sums(&s, 3);
}

// =============================================================================================
// follower_timeout (src/layer.rs, README options table) — changed today
// =============================================================================================

/// src/layer.rs `follower_timeout`: "A follower that takes the call over (its leader went
/// away) waits no longer: it drives the call for everybody, and its limit is gone for good".
#[tokio::test(start_paused = true)]
async fn follower_timeout_is_gone_for_good_after_a_takeover() {
    setup();
    let layer = layer().follower_timeout(SEC);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut follower = call(&mut svc, 1);
    pending(&mut leader, "leader");
    let (_, tx) = next_request(&mut h);
    pending(&mut follower, "follower");
    drop(leader);
    pending(&mut follower, "follower takes over");
    tokio::time::advance(5 * SEC).await;
    pending(&mut follower, "past its limit, still driving");
    no_request(&mut h);
    assert!(!follower.is_alone());
    tx.send_response("v".into());
    assert_eq!(ready(&mut follower, "follower").unwrap(), "v");
    let s = layer.stats();
    assert_eq!((s.timed_out, s.followers, s.leaders), (0, 1, 1));
}

/// src/layer.rs `follower_timeout`: "its limit is gone for good (also if, with
/// `retry_failed`, it then ...)": the follower that took over runs the retry, past its limit.
#[tokio::test(start_paused = true)]
async fn follower_timeout_stays_gone_through_the_retry_of_a_call_taken_over() {
    setup();
    let layer = layer().follower_timeout(SEC).retry_failed(1);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut follower = call(&mut svc, 1);
    pending(&mut leader, "leader");
    let (_, first) = next_request(&mut h);
    drop(leader);
    pending(&mut follower, "follower takes over");
    first.send_error(Boom("first"));
    pending(&mut follower, "follower retries");
    let (_, second) = next_request(&mut h);
    tokio::time::advance(5 * SEC).await;
    pending(&mut follower, "past its limit, still waiting for its retry");
    no_request(&mut h);
    second.send_response("ok".into());
    assert_eq!(ready(&mut follower, "follower").unwrap(), "ok");
    assert_eq!(layer.stats().timed_out, 0);
}

/// README options table: "a follower that waited `d` stops waiting and calls the inner
/// service itself ... the call it waited for goes on"; `ResponseFuture::is_bypass`: "or it
/// stopped waiting and made its own call".
#[tokio::test(start_paused = true)]
async fn follower_timeout_calls_the_inner_service_and_the_call_goes_on() {
    setup();
    let layer = layer().follower_timeout(SEC);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut follower = call(&mut svc, 1);
    pending(&mut leader, "leader");
    let (_, first) = next_request(&mut h);
    pending(&mut follower, "follower");
    tokio::time::advance(SEC - MS).await;
    pending(&mut follower, "before its limit");
    no_request(&mut h);
    tokio::time::advance(MS).await;
    pending(&mut follower, "at its limit: its own call");
    let (req, own) = next_request(&mut h);
    assert_eq!(req, 1);
    assert!(follower.is_alone() && follower.is_bypass());
    own.send_response("own".into());
    assert_eq!(ready(&mut follower, "follower").unwrap(), "own");
    first.send_response("first".into());
    assert_eq!(ready(&mut leader, "leader").unwrap(), "first");
    let s = layer.stats();
    assert_eq!((s.timed_out, s.fell_through, s.leaders), (1, 1, 1));
    check_sums(&s, 2);
}

/// README options table: "or fails with `is_timeout()`".
#[tokio::test(start_paused = true)]
async fn follower_timeout_error_fails_with_is_timeout() {
    setup();
    let layer = layer()
        .follower_timeout(SEC)
        .on_follower_timeout(OnTimeout::Error);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut follower = call(&mut svc, 1);
    pending(&mut leader, "leader");
    let (_, tx) = next_request(&mut h);
    pending(&mut follower, "follower");
    tokio::time::advance(SEC).await;
    let err = ready(&mut follower, "follower").unwrap_err();
    assert!(err.is_timeout() && !err.is_panic() && err.get_ref().is_none());
    no_request(&mut h);
    tx.send_response("v".into());
    assert_eq!(ready(&mut leader, "leader").unwrap(), "v");
}

/// src/layer.rs `follower_timeout`: "A response that came in before the limit is the
/// follower's even if its future is first polled after it."
#[tokio::test(start_paused = true)]
async fn follower_timeout_response_in_before_the_limit_is_the_followers() {
    setup();
    let layer = layer()
        .follower_timeout(SEC)
        .on_follower_timeout(OnTimeout::Error);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut follower = call(&mut svc, 1); // limit armed now, never polled yet
    pending(&mut leader, "leader");
    next_request(&mut h).1.send_response("v".into());
    assert_eq!(ready(&mut leader, "leader").unwrap(), "v");
    tokio::time::advance(10 * SEC).await;
    assert_eq!(ready(&mut follower, "follower").unwrap(), "v");
    assert_eq!(layer.stats().timed_out, 0);
}

// =============================================================================================
// Stats (src/stats.rs) — changed today
// =============================================================================================

/// src/stats.rs: "once the requests are done, `leaders - retried + followers + lingered +
/// bypassed + over_capacity` is the number of requests".
#[tokio::test(start_paused = true)]
async fn stats_sum_rule_counts_every_request_once() {
    setup();
    let layer = layer().retry_failed(1).linger(10 * SEC).max_in_flight(1);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut f1 = call(&mut svc, 1);
    let mut f2 = call(&mut svc, 1);
    let mut alone = call(&mut svc, 2);
    assert!(alone.is_alone(), "over max_in_flight");
    let mut bypass = call(&mut svc, 0);
    assert!(bypass.is_bypass());
    // The inner service is called by `call` (the mock is ready): in call order.
    let mut calls: Vec<_> = (0..3).map(|_| next_request(&mut h)).collect();
    assert_eq!(calls.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2, 0]);
    let (_, bypass_tx) = calls.pop().unwrap();
    let (_, alone_tx) = calls.pop().unwrap();
    let (_, leader_tx) = calls.pop().unwrap();
    pending(&mut leader, "leader");
    leader_tx.send_error(Boom("first"));
    assert!(ready(&mut leader, "leader").is_err());
    pending(&mut f1, "f1");
    pending(&mut f2, "f2");
    next_request(&mut h).1.send_response("one".into());
    assert_eq!(ready(&mut f1, "f1").unwrap(), "one");
    assert_eq!(ready(&mut f2, "f2").unwrap(), "one");
    alone_tx.send_response("2".into());
    bypass_tx.send_response("0".into());
    assert_eq!(ready(&mut alone, "alone").unwrap(), "2");
    assert_eq!(ready(&mut bypass, "bypass").unwrap(), "0");
    let mut hit = call(&mut svc, 1);
    assert!(hit.is_follower());
    assert_eq!(ready(&mut hit, "lingering hit").unwrap(), "one");
    no_request(&mut h);
    let s = layer.stats();
    assert_eq!(
        (
            s.leaders,
            s.retried,
            s.followers,
            s.lingered,
            s.bypassed,
            s.over_capacity
        ),
        (2, 1, 2, 1, 1, 1),
        "{s:?}"
    );
    check_sums(&s, 6);
}

/// src/stats.rs: "A follower that takes a call over from a leader that left is still counted
/// as a follower (though, driving the call, no longer under `max_followers`)."
#[test]
fn stats_follower_that_takes_over_stays_a_follower_and_frees_its_max_followers_place() {
    setup();
    let layer = layer().max_followers(1);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut f1 = call(&mut svc, 1);
    pending(&mut leader, "leader");
    let (_, tx) = next_request(&mut h);
    drop(leader);
    pending(&mut f1, "f1 takes over");
    let mut f2 = call(&mut svc, 1);
    assert!(f2.is_follower() && !f2.is_alone(), "f1's place was freed");
    let mut f3 = call(&mut svc, 1);
    assert!(f3.is_alone(), "f2 holds the one place");
    tx.send_response("v".into());
    assert_eq!(ready(&mut f1, "f1").unwrap(), "v");
    assert_eq!(ready(&mut f2, "f2").unwrap(), "v");
    pending(&mut f3, "f3");
    next_request(&mut h).1.send_response("own".into());
    assert_eq!(ready(&mut f3, "f3").unwrap(), "own");
    let s = layer.stats();
    assert_eq!(
        (s.followers, s.over_capacity, s.leaders),
        (2, 1, 1),
        "{s:?}"
    );
    check_sums(&s, 4);
}

/// src/stats.rs: "a call run alone (`over_capacity`, or a follower that calls alone after its
/// wait limit) counts only there, not in `leaders`, `errors` or `panics`."
#[tokio::test(start_paused = true)]
async fn stats_calls_run_alone_count_in_no_leaders_or_errors() {
    setup();
    let layer = layer().max_in_flight(1).follower_timeout(SEC);
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut follower = call(&mut svc, 1);
    let mut alone = call(&mut svc, 2);
    pending(&mut leader, "leader");
    let (_, first) = next_request(&mut h);
    pending(&mut alone, "alone");
    next_request(&mut h).1.send_error(Boom("alone"));
    assert_eq!(boom(&ready(&mut alone, "alone").unwrap_err()), "alone");
    pending(&mut follower, "follower");
    tokio::time::advance(SEC).await;
    pending(&mut follower, "follower calls alone");
    next_request(&mut h).1.send_error(Boom("timed out"));
    assert_eq!(
        boom(&ready(&mut follower, "follower").unwrap_err()),
        "timed out"
    );
    first.send_response("v".into());
    assert_eq!(ready(&mut leader, "leader").unwrap(), "v");
    let s = layer.stats();
    assert_eq!(
        (s.leaders, s.errors, s.over_capacity, s.timed_out),
        (1, 0, 1, 1),
        "{s:?}"
    );
    check_sums(&s, 3);
}

// =============================================================================================
// Group::len, forget (src/flight.rs) — changed today
// =============================================================================================

/// src/flight.rs `Group::len`: "running flights plus lingering outputs ... and forgotten
/// flights whose call still runs ... After the load stops, 0."; `Group::forget`: "not counted
/// by `in_flight`", "Returns whether there was anything to remove".
#[test]
fn group_len_counts_forgotten_flights_still_running() {
    setup();
    let group: Group<&str> = Group::new();
    let (tx, rx) = oneshot::channel::<u32>();
    let mut old = group.run("k", || rx.map(Result::unwrap));
    pending(&mut old, "old flight");
    assert_eq!((group.len(), group.in_flight()), (1, 1));
    assert!(group.forget("k"));
    assert_eq!(
        (group.len(), group.in_flight()),
        (1, 0),
        "forgotten, still running"
    );
    let mut new = group.run("k", || async { 2_u32 });
    assert!(new.is_leader(), "the next call starts a new flight");
    assert_eq!(ready(&mut new, "new").unwrap(), 2);
    tx.send(1).unwrap();
    assert_eq!(ready(&mut old, "old").unwrap(), 1);
    assert_eq!(group.len(), 0);
    assert!(!group.forget("k"), "nothing left to remove");
    assert_eq!(group.stats().forgotten, 1);
}

/// src/flight.rs `Group::len`: "lingering outputs, expired ones included until they are
/// purged"; `GroupBuilder::linger`: "served while less than `window` has passed ... at
/// `window` it is gone".
#[tokio::test(start_paused = true)]
async fn group_len_counts_expired_lingering_outputs_until_purged() {
    setup();
    let group: Group<u8> = GroupBuilder::new().linger(SEC).build();
    assert_eq!(
        ready(&mut group.run(1, || async { 10_u8 }), "first").unwrap(),
        10
    );
    assert_eq!((group.len(), group.in_flight()), (1, 0));
    tokio::time::advance(SEC - MS).await;
    let mut hit = group.run(1, || async { 20_u8 });
    assert!(!hit.is_leader() && hit.is_shared());
    assert_eq!(ready(&mut hit, "hit").unwrap(), 10);
    tokio::time::advance(MS).await;
    assert_eq!(group.len(), 1, "expired, not purged yet");
    group.purge_expired();
    assert_eq!(group.len(), 0);
    let mut after = group.run(1, || async { 30_u8 });
    assert!(after.is_leader());
    assert_eq!(ready(&mut after, "after").unwrap(), 30);
}

/// src/flight.rs `Group::forget`: "Also drops a lingering output" and "its output does not
/// linger" (a forgotten flight's).
#[tokio::test(start_paused = true)]
async fn forget_drops_lingering_output_and_a_forgotten_flight_does_not_linger() {
    setup();
    let group: Group<u8> = GroupBuilder::new().linger(60 * SEC).build();
    assert_eq!(ready(&mut group.run(1, || async { 1_u8 }), "a").unwrap(), 1);
    assert!(
        group.forget(&1),
        "a lingering output is something to remove"
    );
    assert_eq!(group.len(), 0);
    let (tx, rx) = oneshot::channel::<u8>();
    let mut running = group.run(1, || rx.map(Result::unwrap));
    pending(&mut running, "running");
    assert!(group.forget(&1));
    tx.send(2).unwrap();
    assert_eq!(ready(&mut running, "running").unwrap(), 2);
    assert_eq!(
        group.len(),
        0,
        "the forgotten flight's output does not linger"
    );
    let mut next = group.run(1, || async { 3_u8 });
    assert!(next.is_leader());
    assert_eq!(ready(&mut next, "next").unwrap(), 3);
}

/// src/flight.rs `Group::forget`: a forgotten flight "holds no place under `max_in_flight`".
#[test]
fn forget_frees_the_flights_place_under_max_in_flight() {
    setup();
    let group: Group<u8> = GroupBuilder::new().max_in_flight(1).build();
    let (tx, rx) = oneshot::channel::<u8>();
    let mut a = group.run(1, || rx.map(Result::unwrap));
    pending(&mut a, "a");
    let b = group.run(2, || async { 2_u8 });
    assert!(b.is_alone(), "over max_in_flight");
    drop(b);
    assert!(group.forget(&1));
    let mut c = group.run(2, || async { 2_u8 });
    assert!(
        c.is_leader() && !c.is_alone(),
        "the forgotten flight's place is free"
    );
    assert_eq!(ready(&mut c, "c").unwrap(), 2);
    tx.send(1).unwrap();
    assert_eq!(ready(&mut a, "a").unwrap(), 1);
    assert!(group.is_empty());
}

// =============================================================================================
// README "What it guarantees" / src/lib.rs "Contract"
// =============================================================================================

/// README guarantee 1: "At most one call per key at a time, per registry. Requests for other
/// keys never wait on each other."
#[test]
fn guarantee_one_call_per_key_and_other_keys_never_wait() {
    setup();
    let layer = layer();
    let (mut svc, mut h) = service(&layer);
    let mut a1 = call(&mut svc, 1);
    let mut a2 = call(&mut svc, 1);
    let mut b = call(&mut svc, 2);
    pending(&mut a1, "a1");
    pending(&mut a2, "a2");
    let (k, a_tx) = next_request(&mut h);
    assert_eq!(k, 1);
    pending(&mut b, "b");
    let (k, b_tx) = next_request(&mut h);
    assert_eq!(k, 2);
    no_request(&mut h);
    b_tx.send_response("b".into());
    assert_eq!(ready(&mut b, "b, while key 1 still runs").unwrap(), "b");
    pending(&mut a2, "a2");
    a_tx.send_response("a".into());
    assert_eq!(ready(&mut a1, "a1").unwrap(), "a");
    assert_eq!(ready(&mut a2, "a2").unwrap(), "a");
}

/// README guarantee 2: "A request that arrives after a call's response was published starts a
/// new call."
#[test]
fn guarantee_no_stale_joins() {
    setup();
    let layer = layer();
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut follower = call(&mut svc, 1);
    pending(&mut leader, "leader");
    next_request(&mut h).1.send_response("old".into());
    assert_eq!(ready(&mut leader, "leader").unwrap(), "old");
    let mut late = call(&mut svc, 1);
    assert!(late.is_leader());
    pending(&mut late, "late");
    next_request(&mut h).1.send_response("new".into());
    assert_eq!(ready(&mut late, "late").unwrap(), "new");
    assert_eq!(ready(&mut follower, "follower").unwrap(), "old");
}

/// README guarantee 4: "If the request that started the call goes away, the call goes on for
/// the others; when the last waiter goes away the call is dropped (cancelled) and the key
/// freed."
#[test]
fn guarantee_cancellation_stays_local_and_the_last_waiter_frees_the_key() {
    setup();
    let layer = layer();
    let (mut svc, mut h) = service(&layer);
    let mut leader = call(&mut svc, 1);
    let mut follower = call(&mut svc, 1);
    pending(&mut leader, "leader");
    let (_, tx) = next_request(&mut h);
    drop(leader);
    pending(&mut follower, "follower carries the call");
    drop(follower);
    assert_eq!((layer.in_flight(), layer.group().len()), (0, 0));
    assert_eq!(layer.stats().cancelled, 1);
    tx.send_response("nobody".into());
    let mut again = call(&mut svc, 1);
    assert!(again.is_leader());
    pending(&mut again, "again");
    next_request(&mut h).1.send_response("fresh".into());
    assert_eq!(ready(&mut again, "again").unwrap(), "fresh");
}

/// README guarantee 5: "A panic in the inner service becomes an error for that call's waiters
/// (`CoalesceError::is_panic`); later requests for the key work normally."
#[test]
fn guarantee_panics_are_contained() {
    setup();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let mut svc = CoalesceLayer::new(|k: &u8| Some(*k)).layer(tower::service_fn(move |_: u8| {
        let n = counter.fetch_add(1, SeqCst);
        async move {
            if n == 0 {
                panic!("backend exploded");
            }
            Ok::<_, Infallible>(n)
        }
    }));
    let mut a = Box::pin(svc.call(1));
    let mut b = Box::pin(svc.call(1));
    let ea = ready(&mut a, "a").unwrap_err();
    let eb = ready(&mut b, "b").unwrap_err();
    assert!(ea.is_panic() && eb.is_panic());
    assert_eq!(eb.panic_message(), Some("backend exploded"));
    assert_eq!(ready(&mut Box::pin(svc.call(1)), "later").unwrap(), 1);
    assert_eq!(svc.group().len(), 0);
}

/// src/error.rs `CoalesceError::panic_message`: "The panic message, if the inner service
/// panicked: its payload if that was a string, `<non-string panic payload>` otherwise." (It
/// once said `None` for a non-string payload.)
#[test]
fn panic_message_names_a_non_string_payload() {
    setup();
    let mut svc = CoalesceLayer::new(|k: &u8| Some(*k)).layer(tower::service_fn(|_: u8| async {
        if true {
            std::panic::panic_any(42_u32);
        }
        Ok::<u8, Infallible>(0)
    }));
    let err = ready(&mut Box::pin(svc.call(1)), "call").unwrap_err();
    assert!(err.is_panic());
    assert_eq!(err.panic_message(), Some("<non-string panic payload>"));
}

/// README guarantee 6: "Waiters ... never wait for the inner service's readiness ... A
/// `ConcurrencyLimit(1)` below the layer limits calls, not waiters."
#[test]
fn guarantee_the_layer_is_ready_while_the_inner_service_is_not() {
    setup();
    let layer = layer();
    let (mut svc, mut h) = service(&layer);
    h.allow(0);
    let mut leader = call(&mut svc, 1); // `call` asserts the layer's readiness
    let mut follower = call(&mut svc, 1);
    pending(&mut leader, "leader waits for the inner service");
    pending(&mut follower, "follower");
    no_request(&mut h);
    h.allow(1);
    pending(&mut leader, "leader calls");
    next_request(&mut h).1.send_response("v".into());
    assert_eq!(ready(&mut leader, "leader").unwrap(), "v");
    assert_eq!(ready(&mut follower, "follower").unwrap(), "v");
    no_request(&mut h);
}

/// README guarantee 8: "No lock is held across an `.await` or while your code runs"; src/lib.rs
/// `tracing` feature: "made outside the registry's locks: a subscriber may call back into the
/// group" (here: `make` and the output's `Clone` call back into the group).
#[test]
fn guarantee_no_lock_held_while_user_code_runs() {
    #[derive(Debug)]
    struct Reentrant(Group<u8>);
    impl Clone for Reentrant {
        fn clone(&self) -> Self {
            let g = &self.0;
            let _ = (g.len(), g.in_flight(), g.stats());
            let _ = g.forget(&200);
            drop(g.run(201, || async { Reentrant(Group::new()) }));
            Reentrant(g.clone())
        }
    }
    within("re-entering user code", || {
        let group: Group<u8> = Group::new();
        let g = group.clone();
        let mut leader = group.run(1, move || {
            let _ = (g.len(), g.in_flight(), g.stats());
            let inner = g.clone();
            async move { Reentrant(inner) }
        });
        let mut f1 = group.run(1, || async { Reentrant(Group::new()) });
        let mut f2 = group.run(1, || async { Reentrant(Group::new()) });
        assert!(!f1.is_leader() && !f2.is_leader());
        assert!(ready(&mut leader, "leader").is_ok());
        assert!(ready(&mut f1, "f1").is_ok());
        assert!(ready(&mut f2, "f2").is_ok());
        assert!(group.is_empty());
    });
}

/// src/layer.rs `detached` / README options: "each call runs on a spawned task and completes
/// even when every waiter has gone".
#[tokio::test(start_paused = true)]
async fn detached_call_completes_with_nobody_waiting() {
    setup();
    let layer = layer().detached(true);
    let (mut svc, mut h) = service(&layer);
    drop(call(&mut svc, 1));
    let (req, tx) = h.next_request().await.expect("the call was made");
    assert_eq!(req, 1);
    tx.send_response("done".into());
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let s = layer.stats();
    assert_eq!((s.leaders, s.cancelled, s.in_flight), (1, 0, 0), "{s:?}");
    assert!(layer.group().is_empty());
}

/// src/flight.rs `GroupBuilder::retry_failed`: "The caller whose call failed gets its error (in
/// a detached flight its caller is a follower, so it gets the retry's output)."
#[tokio::test(start_paused = true)]
async fn detached_flight_caller_gets_the_retrys_output() {
    setup();
    let group = GroupBuilder::new()
        .detached(true)
        .retry_failed(1)
        .build::<u8>();
    let mut caller = group.run_retryable(1, || async { Err::<u8, &str>("flaky") });
    let mut follower = group.run_retryable(1, || async { Ok::<u8, &str>(7) });
    let (a, b) = tokio::join!(&mut caller, &mut follower);
    assert_eq!(b.unwrap(), Ok(7));
    assert_eq!(
        a.unwrap(),
        Ok(7),
        "the detached flight's caller gets the retry's output"
    );
    let s = group.stats();
    assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 1));
}

// =============================================================================================
// The HTTP and gRPC adapters (features `http` and `grpc`)
// =============================================================================================

#[cfg(feature = "grpc")]
mod adapters {
    use super::*;

    use std::fmt;
    use std::task::Context;

    use bytes::Bytes;
    use futures::future::{BoxFuture, Shared};
    use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
    use http_body::{Body as _, Frame};
    use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
    use support::adapter::Unread;
    use tower::BoxError;
    use tower_coalesce::grpc::CoalesceGrpcLayer;
    use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, ServedBy};

    // --- the HTTP and gRPC adapters over a counting backend ---

    type Body = BoxBody<Bytes, Infallible>;
    type Respond = dyn Fn(&Method, &HeaderMap) -> Result<Response<Body>, BoxError> + Send + Sync;

    /// Counts its calls; each answer waits for the gate (open from the start unless `gated`).
    #[derive(Clone)]
    struct Backend {
        calls: Arc<AtomicUsize>,
        respond: Arc<Respond>,
        gate: Shared<BoxFuture<'static, ()>>,
    }

    impl Backend {
        fn new(
            respond: impl Fn(&Method, &HeaderMap) -> Result<Response<Body>, BoxError>
                + Send
                + Sync
                + 'static,
        ) -> Self {
            let (b, open) = Self::gated(respond);
            let _ = open.send(());
            b
        }

        fn gated(
            respond: impl Fn(&Method, &HeaderMap) -> Result<Response<Body>, BoxError>
                + Send
                + Sync
                + 'static,
        ) -> (Self, oneshot::Sender<()>) {
            let (tx, rx) = oneshot::channel::<()>();
            let gate = rx.map(|_| ()).boxed().shared();
            let b = Backend {
                calls: Arc::default(),
                respond: Arc::new(respond),
                gate,
            };
            (b, tx)
        }

        fn calls(&self) -> usize {
            self.calls.load(SeqCst)
        }
    }

    impl<B> Service<Request<B>> for Backend {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<B>) -> Self::Future {
            self.calls.fetch_add(1, SeqCst);
            let res = (self.respond)(req.method(), req.headers());
            let gate = self.gate.clone();
            Box::pin(async move {
                gate.await;
                res
            })
        }
    }

    fn full(data: &'static str) -> Body {
        Full::new(Bytes::from_static(data.as_bytes()))
            .map_err(|e| match e {})
            .boxed()
    }

    fn with_trailers(data: &'static str, trailers: HeaderMap) -> Body {
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(data.as_bytes()))),
            Ok(Frame::trailers(trailers)),
        ];
        StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    /// A body of unknown length (no size hint), with no trailers.
    fn streamed(data: &'static str) -> Body {
        let frames = vec![Ok::<_, Infallible>(Frame::data(Bytes::from_static(
            data.as_bytes(),
        )))];
        StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    fn get(uri: &str) -> Request<Full<Bytes>> {
        Request::get(uri).body(Full::<Bytes>::default()).unwrap()
    }

    fn served(res: &Response<CoalesceBody<Body>>) -> ServedBy {
        *res.extensions()
            .get::<ServedBy>()
            .expect("ServedBy is always set")
    }

    fn collect(res: Response<CoalesceBody<Body>>) -> (Bytes, Option<HeaderMap>) {
        let mut c = Box::pin(res.into_body().collect());
        let collected = match ready(&mut c, "body") {
            Ok(c) => c,
            Err(e) => match e {},
        };
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    /// Calls `svc` with each request (all registered before any is polled), then polls them to
    /// the end in order.
    fn run_all<S, R>(svc: &mut S, reqs: Vec<Request<R>>) -> Vec<Response<CoalesceBody<Body>>>
    where
        S: Service<Request<R>, Response = Response<CoalesceBody<Body>>>,
        S::Error: fmt::Debug,
    {
        let mut futs: Vec<_> = reqs.into_iter().map(|r| Box::pin(svc.call(r))).collect();
        futs.iter_mut()
            .map(|f| ready(f, "response").expect("response"))
            .collect()
    }

    // =============================================================================================
    // HTTP (src/http/mod.rs) — copies on the wire, changed today
    // =============================================================================================

    /// src/http/mod.rs: "the copies drop the handler's `Transfer-Encoding` (their length is
    /// known ...)".
    #[test]
    fn http_copies_drop_transfer_encoding_and_know_their_length() {
        setup();
        let backend = Backend::new(|_, _| {
            Ok(Response::builder()
                .header("transfer-encoding", "chunked")
                .body(full("hello"))
                .unwrap())
        });
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let mut out = run_all(
            &mut svc,
            vec![get("http://a.test/x"), get("http://a.test/x")],
        );
        assert_eq!(backend.calls(), 1);
        let follower = out.pop().unwrap();
        let leader = out.pop().unwrap();
        assert_eq!(
            (served(&leader), served(&follower)),
            (ServedBy::Leader, ServedBy::Follower)
        );
        for res in [leader, follower] {
            assert!(!res.headers().contains_key("transfer-encoding"));
            assert_eq!(res.body().size_hint().exact(), Some(5));
            assert_eq!(collect(res).0, "hello");
        }
    }

    /// src/http/mod.rs: "one with trailers goes out chunked" (commit 16b183c: "a body with
    /// trailers reports no exact size"); "buffered into memory with its trailers".
    #[test]
    fn http_copy_with_trailers_has_no_exact_size_and_keeps_its_trailers() {
        setup();
        let backend = Backend::new(|_, _| {
            Ok(Response::new(with_trailers(
                "abc",
                headers(&[("x-checksum", "1")]),
            )))
        });
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let out = run_all(
            &mut svc,
            vec![get("http://a.test/t"), get("http://a.test/t")],
        );
        assert_eq!(backend.calls(), 1);
        assert_eq!(served(&out[1]), ServedBy::Follower);
        for res in out {
            let hint = res.body().size_hint();
            assert_eq!((hint.exact(), hint.lower()), (None, 3));
            let (data, trailers) = collect(res);
            assert_eq!(data, "abc");
            assert_eq!(trailers.expect("trailers")["x-checksum"], "1");
        }
    }

    /// src/http/mod.rs: "a follower's copy goes without the hop-by-hop fields (`Connection` and
    /// the fields it names, in the headers and the trailers, `Keep-Alive`, `Proxy-Connection`,
    /// `TE`, `Upgrade`), which were about the leader's connection."
    #[test]
    fn http_follower_copy_drops_hop_by_hop_fields_the_leaders_keeps_them() {
        setup();
        let backend = Backend::new(|_, _| {
            let mut res = Response::new(with_trailers(
                "x",
                headers(&[("x-trail-hop", "1"), ("x-trail-ok", "1")]),
            ));
            *res.headers_mut() = headers(&[
                ("connection", "close, x-hop"),
                ("connection", "x-trail-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("te", "trailers"),
                ("upgrade", "h2c"),
                ("x-end-to-end", "1"),
            ]);
            Ok(res)
        });
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let mut out = run_all(
            &mut svc,
            vec![get("http://a.test/h"), get("http://a.test/h")],
        );
        assert_eq!(backend.calls(), 1);
        let follower = out.pop().unwrap();
        let leader = out.pop().unwrap();
        assert_eq!(served(&follower), ServedBy::Follower);
        let hop = [
            "connection",
            "x-hop",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
        ];
        for name in hop {
            assert!(leader.headers().contains_key(name), "leader keeps {name}");
            assert!(
                !follower.headers().contains_key(name),
                "follower got {name}"
            );
        }
        assert_eq!(follower.headers()["x-end-to-end"], "1");
        let trailers = collect(follower).1.expect("trailers");
        assert!(!trailers.contains_key("x-trail-hop"));
        assert_eq!(trailers["x-trail-ok"], "1");
        assert!(collect(leader)
            .1
            .expect("trailers")
            .contains_key("x-trail-hop"));
    }

    /// src/http/mod.rs: "no transfer coding but `chunked` (a `gzip` one would leave the copies
    /// coded and unlabelled)"; README: "`fwd=miss; collapsed=?0; detail=<reason>` for a released
    /// follower".
    #[test]
    fn http_gzip_transfer_coding_is_not_shared() {
        setup();
        let backend = Backend::new(|_, _| {
            Ok(Response::builder()
                .header("transfer-encoding", "gzip, chunked")
                .body(streamed("gz"))
                .unwrap())
        });
        let mut svc = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .layer(backend.clone());
        let out = run_all(
            &mut svc,
            vec![get("http://a.test/z"), get("http://a.test/z")],
        );
        assert_eq!(backend.calls(), 2, "the follower made its own call");
        assert_eq!(served(&out[0]), ServedBy::Leader);
        assert_eq!(out[0].headers()["transfer-encoding"], "gzip, chunked");
        assert_eq!(served(&out[1]), ServedBy::Released);
        let status = out[1].headers()["cache-status"].to_str().unwrap();
        assert!(
            status.starts_with("tower-coalesce; fwd=miss; collapsed=?0; detail="),
            "{status}"
        );
        assert_eq!(svc.stats().released, 1);
    }

    /// src/http/mod.rs: "When its length is known, the layer does not read it: the copies go out
    /// with no body and that length in `Content-Length` (whatever `max_body_bytes`)."
    #[test]
    fn http_head_body_of_known_length_is_not_read_and_its_length_is_shared() {
        setup();
        let backend = Backend::new(|m, _| {
            assert_eq!(*m, Method::HEAD);
            Ok(Response::new(Unread(100).boxed()))
        });
        let mut svc = CoalesceHttpLayer::new()
            .max_body_bytes(10)
            .layer(backend.clone());
        let head = || {
            Request::head("http://a.test/big")
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let out = run_all(&mut svc, vec![head(), head(), head()]);
        assert_eq!(backend.calls(), 1, "over max_body_bytes, still shared");
        assert_eq!(
            out.iter().map(served).collect::<Vec<_>>(),
            [ServedBy::Leader, ServedBy::Follower, ServedBy::Follower]
        );
        for res in out {
            assert_eq!(res.headers()["content-length"], "100");
            assert_eq!(collect(res).0.len(), 0, "no body");
        }
    }

    /// src/http/mod.rs: "When its length is known ... the copies go out with no body and,
    /// unless it is 0 or the status has no body, that length in `Content-Length`": a known
    /// length of 0 adds none (the server decides, as without the layer).
    #[test]
    fn http_head_empty_body_of_known_length_adds_no_content_length() {
        setup();
        let backend = Backend::new(|_, _| {
            Ok(Response::new(
                Empty::<Bytes>::new().map_err(|e| match e {}).boxed(),
            ))
        });
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let head = || {
            Request::head("http://a.test/e")
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let out = run_all(&mut svc, vec![head(), head()]);
        assert_eq!(backend.calls(), 1);
        for res in out {
            assert_eq!(res.headers().get("content-length"), None);
        }
    }

    /// src/http/mod.rs: "One of unknown length is buffered as any other" (a `HEAD` response's
    /// body): over `max_body_bytes`, it is not shared.
    #[test]
    fn http_head_body_of_unknown_length_is_buffered_as_any_other() {
        setup();
        let backend = Backend::new(|_, _| Ok(Response::new(streamed("0123456789abcdef"))));
        let mut svc = CoalesceHttpLayer::new()
            .max_body_bytes(10)
            .layer(backend.clone());
        let head = || {
            Request::head("http://a.test/s")
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let out = run_all(&mut svc, vec![head(), head()]);
        assert_eq!(backend.calls(), 2);
        assert_eq!(served(&out[1]), ServedBy::Released);
        let mut out = out.into_iter();
        assert_eq!(
            collect(out.next().unwrap()).0,
            "0123456789abcdef",
            "the leader's whole"
        );
    }

    /// src/http/mod.rs: "An HTTP/2 request carries its scheme and authority in its URI, an
    /// HTTP/1.1 one only its path (the authority in `Host`) ... so the two are keyed apart and
    /// each protocol's requests share their own call."
    #[test]
    fn http_http2_and_http11_requests_are_keyed_apart_each_sharing_its_own_call() {
        setup();
        let backend = Backend::new(|_, _| Ok(Response::new(full("page"))));
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let h2 = || {
            Request::get("https://example.com/a")
                .version(Version::HTTP_2)
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let h1 = || {
            Request::get("/a")
                .version(Version::HTTP_11)
                .header("host", "example.com")
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let out = run_all(&mut svc, vec![h2(), h1(), h2(), h1()]);
        assert_eq!(backend.calls(), 2);
        assert_eq!(
            out.iter().map(served).collect::<Vec<_>>(),
            [
                ServedBy::Leader,
                ServedBy::Leader,
                ServedBy::Follower,
                ServedBy::Follower
            ]
        );
    }

    /// src/http/mod.rs: "The version itself is not in the key: requests that spell the URI and
    /// `Host` alike share a call" (an HTTP/1.1 request in absolute form, an HTTP/2 one that
    /// sends `host`).
    #[test]
    fn http_versions_share_a_call_for_the_same_uri_and_host() {
        setup();
        let backend = Backend::new(|_, _| Ok(Response::new(full("page"))));
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let req = |v: Version| {
            Request::get("https://example.com/a")
                .version(v)
                .header("host", "example.com")
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let out = run_all(&mut svc, vec![req(Version::HTTP_2), req(Version::HTTP_11)]);
        assert_eq!(backend.calls(), 1);
        assert_eq!(
            served(&out[1]),
            ServedBy::Follower,
            "one call for both versions"
        );
    }

    /// README security rule 4: "A response with `Set-Cookie`, with `Cache-Control: private`,
    /// `no-store` or `no-cache`, or with `Vary: *` goes only to the request that caused it ...
    /// one stale the moment it was made (`max-age=0`, `s-maxage=0`, an `Expires` not after its
    /// `Date`)"; rule 5: "an endless stream (`text/event-stream`)".
    #[test]
    fn http_personal_or_stale_responses_are_never_shared() {
        setup();
        let cases: [&[(&'static str, &'static str)]; 9] = [
            &[("set-cookie", "sid=1")],
            &[("cache-control", "private")],
            &[("cache-control", "no-store")],
            &[("cache-control", "no-cache")],
            &[("vary", "*")],
            &[("cache-control", "max-age=0")],
            &[("cache-control", "s-maxage=0")],
            &[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
            &[("content-type", "text/event-stream")],
        ];
        for case in cases {
            let backend = Backend::new(move |_, _| {
                let mut res = Response::new(full("mine"));
                *res.headers_mut() = headers(case);
                Ok(res)
            });
            let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
            let out = run_all(
                &mut svc,
                vec![get("http://a.test/p"), get("http://a.test/p")],
            );
            assert_eq!(backend.calls(), 2, "{case:?}");
            assert_eq!(served(&out[1]), ServedBy::Released, "{case:?}");
        }
    }

    /// README security rule 6: an error *response* a cache may not reuse (a `500` with no
    /// explicit freshness, RFC 9111 §3) is not shared: the followers make their own calls.
    #[test]
    fn http_error_statuses_are_not_shared() {
        setup();
        let backend = Backend::new(|_, _| {
            Ok(Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(full("oops"))
                .unwrap())
        });
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let out = run_all(
            &mut svc,
            vec![get("http://a.test/e"), get("http://a.test/e")],
        );
        assert_eq!(backend.calls(), 2, "the follower made its own call");
        assert_eq!(served(&out[1]), ServedBy::Released);
        assert_eq!(out[1].status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    /// README security rule 6: "If your service returns an `Err`, that request gets the error and
    /// the waiters make their own calls."
    #[test]
    fn http_inner_error_goes_to_the_leader_followers_call_themselves() {
        setup();
        let calls = Arc::new(AtomicUsize::new(0));
        let n = calls.clone();
        let backend = Backend::new(move |_, _| {
            if n.fetch_add(1, SeqCst) == 0 {
                Err(Box::new(Boom("inner")) as BoxError)
            } else {
                Ok(Response::new(full("own")))
            }
        });
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let mut leader = Box::pin(svc.call(get("http://a.test/f")));
        let mut follower = Box::pin(svc.call(get("http://a.test/f")));
        let err = ready(&mut leader, "leader").unwrap_err();
        assert_eq!(err.downcast_ref::<Boom>().unwrap().0, "inner");
        let res = ready(&mut follower, "follower").unwrap();
        assert_eq!(served(&res), ServedBy::Released);
        assert_eq!(collect(res).0, "own");
        assert_eq!(backend.calls(), 2);
    }

    /// README security rule 4: "once a `POST`, `PUT`, `PATCH` or `DELETE` through the layer has a
    /// non-error response, reads of its URI made after it start a new call rather than join one
    /// that began before the write".
    #[test]
    fn http_write_invalidates_its_uri_for_later_reads() {
        setup();
        let (backend, open) = Backend::gated(|_, _| Ok(Response::new(full("r"))));
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let mut before = Box::pin(svc.call(get("http://a.test/doc")));
        pending(&mut before, "read in flight");
        let mut joined = Box::pin(svc.call(get("http://a.test/doc")));
        let put = Request::put("http://a.test/doc")
            .body(Full::<Bytes>::default())
            .unwrap();
        let mut write = Box::pin(svc.call(put));
        let _ = open.send(());
        let w = ready(&mut write, "write").unwrap();
        assert_eq!(served(&w), ServedBy::Bypass);
        let mut after = Box::pin(svc.call(get("http://a.test/doc")));
        for f in [&mut before, &mut joined, &mut after] {
            let _ = ready(f, "read").unwrap();
        }
        // before (leader), joined (follower), write, after (a flight of its own)
        assert_eq!(backend.calls(), 3);
        assert_eq!(svc.stats().leaders, 2);
    }

    /// README HTTP: "`fwd=miss` for a leader, `fwd=miss; collapsed` for a follower ...
    /// `fwd=bypass|method|request; detail=<reason>` for a bypass"; src/http/layer.rs table.
    #[test]
    fn http_cache_status_header_values() {
        setup();
        let backend = Backend::new(|_, _| Ok(Response::new(full("x"))));
        let mut svc = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .layer(backend.clone());
        let post = Request::post("http://a.test/c")
            .body(Full::<Bytes>::default())
            .unwrap();
        let authed = Request::get("http://a.test/c")
            .header("authorization", "Bearer t")
            .body(Full::<Bytes>::default())
            .unwrap();
        let out = run_all(
            &mut svc,
            vec![get("http://a.test/c"), get("http://a.test/c"), post, authed],
        );
        let status = |i: usize| {
            out[i].headers()["cache-status"]
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(status(0), "tower-coalesce; fwd=miss");
        assert_eq!(status(1), "tower-coalesce; fwd=miss; collapsed");
        assert!(status(2).starts_with("tower-coalesce; fwd=method; detail="));
        assert!(
            status(3).starts_with("tower-coalesce; fwd=bypass; detail="),
            "{}",
            status(3)
        );
        assert_eq!(served(&out[3]), ServedBy::Bypass);
    }

    /// README HTTP: "`fwd=vary-miss` when the response's `Vary` did not match it"; src/http/mod.rs:
    /// "A follower whose request headers differ from the leader's on a header named by the
    /// response's `Vary` does not get it."
    #[test]
    fn http_vary_mismatch_releases_the_follower_with_fwd_vary_miss() {
        setup();
        let backend = Backend::new(|_, h| {
            let mut res = Response::new(full("x"));
            res.headers_mut()
                .insert("vary", HeaderValue::from_static("x-flavour"));
            if let Some(v) = h.get("x-flavour") {
                res.headers_mut().insert("x-got", v.clone());
            }
            Ok(res)
        });
        let mut svc = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .layer(backend.clone());
        let flavour = |v: &'static str| {
            Request::get("http://a.test/v")
                .header("x-flavour", v)
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let out = run_all(&mut svc, vec![flavour("a"), flavour("b"), flavour("a")]);
        assert_eq!(
            out.iter().map(served).collect::<Vec<_>>(),
            [ServedBy::Leader, ServedBy::Released, ServedBy::Follower]
        );
        assert_eq!(out[1].headers()["x-got"], "b");
        let status = out[1].headers()["cache-status"].to_str().unwrap();
        assert!(
            status.starts_with("tower-coalesce; fwd=vary-miss; collapsed=?0"),
            "{status}"
        );
        assert_eq!(backend.calls(), 2);
    }

    /// README security rules 1 and 2: "A request with a body, a `Range` request, a WebSocket or
    /// other upgrade ... and a request that says `Cache-Control: no-cache`/`no-store` or
    /// `Pragma: no-cache` also go straight through"; "A request with `Authorization`, `Cookie` or
    /// `Proxy-Authorization`, or with userinfo in its URI ... bypasses the layer."
    #[test]
    fn http_ineligible_requests_bypass() {
        setup();
        let backend = Backend::new(|_, _| Ok(Response::new(full("x"))));
        let mut svc = CoalesceHttpLayer::new().layer(backend.clone());
        let with = |name: &'static str, value: &'static str| {
            Request::get("http://a.test/b")
                .header(name, value)
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let reqs = vec![
            Request::get("http://a.test/b")
                .body(Full::new(Bytes::from_static(b"body")))
                .unwrap(),
            with("range", "bytes=0-1"),
            with("upgrade", "websocket"),
            with("cache-control", "no-cache"),
            with("cache-control", "no-store"),
            with("pragma", "no-cache"),
            with("authorization", "Bearer x"),
            with("cookie", "a=b"),
            with("proxy-authorization", "Basic x"),
            get("http://user:pw@a.test/b"),
        ];
        let n = reqs.len();
        let out = run_all(&mut svc, reqs);
        assert!(out.iter().all(|r| served(r) == ServedBy::Bypass));
        assert_eq!(backend.calls(), n);
        assert_eq!(svc.stats().bypassed, n as u64);
    }

    /// README security rule 2: "If you configure `.identity(...)`, requests are coalesced only with
    /// requests of the same identity, and a request with credentials whose identity is unknown
    /// still bypasses."
    #[test]
    fn http_identity_separates_callers_and_unknown_identities_bypass() {
        setup();
        #[derive(Clone)]
        struct User(&'static str);
        let backend = Backend::new(|_, _| Ok(Response::new(full("x"))));
        let mut svc = CoalesceHttpLayer::new()
            .identity(|p: &http::request::Parts| p.extensions.get::<User>().map(|u| u.0))
            .layer(backend.clone());
        let as_user = |u: Option<&'static str>| {
            let mut r = Request::get("http://a.test/me")
                .header("authorization", "Bearer whatever")
                .body(Full::<Bytes>::default())
                .unwrap();
            if let Some(u) = u {
                r.extensions_mut().insert(User(u));
            }
            r
        };
        let out = run_all(
            &mut svc,
            vec![
                as_user(Some("ann")),
                as_user(Some("bob")),
                as_user(Some("ann")),
                as_user(None),
            ],
        );
        assert_eq!(
            out.iter().map(served).collect::<Vec<_>>(),
            [
                ServedBy::Leader,
                ServedBy::Leader,
                ServedBy::Follower,
                ServedBy::Bypass
            ]
        );
        assert_eq!(backend.calls(), 3);
    }

    // =============================================================================================
    // gRPC (src/grpc/layer.rs, README "What is shared") — set-cookie in trailers changed today
    // =============================================================================================

    const METHOD: &str = "/catalog.v1.Catalog/GetItem";

    fn grpc_call() -> Request<Full<Bytes>> {
        Request::post(METHOD)
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01\x08")))
            .unwrap()
    }

    fn grpc_response(head: &[(&'static str, &'static str)], trailers: HeaderMap) -> Response<Body> {
        let mut res = Response::new(with_trailers("\0\0\0\0\x01\x10", trailers));
        res.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        for (k, v) in head {
            res.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        res
    }

    /// Three identical calls, the backend held until all three wait; what each was served.
    fn grpc_three(
        respond: impl Fn() -> Response<Body> + Send + Sync + 'static,
    ) -> (Vec<Response<CoalesceBody<Body>>>, usize) {
        let (backend, open) = Backend::gated(move |_, _| Ok(respond()));
        let mut svc = CoalesceGrpcLayer::new()
            .method(METHOD)
            .layer(backend.clone());
        let mut futs: Vec<_> = (0..3).map(|_| Box::pin(svc.call(grpc_call()))).collect();
        for f in &mut futs {
            pending(f, "gated");
        }
        assert_eq!((svc.in_flight(), svc.waiting()), (1, 2));
        let _ = open.send(());
        let out = futs
            .iter_mut()
            .map(|f| ready(f, "grpc").expect("response"))
            .collect();
        (out, backend.calls())
    }

    /// src/grpc/layer.rs: "Only a response whose `grpc-status` is `0` is shared ... rebuilt copy:
    /// same headers, message bytes and trailers" (README) — the baseline for the tests below.
    #[test]
    fn grpc_ok_response_is_shared_with_its_trailers() {
        setup();
        let (out, calls) = grpc_three(|| grpc_response(&[], headers(&[("grpc-status", "0")])));
        assert_eq!(calls, 1);
        assert_eq!(
            out.iter().map(served).collect::<Vec<_>>(),
            [ServedBy::Leader, ServedBy::Follower, ServedBy::Follower]
        );
        for res in out {
            assert_eq!(res.headers()["content-type"], "application/grpc");
            let (data, trailers) = collect(res);
            assert_eq!(data, &b"\0\0\0\0\x01\x10"[..]);
            assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        }
    }

    /// src/grpc/layer.rs and README "What is shared": "no `set-cookie` (in the headers or the
    /// trailers)".
    #[test]
    fn grpc_set_cookie_in_trailers_or_headers_is_not_shared() {
        setup();
        for in_trailers in [true, false] {
            let (out, calls) = grpc_three(move || {
                let cookie = [("set-cookie", "sid=1")];
                let (head, tail): (&[_], &[_]) = match in_trailers {
                    true => (&[], &cookie),
                    false => (&cookie, &[]),
                };
                let mut trailers = headers(tail);
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                grpc_response(head, trailers)
            });
            let what = if in_trailers { "trailers" } else { "headers" };
            assert_eq!(calls, 3, "set-cookie in the {what}: every follower calls");
            assert_eq!(
                out.iter().map(served).collect::<Vec<_>>(),
                [ServedBy::Leader, ServedBy::Released, ServedBy::Released],
                "{what}"
            );
            let leader = out.into_iter().next().unwrap();
            let in_head = leader.headers().contains_key("set-cookie");
            let trailers = collect(leader).1.expect("trailers");
            assert_eq!(
                (in_head, trailers.contains_key("set-cookie")),
                (!in_trailers, in_trailers),
                "the leader's own response is untouched"
            );
        }
    }

    /// README "What is shared": "Anything else (an error status ...) is never handed to a
    /// follower ... every follower is released at once to make its own call".
    #[test]
    fn grpc_error_status_is_not_shared() {
        setup();
        let (out, calls) = grpc_three(|| grpc_response(&[], headers(&[("grpc-status", "5")])));
        assert_eq!(calls, 3);
        assert_eq!(
            out.iter().map(served).collect::<Vec<_>>(),
            [ServedBy::Leader, ServedBy::Released, ServedBy::Released]
        );
    }
}

// =============================================================================================
// tracing (src/lib.rs, README) — changed today: "a span per flight"
// =============================================================================================

/// src/lib.rs features: "`tracing`: a `coalesce.flight` span per flight (key hash, waiters,
/// outcome)"; README: "a `coalesce.flight` `tracing` span per flight".
#[cfg(feature = "tracing")]
#[test]
fn tracing_one_span_per_flight_with_key_hash_waiters_and_outcome() {
    use span_capture::{field, Flights};
    setup();
    let spans = Flights::install();
    let group: Group<u8> = GroupBuilder::new().retry_failed(1).build();
    let mut leader = group.run_retryable(1, || async { Err::<u8, u8>(1) });
    let mut f1 = group.run_retryable(1, || async { Ok::<u8, u8>(2) });
    let mut f2 = group.run_retryable(1, || async { Ok::<u8, u8>(3) });
    assert_eq!(ready(&mut leader, "leader").unwrap(), Err(1));
    assert_eq!(ready(&mut f1, "f1").unwrap(), Ok(2));
    assert_eq!(ready(&mut f2, "f2").unwrap(), Ok(2));
    drop((leader, f1, f2));
    let closed = spans.0.closed();
    assert_eq!(
        closed.len(),
        1,
        "one span for the flight and its retry: {closed:?}"
    );
    assert_eq!(field(&closed[0], "outcome"), "ok");
    assert_eq!(field(&closed[0], "waiters"), "2");
    assert!(field(&closed[0], "key_hash").parse::<u64>().is_ok());
}

/// src/lib.rs: "a `coalesce.flight` span per flight (... outcome)": a flight whose waiters all
/// left ends `cancelled`.
#[cfg(feature = "tracing")]
#[test]
fn tracing_cancelled_flight_span_records_its_outcome() {
    use span_capture::{field, Flights};
    setup();
    let spans = Flights::install();
    let group: Group<u8> = Group::new();
    let (_tx, rx) = oneshot::channel::<u8>();
    let mut gone = group.run(1, || rx.map(|r| r.unwrap_or(0)));
    pending(&mut gone, "gone");
    drop(gone);
    let closed = spans.0.closed();
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(field(&closed[0], "outcome"), "cancelled");
}

/// src/lib.rs: "`tracing`: a `coalesce.flight` span per flight (key hash, waiters, outcome)";
/// commit e4de30b: "a lingering flight's span closes as the flight ends". A lingering flight
/// that nobody joined: its span closes, but with no `waiters` or `outcome`.
#[cfg(feature = "tracing")]
#[tokio::test(start_paused = true)]
async fn tracing_lingering_flight_span_closes_with_its_outcome() {
    use span_capture::{field, Flights};
    setup();
    let spans = Flights::install();
    let group: Group<u8> = GroupBuilder::new().linger(3600 * SEC).build();
    // Joined: the span is complete.
    let mut leader = group.run(1, || async { 1_u8 });
    let mut follower = group.run(1, || async { 1_u8 });
    assert_eq!(ready(&mut leader, "leader").unwrap(), 1);
    assert_eq!(ready(&mut follower, "follower").unwrap(), 1);
    // Alone.
    assert_eq!(
        ready(&mut group.run(2, || async { 2_u8 }), "solo").unwrap(),
        2
    );
    assert_eq!(group.len(), 2, "both outputs linger");
    let closed = spans.0.closed();
    assert_eq!(closed.len(), 2, "both spans closed as their flights ended");
    for span in &closed {
        assert_eq!(
            span.get("outcome").map(String::as_str),
            Some("ok"),
            "{closed:?}"
        );
        assert!(span.contains_key("waiters"), "{closed:?}");
        let _ = field(span, "key_hash");
    }
}
