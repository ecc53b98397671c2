//! Response bodies: buffering one into [`Bytes`] and trailers under a byte limit, and
//! [`CoalesceBody`], the body type that replays a buffered body, a buffered prefix followed by
//! the rest of the original stream, or the original body untouched.
//!
//! The gRPC adapter reuses these for request messages and responses alike: [`buffer`] never
//! loses a byte, so whatever it returns can be handed on as the body the caller would have had
//! without the layer.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

/// What [`buffer`] made of a body.
pub(crate) enum Buffered<B: Body> {
    /// The whole body, within the limit: its data in one [`Bytes`] and its trailers, if any.
    Complete {
        /// Every data frame, concatenated.
        data: Bytes,
        /// The trailers frame, if any (nothing may follow it).
        trailers: Option<HeaderMap>,
    },
    /// Not buffered whole: the body was larger than the limit (known from its size hint, or
    /// found while reading), or it failed. The [`CoalesceBody`] replays every frame already
    /// read, then goes on with the rest of the original body (or yields the error it failed
    /// with), so its reader sees exactly what the original would have produced.
    Incomplete(CoalesceBody<B>),
}

impl<B: Body> fmt::Debug for Buffered<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Buffered::Complete { data, trailers } => f
                .debug_struct("Complete")
                .field("len", &data.len())
                .field("trailers", &trailers.as_ref().map(HeaderMap::len))
                .finish(),
            Buffered::Incomplete(body) => f.debug_tuple("Incomplete").field(body).finish(),
        }
    }
}

/// Reads `body` into memory as long as its data stays within `limit` bytes.
///
/// A body whose size hint already says it is larger is returned untouched, without reading a
/// byte. Otherwise frames are read until the end (→ [`Buffered::Complete`]), until the data
/// read exceeds `limit`, a frame follows the trailers, or the body fails
/// (→ [`Buffered::Incomplete`], which loses nothing).
/// About `limit` bytes are held in memory, plus one frame: small frames are copied together
/// as they come (an empty one takes nothing), so that a body of many tiny frames cannot hold
/// a frame's bookkeeping for each of its bytes.
///
/// The caller checks `Content-Length` itself when it applies (not for `HEAD` responses, whose
/// header describes a body that is not sent); see [`content_length`].
pub(crate) async fn buffer<B: Body>(body: B, limit: usize) -> Buffered<B> {
    let limit = limit as u64;
    if body.size_hint().lower() > limit {
        return Buffered::Incomplete(CoalesceBody::original(body));
    }
    if body.is_end_stream() {
        return Buffered::Complete {
            data: Bytes::new(),
            trailers: None,
        };
    }
    // Boxed so the body can be polled here and still be moved into the replaying body if it
    // turns out to be too large; one allocation per buffered body (per flight, not per waiter).
    let mut body = Box::pin(body);
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut small = SmallFrames::default();
    let mut read: u64 = 0;
    loop {
        match body.frame().await {
            None => {
                small.flush(&mut frames);
                return Buffered::Complete {
                    data: concat(&mut frames, read),
                    trailers: trailers(frames),
                };
            }
            Some(Ok(frame)) => {
                // Anything after the trailers (more trailers, more data) cannot be rebuilt as
                // one body of data then trailers without merging or reordering, which could
                // turn a failure into a success (an earlier `grpc-status` overwritten): such
                // a body is replayed to its own caller as it came, and not shared.
                let after_trailers = frames.back().is_some_and(Frame::is_trailers);
                match frame.map_data(into_bytes).into_data() {
                    Ok(data) => {
                        read += data.len() as u64;
                        if data.len() < SMALL_FRAME && !after_trailers {
                            small.push(data, &mut frames);
                        } else {
                            small.flush(&mut frames);
                            frames.push_back(Frame::data(data));
                        }
                    }
                    Err(frame) => {
                        small.flush(&mut frames);
                        frames.push_back(frame);
                    }
                }
                if read > limit || after_trailers {
                    small.flush(&mut frames);
                    return Buffered::Incomplete(CoalesceBody::replay(frames, None, body));
                }
            }
            Some(Err(error)) => {
                small.flush(&mut frames);
                return Buffered::Incomplete(CoalesceBody::replay(frames, Some(error), body));
            }
        }
    }
}

/// Data frames smaller than this are copied together while a body is buffered.
const SMALL_FRAME: usize = 4096;

/// Small data frames while a body is buffered. The first is kept as it came, so that a body of
/// one small frame is not copied; from a second on they are copied together, until they make
/// a frame worth keeping on its own.
#[derive(Default)]
struct SmallFrames {
    first: Option<Bytes>,
    merged: BytesMut,
}

impl SmallFrames {
    fn push(&mut self, data: Bytes, frames: &mut VecDeque<Frame<Bytes>>) {
        match self.first.take() {
            None if self.merged.is_empty() => self.first = Some(data),
            first => {
                if let Some(first) = first {
                    self.merged.extend_from_slice(&first);
                }
                self.merged.extend_from_slice(&data);
                if self.merged.len() >= SMALL_FRAME {
                    self.flush(frames);
                }
            }
        }
    }

    /// Moves the small frames held so far into `frames`, in order.
    fn flush(&mut self, frames: &mut VecDeque<Frame<Bytes>>) {
        if let Some(first) = self.first.take() {
            frames.push_back(Frame::data(first));
        }
        if !self.merged.is_empty() {
            frames.push_back(Frame::data(self.merged.split().freeze()));
        }
    }
}

/// The value of a single, well-formed `Content-Length` header; `None` if absent or unusable.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.trim().parse().ok()
}

/// Turns any [`Buf`] into [`Bytes`]; free when it already is one.
pub(crate) fn into_bytes<D: Buf>(mut data: D) -> Bytes {
    let len = data.remaining();
    data.copy_to_bytes(len)
}

/// Joins the data frames (copying only when there are several), leaving the trailers behind.
fn concat(frames: &mut VecDeque<Frame<Bytes>>, len: u64) -> Bytes {
    let mut data: Vec<Bytes> = Vec::new();
    frames.retain_mut(|frame| match frame.data_mut() {
        Some(chunk) => {
            if !chunk.is_empty() {
                data.push(std::mem::take(chunk));
            }
            false
        }
        None => true,
    });
    match data.len() {
        0 => Bytes::new(),
        1 => data.pop().unwrap_or_default(),
        _ => {
            let mut joined = BytesMut::with_capacity(len as usize);
            for chunk in data {
                joined.extend_from_slice(&chunk);
            }
            joined.freeze()
        }
    }
}

/// The trailers frame, the last one if any (nothing follows it: see [`buffer`]).
fn trailers(frames: VecDeque<Frame<Bytes>>) -> Option<HeaderMap> {
    frames
        .into_iter()
        .find_map(|frame| frame.into_trailers().ok())
}

pin_project! {
    /// The response body of [`CoalesceHttpService`](super::CoalesceHttpService).
    ///
    /// One of:
    /// - a buffered body (data and trailers), rebuilt for every waiter of a shared response;
    /// - the frames already read from a body that turned out too large to share, followed by
    ///   the rest of that body: the leader's full, untruncated response;
    /// - an inner response body passed through untouched (bypassed requests, responses that
    ///   may not be shared), only converting its data to [`Bytes`].
    ///
    /// Its error type is the inner body's; a buffered body never fails.
    pub struct CoalesceBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        Full {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
        Replay {
            frames: VecDeque<Frame<Bytes>>,
            // Yielded once the frames are gone; `rest` is then finished and never polled again.
            error: Option<B::Error>,
            rest: Option<Pin<Box<B>>>,
        },
        Original {
            #[pin]
            inner: B,
        },
    }
}

/// An empty body, as tower-http's middleware makes for the responses it answers itself (a
/// timeout, a refused CORS preflight), which need `Default` of the body type.
impl<B: Body> Default for CoalesceBody<B> {
    fn default() -> Self {
        CoalesceBody::full(Bytes::new(), None)
    }
}

impl<B: Body> CoalesceBody<B> {
    /// A complete body: `data` as one frame (none if empty), then `trailers` if any.
    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        CoalesceBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// `inner`, untouched.
    pub(crate) fn original(inner: B) -> Self {
        CoalesceBody {
            kind: Kind::Original { inner },
        }
    }

    /// `frames` already read from `rest`, then `error` if reading failed, else the rest.
    fn replay(frames: VecDeque<Frame<Bytes>>, error: Option<B::Error>, rest: Pin<Box<B>>) -> Self {
        let rest = if error.is_some() { None } else { Some(rest) };
        CoalesceBody {
            kind: Kind::Replay {
                frames,
                error,
                rest,
            },
        }
    }

    /// Whether reading it into memory failed: it replays what was read, then that error.
    #[cfg(any(feature = "grpc", test))]
    pub(crate) fn failed_while_buffered(&self) -> bool {
        matches!(&self.kind, Kind::Replay { error: Some(_), .. })
    }

    /// Whether this body is held in memory whole (a response rebuilt from a buffered body: a
    /// shared one, or a leader's whose trailers kept it from being shared).
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Kind::Full { .. })
    }
}

impl<B: Body> Body for CoalesceBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KindProj::Replay {
                frames,
                error,
                rest,
            } => {
                if let Some(frame) = frames.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(error) = error.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                match rest {
                    Some(body) => body
                        .as_mut()
                        .poll_frame(cx)
                        .map(|frame| frame.map(|f| f.map(|f| f.map_data(into_bytes)))),
                    None => Poll::Ready(None),
                }
            }
            KindProj::Original { inner } => inner
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map(|f| f.map_data(into_bytes)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Replay {
                frames,
                error,
                rest,
            } => {
                frames.is_empty()
                    && error.is_none()
                    && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
            Kind::Original { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len()) as u64;
                match trailers {
                    // An exact size makes an HTTP/1.1 server frame the body with
                    // `Content-Length`, which cannot carry trailers (hyper drops them):
                    // inexact, it is sent chunked, trailers and all, to a client that asked
                    // for them (`TE: trailers`).
                    Some(_) => {
                        let mut hint = SizeHint::new();
                        hint.set_lower(len);
                        hint
                    }
                    None => SizeHint::with_exact(len),
                }
            }
            Kind::Replay {
                frames,
                error,
                rest,
            } => {
                let buffered: u64 = frames
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                match rest {
                    Some(rest) if error.is_none() => {
                        let hint = rest.size_hint();
                        let mut sum = SizeHint::new();
                        sum.set_lower(hint.lower().saturating_add(buffered));
                        if let Some(upper) = hint.upper() {
                            sum.set_upper(upper.saturating_add(buffered));
                        }
                        sum
                    }
                    // Failed: the error ends the body, and the count is only a guess.
                    _ => SizeHint::new(),
                }
            }
            Kind::Original { inner } => inner.size_hint(),
        }
    }
}

impl<B: Body> fmt::Debug for CoalesceBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CoalesceBody");
        match &self.kind {
            Kind::Full { data, trailers } => d
                .field("kind", &"full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .field("trailers", &trailers.is_some()),
            Kind::Replay { frames, error, .. } => d
                .field("kind", &"replay")
                .field("buffered_frames", &frames.len())
                .field("failed", &error.is_some()),
            Kind::Original { .. } => d.field("kind", &"original"),
        };
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use std::convert::Infallible;

    type Frames = Vec<Result<Frame<Bytes>, &'static str>>;
    type TestStream = StreamBody<futures::stream::Iter<<Frames as IntoIterator>::IntoIter>>;

    fn stream(frames: Frames) -> TestStream {
        StreamBody::new(futures::stream::iter(frames))
    }

    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(10), f)
            .await
            .expect("test timed out")
    }

    fn data(s: &'static str) -> Result<Frame<Bytes>, &'static str> {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    fn trailers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert(name, value.parse().unwrap());
        t
    }

    /// Reads a body to its end, recording data, trailers and an error if any.
    async fn drain<B: Body<Data = Bytes>>(
        body: B,
    ) -> (Vec<u8>, Option<HeaderMap>, Option<B::Error>) {
        let mut body = std::pin::pin!(body);
        let (mut out, mut tr) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(d) => out.extend_from_slice(&d),
                    Err(frame) => tr = frame.into_trailers().ok(),
                },
                Err(e) => return (out, tr, Some(e)),
            }
        }
        (out, tr, None)
    }

    #[tokio::test]
    async fn small_body_is_buffered_whole_with_trailers() {
        bounded(async {
            let body = stream(vec![
                data("hello "),
                data("world"),
                Ok(Frame::trailers(trailers("x-t", "1"))),
            ]);
            match buffer(body, 11).await {
                Buffered::Complete { data, trailers } => {
                    assert_eq!(data, "hello world");
                    assert_eq!(trailers.unwrap()["x-t"], "1");
                }
                other => panic!("expected complete, got {other:?}"),
            }
        })
        .await
    }

    #[tokio::test]
    async fn body_over_the_limit_is_replayed_whole() {
        bounded(async {
            let body = stream(vec![
                data("hello "),
                data("world"),
                data("!"),
                Ok(Frame::trailers(trailers("x-t", "2"))),
            ]);
            let Buffered::Incomplete(body) = buffer(body, 8).await else {
                panic!("11 bytes over an 8 byte limit must not be buffered");
            };
            assert!(!body.is_buffered());
            assert!(!body.failed_while_buffered(), "too large is no failure");
            let (bytes, tr, err) = drain(body).await;
            assert_eq!(bytes, b"hello world!");
            assert_eq!(tr.unwrap()["x-t"], "2");
            assert!(err.is_none());
        })
        .await
    }

    #[tokio::test]
    async fn size_hint_over_the_limit_reads_nothing() {
        bounded(async {
            let body = Full::new(Bytes::from_static(b"0123456789"));
            let Buffered::Incomplete(body) = buffer(body, 9).await else {
                panic!("exact size hint over the limit");
            };
            assert!(matches!(body.kind, Kind::Original { .. }));
            assert_eq!(body.size_hint().exact(), Some(10));
            let (bytes, _, err): (_, _, Option<Infallible>) = drain(body).await;
            assert_eq!(bytes, b"0123456789");
            assert!(err.is_none());
        })
        .await
    }

    #[tokio::test]
    async fn exactly_the_limit_is_buffered() {
        bounded(async {
            let body = Full::new(Bytes::from_static(b"0123456789"));
            assert!(
                matches!(buffer(body, 10).await, Buffered::Complete { ref data, .. } if data == "0123456789")
            );
        })
        .await
    }

    #[tokio::test]
    async fn failing_body_replays_prefix_then_its_error() {
        bounded(async {
            let body = stream(vec![data("abc"), Err("boom"), data("never")]);
            let Buffered::Incomplete(body) = buffer(body, 100).await else {
                panic!("a failed body is not complete");
            };
            assert!(body.failed_while_buffered());
            let (bytes, _, err) = drain(body).await;
            assert_eq!(bytes, b"abc");
            assert_eq!(err, Some("boom"));
        })
        .await
    }

    #[tokio::test]
    async fn empty_body_is_complete_and_full_body_replays_frames() {
        bounded(async {
            let body = Full::new(Bytes::new());
            let Buffered::Complete { data, trailers: tr } = buffer(body, 0).await else {
                panic!("empty body fits any limit");
            };
            assert!(data.is_empty() && tr.is_none());

            let full = CoalesceBody::<Full<Bytes>>::full(
                Bytes::from_static(b"xyz"),
                Some(trailers("a", "b")),
            );
            assert!(full.is_buffered());
            // With trailers, no exact size: an HTTP/1.1 server then sends it chunked, trailers
            // and all, not with a `Content-Length` that cannot carry them.
            assert_eq!(full.size_hint().exact(), None);
            assert_eq!(full.size_hint().lower(), 3);
            let (bytes, tr, _) = drain(full).await;
            assert_eq!(bytes, b"xyz");
            assert_eq!(tr.unwrap()["a"], "b");

            let empty = CoalesceBody::<Full<Bytes>>::full(Bytes::new(), None);
            assert!(empty.is_end_stream());
        })
        .await
    }

    #[test]
    fn content_length_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.insert("content-length", "42".parse().unwrap());
        assert_eq!(content_length(&h), Some(42));
        h.append("content-length", "42".parse().unwrap());
        assert_eq!(content_length(&h), None, "duplicates are not trusted");
        h.insert("content-length", "x".parse().unwrap());
        assert_eq!(content_length(&h), None);
    }

    proptest::proptest! {
        /// Whatever the chunking and the limit: a body within the limit is buffered whole and
        /// exactly; any other comes back byte for byte, trailers included.
        #[test]
        fn buffering_never_loses_or_truncates(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 0..12),
            limit in 0usize..300,
            with_trailers in proptest::bool::ANY,
        ) {
            let expected: Vec<u8> = chunks.concat();
            let mut frames: Vec<Result<Frame<Bytes>, &'static str>> =
                chunks.iter().map(|c| Ok(Frame::data(Bytes::from(c.clone())))).collect();
            if with_trailers {
                frames.push(Ok(Frame::trailers(trailers("x-t", "v"))));
            }
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (bytes, tr, complete) = rt.block_on(async {
                match buffer(stream(frames), limit).await {
                    Buffered::Complete { data, trailers } => (data.to_vec(), trailers, true),
                    Buffered::Incomplete(body) => {
                        let (bytes, tr, err) = drain(body).await;
                        assert!(err.is_none());
                        (bytes, tr, false)
                    }
                }
            });
            proptest::prop_assert_eq!(&bytes, &expected);
            proptest::prop_assert_eq!(complete, expected.len() <= limit);
            proptest::prop_assert_eq!(tr.is_some(), with_trailers);
        }
    }
}
