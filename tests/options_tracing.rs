//! The `tracing` feature: one `coalesce.flight` span per flight, with the key's hash, the
//! number of waiters and the outcome.
//!
//! One global subscriber serves the whole binary and routes each span to the collector of the
//! thread that made it. Every test here installs it first, before any flight exists: a span
//! callsite registered by another thread while the global subscriber is being set can keep a
//! stale "never" interest (seen once in 200 runs when these tests shared a binary with others).
#![cfg(feature = "tracing")]

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

mod options_support;
use options_support::*;

use std::collections::HashMap;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// The fields of one span, as strings.
type Fields = HashMap<String, String>;

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

/// Collects the fields of the `coalesce.flight` spans created on one test's thread, and
/// hands them over when they close.
#[derive(Clone, Default)]
struct Flights {
    closed: Arc<Mutex<Vec<Fields>>>,
}

/// The spans open now, each with its fields and the collector of the thread it was made on.
type Open = HashMap<u64, (Flights, Fields)>;

/// One global subscriber for the whole test binary. Scoped subscribers (`set_default`) race
/// with other test threads over tracing's global interest cache, so a span can go missing;
/// a global one does not, and it routes each span to its thread's collector.
#[derive(Default)]
struct Router {
    threads: Mutex<HashMap<std::thread::ThreadId, Flights>>,
    open: Mutex<Open>,
}

static ROUTER: std::sync::OnceLock<Arc<Router>> = std::sync::OnceLock::new();

struct RouterLayer(Arc<Router>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for RouterLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: LayerContext<'_, S>) {
        if attrs.metadata().name() != "coalesce.flight" {
            return;
        }
        let me = std::thread::current().id();
        let Some(flights) = self.0.threads.lock().unwrap().get(&me).cloned() else {
            return;
        };
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        self.0
            .open
            .lock()
            .unwrap()
            .insert(id.into_u64(), (flights, fields));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: LayerContext<'_, S>) {
        if let Some((_, fields)) = self.0.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Visitor(fields));
        }
    }
    fn on_close(&self, id: Id, _: LayerContext<'_, S>) {
        let span = self.0.open.lock().unwrap().remove(&id.into_u64());
        if let Some((flights, fields)) = span {
            flights.closed.lock().unwrap().push(fields);
        }
    }
}

/// Stops collecting for its thread when dropped.
struct Installed(Flights);

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(router) = ROUTER.get() {
            router
                .threads
                .lock()
                .unwrap()
                .remove(&std::thread::current().id());
        }
    }
}

impl Flights {
    /// Collects the spans made on this thread (the test's current-thread runtime).
    fn install() -> Installed {
        let router = ROUTER.get_or_init(|| {
            let router = Arc::new(Router::default());
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(RouterLayer(router.clone())),
            )
            .expect("no other global subscriber in this test binary");
            router
        });
        let flights = Flights::default();
        router
            .threads
            .lock()
            .unwrap()
            .insert(std::thread::current().id(), flights.clone());
        Installed(flights)
    }
    fn closed(&self) -> Vec<Fields> {
        self.closed.lock().unwrap().clone()
    }
}

fn field<'a>(span: &'a Fields, name: &str) -> &'a str {
    span.get(name)
        .unwrap_or_else(|| panic!("no field {name} in {span:?}"))
}

#[tokio::test(start_paused = true)]
async fn one_span_per_flight_with_key_hash_waiters_and_outcome() {
    let installed = Flights::install();
    let flights = &installed.0;
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().layer(backend);
        let w: Vec<_> = (0..3).map(|_| spawn(start(&mut svc, 1))).collect();
        ctl.next().await.ok("one");
        for w in w {
            ok(done("key 1", w).await);
        }
        let w = spawn(start(&mut svc, 2));
        ctl.next().await.err("two");
        boom(done("key 2", w).await);
        let w: Vec<_> = (0..2).map(|_| spawn(start(&mut svc, 3))).collect();
        ctl.next().await.panic("three");
        for w in w {
            assert!(done("key 3", w).await.unwrap_err().is_panic());
        }
        let bypass = spawn(start(&mut svc, 0));
        ctl.next().await.ok("bypass");
        ok(done("bypass", bypass).await);
    })
    .await;

    let closed = flights.closed();
    assert_eq!(
        closed.len(),
        3,
        "one span per flight, none for a bypass: {closed:?}"
    );
    let expected = [("3", "ok"), ("1", "error"), ("2", "panicked")];
    for (span, (waiters, outcome)) in closed.iter().zip(expected) {
        assert_eq!(field(span, "waiters"), waiters, "{span:?}");
        assert_eq!(field(span, "outcome"), outcome, "{span:?}");
        field(span, "key_hash")
            .parse::<u64>()
            .expect("a u64 key hash");
    }
    // Keys 1, 2 and 3 hash apart; equal keys of one registry hash alike.
    assert_ne!(field(&closed[0], "key_hash"), field(&closed[1], "key_hash"));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_flight_span_records_its_outcome() {
    let installed = Flights::install();
    let flights = &installed.0;
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().layer(backend);
        let mut leader = Box::pin(start(&mut svc, 1));
        assert!(futures::poll!(leader.as_mut()).is_pending());
        let _call = ctl.next().await;
        drop(leader);
    })
    .await;
    let closed = flights.closed();
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(field(&closed[0], "outcome"), "cancelled", "{closed:?}");
}

#[tokio::test(start_paused = true)]
async fn a_detached_flight_span_counts_its_waiters() {
    let installed = Flights::install();
    let flights = &installed.0;
    bounded("test", async {
        let (backend, mut ctl) = backend();
        let mut svc = layer().detached(true).layer(backend);
        let w: Vec<_> = (0..3).map(|_| spawn(start(&mut svc, 1))).collect();
        ctl.next().await.ok("one");
        for w in w {
            ok(done("key 1", w).await);
        }
        until("the flight span closed", || !flights.closed().is_empty()).await;
    })
    .await;
    let closed = flights.closed();
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(field(&closed[0], "outcome"), "ok");
    assert_eq!(
        field(&closed[0], "waiters"),
        "3",
        "a leader and two followers"
    );
}
