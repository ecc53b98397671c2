//! The registry's shards: unregistering a finished or cancelled flight, lingering outputs,
//! and the gate a new flight waits at while the key's cancelled call is dropped.

use super::*;

impl<K> Shard<K> {
    /// Moves expired lingering entries into `garbage`, to be dropped once the lock is released.
    pub(super) fn purge(&mut self, now: Instant, garbage: &mut Vec<Entry<K>>) {
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

    /// Drops the expiry records of entries gone before their time (forgotten while lingering).
    /// Called once records outnumber twice the entries, so each pass removes at least half of
    /// them: amortised O(1) a record, and the queues stay in proportion to the registry
    /// however long the windows are.
    #[cold]
    #[inline(never)]
    pub(super) fn compact_expiries(&mut self) {
        let table = &self.table;
        for queue in [&mut self.expiring_ok, &mut self.expiring_err] {
            queue.retain(|e| table.find(e.hash, |x| x.id == e.id).is_some());
        }
    }

    /// Removes the entry (`hash`, `id`), if it is still there, and gives up its place.
    pub(super) fn unlink(&mut self, hash: u64, id: u64, common: &Common) -> Option<Entry<K>> {
        let (entry, _) = self.table.find_entry(hash, |e| e.id == id).ok()?.remove();
        self.unlinked(&entry, common);
        Some(entry)
    }

    /// Gives up the place of an entry just removed from the table.
    pub(super) fn unlinked(&mut self, entry: &Entry<K>, common: &Common) {
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
    pub(super) fn release(&self, counters: &mut Counters) {
        counters.running -= 1;
        if self.config.max_in_flight.is_some() {
            self.running.fetch_sub(1, Relaxed);
        }
    }
}

impl<K> Registry<K> {
    pub(super) fn shard(&self, hash: u64) -> &Arc<ShardCell<K>> {
        // The table uses the low bits for buckets and the top 7 for tags; the shard comes from
        // a remix of the whole hash (a Fibonacci multiply), so that runs of similar keys
        // spread evenly and neither table part loses entropy within a shard.
        let mixed = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(mixed >> 40) as usize & (self.shards.len() - 1)]
    }
}

impl<K> ShardCell<K> {
    /// The shared state of the flight registered as (`hash`, `id`), if a follower made it.
    pub(super) fn flight_of<T: Send + 'static>(
        &self,
        hash: u64,
        id: u64,
    ) -> Option<Arc<Flight<T>>> {
        let shard = self.lock();
        let flight = shard.table.find(hash, |e| e.id == id)?.flight.clone()?;
        drop(shard);
        flight.downcast().ok()
    }

    /// Ends the flight registered as (`hash`, `id`): unregisters it, or makes it linger with
    /// `keep` until the given instant; counts how it ended if `count` (a failure handed to
    /// followers to retry was counted then). Returns its shared state, if a follower (or this
    /// call, to hold `keep`, with `cloner`) made one, and the key (with its span) if the entry
    /// was removed: the caller drops that (the key's destructor is user code) once the
    /// followers are served. (Not the whole entry: moving it through the callers' frames
    /// costs a solo call more than its instructions, in stalled partial loads.)
    // Inlined into `complete`, the path of every flight: a call moves the removed entry
    // through memory (measured: ~20 more instructions per solo call).
    #[allow(clippy::type_complexity)]
    #[inline(always)]
    pub(super) fn finish<T: Send + 'static>(
        &self,
        (hash, id): (u64, u64),
        (end, count): (End, bool),
        linger: Option<(Instant, Box<Result<T, Panicked>>)>,
        cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
    ) -> (Option<Arc<Flight<T>>>, Option<Removed<K>>) {
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
                let records = shard.expiring_ok.len() + shard.expiring_err.len();
                if records > 2 * shard.table.len() + 64 {
                    shard.compact_expiries();
                }
                self.common.release(&mut shard.counters);
                (None, Some(holder))
            }
            _ => {
                let (entry, _) = found.remove();
                shard.unlinked(&entry, &self.common);
                // Moved out, not cloned: no reference count traffic on the flight's line.
                let (removed, flight) = entry.removed();
                (Some(removed), flight.and_then(downcast))
            }
        };
        drop(guard);
        (flight, removed)
    }

    /// Marks the entry (`hash`, `id`) as cancelling: from here on nobody joins it, and a new
    /// flight of its key waits until [`cancelled`](Self::cancelled) removes it.
    pub(super) fn cancelling(&self, shard: &mut Shard<K>, hash: u64, id: u64) {
        if let Some(entry) = shard.table.find_mut(hash, |e| e.id == id) {
            if !entry.cancelling {
                entry.cancelling = true;
                shard.cancelling += 1;
            }
        }
    }

    /// Removes a cancelled flight's entry, once its future is dropped, and lets the flights
    /// waiting for that start.
    pub(super) fn cancelled(&self, hash: u64, id: u64) {
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
            pass_on(panic);
        }
    }
}
