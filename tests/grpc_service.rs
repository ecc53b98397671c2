//! `CoalesceGrpcService` at the tower level, polled by hand: where the status is read, what
//! followers get when the call fails, errs or panics, and that bypassed bodies are untouched.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{poll, FutureExt};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::watch;
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_coalesce::grpc::{CoalesceGrpcLayer, GrpcServiceBuilderExt};
use tower_coalesce::http::{CoalesceBody, ServedBy};

const PATH: &str = "/catalog.v1.Catalog/GetItem";
const LIMIT: Duration = Duration::from_secs(10);

type Frames = futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>;
type TestBody = StreamBody<Frames>;

fn body(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> TestBody {
    StreamBody::new(futures::stream::iter(frames))
}

fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, value.parse().unwrap());
    }
    map
}

fn call(path: &str, message: &'static [u8]) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(message)))
        .unwrap()
}

/// What the test backend answers with its `n`th call (from 1).
type Answer = Arc<dyn Fn(usize) -> Result<Response<TestBody>, BoxError> + Send + Sync>;

#[derive(Clone, Debug)]
struct FromInner;

/// A backend that counts calls and holds each behind a gate until the test opens it.
struct Backend {
    calls: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
}

impl Backend {
    fn new() -> Self {
        Backend {
            calls: Arc::default(),
            gate: watch::channel(false).0,
        }
    }

    fn service(
        &self,
        answer: Answer,
    ) -> impl Service<
        Request<CoalesceBody<Full<Bytes>>>,
        Response = Response<TestBody>,
        Error = BoxError,
        Future = impl Future<Output = Result<Response<TestBody>, BoxError>> + Send,
    > + Clone
           + Send
           + 'static {
        let calls = self.calls.clone();
        let gate = self.gate.subscribe();
        service_fn(move |_req: Request<CoalesceBody<Full<Bytes>>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let (answer, mut gate) = (answer.clone(), gate.clone());
            async move {
                gate.wait_for(|open| *open).await.expect("gate");
                let mut response = answer(n)?;
                response.extensions_mut().insert(FromInner);
                Ok(response)
            }
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

fn grpc_response(data: &'static [u8], tail: HeaderMap) -> Response<TestBody> {
    Response::builder()
        .header("content-type", "application/grpc")
        .body(body(vec![
            Ok(Frame::data(Bytes::from_static(data))),
            Ok(Frame::trailers(tail)),
        ]))
        .unwrap()
}

/// A response numbered by call, ending with `status` in its trailers (or none).
fn numbered(status: Option<&'static str>) -> Answer {
    Arc::new(move |n| {
        let data: &'static [u8] = if n == 1 { b"call 1" } else { b"call 2+" };
        let tail = match status {
            Some(status) => trailers(&[("grpc-status", status), ("x-trailer", "kept")]),
            None => trailers(&[("x-trailer", "kept")]),
        };
        Ok(grpc_response(data, tail))
    })
}

struct Read {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

async fn read<B>(body: B) -> Read
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Read {
        data: collected.to_bytes(),
        trailers,
    }
}

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn an_ok_status_in_trailers_is_shared_with_the_trailers() {
    bounded(async {
        let backend = Backend::new();
        let layer = CoalesceGrpcLayer::new().method(PATH);
        let svc = layer.layer(backend.service(numbered(Some("0"))));
        let mut leader = Box::pin(svc.clone().oneshot(call(PATH, b"m")));
        let mut follower = Box::pin(svc.clone().oneshot(call(PATH, b"m")));
        assert!(poll!(&mut leader).is_pending());
        assert!(poll!(&mut follower).is_pending());
        assert_eq!(
            (backend.calls(), layer.waiting(), layer.in_flight()),
            (1, 1, 1)
        );
        backend.open();
        let (leader, follower) = tokio::join!(leader, follower);
        let (leader, follower) = (leader.unwrap(), follower.unwrap());
        assert!(
            leader.extensions().get::<FromInner>().is_some(),
            "the leader's own response"
        );
        assert!(
            follower.extensions().get::<FromInner>().is_none(),
            "a rebuilt copy"
        );
        assert!(follower.body().is_buffered());
        assert_eq!(
            leader.extensions().get::<ServedBy>(),
            Some(&ServedBy::Leader)
        );
        assert_eq!(
            follower.extensions().get::<ServedBy>(),
            Some(&ServedBy::Follower)
        );
        assert_eq!(follower.headers()["content-type"], "application/grpc");
        for response in [leader, follower] {
            let read = read(response.into_body()).await;
            assert_eq!(read.data, "call 1");
            let tail = read.trailers.expect("trailers survive");
            assert_eq!(
                (&tail["grpc-status"], &tail["x-trailer"]),
                (&"0".parse().unwrap(), &"kept".parse().unwrap())
            );
        }
        assert_eq!(backend.calls(), 1);
        assert_eq!((layer.waiting(), layer.in_flight()), (0, 0));
    })
    .await;
}

/// Runs a leader and a follower against `answer`; returns the data each got and the number
/// of backend calls.
async fn leader_and_follower(
    answer: Answer,
) -> (Result<Bytes, BoxError>, Result<Bytes, BoxError>, usize) {
    let backend = Backend::new();
    let layer = CoalesceGrpcLayer::new().method(PATH);
    let svc = layer.layer(backend.service(answer));
    let mut leader = Box::pin(svc.clone().oneshot(call(PATH, b"m")));
    let mut follower = Box::pin(svc.clone().oneshot(call(PATH, b"m")));
    assert!(poll!(&mut leader).is_pending());
    assert!(poll!(&mut follower).is_pending());
    assert_eq!(
        (backend.calls(), layer.waiting()),
        (1, 1),
        "the follower joined"
    );
    backend.open();
    let (leader, follower) = tokio::join!(leader, follower);
    if let Ok(follower) = &follower {
        let shared = backend.calls() == 1;
        let expected = if shared {
            ServedBy::Follower
        } else {
            ServedBy::Released
        };
        assert_eq!(follower.extensions().get::<ServedBy>(), Some(&expected));
    }
    let data = |r: Result<Response<CoalesceBody<TestBody>>, BoxError>| async move {
        match r {
            Ok(response) => Ok(read(response.into_body()).await.data),
            Err(e) => Err(e),
        }
    };
    let (leader, follower) = (data(leader).await, data(follower).await);
    assert_eq!((layer.waiting(), layer.in_flight()), (0, 0));
    // A follower that made its own call was counted as released (and fell through).
    let stats = layer.stats();
    let released = u64::from(backend.calls() == 2);
    assert_eq!(
        (
            stats.leaders,
            stats.followers,
            stats.released,
            stats.fell_through
        ),
        (1, 1, released, released),
        "{stats:?}"
    );
    (leader, follower, backend.calls())
}

#[tokio::test]
async fn an_error_status_in_trailers_releases_the_follower() {
    bounded(async {
        let (leader, follower, calls) = leader_and_follower(numbered(Some("13"))).await;
        assert_eq!(leader.unwrap(), "call 1");
        assert_eq!(
            follower.unwrap(),
            "call 2+",
            "the follower made its own call"
        );
        assert_eq!(calls, 2);
    })
    .await;
}

#[tokio::test]
async fn a_response_without_status_releases_the_follower() {
    bounded(async {
        let (leader, follower, calls) = leader_and_follower(numbered(None)).await;
        assert_eq!(
            (leader.unwrap(), follower.unwrap(), calls),
            ("call 1".into(), "call 2+".into(), 2)
        );
    })
    .await;
}

#[tokio::test]
async fn a_trailers_only_error_releases_and_a_trailers_only_ok_is_shared() {
    bounded(async {
        let trailers_only = |status: &'static str| -> Answer {
            Arc::new(move |n| {
                Ok(Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", status)
                    .header("x-call", n.to_string())
                    .body(body(Vec::new()))
                    .unwrap())
            })
        };
        let (_, _, calls) = leader_and_follower(trailers_only("14")).await;
        assert_eq!(calls, 2);
        let (_, _, calls) = leader_and_follower(trailers_only("0")).await;
        assert_eq!(calls, 1);
    })
    .await;
}

#[tokio::test]
async fn an_inner_error_goes_to_the_leader_alone() {
    bounded(async {
        let answer: Answer = Arc::new(|n| {
            if n == 1 {
                Err("backend down".into())
            } else {
                Ok(grpc_response(b"second", trailers(&[("grpc-status", "0")])))
            }
        });
        let (leader, follower, calls) = leader_and_follower(answer).await;
        assert_eq!(leader.unwrap_err().to_string(), "backend down");
        assert_eq!(follower.unwrap(), "second");
        assert_eq!(calls, 2);
    })
    .await;
}

#[tokio::test]
async fn a_panic_is_raised_in_the_leader_and_releases_the_followers() {
    bounded(async {
        let answer: Answer = Arc::new(|n| {
            if n == 1 {
                panic!("handler bug");
            }
            Ok(grpc_response(b"fine", trailers(&[("grpc-status", "0")])))
        });
        let backend = Backend::new();
        let layer = CoalesceGrpcLayer::new().method(PATH);
        let svc = layer.layer(backend.service(answer));
        let mut leader = Box::pin(svc.clone().oneshot(call(PATH, b"m")));
        let mut followers: Vec<_> = (0..3)
            .map(|_| Box::pin(svc.clone().oneshot(call(PATH, b"m"))))
            .collect();
        assert!(poll!(&mut leader).is_pending());
        for follower in &mut followers {
            assert!(poll!(follower).is_pending());
        }
        assert_eq!(layer.waiting(), 3);
        backend.open();
        let panic = AssertUnwindSafe(leader)
            .catch_unwind()
            .await
            .expect_err("the leader panics");
        assert_eq!(
            panic.downcast_ref::<String>().map(String::as_str),
            Some("handler bug")
        );
        for follower in futures::future::join_all(followers).await {
            assert_eq!(read(follower.unwrap().into_body()).await.data, "fine");
        }
        assert_eq!(backend.calls(), 4, "each follower made its own call");
        assert_eq!((layer.waiting(), layer.in_flight()), (0, 0));
    })
    .await;
}

#[tokio::test]
async fn a_dropped_leader_leaves_the_call_to_its_followers() {
    bounded(async {
        let backend = Backend::new();
        let layer = CoalesceGrpcLayer::new().method(PATH);
        let svc = layer.layer(backend.service(numbered(Some("0"))));
        let mut leader = Box::pin(svc.clone().oneshot(call(PATH, b"m")));
        let mut follower = Box::pin(svc.clone().oneshot(call(PATH, b"m")));
        assert!(poll!(&mut leader).is_pending());
        assert!(poll!(&mut follower).is_pending());
        drop(leader);
        backend.open();
        let response = follower.await.unwrap();
        assert!(response.body().is_buffered(), "the shared response");
        assert_eq!(read(response.into_body()).await.data, "call 1");
        assert_eq!(backend.calls(), 1);
        assert_eq!((layer.waiting(), layer.in_flight()), (0, 0));
    })
    .await;
}

#[tokio::test]
async fn bypassed_and_oversized_requests_reach_the_inner_service_whole() {
    bounded(async {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let inner = service_fn(move |req: Request<CoalesceBody<TestBody>>| {
            let record = record.clone();
            async move {
                let buffered = req.body().is_buffered();
                let read = match req.into_body().collect().await {
                    Ok(collected) => collected.to_bytes(),
                    Err(error) => Bytes::from(format!("error: {error}")),
                };
                record.lock().unwrap().push((buffered, read));
                Ok::<_, Infallible>(grpc_response(b"", trailers(&[("grpc-status", "0")])))
            }
        });
        let layer = CoalesceGrpcLayer::new().method(PATH).request_limit(4);
        let svc = layer.layer(inner);
        let request =
            |path: &str, content_type: &str, frames: Vec<Result<Frame<Bytes>, BoxError>>| {
                Request::post(path)
                    .header("content-type", content_type)
                    .body(body(frames))
                    .unwrap()
            };
        let chunk = |s: &'static str| Ok(Frame::data(Bytes::from_static(s.as_bytes())));
        let cases = [
            // Not allow-listed: not even read.
            request(
                "/catalog.v1.Catalog/WatchItem",
                "application/grpc",
                vec![chunk("ab"), chunk("cd")],
            ),
            // gRPC-Web: bypassed.
            request(PATH, "application/grpc-web", vec![chunk("abcd")]),
            // Over the 4-byte limit: read up to the limit, then replayed whole.
            request(
                PATH,
                "application/grpc",
                vec![chunk("abc"), chunk("def"), chunk("ghi")],
            ),
            // A body that fails while being read: the prefix, then the same error.
            request(
                PATH,
                "application/grpc",
                vec![chunk("ab"), Err("client reset".into())],
            ),
            // Within the limit: buffered and replayed whole.
            request(PATH, "application/grpc", vec![chunk("ab"), chunk("cd")]),
        ];
        let mut served = Vec::new();
        for case in cases {
            let response = svc.clone().oneshot(case).await.unwrap();
            served.push(response.extensions().get::<ServedBy>().copied());
        }
        let bypass = Some(ServedBy::Bypass);
        assert_eq!(
            served,
            [bypass, bypass, bypass, bypass, Some(ServedBy::Leader)]
        );
        let stats = svc.stats();
        assert_eq!((stats.bypassed, stats.leaders), (4, 1), "{stats:?}");
        let seen = seen.lock().unwrap().clone();
        let expected: [(bool, &[u8]); 5] = [
            (false, b"abcd"),
            (false, b"abcd"),
            (false, b"abcdefghi"),
            (false, b"error: client reset"),
            (true, b"abcd"),
        ];
        assert_eq!(seen.len(), expected.len());
        for (i, ((buffered, data), (want_buffered, want))) in seen.iter().zip(expected).enumerate()
        {
            assert_eq!((*buffered, &data[..]), (want_buffered, want), "case {i}");
        }
    })
    .await;
}

#[tokio::test]
async fn every_service_of_a_layer_shares_its_registry_and_each_builder_call_makes_a_new_one() {
    bounded(async {
        let backend = Backend::new();
        let layer = CoalesceGrpcLayer::new().method(PATH);
        // Two `layer()` calls, as a server applying the layer per connection would make.
        let first = layer.layer(backend.service(numbered(Some("0"))));
        let second = layer.clone().layer(backend.service(numbered(Some("0"))));
        let mut a = Box::pin(first.oneshot(call(PATH, b"m")));
        let mut b = Box::pin(second.oneshot(call(PATH, b"m")));
        assert!(poll!(&mut a).is_pending());
        assert!(poll!(&mut b).is_pending());
        assert_eq!(
            layer.waiting(),
            1,
            "the second service's call joined the first's"
        );

        // A reconfigured layer keys differently, so it must not meet the first one's flights.
        let other = layer.clone().metadata("x-tenant");
        let mut c = Box::pin(
            other
                .layer(backend.service(numbered(Some("0"))))
                .oneshot(call(PATH, b"m")),
        );
        assert!(poll!(&mut c).is_pending());
        assert_eq!(
            (backend.calls(), other.in_flight(), layer.in_flight()),
            (2, 1, 1)
        );
        backend.open();
        let (a, b, c) = tokio::join!(a, b, c);
        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        assert_eq!(backend.calls(), 2);
    })
    .await;
}

/// `ServiceBuilder::coalesce_grpc(methods)` is the layer with those methods allow-listed:
/// identical calls of a listed method share one call, any other method passes through.
#[tokio::test]
async fn the_service_builder_method_coalesces_the_listed_methods_only() {
    bounded(async {
        let backend = Backend::new();
        let svc = ServiceBuilder::new()
            .coalesce_grpc([PATH])
            .service(backend.service(numbered(Some("0"))));
        let other = "/catalog.v1.Catalog/ListItems";
        let mut calls: Vec<_> = [PATH, PATH, other]
            .into_iter()
            .map(|path| Box::pin(svc.clone().oneshot(call(path, b"m"))))
            .collect();
        for call in &mut calls {
            assert!(poll!(call).is_pending());
        }
        assert_eq!(
            backend.calls(),
            2,
            "one call for the listed method, one for the other"
        );
        backend.open();
        let served: Vec<_> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap().extensions().get::<ServedBy>().copied())
            .collect();
        assert_eq!(
            served,
            [
                Some(ServedBy::Leader),
                Some(ServedBy::Follower),
                Some(ServedBy::Bypass)
            ]
        );
        assert_eq!(backend.calls(), 2);
    })
    .await;
}
