//! The HTTP and gRPC adapters driven in process: bodies, header maps, requests and responses, an
//! inner service that counts its calls, and each response read whole.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::watch;
use tower::util::BoxCloneService;
use tower::Service;
use tower_coalesce::http::{CoalesceBody, CoalesceHttpService, ServedBy};

pub type B = BoxBody<Bytes, Infallible>;
pub type Req = Request<Full<Bytes>>;
pub type Inner = BoxCloneService<Req, Response<B>, Infallible>;
pub type Svc = CoalesceHttpService<Inner>;

// ---------------------------------------------------------------------------------------------
// Bodies, fields, requests, responses
// ---------------------------------------------------------------------------------------------

/// A body of a known length that must never be read (a `HEAD` response's `GET` body).
pub struct Unread(pub u64);

impl Body for Unread {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        panic!("a HEAD response's body of known length was read")
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0)
    }
}

/// A streamed body (size unknown): `chunks` as data frames, then `trailers` if given.
pub fn streamed(chunks: &[&'static [u8]], trailers: Option<HeaderMap>) -> B {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c))))
        .collect();
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    BoxBody::new(StreamBody::new(stream::iter(frames)))
}

/// A header map of text values, in order (a name may repeat).
pub fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (name, value) in pairs {
        m.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    m
}

/// A header map of byte values (not always text), in order.
pub fn map_bytes(pairs: &[(&str, &[u8])]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (name, value) in pairs {
        m.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    m
}

/// A request for `http://example.test/x`, with the `extra` fields.
pub fn request(method: Method, extra: &[(&str, &str)]) -> Req {
    let mut req = Request::builder()
        .method(method)
        .uri("http://example.test/x")
        .header(header::HOST, "example.test");
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

pub fn get() -> Req {
    request(Method::GET, &[])
}

pub fn response(status: u16, headers: HeaderMap, body: B) -> Response<B> {
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    *res.headers_mut() = headers;
    res
}

// ---------------------------------------------------------------------------------------------
// A counting inner service
// ---------------------------------------------------------------------------------------------

/// An inner service answering each request with `respond(request, n)`, `n` the call's number
/// (from 0), and its call count.
pub fn counted(
    respond: impl Fn(&Req, usize) -> Response<B> + Send + Sync + 'static,
) -> (Inner, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let respond = Arc::new(respond);
    let svc = tower::service_fn(move |req: Req| {
        let res = respond(&req, counted.fetch_add(1, SeqCst));
        async move { Ok::<_, Infallible>(res) }
    });
    (BoxCloneService::new(svc), calls)
}

/// The same, each response held until `open` is sent `true`.
pub fn gated_counted(
    respond: impl Fn(&Req, usize) -> Response<B> + Send + Sync + 'static,
) -> (Inner, Arc<AtomicUsize>, watch::Sender<bool>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let respond = Arc::new(respond);
    let (open, gate) = watch::channel(false);
    let svc = tower::service_fn(move |req: Req| {
        let res = respond(&req, counted.fetch_add(1, SeqCst));
        let mut gate = gate.clone();
        async move {
            gate.wait_for(|o| *o).await.unwrap();
            Ok::<_, Infallible>(res)
        }
    });
    (BoxCloneService::new(svc), calls, open)
}

// ---------------------------------------------------------------------------------------------
// Responses read whole
// ---------------------------------------------------------------------------------------------

/// An extension an inner service may set on its response; [`Read::tag`] says whether a copy
/// kept it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Tag(pub u32);

/// What a caller was served.
#[derive(Debug)]
pub struct Read {
    pub by: ServedBy,
    /// `CoalesceBody::is_buffered`.
    pub buffered: bool,
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub tag: Option<Tag>,
    pub exact: Option<u64>,
    pub data: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Read {
    pub fn cache_status(&self) -> String {
        self.headers
            .get_all("cache-status")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .map(|v| v.to_str().unwrap())
    }

    /// Whether a server could frame this response: never `Transfer-Encoding` and
    /// `Content-Length` together (RFC 9112 §6.3), and a `Content-Length` beside a body that
    /// is sent equals the body's length.
    pub fn framing_ok(&self, head: bool) -> bool {
        let te = self.headers.contains_key(header::TRANSFER_ENCODING);
        let cl = self.values("content-length");
        if te && !cl.is_empty() {
            return false;
        }
        head || self.status == StatusCode::NOT_MODIFIED
            || self.status == StatusCode::NO_CONTENT
            || cl.is_empty()
            || cl == [self.data.len().to_string()]
    }
}

pub async fn read(res: Response<CoalesceBody<B>>) -> Read {
    let by = *res.extensions().get::<ServedBy>().expect("ServedBy");
    let tag = res.extensions().get::<Tag>().copied();
    let (parts, body) = res.into_parts();
    let exact = body.size_hint().exact();
    let buffered = body.is_buffered();
    // A response passed through untouched with a body of known length is a `HEAD`'s
    // (`Unread`): the server never reads it, nor does this.
    let (data, trailers) = if body.is_buffered() || exact.is_none() {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    } else {
        (Bytes::new(), None)
    };
    Read {
        by,
        buffered,
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        tag,
        exact,
        data,
        trailers,
    }
}

/// Calls `svc` with every request (all registered before any is polled, so the first leads
/// and the others follow), then reads every response, the leader's first.
pub async fn burst(svc: &mut Svc, reqs: Vec<Req>) -> Vec<Read> {
    let futs: Vec<_> = reqs.into_iter().map(|r| svc.call(r)).collect();
    let mut reads = Vec::new();
    for res in futures::future::join_all(futs).await {
        reads.push(read(res.unwrap()).await);
    }
    reads
}

// ---------------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------------

/// The one method the gRPC tests coalesce.
pub const GRPC_PATH: &str = "/catalog.v1.Catalog/GetItem";

/// A unary gRPC call of [`GRPC_PATH`] (one length-prefixed message).
pub fn grpc_request() -> Req {
    Request::post(GRPC_PATH)
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01a")))
        .unwrap()
}

/// A gRPC response body: one length-prefixed message, then `trailers`.
pub fn grpc_body(trailers: HeaderMap) -> B {
    streamed(&[b"\0\0\0\0\x01z"], Some(trailers))
}
