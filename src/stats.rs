//! Counters of what a registry did, and their public snapshot.

/// A snapshot of a registry's counters, from [`Group::stats`](crate::Group::stats),
/// [`CoalesceService::stats`](crate::CoalesceService::stats), or the `stats` of the HTTP and
/// gRPC layers and services.
///
/// Counters only grow (except `in_flight`), from the registry's creation on. They count
/// registered flights: a call run alone (`over_capacity`, or a follower that calls alone after
/// its wait limit) counts only there, not in `leaders`, `errors` or `panics`.
///
/// Every request is counted once, as the first of: a leader (`leaders - retried`), a
/// follower, a lingering hit, a bypass or a call run over capacity. So, once the requests are
/// done, `leaders - retried + followers + lingered + bypassed + over_capacity` is the number of
/// requests; `timed_out` and `released` are among the followers; `errors + panics` is at most
/// `leaders` (each call ends once) and `cancelled` at most `leaders - retried` (each flight
/// once; a failed call handed to followers to retry, who all leave before the retry starts,
/// counts as an error and its flight as cancelled). A follower that takes a call over from a
/// leader that left is still counted as a follower (though, driving the call, no longer under
/// `max_followers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Calls started: flights, and retries of failed ones.
    pub leaders: u64,
    /// Requests that joined a running flight.
    pub followers: u64,
    /// Requests served a lingering output with no call.
    pub lingered: u64,
    /// Requests the key extractor returned no key for (the HTTP and gRPC layers: requests
    /// their rules pass through uncoalesced).
    pub bypassed: u64,
    /// Requests that did not get a shared output after all:
    /// `over_capacity + timed_out + released`.
    pub fell_through: u64,
    /// Requests run alone because of `max_in_flight` or `max_followers`.
    pub over_capacity: u64,
    /// Followers that stopped waiting at their wait limit (to call alone, or to fail).
    pub timed_out: u64,
    /// Followers of the HTTP and gRPC layers that were sent to make their own call because
    /// the flight's response could not be handed to them (not shareable, too large, a `Vary`
    /// mismatch, a failed call). Always 0 for `Group` and `CoalesceLayer`.
    pub released: u64,
    /// Calls a follower started to retry a failed one (`retry_failed`).
    pub retried: u64,
    /// Calls whose output was an error (retried ones included): `Err` from
    /// [`run_result`](crate::Group::run_result), [`run_retryable`](crate::Group::run_retryable)
    /// or the layers; through [`run`](crate::Group::run) every output is a success.
    pub errors: u64,
    /// Calls whose inner service panicked (retried ones included).
    pub panics: u64,
    /// Flights dropped because every waiter left.
    pub cancelled: u64,
    /// Entries removed by `forget`.
    pub forgotten: u64,
    /// Registered flights running now. A flight removed by `forget` no longer counts (nor
    /// holds a place under `max_in_flight`), though its call runs on for its waiters.
    pub in_flight: usize,
}

impl Stats {
    /// Every field by name, in declaration order: all counters but `in_flight`, a gauge. For
    /// exporters, which then need no change when a field is added (the struct is
    /// `#[non_exhaustive]`).
    ///
    /// ```
    /// use tower_coalesce::Group;
    ///
    /// let stats = Group::<u64>::new().stats();
    /// let text: String = stats
    ///     .fields()
    ///     .map(|(name, value)| format!("tower_coalesce_{name} {value}\n"))
    ///     .collect();
    /// assert!(text.starts_with("tower_coalesce_leaders 0\n"));
    /// assert_eq!(stats.fields().count(), 14);
    /// ```
    pub fn fields(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("leaders", self.leaders),
            ("followers", self.followers),
            ("lingered", self.lingered),
            ("bypassed", self.bypassed),
            ("fell_through", self.fell_through),
            ("over_capacity", self.over_capacity),
            ("timed_out", self.timed_out),
            ("released", self.released),
            ("retried", self.retried),
            ("errors", self.errors),
            ("panics", self.panics),
            ("cancelled", self.cancelled),
            ("forgotten", self.forgotten),
            ("in_flight", self.in_flight as u64),
        ]
        .into_iter()
    }
}

/// Per-shard counters, guarded by the shard's lock (so counting costs no atomic operation).
#[derive(Clone, Default, Debug)]
pub(crate) struct Counters {
    pub(crate) leaders: u64,
    pub(crate) followers: u64,
    pub(crate) lingered: u64,
    pub(crate) over_capacity: u64,
    pub(crate) errors: u64,
    pub(crate) panics: u64,
    pub(crate) cancelled: u64,
    pub(crate) forgotten: u64,
    /// Registered flights not yet finished.
    pub(crate) running: usize,
}

impl Counters {
    pub(crate) fn add(&mut self, other: &Counters) {
        self.leaders += other.leaders;
        self.followers += other.followers;
        self.lingered += other.lingered;
        self.over_capacity += other.over_capacity;
        self.errors += other.errors;
        self.panics += other.panics;
        self.cancelled += other.cancelled;
        self.forgotten += other.forgotten;
        self.running += other.running;
    }

    pub(crate) fn into_stats(self, [bypassed, timed_out, retried, released]: [u64; 4]) -> Stats {
        Stats {
            leaders: self.leaders,
            followers: self.followers,
            lingered: self.lingered,
            bypassed,
            fell_through: self.over_capacity + timed_out + released,
            over_capacity: self.over_capacity,
            timed_out,
            released,
            retried,
            errors: self.errors,
            panics: self.panics,
            cancelled: self.cancelled,
            forgotten: self.forgotten,
            in_flight: self.running,
        }
    }
}
