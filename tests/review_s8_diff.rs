//! Review (session 8, diff 55f86a7..b915edb): black-box tests, public API only.
//!
//! - `is_shared` after a follower left during publication, for a detached flight's caller:
//!   commit 64e481c made a driving leader's `is_shared` say whether a follower got a copy, but
//!   a detached flight's caller (which waits in a slot, not as the driver) still reads the
//!   number of slots counted when the publish began (ignored test: the bug).
//! - The same with a driving leader (fixed by 64e481c; pinned here through `Group`).
//! - The leader's reply through the slot (gRPC: was a oneshot): a detached flight whose task
//!   died with its runtime is taken over by its own caller, who still finds its reply (the
//!   `expect` in the gRPC and HTTP leaders is never hit).
//! - `CoalesceError::is_panic` says a panic of the response's `Clone` while a follower's copy
//!   is made is "this follower's alone"; it is every follower's still to be served in that
//!   publish (pinned as the code behaves, for the doc to be fixed).
//!
//! No sleep decides anything: paused time (a `timeout` only guards against a hang, and fires
//! at once on a paused clock if the runtime idles), gates, and `futures::poll!`.
#![cfg(feature = "grpc")]

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::poll;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::{oneshot, watch};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, ServedBy};
use tower_coalesce::{CoalesceLayer, GroupBuilder, Run};

const METHOD: &str = "/catalog.v1.Catalog/GetItem";

/// Fails instead of hanging. On a paused clock an idle runtime jumps to the deadline at once.
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: never finished"))
}

// ---------------------------------------------------------------------------------------------
// `is_shared` when the only follower leaves during publication
// ---------------------------------------------------------------------------------------------

/// Where the test parks a follower for the output's `Clone` to drop.
type Victim = Arc<Mutex<Option<Box<dyn std::any::Any + Send>>>>;

/// An output whose `Clone` drops the waiter parked in `victim`, as a client that disconnects
/// while the output is being copied for it.
#[derive(Debug)]
struct Hooked {
    victim: Victim,
}

impl Clone for Hooked {
    fn clone(&self) -> Self {
        let gone = self.victim.lock().unwrap().take();
        drop(gone);
        Hooked {
            victim: Arc::clone(&self.victim),
        }
    }
}

/// A leader and one follower of key 1; the follower is parked in the victim, to be dropped by
/// the first copy made of the output; the call answers once `open` is sent.
fn leader_and_parked_follower(
    detached: bool,
) -> (
    Run<u8, Hooked>,
    Victim,
    oneshot::Sender<()>,
    impl Fn() -> bool,
) {
    let group = GroupBuilder::new().detached(detached).build::<u8>();
    let victim: Victim = Arc::default();
    let (open, gate) = oneshot::channel::<()>();
    let v = Arc::clone(&victim);
    let leader = group.run(1, move || async move {
        gate.await.unwrap();
        Hooked { victim: v }
    });
    assert!(leader.is_leader());
    let follower: Run<u8, Hooked> = group.run(1, || async { unreachable!("joins") });
    assert!(!follower.is_leader() && follower.is_shared());
    *victim.lock().unwrap() = Some(Box::new(follower));
    (leader, victim, open, move || group.is_empty())
}

/// The driving leader (fixed by 64e481c): its only follower left while its copy was being
/// made; nobody else got the output.
#[tokio::test(start_paused = true)]
async fn driving_leader_is_not_shared_when_its_only_follower_left_during_publication() {
    let (mut leader, victim, open, empty) = leader_and_parked_follower(false);
    open.send(()).unwrap();
    let out = bounded("leader", &mut leader).await.unwrap();
    assert!(victim.lock().unwrap().is_none(), "the follower left");
    assert!(empty());
    assert!(!leader.is_shared(), "nobody else got the output");
    drop(out);
}

/// The same with a detached flight: its caller waits in a slot and reads `published_to`, the
/// number of slots counted when the publish began (itself and the follower that then left), so
/// it says `true` though nobody else got the output.
#[tokio::test(start_paused = true)]

async fn detached_leader_is_not_shared_when_its_only_follower_left_during_publication() {
    let (mut leader, victim, open, empty) = leader_and_parked_follower(true);
    open.send(()).unwrap();
    let out = bounded("leader", &mut leader).await.unwrap();
    assert!(victim.lock().unwrap().is_none(), "the follower left");
    assert!(empty());
    assert!(
        !leader.is_shared(),
        "nobody but the detached caller got the output, yet is_shared() is true"
    );
    drop(out);
}

// ---------------------------------------------------------------------------------------------
// The leader's reply through the slot, after its detached task died with its runtime
// ---------------------------------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn grpc_call() -> Request<Full<Bytes>> {
    Request::post(METHOD)
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01k")))
        .unwrap()
}

async fn text<B: http_body::Body>(res: Response<B>) -> String
where
    B::Error: std::fmt::Debug,
{
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Counts its calls; each answers once the gate opens (a `watch`: no runtime needed).
#[derive(Clone)]
struct Gated {
    calls: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
}

impl Gated {
    fn new() -> Self {
        Gated {
            calls: Arc::default(),
            gate: Arc::new(watch::channel(false).0),
        }
    }

    fn answer<T>(&self, answer: T) -> impl Future<Output = Result<T, Infallible>> + Send
    where
        T: Send,
    {
        self.calls.fetch_add(1, SeqCst);
        let mut gate = self.gate.subscribe();
        async move {
            gate.wait_for(|open| *open).await.unwrap();
            Ok(answer)
        }
    }
}

/// gRPC (the leader's reply moved from a oneshot to the slot): the caller of a detached flight
/// whose task is dropped with its runtime takes the call over (the future goes back to its
/// waiters) and, polled on another runtime, still gets its own reply, whole.
#[test]
fn grpc_detached_caller_takes_over_after_its_task_died_and_finds_its_reply() {
    let backend = Gated::new();
    let b = backend.clone();
    let layer = CoalesceGrpcLayer::new().method(METHOD).detached(true);
    let mut svc = layer.layer(service_fn(
        move |_req: Request<CoalesceBody<Full<Bytes>>>| {
            b.answer(
                Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(Full::new(Bytes::from_static(b"reply")))
                    .unwrap(),
            )
        },
    ));
    let first = runtime();
    first.block_on(svc.ready()).unwrap();
    let mut caller = Box::pin(svc.call(grpc_call()));
    first.block_on(async {
        // Keyed on its message, it registers the flight, whose task runs the call until the
        // gate.
        assert!(poll!(caller.as_mut()).is_pending());
        tokio::task::yield_now().await;
    });
    assert_eq!(backend.calls.load(SeqCst), 1);
    drop(first);
    assert_eq!(layer.in_flight(), 1, "the flight outlives its task");
    backend.gate.send_replace(true);
    let res = runtime().block_on(bounded("the caller", caller.as_mut()));
    let res = res.unwrap();
    assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));
    assert_eq!(runtime().block_on(text(res)), "reply");
    assert_eq!(backend.calls.load(SeqCst), 1, "the same call, taken over");
    assert_eq!(layer.in_flight(), 0);
}

/// HTTP, a response that is not shared (`Set-Cookie`), so that it reaches the leader through
/// the slot only: same takeover, same reply.
#[test]
fn http_detached_caller_takes_over_after_its_task_died_and_finds_its_unshared_reply() {
    let backend = Gated::new();
    let b = backend.clone();
    let layer = CoalesceHttpLayer::new().detached(true);
    let mut svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        b.answer(
            Response::builder()
                .header("set-cookie", "id=1")
                .body(Full::new(Bytes::from_static(b"mine")))
                .unwrap(),
        )
    }));
    let first = runtime();
    first.block_on(svc.ready()).unwrap();
    let req = Request::get("/a").body(Full::default()).unwrap();
    // In the runtime: the flight's task is spawned by `call`.
    let mut caller = {
        let _in = first.enter();
        Box::pin(svc.call(req))
    };
    first.block_on(async {
        assert!(poll!(caller.as_mut()).is_pending());
        tokio::task::yield_now().await;
    });
    assert_eq!(backend.calls.load(SeqCst), 1);
    drop(first);
    backend.gate.send_replace(true);
    let res = runtime().block_on(bounded("the caller", caller.as_mut()));
    let res = res.unwrap();
    assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));
    assert_eq!(res.headers()["set-cookie"], "id=1");
    assert_eq!(runtime().block_on(text(res)), "mine");
    assert_eq!(backend.calls.load(SeqCst), 1);
    assert_eq!(layer.in_flight(), 0);
}

// ---------------------------------------------------------------------------------------------
// `CoalesceError::is_panic` and a response `Clone` that panics once
// ---------------------------------------------------------------------------------------------

/// A response whose `Clone` panics the first time only.
#[derive(Debug)]
struct PanicsOnce(Arc<AtomicUsize>);

impl Clone for PanicsOnce {
    fn clone(&self) -> Self {
        if self.0.fetch_add(1, SeqCst) == 0 {
            panic!("first copy");
        }
        PanicsOnce(Arc::clone(&self.0))
    }
}

/// The doc of `is_panic` says a panic of the response's `Clone` while a follower's copy is made
/// is "this follower's alone". The copies of one publish are made together: once one `Clone`
/// panics, every follower still to be served gets that panic, though its own copy would have
/// been made. Pinned as the code behaves (contract 3, the same result for all).
#[tokio::test(start_paused = true)]
async fn a_response_clone_that_panics_once_fails_every_follower_of_that_publish() {
    let clones = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&clones);
    let mut svc = CoalesceLayer::new(|k: &&'static str| Some(*k)).layer(service_fn(
        move |_k: &'static str| {
            let c = Arc::clone(&c);
            async move {
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(PanicsOnce(c))
            }
        },
    ));
    let leader = svc.call("k");
    let a = svc.call("k");
    let b = svc.call("k");
    assert!(leader.is_leader() && a.is_follower() && b.is_follower());
    let out = bounded("leader", leader).await;
    assert!(out.is_ok(), "the leader keeps the original");
    for (name, f) in [("a", a), ("b", b)] {
        let err = bounded(name, f).await.unwrap_err();
        assert!(err.is_panic(), "{name}: {err}");
        assert_eq!(err.panic_message(), Some("first copy"));
    }
    assert_eq!(clones.load(SeqCst), 1, "the second copy was never made");
}
