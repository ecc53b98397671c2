//! Helpers shared by the `options*` tests: a backend whose every call is answered by the test,
//! and waits bounded in (paused) time or in scheduler turns.
// Each test file uses a part of these.
#![allow(dead_code)]

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower::Service;
use tower_coalesce::{CoalesceError, CoalesceLayer, CoalesceService, ResponseFuture};

/// Virtual time under `start_paused`: far beyond any window the tests use.
pub const LIMIT: Duration = Duration::from_secs(24 * 3600);

pub async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// Lets spawned tasks run until `cond` holds; a bounded number of scheduler turns, no clock.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

/// Lets spawned tasks run for a while (no clock involved), to show that something does *not*
/// happen.
pub async fn settle() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

/// Moves paused time on by `d`, letting every timer due on the way fire.
pub async fn wait(d: Duration) {
    tokio::time::sleep(d).await;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boom(pub &'static str);

impl fmt::Display for Boom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "boom: {}", self.0)
    }
}

impl Error for Boom {}

/// How the test answers one backend call.
pub enum Reply {
    Ok(String),
    Err(&'static str),
    Panic(&'static str),
}

/// One backend call, waiting for the test's answer.
pub struct Pending {
    /// 1 for the backend's first call, and so on.
    pub n: usize,
    pub key: u32,
    pub reply: oneshot::Sender<Reply>,
}

impl Pending {
    pub fn ok(self, v: &str) {
        let _ = self.reply.send(Reply::Ok(v.to_string()));
    }
    pub fn err(self, e: &'static str) {
        let _ = self.reply.send(Reply::Err(e));
    }
    pub fn panic(self, m: &'static str) {
        let _ = self.reply.send(Reply::Panic(m));
    }
}

#[derive(Default)]
pub struct Counts {
    /// Calls of `Service::call` on the backend.
    calls: AtomicUsize,
    /// Backend futures alive now.
    live: AtomicUsize,
    /// Backend futures dropped before they got their answer: cancelled calls.
    cancelled: AtomicUsize,
    /// Backend futures that got their answer.
    completed: AtomicUsize,
}

/// A backend whose every call is reported to the test (through [`Ctl`]) and waits for the
/// test's answer. A guard inside each call's future tells cancelled calls from completed ones.
#[derive(Clone)]
pub struct Backend {
    counts: Arc<Counts>,
    tx: mpsc::UnboundedSender<Pending>,
}

pub struct Ctl {
    counts: Arc<Counts>,
    rx: mpsc::UnboundedReceiver<Pending>,
}

pub fn backend() -> (Backend, Ctl) {
    let (tx, rx) = mpsc::unbounded_channel();
    let counts = Arc::new(Counts::default());
    (
        Backend {
            counts: counts.clone(),
            tx,
        },
        Ctl { counts, rx },
    )
}

impl Ctl {
    /// The next backend call, in the order they were made.
    pub async fn next(&mut self) -> Pending {
        bounded("a backend call", self.rx.recv())
            .await
            .expect("backend dropped")
    }

    /// Fails if a backend call was made that the test did not expect.
    pub fn no_more(&mut self) {
        if let Ok(p) = self.rx.try_recv() {
            panic!("unexpected backend call #{} for key {}", p.n, p.key);
        }
    }

    pub fn calls(&self) -> usize {
        self.counts.calls.load(SeqCst)
    }
    pub fn live(&self) -> usize {
        self.counts.live.load(SeqCst)
    }
    pub fn cancelled(&self) -> usize {
        self.counts.cancelled.load(SeqCst)
    }
    pub fn completed(&self) -> usize {
        self.counts.completed.load(SeqCst)
    }
}

pub struct LiveGuard {
    counts: Arc<Counts>,
    answered: bool,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.counts.live.fetch_sub(1, SeqCst);
        if !self.answered {
            self.counts.cancelled.fetch_add(1, SeqCst);
        }
    }
}

impl Service<u32> for Backend {
    type Response = String;
    type Error = Boom;
    type Future = BoxFuture<'static, Result<String, Boom>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u32) -> Self::Future {
        let n = self.counts.calls.fetch_add(1, SeqCst) + 1;
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Pending { n, key, reply });
        self.counts.live.fetch_add(1, SeqCst);
        // Made here, not in the async block: a future dropped before its first poll counts.
        let guard = LiveGuard {
            counts: self.counts.clone(),
            answered: false,
        };
        Box::pin(async move {
            let mut guard = guard;
            let reply = rx.await;
            guard.answered = true;
            guard.counts.completed.fetch_add(1, SeqCst);
            match reply {
                Ok(Reply::Ok(v)) => Ok(v),
                Ok(Reply::Err(e)) => Err(Boom(e)),
                Ok(Reply::Panic(m)) => panic!("{m}"),
                Err(_) => Err(Boom("the test dropped the call")),
            }
        })
    }
}

/// Key 0 bypasses; every other request is its own key.
pub fn key_of(k: &u32) -> Option<u32> {
    (*k != 0).then_some(*k)
}

pub type KeyOf = fn(&u32) -> Option<u32>;
pub type Svc = CoalesceService<Backend, KeyOf, u32>;
pub type Fut = ResponseFuture<Backend, u32, u32>;
pub type Out = Result<String, CoalesceError>;

pub fn layer() -> CoalesceLayer<KeyOf, u32> {
    CoalesceLayer::new(key_of as KeyOf)
}

/// Calls `svc` synchronously, so the request joins or registers its flight right now, in the
/// order the test says (`oneshot` would wait for the first poll).
pub fn start(svc: &mut Svc, req: u32) -> Fut {
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => svc.call(req),
        other => panic!("the coalescing service must always be ready, got {other:?}"),
    }
}

pub fn spawn(fut: Fut) -> JoinHandle<Out> {
    tokio::spawn(fut)
}

pub async fn done(what: &str, h: JoinHandle<Out>) -> Out {
    bounded(what, h).await.expect("request task panicked")
}

pub fn ok(out: Out) -> String {
    out.unwrap_or_else(|e| panic!("expected a response, got {e:?}"))
}

pub fn boom(out: Out) -> Boom {
    let err = out.expect_err("expected an error");
    err.downcast_ref::<Boom>()
        .unwrap_or_else(|| panic!("expected the inner Boom, got {err:?}"))
        .clone()
}
