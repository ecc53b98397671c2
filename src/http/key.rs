//! Request rules: which requests may be coalesced, and the key they are coalesced under.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Uri};
use http_body::Body;

use super::body::content_length;

/// Everything a response may depend on, as far as the layer knows. Compared field by field,
/// never reduced to a hash: two requests share a response only if their keys are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    method: Method,
    /// Scheme, authority, path and query (HTTP/1 servers see only path and query here; the
    /// authority then comes from `Host`, which is among `headers`).
    uri: Uri,
    /// The values of every keyed header present, in the layer's order, each with its name so
    /// that values cannot slide from one header to the next.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The URI's userinfo, byte for byte: `Uri` compares authorities ignoring case, right for
    /// the host but not for credentials.
    userinfo: Option<Box<str>>,
    identity: Option<Bytes>,
    /// The writes to this URI seen so far ([`Writes`]): a read made after a write's response
    /// never joins a flight that started before it.
    writes: u64,
}

/// Writes that went through the layer, counted per target URI: an unsafe request (not `GET`,
/// `HEAD`, `OPTIONS`, `TRACE`) answered with a non-error status invalidates its URI (RFC 9111
/// §4.4), and a read's key holds its URI's count, so that it starts a new flight rather than
/// join one made before the write. Counted by the URI's hash in a fixed table (shared by a
/// layer's services): a collision only keeps some reads from joining older flights.
pub(crate) struct Writes([AtomicU64; WRITE_SLOTS]);

const WRITE_SLOTS: usize = 1024;

impl Writes {
    /// The slot of `parts`'s target URI: its host (from the URI or `Host`; lower case, without
    /// userinfo or a default port, so that every spelling of one URI (RFC 9110 §4.2.3) meets
    /// in one slot), path and query.
    fn slot(parts: &Parts) -> usize {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().as_bytes())
            .or_else(|| parts.headers.get(header::HOST).map(HeaderValue::as_bytes))
            .unwrap_or_default();
        let host = match authority.iter().rposition(|&b| b == b'@') {
            Some(at) => &authority[at + 1..],
            None => authority,
        };
        let host = [&b":80"[..], b":443"]
            .iter()
            .find_map(|port| host.strip_suffix(*port))
            .unwrap_or(host);
        let mut hasher = foldhash::fast::FixedState::default().build_hasher();
        for byte in host {
            hasher.write_u8(byte.to_ascii_lowercase());
        }
        hasher.write_u8(0xff);
        hasher.write(
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        );
        hasher.finish() as usize % WRITE_SLOTS
    }

    /// The count a read of `parts`'s URI keys on.
    pub(crate) fn seen(&self, parts: &Parts) -> u64 {
        self.0[Self::slot(parts)].load(Ordering::Acquire)
    }

    /// The slot a request writes to when it succeeds, if its method is unsafe.
    pub(crate) fn write_slot(parts: &Parts) -> Option<usize> {
        let safe = [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE];
        (!safe.contains(&parts.method)).then(|| Self::slot(parts))
    }

    /// Records a write to `slot` if its response had a non-error status.
    pub(crate) fn wrote(&self, slot: usize, status: http::StatusCode) {
        if status.is_success() || status.is_redirection() {
            self.0[slot].fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Default for Writes {
    fn default() -> Self {
        Writes(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl fmt::Debug for Writes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writes").finish_non_exhaustive()
    }
}

/// Why a request went straight to the inner service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bypass {
    /// Its method is not one the layer coalesces (or is `CONNECT`).
    Method,
    /// It carries `Authorization`, `Cookie` or `Proxy-Authorization` and no identity was
    /// configured, or the identity function returned `None` for it.
    Credentials,
    /// It asks for part of a representation (`Range`).
    Range,
    /// It asks to switch protocols (`Upgrade`, `Connection: upgrade`).
    Upgrade,
    /// It asks not to be served from a cache (`Cache-Control: no-cache|no-store`,
    /// `Pragma: no-cache`).
    NoCache,
    /// It has a body, which the key does not cover.
    Body,
}

impl Bypass {
    /// RFC 9211 `fwd` and `detail` values for a `Cache-Status` entry.
    pub(crate) fn cache_status(self) -> (&'static str, &'static str) {
        match self {
            Bypass::Method => ("method", "method"),
            Bypass::Credentials => ("bypass", "credentials"),
            Bypass::Range => ("bypass", "range"),
            Bypass::Upgrade => ("bypass", "upgrade"),
            Bypass::NoCache => ("request", "no-cache"),
            Bypass::Body => ("bypass", "body"),
        }
    }
}

pub(crate) type IdentityFn = Arc<dyn Fn(&Parts) -> Option<Bytes> + Send + Sync>;

/// Headers always in the key whatever the configuration: conditional requests get different
/// answers (`304`, `412`, `206`), and the authority may arrive through a proxy's headers.
/// Leaving `X-Forwarded-Host` out would let one client poison the links in everybody's page;
/// `X-Forwarded-Port` and `X-Forwarded-Prefix` go into absolute links and redirects the same way.
pub(crate) const ALWAYS_KEYED: [HeaderName; 11] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::HOST,
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
];

/// The configurable part of the keyed headers, by default.
pub(crate) const DEFAULT_KEY_HEADERS: [HeaderName; 3] = [
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::ACCEPT_LANGUAGE,
];

/// The request-side options of the layer.
#[derive(Clone)]
pub(crate) struct KeyRules {
    pub(crate) methods: Vec<Method>,
    /// Configured key headers followed by [`ALWAYS_KEYED`], without duplicates.
    pub(crate) headers: Vec<HeaderName>,
    pub(crate) identity: Option<IdentityFn>,
}

impl Default for KeyRules {
    fn default() -> Self {
        let mut rules = KeyRules {
            methods: vec![Method::GET, Method::HEAD],
            headers: Vec::new(),
            identity: None,
        };
        rules.set_headers(DEFAULT_KEY_HEADERS);
        rules
    }
}

impl fmt::Debug for KeyRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRules")
            .field("methods", &self.methods)
            .field("headers", &self.headers)
            .field("identity", &self.identity.as_ref().map(|_| "fn"))
            .finish()
    }
}

impl KeyRules {
    /// Replaces the configured key headers; [`ALWAYS_KEYED`] stay.
    pub(crate) fn set_headers(&mut self, names: impl IntoIterator<Item = HeaderName>) {
        self.headers.clear();
        for name in names.into_iter().chain(ALWAYS_KEYED) {
            if !self.headers.contains(&name) {
                self.headers.push(name);
            }
        }
    }

    /// Adds one key header.
    pub(crate) fn add_header(&mut self, name: HeaderName) {
        if !self.headers.contains(&name) {
            self.headers.push(name);
        }
    }

    /// The key `parts` and `body` are coalesced under, or why they must bypass.
    pub(crate) fn classify<B: Body>(
        &self,
        parts: &Parts,
        body: &B,
        writes: &Writes,
    ) -> Result<Key, Bypass> {
        if parts.method == Method::CONNECT || !self.methods.contains(&parts.method) {
            return Err(Bypass::Method);
        }
        let headers = &parts.headers;
        if headers.contains_key(header::UPGRADE)
            || has_token(headers, &header::CONNECTION, "upgrade")
        {
            return Err(Bypass::Upgrade);
        }
        if headers.contains_key(header::RANGE) {
            return Err(Bypass::Range);
        }
        if has_directive(headers, &header::CACHE_CONTROL, &["no-cache", "no-store"])
            || has_directive(headers, &header::PRAGMA, &["no-cache"])
        {
            return Err(Bypass::NoCache);
        }
        if content_length(headers).is_some_and(|len| len > 0)
            || headers.contains_key(header::CONTENT_LENGTH) && content_length(headers).is_none()
            || headers.contains_key(header::TRANSFER_ENCODING)
            || body.size_hint().exact() != Some(0)
        {
            return Err(Bypass::Body);
        }
        let userinfo = userinfo(&parts.uri);
        let credentials = headers.contains_key(header::AUTHORIZATION)
            || headers.contains_key(header::COOKIE)
            || headers.contains_key(header::PROXY_AUTHORIZATION)
            || userinfo.is_some();
        let identity = self.identity.as_ref().and_then(|identify| identify(parts));
        if credentials && identity.is_none() {
            return Err(Bypass::Credentials);
        }
        let mut keyed = Vec::new();
        for name in &self.headers {
            for value in headers.get_all(name) {
                keyed.push((name.clone(), value.clone()));
            }
        }
        Ok(Key {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: keyed,
            userinfo: userinfo.map(Into::into),
            identity,
            writes: writes.seen(parts),
        })
    }
}

/// The userinfo of `uri`'s authority (`user:password` in `http://user:password@host/`):
/// credentials, like `Authorization`.
pub(crate) fn userinfo(uri: &Uri) -> Option<&str> {
    let authority = uri.authority()?.as_str();
    authority.rsplit_once('@').map(|(userinfo, _)| userinfo)
}

/// Whether a comma-separated header (all its lines) has `token`, case-insensitively.
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    has_directive(headers, name, &[token])
}

/// The directives of one `Cache-Control` value: split on the commas outside quoted strings, so
/// that an argument such as `ext="a, s-maxage=60"` is not read as a directive.
pub(crate) fn split_directives(value: &str) -> impl Iterator<Item = &str> {
    let mut bytes = value.bytes().enumerate();
    let (mut start, mut quoted, mut escaped, mut done) = (0, false, false, false);
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        for (i, byte) in bytes.by_ref() {
            match byte {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b',' if !quoted => {
                    let directive = &value[start..i];
                    start = i + 1;
                    return Some(directive);
                }
                _ => {}
            }
        }
        done = true;
        Some(&value[start..])
    })
}

/// Whether a comma-separated directive list (`Cache-Control`, `Pragma`, `Connection`) has one
/// of `wanted`, case-insensitively, with or without an argument. A value that is not visible
/// ASCII, or not a well-formed list, counts as a match: when unsure, do not share. (A quote
/// left open or a missing comma would otherwise hide a `private` or `no-store` after it.)
pub(crate) fn has_directive(headers: &HeaderMap, name: &HeaderName, wanted: &[&str]) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|value| match value.to_str() {
            Ok(value) => {
                !well_formed(value)
                    || split_directives(value).any(|directive| {
                        let name = directive.split('=').next().unwrap_or("").trim();
                        wanted.iter().any(|w| name.eq_ignore_ascii_case(w))
                    })
            }
            Err(_) => true,
        })
}

/// Whether `value` is a list of directives as RFC 9110 §5.6 and RFC 9111 §5.2 write them:
/// `token [ "=" ( token / quoted-string ) ]`, separated by commas, empty elements and
/// whitespace around the commas (and, leniently, around `=`) allowed.
pub(crate) fn well_formed(value: &str) -> bool {
    let bytes = value.as_bytes();
    let mut at = 0;
    loop {
        at = skip_space(bytes, at);
        match bytes.get(at) {
            None => return true,
            Some(b',') => {
                at += 1;
                continue;
            }
            Some(_) => {}
        }
        let Some(end) = token(bytes, at) else {
            return false;
        };
        at = skip_space(bytes, end);
        if bytes.get(at) == Some(&b'=') {
            at = skip_space(bytes, at + 1);
            let argument = match bytes.get(at) {
                Some(b'"') => quoted_string(bytes, at),
                _ => token(bytes, at),
            };
            let Some(end) = argument else {
                return false;
            };
            at = skip_space(bytes, end);
        }
        match bytes.get(at) {
            None => return true,
            Some(b',') => at += 1,
            Some(_) => return false,
        }
    }
}

fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    while matches!(bytes.get(at), Some(b' ' | b'\t')) {
        at += 1;
    }
    at
}

/// The end of the token (RFC 9110 §5.6.2) that begins at `start`, if one does.
fn token(bytes: &[u8], start: usize) -> Option<usize> {
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let len = bytes.get(start..)?.iter().take_while(|b| tchar(b)).count();
    (len > 0).then_some(start + len)
}

/// The end of the quoted string (RFC 9110 §5.6.4) that begins at `start` (a `"`), if it closes.
fn quoted_string(bytes: &[u8], start: usize) -> Option<usize> {
    let mut at = start + 1;
    loop {
        match *bytes.get(at)? {
            b'"' => return Some(at + 1),
            b'\\' => {
                let escaped = *bytes.get(at + 1)?;
                if escaped != b'\t' && !(b' '..=b'~').contains(&escaped) {
                    return None;
                }
                at += 2;
            }
            b'\t' | b' '..=b'~' => at += 1,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full};

    fn parts(req: http::request::Builder) -> Parts {
        req.body(()).unwrap().into_parts().0
    }

    fn get(uri: &str) -> http::request::Builder {
        http::Request::get(uri)
    }

    fn key(rules: &KeyRules, req: http::request::Builder) -> Result<Key, Bypass> {
        rules.classify(&parts(req), &Empty::<Bytes>::new(), &Writes::default())
    }

    #[test]
    fn get_and_head_are_coalesced_separately_by_default() {
        let rules = KeyRules::default();
        let g = key(&rules, get("/a")).unwrap();
        let h = key(&rules, http::Request::head("/a")).unwrap();
        assert_ne!(g, h);
        assert_eq!(g, key(&rules, get("/a")).unwrap());
    }

    #[test]
    fn other_methods_bypass() {
        let rules = KeyRules::default();
        for m in [
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
        ] {
            let req = http::Request::builder().method(m.clone()).uri("/a");
            assert_eq!(key(&rules, req), Err(Bypass::Method), "{m}");
        }
    }

    #[test]
    fn connect_bypasses_even_when_configured() {
        let rules = KeyRules {
            methods: vec![Method::CONNECT, Method::GET],
            ..KeyRules::default()
        };
        let req = http::Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:443");
        assert_eq!(key(&rules, req), Err(Bypass::Method));
    }

    #[test]
    fn configured_methods_are_coalesced() {
        let rules = KeyRules {
            methods: vec![Method::OPTIONS],
            ..KeyRules::default()
        };
        let req = http::Request::builder().method(Method::OPTIONS).uri("/a");
        assert!(key(&rules, req).is_ok());
        assert_eq!(key(&rules, get("/a")), Err(Bypass::Method));
    }

    #[test]
    fn path_query_and_authority_are_in_the_key() {
        let rules = KeyRules::default();
        let k = |r| key(&rules, r).unwrap();
        assert_ne!(k(get("/a")), k(get("/b")));
        assert_ne!(k(get("/a?x=1")), k(get("/a?x=2")));
        assert_ne!(k(get("/a")), k(get("/a?")));
        assert_ne!(k(get("http://one.test/a")), k(get("http://two.test/a")));
        assert_ne!(k(get("http://one.test/a")), k(get("https://one.test/a")));
        assert_ne!(
            k(get("/a").header("host", "one.test")),
            k(get("/a").header("host", "two.test"))
        );
    }

    #[test]
    fn forwarding_headers_are_in_the_key() {
        let rules = KeyRules::default();
        let k = |r| key(&rules, r).unwrap();
        for name in [
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "forwarded",
        ] {
            assert_ne!(
                k(get("/a")),
                k(get("/a").header(name, "evil.test")),
                "{name}"
            );
        }
    }

    #[test]
    fn default_key_headers_are_in_the_key() {
        let rules = KeyRules::default();
        let k = |r| key(&rules, r).unwrap();
        for name in ["accept", "accept-encoding", "accept-language"] {
            assert_ne!(
                k(get("/a").header(name, "x")),
                k(get("/a").header(name, "y")),
                "{name}"
            );
            assert_ne!(k(get("/a")), k(get("/a").header(name, "y")), "{name}");
        }
        // Headers outside the key do not split flights.
        assert_eq!(
            k(get("/a").header("user-agent", "x")),
            k(get("/a").header("user-agent", "y"))
        );
    }

    #[test]
    fn conditional_headers_are_always_in_the_key() {
        let mut rules = KeyRules::default();
        rules.set_headers([]);
        let k = |r| key(&rules, r).unwrap();
        for name in [
            "if-none-match",
            "if-modified-since",
            "if-match",
            "if-unmodified-since",
            "if-range",
        ] {
            assert_ne!(k(get("/a")), k(get("/a").header(name, "\"v1\"")), "{name}");
            assert_ne!(
                k(get("/a").header(name, "\"v1\"")),
                k(get("/a").header(name, "\"v2\"")),
                "{name}"
            );
        }
        // Configured-away headers no longer split flights.
        assert_eq!(
            k(get("/a").header("accept", "x")),
            k(get("/a").header("accept", "y"))
        );
    }

    #[test]
    fn configured_key_header_and_value_boundaries() {
        let mut rules = KeyRules::default();
        rules.add_header(HeaderName::from_static("x-tenant"));
        let k = |r| key(&rules, r).unwrap();
        assert_ne!(
            k(get("/a").header("x-tenant", "a")),
            k(get("/a").header("x-tenant", "b"))
        );
        // Two values of one header differ from one value in each of two headers.
        assert_ne!(
            k(get("/a").header("accept", "a").header("accept", "b")),
            k(get("/a")
                .header("accept", "a")
                .header("accept-language", "b")),
        );
        // Order of repeated values matters (it can change the response).
        assert_ne!(
            k(get("/a").header("accept", "a").header("accept", "b")),
            k(get("/a").header("accept", "b").header("accept", "a")),
        );
    }

    #[test]
    fn credentials_bypass_without_identity() {
        let rules = KeyRules::default();
        for name in ["authorization", "cookie", "proxy-authorization"] {
            assert_eq!(
                key(&rules, get("/a").header(name, "secret")),
                Err(Bypass::Credentials),
                "{name}"
            );
        }
        assert_eq!(
            key(&rules, get("http://alice:secret@one.test/me")),
            Err(Bypass::Credentials),
            "a password in the URI"
        );
    }

    /// `Uri` compares the authority ignoring case: right for the host, not for userinfo.
    #[test]
    fn userinfo_is_keyed_byte_for_byte_and_the_host_ignoring_case() {
        let rules = KeyRules {
            identity: Some(Arc::new(|_: &Parts| Some(Bytes::from_static(b"same")))),
            ..KeyRules::default()
        };
        let k = |uri| key(&rules, get(uri)).unwrap();
        assert_ne!(
            k("http://alice:secret@one.test/me"),
            k("http://alice:SECRET@one.test/me")
        );
        assert_eq!(
            k("http://alice:secret@one.test/me"),
            k("http://alice:secret@ONE.test/me")
        );
        assert_ne!(k("http://alice@one.test/me"), k("http://one.test/me"));
    }

    #[test]
    fn identity_keys_credentialed_requests_and_none_bypasses() {
        let rules = KeyRules {
            identity: Some(Arc::new(|parts: &Parts| {
                parts
                    .headers
                    .get("x-user")
                    .map(|v| Bytes::copy_from_slice(v.as_bytes()))
            })),
            ..KeyRules::default()
        };
        let k = |r| key(&rules, r);
        let alice = k(get("/a")
            .header("authorization", "a")
            .header("x-user", "alice"))
        .unwrap();
        let bob = k(get("/a")
            .header("authorization", "b")
            .header("x-user", "bob"))
        .unwrap();
        assert_ne!(alice, bob);
        assert_eq!(
            alice,
            k(get("/a").header("cookie", "c").header("x-user", "alice")).unwrap()
        );
        assert_eq!(
            k(get("/a").header("authorization", "a")),
            Err(Bypass::Credentials)
        );
        // Anonymous requests are keyed with no identity, apart from every identified one.
        let anonymous = k(get("/a")).unwrap();
        assert_ne!(anonymous, alice);
        assert_eq!(anonymous, k(get("/a")).unwrap());
    }

    #[test]
    fn directive_lists_are_read_strictly() {
        for good in [
            "",
            "max-age=60",
            " public , max-age=60 ,, s-maxage=\"30\"",
            "no-cache=\"set-cookie, x-user\"",
            "ext=\"a \\\" b\", private",
            "max-age = 60",
        ] {
            assert!(well_formed(good), "{good:?}");
        }
        for bad in [
            "max-age=60, x=\"unterminated, private",
            "a\"b, private",
            "ext=\"a\\\", no-store",
            "private max-age=60",
            "private;x=1",
            "\"private\"",
            "max-age=",
            "=60",
            "x=\"a\" y",
        ] {
            assert!(!well_formed(bad), "{bad:?}");
            let mut headers = HeaderMap::new();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_str(bad).unwrap());
            assert!(has_directive(
                &headers,
                &header::CACHE_CONTROL,
                &["no-store"]
            ));
        }
    }

    #[test]
    fn range_upgrade_and_no_cache_bypass() {
        let rules = KeyRules::default();
        let k = |r| key(&rules, r);
        assert_eq!(
            k(get("/a").header("range", "bytes=0-1")),
            Err(Bypass::Range)
        );
        assert_eq!(
            k(get("/a").header("upgrade", "websocket")),
            Err(Bypass::Upgrade)
        );
        assert_eq!(
            k(get("/a").header("connection", "keep-alive, Upgrade")),
            Err(Bypass::Upgrade)
        );
        assert!(k(get("/a").header("connection", "keep-alive")).is_ok());
        assert_eq!(
            k(get("/a").header("cache-control", "No-Cache")),
            Err(Bypass::NoCache)
        );
        assert_eq!(
            k(get("/a").header("cache-control", "max-age=0, no-store")),
            Err(Bypass::NoCache)
        );
        assert_eq!(
            k(get("/a").header("pragma", "no-cache")),
            Err(Bypass::NoCache)
        );
        assert!(k(get("/a").header("cache-control", "max-age=60")).is_ok());
    }

    #[test]
    fn requests_with_a_body_bypass() {
        let rules = KeyRules::default();
        let full = Full::new(Bytes::from_static(b"x"));
        assert_eq!(
            rules.classify(&parts(get("/a")), &full, &Writes::default()),
            Err(Bypass::Body)
        );
        let empty = Empty::<Bytes>::new();
        let p = |r| parts(r);
        assert_eq!(
            rules.classify(
                &p(get("/a").header("content-length", "3")),
                &empty,
                &Writes::default()
            ),
            Err(Bypass::Body)
        );
        assert_eq!(
            rules.classify(
                &p(get("/a").header("content-length", "x")),
                &empty,
                &Writes::default()
            ),
            Err(Bypass::Body)
        );
        assert_eq!(
            rules.classify(
                &p(get("/a").header("transfer-encoding", "chunked")),
                &empty,
                &Writes::default()
            ),
            Err(Bypass::Body)
        );
        assert!(rules
            .classify(
                &p(get("/a").header("content-length", "0")),
                &empty,
                &Writes::default()
            )
            .is_ok());
        // A body of unknown length is a body.
        let stream = http_body_util::StreamBody::new(futures::stream::empty::<
            Result<http_body::Frame<Bytes>, ()>,
        >());
        assert_eq!(
            rules.classify(&p(get("/a")), &stream, &Writes::default()),
            Err(Bypass::Body)
        );
    }

    /// A request made of a few parts, each drawn from a small alphabet so that equal and
    /// unequal pairs both come up often.
    #[derive(Clone, Debug)]
    struct Sample {
        method: u8,
        path: u8,
        /// (header index into `NAMES`, value index) in order.
        headers: Vec<(usize, u8)>,
    }

    const NAMES: [&str; 6] = [
        "accept",
        "accept-language",
        "if-none-match",
        "host",
        "user-agent",
        "x-trace",
    ];
    const KEYED: [bool; 6] = [true, true, true, true, false, false];

    fn sample() -> impl proptest::strategy::Strategy<Value = Sample> {
        use proptest::prelude::*;
        (
            0u8..2,
            0u8..3,
            proptest::collection::vec((0usize..NAMES.len(), 0u8..2), 0..4),
        )
            .prop_map(|(method, path, headers)| Sample {
                method,
                path,
                headers,
            })
    }

    fn build(s: &Sample) -> Parts {
        let mut req = http::Request::builder()
            .method(if s.method == 0 {
                Method::GET
            } else {
                Method::HEAD
            })
            .uri(format!("/p{}", s.path));
        for (name, value) in &s.headers {
            req = req.header(NAMES[*name], format!("v{value}"));
        }
        parts(req)
    }

    /// What the key must capture: method, path, and per keyed header its values in order.
    fn projection(s: &Sample) -> (u8, u8, Vec<Vec<u8>>) {
        let per_header = (0..NAMES.len())
            .filter(|i| KEYED[*i])
            .map(|i| {
                s.headers
                    .iter()
                    .filter(|(n, _)| *n == i)
                    .map(|(_, v)| *v)
                    .collect()
            })
            .collect();
        (s.method, s.path, per_header)
    }

    proptest::proptest! {
        /// Two requests share a key exactly when everything the key covers is equal.
        #[test]
        fn keys_are_equal_iff_keyed_parts_are(a in sample(), b in sample()) {
            let rules = KeyRules::default();
            let body = Empty::<Bytes>::new();
            let ka = rules.classify(&build(&a), &body, &Writes::default()).unwrap();
            let kb = rules.classify(&build(&b), &body, &Writes::default()).unwrap();
            proptest::prop_assert_eq!(ka == kb, projection(&a) == projection(&b));
        }
    }
}
