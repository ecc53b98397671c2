//! A tonic server with a slow unary method behind `CoalesceGrpcLayer`, hit by bursts of
//! concurrent calls from the generated client over 127.0.0.1. Prints how many calls each burst
//! made and how many reached the handler, then exits.
//!
//! ```sh
//! cargo run --example tonic --features grpc
//! ```

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::{Stream, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tower_coalesce::grpc::CoalesceGrpcLayer;

#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/catalog.v1.rs");
}

use pb::catalog_client::CatalogClient;
use pb::catalog_server::{Catalog, CatalogServer};
use pb::{GetItemRequest, Item};

/// Stands in for a slow database: every call takes 50 ms.
const BACKEND_LATENCY: Duration = Duration::from_millis(50);

#[derive(Default)]
struct SlowCatalog {
    get_calls: AtomicUsize,
    watch_calls: AtomicUsize,
}

#[tonic::async_trait]
impl Catalog for Arc<SlowCatalog> {
    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<Item>, Status> {
        self.get_calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(BACKEND_LATENCY).await;
        let id = request.into_inner().id;
        if id.starts_with("gone") {
            return Err(Status::not_found(format!("no item {id}")));
        }
        Ok(Response::new(Item {
            description: format!("the item called {id}"),
            id,
            payload: Vec::new(),
        }))
    }

    type WatchItemStream = Pin<Box<dyn Stream<Item = Result<Item, Status>> + Send>>;

    async fn watch_item(
        &self,
        request: Request<GetItemRequest>,
    ) -> Result<Response<Self::WatchItemStream>, Status> {
        self.watch_calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(BACKEND_LATENCY).await;
        let id = request.into_inner().id;
        let updates = (0..3).map(move |n| {
            Ok(Item {
                id: id.clone(),
                description: format!("update {n}"),
                payload: Vec::new(),
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(updates))))
    }
}

fn get_item(id: String) -> Request<GetItemRequest> {
    Request::new(GetItemRequest {
        id,
        padding: Vec::new(),
    })
}

/// Runs `calls` concurrently; returns (ok, failed) counts and the handler calls they caused.
async fn burst(
    name: &str,
    counter: &AtomicUsize,
    calls: Vec<Pin<Box<dyn std::future::Future<Output = bool> + Send>>>,
) -> (usize, usize) {
    let before = counter.load(Ordering::SeqCst);
    let started = Instant::now();
    let n = calls.len();
    let ok = join_all(calls).await.into_iter().filter(|ok| *ok).count();
    let handler_calls = counter.load(Ordering::SeqCst) - before;
    println!(
        "{name:<48} {n:>5} calls ({ok:>3} ok) -> {handler_calls:>3} handler calls  [{:?}]",
        started.elapsed()
    );
    (n, handler_calls)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let catalog = Arc::new(SlowCatalog::default());
    let coalesce = CoalesceGrpcLayer::new().method("/catalog.v1.Catalog/GetItem");

    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = incoming.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        // Calls over a connection's stream limit wait for a stream and form later flights.
        // tonic sets no limit by default (a bare hyper server allows 200); a bound set for
        // other reasons should leave room for a burst.
        .max_concurrent_streams(1024)
        // Put authentication before this line, and keep timeouts, tracing and compression
        // outside too (tonic's own `timeout` and concurrency limits already are).
        .layer(coalesce.clone())
        .add_service(CatalogServer::new(catalog.clone()));
    let server = tokio::spawn(server.serve_with_incoming_shutdown(incoming, async {
        let _ = stopped.await;
    }));

    let client = CatalogClient::<Channel>::connect(format!("http://{addr}")).await?;
    println!(
        "tonic server on {addr}, GetItem coalesced, each handler call takes {BACKEND_LATENCY:?}\n"
    );

    let get = |id: String, token: Option<&'static str>| {
        let mut client = client.clone();
        Box::pin(async move {
            let mut request = get_item(id);
            if let Some(token) = token {
                request
                    .metadata_mut()
                    .insert("authorization", MetadataValue::from_static(token));
            }
            client.get_item(request).await.is_ok()
        }) as Pin<Box<dyn std::future::Future<Output = bool> + Send>>
    };
    let gets = &catalog.get_calls;
    let mut totals = Vec::new();

    let calls = (0..500).map(|_| get("hot".into(), None)).collect();
    totals.push(burst("identical GetItem(hot)", gets, calls).await);

    let calls = (0..500)
        .map(|i| get(format!("item-{}", i % 10), None))
        .collect();
    totals.push(burst("GetItem over 10 different ids", gets, calls).await);

    let calls = (0..50).map(|_| get("gone".into(), None)).collect();
    totals.push(burst("GetItem failing NOT_FOUND (never shared)", gets, calls).await);

    let calls = (0..50)
        .map(|_| get("hot".into(), Some("Bearer token")))
        .collect();
    totals.push(burst("GetItem with authorization (bypass)", gets, calls).await);

    let calls = (0..50)
        .map(|_| {
            let mut client = client.clone();
            Box::pin(async move {
                match client.watch_item(get_item("hot".into())).await {
                    Ok(stream) => stream.into_inner().count().await == 3,
                    Err(_) => false,
                }
            }) as Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        })
        .collect();
    totals.push(
        burst(
            "WatchItem streams (never coalesced)",
            &catalog.watch_calls,
            calls,
        )
        .await,
    );

    let (calls, handler_calls) = totals
        .iter()
        .fold((0, 0), |(c, h), (calls, handled)| (c + calls, h + handled));
    println!("\ntotal: {calls} calls -> {handler_calls} handler calls");
    println!(
        "in flight after the bursts: {}, waiting: {}",
        coalesce.in_flight(),
        coalesce.waiting()
    );

    let _ = stop.send(());
    server.await??;
    Ok(())
}
