//! Third review of the flight span's lifetime (e4de30b, 25a873c): `leave_driving`,
//! `Registry::finish`, `publish`, `take_span`, `Run::rejoin`. Every path a flight ends by
//! must close its span exactly once, record its `outcome` and `waiters` on it (once), log its
//! "flight finished" event in it, and do all that with no lock held (a subscriber is user
//! code: one that calls back into the registry must not deadlock).
//!
//! In a test binary of its own: `tracing`'s callsite interest is process-wide. Tests that
//! install a subscriber run one at a time (`SERIAL`), each on a thread of its own with a
//! watchdog (`within`): a deadlock under a registry lock cannot be caught by a timeout inside
//! the test.
//!
//! Deterministic: futures are polled by hand with a no-op waker; gates are oneshot channels;
//! the one clock is tokio's paused one. No sleeps.
//!
//! Every flight path checked ends its span as it should. Found, minor and older than these
//! fixes, fixed since: a call run alone past a capacity bound, which is no flight, logged
//! "flight finished" (with no span) and, with `metrics`, counted in
//! `tower_coalesce_flights_total`, "one per flight when it ends".
#![cfg(feature = "tracing")]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::oneshot;
use tower_coalesce::{Group, GroupBuilder, Panicked, Run};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Res = Result<u32, &'static str>;
type Waiter = Run<u32, Res>;

const SEC: Duration = Duration::from_secs(1);

fn poll<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
}

fn pending<F: Future + Unpin>(f: &mut F, what: &str) {
    for _ in 0..3 {
        assert!(poll(f).is_pending(), "{what}: expected pending");
    }
}

fn ready<F: Future + Unpin>(f: &mut F, what: &str) -> F::Output {
    for _ in 0..16 {
        if let Poll::Ready(out) = poll(f) {
            return out;
        }
    }
    panic!("{what}: not ready after 16 polls");
}

fn out(r: Result<Res, Panicked>) -> Res {
    r.expect("no panic expected")
}

fn gated() -> (oneshot::Sender<Res>, impl FnOnce() -> BoxFut<Res> + Send) {
    let (tx, rx) = oneshot::channel::<Res>();
    let make = move || -> BoxFut<Res> { Box::pin(async move { rx.await.expect("gate dropped") }) };
    (tx, make)
}

fn now(v: Res) -> impl FnOnce() -> BoxFut<Res> + Send {
    move || -> BoxFut<Res> { Box::pin(async move { v }) }
}

/// Runs `f` on a thread of its own; fails if it makes no progress for a minute (a deadlock).
fn within<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => panic!("{what}: no progress in 60 s (deadlock)"),
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// A subscriber that keeps what each flight span recorded, with a hook run on every record
// and close (user code called back, its own lock let go)
// ---------------------------------------------------------------------------------------------

const FLIGHT: &str = "coalesce.flight";

/// What one flight span saw.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    /// Values recorded for `outcome`, in order.
    outcomes: Vec<String>,
    /// Values recorded for `waiters`, in order.
    waiters: Vec<u64>,
    /// "flight finished" events in this span: (outcome, waiters).
    finished: Vec<(String, u64)>,
    closed: usize,
}

#[derive(Default)]
struct Book {
    refs: HashMap<u64, (&'static str, usize)>,
    /// Flight spans in the order they were made.
    made: Vec<u64>,
    seen: HashMap<u64, Seen>,
    /// "flight finished" events with no parent span.
    orphan_events: Vec<(String, u64)>,
}

#[derive(Clone, Default)]
struct Rec(Arc<(AtomicU64, Mutex<Book>)>);

type Hook = Rc<dyn Fn()>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = RefCell::new(None);
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

fn set_hook(hook: impl Fn() + 'static) {
    HOOK.with(|h| *h.borrow_mut() = Some(Rc::new(hook)));
}

fn clear_hook() {
    HOOK.with(|h| h.borrow_mut().take());
}

/// Runs the hook, not from within itself.
fn run_hook() {
    if IN_HOOK.with(|f| f.replace(true)) {
        return;
    }
    let hook = HOOK.with(|h| h.borrow().clone());
    if let Some(hook) = hook {
        hook();
    }
    IN_HOOK.with(|f| f.set(false));
}

impl Rec {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.0 .1.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every flight span made so far, in order, with what it saw.
    fn spans(&self) -> Vec<Seen> {
        let book = self.book();
        book.made.iter().map(|id| book.seen[id].clone()).collect()
    }

    fn open(&self) -> usize {
        self.spans().iter().filter(|s| s.closed == 0).count()
    }

    fn orphan_events(&self) -> Vec<(String, u64)> {
        self.book().orphan_events.clone()
    }
}

/// The one ending a span must show once its flight ended: closed once, `outcome` and
/// `waiters` recorded once, one "flight finished" event in it with the same values.
fn ended(outcome: &str, waiters: u64) -> Seen {
    Seen {
        outcomes: vec![outcome.to_owned()],
        waiters: vec![waiters],
        finished: vec![(outcome.to_owned(), waiters)],
        closed: 1,
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    outcome: Option<String>,
    waiters: Option<u64>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            "outcome" => self.outcome = Some(text.trim_matches('"').to_owned()),
            "waiters" => self.waiters = text.parse().ok(),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "outcome" => self.outcome = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "waiters" {
            self.waiters = Some(value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "waiters" {
            self.waiters = u64::try_from(value).ok();
        }
    }
}

impl Subscriber for Rec {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let name = attrs.metadata().name();
        let id = self.0 .0.fetch_add(1, SeqCst) + 1;
        let mut book = self.book();
        book.refs.insert(id, (name, 1));
        if name == FLIGHT {
            book.made.push(id);
            book.seen.insert(id, Seen::default());
        }
        Id::from_u64(id)
    }

    fn clone_span(&self, id: &Id) -> Id {
        if let Some(r) = self.book().refs.get_mut(&id.into_u64()) {
            r.1 += 1;
        }
        id.clone()
    }

    fn try_close(&self, id: Id) -> bool {
        let flight = {
            let mut book = self.book();
            let key = id.into_u64();
            let Some(r) = book.refs.get_mut(&key) else {
                return false;
            };
            r.1 -= 1;
            if r.1 > 0 {
                return false;
            }
            let (name, _) = book.refs.remove(&key).expect("just seen");
            if let Some(seen) = book.seen.get_mut(&key) {
                seen.closed += 1;
            }
            name == FLIGHT
        };
        if flight {
            run_hook();
        }
        true
    }

    fn record(&self, id: &Id, values: &Record<'_>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        {
            let mut book = self.book();
            if let Some(seen) = book.seen.get_mut(&id.into_u64()) {
                seen.outcomes.extend(fields.outcome);
                seen.waiters.extend(fields.waiters);
            }
        }
        run_hook();
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message != "flight finished" {
            return;
        }
        let end = (
            fields.outcome.unwrap_or_default(),
            fields.waiters.unwrap_or(u64::MAX),
        );
        {
            let mut book = self.book();
            match event.parent().map(Id::into_u64) {
                Some(parent) => match book.seen.get_mut(&parent) {
                    Some(seen) => seen.finished.push(end),
                    None => book.orphan_events.push(end),
                },
                None => book.orphan_events.push(end),
            }
        }
        run_hook();
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Runs `test` with a fresh recorder installed, serialised and under the watchdog.
fn traced(what: &'static str, test: impl FnOnce(&Rec) + Send + 'static) {
    let _serial = serial();
    within(what, move || {
        let rec = Rec::default();
        let _default = tracing::subscriber::set_default(rec.clone());
        // Another thread may have left this crate's callsites' interest at "never".
        tracing::callsite::rebuild_interest_cache();
        test(&rec);
        clear_hook();
    });
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// 25a873c: a flight nobody joined, whose output lingers, records its outcome (the previous
/// fix took the entry's span before the output's holder was made from it, so the holder had
/// none to record on). It closes as the call ends, not at expiry; one waiter, the leader. The
/// same for a lingering failure (`linger_errors`), and for an output that does not linger.
#[test]
fn a_flight_nobody_joined_records_its_end_lingering_or_not() {
    traced("nobody joined", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new()
                .linger(30 * SEC)
                .linger_errors(30 * SEC)
                .build();
            assert_eq!(
                out(ready(&mut group.run_result(1, now(Ok(1))), "ok")),
                Ok(1)
            );
            assert_eq!(
                out(ready(&mut group.run_result(2, now(Err("e"))), "err")),
                Err("e")
            );
            let plain: Group<u32> = Group::new();
            assert_eq!(
                out(ready(&mut plain.run_result(3, now(Ok(3))), "plain")),
                Ok(3)
            );
            assert_eq!(group.len(), 2, "both outputs linger");
            assert_eq!(
                rec.spans(),
                [ended("ok", 1), ended("error", 1), ended("ok", 1)],
                "closed as each call ended, the outcome on the span"
            );
            // Lingering hits make no span and record nothing.
            assert_eq!(
                out(ready(&mut group.run_result(1, now(Ok(9))), "hit")),
                Ok(1)
            );
            tokio::time::advance(31 * SEC).await;
            group.purge_expired();
            assert_eq!(group.len(), 0);
            assert_eq!(rec.spans().len(), 3);
            assert!(rec.orphan_events().is_empty(), "{:?}", rec.orphan_events());
        });
    });
}

/// A lingering flight with followers held, unpolled: closed at publication with the waiters
/// it was handed to (three followers and the leader).
#[test]
fn a_lingering_flight_with_followers_records_every_waiter() {
    traced("lingering with followers", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new().linger_errors(30 * SEC).build();
            let (tx, make) = gated();
            let mut l = group.run_result(1, make);
            let mut fs: Vec<Waiter> = (0..3).map(|_| group.run_result(1, now(Ok(0)))).collect();
            pending(&mut l, "l");
            assert_eq!(rec.open(), 1);
            tx.send(Err("boom")).unwrap();
            assert_eq!(out(ready(&mut l, "l")), Err("boom"));
            assert_eq!(rec.spans(), [ended("error", 4)]);
            for f in &mut fs {
                assert_eq!(out(ready(f, "f")), Err("boom"));
            }
            assert_eq!(group.stats().errors, 1);
        });
    });
}

/// The driver leaves with followers (the call is orphaned, nobody polled it since); then the
/// followers leave, the last one cancelling the call: the span closes then, once, `cancelled`
/// with no waiter, the inner future dropped, the key free.
#[test]
fn an_orphaned_call_cancelled_by_its_last_follower_closes_once() {
    traced("orphan cancelled", |rec| {
        let group: Group<u32> = Group::new();
        let (tx, make) = gated();
        let mut l = group.run_result(1, make);
        let mut f1 = group.run_result(1, now(Ok(0)));
        let mut f2 = group.run_result(1, now(Ok(0)));
        pending(&mut l, "l");
        pending(&mut f1, "f1");
        pending(&mut f2, "f2");
        drop(l);
        assert_eq!(rec.open(), 1, "orphaned, not over");
        drop(f1);
        assert_eq!(rec.open(), 1, "one follower left");
        drop(f2);
        assert!(tx.is_closed(), "the call was dropped");
        assert_eq!(rec.spans(), [ended("cancelled", 0)]);
        assert!(group.is_empty());
        assert_eq!(group.stats().cancelled, 1);
    });
}

/// A follower that took the call over from a leader that left then leaves in turn, with
/// another follower still there: the call goes on (not cancelled); it ends once, `ok`, with
/// its two remaining waiters (the adopter and the follower).
#[test]
fn a_call_orphaned_twice_ends_once_with_its_last_waiters() {
    traced("orphaned twice", |rec| {
        let group: Group<u32> = Group::new();
        let (tx, make) = gated();
        let mut l = group.run_result(1, make);
        let mut a = group.run_result(1, now(Ok(0)));
        let mut b = group.run_result(1, now(Ok(0)));
        let mut c = group.run_result(1, now(Ok(0)));
        pending(&mut l, "l");
        for f in [&mut a, &mut b, &mut c] {
            pending(f, "follower");
        }
        drop(l);
        pending(&mut a, "a adopts");
        drop(a);
        pending(&mut b, "b adopts");
        assert_eq!(rec.open(), 1);
        tx.send(Ok(7)).unwrap();
        assert_eq!(out(ready(&mut b, "b")), Ok(7));
        assert_eq!(out(ready(&mut c, "c")), Ok(7));
        assert_eq!(rec.spans(), [ended("ok", 2)]);
        assert_eq!(group.stats().cancelled, 0);
    });
}

/// A forgotten flight whose driver then leaves, while a follower that joined before `forget`
/// stays: the follower takes the call over and the flight ends once, `ok`; a newer flight of
/// the key has a span of its own. Then a forgotten flight whose every waiter leaves: cancelled.
#[test]
fn forgotten_flights_end_once_whether_finished_or_cancelled() {
    traced("forgotten", |rec| {
        let group: Group<u32> = Group::new();
        let (tx, make) = gated();
        let mut l = group.run_result(1, make);
        let mut f = group.run_result(1, now(Ok(0)));
        pending(&mut l, "l");
        pending(&mut f, "f");
        assert!(group.forget(&1));
        let mut newer = group.run_result(1, now(Ok(2)));
        assert!(newer.is_leader());
        assert_eq!(out(ready(&mut newer, "newer")), Ok(2));
        drop(l);
        pending(&mut f, "f adopts the forgotten call");
        tx.send(Ok(1)).unwrap();
        assert_eq!(out(ready(&mut f, "f")), Ok(1));
        assert_eq!(rec.spans(), [ended("ok", 1), ended("ok", 1)]);

        let (tx, make) = gated();
        let mut l = group.run_result(3, make);
        let mut f = group.run_result(3, now(Ok(0)));
        pending(&mut l, "l");
        pending(&mut f, "f");
        assert!(group.forget(&3));
        drop(f);
        drop(l);
        assert!(tx.is_closed());
        assert_eq!(rec.spans()[2], ended("cancelled", 0));
        assert!(group.is_empty());
        let s = group.stats();
        assert_eq!((s.forgotten, s.cancelled, s.in_flight), (2, 1, 0), "{s:?}");
    });
}

/// `Run::rejoin`: a follower with no `make` of its own took the call over and it failed; it
/// parks again and another follower runs the retry. One span for the flight and its retry,
/// ended once (`ok`), with the waiters the retry's output went to: the re-parked adopter and
/// the retry's driver.
#[test]
fn an_adopted_failure_retried_by_another_follower_ends_once() {
    traced("rejoin", |rec| {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let (l_tx, l_make) = gated();
        let mut l = group.run_retryable(1, l_make);
        let mut a = group.run_result(1, now(Ok(0)));
        let (m_tx, m_make) = gated();
        let mut m = group.run_retryable(1, m_make);
        pending(&mut l, "l");
        pending(&mut a, "a");
        pending(&mut m, "m");
        drop(l);
        pending(&mut a, "a adopts");
        l_tx.send(Err("l's call")).unwrap();
        pending(&mut a, "a parks again");
        assert_eq!(rec.open(), 1, "retried: not over");
        assert!(rec.spans()[0].outcomes.is_empty(), "no outcome yet");
        pending(&mut m, "m runs the retry");
        m_tx.send(Ok(5)).unwrap();
        assert_eq!(out(ready(&mut m, "m")), Ok(5));
        assert_eq!(out(ready(&mut a, "a")), Ok(5));
        assert_eq!(rec.spans(), [ended("ok", 2)]);
        let s = group.stats();
        assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 1), "{s:?}");
    });
}

/// `Run::rejoin` with the adopter's own `make`: the retry is its own call. One span, ended
/// once with the retry's failure (no retry left), with the follower that waited and the
/// adopter.
#[test]
fn an_adopted_failure_retried_by_the_adopters_make_ends_once() {
    traced("rejoin with make", |rec| {
        let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
        let (l_tx, l_make) = gated();
        let mut l = group.run_retryable(1, l_make);
        let (a_tx, a_make) = gated();
        let mut a = group.run_retryable(1, a_make);
        let mut f = group.run_result(1, now(Ok(0)));
        pending(&mut l, "l");
        pending(&mut a, "a");
        pending(&mut f, "f");
        drop(l);
        pending(&mut a, "a adopts");
        l_tx.send(Err("l's call")).unwrap();
        pending(&mut a, "a retries with its make");
        assert!(rec.spans()[0].outcomes.is_empty());
        a_tx.send(Err("a's call")).unwrap();
        assert_eq!(out(ready(&mut a, "a")), Err("a's call"));
        assert_eq!(out(ready(&mut f, "f")), Err("a's call"));
        assert_eq!(rec.spans(), [ended("error", 2)]);
        let s = group.stats();
        assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 2), "{s:?}");
    });
}

/// A detached flight whose caller and followers all left: its task publishes to nobody, so
/// zero waiters (the task is no waiter), `ok`.
#[test]
fn a_detached_flight_left_by_everybody_records_no_waiter() {
    traced("detached", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new().detached(true).build();
            let (tx, make) = gated();
            let mut l = group.run_result(1, make);
            let mut f = group.run_result(1, now(Ok(0)));
            pending(&mut l, "l");
            pending(&mut f, "f");
            drop(l);
            drop(f);
            tokio::task::yield_now().await;
            assert_eq!(rec.open(), 1, "the call still runs");
            tx.send(Ok(1)).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(group.in_flight(), 0);
            assert_eq!(rec.spans(), [ended("ok", 0)]);
        });
    });
}

/// A subscriber that calls back into the registry on every record, event and close of a
/// flight span (stats, len, and a call of the very key, which copies a lingering output under
/// its flight's lock or starts a flight) never deadlocks, on every path a flight ends by:
/// nobody joined (lingering), published to followers, a driver's cancel, a follower's
/// cancel, the last maker leaving a retry, an adopted retry, a forgotten flight. Each span
/// ends as `ended` says.
#[test]
fn a_subscriber_calling_back_on_record_never_deadlocks() {
    traced("reentrant record", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            let group: Group<u32> = GroupBuilder::new().retry_failed(1).linger(30 * SEC).build();
            let key = Rc::new(Cell::new(0_u32));
            let calls = Rc::new(Cell::new(0_u32));
            let (g, k, c) = (group.clone(), key.clone(), calls.clone());
            set_hook(move || {
                c.set(c.get() + 1);
                let _ = (g.stats(), g.len(), g.in_flight());
                let mut again = g.run_result(k.get(), now(Ok(99)));
                let _ = poll(&mut again);
            });

            // 1. Nobody joined, lingering.
            key.set(1);
            assert_eq!(out(ready(&mut group.run_result(1, now(Ok(1))), "1")), Ok(1));

            // 2. Published to followers.
            key.set(2);
            let (tx, make) = gated();
            let mut l = group.run_result(2, make);
            let mut f = group.run_result(2, now(Ok(0)));
            pending(&mut l, "l2");
            tx.send(Ok(2)).unwrap();
            assert_eq!(out(ready(&mut l, "l2")), Ok(2));
            assert_eq!(out(ready(&mut f, "f2")), Ok(2));

            // 3. A driver's cancel.
            key.set(3);
            let (_tx, make) = gated();
            let mut l = group.run_result(3, make);
            pending(&mut l, "l3");
            drop(l);

            // 4. A follower's cancel (orphaned first).
            key.set(4);
            let (_tx, make) = gated();
            let mut l = group.run_result(4, make);
            let mut f = group.run_result(4, now(Ok(0)));
            pending(&mut l, "l4");
            pending(&mut f, "f4");
            drop(l);
            drop(f);

            // 5. The last maker leaves a retry: the failure goes to the others.
            key.set(5);
            let (tx, make) = gated();
            let mut l = group.run_retryable(5, make);
            let (_m_tx, m_make) = gated();
            let mut m = group.run_retryable(5, m_make);
            let mut f = group.run_result(5, now(Ok(0)));
            pending(&mut l, "l5");
            pending(&mut m, "m5");
            pending(&mut f, "f5");
            tx.send(Err("e5")).unwrap();
            assert_eq!(out(ready(&mut l, "l5")), Err("e5"));
            drop(m);
            assert_eq!(out(ready(&mut f, "f5")), Err("e5"));

            // 6. An adopted call retried with the adopter's make.
            key.set(6);
            let (tx, make) = gated();
            let mut l = group.run_retryable(6, make);
            let (a_tx, a_make) = gated();
            let mut a = group.run_retryable(6, a_make);
            pending(&mut l, "l6");
            pending(&mut a, "a6");
            drop(l);
            pending(&mut a, "a6 adopts");
            tx.send(Err("e6")).unwrap();
            pending(&mut a, "a6 retries");
            a_tx.send(Ok(6)).unwrap();
            assert_eq!(out(ready(&mut a, "a6")), Ok(6));

            // 7. A forgotten flight.
            key.set(7);
            let (tx, make) = gated();
            let mut l = group.run_result(7, make);
            let mut f = group.run_result(7, now(Ok(0)));
            pending(&mut l, "l7");
            assert!(group.forget(&7));
            tx.send(Ok(7)).unwrap();
            assert_eq!(out(ready(&mut l, "l7")), Ok(7));
            assert_eq!(out(ready(&mut f, "f7")), Ok(7));

            assert!(calls.get() > 0, "the hook ran");
            let spans = rec.spans();
            assert_eq!(rec.open(), 0, "{spans:#?}");
            for s in &spans {
                assert_eq!(s.closed, 1, "closed once: {s:?}");
                assert_eq!(s.outcomes.len(), 1, "one outcome per flight: {s:?}");
                assert_eq!(s.waiters.len(), 1, "{s:?}");
                assert_eq!(s.finished, [(s.outcomes[0].clone(), s.waiters[0])], "{s:?}");
            }
            let outcomes: Vec<&str> = spans.iter().map(|s| s.outcomes[0].as_str()).collect();
            for expected in ["cancelled", "error"] {
                assert!(outcomes.contains(&expected), "{outcomes:?}");
            }
            tokio::time::advance(31 * SEC).await;
            group.purge_expired();
            assert_eq!(group.len(), 0);
        });
    });
}

/// A call run alone past `max_in_flight` is no flight: it has no entry, no span, and `Stats`
/// leaves it out of `leaders` and `errors` ("`Stats` counts registered flights"). Yet it ends
/// through the same `trace_end` as a flight: a "flight finished" event with no span (and, with
/// `metrics`, one more `tower_coalesce_flights_total{outcome}`, documented as "one per flight
/// when it ends"), so the flights counted by the metric and the events no longer match the
/// flights `Stats` and the spans count.
#[test]

fn a_call_run_alone_ends_no_flight() {
    traced("alone", |rec| {
        let group: Group<u32> = GroupBuilder::new().max_in_flight(1).build();
        let (tx, make) = gated();
        let mut l = group.run_result(1, make);
        pending(&mut l, "l");
        let mut alone = group.run_result(2, now(Err("alone")));
        assert!(alone.is_alone());
        assert_eq!(out(ready(&mut alone, "alone")), Err("alone"));
        tx.send(Ok(1)).unwrap();
        assert_eq!(out(ready(&mut l, "l")), Ok(1));
        let s = group.stats();
        assert_eq!((s.leaders, s.errors, s.over_capacity), (1, 0, 1), "{s:?}");
        assert_eq!(rec.spans(), [ended("ok", 1)], "one flight, one span");
        assert_eq!(
            rec.orphan_events(),
            [],
            "a call that is no flight logged `flight finished`"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// The HTTP adapter: a response released for a Set-Cookie trailer did not fail
// ---------------------------------------------------------------------------------------------

/// A flight whose response goes to its leader alone for a `Set-Cookie` trailer ended `ok`
/// (it is counted as no error); one whose inner service returned an error, `error`. The
/// released followers' own calls are not flights: no span.
#[cfg(feature = "http")]
#[test]
fn an_http_flight_released_for_a_set_cookie_trailer_ends_ok() {
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, Request, Response};
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::convert::Infallible;
    use tower::{Layer, Service};
    use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

    traced("http set-cookie trailer", |rec| {
        let rt = paused_runtime();
        rt.block_on(async {
            for fail in [false, true] {
                let svc = tower::service_fn(move |_: Request<Full<Bytes>>| async move {
                    if fail {
                        return Err("inner error");
                    }
                    let mut trailers = HeaderMap::new();
                    trailers.insert("set-cookie", HeaderValue::from_static("s=1"));
                    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = vec![
                        Ok(http_body::Frame::data(Bytes::from_static(b"d"))),
                        Ok(http_body::Frame::trailers(trailers)),
                    ];
                    Ok(Response::new(BoxBody::new(StreamBody::new(
                        futures::stream::iter(frames),
                    ))))
                });
                let mut svc = CoalesceHttpLayer::new().layer(svc);
                let req = || {
                    Request::get("http://example.test/x")
                        .body(Full::new(Bytes::new()))
                        .unwrap()
                };
                let futs = vec![svc.call(req()), svc.call(req())];
                let done = futures::future::join_all(futs).await;
                if fail {
                    assert!(done.iter().all(Result::is_err));
                } else {
                    for (res, by) in done.into_iter().zip([ServedBy::Leader, ServedBy::Released]) {
                        let res = res.unwrap();
                        assert_eq!(res.extensions().get::<ServedBy>(), Some(&by));
                        let body = res.into_body().collect().await.unwrap();
                        assert_eq!(body.trailers().unwrap()["set-cookie"], "s=1");
                    }
                }
                assert_eq!(svc.stats().errors, u64::from(fail));
            }
            // One flight each, handed to its leader and its follower (which then calls).
            assert_eq!(rec.spans(), [ended("ok", 2), ended("error", 2)]);
        });
    });
}
