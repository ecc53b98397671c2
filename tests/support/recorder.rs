//! A recording `tracing` subscriber for the flight span's tests: it keeps every span's
//! references, what each flight span recorded and every event, and runs user code (the hook)
//! from its methods with its own lock let go, never from within itself. Tests that install it
//! run one at a time (`serial`), each on a thread of its own under the watchdog (`traced`): a
//! subscriber called under a registry lock that calls back into the registry deadlocks, which
//! no timeout inside the test could catch.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

use super::within;

/// The name of a flight's span.
pub const FLIGHT: &str = "coalesce.flight";

// ---------------------------------------------------------------------------------------------
// One at a time, with a watchdog
// ---------------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Held by each test that installs a subscriber: `tracing`'s callsite interest is
/// process-wide.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes `rec` this thread's subscriber (dropped with the guard).
pub fn install(rec: &Rec) -> tracing::subscriber::DefaultGuard {
    let guard = tracing::subscriber::set_default(rec.clone());
    // Another thread may have left this crate's callsites' interest at "never".
    tracing::callsite::rebuild_interest_cache();
    guard
}

/// Runs `test` with a fresh recorder installed, serialised and under the watchdog; clears the
/// hook after.
pub fn traced(what: &'static str, test: impl FnOnce(&Rec) + Send + 'static) {
    let _serial = serial();
    within(what, move || {
        let rec = Rec::default();
        let _default = install(&rec);
        test(&rec);
        clear_hook();
    });
}

// ---------------------------------------------------------------------------------------------
// The hook
// ---------------------------------------------------------------------------------------------

/// Which subscriber method ran the hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Callback {
    NewFlightSpan,
    NewSpan,
    Clone,
    Close,
    Record,
    Event,
    Enter,
    Exit,
}

/// When the hook runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    /// From every subscriber method.
    Every,
    /// When a flight's span closes.
    FlightClosed,
    /// When a flight's span closes, on every record, and on every "flight finished" event.
    FlightEnded,
}

#[derive(Clone)]
struct Hook {
    when: When,
    run: Rc<dyn Fn(Callback)>,
}

thread_local! {
    /// User code run from the subscriber's methods, with the subscriber's own lock let go.
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

fn hook_on(when: When, run: impl Fn(Callback) + 'static) {
    let hook = Hook {
        when,
        run: Rc::new(run),
    };
    HOOK.with(|h| *h.borrow_mut() = Some(hook));
}

/// Runs `hook` from every subscriber method.
pub fn set_hook(hook: impl Fn(Callback) + 'static) {
    hook_on(When::Every, hook);
}

/// Runs `hook` when a flight's span closes.
pub fn on_flight_close(hook: impl Fn() + 'static) {
    hook_on(When::FlightClosed, move |_| hook());
}

/// Runs `hook` when a flight's span closes, on every record, and on every "flight finished"
/// event.
pub fn on_flight_end(hook: impl Fn() + 'static) {
    hook_on(When::FlightEnded, move |_| hook());
}

pub fn clear_hook() {
    HOOK.with(|h| h.borrow_mut().take());
}

/// What a subscriber method saw, for the hook.
#[derive(Clone, Copy)]
struct Seen {
    cb: Callback,
    /// A flight's span closed (its last reference let go).
    flight_closed: bool,
    /// A "flight finished" event.
    flight_finished: bool,
}

impl Seen {
    fn of(cb: Callback) -> Seen {
        Seen {
            cb,
            flight_closed: false,
            flight_finished: false,
        }
    }
}

/// Runs the hook if it is set for what was `seen`, not from within itself; whether it ran.
fn run_hook(seen: Seen) -> bool {
    let Some(hook) = HOOK.with(|h| h.borrow().clone()) else {
        return false;
    };
    let wanted = match hook.when {
        When::Every => true,
        When::FlightClosed => seen.flight_closed,
        When::FlightEnded => {
            seen.flight_closed || seen.cb == Callback::Record || seen.flight_finished
        }
    };
    if !wanted || IN_HOOK.with(|f| f.replace(true)) {
        return false;
    }
    (hook.run)(seen.cb);
    IN_HOOK.with(|f| f.set(false));
    true
}

// ---------------------------------------------------------------------------------------------
// The recorder
// ---------------------------------------------------------------------------------------------

/// An event logged.
#[derive(Clone, Debug)]
pub struct Logged {
    pub message: String,
    /// Whether it has a `key_hash`.
    pub key_hash: bool,
    pub parent: Option<u64>,
    pub outcome: Option<String>,
    pub waiters: Option<u64>,
}

impl Logged {
    fn finished(&self) -> bool {
        self.message == "flight finished"
    }

    /// A "flight finished" event's (outcome, waiters).
    fn end(&self) -> (String, u64) {
        (
            self.outcome.clone().unwrap_or_default(),
            self.waiters.unwrap_or(u64::MAX),
        )
    }
}

/// What one flight span saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flight {
    /// Values recorded for `outcome`, in order.
    pub outcomes: Vec<String>,
    /// Values recorded for `waiters`, in order.
    pub waiters: Vec<u64>,
    /// "flight finished" events in this span: (outcome, waiters).
    pub finished: Vec<(String, u64)>,
    pub closed: usize,
}

/// The one ending a span must show once its flight ended: closed once, `outcome` and
/// `waiters` recorded once, one "flight finished" event in it with the same values.
pub fn ended(outcome: &str, waiters: u64) -> Flight {
    Flight {
        outcomes: vec![outcome.to_owned()],
        waiters: vec![waiters],
        finished: vec![(outcome.to_owned(), waiters)],
        closed: 1,
    }
}

#[derive(Default)]
pub struct Book {
    live: Spans,
    /// Flight spans, in the order they were made.
    pub flights_made: Vec<u64>,
    /// Flight spans, in the order they closed.
    pub flights_closed: Vec<u64>,
    /// What each flight span recorded and how often it closed (`finished` is left empty).
    flights: HashMap<u64, Flight>,
    /// Spans entered.
    pub entered: Vec<u64>,
    pub events: Vec<Logged>,
    /// The hook's runs, by the method that ran it.
    pub hooked: HashMap<Callback, usize>,
}

#[derive(Default)]
pub struct Shared {
    next: AtomicU64,
    book: Mutex<Book>,
    /// `new_span` of a flight's span panics.
    pub explode: AtomicBool,
}

#[derive(Clone, Default)]
pub struct Rec(pub Arc<Shared>);

impl Rec {
    pub fn book(&self) -> MutexGuard<'_, Book> {
        self.0.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the hook and counts it.
    fn reenter(&self, seen: Seen) {
        if run_hook(seen) {
            *self.book().hooked.entry(seen.cb).or_default() += 1;
        }
    }

    /// The events logged with `message`.
    pub fn events(&self, message: &str) -> Vec<Logged> {
        self.book()
            .events
            .iter()
            .filter(|e| e.message == message)
            .cloned()
            .collect()
    }

    /// Flight spans made, and closed (sorted).
    pub fn flights(&self) -> (Vec<u64>, Vec<u64>) {
        let book = self.book();
        let mut made = book.flights_made.clone();
        let mut closed = book.flights_closed.clone();
        made.sort_unstable();
        closed.sort_unstable();
        (made, closed)
    }

    pub fn open_flights(&self) -> usize {
        let (made, closed) = self.flights();
        made.len() - closed.len()
    }

    /// "flight finished" events: their parent span and outcome.
    pub fn finished(&self) -> Vec<(Option<u64>, String)> {
        self.book()
            .events
            .iter()
            .filter(|e| e.finished())
            .map(|e| (e.parent, e.outcome.clone().unwrap_or_default()))
            .collect()
    }

    /// Every flight span made so far, in order, with what it saw.
    pub fn spans(&self) -> Vec<Flight> {
        let book = self.book();
        book.flights_made
            .iter()
            .map(|id| {
                let mut flight = book.flights[id].clone();
                flight.finished = book
                    .events
                    .iter()
                    .filter(|e| e.finished() && e.parent == Some(*id))
                    .map(Logged::end)
                    .collect();
                flight
            })
            .collect()
    }

    /// Flight spans not closed.
    pub fn open(&self) -> usize {
        self.spans().iter().filter(|s| s.closed == 0).count()
    }

    /// "flight finished" events in no flight's span: (outcome, waiters).
    pub fn orphan_events(&self) -> Vec<(String, u64)> {
        let book = self.book();
        book.events
            .iter()
            .filter(|e| e.finished() && !e.parent.is_some_and(|p| book.flights.contains_key(&p)))
            .map(Logged::end)
            .collect()
    }
}

impl Subscriber for Rec {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let name = attrs.metadata().name();
        let flight = name == FLIGHT;
        if flight && self.0.explode.load(SeqCst) {
            panic!("subscriber exploded in new_span");
        }
        let id = self.0.next.fetch_add(1, SeqCst) + 1;
        {
            let mut book = self.book();
            book.live.open(id, name);
            if flight {
                book.flights_made.push(id);
                book.flights.insert(id, Flight::default());
            }
        }
        self.reenter(Seen::of(match flight {
            true => Callback::NewFlightSpan,
            false => Callback::NewSpan,
        }));
        Id::from_u64(id)
    }

    fn clone_span(&self, id: &Id) -> Id {
        self.book().live.clone_ref(id.into_u64());
        self.reenter(Seen::of(Callback::Clone));
        id.clone()
    }

    fn try_close(&self, id: Id) -> bool {
        let (closed, flight) = {
            let mut book = self.book();
            let key = id.into_u64();
            match book.live.drop_ref(key) {
                Dropped::Unknown => return false,
                Dropped::Held => (false, false),
                Dropped::Closed(name) => {
                    let flight = name == FLIGHT;
                    if flight {
                        book.flights_closed.push(key);
                    }
                    if let Some(seen) = book.flights.get_mut(&key) {
                        seen.closed += 1;
                    }
                    (true, flight)
                }
            }
        };
        self.reenter(Seen {
            flight_closed: flight,
            ..Seen::of(Callback::Close)
        });
        closed
    }

    fn record(&self, id: &Id, values: &Record<'_>) {
        let fields = Fields::of_record(values);
        if let Some(seen) = self.book().flights.get_mut(&id.into_u64()) {
            seen.outcomes.extend(fields.outcome);
            seen.waiters.extend(fields.waiters);
        }
        self.reenter(Seen::of(Callback::Record));
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let fields = Fields::of_event(event);
        let logged = Logged {
            message: fields.message,
            key_hash: fields.key_hash,
            parent: event.parent().map(Id::into_u64),
            outcome: fields.outcome,
            waiters: fields.waiters,
        };
        let flight_finished = logged.finished();
        self.book().events.push(logged);
        self.reenter(Seen {
            flight_finished,
            ..Seen::of(Callback::Event)
        });
    }

    fn enter(&self, id: &Id) {
        self.book().entered.push(id.into_u64());
        self.reenter(Seen::of(Callback::Enter));
    }

    fn exit(&self, _: &Id) {
        self.reenter(Seen::of(Callback::Exit));
    }
}

// ---------------------------------------------------------------------------------------------
// Spans' references
// ---------------------------------------------------------------------------------------------

/// Spans open: name and reference count.
#[derive(Default)]
struct Spans(HashMap<u64, (&'static str, usize)>);

/// What dropping a reference to a span did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dropped {
    /// The span is not open.
    Unknown,
    /// Other references are left.
    Held,
    /// That was the last: the span, with this name, is closed.
    Closed(&'static str),
}

impl Spans {
    fn open(&mut self, id: u64, name: &'static str) {
        self.0.insert(id, (name, 1));
    }

    fn clone_ref(&mut self, id: u64) {
        if let Some(live) = self.0.get_mut(&id) {
            live.1 += 1;
        }
    }

    fn drop_ref(&mut self, id: u64) -> Dropped {
        let Some(live) = self.0.get_mut(&id) else {
            return Dropped::Unknown;
        };
        live.1 -= 1;
        if live.1 > 0 {
            return Dropped::Held;
        }
        let (name, _) = self.0.remove(&id).expect("just seen");
        Dropped::Closed(name)
    }
}

// ---------------------------------------------------------------------------------------------
// Fields
// ---------------------------------------------------------------------------------------------

/// The fields the tests look at, of one event or record.
#[derive(Default, Debug)]
struct Fields {
    message: String,
    /// Whether a `key_hash` was recorded.
    key_hash: bool,
    outcome: Option<String>,
    waiters: Option<u64>,
}

impl Fields {
    fn of_event(event: &Event<'_>) -> Fields {
        let mut fields = Fields::default();
        event.record(&mut fields);
        fields
    }

    fn of_record(values: &Record<'_>) -> Fields {
        let mut fields = Fields::default();
        values.record(&mut fields);
        fields
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            "key_hash" => self.key_hash = true,
            "outcome" => self.outcome = Some(text.trim_matches('"').to_owned()),
            "waiters" => self.waiters = text.parse().ok(),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "outcome" => self.outcome = Some(value.to_owned()),
            _ => self.record_debug(field, &value),
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "waiters" => self.waiters = Some(value),
            _ => self.record_debug(field, &value),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        match field.name() {
            "waiters" => self.waiters = u64::try_from(value).ok(),
            _ => self.record_debug(field, &value),
        }
    }
}
