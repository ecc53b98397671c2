//! Polling a [`Run`]: driving the call, or waiting for the output as a follower (taking the
//! call over from a driver that left, running an elected retry).

use super::*;

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
    pub(super) fn poll_driving(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, Panicked>> {
        let Role::Driver(fut) = &mut self.role else {
            unreachable!("called for a driver")
        };
        if let Some(old) = fut.meta().gate {
            // Cloned before the shard is locked: the waker is the executor's code, and this
            // path is rare enough to pay for a clone it may not keep.
            let waker = cx.waker().clone();
            let mut shard = self.registry.lock();
            if shard
                .table
                .find(fut.meta().hash, |e| e.id == old.get())
                .is_some()
            {
                // The key's cancelled call is still being dropped. Polled again
                // meanwhile (a `select!` loop), it does not queue its waker twice.
                let queued = shard
                    .gated
                    .iter()
                    .any(|(id, w)| *id == old.get() && w.will_wake(&waker));
                let spare = match queued {
                    true => Some(waker),
                    false => {
                        shard.gated.push((old.get(), waker));
                        None
                    }
                };
                drop(shard);
                drop(spare);
                return Poll::Pending;
            }
            drop(shard);
            drop(waker);
            fut.as_mut().meta_mut().gate = None;
        }
        let polled = catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx)));
        let out = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(value)) => Ok(value),
            Err(payload) => Err(Panicked::new(payload)),
        };
        let meta = fut.as_mut().meta_mut().take();
        if meta.adopted {
            return self.finish_adopted(meta, out, cx);
        }
        self.drop_call();
        Poll::Ready(self.complete(meta, out))
    }

    /// Releases what the inner future holds, before the followers are woken. A future that
    /// panicked may panic again when dropped; that is its own.
    #[inline(always)]
    pub(super) fn drop_call(&mut self) {
        if let Role::Driver(fut) = mem::replace(&mut self.role, Role::Finished) {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(fut)));
        }
    }

    /// `poll_driving`'s end for a driver that took the call over: it may become a follower
    /// again (`rejoin`) with this waker, cloned before it gives the call up and unlocked (the
    /// executor's code). If that clone panics, it does not rejoin: the failure goes to
    /// everybody. Apart, so that the path of every other call carries none of it.
    #[inline(never)]
    pub(super) fn finish_adopted(
        &mut self,
        mut meta: Meta<T>,
        out: Result<T, Panicked>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<T, Panicked>> {
        let waker = catch_unwind(AssertUnwindSafe(|| cx.waker().clone())).ok();
        self.drop_call();
        if let Some(waker) = waker {
            if self.rejoin(&mut meta, &out, waker) {
                // Woken with the other followers, to elect the next driver. `out`'s
                // destructor is user code: it runs here, once the retry is under way.
                return Poll::Pending;
            }
        }
        Poll::Ready(self.complete(meta, out))
    }

    /// The driver of a call it took over from a driver that left, which failed: if the call
    /// may be retried, this waiter, which did not make it, does not take the failure as its
    /// own. With its own `make` it runs the retry at once, for everybody; without one it
    /// becomes a follower again and the followers (`waker` among them) are woken to elect the
    /// next driver. Returns whether it did either (`waker` is woken to poll it in its new
    /// role); if not, the failure is published to everybody as usual. (`waker`, unused, is
    /// dropped after every lock is let go: a parameter outlives the body's locals.)
    #[inline(never)]
    pub(super) fn rejoin(
        &mut self,
        meta: &mut Meta<T>,
        out: &Result<T, Panicked>,
        waker: Waker,
    ) -> bool {
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
            waker.wake();
            return true;
        }
        let slot = slot_key(state.followers.insert(Slot::Parked(Some(waker))));
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
    pub(super) fn poll_following(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Option<Poll<Result<T, Panicked>>> {
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
                    // A detached flight's caller: shared if anybody else got it, or may yet
                    // (woken by an early batch, while later ones are being served).
                    self.shared = state.published_to > 0 || state.phase != Phase::Done;
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
                // Cloned under the lock, as tokio's own `Notify` does: a clone before it would
                // cost every poll that finds its copy in. (A waker whose clone calls back into
                // this group deadlocks; one that panics loses nothing, the slot is unchanged.)
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
    pub(super) fn start_retry(
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
    pub(super) fn poll_lingering(
        &mut self,
        key: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<T, Panicked>> {
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
    pub(super) fn take_ready(&mut self) -> Poll<Result<T, Panicked>> {
        let Role::Ready(out) = mem::replace(&mut self.role, Role::Finished) else {
            unreachable!()
        };
        Poll::Ready(*out)
    }
}
