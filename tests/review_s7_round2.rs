//! Second review of session 7's fixes (e4de30b, f01dcab, 24a1fb2, 16b183c, 39ea913): white-box
//! reading, black-box tests through the public API.
//!
//! - `Run::rejoin` (an adopted call that fails is retried by the adopter's own `make`, or by
//!   another follower's) against `forget`, `max_in_flight`, `linger_errors`, a second
//!   orphaning of the adopter's retry, and the `Stats` sum rules;
//! - HTTP copies: `Transfer-Encoding` (odd spellings, several field lines, beside a
//!   `Content-Length`), `Set-Cookie` in the trailers, `to_follower_response` against the
//!   leader's copy;
//! - HTTP `HEAD` of known length (24a1fb2, f01dcab): not read, `Content-Length` set, bodiless
//!   statuses, a conflicting `Content-Length`, `Vary`, the body limit, `HEAD` beside `GET`;
//! - gRPC: a `set-cookie` in a successful response's trailers.
//!
//! (The flight's span is reviewed in `review_s7_round2_tracing.rs`: `tracing`'s callsite
//! interest is process-wide.)
//!
//! Deterministic: `Group` tests poll by hand with a no-op waker and open oneshot gates; the
//! layer tests register every waiter (`call`) before anything is polled, so who leads and who
//! follows is fixed; the one clock is tokio's paused one. No sleeps.
//!
//! Found, and fixed since (each test failed before):
//! - the copies drop `Transfer-Encoding` but keep a `Content-Length` beside it, which RFC 9112
//!   §6.3 says the `Transfer-Encoding` overrode and must be removed: it then frames a
//!   buffered body of another length;
//! - the HTTP adapter shares a response whose trailers carry `Set-Cookie` (the gRPC one no
//!   longer does, 9351760);
//! - `Stats`' "`errors + panics + cancelled` is at most `leaders`" failed when a failed call's
//!   retry is abandoned before it starts (counted as an error, then as cancelled): the doc
//!   now bounds calls and flights apart.

mod support;

use std::time::Duration;

use support::{assert_clean, check_sum, out, pending, ready, Calls as Made, Res, Waiter};
use tokio::sync::oneshot;
use tower_coalesce::{Group, GroupBuilder, Stats};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Every rule `Stats` documents: each call ends once, each flight once.
fn check(s: &Stats, requests: u64) {
    check_sum(s, requests);
    assert!(
        s.errors + s.panics <= s.leaders,
        "Stats: `errors + panics` is at most `leaders`: {s:?}"
    );
    assert!(
        s.cancelled <= s.leaders - s.retried,
        "Stats: `cancelled` is at most `leaders - retried`: {s:?}"
    );
}

/// A leader `l` (gated) and a follower `a` that keeps its `make` (gated), both parked; `l`
/// then leaves and `a` adopts its call. Returns the gates of `l`'s call and of `a`'s own.
fn adopted(
    group: &Group<u32>,
    made: &Made,
    key: u32,
) -> (oneshot::Sender<Res>, oneshot::Sender<Res>, Waiter) {
    let (l_tx, l_make) = made.gated();
    let mut l = group.run_retryable(key, l_make);
    assert!(l.is_leader());
    pending(&mut l, "l");
    let (a_tx, a_make) = made.gated();
    let mut a = group.run_retryable(key, a_make);
    assert!(!a.is_leader());
    pending(&mut a, "a");
    drop(l);
    pending(&mut a, "a adopts");
    (l_tx, a_tx, a)
}

// =============================================================================================
// 39ea913 / e4de30b: an adopted call's failure
// =============================================================================================

/// The adopter's own retry is orphaned in turn: it leaves while the retry runs, a second
/// follower that kept its `make` adopts the retry, the retry fails, and (with a retry left)
/// that second adopter runs its own call as the next attempt, which everybody left gets.
/// Three calls, three `make`s; the counters add up.
#[test]
fn an_adopted_retry_orphaned_again_is_retried_by_the_next_adopters_make() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(2).build();
    let made = Made::default();
    let (l_tx, a_tx, mut a) = adopted(&group, &made, 1);
    let (f_tx, f_make) = made.gated();
    let mut f = group.run_retryable(1, f_make);
    pending(&mut f, "f");
    let mut g = group.run_result(1, made.now(Ok(0)));
    pending(&mut g, "g");

    l_tx.send(Err("l's call")).unwrap();
    pending(&mut a, "a runs its own make as the retry");
    assert_eq!(made.made(), 2, "l's call and a's retry");
    drop(a);
    pending(&mut f, "f adopts a's retry");
    a_tx.send(Err("a's retry")).unwrap();
    pending(&mut f, "f runs its own make");
    assert_eq!(made.made(), 3);
    pending(&mut g, "g waits for f's retry");
    f_tx.send(Ok(7)).unwrap();
    assert_eq!(out(ready(&mut f, "f")), Ok(7));
    assert_eq!(out(ready(&mut g, "g")), Ok(7), "g gets the last attempt");
    let s = group.stats();
    assert_eq!(
        (s.leaders, s.retried, s.errors, s.followers, s.cancelled),
        (3, 2, 2, 3, 0),
        "{s:?}"
    );
    check(&s, 4);
    assert_clean(&group);
}

/// `forget` while the adopter's retry runs: a newer caller starts a flight of its own (it does
/// not join the retry), both finish with their own outputs, and no place or entry is left.
#[test]
fn forget_during_an_adopted_retry_frees_the_key_for_a_new_flight() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).max_in_flight(8).build();
    let made = Made::default();
    let (l_tx, a_tx, mut a) = adopted(&group, &made, 1);
    l_tx.send(Err("l's call")).unwrap();
    pending(&mut a, "a retries with its own make");
    assert_eq!(group.in_flight(), 1);
    assert!(group.forget(&1));
    assert_eq!(group.in_flight(), 0, "a forgotten flight holds no place");
    let mut n = group.run_retryable(1, made.now(Ok(9)));
    assert!(
        n.is_leader(),
        "a newer caller does not join the forgotten retry"
    );
    assert_eq!(out(ready(&mut n, "n")), Ok(9));
    a_tx.send(Ok(5)).unwrap();
    assert_eq!(out(ready(&mut a, "a")), Ok(5));
    let s = group.stats();
    assert_eq!(
        (s.leaders, s.retried, s.errors, s.forgotten),
        (3, 1, 1, 1),
        "{s:?}"
    );
    check(&s, 3);
    assert_clean(&group);
}

/// `max_in_flight(1)`: the adopted call and its retry hold the one place throughout (another
/// key runs alone meanwhile), and give it back once the retry is done.
#[test]
fn an_adopted_retry_keeps_its_place_under_max_in_flight_and_frees_it() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).max_in_flight(1).build();
    let made = Made::default();
    let (l_tx, a_tx, mut a) = adopted(&group, &made, 1);
    l_tx.send(Err("l's call")).unwrap();
    pending(&mut a, "a retries");
    let mut other = group.run_result(2, made.now(Ok(2)));
    assert!(other.is_alone(), "the retry still holds the only place");
    assert_eq!(out(ready(&mut other, "other")), Ok(2));
    a_tx.send(Ok(1)).unwrap();
    assert_eq!(out(ready(&mut a, "a")), Ok(1));
    assert_clean(&group);
    let mut next = group.run_result(3, made.now(Ok(3)));
    assert!(!next.is_alone(), "the place was given back");
    assert_eq!(out(ready(&mut next, "next")), Ok(3));
    let s = group.stats();
    assert_eq!((s.over_capacity, s.retried, s.errors), (1, 1, 1), "{s:?}");
    check(&s, 4);
}

/// `linger_errors`: an adopted call's failure is retried, not lingered; the retry's failure,
/// with no retry left, is everybody's and is what lingers for a later caller.
#[tokio::test(start_paused = true)]
async fn an_adopted_failure_lingers_only_once_the_retries_are_spent() {
    let group: Group<u32> = GroupBuilder::new()
        .retry_failed(1)
        .linger_errors(Duration::from_secs(10))
        .build();
    let made = Made::default();
    let (l_tx, a_tx, mut a) = adopted(&group, &made, 1);
    let mut g = group.run_result(1, made.now(Ok(0)));
    pending(&mut g, "g");
    l_tx.send(Err("l's call")).unwrap();
    pending(&mut a, "a retries");
    a_tx.send(Err("a's retry")).unwrap();
    assert_eq!(out(ready(&mut a, "a")), Err("a's retry"));
    assert_eq!(out(ready(&mut g, "g")), Err("a's retry"));
    let mut later = group.run_result(1, made.now(Ok(1)));
    assert_eq!(
        out(ready(&mut later, "later")),
        Err("a's retry"),
        "the retry's failure lingers, not the adopted one"
    );
    assert_eq!(made.made(), 2);
    let s = group.stats();
    assert_eq!(
        (s.leaders, s.retried, s.errors, s.lingered),
        (2, 1, 2, 1),
        "{s:?}"
    );
    check(&s, 4);
    tokio::time::advance(Duration::from_secs(11)).await;
    group.purge_expired();
    assert_clean(&group);
}

/// A follower that adopted a call without a `make` of its own re-parks when it fails; the
/// follower elected to retry then leaves before it starts: the adopter gets the failure (the
/// documented "waits for the others'", with nobody left to retry), once, and the key is free.
#[test]
fn an_adopter_reparked_gets_the_failure_when_the_elected_maker_leaves() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let made = Made::default();
    let (l_tx, l_make) = made.gated::<Res>();
    let mut l = group.run_retryable(1, l_make);
    pending(&mut l, "l");
    let mut a = group.run_result(1, made.now(Ok(0)));
    pending(&mut a, "a");
    let (_m_tx, m_make) = made.gated::<Res>();
    let mut m = group.run_retryable(1, m_make);
    pending(&mut m, "m");
    drop(l);
    pending(&mut a, "a adopts");
    l_tx.send(Err("l's call")).unwrap();
    pending(&mut a, "a has no make: it re-parks");
    drop(m);
    assert_eq!(out(ready(&mut a, "a")), Err("l's call"));
    assert_eq!(made.made(), 1, "nobody retried");
    let s = group.stats();
    assert_eq!((s.leaders, s.errors, s.cancelled), (1, 1, 0), "{s:?}");
    check(&s, 3);
    assert_clean(&group);
}

/// A failed call handed to a follower to retry is counted as an error when it is handed on;
/// if that follower (the last waiter) leaves before it starts the retry, the flight is counted
/// as cancelled too: the call ended once (an error), the flight once (cancelled), as `Stats`
/// says (it once claimed `errors + panics + cancelled <= leaders`, which this broke).
#[test]
fn a_retry_abandoned_before_it_starts_ends_the_call_once_in_the_counters() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let made = Made::default();
    let (l_tx, l_make) = made.gated();
    let mut l = group.run_retryable(1, l_make);
    pending(&mut l, "l");
    let (_m_tx, m_make) = made.gated::<Res>();
    let mut m = group.run_retryable(1, m_make);
    pending(&mut m, "m");
    l_tx.send(Err("l's call")).unwrap();
    assert_eq!(out(ready(&mut l, "l")), Err("l's call"));
    // `m` was woken to run the retry; it leaves first.
    drop(m);
    assert_eq!(made.made(), 1, "no retry was made");
    assert_clean(&group);
    let s = group.stats();
    assert_eq!((s.leaders, s.errors, s.cancelled), (1, 1, 1), "{s:?}");
    check(&s, 2);
}

// =============================================================================================
// HTTP
// =============================================================================================

#[cfg(feature = "http")]
mod http_layer {
    use super::*;
    use http::header::{self, HeaderMap, HeaderName, HeaderValue};
    use http::{Method, Response, StatusCode, Version};
    use http_body_util::combinators::BoxBody;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use support::adapter::{
        burst, counted, map_bytes as map, request, response, streamed, Inner, Req, Tag, Unread, B,
    };
    use tower::Layer;
    use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

    /// An inner service answering every request with `respond`, and its call count.
    fn inner(
        respond: impl Fn(&Req) -> Response<B> + Send + Sync + 'static,
    ) -> (Inner, Arc<AtomicUsize>) {
        counted(move |req, _| respond(req))
    }

    fn content_length(headers: &HeaderMap) -> Vec<&str> {
        headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    // --- Transfer-Encoding ---------------------------------------------------------------

    /// RFC 9112 §6.3: with both, `Transfer-Encoding` overrides `Content-Length`, and "a sender
    /// MUST remove the received Content-Length field prior to forwarding such a message". The
    /// copies drop `Transfer-Encoding` (16b183c) and keep the handler's `Content-Length`,
    /// which now frames a buffered body of another length: hyper writes that header but sends
    /// the body's own length (its debug build panics, "payload claims content-length of 5,
    /// custom content-length header claims 100"), so an HTTP/1.1 client waits for bytes that
    /// never come, or reads the next response as this one's body. Without the layer hyper
    /// refuses the pair ("unexpected content-length found, canceling").
    #[tokio::test]
    async fn a_content_length_beside_chunked_does_not_frame_the_copies() {
        let (svc, calls) = inner(|_| {
            response(
                200,
                map(&[
                    ("transfer-encoding", b"chunked"),
                    ("content-length", b"100"),
                ]),
                streamed(&[b"hello"], None),
            )
        });
        let mut svc = CoalesceHttpLayer::new().layer(svc);
        let reads = burst(
            &mut svc,
            vec![request(Method::GET, &[]), request(Method::GET, &[])],
        )
        .await;
        assert_eq!(calls.load(SeqCst), 1);
        for r in &reads {
            assert_eq!(r.data.as_ref(), b"hello");
            assert!(!r.headers.contains_key(header::TRANSFER_ENCODING));
            let cl = content_length(&r.headers);
            assert!(
                cl.is_empty() || cl == ["5"],
                "{:?}: Content-Length {cl:?} frames a body of 5 bytes",
                r.by
            );
        }
    }

    /// `chunked` however spelt (case, spaces, empty list elements, repeated, several field
    /// lines) is framing only: shared, dropped from every copy, exact size.
    #[tokio::test]
    async fn chunked_in_any_spelling_is_shared_and_dropped() {
        let spellings: [&[&[u8]]; 5] = [
            &[b"Chunked"],
            &[b"  chunked  "],
            &[b", chunked,,"],
            &[b"chunked, chunked"],
            &[b"chunked", b"CHUNKED"],
        ];
        for te in spellings {
            let mut headers = map(&[("x-a", b"1")]);
            for v in te {
                headers.append(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_bytes(v).unwrap(),
                );
            }
            let (svc, calls) =
                inner(move |_| response(200, headers.clone(), streamed(&[b"abc"], None)));
            let mut svc = CoalesceHttpLayer::new().layer(svc);
            let reads = burst(
                &mut svc,
                vec![request(Method::GET, &[]), request(Method::GET, &[])],
            )
            .await;
            assert_eq!(calls.load(SeqCst), 1, "{te:?}: shared");
            for r in &reads {
                assert!(!r.headers.contains_key(header::TRANSFER_ENCODING), "{te:?}");
                assert_eq!((r.exact, r.data.as_ref()), (Some(3), &b"abc"[..]), "{te:?}");
                assert_eq!(r.headers["x-a"], "1");
            }
            assert_eq!(
                (reads[0].by, reads[1].by),
                (ServedBy::Leader, ServedBy::Follower)
            );
        }
    }

    /// Any other coding, in its own field line or beside `chunked`, is not shared: the leader
    /// gets the response untouched (its `Transfer-Encoding` too) and the follower is released
    /// (`detail=stream`).
    #[tokio::test]
    async fn another_coding_in_any_field_line_is_not_shared() {
        let cases: [&[&[u8]]; 4] = [
            &[b"chunked", b"gzip"],
            &[b"GZIP,chunked"],
            &[b"identity"],
            &[b"x-custom ,  chunked"],
        ];
        for te in cases {
            let mut headers = HeaderMap::new();
            for v in te {
                headers.append(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_bytes(v).unwrap(),
                );
            }
            let expected = headers.clone();
            let (svc, calls) =
                inner(move |_| response(200, headers.clone(), streamed(&[b"abc"], None)));
            let mut svc = CoalesceHttpLayer::new()
                .cache_status_header(true)
                .layer(svc);
            let reads = burst(
                &mut svc,
                vec![request(Method::GET, &[]), request(Method::GET, &[])],
            )
            .await;
            assert_eq!(calls.load(SeqCst), 2, "{te:?}: not shared");
            assert_eq!(
                (reads[0].by, reads[1].by),
                (ServedBy::Leader, ServedBy::Released)
            );
            for r in &reads {
                let te_seen: Vec<_> = r
                    .headers
                    .get_all(header::TRANSFER_ENCODING)
                    .iter()
                    .collect();
                let te_sent: Vec<_> = expected.get_all(header::TRANSFER_ENCODING).iter().collect();
                assert_eq!(te_seen, te_sent, "{te:?} {:?}: untouched", r.by);
            }
            let status = reads[1].headers[HeaderName::from_static("cache-status")]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(status.contains("detail=stream"), "{te:?}: {status}");
            let s = svc.stats();
            assert_eq!((s.followers, s.released, s.errors), (1, 1, 0), "{s:?}");
        }
    }

    // --- Set-Cookie in trailers ------------------------------------------------------------

    /// 9351760 keeps a gRPC response with a `set-cookie` trailer from followers ("state for
    /// one client, as in the head"). The HTTP adapter judged only the head: a `Set-Cookie` in
    /// the trailers reached every follower (DESIGN: "A response with Set-Cookie ... is never
    /// handed to a follower"). Now the follower makes its own call and gets its own cookie.
    #[tokio::test]
    async fn a_set_cookie_trailer_is_not_handed_to_followers() {
        let sessions = Arc::new(AtomicUsize::new(0));
        let (svc, calls) = inner(move |_| {
            let cookie = match sessions.fetch_add(1, SeqCst) {
                0 => &b"session=leader"[..],
                _ => &b"session=other"[..],
            };
            response(
                200,
                map(&[("trailer", b"set-cookie")]),
                streamed(&[b"data"], Some(map(&[("set-cookie", cookie)]))),
            )
        });
        let mut svc = CoalesceHttpLayer::new().layer(svc);
        let reads = burst(
            &mut svc,
            vec![request(Method::GET, &[]), request(Method::GET, &[])],
        )
        .await;
        assert_eq!(reads[0].by, ServedBy::Leader);
        let leaked = reads[1]
            .trailers
            .as_ref()
            .and_then(|t| t.get(header::SET_COOKIE))
            .is_some_and(|c| c == "session=leader");
        assert!(
            !leaked,
            "the leader's session cookie reached a follower ({:?}, {} calls)",
            reads[1].by,
            calls.load(SeqCst)
        );
        assert_eq!(reads[1].by, ServedBy::Released);
    }

    // --- to_follower_response vs to_response -----------------------------------------------

    /// A follower's copy, with hop-by-hop fields to drop (its own rebuild) or without (the
    /// leader's), has the leader's status, version, extensions, body and trailers.
    #[tokio::test]
    async fn followers_copies_match_the_leaders_in_all_but_hop_by_hop_fields() {
        for hop in [false, true] {
            let (svc, _) = inner(move |_| {
                let mut headers = map(&[("x-a", b"1"), ("trailer", b"x-t")]);
                if hop {
                    headers.append("connection", HeaderValue::from_static("x-h"));
                    headers.append("x-h", HeaderValue::from_static("2"));
                }
                let mut res = response(
                    203,
                    headers,
                    streamed(&[b"body"], Some(map(&[("x-t", b"3"), ("x-h", b"4")]))),
                );
                *res.version_mut() = Version::HTTP_2;
                res.extensions_mut().insert(Tag(7));
                res
            });
            let mut svc = CoalesceHttpLayer::new().layer(svc);
            let reads = burst(
                &mut svc,
                vec![
                    request(Method::GET, &[]),
                    request(Method::GET, &[]),
                    request(Method::GET, &[]),
                ],
            )
            .await;
            let leader = &reads[0];
            assert_eq!(leader.by, ServedBy::Leader);
            for f in &reads[1..] {
                assert_eq!(f.by, ServedBy::Follower);
                assert_eq!(f.status, StatusCode::NON_AUTHORITATIVE_INFORMATION, "{hop}");
                assert_eq!(f.version, Version::HTTP_2, "{hop}");
                assert_eq!(f.tag, Some(Tag(7)), "{hop}");
                assert_eq!(f.data, leader.data);
                assert_eq!((f.exact, leader.exact), (None, None), "trailers: inexact");
                assert_eq!(f.headers["x-a"], "1");
                let ft = f.trailers.as_ref().unwrap();
                assert_eq!(ft["x-t"], "3");
                assert_eq!(ft.contains_key("x-h"), !hop, "{hop}");
                assert!(!f.headers.contains_key("x-h"), "{hop}");
            }
            assert_eq!(leader.tag, Some(Tag(7)));
            assert_eq!(leader.version, Version::HTTP_2);
            assert_eq!(leader.trailers.as_ref().unwrap()["x-h"], "4");
        }
    }

    // --- HEAD ------------------------------------------------------------------------------

    /// A `HEAD` response of known length: never read (the body panics if it is), shared past
    /// `max_body_bytes`, its length in every copy's `Content-Length`, no body; followers are
    /// `collapsed` in `Cache-Status`; the counters say one leader and its followers.
    #[tokio::test]
    async fn head_of_known_length_over_the_limit_is_shared_unread_with_its_length() {
        let (svc, calls) =
            inner(|_| response(200, map(&[("x-a", b"1")]), BoxBody::new(Unread(10))));
        let mut svc = CoalesceHttpLayer::new()
            .max_body_bytes(4)
            .cache_status_header(true)
            .layer(svc);
        let reads = burst(
            &mut svc,
            vec![
                request(Method::HEAD, &[]),
                request(Method::HEAD, &[]),
                request(Method::HEAD, &[]),
            ],
        )
        .await;
        assert_eq!(calls.load(SeqCst), 1);
        for (i, r) in reads.iter().enumerate() {
            assert_eq!(
                r.by,
                if i == 0 {
                    ServedBy::Leader
                } else {
                    ServedBy::Follower
                }
            );
            assert_eq!(content_length(&r.headers), ["10"], "{:?}", r.by);
            assert_eq!((r.exact, r.data.len()), (Some(0), 0), "{:?}", r.by);
            assert_eq!(r.headers["x-a"], "1");
        }
        let status = reads[1].headers[HeaderName::from_static("cache-status")]
            .to_str()
            .unwrap();
        assert!(status.contains("collapsed"), "{status}");
        let s = svc.stats();
        assert_eq!((s.leaders, s.followers, s.released), (1, 2, 0), "{s:?}");
        check(&s, 3);
        assert_eq!(svc.in_flight(), 0);
    }

    /// `HEAD` answered 204 or 304 with a body of known length (a handler's mistake): no
    /// `Content-Length` is made up for a status that has no content; shared, unread.
    #[tokio::test]
    async fn head_with_a_bodiless_status_gets_no_content_length() {
        for status in [204, 304] {
            let (svc, calls) =
                inner(move |_| response(status, HeaderMap::new(), BoxBody::new(Unread(5))));
            let mut svc = CoalesceHttpLayer::new().layer(svc);
            let reads = burst(
                &mut svc,
                vec![request(Method::HEAD, &[]), request(Method::HEAD, &[])],
            )
            .await;
            assert_eq!(calls.load(SeqCst), 1, "{status}");
            for r in &reads {
                assert_eq!(r.status.as_u16(), status);
                assert!(content_length(&r.headers).is_empty(), "{status} {:?}", r.by);
                assert_eq!(r.data.len(), 0);
            }
        }
    }

    /// f01dcab: a `HEAD` body of known length 0 says nothing of the resource (a `HEAD`
    /// handler of unknown length): no `Content-Length: 0` is made up, for leader or follower.
    #[tokio::test]
    async fn head_of_known_empty_body_gets_no_content_length() {
        let (svc, calls) = inner(|_| response(200, HeaderMap::new(), BoxBody::new(Unread(0))));
        let mut svc = CoalesceHttpLayer::new().layer(svc);
        let reads = burst(
            &mut svc,
            vec![request(Method::HEAD, &[]), request(Method::HEAD, &[])],
        )
        .await;
        assert_eq!(calls.load(SeqCst), 1);
        assert_eq!(
            (reads[0].by, reads[1].by),
            (ServedBy::Leader, ServedBy::Follower)
        );
        for r in &reads {
            assert!(content_length(&r.headers).is_empty(), "{:?}", r.by);
        }
    }

    /// The handler's own `Content-Length` on a `HEAD` (the `GET`'s length) wins over the
    /// body's: kept as sent, once, in every copy; a handler's `Transfer-Encoding: chunked`
    /// on a `HEAD` is dropped, and with no `Content-Length` the body's length is given.
    #[tokio::test]
    async fn head_keeps_the_handlers_content_length_and_drops_its_chunked() {
        type Fields = &'static [(&'static str, &'static [u8])];
        let cases: [(Fields, &str); 3] = [
            (&[("content-length", b"3")], "3"),
            (&[("transfer-encoding", b"chunked")], "10"),
            (
                &[("transfer-encoding", b"chunked"), ("content-length", b"77")],
                "77",
            ),
        ];
        for (headers, expected) in cases {
            let headers = map(headers);
            let (svc, calls) =
                inner(move |_| response(200, headers.clone(), BoxBody::new(Unread(10))));
            let mut svc = CoalesceHttpLayer::new().layer(svc);
            let reads = burst(
                &mut svc,
                vec![request(Method::HEAD, &[]), request(Method::HEAD, &[])],
            )
            .await;
            assert_eq!(calls.load(SeqCst), 1);
            for r in &reads {
                assert_eq!(content_length(&r.headers), [expected], "{:?}", r.by);
                assert!(!r.headers.contains_key(header::TRANSFER_ENCODING));
                assert_eq!(r.data.len(), 0);
            }
        }
    }

    /// `HEAD` and `GET` of one URI are keyed apart: two calls at once, the `GET` waiters get
    /// the body, the `HEAD` waiters its length and no body; a `HEAD` follower whose request
    /// differs on a `Vary` header is released to a call of its own, unread too.
    #[tokio::test]
    async fn head_and_get_are_separate_flights_and_head_vary_mismatch_is_released() {
        let (svc, calls) = inner(|req: &Req| {
            let body = match *req.method() {
                Method::HEAD => BoxBody::new(Unread(4)),
                _ => streamed(&[b"full"], None),
            };
            response(200, map(&[("vary", b"x-variant")]), body)
        });
        let mut svc = CoalesceHttpLayer::new().layer(svc);
        let en = [("x-variant", "en")];
        let de = [("x-variant", "de")];
        let reads = burst(
            &mut svc,
            vec![
                request(Method::HEAD, &en),
                request(Method::GET, &en),
                request(Method::HEAD, &en),
                request(Method::GET, &en),
                request(Method::HEAD, &de),
            ],
        )
        .await;
        // The `de` HEAD joined the `en` HEAD's flight (`x-variant` is not keyed), and was
        // released for the Vary mismatch: one more call.
        assert_eq!(calls.load(SeqCst), 3);
        let by: Vec<_> = reads.iter().map(|r| r.by).collect();
        assert_eq!(
            by,
            [
                ServedBy::Leader,
                ServedBy::Leader,
                ServedBy::Follower,
                ServedBy::Follower,
                ServedBy::Released
            ]
        );
        for (i, r) in reads.iter().enumerate() {
            if i % 2 == 1 {
                assert_eq!(r.data.as_ref(), b"full");
                assert_eq!(r.exact, Some(4));
            } else {
                assert_eq!(r.data.len(), 0, "{i}");
            }
        }
        for i in [0, 2] {
            assert_eq!(content_length(&reads[i].headers), ["4"]);
        }
        let s = svc.stats();
        assert_eq!((s.leaders, s.followers, s.released), (2, 3, 1), "{s:?}");
        check(&s, 5);
    }

    /// A `HEAD` response whose body's length is unknown is read as any other: over the limit
    /// the followers are released (`detail=too-large`), the leader gets its whole body.
    #[tokio::test]
    async fn head_of_unknown_length_over_the_limit_is_released() {
        let (svc, calls) =
            inner(|_| response(200, HeaderMap::new(), streamed(&[b"0123456789"], None)));
        let mut svc = CoalesceHttpLayer::new()
            .max_body_bytes(4)
            .cache_status_header(true)
            .layer(svc);
        let reads = burst(
            &mut svc,
            vec![request(Method::HEAD, &[]), request(Method::HEAD, &[])],
        )
        .await;
        assert_eq!(calls.load(SeqCst), 2);
        assert_eq!(
            (reads[0].by, reads[1].by),
            (ServedBy::Leader, ServedBy::Released)
        );
        assert_eq!(reads[0].data.as_ref(), b"0123456789", "nothing lost");
        let status = reads[1].headers[HeaderName::from_static("cache-status")]
            .to_str()
            .unwrap();
        assert!(status.contains("detail=too-large"), "{status}");
    }
}

// =============================================================================================
// gRPC: a set-cookie in the trailers
// =============================================================================================

#[cfg(feature = "grpc")]
mod grpc_trailers {
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use support::adapter::{grpc_body, grpc_request, map, GRPC_PATH};
    use tower::{service_fn, Layer, Service};
    use tower_coalesce::grpc::CoalesceGrpcLayer;
    use tower_coalesce::http::{CoalesceBody, ServedBy};

    /// A successful response with a `set-cookie` trailer (any case) goes to its own caller
    /// only, cookie and all; the follower is released to its own call, and the counters do
    /// not count the call as failed. A failed one with a cookie counts as failed.
    #[tokio::test]
    async fn a_set_cookie_trailer_releases_followers_without_failing_the_call() {
        for (status, failed) in [("0", false), ("13", true)] {
            let calls = Arc::new(AtomicUsize::new(0));
            let counted = calls.clone();
            let (open, gate) = tokio::sync::watch::channel(false);
            let inner = service_fn(move |_req: Request<CoalesceBody<Full<Bytes>>>| {
                let n = counted.fetch_add(1, SeqCst);
                let mut gate = gate.clone();
                let mut res = Response::new(grpc_body(map(&[
                    ("grpc-status", status),
                    ("Set-Cookie", &format!("s={n}")),
                ])));
                *res.headers_mut() = map(&[("content-type", "application/grpc")]);
                async move {
                    gate.wait_for(|o| *o).await.unwrap();
                    Ok::<_, Infallible>(res)
                }
            });
            let mut svc = CoalesceGrpcLayer::new().method(GRPC_PATH).layer(inner);
            // The key needs the request message: a call joins its flight when first polled.
            let mut leader = Box::pin(svc.call(grpc_request()));
            let mut follower = Box::pin(svc.call(grpc_request()));
            assert!(futures::poll!(leader.as_mut()).is_pending());
            assert!(futures::poll!(follower.as_mut()).is_pending());
            assert_eq!(calls.load(SeqCst), 1, "the follower waits");
            open.send_replace(true);
            let mut seen = Vec::new();
            for res in [leader.await, follower.await] {
                let res = res.unwrap();
                let by = *res.extensions().get::<ServedBy>().unwrap();
                let c = res.into_body().collect().await.unwrap();
                let cookie = c.trailers().unwrap()["set-cookie"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                seen.push((by, cookie));
            }
            assert_eq!(calls.load(SeqCst), 2, "{status}");
            assert_eq!(
                seen,
                [
                    (ServedBy::Leader, "s=0".to_owned()),
                    (ServedBy::Released, "s=1".to_owned())
                ],
                "{status}: each its own cookie"
            );
            let s = svc.stats();
            assert_eq!(
                (s.released, s.errors),
                (1, u64::from(failed)),
                "{status}: {s:?}"
            );
            check(&s, 2);
        }
    }
}
