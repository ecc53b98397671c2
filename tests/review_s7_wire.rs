#![cfg(all(feature = "http", feature = "grpc"))]
//! Review (session 7): the HTTP and gRPC adapters on the wire, black-box.
//!
//! A stateless axum 0.8 `Router` is served with `axum::serve` on 127.0.0.1:0, with
//! `CoalesceHttpLayer` next to the handlers, and a tonic server with `CoalesceGrpcLayer`.
//! Clients are hyper's `client::conn` (HTTP/1.1 and h2c, several streams multiplexed on one
//! connection where that matters) and raw `TcpStream`s speaking HTTP/1.x byte by byte where a
//! test needs to misbehave or look at the framing itself.
//!
//! What in-process tests cannot see, and these look at:
//! - HTTP/1.1 and HTTP/2 clients asking for the same target at once;
//! - clients going away at each stage (before headers: socket closed, half-closed, h2
//!   `RST_STREAM`; mid-body: socket reset, h2 stream reset) while others share the flight;
//! - HEAD and GET on keep-alive connections (framing stays in sync after a shared response);
//! - chunked responses with trailers to HTTP/1.1 clients that send `TE: trailers`;
//! - bodies over the limit: the followers are released while the leader's body still streams;
//! - unshareable responses and `Vary` mismatches among streams of one h2 connection;
//! - `Connection: close`, HTTP/1.0, hop-by-hop and `Transfer-Encoding` headers in shared
//!   responses, and what they do to the followers' own connections;
//! - the registry's gauges after every connection has gone;
//! - gRPC: a caller's stream reset on a shared channel, request messages split differently
//!   across DATA frames, callers with different deadlines.
//!
//! Found, and fixed since:
//! - trailers of a shared response were dropped for HTTP/1.1 clients, leader included (the
//!   rebuilt body's exact size made hyper frame it with `Content-Length`);
//! - a handler response with `Transfer-Encoding: chunked` was lost (connection closed, no
//!   response) for every coalesced HTTP/1.1 request under axum (the copy got a
//!   `Content-Length` too);
//! - followers' copies carried the leader's hop-by-hop fields (`Connection`, `Keep-Alive`...).
//!
//! Pinned as documented: HTTP/1.1 and HTTP/2 requests for one target are keyed apart (an
//! HTTP/2 request carries its scheme, an HTTP/1.1 one does not). Changed since: under axum,
//! HEAD responses were judged by the GET body the handler produced (released as `too-large`
//! over the limit); a HEAD response's body of known length is no longer read.
//!
//! No sleeps: handlers wait on a gate (a `watch` channel) that a test opens once every request
//! is where it should be (in the handler, counted, or parked as a follower: the layer's public
//! `in_flight()` / `waiting()`), and a layer outside the coalescing one counts the request
//! futures the server dropped before they finished (a client that went away). Every wait is
//! bounded, so a hang fails the test instead of blocking it.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, Request, Response, Version};
use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use futures::Stream;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use support::wire::{
    bounded, drive, get1, get2, h1, h2, join, join_all, observer, pass, plain, request_text, serve,
    spawn_h1, spawn_h2, spawn_raw, streamed, tagged, trailers, until, within, Backend, Frames,
    HttpServer, Raw, RawReply, Reply,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::CoalesceHttpLayer;

#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/catalog.v1.rs");
}

use pb::catalog_client::CatalogClient;
use pb::catalog_server::{Catalog, CatalogServer};
use pb::{GetItemRequest, Item};

const GET_ITEM: &str = "/catalog.v1.Catalog/GetItem";

// ---------------------------------------------------------------------------------------------
// The axum app
// ---------------------------------------------------------------------------------------------

const CHUNK: usize = 16 * 1024;

fn tag_of(body: &[u8]) -> usize {
    std::str::from_utf8(&body[5..9]).unwrap().parse().unwrap()
}

#[track_caller]
fn assert_whole(body: &[u8], len: usize) {
    assert_eq!(body.len(), len, "nobody loses a byte");
    assert_eq!(body, &tagged(tag_of(body), len)[..], "intact bytes");
}

fn chunks(data: &Bytes) -> Frames {
    data.chunks(CHUNK)
        .map(|c| Ok(Frame::data(data.slice_ref(c))))
        .collect()
}

async fn hot(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header(CONTENT_TYPE, "text/plain")
        .header("x-call", n.to_string())
        .body(Body::from(format!("hot #{n}")))
        .unwrap()
}

/// A big body in 16 KiB chunks, length unknown.
async fn big(Extension(b): Extension<Backend>, Path(len): Path<usize>) -> Body {
    streamed(chunks(&tagged(b.enter().await, len)))
}

/// A big body with a known length.
async fn big_known(Extension(b): Extension<Backend>, Path(len): Path<usize>) -> Bytes {
    tagged(b.enter().await, len)
}

/// Chunks held before this many bytes in call 0 of `/over/{len}`.
const HELD_AFTER: usize = 6 * CHUNK;

/// A big streamed body; call 0 stops after [`HELD_AFTER`] bytes until the body gate opens.
async fn over(Extension(b): Extension<Backend>, Path(len): Path<usize>) -> Body {
    let n = b.enter().await;
    let data = tagged(n, len);
    let frames = futures::stream::unfold(0usize, move |at| {
        let (b, data) = (b.clone(), data.clone());
        async move {
            if at >= data.len() {
                return None;
            }
            if n == 0 && at == HELD_AFTER {
                b.body_held.fetch_add(1, SeqCst);
                pass(&b.body_gate, &b.body_dropped).await;
            }
            let end = (at + CHUNK).min(data.len());
            Some((Ok::<_, Infallible>(Frame::data(data.slice(at..end))), end))
        }
    });
    Body::new(StreamBody::new(frames))
}

/// Responses a shared cache may not store.
async fn personal(Extension(b): Extension<Backend>, Path(kind): Path<String>) -> Response<Body> {
    let n = b.enter().await;
    let (name, value) = match kind.as_str() {
        "set-cookie" => ("set-cookie", format!("session={n}")),
        "private" => ("cache-control", "private".to_owned()),
        "vary-star" => ("vary", "*".to_owned()),
        other => panic!("unknown kind {other}"),
    };
    Response::builder()
        .header(name, value)
        .body(Body::from(format!("{kind} #{n}")))
        .unwrap()
}

/// Answers per `x-client` (not a key header) and says so in `Vary`.
async fn vary(Extension(b): Extension<Backend>, headers: HeaderMap) -> Response<Body> {
    let n = b.enter().await;
    let client = headers
        .get("x-client")
        .map_or("-", |v| v.to_str().unwrap())
        .to_owned();
    Response::builder()
        .header("vary", "x-client")
        .body(Body::from(format!("vary {client} #{n}")))
        .unwrap()
}

/// Hop-by-hop fields in an ordinary 200.
async fn hop(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header("connection", "close, x-hop")
        .header("x-hop", "for-one-connection")
        .header("keep-alive", "timeout=5")
        .header("upgrade", "websocket")
        .body(Body::from(format!("hop #{n}")))
        .unwrap()
}

/// A handler that sets `Transfer-Encoding: chunked` itself.
async fn explicit_te(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header("transfer-encoding", "chunked")
        .body(streamed(vec![
            Ok(Frame::data(Bytes::from("te "))),
            Ok(Frame::data(Bytes::from(format!("#{n}")))),
        ]))
        .unwrap()
}

fn routes() -> Router {
    Router::new()
        .route("/hot", get(hot))
        .route("/plain", get(plain))
        .route("/big/{len}", get(big))
        .route("/big-known/{len}", get(big_known))
        .route("/trailers", get(trailers))
        .route("/over/{len}", get(over))
        .route("/personal/{kind}", get(personal))
        .route("/vary", get(vary))
        .route("/hop", get(hop))
        .route("/te", get(explicit_te))
}

// ---------------------------------------------------------------------------------------------
// The HTTP server
// ---------------------------------------------------------------------------------------------

async fn start(layer: CoalesceHttpLayer) -> HttpServer {
    serve(routes(), layer, None).await
}

// ---------------------------------------------------------------------------------------------
// hyper clients
// ---------------------------------------------------------------------------------------------

/// Reads the response head and the first data frame, reports it in `got_first`, waits for
/// `resume`, then reads the rest: a client in the middle of a body while others act.
async fn read_paused(
    res: Response<Incoming>,
    got_first: Arc<AtomicUsize>,
    mut resume: watch::Receiver<bool>,
) -> Reply {
    let (parts, mut body) = res.into_parts();
    let mut data = Vec::new();
    let first = bounded("the first frame", body.frame())
        .await
        .expect("a first frame")
        .expect("frame ok");
    data.extend_from_slice(first.data_ref().expect("data first"));
    got_first.fetch_add(1, SeqCst);
    resume.wait_for(|r| *r).await.unwrap();
    let rest = bounded("the rest of the body", body.collect())
        .await
        .expect("the rest");
    let trailers = rest.trailers().cloned();
    data.extend_from_slice(&rest.to_bytes());
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: data.into(),
        trailers,
    }
}

// =============================================================================================
// HTTP tests
// =============================================================================================

/// HTTP/1.1 and HTTP/2 clients asking for the same target (`http://127.0.0.1:PORT/hot`) at
/// the same time. HTTP/1.1 gives the layer `/hot` and a `Host` header; HTTP/2 gives it
/// `http://127.0.0.1:PORT/hot`, scheme included, and no `Host`. A handler may answer by the
/// scheme (a redirect to `https`), which an HTTP/1.1 request does not carry, so the layer keys
/// the two apart on purpose (documented on `CoalesceHttpLayer`): one call per protocol, each
/// shared by all the requests of that protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_requests_for_one_target_are_keyed_apart_and_each_coalesces() {
    within(async {
        const N: usize = 6;
        let s = start(CoalesceHttpLayer::new()).await;
        let (tx2, _conn) = h2(s.addr).await;
        let mut tasks: Vec<_> = (0..N).map(|_| spawn_h1(s.addr, "/hot", &[])).collect();
        tasks.extend((0..N).map(|_| spawn_h2(&tx2, get2(s.addr, "/hot", &[]))));
        s.until_settled(2 * N).await;
        let calls_while_held = s.backend.calls();
        s.backend.open();
        let replies = join_all(tasks).await;
        for r in &replies {
            assert_eq!(r.status, 200);
        }
        assert_eq!(calls_while_held, 2, "one call per protocol");
        for (i, r) in replies.iter().enumerate() {
            let first = if i < N { &replies[0] } else { &replies[N] };
            assert_eq!(
                r.body, first.body,
                "every request of a protocol shares its call"
            );
        }
        s.until_empty().await;
    })
    .await;
}

/// Many streams of one HTTP/2 connection: one call, every stream gets the whole body (big
/// enough to need HTTP/2 flow control on every stream), and the registry empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_multiplexed_on_one_h2_connection_share_one_call_and_each_gets_the_whole_body() {
    within(async {
        const N: usize = 24;
        const LEN: usize = 200 * 1024;
        let s = start(CoalesceHttpLayer::new()).await;
        let (tx, _conn) = h2(s.addr).await;
        let path = format!("/big/{LEN}");
        let tasks: Vec<_> = (0..N)
            .map(|_| spawn_h2(&tx, get2(s.addr, &path, &[])))
            .collect();
        s.until_state("one call, N - 1 followers", (1, 1, N - 1))
            .await;
        s.backend.open();
        let replies = join_all(tasks).await;
        for r in &replies {
            assert_eq!(r.version, Version::HTTP_2);
            assert_whole(&r.body, LEN);
            assert_eq!(tag_of(&r.body), 0, "the one call's body");
        }
        let followers = replies
            .iter()
            .filter(|r| r.cache_status().ends_with("collapsed"))
            .count();
        assert_eq!(followers, N - 1);
        assert_eq!(s.backend.calls(), 1);
        s.until_empty().await;
    })
    .await;
}

/// The leader's HTTP/2 stream is reset (the client dropped its request: `RST_STREAM`)
/// before headers, while its followers are streams of the same connection: the flight goes on
/// for them, one backend call, and the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_leader_stream_reset_before_headers_leaves_followers_on_its_connection_served() {
    within(async {
        const F: usize = 6;
        let s = start(CoalesceHttpLayer::new()).await;
        let (tx, _conn) = h2(s.addr).await;
        let leader = spawn_h2(&tx, get2(s.addr, "/hot", &[]));
        s.until_state("the leader in the handler", (1, 1, 0)).await;
        let followers: Vec<_> = (0..F)
            .map(|_| spawn_h2(&tx, get2(s.addr, "/hot", &[])))
            .collect();
        s.until_state("every follower parked", (1, 1, F)).await;
        leader.abort();
        s.until_abandoned(1).await;
        assert_eq!(s.backend.cancelled(), 0, "the backend call goes on");
        assert_eq!(s.layer.in_flight(), 1);
        s.backend.open();
        for r in join_all(followers).await {
            assert_eq!(r.text(), "hot #0");
        }
        assert_eq!(s.backend.calls(), 1);
        // The reset stream did not take the connection down.
        let again = join(spawn_h2(&tx, get2(s.addr, "/plain", &[]))).await;
        assert_eq!(again.text(), "plain");
        s.until_empty().await;
    })
    .await;
}

/// An HTTP/1.1 leader half-closes its socket right after its request (as `nc -N` does):
/// hyper treats that as the client going away and drops the leader's request. Its followers
/// still get the one call's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h1_leader_that_half_closes_before_headers_leaves_the_followers_one_call() {
    within(async {
        const F: usize = 5;
        let s = start(CoalesceHttpLayer::new()).await;
        let mut leader = Raw::connect(s.addr).await;
        leader
            .send(&request_text("GET", "HTTP/1.1", s.addr, "/hot", &[]))
            .await;
        s.until_state("the leader in the handler", (1, 1, 0)).await;
        let followers: Vec<_> = (0..F).map(|_| spawn_h1(s.addr, "/hot", &[])).collect();
        s.until_state("every follower parked", (1, 1, F)).await;
        leader.stream.shutdown().await.unwrap();
        s.until_abandoned(1).await;
        assert_eq!(s.backend.cancelled(), 0, "the backend call goes on");
        s.backend.open();
        for r in join_all(followers).await {
            assert_eq!(r.text(), "hot #0");
            assert!(
                r.cache_status().ends_with("collapsed"),
                "{}",
                r.cache_status()
            );
        }
        assert_eq!(s.backend.calls(), 1);
        // What the half-closed leader gets: hyper closes the connection without a response.
        let rest = leader.read_to_eof().await;
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        s.until_empty().await;
    })
    .await;
}

/// A follower's socket goes away in the middle of its (shared, 1.5 MiB) body, while every
/// other waiter is also in the middle of reading its copy: the others get their whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h1_client_gone_mid_body_does_not_cut_the_others_off() {
    within(async {
        const PAUSED: usize = 5;
        const LEN: usize = 1536 * 1024;
        let s = start(CoalesceHttpLayer::new()).await;
        let path = format!("/big/{LEN}");
        let got_first = Arc::new(AtomicUsize::new(0));
        let (resume, resume_rx) = watch::channel(false);
        let paused = |addr: SocketAddr| {
            let (req, got_first, resume_rx) =
                (get1(addr, &path, &[]), got_first.clone(), resume_rx.clone());
            tokio::spawn(async move {
                let (mut tx, _conn) = h1(addr).await;
                let res = tx.send_request(req).await.expect("response");
                read_paused(res, got_first, resume_rx).await
            })
        };
        let mut tasks = vec![paused(s.addr)];
        s.until_state("the leader in the handler", (1, 1, 0)).await;
        tasks.extend((1..PAUSED).map(|_| paused(s.addr)));
        let mut quitter = Raw::connect(s.addr).await;
        quitter
            .send(&request_text("GET", "HTTP/1.1", s.addr, &path, &[]))
            .await;
        s.until_state("every follower parked", (1, 1, PAUSED)).await;
        s.backend.open();
        until(
            "every paused client in its body",
            || got_first.load(SeqCst),
            |&n| n == PAUSED,
        )
        .await;
        let head = quitter.head().await;
        assert_eq!(head.status, 200);
        while quitter.buf.len() < 64 * 1024 {
            assert!(quitter.more().await > 0, "EOF before the first 64 KiB");
        }
        drop(quitter); // unread data: the kernel resets the connection
        resume.send_replace(true);
        for r in join_all(tasks).await {
            assert_whole(&r.body, LEN);
            assert_eq!(tag_of(&r.body), 0);
        }
        assert_eq!(s.backend.calls(), 1);
        s.until_empty().await;
    })
    .await;
}

/// The same over HTTP/2: one stream of a shared connection is reset in the middle of its body
/// (the client dropped it); the other streams on that connection read theirs to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_reset_mid_body_does_not_cut_off_the_other_streams() {
    within(async {
        const N: usize = 6;
        const LEN: usize = 512 * 1024;
        let s = start(CoalesceHttpLayer::new()).await;
        let (tx, _conn) = h2(s.addr).await;
        let path = format!("/big/{LEN}");
        let got_first = Arc::new(AtomicUsize::new(0));
        let (resume, resume_rx) = watch::channel(false);
        let (quit, quit_rx) = watch::channel(false);
        let tasks: Vec<JoinHandle<Option<Reply>>> = (0..N)
            .map(|i| {
                let (mut tx, req) = (tx.clone(), get2(s.addr, &path, &[]));
                let (got_first, resume_rx, mut quit_rx) =
                    (got_first.clone(), resume_rx.clone(), quit_rx.clone());
                tokio::spawn(async move {
                    let res = tx.send_request(req).await.expect("response");
                    if i == 2 {
                        let mut body = res.into_body();
                        body.frame().await.expect("a frame").expect("ok");
                        got_first.fetch_add(1, SeqCst);
                        quit_rx.wait_for(|q| *q).await.unwrap();
                        drop(body); // RST_STREAM(CANCEL)
                        None
                    } else {
                        Some(read_paused(res, got_first, resume_rx).await)
                    }
                })
            })
            .collect();
        s.until_state("one call, N - 1 followers", (1, 1, N - 1))
            .await;
        s.backend.open();
        until(
            "every stream in its body",
            || got_first.load(SeqCst),
            |&n| n == N,
        )
        .await;
        quit.send_replace(true);
        let mut tasks = tasks;
        assert!(join(tasks.remove(2)).await.is_none());
        resume.send_replace(true);
        for r in join_all(tasks).await {
            let r = r.expect("a reply");
            assert_whole(&r.body, LEN);
            assert_eq!(tag_of(&r.body), 0);
        }
        assert_eq!(s.backend.calls(), 1);
        let again = join(spawn_h2(&tx, get2(s.addr, "/plain", &[]))).await;
        assert_eq!(again.text(), "plain", "the connection survives the reset");
        s.until_empty().await;
    })
    .await;
}

/// HEAD and GET for one URI, each on keep-alive HTTP/1.1 connections: keyed apart (two
/// calls); every HEAD copy is a bodiless head with the GET body's `Content-Length`, every GET
/// copy its whole body, and each connection is still in sync afterwards (a body-less HEAD
/// copy that carried bytes, or a GET copy framed wrong, would garble the next response).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_get_copies_keep_every_keep_alive_connection_in_sync() {
    within(async {
        const N: usize = 4;
        let s = start(CoalesceHttpLayer::new()).await;
        let head = request_text("HEAD", "HTTP/1.1", s.addr, "/hot", &[]);
        let get = request_text("GET", "HTTP/1.1", s.addr, "/hot", &[]);
        let mut heads: Vec<_> = (0..N)
            .map(|_| spawn_raw(s.addr, head.clone(), "HEAD"))
            .collect();
        let mut gets: Vec<_> = (0..N)
            .map(|_| spawn_raw(s.addr, get.clone(), "GET"))
            .collect();
        s.until_state("a HEAD call and a GET call", (2, 2, 2 * N - 2))
            .await;
        s.backend.open();
        let mut get_len = None;
        for task in gets.drain(..) {
            let (reply, mut conn) = join(task).await;
            assert_eq!(reply.head.status, 200);
            assert!(reply.text().starts_with("hot #"), "{}", reply.text());
            let len = reply.head.get("content-length").map(str::to_owned);
            assert_eq!(len, Some(reply.body.len().to_string()));
            get_len.get_or_insert(len.clone());
            // The next response on this connection parses: the copy was framed right.
            let next = conn.exchange("HEAD", "/plain", s.addr).await;
            assert_eq!(next.head.status, 200);
            let next = conn.exchange("GET", "/plain", s.addr).await;
            assert_eq!(next.text(), "plain");
        }
        for task in heads.drain(..) {
            let (reply, mut conn) = join(task).await;
            assert_eq!(reply.head.status, 200);
            assert_eq!(
                reply.head.get("content-length").map(str::to_owned),
                get_len.clone().unwrap(),
                "a HEAD copy's Content-Length is the GET body's"
            );
            let next = conn.exchange("GET", "/plain", s.addr).await;
            assert_eq!(
                next.text(),
                "plain",
                "a HEAD copy put body bytes on the wire"
            );
        }
        assert_eq!(s.backend.calls(), 2);
        s.until_empty().await;
    })
    .await;
}

/// A body over the limit with a `Content-Length`, asked for by HEAD and GET on keep-alive
/// HTTP/1.1 connections. Every GET body is whole (the followers are released to calls of
/// their own), every HEAD answer is a bare head with the full `Content-Length`, and every
/// connection is in sync afterwards.
///
/// axum runs the GET handler for HEAD and strips its body only in the outermost route, after
/// this layer. The layer once judged and buffered that body, so HEAD followers of a large
/// resource were released (`detail=too-large`), one call each; a HEAD response's body of known
/// length is now not read at all, and the HEAD followers share the one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_head_and_get_under_axum_each_make_calls_and_keep_connections_in_sync() {
    within(async {
        const N: usize = 4;
        const LIMIT: usize = 64 * 1024;
        const LEN: usize = 100 * 1024;
        let s = start(CoalesceHttpLayer::new().max_body_bytes(LIMIT)).await;
        let path = format!("/big-known/{LEN}");
        let head = request_text("HEAD", "HTTP/1.1", s.addr, &path, &[]);
        let get = request_text("GET", "HTTP/1.1", s.addr, &path, &[]);
        let heads: Vec<_> = (0..N)
            .map(|_| spawn_raw(s.addr, head.clone(), "HEAD"))
            .collect();
        let gets: Vec<_> = (0..N)
            .map(|_| spawn_raw(s.addr, get.clone(), "GET"))
            .collect();
        s.until_state("a HEAD call and a GET call", (2, 2, 2 * N - 2))
            .await;
        s.backend.open();
        let mut tags = std::collections::HashSet::new();
        for (reply, mut conn) in join_all(gets).await {
            assert_whole(&reply.body, LEN);
            tags.insert(tag_of(&reply.body));
            assert_eq!(conn.exchange("GET", "/plain", s.addr).await.text(), "plain");
        }
        assert_eq!(tags.len(), N, "each GET got its own call's body");
        let mut collapsed = 0;
        for (reply, mut conn) in join_all(heads).await {
            assert_eq!(reply.head.get("content-length"), Some("102400"));
            let cs = reply.head.get("cache-status").unwrap_or_default();
            collapsed += usize::from(cs.ends_with("fwd=miss; collapsed"));
            assert_eq!(
                conn.exchange("GET", "/plain", s.addr).await.text(),
                "plain",
                "a HEAD answer put body bytes on the wire"
            );
        }
        assert_eq!(collapsed, N - 1, "the HEAD followers share the HEAD call");
        assert_eq!(s.backend.calls(), N + 1, "one HEAD call, N GET calls");
        s.until_empty().await;
    })
    .await;
}

/// HTTP/1.1 clients that send `TE: trailers` get a chunked body and its trailer fields from
/// the handler (see the bypassed control request), and through the layer too: every waiter
/// (the leader too) gets a rebuilt copy, whose body once reported an exact length, so hyper
/// framed it with `Content-Length`, which cannot carry trailers, and dropped them ("attempted
/// to encode trailers for non-chunked response"). Over HTTP/2 they always survived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_trailers_reach_every_h1_waiter_that_asks_for_them() {
    within(async {
        const N: usize = 4;
        let s = start(CoalesceHttpLayer::new()).await;
        let te = request_text("GET", "HTTP/1.1", s.addr, "/trailers", &["te: trailers"]);
        let tasks: Vec<_> = (0..N)
            .map(|_| spawn_raw(s.addr, te.clone(), "GET"))
            .collect();
        s.until_state("one call, N - 1 followers", (1, 1, N - 1))
            .await;
        s.backend.open();
        let replies: Vec<RawReply> = join_all(tasks).await.into_iter().map(|(r, _)| r).collect();
        assert_eq!(s.backend.calls(), 1);

        // Control: the same request, bypassing the layer, gets its trailers on this server.
        let control = request_text(
            "GET",
            "HTTP/1.1",
            s.addr,
            "/trailers",
            &["te: trailers", "cache-control: no-cache"],
        );
        let (control, _) = join(spawn_raw(s.addr, control, "GET")).await;
        assert!(control.head.chunked());
        assert_eq!(control.text(), "checked body 1");
        assert_eq!(
            control.trailers,
            [("x-checksum".to_owned(), "sum-1".to_owned())]
        );

        for r in &replies {
            assert_eq!(r.text(), "checked body 0");
            assert_eq!(
                r.trailers,
                [("x-checksum".to_owned(), "sum-0".to_owned())],
                "trailers lost for {} (head: {:?})",
                r.head.get("cache-status").unwrap_or_default(),
                r.head.headers
            );
        }
        s.until_empty().await;
    })
    .await;
}

/// A client without `TE: trailers` may join a flight whose leader asked for them (`TE` is not
/// in the key): its copy is framed correctly and its connection stays in sync. HTTP/2 streams
/// for the same target (a flight of their own) get the trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_with_and_without_te_trailers_get_correctly_framed_copies() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let with_te = request_text("GET", "HTTP/1.1", s.addr, "/trailers", &["te: trailers"]);
        let without = request_text("GET", "HTTP/1.1", s.addr, "/trailers", &[]);
        let leader = spawn_raw(s.addr, with_te.clone(), "GET");
        s.until_state("the leader in the handler", (1, 1, 0)).await;
        let followers = vec![
            spawn_raw(s.addr, without.clone(), "GET"),
            spawn_raw(s.addr, with_te, "GET"),
            spawn_raw(s.addr, without, "GET"),
        ];
        s.until_state("every follower parked", (1, 1, 3)).await;
        let (tx, _conn) = h2(s.addr).await;
        let h2s: Vec<_> = (0..3)
            .map(|_| spawn_h2(&tx, get2(s.addr, "/trailers", &[])))
            .collect();
        s.until_settled(7).await;
        s.backend.open();
        let mut all = vec![join(leader).await];
        all.extend(join_all(followers).await);
        for (r, mut conn) in all {
            assert_eq!(r.text(), "checked body 0");
            assert_eq!(conn.exchange("GET", "/plain", s.addr).await.text(), "plain");
        }
        for r in join_all(h2s).await {
            assert_eq!(r.text(), "checked body 1");
            let trailers = r.trailers.as_ref().expect("trailers over HTTP/2");
            assert_eq!(trailers["x-checksum"], "sum-1");
        }
        assert_eq!(s.backend.calls(), 2);
        s.until_empty().await;
    })
    .await;
}

/// A body that crosses the limit while it is being read: the followers are released at once
/// and finish their own calls while the leader's body is still held half-way; the leader's
/// client meanwhile already has what was read ("as it comes"), and after the hold the rest,
/// whole, in a properly terminated chunked body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_followers_are_released_while_the_leaders_body_still_streams() {
    within(async {
        const F: usize = 4;
        const LIMIT: usize = 64 * 1024;
        const LEN: usize = 256 * 1024;
        let s = start(CoalesceHttpLayer::new().max_body_bytes(LIMIT)).await;
        let path = format!("/over/{LEN}");
        let mut leader = Raw::connect(s.addr).await;
        leader
            .send(&request_text("GET", "HTTP/1.1", s.addr, &path, &[]))
            .await;
        s.until_state("the leader in the handler", (1, 1, 0)).await;
        let followers: Vec<_> = (0..F).map(|_| spawn_h1(s.addr, &path, &[])).collect();
        s.until_state("every follower parked", (1, 1, F)).await;
        s.backend.open();
        until(
            "the leader's body held half-way",
            || s.backend.body_held.load(SeqCst),
            |&n| n == 1,
        )
        .await;
        // Released followers need nothing from the held body.
        for r in join_all(followers).await {
            assert_whole(&r.body, LEN);
            assert_ne!(tag_of(&r.body), 0, "a follower's own call");
            assert!(
                r.cache_status().contains("collapsed=?0"),
                "{}",
                r.cache_status()
            );
        }
        assert_eq!(s.backend.body_held.load(SeqCst), 1, "still held");
        // The leader's client has the head and everything before the hold.
        let head = leader.head().await;
        assert_eq!(head.status, 200);
        assert!(head.chunked(), "{head:?}");
        let mut body = Vec::new();
        while body.len() < HELD_AFTER {
            body.extend(leader.chunk().await.expect("more chunks before the hold"));
        }
        assert_eq!(body.len(), HELD_AFTER);
        s.backend.body_gate.send_replace(true);
        let (rest, _) = leader.chunked().await;
        body.extend(rest);
        assert_whole(&body, LEN);
        assert_eq!(tag_of(&body), 0);
        assert_eq!(s.backend.calls(), 1 + F);
        assert_eq!(s.backend.body_dropped.load(SeqCst), 0);
        s.until_empty().await;
    })
    .await;
}

/// Unshareable responses among streams of one HTTP/2 connection: every follower is released
/// to a call of its own and gets that call's response (its own cookie), never the leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshareable_responses_send_each_multiplexed_follower_to_its_own_call() {
    within(async {
        const N: usize = 5;
        for kind in ["set-cookie", "private", "vary-star"] {
            let s = start(CoalesceHttpLayer::new()).await;
            let (tx, _conn) = h2(s.addr).await;
            let path = format!("/personal/{kind}");
            let tasks: Vec<_> = (0..N)
                .map(|_| spawn_h2(&tx, get2(s.addr, &path, &[])))
                .collect();
            s.until_state("one call, N - 1 followers", (1, 1, N - 1))
                .await;
            s.backend.open();
            let replies = join_all(tasks).await;
            let bodies: std::collections::HashSet<_> =
                replies.iter().map(|r| r.text().to_owned()).collect();
            assert_eq!(bodies.len(), N, "{kind}: each got its own call's response");
            for r in &replies {
                let n = r.text().rsplit('#').next().unwrap();
                if kind == "set-cookie" {
                    assert_eq!(r.headers["set-cookie"], format!("session={n}"));
                }
                let cs = r.cache_status();
                assert!(
                    cs == "tower-coalesce; fwd=miss" || cs.contains("collapsed=?0"),
                    "{kind}: {cs}"
                );
            }
            assert_eq!(s.backend.calls(), N, "{kind}");
            s.until_empty().await;
        }
    })
    .await;
}

/// `Vary: x-client` among streams of one HTTP/2 connection: followers whose `x-client`
/// matches the leader's get its response; the others are released, each to its own call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_mismatch_releases_only_the_mismatching_streams_of_one_connection() {
    within(async {
        const EACH: usize = 3;
        let s = start(CoalesceHttpLayer::new()).await;
        let (tx, _conn) = h2(s.addr).await;
        let leader = spawn_h2(&tx, get2(s.addr, "/vary", &[("x-client", "a")]));
        s.until_state("the leader in the handler", (1, 1, 0)).await;
        let same: Vec<_> = (0..EACH)
            .map(|_| spawn_h2(&tx, get2(s.addr, "/vary", &[("x-client", "a")])))
            .collect();
        let other: Vec<_> = (0..EACH)
            .map(|_| spawn_h2(&tx, get2(s.addr, "/vary", &[("x-client", "b")])))
            .collect();
        s.until_state("every follower parked", (1, 1, 2 * EACH))
            .await;
        s.backend.open();
        assert_eq!(join(leader).await.text(), "vary a #0");
        for r in join_all(same).await {
            assert_eq!(r.text(), "vary a #0");
            assert!(
                r.cache_status().ends_with("collapsed"),
                "{}",
                r.cache_status()
            );
        }
        for r in join_all(other).await {
            assert!(r.text().starts_with("vary b #"), "{}", r.text());
            assert_ne!(r.text(), "vary b #0");
            assert!(
                r.cache_status().contains("vary-miss"),
                "{}",
                r.cache_status()
            );
        }
        assert_eq!(s.backend.calls(), 1 + EACH);
        s.until_empty().await;
    })
    .await;
}

/// The leader asks for `Connection: close` (a request header, not in the key): hyper closes
/// the leader's connection after its response, but the followers' keep-alive connections are
/// untouched: their copies carry no `Connection: close` and they serve another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_asking_for_connection_close_does_not_close_its_followers_connections() {
    within(async {
        const F: usize = 4;
        let s = start(CoalesceHttpLayer::new()).await;
        let leader = spawn_raw(
            s.addr,
            request_text("GET", "HTTP/1.1", s.addr, "/hot", &["connection: close"]),
            "GET",
        );
        s.until_state("the leader in the handler", (1, 1, 0)).await;
        let get = request_text("GET", "HTTP/1.1", s.addr, "/hot", &[]);
        let followers: Vec<_> = (0..F)
            .map(|_| spawn_raw(s.addr, get.clone(), "GET"))
            .collect();
        s.until_state("every follower parked", (1, 1, F)).await;
        s.backend.open();
        let (reply, mut conn) = join(leader).await;
        assert_eq!(reply.text(), "hot #0");
        assert_eq!(reply.head.get("connection"), Some("close"));
        assert!(conn.closed().await, "the leader's connection is closed");
        for (reply, mut conn) in join_all(followers).await {
            assert_eq!(reply.text(), "hot #0");
            assert_eq!(reply.head.get("connection"), None, "{:?}", reply.head);
            assert_eq!(conn.exchange("GET", "/plain", s.addr).await.text(), "plain");
        }
        assert_eq!(s.backend.calls(), 1);
        s.until_empty().await;
    })
    .await;
}

/// An HTTP/1.0 leader with HTTP/1.1 and HTTP/1.0 followers (the version is not in the key):
/// each client gets a response in its own version, framed so that it can read it, and the
/// HTTP/1.1 followers keep their connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_leader_neither_downgrades_nor_closes_its_http11_followers() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let v10 = request_text("GET", "HTTP/1.0", s.addr, "/hot", &[]);
        let v11 = request_text("GET", "HTTP/1.1", s.addr, "/hot", &[]);
        let leader = spawn_raw(s.addr, v10.clone(), "GET");
        s.until_state("the leader in the handler", (1, 1, 0)).await;
        let f11: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, v11.clone(), "GET"))
            .collect();
        let f10 = spawn_raw(s.addr, v10, "GET");
        s.until_state("every follower parked", (1, 1, 4)).await;
        s.backend.open();
        for task in [leader, f10] {
            let (r, mut conn) = join(task).await;
            assert_eq!((r.head.version.as_str(), r.text()), ("HTTP/1.0", "hot #0"));
            assert!(conn.closed().await, "HTTP/1.0 without keep-alive: closed");
        }
        for (r, mut conn) in join_all(f11).await {
            assert_eq!((r.head.version.as_str(), r.text()), ("HTTP/1.1", "hot #0"));
            assert!(r.head.get("cache-status").unwrap().ends_with("collapsed"));
            assert_eq!(conn.exchange("GET", "/plain", s.addr).await.text(), "plain");
        }
        assert_eq!(s.backend.calls(), 1);
        s.until_empty().await;
    })
    .await;
}

/// A shared response carrying hop-by-hop fields (`Connection: close, x-hop`, `x-hop`,
/// `Keep-Alive`, `Upgrade`). They are about the leader's connection: the leader's response
/// keeps them (its connection closes after it), the followers' copies go without (RFC 9110
/// §7.6.1), so their keep-alive connections serve another request. HTTP/2 copies arrive
/// without any of them either way (hyper's HTTP/2 server strips connection-specific fields),
/// and the connection serves further streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_fields_in_a_shared_response_only_affect_each_followers_own_connection() {
    within(async {
        const N: usize = 4;
        let s = start(CoalesceHttpLayer::new()).await;
        let get = request_text("GET", "HTTP/1.1", s.addr, "/hop", &[]);
        let h1s: Vec<_> = (0..N)
            .map(|_| spawn_raw(s.addr, get.clone(), "GET"))
            .collect();
        let (tx, _conn) = h2(s.addr).await;
        let h2s: Vec<_> = (0..N)
            .map(|_| spawn_h2(&tx, get2(s.addr, "/hop", &[])))
            .collect();
        s.until_settled(2 * N).await;
        s.backend.open();
        let mut h1_followers = 0;
        for (r, mut conn) in join_all(h1s).await {
            assert!(r.text().starts_with("hop #"), "{}", r.text());
            assert_eq!(
                r.head.get("content-length"),
                Some(r.body.len().to_string().as_str())
            );
            let follower = r.head.get("cache-status").unwrap().ends_with("collapsed");
            if follower {
                h1_followers += 1;
                for name in ["connection", "x-hop", "keep-alive", "upgrade"] {
                    assert_eq!(r.head.get(name), None, "{name} on a follower's copy");
                }
                let next = conn.exchange("GET", "/plain", s.addr).await;
                assert_eq!(
                    next.text(),
                    "plain",
                    "a follower's connection is kept alive"
                );
            } else {
                // The leader's own response, as its handler made it.
                assert_eq!(r.head.get("connection"), Some("close, x-hop"));
                assert_eq!(r.head.get("x-hop"), Some("for-one-connection"));
                assert!(
                    conn.closed().await,
                    "the leader's Connection: close is honoured"
                );
            }
        }
        assert_eq!(h1_followers, N - 1);
        for r in join_all(h2s).await {
            assert!(r.text().starts_with("hop #"), "{}", r.text());
            for name in ["connection", "x-hop", "keep-alive", "upgrade"] {
                assert!(!r.headers.contains_key(name), "{name} over HTTP/2");
            }
        }
        let again = join(spawn_h2(&tx, get2(s.addr, "/plain", &[]))).await;
        assert_eq!(again.text(), "plain", "the h2 connection survives");
        s.until_empty().await;
    })
    .await;
}

/// A handler that sets `Transfer-Encoding: chunked` itself (as a proxy handler does when it
/// returns an upstream response from hyper's client, whose headers keep that field).
///
/// Bypassing the layer, the response goes out chunked. Through it, every waiter's copy has a
/// buffered body: the layer drops the handler's `Transfer-Encoding` and the server frames the
/// copy by its length. (It once kept the field: axum added `Content-Length` beside it, hyper
/// refused the pair and closed the connection without a byte, for every coalesced HTTP/1.1
/// request, a lone leader included.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_transfer_encoding_in_a_coalesced_response_reaches_http11_clients() {
    within(async {
        // Alone, gate open: a control that bypasses (no-cache), then the same request
        // coalescible, with nobody else around.
        let s = start(CoalesceHttpLayer::new()).await;
        s.backend.open();
        let control = request_text(
            "GET",
            "HTTP/1.1",
            s.addr,
            "/te",
            &["cache-control: no-cache"],
        );
        let (control, _) = join(spawn_raw(s.addr, control, "GET")).await;
        assert!(control.head.chunked(), "{:?}", control.head);
        assert_eq!(control.text(), "te #0");
        let mut alone = Raw::connect(s.addr).await;
        alone
            .send(&request_text("GET", "HTTP/1.1", s.addr, "/te", &[]))
            .await;
        assert!(
            !alone.closed().await,
            "a lone coalescible request: connection closed without a response"
        );
        let alone = alone.response("GET").await;
        assert_eq!(alone.text(), "te #1");

        // Shared by HTTP/1.1, HTTP/1.0 and HTTP/2 clients.
        const N: usize = 4;
        let s = start(CoalesceHttpLayer::new()).await;
        let v11 = request_text("GET", "HTTP/1.1", s.addr, "/te", &[]);
        let v10 = request_text("GET", "HTTP/1.0", s.addr, "/te", &[]);
        let h1s: Vec<_> = (0..N)
            .map(|_| spawn_raw(s.addr, v11.clone(), "GET"))
            .collect();
        let h10 = spawn_raw(s.addr, v10, "GET");
        let (tx, _conn) = h2(s.addr).await;
        let h2s: Vec<_> = (0..2)
            .map(|_| spawn_h2(&tx, get2(s.addr, "/te", &[])))
            .collect();
        s.until_settled(N + 3).await;
        s.backend.open();
        let (r, _) = join(h10).await;
        assert!(r.text().starts_with("te #"), "HTTP/1.0: {r:?}");
        for r in join_all(h2s).await {
            assert!(r.text().starts_with("te #"), "{}", r.text());
            assert!(!r.headers.contains_key("transfer-encoding"));
        }
        let mut bodies = std::collections::HashSet::new();
        for (r, mut conn) in join_all(h1s).await {
            // The copy's body is buffered: the server frames it by its length, once.
            assert_eq!(
                (r.head.chunked(), r.head.get("content-length")),
                (false, Some(r.body.len().to_string().as_str())),
                "one framing: {:?}",
                r.head
            );
            bodies.insert(r.text().to_owned());
            assert_eq!(conn.exchange("GET", "/plain", s.addr).await.text(), "plain");
        }
        assert_eq!(bodies.len(), 1, "HTTP/1.1 clients shared one call");
        s.until_empty().await;
    })
    .await;
}

/// Clients going away at every stage, over both protocols, on three keys: all of a key's
/// clients before headers (HTTP/1.1 sockets closed), all of a key's streams reset before
/// headers (HTTP/2), and clients that leave mid-body after a shared answer. Once every
/// connection is closed the registry is empty, the abandoned flights were cancelled (their
/// handlers dropped), and each key makes a fresh call again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_empty_after_clients_leave_at_every_stage() {
    within(async {
        const N: usize = 3;
        const LEN: usize = 512 * 1024;
        let s = start(CoalesceHttpLayer::new()).await;
        let big = format!("/big/{LEN}");
        // Key 1: HTTP/1.1 clients, all gone before headers.
        let h1s: Vec<_> = (0..N).map(|_| spawn_h1(s.addr, "/hot?k=1", &[])).collect();
        // Key 2: HTTP/2 streams, all reset before headers.
        let (tx, conn) = h2(s.addr).await;
        let h2s: Vec<_> = (0..N)
            .map(|_| spawn_h2(&tx, get2(s.addr, "/hot?k=2", &[])))
            .collect();
        // Key 3: raw clients that will leave in the middle of the shared body.
        let mut raws = Vec::new();
        for _ in 0..N {
            let mut raw = Raw::connect(s.addr).await;
            raw.send(&request_text("GET", "HTTP/1.1", s.addr, &big, &[]))
                .await;
            raws.push(raw);
        }
        s.until_state("three calls, each with N - 1 followers", (3, 3, 3 * N - 3))
            .await;
        for t in h1s.iter().chain(&h2s) {
            t.abort();
        }
        s.until_abandoned(2 * N).await;
        until(
            "the two abandoned calls cancelled",
            || (s.backend.cancelled(), s.layer.in_flight()),
            |&st| st == (2, 1),
        )
        .await;
        s.backend.open();
        for raw in &mut raws {
            assert_eq!(raw.head().await.status, 200);
            raw.more().await;
        }
        drop(raws);
        drop((tx, conn));
        s.until_empty().await;
        let stats = s.layer.stats();
        assert_eq!(
            (stats.leaders, stats.followers),
            (3, (3 * N - 3) as u64),
            "{stats:?}"
        );
        assert_eq!(stats.cancelled, 2, "{stats:?}");
        // Each key coalesces afresh.
        for path in ["/hot?k=1", "/hot?k=2"] {
            let r = join(spawn_h1(s.addr, path, &[])).await;
            assert_eq!(r.cache_status(), "tower-coalesce; fwd=miss");
        }
        assert_eq!(s.backend.calls(), 5);
        s.until_empty().await;
    })
    .await;
}

/// Two identical GETs pipelined on one HTTP/1.1 connection, plus the same GET on another
/// connection: hyper serves a connection's requests one after the other, so the pipelined
/// second request must not wait for itself; every response arrives, in order, framed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_identical_gets_on_one_connection_complete_in_order() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let get = request_text("GET", "HTTP/1.1", s.addr, "/hot", &[]);
        let mut pipelined = Raw::connect(s.addr).await;
        pipelined.send(&format!("{get}{get}")).await;
        s.until_state("the first request in the handler", (1, 1, 0))
            .await;
        let other = spawn_raw(s.addr, get.clone(), "GET");
        s.until_state("the other connection parked", (1, 1, 1))
            .await;
        s.backend.open();
        let first = pipelined.response("GET").await;
        let second = pipelined.response("GET").await;
        let (other, _) = join(other).await;
        assert_eq!(first.text(), "hot #0");
        assert_eq!(other.text(), "hot #0");
        // The second pipelined request arrived after the answer went out: a new call.
        assert_eq!(second.text(), "hot #1");
        assert_eq!(s.backend.calls(), 2);
        s.until_empty().await;
    })
    .await;
}

// =============================================================================================
// gRPC over tonic
// =============================================================================================

#[derive(Clone)]
struct Catalogue {
    backend: Backend,
}

#[tonic::async_trait]
impl Catalog for Catalogue {
    async fn get_item(
        &self,
        request: tonic::Request<GetItemRequest>,
    ) -> Result<tonic::Response<Item>, Status> {
        let n = self.backend.enter().await;
        let id = request.into_inner().id;
        Ok(tonic::Response::new(Item {
            description: format!("{id} #{n}"),
            id,
            payload: Vec::new(),
        }))
    }

    type WatchItemStream = Pin<Box<dyn Stream<Item = Result<Item, Status>> + Send>>;

    async fn watch_item(
        &self,
        _request: tonic::Request<GetItemRequest>,
    ) -> Result<tonic::Response<Self::WatchItemStream>, Status> {
        Err(Status::unimplemented("not used here"))
    }
}

struct Grpc {
    addr: SocketAddr,
    backend: Backend,
    layer: CoalesceGrpcLayer,
    abandoned: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Grpc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_grpc() -> Grpc {
    let layer = CoalesceGrpcLayer::new().method(GET_ITEM);
    let backend = Backend::new();
    let abandoned = Arc::new(AtomicUsize::new(0));
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = incoming.local_addr().expect("local addr");
    let router = Server::builder()
        .layer(observer(&abandoned))
        .layer(layer.clone())
        .add_service(CatalogServer::new(Catalogue {
            backend: backend.clone(),
        }));
    let task = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.expect("server");
    });
    Grpc {
        addr,
        backend,
        layer,
        abandoned,
        task,
    }
}

impl Grpc {
    fn state(&self) -> (usize, usize, usize) {
        (
            self.backend.calls(),
            self.layer.in_flight(),
            self.layer.waiting(),
        )
    }

    async fn until_state(&self, what: &str, want: (usize, usize, usize)) {
        until(what, || self.state(), |s| *s == want).await;
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn until_empty(&self) {
        until(
            "the registry empty",
            || (self.layer.in_flight(), self.layer.waiting()),
            |&g| g == (0, 0),
        )
        .await;
    }
}

fn item_request(id: &str) -> tonic::Request<GetItemRequest> {
    tonic::Request::new(GetItemRequest {
        id: id.to_owned(),
        padding: Vec::new(),
    })
}

fn spawn_call(
    channel: &Channel,
    request: tonic::Request<GetItemRequest>,
) -> JoinHandle<Result<Item, Status>> {
    let mut client = CatalogClient::new(channel.clone());
    tokio::spawn(async move { client.get_item(request).await.map(|r| r.into_inner()) })
}

/// The leader's call is cancelled by its client (its h2 stream reset) while the followers are
/// streams of the same channel: one handler call, and the followers get its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_a_leader_reset_on_a_shared_channel_leaves_the_followers_one_handler_call() {
    within(async {
        const F: usize = 6;
        let g = start_grpc().await;
        let channel = g.channel().await;
        let leader = spawn_call(&channel, item_request("hot"));
        g.until_state("the leader in the handler", (1, 1, 0)).await;
        let followers: Vec<_> = (0..F)
            .map(|_| spawn_call(&channel, item_request("hot")))
            .collect();
        g.until_state("every follower parked", (1, 1, F)).await;
        leader.abort();
        until(
            "the server dropped the leader's call",
            || g.abandoned.load(SeqCst),
            |&n| n == 1,
        )
        .await;
        assert_eq!(g.backend.cancelled(), 0, "the handler call goes on");
        g.backend.open();
        for item in join_all(followers).await {
            assert_eq!(item.expect("OK").description, "hot #0");
        }
        assert_eq!(g.backend.calls(), 1);
        let again = join(spawn_call(&channel, item_request("other"))).await;
        assert_eq!(
            again.expect("the channel still works").description,
            "other #1"
        );
        g.until_empty().await;
    })
    .await;
}

type GrpcBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A raw gRPC unary request whose framed message is sent in DATA frames cut at `cuts`.
fn raw_grpc_request(addr: SocketAddr, id: &str, cuts: &[usize]) -> Request<GrpcBody> {
    let message = GetItemRequest {
        id: id.to_owned(),
        padding: vec![9; 300],
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    let framed = Bytes::from(framed);
    let mut frames = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain([framed.len()].iter()) {
        frames.push(Ok(Frame::data(framed.slice(at..cut))));
        at = cut;
    }
    Request::post(format!("http://{addr}{GET_ITEM}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(futures::stream::iter(frames)))
        .unwrap()
}

/// (grpc-status, decoded item) of a raw gRPC response.
async fn raw_grpc_reply(res: Response<Incoming>) -> (String, Option<Item>) {
    let (parts, body) = res.into_parts();
    let collected = bounded("a gRPC body", body.collect()).await.unwrap();
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let data = collected.to_bytes();
    let item = (data.len() >= 5).then(|| Item::decode(&data[5..]).unwrap());
    (status, item)
}

/// The key is "the request message bytes as sent": how the client cuts them into HTTP/2 DATA
/// frames (inside the 5-byte prefix, inside the message, or not at all) must not matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_a_message_split_across_data_frames_differently_still_coalesces() {
    within(async {
        let g = start_grpc().await;
        let io = TokioIo::new(TcpStream::connect(g.addr).await.unwrap());
        let (tx, conn) =
            hyper::client::conn::http2::handshake::<_, _, GrpcBody>(TokioExecutor::new(), io)
                .await
                .unwrap();
        let _conn = drive(conn);
        let splits: [&[usize]; 5] = [&[], &[5], &[2], &[1, 3, 5, 7, 100], &[5, 6]];
        let spawn = |cuts: &[usize]| {
            let mut tx = tx.clone();
            let req = raw_grpc_request(g.addr, "split", cuts);
            tokio::spawn(async move { raw_grpc_reply(tx.send_request(req).await.unwrap()).await })
        };
        let leader = spawn(splits[0]);
        g.until_state("the leader in the handler", (1, 1, 0)).await;
        let followers: Vec<_> = splits[1..].iter().map(|cuts| spawn(cuts)).collect();
        g.until_state("every split parked as a follower", (1, 1, splits.len() - 1))
            .await;
        g.backend.open();
        let mut all = vec![join(leader).await];
        all.extend(join_all(followers).await);
        for (status, item) in all {
            assert_eq!(status, "0");
            assert_eq!(item.expect("a message").description, "split #0");
        }
        assert_eq!(g.backend.calls(), 1);
        g.until_empty().await;
    })
    .await;
}

/// `grpc-timeout` is not in the key: callers with different deadlines share a call. When the
/// leader's deadline passes, tonic drops the leader's request (it gets a deadline error) but
/// not the call: the followers, who have no deadline, get its answer; one handler call.
/// (The only real-time wait in the file: the deadline itself, 3 s, is the event under test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_the_leaders_deadline_passing_does_not_fail_or_repeat_the_followers_call() {
    within(async {
        const F: usize = 4;
        let g = start_grpc().await;
        let channel = g.channel().await;
        let mut short = item_request("deadline");
        short.set_timeout(Duration::from_secs(3));
        let leader = spawn_call(&channel, short);
        g.until_state("the leader in the handler", (1, 1, 0)).await;
        let followers: Vec<_> = (0..F)
            .map(|_| spawn_call(&channel, item_request("deadline")))
            .collect();
        g.until_state("every follower parked", (1, 1, F)).await;
        let status = join(leader)
            .await
            .expect_err("the leader's deadline passed");
        assert!(
            matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
            "{status:?}"
        );
        until(
            "the server dropped the leader's call",
            || g.abandoned.load(SeqCst),
            |&n| n == 1,
        )
        .await;
        assert_eq!(g.backend.cancelled(), 0);
        g.backend.open();
        for item in join_all(followers).await {
            assert_eq!(item.expect("OK").description, "deadline #0");
        }
        assert_eq!(g.backend.calls(), 1);
        g.until_empty().await;
    })
    .await;
}
