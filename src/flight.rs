//! The tower-free core: a sharded registry of in-flight calls that concurrent callers share.
//!
//! A [`Group`] maps keys to *flights*. [`Group::run`] either joins the key's flight or, when
//! there is none, registers a new one and makes its future. Whoever holds that future (the
//! *driver*, at first the caller that registered it) polls it; everybody else parks a waker and
//! is woken once, when the result is ready. When the driver is dropped the future is handed to
//! another waiter; when the last waiter is dropped the future is dropped and the key freed.
//!
//! Locks: each shard of the registry and each flight has a `std` mutex. The lock order is
//! shard, then flight; nothing takes a shard lock while holding a flight lock. Neither is held
//! across an `.await`, while the inner future is made, polled or dropped, or while a result is
//! cloned. Only a key's `Hash`/`Eq` run inside a shard lock, as in any hash map.

use std::any::{Any, TypeId};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::mem;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use hashbrown::HashTable;
use slab::Slab;

use crate::sync::Mutex;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A registry of in-flight calls, keyed by `K`: Go's `singleflight.Group` for futures.
///
/// At most one flight per key runs at a time. Callers that ask for a key while its flight runs
/// wait for that flight and get a clone of its output; a caller that asks after the output was
/// published starts a new flight. Flights of different output types never meet, even under
/// equal keys.
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
pub struct Group<K> {
    registry: Arc<Registry<K>>,
}

struct Registry<K> {
    /// Randomly seeded per registry: keys come from the network, so a fixed seed would let a
    /// client aim collisions at one shard.
    hasher: foldhash::fast::RandomState,
    shards: Box<[Mutex<HashTable<Entry<K>>>]>,
}

struct Entry<K> {
    key: K,
    hash: u64,
    /// `TypeId` of the `Flight<T>` behind `flight`; part of the entry's identity.
    output: TypeId,
    flight: Arc<dyn Any + Send + Sync>,
}

/// One call of the inner future, shared by its waiters.
struct Flight<T> {
    /// The key's hash, to find the entry again without the key.
    hash: u64,
    state: Mutex<State<T>>,
}

/// Guarded by `Flight::state`.
struct State<T> {
    phase: Phase,
    /// Whether a waiter holds the inner future (or is about to: the registering caller between
    /// registration and making the future). While true, the flight cannot be cancelled.
    driven: bool,
    /// The inner future while nobody drives it: put here by a dropped driver, taken by the next
    /// follower that is polled.
    orphan: Option<BoxFuture<T>>,
    /// One slot per follower, inserted when it joins, removed when it takes its output or
    /// drops. The driver fills every slot (outside the lock it clones, inside it moves) before
    /// it sets `phase` to `Done`.
    followers: Slab<Slot<T>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Joinable.
    Running,
    /// Output published and entry removed from the registry.
    Done,
    /// Last waiter gone; the entry may still be in the registry until its remover runs, and a
    /// caller that finds it replaces it.
    Cancelled,
}

enum Slot<T> {
    Parked(Option<Waker>),
    Ready(Result<T, Panicked>),
}

impl<K> Group<K>
where
    K: Hash + Eq + Send + 'static,
{
    /// Creates an empty registry, sharded for this machine's parallelism.
    pub fn new() -> Self {
        let parallelism = std::thread::available_parallelism().map_or(4, |n| n.get());
        // Fewer shards under loom: each lock multiplies the states the model checker explores.
        let shards = if cfg!(loom) {
            2
        } else {
            (parallelism * 4).next_power_of_two().clamp(4, 256)
        };
        Group {
            registry: Arc::new(Registry {
                hasher: foldhash::fast::RandomState::default(),
                shards: (0..shards).map(|_| Mutex::new(HashTable::new())).collect(),
            }),
        }
    }

    /// Joins `key`'s flight, or registers a new one made by `make` and leads it.
    ///
    /// The registry is consulted when `run` is called, not when the future is first polled;
    /// `make` is called only by the caller that registers a flight, after registration and
    /// outside every lock. The returned future resolves to the flight's output, or to
    /// [`Panicked`] if `make` or the inner future panicked.
    ///
    /// Dropping the returned future leaves the flight to the other waiters; when the last one is
    /// dropped, the inner future is dropped too and the key freed. The caller holding the inner
    /// future (the leader, or whoever took over from it) polls it for everybody, so a waiter
    /// should be polled or dropped, not parked unpolled: that would hold up the others.
    pub fn run<T, M, F>(&self, key: K, make: M) -> Run<K, T>
    where
        T: Clone + Send + 'static,
        M: FnOnce() -> F,
        F: Future<Output = T> + Send + 'static,
    {
        let registry = &self.registry;
        let hash = registry.hasher.hash_one(&key);
        let output = TypeId::of::<Flight<T>>();
        let mut shard = registry.shard(hash).lock();
        let mut stale = None;
        if let Ok(found) = shard.find_entry(hash, |e| e.output == output && e.key == key) {
            let flight = Arc::clone(&found.get().flight)
                .downcast::<Flight<T>>()
                .unwrap_or_else(|_| unreachable!("entry output type checked above"));
            let mut state = flight.state.lock();
            if state.phase == Phase::Running {
                let slot = state.followers.insert(Slot::Parked(None));
                drop(state);
                drop(shard);
                return Run {
                    registry: Arc::clone(registry),
                    flight,
                    role: Role::Follower(slot),
                };
            }
            drop(state);
            // Cancelled: its own remover will not find it (identity check) and do nothing.
            stale = Some(found.remove().0);
        }
        let flight = Arc::new(Flight {
            hash,
            state: Mutex::new(State {
                phase: Phase::Running,
                driven: true,
                orphan: None,
                followers: Slab::new(),
            }),
        });
        let entry = Entry {
            key,
            hash,
            output,
            flight: Arc::clone(&flight) as Arc<dyn Any + Send + Sync>,
        };
        shard.insert_unique(hash, entry, |e| e.hash);
        drop(shard);
        drop(stale);

        let mut run = Run {
            registry: Arc::clone(registry),
            flight,
            role: Role::Finished,
        };
        run.role = match catch_unwind(AssertUnwindSafe(make)) {
            Ok(fut) => Role::Driver(Box::pin(fut)),
            Err(payload) => Role::Ready(Some(run.complete(Err(Panicked::new(payload))))),
        };
        run
    }
}

impl<K> Group<K> {
    /// The number of keys with a registered flight.
    pub fn in_flight(&self) -> usize {
        self.registry.shards.iter().map(|s| s.lock().len()).sum()
    }
}

impl<K> Registry<K> {
    fn shard(&self, hash: u64) -> &Mutex<HashTable<Entry<K>>> {
        // The table uses the low bits for buckets and the top 7 for tags; pick shards from the
        // middle so neither loses entropy within a shard.
        &self.shards[(hash >> 32) as usize & (self.shards.len() - 1)]
    }

    /// Removes `flight`'s entry if it is still the one registered for its key.
    fn remove<T>(&self, flight: &Arc<Flight<T>>) {
        let me = Arc::as_ptr(flight).cast::<()>();
        let mut shard = self.shard(flight.hash).lock();
        let removed = shard
            .find_entry(flight.hash, |e| Arc::as_ptr(&e.flight).cast::<()>() == me)
            .ok()
            .map(|found| found.remove().0);
        drop(shard);
        // The key's destructor is user code: run it unlocked.
        drop(removed);
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
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// A waiter of a flight: the future returned by [`Group::run`].
///
/// Resolves to the flight's output, or to [`Panicked`]. See [`Group::run`] for what dropping
/// it does.
#[must_use = "futures do nothing unless polled; dropping this leaves the flight"]
pub struct Run<K, T> {
    registry: Arc<Registry<K>>,
    flight: Arc<Flight<T>>,
    role: Role<T>,
}

// No field is structurally pinned: the inner future is boxed, outputs are moved out whole.
impl<K, T> Unpin for Run<K, T> {}

enum Role<T> {
    /// Holds the inner future and polls it for every waiter.
    Driver(BoxFuture<T>),
    /// Parked in `followers` under this slot key.
    Follower(usize),
    /// `make` panicked; the output was published at registration.
    Ready(Option<Result<T, Panicked>>),
    /// Returned its output, or is being constructed.
    Finished,
}

impl<K, T> Run<K, T> {
    /// Whether this waiter started the flight (or took over polling it), rather than joining.
    ///
    /// A waiter that is not the leader received a clone of another caller's output: Go's
    /// `shared` flag, as seen from a follower.
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Driver(_) | Role::Ready(_))
    }
}

impl<K, T: Clone + Send + 'static> Run<K, T> {
    /// Publishes the driver's output: unregisters the flight first, so that a caller who comes
    /// after this point starts a new flight instead of joining a finished one; then hands a
    /// clone to each follower and wakes them all in one pass.
    fn complete(&mut self, out: Result<T, Panicked>) -> Result<T, Panicked> {
        self.registry.remove(&self.flight);
        // No follower can join from here on, and `driven` keeps the ones that leave from
        // cancelling the flight, so counting now and filling later is sound.
        let mut state = self.flight.state.lock();
        let wanted = state.followers.len();
        if wanted == 0 {
            state.phase = Phase::Done;
            state.driven = false;
            return out;
        }
        drop(state);
        let mut copies: Vec<_> = (0..wanted).map(|_| out.clone()).collect();
        let mut wakers = Vec::with_capacity(wanted);
        let mut state = self.flight.state.lock();
        for (_, slot) in state.followers.iter_mut() {
            let Some(copy) = copies.pop() else { break };
            if let Slot::Parked(waker) = mem::replace(slot, Slot::Ready(copy)) {
                wakers.extend(waker);
            }
        }
        state.phase = Phase::Done;
        state.driven = false;
        drop(state);
        drop(copies);
        for waker in wakers {
            waker.wake();
        }
        out
    }
}

impl<K, T: Clone + Send + 'static> Future for Run<K, T> {
    type Output = Result<T, Panicked>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.role {
                Role::Driver(fut) => {
                    let out = match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(value)) => Ok(value),
                        Err(payload) => Err(Panicked::new(payload)),
                    };
                    // Release what the inner future holds before the followers are woken. A
                    // future that panicked may panic again when dropped; that is its own.
                    if let Role::Driver(fut) = mem::replace(&mut this.role, Role::Finished) {
                        let _ = catch_unwind(AssertUnwindSafe(move || drop(fut)));
                    }
                    return Poll::Ready(this.complete(out));
                }
                Role::Follower(key) => {
                    let key = *key;
                    let mut guard = this.flight.state.lock();
                    let state = &mut *guard;
                    match &mut state.followers[key] {
                        Slot::Ready(_) => {
                            let Slot::Ready(out) = state.followers.remove(key) else {
                                unreachable!()
                            };
                            drop(guard);
                            this.role = Role::Finished;
                            return Poll::Ready(out);
                        }
                        Slot::Parked(waker) => {
                            if let Some(orphan) = state.orphan.take() {
                                // The driver left: take over polling for everybody.
                                state.followers.remove(key);
                                state.driven = true;
                                drop(guard);
                                this.role = Role::Driver(orphan);
                                continue;
                            }
                            match waker {
                                Some(w) if w.will_wake(cx.waker()) => {}
                                _ => *waker = Some(cx.waker().clone()),
                            }
                            return Poll::Pending;
                        }
                    }
                }
                Role::Ready(out) => {
                    let out = out.take().expect("Run polled after completion");
                    this.role = Role::Finished;
                    return Poll::Ready(out);
                }
                Role::Finished => panic!("Run polled after completion"),
            }
        }
    }
}

impl<K, T> Drop for Run<K, T> {
    fn drop(&mut self) {
        let cancelled = match mem::replace(&mut self.role, Role::Finished) {
            Role::Finished | Role::Ready(_) => return,
            Role::Driver(fut) => {
                let mut state = self.flight.state.lock();
                state.driven = false;
                if state.followers.is_empty() {
                    state.phase = Phase::Cancelled;
                    Some(fut)
                } else {
                    state.orphan = Some(fut);
                    let waker = wake_one(&mut state.followers);
                    drop(state);
                    waker.map(Waker::wake);
                    None
                }
            }
            Role::Follower(key) => {
                let mut state = self.flight.state.lock();
                if state.phase != Phase::Running {
                    // Done: the output waiting in this slot is dropped here, unlocked.
                    let slot = state.followers.try_remove(key);
                    drop(state);
                    drop(slot);
                    return;
                }
                state.followers.remove(key);
                if !state.driven && state.followers.is_empty() {
                    state.phase = Phase::Cancelled;
                    state.orphan.take()
                } else {
                    // This follower may have been the one woken to take over an orphan.
                    let waker = state
                        .orphan
                        .is_some()
                        .then(|| wake_one(&mut state.followers))
                        .flatten();
                    drop(state);
                    waker.map(Waker::wake);
                    None
                }
            }
        };
        // Last waiter gone: cancel the call (drop the inner future), then free the key.
        drop(cancelled);
        self.registry.remove(&self.flight);
    }
}

fn wake_one<T>(followers: &mut Slab<Slot<T>>) -> Option<Waker> {
    followers.iter_mut().find_map(|(_, slot)| match slot {
        Slot::Parked(waker) => waker.take(),
        Slot::Ready(_) => None,
    })
}

impl<K, T> fmt::Debug for Run<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match self.role {
            Role::Driver(_) => "driver",
            Role::Follower(_) => "follower",
            Role::Ready(_) => "ready",
            Role::Finished => "finished",
        };
        f.debug_struct("Run").field("role", &role).finish()
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
    fn new(payload: Box<dyn Any + Send>) -> Self {
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

    /// The panic message, when the payload was a string.
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
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct CountWaker(AtomicUsize);
    impl Wake for CountWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll<F: Future + Unpin>(f: &mut F, w: &Arc<CountWaker>) -> Poll<F::Output> {
        let waker = Waker::from(w.clone());
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn follower_is_woken_once_and_gets_a_clone() {
        let group: Group<u8> = Group::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let mut leader = group.run(1, || async move { rx.await.unwrap() });
        let mut follower = group.run(1, std::future::pending::<u32>);
        assert!(leader.is_leader() && !follower.is_leader());
        let (wl, wf) = (
            Arc::new(CountWaker(0.into())),
            Arc::new(CountWaker(0.into())),
        );
        assert!(poll(&mut follower, &wf).is_pending());
        assert!(poll(&mut follower, &wf).is_pending());
        assert!(poll(&mut leader, &wl).is_pending());
        tx.send(7).unwrap();
        assert_eq!(
            wf.0.load(Ordering::SeqCst),
            0,
            "follower not woken by the inner future"
        );
        assert!(matches!(poll(&mut leader, &wl), Poll::Ready(Ok(7))));
        assert_eq!(wf.0.load(Ordering::SeqCst), 1);
        assert!(matches!(poll(&mut follower, &wf), Poll::Ready(Ok(7))));
        assert_eq!(group.in_flight(), 0);
    }

    #[test]
    fn dropped_driver_hands_the_future_over() {
        let group: Group<u8> = Group::new();
        let polled = Arc::new(AtomicUsize::new(0));
        let p = polled.clone();
        let mut leader = group.run(1, move || {
            std::future::poll_fn(move |_| {
                if p.fetch_add(1, Ordering::SeqCst) == 0 {
                    Poll::Pending
                } else {
                    Poll::Ready(5u32)
                }
            })
        });
        let mut follower = group.run(1, std::future::pending::<u32>);
        let w = Arc::new(CountWaker(0.into()));
        assert!(poll(&mut leader, &w).is_pending());
        assert!(poll(&mut follower, &w).is_pending());
        drop(leader);
        assert_eq!(
            w.0.load(Ordering::SeqCst),
            1,
            "the follower is woken to take over"
        );
        assert!(matches!(poll(&mut follower, &w), Poll::Ready(Ok(5))));
        assert_eq!(
            polled.load(Ordering::SeqCst),
            2,
            "the same inner future went on"
        );
        assert_eq!(group.in_flight(), 0);
    }

    #[test]
    fn cancelled_entry_is_replaced_not_joined() {
        let group: Group<u8> = Group::new();
        let first = group.run(1, || std::future::pending::<u32>());
        // Simulate the window between "last waiter gone" and "entry removed".
        first.flight.state.lock().phase = Phase::Cancelled;
        let second = group.run(1, || async { 2u32 });
        assert!(second.is_leader());
        assert_eq!(group.in_flight(), 1);
        first.flight.state.lock().phase = Phase::Running;
        drop(first);
        assert_eq!(
            group.in_flight(),
            1,
            "the old flight must not remove the new entry"
        );
        drop(second);
        assert_eq!(group.in_flight(), 0);
    }

    #[test]
    fn equal_keys_of_different_output_types_do_not_meet() {
        let group: Group<u8> = Group::new();
        let a = group.run(1, || std::future::pending::<u32>());
        let b = group.run(1, || std::future::pending::<String>());
        assert!(a.is_leader() && b.is_leader());
        assert_eq!(group.in_flight(), 2);
    }
}
