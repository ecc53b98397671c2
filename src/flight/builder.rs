//! [`GroupBuilder`]: a registry's options, and what they decide (which outputs linger).

use super::*;

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
    pub(super) fn lingering_copy<T>(
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

    pub(super) fn lingers(&self) -> bool {
        self.linger.is_some() || self.linger_errors.is_some()
    }
}

/// A copy of `out` to keep for `window`.
#[inline(never)]
pub(super) fn keep_copy<T>(
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
