//! The gRPC layer over real sockets: a tonic server on 127.0.0.1 with `CoalesceGrpcLayer`,
//! called by the generated tonic client.
//!
//! Each test holds the handler behind a gate, waits until every call is where it should be
//! (in the handler, or waiting for another call's flight), then opens the gate: no sleeps.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tower_coalesce::grpc::CoalesceGrpcLayer;

#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/catalog.v1.rs");
}

use pb::catalog_client::CatalogClient;
use pb::catalog_server::{Catalog, CatalogServer};
use pb::{GetItemRequest, Item};

const GET_ITEM: &str = "/catalog.v1.Catalog/GetItem";
const LIMIT: Duration = Duration::from_secs(20);

/// The handler: counts calls, waits for the gate, then answers from the request.
#[derive(Clone)]
struct Handler {
    get_calls: Arc<AtomicUsize>,
    watch_calls: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
}

impl Handler {
    async fn pass_gate(&self) {
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open).await.expect("gate kept open");
    }
}

#[tonic::async_trait]
impl Catalog for Handler {
    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<Item>, Status> {
        self.get_calls.fetch_add(1, Ordering::SeqCst);
        self.pass_gate().await;
        let user = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .unwrap_or_else(|| "anonymous".into());
        let message = request.into_inner();
        if let Some(what) = message.id.strip_prefix("missing:") {
            return Err(Status::not_found(format!("no item {what}")));
        }
        let payload = if message.id == "big" {
            vec![7; 16 * 1024]
        } else {
            Vec::new()
        };
        Ok(Response::new(Item {
            description: format!(
                "{} for {user}, {} padding bytes",
                message.id,
                message.padding.len()
            ),
            id: message.id,
            payload,
        }))
    }

    type WatchItemStream = Pin<Box<dyn Stream<Item = Result<Item, Status>> + Send>>;

    async fn watch_item(
        &self,
        request: Request<GetItemRequest>,
    ) -> Result<Response<Self::WatchItemStream>, Status> {
        self.watch_calls.fetch_add(1, Ordering::SeqCst);
        self.pass_gate().await;
        let id = request.into_inner().id;
        let items = (0..2).map(move |n| {
            Ok(Item {
                id: id.clone(),
                description: format!("update {n}"),
                payload: Vec::new(),
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(items))))
    }
}

struct Fixture {
    client: CatalogClient<Channel>,
    layer: CoalesceGrpcLayer,
    handler: Handler,
    gate: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Fixture {
    async fn start(layer: CoalesceGrpcLayer) -> Fixture {
        let (gate, gate_rx) = watch::channel(false);
        let handler = Handler {
            get_calls: Arc::default(),
            watch_calls: Arc::default(),
            gate: gate_rx,
        };
        let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let addr = incoming.local_addr().expect("local addr");
        let router = Server::builder()
            .layer(layer.clone())
            .add_service(CatalogServer::new(handler.clone()));
        let server = tokio::spawn(async move {
            router.serve_with_incoming(incoming).await.expect("server");
        });
        let client = CatalogClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        Fixture {
            client,
            layer,
            handler,
            gate,
            server,
        }
    }

    fn get_calls(&self) -> usize {
        self.handler.get_calls.load(Ordering::SeqCst)
    }

    /// Waits (yielding, without sleeping) until `ready` holds; the test's timeout bounds it.
    async fn until(&self, ready: impl Fn(&Fixture) -> bool) {
        while !ready(self) {
            tokio::task::yield_now().await;
        }
    }

    fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// `n` concurrent `GetItem` calls, made by `request(i)`.
    fn get_items(
        &self,
        n: usize,
        request: impl Fn(usize) -> Request<GetItemRequest>,
    ) -> Vec<tokio::task::JoinHandle<Result<Item, Status>>> {
        (0..n)
            .map(|i| {
                let mut client = self.client.clone();
                let request = request(i);
                tokio::spawn(
                    async move { client.get_item(request).await.map(Response::into_inner) },
                )
            })
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn get(id: &str) -> Request<GetItemRequest> {
    Request::new(GetItemRequest {
        id: id.into(),
        padding: Vec::new(),
    })
}

fn with_auth(mut request: Request<GetItemRequest>, token: &'static str) -> Request<GetItemRequest> {
    request
        .metadata_mut()
        .insert("authorization", MetadataValue::from_static(token));
    request
}

async fn results(
    calls: Vec<tokio::task::JoinHandle<Result<Item, Status>>>,
) -> Vec<Result<Item, Status>> {
    join_all(calls)
        .await
        .into_iter()
        .map(|joined| joined.expect("call task"))
        .collect()
}

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_unary_calls_reach_the_handler_once() {
    bounded(async {
        const N: usize = 64;
        let fx = Fixture::start(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let calls = fx.get_items(N, |_| get("hot"));
        fx.until(|fx| fx.get_calls() == 1 && fx.layer.waiting() == N - 1)
            .await;
        assert_eq!(fx.layer.in_flight(), 1);
        fx.open_gate();
        for item in results(calls).await {
            let item = item.expect("every caller gets the shared reply");
            assert_eq!(item.id, "hot");
            assert_eq!(item.description, "hot for anonymous, 0 padding bytes");
        }
        assert_eq!(fx.get_calls(), 1, "{N} identical calls, one handler call");
        assert_eq!((fx.layer.in_flight(), fx.layer.waiting()), (0, 0));

        // No stale joins: a call after the flight ended is a new call.
        let mut client = fx.client.clone();
        client.get_item(get("hot")).await.expect("later call");
        assert_eq!(fx.get_calls(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_messages_do_not_coalesce() {
    bounded(async {
        const IDS: usize = 8;
        const EACH: usize = 4;
        let fx = Fixture::start(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let calls = fx.get_items(IDS * EACH, |i| get(&format!("item-{}", i % IDS)));
        // Every distinct message has its own call in the handler at the same time.
        fx.until(|fx| fx.get_calls() == IDS && fx.layer.waiting() == IDS * (EACH - 1))
            .await;
        assert_eq!(fx.layer.in_flight(), IDS);
        fx.open_gate();
        for (i, item) in results(calls).await.into_iter().enumerate() {
            let item = item.expect("reply");
            assert_eq!(
                item.id,
                format!("item-{}", i % IDS),
                "each caller gets its own item"
            );
        }
        assert_eq!(fx.get_calls(), IDS);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_status_is_not_shared() {
    bounded(async {
        const N: usize = 16;
        let fx = Fixture::start(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let calls = fx.get_items(N, |_| get("missing:42"));
        fx.until(|fx| fx.get_calls() == 1 && fx.layer.waiting() == N - 1)
            .await;
        fx.open_gate();
        for result in results(calls).await {
            let status = result.expect_err("the handler fails every call");
            assert_eq!(status.code(), Code::NotFound);
            assert_eq!(status.message(), "no item 42");
        }
        assert_eq!(
            fx.get_calls(),
            N,
            "every follower of a failed call made its own call"
        );
        assert_eq!((fx.layer.in_flight(), fx.layer.waiting()), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_method_is_untouched() {
    bounded(async {
        const N: usize = 8;
        let fx = Fixture::start(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let streams: Vec<_> = (0..N)
            .map(|_| {
                let mut client = fx.client.clone();
                tokio::spawn(async move {
                    let stream = client.watch_item(get("hot")).await?.into_inner();
                    stream
                        .collect::<Vec<_>>()
                        .await
                        .into_iter()
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        fx.until(|fx| fx.handler.watch_calls.load(Ordering::SeqCst) == N)
            .await;
        assert_eq!((fx.layer.in_flight(), fx.layer.waiting()), (0, 0));
        fx.open_gate();
        for stream in join_all(streams).await {
            let items = stream.expect("task").expect("stream");
            let updates: Vec<_> = items.iter().map(|i| i.description.as_str()).collect();
            assert_eq!(updates, ["update 0", "update 1"]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_metadata_bypasses_without_an_identity() {
    bounded(async {
        const N: usize = 8;
        let fx = Fixture::start(CoalesceGrpcLayer::new().method(GET_ITEM)).await;
        let calls = fx.get_items(N, |i| {
            with_auth(
                get("hot"),
                if i % 2 == 0 {
                    "Bearer alice"
                } else {
                    "Bearer bob"
                },
            )
        });
        fx.until(|fx| fx.get_calls() == N).await;
        assert_eq!((fx.layer.in_flight(), fx.layer.waiting()), (0, 0));
        fx.open_gate();
        for (i, item) in results(calls).await.into_iter().enumerate() {
            let user = if i % 2 == 0 {
                "Bearer alice"
            } else {
                "Bearer bob"
            };
            assert_eq!(
                item.expect("reply").description,
                format!("hot for {user}, 0 padding bytes")
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_coalesces_per_user_and_never_across_users() {
    bounded(async {
        const EACH: usize = 8;
        // Stands in for an identity read from credentials verified by an outer layer.
        let layer = CoalesceGrpcLayer::new().method(GET_ITEM).identity(|parts| {
            parts
                .headers
                .get("authorization")
                .map(|v| v.as_bytes().to_vec())
        });
        let fx = Fixture::start(layer).await;
        let token = |i: usize| {
            if i % 2 == 0 {
                "Bearer alice"
            } else {
                "Bearer bob"
            }
        };
        let calls = fx.get_items(2 * EACH, |i| with_auth(get("hot"), token(i)));
        fx.until(|fx| fx.get_calls() == 2 && fx.layer.waiting() == 2 * (EACH - 1))
            .await;
        fx.open_gate();
        for (i, item) in results(calls).await.into_iter().enumerate() {
            assert_eq!(
                item.expect("reply").description,
                format!("hot for {}, 0 padding bytes", token(i)),
                "call {i} got another user's reply"
            );
        }
        assert_eq!(fx.get_calls(), 2, "one call per user");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_limit_bypasses_with_its_whole_message() {
    bounded(async {
        const N: usize = 4;
        let fx = Fixture::start(
            CoalesceGrpcLayer::new()
                .method(GET_ITEM)
                .request_limit(1024),
        )
        .await;
        let calls = fx.get_items(N, |_| {
            Request::new(GetItemRequest {
                id: "hot".into(),
                padding: vec![1; 4096],
            })
        });
        fx.until(|fx| fx.get_calls() == N).await;
        assert_eq!(fx.layer.waiting(), 0);
        fx.open_gate();
        for item in results(calls).await {
            assert_eq!(
                item.expect("reply").description,
                "hot for anonymous, 4096 padding bytes"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_limit_reaches_everyone_whole() {
    bounded(async {
        const N: usize = 8;
        let fx = Fixture::start(
            CoalesceGrpcLayer::new()
                .method(GET_ITEM)
                .response_limit(1024),
        )
        .await;
        let calls = fx.get_items(N, |_| get("big"));
        fx.until(|fx| fx.get_calls() == 1 && fx.layer.waiting() == N - 1)
            .await;
        fx.open_gate();
        for item in results(calls).await {
            let item = item.expect("reply");
            assert_eq!(item.payload, vec![7; 16 * 1024]);
        }
        assert_eq!(fx.get_calls(), N, "the followers made their own calls");
    })
    .await;
}
