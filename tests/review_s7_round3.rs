//! Third review of session 7's fixes (25a873c, f01dcab, 24a1fb2, e4de30b): white-box reading
//! of the HTTP adapter's `flight` (the order of its checks now that a `Transfer-Encoding`
//! drops the `Content-Length` beside it before the limit is judged; `HEAD` against `GET`
//! against `204`/`304`; a leader's own response when a `Set-Cookie` trailer keeps it from the
//! followers), `SharedResponse::new` / `to_follower_response` / `hop_by_hop` (a `426` and the
//! `Connection: upgrade` that goes with its `Upgrade`), tested through the public API.
//!
//! (The flight's span is reviewed in `review_s7_round3_tracing.rs`: `tracing`'s callsite
//! interest is process-wide.)
//!
//! Deterministic: every waiter is registered (`call`) before anything is polled, so the first
//! leads and the others follow; a call's response is held behind a `watch` gate where the
//! order of events matters; futures are polled by hand with a no-op waker. No sleeps.
//!
//! Found, fixed since: a follower's copy of a `426 Upgrade Required` kept `Upgrade` (25a873c)
//! but dropped the `Connection: upgrade` that RFC 9110 §7.8 says every sender of `Upgrade`
//! MUST send with it.
#![cfg(feature = "http")]

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Response};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use support::adapter::{
    burst, counted, gated_counted, get, map, read, request, response, streamed, Inner, Req, Unread,
    B,
};
use support::{pending, ready};
use tower::{Layer, Service};
use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};
use tower_coalesce::Stats;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The request-count rule `Stats` documents: every request counted once.
fn check_sum(s: &Stats, requests: u64) {
    assert_eq!(
        s.leaders - s.retried + s.followers + s.lingered + s.bypassed + s.over_capacity,
        requests,
        "{s:?}"
    );
    assert!(s.released <= s.followers, "{s:?}");
    assert!(s.errors + s.panics <= s.leaders, "{s:?}");
    assert_eq!(s.in_flight, 0, "{s:?}");
}

/// An inner service answering the `n`th call (from 0) with `respond(n)`, and its call count.
fn inner(
    respond: impl Fn(usize) -> Response<B> + Send + Sync + 'static,
) -> (Inner, Arc<AtomicUsize>) {
    counted(move |_, n| respond(n))
}

/// The same, each response held until `open` is sent `true`.
fn gated_inner(
    respond: impl Fn(usize) -> Response<B> + Send + Sync + 'static,
) -> (Inner, Arc<AtomicUsize>, tokio::sync::watch::Sender<bool>) {
    gated_counted(move |_, n| respond(n))
}

fn gets(n: usize) -> Vec<Req> {
    (0..n).map(|_| get()).collect()
}

// =============================================================================================
// The order of the checks in `flight`: Transfer-Encoding, Content-Length, the limit
// =============================================================================================

/// 25a873c drops a `Content-Length` beside `Transfer-Encoding: chunked` before the limit is
/// judged: a header over `max_body_bytes` that the coding overrode no longer releases the
/// followers (RFC 9112 §6.3: the header says nothing of the body); the body, read, is small,
/// and every copy goes out framed by its own length.
#[tokio::test]
async fn an_overridden_content_length_over_the_limit_does_not_release_a_small_body() {
    let (svc, calls) = inner(|_| {
        response(
            200,
            map(&[
                ("transfer-encoding", "chunked"),
                ("content-length", "100000"),
            ]),
            streamed(&[b"hel", b"lo"], None),
        )
    });
    let mut svc = CoalesceHttpLayer::new().max_body_bytes(100).layer(svc);
    let reads = burst(&mut svc, gets(3)).await;
    assert_eq!(calls.load(SeqCst), 1, "shared");
    for r in &reads {
        assert_eq!(r.data.as_ref(), b"hello", "{:?}", r.by);
        assert_eq!(r.exact, Some(5), "{:?}", r.by);
        assert!(!r.headers.contains_key(header::TRANSFER_ENCODING));
        assert!(r.framing_ok(false), "{:?}: {:?}", r.by, r.headers);
    }
    let s = svc.stats();
    assert_eq!((s.leaders, s.followers, s.released), (1, 2, 0), "{s:?}");
    check_sum(&s, 3);
}

/// The other way round: a `Content-Length` under the limit beside `chunked`, with a body that
/// turns out larger. The followers are released (`too-large`); the leader gets its whole body,
/// framed by its `Transfer-Encoding` alone (not by the stale `Content-Length` of 10, which
/// would cut it short on the wire).
#[tokio::test]
async fn an_overridden_content_length_under_the_limit_cannot_frame_a_larger_released_body() {
    let (svc, calls) = inner(|_| {
        response(
            200,
            map(&[("transfer-encoding", "chunked"), ("content-length", "10")]),
            streamed(&[&[b'a'; 64], &[b'b'; 64], &[b'c'; 64]], None),
        )
    });
    let mut svc = CoalesceHttpLayer::new()
        .max_body_bytes(100)
        .cache_status_header(true)
        .layer(svc);
    let reads = burst(&mut svc, gets(2)).await;
    assert_eq!(calls.load(SeqCst), 2);
    let (leader, follower) = (&reads[0], &reads[1]);
    assert_eq!(
        (leader.by, follower.by),
        (ServedBy::Leader, ServedBy::Released)
    );
    for r in &reads {
        assert_eq!(r.data.len(), 192, "{:?}: whole, untruncated", r.by);
        assert!(r.data.starts_with(&[b'a'; 64]) && r.data.ends_with(&[b'c'; 64]));
    }
    assert_eq!(leader.values("transfer-encoding"), ["chunked"]);
    assert!(
        leader.framing_ok(false),
        "the leader's response: {:?}",
        leader.headers
    );
    // Not "untouched" (src/http/mod.rs): the overridden header is gone from the leader's own
    // response too, which is what lets a server send it at all.
    assert!(leader.values("content-length").is_empty());
    assert!(!leader.buffered, "streamed: the bytes read, then the rest");
    assert!(follower.cache_status().contains("detail=too-large"));
    let s = svc.stats();
    assert_eq!((s.released, s.errors), (1, 0), "{s:?}");
    check_sum(&s, 2);
}

/// A `Content-Length` over the limit with no `Transfer-Encoding` still releases at once, by
/// the header, without reading a byte of the body (which panics if read).
#[tokio::test]
async fn a_content_length_over_the_limit_alone_still_releases_unread() {
    struct Huge;
    impl Body for Huge {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            panic!("the layer read a body it knew was over the limit")
        }
    }
    let (svc, calls) =
        inner(|_| response(200, map(&[("content-length", "1000")]), BoxBody::new(Huge)));
    let mut svc = CoalesceHttpLayer::new().max_body_bytes(100).layer(svc);
    let mut futs: Vec<_> = gets(2).into_iter().map(|r| Box::pin(svc.call(r))).collect();
    let leader = ready(&mut futs[0], "leader").unwrap();
    assert_eq!(
        leader.extensions().get::<ServedBy>(),
        Some(&ServedBy::Leader)
    );
    assert_eq!(leader.headers()["content-length"], "1000", "untouched");
    let follower = ready(&mut futs[1], "follower").unwrap();
    assert_eq!(
        follower.extensions().get::<ServedBy>(),
        Some(&ServedBy::Released)
    );
    assert_eq!(calls.load(SeqCst), 2);
}

/// `HEAD`, `GET`, `204` and `304` with `Transfer-Encoding: chunked` and a `Content-Length`
/// over the limit beside it: all shared (a `HEAD`'s header is the `GET`'s length; the
/// bodiless statuses have no content to limit); no copy carries both fields; a `HEAD` keeps
/// its `Content-Length`, unread; a `GET` 200's copies are framed by their own length.
#[tokio::test]
async fn chunked_beside_a_large_content_length_across_methods_and_bodiless_statuses() {
    let cases: [(Method, u16); 5] = [
        (Method::HEAD, 200),
        (Method::HEAD, 304),
        (Method::GET, 200),
        (Method::GET, 204),
        (Method::GET, 304),
    ];
    for (method, status) in cases {
        let head = method == Method::HEAD;
        let (svc, calls) = inner(move |_| {
            let body = match (head, status) {
                (true, _) => BoxBody::new(Unread(7)),
                (false, 200) => streamed(&[b"payload"], None),
                (false, _) => streamed(&[], None),
            };
            response(
                status,
                map(&[
                    ("transfer-encoding", "chunked"),
                    ("content-length", "5000"),
                    ("x-a", "1"),
                ]),
                body,
            )
        });
        let mut svc = CoalesceHttpLayer::new().max_body_bytes(100).layer(svc);
        let reqs = (0..2).map(|_| request(method.clone(), &[])).collect();
        let reads = burst(&mut svc, reqs).await;
        let what = format!("{method} {status}");
        assert_eq!(calls.load(SeqCst), 1, "{what}: shared");
        assert_eq!(
            (reads[0].by, reads[1].by),
            (ServedBy::Leader, ServedBy::Follower),
            "{what}"
        );
        for r in &reads {
            assert_eq!(r.status.as_u16(), status, "{what}");
            assert_eq!(r.headers["x-a"], "1", "{what}");
            assert!(!r.headers.contains_key(header::TRANSFER_ENCODING), "{what}");
            assert!(r.framing_ok(head), "{what} {:?}: {:?}", r.by, r.headers);
            if head {
                assert_eq!(
                    r.values("content-length"),
                    ["5000"],
                    "{what}: the GET's length"
                );
                assert!(r.data.is_empty(), "{what}");
            } else if status == 200 {
                assert_eq!(
                    (r.data.as_ref(), r.exact),
                    (&b"payload"[..], Some(7)),
                    "{what}"
                );
            } else {
                assert!(r.data.is_empty(), "{what}");
            }
        }
        check_sum(&svc.stats(), 2);
    }
}

// =============================================================================================
// Set-Cookie in the trailers: the leader's own response, the followers, the counters
// =============================================================================================

/// The leader of a response released for a `Set-Cookie` trailer gets all of it: every data
/// frame in order, every trailer, its head as sent but for the overridden `Content-Length`
/// (framed by its `Transfer-Encoding`). It counts as a leader, not as an error; the followers
/// are released (`Cache-Status ... collapsed=?0; detail=set-cookie`), each with its own cookie.
#[tokio::test]
async fn a_leader_released_for_a_set_cookie_trailer_gets_its_whole_response() {
    let (svc, calls) = inner(|n| {
        let cookie = format!("s={n}");
        response(
            200,
            map(&[
                ("transfer-encoding", "chunked"),
                ("content-length", "999"),
                ("trailer", "set-cookie, x-t"),
                ("x-a", "1"),
            ]),
            streamed(
                &[b"one ", b"two ", b"three"],
                Some(map(&[("set-cookie", &cookie), ("x-t", "t")])),
            ),
        )
    });
    let mut svc = CoalesceHttpLayer::new()
        .cache_status_header(true)
        .layer(svc);
    let reads = burst(&mut svc, gets(3)).await;
    assert_eq!(
        calls.load(SeqCst),
        3,
        "the leader's call, then one per follower"
    );
    let leader = &reads[0];
    assert_eq!(leader.by, ServedBy::Leader);
    assert_eq!(leader.data.as_ref(), b"one two three");
    assert_eq!(leader.trailer("set-cookie"), Some("s=0"));
    assert_eq!(leader.trailer("x-t"), Some("t"));
    assert_eq!(
        leader.exact, None,
        "trailers: not an exact length, so sent chunked"
    );
    assert_eq!(leader.headers["x-a"], "1");
    assert_eq!(leader.values("transfer-encoding"), ["chunked"]);
    assert!(leader.framing_ok(false), "{:?}", leader.headers);
    assert!(
        leader.values("content-length").is_empty(),
        "overridden: dropped"
    );
    // Rebuilt from the buffer, though shared with nobody (`is_buffered` says "a shared,
    // rebuilt response").
    assert!(leader.buffered);
    assert_eq!(leader.cache_status(), "tower-coalesce; fwd=miss");
    for (i, f) in reads[1..].iter().enumerate() {
        assert_eq!(f.by, ServedBy::Released);
        assert_eq!(
            f.trailer("set-cookie"),
            Some(format!("s={}", i + 1).as_str())
        );
        assert_eq!(f.data.as_ref(), b"one two three");
        assert_eq!(
            f.cache_status(),
            "tower-coalesce; fwd=miss; collapsed=?0; detail=set-cookie"
        );
    }
    let s = svc.stats();
    assert_eq!(
        (s.leaders, s.followers, s.released, s.errors, s.panics),
        (1, 2, 2, 0, 0),
        "{s:?}"
    );
    check_sum(&s, 3);
}

/// A body over the limit whose trailers carry `Set-Cookie`: it is streamed to the leader
/// (the bytes read, then the rest, then the trailers, cookie included), and the followers are
/// released as `too-large` (judged before the trailers are seen), each with its own cookie.
#[tokio::test]
async fn a_set_cookie_trailer_on_a_body_over_the_limit_streams_to_the_leader() {
    let (svc, calls) = inner(|n| {
        response(
            200,
            HeaderMap::new(),
            streamed(
                &[b"0123456789", b"abcdefghij", b"KLMNOPQRST"],
                Some(map(&[("set-cookie", &format!("s={n}"))])),
            ),
        )
    });
    let mut svc = CoalesceHttpLayer::new()
        .max_body_bytes(12)
        .cache_status_header(true)
        .layer(svc);
    let reads = burst(&mut svc, gets(2)).await;
    assert_eq!(calls.load(SeqCst), 2);
    let (leader, follower) = (&reads[0], &reads[1]);
    assert_eq!(leader.by, ServedBy::Leader);
    assert!(!leader.data.is_empty());
    assert_eq!(leader.data.as_ref(), b"0123456789abcdefghijKLMNOPQRST");
    assert_eq!(leader.trailer("set-cookie"), Some("s=0"));
    assert_eq!(follower.by, ServedBy::Released);
    assert_eq!(follower.trailer("set-cookie"), Some("s=1"));
    assert!(
        follower.cache_status().ends_with("detail=too-large"),
        "{}",
        follower.cache_status()
    );
    let s = svc.stats();
    assert_eq!((s.released, s.errors), (1, 0), "{s:?}");
    check_sum(&s, 2);
}

/// The leader goes away before its call answers; a follower takes the call over. The answer
/// carries a `Set-Cookie` trailer, meant for the leader alone: the follower that drove the
/// call does not get it (DESIGN, README guarantee 4) but makes its own call and gets its own
/// cookie; the key is free afterwards.
#[tokio::test]
async fn a_set_cookie_trailer_meant_for_a_leader_that_left_is_not_the_adopters() {
    let (svc, calls, open) = gated_inner(|n| {
        response(
            200,
            HeaderMap::new(),
            streamed(&[b"data"], Some(map(&[("set-cookie", &format!("s={n}"))]))),
        )
    });
    let mut svc = CoalesceHttpLayer::new().layer(svc);
    let mut leader = Box::pin(svc.call(get()));
    let mut follower = Box::pin(svc.call(get()));
    pending(&mut leader, "leader");
    pending(&mut follower, "follower");
    assert_eq!(calls.load(SeqCst), 1);
    drop(leader);
    pending(&mut follower, "follower drives the leader's call");
    assert_eq!(calls.load(SeqCst), 1, "taken over, not called again");
    open.send_replace(true);
    let res = read(ready(&mut follower, "follower").unwrap()).await;
    assert_eq!(calls.load(SeqCst), 2, "its own call");
    assert_eq!(res.by, ServedBy::Released);
    assert_eq!(res.trailer("set-cookie"), Some("s=1"), "its own cookie");
    assert_eq!(svc.in_flight(), 0);
    let s = svc.stats();
    assert_eq!(
        (s.leaders, s.followers, s.released, s.errors, s.cancelled),
        (1, 1, 1, 0, 0),
        "{s:?}"
    );
    check_sum(&s, 2);
}

/// `detached(true)`: the flight runs on a task of its own; its leader still gets its own
/// response (cookie and all) when a `Set-Cookie` trailer keeps it from the follower.
#[tokio::test]
async fn a_detached_flights_leader_gets_its_set_cookie_trailer_response() {
    let (svc, calls) = inner(|n| {
        response(
            200,
            HeaderMap::new(),
            streamed(&[b"d"], Some(map(&[("set-cookie", &format!("s={n}"))]))),
        )
    });
    let mut svc = CoalesceHttpLayer::new().detached(true).layer(svc);
    let reads = burst(&mut svc, gets(2)).await;
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(
        (reads[0].by, reads[0].trailer("set-cookie")),
        (ServedBy::Leader, Some("s=0"))
    );
    assert_eq!(
        (reads[1].by, reads[1].trailer("set-cookie")),
        (ServedBy::Released, Some("s=1"))
    );
    let s = svc.stats();
    assert_eq!((s.released, s.errors), (1, 0), "{s:?}");
}

/// A `HEAD` whose body's length is unknown is read as any other: a `Set-Cookie` in its
/// trailers releases the followers too. (One of known length is not read: its trailers are
/// never sent, nor seen.)
#[tokio::test]
async fn a_head_of_unknown_length_with_a_set_cookie_trailer_is_released() {
    let (svc, calls) = inner(|n| {
        response(
            200,
            map(&[("content-length", "4")]),
            streamed(&[b"body"], Some(map(&[("set-cookie", &format!("s={n}"))]))),
        )
    });
    let mut svc = CoalesceHttpLayer::new().layer(svc);
    let reads = burst(
        &mut svc,
        (0..2).map(|_| request(Method::HEAD, &[])).collect(),
    )
    .await;
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(
        (reads[0].by, reads[1].by),
        (ServedBy::Leader, ServedBy::Released)
    );
    assert_eq!(reads[0].trailer("set-cookie"), Some("s=0"));
    assert_eq!(reads[0].values("content-length"), ["4"]);
}

/// A cookie elsewhere in the trailers' names (`Set-Cookie2`, `X-Set-Cookie`) is not
/// `Set-Cookie`: shared, trailers and all.
#[tokio::test]
async fn trailers_that_only_look_like_set_cookie_are_shared() {
    let (svc, calls) = inner(|_| {
        response(
            200,
            HeaderMap::new(),
            streamed(
                &[b"d"],
                Some(map(&[("x-set-cookie", "a"), ("set-cookie2", "b")])),
            ),
        )
    });
    let mut svc = CoalesceHttpLayer::new().layer(svc);
    let reads = burst(&mut svc, gets(2)).await;
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(reads[1].by, ServedBy::Follower);
    assert_eq!(reads[1].trailer("x-set-cookie"), Some("a"));
    assert_eq!(reads[1].trailer("set-cookie2"), Some("b"));
}

// =============================================================================================
// 426 Upgrade Required and the hop-by-hop fields
// =============================================================================================

/// RFC 9110 §15.5.22: a `426` MUST carry `Upgrade`; §7.8: "A sender of Upgrade MUST also
/// send an 'upgrade' connection option in the Connection header field". 25a873c keeps
/// `Upgrade` in the followers' copies of a `426`, but still drops the whole `Connection`
/// field, and so its `upgrade` option: the follower's `426` names a protocol to switch to
/// without the connection option that must go with it (the leader's has both).
#[tokio::test]

async fn a_followers_426_keeps_the_connection_upgrade_option_with_its_upgrade() {
    let (svc, calls) = inner(|_| {
        response(
            426,
            // A 426 is not heuristically cacheable (RFC 9111 §3): explicitly fresh, so that it
            // is still shared and the follower's copy can be checked.
            map(&[
                ("cache-control", "max-age=60"),
                ("connection", "Upgrade"),
                ("upgrade", "TLS/1.2, HTTP/1.1"),
            ]),
            streamed(&[b"upgrade required"], None),
        )
    });
    let mut svc = CoalesceHttpLayer::new().layer(svc);
    let reads = burst(&mut svc, gets(2)).await;
    assert_eq!(calls.load(SeqCst), 1);
    let (leader, follower) = (&reads[0], &reads[1]);
    assert_eq!(follower.by, ServedBy::Follower);
    assert_eq!(leader.values("upgrade"), ["TLS/1.2, HTTP/1.1"]);
    assert_eq!(leader.values("connection"), ["Upgrade"]);
    assert_eq!(
        follower.values("upgrade"),
        ["TLS/1.2, HTTP/1.1"],
        "kept on a 426"
    );
    let options: Vec<String> = follower
        .values("connection")
        .iter()
        .flat_map(|v| v.split(',').map(|o| o.trim().to_ascii_lowercase()))
        .collect();
    assert!(
        options.iter().any(|o| o == "upgrade"),
        "a follower's 426 has `Upgrade` but no `Connection: upgrade`: {:?}",
        follower.headers
    );
}

/// What 25a873c keeps and drops on a `426` otherwise: `Upgrade` stays (named by `Connection`
/// or not); the other fields `Connection` names, `Keep-Alive` and `TE` leave the followers'
/// copies, headers and trailers; the leader's copy keeps everything.
#[tokio::test]
async fn a_followers_426_drops_the_other_hop_by_hop_fields() {
    let (svc, _) = inner(|_| {
        response(
            426,
            // Explicitly fresh, so that the 426 is still shared (RFC 9111 §3).
            map(&[
                ("cache-control", "max-age=60"),
                ("connection", "close, x-hop, upgrade"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("upgrade", "h2c"),
                ("x-kept", "2"),
            ]),
            streamed(&[b"426"], Some(map(&[("x-hop", "3"), ("x-t", "4")]))),
        )
    });
    let mut svc = CoalesceHttpLayer::new().layer(svc);
    let reads = burst(&mut svc, gets(2)).await;
    let (leader, follower) = (&reads[0], &reads[1]);
    assert_eq!(follower.by, ServedBy::Follower);
    for name in ["connection", "x-hop", "keep-alive", "upgrade", "x-kept"] {
        assert!(leader.headers.contains_key(name), "leader: {name}");
    }
    for name in ["x-hop", "keep-alive"] {
        assert!(!follower.headers.contains_key(name), "follower: {name}");
    }
    assert_eq!(follower.values("upgrade"), ["h2c"]);
    assert_eq!(follower.headers["x-kept"], "2");
    assert_eq!(follower.trailer("x-hop"), None);
    assert_eq!(follower.trailer("x-t"), Some("4"));
    assert_eq!(leader.trailer("x-hop"), Some("3"));
    assert!(
        !follower
            .values("connection")
            .iter()
            .any(|v| v.to_ascii_lowercase().contains("close")),
        "the leader's `close` is not the follower's: {:?}",
        follower.headers
    );
}

/// `Upgrade` is kept only on a `426`: a `200` (or a `400`) advertising an upgrade drops it
/// from the followers' copies, with the `Connection` that names it.
#[tokio::test]
async fn upgrade_on_any_other_status_leaves_the_followers_copies() {
    for status in [200, 400, 425, 427] {
        let (svc, _) = inner(move |_| {
            // 400, 425 and 427 are not heuristically cacheable (RFC 9111 §3): explicitly
            // fresh, so that they are still shared and the followers' copies can be checked.
            let mut headers = vec![("connection", "upgrade"), ("upgrade", "h2c")];
            if status != 200 {
                headers.push(("cache-control", "max-age=60"));
            }
            response(status, map(&headers), streamed(&[b"x"], None))
        });
        let mut svc = CoalesceHttpLayer::new().layer(svc);
        let reads = burst(&mut svc, gets(2)).await;
        assert_eq!(reads[1].by, ServedBy::Follower, "{status}");
        assert!(!reads[1].headers.contains_key("upgrade"), "{status}");
        assert!(!reads[1].headers.contains_key("connection"), "{status}");
        assert_eq!(
            reads[0].values("upgrade"),
            ["h2c"],
            "{status}: the leader's"
        );
    }
}
