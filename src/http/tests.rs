//! Behaviour of the service: who gets what, for every shareability outcome.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{join_all, FutureExt};
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tower::{service_fn, Layer, Service, ServiceExt};

use super::*;

type TestBody = BoxBody<Bytes, Infallible>;
type Req = Request<Empty<Bytes>>;

/// A body of unknown length made of `chunks`, then `trailers` if any.
fn stream_body(chunks: &[&'static str], trailers: Option<HeaderMap>) -> TestBody {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    frames.extend(trailers.map(|t| Ok(Frame::trailers(t))));
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

fn text(s: String) -> TestBody {
    Full::new(Bytes::from(s)).boxed()
}

/// A backend that counts its calls and answers with `respond(call number, request)`.
fn backend<F>(
    respond: F,
) -> (
    impl Service<Req, Response = Response<TestBody>, Error = &'static str, Future: Send> + Clone + Send,
    Arc<AtomicUsize>,
)
where
    F: Fn(usize, &Req) -> Result<Response<TestBody>, &'static str> + Clone + Send + Sync + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = service_fn(move |req: Req| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let respond = respond.clone();
        async move {
            tokio::task::yield_now().await;
            respond(n, &req)
        }
    });
    (svc, calls)
}

fn get(uri: &str) -> Req {
    Request::get(uri).body(Empty::new()).unwrap()
}

async fn read(res: Response<CoalesceBody<TestBody>>) -> (ServedBy, String, Option<HeaderMap>) {
    let by = *res
        .extensions()
        .get::<ServedBy>()
        .expect("every response is marked");
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
    (by, body, trailers)
}

/// Calls `svc` once per request before polling any response, so every request after the
/// first joins the first one's flight; then drives them all.
async fn burst<S>(svc: &mut S, reqs: Vec<Req>) -> Vec<Result<S::Response, S::Error>>
where
    S: Service<Req>,
{
    let futures: Vec<_> = reqs.into_iter().map(|r| svc.call(r)).collect();
    join_all(futures).await
}

fn bounded<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(10), f)
}

#[tokio::test]
async fn identical_requests_share_one_call() {
    bounded(async {
        let (inner, calls) = backend(|n, _| Ok(Response::new(text(format!("call {n}")))));
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(inner);
        let mut futures: Vec<_> = (0..50).map(|_| svc.call(get("/a"))).collect();
        assert_eq!((layer.in_flight(), layer.waiting()), (1, 49));
        assert_eq!(futures[0].served_by(), ServedBy::Leader);
        assert_eq!(futures[1].served_by(), ServedBy::Follower);
        drop(futures.pop());
        assert_eq!(layer.waiting(), 48, "a dropped follower stops waiting");
        let results = join_all(futures).await;
        assert_eq!(layer.waiting(), 0);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let mut served = Vec::new();
        for res in results {
            let (by, body, _) = read(res.unwrap()).await;
            assert_eq!(body, "call 0");
            served.push(by);
        }
        assert_eq!(served[0], ServedBy::Leader);
        assert!(served[1..].iter().all(|b| *b == ServedBy::Follower));
        assert_eq!(layer.in_flight(), 0);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn different_keys_do_not_coalesce_and_later_requests_start_anew() {
    bounded(async {
        let (inner, calls) =
            backend(|n, req| Ok(Response::new(text(format!("{} {n}", req.uri())))));
        let mut svc = CoalesceHttpLayer::new().layer(inner);
        let results = burst(&mut svc, vec![get("/a"), get("/b"), get("/a?x")]).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let bodies: Vec<_> = join_all(
            results
                .into_iter()
                .map(|r| async { read(r.unwrap()).await.1 }),
        )
        .await;
        assert_eq!(bodies, ["/a 0", "/b 1", "/a?x 2"]);
        // No stale join: the flight is over, the next request calls again.
        let (_, body, _) = read(svc.call(get("/a")).await.unwrap()).await;
        assert_eq!(body, "/a 3");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn post_and_credentials_bypass() {
    bounded(async {
        let (inner, calls) = backend(|n, _| Ok(Response::new(text(format!("call {n}")))));
        let mut svc = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .layer(inner);
        let post = || Request::post("/a").body(Empty::new()).unwrap();
        let authed = |who: &str| {
            Request::get("/a")
                .header("authorization", format!("Bearer {who}"))
                .body(Empty::new())
                .unwrap()
        };
        let results = burst(
            &mut svc,
            vec![post(), post(), authed("alice"), authed("bob")],
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let mut bodies = Vec::new();
        for res in results {
            let res = res.unwrap();
            let status = res.headers()["cache-status"].to_str().unwrap().to_owned();
            let (by, body, _) = read(res).await;
            assert_eq!(by, ServedBy::Bypass);
            bodies.push((body, status));
        }
        assert_eq!(bodies[0].1, "tower-coalesce; fwd=method; detail=method");
        assert_eq!(
            bodies[2].1,
            "tower-coalesce; fwd=bypass; detail=credentials"
        );
        let mut distinct: Vec<_> = bodies.iter().map(|b| b.0.clone()).collect();
        distinct.dedup();
        assert_eq!(distinct.len(), 4);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn identities_coalesce_apart() {
    bounded(async {
        let (inner, calls) = backend(|_, req| {
            let who = req.headers()["authorization"].to_str().unwrap().to_owned();
            Ok(Response::new(text(format!("page of {who}"))))
        });
        let mut svc = CoalesceHttpLayer::new()
            .identity(|parts: &http::request::Parts| {
                parts
                    .headers
                    .get("authorization")
                    .map(|v| v.as_bytes().to_vec())
            })
            .layer(inner);
        let req = |who: &str| {
            Request::get("/me")
                .header("authorization", who)
                .body(Empty::new())
                .unwrap()
        };
        let reqs = vec![
            req("alice"),
            req("bob"),
            req("alice"),
            req("bob"),
            req("alice"),
        ];
        let results = burst(&mut svc, reqs).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one call per identity");
        let mut got = Vec::new();
        for res in results {
            got.push(read(res.unwrap()).await.1);
        }
        assert_eq!(
            got,
            [
                "page of alice",
                "page of bob",
                "page of alice",
                "page of bob",
                "page of alice"
            ]
        );
    })
    .await
    .unwrap();
}

/// Each request gets the response of its own call, the leader included.
async fn assert_released(
    respond: impl Fn(usize) -> Response<TestBody> + Clone + Send + Sync + 'static,
    why: &str,
) {
    let (inner, calls) = backend(move |n, _| Ok(respond(n)));
    let mut svc = CoalesceHttpLayer::new()
        .cache_status_header(true)
        .layer(inner);
    let results = burst(&mut svc, (0..5).map(|_| get("/a")).collect()).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "{why}: every follower calls"
    );
    let mut seen = Vec::new();
    for (i, res) in results.into_iter().enumerate() {
        let res = res.unwrap();
        let status = res.headers()["cache-status"].to_str().unwrap().to_owned();
        let (by, body, _) = read(res).await;
        if i == 0 {
            assert_eq!(by, ServedBy::Leader, "{why}");
            assert_eq!(body, "call 0", "{why}: the leader gets its own response");
            assert_eq!(status, "tower-coalesce; fwd=miss");
        } else {
            assert_eq!(by, ServedBy::Released, "{why}");
            assert!(
                status.starts_with("tower-coalesce; fwd=miss; collapsed=?0; detail="),
                "{status}"
            );
        }
        seen.push(body);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5, "{why}: nobody got somebody else's response");
}

#[tokio::test]
async fn unshareable_responses_release_the_followers() {
    bounded(async {
        let with = |name: &'static str, value: &'static str| {
            move |n: usize| {
                Response::builder()
                    .header(name, value)
                    .body(text(format!("call {n}")))
                    .unwrap()
            }
        };
        assert_released(with("set-cookie", "session=1"), "set-cookie").await;
        assert_released(with("cache-control", "private"), "private").await;
        assert_released(with("cache-control", "no-store"), "no-store").await;
        assert_released(with("cache-control", "no-cache"), "no-cache").await;
        assert_released(with("vary", "*"), "vary *").await;
        assert_released(with("content-type", "text/event-stream"), "sse").await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn leader_error_goes_to_the_leader_and_followers_call() {
    bounded(async {
        let (inner, calls) = backend(|n, _| {
            if n == 0 {
                Err("backend down")
            } else {
                Ok(Response::new(text(format!("call {n}"))))
            }
        });
        let mut svc = CoalesceHttpLayer::new().layer(inner);
        let results = burst(&mut svc, (0..4).map(|_| get("/a")).collect()).await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let mut results = results.into_iter();
        assert_eq!(results.next().unwrap().unwrap_err(), "backend down");
        for res in results {
            let (by, body, _) = read(res.unwrap()).await;
            assert_eq!(by, ServedBy::Released);
            assert_ne!(body, "call 0");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn body_over_the_limit_reaches_the_leader_whole() {
    bounded(async {
        // Unknown length: found too large while reading.
        let (inner, calls) = backend(|n, _| {
            let tag: &'static str = Box::leak(format!("call {n}").into_boxed_str());
            Ok(Response::new(stream_body(
                &["0123456789", "abcdefghij", tag],
                None,
            )))
        });
        let mut svc = CoalesceHttpLayer::new().max_body_bytes(15).layer(inner);
        let results = burst(&mut svc, (0..4).map(|_| get("/a")).collect()).await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        for (i, res) in results.into_iter().enumerate() {
            let (by, body, _) = read(res.unwrap()).await;
            assert_eq!(body, format!("0123456789abcdefghijcall {i}"));
            assert_eq!(
                by,
                if i == 0 {
                    ServedBy::Leader
                } else {
                    ServedBy::Released
                }
            );
        }

        // Known length: not read at all before it goes to the leader.
        let (inner, calls) = backend(|n, _| {
            Ok(Response::builder()
                .header("content-length", "26")
                .body(text(format!("a body of 26 bytes, call {n}")))
                .unwrap())
        });
        let mut svc = CoalesceHttpLayer::new().max_body_bytes(25).layer(inner);
        let results = burst(&mut svc, (0..3).map(|_| get("/a")).collect()).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        for (i, res) in results.into_iter().enumerate() {
            let res = res.unwrap();
            assert!(!res.body().is_buffered());
            assert_eq!(read(res).await.1, format!("a body of 26 bytes, call {i}"));
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn head_content_length_does_not_count_against_the_limit() {
    bounded(async {
        let (inner, calls) = backend(|_, _| {
            Ok(Response::builder()
                .header("content-length", "1000000")
                .body(text(String::new()))
                .unwrap())
        });
        let mut svc = CoalesceHttpLayer::new().max_body_bytes(10).layer(inner);
        let head = || Request::head("/a").body(Empty::new()).unwrap();
        let results = burst(&mut svc, vec![head(), head(), head()]).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for res in results {
            assert_eq!(res.unwrap().headers()["content-length"], "1000000");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn trailers_are_shared_with_the_body() {
    bounded(async {
        let (inner, calls) = backend(|_, _| {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", "abc".parse().unwrap());
            Ok(Response::new(stream_body(&["he", "llo"], Some(trailers))))
        });
        let mut svc = CoalesceHttpLayer::new().layer(inner);
        let results = burst(&mut svc, (0..3).map(|_| get("/a")).collect()).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for res in results {
            let (_, body, trailers) = read(res.unwrap()).await;
            assert_eq!(body, "hello");
            assert_eq!(trailers.expect("trailers kept")["x-checksum"], "abc");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn vary_mismatch_releases_only_the_followers_that_differ() {
    bounded(async {
        let (inner, calls) = backend(|n, req| {
            let theme = req
                .headers()
                .get("x-theme")
                .map_or("none", |v| v.to_str().unwrap());
            Ok(Response::builder()
                .header("vary", "X-Theme")
                .body(text(format!("{theme} {n}")))
                .unwrap())
        });
        let mut svc = CoalesceHttpLayer::new().layer(inner);
        let themed = |t: &str| {
            Request::get("/a")
                .header("x-theme", t)
                .body(Empty::new())
                .unwrap()
        };
        let reqs = vec![themed("dark"), themed("dark"), themed("light"), get("/a")];
        let results = burst(&mut svc, reqs).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let mut got = Vec::new();
        for res in results {
            let (by, body, _) = read(res.unwrap()).await;
            got.push((by, body));
        }
        assert_eq!(got[0], (ServedBy::Leader, "dark 0".into()));
        assert_eq!(got[1], (ServedBy::Follower, "dark 0".into()));
        assert_eq!(got[2].0, ServedBy::Released);
        assert!(got[2].1.starts_with("light "));
        assert_eq!(got[3].0, ServedBy::Released);
        assert!(got[3].1.starts_with("none "));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn panic_is_raised_again_in_the_leader_and_followers_call() {
    bounded(async {
        let (inner, calls) = backend(|n, _| {
            if n == 0 {
                panic!("handler exploded");
            }
            Ok(Response::new(text(format!("call {n}"))))
        });
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(inner);
        let leader = svc.call(get("/a"));
        let followers: Vec<_> = (0..3).map(|_| svc.call(get("/a"))).collect();
        let (leader, followers) = tokio::join!(
            std::panic::AssertUnwindSafe(leader).catch_unwind(),
            join_all(followers)
        );
        let payload = leader.expect_err("the leader panics again");
        assert_eq!(
            payload.downcast_ref::<String>().map(String::as_str),
            Some("handler exploded")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        for res in followers {
            let (by, body, _) = read(res.unwrap()).await;
            assert_eq!(by, ServedBy::Released);
            assert_ne!(body, "call 0");
        }
        // The key is usable again.
        assert_eq!(layer.in_flight(), 0);
        assert_eq!(read(svc.call(get("/a")).await.unwrap()).await.1, "call 4");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn follower_taking_over_a_private_response_makes_its_own_call() {
    bounded(async {
        let gate = Arc::new(tokio::sync::Notify::new());
        let g = gate.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let inner = service_fn(move |_req: Req| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            let gate = g.clone();
            async move {
                if n == 0 {
                    gate.notified().await;
                }
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("cache-control", "private")
                        .body(text(format!("private page {n}")))
                        .unwrap(),
                )
            }
        });
        let mut svc = CoalesceHttpLayer::new().layer(inner);
        let mut leader = Box::pin(svc.call(get("/a")));
        let follower = svc.call(get("/a"));
        // Start the leader's call, then drop the leader mid-flight.
        assert!(futures::poll!(&mut leader).is_pending());
        drop(leader);
        gate.notify_one();
        let (by, body, _) = read(follower.await.unwrap()).await;
        assert_eq!(by, ServedBy::Released);
        assert_eq!(body, "private page 1", "never the leader's private page");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn follower_taking_over_a_shareable_response_gets_it() {
    bounded(async {
        let (inner, calls) = backend(|n, _| Ok(Response::new(text(format!("call {n}")))));
        let mut svc = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .layer(inner);
        let mut leader = Box::pin(svc.call(get("/a")));
        let follower = svc.call(get("/a"));
        assert!(futures::poll!(&mut leader).is_pending());
        drop(leader);
        let res = follower.await.unwrap();
        assert_eq!(
            res.headers()["cache-status"],
            "tower-coalesce; fwd=miss; collapsed"
        );
        assert_eq!(read(res).await, (ServedBy::Follower, "call 0".into(), None));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn layer_clones_share_a_registry_and_options_make_a_new_one() {
    bounded(async {
        let (inner, calls) = backend(|n, _| Ok(Response::new(text(format!("call {n}")))));
        let layer = CoalesceHttpLayer::new();
        // As axum does: one `layer` call per connection.
        let mut a = layer.layer(inner.clone());
        let mut b = layer.clone().layer(inner.clone());
        let (x, y) = (a.call(get("/a")), b.call(get("/a")));
        assert_eq!(layer.in_flight(), 1);
        let (x, y) = tokio::join!(x, y);
        assert_eq!(read(x.unwrap()).await.0, ServedBy::Leader);
        assert_eq!(read(y.unwrap()).await.0, ServedBy::Follower);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let other = layer.clone().max_body_bytes(1);
        let mut c = other.layer(inner);
        let (x, y) = (a.call(get("/a")), c.call(get("/a")));
        assert_eq!(layer.in_flight(), 1);
        assert_eq!(other.in_flight(), 1);
        let (x, y) = tokio::join!(x, y);
        assert_eq!(read(x.unwrap()).await.0, ServedBy::Leader);
        assert_eq!(read(y.unwrap()).await.0, ServedBy::Leader);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn poll_ready_never_waits_for_the_inner_service() {
    bounded(async {
        let (inner, calls) = backend(|n, _| Ok(Response::new(text(format!("call {n}")))));
        // A concurrency limit of one below the layer limits calls, not waiters.
        let limited = tower::limit::ConcurrencyLimit::new(inner, 1);
        let mut svc = CoalesceHttpLayer::new().layer(limited);
        let mut futures = Vec::new();
        for _ in 0..10 {
            svc.ready().await.unwrap();
            futures.push(svc.call(get("/a")));
        }
        for res in join_all(futures).await {
            assert_eq!(read(res.unwrap()).await.1, "call 0");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn cache_status_is_appended_after_the_inner_entries_and_off_by_default() {
    bounded(async {
        let (inner, _) = backend(|_, _| {
            Ok(Response::builder()
                .header("cache-status", "origin-cache; hit")
                .body(text("x".into()))
                .unwrap())
        });
        let mut on = CoalesceHttpLayer::new()
            .cache_status_header(true)
            .layer(inner.clone());
        let res = on.call(get("/a")).await.unwrap();
        let entries: Vec<_> = res.headers().get_all("cache-status").iter().collect();
        assert_eq!(entries, ["origin-cache; hit", "tower-coalesce; fwd=miss"]);

        let mut off = CoalesceHttpLayer::new().layer(inner);
        let res = off.call(get("/a")).await.unwrap();
        let entries: Vec<_> = res.headers().get_all("cache-status").iter().collect();
        assert_eq!(entries, ["origin-cache; hit"]);
        assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));
    })
    .await
    .unwrap();
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<CoalesceHttpLayer>();
    send_sync::<CoalesceHttpService<axum::routing::Route>>();
    send::<CoalesceBody<axum::body::Body>>();
    send_sync::<CoalesceBody<Full<Bytes>>>();
    send_sync::<ServedBy>();
    send::<ResponseFuture<axum::routing::Route, axum::body::Body, axum::body::Body>>();
}

#[tokio::test]
async fn released_followers_call_all_at_once() {
    bounded(async {
        const FOLLOWERS: usize = 8;
        // Every follower's own call waits until all of them are in the backend together: if
        // followers were released one by one, this would never complete.
        let together = Arc::new(tokio::sync::Barrier::new(FOLLOWERS));
        let calls = Arc::new(AtomicUsize::new(0));
        let (b, c) = (together.clone(), calls.clone());
        let inner = service_fn(move |_req: Req| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            let together = b.clone();
            async move {
                if n > 0 {
                    together.wait().await;
                }
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("set-cookie", format!("id={n}"))
                        .body(text(format!("call {n}")))
                        .unwrap(),
                )
            }
        });
        let mut svc = CoalesceHttpLayer::new().layer(inner);
        let results = burst(&mut svc, (0..=FOLLOWERS).map(|_| get("/a")).collect()).await;
        assert_eq!(calls.load(Ordering::SeqCst), FOLLOWERS + 1);
        for (i, res) in results.into_iter().enumerate() {
            let res = res.unwrap();
            let cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
            let (by, body, _) = read(res).await;
            assert_eq!(
                body,
                format!("call {}", &cookie[3..]),
                "cookie and body from one call"
            );
            let expected = if i == 0 {
                ServedBy::Leader
            } else {
                ServedBy::Released
            };
            assert_eq!(by, expected);
        }
    })
    .await
    .unwrap();
}
