//! A flight's shared [`State`]: made when the first follower joins; slots, and whose turn it is.

use super::*;

impl<T: Clone> Flight<T> {
    pub(super) fn new<K>(entry: &Entry<K>, retries: u32) -> Self {
        Flight::with_cloner(entry, retries, Clone::clone)
    }
}

impl<T> Flight<T> {
    pub(super) fn with_cloner<K>(
        entry: &Entry<K>,
        retries: u32,
        cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
    ) -> Self {
        #[cfg(feature = "tracing")]
        let span = &entry.span;
        #[cfg(not(feature = "tracing"))]
        let span = &();
        Flight::of(entry.hash, entry.id, span, retries, cloner)
    }

    /// The state of the flight registered as (`hash`, `id`), with its entry's `span`.
    pub(super) fn of(
        hash: u64,
        id: u64,
        _span: &SpanHold,
        retries: u32,
        cloner: fn(&Result<T, Panicked>) -> Result<T, Panicked>,
    ) -> Self {
        Flight {
            hash,
            id,
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
                span: _span.clone(),
            }),
        }
    }
}

impl<T> State<T> {
    /// Removes the slot `key` from `followers`.
    pub(super) fn remove_slot(&mut self, key: usize) -> Slot<T> {
        self.try_remove_slot(key).expect("a waiter's own slot")
    }

    pub(super) fn try_remove_slot(&mut self, key: usize) -> Option<Slot<T>> {
        if self.caller_slot == Some(key) {
            self.caller_slot = None;
        }
        self.followers.try_remove(key)
    }

    /// Every follower has its copy: the flight is over, nobody drives or is to drive it.
    pub(super) fn published(&mut self) {
        self.phase = Phase::Done;
        self.driven = false;
        self.needs_driver = false;
    }
}

/// A slab key as a waiter keeps it: 32 bits keep `Role`, and so every waiter, 8 bytes smaller.
pub(super) fn slot_key(key: usize) -> u32 {
    u32::try_from(key).expect("fewer than 2^32 waiters of one flight")
}

/// Wakes `waker`, the waiter picked to take a turn (to drive an orphaned call, or to copy a
/// lingering output). A waker is the executor's code: if it panics, `next` picks another
/// waiter under the flight's lock, so that the turn is not lost with it; the first panic is
/// passed on once one is woken (or none is left).
pub(super) fn pass_turn<T>(
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
        pass_on(panic);
    }
}

/// Another follower to wake to take over the orphaned call, if it is still there.
pub(super) fn next_driver_of<T>(state: &mut State<T>) -> Option<Waker> {
    match state.orphan.is_some() {
        true => wake_one(&mut state.followers),
        false => None,
    }
}

/// Another caller to wake to copy the lingering output, if it is back.
pub(super) fn next_lingerer_of<T>(state: &mut State<T>) -> Option<Waker> {
    match state.lingering.is_some() {
        true => next_lingerer(&mut state.lingerers),
        false => None,
    }
}

/// The waker of one caller waiting for a lingering output to be put back, if any has one.
pub(super) fn next_lingerer(lingerers: &mut Slab<Option<Waker>>) -> Option<Waker> {
    lingerers.iter_mut().find_map(|(_, waker)| waker.take())
}

pub(super) fn wake_one<T>(followers: &mut Slab<Slot<T>>) -> Option<Waker> {
    followers.iter_mut().find_map(|(_, slot)| match slot {
        Slot::Parked(waker) => waker.take(),
        Slot::Ready(_) => None,
    })
}
