//! Review (session 10, public API): compile-time bounds of every public type, composition with
//! tower's own middleware, `tower-test`, axum and tonic, the error type's `source()`/downcast
//! behaviour, and README prose claims, all through the public API only.
//!
//! Its findings, and what became of them:
//! - no response future (`ResponseFuture`, `Run`, HTTP/gRPC) is ever `Sync`, so tower's
//!   `ServiceBuilder::boxed_clone_sync()` does not compile over the layer (left; commented-out
//!   code below);
//! - `CoalesceBody` was not `Default`, which tower-http's timeout/CORS/auth layers need (fixed);
//! - `CoalesceGrpcService` is not a tonic `NamedService`, and the gRPC layer hands its inner
//!   service `CoalesceBody<B>`, so a tonic `Channel` needs a `map_request` (both documented);
//! - `CoalesceError` had no public constructor (fixed: `CoalesceError::new`);
//! - `CoalesceError`'s `Display` repeats its `source()`'s message (kept as tower does; ignored
//!   test);
//! - the HTTP layer called its inner service only when polled, so tower-test's `call` +
//!   `assert_request_eq!` pattern hung (fixed).
//!
//! No sleep decides anything: backends hold their calls behind a `watch` gate the test opens
//! once every waiter is where it should be (checked by yielding, bounded by a timeout); the
//! only timer tests run on paused time.
#![cfg(feature = "grpc")]

use std::cell::Cell;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;
use tower::util::{BoxCloneService, BoxCloneSyncService, BoxService};
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_coalesce::grpc::{
    CoalesceGrpcLayer, CoalesceGrpcService, GrpcServiceBuilderExt,
    ResponseFuture as GrpcResponseFuture, DEFAULT_REQUEST_LIMIT, DEFAULT_RESPONSE_LIMIT,
};
use tower_coalesce::http::{
    CoalesceBody, CoalesceHttpLayer, CoalesceHttpService, HttpServiceBuilderExt,
    ResponseFuture as HttpResponseFuture, ServedBy, DEFAULT_MAX_BODY_BYTES,
};
use tower_coalesce::{
    CoalesceError, CoalesceLayer, CoalesceService, Group, GroupBuilder, OnTimeout, Panicked,
    ResponseFuture, Run, ServiceBuilderExt, Stats,
};
use tower_test::assert_request_eq;

#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/catalog.v1.rs");
}

const LIMIT: Duration = Duration::from_secs(20);
const GET_ITEM: &str = "/catalog.v1.Catalog/GetItem";

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The inner service's own error: not `Clone`, so it can only reach followers through an `Arc`.
#[derive(Debug)]
struct MyError(String);

impl fmt::Display for MyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend failed for {}", self.0)
    }
}

impl StdError for MyError {}

/// A gate every backend call waits behind until the test opens it.
struct Gate(watch::Sender<bool>);

impl Gate {
    fn new() -> Self {
        Gate(watch::channel(false).0)
    }

    fn open(&self) {
        self.0.send_replace(true);
    }

    fn receiver(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

async fn pass(mut gate: watch::Receiver<bool>) {
    gate.wait_for(|open| *open).await.expect("gate kept open");
}

/// A nameable backend: counts calls, waits for the gate, then answers by key:
/// `err*` fails with [`MyError`], `panic*` panics, `flaky*` fails on its first call only,
/// anything else is `value of <key>`.
#[derive(Clone, Debug)]
struct Backend {
    calls: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
}

impl Backend {
    fn new(gate: &Gate) -> Self {
        Backend {
            calls: Arc::default(),
            gate: gate.receiver(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
}

type BackendFuture = Pin<Box<dyn Future<Output = Result<String, MyError>> + Send>>;

impl Service<String> for Backend {
    type Response = String;
    type Error = MyError;
    type Future = BackendFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), MyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: String) -> BackendFuture {
        let n = self.calls.fetch_add(1, SeqCst) + 1;
        let gate = self.gate.clone();
        Box::pin(async move {
            pass(gate).await;
            if key.starts_with("err") {
                Err(MyError(key))
            } else if key.starts_with("panic") {
                panic!("backend panicked for {key}");
            } else if key.starts_with("flaky") && n == 1 {
                Err(MyError(key))
            } else {
                Ok(format!("value of {key}"))
            }
        })
    }
}

type Extract = fn(&String) -> Option<String>;

#[allow(clippy::ptr_arg)] // the extractor's signature is `Fn(&Req)`, `Req = String`
fn by_key(key: &String) -> Option<String> {
    Some(key.clone())
}

fn layer() -> CoalesceLayer<Extract, String> {
    CoalesceLayer::new(by_key as Extract)
}

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("test timed out (a waiter hung)");
}

/// Yields until `ready` holds; the test's `bounded` timeout catches a hang.
async fn until(ready: impl Fn() -> bool) {
    while !ready() {
        tokio::task::yield_now().await;
    }
}

/// `n` concurrent requests for one key through `svc` (spawned), released once the backend
/// holds one call and the registry counts `n - 1` followers; returns the responses.
async fn stampede<S>(
    svc: S,
    key: &str,
    n: usize,
    backend: &Backend,
    gate: &Gate,
    stats: impl Fn() -> Stats,
) -> Vec<Result<String, BoxError>>
where
    S: Service<String, Response = String> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    let base = stats().followers;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let call = svc.clone().oneshot(key.to_string());
            tokio::spawn(async move { call.await.map_err(Into::into) })
        })
        .collect();
    until(|| backend.calls() >= 1 && stats().followers - base == n as u64 - 1).await;
    gate.open();
    join_all(tasks)
        .await
        .into_iter()
        .map(|joined| joined.expect("task"))
        .collect()
}

fn assert_all_value(results: &[Result<String, BoxError>], key: &str) {
    for r in results {
        assert_eq!(
            r.as_ref().map_err(ToString::to_string).map(String::as_str),
            Ok(format!("value of {key}").as_str())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Compile-time assertions
// ---------------------------------------------------------------------------------------------

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}
fn assert_static<T: 'static>() {}
fn assert_clone<T: Clone>() {}
fn assert_copy<T: Copy>() {}
fn assert_debug<T: fmt::Debug>() {}
fn assert_display<T: fmt::Display>() {}
fn assert_default<T: Default>() {}
fn assert_unpin<T: Unpin>() {}
fn assert_eq_hash<T: Eq + Hash>() {}
fn assert_error<T: StdError + Send + Sync + 'static>() {}
fn assert_into_box_error<T: Into<BoxError>>() {}
fn assert_future<F: Future>() {}
fn assert_layer<L: Layer<S>, S>() {}
fn assert_service<S: Service<R>, R>() {}
fn assert_all<T: Send + Sync + Clone + fmt::Debug + 'static>() {}
fn assert_send_sync_val<T: Send + Sync>(_: &T) {}
fn assert_clone_val<T: Clone>(_: &T) {}
fn assert_debug_val<T: fmt::Debug>(_: &T) {}

/// An inner service whose response is `Send` but not `Sync`, and a request that is not `Sync`:
/// the docs say the response need not be `Sync` (each follower gets its own clone).
#[derive(Clone, Debug)]
struct CellService;

impl Service<Cell<u32>> for CellService {
    type Response = Cell<u32>;
    type Error = Infallible;
    type Future = futures::future::Ready<Result<Cell<u32>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Cell<u32>) -> Self::Future {
        futures::future::ready(Ok(Cell::new(req.get() + 1)))
    }
}

/// A key that is `Send` but not `Sync` (the core asks only for `Send`).
#[derive(Clone, Debug)]
struct UnsyncKey(u32, PhantomData<Cell<()>>);

impl PartialEq for UnsyncKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for UnsyncKey {}
impl Hash for UnsyncKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

type CellExtract = fn(&Cell<u32>) -> Option<UnsyncKey>;

fn cell_key(c: &Cell<u32>) -> Option<UnsyncKey> {
    Some(UnsyncKey(c.get(), PhantomData))
}

type Mock = tower_test::mock::Mock<String, String>;
type AxumBody = axum::body::Body;
type TonicBody = tonic::body::Body;
type Catalog = pb::catalog_server::CatalogServer<Handler>;
type Routes = tonic::service::Routes;

#[test]
fn core_types_have_the_expected_auto_traits_and_impls() {
    // The layer, with a nameable extractor and with a closure.
    assert_all::<CoalesceLayer<Extract, String>>();
    assert_layer::<CoalesceLayer<Extract, String>, Backend>();
    let closure_layer = CoalesceLayer::new(|k: &u64| Some(*k));
    assert_send_sync_val(&closure_layer);
    assert_clone_val(&closure_layer);
    assert_debug_val(&closure_layer);

    // The service, over a nameable backend, tower-test's mock, a boxed service and a
    // `Send`-only response/request/key.
    assert_all::<CoalesceService<Backend, Extract, String>>();
    assert_service::<CoalesceService<Backend, Extract, String>, String>();
    assert_all::<CoalesceService<Mock, Extract, String>>();
    assert_service::<CoalesceService<Mock, Extract, String>, String>();
    assert_send::<CoalesceService<BoxCloneService<String, String, BoxError>, Extract, String>>();
    assert_clone::<CoalesceService<BoxCloneService<String, String, BoxError>, Extract, String>>();
    assert_all::<CoalesceService<CellService, CellExtract, UnsyncKey>>();
    assert_service::<CoalesceService<CellService, CellExtract, UnsyncKey>, Cell<u32>>();
    let svc = closure_layer.layer(service_fn(|k: u64| async move { Ok::<_, Infallible>(k) }));
    assert_send_sync_val(&svc);
    assert_clone_val(&svc);
    assert_debug_val(&svc);
    // The service's accessors, and `CoalesceService::new` with a registry of its own.
    let mut own = CoalesceService::new(Backend::new(&Gate::new()), by_key as Extract);
    assert_eq!(own.get_ref().calls(), 0);
    assert_eq!(own.get_mut().calls(), 0);
    assert_eq!((own.in_flight(), own.group().len()), (0, 0));
    assert_eq!(own.into_inner().calls(), 0);

    // The response future: `Send`, `Debug`, `Unpin`, `'static`.
    type Fut = ResponseFuture<Backend, String, String>;
    assert_send::<Fut>();
    assert_debug::<Fut>();
    assert_unpin::<Fut>();
    assert_static::<Fut>();
    assert_future::<Fut>();
    assert_send::<ResponseFuture<Mock, String, String>>();
    assert_send::<ResponseFuture<CellService, Cell<u32>, UnsyncKey>>();
    assert_unpin::<ResponseFuture<CellService, Cell<u32>, UnsyncKey>>();
    // BUG (no response future is Sync): see the comment block below.

    // The error.
    assert_error::<CoalesceError>();
    assert_clone::<CoalesceError>();
    assert_debug::<CoalesceError>();
    assert_display::<CoalesceError>();
    assert_unpin::<CoalesceError>();
    assert_into_box_error::<CoalesceError>();
    assert_error::<Panicked>();
    assert_clone::<Panicked>();

    // Options, stats, the core.
    assert_all::<OnTimeout>();
    assert_copy::<OnTimeout>();
    assert_default::<OnTimeout>();
    assert_eq!(OnTimeout::default(), OnTimeout::CallInner);
    assert_all::<Stats>();
    assert_copy::<Stats>();
    assert_default::<Stats>();
    assert_all::<Group<String>>();
    assert_default::<Group<String>>();
    assert_all::<Group<UnsyncKey>>();
    assert_all::<GroupBuilder>();
    assert_default::<GroupBuilder>();
    assert_send::<Run<String, u64>>();
    assert_send::<Run<UnsyncKey, Cell<u32>>>();
    assert_debug::<Run<String, u64>>();
    assert_unpin::<Run<String, u64>>();
    assert_future::<Run<String, u64>>();
}

#[test]
fn http_and_grpc_types_have_the_expected_auto_traits_and_impls() {
    assert_all::<CoalesceHttpLayer>();
    assert_default::<CoalesceHttpLayer>();
    assert_layer::<CoalesceHttpLayer, axum::Router>();
    assert_all::<CoalesceHttpService<axum::Router>>();
    assert_service::<CoalesceHttpService<axum::Router>, Request<AxumBody>>();
    assert_service::<CoalesceHttpService<axum::Router>, Request<Full<Bytes>>>();
    assert_send::<HttpResponseFuture<axum::Router, AxumBody, AxumBody>>();
    assert_debug::<HttpResponseFuture<axum::Router, AxumBody, AxumBody>>();
    assert_static::<HttpResponseFuture<axum::Router, AxumBody, AxumBody>>();

    assert_send::<CoalesceBody<AxumBody>>(); // axum's body is not `Sync` itself
    assert_unpin::<CoalesceBody<AxumBody>>();
    assert_debug::<CoalesceBody<AxumBody>>();
    assert_send::<CoalesceBody<Full<Bytes>>>();
    assert_sync::<CoalesceBody<Full<Bytes>>>();
    assert_send::<CoalesceBody<TonicBody>>();
    fn body_of_bytes<B: Body<Data = Bytes> + Send + 'static>()
    where
        B::Error: Into<BoxError>,
    {
    }
    body_of_bytes::<CoalesceBody<AxumBody>>();
    body_of_bytes::<CoalesceBody<Full<Bytes>>>();
    body_of_bytes::<CoalesceBody<TonicBody>>();

    assert_all::<ServedBy>();
    assert_copy::<ServedBy>();
    assert_eq_hash::<ServedBy>();
    assert_display::<ServedBy>();

    assert_all::<CoalesceGrpcLayer>();
    assert_default::<CoalesceGrpcLayer>();
    assert_layer::<CoalesceGrpcLayer, Routes>();
    assert_all::<CoalesceGrpcService<Routes>>();
    assert_all::<CoalesceGrpcService<Catalog>>();
    assert_service::<CoalesceGrpcService<Routes>, Request<TonicBody>>();
    assert_service::<CoalesceGrpcService<Catalog>, Request<TonicBody>>();
    assert_send::<GrpcResponseFuture<Routes, TonicBody, TonicBody>>();
    assert_debug::<GrpcResponseFuture<Routes, TonicBody, TonicBody>>();
    assert_static::<GrpcResponseFuture<Routes, TonicBody, TonicBody>>();
}

// BUG (no response future is Sync): `ResponseFuture`, `Run`, and the HTTP and gRPC response
// futures are never `Sync`, whatever the inner service, because they hold
// `Pin<Box<dyn Future + Send>>` / `Box<dyn FnOnce + Send>` / `Box<dyn Any + Send>` (src/future.rs
// `Kind::Alone` and `Call::Panicked`, src/flight.rs `BoxFuture`/`Make`, src/flight/run.rs
// `Role`). tower's own futures are `Sync` when their inner future is, and tower's
// `ServiceBuilder::boxed_clone_sync()` (tower 0.5.3 src/builder/mod.rs:848) requires
// `Future: Send + Sync`, so the documented way to get a `BoxCloneSyncService` out of a builder
// does not compile over this layer (`BoxCloneSyncService::new(svc)` does: tested below).
// Fix: keep the boxes behind an exclusive-access wrapper (`sync_wrapper::SyncWrapper` /
// `SyncFuture`, as hyper and axum do for bodies), which is `Sync` for any `Send` content since
// only `&mut` reaches it; the `is_*` accessors only read plain flags.
//
//     assert_sync::<ResponseFuture<Backend, String, String>>();
//     assert_sync::<Run<String, u64>>();
//     // (the HTTP and gRPC `ResponseFuture`s hold a `Run` too: never `Sync` either)
//     let _ = ServiceBuilder::new()
//         .boxed_clone_sync()
//         .layer(layer())
//         .service(Backend::new(&Gate::new()));

/// tower-http's `TimeoutLayer`, `CorsLayer` and `ValidateRequestHeaderLayer` build their own
/// responses and need `ResBody: Default`; the README puts them outside the HTTP layer, so the
/// layer's body must be `Default` (an empty body).
#[test]
fn coalesce_body_is_default_and_empty() {
    assert_default::<CoalesceBody<Full<Bytes>>>();
    assert_default::<CoalesceBody<AxumBody>>();
    let body = CoalesceBody::<Full<Bytes>>::default();
    assert!(body.is_end_stream());
    assert_eq!(body.size_hint().exact(), Some(0));
}

// Left, documented in src/grpc/mod.rs (CoalesceGrpcService is not a tonic `NamedService`): the usual way to put a layer on
// one tonic service is `Server::builder().add_service(layer.layer(CatalogServer::new(h)))`
// (or `Routes::new(...)`), and both require `S: NamedService`; tonic's own
// `InterceptedService` forwards `NAME` for this reason. Only the server-wide
// `Server::builder().layer(..)` works (tested below). Fix in src/grpc/service.rs behind an
// optional `tonic` dependency: `impl<S: NamedService> NamedService for
// CoalesceGrpcService<S> { const NAME: &'static str = S::NAME; }` (or document the
// `Routes::from(axum_router.route_service("/pkg.Svc/{*rest}", ..))` workaround).
//
//     fn named<S: tonic::server::NamedService>() {}
//     named::<CoalesceGrpcService<Catalog>>();
//     let _ = tonic::transport::Server::builder()
//         .add_service(CoalesceGrpcLayer::new().method(GET_ITEM).layer(Catalog::new(h)));

#[test]
fn coalesce_error_is_a_box_error_and_downcasts_back() {
    fn check(err: CoalesceError) {
        let boxed: BoxError = err.clone().into();
        assert!(boxed.downcast_ref::<CoalesceError>().is_some());
        let back: Box<CoalesceError> = boxed.downcast().expect("downcast back");
        assert!(back.downcast_ref::<MyError>().is_some());
        // `?` into `Box<dyn Error + Send + Sync>` and into `Box<dyn Error>` too.
        fn question(err: CoalesceError) -> Result<(), Box<dyn StdError>> {
            Err(err)?
        }
        assert!(question(err).is_err());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let err = rt.block_on(async {
        let svc = layer().layer(service_fn(|k: String| async move {
            Err::<String, _>(MyError(k))
        }));
        svc.oneshot("x".into()).await.unwrap_err()
    });
    check(err);
}

// ---------------------------------------------------------------------------------------------
// 1b. ServiceBuilder extension traits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn service_builder_ext_traits_exist_and_coalesce() {
    bounded(async {
        let gate = Gate::new();
        let backend = Backend::new(&gate);
        let svc = ServiceBuilder::new()
            .coalesce(|k: &String| Some(k.clone()))
            .service(backend.clone());
        let probe = svc.clone();
        let results = stampede(svc, "hot", 8, &backend, &gate, move || probe.stats()).await;
        assert_all_value(&results, "hot");
        assert_eq!(backend.calls(), 1);

        // All three extension traits in scope at once, and in one builder.
        let http = ServiceBuilder::new().coalesce_http().service(service_fn(
            |_: Request<Full<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            },
        ));
        let res = http.oneshot(Request::new(Full::default())).await.unwrap();
        assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));

        let grpc = ServiceBuilder::new()
            .coalesce_grpc([GET_ITEM])
            .service(service_fn(|_: Request<CoalesceBody<Full<Bytes>>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }));
        let res = grpc.oneshot(Request::new(Full::default())).await.unwrap();
        assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Bypass));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Composition with tower middleware
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacks_under_timeout_and_over_concurrency_limit_and_load_shed() {
    bounded(async {
        let gate = Gate::new();
        let backend = Backend::new(&gate);
        let layer = layer();
        let svc = ServiceBuilder::new()
            .timeout(Duration::from_secs(600))
            .load_shed()
            .layer(layer.clone())
            .load_shed()
            .concurrency_limit(1)
            .service(backend.clone());
        let results = stampede(svc, "hot", 16, &backend, &gate, || layer.stats()).await;
        assert_all_value(&results, "hot");
        assert_eq!(
            backend.calls(),
            1,
            "LoadShed above never sheds, one call below"
        );
        assert_eq!(layer.in_flight(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_below_the_layer_goes_behind_a_buffer_as_the_readme_says() {
    bounded(async {
        let gate = Gate::new();
        let backend = Backend::new(&gate);
        let layer = layer();
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .buffer(8)
            .rate_limit(1_000, Duration::from_secs(1))
            .service(backend.clone());
        let results = stampede(svc, "hot", 8, &backend, &gate, || layer.stats()).await;
        assert_all_value(&results, "hot");
        assert_eq!(backend.calls(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_and_concurrency_limit_above_the_layer() {
    bounded(async {
        let gate = Gate::new();
        let backend = Backend::new(&gate);
        let layer = layer();
        let svc = ServiceBuilder::new()
            .buffer(64)
            .concurrency_limit(64)
            .layer(layer.clone())
            .service(backend.clone());
        let results = stampede(svc, "hot", 8, &backend, &gate, || layer.stats()).await;
        assert_all_value(&results, "hot");
        assert_eq!(backend.calls(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_err_and_map_response_around_the_layer() {
    bounded(async {
        let gate = Gate::new();
        gate.open();
        let backend = Backend::new(&gate);
        let svc = ServiceBuilder::new()
            .map_err(|e: CoalesceError| {
                format!(
                    "mapped: {}",
                    e.downcast_ref::<MyError>().expect("inner error").0
                )
            })
            .map_response(|s: String| s.len())
            .layer(layer())
            .map_err(|e: MyError| MyError(format!("{}!", e.0)))
            .service(backend.clone());
        assert_eq!(svc.clone().oneshot("ok".into()).await, Ok(11));
        assert_eq!(
            svc.oneshot("err".into()).await,
            Err("mapped: err!".to_string())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_as_box_service_box_clone_service_and_box_clone_sync_service() {
    bounded(async {
        let gate = Gate::new();
        let backend = Backend::new(&gate);
        let layer = layer();
        let svc = layer.layer(backend.clone());

        let boxed: BoxCloneService<String, String, CoalesceError> =
            BoxCloneService::new(svc.clone());
        let sync: BoxCloneSyncService<String, String, CoalesceError> =
            BoxCloneSyncService::new(svc.clone());
        assert_send_sync_val(&sync);
        let once: BoxService<String, String, CoalesceError> = BoxService::new(svc.clone());
        // BUG: see `BUG (no response future is Sync)` above: `ServiceBuilder::boxed_clone_sync`
        // does not compile over the layer.
        let built = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .layer(layer.clone())
                .service(backend.clone()),
        );
        let built_clone = ServiceBuilder::new()
            .boxed_clone()
            .layer(layer.clone())
            .service(backend.clone());

        // One flight shared by all the boxed forms (they share the layer's registry).
        let calls = vec![
            tokio::spawn(boxed.oneshot("hot".into())),
            tokio::spawn(sync.oneshot("hot".into())),
            tokio::spawn(once.oneshot("hot".into())),
            tokio::spawn(built.oneshot("hot".into())),
            tokio::spawn(built_clone.oneshot("hot".into())),
        ];
        until(|| backend.calls() == 1 && layer.stats().followers == 4).await;
        gate.open();
        for r in join_all(calls).await {
            assert_eq!(r.unwrap().unwrap(), "value of hot");
        }
        assert_eq!(backend.calls(), 1);
    })
    .await;
}

/// Retries a request once when it failed with [`MyError`] (found through `CoalesceError` above
/// the layer, or directly below it).
#[derive(Clone)]
struct RetryOnce(bool);

impl<E: StdError + 'static> tower::retry::Policy<String, String, E> for RetryOnce {
    type Future = futures::future::Ready<()>;

    fn retry(&mut self, _: &mut String, result: &mut Result<String, E>) -> Option<Self::Future> {
        let Err(e) = result else { return None };
        let mine = (e as &dyn StdError).downcast_ref::<MyError>().is_some()
            || (e as &dyn StdError)
                .downcast_ref::<CoalesceError>()
                .and_then(|c| c.downcast_ref::<MyError>())
                .is_some();
        if mine && !self.0 {
            self.0 = true;
            Some(futures::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &String) -> Option<String> {
        Some(req.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_above_the_layer_sees_the_inner_error_through_coalesce_error() {
    bounded(async {
        let gate = Gate::new();
        gate.open();
        let backend = Backend::new(&gate);
        let svc = ServiceBuilder::new()
            .retry(RetryOnce(false))
            .layer(layer())
            .service(backend.clone());
        assert_eq!(svc.oneshot("flaky".into()).await.unwrap(), "value of flaky");
        assert_eq!(backend.calls(), 2, "the retry made a new flight");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_below_the_layer_retries_once_for_every_waiter() {
    bounded(async {
        let gate = Gate::new();
        let backend = Backend::new(&gate);
        let layer = layer();
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .retry(RetryOnce(false))
            .service(backend.clone());
        let results = stampede(svc, "flaky", 8, &backend, &gate, || layer.stats()).await;
        assert_all_value(&results, "flaky");
        assert_eq!(
            backend.calls(),
            2,
            "one failed call, one retry, for all 8 waiters"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_layer_works_once_both_branches_share_an_error_type() {
    // The README says `option_layer` does not work as is (tower's `Either` needs one error
    // type); with a `map_err` on each branch it does: a working recipe.
    bounded(async {
        for enabled in [true, false] {
            let gate = Gate::new();
            let backend = Backend::new(&gate);
            let layer = layer();
            let maybe = enabled.then(|| {
                ServiceBuilder::new()
                    .map_err(BoxError::from)
                    .layer(layer.clone())
                    .into_inner()
            });
            let svc = ServiceBuilder::new()
                .option_layer(maybe)
                .map_err(BoxError::from)
                .service(backend.clone());
            let calls: Vec<_> = (0..4)
                .map(|_| tokio::spawn(svc.clone().oneshot("hot".to_string())))
                .collect();
            let expected = if enabled { 1 } else { 4 };
            until(|| backend.calls() == expected).await;
            if enabled {
                until(|| layer.stats().followers == 3).await;
            }
            gate.open();
            for r in join_all(calls).await {
                assert_eq!(r.unwrap().unwrap(), "value of hot");
            }
            assert_eq!(backend.calls(), expected);
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2b. tower-test
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tower_test_mock_sees_one_request_before_any_poll_and_readiness_is_the_flights() {
    bounded(async {
        let (mock, mut handle) = tower_test::mock::pair::<String, String>();
        let mut svc = layer().layer(mock);
        // The backend is not ready: the layer still is (followers never wait for readiness).
        handle.allow(0);
        assert!(matches!(
            futures::poll!(futures::future::poll_fn(|cx| svc.poll_ready(cx))),
            Poll::Ready(Ok(()))
        ));
        let leader = svc.call("hot".into());
        let follower = svc.call("hot".into());
        assert!(leader.is_leader() && follower.is_follower());
        // The flight waits for the backend's readiness (polled, so it registered its waker);
        // once allowed, it is woken and one request arrives.
        let mut both = Box::pin(join_all([leader, follower]));
        assert!(futures::poll!(both.as_mut()).is_pending());
        assert!(
            handle.poll_request().is_pending(),
            "not ready: nothing sent"
        );
        handle.allow(1);
        let calls = tokio::spawn(both);
        assert_request_eq!(handle, "hot".to_string()).send_response("v".into());
        for r in calls.await.unwrap() {
            assert_eq!(r.unwrap(), "v");
        }

        // Ready backend: the request is seen before the response future is polled, as the
        // README says (`assert_request_eq!` straight after `call`).
        handle.allow(1);
        let fut = svc.call("again".into());
        assert_request_eq!(handle, "again".to_string()).send_response("w".into());
        assert_eq!(fut.await.unwrap(), "w");

        // A mock error reaches every waiter, shared.
        handle.allow(1);
        let a = svc.call("bad".into());
        let b = svc.call("bad".into());
        assert_request_eq!(handle, "bad".to_string()).send_error(MyError("bad".into()));
        let (a, b) = futures::join!(a, b);
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        assert!(a.downcast_ref::<MyError>().is_some());
        assert!(same_inner(&a, &b));

        // A readiness error of the backend is the flight's, shared by its waiters too.
        handle.allow(1);
        handle.send_error(MyError("not ready".into()));
        let a = svc.call("unready".into());
        let b = svc.call("unready".into());
        let (a, b) = futures::join!(a, b);
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        assert_eq!(a.downcast_ref::<MyError>().unwrap().0, "not ready");
        assert!(same_inner(&a, &b));
        assert!(handle.poll_request().is_pending(), "no request was sent");
    })
    .await;
}

type HttpMockReq = Request<Full<Bytes>>;
type HttpMockRes = Response<Full<Bytes>>;

#[tokio::test]
async fn tower_test_mock_under_the_http_layer_when_the_futures_are_driven() {
    bounded(async {
        let (mock, mut handle) = tower_test::mock::pair::<HttpMockReq, HttpMockRes>();
        let mut svc = CoalesceHttpLayer::new().layer(mock);
        let leader = tokio::spawn(svc.call(Request::get("/r").body(Full::default()).unwrap()));
        let (req, send) = handle.next_request().await.expect("request");
        assert_eq!(req.uri(), "/r");
        send.send_response(Response::new(Full::new(Bytes::from_static(b"body"))));
        let res = leader.await.unwrap().unwrap();
        assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "body");

        // The mock's error is the service's error, untouched (no `CoalesceError`).
        let call = tokio::spawn(svc.call(Request::get("/e").body(Full::default()).unwrap()));
        let (_, send) = handle.next_request().await.expect("request");
        send.send_error(MyError("http".into()));
        let err: BoxError = call.await.unwrap().unwrap_err();
        assert_eq!(err.downcast_ref::<MyError>().unwrap().0, "http");
    })
    .await;
}

#[tokio::test]
async fn tower_test_mock_sees_the_http_request_at_call_time() {
    // The core layer calls a ready inner service in `call` "so that a tower_test mock sees the
    // request before the response future is polled" (CoalesceService docs, README); the HTTP
    // adapter (a leader's `flight` in src/http/service.rs, `Oneshot` for a bypass) defers it to
    // the first poll, so the usual tower-test sequence
    //     let fut = svc.call(req); assert_request_eq!(handle, ..).send_response(..); fut.await
    // waits for ever in `assert_request_eq!`. Fix: begin the leader's and a bypassed request's
    // inner call in `call` when the clone is ready, as src/service.rs does with `CallNow`.
    let (mock, mut handle) = tower_test::mock::pair::<HttpMockReq, HttpMockRes>();
    let mut svc = CoalesceHttpLayer::new().layer(mock);
    let _leader = svc.call(Request::get("/r").body(Full::default()).unwrap());
    assert!(
        handle.poll_request().is_ready(),
        "a coalesced GET reached the mock at call time"
    );
    let _bypass = svc.call(Request::post("/w").body(Full::default()).unwrap());
    assert!(
        handle.poll_request().is_ready(),
        "a bypassed POST reached the mock at call time"
    );
}

#[tokio::test]
async fn tower_test_spawn_with_and_spawn_layer() {
    bounded(async {
        let (mut svc, mut handle) = tower_test::mock::spawn_layer::<String, String, _>(layer());
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call("k".into());
        assert_request_eq!(handle, "k".to_string()).send_response("v".into());
        assert_eq!(fut.await.unwrap(), "v");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2c. axum
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct AppState {
    calls: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
}

async fn report(axum::extract::State(st): axum::extract::State<AppState>) -> String {
    st.calls.fetch_add(1, SeqCst);
    pass(st.gate.clone()).await;
    "report".to_string()
}

fn get_request(path: &str) -> Request<AxumBody> {
    Request::get(path).body(AxumBody::empty()).unwrap()
}

/// `n` concurrent GETs of `path` through `app` (each a `oneshot` of a clone, as axum's server
/// does per connection); returns how each was served and its body.
async fn axum_burst<S>(
    app: S,
    path: &str,
    n: usize,
    gate: &Gate,
    calls: &AtomicUsize,
    layer: &CoalesceHttpLayer,
) -> Vec<(Option<ServedBy>, Bytes)>
where
    S: Service<Request<AxumBody>, Response = Response<AxumBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(app.clone().oneshot(get_request(path))))
        .collect();
    until(|| calls.load(SeqCst) == 1 && layer.waiting() == n - 1).await;
    gate.open();
    let mut out = Vec::new();
    for t in join_all(tasks).await {
        let res = t.unwrap().unwrap();
        let served = res.extensions().get::<ServedBy>().copied();
        out.push((served, res.into_body().collect().await.unwrap().to_bytes()));
    }
    out
}

fn assert_one_leader(out: &[(Option<ServedBy>, Bytes)], body: &str) {
    let leaders = out
        .iter()
        .filter(|(s, _)| *s == Some(ServedBy::Leader))
        .count();
    let followers = out
        .iter()
        .filter(|(s, _)| *s == Some(ServedBy::Follower))
        .count();
    assert_eq!((leaders, followers), (1, out.len() - 1), "{out:?}");
    assert!(out.iter().all(|(_, b)| b == body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_router_layer_with_state_no_handle_error_layer() {
    bounded(async {
        let gate = Gate::new();
        let state = AppState {
            calls: Arc::default(),
            gate: gate.receiver(),
        };
        let layer = CoalesceHttpLayer::new();
        let app: axum::Router = axum::Router::new()
            .route("/report", axum::routing::get(report))
            .layer(layer.clone())
            .with_state(state.clone());
        let out = axum_burst(app, "/report", 8, &gate, &state.calls, &layer).await;
        assert_one_leader(&out, "report");
        assert_eq!(state.calls.load(SeqCst), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_route_layer_and_method_router_layer() {
    bounded(async {
        for method_router in [false, true] {
            let gate = Gate::new();
            let state = AppState {
                calls: Arc::default(),
                gate: gate.receiver(),
            };
            let layer = CoalesceHttpLayer::new();
            let app: axum::Router = if method_router {
                axum::Router::new()
                    .route("/report", axum::routing::get(report).layer(layer.clone()))
                    .with_state(state.clone())
            } else {
                axum::Router::new()
                    .route("/report", axum::routing::get(report))
                    .route_layer(layer.clone())
                    .with_state(state.clone())
            };
            let out = axum_burst(app, "/report", 6, &gate, &state.calls, &layer).await;
            assert_one_leader(&out, "report");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_route_service_and_router_as_the_inner_service() {
    bounded(async {
        // A coalesced tower service mounted with `route_service`.
        let gate = Gate::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = CoalesceHttpLayer::new();
        let (c, g) = (calls.clone(), gate.receiver());
        let svc = layer.layer(service_fn(move |_: Request<AxumBody>| {
            c.fetch_add(1, SeqCst);
            let g = g.clone();
            async move {
                pass(g).await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"svc"))))
            }
        }));
        let app: axum::Router = axum::Router::new().route_service("/svc", svc);
        let out = axum_burst(app, "/svc", 5, &gate, &calls, &layer).await;
        assert_one_leader(&out, "svc");

        // The whole `Router` as the inner service of a `ServiceBuilder` stack.
        let gate = Gate::new();
        let state = AppState {
            calls: Arc::default(),
            gate: gate.receiver(),
        };
        let router: axum::Router = axum::Router::new()
            .route("/report", axum::routing::get(report))
            .with_state(state.clone());
        let layer = CoalesceHttpLayer::new();
        let stack = ServiceBuilder::new()
            .map_response(|r: Response<CoalesceBody<AxumBody>>| r.map(AxumBody::new))
            .layer(layer.clone())
            .service(router);
        let out = axum_burst(stack, "/report", 5, &gate, &state.calls, &layer).await;
        assert_one_leader(&out, "report");
    })
    .await;
}

#[tokio::test]
async fn catch_panic_layer_outside_the_http_layer_answers_500() {
    bounded(async {
        let svc = ServiceBuilder::new()
            .layer(tower_http::catch_panic::CatchPanicLayer::new())
            .coalesce_http()
            .service(service_fn(|_: Request<Full<Bytes>>| async {
                if true {
                    panic!("handler panicked");
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }));
        let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
        assert_eq!(res.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2d. tonic
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Handler {
    calls: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl pb::catalog_server::Catalog for Handler {
    async fn get_item(
        &self,
        request: tonic::Request<pb::GetItemRequest>,
    ) -> Result<tonic::Response<pb::Item>, tonic::Status> {
        self.calls.fetch_add(1, SeqCst);
        pass(self.gate.clone()).await;
        let id = request.into_inner().id;
        Ok(tonic::Response::new(pb::Item {
            description: format!("item {id}"),
            id,
            payload: Vec::new(),
        }))
    }

    type WatchItemStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::Item, tonic::Status>> + Send>>;

    async fn watch_item(
        &self,
        _: tonic::Request<pb::GetItemRequest>,
    ) -> Result<tonic::Response<Self::WatchItemStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
}

fn grpc_request(id: &str) -> Request<Full<Bytes>> {
    use prost::Message;
    let message = pb::GetItemRequest {
        id: id.into(),
        padding: Vec::new(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    Request::post(GET_ITEM)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .unwrap()
}

async fn grpc_item<B>(res: Response<B>) -> (Option<ServedBy>, pb::Item)
where
    B: Body,
    B::Error: fmt::Debug,
{
    use prost::Message;
    let served = res.extensions().get::<ServedBy>().copied();
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    let bytes = collected.to_bytes();
    (served, pb::Item::decode(&bytes[5..]).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_layer_over_tonic_routes_in_process() {
    bounded(async {
        let gate = Gate::new();
        let handler = Handler {
            calls: Arc::default(),
            gate: gate.receiver(),
        };
        let layer = CoalesceGrpcLayer::new().method(GET_ITEM);
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(Routes::new(Catalog::new(handler.clone())));
        let tasks: Vec<_> = (0..8)
            .map(|_| tokio::spawn(svc.clone().oneshot(grpc_request("hot"))))
            .collect();
        until(|| handler.calls.load(SeqCst) == 1 && layer.waiting() == 7).await;
        gate.open();
        let mut roles = Vec::new();
        for t in join_all(tasks).await {
            let (served, item) = grpc_item(t.unwrap().unwrap()).await;
            assert_eq!(
                (item.id.as_str(), item.description.as_str()),
                ("hot", "item hot")
            );
            roles.push(served);
        }
        assert_eq!(handler.calls.load(SeqCst), 1);
        assert_eq!(
            roles
                .iter()
                .filter(|r| **r == Some(ServedBy::Leader))
                .count(),
            1
        );
        assert_eq!(layer.in_flight(), 0);
    })
    .await;
}

#[tokio::test]
async fn grpc_layer_stacks_on_tonic_server_builder() {
    bounded(async {
        let gate = Gate::new();
        let handler = Handler {
            calls: Arc::default(),
            gate: gate.receiver(),
        };
        // The layer itself, and the same through a `ServiceBuilder` with the ext trait and a
        // tower layer outside it: both compile into a tonic server and serve (an empty
        // listener, so serving ends at once).
        let incoming = futures::stream::empty::<Result<tokio::net::TcpStream, std::io::Error>>();
        tonic::transport::Server::builder()
            .layer(CoalesceGrpcLayer::new().method(GET_ITEM))
            .add_service(Catalog::new(handler.clone()))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
        let incoming = futures::stream::empty::<Result<tokio::net::TcpStream, std::io::Error>>();
        tonic::transport::Server::builder()
            .layer(
                ServiceBuilder::new()
                    .concurrency_limit(64)
                    .coalesce_grpc([GET_ITEM])
                    .into_inner(),
            )
            .add_service(Catalog::new(handler))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_layer_on_the_client_side_of_a_tonic_client_with_a_map_request() {
    bounded(async {
        let gate = Gate::new();
        let handler = Handler {
            calls: Arc::default(),
            gate: gate.receiver(),
        };
        let routes = Routes::new(Catalog::new(handler.clone()));
        // A stand-in for tonic's `Channel`: it takes `Request<tonic::body::Body>` only.
        let channel = service_fn(move |req: Request<TonicBody>| routes.clone().oneshot(req));
        let layer = CoalesceGrpcLayer::new().method(GET_ITEM);
        // See `BUG (gRPC layer changes the inner request body)`: the `map_request` is needed.
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .map_request(|r: Request<CoalesceBody<TonicBody>>| r.map(TonicBody::new))
            .service(channel);
        let client = pb::catalog_client::CatalogClient::new(svc);
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    client
                        .get_item(pb::GetItemRequest {
                            id: "hot".into(),
                            padding: Vec::new(),
                        })
                        .await
                })
            })
            .collect();
        until(|| handler.calls.load(SeqCst) == 1 && layer.waiting() == 5).await;
        gate.open();
        for t in join_all(tasks).await {
            assert_eq!(t.unwrap().unwrap().into_inner().id, "hot");
        }
        assert_eq!(handler.calls.load(SeqCst), 1, "six client calls, one RPC");
    })
    .await;
}

// Left, documented in src/grpc/mod.rs (the gRPC layer changes the inner request body): `CoalesceGrpcService<S>` calls its
// inner service with `Request<CoalesceBody<B>>`, so it cannot wrap a service that takes one
// concrete body type, such as tonic's client `Channel` (`Service<Request<tonic::body::Body>>`)
// — client-side coalescing of outgoing RPCs, the classic singleflight use — without a
// `map_request(|r| r.map(tonic::body::Body::new))` below it (tested above). The module docs
// say "any `http::Request` -> `http::Response` gRPC service". Fix in src/grpc/service.rs:
// replay into the inner request's own body type (e.g. require `B: From<Bytes>` / `Default`
// or take a body constructor), or document the `map_request` for clients.
//
//     assert_service::<CoalesceGrpcService<tonic::transport::Channel>, Request<TonicBody>>();

/// Code written against `Error = CoalesceError` (a retry policy, an error mapper) can be tested
/// with a stand-in for the coalesced service: the error has a public constructor.
#[test]
fn coalesce_error_can_be_made_outside_the_crate() {
    let err = CoalesceError::new(MyError("x".into()));
    assert!(err.downcast_ref::<MyError>().is_some());
    assert!(!err.is_panic() && !err.is_timeout());
    let boxed = CoalesceError::new(BoxError::from("y"));
    assert_eq!(
        boxed.get_ref().map(ToString::to_string).as_deref(),
        Some("y")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Error behaviour
// ---------------------------------------------------------------------------------------------

/// Whether two errors share one inner error (the same `Arc`'d allocation).
fn same_inner(a: &CoalesceError, b: &CoalesceError) -> bool {
    match (a.get_ref(), b.get_ref()) {
        (Some(x), Some(y)) => std::ptr::addr_eq(x as *const _, y as *const _),
        _ => false,
    }
}

/// The chain of messages, as an error reporter (`anyhow`'s `{:#}`, `tracing`'s error fields)
/// prints it: each error's `Display`, then its `source()`'s, joined by ": ".
fn error_report(err: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut next = err.source();
    while let Some(e) = next {
        parts.push(e.to_string());
        next = e.source();
    }
    parts.join(": ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_error_is_shared_by_arc_and_reachable_by_source_and_downcast() {
    bounded(async {
        let gate = Gate::new();
        let backend = Backend::new(&gate);
        let mut svc = layer().layer(backend.clone());
        let waiters: Vec<_> = (0..6).map(|_| svc.call("err-1".into())).collect();
        gate.open();
        let errors: Vec<CoalesceError> = join_all(waiters)
            .await
            .into_iter()
            .map(Result::unwrap_err)
            .collect();
        assert_eq!(backend.calls(), 1);
        for e in &errors {
            assert!(!e.is_panic() && !e.is_timeout());
            assert_eq!(e.panic_message(), None);
            assert_eq!(e.downcast_ref::<MyError>().unwrap().0, "err-1");
            let source = e.source().expect("source");
            assert_eq!(source.downcast_ref::<MyError>().unwrap().0, "err-1");
            assert!(same_inner(e, &errors[0]), "one Arc'd inner error for all");
            assert!(e.to_string().contains("backend failed for err-1"), "{e}");
            assert!(format!("{e:?}").contains("MyError"), "{e:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_error_found_by_walking_the_chain_from_an_outer_box_error() {
    bounded(async {
        let gate = Gate::new();
        gate.open();
        let backend = Backend::new(&gate);
        let svc = ServiceBuilder::new()
            .timeout(Duration::from_secs(600))
            .layer(layer())
            .service(backend);
        let err: BoxError = svc.oneshot("err-2".into()).await.unwrap_err();
        let coalesce = err.downcast_ref::<CoalesceError>().expect("CoalesceError");
        assert_eq!(coalesce.downcast_ref::<MyError>().unwrap().0, "err-2");
        let mut found = false;
        let mut next: Option<&(dyn StdError + 'static)> = Some(&*err);
        while let Some(e) = next {
            found |= e.downcast_ref::<MyError>().is_some();
            next = e.source();
        }
        assert!(found, "MyError is on the source() chain");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn timeout_below_the_layer_is_the_shared_inner_error_not_is_timeout() {
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .timeout(Duration::from_secs(1))
        .service(service_fn(|_: String| {
            std::future::pending::<Result<String, MyError>>()
        }));
    let (a, b) = futures::join!(svc.call("slow".into()), svc.call("slow".into()));
    let (a, b) = (a.unwrap_err(), b.unwrap_err());
    for e in [&a, &b] {
        assert!(!e.is_timeout(), "documented: not the follower wait limit");
        assert!(e.downcast_ref::<tower::timeout::error::Elapsed>().is_some());
    }
    assert!(same_inner(&a, &b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_is_an_error_for_every_waiter_with_its_message() {
    bounded(async {
        let gate = Gate::new();
        let backend = Backend::new(&gate);
        let layer = layer();
        let mut svc = layer.layer(backend.clone());
        let waiters: Vec<_> = (0..4).map(|_| svc.call("panic-1".into())).collect();
        gate.open();
        for r in join_all(waiters).await {
            let e = r.unwrap_err();
            assert!(e.is_panic() && !e.is_timeout());
            assert_eq!(e.panic_message(), Some("backend panicked for panic-1"));
            assert!(e.get_ref().is_none() && e.downcast_ref::<MyError>().is_none());
            let p = e
                .source()
                .unwrap()
                .downcast_ref::<Panicked>()
                .expect("Panicked");
            assert_eq!(p.message(), "backend panicked for panic-1");
            assert!(e.to_string().contains("panicked"), "{e}");
        }
        assert_eq!(layer.in_flight(), 0);
        assert_eq!(layer.stats().panics, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn follower_wait_limit_with_on_timeout_error_is_timeout() {
    let gate = Gate::new();
    let backend = Backend::new(&gate);
    let mut svc = layer()
        .follower_timeout(Duration::from_secs(1))
        .on_follower_timeout(OnTimeout::Error)
        .layer(backend.clone());
    let mut leader = Box::pin(svc.call("k".into()));
    assert!(futures::poll!(leader.as_mut()).is_pending());
    let follower = svc.call("k".into());
    let e = follower.await.unwrap_err();
    assert!(e.is_timeout() && !e.is_panic());
    assert!(e.source().is_none() && e.get_ref().is_none());
    assert!(e.to_string().contains("1s"), "{e}");
    gate.open();
    assert_eq!(leader.await.unwrap(), "value of k");
    assert_eq!(backend.calls(), 1);
}

#[tokio::test]
#[ignore = "kept as decided: Display includes the source message, as tower's own errors do (session 10 note)"]
async fn error_report_does_not_repeat_the_inner_message() {
    // Rust's error guideline (std::error::Error docs, error-handling WG): an error either
    // returns its cause from `source()` or writes it in its `Display`, never both, or every
    // reporter walking the chain (anyhow `{:#}`/`{:?}`, eyre, tracing's `error =` fields with
    // `source` chains, tower-http's error classifiers) prints it twice:
    // "inner service failed: backend failed for e: backend failed for e".
    // Fix in src/error.rs: `Display` says only "inner service failed" / "coalesced call
    // panicked" (source() carries the rest), or `source()` skips the inner error.
    let svc = layer().layer(service_fn(|k: String| async move {
        if k == "p" {
            panic!("the panic message");
        }
        Err::<String, _>(MyError(k))
    }));
    let err = svc.clone().oneshot("e".into()).await.unwrap_err();
    let report = error_report(&err);
    let panic = svc.oneshot("p".into()).await.unwrap_err();
    let panic_report = error_report(&panic);
    assert_eq!(
        (
            report.matches("backend failed for e").count(),
            panic_report.matches("the panic message").count()
        ),
        (1, 1),
        "reported as {report:?} and {panic_report:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. README / rustdoc claims that are not in code blocks
// ---------------------------------------------------------------------------------------------

#[test]
fn readme_defaults_and_option_names() {
    assert_eq!(DEFAULT_MAX_BODY_BYTES, 2 * 1024 * 1024, "README: 2 MiB");
    assert_eq!(DEFAULT_REQUEST_LIMIT, 64 * 1024, "README: 64 KiB");
    assert_eq!(DEFAULT_RESPONSE_LIMIT, 4 * 1024 * 1024, "README: 4 MiB");

    // Every option the README's tables name exists with that spelling.
    let _core = layer()
        .detached(true)
        .follower_timeout(Duration::from_secs(1))
        .on_follower_timeout(OnTimeout::CallInner)
        .on_follower_timeout(OnTimeout::Error)
        .linger(Duration::from_secs(1))
        .linger_errors(Duration::from_secs(1))
        .retry_failed(1)
        .max_in_flight(10)
        .max_followers(10);
    let _group: Group<String> = GroupBuilder::new()
        .detached(true)
        .linger(Duration::from_secs(1))
        .linger_errors(Duration::from_secs(1))
        .retry_failed(1)
        .max_in_flight(10)
        .max_followers(10)
        .build();
    let _http = CoalesceHttpLayer::new()
        .key_headers([http::header::ACCEPT])
        .key_header(http::header::ACCEPT_LANGUAGE)
        .identity(|parts: &http::request::Parts| parts.extensions.get::<String>().cloned())
        .methods([http::Method::GET])
        .max_body_bytes(1024)
        .cache_status_header(true)
        .detached(true)
        .follower_timeout(Duration::from_secs(1))
        .max_in_flight(10)
        .max_followers(10);
    let grpc = CoalesceGrpcLayer::new()
        .method(GET_ITEM)
        .methods([GET_ITEM])
        .write_method("/catalog.v1.Catalog/PutItem")
        .metadata("x-tenant")
        .identity(|parts: &http::request::Parts| parts.extensions.get::<String>().cloned())
        .request_limit(1024)
        .response_limit(1024)
        .detached(true)
        .follower_timeout(Duration::from_secs(1))
        .max_in_flight(10)
        .max_followers(10);
    assert_eq!((grpc.in_flight(), grpc.waiting()), (0, 0));
    assert_eq!(grpc.stats(), Stats::default());

    // README: stats has these fields (and `Stats::fields` lists them).
    let names: Vec<_> = Stats::default().fields().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "leaders",
            "followers",
            "lingered",
            "bypassed",
            "fell_through",
            "over_capacity",
            "timed_out",
            "released",
            "retried",
            "errors",
            "panics",
            "cancelled",
            "forgotten",
            "in_flight"
        ]
    );
    // `#[non_exhaustive]`, yet an exporter's test can still build one.
    let mut s = Stats::default();
    s.leaders = 3;
    assert_eq!(s.fields().next(), Some(("leaders", 3)));
}

#[test]
fn readme_sizes_of_a_waiter() {
    // README: "48 bytes for `Run`, 56 for the layer's `ResponseFuture` with a `u64` response".
    if cfg!(target_pointer_width = "64") {
        assert_eq!(std::mem::size_of::<Run<String, u64>>(), 48);
        type U64Service =
            tower::util::ServiceFn<fn(u64) -> futures::future::Ready<Result<u64, Infallible>>>;
        assert_eq!(
            std::mem::size_of::<ResponseFuture<U64Service, u64, u64>>(),
            56
        );
    }
}

#[tokio::test]
async fn readme_spawn_spellings_compile_and_run() {
    bounded(async {
        // Concrete inner error: both spellings.
        let svc = layer().layer(service_fn(|k: String| async move { Ok::<_, MyError>(k) }));
        let a = tokio::spawn(svc.clone().oneshot("a".into()));
        let s = svc.clone();
        let b = tokio::spawn(async move { s.oneshot("b".into()).await });
        assert_eq!(a.await.unwrap().unwrap(), "a");
        assert_eq!(b.await.unwrap().unwrap(), "b");

        // `BoxError` inner error: `tokio::spawn(svc.oneshot(req))`, and the boxed spelling the
        // README gives for `async` blocks.
        let svc = layer().layer(service_fn(|k: String| async move { Ok::<_, BoxError>(k) }));
        let a = tokio::spawn(svc.clone().oneshot("a".into()));
        let s = svc.clone();
        let b = tokio::spawn(async move {
            let call: Pin<Box<dyn Future<Output = _> + Send>> =
                Box::pin(s.oneshot("b".to_string()));
            call.await
        });
        assert_eq!(a.await.unwrap().unwrap(), "a");
        assert_eq!(b.await.unwrap().unwrap(), "b");
    })
    .await;
}

#[tokio::test]
async fn readme_response_future_flags_and_group() {
    bounded(async {
        let gate = Gate::new();
        let backend = Backend::new(&gate);
        let mut svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new(|k: &String| {
                (k != "none").then(|| k.clone())
            }))
            .service(backend.clone());
        let leader = svc.call("k".into());
        let follower = svc.call("k".into());
        let bypass = svc.call("none".into());
        assert!(leader.is_leader() && !leader.is_follower() && !leader.is_bypass());
        assert!(follower.is_follower() && follower.is_shared());
        assert!(bypass.is_bypass() && !bypass.is_alone() && !bypass.is_leader());
        assert!(format!("{leader:?}").contains("ResponseFuture"));
        gate.open();
        let (l, f, b) = futures::join!(leader, follower, bypass);
        assert_eq!(
            (l.unwrap(), f.unwrap(), b.unwrap()),
            (
                "value of k".to_string(),
                "value of k".to_string(),
                "value of none".to_string()
            )
        );
        assert!(!svc.forget("k"), "nothing in flight any more");
        assert_eq!(svc.stats().bypassed, 1);

        // The README's `Group` example, with a `&str` lookup of a `String` key for `forget`.
        let group: Group<String> = Group::new();
        assert_eq!(
            group.run("key".to_string(), || async { 42 }).await.unwrap(),
            42
        );
        assert!(!group.forget("key"));
        assert!(group.is_empty());
        assert!(format!("{group:?}").contains("Group"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_only_response_request_and_key_work_across_tasks() {
    bounded(async {
        let svc = CoalesceLayer::new(cell_key as CellExtract).layer(CellService);
        let call = tokio::spawn(svc.clone().oneshot(Cell::new(1)));
        assert_eq!(call.await.unwrap().unwrap().get(), 2);
        assert_eq!(svc.in_flight(), 0);
    })
    .await;
}
