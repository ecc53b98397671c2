//! Review (session 9, adapters): adversarial black-box tests of the HTTP and gRPC layers
//! through the public API, in process and over real hyper / axum servers on 127.0.0.1:0.
//!
//! Found and fixed: the gRPC layer had no counterpart of the HTTP layer's write rule
//! (RFC 9111 §4.4 there): a read issued after a successful mutating call joined a read
//! flight that began before it (`grpc_read_after_a_successful_write_does_not_join_an_older_flight`).
//! A call of a method not allow-listed now counts as a write.
//!
//! Checked and held: an HTTP/1.1 client that pipelines behind a response it does not read
//! cannot become a leader its server never polls (hyper calls the next request only after
//! flushing); the HTTP write rule over `tower::ServiceExt::oneshot` on worker threads.
//!
//! No sleep decides anything: handlers are held on gates, progress is observed through the
//! layers' gauges (`in_flight`, `waiting`) and call counters; every wait is bounded.
#![cfg(all(feature = "http", feature = "grpc"))]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tower::{service_fn, Layer, ServiceExt};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, ServedBy};

use support::wire::{bounded, until};

// ---------------------------------------------------------------------------------------------
// Servers and clients
// ---------------------------------------------------------------------------------------------

/// Serves `app` over HTTP/1.1 only (hyper's `http1::Builder`, as `axum::serve` does for h1
/// clients) on 127.0.0.1:0.
async fn serve_h1(app: Router) -> SocketAddr {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(256).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// One HTTP/1.1 GET over a fresh connection with hyper's client, `Host` as given; the status,
/// the `Cache-Status` header and the body.
async fn h1_get(addr: SocketAddr, path: &str, host: &str) -> (StatusCode, String, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status();
    let cache_status = res
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        cache_status,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A connection whose client sends `GET /big` (a response far larger than every socket buffer
/// on the way, in one chunk), reads its head, sends `GET /hot` on the same connection (HTTP/1.1
/// lets a client send its next request before the previous response has ended), and then
/// reads nothing more. hyper has queued all of `/big` by then; it reads `/hot` and `call`s the
/// service for it, but polls that future only once it may write a head: when the queue has
/// drained, i.e. never while this client does not read.
async fn stalled_pipelining_client(addr: SocketAddr, host: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let big = format!("GET /big HTTP/1.1\r\nhost: {host}\r\ncache-control: no-store\r\n\r\n");
    stream.write_all(big.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = bounded("the head of /big", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "connection closed");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let hot = format!("GET /hot HTTP/1.1\r\nhost: {host}\r\n\r\n");
    stream.write_all(hot.as_bytes()).await.unwrap();
    stream
}

/// 32 MiB: more than loopback's socket buffers (a few MiB at most) can take.
fn big_body() -> Bytes {
    static BIG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BIG.get_or_init(|| Bytes::from(vec![b'x'; 32 << 20]))
        .clone()
}

/// `/big` (bypassed: `no-store`) and `/hot` (counted, answers at once) behind `layer`.
fn pipelining_app(layer: CoalesceHttpLayer, hot_calls: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route("/big", get(|| async { big_body() }))
        .route(
            "/hot",
            get(move || {
                let hot_calls = hot_calls.clone();
                async move {
                    hot_calls.fetch_add(1, SeqCst);
                    "hot"
                }
            }),
        )
        .layer(layer)
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 pipelining: a leader its server would not poll
// ---------------------------------------------------------------------------------------------

/// The layer registers a flight in `call`, and only the caller that registered it drives it,
/// so a request that its server `call`s but does not poll would strand its followers. hyper's
/// HTTP/1 dispatcher `call`s a pipelined request only once the previous response has been
/// flushed (it goes idle in `poll_flush`), so a client that pipelines `/hot` behind a large
/// response it does not read never becomes a leader that nobody polls: another client's
/// `/hot`, on its own connection, is answered by a call of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_client_that_stops_reading_and_pipelines_does_not_strand_other_clients() {
    let hot_calls = Arc::new(AtomicUsize::new(0));
    let layer = CoalesceHttpLayer::new().cache_status_header(true);
    let addr = serve_h1(pipelining_app(layer.clone(), hot_calls.clone())).await;

    let stalled = stalled_pipelining_client(addr, "shop.test").await;
    let (status, cache_status, body) =
        bounded("the other client", h1_get(addr, "/hot", "shop.test")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hot"));
    assert_eq!(cache_status, "tower-coalesce; fwd=miss", "its own flight");
    assert_eq!(hot_calls.load(SeqCst), 1);
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    drop(stalled);
}

// ---------------------------------------------------------------------------------------------
// gRPC: reads after writes
// ---------------------------------------------------------------------------------------------

const GET_ITEM: &str = "/catalog.v1.Catalog/GetItem";
const SET_ITEM: &str = "/catalog.v1.Catalog/SetItem";

type GrpcOut = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// A length-prefixed, uncompressed gRPC message.
fn lpm(payload: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

fn grpc_request(path: &str, payload: &[u8]) -> Request<Full<Bytes>> {
    Request::post(format!("http://catalog.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(lpm(payload)))
        .unwrap()
}

/// An OK unary answer: one message, `grpc-status: 0` in the trailers.
fn grpc_ok(payload: String) -> Response<GrpcOut> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let body = Full::new(lpm(payload.as_bytes()))
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed_unsync();
    Response::builder()
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap()
}

/// A store: `GetItem` reads the version when called, then waits for `gate`; `SetItem` bumps
/// the version and answers OK at once.
#[derive(Clone)]
struct Store {
    version: Arc<AtomicUsize>,
    reads: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
}

impl Store {
    fn new() -> Self {
        Store {
            version: Arc::default(),
            reads: Arc::default(),
            gate: Arc::new(watch::channel(false).0),
        }
    }
}

async fn grpc_text<B>(res: Response<B>) -> (String, Option<String>)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let collected = res.into_body().collect().await.unwrap();
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = collected.to_bytes();
    (String::from_utf8_lossy(&bytes[5..]).into_owned(), status)
}

/// The HTTP layer makes a read issued after a successful write start a new call (RFC 9111
/// §4.4, README rule 4). The gRPC layer has no such rule: a `GetItem` issued after a
/// `SetItem` returned OK joins the `GetItem` flight that began before the write and gets the
/// old value — the writer cannot read its own write. (Any successful call that is not
/// allow-listed may be a write; the conservative rule is that it ends the joinability of the
/// flights that began before it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_read_after_a_successful_write_does_not_join_an_older_flight() {
    let store = Store::new();
    let layer = CoalesceGrpcLayer::new().method(GET_ITEM);
    let s = store.clone();
    let svc = layer.layer(service_fn(
        move |req: Request<CoalesceBody<Full<Bytes>>>| {
            let s = s.clone();
            async move {
                if req.uri().path() == SET_ITEM {
                    s.version.fetch_add(1, SeqCst);
                    return Ok::<_, Infallible>(grpc_ok("done".into()));
                }
                s.reads.fetch_add(1, SeqCst);
                let v = s.version.load(SeqCst);
                s.gate.subscribe().wait_for(|open| *open).await.unwrap();
                Ok(grpc_ok(format!("v{v}")))
            }
        },
    ));

    let before = tokio::spawn(svc.clone().oneshot(grpc_request(GET_ITEM, b"item-1")));
    until(
        "the first read is in its handler",
        || store.reads.load(SeqCst),
        |n| *n == 1,
    )
    .await;

    let write = bounded(
        "the write",
        svc.clone().oneshot(grpc_request(SET_ITEM, b"item-1=2")),
    )
    .await
    .unwrap();
    assert_eq!(
        grpc_text(write).await.1.as_deref(),
        Some("0"),
        "the write succeeded"
    );

    let after = tokio::spawn(svc.clone().oneshot(grpc_request(GET_ITEM, b"item-1")));
    until(
        "the later read joined or called",
        || (layer.waiting(), store.reads.load(SeqCst)),
        |(waiting, reads)| *waiting == 1 || *reads == 2,
    )
    .await;
    store.gate.send_replace(true);
    let before = bounded("first read", before).await.unwrap().unwrap();
    let after = bounded("later read", after).await.unwrap().unwrap();
    assert_eq!(grpc_text(before).await.0, "v0");
    let served = *after.extensions().get::<ServedBy>().unwrap();
    let (text, _) = grpc_text(after).await;
    assert_eq!(
        text, "v1",
        "a read issued after the write returned OK got the pre-write value (served by {served:?})"
    );
}

/// With `write_method` named, only that method counts as a write: a call of another method
/// that is not allow-listed (a health check) no longer keeps later reads from joining, and
/// the named one still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_named_write_methods_alone_split_read_flights() {
    const HEALTH: &str = "/grpc.health.v1.Health/Check";
    let store = Store::new();
    let layer = CoalesceGrpcLayer::new()
        .method(GET_ITEM)
        .write_method(SET_ITEM);
    let s = store.clone();
    let svc = layer.layer(service_fn(
        move |req: Request<CoalesceBody<Full<Bytes>>>| {
            let s = s.clone();
            async move {
                match req.uri().path() {
                    SET_ITEM => {
                        s.version.fetch_add(1, SeqCst);
                        return Ok::<_, Infallible>(grpc_ok("done".into()));
                    }
                    HEALTH => return Ok(grpc_ok("serving".into())),
                    _ => {}
                }
                s.reads.fetch_add(1, SeqCst);
                let v = s.version.load(SeqCst);
                s.gate.subscribe().wait_for(|open| *open).await.unwrap();
                Ok(grpc_ok(format!("v{v}")))
            }
        },
    ));
    let read = || tokio::spawn(svc.clone().oneshot(grpc_request(GET_ITEM, b"item-1")));

    let first = read();
    until(
        "the first read is in its handler",
        || store.reads.load(SeqCst),
        |n| *n == 1,
    )
    .await;
    let health = bounded("health", svc.clone().oneshot(grpc_request(HEALTH, b""))).await;
    assert_eq!(grpc_text(health.unwrap()).await.1.as_deref(), Some("0"));
    let joined = read();
    until(
        "the read after the health check joined",
        || layer.waiting(),
        |n| *n == 1,
    )
    .await;

    let write = bounded(
        "write",
        svc.clone().oneshot(grpc_request(SET_ITEM, b"item-1=2")),
    )
    .await;
    assert_eq!(grpc_text(write.unwrap()).await.1.as_deref(), Some("0"));
    let fresh = read();
    until(
        "the read after the write called",
        || store.reads.load(SeqCst),
        |n| *n == 2,
    )
    .await;
    assert_eq!(layer.waiting(), 1, "it did not join the older flight");

    store.gate.send_replace(true);
    let first = bounded("first", first).await.unwrap().unwrap();
    let joined = bounded("joined", joined).await.unwrap().unwrap();
    let fresh = bounded("fresh", fresh).await.unwrap().unwrap();
    assert_eq!(
        joined.extensions().get::<ServedBy>(),
        Some(&ServedBy::Follower)
    );
    assert_eq!(grpc_text(first).await.0, "v0");
    assert_eq!(grpc_text(joined).await.0, "v0");
    assert_eq!(grpc_text(fresh).await.0, "v1");
}

/// The HTTP twin of the test above holds (kept as the reference behaviour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_read_after_a_successful_write_does_not_join_an_older_flight() {
    let store = Store::new();
    let layer = CoalesceHttpLayer::new();
    let s = store.clone();
    let svc = layer.layer(service_fn(move |req: Request<Full<Bytes>>| {
        let s = s.clone();
        async move {
            if req.method() == http::Method::PUT {
                s.version.fetch_add(1, SeqCst);
                return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("done"))));
            }
            s.reads.fetch_add(1, SeqCst);
            let v = s.version.load(SeqCst);
            s.gate.subscribe().wait_for(|open| *open).await.unwrap();
            Ok(Response::new(Full::new(Bytes::from(format!("v{v}")))))
        }
    }));
    let read = || {
        Request::get("http://catalog.test/items/1")
            .body(Full::default())
            .unwrap()
    };
    let before = tokio::spawn(svc.clone().oneshot(read()));
    until(
        "the first read is in its handler",
        || store.reads.load(SeqCst),
        |n| *n == 1,
    )
    .await;
    let put = Request::put("http://catalog.test/items/1")
        .body(Full::default())
        .unwrap();
    let write = bounded("the write", svc.clone().oneshot(put))
        .await
        .unwrap();
    assert_eq!(write.status(), 200);
    let after = tokio::spawn(svc.clone().oneshot(read()));
    until(
        "the later read joined or called",
        || (layer.waiting(), store.reads.load(SeqCst)),
        |(waiting, reads)| *waiting == 1 || *reads == 2,
    )
    .await;
    store.gate.send_replace(true);
    let after = bounded("later read", after).await.unwrap().unwrap();
    let body = after.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"v1");
    bounded("first read", before).await.unwrap().unwrap();
}
