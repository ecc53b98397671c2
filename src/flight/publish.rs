//! Handing a finished flight's output to its followers: a clone each, a batch per lock
//! section, woken in one pass.

use super::*;

/// Followers served per lock section when an output is published. The lock is let go between
/// batches, so followers woken early take their copies while the rest are made. (One under
/// loom, so that its models see a publish span batches.)
pub(super) const BATCH: usize = if cfg!(loom) { 1 } else { 32 };

/// The most bytes a batch's copies may take on the stack. A batch of small outputs lives
/// there, so publishing allocates nothing however many wait; a batch of larger ones goes on
/// the heap (one allocation per publish), so that a big `T` returned by value cannot overflow
/// the publishing task's stack.
pub(super) const STACK_COPIES: usize = 4096;

/// Ends `flight` (already unregistered, or lingering): fills every follower's slot with a
/// clone of `out` and wakes them, a batch at a time. Returns whether a follower got it, or
/// the first panic of a follower's waker, to pass on once the caller is done (every follower
/// is served and woken regardless).
///
/// `cloner` makes each copy: `Clone::clone` where `T: Clone` is known (inlined), the flight's
/// stored `cloner` from a follower's `Drop`.
pub(super) fn publish<T>(
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
pub(super) fn serve_on_stack<T, C>(
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
pub(super) fn serve_on_heap<T, C>(
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
/// (not a detached flight's caller) got a copy: all may have left meanwhile.
pub(super) fn serve<T, C>(
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
        let caller = state.caller_slot;
        let mut served = 0;
        let mut others = 0;
        while served < batch.len() && next < keys {
            if let Some(slot) = state.followers.get_mut(next) {
                if let Slot::Parked(waker) = slot {
                    wakers[served] = waker.take();
                    *slot = Slot::Ready(batch[served].take().expect("one copy per slot"));
                    served += 1;
                    others += usize::from(caller != Some(next));
                }
            }
            next += 1;
        }
        state.published_to += others;
        unserved -= served;
        handed |= others > 0;
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
pub(super) type Panic = Box<dyn Any + Send>;

/// An output a flight keeps aside (lingering, or for a retry), boxed: moving it moves a pointer.
pub(super) type Kept<T> = Box<Result<T, Panicked>>;

/// Wakes every waker in `wakers`. A waker is the executor's code: one that panics does not
/// keep the others from being woken. Returns the first panic, for the caller to pass on once
/// its own work is done.
pub(super) fn wake_all(wakers: &mut [Option<Waker>]) -> Result<(), Panic> {
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
pub(super) fn keep_first(first: &mut Result<(), Panic>, next: Result<(), Panic>) {
    match (next, &first) {
        (Err(panic), Ok(())) => *first = Err(panic),
        (Err(panic), Err(_)) => drop_panic(panic),
        (Ok(()), _) => {}
    }
}

/// Passes a caught panic on to the caller, once the protocol step it interrupted is done. If
/// this thread is already unwinding (a waiter dropped by a panicking task), raising a second
/// panic would abort the process: the payload is dropped instead, contained, and the first
/// panic goes on.
pub(super) fn pass_on(panic: Panic) {
    if std::thread::panicking() {
        drop_panic(panic);
    } else {
        resume_unwind(panic);
    }
}

/// Drops a caught panic's payload, whose destructor (user code) may panic in turn.
pub(super) fn drop_panic(panic: Panic) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(panic)));
}

/// Makes a published output's copies. The response's `Clone` is user code: once it panics,
/// every copy still to make is that panic instead, so every waiter still gets an answer.
pub(super) struct Copier<'a, T, C> {
    cloner: C,
    out: &'a Result<T, Panicked>,
    panicked: Option<Panicked>,
}

impl<T, C: Fn(&Result<T, Panicked>) -> Result<T, Panicked>> Copier<'_, T, C> {
    pub(super) fn fill(&mut self, copies: &mut [Option<Result<T, Panicked>>]) {
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
pub(super) fn copy_lingering<T>(
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
pub(super) fn clone_one<T>(
    cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
    out: &Result<T, Panicked>,
) -> Result<T, Panicked> {
    catch_unwind(AssertUnwindSafe(|| cloner(out))).unwrap_or_else(|p| Err(Panicked::new(p)))
}

/// Takes the flight's span from its state as the flight ends (to drop unlocked).
pub(super) fn take_span<T>(_state: &mut State<T>) -> SpanHold {
    #[cfg(feature = "tracing")]
    return mem::take(&mut _state.span);
}

#[cfg(feature = "tracing")]
pub(super) fn trace_end(span: &FlightSpan, end: End, waiters: usize) {
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
pub(super) fn trace_end(_span: &SpanHold, _end: End, _waiters: usize) {
    #[cfg(feature = "metrics")]
    contained(|| {
        metrics::counter!("tower_coalesce_flights_total", "outcome" => _end.name()).increment(1)
    });
}
