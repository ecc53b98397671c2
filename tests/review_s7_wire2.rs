#![cfg(feature = "http")]
//! Review (session 7, second wire pass): the HTTP changes of 16b183c, 24a1fb2, f01dcab, 25a873c
//! and 6f504ff, checked on the wire.
//!
//! A stateless axum 0.8 `Router` is served with `axum::serve` on 127.0.0.1:0 with
//! `CoalesceHttpLayer` next to the handlers (`Cache-Status` on, so a client can tell whether it
//! led, followed or was released). Clients: hyper's `client::conn` (HTTP/1.1 and h2c, streams
//! multiplexed on one connection) and raw `TcpStream`s writing HTTP/1.0 and HTTP/1.1 bytes where
//! a test looks at the framing. A proxy handler forwards to a second, tiny hyper server (the
//! upstream) and returns hyper's client response through the layer.
//!
//! Every test checks, for each client (leader and followers; HTTP/1.0 with and without
//! keep-alive, HTTP/1.1 keep-alive, HTTP/2): a complete response, framed once (never a
//! `Transfer-Encoding` and a `Content-Length` together), and a connection still in sync (a
//! follow-up request on it works) or closed when it must be. Nothing hangs: every wait is
//! bounded and fails instead.
//!
//! No sleeps: handlers wait on a gate (a `watch` channel) opened once every request is in the
//! handler or parked as a follower (the layer's `in_flight()` / `waiting()`).
//!
//! Found, fixed since: a leader whose response the layer would not share (`private`,
//! `Set-Cookie`, `Vary: *`, an event stream, a gzip transfer coding) kept a `Content-Length`
//! beside its `Transfer-Encoding`, which the docs say is dropped; hyper refused the pair and
//! closed the connection without a byte (as it does without the layer).

mod support;

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Path, Request as AxumRequest};
use axum::http::{Request, Response, StatusCode, Version};
use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::wire::{
    bounded, data, h2, join, join_all, plain, req2, request_text, serve, spawn_raw, streamed,
    tagged, trailer_frame, trailers, until, within, Backend, Frames, Framing, HttpServer, Raw,
    RawReply, Reply, Sender2, Upstream, UpstreamServer,
};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tower_coalesce::http::CoalesceHttpLayer;

// ---------------------------------------------------------------------------------------------
// The axum app (every route is `get`: axum answers HEAD with the GET handler)
// ---------------------------------------------------------------------------------------------

/// An empty body of known length, not gated.
async fn empty() {}

/// A body of known length (`Bytes`: exact size hint).
async fn known(Extension(b): Extension<Backend>, Path(len): Path<usize>) -> Bytes {
    tagged(b.enter().await, len)
}

/// A streamed body, length unknown.
async fn unknown(Extension(b): Extension<Backend>) -> Body {
    let n = b.enter().await;
    streamed(vec![data("streamed "), data(format!("#{n}"))])
}

/// `Transfer-Encoding: chunked` set by the handler with a stale `Content-Length` beside it,
/// body of unknown length.
async fn te_stale(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header("transfer-encoding", "chunked")
        .header("content-length", "1")
        .body(streamed(vec![data("te-stale "), data(format!("#{n}"))]))
        .unwrap()
}

/// `Transfer-Encoding: chunked` beside a correct `Content-Length`, body of known length.
async fn te_cl(Extension(b): Extension<Backend>) -> Response<Body> {
    let body = tagged(b.enter().await, 300);
    Response::builder()
        .header("transfer-encoding", "chunked")
        .header("content-length", body.len().to_string())
        .body(Body::from(body))
        .unwrap()
}

/// Not shareable (`Cache-Control: private`), with `Transfer-Encoding: chunked` and a stale
/// `Content-Length: 1` beside it, body of unknown length.
async fn private_te_stale(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header("cache-control", "private")
        .header("transfer-encoding", "chunked")
        .header("content-length", "1")
        .body(streamed(vec![data("private "), data(format!("#{n}"))]))
        .unwrap()
}

/// A transfer coding besides `chunked`.
async fn gzip(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header("transfer-encoding", "gzip, chunked")
        .body(streamed(vec![data("gzip "), data(format!("#{n}"))]))
        .unwrap()
}

/// `Connection: x-sig` names a field sent only in the trailers.
async fn hop_trailers(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header("connection", "x-sig")
        .header("trailer", "x-sig, x-sum")
        .body(streamed(vec![
            data(format!("hop-trailers #{n}")),
            trailer_frame(&[("x-sig", format!("sig-{n}")), ("x-sum", format!("sum-{n}"))]),
        ]))
        .unwrap()
}

/// A 426 naming the protocols to upgrade to, and a leader-only hop-by-hop field.
async fn upgrade_required(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .status(StatusCode::UPGRADE_REQUIRED)
        // A 426 is not heuristically cacheable (RFC 9111 §3): explicitly fresh, so that it is
        // still shared and the followers' copies can be checked.
        .header("cache-control", "max-age=60")
        .header("upgrade", "TLS/1.2, HTTP/1.1")
        .header("connection", "Upgrade, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .body(Body::from(format!("upgrade #{n}")))
        .unwrap()
}

/// A cookie in the trailers; the call's number in a trailer hyper's HTTP/1.1 server sends.
async fn cookie_trailer(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header("trailer", "x-call")
        .body(streamed(vec![
            data(format!("cookie #{n}")),
            trailer_frame(&[("set-cookie", format!("s={n}")), ("x-call", n.to_string())]),
        ]))
        .unwrap()
}

/// A cookie in the trailers, and `Transfer-Encoding: chunked` with a stale `Content-Length`.
async fn cookie_te_stale(Extension(b): Extension<Backend>) -> Response<Body> {
    let n = b.enter().await;
    Response::builder()
        .header("trailer", "x-call")
        .header("transfer-encoding", "chunked")
        .header("content-length", "1")
        .body(streamed(vec![
            data(format!("cookie #{n}")),
            trailer_frame(&[("set-cookie", format!("s={n}")), ("x-call", n.to_string())]),
        ]))
        .unwrap()
}

/// Forwards to the upstream (method, path, `te: trailers`) and returns hyper's client
/// response as it came (headers `Transfer-Encoding`, `Trailer`... included).
async fn proxy(Extension(up): Extension<Upstream>, req: AxumRequest) -> Response<Body> {
    let path = req.uri().path().trim_start_matches("/up").to_owned();
    let io = TokioIo::new(TcpStream::connect(up.addr).await.unwrap());
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let upstream_req = Request::builder()
        .method(req.method().clone())
        .uri(path)
        .header("host", up.addr.to_string())
        .header("te", "trailers")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = tx
        .send_request(upstream_req)
        .await
        .expect("upstream answers");
    res.map(Body::new)
}

fn routes() -> Router {
    Router::new()
        .route("/plain", get(plain))
        .route("/empty", get(empty))
        .route("/known/{len}", get(known))
        .route("/unknown", get(unknown))
        .route("/te-stale", get(te_stale))
        .route("/te-cl", get(te_cl))
        .route("/gzip", get(gzip))
        .route("/private-te-stale", get(private_te_stale))
        .route("/trailers", get(trailers))
        .route("/hop-trailers", get(hop_trailers))
        .route("/upgrade-required", get(upgrade_required))
        .route("/cookie-trailer", get(cookie_trailer))
        .route("/cookie-te-stale", get(cookie_te_stale))
        .route("/up/{*rest}", get(proxy))
}

// ---------------------------------------------------------------------------------------------
// The upstream: a tiny hyper HTTP/1.1 server, counted and gated
// ---------------------------------------------------------------------------------------------

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn upstream_answer(b: Backend, req: Request<Incoming>) -> Response<UpBody> {
    let n = b.enter().await;
    let frames = |frames: Frames| StreamBody::new(futures::stream::iter(frames)).boxed();
    match req.uri().path() {
        // Chunked: no length known.
        "/chunked" => Response::new(frames(vec![data("up-chunked "), data(format!("#{n}"))])),
        // Chunked with a trailer (sent as the request asked for trailers).
        "/trailers" => Response::builder()
            .header("trailer", "x-up")
            .body(frames(vec![
                data("up-trailers "),
                data(format!("#{n}")),
                trailer_frame(&[("x-up", format!("up-{n}"))]),
            ]))
            .unwrap(),
        // Content-Length framed.
        "/length" => Response::new(Full::new(tagged(n, 500)).boxed()),
        other => panic!("unknown upstream path {other}"),
    }
}

async fn start_upstream() -> UpstreamServer {
    let backend = Backend::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let b = backend.clone();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let b = b.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let b = b.clone();
                    async move { Ok::<_, Infallible>(upstream_answer(b, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    UpstreamServer {
        addr,
        backend,
        task,
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP server
// ---------------------------------------------------------------------------------------------

async fn start(layer: CoalesceHttpLayer) -> HttpServer {
    serve(routes(), layer, None).await
}

async fn start_proxy() -> HttpServer {
    let up = start_upstream().await;
    serve(routes(), CoalesceHttpLayer::new(), Some(up)).await
}

// ---------------------------------------------------------------------------------------------
// hyper clients
// ---------------------------------------------------------------------------------------------

/// A response on an HTTP/2 connection, read whole.
async fn read_reply(res: Response<Incoming>) -> Reply {
    assert_eq!(res.version(), Version::HTTP_2);
    support::wire::read_reply(res).await
}

/// One request as a new stream of the h2 connection `tx`.
fn spawn_h2(tx: &Sender2, req: Request<Full<Bytes>>) -> JoinHandle<Reply> {
    let mut tx = tx.clone();
    tokio::spawn(async move {
        let res = bounded("h2 response head", tx.send_request(req)).await;
        read_reply(res.expect("response")).await
    })
}

const KA10: &str = "connection: keep-alive";
const TE_TRAILERS: &str = "te: trailers";

// =============================================================================================
// Transfer-Encoding and Content-Length
// =============================================================================================

/// A handler's `Transfer-Encoding: chunked` with a stale `Content-Length: 1` beside it, body of
/// unknown length. Every copy drops both: HTTP/1.1 keep-alive clients (leader and followers)
/// get the body framed once by its real length and keep their connection; HTTP/1.0 clients,
/// with and without keep-alive, get the whole body; HTTP/2 streams too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_content_length_beside_transfer_encoding_frames_no_copy() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let v11 = request_text("GET", "HTTP/1.1", s.addr, "/te-stale", &[]);
        let h11: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, v11.clone(), "GET"))
            .collect();
        let h10 = spawn_raw(
            s.addr,
            request_text("GET", "HTTP/1.0", s.addr, "/te-stale", &[]),
            "GET",
        );
        let h10ka = spawn_raw(
            s.addr,
            request_text("GET", "HTTP/1.0", s.addr, "/te-stale", &[KA10]),
            "GET",
        );
        let (tx, _c) = h2(s.addr).await;
        let h2s: Vec<_> = (0..2)
            .map(|_| spawn_h2(&tx, req2("GET", s.addr, "/te-stale", &[])))
            .collect();
        s.until_settled(7).await;
        s.open();
        let mut h1_text = std::collections::HashSet::new();
        for (r, mut conn) in join_all(h11).await {
            r.assert_framed_once();
            assert_eq!(r.framing, Framing::Length, "{r:?}");
            h1_text.insert(r.text().to_owned());
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        let (r, mut conn) = join(h10).await;
        r.assert_framed_once();
        assert_eq!(r.head.version, "HTTP/1.0");
        h1_text.insert(r.text().to_owned());
        assert!(conn.closed().await);
        let (r, mut conn) = join(h10ka).await;
        r.assert_framed_once();
        assert_eq!(r.framing, Framing::Length);
        h1_text.insert(r.text().to_owned());
        conn.assert_in_sync("HTTP/1.0", s.addr, &[KA10]).await;
        assert_eq!(h1_text.len(), 1, "one shared HTTP/1.x call: {h1_text:?}");
        let h1_text = h1_text.into_iter().next().unwrap();
        assert!(h1_text.starts_with("te-stale #"), "{h1_text}");
        for r in join_all(h2s).await {
            assert!(r.text().starts_with("te-stale #"), "{r:?}");
            assert_ne!(r.text(), h1_text, "h2 keyed apart");
            assert!(!r.headers.contains_key("transfer-encoding"));
            assert_eq!(r.headers["content-length"], "11");
        }
        assert_eq!(s.calls(), 2, "one call per protocol");
        s.until_empty().await;
    })
    .await;
}

/// `Transfer-Encoding: chunked` beside a correct `Content-Length` (body of known length): GET
/// copies drop both (framed once, by the server), HEAD copies keep the `Content-Length` (it
/// describes the GET body) without the `Transfer-Encoding`; GET and HEAD agree on the length,
/// and every keep-alive connection stays in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_get_copies_of_a_te_and_length_response_agree_on_the_length() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let get = request_text("GET", "HTTP/1.1", s.addr, "/te-cl", &[]);
        let head = request_text("HEAD", "HTTP/1.1", s.addr, "/te-cl", &[]);
        let gets: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, get.clone(), "GET"))
            .collect();
        let heads: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, head.clone(), "HEAD"))
            .collect();
        s.until_settled(6).await;
        s.open();
        for (r, mut conn) in join_all(gets).await {
            r.assert_framed_once();
            assert_eq!((r.framing, r.body.len()), (Framing::Length, 300), "{r:?}");
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        for (r, mut conn) in join_all(heads).await {
            assert_eq!(r.head.status, 200);
            assert!(!r.head.chunked(), "{:?}", r.head);
            assert_eq!(r.head.all("content-length"), vec!["300"], "{:?}", r.head);
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        assert_eq!(s.calls(), 2, "GET and HEAD keyed apart, one call each");
        s.until_empty().await;
    })
    .await;
}

/// A transfer coding besides `chunked` (`gzip, chunked`) is not shared: every follower makes
/// its own call and gets that call's body, framed as the handler asked, on a connection that
/// stays in sync; HTTP/2 streams (where hyper drops the field) are released too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_transfer_coding_releases_every_follower_to_its_own_call() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let get = request_text("GET", "HTTP/1.1", s.addr, "/gzip", &[]);
        let leader = spawn_raw(s.addr, get.clone(), "GET");
        until("the leader in the handler", || s.calls(), |&c| c == 1).await;
        let followers: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, get.clone(), "GET"))
            .collect();
        s.until_settled(4).await;
        s.open();
        let (r, mut conn) = join(leader).await;
        r.assert_framed_once();
        assert_eq!((r.framing, r.text()), (Framing::Chunked, "gzip #0"));
        assert_eq!(r.head.get("transfer-encoding"), Some("gzip, chunked"));
        conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        let mut seen = std::collections::HashSet::new();
        for (r, mut conn) in join_all(followers).await {
            r.assert_framed_once();
            assert!(
                r.head.cache_status().ends_with("detail=stream"),
                "{:?}",
                r.head
            );
            assert!(r.text().starts_with("gzip #"), "{r:?}");
            assert_ne!(r.text(), "gzip #0", "never the leader's coded body");
            seen.insert(r.text().to_owned());
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        assert_eq!(seen.len(), 3, "each its own call");
        assert_eq!(s.calls(), 4);
        s.until_empty().await;
    })
    .await;
}

// =============================================================================================
// Trailers: an inexact size
// =============================================================================================

/// A shared body with trailers, every kind of HTTP/1.x client at once: HTTP/1.1 with
/// `TE: trailers` gets chunked + the trailer; HTTP/1.1 without gets chunked without it; HTTP/1.0
/// (with and without keep-alive) gets a close-delimited body and a closed connection (never a
/// hang waiting for an end that no length announces). Each HTTP/1.1 connection then pipelines
/// two more requests (the trailers resource again, alone now, and a plain one) and reads both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_copies_are_framed_for_each_http1_client_kind() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let te = request_text("GET", "HTTP/1.1", s.addr, "/trailers", &[TE_TRAILERS]);
        let no_te = request_text("GET", "HTTP/1.1", s.addr, "/trailers", &[]);
        let v10 = request_text("GET", "HTTP/1.0", s.addr, "/trailers", &[]);
        let v10ka = request_text("GET", "HTTP/1.0", s.addr, "/trailers", &[KA10]);
        let with_te: Vec<_> = (0..2)
            .map(|_| spawn_raw(s.addr, te.clone(), "GET"))
            .collect();
        let without_te: Vec<_> = (0..2)
            .map(|_| spawn_raw(s.addr, no_te.clone(), "GET"))
            .collect();
        let old = vec![
            spawn_raw(s.addr, v10, "GET"),
            spawn_raw(s.addr, v10ka, "GET"),
        ];
        s.until_settled(6).await;
        s.open();
        for (r, mut conn) in join_all(with_te).await {
            r.assert_framed_once();
            assert_eq!((r.framing, r.text()), (Framing::Chunked, "checked body 0"));
            assert_eq!(r.trailer("x-checksum"), Some("sum-0"), "{r:?}");
            // Pipelined: both requests in one write.
            let mut both = request_text("GET", "HTTP/1.1", s.addr, "/trailers", &[TE_TRAILERS]);
            both.push_str(&request_text("GET", "HTTP/1.1", s.addr, "/plain", &[]));
            conn.send(&both).await;
            let again = conn.response("GET").await;
            assert_eq!(
                again.framing,
                Framing::Chunked,
                "a lone leader too: {again:?}"
            );
            assert!(again.trailer("x-checksum").is_some(), "{again:?}");
            assert_eq!(conn.response("GET").await.text(), "plain");
        }
        for (r, mut conn) in join_all(without_te).await {
            r.assert_framed_once();
            assert_eq!((r.framing, r.text()), (Framing::Chunked, "checked body 0"));
            assert!(r.trailers.is_empty(), "not asked for: {r:?}");
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        for (r, mut conn) in join_all(old).await {
            assert_eq!(r.head.version, "HTTP/1.0");
            assert_eq!(
                (r.framing, r.text()),
                (Framing::Close, "checked body 0"),
                "{r:?}"
            );
            assert!(conn.closed().await, "close-delimited: the connection ends");
        }
        assert_eq!(s.calls(), 1 + 2, "one shared call, then the two lone ones");
        s.until_empty().await;
    })
    .await;
}

/// HTTP/2 streams sharing a body with trailers each get body and trailers, and the connection
/// serves further streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_copies_reach_every_h2_stream() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let (tx, _c) = h2(s.addr).await;
        let streams: Vec<_> = (0..4)
            .map(|_| spawn_h2(&tx, req2("GET", s.addr, "/trailers", &[("te", "trailers")])))
            .collect();
        s.until_settled(4).await;
        s.open();
        let mut followers = 0;
        for r in join_all(streams).await {
            assert_eq!(r.text(), "checked body 0");
            let t = r.trailers.as_ref().expect("trailers over h2");
            assert_eq!(t["x-checksum"], "sum-0");
            assert!(!r.headers.contains_key("content-length"), "{r:?}");
            followers += usize::from(r.cache_status().ends_with("; collapsed"));
        }
        assert_eq!(followers, 3);
        let next = join(spawn_h2(&tx, req2("GET", s.addr, "/plain", &[]))).await;
        assert_eq!(next.text(), "plain");
        assert_eq!(s.calls(), 1);
        s.until_empty().await;
    })
    .await;
}

// =============================================================================================
// Hop-by-hop fields
// =============================================================================================

/// `Connection: x-sig` names a field that only comes in the trailers. The leader's copy keeps
/// it (its own connection); the followers' copies go without `Connection` and without the
/// `x-sig` trailer, but keep `x-sum`; HTTP/1.1 connections stay in sync. Over HTTP/2 the
/// followers' trailers go without `x-sig` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_named_trailer_reaches_the_leader_only() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let te = request_text("GET", "HTTP/1.1", s.addr, "/hop-trailers", &[TE_TRAILERS]);
        let leader = spawn_raw(s.addr, te.clone(), "GET");
        until("the leader in the handler", || s.calls(), |&c| c == 1).await;
        let followers: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, te.clone(), "GET"))
            .collect();
        let (tx, _c) = h2(s.addr).await;
        let h2s: Vec<_> = (0..3)
            .map(|_| {
                spawn_h2(
                    &tx,
                    req2("GET", s.addr, "/hop-trailers", &[("te", "trailers")]),
                )
            })
            .collect();
        s.until_settled(7).await;
        s.open();
        let (r, mut conn) = join(leader).await;
        r.assert_framed_once();
        assert_eq!(r.head.get("connection"), Some("x-sig"));
        assert_eq!(r.trailer("x-sig"), Some("sig-0"), "{r:?}");
        assert_eq!(r.trailer("x-sum"), Some("sum-0"));
        conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        for (r, mut conn) in join_all(followers).await {
            r.assert_framed_once();
            assert!(r.head.follower(), "{:?}", r.head);
            assert_eq!((r.framing, r.text()), (Framing::Chunked, "hop-trailers #0"));
            assert_eq!(r.head.get("connection"), None, "{:?}", r.head);
            assert_eq!(r.trailer("x-sig"), None, "{r:?}");
            assert_eq!(r.trailer("x-sum"), Some("sum-0"), "{r:?}");
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        let mut h2_followers = 0;
        for r in join_all(h2s).await {
            let t = r.trailers.as_ref().expect("trailers");
            assert_eq!(t["x-sum"], "sum-1");
            if r.cache_status().ends_with("; collapsed") {
                h2_followers += 1;
                assert!(!t.contains_key("x-sig"), "{r:?}");
            }
        }
        assert_eq!(h2_followers, 2);
        assert_eq!(s.calls(), 2);
        s.until_empty().await;
    })
    .await;
}

/// A shared `426`: the followers' copies keep `Upgrade` with `Connection: upgrade` and lose the
/// leader's other hop-by-hop fields (`x-hop`, `Keep-Alive`). On the wire: HTTP/1.1 followers
/// keep their connection (a `426` with `Connection: upgrade` is no protocol switch), an
/// HTTP/1.0 keep-alive follower too, HTTP/2 streams get the 426 and the connection lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_426_keeps_upgrade_and_every_connection_in_sync() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let v11 = request_text("GET", "HTTP/1.1", s.addr, "/upgrade-required", &[]);
        let leader = spawn_raw(s.addr, v11.clone(), "GET");
        until("the leader in the handler", || s.calls(), |&c| c == 1).await;
        let f11: Vec<_> = (0..2)
            .map(|_| spawn_raw(s.addr, v11.clone(), "GET"))
            .collect();
        let f10 = spawn_raw(
            s.addr,
            request_text("GET", "HTTP/1.0", s.addr, "/upgrade-required", &[KA10]),
            "GET",
        );
        let (tx, _c) = h2(s.addr).await;
        let h2s: Vec<_> = (0..2)
            .map(|_| spawn_h2(&tx, req2("GET", s.addr, "/upgrade-required", &[])))
            .collect();
        s.until_settled(6).await;
        s.open();
        let (r, mut conn) = join(leader).await;
        assert_eq!((r.head.status, r.text()), (426, "upgrade #0"));
        assert_eq!(r.head.get("x-hop"), Some("1"), "the leader's own");
        conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        for (r, mut conn) in join_all(f11).await {
            r.assert_framed_once();
            assert!(r.head.follower(), "{:?}", r.head);
            assert_eq!((r.head.status, r.text()), (426, "upgrade #0"));
            assert_eq!(r.head.get("upgrade"), Some("TLS/1.2, HTTP/1.1"));
            assert_eq!(r.head.all("connection"), vec!["upgrade"], "{:?}", r.head);
            assert_eq!(
                (r.head.get("x-hop"), r.head.get("keep-alive")),
                (None, None)
            );
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        let (r, mut conn) = join(f10).await;
        r.assert_framed_once();
        assert_eq!((r.head.status, r.text()), (426, "upgrade #0"), "{r:?}");
        assert!(r.head.follower());
        assert_eq!(r.head.get("upgrade"), Some("TLS/1.2, HTTP/1.1"));
        assert_eq!(r.head.get("x-hop"), None);
        conn.assert_in_sync("HTTP/1.0", s.addr, &[KA10]).await;
        for r in join_all(h2s).await {
            assert_eq!(
                (r.status, r.text()),
                (StatusCode::UPGRADE_REQUIRED, "upgrade #1")
            );
        }
        let next = join(spawn_h2(&tx, req2("GET", s.addr, "/plain", &[]))).await;
        assert_eq!(next.text(), "plain");
        assert_eq!(s.calls(), 2);
        s.until_empty().await;
    })
    .await;
}

// =============================================================================================
// HEAD
// =============================================================================================

/// HEAD of a body of known length, larger than `max_body_bytes`: one call shared by HTTP/1.1
/// keep-alive, HTTP/1.0 keep-alive clients and (their own call) HTTP/2 streams; each gets a
/// bodiless head with the GET body's length; each HTTP/1.x connection then GETs the resource
/// (over the limit: its own call) and reads exactly that many bytes, and a plain request after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_copies_of_a_known_length_body_over_the_limit_share_one_call_on_every_protocol() {
    within(async {
        const LEN: usize = 64 * 1024;
        let s = start(CoalesceHttpLayer::new().max_body_bytes(1024)).await;
        let path = format!("/known/{LEN}");
        let v11 = request_text("HEAD", "HTTP/1.1", s.addr, &path, &[]);
        let v10 = request_text("HEAD", "HTTP/1.0", s.addr, &path, &[KA10]);
        let mut h1s: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, v11.clone(), "HEAD"))
            .collect();
        h1s.push(spawn_raw(s.addr, v10, "HEAD"));
        let (tx, _c) = h2(s.addr).await;
        let h2s: Vec<_> = (0..3)
            .map(|_| spawn_h2(&tx, req2("HEAD", s.addr, &path, &[])))
            .collect();
        s.until_settled(7).await;
        s.open();
        let mut followers = 0;
        for (i, (r, mut conn)) in join_all(h1s).await.into_iter().enumerate() {
            let version = if i == 3 { "HTTP/1.0" } else { "HTTP/1.1" };
            let extra: &[&str] = if i == 3 { &[KA10] } else { &[] };
            assert_eq!(r.head.status, 200);
            assert_eq!(r.head.all("content-length"), vec![LEN.to_string().as_str()]);
            assert!(!r.head.chunked());
            followers += usize::from(r.head.follower());
            let get = conn
                .exchange_with("GET", version, &path, s.addr, extra)
                .await;
            get.assert_framed_once();
            assert_eq!(get.body.len(), LEN, "the GET framed as HEAD said");
            conn.assert_in_sync(version, s.addr, extra).await;
        }
        assert_eq!(followers, 3);
        let mut h2_followers = 0;
        for r in join_all(h2s).await {
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.headers["content-length"], LEN.to_string().as_str());
            assert!(r.body.is_empty());
            h2_followers += usize::from(r.cache_status().ends_with("; collapsed"));
        }
        assert_eq!(h2_followers, 2);
        let next = join(spawn_h2(&tx, req2("GET", s.addr, "/plain", &[]))).await;
        assert_eq!(next.text(), "plain");
        // 2 HEAD calls (one per protocol) and 4 lone GETs.
        assert_eq!(s.calls(), 2 + 4);
        s.until_empty().await;
    })
    .await;
}

/// HEAD of a body of unknown length is buffered as any other: the copies say the buffered
/// length (axum adds it from the exact size), agree with a GET on the same connection, and
/// keep the connection in sync. With trailers the size is inexact: no `Content-Length`, no
/// `Transfer-Encoding` (hyper sends no chunked framing for HEAD), and still in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_copies_of_unknown_length_bodies_keep_connections_in_sync() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let unknown = request_text("HEAD", "HTTP/1.1", s.addr, "/unknown", &[]);
        let with_t = request_text("HEAD", "HTTP/1.1", s.addr, "/trailers", &[TE_TRAILERS]);
        let a: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, unknown.clone(), "HEAD"))
            .collect();
        let b: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, with_t.clone(), "HEAD"))
            .collect();
        s.until_settled(6).await;
        s.open();
        for (r, mut conn) in join_all(a).await {
            assert_eq!(r.head.status, 200);
            assert_eq!(r.head.all("content-length"), vec!["11"], "{:?}", r.head);
            assert!(!r.head.chunked());
            let get = conn
                .exchange_with("GET", "HTTP/1.1", "/unknown", s.addr, &[])
                .await;
            assert!(get.text().starts_with("streamed #"), "{get:?}");
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        for (r, mut conn) in join_all(b).await {
            assert_eq!(r.head.status, 200);
            assert!(
                !r.head.has("content-length") && !r.head.chunked(),
                "{:?}",
                r.head
            );
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        s.until_empty().await;
    })
    .await;
}

/// HEAD of a body of known length, through the layer and around it (`no-cache`): the same
/// `Content-Length`, for a 12-byte body and (f01dcab: the layer adds none) an empty one, where
/// axum's own `content-length: 0` goes out either way; the connection stays in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_known_body_says_what_a_bypassed_head_says() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        s.open();
        let mut conn = Raw::connect(s.addr).await;
        let nc = ["cache-control: no-cache"];
        for (path, len) in [("/known/12", "12"), ("/empty", "0")] {
            let bypass = conn
                .exchange_with("HEAD", "HTTP/1.1", path, s.addr, &nc)
                .await;
            assert_eq!(
                bypass.head.cache_status(),
                "tower-coalesce; fwd=request; detail=no-cache"
            );
            let coalesced = conn
                .exchange_with("HEAD", "HTTP/1.1", path, s.addr, &[])
                .await;
            assert_eq!(coalesced.head.cache_status(), "tower-coalesce; fwd=miss");
            assert_eq!(bypass.head.all("content-length"), vec![len], "{path}");
            assert_eq!(coalesced.head.all("content-length"), vec![len], "{path}");
            assert!(!coalesced.head.chunked());
            let get = conn
                .exchange_with("GET", "HTTP/1.1", path, s.addr, &[])
                .await;
            get.assert_framed_once();
            assert_eq!(get.body.len().to_string(), len);
        }
        conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
    })
    .await;
}

// =============================================================================================
// Set-Cookie in trailers
// =============================================================================================

/// `Set-Cookie` in the trailers: not shared. The leader gets its rebuilt response (body and
/// its own trailers, chunked to an HTTP/1.1 client that asked for trailers); every follower
/// makes its own call and gets that call's body and trailers; all connections stay in sync.
/// Over HTTP/2 (where the cookie trailer goes out too) each stream gets its own cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_cookie_trailer_sends_every_waiter_to_its_own_call_on_the_wire() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        let te = request_text("GET", "HTTP/1.1", s.addr, "/cookie-trailer", &[TE_TRAILERS]);
        let leader = spawn_raw(s.addr, te.clone(), "GET");
        until("the leader in the handler", || s.calls(), |&c| c == 1).await;
        let mut followers: Vec<_> = (0..2)
            .map(|_| spawn_raw(s.addr, te.clone(), "GET"))
            .collect();
        followers.push(spawn_raw(
            s.addr,
            request_text("GET", "HTTP/1.0", s.addr, "/cookie-trailer", &[KA10]),
            "GET",
        ));
        s.until_settled(4).await;
        s.open();
        let (r, mut conn) = join(leader).await;
        r.assert_framed_once();
        assert_eq!(
            (r.framing, r.text()),
            (Framing::Chunked, "cookie #0"),
            "{r:?}"
        );
        assert_eq!(r.trailer("x-call"), Some("0"));
        assert_eq!(r.head.cache_status(), "tower-coalesce; fwd=miss");
        conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        let mut seen = std::collections::HashSet::new();
        for (r, _conn) in join_all(followers).await {
            assert!(
                r.head.cache_status().ends_with("detail=set-cookie"),
                "{:?}",
                r.head
            );
            let n = r
                .text()
                .strip_prefix("cookie #")
                .expect("a body")
                .to_owned();
            assert_ne!(n, "0");
            if r.head.version == "HTTP/1.1" {
                assert_eq!(
                    r.trailer("x-call"),
                    Some(n.as_str()),
                    "its own call's trailers"
                );
            } else {
                assert_eq!(r.framing, Framing::Close);
            }
            seen.insert(n);
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(s.calls(), 4);

        // HTTP/2: the cookie itself goes out in the trailers.
        let s = start(CoalesceHttpLayer::new()).await;
        let (tx, _c) = h2(s.addr).await;
        let streams: Vec<_> = (0..3)
            .map(|_| {
                spawn_h2(
                    &tx,
                    req2("GET", s.addr, "/cookie-trailer", &[("te", "trailers")]),
                )
            })
            .collect();
        s.until_settled(3).await;
        s.open();
        let mut cookies = std::collections::HashSet::new();
        for r in join_all(streams).await {
            let n = r
                .text()
                .strip_prefix("cookie #")
                .expect("a body")
                .to_owned();
            let t = r.trailers.as_ref().expect("trailers");
            assert_eq!(t["set-cookie"], format!("s={n}").as_str(), "its own cookie");
            cookies.insert(n);
        }
        assert_eq!(cookies.len(), 3, "nobody gets another's cookie");
        s.until_empty().await;
    })
    .await;
}

// =============================================================================================
// A proxy handler returning hyper's client response
// =============================================================================================

/// GET of a chunked upstream body through a proxy handler (hyper's client response, with its
/// `Transfer-Encoding: chunked`): every HTTP/1.1 waiter gets the body framed once by its
/// length and a connection in sync; HTTP/1.0 keep-alive too; HTTP/2 streams get the body.
/// One upstream call per protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_get_of_a_chunked_upstream_is_framed_once_for_every_client() {
    within(async {
        let s = start_proxy().await;
        let v11 = request_text("GET", "HTTP/1.1", s.addr, "/up/chunked", &[]);
        let mut h1s: Vec<_> = (0..3)
            .map(|_| spawn_raw(s.addr, v11.clone(), "GET"))
            .collect();
        h1s.push(spawn_raw(
            s.addr,
            request_text("GET", "HTTP/1.0", s.addr, "/up/chunked", &[KA10]),
            "GET",
        ));
        let (tx, _c) = h2(s.addr).await;
        let h2s: Vec<_> = (0..2)
            .map(|_| spawn_h2(&tx, req2("GET", s.addr, "/up/chunked", &[])))
            .collect();
        s.until_settled(6).await;
        s.open();
        let mut followers = 0;
        let mut h1_text = std::collections::HashSet::new();
        for (i, (r, mut conn)) in join_all(h1s).await.into_iter().enumerate() {
            r.assert_framed_once();
            assert_eq!(r.framing, Framing::Length, "{r:?}");
            assert!(r.text().starts_with("up-chunked #"), "{r:?}");
            h1_text.insert(r.text().to_owned());
            followers += usize::from(r.head.follower());
            if i == 3 {
                conn.assert_in_sync("HTTP/1.0", s.addr, &[KA10]).await;
            } else {
                conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
            }
        }
        assert_eq!((followers, h1_text.len()), (3, 1), "{h1_text:?}");
        let mut h2_text = std::collections::HashSet::new();
        for r in join_all(h2s).await {
            assert!(r.text().starts_with("up-chunked #"), "{r:?}");
            h2_text.insert(r.text().to_owned());
        }
        assert_eq!(h2_text.len(), 1);
        assert_ne!(h1_text, h2_text);
        assert_eq!(s.calls(), 2);
        s.until_empty().await;
    })
    .await;
}

/// GET of a chunked upstream body with a trailer, through the proxy: HTTP/1.1 clients with
/// `TE: trailers` get chunked + the upstream's trailer, without it chunked and no trailer,
/// HTTP/1.0 a close-delimited body; HTTP/2 streams the trailer. Connections stay in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_get_of_an_upstream_with_trailers_reaches_every_client() {
    within(async {
        let s = start_proxy().await;
        let te = request_text("GET", "HTTP/1.1", s.addr, "/up/trailers", &[TE_TRAILERS]);
        let no_te = request_text("GET", "HTTP/1.1", s.addr, "/up/trailers", &[]);
        let with_te: Vec<_> = (0..2)
            .map(|_| spawn_raw(s.addr, te.clone(), "GET"))
            .collect();
        let without = spawn_raw(s.addr, no_te, "GET");
        let v10 = spawn_raw(
            s.addr,
            request_text("GET", "HTTP/1.0", s.addr, "/up/trailers", &[]),
            "GET",
        );
        let (tx, _c) = h2(s.addr).await;
        let h2s: Vec<_> = (0..2)
            .map(|_| {
                spawn_h2(
                    &tx,
                    req2("GET", s.addr, "/up/trailers", &[("te", "trailers")]),
                )
            })
            .collect();
        s.until_settled(6).await;
        s.open();
        let mut h1_text = std::collections::HashSet::new();
        for (r, mut conn) in join_all(with_te).await {
            r.assert_framed_once();
            assert_eq!(r.framing, Framing::Chunked, "{r:?}");
            let n = r.text().strip_prefix("up-trailers #").expect("the body");
            assert_eq!(r.trailer("x-up"), Some(format!("up-{n}").as_str()), "{r:?}");
            h1_text.insert(r.text().to_owned());
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        let (r, mut conn) = join(without).await;
        r.assert_framed_once();
        assert_eq!(r.framing, Framing::Chunked);
        assert!(r.trailers.is_empty());
        h1_text.insert(r.text().to_owned());
        conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        let (r, mut conn) = join(v10).await;
        assert_eq!(r.framing, Framing::Close, "{r:?}");
        h1_text.insert(r.text().to_owned());
        assert!(conn.closed().await);
        assert_eq!(h1_text.len(), 1, "one HTTP/1.x call: {h1_text:?}");
        for r in join_all(h2s).await {
            let n = r.text().strip_prefix("up-trailers #").expect("the body");
            assert!(!h1_text.contains(r.text()), "keyed apart");
            let want = format!("up-{n}");
            assert_eq!(
                r.trailers.as_ref().expect("trailers")["x-up"],
                want.as_str()
            );
        }
        assert_eq!(s.calls(), 2);
        s.until_empty().await;
    })
    .await;
}

/// HEAD through the proxy, of a chunked upstream resource and of one framed by length: the
/// HEAD copies carry the same framing fields as a bypassed HEAD (what the server said without
/// the layer), one upstream call each, and every keep-alive connection then GETs the resource
/// and a plain one, in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_head_copies_say_what_a_bypassed_head_says_and_keep_connections_in_sync() {
    within(async {
        let s = start_proxy().await;
        s.open();
        let framing = |r: &RawReply| {
            (
                r.head.get("content-length").map(str::to_owned),
                r.head.get("transfer-encoding").map(str::to_owned),
            )
        };
        let mut control = Raw::connect(s.addr).await;
        let nc = ["cache-control: no-cache"];
        let chunked_bypass = framing(
            &control
                .exchange_with("HEAD", "HTTP/1.1", "/up/chunked", s.addr, &nc)
                .await,
        );
        let length_bypass = framing(
            &control
                .exchange_with("HEAD", "HTTP/1.1", "/up/length", s.addr, &nc)
                .await,
        );
        assert_eq!(length_bypass.0.as_deref(), Some("500"));
        control.assert_in_sync("HTTP/1.1", s.addr, &[]).await;

        let s = start_proxy().await;
        let tasks: Vec<_> = ["/up/chunked", "/up/length"]
            .into_iter()
            .flat_map(|path| {
                (0..3).map(move |_| (path, request_text("HEAD", "HTTP/1.1", s.addr, path, &[])))
            })
            .map(|(path, text)| (path, spawn_raw(s.addr, text, "HEAD")))
            .collect();
        s.until_settled(6).await;
        s.open();
        for (path, task) in tasks {
            let (r, mut conn) = join(task).await;
            assert_eq!(r.head.status, 200);
            let want = if path == "/up/chunked" {
                &chunked_bypass
            } else {
                &length_bypass
            };
            assert_eq!(&framing(&r), want, "{path}: {:?}", r.head);
            let get = conn
                .exchange_with("GET", "HTTP/1.1", path, s.addr, &[])
                .await;
            get.assert_framed_once();
            assert!(
                get.text().starts_with("up-") || get.text().starts_with("call "),
                "{get:?}"
            );
            conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
        }
        assert_eq!(s.calls(), 2 + 6, "two HEAD calls, then six lone GETs");
        s.until_empty().await;
    })
    .await;
}

/// The docs (src/http/mod.rs): "When the response is not shared, the leader gets its own
/// response, untouched (but for a `Content-Length` beside a `Transfer-Encoding`, which overrode
/// it and is dropped, RFC 9112 §6.3 ...)". A `Cache-Control: private` response with
/// `Transfer-Encoding: chunked` and `Content-Length: 1`: the code drops that `Content-Length`
/// only for responses that pass `shareable()` (released later as too large or for a cookie in
/// the trailers), not for those `shareable()` refuses, so the leader's response goes out with
/// both fields and hyper refuses it: the connection closes without a response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn an_unshareable_leaders_content_length_beside_transfer_encoding_is_dropped() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        s.open();
        let mut conn = Raw::connect(s.addr).await;
        conn.send(&request_text(
            "GET",
            "HTTP/1.1",
            s.addr,
            "/private-te-stale",
            &[],
        ))
        .await;
        assert!(
            !conn.closed().await,
            "connection closed without a response: the leader kept Content-Length: 1 beside \
             Transfer-Encoding: chunked"
        );
        let r = conn.response("GET").await;
        r.assert_framed_once();
        assert_eq!((r.framing, r.text()), (Framing::Chunked, "private #0"));
        conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
    })
    .await;
}

/// The same stale `Content-Length` beside `Transfer-Encoding` on a response that *is* judged
/// shareable but released later (a cookie in the trailers): dropped, as documented; the leader
/// gets its chunked body with its trailer, and its connection stays in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_released_after_buffering_has_no_content_length_beside_transfer_encoding() {
    within(async {
        let s = start(CoalesceHttpLayer::new()).await;
        s.open();
        let mut conn = Raw::connect(s.addr).await;
        let r = conn
            .exchange_with(
                "GET",
                "HTTP/1.1",
                "/cookie-te-stale",
                s.addr,
                &[TE_TRAILERS],
            )
            .await;
        r.assert_framed_once();
        assert_eq!(
            (r.framing, r.text()),
            (Framing::Chunked, "cookie #0"),
            "{r:?}"
        );
        assert_eq!(r.trailer("x-call"), Some("0"));
        conn.assert_in_sync("HTTP/1.1", s.addr, &[]).await;
    })
    .await;
}
