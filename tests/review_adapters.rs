//! Review of the adapters (`src/future.rs`, `src/service.rs`, `src/http/`, `src/grpc/`) for user
//! code that panics, or values that are extreme, half-way through a flight: response bodies,
//! header maps, request bodies, wakers. The tests named for a problem failed before its fix
//! (SECURITY.md, finding 16); the others are controls for sites judged fine.
//!
//! Deterministic: futures are polled by hand with a no-op (or counting, or panicking) waker;
//! bodies hand out frames on a schedule the test drives. No sleep synchronises anything.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// One poll with `waker`; `Err` if the poll panicked.
fn poll_with<F: Future + Unpin>(f: &mut F, waker: &Waker) -> Result<Poll<F::Output>, ()> {
    let mut cx = Context::from_waker(waker);
    catch_unwind(AssertUnwindSafe(|| Pin::new(f).poll(&mut cx))).map_err(|_| ())
}

/// One poll with a no-op waker; `Err` if the poll panicked.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Result<Poll<F::Output>, ()> {
    poll_with(f, Waker::noop())
}

/// A waker that counts its wakes.
#[derive(Default)]
struct Counting(AtomicUsize);

impl Wake for Counting {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// An executor's waker whose `wake` panics (a bug in that executor, or a task already gone).
struct Exploding;

impl Wake for Exploding {
    fn wake(self: Arc<Self>) {
        panic!("waker exploded");
    }
}

// ---------------------------------------------------------------------------------------------
// The tower layer: a follower's waker when its driver leaves
// ---------------------------------------------------------------------------------------------

mod layer {
    use super::*;
    use std::convert::Infallible;
    use tower::{service_fn, Service};
    use tower_coalesce::CoalesceLayer;
    use tower_layer::Layer;

    /// Site: flight.rs `leave_driving` (`wake_one` + `waker.wake()`), reached by dropping the
    /// layer's `ResponseFuture` (`src/future.rs`), as any client that goes away does. The
    /// inner future goes to the first parked follower and *only* that follower is woken; if
    /// its waker panics, no other follower is woken, so nobody ever polls the handed-over call:
    /// the other followers and the key hang. (`publish` already wakes every waker past a
    /// panicking one: the same rule is missing here, and in `leave_following`'s hand-on.)
    #[test]
    fn a_panicking_waker_of_the_follower_picked_to_take_over_strands_no_one() {
        let mut svc = CoalesceLayer::new(|k: &u8| Some(*k)).layer(service_fn(|k: u8| async move {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(k)
        }));
        let mut leader = Box::pin(svc.call(1));
        let mut first = Box::pin(svc.call(1));
        let mut second = Box::pin(svc.call(1));
        assert!(matches!(poll_once(&mut leader), Ok(Poll::Pending)));
        let exploding = Waker::from(Arc::new(Exploding));
        let counting = Arc::new(Counting::default());
        assert!(matches!(
            poll_with(&mut first, &exploding),
            Ok(Poll::Pending)
        ));
        assert!(matches!(
            poll_with(&mut second, &Waker::from(counting.clone())),
            Ok(Poll::Pending)
        ));
        // The client of the leader goes away; the panic of the first follower's waker is the
        // dropper's, as documented.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(leader)));
        assert!(
            counting.0.load(SeqCst) > 0,
            "nobody will take over the call: the second follower is never woken"
        );
        drop((first, second));
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "http")]
mod http_adapter {
    use super::*;
    use bytes::Bytes;
    use http::header::{HeaderName, HeaderValue};
    use http::{Request, Response};
    use http_body::{Body, Frame};
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower::{service_fn, Service};
    use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};
    use tower_layer::Layer;

    type Req = Request<Full<Bytes>>;

    fn get(uri: &str) -> Req {
        Request::get(uri).body(Full::default()).unwrap()
    }

    /// A data chunk that counts itself while alive: how many frames a body's reader holds.
    struct Tracked(Arc<AtomicUsize>);

    impl Tracked {
        fn chunk(live: &Arc<AtomicUsize>, data: &'static [u8]) -> Bytes {
            live.fetch_add(1, SeqCst);
            Bytes::from_owner(TrackedSlice(Tracked(live.clone()), data))
        }
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_sub(1, SeqCst);
        }
    }

    struct TrackedSlice(#[allow(dead_code)] Tracked, &'static [u8]);

    impl AsRef<[u8]> for TrackedSlice {
        fn as_ref(&self) -> &[u8] {
            self.1
        }
    }

    /// A body that never ends, made of empty data frames, one every other poll (the other
    /// poll is `Pending`, so the reader gives control back between frames).
    pub(super) struct EmptyFrames {
        pub(super) live: Arc<AtomicUsize>,
        pub(super) ready: bool,
        /// Each frame's data: empty, or a byte for a body of tiny frames.
        pub(super) data: &'static [u8],
    }

    impl Body for EmptyFrames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.ready = !self.ready;
            if !self.ready {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Some(Ok(Frame::data(Tracked::chunk(&self.live, self.data)))))
        }
    }

    /// Polls `fut` up to `polls` times, or until it is ready (or panics).
    pub(super) fn drive<F: Future + Unpin>(fut: &mut F, polls: usize) {
        for _ in 0..polls {
            if !matches!(poll_once(fut), Ok(Poll::Pending)) {
                return;
            }
        }
    }

    /// Site: http/body.rs `buffer` (`frames.push_back`), the flight's read of a response body.
    /// Only data *bytes* count against the limit ("at most `limit` bytes plus one frame are
    /// held in memory"); every frame is kept, so a body of empty (or tiny) data frames makes
    /// the flight hold one `Frame` (and its chunk) per frame, with no bound: 20,000 empty
    /// frames under a 1 KiB limit are all held. The gRPC adapter reads request messages with
    /// the same function (see `grpc_adapter`).
    #[test]
    fn http_empty_frames_are_not_held_without_bound_while_buffered() {
        let live = Arc::new(AtomicUsize::new(0));
        let body_live = live.clone();
        let layer = CoalesceHttpLayer::new().max_body_bytes(1024);
        let mut svc = layer.layer(service_fn(move |_: Req| {
            let live = body_live.clone();
            async move {
                let body = EmptyFrames {
                    live,
                    ready: false,
                    data: b"",
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        }));
        let mut leader = Box::pin(svc.call(get("/stream")));
        drive(&mut leader, 20_000);
        let held = live.load(SeqCst);
        drop(leader);
        assert!(
            held <= 64,
            "{held} empty frames held at once for a body limited to 1 KiB"
        );
        assert_eq!(live.load(SeqCst), 0);
    }

    /// The same for one-byte frames under a limit they stay within (10,000 of them under
    /// 64 KiB): their bytes are held, not a frame each.
    #[test]
    fn http_tiny_frames_are_held_as_bytes_not_frames_while_buffered() {
        let live = Arc::new(AtomicUsize::new(0));
        let body_live = live.clone();
        let layer = CoalesceHttpLayer::new().max_body_bytes(64 * 1024);
        let mut svc = layer.layer(service_fn(move |_: Req| {
            let live = body_live.clone();
            async move {
                let body = EmptyFrames {
                    live,
                    ready: false,
                    data: b"x",
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        }));
        let mut leader = Box::pin(svc.call(get("/stream")));
        drive(&mut leader, 20_000);
        let held = live.load(SeqCst);
        drop(leader);
        assert!(held <= 64, "{held} one-byte frames held at once");
        assert_eq!(live.load(SeqCst), 0);
    }

    /// Site: http/future.rs `mark`: `HeaderMap::append` of the `Cache-Status` entry panics
    /// ("size overflows MAX_SIZE") on a response whose header map is full. With
    /// `cache_status_header(true)` the layer then panics in place of every response (leader,
    /// follower, released, bypass) that has the most headers an `http::HeaderMap` can hold,
    /// a response that reaches the client untouched without the layer.
    #[test]
    fn http_cache_status_on_a_full_header_map_does_not_panic() {
        let layer = CoalesceHttpLayer::new().cache_status_header(true);
        let mut svc = layer.layer(service_fn(|_: Req| async {
            let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
            let headers = res.headers_mut();
            for i in 0.. {
                let name = HeaderName::try_from(format!("x-h{i}")).unwrap();
                if headers
                    .try_insert(name, HeaderValue::from_static("1"))
                    .is_err()
                {
                    break;
                }
            }
            Ok::<_, Infallible>(res)
        }));
        let mut leader = Box::pin(svc.call(get("/many-headers")));
        let got = poll_once(&mut leader);
        let Ok(Poll::Ready(Ok(res))) = got else {
            panic!("the layer panicked instead of answering");
        };
        assert_eq!(res.extensions().get::<ServedBy>(), Some(&ServedBy::Leader));
        let body = futures::executor::block_on(res.into_body().collect()).unwrap();
        assert_eq!(body.to_bytes(), "ok");
        assert_eq!(layer.in_flight(), 0);
    }

    /// Control, http/service.rs `call`: a follower's clone of the inner service panics out of
    /// `call` after it joined the flight; unwinding drops its waiter, so the flight, the
    /// `waiting` gauge and the counters stay right, and the leader is served.
    #[test]
    fn http_follower_clone_panicking_in_call_leaves_the_flight_clean() {
        #[derive(Clone)]
        struct Svc(Arc<AtomicUsize>);
        impl Service<Req> for Svc {
            type Response = Response<Full<Bytes>>;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Self::Response, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Req) -> Self::Future {
                std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"x")))))
            }
        }
        // Clones: the first (the leader's flight) succeeds, the second (the follower's own
        // copy) panics.
        struct Panicky(Svc);
        impl Clone for Panicky {
            fn clone(&self) -> Self {
                if self.0 .0.fetch_add(1, SeqCst) == 1 {
                    panic!("clone exploded");
                }
                Panicky(self.0.clone())
            }
        }
        impl Service<Req> for Panicky {
            type Response = Response<Full<Bytes>>;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Self::Response, Infallible>>;
            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                self.0.poll_ready(cx)
            }
            fn call(&mut self, req: Req) -> Self::Future {
                self.0.call(req)
            }
        }
        let layer = CoalesceHttpLayer::new();
        let mut svc = layer.layer(Panicky(Svc(Arc::default())));
        let mut leader = svc.call(get("/c"));
        let follower = catch_unwind(AssertUnwindSafe(|| svc.call(get("/c"))));
        assert!(follower.is_err());
        assert_eq!(layer.waiting(), 0);
        assert!(matches!(poll_once(&mut leader), Ok(Poll::Ready(Ok(_)))));
        let stats = layer.stats();
        assert_eq!((stats.leaders, stats.followers, stats.in_flight), (1, 1, 0));
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "grpc")]
mod grpc_adapter {
    use super::http_adapter::{drive, EmptyFrames};
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body::{Body, Frame};
    use http_body_util::Full;
    use std::convert::Infallible;
    use tower::{service_fn, Service};
    use tower_coalesce::grpc::CoalesceGrpcLayer;
    use tower_coalesce::http::CoalesceBody;
    use tower_layer::Layer;

    const PATH: &str = "/catalog.v1.Catalog/GetItem";

    fn call<B>(body: B) -> Request<B> {
        Request::post(PATH)
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    }

    /// Site: grpc/future.rs `keyed` → http/body.rs `buffer`, reading the request message to
    /// key it. `request_limit` bounds data bytes only: a request of empty data frames is held
    /// frame by frame, without bound, before the call even has a key. (hyper's HTTP/2 server
    /// drops empty DATA frames, but not 1-byte ones: a client sending the 64 KiB default as
    /// 1-byte frames makes the layer hold 64 Ki frames, about 100 times the limit.)
    #[test]
    fn grpc_empty_request_frames_are_not_held_without_bound() {
        let live = Arc::new(AtomicUsize::new(0));
        let layer = CoalesceGrpcLayer::new().method(PATH).request_limit(1024);
        let mut svc = layer.layer(service_fn(|_: Request<CoalesceBody<EmptyFrames>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }));
        let mut fut = Box::pin(svc.call(call(EmptyFrames {
            live: live.clone(),
            ready: false,
            data: b"",
        })));
        drive(&mut fut, 20_000);
        let held = live.load(SeqCst);
        drop(fut);
        assert!(
            held <= 64,
            "{held} empty frames held at once for a request limited to 1 KiB"
        );
    }

    /// A request body that panics when first polled.
    struct Exploding;

    impl Body for Exploding {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            panic!("request body exploded");
        }
    }

    /// Control, grpc/future.rs `Buffering`: a request body that panics while the layer reads
    /// it panics out of that call's future before the call has a key: nothing is registered
    /// or counted, and the method keeps coalescing.
    #[test]
    fn grpc_request_body_panicking_before_the_key_leaves_nothing_behind() {
        let layer = CoalesceGrpcLayer::new().method(PATH);
        let mut svc = layer.layer(service_fn(|_: Request<CoalesceBody<Exploding>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }));
        let mut fut = Box::pin(svc.call(call(Exploding)));
        assert!(poll_once(&mut fut).is_err());
        drop(fut);
        let stats = layer.stats();
        assert_eq!(
            (
                stats.leaders,
                stats.followers,
                stats.bypassed,
                stats.in_flight
            ),
            (0, 0, 0, 0)
        );
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    }
}
