//! Captures `coalesce.flight` spans for tests (feature `tracing`).
//!
//! One global subscriber for the test binary routes each span to the collector of the thread
//! that made it (each test runs on its own current-thread runtime). Scoped subscribers
//! (`set_default`) race with other test threads over tracing's global interest cache, so a
//! span could go missing; a global one does not.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

pub type Fields = HashMap<String, String>;

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

#[derive(Clone, Default)]
pub struct Flights {
    closed: Arc<Mutex<Vec<Fields>>>,
}

#[derive(Default)]
pub struct Router {
    threads: Mutex<HashMap<std::thread::ThreadId, Flights>>,
    open: Mutex<HashMap<u64, (Flights, Fields)>>,
}

static ROUTER: OnceLock<Arc<Router>> = OnceLock::new();

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

pub struct Installed(pub Flights);

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

/// Sets the global subscriber once, before the test makes any flight (a callsite
/// registered while it is being set could keep a stale interest).
pub fn init() -> &'static Arc<Router> {
    ROUTER.get_or_init(|| {
        let router = Arc::new(Router::default());
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(RouterLayer(router.clone())),
        )
        .expect("no other global subscriber in this test binary");
        router
    })
}

/// Collects the `coalesce.flight` spans made on this thread from now on.
pub fn install() -> Installed {
    let router = init();
    let flights = Flights::default();
    router
        .threads
        .lock()
        .unwrap()
        .insert(std::thread::current().id(), flights.clone());
    Installed(flights)
}

impl Flights {
    /// Collects the spans made on this thread (the test's current-thread runtime).
    pub fn install() -> Installed {
        install()
    }

    pub fn closed(&self) -> Vec<Fields> {
        self.closed.lock().unwrap().clone()
    }
}

pub fn field<'a>(span: &'a Fields, name: &str) -> &'a str {
    span.get(name)
        .unwrap_or_else(|| panic!("no field {name} in {span:?}"))
}
