//! Which gRPC calls may be coalesced, and the key that says two calls are the same.
//!
//! A call gets a key only if every rule below lets it; otherwise it bypasses the layer. The key
//! holds the parts themselves, compared byte for byte, never a digest of them: two calls share
//! a response only if everything the key covers is equal.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::Method;

use super::layer::{DEFAULT_REQUEST_LIMIT, DEFAULT_RESPONSE_LIMIT};
use crate::http::key::has_directive;

/// Extracts the caller identity part of the key.
pub(crate) type IdentityFn = Arc<dyn Fn(&Parts) -> Option<Bytes> + Send + Sync>;

/// The options of [`CoalesceGrpcLayer`](super::CoalesceGrpcLayer), shared by all its services.
#[derive(Clone)]
pub(crate) struct Config {
    /// Full method paths (`/package.Service/Method`) that may be coalesced.
    pub(crate) methods: HashSet<Box<str>>,
    /// The methods whose calls count as writes; `None`: every method not in `methods`.
    pub(crate) write_methods: Option<HashSet<Box<str>>>,
    /// Request metadata whose values become part of the key.
    pub(crate) metadata: Vec<HeaderName>,
    pub(crate) identity: Option<IdentityFn>,
    pub(crate) request_limit: usize,
    pub(crate) response_limit: usize,
    pub(crate) detached: bool,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) max_followers: Option<usize>,
    pub(crate) follower_timeout: Option<Duration>,
}

impl Config {
    pub(crate) fn new() -> Self {
        Config {
            methods: HashSet::new(),
            write_methods: None,
            metadata: Vec::new(),
            identity: None,
            request_limit: DEFAULT_REQUEST_LIMIT,
            response_limit: DEFAULT_RESPONSE_LIMIT,
            detached: false,
            max_in_flight: None,
            max_followers: None,
            follower_timeout: None,
        }
    }
}

impl Config {
    /// Whether a call to `path`, which bypassed the layer as not allow-listed, is a write.
    pub(crate) fn writes(&self, path: &str) -> bool {
        self.write_methods
            .as_ref()
            .is_none_or(|named| named.contains(path))
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut methods: Vec<_> = self.methods.iter().collect();
        methods.sort();
        f.debug_struct("Config")
            .field("methods", &methods)
            .field(
                "write_methods",
                &self.write_methods.as_ref().map(HashSet::len),
            )
            .field("metadata", &self.metadata)
            .field("identity", &self.identity.is_some())
            .field("request_limit", &self.request_limit)
            .field("response_limit", &self.response_limit)
            .field("detached", &self.detached)
            .finish()
    }
}

/// Metadata that carries credentials. A response to such a call may depend on who asked, so
/// the call is coalesced only when an identity key part tells callers apart.
const CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
];

/// The key of a gRPC call: everything about the request that may change the response.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct GrpcKey {
    head: KeyHead,
    /// The whole request body: the length-prefixed message(s), compressed or not as sent.
    message: Bytes,
}

impl GrpcKey {
    pub(crate) fn new(head: KeyHead, message: Bytes) -> Self {
        GrpcKey { head, message }
    }
}

impl fmt::Debug for GrpcKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Neither the message nor the metadata values: they may be sensitive.
        f.debug_struct("GrpcKey")
            .field("path", &self.head.path)
            .field("message_len", &self.message.len())
            .finish_non_exhaustive()
    }
}

/// The part of the key known from the request head, before the body is read.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct KeyHead {
    /// Path (and query, which gRPC never sends but which must not be ignored if present).
    path: Box<str>,
    /// `:authority` and `Host`: the inner service may serve several virtual hosts.
    authority: Option<http::uri::Authority>,
    /// The authority's userinfo, byte for byte (`Authority` compares ignoring case).
    userinfo: Option<Box<str>>,
    host: Box<[HeaderValue]>,
    /// `application/grpc` vs `application/grpc+json` and the like: the message format.
    content_type: HeaderValue,
    /// How the request message is compressed.
    encoding: Box<[HeaderValue]>,
    /// Which compressions the caller can read: the server picks the response's from these.
    accept_encoding: Box<[HeaderValue]>,
    /// HTTP-level content negotiation, in case a compression layer sits below this one.
    http_accept_encoding: Box<[HeaderValue]>,
    /// The configured metadata, in configuration order, every value of each.
    metadata: Box<[Box<[HeaderValue]>]>,
    identity: Option<Bytes>,
    /// How many calls of methods not allow-listed had had their response when this call came
    /// (`Shared::writes`): it joins only flights that came after the same writes.
    writes: u64,
}

impl KeyHead {
    /// This key, for a call made once `writes` writes had their response.
    pub(crate) fn after_writes(mut self, writes: u64) -> Self {
        self.writes = writes;
        self
    }
}

/// Why a call was not given a key (for tests and diagnostics).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Bypass {
    /// Not a `POST`: not a gRPC call.
    NotPost,
    /// The method path is not allow-listed (every streaming method falls here).
    NotAllowed,
    /// `Content-Type` is not `application/grpc` or `application/grpc+<format>` (gRPC-Web,
    /// plain HTTP).
    NotGrpc,
    /// Credentials present and no identity told callers apart.
    Credentials,
    /// The caller asked for a fresh answer (`Cache-Control: no-cache`/`no-store`,
    /// `Pragma: no-cache`).
    NoCache,
}

/// Applies the bypass rules to a request head; `Ok` holds the head's part of the key.
pub(crate) fn classify(config: &Config, parts: &Parts) -> Result<KeyHead, Bypass> {
    if parts.method != Method::POST {
        return Err(Bypass::NotPost);
    }
    if !config.methods.contains(parts.uri.path()) {
        return Err(Bypass::NotAllowed);
    }
    let headers = &parts.headers;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        Some(ct)
            if is_grpc_content_type(ct)
                && headers.get_all(header::CONTENT_TYPE).iter().count() == 1 =>
        {
            ct.clone()
        }
        _ => return Err(Bypass::NotGrpc),
    };
    if asks_for_fresh(headers) {
        return Err(Bypass::NoCache);
    }
    let identity = config
        .identity
        .as_ref()
        .and_then(|identify| identify(parts));
    let userinfo = crate::http::key::userinfo(&parts.uri);
    let has_credentials =
        CREDENTIALS.iter().any(|name| headers.contains_key(name)) || userinfo.is_some();
    if has_credentials && identity.is_none() {
        return Err(Bypass::Credentials);
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    Ok(KeyHead {
        path: path.into(),
        authority: parts.uri.authority().cloned(),
        userinfo: userinfo.map(Into::into),
        host: values(headers, &header::HOST),
        content_type,
        encoding: values(headers, &GRPC_ENCODING),
        accept_encoding: values(headers, &GRPC_ACCEPT_ENCODING),
        http_accept_encoding: values(headers, &header::ACCEPT_ENCODING),
        metadata: config
            .metadata
            .iter()
            .map(|name| values(headers, name))
            .collect(),
        identity,
        writes: 0,
    })
}

const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");

fn values(headers: &HeaderMap, name: &HeaderName) -> Box<[HeaderValue]> {
    headers.get_all(name).iter().cloned().collect()
}

/// `application/grpc`, optionally followed by `+<format>` or `;<parameters>`. gRPC-Web
/// (`application/grpc-web…`) is not: its responses carry their status inside the body. Put
/// the layer inside the gRPC-Web translation layer to coalesce such calls.
pub(crate) fn is_grpc_content_type(value: &HeaderValue) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    let bytes = value.as_bytes();
    bytes.len() >= GRPC.len()
        && bytes[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(bytes.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// Whether the call asks for a fresh answer (`no-cache`, `no-store`), read as the HTTP layer
/// reads it: a malformed field counts as asking.
fn asks_for_fresh(headers: &HeaderMap) -> bool {
    has_directive(headers, &header::CACHE_CONTROL, &["no-cache", "no-store"])
        || has_directive(headers, &header::PRAGMA, &["no-cache"])
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    const GET: &str = "/catalog.v1.Catalog/GetItem";

    fn config() -> Config {
        let mut config = Config::new();
        config.methods.insert(GET.into());
        config
    }

    fn request(path: &str) -> http::request::Builder {
        Request::post(format!("http://example.test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
    }

    fn head(config: &Config, req: http::request::Builder) -> Result<KeyHead, Bypass> {
        let (parts, ()) = req.body(()).unwrap().into_parts();
        classify(config, &parts)
    }

    fn key(config: &Config, req: http::request::Builder, message: &'static [u8]) -> GrpcKey {
        GrpcKey::new(head(config, req).unwrap(), Bytes::from_static(message))
    }

    #[test]
    fn only_allow_listed_unary_posts_are_keyed() {
        let config = config();
        assert!(head(&config, request(GET)).is_ok());
        assert_eq!(
            head(&config, request("/catalog.v1.Catalog/WatchItem")).err(),
            Some(Bypass::NotAllowed)
        );
        assert_eq!(
            head(&config, request("/catalog.v1.Catalog/GetItem/")).err(),
            Some(Bypass::NotAllowed),
            "paths match exactly"
        );
        let get = Request::get(format!("http://example.test{GET}"))
            .header("content-type", "application/grpc");
        assert_eq!(head(&config, get).err(), Some(Bypass::NotPost));
        assert_eq!(
            head(&Config::new(), request(GET)).err(),
            Some(Bypass::NotAllowed)
        );
    }

    #[test]
    fn content_type_must_be_grpc() {
        let config = config();
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc;charset=utf-8",
        ] {
            let req = Request::post(GET).header("content-type", ok);
            assert!(head(&config, req).is_ok(), "{ok}");
        }
        for bad in [
            "application/grpc-web",
            "application/grpc-web-text",
            "application/json",
            "application/grpcx",
            "text/plain",
        ] {
            let req = Request::post(GET).header("content-type", bad);
            assert_eq!(head(&config, req).err(), Some(Bypass::NotGrpc), "{bad}");
        }
        assert_eq!(
            head(&config, Request::post(GET)).err(),
            Some(Bypass::NotGrpc)
        );
        let twice = request(GET).header("content-type", "application/grpc+json");
        assert_eq!(head(&config, twice).err(), Some(Bypass::NotGrpc));
    }

    #[test]
    fn credentials_bypass_without_an_identity() {
        let config = config();
        for name in ["authorization", "cookie", "proxy-authorization"] {
            let req = request(GET).header(name, "secret");
            assert_eq!(
                head(&config, req).err(),
                Some(Bypass::Credentials),
                "{name}"
            );
        }
    }

    #[test]
    fn identity_becomes_part_of_the_key() {
        let mut config = config();
        config.identity = Some(Arc::new(|parts: &Parts| {
            parts
                .headers
                .get("x-user")
                .map(|v| Bytes::copy_from_slice(v.as_bytes()))
        }));
        let alice = || {
            request(GET)
                .header("authorization", "Bearer a")
                .header("x-user", "alice")
        };
        let bob = request(GET)
            .header("authorization", "Bearer b")
            .header("x-user", "bob");
        assert!(key(&config, alice(), b"m") == key(&config, alice(), b"m"));
        assert!(key(&config, alice(), b"m") != key(&config, bob, b"m"));
        // Credentials the identity cannot vouch for still bypass.
        let unknown = request(GET).header("authorization", "Bearer ?");
        assert_eq!(head(&config, unknown).err(), Some(Bypass::Credentials));
        // Anonymous calls stay coalescable, apart from identified ones.
        let anonymous = key(&config, request(GET), b"m");
        assert!(anonymous != key(&config, alice(), b"m"));
    }

    #[test]
    fn no_cache_requests_bypass() {
        let config = config();
        for (name, value) in [
            ("cache-control", "no-cache"),
            ("cache-control", "max-age=0, No-Store"),
            ("pragma", "no-cache"),
        ] {
            let req = request(GET).header(name, value);
            assert_eq!(
                head(&config, req).err(),
                Some(Bypass::NoCache),
                "{name}: {value}"
            );
        }
        assert!(head(&config, request(GET).header("cache-control", "max-age=0")).is_ok());
    }

    #[test]
    fn key_covers_message_encodings_and_configured_metadata() {
        let mut config = config();
        config.metadata.push(HeaderName::from_static("x-tenant"));
        let base = key(&config, request(GET), b"\0\0\0\0\x02hi");
        assert!(base == key(&config, request(GET), b"\0\0\0\0\x02hi"));
        assert!(
            base == key(
                &config,
                request(GET).header("x-request-id", "7"),
                b"\0\0\0\0\x02hi"
            ),
            "metadata that is not configured is not part of the key"
        );
        let differs = [
            key(&config, request(GET), b"\0\0\0\0\x02ho"),
            key(
                &config,
                request(GET).header("grpc-encoding", "gzip"),
                b"\0\0\0\0\x02hi",
            ),
            key(
                &config,
                request(GET).header("grpc-accept-encoding", "gzip"),
                b"\0\0\0\0\x02hi",
            ),
            key(
                &config,
                request(GET).header("accept-encoding", "gzip"),
                b"\0\0\0\0\x02hi",
            ),
            key(
                &config,
                request(GET).header("x-tenant", "a"),
                b"\0\0\0\0\x02hi",
            ),
            key(
                &config,
                Request::post(format!("http://other.test{GET}"))
                    .header("content-type", "application/grpc"),
                b"\0\0\0\0\x02hi",
            ),
            key(
                &config,
                Request::post(GET).header("content-type", "application/grpc+json"),
                b"\0\0\0\0\x02hi",
            ),
        ];
        for (i, other) in differs.iter().enumerate() {
            assert!(&base != other, "variant {i} must not share a key");
        }
        let a = key(&config, request(GET).header("x-tenant", "a"), b"m");
        let ab = key(
            &config,
            request(GET).header("x-tenant", "a").header("x-tenant", "b"),
            b"m",
        );
        assert!(a != ab, "every value of a configured key counts");
    }
}
