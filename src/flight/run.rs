//! [`Run`], a waiter of a flight: its roles, and what its driver does when the call ends
//! (publish, linger, retry).

use super::*;

/// A waiter of a flight: the future returned by [`Group::run`].
///
/// Resolves to the flight's output, or to [`Panicked`]. See [`Group::run`] for what dropping
/// it does.
#[must_use = "futures do nothing unless polled; dropping this leaves the flight"]
pub struct Run<K, T: Send + 'static> {
    /// The shard of the flight's entry (any shard for a call run alone), with the registry's
    /// common part.
    pub(super) registry: Arc<ShardCell<K>>,
    /// The flight's shared state: a follower's from the start; a driver's once it looks it up
    /// (when it finishes, retries, or leaves).
    pub(super) flight: Option<Arc<Flight<T>>>,
    /// False for a call run alone past a capacity bound (it has no entry), or a lingering hit.
    pub(super) registered: bool,
    pub(super) role: Role<T>,
    /// Whether this caller's `make` made the flight's future.
    pub(super) leader: bool,
    /// Whether the output was (or will be) handed to more than one caller.
    pub(super) shared: bool,
    /// Whether this follower is counted in `State::makers`.
    pub(super) maker: bool,
    /// Whether this follower's own call is the attempt a spawned task runs (a detached
    /// flight's retry): it waits for its own call, so no follower's wait limit applies.
    pub(super) retrying: bool,
}

// No field is structurally pinned: the inner future is boxed, outputs are moved out whole.
impl<K, T: Send + 'static> Unpin for Run<K, T> {}

pub(super) enum Role<T> {
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
    pub(super) fn hit(
        registry: &Arc<ShardCell<K>>,
        role: Role<T>,
        flight: Option<Arc<Flight<T>>>,
    ) -> Self {
        Run::with(registry, flight, false, role, Stance::SHARED)
    }

    /// A waiter in `role`, of a flight registered in `registry`'s shard if `registered`; not
    /// its leader, nor shared, nor keeping a `make`.
    pub(super) fn new(
        registry: &Arc<ShardCell<K>>,
        flight: Option<Arc<Flight<T>>>,
        registered: bool,
        role: Role<T>,
    ) -> Self {
        Run::with(registry, flight, registered, role, Stance::default())
    }

    /// A waiter as `new` makes it, standing to its flight as `stance` says. Every field is
    /// set here, none changed after: a waiter changed in place and then moved (returned) is a
    /// wide load of narrow stores not yet written out, which stalls (measured on the solo path).
    pub(super) fn with(
        registry: &Arc<ShardCell<K>>,
        flight: Option<Arc<Flight<T>>>,
        registered: bool,
        role: Role<T>,
        stance: Stance,
    ) -> Self {
        Run {
            registry: Arc::clone(registry),
            flight,
            registered,
            role,
            leader: stance.leader,
            shared: stance.shared,
            maker: stance.maker,
            retrying: false,
        }
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

    /// Whether this caller joined another caller's flight, or was served a lingering output:
    /// its output is a clone of that call's. The opposite of [`is_leader`](Self::is_leader).
    ///
    /// ```
    /// use tower_coalesce::Group;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let group: Group<u8> = Group::new();
    /// let leader = group.run(1, || async { "one" });
    /// let follower = group.run(1, || async { "never made" });
    /// assert!(!leader.is_follower() && follower.is_follower());
    /// let (a, b) = tokio::join!(leader, follower);
    /// assert_eq!((a.unwrap(), b.unwrap()), ("one", "one"));
    /// # }
    /// ```
    pub fn is_follower(&self) -> bool {
        !self.leader
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

/// How a new waiter stands to its flight (the flags of [`Run`] of those names).
#[derive(Clone, Copy, Default)]
pub(super) struct Stance {
    pub(super) leader: bool,
    pub(super) shared: bool,
    pub(super) maker: bool,
}

impl Stance {
    /// The caller whose `make` made the flight's future.
    pub(super) const LEADER: Stance = Stance {
        leader: true,
        shared: false,
        maker: false,
    };
    /// A caller served another's output (a lingering hit).
    pub(super) const SHARED: Stance = Stance {
        leader: false,
        shared: true,
        maker: false,
    };
}

/// Drives a detached flight's call (`fut`) on a task of its own: it completes even if every
/// waiter leaves.
pub(super) fn spawn_driver<K, T>(
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

/// Starts a new flight's work as soon as its future is made: the layer calls its inner
/// service there, as tower middleware does in `call`. Not while the key's cancelled call is
/// still being dropped: the new call waits for that.
pub(crate) trait Begin<F> {
    /// False for [`NoBegin`]: the plain path, chosen at compile time.
    const BEGINS: bool = true;
    fn begin(fut: Pin<&mut F>);
}

/// No work before the flight's future is first polled (`Group::run`).
pub(crate) struct NoBegin;

impl<F> Begin<F> for NoBegin {
    const BEGINS: bool = false;
    fn begin(_: Pin<&mut F>) {}
}

/// Calls a leader's `make` (user code: outside every lock) and boxes its future, then calls
/// `B::begin` on it in the box; a panic of either (`begin` drops what it replaced: the inner
/// service's clone, the request) is caught, to end the flight at once.
// Begun in the box, not before: a future changed in place on the stack and then moved into
// its box is read back in wide loads from narrow stores not yet written out, a stall that
// cost a solo call more than its instructions (measured).
// Inlined into its two callers: out of line it costs ~50 instructions a solo call (measured).
#[allow(clippy::type_complexity)]
#[inline(always)]
pub(super) fn start<T, M, F, B>(make: M, meta: Meta<T>) -> Result<BoxFuture<T>, (Meta<T>, Panicked)>
where
    M: FnOnce() -> F,
    F: Future<Output = T> + Send + 'static,
    T: 'static,
    B: Begin<F>,
{
    let begins = B::BEGINS && meta.gate.is_none();
    match catch_unwind(AssertUnwindSafe(make)) {
        Ok(fut) => {
            let mut boxed = Box::pin(Driven { meta, fut });
            if begins {
                let begun = catch_unwind(AssertUnwindSafe(|| {
                    B::begin(boxed.as_mut().project().fut);
                }));
                if let Err(payload) = begun {
                    return Err(unbegun(boxed, payload));
                }
            }
            Ok(boxed)
        }
        Err(payload) => Err((meta, Panicked::new(payload))),
    }
}

/// A flight's future whose `begin` panicked: its `Meta` back, and the panic, to end the flight
/// with. The future (a call perhaps made) is dropped here, its own panic contained.
#[cold]
#[inline(never)]
fn unbegun<T, F>(mut boxed: Pin<Box<Driven<T, F>>>, payload: Panic) -> (Meta<T>, Panicked) {
    let meta = boxed.as_mut().project().meta.take();
    let _ = catch_unwind(AssertUnwindSafe(move || drop(boxed)));
    (meta, Panicked::new(payload))
}

impl<K, T: Clone + Send + 'static> Run<K, T> {
    /// A leader whose `make` panicked: its flight ends with that panic, for every waiter.
    pub(super) fn failed(mut self, meta: Meta<T>, panicked: Panicked) -> Self {
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
    pub(super) fn complete(
        &mut self,
        meta: Meta<T>,
        out: Result<T, Panicked>,
    ) -> Result<T, Panicked> {
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
            Err(panic) => pass_on(panic),
        }
        out
    }

    /// Hands a failed attempt (ended as `end`) to the followers to retry, if it has retries
    /// left and a follower that can: counts its end and wakes the followers so that they elect
    /// the next driver (this driver keeps `out` either way; a waker's panic is passed on once
    /// all are woken). If not, returns the copy it made.
    // Not inlined: its copy of a large output stays out of `complete`'s frame.
    #[inline(never)]
    pub(super) fn retry(
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
            pass_on(panic);
        }
        Ok(())
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
