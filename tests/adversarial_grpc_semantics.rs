#![cfg(feature = "grpc")]
//! Adversarial black-box tests of the gRPC adapter: what may be shared with whom, and the
//! protocol's edge cases (framing, compression, status placement, metadata, deadlines,
//! credentials), judged against the README's gRPC section, the rustdoc of `grpc` and
//! PROTOCOL-HTTP2.md.
//!
//! Every test drives the layer with raw `http::Request`s carrying hand-framed gRPC messages.
//! The inner service counts its calls, records what it saw and holds each call behind a gate:
//! every call is polled once (so the first of a key leads and the others join or lead their
//! own flight), then the gate opens. No sleeps; time is paused, so a hang fails fast.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::poll;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::watch;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_coalesce::grpc::CoalesceGrpcLayer;
use tower_coalesce::http::{CoalesceBody, ServedBy};
use tower_coalesce::Stats;
use ServedBy::{Bypass, Follower, Leader, Released};

const PATH: &str = "/catalog.v1.Catalog/GetItem";

type TestBody = UnsyncBoxBody<Bytes, BoxError>;
type FrameResult = Result<Frame<Bytes>, BoxError>;
type Answer = Arc<dyn Fn(usize, &Parts) -> Response<TestBody> + Send + Sync>;
type Served = Response<CoalesceBody<TestBody>>;

// ---------------------------------------------------------------------------------------------
// Bodies, messages, requests and responses.

fn body(frames: Vec<FrameResult>) -> TestBody {
    StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
}

/// A body that never yields a frame.
fn pending_body() -> TestBody {
    StreamBody::new(futures::stream::pending::<FrameResult>()).boxed_unsync()
}

/// A body with an exact size hint (as hyper gives for a known `content-length`).
fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn data(bytes: impl Into<Bytes>) -> FrameResult {
    Ok(Frame::data(bytes.into()))
}

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn trailers(pairs: &[(&str, &str)]) -> FrameResult {
    Ok(Frame::trailers(map(pairs)))
}

/// A length-prefixed message: compressed flag, 4-byte big-endian length, payload.
fn lpm(compressed: bool, payload: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + payload.len());
    framed.put_u8(u8::from(compressed));
    framed.put_u32(u32::try_from(payload.len()).unwrap());
    framed.put_slice(payload);
    framed.freeze()
}

fn msg(payload: &str) -> Bytes {
    lpm(false, payload.as_bytes())
}

/// A `POST` without any header.
fn post(uri: &str) -> http::request::Builder {
    Request::post(uri)
}

/// A well-formed unary gRPC call to `path` on `catalog.test`.
fn grpc(path: &str) -> http::request::Builder {
    post(&format!("http://catalog.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
}

fn send(builder: http::request::Builder, message: impl Into<Bytes>) -> Request<TestBody> {
    builder.body(body(vec![data(message)])).unwrap()
}

fn send_frames(builder: http::request::Builder, frames: Vec<FrameResult>) -> Request<TestBody> {
    builder.body(body(frames)).unwrap()
}

fn reply(status: u16, headers: &[(&str, &str)], frames: Vec<FrameResult>) -> Response<TestBody> {
    let mut response = Response::new(body(frames));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    *response.headers_mut() = map(headers);
    response
}

fn answer(f: impl Fn(usize, &Parts) -> Response<TestBody> + Send + Sync + 'static) -> Answer {
    Arc::new(f)
}

/// A successful unary answer numbered by call: `x-call: n` in the headers, the message
/// `call n`, and `grpc-status: 0` in the trailers.
fn ok_response(n: usize) -> Response<TestBody> {
    let call = n.to_string();
    reply(
        200,
        &[("content-type", "application/grpc"), ("x-call", &call)],
        vec![
            data(msg(&format!("call {n}"))),
            trailers(&[("grpc-status", "0"), ("x-call-trailer", &call)]),
        ],
    )
}

fn numbered_ok() -> Answer {
    answer(|n, _| ok_response(n))
}

/// Call 1 gets `first`, every later call an OK numbered answer.
fn first_then_ok(first: impl Fn() -> Response<TestBody> + Send + Sync + 'static) -> Answer {
    answer(move |n, _| if n == 1 { first() } else { ok_response(n) })
}

// ---------------------------------------------------------------------------------------------
// Reading bodies frame by frame.

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Data(Bytes),
    Trailers(HeaderMap),
    Error(String),
}

#[derive(Debug, Clone, Default)]
struct Read(Vec<Piece>);

impl Read {
    fn data(&self) -> Bytes {
        let mut all = BytesMut::new();
        for piece in &self.0 {
            if let Piece::Data(d) = piece {
                all.extend_from_slice(d);
            }
        }
        all.freeze()
    }

    fn trailers(&self) -> Option<&HeaderMap> {
        self.0.iter().rev().find_map(|p| match p {
            Piece::Trailers(t) => Some(t),
            _ => None,
        })
    }

    fn error(&self) -> Option<&str> {
        self.0.iter().find_map(|p| match p {
            Piece::Error(e) => Some(e.as_str()),
            _ => None,
        })
    }

    /// The frames without data-frame boundaries: consecutive data joined.
    fn shape(&self) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for piece in &self.0 {
            match (out.last_mut(), piece) {
                (Some(Piece::Data(prev)), Piece::Data(d)) => {
                    let mut joined = BytesMut::from(&prev[..]);
                    joined.extend_from_slice(d);
                    *prev = joined.freeze();
                }
                (_, Piece::Data(d)) if d.is_empty() => {}
                _ => out.push(piece.clone()),
            }
        }
        out
    }
}

async fn read<B>(body: B) -> Read
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = Box::pin(body);
    let mut pieces = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(d) => pieces.push(Piece::Data(d)),
                Err(frame) => pieces.push(Piece::Trailers(frame.into_trailers().unwrap())),
            },
            Err(e) => {
                pieces.push(Piece::Error(e.to_string()));
                break;
            }
        }
    }
    Read(pieces)
}

// ---------------------------------------------------------------------------------------------
// The gated, recording inner service.

/// What the inner service saw on one call.
#[derive(Debug)]
struct Seen {
    n: usize,
    uri: http::Uri,
    headers: HeaderMap,
    body: Read,
}

struct Backend {
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: watch::Sender<bool>,
}

impl Backend {
    fn new() -> Self {
        Backend {
            calls: Arc::default(),
            seen: Arc::default(),
            gate: watch::channel(false).0,
        }
    }

    fn service(
        &self,
        answer: Answer,
    ) -> impl Service<
        Request<CoalesceBody<TestBody>>,
        Response = Response<TestBody>,
        Error = BoxError,
        Future = impl Future<Output = Result<Response<TestBody>, BoxError>> + Send,
    > + Clone
           + Send
           + 'static {
        let calls = self.calls.clone();
        let seen = self.seen.clone();
        let gate = self.gate.subscribe();
        service_fn(move |req: Request<CoalesceBody<TestBody>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let (answer, seen, mut gate) = (answer.clone(), seen.clone(), gate.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = read(body).await;
                seen.lock().unwrap().push(Seen {
                    n,
                    uri: parts.uri.clone(),
                    headers: parts.headers.clone(),
                    body,
                });
                gate.wait_for(|open| *open).await.expect("gate");
                Ok(answer(n, &parts))
            }
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    fn seen(&self) -> Vec<Seen> {
        let mut seen = std::mem::take(&mut *self.seen.lock().unwrap());
        seen.sort_by_key(|s| s.n);
        seen
    }
}

/// One caller's response, read whole.
#[derive(Debug)]
struct Got {
    served: ServedBy,
    status: StatusCode,
    headers: HeaderMap,
    /// `is_end_stream()` before the first frame: a trailers-only response on the wire.
    empty: bool,
    body: Read,
}

impl Got {
    async fn of(response: Served) -> Got {
        let (parts, body) = response.into_parts();
        let empty = body.is_end_stream();
        Got {
            served: *parts.extensions.get::<ServedBy>().expect("ServedBy"),
            status: parts.status,
            headers: parts.headers,
            empty,
            body: read(body).await,
        }
    }

    /// Which inner call answered (the `x-call` header of [`ok_response`]).
    fn call(&self) -> Option<&str> {
        self.headers.get("x-call").map(|v| v.to_str().unwrap())
    }

    fn grpc_status(&self) -> Option<&str> {
        self.body
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap())
    }
}

struct Outcome {
    calls: usize,
    seen: Vec<Seen>,
    got: Vec<Got>,
    stats: Stats,
}

impl Outcome {
    fn served(&self) -> Vec<ServedBy> {
        self.got.iter().map(|g| g.served).collect()
    }
}

/// Polls every call once in order (the gate is closed, so each ends up in the inner service
/// or waiting for a flight), opens the gate and returns the responses in request order.
async fn race_raw(
    layer: &CoalesceGrpcLayer,
    backend: &Backend,
    answer: Answer,
    requests: Vec<Request<TestBody>>,
) -> Vec<Served> {
    let svc = layer.layer(backend.service(answer));
    let mut calls: Vec<_> = requests
        .into_iter()
        .map(|r| Box::pin(svc.clone().oneshot(r)))
        .collect();
    for (i, call) in calls.iter_mut().enumerate() {
        assert!(
            poll!(call.as_mut()).is_pending(),
            "call {i} held by the gate"
        );
    }
    backend.open();
    let responses = futures::future::join_all(calls).await;
    assert_eq!(
        (layer.waiting(), layer.in_flight()),
        (0, 0),
        "nothing left behind"
    );
    responses
        .into_iter()
        .map(|r| r.expect("the inner service does not fail"))
        .collect()
}

async fn race(
    layer: CoalesceGrpcLayer,
    answer: Answer,
    requests: Vec<Request<TestBody>>,
) -> Outcome {
    let backend = Backend::new();
    let responses = race_raw(&layer, &backend, answer, requests).await;
    let mut got = Vec::new();
    for response in responses {
        got.push(Got::of(response).await);
    }
    Outcome {
        calls: backend.calls(),
        seen: backend.seen(),
        got,
        stats: layer.stats(),
    }
}

fn layer() -> CoalesceGrpcLayer {
    CoalesceGrpcLayer::new().method(PATH)
}

async fn bounded<F: Future<Output = ()>>(test: F) {
    // Time is paused: if every task is stuck, the clock jumps and this fails at once.
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("test hung");
}

// ---------------------------------------------------------------------------------------------
// The key: what makes two calls the same.

#[tokio::test(start_paused = true)]
async fn a_message_split_at_every_byte_joins_the_flight_of_the_whole_message() {
    bounded(async {
        let message = msg("item-42");
        let mut requests = vec![send(grpc(PATH), message.clone())];
        for at in 0..=message.len() {
            let frames = vec![data(message.slice(..at)), data(message.slice(at..))];
            requests.push(send_frames(grpc(PATH), frames));
        }
        let bytewise = (0..message.len())
            .map(|i| data(message.slice(i..=i)))
            .collect();
        requests.push(send_frames(grpc(PATH), bytewise));
        let count = requests.len();
        let out = race(layer(), numbered_ok(), requests).await;
        assert_eq!(out.calls, 1);
        assert_eq!(out.served()[0], Leader);
        assert!(out.served()[1..].iter().all(|s| *s == Follower));
        assert_eq!(
            out.seen[0].body.data(),
            message,
            "the inner call got the message whole"
        );
        for got in &out.got {
            assert_eq!(got.body.data(), msg("call 1"));
        }
        assert_eq!(out.stats.followers, count as u64 - 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_compressed_flag_is_part_of_the_key() {
    bounded(async {
        let gz = || grpc(PATH).header("grpc-encoding", "gzip");
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send(gz(), lpm(false, b"same bytes")),
                send(gz(), lpm(true, b"same bytes")),
            ],
        )
        .await;
        assert_eq!(out.calls, 2);
        assert_eq!(out.served(), [Leader, Leader]);
        assert_eq!(
            out.seen[1].body.data()[0],
            1,
            "the compressed call got its own bytes"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_grpc_encoding_header_alone_splits_the_key() {
    bounded(async {
        let message = lpm(false, b"uncompressed");
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send(grpc(PATH), message.clone()),
                send(grpc(PATH).header("grpc-encoding", "gzip"), message.clone()),
                send(
                    grpc(PATH).header("grpc-encoding", "identity"),
                    message.clone(),
                ),
                send(grpc(PATH).header("grpc-encoding", "GZIP"), message.clone()),
                send(grpc(PATH).header("grpc-encoding", "gzip"), message.clone()),
            ],
        )
        .await;
        assert_eq!(out.calls, 4);
        assert_eq!(out.served(), [Leader, Leader, Leader, Leader, Follower]);
        assert_eq!(out.got[4].call(), Some("2"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_same_logical_message_in_two_encodings_is_two_keys() {
    bounded(async {
        // Stand-ins for the gzip and deflate forms of one message: the bytes on the wire differ.
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send(
                    grpc(PATH).header("grpc-encoding", "gzip"),
                    lpm(true, b"\x1f\x8b gz(form)"),
                ),
                send(
                    grpc(PATH).header("grpc-encoding", "deflate"),
                    lpm(true, b"\x78\x9c df(form)"),
                ),
                send(grpc(PATH), lpm(false, b"form")),
            ],
        )
        .await;
        assert_eq!(out.calls, 3);
        assert_eq!(out.served(), [Leader, Leader, Leader]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_compressed_response_never_reaches_a_caller_that_did_not_accept_its_encoding() {
    bounded(async {
        // The server compresses with gzip only for callers that accept it.
        let server = answer(|n, parts| {
            let accepts_gzip = parts
                .headers
                .get_all("grpc-accept-encoding")
                .iter()
                .any(|v| v.to_str().unwrap().contains("gzip"));
            let call = n.to_string();
            if accepts_gzip {
                reply(
                    200,
                    &[
                        ("content-type", "application/grpc"),
                        ("grpc-encoding", "gzip"),
                        ("x-call", &call),
                    ],
                    vec![
                        data(lpm(true, b"\x1f\x8b..")),
                        trailers(&[("grpc-status", "0")]),
                    ],
                )
            } else {
                ok_response(n)
            }
        });
        let accept = |value: &str| grpc(PATH).header("grpc-accept-encoding", value);
        let out = race(
            layer(),
            server,
            vec![
                send(accept("gzip"), msg("x")),
                send(accept("identity"), msg("x")),
                send(accept("gzip"), msg("x")),
                send(grpc(PATH), msg("x")),
                send(accept("identity,gzip"), msg("x")),
            ],
        )
        .await;
        assert_eq!(out.calls, 4);
        assert_eq!(out.served(), [Leader, Leader, Follower, Leader, Leader]);
        let accepted = [true, false, true, false, true];
        for (got, accepted) in out.got.iter().zip(accepted) {
            let compressed = got.headers.get("grpc-encoding").is_some();
            assert_eq!(compressed, accepted, "{got:?}");
            assert_eq!(got.body.data()[0] == 1, accepted, "compressed flag");
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn grpc_timeout_is_not_part_of_the_key() {
    bounded(async {
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send(grpc(PATH).header("grpc-timeout", "100m"), msg("x")),
                send(grpc(PATH).header("grpc-timeout", "30S"), msg("x")),
                send(grpc(PATH), msg("x")),
            ],
        )
        .await;
        assert_eq!(out.calls, 1);
        assert_eq!(out.served(), [Leader, Follower, Follower]);
        assert!(out.got.iter().all(|g| g.status == StatusCode::OK));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_leaders_deadline_exceeded_is_not_shared_with_a_follower_with_a_longer_deadline() {
    bounded(async {
        // A handler that honours the deadline it is given: the leader's is too short.
        let server = answer(|n, parts| match parts.headers.get("grpc-timeout") {
            Some(t) if t == "1m" => reply(
                200,
                &[
                    ("content-type", "application/grpc"),
                    ("grpc-status", "4"),
                    ("grpc-message", "deadline exceeded"),
                ],
                vec![],
            ),
            _ => ok_response(n),
        });
        let out = race(
            layer(),
            server,
            vec![
                send(
                    grpc(PATH)
                        .header("grpc-timeout", "1m")
                        .header("x-request-id", "leader"),
                    msg("x"),
                ),
                send(
                    grpc(PATH)
                        .header("grpc-timeout", "10S")
                        .header("x-request-id", "follower"),
                    msg("x"),
                ),
            ],
        )
        .await;
        assert_eq!(out.calls, 2);
        assert_eq!(out.served(), [Leader, Released]);
        assert_eq!(out.got[0].grpc_status(), Some("4"));
        assert!(
            out.got[0].body.0.is_empty(),
            "the leader's trailers-only error, untouched"
        );
        assert_eq!(out.got[1].grpc_status(), Some("0"));
        assert_eq!(out.got[1].call(), Some("2"));
        // The released follower's own call carried its own metadata, not the leader's.
        assert_eq!(out.seen[1].headers["grpc-timeout"], "10S");
        assert_eq!(out.seen[1].headers["x-request-id"], "follower");
        assert_eq!(out.seen[1].body.data(), msg("x"));
        assert_eq!(out.stats.released, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn content_type_variants_are_separate_keys() {
    bounded(async {
        let typed = |ct: &str| {
            post(&format!("http://catalog.test{PATH}"))
                .header("content-type", ct)
                .header("te", "trailers")
        };
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send(typed("application/grpc"), msg("x")),
                send(typed("application/grpc+proto"), msg("x")),
                send(typed("application/grpc+json"), msg("x")),
                send(typed("Application/GRPC"), msg("x")),
                send(typed("application/grpc"), msg("x")),
            ],
        )
        .await;
        assert_eq!(
            out.calls, 4,
            "one format's answer never goes to another's caller"
        );
        assert_eq!(out.served(), [Leader, Leader, Leader, Leader, Follower]);
        assert_eq!(out.got[4].call(), Some("1"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_authority_is_keyed_ignoring_host_case_but_not_the_port() {
    bounded(async {
        let at = |authority: &str| {
            post(&format!("http://{authority}{PATH}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
        };
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send(at("catalog.test"), msg("x")),
                send(at("CATALOG.test"), msg("x")),
                send(at("catalog.test:8080"), msg("x")),
                send(at("other.test"), msg("x")),
            ],
        )
        .await;
        assert_eq!(out.calls, 3);
        assert_eq!(out.served(), [Leader, Follower, Leader, Leader]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn host_header_values_are_keyed() {
    bounded(async {
        let host = |h: &str| {
            post(PATH)
                .header("host", h)
                .header("content-type", "application/grpc")
        };
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send(host("a.test"), msg("x")),
                send(host("a.test"), msg("x")),
                send(host("b.test"), msg("x")),
                send(
                    post(PATH).header("content-type", "application/grpc"),
                    msg("x"),
                ),
            ],
        )
        .await;
        assert_eq!(out.calls, 3);
        assert_eq!(out.served(), [Leader, Follower, Leader, Leader]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_query_is_keyed() {
    bounded(async {
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send(grpc(&format!("{PATH}?shard=1")), msg("x")),
                send(grpc(&format!("{PATH}?shard=2")), msg("x")),
                send(grpc(&format!("{PATH}?shard=1")), msg("x")),
                send(grpc(PATH), msg("x")),
            ],
        )
        .await;
        assert_eq!(out.calls, 3);
        assert_eq!(out.served(), [Leader, Leader, Follower, Leader]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn configured_metadata_names_ignore_case_and_values_do_not() {
    bounded(async {
        let out = race(
            layer().metadata("X-Tenant"),
            numbered_ok(),
            vec![
                send(grpc(PATH).header("x-tenant", "acme"), msg("x")),
                send(grpc(PATH).header("X-TENANT", "acme"), msg("x")),
                send(grpc(PATH).header("x-tenant", "ACME"), msg("x")),
                send(grpc(PATH), msg("x")),
                send(grpc(PATH).header("x-tenant", ""), msg("x")),
            ],
        )
        .await;
        assert_eq!(out.calls, 4);
        assert_eq!(out.served(), [Leader, Follower, Leader, Leader, Leader]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn every_value_of_configured_metadata_counts_in_order() {
    bounded(async {
        let tenants = |values: &[&str]| {
            values
                .iter()
                .fold(grpc(PATH), |b, v| b.header("x-tenant", *v))
        };
        let out = race(
            layer().metadata("x-tenant"),
            numbered_ok(),
            vec![
                send(tenants(&["a", "b"]), msg("x")),
                send(tenants(&["a", "b"]), msg("x")),
                send(tenants(&["b", "a"]), msg("x")),
                send(tenants(&["a"]), msg("x")),
                send(tenants(&["a", "a"]), msg("x")),
                send(tenants(&["a,b"]), msg("x")),
            ],
        )
        .await;
        assert_eq!(out.calls, 5);
        assert_eq!(
            out.served(),
            [Leader, Follower, Leader, Leader, Leader, Leader]
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn binary_metadata_is_keyed_by_its_encoded_value() {
    bounded(async {
        let ctx = |v: &str| grpc(PATH).header("x-ctx-bin", v);
        let out = race(
            layer().metadata("x-ctx-bin"),
            numbered_ok(),
            vec![
                send(ctx("AAE"), msg("x")),
                send(ctx("AAE"), msg("x")),
                send(ctx("AAI"), msg("x")),
                // The same bytes, padded: not shared (conservative, never wrong).
                send(ctx("AAE="), msg("x")),
                send(grpc(PATH), msg("x")),
            ],
        )
        .await;
        assert_eq!(out.calls, 4);
        assert_eq!(out.served(), [Leader, Follower, Leader, Leader, Leader]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn metadata_the_handler_reads_must_be_configured_or_the_leaders_answer_is_shared() {
    bounded(async {
        let echo = || {
            answer(|n, parts| {
                let mut response = ok_response(n);
                let id = parts.headers["x-locale"].clone();
                response.headers_mut().insert("x-echo", id);
                response
            })
        };
        let requests = || {
            vec![
                send(grpc(PATH).header("x-locale", "fr"), msg("x")),
                send(grpc(PATH).header("x-locale", "de"), msg("x")),
            ]
        };
        // Not configured: documented to be shared, the leader's response metadata included.
        let out = race(layer(), echo(), requests()).await;
        assert_eq!((out.calls, out.served()), (1, vec![Leader, Follower]));
        assert_eq!(out.got[1].headers["x-echo"], "fr");
        // Configured: each caller gets its own.
        let out = race(layer().metadata("x-locale"), echo(), requests()).await;
        assert_eq!((out.calls, out.served()), (2, vec![Leader, Leader]));
        assert_eq!(out.got[1].headers["x-echo"], "de");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Credentials and identity.

#[tokio::test(start_paused = true)]
async fn credentials_bypass_even_when_configured_as_key_metadata() {
    bounded(async {
        let creds = [
            ("authorization", "Bearer same-token"),
            ("cookie", "session=same"),
            ("proxy-authorization", "Basic c2FtZQ=="),
        ];
        let mut requests = Vec::new();
        for (name, value) in creds {
            for _ in 0..2 {
                requests.push(send(grpc(PATH).header(name, value), msg("x")));
            }
        }
        for _ in 0..2 {
            let userinfo = post(&format!("http://user:pw@catalog.test{PATH}"))
                .header("content-type", "application/grpc");
            requests.push(send(userinfo, msg("x")));
        }
        let layer = layer()
            .metadata("authorization")
            .metadata("cookie")
            .metadata("proxy-authorization");
        let out = race(layer, numbered_ok(), requests).await;
        assert_eq!(out.calls, 8);
        assert!(
            out.served().iter().all(|s| *s == Bypass),
            "{:?}",
            out.served()
        );
        assert_eq!(out.stats.bypassed, 8);
    })
    .await;
}

#[derive(Clone)]
struct User(&'static str);

#[tokio::test(start_paused = true)]
async fn an_identity_splits_users_and_credentials_it_cannot_name_still_bypass() {
    bounded(async {
        let layer = layer().identity(|parts: &Parts| parts.extensions.get::<User>().map(|u| u.0));
        let as_user = |token: &str, user: &'static str| {
            grpc(PATH)
                .header("authorization", token)
                .extension(User(user))
        };
        let out = race(
            layer,
            numbered_ok(),
            vec![
                send(as_user("Bearer alice-1", "alice"), msg("x")),
                send(as_user("Bearer alice-2", "alice"), msg("x")),
                send(as_user("Bearer bob", "bob"), msg("x")),
                send(grpc(PATH).header("authorization", "Bearer ?"), msg("x")),
                send(grpc(PATH), msg("x")),
                send(grpc(PATH), msg("x")),
            ],
        )
        .await;
        assert_eq!(out.calls, 4);
        assert_eq!(
            out.served(),
            [Leader, Follower, Leader, Bypass, Leader, Follower]
        );
        assert_eq!(
            out.got[1].call(),
            Some("1"),
            "alice's second call got alice's answer"
        );
        assert_ne!(
            out.got[2].call(),
            Some("1"),
            "bob never gets alice's answer"
        );
        assert_ne!(
            out.got[4].call(),
            Some("1"),
            "anonymous never gets alice's answer"
        );
    })
    .await;
}

/// What an mTLS acceptor stores for the handler (tonic's `TlsConnectInfo` peer certificates).
#[derive(Clone)]
struct PeerCert(&'static str);

#[tokio::test(start_paused = true)]
async fn request_extensions_such_as_a_client_certificate_are_not_keyed() {
    bounded(async {
        let peer = |cert: &'static str| grpc(PATH).extension(PeerCert(cert));
        let requests = || {
            vec![
                send(peer("CN=alice"), msg("x")),
                send(peer("CN=bob"), msg("x")),
            ]
        };
        // Without an identity, two mTLS clients share (no credential metadata to detect).
        let out = race(layer(), numbered_ok(), requests()).await;
        assert_eq!((out.calls, out.served()), (1, vec![Leader, Follower]));
        // An identity read from the extension keeps them apart.
        let layer =
            layer().identity(|parts: &Parts| parts.extensions.get::<PeerCert>().map(|c| c.0));
        let out = race(layer, numbered_ok(), requests()).await;
        assert_eq!((out.calls, out.served()), (2, vec![Leader, Leader]));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Responses: which are shared, and that the rest reach their own caller untouched.

#[tokio::test(start_paused = true)]
async fn a_trailers_only_ok_is_shared_as_a_trailers_only_response() {
    bounded(async {
        let server = answer(|_, _| {
            reply(
                200,
                &[("content-type", "application/grpc"), ("grpc-status", "0")],
                vec![],
            )
        });
        let out = race(
            layer(),
            server,
            vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
        )
        .await;
        assert_eq!(out.calls, 1);
        assert_eq!(out.served(), [Leader, Follower]);
        for got in &out.got {
            assert_eq!(got.headers["grpc-status"], "0");
            assert!(got.empty, "no DATA and no trailers: still trailers-only");
            assert!(got.body.0.is_empty());
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_head_that_cannot_be_shared_releases_followers_without_reading_the_leaders_body() {
    bounded(async {
        let heads: [(u16, &[(&str, &str)]); 6] = [
            (
                200,
                &[("content-type", "application/grpc"), ("grpc-status", "14")],
            ),
            (
                200,
                &[("content-type", "application/grpc"), ("grpc-status", "13")],
            ),
            (503, &[("content-type", "application/grpc")]),
            (200, &[("content-type", "application/grpc-web+proto")]),
            (200, &[("content-type", "text/html")]),
            (
                200,
                &[
                    ("content-type", "application/grpc"),
                    ("set-cookie", "s=leader"),
                ],
            ),
        ];
        for (status, headers) in heads {
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            let server = answer(move |n, _| {
                if n == 1 {
                    let pairs: Vec<(&str, &str)> =
                        headers.iter().map(|(n, v)| (&n[..], &v[..])).collect();
                    let mut response = reply(status, &pairs, vec![]);
                    *response.body_mut() = pending_body();
                    response
                } else {
                    ok_response(n)
                }
            });
            let layer = layer();
            let backend = Backend::new();
            let mut responses = race_raw(
                &layer,
                &backend,
                server,
                vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
            )
            .await;
            let follower = Got::of(responses.pop().unwrap()).await;
            let mut leader = responses.pop().unwrap();
            assert_eq!(backend.calls(), 2, "case {status}");
            assert_eq!(follower.served, Released);
            assert_eq!(follower.call(), Some("2"));
            assert_eq!(follower.grpc_status(), Some("0"));
            assert!(follower.headers.get("set-cookie").is_none());
            assert_eq!(leader.extensions().get::<ServedBy>(), Some(&Leader));
            assert_eq!(leader.status().as_u16(), status);
            assert!(
                poll!(leader.body_mut().frame()).is_pending(),
                "the leader's own body, still streaming"
            );
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_status_disagreement_between_headers_and_trailers_is_not_shared() {
    bounded(async {
        let cases = [("0", "13"), ("13", "0"), ("0", "")];
        for (in_headers, in_trailers) in cases {
            let frames = move || {
                let mut tail = vec![("x-t", "1")];
                if !in_trailers.is_empty() {
                    tail.push(("grpc-status", in_trailers));
                }
                vec![data(msg("partial")), trailers(&tail)]
            };
            let server = first_then_ok(move || {
                reply(
                    200,
                    &[
                        ("content-type", "application/grpc"),
                        ("grpc-status", in_headers),
                    ],
                    frames(),
                )
            });
            let out = race(
                layer(),
                server,
                vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
            )
            .await;
            if in_trailers.is_empty() {
                // OK in the headers, no status in the trailers: one status, OK.
                assert_eq!(
                    out.served(),
                    [Leader, Follower],
                    "{in_headers}/{in_trailers}"
                );
                continue;
            }
            assert_eq!(
                out.served(),
                [Leader, Released],
                "{in_headers}/{in_trailers}"
            );
            assert_eq!(out.calls, 2);
            let leader = &out.got[0];
            assert_eq!(leader.headers["grpc-status"], in_headers);
            assert_eq!(
                leader.body.shape(),
                pieces(frames()),
                "the leader gets what the server sent"
            );
            assert_eq!(out.got[1].call(), Some("2"));
        }
    })
    .await;
}

/// The frames a body is made of, as [`Read::shape`] shows them.
fn pieces(frames: Vec<FrameResult>) -> Vec<Piece> {
    Read(frames.into_iter().map(|f| piece(f.unwrap())).collect()).shape()
}

fn piece(frame: Frame<Bytes>) -> Piece {
    match frame.into_data() {
        Ok(d) => Piece::Data(d),
        Err(f) => Piece::Trailers(f.into_trailers().unwrap()),
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_without_a_status_is_never_shared() {
    bounded(async {
        let cases: Vec<fn() -> Vec<FrameResult>> = vec![
            Vec::new,
            || vec![data(msg("m"))],
            || vec![data(msg("m")), trailers(&[("grpc-message", "fine?")])],
            || vec![trailers(&[])],
        ];
        for (i, frames) in cases.into_iter().enumerate() {
            let server = first_then_ok(move || {
                reply(200, &[("content-type", "application/grpc")], frames())
            });
            let out = race(
                layer(),
                server,
                vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
            )
            .await;
            assert_eq!(out.served(), [Leader, Released], "case {i}");
            assert_eq!(out.got[0].grpc_status(), None, "case {i}");
            assert_eq!(out.got[0].body.shape(), pieces(frames()), "case {i}");
            assert_eq!(out.got[1].call(), Some("2"));
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn malformed_status_values_are_not_ok() {
    bounded(async {
        for bad in [
            " 0", "0 ", "\t0", "00", "+0", "-0", "0x0", "OK", "0,0", "", "1", "16",
        ] {
            for in_headers in [false, true] {
                let server = first_then_ok(move || {
                    if in_headers {
                        reply(
                            200,
                            &[("content-type", "application/grpc"), ("grpc-status", bad)],
                            vec![],
                        )
                    } else {
                        reply(
                            200,
                            &[("content-type", "application/grpc")],
                            vec![data(msg("m")), trailers(&[("grpc-status", bad)])],
                        )
                    }
                });
                let out = race(
                    layer(),
                    server,
                    vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
                )
                .await;
                assert_eq!(
                    out.served(),
                    [Leader, Released],
                    "{bad:?} in headers: {in_headers}"
                );
                assert_eq!(out.got[0].grpc_status(), Some(bad));
            }
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_second_trailers_frame_is_not_merged_into_a_success() {
    bounded(async {
        let frames = || {
            vec![
                data(msg("m")),
                trailers(&[("grpc-status", "0")]),
                trailers(&[("grpc-status", "13")]),
            ]
        };
        let server =
            first_then_ok(move || reply(200, &[("content-type", "application/grpc")], frames()));
        let out = race(
            layer(),
            server,
            vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
        )
        .await;
        assert_eq!(out.served(), [Leader, Released]);
        assert_eq!(out.got[0].body.shape(), pieces(frames()));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn data_after_the_trailers_is_not_shared() {
    bounded(async {
        let frames = || {
            vec![
                data(msg("m")),
                trailers(&[("grpc-status", "0")]),
                data(msg("smuggled")),
            ]
        };
        let server =
            first_then_ok(move || reply(200, &[("content-type", "application/grpc")], frames()));
        let out = race(
            layer(),
            server,
            vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
        )
        .await;
        assert_eq!(out.served(), [Leader, Released]);
        assert_eq!(out.got[0].body.shape(), pieces(frames()));
        assert_eq!(out.got[1].body.data(), msg("call 2"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_response_body_error_reaches_the_leader_alone() {
    bounded(async {
        let server = first_then_ok(|| {
            reply(
                200,
                &[("content-type", "application/grpc")],
                vec![data(msg("half")), Err("stream reset".into())],
            )
        });
        let out = race(
            layer(),
            server,
            vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
        )
        .await;
        assert_eq!(out.served(), [Leader, Released]);
        assert_eq!(out.got[0].body.data(), msg("half"));
        assert_eq!(out.got[0].body.error(), Some("stream reset"));
        assert_eq!(out.got[1].body.error(), None);
        assert_eq!(out.got[1].grpc_status(), Some("0"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn several_response_messages_are_shared_whole_with_their_trailers() {
    bounded(async {
        let server = answer(|_, _| {
            reply(
                200,
                &[("content-type", "application/grpc"), ("x-h", "1")],
                vec![
                    data(msg("first")),
                    data(Bytes::new()),
                    data(msg("second")),
                    trailers(&[("grpc-status", "0"), ("x-ctx-bin", "AAE")]),
                ],
            )
        });
        let out = race(
            layer(),
            server,
            vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
        )
        .await;
        assert_eq!((out.calls, out.served()), (1, vec![Leader, Follower]));
        let mut both = BytesMut::from(&msg("first")[..]);
        both.extend_from_slice(&msg("second"));
        for got in &out.got {
            assert_eq!(got.body.data(), both.clone().freeze());
            assert_eq!(got.body.trailers().unwrap()["x-ctx-bin"], "AAE");
            assert_eq!(got.headers["x-h"], "1");
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_response_limit_is_inclusive_and_an_oversized_answer_reaches_its_caller_whole() {
    bounded(async {
        let answer_of = |size: usize| {
            answer(move |n, _| {
                let mut payload = vec![b'r'; size - 5];
                payload[0] = if n == 1 { b'1' } else { b'2' };
                let framed = lpm(false, &payload);
                reply(
                    200,
                    &[("content-type", "application/grpc")],
                    vec![
                        data(framed.slice(..10)),
                        data(framed.slice(10..)),
                        trailers(&[("grpc-status", "0")]),
                    ],
                )
            })
        };
        let pair = || vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))];
        let out = race(layer().response_limit(64), answer_of(64), pair()).await;
        assert_eq!(
            out.served(),
            [Leader, Follower],
            "exactly the limit is shared"
        );
        let out = race(layer().response_limit(64), answer_of(65), pair()).await;
        assert_eq!(out.served(), [Leader, Released]);
        // The leader's whole answer, every frame of it.
        assert_eq!(out.got[0].body.data().len(), 65);
        assert_eq!(out.got[0].body.data()[5], b'1');
        assert_eq!(out.got[1].body.data()[5], b'2');
        assert_eq!(out.got[0].grpc_status(), Some("0"));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Requests: what reaches the inner service.

#[tokio::test(start_paused = true)]
async fn the_request_limit_is_inclusive_and_larger_requests_pass_byte_for_byte() {
    bounded(async {
        let exact = lpm(false, b"0123456789a"); // 16 bytes
        let over = lpm(false, b"0123456789ab"); // 17 bytes
        assert_eq!((exact.len(), over.len()), (16, 17));
        let split = |m: &Bytes| {
            (0..m.len())
                .step_by(3)
                .map(|i| data(m.slice(i..(i + 3).min(m.len()))))
                .collect::<Vec<_>>()
        };
        let out = race(
            layer().request_limit(16),
            numbered_ok(),
            vec![
                send_frames(grpc(PATH), split(&exact)),
                send_frames(grpc(PATH), split(&exact)),
                send_frames(grpc(PATH), split(&over)),
                send_frames(grpc(PATH), split(&over)),
                grpc(PATH).body(full(over.clone())).unwrap(),
            ],
        )
        .await;
        assert_eq!(out.served(), [Leader, Follower, Bypass, Bypass, Bypass]);
        assert_eq!(out.calls, 4);
        assert_eq!(out.seen[0].body.data(), exact);
        for seen in &out.seen[1..] {
            assert_eq!(seen.body.shape(), vec![Piece::Data(over.clone())]);
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn request_trailers_bypass_and_reach_the_inner_service() {
    bounded(async {
        let frames = || vec![data(msg("x")), trailers(&[("x-req-trailer", "1")])];
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send_frames(grpc(PATH), frames()),
                send_frames(grpc(PATH), frames()),
            ],
        )
        .await;
        assert_eq!(out.served(), [Bypass, Bypass]);
        assert_eq!(out.calls, 2);
        for seen in &out.seen {
            assert_eq!(seen.body.shape(), pieces(frames()));
        }
        assert_eq!(out.stats.bypassed, 2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_request_body_bypasses_and_the_inner_service_sees_the_failure() {
    bounded(async {
        let frames = || vec![data(msg("x").slice(..3)), Err("client reset".into())];
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send_frames(grpc(PATH), frames()),
                send_frames(grpc(PATH), frames()),
            ],
        )
        .await;
        assert_eq!(out.served(), [Bypass, Bypass]);
        for seen in &out.seen {
            assert_eq!(seen.body.data(), msg("x").slice(..3));
            assert_eq!(seen.body.error(), Some("client reset"));
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn every_message_of_a_streaming_request_is_keyed() {
    bounded(async {
        let two = |a: &str, b: &str| {
            let mut both = BytesMut::from(&msg(a)[..]);
            both.extend_from_slice(&msg(b));
            both.freeze()
        };
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send(grpc(PATH), two("m1", "m2")),
                send_frames(grpc(PATH), vec![data(msg("m1")), data(msg("m2"))]),
                send(grpc(PATH), two("m1", "m3")),
                send(grpc(PATH), msg("m1")),
                // A truncated frame: a prefix that promises more bytes than it carries.
                send(grpc(PATH), two("m1", "m2").slice(..9)),
            ],
        )
        .await;
        assert_eq!(out.calls, 4);
        assert_eq!(out.served(), [Leader, Follower, Leader, Leader, Leader]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_empty_body_is_not_an_empty_message() {
    bounded(async {
        let out = race(
            layer(),
            numbered_ok(),
            vec![
                send_frames(grpc(PATH), vec![]),
                send_frames(grpc(PATH), vec![data(Bytes::new())]),
                send(grpc(PATH), lpm(false, b"")),
                send(grpc(PATH), lpm(false, b"")),
            ],
        )
        .await;
        assert_eq!(out.calls, 2);
        assert_eq!(out.served(), [Leader, Follower, Leader, Follower]);
        assert!(out.seen[0].body.data().is_empty());
        assert_eq!(out.seen[1].body.data(), lpm(false, b""));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn calls_that_are_not_listed_unary_grpc_posts_bypass_untouched() {
    bounded(async {
        let uri = format!("http://catalog.test{PATH}");
        let with_ct = |b: http::request::Builder, ct: &str| b.header("content-type", ct);
        let uri = uri.as_str();
        let builders: Vec<Box<dyn Fn() -> http::request::Builder + '_>> = vec![
            Box::new(|| with_ct(Request::get(uri), "application/grpc")),
            Box::new(|| with_ct(Request::put(uri), "application/grpc")),
            Box::new(|| grpc("/catalog.v1.Catalog/WatchItem")),
            Box::new(|| grpc("/catalog.v1.Catalog/Get%49tem")),
            Box::new(|| grpc("/catalog.v1.Catalog/GetItem/")),
            Box::new(|| grpc("/Catalog.v1.Catalog/GetItem")),
            Box::new(|| with_ct(post(uri), "application/grpc-web")),
            Box::new(|| with_ct(post(uri), "application/grpc-web+proto")),
            Box::new(|| with_ct(post(uri), "application/grpc-web-text")),
            Box::new(|| with_ct(post(uri), "application/grpcx")),
            Box::new(|| post(uri)),
            Box::new(|| grpc(PATH).header("content-type", "application/grpc")),
            Box::new(|| grpc(PATH).header("cache-control", "no-cache")),
            Box::new(|| grpc(PATH).header("pragma", "no-cache")),
        ];
        let frames = || vec![data(msg("x").slice(..2)), data(msg("x").slice(2..))];
        let mut requests = Vec::new();
        for build in &builders {
            requests.push(send_frames(build(), frames()));
            requests.push(send_frames(build(), frames()));
        }
        let out = race(layer(), numbered_ok(), requests).await;
        let n = builders.len() * 2;
        assert_eq!(out.calls, n);
        assert!(
            out.served().iter().all(|s| *s == Bypass),
            "{:?}",
            out.served()
        );
        for seen in &out.seen {
            assert_eq!(seen.body.data(), msg("x"), "{}", seen.uri);
        }
        assert_eq!((out.stats.bypassed, out.stats.leaders), (n as u64, 0));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn coalescing_is_not_caching() {
    bounded(async {
        let backend = Backend::new();
        backend.open();
        let layer = layer();
        let svc = layer.layer(backend.service(numbered_ok()));
        let first = Got::of(
            svc.clone()
                .oneshot(send(grpc(PATH), msg("x")))
                .await
                .unwrap(),
        )
        .await;
        let second = Got::of(svc.oneshot(send(grpc(PATH), msg("x"))).await.unwrap()).await;
        assert_eq!(backend.calls(), 2);
        assert_eq!((first.served, second.served), (Leader, Leader));
        assert_eq!(second.call(), Some("2"));
    })
    .await;
}

/// A response body that announces `len` bytes (as a `content-length` would) and never sends.
struct Announced(u64);

impl Body for Announced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<FrameResult>> {
        std::task::Poll::Pending
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0)
    }
}

#[tokio::test(start_paused = true)]
async fn an_oversized_answer_releases_followers_before_it_ends() {
    bounded(async {
        use futures::StreamExt;
        let bodies: [fn() -> TestBody; 2] = [
            // Found while reading: one frame over the limit, then nothing more for now.
            || {
                let first = futures::stream::iter([data(Bytes::from(vec![b'r'; 65]))]);
                StreamBody::new(first.chain(futures::stream::pending())).boxed_unsync()
            },
            // Known from the size hint, before a byte is read.
            || Announced(1000).boxed_unsync(),
        ];
        for (case, make) in bodies.into_iter().enumerate() {
            let server = first_then_ok(move || {
                let mut response = reply(200, &[("content-type", "application/grpc")], vec![]);
                *response.body_mut() = make();
                response
            });
            let layer = layer().response_limit(64);
            let backend = Backend::new();
            let mut responses = race_raw(
                &layer,
                &backend,
                server,
                vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
            )
            .await;
            let follower = Got::of(responses.pop().unwrap()).await;
            assert_eq!(follower.served, Released, "case {case}");
            assert_eq!(follower.grpc_status(), Some("0"));
            let mut leader = responses.pop().unwrap();
            assert_eq!(leader.extensions().get::<ServedBy>(), Some(&Leader));
            if case == 0 {
                let frame = leader.body_mut().frame().await.unwrap().unwrap();
                assert_eq!(frame.into_data().unwrap().len(), 65, "nothing lost");
            } else {
                assert_eq!(leader.body().size_hint().exact(), Some(1000));
            }
            assert!(poll!(leader.body_mut().frame()).is_pending());
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_oversized_request_reaches_the_inner_service_before_it_ends() {
    bounded(async {
        use futures::StreamExt;
        let backend = Backend::new();
        let layer = layer().request_limit(16);
        let svc = layer.layer(backend.service(numbered_ok()));
        let frames = futures::stream::iter([data(msg("over sixteen bytes"))]);
        let streaming = StreamBody::new(frames.chain(futures::stream::pending())).boxed_unsync();
        let mut call = Box::pin(svc.oneshot(grpc(PATH).body(streaming).unwrap()));
        assert!(poll!(call.as_mut()).is_pending());
        assert_eq!(backend.calls(), 1, "passed on without waiting for the end");
        assert_eq!(layer.stats().bypassed, 1);
        assert_eq!(layer.in_flight(), 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn one_layer_over_two_services_lets_them_share_answers() {
    bounded(async {
        // Documented registry scope: the key has no notion of which inner service answers.
        let layer = layer();
        let (a, b) = (Backend::new(), Backend::new());
        let tagged = |tag: &'static str| {
            answer(move |n, _| {
                let mut response = ok_response(n);
                response
                    .headers_mut()
                    .insert("x-service", HeaderValue::from_static(tag));
                response
            })
        };
        let svc_a = layer.layer(a.service(tagged("a")));
        let svc_b = layer.layer(b.service(tagged("b")));
        let mut first = Box::pin(svc_a.oneshot(send(grpc(PATH), msg("x"))));
        let mut second = Box::pin(svc_b.oneshot(send(grpc(PATH), msg("x"))));
        assert!(poll!(first.as_mut()).is_pending());
        assert!(poll!(second.as_mut()).is_pending());
        a.open();
        b.open();
        let (first, second) = tokio::join!(first, second);
        let second = Got::of(second.unwrap()).await;
        assert_eq!((a.calls(), b.calls()), (1, 0));
        assert_eq!(second.served, Follower);
        assert_eq!(second.headers["x-service"], "a");
        drop(first);
    })
    .await;
}

/// A `Set-Cookie` in the trailers of a successful call (response metadata sent as trailers) is
/// state for one client, as in the head: the follower makes its own call, the leader gets its
/// own response untouched, and the call is not counted as failed.
#[tokio::test(start_paused = true)]
async fn a_set_cookie_in_the_trailers_is_not_shared() {
    bounded(async {
        let server = first_then_ok(|| {
            reply(
                200,
                &[("content-type", "application/grpc"), ("x-call", "1")],
                vec![
                    data(msg("call 1")),
                    trailers(&[("grpc-status", "0"), ("set-cookie", "s=leader")]),
                ],
            )
        });
        let out = race(
            layer(),
            server,
            vec![send(grpc(PATH), msg("x")), send(grpc(PATH), msg("x"))],
        )
        .await;
        assert_eq!(out.calls, 2);
        assert_eq!(out.served(), [Leader, Released]);
        let leader_cookie = out.got[0].body.trailers().and_then(|t| t.get("set-cookie"));
        assert_eq!(leader_cookie.map(|v| v.to_str().unwrap()), Some("s=leader"));
        assert_eq!(out.got[1].call(), Some("2"));
        assert!(out.got[1]
            .body
            .trailers()
            .is_some_and(|t| t.get("set-cookie").is_none()));
        assert_eq!((out.stats.errors, out.stats.released), (0, 1));
    })
    .await;
}
