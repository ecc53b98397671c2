//! Review of session 6's fixes (`git diff 4e35298..3bf21eb -- src/`): each test but the
//! frame-order control failed on what they left (or made), before its own fix.
//!
//! Deterministic: futures are polled by hand with no-op or panicking wakers, gates are
//! oneshot channels and flags. No sleep synchronises anything.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use tokio::sync::oneshot;
use tower_coalesce::Group;

/// One poll with `waker`; `Err` if the poll panicked.
fn poll_with<F: Future + Unpin>(f: &mut F, waker: &Waker) -> Result<Poll<F::Output>, ()> {
    let mut cx = Context::from_waker(waker);
    catch_unwind(AssertUnwindSafe(|| Pin::new(f).poll(&mut cx))).map_err(|_| ())
}

/// One poll with a no-op waker; `Err` if the poll panicked.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Result<Poll<F::Output>, ()> {
    poll_with(f, Waker::noop())
}

/// A panic payload whose destructor panics too (as in `tests/review_panics.rs`).
struct PayloadBomb;

impl Drop for PayloadBomb {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("payload destructor exploded");
        }
    }
}

/// An executor's waker whose `wake` panics: with a plain message, or with a [`PayloadBomb`].
struct Exploding {
    bomb: bool,
}

impl Wake for Exploding {
    fn wake(self: Arc<Self>) {
        if self.bomb {
            std::panic::panic_any(PayloadBomb);
        }
        panic!("waker exploded");
    }
}

// ---------------------------------------------------------------------------------------------
// flight.rs `serve`: the second panicking waker's payload
// ---------------------------------------------------------------------------------------------

/// Site: flight.rs `serve`, `if let (Err(panic), Ok(())) = (wake_all(..), &woken)`. Once a
/// first waker has panicked (`woken` is `Err`), the payload of a later batch's panic does not
/// match the pattern and is dropped raw at the end of the `if let`, not through `drop_panic`
/// as everywhere else (`wake_all`, `pass_turn`, `keep_copy`). A payload whose destructor
/// panics then unwinds out of `serve` before the next batch: the followers of the third
/// batch are never served nor woken, and the flight is already unregistered: they hang.
/// (65 followers: batches of 32 → keys 0..32, 32..64, 64.)
#[test]
fn a_second_waker_panic_with_a_panicking_payload_does_not_strand_later_batches() {
    let group: Group<u32> = Group::new();
    let (tx, rx) = oneshot::channel::<()>();
    let mut leader = group.run(1, move || async move {
        let _ = rx.await;
        7u32
    });
    assert!(matches!(poll_once(&mut leader), Ok(Poll::Pending)));
    let mut followers: Vec<_> = (0..65).map(|_| group.run(1, || async { 0u32 })).collect();
    for (i, follower) in followers.iter_mut().enumerate() {
        let waker = match i {
            0 => Waker::from(Arc::new(Exploding { bomb: false })),
            32 => Waker::from(Arc::new(Exploding { bomb: true })),
            _ => Waker::noop().clone(),
        };
        assert!(matches!(poll_with(follower, &waker), Ok(Poll::Pending)));
    }
    tx.send(()).unwrap();
    // The first waker's panic is passed on to the leader: expected.
    assert!(poll_once(&mut leader).is_err());
    let last = followers.last_mut().unwrap();
    assert!(
        matches!(poll_once(last), Ok(Poll::Ready(Ok(7)))),
        "the follower of the third batch hangs: publish stopped after the second"
    );
}

// ---------------------------------------------------------------------------------------------
// http/body.rs `keep_small`: the one-small-frame body is now copied
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "http")]
mod http_body_copy {
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower::{service_fn, Service};
    use tower_coalesce::http::CoalesceHttpLayer;
    use tower_layer::Layer;

    static BODY: &[u8] = b"{\"small\":\"json\"}";

    /// Site: http/body.rs `buffer`: every data frame under 4 KiB is now copied into a
    /// `BytesMut` (`small.extend_from_slice`), then split and frozen, even when it is the
    /// body's only frame. `concat` ("copying only when there are several") used to hand that
    /// frame on as it came: the most common body (one small frame, e.g. axum's `Json`,
    /// `Full<Bytes>`) now costs every flight an allocation, a shared-buffer promotion and a
    /// copy it did not before. Merging needs to start only at a second small frame.
    #[tokio::test]
    async fn a_body_of_one_small_frame_is_not_copied() {
        let mut svc = CoalesceHttpLayer::new().layer(service_fn(|_: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
        }));
        let req = Request::get("/small").body(Full::default()).unwrap();
        let res = svc.call(req).await.unwrap();
        assert!(res.body().is_buffered());
        let mut body = res.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        let data = frame.into_data().unwrap();
        assert_eq!(&data[..], BODY);
        assert_eq!(
            data.as_ptr(),
            BODY.as_ptr(),
            "the buffered body is a copy of its single frame"
        );
    }

    /// Control (fine): `keep_small` keeps bytes and frame order. Small frames merged before a
    /// large one, the trailers, and data after the trailers (a body replayed to its own
    /// caller, not shared) come back byte for byte in order, whether the body ends up over
    /// the limit or only misordered.
    #[tokio::test]
    async fn merged_small_frames_replay_in_order_to_the_leader() {
        use http::HeaderMap;
        use http_body::Frame;
        use http_body_util::StreamBody;

        fn frames() -> Vec<Result<Frame<Bytes>, Infallible>> {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-t", "1".parse().unwrap());
            vec![
                Ok(Frame::data(Bytes::from(vec![b'a'; 3000]))),
                Ok(Frame::data(Bytes::new())),
                Ok(Frame::data(Bytes::from(vec![b'b'; 2000]))),
                Ok(Frame::data(Bytes::from(vec![b'c'; 5000]))),
                Ok(Frame::data(Bytes::from_static(b"dd"))),
                Ok(Frame::trailers(trailers)),
                Ok(Frame::data(Bytes::from_static(b"e"))),
            ]
        }
        for limit in [6_000, 1 << 20] {
            let layer = CoalesceHttpLayer::new().max_body_bytes(limit);
            let mut svc = layer.layer(service_fn(|_: Request<Full<Bytes>>| async {
                let body = StreamBody::new(futures::stream::iter(frames()));
                Ok::<_, Infallible>(Response::new(body))
            }));
            let req = Request::get("/mixed").body(Full::default()).unwrap();
            let mut body = svc.call(req).await.unwrap().into_body();
            assert!(!body.is_buffered());
            let (mut before, mut after, mut trailers) = (Vec::new(), Vec::new(), None);
            while let Some(frame) = body.frame().await {
                match frame.unwrap().into_data() {
                    Ok(data) if trailers.is_none() => before.extend_from_slice(&data),
                    Ok(data) => after.extend_from_slice(&data),
                    Err(frame) => trailers = Some(frame.into_trailers().unwrap()),
                }
            }
            let expected: Vec<u8> =
                [&[b'a'; 3000][..], &[b'b'; 2000], &[b'c'; 5000], b"dd"].concat();
            assert_eq!(before, expected, "limit {limit}");
            assert_eq!(trailers.unwrap()["x-t"], "1");
            assert_eq!(after, b"e");
        }
    }
}
