//! The check behind the fuzz target `http_key_rebuild` and the stable `replay` harness.
//!
//! An input is decoded into a few concurrent requests (a base request and variants of it) and
//! one backend answer (status, headers, body frames, trailers, a size limit). The requests go
//! through one `CoalesceHttpService` at once; the backend records every request it gets and
//! tags its answer with the request's number. Whatever the bytes, nothing may panic or hang,
//! and every waiter must get either its own call's answer, whole, or — as a follower — a
//! shareable answer made for an equally keyed request. A violated rule panics, which is what
//! libFuzzer (and `replay`) report.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{service_fn, Layer, Service};
use tower_coalesce::http::{CoalesceHttpLayer, ServedBy};

/// Request headers the key covers by default.
const KEYED: [&str; 12] = [
    "accept",
    "accept-encoding",
    "accept-language",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "host",
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
];

const REQUEST_NAMES: [&str; 24] = [
    "accept",
    "accept-encoding",
    "accept-language",
    "if-none-match",
    "if-range",
    "host",
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "cache-control",
    "pragma",
    "connection",
    "upgrade",
    "range",
    "content-length",
    "transfer-encoding",
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-theme",
    "user-agent",
    "vary",
    "x-call",
    "te",
];

const RESPONSE_NAMES: [&str; 8] = [
    "cache-control",
    "vary",
    "set-cookie",
    "content-type",
    "content-length",
    "pragma",
    "x-theme",
    "transfer-encoding",
];

const METHODS: [&str; 9] = [
    "GET", "GET", "GET", "HEAD", "POST", "PUT", "OPTIONS", "CONNECT", "PURGE",
];

const URIS: [&str; 8] = [
    "/",
    "/a",
    "/a?x=1",
    "/a?",
    "http://one.test/a",
    "https://one.test/a",
    "*",
    "//a",
];

/// Reads the input a piece at a time; past its end, every read gives zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.byte()) % (max + 1);
        let n = n.min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken.to_vec()
    }

    fn pick<T: Copy>(&mut self, table: &[T]) -> T {
        table[usize::from(self.byte()) % table.len()]
    }
}

/// A request before it is built, so that variants can be made of it.
#[derive(Clone, Debug)]
struct Spec {
    method: Method,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    identity: Option<Vec<u8>>,
    body: Vec<u8>,
}

/// The identity a (pretend) authentication layer put on the request.
#[derive(Clone, Debug)]
struct Uid(Vec<u8>);

fn header_name(input: &mut Input<'_>, table: &[&'static str]) -> Option<HeaderName> {
    if input.byte() < 224 {
        Some(HeaderName::from_static(input.pick(table)))
    } else {
        HeaderName::from_bytes(&input.bytes(12)).ok()
    }
}

fn header_value(input: &mut Input<'_>) -> Option<HeaderValue> {
    const VALUES: [&str; 12] = [
        "no-cache",
        "No-Store",
        "private",
        "max-age=0, private",
        "*",
        "accept, *",
        "x-theme",
        "upgrade",
        "0",
        "5",
        "a, b",
        "",
    ];
    if input.byte() < 128 {
        Some(HeaderValue::from_static(input.pick(&VALUES)))
    } else {
        HeaderValue::from_bytes(&input.bytes(24)).ok()
    }
}

fn spec(input: &mut Input<'_>) -> Spec {
    let method = match input.byte() {
        b if b < 250 => Method::from_bytes(input.pick(&METHODS).as_bytes()).unwrap(),
        _ => Method::from_bytes(&input.bytes(8)).unwrap_or(Method::GET),
    };
    let uri = match input.byte() {
        b if b < 224 => Uri::from_static(input.pick(&URIS)),
        _ => Uri::try_from(input.bytes(24)).unwrap_or_else(|_| Uri::from_static("/")),
    };
    let mut headers = Vec::new();
    for _ in 0..input.byte() % 10 {
        if let (Some(n), Some(v)) = (header_name(input, &REQUEST_NAMES), header_value(input)) {
            headers.push((n, v));
        }
    }
    let identity = (input.byte() % 3 == 0).then(|| input.bytes(4));
    let body = if input.byte() % 8 == 0 {
        input.bytes(8)
    } else {
        Vec::new()
    };
    Spec {
        method,
        uri,
        headers,
        identity,
        body,
    }
}

fn variant(base: &Spec, input: &mut Input<'_>) -> Spec {
    let mut s = base.clone();
    match input.byte() % 8 {
        0..=2 => {}
        3 => {
            if let (Some(n), Some(v)) = (header_name(input, &REQUEST_NAMES), header_value(input)) {
                s.headers.push((n, v));
            }
        }
        4 => {
            if !s.headers.is_empty() {
                let i = usize::from(input.byte()) % s.headers.len();
                s.headers.remove(i);
            }
        }
        5 => s.identity = (input.byte() % 2 == 0).then(|| input.bytes(4)),
        6 => s.method = Method::from_bytes(input.pick(&METHODS).as_bytes()).unwrap(),
        _ => {
            if !s.headers.is_empty() {
                let i = usize::from(input.byte()) % s.headers.len();
                let h = s.headers[i].clone();
                s.headers.push(h);
            }
        }
    }
    s
}

fn build(spec: &Spec) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from(spec.body.clone())));
    *req.method_mut() = spec.method.clone();
    *req.uri_mut() = spec.uri.clone();
    for (n, v) in &spec.headers {
        req.headers_mut().append(n.clone(), v.clone());
    }
    if let Some(id) = &spec.identity {
        req.extensions_mut().insert(Uid(id.clone()));
    }
    req
}

/// The backend's answer, the same for every call of an input.
#[derive(Clone, Debug)]
struct Answer {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    frames: Vec<Vec<u8>>,
    trailers: Option<HeaderMap>,
}

fn answer(input: &mut Input<'_>) -> Answer {
    const STATUSES: [u16; 8] = [200, 200, 203, 204, 304, 404, 500, 101];
    let status = if input.byte() < 240 {
        StatusCode::from_u16(input.pick(&STATUSES)).unwrap()
    } else {
        let raw = u16::from(input.byte()) * 4 + 100;
        StatusCode::from_u16(raw).unwrap_or(StatusCode::OK)
    };
    let mut headers = Vec::new();
    for _ in 0..input.byte() % 5 {
        if let (Some(n), Some(v)) = (header_name(input, &RESPONSE_NAMES), header_value(input)) {
            headers.push((n, v));
        }
    }
    let frames = (0..input.byte() % 5).map(|_| input.bytes(48)).collect();
    let trailers = (input.byte() % 4 == 0).then(|| {
        let mut t = HeaderMap::new();
        if let (Some(n), Some(v)) = (header_name(input, &["x-checksum"]), header_value(input)) {
            t.append(n, v);
        }
        t
    });
    Answer {
        status,
        headers,
        frames,
        trailers,
    }
}

/// A request as the backend received it.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    identity: Option<Vec<u8>>,
    body: Bytes,
}

fn seen_of(spec: &Spec) -> Seen {
    let (parts, _) = build(spec).into_parts();
    Seen {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        identity: spec.identity.clone(),
        body: Bytes::from(spec.body.clone()),
    }
}

/// Conditions written apart from the implementation; see `tests/http_hostile.rs`.
fn has_directive(h: &HeaderMap, name: &str, wanted: &[&str]) -> bool {
    h.get_all(name).iter().any(|v| match v.to_str() {
        Err(_) => true,
        Ok(v) => v.split(',').any(|d| {
            let d = d.split('=').next().unwrap_or("").trim();
            wanted.iter().any(|w| d.eq_ignore_ascii_case(w))
        }),
    })
}

fn credentials(h: &HeaderMap) -> bool {
    ["authorization", "cookie", "proxy-authorization"]
        .iter()
        .any(|n| h.contains_key(*n))
}

fn must_bypass(req: &Seen, with_identity: bool) -> Option<&'static str> {
    let h = &req.headers;
    if req.method != Method::GET && req.method != Method::HEAD {
        return Some("method");
    }
    if h.contains_key("range") {
        return Some("range");
    }
    if h.contains_key("upgrade") || has_directive(h, "connection", &["upgrade"]) {
        return Some("upgrade");
    }
    if has_directive(h, "cache-control", &["no-cache", "no-store"])
        || has_directive(h, "pragma", &["no-cache"])
    {
        return Some("no-cache");
    }
    let positive_length = h.get_all("content-length").iter().any(|v| {
        v.to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    });
    if positive_length || h.contains_key("transfer-encoding") || !req.body.is_empty() {
        return Some("body");
    }
    if credentials(h) && !(with_identity && req.identity.is_some()) {
        return Some("credentials");
    }
    None
}

fn must_not_share(status: StatusCode, h: &HeaderMap) -> Option<&'static str> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Some("101");
    }
    if h.contains_key("set-cookie") {
        return Some("set-cookie");
    }
    if has_directive(h, "cache-control", &["private", "no-store", "no-cache"]) {
        return Some("cache-control");
    }
    let stream = h.get_all("content-type").iter().any(|v| {
        v.as_bytes()
            .to_ascii_lowercase()
            .starts_with(b"text/event-stream")
    });
    if stream {
        return Some("event stream");
    }
    for v in h.get_all("vary") {
        let Ok(v) = v.to_str() else {
            return Some("unreadable vary");
        };
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" || HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Some("vary *");
            }
        }
    }
    None
}

fn values<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
    h.get_all(name).iter().map(HeaderValue::as_bytes).collect()
}

fn empty_is_none(t: Option<HeaderMap>) -> Option<HeaderMap> {
    t.filter(|t| !t.is_empty())
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
}

/// How the waiters of one input were served.
#[derive(Clone, Copy, Debug, Default)]
pub struct Served {
    /// Went straight to the backend.
    pub bypass: u64,
    /// Made the call for their key.
    pub leader: u64,
    /// Got a copy of another request's response.
    pub follower: u64,
    /// Joined, then made their own call (response not shareable with them).
    pub released: u64,
}

impl Served {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: Served) {
        self.bypass += other.bypass;
        self.leader += other.leader;
        self.follower += other.follower;
        self.released += other.released;
    }
}

/// Runs one input; panics on a violated rule.
pub fn check(data: &[u8]) -> Served {
    let mut input = Input(data);
    let flags = input.byte();
    let limit = [0usize, 16, 64, 4096][usize::from(flags & 3)];
    let with_identity = flags & 4 != 0;
    let base = spec(&mut input);
    let mut specs = vec![base.clone()];
    for _ in 0..input.byte() % 4 {
        specs.push(variant(&base, &mut input));
    }
    let answer = answer(&mut input);
    RUNTIME.with(|rt| rt.block_on(run(specs, answer, with_identity, limit)))
}

async fn run(specs: Vec<Spec>, answer: Answer, with_identity: bool, limit: usize) -> Served {
    let mut served = Served::default();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = Arc::clone(&seen);
    let reply = answer.clone();
    let backend = service_fn(move |req: Request<Full<Bytes>>| {
        let record = Arc::clone(&record);
        let reply = reply.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.expect("infallible").to_bytes();
            let id = {
                let mut record = record.lock().unwrap();
                record.push(Seen {
                    method: parts.method,
                    uri: parts.uri,
                    headers: parts.headers,
                    identity: parts.extensions.get::<Uid>().map(|u| u.0.clone()),
                    body,
                });
                record.len() - 1
            };
            let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = reply
                .frames
                .iter()
                .map(|f| Ok(Frame::data(Bytes::from(f.clone()))))
                .collect();
            if let Some(t) = reply.trailers.clone() {
                frames.push(Ok(Frame::trailers(t)));
            }
            let mut res = Response::new(StreamBody::new(futures::stream::iter(frames)));
            *res.status_mut() = reply.status;
            for (n, v) in &reply.headers {
                res.headers_mut().append(n.clone(), v.clone());
            }
            res.headers_mut().insert("x-call", HeaderValue::from(id));
            Ok::<_, Infallible>(res)
        }
    });
    let mut layer = CoalesceHttpLayer::new().max_body_bytes(limit);
    if with_identity {
        layer = layer.identity(|parts: &http::request::Parts| {
            parts.extensions.get::<Uid>().map(|u| u.0.clone())
        });
    }
    let mut svc = layer.layer(backend);
    let calls: Vec<_> = specs.iter().map(|s| svc.call(build(s))).collect();
    let all = async {
        let mut out = Vec::new();
        for res in futures::future::join_all(calls).await {
            let res = res.expect("infallible");
            let served_by = *res.extensions().get::<ServedBy>().expect("ServedBy is set");
            let (parts, body) = res.into_parts();
            let collected = body.collect().await.expect("infallible");
            let trailers = collected.trailers().cloned();
            out.push((served_by, parts, collected.to_bytes(), trailers));
        }
        out
    };
    let outcomes = tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect("a waiter hung");
    assert_eq!(svc.in_flight(), 0, "a flight outlived its waiters");
    assert_eq!(svc.waiting(), 0, "a follower is still counted as waiting");

    let seen = seen.lock().unwrap().clone();
    let whole: Vec<u8> = answer.frames.concat();
    for (spec, (served_by, parts, body, trailers)) in specs.iter().zip(outcomes) {
        let mine = seen_of(spec);
        let id: usize = parts
            .headers
            .get("x-call")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("every response comes from the backend");
        let made_for = &seen[id];
        match served_by {
            ServedBy::Bypass => served.bypass += 1,
            ServedBy::Leader => served.leader += 1,
            ServedBy::Follower => served.follower += 1,
            _ => served.released += 1,
        }
        assert_eq!(parts.status, answer.status);
        assert_eq!(
            body, whole,
            "body lost, truncated or altered ({served_by:?})"
        );
        assert_eq!(
            empty_is_none(trailers),
            empty_is_none(answer.trailers.clone()),
            "trailers lost or altered ({served_by:?})"
        );
        match served_by {
            ServedBy::Follower => {
                if let Some(why) = must_not_share(parts.status, &parts.headers) {
                    panic!("a follower got a response that must not be shared: {why}");
                }
                assert!(body.len() <= limit, "a follower got a body over the limit");
                assert_eq!(made_for.method, mine.method);
                assert_eq!(made_for.uri, mine.uri);
                for name in KEYED {
                    assert_eq!(
                        values(&made_for.headers, name),
                        values(&mine.headers, name),
                        "key header {name} differs"
                    );
                }
                if with_identity {
                    assert_eq!(made_for.identity, mine.identity, "identity differs");
                }
                let vary = parts
                    .headers
                    .get_all("vary")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                    .collect::<Vec<_>>();
                for name in vary {
                    assert_eq!(
                        values(&made_for.headers, name.as_str()),
                        values(&mine.headers, name.as_str()),
                        "Vary-named header {name} differs"
                    );
                }
            }
            other => assert_eq!(
                made_for, &mine,
                "{other:?} got a response made for another request"
            ),
        }
        if let Some(why) = must_bypass(&mine, with_identity) {
            assert_eq!(served_by, ServedBy::Bypass, "must bypass ({why})");
        }
    }
    served
}
