//! [`Group`]'s methods: join a key's flight or register a new one; `forget`, counts, stats.

use super::*;

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
        self.run_classified(key, make, |_| false, None, NoBegin)
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
        self.run_classified(key, make, Result::is_err, Some(boxer), NoBegin)
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
        self.run_classified(key, make, Result::is_err, None, NoBegin)
    }

    pub(crate) fn retries(&self) -> u32 {
        self.registry.config.retries
    }

    pub(crate) fn run_classified<T, M, F, B>(
        &self,
        key: K,
        make: M,
        is_err: fn(&T) -> bool,
        keep: Option<Boxer<M, T>>,
        _begin: B,
    ) -> Run<K, T>
    where
        T: Clone + Send + 'static,
        M: FnOnce() -> F,
        F: Future<Output = T> + Send + 'static,
        B: Begin<F>,
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
                    let run = Run::hit(cell, Role::Lingering(slot_key(slot)), Some(flight));
                    return dropped_after(run, (key, make), ());
                }
                let out = copy_lingering(&flight, state);
                let run = Run::hit(cell, Role::Ready(Box::new(out)), None);
                return dropped_after(run, (key, make), ());
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
                    return dropped_after(self.alone(hash, make, is_err, _begin), key, garbage);
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
                        Some(span) => {
                            tracing::trace!(parent: span, role = "follower", "follower joined")
                        }
                        None => {
                            tracing::trace!(key_hash = hash, role = "follower", "follower joined")
                        }
                    });
                }
                // Boxing is user-visible work only for callers that asked to keep `make`.
                let (kept, unused) = match keep {
                    Some(keep) => (Some(keep(make, is_err)), None),
                    None => (None, Some(make)),
                };
                let stance = Stance {
                    maker: kept.is_some(),
                    ..Stance::SHARED
                };
                let role = Role::Follower(slot_key(slot), kept);
                let run = Run::with(cell, Some(flight), true, role, stance);
                return dropped_after(run, (key, unused), garbage);
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
                return dropped_after(self.alone(hash, make, is_err, _begin), key, garbage);
            }
        }
        let id = shard.next_id;
        shard.next_id += 1;
        #[cfg(feature = "tracing")]
        let span = FlightSpan::pending();
        #[cfg(not(feature = "tracing"))]
        let span = ();
        // Detached: the flight's state is needed up front, for the caller waits as a follower.
        let detached = detach.as_ref().map(|_| {
            let flight = Arc::new(Flight::<T>::of(
                hash,
                id,
                &span,
                config.retries,
                Clone::clone,
            ));
            let mut state = flight.state.lock();
            state.detached = true;
            let slot = state.followers.insert(Slot::Parked(None));
            state.caller_slot = Some(slot);
            drop(state);
            (flight, slot)
        });
        // Built whole where it is stored, not on the stack and changed there first: a wide
        // copy of narrow stores not yet written out stalls (measured on the solo path).
        let entry = Entry {
            key,
            hash,
            id,
            output,
            flight: detached
                .as_ref()
                .map(|(flight, _)| Arc::clone(flight) as Arc<dyn Any + Send + Sync>),
            lingering: false,
            forgotten: false,
            cancelling: false,
            #[cfg(feature = "tracing")]
            span: span.clone(),
        };
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
            let leader = |role| Run::with(cell, None, true, role, Stance::LEADER);
            let fut = match start::<_, _, _, B>(make, meta) {
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
    pub(super) fn alone<T, M, F, B: Begin<F>>(
        &self,
        hash: u64,
        make: M,
        is_err: fn(&T) -> bool,
        _begin: B,
    ) -> Run<K, T>
    where
        T: Clone + Send + 'static,
        M: FnOnce() -> F,
        F: Future<Output = T> + Send + 'static,
    {
        let shard = self.registry.shard(hash);
        let run = |role| Run::with(shard, None, false, role, Stance::LEADER);
        match start::<_, _, _, B>(make, Meta::new(hash, 0, is_err, None)) {
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

/// Returns `run` once `key` and `garbage` are dropped (user code: the key's destructor, with the
/// caller's unused `make`'s, and the purged outputs'). Held here as a local, `run` is dropped,
/// leaving its flight, if one of them panics; a value being returned when a local's destructor
/// panics is not (rust-lang/rust#47949), and a follower already in its flight's slots would
/// stay there for ever.
#[inline(always)]
fn dropped_after<R, K, G>(run: R, key: K, garbage: G) -> R {
    drop(key);
    drop(garbage);
    run
}
