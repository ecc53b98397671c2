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

/// Builds a [`Group`] with options. All are off by default.
///
/// ```
/// use std::time::Duration;
/// use tower_coalesce::{Group, GroupBuilder};
///
/// let group: Group<u64> = GroupBuilder::new()
///     .linger(Duration::from_millis(100))
///     .max_in_flight(10_000)
///     .max_followers(1_000)
///     .build();
/// # let _ = group;
/// ```
#[derive(Clone, Debug, Default)]
pub struct GroupBuilder {
    config: Config,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Config {
    pub(crate) detached: bool,
    pub(crate) linger: Option<Duration>,
    pub(crate) linger_errors: Option<Duration>,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) max_followers: Option<usize>,
    pub(crate) retries: u32,
}

impl Config {
    /// The copy of a flight's output to keep, with its expiry, if outputs that ended so linger.
    /// Made before any lock is taken (the clone is user code); a `Clone` that panics keeps
    /// nothing.
    // The check is on every flight's path, inlined; the copy is outlined.
    #[inline(always)]
    fn lingering_copy<T>(
        &self,
        end: End,
        out: &Result<T, Panicked>,
        cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
    ) -> Option<(Instant, Box<Result<T, Panicked>>)> {
        let window = match end {
            End::Ok => self.linger,
            _ => self.linger_errors,
        }?;
        keep_copy(window, out, cloner)
    }

    fn lingers(&self) -> bool {
        self.linger.is_some() || self.linger_errors.is_some()
    }
}

/// A copy of `out` to keep for `window`.
#[inline(never)]
fn keep_copy<T>(
    window: Duration,
    out: &Result<T, Panicked>,
    cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
) -> Option<(Instant, Box<Result<T, Panicked>>)> {
    let keep = match catch_unwind(AssertUnwindSafe(|| Box::new(cloner(out)))) {
        Ok(keep) => keep,
        Err(panic) => {
            drop_panic(panic);
            return None;
        }
    };
    let now = Instant::now();
    // A window past the clock's range (`Duration::MAX`, "for ever") ends in 30 years, as a
    // tokio timer that long does; a clock too near its own end for that keeps nothing.
    let until = now
        .checked_add(window)
        .or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 86_400)))?;
    Some((until, keep))
}

impl GroupBuilder {
    /// Options all off; the same as [`Group::builder`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs each flight on a spawned tokio task, so it completes even when every waiter has
    /// gone (a cache fill, work that must not be wasted, a leader with a short deadline that
    /// must not cancel followers with longer ones).
    ///
    /// A [retry](Self::retry_failed) of a detached flight runs on a spawned task too, made by
    /// the follower elected to retry, who then waits for it like the others.
    ///
    /// Without it (the default) a flight is driven by its waiters and dropped when the last
    /// one leaves. Outside a tokio runtime, flights are driven by their waiters regardless.
    /// A call run alone over a capacity bound ([`max_in_flight`](Self::max_in_flight),
    /// [`max_followers`](Self::max_followers)) is no flight: it is its caller's own, driven
    /// by it and dropped with it.
    pub fn detached(mut self, detached: bool) -> Self {
        self.config.detached = detached;
        self
    }

    /// Keeps a flight's successful output for `window` after it finishes: callers in that
    /// window get a clone at once, with no new call (a micro-cache). Off by default: without
    /// it, a caller that comes after the output was published always starts a new flight.
    ///
    /// Memory stays bounded: expired outputs are dropped as the registry's shards are next
    /// used, oldest first, never by a sweep over the whole map (and at once by
    /// [`Group::purge_expired`]). The output need not be `Sync`: a caller takes it out, clones
    /// it with no lock held and puts it back; a caller that comes meanwhile waits (as a
    /// future, woken when it is back) rather than cloning it at the same time.
    ///
    /// The output is served while less than `window` has passed since the flight finished;
    /// at `window` it is gone. A window too long for the clock, such as `Duration::MAX`, lasts
    /// 30 years: for ever, in practice, until [`Group::forget`] drops it.
    pub fn linger(mut self, window: Duration) -> Self {
        self.config.linger = Some(window);
        self
    }

    /// Keeps failed outputs too (panics, and `Err` from [`Group::run_result`] and the tower
    /// layer) for `window`, usually shorter than [`linger`](Self::linger)'s.
    pub fn linger_errors(mut self, window: Duration) -> Self {
        self.config.linger_errors = Some(window);
        self
    }

    /// At most `max` keys in flight at once. A caller that would start one more flight runs
    /// its call alone instead, unregistered: it never waits and never fails for it.
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.config.max_in_flight = Some(max);
        self
    }

    /// At most `max` followers per flight. The ones after that run their call alone.
    pub fn max_followers(mut self, max: usize) -> Self {
        self.config.max_followers = Some(max);
        self
    }

    /// When a flight fails (an error from [`Group::run_result`] or the tower layer, or a
    /// panic), its followers retry it as one new flight, up to `retries` times per flight: one
    /// of them runs its own call and the others wait for it, as before. The caller whose call
    /// failed gets its error (in a detached flight its caller is a follower, so it gets the
    /// retry's output). A follower that took a call over from a caller that left did not make
    /// it: if the call fails, it runs the retry with its own call, or waits for the others'.
    /// Only followers that can make the call take part (those of [`Group::run_retryable`] and
    /// of the tower layer); with none, everybody gets the error.
    pub fn retry_failed(mut self, retries: u32) -> Self {
        self.config.retries = retries;
        self
    }

    /// The capacity bounds of the HTTP and gRPC layers, which keep them as options.
    #[cfg(feature = "http")]
    pub(crate) fn bounds(mut self, in_flight: Option<usize>, followers: Option<usize>) -> Self {
        self.config.max_in_flight = in_flight;
        self.config.max_followers = followers;
        self
    }

    /// Creates the registry.
    pub fn build<K: Hash + Eq + Send + 'static>(self) -> Group<K> {
        Group::with_config(self.config)
    }
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
    /// How many followers the output was handed to; written when it is published.
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

impl<K> Group<K>
where
    K: Hash + Eq + Send + 'static,
{
    /// Creates an empty registry with no options, sharded for this machine's parallelism.
    pub fn new() -> Self {
        Self::with_config(Config::default())
    }

    /// Options: detached flights, a linger window, capacity bounds. Called as
    /// `Group::<K>::builder()`: `K` here is not inferred from what [`build`](GroupBuilder::build)
    /// makes, so [`GroupBuilder::new`], the same builder, reads better.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_coalesce::{Group, GroupBuilder};
    ///
    /// let group: Group<u64> = Group::<u64>::builder().max_followers(1_000).build();
    /// let same: Group<u64> = GroupBuilder::new().max_followers(1_000).build();
    /// # drop((group, same));
    /// ```
    pub fn builder() -> GroupBuilder {
        GroupBuilder::default()
    }

    pub(crate) fn with_config(config: Config) -> Self {
        let parallelism = std::thread::available_parallelism().map_or(4, |n| n.get());
        // Fewer shards under loom: each lock multiplies the states the model checker explores.
        let shards = if cfg!(loom) {
            2
        } else {
            (parallelism * 4).next_power_of_two().clamp(4, 256)
        };
        let common = Arc::new(Common {
            config,
            running: AtomicUsize::new(0),
            bypassed: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            released: AtomicU64::new(0),
        });
        Group {
            registry: Arc::new(Registry {
                hasher: foldhash::fast::RandomState::default(),
                shards: (0..shards)
                    .map(|_| {
                        Arc::new(ShardCell {
                            shard: Mutex::new(Shard {
                                table: HashTable::new(),
                                counters: Counters::default(),
                                expiring_ok: VecDeque::new(),
                                expiring_err: VecDeque::new(),
                                // From 1: a `Run::gate` is never 0.
                                next_id: 1,
                                cancelling: 0,
                                gated: Vec::new(),
                            }),
                            common: Arc::clone(&common),
                        })
                    })
                    .collect(),
                common,
            }),
        }
    }

    /// Joins `key`'s flight, or registers a new one made by `make` and leads it.
    ///
    /// The registry is consulted when `run` is called, not when the future is first polled;
    /// `make` is called only by the caller that registers a flight (or runs alone past a
    /// capacity bound), after registration and outside every lock. Keep the call's work in the
    /// future, not in `make`: if the key's previous flight was just cancelled and its future is
    /// still being dropped, the new future is not polled until that is done. The returned future
    /// resolves to the flight's output, or to [`Panicked`] if `make` or the inner future
    /// panicked.
    ///
    /// Dropping the returned future leaves the flight to the other waiters; when the last one is
    /// dropped, the inner future is dropped too and the key freed (unless the group is
    /// [detached](GroupBuilder::detached)). The caller holding the inner future (the leader, or
    /// whoever took over from it) polls it for everybody, so a waiter should be polled or
    /// dropped, not kept unpolled: that would hold up the others.
    pub fn run<T, M, F>(&self, key: K, make: M) -> Run<K, T>
    where
        T: Clone + Send + 'static,
        M: FnOnce() -> F,
        F: Future<Output = T> + Send + 'static,
    {
        self.run_classified(key, make, |_| false, None)
    }

    /// [`run_result`](Self::run_result) for a caller that can run the call itself when asked:
    /// as a follower it keeps `make`, so it can retry a failed flight
    /// ([`retry_failed`](GroupBuilder::retry_failed)).
    ///
    /// ```
    /// use tower_coalesce::GroupBuilder;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let group = GroupBuilder::new().retry_failed(1).build::<&str>();
    /// let leader = group.run_retryable("k", || async { Err::<u32, &str>("flaky") });
    /// let follower = group.run_retryable("k", || async { Ok::<u32, &str>(7) });
    /// let (leader, follower) = tokio::join!(leader, follower);
    /// assert_eq!(leader.unwrap(), Err("flaky")); // its own call failed...
    /// assert_eq!(follower.unwrap(), Ok(7)); // ...the follower retried.
    /// # }
    /// ```
    pub fn run_retryable<V, E, M, F>(&self, key: K, make: M) -> Run<K, Result<V, E>>
    where
        V: Clone + Send + 'static,
        E: Clone + Send + 'static,
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = Result<V, E>> + Send + 'static,
    {
        self.run_classified(key, make, Result::is_err, Some(boxer))
    }

    /// [`run`](Self::run) for fallible calls: `Err` outputs count as errors in
    /// [`stats`](Self::stats) and linger only for [`linger_errors`](GroupBuilder::linger_errors).
    /// A call's output is judged by the caller whose `make` made it (callers of `run` and
    /// `run_result` may share a flight when key and output type are equal).
    pub fn run_result<V, E, M, F>(&self, key: K, make: M) -> Run<K, Result<V, E>>
    where
        V: Clone + Send + 'static,
        E: Clone + Send + 'static,
        M: FnOnce() -> F,
        F: Future<Output = Result<V, E>> + Send + 'static,
    {
        self.run_classified(key, make, Result::is_err, None)
    }

    pub(crate) fn retries(&self) -> u32 {
        self.registry.config.retries
    }

    pub(crate) fn run_classified<T, M, F>(
        &self,
        key: K,
        make: M,
        is_err: fn(&T) -> bool,
        keep: Option<Boxer<M, T>>,
    ) -> Run<K, T>
    where
        T: Clone + Send + 'static,
        M: FnOnce() -> F,
        F: Future<Output = T> + Send + 'static,
    {
        let registry = &self.registry;
        let config = &registry.config;
        let hash = registry.hasher.hash_one(&key);
        let output = TypeId::of::<Flight<T>>();
        let now = config.lingers().then(Instant::now);
        let detach = match config.detached {
            true => tokio::runtime::Handle::try_current().ok(),
            false => None,
        };
        let mut garbage = Vec::new();
        let cell = registry.shard(hash);
        let mut guard = cell.lock();
        let shard = &mut *guard;
        if let Some(now) = now {
            shard.purge(now, &mut garbage);
        }
        let mut gate = None;
        let found = shard.table.find_entry(hash, |e| {
            !e.forgotten && !e.cancelling && e.output == output && e.key == key
        });
        if let Ok(mut found) = found {
            let entry = found.get_mut();
            let existing = entry.flight.as_ref().map(|f| {
                Arc::clone(f)
                    .downcast::<Flight<T>>()
                    .unwrap_or_else(|_| unreachable!("entry output type checked above"))
            });
            if entry.lingering {
                let flight = existing.expect("a lingering entry holds its output's flight");
                shard.counters.lingered += 1;
                drop(guard);
                drop(garbage);
                emit("tower_coalesce_lingered_total");
                let mut state = flight.state.lock();
                if state.lingering.is_none() {
                    // Another caller is copying it right now: wait for it to be put back.
                    let slot = state.lingerers.insert(None);
                    drop(state);
                    return Run::hit(cell, Role::Lingering(slot_key(slot)), Some(flight));
                }
                let out = copy_lingering(&flight, state);
                return Run::hit(cell, Role::Ready(Box::new(out)), None);
            }
            let flight = match existing {
                Some(flight) => flight,
                None => {
                    // The first follower: the flight gets its shared state now.
                    let flight = Arc::new(Flight::new(entry, config.retries));
                    entry.flight = Some(Arc::clone(&flight) as Arc<dyn Any + Send + Sync>);
                    flight
                }
            };
            let mut state = flight.state.lock();
            if state.phase == Phase::Running {
                // A detached flight's caller waits in a slot too, but is no follower.
                let followers = state.followers.len() - usize::from(state.caller_slot.is_some());
                if config.max_followers.is_some_and(|max| followers >= max) {
                    drop(state);
                    shard.counters.over_capacity += 1;
                    drop(guard);
                    emit("tower_coalesce_over_capacity_total");
                    return self.alone(hash, make, is_err);
                }
                let slot = state.followers.insert(Slot::Parked(None));
                state.makers += usize::from(keep.is_some());
                // Only if a `trace` event may be recorded at all (a global atomic, no subscriber
                // code): no reference-count traffic on a follower's path otherwise.
                #[cfg(feature = "tracing")]
                let span = (tracing::level_filters::LevelFilter::current()
                    >= tracing::Level::TRACE)
                    .then(|| state.span.clone());
                drop(state);
                shard.counters.followers += 1;
                drop(guard);
                emit("tower_coalesce_followers_total");
                #[cfg(feature = "tracing")]
                if let Some(span) = span {
                    contained(|| match span.get() {
                        Some(span) => tracing::trace!(parent: span, "follower joined"),
                        None => tracing::trace!(key_hash = hash, "follower joined"),
                    });
                }
                // Boxing is user-visible work only for callers that asked to keep `make`.
                let role = Role::Follower(slot_key(slot), keep.map(|keep| keep(make, is_err)));
                let mut run = Run::new(cell, Some(flight), true, role);
                run.shared = true;
                run.maker = keep.is_some();
                return run;
            }
            drop(state);
            // Cancelled, its future not dropped yet: the new flight waits for that.
            let entry = found.into_mut();
            entry.cancelling = true;
            shard.cancelling += 1;
            gate = NonZeroU64::new(entry.id);
        } else if shard.cancelling > 0 {
            gate = shard
                .table
                .find(hash, |e| {
                    e.cancelling && !e.forgotten && e.output == output && e.key == key
                })
                .and_then(|e| NonZeroU64::new(e.id));
        }
        if let Some(max) = config.max_in_flight {
            if registry.running.fetch_add(1, Relaxed) >= max {
                registry.running.fetch_sub(1, Relaxed);
                shard.counters.over_capacity += 1;
                drop(guard);
                emit("tower_coalesce_over_capacity_total");
                return self.alone(hash, make, is_err);
            }
        }
        let id = shard.next_id;
        shard.next_id += 1;
        let mut entry = Entry {
            key,
            hash,
            id,
            output,
            flight: None,
            lingering: false,
            forgotten: false,
            cancelling: false,
            #[cfg(feature = "tracing")]
            span: FlightSpan::pending(),
        };
        // Detached: the flight's state is needed up front, for the caller waits as a follower.
        let detached = detach.as_ref().map(|_| {
            let flight = Arc::new(Flight::<T>::new(&entry, config.retries));
            let mut state = flight.state.lock();
            state.detached = true;
            let slot = state.followers.insert(Slot::Parked(None));
            state.caller_slot = Some(slot);
            drop(state);
            entry.flight = Some(Arc::clone(&flight) as Arc<dyn Any + Send + Sync>);
            (flight, slot)
        });
        #[cfg(feature = "tracing")]
        let span = entry.span.clone();
        shard.table.insert_unique(hash, entry, |e| e.hash);
        shard.counters.leaders += 1;
        shard.counters.running += 1;
        drop(guard);
        emit("tower_coalesce_leaders_total");
        #[cfg(feature = "tracing")]
        span.make(hash);
        let run = 'lead: {
            // `make` is user code: called unlocked, its panic ends the flight at once. The
            // `Run` is built once, with its role, after it.
            let meta = Meta {
                #[cfg(feature = "tracing")]
                span,
                ..Meta::new(hash, id, is_err, gate)
            };
            let leader = |role| Run::new(cell, None, true, role).leading();
            let fut = match start(make, meta) {
                Ok(fut) => fut,
                Err((meta, panicked)) => {
                    if let Some((flight, slot)) = &detached {
                        // No task will drive it: the caller is its driver, not a follower
                        // waiting in a slot (nor counted as one, for `is_shared`).
                        let mut state = flight.state.lock();
                        state.remove_slot(*slot);
                        state.detached = false;
                    }
                    break 'lead leader(Role::Finished).failed(meta, panicked);
                }
            };
            let (Some(handle), Some((flight, slot))) = (detach, detached) else {
                break 'lead leader(Role::Driver(fut));
            };
            // Detached: a task drives the flight; the caller waits as a follower of its own call.
            let mut run = leader(Role::Follower(slot_key(slot), None));
            spawn_driver(&handle, cell, &flight, fut);
            run.flight = Some(flight);
            run
        };
        // Expired entries (keys, outputs: user code) go once this flight has its waiter, whose
        // `Drop` ends the flight if a destructor panics here.
        drop(garbage);
        run
    }

    /// Runs a call unregistered, because a capacity bound was reached.
    fn alone<T, M, F>(&self, hash: u64, make: M, is_err: fn(&T) -> bool) -> Run<K, T>
    where
        T: Clone + Send + 'static,
        M: FnOnce() -> F,
        F: Future<Output = T> + Send + 'static,
    {
        let run = |role| Run::new(self.registry.shard(hash), None, false, role).leading();
        match start(make, Meta::new(hash, 0, is_err, None)) {
            Ok(fut) => run(Role::Driver(fut)),
            Err((meta, panicked)) => run(Role::Finished).failed(meta, panicked),
        }
    }

    /// Removes `key`'s flight (of every output type) from the registry, so that the next call
    /// for it starts a new flight, while the current waiters still get their output (Go's
    /// `Forget`). Also drops a lingering output. Returns whether there was anything to remove.
    ///
    /// A forgotten flight's call runs on for its waiters, but it is out of the registry: it is
    /// not counted by [`in_flight`](Self::in_flight) and holds no place under
    /// [`max_in_flight`](GroupBuilder::max_in_flight), and its output does not linger.
    ///
    /// ```
    /// use tower_coalesce::Group;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let group: Group<&str> = Group::new();
    /// let old = group.run("config", || async { "old" });
    /// assert!(group.forget("config"));
    /// let new = group.run("config", || async { "new" });
    /// assert_eq!((old.await.unwrap(), new.await.unwrap()), ("old", "new"));
    /// # }
    /// ```
    pub fn forget<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let registry = &self.registry;
        let hash = registry.hasher.hash_one(key);
        let mut removed = Vec::new();
        let mut guard = registry.shard(hash).lock();
        let shard = &mut *guard;
        let mut forgotten = 0;
        // A running flight's entry stays, marked, until its driver finishes: its waiters find
        // their flight through it. A lingering output goes at once.
        while let Ok(found) = shard
            .table
            .find_entry(hash, |e| !e.forgotten && e.key.borrow() == key)
        {
            forgotten += 1;
            if found.get().lingering {
                removed.push(found.remove().0);
                continue;
            }
            found.into_mut().forgotten = true;
            registry.common.release(&mut shard.counters);
        }
        shard.counters.forgotten += forgotten;
        drop(guard);
        drop(removed);
        forgotten > 0
    }
}

impl<K> Group<K> {
    /// The number of keys with a flight running (lingering outputs are not counted).
    pub fn in_flight(&self) -> usize {
        self.registry
            .shards
            .iter()
            .map(|s| s.lock().counters.running)
            .sum()
    }

    /// The number of entries in the registry: running flights plus lingering outputs, expired
    /// ones included until they are purged, and forgotten flights whose call still runs (no
    /// caller joins those; each is removed when its call ends). After the load stops, 0.
    pub fn len(&self) -> usize {
        self.registry
            .shards
            .iter()
            .map(|s| s.lock().table.len())
            .sum()
    }

    /// Whether the registry holds no entry at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every expired lingering output now.
    pub fn purge_expired(&self) {
        let now = Instant::now();
        for shard in self.registry.shards.iter() {
            let mut garbage = Vec::new();
            shard.lock().purge(now, &mut garbage);
            drop(garbage);
        }
    }

    /// A snapshot of the registry's counters.
    ///
    /// ```
    /// use tower_coalesce::Group;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let group: Group<u8> = Group::new();
    /// let (a, b) = tokio::join!(group.run(1, || async { 10 }), group.run(1, || async { 20 }));
    /// assert_eq!((a.unwrap(), b.unwrap()), (10, 10));
    /// let stats = group.stats();
    /// assert_eq!((stats.leaders, stats.followers, stats.in_flight), (1, 1, 0));
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        let mut sum = Counters::default();
        for shard in self.registry.shards.iter() {
            sum.add(&shard.lock().counters);
        }
        let r = &self.registry;
        sum.into_stats(
            [&r.bypassed, &r.timed_out, &r.retried, &r.released].map(|c| c.load(Relaxed)),
        )
    }

    pub(crate) fn note_bypass(&self) {
        self.registry.bypassed.fetch_add(1, Relaxed);
        emit("tower_coalesce_bypassed_total");
    }
}

impl<K> Shard<K> {
    /// Moves expired lingering entries into `garbage`, to be dropped once the lock is released.
    fn purge(&mut self, now: Instant, garbage: &mut Vec<Entry<K>>) {
        for queue in [&mut self.expiring_ok, &mut self.expiring_err] {
            while queue.front().is_some_and(|e| e.at <= now) {
                let Some(expiry) = queue.pop_front() else {
                    break;
                };
                let found = self.table.find_entry(expiry.hash, |e| e.id == expiry.id);
                if let Ok(found) = found {
                    garbage.push(found.remove().0);
                }
            }
        }
    }

    /// Removes the entry (`hash`, `id`), if it is still there, and gives up its place.
    fn unlink(&mut self, hash: u64, id: u64, common: &Common) -> Option<Entry<K>> {
        let (entry, _) = self.table.find_entry(hash, |e| e.id == id).ok()?.remove();
        self.unlinked(&entry, common);
        Some(entry)
    }

    /// Gives up the place of an entry just removed from the table.
    fn unlinked(&mut self, entry: &Entry<K>, common: &Common) {
        if entry.cancelling {
            self.cancelling -= 1;
        }
        if !entry.forgotten {
            common.release(&mut self.counters);
        }
    }
}

impl Common {
    /// Gives up a running flight's place in the counts (it finished, was cancelled, or was
    /// forgotten).
    fn release(&self, counters: &mut Counters) {
        counters.running -= 1;
        if self.config.max_in_flight.is_some() {
            self.running.fetch_sub(1, Relaxed);
        }
    }
}

impl<K> Registry<K> {
    fn shard(&self, hash: u64) -> &Arc<ShardCell<K>> {
        // The table uses the low bits for buckets and the top 7 for tags; the shard comes from
        // a remix of the whole hash (a Fibonacci multiply), so that runs of similar keys
        // spread evenly and neither table part loses entropy within a shard.
        let mixed = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(mixed >> 40) as usize & (self.shards.len() - 1)]
    }
}

impl<K> ShardCell<K> {
    /// The shared state of the flight registered as (`hash`, `id`), if a follower made it.
    fn flight_of<T: Send + 'static>(&self, hash: u64, id: u64) -> Option<Arc<Flight<T>>> {
        let shard = self.lock();
        let flight = shard.table.find(hash, |e| e.id == id)?.flight.clone()?;
        drop(shard);
        flight.downcast().ok()
    }

    /// Ends the flight registered as (`hash`, `id`): unregisters it, or makes it linger with
    /// `keep` until the given instant; counts how it ended if `count` (a failure handed to
    /// followers to retry was counted then). Returns its shared state, if a follower (or this
    /// call, to hold `keep`, with `cloner`) made one, and the entry if it was removed: the
    /// caller drops that (the key's destructor is user code) once the followers are served.
    // Inlined into `complete`, the path of every flight: a call moves the removed entry
    // through memory (measured: ~20 more instructions per solo call).
    #[allow(clippy::type_complexity)]
    #[inline(always)]
    fn finish<T: Send + 'static>(
        &self,
        (hash, id): (u64, u64),
        (end, count): (End, bool),
        linger: Option<(Instant, Box<Result<T, Panicked>>)>,
        cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
    ) -> (Option<Arc<Flight<T>>>, Option<Entry<K>>) {
        let mut guard = self.lock();
        let shard = &mut *guard;
        if count {
            shard.counters.count(end);
        }
        let Ok(mut found) = shard.table.find_entry(hash, |e| e.id == id) else {
            return (None, None);
        };
        let entry = found.get_mut();
        let downcast = |f: Arc<dyn Any + Send + Sync>| f.downcast::<Flight<T>>().ok();
        // A lingering entry gives its span up (dropped unlocked, below): it closes as the
        // flight ends, not when the output expires.
        #[cfg(feature = "tracing")]
        let mut _span = FlightSpan::default();
        let (removed, flight) = match linger {
            Some((until, keep)) if !entry.forgotten => {
                // The entry keeps its flight, to hold the output. (Made with the span, which
                // `publish` records the outcome on and takes.)
                let holder = match entry.flight.clone().and_then(downcast) {
                    Some(flight) => flight,
                    None => {
                        let holder = Arc::new(Flight::with_cloner(entry, 0, cloner));
                        holder.state.lock().phase = Phase::Done;
                        entry.flight = Some(Arc::clone(&holder) as Arc<dyn Any + Send + Sync>);
                        holder
                    }
                };
                #[cfg(feature = "tracing")]
                {
                    _span = mem::take(&mut entry.span);
                }
                // Moved in, not cloned: no user code under the locks.
                holder.state.lock().lingering = Some(keep);
                entry.lingering = true;
                let queue = match end {
                    End::Ok => &mut shard.expiring_ok,
                    _ => &mut shard.expiring_err,
                };
                queue.push_back(Expiry {
                    at: until,
                    hash,
                    id,
                });
                self.common.release(&mut shard.counters);
                (None, Some(holder))
            }
            _ => {
                let (mut entry, _) = found.remove();
                shard.unlinked(&entry, &self.common);
                // Moved out, not cloned: no reference count traffic on the flight's line.
                let flight = entry.flight.take().and_then(downcast);
                (Some(entry), flight)
            }
        };
        drop(guard);
        (flight, removed)
    }

    /// Marks the entry (`hash`, `id`) as cancelling: from here on nobody joins it, and a new
    /// flight of its key waits until [`cancelled`](Self::cancelled) removes it.
    fn cancelling(&self, shard: &mut Shard<K>, hash: u64, id: u64) {
        if let Some(entry) = shard.table.find_mut(hash, |e| e.id == id) {
            if !entry.cancelling {
                entry.cancelling = true;
                shard.cancelling += 1;
            }
        }
    }

    /// Removes a cancelled flight's entry, once its future is dropped, and lets the flights
    /// waiting for that start.
    fn cancelled(&self, hash: u64, id: u64) {
        let mut guard = self.lock();
        let shard = &mut *guard;
        shard.counters.count(End::Cancelled);
        let Some(entry) = shard.unlink(hash, id, &self.common) else {
            return;
        };
        let mut gate = Vec::new();
        let mut i = 0;
        while i < shard.gated.len() {
            if shard.gated[i].0 == id {
                gate.push(Some(shard.gated.swap_remove(i).1));
            } else {
                i += 1;
            }
        }
        drop(guard);
        let woken = wake_all(&mut gate);
        // User code (the key's destructor): after the flights waiting for it are woken.
        drop(entry);
        if let Err(panic) = woken {
            resume_unwind(panic);
        }
    }
}

impl<T: Clone> Flight<T> {
    fn new<K>(entry: &Entry<K>, retries: u32) -> Self {
        Flight::with_cloner(entry, retries, Clone::clone)
    }
}

impl<T> Flight<T> {
    fn with_cloner<K>(
        entry: &Entry<K>,
        retries: u32,
        cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
    ) -> Self {
        Flight {
            hash: entry.hash,
            id: entry.id,
            cloner,
            state: Mutex::new(State {
                phase: Phase::Running,
                driven: true,
                orphan: None,
                followers: Slab::new(),
                lingering: None,
                lingerers: Slab::new(),
                retries_left: retries,
                needs_driver: false,
                makers: 0,
                failure: None,
                retry_gate: None,
                detached: false,
                caller_slot: None,
                published_to: 0,
                #[cfg(feature = "tracing")]
                span: entry.span.clone(),
            }),
        }
    }
}

impl<K> Clone for Group<K> {
    fn clone(&self) -> Self {
        Group {
            registry: Arc::clone(&self.registry),
        }
    }
}

impl<K: Hash + Eq + Send + 'static> Default for Group<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K> fmt::Debug for Group<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("shards", &self.registry.shards.len())
            .field("config", &self.registry.config)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// A waiter of a flight: the future returned by [`Group::run`].
///
/// Resolves to the flight's output, or to [`Panicked`]. See [`Group::run`] for what dropping
/// it does.
#[must_use = "futures do nothing unless polled; dropping this leaves the flight"]
pub struct Run<K, T: Send + 'static> {
    /// The shard of the flight's entry (any shard for a call run alone), with the registry's
    /// common part.
    registry: Arc<ShardCell<K>>,
    /// The flight's shared state: a follower's from the start; a driver's once it looks it up
    /// (when it finishes, retries, or leaves).
    flight: Option<Arc<Flight<T>>>,
    /// False for a call run alone past a capacity bound (it has no entry), or a lingering hit.
    registered: bool,
    role: Role<T>,
    /// Whether this caller's `make` made the flight's future.
    leader: bool,
    /// Whether the output was (or will be) handed to more than one caller.
    shared: bool,
    /// Whether this follower is counted in `State::makers`.
    maker: bool,
    /// Whether this follower's own call is the attempt a spawned task runs (a detached
    /// flight's retry): it waits for its own call, so no follower's wait limit applies.
    retrying: bool,
}

// No field is structurally pinned: the inner future is boxed, outputs are moved out whole.
impl<K, T: Send + 'static> Unpin for Run<K, T> {}

enum Role<T> {
    /// Holds the inner future and polls it for every waiter.
    Driver(BoxFuture<T>),
    /// Parked in `followers` under this slot key, with its own way to make the call if it
    /// kept one (to retry, or to call alone after its wait limit).
    Follower(u32, Option<Make<T>>),
    /// Output known when the run was made (lingering, or `make` panicked); boxed so that
    /// every waiter's size does not grow with the output's for this rare case.
    Ready(Box<Result<T, Panicked>>),
    /// Parked in a lingering output's `lingerers` under this slot key, until the caller that
    /// has the output out (to clone it) puts it back.
    Lingering(u32),
    /// Returned its output, or is being constructed.
    Finished,
}

impl<K, T: Send + 'static> Run<K, T> {
    /// A caller that found a lingering output: served at once (`Ready`), or waiting for it
    /// (`Lingering`, with the output's `flight`).
    fn hit(registry: &Arc<ShardCell<K>>, role: Role<T>, flight: Option<Arc<Flight<T>>>) -> Self {
        let mut run = Run::new(registry, flight, false, role);
        run.shared = true;
        run
    }

    /// A waiter in `role`, of a flight registered in `registry`'s shard if `registered`; not
    /// its leader, nor shared, nor keeping a `make` (until the caller says so).
    fn new(
        registry: &Arc<ShardCell<K>>,
        flight: Option<Arc<Flight<T>>>,
        registered: bool,
        role: Role<T>,
    ) -> Self {
        Run {
            registry: Arc::clone(registry),
            flight,
            registered,
            role,
            leader: false,
            shared: false,
            maker: false,
            retrying: false,
        }
    }

    /// This waiter, as the caller whose `make` made the flight's future.
    fn leading(mut self) -> Self {
        self.leader = true;
        self
    }

    pub(crate) fn note_timeout(&self) {
        self.registry.timed_out.fetch_add(1, Relaxed);
        emit("tower_coalesce_timed_out_total");
    }

    /// A follower of the HTTP or gRPC layer, sent to make its own call.
    #[cfg_attr(not(any(feature = "http", feature = "grpc")), allow(dead_code))]
    pub(crate) fn note_released(&self) {
        self.registry.released.fetch_add(1, Relaxed);
        emit("tower_coalesce_released_total");
    }

    /// Whether this waiter polls the inner future for everybody (it led, took over from a
    /// leader that left, or runs a retry), or waits for its own call run by a spawned task (a
    /// detached flight's retry): it must not be cut short by a follower's limit.
    pub(crate) fn is_driving(&self) -> bool {
        matches!(self.role, Role::Driver(_)) || self.retrying
    }

    /// Whether this waiter waits for a call that another caller drives: a follower (not a
    /// leader, nor a lingering hit, whose wait is only for another hit's copy to be made).
    pub(crate) fn is_following(&self) -> bool {
        !self.leader && matches!(self.role, Role::Follower(..))
    }

    /// Takes this follower's own `make`, to call alone (after its wait limit).
    pub(crate) fn take_make(&mut self) -> Option<Make<T>> {
        match &mut self.role {
            Role::Follower(_, make) => make.take(),
            _ => None,
        }
    }

    /// Whether this caller started the flight: its `make` made the future whose output every
    /// waiter gets. A follower's output is a clone of a leader's.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Whether this call runs alone, unregistered, because a capacity bound
    /// ([`max_in_flight`](GroupBuilder::max_in_flight),
    /// [`max_followers`](GroupBuilder::max_followers)) was reached: nobody can join it. It is
    /// also its own [leader](Self::is_leader).
    pub fn is_alone(&self) -> bool {
        self.leader && !self.registered
    }

    /// Whether the output was handed to more than one caller (Go's `shared`): always for a
    /// follower or a lingering hit; for the leader, once the output is ready, whether anybody
    /// else got it.
    ///
    /// ```
    /// use tower_coalesce::Group;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let group: Group<u8> = Group::new();
    /// let mut alone = group.run(1, || async { 1 });
    /// assert_eq!((&mut alone).await.unwrap(), 1);
    /// assert!(!alone.is_shared());
    /// # }
    /// ```
    pub fn is_shared(&self) -> bool {
        self.shared
    }
}

/// Drives a detached flight's call (`fut`) on a task of its own: it completes even if every
/// waiter leaves.
fn spawn_driver<K, T>(
    handle: &tokio::runtime::Handle,
    registry: &Arc<ShardCell<K>>,
    flight: &Arc<Flight<T>>,
    fut: BoxFuture<T>,
) where
    K: Send + 'static,
    T: Clone + Send + 'static,
{
    let driver = Run::new(registry, Some(Arc::clone(flight)), true, Role::Driver(fut));
    handle.spawn(async move {
        let _ = driver.await;
    });
}

/// Calls a leader's `make` (user code: outside every lock) and boxes its future; a panic is
/// caught, to end the flight at once.
#[allow(clippy::type_complexity)]
fn start<T, M, F>(make: M, meta: Meta<T>) -> Result<BoxFuture<T>, (Meta<T>, Panicked)>
where
    M: FnOnce() -> F,
    F: Future<Output = T> + Send + 'static,
    T: 'static,
{
    match catch_unwind(AssertUnwindSafe(make)) {
        Ok(fut) => Ok(driven(meta, fut)),
        Err(payload) => Err((meta, Panicked::new(payload))),
    }
}

impl<K, T: Clone + Send + 'static> Run<K, T> {
    /// A leader whose `make` panicked: its flight ends with that panic, for every waiter.
    fn failed(mut self, meta: Meta<T>, panicked: Panicked) -> Self {
        let out = self.complete(meta, Err(panicked));
        self.role = Role::Ready(Box::new(out));
        self
    }

    /// Publishes the driver's output: unregisters the flight first (or makes it linger), so
    /// that a caller who comes after this point starts a new flight instead of joining a
    /// finished one; then hands a clone to each follower and wakes them, a batch at a time.
    ///
    /// A failed output with retries left and a follower able to retry is not published: the
    /// flight stays registered and its followers are woken to elect the next driver.
    fn complete(&mut self, meta: Meta<T>, out: Result<T, Panicked>) -> Result<T, Panicked> {
        let (hash, id) = (meta.hash, meta.id);
        let end = match &out {
            Err(_) => End::Panicked,
            Ok(v) if (meta.is_err)(v) => End::Err,
            Ok(_) => End::Ok,
        };
        if !self.registered {
            // A call run alone (over a capacity bound) is no flight: no span, no flight count,
            // as `Stats` leaves it out.
            return out;
        }
        // A copy made for a retry that did not happen. Its destructor is user code: dropped
        // when this returns, after the flight has ended for everybody.
        let mut _spare = None;
        // A call taken over (`adopted`) is retried by `rejoin` or by nobody: had it declined
        // and a follower able to retry joined since, retrying here would hand this waiter,
        // which did not make the call, its failure while the others get the retry's output.
        if !matches!(end, End::Ok) && self.registry.config.retries > 0 && !meta.adopted {
            if self.flight.is_none() {
                self.flight = self.registry.flight_of(hash, id);
            }
            if let Some(flight) = self.flight.clone() {
                match self.retry(&flight, &out, meta.gate, end) {
                    // This driver's error goes to nobody else: the followers retry.
                    Ok(()) => return out,
                    Err(unused) => _spare = unused,
                }
            }
        }
        let config = &self.registry.config;
        let linger = config.lingering_copy(end, &out, Clone::clone);
        let (flight, removed) = self
            .registry
            .finish((hash, id), (end, true), linger, Clone::clone);
        let Some(flight) = flight.or_else(|| self.flight.clone()) else {
            // Nobody ever joined: no shared state to publish to.
            trace_end(meta.span(), end, 1);
            drop(removed);
            return out;
        };
        let published = publish(&flight, &out, end, Clone::clone);
        // The key's destructor is user code: run unlocked, and after the followers have their
        // copies, so that a panic in it is this driver's alone.
        drop(removed);
        match published {
            Ok(shared) => self.shared |= shared,
            Err(panic) => resume_unwind(panic),
        }
        out
    }

    /// Hands a failed attempt (ended as `end`) to the followers to retry, if it has retries
    /// left and a follower that can: counts its end and wakes the followers so that they elect
    /// the next driver (this driver keeps `out` either way; a waker's panic is passed on once
    /// all are woken). If not, returns the copy it made.
    // Not inlined: its copy of a large output stays out of `complete`'s frame.
    #[inline(never)]
    fn retry(
        &mut self,
        flight: &Arc<Flight<T>>,
        out: &Result<T, Panicked>,
        gate: Option<NonZeroU64>,
        end: End,
    ) -> Result<(), Option<Kept<T>>> {
        // Cloned before locking: the clone is user code.
        let spare = Some(Box::new(clone_one(flight.cloner, out)));
        let mut state = flight.state.lock();
        if state.retries_left == 0 || state.makers == 0 || state.phase != Phase::Running {
            drop(state);
            return Err(spare);
        }
        state.retries_left -= 1;
        state.needs_driver = true;
        state.driven = false;
        state.failure = spare;
        state.retry_gate = gate;
        let mut wakers: Vec<_> = state
            .followers
            .iter_mut()
            .filter_map(|(_, slot)| match slot {
                Slot::Parked(waker) => waker.take().map(Some),
                Slot::Ready(_) => None,
            })
            .collect();
        drop(state);
        self.registry.lock().counters.count(end);
        if let Err(panic) = wake_all(&mut wakers) {
            resume_unwind(panic);
        }
        Ok(())
    }
}

/// Followers served per lock section when an output is published. The lock is let go between
/// batches, so followers woken early take their copies while the rest are made. (One under
/// loom, so that its models see a publish span batches.)
const BATCH: usize = if cfg!(loom) { 1 } else { 32 };

/// The most bytes a batch's copies may take on the stack. A batch of small outputs lives
/// there, so publishing allocates nothing however many wait; a batch of larger ones goes on
/// the heap (one allocation per publish), so that a big `T` returned by value cannot overflow
/// the publishing task's stack.
const STACK_COPIES: usize = 4096;

/// Ends `flight` (already unregistered, or lingering): fills every follower's slot with a
/// clone of `out` and wakes them, a batch at a time. Returns whether a follower got it, or
/// the first panic of a follower's waker, to pass on once the caller is done (every follower
/// is served and woken regardless).
///
/// `cloner` makes each copy: `Clone::clone` where `T: Clone` is known (inlined), the flight's
/// stored `cloner` from a follower's `Drop`.
fn publish<T>(
    flight: &Arc<Flight<T>>,
    out: &Result<T, Panicked>,
    end: End,
    cloner: impl Fn(&Result<T, Panicked>) -> Result<T, Panicked>,
) -> Result<bool, Panic> {
    // No follower can join from here on (the entry is gone or lingers), and `driven` keeps
    // the ones that leave from cancelling the flight, so counting now and filling later is
    // sound; a slot that empties meanwhile is just skipped.
    let mut state = flight.state.lock();
    let span = take_span(&mut state);
    let wanted = state.followers.len();
    let failure = state.failure.take();
    // A detached flight's driver is a task, not a waiter.
    let waiters = wanted + usize::from(!state.detached);
    if wanted == 0 {
        state.published();
        drop(state);
        drop(failure);
        trace_end(&span, end, waiters);
        return Ok(false);
    }
    state.published_to = wanted;
    // Keys are stable and none is added from here on: one pass over them serves everybody.
    let keys = state
        .followers
        .iter()
        .next_back()
        .map_or(0, |(key, _)| key + 1);
    drop(state);
    drop(failure);
    let mut copier = Copier {
        cloner,
        out,
        panicked: None,
    };
    // Decided by the type alone: only one branch runs, and an optimised build compiles only it.
    let woken = if mem::size_of::<Option<Result<T, Panicked>>>() * BATCH <= STACK_COPIES {
        serve_on_stack(flight, &mut copier, wanted, keys)
    } else {
        serve_on_heap(flight, &mut copier, wanted, keys)
    };
    trace_end(&span, end, waiters);
    woken
}

/// `serve` with the batch's copies on the stack. Not inlined, so that the array is in no
/// frame of a publish that did not need it (debug builds keep dead branches' locals).
#[inline(never)]
fn serve_on_stack<T, C>(
    flight: &Flight<T>,
    copier: &mut Copier<'_, T, C>,
    wanted: usize,
    keys: usize,
) -> Result<bool, Panic>
where
    C: Fn(&Result<T, Panicked>) -> Result<T, Panicked>,
{
    let mut copies: [Option<Result<T, Panicked>>; BATCH] = std::array::from_fn(|_| None);
    serve(flight, copier, &mut copies, wanted, keys)
}

/// `serve` with the batch's copies on the heap, for outputs too large for the stack.
#[inline(never)]
#[cold]
fn serve_on_heap<T, C>(
    flight: &Flight<T>,
    copier: &mut Copier<'_, T, C>,
    wanted: usize,
    keys: usize,
) -> Result<bool, Panic>
where
    C: Fn(&Result<T, Panicked>) -> Result<T, Panicked>,
{
    let mut copies: Vec<Option<Result<T, Panicked>>> = std::iter::repeat_with(|| None)
        .take(wanted.min(BATCH))
        .collect();
    serve(flight, copier, &mut copies, wanted, keys)
}

/// Fills the `wanted` follower slots among the first `keys` with copies made `copies.len()`
/// at a time, and wakes their followers, a batch per lock section. Returns whether a follower
/// got a copy (all may have left meanwhile).
fn serve<T, C>(
    flight: &Flight<T>,
    copier: &mut Copier<'_, T, C>,
    copies: &mut [Option<Result<T, Panicked>>],
    wanted: usize,
    keys: usize,
) -> Result<bool, Panic>
where
    C: Fn(&Result<T, Panicked>) -> Result<T, Panicked>,
{
    let mut wakers: [Option<Waker>; BATCH] = std::array::from_fn(|_| None);
    let mut woken = Ok(());
    // Slots not served yet, counting those whose follower left as if they still waited.
    let mut unserved = wanted;
    let mut handed = false;
    let mut next = 0;
    loop {
        let batch = &mut copies[..unserved.min(BATCH)];
        copier.fill(batch);
        let mut state = flight.state.lock();
        let mut served = 0;
        while served < batch.len() && next < keys {
            if let Some(slot) = state.followers.get_mut(next) {
                if let Slot::Parked(waker) = slot {
                    wakers[served] = waker.take();
                    *slot = Slot::Ready(batch[served].take().expect("one copy per slot"));
                    served += 1;
                }
            }
            next += 1;
        }
        unserved -= served;
        handed |= served > 0;
        let last = unserved == 0 || next >= keys;
        if last {
            state.published();
        }
        drop(state);
        // A follower's waker that panics keeps nobody else from being served.
        keep_first(&mut woken, wake_all(&mut wakers[..served]));
        if last {
            // Copies made for followers that left while this ran: dropped unlocked.
            for copy in batch.iter_mut() {
                drop(copy.take());
            }
            return woken.map(|()| handed);
        }
    }
}

/// A panic's payload, caught to be passed on later.
type Panic = Box<dyn Any + Send>;

/// An output a flight keeps aside (lingering, or for a retry), boxed: moving it moves a pointer.
type Kept<T> = Box<Result<T, Panicked>>;

/// Wakes every waker in `wakers`. A waker is the executor's code: one that panics does not
/// keep the others from being woken. Returns the first panic, for the caller to pass on once
/// its own work is done.
fn wake_all(wakers: &mut [Option<Waker>]) -> Result<(), Panic> {
    let mut woken = Ok(());
    let mut next = 0;
    while next < wakers.len() {
        let pass = catch_unwind(AssertUnwindSafe(|| {
            while let Some(waker) = wakers.get_mut(next) {
                next += 1;
                if let Some(waker) = waker.take() {
                    waker.wake();
                }
            }
        }));
        keep_first(&mut woken, pass);
    }
    woken
}

/// Keeps the first of several panics caught one after another (to pass on later); a later
/// one's payload is dropped, contained: its destructor is user code too.
fn keep_first(first: &mut Result<(), Panic>, next: Result<(), Panic>) {
    match (next, &first) {
        (Err(panic), Ok(())) => *first = Err(panic),
        (Err(panic), Err(_)) => drop_panic(panic),
        (Ok(()), _) => {}
    }
}

/// Drops a caught panic's payload, whose destructor (user code) may panic in turn.
fn drop_panic(panic: Panic) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(panic)));
}

impl<T> State<T> {
    /// Removes the slot `key` from `followers`.
    fn remove_slot(&mut self, key: usize) -> Slot<T> {
        self.try_remove_slot(key).expect("a waiter's own slot")
    }

    fn try_remove_slot(&mut self, key: usize) -> Option<Slot<T>> {
        if self.caller_slot == Some(key) {
            self.caller_slot = None;
        }
        self.followers.try_remove(key)
    }

    /// Every follower has its copy: the flight is over, nobody drives or is to drive it.
    fn published(&mut self) {
        self.phase = Phase::Done;
        self.driven = false;
        self.needs_driver = false;
    }
}

/// Makes a published output's copies. The response's `Clone` is user code: once it panics,
/// every copy still to make is that panic instead, so every waiter still gets an answer.
struct Copier<'a, T, C> {
    cloner: C,
    out: &'a Result<T, Panicked>,
    panicked: Option<Panicked>,
}

impl<T, C: Fn(&Result<T, Panicked>) -> Result<T, Panicked>> Copier<'_, T, C> {
    fn fill(&mut self, copies: &mut [Option<Result<T, Panicked>>]) {
        if self.panicked.is_none() {
            let (cloner, out) = (&self.cloner, self.out);
            let made = catch_unwind(AssertUnwindSafe(|| {
                for copy in copies.iter_mut() {
                    *copy = Some(cloner(out));
                }
            }));
            if let Err(payload) = made {
                self.panicked = Some(Panicked::new(payload));
            }
        }
        if let Some(panicked) = &self.panicked {
            for copy in copies.iter_mut() {
                *copy = Some(Err(panicked.clone()));
            }
        }
    }
}

/// One copy of a lingering output, made with no lock held: the output is taken out of `state`
/// (which must hold it), cloned, and put back; then one caller that found it out meanwhile is
/// woken to take its turn. The output need not be `Sync`: only one caller has it at a time.
fn copy_lingering<T>(
    flight: &Flight<T>,
    mut state: MutexGuard<'_, State<T>>,
) -> Result<T, Panicked> {
    let kept = state.lingering.take().expect("checked by the caller");
    drop(state);
    let out = clone_one(flight.cloner, &*kept);
    let mut state = flight.state.lock();
    state.lingering = Some(kept);
    let waker = next_lingerer(&mut state.lingerers);
    drop(state);
    pass_turn(flight, waker, next_lingerer_of);
    out
}

/// One copy of `out`, or the panic of its `Clone`.
fn clone_one<T>(
    cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
    out: &Result<T, Panicked>,
) -> Result<T, Panicked> {
    catch_unwind(AssertUnwindSafe(|| cloner(out))).unwrap_or_else(|p| Err(Panicked::new(p)))
}

/// Takes the flight's span from its state as the flight ends (to drop unlocked).
fn take_span<T>(_state: &mut State<T>) -> SpanHold {
    #[cfg(feature = "tracing")]
    return mem::take(&mut _state.span);
}

#[cfg(feature = "tracing")]
fn trace_end(span: &FlightSpan, end: End, waiters: usize) {
    contained(|| match span.get() {
        Some(span) => {
            span.record("waiters", waiters);
            span.record("outcome", end.name());
            tracing::debug!(parent: span, outcome = end.name(), waiters, "flight finished");
        }
        None => tracing::debug!(outcome = end.name(), waiters, "flight finished"),
    });
    #[cfg(feature = "metrics")]
    contained(|| {
        metrics::counter!("tower_coalesce_flights_total", "outcome" => end.name()).increment(1)
    });
}

#[cfg(not(feature = "tracing"))]
fn trace_end(_span: &SpanHold, _end: End, _waiters: usize) {
    #[cfg(feature = "metrics")]
    contained(|| {
        metrics::counter!("tower_coalesce_flights_total", "outcome" => _end.name()).increment(1)
    });
}

impl<K: Send + 'static, T: Clone + Send + 'static> Future for Run<K, T> {
    type Output = Result<T, Panicked>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Each role is polled by a function of its own: a debug build keeps a slot for every
        // value of every arm in one frame, which for an output of tens of KiB returned by value
        // would be as many copies of it on the stack of every waiter.
        loop {
            let polled = match &this.role {
                Role::Driver(_) => return this.poll_driving(cx),
                Role::Follower(..) => this.poll_following(cx),
                Role::Lingering(key) => return this.poll_lingering(*key as usize, cx),
                Role::Ready(_) => return this.take_ready(),
                Role::Finished => panic!("Run polled after completion"),
            };
            // `None`: the follower took over the call (its leader left, or it retries it).
            if let Some(polled) = polled {
                return polled;
            }
        }
    }
}

impl<K: Send + 'static, T: Clone + Send + 'static> Run<K, T> {
    /// Polls the inner future, for everybody; publishes its output when it is ready.
    // The paths of every call: inlined where it is optimised; apart in a debug build, so
    // that its values do not take slots in the frame of every other role's poll.
    #[cfg_attr(debug_assertions, inline(never))]
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn poll_driving(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, Panicked>> {
        let Role::Driver(fut) = &mut self.role else {
            unreachable!("called for a driver")
        };
        if let Some(old) = fut.meta().gate {
            let mut shard = self.registry.lock();
            if shard
                .table
                .find(fut.meta().hash, |e| e.id == old.get())
                .is_some()
            {
                // The key's cancelled call is still being dropped. Polled again
                // meanwhile (a `select!` loop), it does not queue its waker twice.
                let waker = cx.waker();
                let queued = shard
                    .gated
                    .iter()
                    .any(|(id, w)| *id == old.get() && w.will_wake(waker));
                if !queued {
                    shard.gated.push((old.get(), waker.clone()));
                }
                return Poll::Pending;
            }
            drop(shard);
            fut.as_mut().meta_mut().gate = None;
        }
        let polled = catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx)));
        let out = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(value)) => Ok(value),
            Err(payload) => Err(Panicked::new(payload)),
        };
        let mut meta = fut.as_mut().meta_mut().take();
        // Release what the inner future holds before the followers are woken. A
        // future that panicked may panic again when dropped; that is its own.
        if let Role::Driver(fut) = mem::replace(&mut self.role, Role::Finished) {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(fut)));
        }
        if meta.adopted && self.rejoin(&mut meta, &out, cx.waker()) {
            // Woken with the other followers, to elect the next driver. `out`'s destructor is
            // user code: it runs here, once the retry is under way.
            return Poll::Pending;
        }
        Poll::Ready(self.complete(meta, out))
    }

    /// The driver of a call it took over from a driver that left, which failed: if the call
    /// may be retried, this waiter, which did not make it, does not take the failure as its
    /// own. With its own `make` it runs the retry at once, for everybody; without one it
    /// becomes a follower again and the followers (`waker` among them) are woken to elect the
    /// next driver. Returns whether it did either (`waker` is woken to poll it in its new
    /// role); if not, the failure is published to everybody as usual.
    #[inline(never)]
    fn rejoin(&mut self, meta: &mut Meta<T>, out: &Result<T, Panicked>, waker: &Waker) -> bool {
        let end = match out {
            Err(_) => End::Panicked,
            Ok(v) if (meta.is_err)(v) => End::Err,
            Ok(_) => return false,
        };
        if self.registry.config.retries == 0 || !self.registered {
            return false;
        }
        let Some(flight) = self.flight.clone() else {
            return false;
        };
        let mut state = flight.state.lock();
        let able = meta.kept.is_some() || state.makers > 0;
        if state.retries_left == 0 || !able || state.phase != Phase::Running {
            return false;
        }
        if let Some(make) = meta.kept.take() {
            // The next attempt is this waiter's own call; it keeps `driven`.
            state.retries_left -= 1;
            drop(state);
            self.registry.lock().counters.count(end);
            self.role = Role::Follower(0, Some(make));
            if let Some(Poll::Ready(out)) = self.start_retry(0, None, meta.gate) {
                // Its `make` panicked: that is its own call's failure, ended by now.
                self.role = Role::Ready(Box::new(out));
            }
            waker.wake_by_ref();
            return true;
        }
        let slot = slot_key(state.followers.insert(Slot::Parked(Some(waker.clone()))));
        drop(state);
        self.role = Role::Follower(slot, None);
        match self.retry(&flight, out, meta.gate, end) {
            Ok(()) => true,
            Err(spare) => {
                // The followers that could retry left meanwhile: nobody will, so the failure
                // goes to everybody, this waiter included (`complete` finds the same).
                let slot = flight.state.lock().try_remove_slot(slot as usize);
                self.role = Role::Finished;
                drop(slot);
                drop(spare);
                false
            }
        }
    }

    /// Takes this follower's copy if it is in, takes over the call if its driver left or a
    /// retry is due (`None`: poll again as the driver), or parks.
    // The paths of every call: inlined where it is optimised; apart in a debug build, so
    // that its values do not take slots in the frame of every other role's poll.
    #[cfg_attr(debug_assertions, inline(never))]
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn poll_following(&mut self, cx: &mut Context<'_>) -> Option<Poll<Result<T, Panicked>>> {
        let Role::Follower(key, make) = &mut self.role else {
            unreachable!("called for a follower")
        };
        let key = *key as usize;
        let flight = self.flight.as_ref().expect("a follower has its flight");
        let mut guard = flight.state.lock();
        let state = &mut *guard;
        match &mut state.followers[key] {
            Slot::Ready(_) => {
                let Slot::Ready(out) = state.remove_slot(key) else {
                    unreachable!()
                };
                state.makers -= usize::from(mem::take(&mut self.maker));
                if self.leader {
                    // A detached flight's caller: shared if anybody else got it.
                    self.shared = state.published_to > 1;
                }
                drop(guard);
                self.role = Role::Finished;
                Some(Poll::Ready(out))
            }
            Slot::Parked(waker) => {
                if let Some(mut orphan) = state.orphan.take() {
                    // The driver left: take over polling for everybody.
                    let slot = state.remove_slot(key);
                    state.makers -= usize::from(mem::take(&mut self.maker));
                    state.driven = true;
                    drop(guard);
                    let meta = orphan.as_mut().meta_mut();
                    meta.adopted = true;
                    // The `make` of a follower that took it over before and left.
                    let previous = mem::replace(&mut meta.kept, make.take());
                    self.role = Role::Driver(orphan);
                    // Both user code to drop (its old waker, that `make`): unlocked. (Apart: a
                    // tuple would be one more output-sized slot in a debug frame.)
                    drop(slot);
                    drop(previous);
                    return None;
                }
                if state.needs_driver && make.is_some() {
                    // The last attempt failed: run this follower's own call as the next
                    // attempt, for everybody. In a detached group the attempt runs on a task
                    // of its own, as a first one does (it completes even if every waiter
                    // leaves), and this follower waits in its slot. (By the group's option,
                    // not `State::detached`: a first attempt whose `make` panicked had no
                    // task.)
                    let spawn = match self.registry.config.detached {
                        true => tokio::runtime::Handle::try_current().ok(),
                        false => None,
                    };
                    let slot = match spawn {
                        None => Some(state.remove_slot(key)),
                        Some(_) => None,
                    };
                    state.makers -= usize::from(mem::take(&mut self.maker));
                    state.needs_driver = false;
                    state.driven = true;
                    let failure = state.failure.take();
                    let gate = state.retry_gate.take();
                    drop(guard);
                    drop(slot);
                    let polled = self.start_retry(key, spawn, gate);
                    // The failed output's destructor is user code: once the retry runs, so
                    // that its panic cannot leave the flight with no driver.
                    drop(failure);
                    return polled;
                }
                let old = match waker {
                    Some(w) if w.will_wake(cx.waker()) => None,
                    _ => waker.replace(cx.waker().clone()),
                };
                drop(guard);
                // A waker's destructor is user code: the one replaced is dropped unlocked.
                drop(old);
                Some(Poll::Pending)
            }
        }
    }

    /// Runs this follower's own call as the next attempt of a failed flight (its slot and the
    /// flight's state already updated): `None` to poll it as the driver, or its task's output
    /// later; its `make`'s panic at once. Not inlined, as the other roles' polls.
    #[inline(never)]
    fn start_retry(
        &mut self,
        key: usize,
        spawn: Option<tokio::runtime::Handle>,
        gate: Option<NonZeroU64>,
    ) -> Option<Poll<Result<T, Panicked>>> {
        // A new call, started by a follower: a leader and a retry.
        let registry = &self.registry;
        registry.lock().counters.leaders += 1;
        registry.retried.fetch_add(1, Relaxed);
        // As `stats()` counts them: when the retry starts.
        emit("tower_coalesce_leaders_total");
        emit("tower_coalesce_retried_total");
        let Role::Follower(_, make) = &mut self.role else {
            unreachable!("called for a follower")
        };
        let make = make.take().expect("checked by the caller");
        let flight = self.flight.as_ref().expect("a follower's");
        #[cfg(feature = "tracing")]
        let span = flight.state.lock().span.clone();
        let meta = |is_err| Meta {
            #[cfg(feature = "tracing")]
            span: span.clone(),
            ..Meta::new(flight.hash, flight.id, is_err, gate)
        };
        match catch_unwind(AssertUnwindSafe(make)) {
            Ok((fut, is_err)) => {
                let fut = driven(meta(is_err), fut);
                let Some(handle) = spawn else {
                    self.role = Role::Driver(fut);
                    return None;
                };
                spawn_driver(&handle, &self.registry, flight, fut);
                self.retrying = true;
            }
            Err(payload) => {
                if spawn.is_some() {
                    // No task drives it: this follower ends it, out of its slot (nobody else
                    // could have served that).
                    flight.state.lock().remove_slot(key);
                }
                // A panic is a failure whatever the test.
                let meta = meta(|_| false);
                self.role = Role::Finished;
                let out = self.complete(meta, Err(Panicked::new(payload)));
                return Some(Poll::Ready(out));
            }
        }
        None
    }

    /// A lingering hit that found the output taken out by another hit: takes its copy once it
    /// is back. Not inlined: its copy stays out of the frame of every other `poll`.
    #[inline(never)]
    fn poll_lingering(&mut self, key: usize, cx: &mut Context<'_>) -> Poll<Result<T, Panicked>> {
        let flight = self.flight.as_ref().expect("a lingering waiter's");
        let mut state = flight.state.lock();
        if state.lingering.is_none() {
            let old = match &mut state.lingerers[key] {
                Some(w) if w.will_wake(cx.waker()) => None,
                waker => waker.replace(cx.waker().clone()),
            };
            drop(state);
            // Dropped unlocked, as a follower's.
            drop(old);
            return Poll::Pending;
        }
        let old = state.lingerers.remove(key);
        self.role = Role::Finished;
        let out = copy_lingering(flight, state);
        drop(old);
        Poll::Ready(out)
    }

    /// The output this waiter got when it was made.
    #[inline(never)]
    fn take_ready(&mut self) -> Poll<Result<T, Panicked>> {
        let Role::Ready(out) = mem::replace(&mut self.role, Role::Finished) else {
            unreachable!()
        };
        Poll::Ready(*out)
    }
}

impl<K, T: Send + 'static> Drop for Run<K, T> {
    fn drop(&mut self) {
        self.leave();
    }
}

impl<K, T: Send + 'static> Run<K, T> {
    /// Gives up waiting: leaves the flight now, as dropping this waiter would, for a waiter
    /// whose future is kept. It got no output, so none was shared with it.
    pub(crate) fn give_up(&mut self) {
        self.leave();
        self.shared = false;
    }

    /// Leaves the flight, as dropping this waiter does.
    fn leave(&mut self) {
        if let Role::Finished = self.role {
            return;
        }
        match mem::replace(&mut self.role, Role::Finished) {
            Role::Finished | Role::Ready(_) => {}
            Role::Driver(fut) => self.leave_driving(fut),
            Role::Follower(key, make) => {
                self.leave_following(key as usize);
                drop(make);
            }
            Role::Lingering(key) => {
                // Woken to take the output next, it passes that turn on.
                let flight = self
                    .flight
                    .as_ref()
                    .expect("a lingering waiter has its flight");
                let mut state = flight.state.lock();
                let old = state.lingerers.remove(key as usize);
                let waker = match state.lingering.is_some() {
                    true => next_lingerer(&mut state.lingerers),
                    false => None,
                };
                drop(state);
                drop(old);
                pass_turn(flight, waker, next_lingerer_of);
            }
        }
    }
}

impl<K, T: Send + 'static> Run<K, T> {
    /// A driver leaves: the future goes to a follower if there is one; otherwise the call is
    /// cancelled and the key freed.
    fn leave_driving(&mut self, mut fut: BoxFuture<T>) {
        if !self.registered {
            return drop(fut);
        }
        let (hash, id) = (fut.meta().hash, fut.meta().id);
        let mut guard = self.registry.lock();
        let shard = &mut *guard;
        let flight = shard
            .table
            .find(hash, |e| e.id == id)
            .and_then(|e| e.flight.clone())
            .and_then(|f| f.downcast::<Flight<T>>().ok())
            .or_else(|| self.flight.clone());
        // The followers' handle on the span, given up as the flight ends (a finished waiter
        // may keep the state alive); dropped unlocked.
        let mut _span = SpanHold::default();
        if let Some(flight) = flight {
            let mut state = flight.state.lock();
            state.driven = false;
            if !state.followers.is_empty() {
                drop(guard);
                state.orphan = Some(fut);
                let waker = wake_one(&mut state.followers);
                drop(state);
                pass_turn(&flight, waker, next_driver_of);
                return;
            }
            state.phase = Phase::Cancelled;
            _span = take_span(&mut state);
        }
        self.registry.cancelling(shard, hash, id);
        drop(guard);
        let meta = fut.as_mut().meta_mut().take();
        // Last waiter gone: cancel the call (drop the inner future), then free the key, even
        // if the future's destructor panics (that panic is the dropper's, passed on after).
        let dropped = catch_unwind(AssertUnwindSafe(move || drop(fut)));
        self.registry.cancelled(hash, id);
        trace_end(meta.span(), End::Cancelled, 0);
        if let Err(panic) = dropped {
            std::panic::resume_unwind(panic);
        }
    }

    /// A follower leaves: the last waiter cancels the call; if nobody can retry a failed
    /// attempt any more, the others get its output.
    fn leave_following(&mut self, key: usize) {
        let flight = self.flight.clone().expect("a follower has its flight");
        let mut state = flight.state.lock();
        let slot = state.try_remove_slot(key);
        if state.phase != Phase::Running {
            drop(state);
            // An output waiting in the slot is dropped here, unlocked.
            drop(slot);
            return;
        }
        state.makers -= usize::from(mem::take(&mut self.maker));
        if !state.driven && state.followers.is_empty() {
            state.phase = Phase::Cancelled;
            let failure = state.failure.take();
            let orphan = state.orphan.take();
            let span = take_span(&mut state);
            drop(state);
            let mut shard = self.registry.lock();
            self.registry.cancelling(&mut shard, flight.hash, flight.id);
            drop(shard);
            // User code, both: a panic in either is passed on once the key is freed.
            let dropped = catch_unwind(AssertUnwindSafe(move || {
                let _failure = failure;
                drop(orphan);
            }));
            self.registry.cancelled(flight.hash, flight.id);
            trace_end(&span, End::Cancelled, 0);
            if let Err(panic) = dropped {
                std::panic::resume_unwind(panic);
            }
        } else if state.needs_driver && state.makers == 0 {
            // Nobody left who could retry: the others get the failed attempt's output.
            state.needs_driver = false;
            state.driven = true;
            let failure = state.failure.take();
            drop(state);
            if let Some(failure) = failure {
                let end = match &*failure {
                    Ok(_) => End::Err,
                    Err(_) => End::Panicked,
                };
                // Ended as `complete` ends a flight, but not counted again: this failed call
                // was counted when it was handed on to be retried.
                let linger = self
                    .registry
                    .config
                    .lingering_copy(end, &failure, flight.cloner);
                let ends = (flight.hash, flight.id);
                let (_, removed) = self
                    .registry
                    .finish(ends, (end, false), linger, flight.cloner);
                let published = publish(&flight, &failure, end, flight.cloner);
                drop(failure);
                drop(removed);
                if let Err(panic) = published {
                    resume_unwind(panic);
                }
            }
        } else {
            // This follower may have been the one woken to take over an orphan.
            let waker = match state.orphan.is_some() {
                true => wake_one(&mut state.followers),
                false => None,
            };
            drop(state);
            pass_turn(&flight, waker, next_driver_of);
        }
    }
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

/// A slab key as a waiter keeps it: 32 bits keep `Role`, and so every waiter, 8 bytes smaller.
fn slot_key(key: usize) -> u32 {
    u32::try_from(key).expect("fewer than 2^32 waiters of one flight")
}

/// Wakes `waker`, the waiter picked to take a turn (to drive an orphaned call, or to copy a
/// lingering output). A waker is the executor's code: if it panics, `next` picks another
/// waiter under the flight's lock, so that the turn is not lost with it; the first panic is
/// passed on once one is woken (or none is left).
fn pass_turn<T>(
    flight: &Flight<T>,
    mut waker: Option<Waker>,
    next: fn(&mut State<T>) -> Option<Waker>,
) {
    let mut panicked = Ok(());
    while let Some(turn) = waker.take() {
        let woken = catch_unwind(AssertUnwindSafe(|| turn.wake()));
        if woken.is_ok() {
            break;
        }
        keep_first(&mut panicked, woken);
        waker = next(&mut flight.state.lock());
    }
    if let Err(panic) = panicked {
        resume_unwind(panic);
    }
}

/// Another follower to wake to take over the orphaned call, if it is still there.
fn next_driver_of<T>(state: &mut State<T>) -> Option<Waker> {
    match state.orphan.is_some() {
        true => wake_one(&mut state.followers),
        false => None,
    }
}

/// Another caller to wake to copy the lingering output, if it is back.
fn next_lingerer_of<T>(state: &mut State<T>) -> Option<Waker> {
    match state.lingering.is_some() {
        true => next_lingerer(&mut state.lingerers),
        false => None,
    }
}

/// The waker of one caller waiting for a lingering output to be put back, if any has one.
fn next_lingerer(lingerers: &mut Slab<Option<Waker>>) -> Option<Waker> {
    lingerers.iter_mut().find_map(|(_, waker)| waker.take())
}

fn wake_one<T>(followers: &mut Slab<Slot<T>>) -> Option<Waker> {
    followers.iter_mut().find_map(|(_, slot)| match slot {
        Slot::Parked(waker) => waker.take(),
        Slot::Ready(_) => None,
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

impl<K, T: Send + 'static> fmt::Debug for Run<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match self.role {
            Role::Driver(_) => "driver",
            Role::Follower(..) => "follower",
            Role::Ready(_) => "ready",
            Role::Lingering(_) => "lingering",
            Role::Finished => "finished",
        };
        f.debug_struct("Run")
            .field("role", &role)
            .field("leader", &self.leader)
            .field("shared", &self.shared)
            .finish()
    }
}

/// The error a flight's waiters get when making or polling its inner future panicked.
///
/// The panic is caught where it happens and ends the flight; the key stays usable. (With
/// `panic = "abort"` there is nothing to catch.)
#[derive(Clone)]
pub struct Panicked {
    message: Arc<str>,
}

impl Panicked {
    pub(crate) fn new(payload: Box<dyn Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            Arc::from(*s)
        } else if let Some(s) = payload.downcast_ref::<String>() {
            Arc::from(s.as_str())
        } else {
            Arc::from("<non-string panic payload>")
        };
        // The payload's destructor is user code; a panic in it must not escape here.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
        Panicked { message }
    }

    /// The panic message: the payload if it was a string, `<non-string panic payload>`
    /// otherwise.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Panicked")
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coalesced call panicked: {}", self.message)
    }
}

impl std::error::Error for Panicked {}

#[cfg(all(test, not(loom)))]
mod tests;
