//! The tower-free core: a sharded registry of in-flight calls that concurrent callers share.
//!
//! A [`Group`] maps keys to *flights*. [`Group::run`] either joins the key's flight or, when
//! there is none, registers a new one and makes its future. Whoever holds that future (the
//! *driver*, at first the caller that registered it) polls it; everybody else parks a waker and
//! is woken once, when the output is ready. When the driver is dropped the future is handed to
//! another waiter; when the last waiter is dropped the future is dropped and the key freed.
//!
//! Locks: each shard of the registry and each flight has a `std` mutex. The lock order is
//! shard, then flight; nothing takes a shard lock while holding a flight lock. Neither is held
//! across an `.await`, while the inner future is made, polled or dropped, or while an output is
//! cloned for a follower or a lingering hit. Only a key's `Hash`/`Eq` run inside a shard lock,
//! as in any hash map.
//!
//! This file holds the shared types, each field with the lock that guards it. The code is
//! split by concern: `group.rs` joins a key's flight or registers one; `run.rs` is a waiter
//! and what its driver does when the call ends; `wait.rs` polls it; `leave.rs` lets it go
//! early; `publish.rs` hands an output to the followers; `state.rs` is a flight's shared
//! state; `registry.rs` unregisters flights and keeps lingering outputs; `builder.rs` holds
//! the options; `panicked.rs` the shared panic.

// Without `tracing` a span is `()`, passed along to keep one code path.
#![cfg_attr(
    not(feature = "tracing"),
    allow(clippy::unit_arg, clippy::let_unit_value)
)]

use std::any::{Any, TypeId};
use std::borrow::Borrow;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::mem;
use std::num::NonZeroU64;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hashbrown::HashTable;
use slab::Slab;
use tokio::time::Instant;

use crate::stats::{Counters, Stats};
use crate::sync::{Mutex, MutexGuard};

mod builder;
mod group;
mod leave;
mod panicked;
mod publish;
mod registry;
mod run;
mod state;
mod wait;

pub(crate) use builder::Config;
pub use builder::GroupBuilder;
pub use panicked::Panicked;
use publish::*;
pub use run::Run;
use run::*;
pub(crate) use run::{Begin, NoBegin};
use state::*;

/// A call's future, as a follower's own `make` returns it.
pub(crate) type PlainFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A flight's inner future, boxed together with its [`Meta`].
type BoxFuture<T> = Pin<Box<dyn Call<T> + 'static>>;

/// A follower's own way to make the call, kept when it may have to run it: to retry a failed
/// flight, or to call alone after its wait limit.
/// It gives its caller's own failure test with the future: the output of a call is judged by
/// the test of the caller whose `make` made it.
pub(crate) type Make<T> = Box<dyn FnOnce() -> (PlainFuture<T>, IsErr<T>) + Send>;

/// Which outputs count as failures (for stats, `linger_errors`, `retry_failed`).
type IsErr<T> = fn(&T) -> bool;

/// What the waiter that drives a flight needs to end it. Kept in the box of the inner future
/// (so every waiter stays small, and it goes along when a follower takes the call over); like
/// the future, only the waiter holding the box reads or writes it, so no lock guards it.
struct Meta<T> {
    /// The flight's entry (`id` 0 for a call run alone).
    hash: u64,
    id: u64,
    /// Which outputs count as failures (for stats, `linger_errors`, `retry_failed`).
    is_err: fn(&T) -> bool,
    /// The id of a cancelled entry of the same key whose future is still being dropped: the
    /// inner future is not polled until that entry is gone.
    gate: Option<NonZeroU64>,
    /// Set when a follower took the call over from a driver that left: it did not make the
    /// call, so if it fails and may be retried, that follower waits for the retry (and may
    /// run it) rather than take the failure as its own.
    adopted: bool,
    /// The `make` of the follower that took the call over, if it kept one: to run the retry.
    kept: Option<Make<T>>,
    /// The flight's span, entered while the inner future is polled. Only the driving waiter
    /// holds it (and the flight's shared state): followers do not clone it each.
    #[cfg(feature = "tracing")]
    span: FlightSpan,
}

impl<T> Meta<T> {
    fn new(hash: u64, id: u64, is_err: fn(&T) -> bool, gate: Option<NonZeroU64>) -> Self {
        Meta {
            hash,
            id,
            is_err,
            gate,
            adopted: false,
            kept: None,
            #[cfg(feature = "tracing")]
            span: FlightSpan::default(),
        }
    }

    /// Moves this out of a future about to be dropped, leaving a blank (no span clone).
    fn take(&mut self) -> Self {
        mem::replace(self, Meta::new(0, 0, |_| false, None))
    }

    #[cfg(feature = "tracing")]
    fn span(&self) -> &FlightSpan {
        &self.span
    }

    #[cfg(not(feature = "tracing"))]
    fn span(&self) -> &SpanHold {
        &()
    }
}

/// What a flight's span is held as: nothing without `tracing`.
#[cfg(feature = "tracing")]
type SpanHold = FlightSpan;
#[cfg(not(feature = "tracing"))]
type SpanHold = ();

/// A flight's `tracing` span, one for its entry, its driver and its followers. The caller that
/// registers the flight makes it once it has let the shard's lock go (a subscriber is user
/// code, rule 8), so a follower that joins in between logs without it. Written once (the
/// `OnceLock`), read by any holder after. The entry and the followers' state give theirs up
/// when the flight ends, so that the span closes then, not when a lingering output expires;
/// the last holder drops it, unlocked.
#[cfg(feature = "tracing")]
#[derive(Clone, Default)]
struct FlightSpan(Option<Arc<std::sync::OnceLock<tracing::Span>>>);

#[cfg(feature = "tracing")]
impl FlightSpan {
    /// One to be made by [`make`](Self::make): cloning it is not subscriber code.
    fn pending() -> Self {
        FlightSpan(Some(Arc::default()))
    }

    fn get(&self) -> Option<&tracing::Span> {
        self.0.as_deref()?.get()
    }

    /// Makes the span. Contained: a subscriber's panic leaves the flight without one.
    fn make(&self, hash: u64) {
        let Some(cell) = &self.0 else { return };
        let made = contained(|| {
            Some(tracing::debug_span!(
                "coalesce.flight",
                key_hash = hash,
                // The role of the caller that made the span (its followers' `trace` events
                // within it say `follower`).
                role = "leader",
                waiters = tracing::field::Empty,
                outcome = tracing::field::Empty,
            ))
        });
        if let Some(span) = made {
            // Only the registering caller makes it: the cell is empty.
            drop(cell.set(span));
        }
    }
}

/// A flight's inner future with its [`Meta`].
trait Call<T>: Future<Output = T> + Send {
    fn meta(&self) -> &Meta<T>;
    fn meta_mut(self: Pin<&mut Self>) -> &mut Meta<T>;
}

pin_project_lite::pin_project! {
    struct Driven<T, F> {
        meta: Meta<T>,
        #[pin]
        fut: F,
    }
}

impl<T, F: Future<Output = T>> Future for Driven<T, F> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.project();
        #[cfg(feature = "tracing")]
        let _entered = this.meta.span.get().map(tracing::Span::enter);
        this.fut.poll(cx)
    }
}

impl<T, F: Future<Output = T> + Send> Call<T> for Driven<T, F> {
    fn meta(&self) -> &Meta<T> {
        &self.meta
    }

    fn meta_mut(self: Pin<&mut Self>) -> &mut Meta<T> {
        self.project().meta
    }
}

/// Boxes `fut` (one allocation) with its flight's `meta`.
fn driven<T, F>(meta: Meta<T>, fut: F) -> BoxFuture<T>
where
    F: Future<Output = T> + Send + 'static,
    T: 'static,
{
    Box::pin(Driven { meta, fut })
}

/// Boxes a caller's `make`; a function pointer so that only callers that can offer one (a
/// `Send + 'static` closure) need those bounds.
pub(crate) type Boxer<M, T> = fn(M, IsErr<T>) -> Make<T>;

/// The [`Boxer`] for any `Send + 'static` closure.
pub(crate) fn boxer<T, M, F>(make: M, is_err: IsErr<T>) -> Make<T>
where
    M: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + Send + 'static,
    T: 'static,
{
    Box::new(move || (Box::pin(make()) as PlainFuture<T>, is_err))
}

/// A registry of in-flight calls, keyed by `K`: Go's `singleflight.Group` for futures.
///
/// At most one flight per key runs at a time. Callers that ask for a key while its flight runs
/// wait for that flight and get a clone of its output; a caller that asks after the output was
/// published starts a new flight (unless a [linger window](GroupBuilder::linger) is set).
/// Flights of different output types never meet, even under equal keys.
///
/// `Group` is a cheap handle: clones share one registry.
///
/// ```
/// use tower_coalesce::Group;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let group: Group<&'static str> = Group::new();
/// let calls = Arc::new(AtomicUsize::new(0));
/// let fetch = || {
///     let calls = calls.clone();
///     async move {
///         calls.fetch_add(1, Ordering::SeqCst);
///         tokio::task::yield_now().await;
///         "value".to_string()
///     }
/// };
/// let (a, b) = tokio::join!(group.run("key", fetch.clone()), group.run("key", fetch));
/// assert_eq!(a.unwrap(), "value");
/// assert_eq!(b.unwrap(), "value");
/// assert_eq!(calls.load(Ordering::SeqCst), 1);
/// assert_eq!(group.in_flight(), 0);
/// # }
/// ```
///
/// A follower that should not wait longer than some deadline can simply be wrapped in
/// `tokio::time::timeout`: dropping a waiter leaves the flight undisturbed.
pub struct Group<K> {
    registry: Arc<Registry<K>>,
}

struct Registry<K> {
    /// Randomly seeded per registry: keys come from the network, so a fixed seed would let a
    /// client aim collisions at one shard.
    hasher: foldhash::fast::RandomState,
    /// Each shard is reference-counted on its own: a waiter holds its shard, not the registry,
    /// so concurrent requests do not all bump one counter.
    shards: Box<[Arc<ShardCell<K>>]>,
    common: Arc<Common>,
}

/// What every shard of a registry reads.
struct Common {
    config: Config,
    /// Flights registered and not finished, over all shards; kept only under `max_in_flight`.
    running: AtomicUsize,
    /// Counters of events that happen outside any shard lock.
    bypassed: AtomicU64,
    timed_out: AtomicU64,
    retried: AtomicU64,
    released: AtomicU64,
}

/// One shard and the registry's common part.
struct ShardCell<K> {
    shard: Mutex<Shard<K>>,
    common: Arc<Common>,
}

impl<K> std::ops::Deref for Registry<K> {
    type Target = Common;

    fn deref(&self) -> &Common {
        &self.common
    }
}

impl<K> std::ops::Deref for ShardCell<K> {
    type Target = Common;

    fn deref(&self) -> &Common {
        &self.common
    }
}

impl<K> ShardCell<K> {
    fn lock(&self) -> MutexGuard<'_, Shard<K>> {
        self.shard.lock()
    }
}

/// Guarded by its mutex in `Registry::shards`.
struct Shard<K> {
    table: HashTable<Entry<K>>,
    counters: Counters,
    /// Lingering entries in expiry order, one queue per window so each stays sorted.
    expiring_ok: VecDeque<Expiry>,
    expiring_err: VecDeque<Expiry>,
    /// The next entry's `id`.
    next_id: u64,
    /// Entries with `cancelling` set; a lookup for them is skipped while there are none.
    cancelling: usize,
    /// New flights waiting for a cancelled entry (by `id`) to be gone; rare, so kept here
    /// rather than in every entry.
    gated: Vec<(u64, Waker)>,
}

/// A registered flight, or a lingering output. Guarded by its shard's lock.
struct Entry<K> {
    key: K,
    hash: u64,
    /// Unique in its shard: how a flight's waiters find their entry again (never by key).
    id: u64,
    /// `TypeId` of `Flight<T>`: flights of different output types never meet.
    output: TypeId,
    /// The `Flight<T>` its followers share, made by the first one to join (or up front for a
    /// detached flight, or at the end to hold a lingering output). A flight nobody joins never
    /// allocates one, and its driver publishes without taking any lock but this shard's.
    flight: Option<Arc<dyn Any + Send + Sync>>,
    /// Set when the flight finished and its output lingers (until its `Expiry`).
    lingering: bool,
    /// Set by `forget`: never joined again, removed when its driver finishes.
    forgotten: bool,
    /// Set when the last waiter left, until the call's future is dropped and the entry
    /// removed: never joined; a new flight of the key waits for it before it starts.
    cancelling: bool,
    #[cfg(feature = "tracing")]
    span: FlightSpan,
}

/// What is left to drop of a removed entry once its flight's followers are served: its key
/// (user code) and its span.
type Removed<K> = (K, SpanHold);

impl<K> Entry<K> {
    /// Splits a removed entry into what is dropped later and its flight. Destructured, not
    /// taken from: a field overwritten in place and then the whole entry moved on is a wide
    /// load of a narrow store still in flight, which stalls (measured on the solo path).
    fn removed(self) -> (Removed<K>, Option<Arc<dyn Any + Send + Sync>>) {
        #[cfg(feature = "tracing")]
        let Entry {
            key, flight, span, ..
        } = self;
        #[cfg(not(feature = "tracing"))]
        let (Entry { key, flight, .. }, span) = (self, ());
        ((key, span), flight)
    }
}

struct Expiry {
    at: Instant,
    hash: u64,
    /// The lingering entry's `id`.
    id: u64,
}

/// The state a flight's waiters share, once it has followers.
struct Flight<T> {
    /// The entry, for followers that may end the flight. Written once, before the flight is
    /// shared; read without a lock.
    hash: u64,
    id: u64,
    /// `Clone` of the output, captured where `T: Clone` is known, so that a dropped follower
    /// (whose `Drop` cannot require it) can still publish.
    cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
    state: Mutex<State<T>>,
}

/// Guarded by `Flight::state`.
struct State<T> {
    phase: Phase,
    /// Whether a waiter holds the inner future (or is about to: the registering caller between
    /// registration and making the future; a detached flight's task; a follower elected to
    /// retry). While true, the flight cannot be cancelled.
    driven: bool,
    /// The inner future while nobody drives it: put here by a dropped driver, taken by the next
    /// follower that is polled.
    orphan: Option<BoxFuture<T>>,
    /// One slot per follower, inserted when it joins, removed when it takes its output or
    /// drops. The driver fills every slot (it clones outside the lock, moves inside) before it
    /// sets `phase` to `Done`.
    followers: Slab<Slot<T>>,
    /// Set before the entry starts lingering. Taken out by a caller that finds it lingering,
    /// to clone it unlocked, and put back at once (see `copy_lingering`). Boxed, as
    /// `failure`, so that a flight of a large output is not that large, and taking the output
    /// out moves a pointer.
    lingering: Option<Box<Result<T, Panicked>>>,
    /// Callers that found `lingering` taken out, waiting for it to be put back; the one that
    /// puts it back wakes one of them.
    lingerers: Slab<Option<Waker>>,
    /// Retries this flight may still make (`retry_failed`).
    retries_left: u32,
    /// Set when an attempt failed and a follower holding a `Make` is to run the next one.
    needs_driver: bool,
    /// Followers in `followers` that hold a `Make`.
    makers: usize,
    /// The failed attempt's output while `needs_driver`: published to the followers if every
    /// one that could retry leaves.
    failure: Option<Box<Result<T, Panicked>>>,
    /// The gate of a failed attempt that never got past it (its `make` panicked while the
    /// key's cancelled call was still being dropped), while `needs_driver`: the retry waits
    /// for that call too.
    retry_gate: Option<NonZeroU64>,
    /// Whether a spawned task drives the flight (its registering caller then waits as a
    /// follower). Set before the task is spawned.
    detached: bool,
    /// The slot of a detached flight's caller while it is in `followers`: it waits there but
    /// is no follower (`max_followers` does not count it). Cleared when that slot is removed
    /// (`remove_slot`), before its key can be given to a follower.
    caller_slot: Option<usize>,
    /// How many followers (not counting a detached flight's caller) the output was handed to
    /// so far: counted batch by batch as it is published, read by that caller for
    /// `is_shared`.
    published_to: usize,
    /// The flight's span: for its followers' events and retries; taken when the flight ends.
    #[cfg(feature = "tracing")]
    span: FlightSpan,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Joinable.
    Running,
    /// Output published; entry removed from the registry, or lingering.
    Done,
    /// Last waiter gone; the entry may still be in the registry until its remover runs, and a
    /// caller that finds it replaces it.
    Cancelled,
}

enum Slot<T> {
    Parked(Option<Waker>),
    Ready(Result<T, Panicked>),
}

/// How a flight ended, for the counters.
#[derive(Clone, Copy)]
enum End {
    Ok,
    Err,
    Panicked,
    Cancelled,
}

/// Bumps a `metrics` counter; never called under a lock (the recorder is user code). A
/// recorder that panics loses that count, not the request: it may run between steps of a
/// flight that must all happen, and the panic hook has reported it already.
#[inline]
fn emit(_name: &'static str) {
    #[cfg(feature = "metrics")]
    contained(|| metrics::counter!(_name).increment(1));
}

/// Runs observability code (a `tracing` subscriber, a `metrics` recorder: user code) so that
/// its panic cannot stop a flight halfway, the output's default in its place; the panic hook
/// has reported the panic already.
#[cfg(any(feature = "tracing", feature = "metrics"))]
fn contained<R: Default>(f: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        drop_panic(panic);
        R::default()
    })
}

impl End {
    #[allow(dead_code)]
    fn name(self) -> &'static str {
        match self {
            End::Ok => "ok",
            End::Err => "error",
            End::Panicked => "panicked",
            End::Cancelled => "cancelled",
        }
    }
}

impl Counters {
    fn count(&mut self, end: End) {
        match end {
            End::Ok => {}
            End::Err => self.errors += 1,
            End::Panicked => self.panics += 1,
            End::Cancelled => self.cancelled += 1,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
