//! Helpers shared by the `review_s7_*` tests.
//!
//! Here: futures polled by hand with a no-op waker, `make`s gated on a oneshot channel, a
//! watchdog thread for code that could deadlock, a paused runtime, and the rules `Stats`
//! documents. In submodules: the HTTP adapter driven in process (`adapter`), servers and
//! clients on the wire (`wire`), and the parts of the recording `tracing` subscribers
//! (`recorder`).
// Each test file uses a part of these.
#![allow(dead_code)]

#[cfg(feature = "http")]
pub mod adapter;
#[cfg(feature = "tracing")]
pub mod recorder;
#[cfg(feature = "http")]
pub mod wire;

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::oneshot;
use tower_coalesce::{Group, Panicked, Run, Stats};

// ---------------------------------------------------------------------------------------------
// Polling by hand
// ---------------------------------------------------------------------------------------------

pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One poll with a no-op waker.
pub fn poll<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
}

/// Polls `f` a few times; it must still be pending.
pub fn pending<F: Future + Unpin>(f: &mut F, what: &str) {
    for _ in 0..3 {
        assert!(poll(f).is_pending(), "{what}: expected pending");
    }
}

/// Polls `f` until it is ready (nothing it waits for needs a timer); fails if it is not soon.
pub fn ready<F: Future + Unpin>(f: &mut F, what: &str) -> F::Output {
    for _ in 0..16 {
        if let Poll::Ready(out) = poll(f) {
            return out;
        }
    }
    panic!("{what}: not ready after 16 polls");
}

/// Runs `f` on a thread of its own; fails if it makes no progress for a minute (a deadlock:
/// user code that re-enters the registry synchronously could block on a lock, which no timeout
/// inside the test could catch). The watchdog is a hang guard only.
pub fn within<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => panic!("{what}: no progress in 60 s (deadlock)"),
    }
}

/// A current-thread runtime whose clock is paused (moved only by `tokio::time::advance`).
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------------------------
// `Group` calls: gated, or at once; counted
// ---------------------------------------------------------------------------------------------

/// A call's output in the `Group` tests.
pub type Res = Result<u32, &'static str>;
pub type Waiter = Run<u32, Res>;

pub fn out(r: Result<Res, Panicked>) -> Res {
    r.expect("no panic expected")
}

/// A `make` whose call ends with what the test sends.
pub fn gated() -> (oneshot::Sender<Res>, impl FnOnce() -> BoxFut<Res> + Send) {
    let (tx, rx) = oneshot::channel::<Res>();
    let make = move || -> BoxFut<Res> { Box::pin(async move { rx.await.expect("gate dropped") }) };
    (tx, make)
}

/// A `make` whose call ends at once with `v`.
pub fn now(v: Res) -> impl FnOnce() -> BoxFut<Res> + Send {
    move || -> BoxFut<Res> { Box::pin(async move { v }) }
}

/// Counts what became of the `make`s handed to a group, and of the calls they made.
#[derive(Clone, Default)]
pub struct Calls(Arc<Tally>);

#[derive(Default)]
struct Tally {
    /// `make`s called.
    made: AtomicUsize,
    /// `make`s dropped without being called.
    unused: AtomicUsize,
    /// Calls that ran to their end.
    finished: AtomicUsize,
    /// Calls dropped before their end.
    dropped: AtomicUsize,
}

/// Moved into a `make`: counts it as unused if it is dropped uncalled.
struct Mark {
    tally: Arc<Tally>,
    used: bool,
}

impl Drop for Mark {
    fn drop(&mut self) {
        if !self.used {
            self.tally.unused.fetch_add(1, SeqCst);
        }
    }
}

/// Moved into a call: counts it as finished, or as dropped before its end.
struct CallGuard {
    tally: Arc<Tally>,
    done: bool,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.done {
            self.tally.finished.fetch_add(1, SeqCst);
        } else {
            self.tally.dropped.fetch_add(1, SeqCst);
        }
    }
}

impl Calls {
    /// A counted `make` whose call is `call`'s.
    fn make<T: Send + 'static>(
        &self,
        call: impl FnOnce(CallGuard) -> BoxFut<T> + Send + 'static,
    ) -> impl FnOnce() -> BoxFut<T> + Send + 'static {
        let mut mark = Mark {
            tally: self.0.clone(),
            used: false,
        };
        move || -> BoxFut<T> {
            mark.used = true;
            mark.tally.made.fetch_add(1, SeqCst);
            let guard = CallGuard {
                tally: mark.tally.clone(),
                done: false,
            };
            call(guard)
        }
    }

    /// A `make` whose call ends with what the test sends.
    pub fn gated<T: Send + 'static>(
        &self,
    ) -> (
        oneshot::Sender<T>,
        impl FnOnce() -> BoxFut<T> + Send + 'static,
    ) {
        let (tx, rx) = oneshot::channel::<T>();
        let make = self.make(move |guard| {
            Box::pin(async move {
                let mut guard = guard;
                let v = rx.await.expect("gate dropped");
                guard.done = true;
                v
            })
        });
        (tx, make)
    }

    /// A `make` whose call ends at once with `v`.
    pub fn now<T: Send + 'static>(&self, v: T) -> impl FnOnce() -> BoxFut<T> + Send + 'static {
        self.make(move |guard| {
            Box::pin(async move {
                let mut guard = guard;
                guard.done = true;
                v
            })
        })
    }

    /// A `make` whose call ends with `v` after one yield (on a tokio runtime).
    pub fn ready<T: Send + 'static>(&self, v: T) -> impl FnOnce() -> BoxFut<T> + Send + 'static {
        self.make(move |guard| {
            Box::pin(async move {
                let mut guard = guard;
                tokio::task::yield_now().await;
                guard.done = true;
                v
            })
        })
    }

    /// A `make` whose call never ends.
    pub fn never<T: Send + 'static>(&self) -> impl FnOnce() -> BoxFut<T> + Send + 'static {
        self.make(move |guard| {
            Box::pin(async move {
                let _guard = guard;
                std::future::pending::<T>().await
            })
        })
    }

    /// A `make` that panics when called.
    pub fn panics<T: Send + 'static>(
        &self,
        msg: &'static str,
    ) -> impl FnOnce() -> BoxFut<T> + Send + 'static {
        self.make(move |_| panic!("{msg}"))
    }

    pub fn made(&self) -> usize {
        self.0.made.load(SeqCst)
    }

    pub fn unused(&self) -> usize {
        self.0.unused.load(SeqCst)
    }

    pub fn finished(&self) -> usize {
        self.0.finished.load(SeqCst)
    }

    pub fn dropped(&self) -> usize {
        self.0.dropped.load(SeqCst)
    }
}

/// An inner service's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boom(pub &'static str);

impl fmt::Display for Boom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "boom: {}", self.0)
    }
}

impl Error for Boom {}

// ---------------------------------------------------------------------------------------------
// What `Stats` documents
// ---------------------------------------------------------------------------------------------

/// The request-count rule `Stats` documents (every request counted once: as the leader of a
/// flight, a follower, a lingering hit, a bypass or over capacity; `leaders` also counts
/// retries, which are no requests), and `fell_through = over_capacity + timed_out + released`.
pub fn check_sum(s: &Stats, requests: u64) {
    let leaders = s
        .leaders
        .checked_sub(s.retried)
        .unwrap_or_else(|| panic!("more retries than calls: {s:?}"));
    assert_eq!(
        leaders + s.followers + s.lingered + s.bypassed + s.over_capacity,
        requests,
        "every request is counted once: {s:?}"
    );
    assert_eq!(
        s.fell_through,
        s.over_capacity + s.timed_out + s.released,
        "{s:?}"
    );
}

/// `errors + panics + cancelled` is at most `leaders`: each call ends once.
pub fn check_calls_end_once(s: &Stats) {
    assert!(
        s.errors + s.panics + s.cancelled <= s.leaders,
        "a call ends once: {s:?}"
    );
}

/// Nothing in flight and no entry left.
pub fn assert_clean<K: std::hash::Hash + Eq + Send + 'static>(group: &Group<K>) {
    assert_eq!(group.in_flight(), 0, "in_flight(): {:?}", group.stats());
    assert_eq!(group.len(), 0, "entries left: {:?}", group.stats());
}
