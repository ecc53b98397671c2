//! A [`Run`] that leaves before its output: the call handed on, or the flight cancelled.

use super::*;

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
    pub(super) fn leave(&mut self) {
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
    pub(super) fn leave_driving(&mut self, mut fut: BoxFuture<T>) {
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
            pass_on(panic);
        }
    }

    /// A follower leaves: the last waiter cancels the call; if nobody can retry a failed
    /// attempt any more, the others get its output.
    pub(super) fn leave_following(&mut self, key: usize) {
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
                pass_on(panic);
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
                    pass_on(panic);
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
