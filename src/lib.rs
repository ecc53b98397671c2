//! Request coalescing ("singleflight") as Tower middleware.
//!
//! [`CoalesceLayer`] wraps any [`Service`](tower_service::Service) whose requests yield a key.
//! The first request for a key calls the inner service; identical requests that arrive while
//! that call is in flight wait for the same result instead of calling the backend again.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_coalesce::CoalesceLayer;
//!
//! # #[tokio::main]
//! # async fn main() {
//! let backend_calls = Arc::new(AtomicUsize::new(0));
//! let calls = backend_calls.clone();
//! let svc = ServiceBuilder::new()
//!     .layer(CoalesceLayer::new(|key: &String| Some(key.clone())))
//!     .service(service_fn(move |key: String| {
//!         calls.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             tokio::time::sleep(std::time::Duration::from_millis(50)).await;
//!             Ok::<_, std::convert::Infallible>(format!("value of {key}"))
//!         }
//!     }));
//!
//! let requests = (0..100).map(|_| svc.clone().oneshot("hot".to_string()));
//! let responses = futures::future::join_all(requests).await;
//! assert!(responses.iter().all(|r| r.as_deref().unwrap() == "value of hot"));
//! assert_eq!(backend_calls.load(Ordering::SeqCst), 1);
//! assert_eq!(svc.in_flight(), 0);
//! # }
//! ```
//!
//! # Contract
//!
//! With the options off (each option's docs say what it changes):
//!
//! 1. At most one call per key is in flight at a time, per registry; different keys never wait
//!    on each other.
//! 2. No stale joins: a request that arrives after a call's response was published starts a
//!    new call.
//! 3. Every waiter of a call gets a clone of the same response, or a [`CoalesceError`] sharing
//!    the same inner error (the error need not be `Clone`).
//! 4. Cancellation is local: dropping a waiter never fails or stalls the others; if the leader
//!    goes away the call goes on for the rest; when the last waiter goes away the call is
//!    dropped (cancelled) and the key freed.
//! 5. A panic in the inner service becomes an error for that call's waiters; the key stays
//!    usable.
//! 6. Waiters are woken once, by the call's completion; they never poll in a loop and never
//!    wait for the inner service's readiness.
//! 7. The registry removes each entry exactly once, by its own call, so it is empty once the
//!    load stops.
//! 8. No lock is held across an `.await` or while user code runs (key `Eq` aside; a parking
//!    follower's waker is cloned under its flight's lock, as tokio's `Notify` does).
//!
//! The tower-free core is [`Group`], usable on its own like Go's `singleflight.Group`.
//!
//! # Options
//!
//! All off by default, as builder methods on [`CoalesceLayer`] (and [`GroupBuilder`]):
//! detached calls that outlive their waiters, a follower wait limit ([`OnTimeout`]), a linger
//! window (micro-cache), retry of failed calls by their followers, capacity bounds; plus
//! [`CoalesceService::forget`], [`CoalesceService::stats`] and
//! [`ResponseFuture::is_shared`].
//!
//! # Features
//!
//! - `http`: `http::CoalesceHttpLayer`, coalescing for `http` services (axum,
//!   hyper) under the shared-cache rules of RFC 9111.
//! - `grpc`: `grpc::CoalesceGrpcLayer`, coalescing of allow-listed unary gRPC
//!   methods (tonic).
//! - `tracing`: a `coalesce.flight` span per flight (`key_hash`, `role` of the caller that
//!   started it, `waiters`, `outcome`), with a `trace` event (`role = "follower"`) for each
//!   follower that joins; made outside the registry's locks: a subscriber may call back into
//!   the group.
//! - `metrics`: counters for the `metrics` crate, each matching a [`Stats`] field:
//!   `tower_coalesce_leaders_total` (calls started, retries included),
//!   `tower_coalesce_followers_total`, `tower_coalesce_lingered_total`,
//!   `tower_coalesce_bypassed_total`, `tower_coalesce_over_capacity_total`,
//!   `tower_coalesce_timed_out_total`, `tower_coalesce_retried_total` (counted when a retry
//!   starts), `tower_coalesce_released_total` (HTTP and gRPC followers sent to make their own
//!   call); and `tower_coalesce_flights_total{outcome}` (`ok`, `error`, `panicked`,
//!   `cancelled`), one per flight when it ends: a failed attempt that is retried counts in
//!   [`Stats::errors`] but ends no flight.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
mod error;
mod flight;
mod future;
#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub mod grpc;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
mod layer;
#[cfg(all(test, loom))]
mod loom_tests;
mod service;
mod stats;
mod sync;

pub use builder::ServiceBuilderExt;
pub use error::CoalesceError;
pub use flight::{Group, GroupBuilder, Panicked, Run};
pub use future::ResponseFuture;
pub use layer::CoalesceLayer;
pub use service::{CoalesceService, OnTimeout};
pub use stats::Stats;

/// The README's Rust examples, compiled and run as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
