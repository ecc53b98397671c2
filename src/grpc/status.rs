//! Which gRPC responses may be handed to followers: only successful ones.
//!
//! A gRPC call's outcome is its `grpc-status`: in the trailers after the response message, or
//! in the response headers of a "trailers-only" response (which has no message; servers send
//! errors this way). Only `0` (`OK`) is shared. An error may be specific to the caller (its
//! deadline, its quota, a transient fault), so every follower of a failed call makes its own.

use http::header::{self, HeaderMap, HeaderName};
use http::response::Parts;
use http::StatusCode;

use super::key::is_grpc_content_type;

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether a response head may lead to a shared response, before its body is read.
///
/// `false` means the response is passed to its own caller untouched and followers are
/// released: not an HTTP `200`, not a gRPC response, a `Set-Cookie` (state for one client), or
/// a trailers-only response whose status is not `OK`.
pub(crate) fn head_may_share(parts: &Parts) -> bool {
    parts.status == StatusCode::OK
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(is_grpc_content_type)
        && !parts.headers.contains_key(header::SET_COOKIE)
        && all_ok(&parts.headers)
}

/// Whether a response head says the call failed: an HTTP status other than `200`, or a
/// trailers-only response whose `grpc-status` is not `OK`.
pub(crate) fn head_failed(parts: &Parts) -> bool {
    parts.status != StatusCode::OK || !all_ok(&parts.headers)
}

/// Whether a fully read response succeeded: it carries a `grpc-status` (in its headers or its
/// trailers) and every `grpc-status` it carries is exactly `0`.
pub(crate) fn is_ok(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> bool {
    let present =
        headers.contains_key(GRPC_STATUS) || trailers.is_some_and(|t| t.contains_key(GRPC_STATUS));
    present && all_ok(headers) && trailers.is_none_or(all_ok)
}

/// Whether a successful response's trailers may go to followers too: no `Set-Cookie` (state
/// for one client, as in the head; gRPC metadata may come as trailers).
pub(crate) fn trailers_may_share(trailers: Option<&HeaderMap>) -> bool {
    trailers.is_none_or(|t| !t.contains_key(header::SET_COOKIE))
}

/// No `grpc-status` other than `0` (vacuously true when there is none).
fn all_ok(headers: &HeaderMap) -> bool {
    headers
        .get_all(GRPC_STATUS)
        .iter()
        .all(|status| status.as_bytes() == b"0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn parts(status: u16, headers: &[(&'static str, &'static str)]) -> Parts {
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        *res.headers_mut() = map(headers);
        res.into_parts().0
    }

    const GRPC: (&str, &str) = ("content-type", "application/grpc");

    #[test]
    fn status_in_trailers() {
        let head = map(&[GRPC]);
        assert!(is_ok(&head, Some(&map(&[("grpc-status", "0")]))));
        assert!(!is_ok(&head, Some(&map(&[("grpc-status", "5")]))));
        assert!(!is_ok(
            &head,
            Some(&map(&[("grpc-status", "0"), ("grpc-status", "13")]))
        ));
        assert!(
            !is_ok(&head, Some(&map(&[("grpc-message", "ok?")]))),
            "missing status"
        );
        assert!(!is_ok(&head, None), "no trailers and no status");
    }

    #[test]
    fn status_in_headers_of_a_trailers_only_response() {
        assert!(is_ok(&map(&[GRPC, ("grpc-status", "0")]), None));
        assert!(!is_ok(&map(&[GRPC, ("grpc-status", "14")]), None));
        assert!(
            !is_ok(
                &map(&[GRPC, ("grpc-status", "0")]),
                Some(&map(&[("grpc-status", "2")]))
            ),
            "a failure anywhere wins"
        );
    }

    #[test]
    fn malformed_status_is_not_ok() {
        for bad in ["00", " 0", "0 ", "OK", "", "-0"] {
            assert!(
                !is_ok(&map(&[GRPC]), Some(&map(&[("grpc-status", bad)]))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn response_heads_that_release_followers() {
        assert!(head_may_share(&parts(200, &[GRPC])));
        assert!(head_may_share(&parts(
            200,
            &[("content-type", "application/grpc+proto")]
        )));
        assert!(head_may_share(&parts(200, &[GRPC, ("grpc-status", "0")])));
        assert!(!head_may_share(&parts(200, &[GRPC, ("grpc-status", "16")])));
        assert!(!head_may_share(&parts(503, &[GRPC])));
        assert!(!head_may_share(&parts(200, &[])), "no content type");
        assert!(!head_may_share(&parts(
            200,
            &[("content-type", "application/grpc-web")]
        )));
        assert!(!head_may_share(&parts(200, &[GRPC, ("set-cookie", "s=1")])));
    }

    #[test]
    fn a_set_cookie_in_the_trailers_is_not_shared() {
        assert!(trailers_may_share(None));
        assert!(trailers_may_share(Some(&map(&[("grpc-status", "0")]))));
        let cookie = map(&[("grpc-status", "0"), ("set-cookie", "s=1")]);
        assert!(!trailers_may_share(Some(&cookie)));
    }
}
