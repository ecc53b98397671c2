//! An axum app with a slow endpoint behind `CoalesceHttpLayer`, served on 127.0.0.1 and hit by
//! a burst of concurrent real HTTP requests. Prints how many requests were sent, how many
//! reached the backend, and what bypassed coalescing; then exits.
//!
//! ```sh
//! cargo run --example axum --features http
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Request};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_coalesce::http::CoalesceHttpLayer;

/// Stands in for a slow database query.
const BACKEND_LATENCY: Duration = Duration::from_millis(300);

/// Identical `GET /report` requests in the burst.
const HOT_GETS: usize = 1000;

#[derive(Clone, Default)]
struct Backend {
    report_calls: Arc<AtomicUsize>,
    order_calls: Arc<AtomicUsize>,
    me_calls: Arc<AtomicUsize>,
}

async fn report(State(backend): State<Backend>) -> String {
    let n = backend.report_calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(BACKEND_LATENCY).await;
    format!("quarterly report, computed by backend call #{n}")
}

async fn place_order(State(backend): State<Backend>) -> String {
    let n = backend.order_calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(BACKEND_LATENCY).await;
    format!("order #{n} placed")
}

async fn me(State(backend): State<Backend>, headers: HeaderMap) -> String {
    backend.me_calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(BACKEND_LATENCY).await;
    let who = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous");
    format!("the private page of {who}")
}

#[tokio::main]
async fn main() {
    let backend = Backend::default();
    let app = Router::new()
        .route("/report", get(report).post(place_order))
        .route("/me", get(me))
        .with_state(backend.clone())
        // Authentication would go outside (after) this; tracing, timeouts and compression too.
        .layer(CoalesceHttpLayer::new().cache_status_header(true));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    println!("serving on http://{addr}, backend latency {BACKEND_LATENCY:?}");

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{addr}");
    let mut requests: Vec<(&'static str, Request<Empty<Bytes>>)> = Vec::new();
    for i in 0..HOT_GETS {
        requests.push(("GET /report", get_req(&format!("{url}/report"))));
        // Mixed into the burst: writes and personal pages, which must not be shared.
        if i % 100 == 0 {
            let post = Request::post(format!("{url}/report"))
                .body(Empty::new())
                .unwrap();
            requests.push(("POST /report", post));
            let user = if i % 200 == 0 { "alice" } else { "bob" };
            let authed = Request::get(format!("{url}/me"))
                .header("authorization", format!("Bearer {user}"))
                .body(Empty::new())
                .unwrap();
            requests.push(("GET /me (Authorization)", authed));
        }
    }

    let started = Instant::now();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|(label, req)| {
            let client = client.clone();
            tokio::spawn(async move {
                let res = client.request(req).await.expect("request");
                let status = res
                    .headers()
                    .get("cache-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let body = res.into_body().collect().await.expect("body").to_bytes();
                (label, served_by(&status), body)
            })
        })
        .collect();
    // (label, served by) -> count; and the distinct bodies each label got.
    let mut tally: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut bodies: BTreeMap<&str, Vec<Bytes>> = BTreeMap::new();
    for task in tasks {
        let (label, by, body) = task.await.expect("client task");
        *tally.entry((label, by)).or_default() += 1;
        let seen = bodies.entry(label).or_default();
        if !seen.contains(&body) {
            seen.push(body);
        }
    }
    let elapsed = started.elapsed();

    let sent = |label: &str| -> usize {
        tally
            .iter()
            .filter(|((l, _), _)| *l == label)
            .map(|(_, n)| n)
            .sum()
    };
    let calls = |c: &AtomicUsize| c.load(Ordering::SeqCst);
    println!(
        "burst of {} requests done in {elapsed:.2?}",
        tally.values().sum::<usize>()
    );
    println!();
    println!("{:<26} {:>8} {:>14}", "", "requests", "backend calls");
    for (label, counter) in [
        ("GET /report", &backend.report_calls),
        ("POST /report", &backend.order_calls),
        ("GET /me (Authorization)", &backend.me_calls),
    ] {
        println!("{label:<26} {:>8} {:>14}", sent(label), calls(counter));
    }
    println!();
    for ((label, by), n) in &tally {
        println!("  {label:<26} {by:<9} {n:>5}");
    }
    println!();
    println!(
        "GET /report: {} requests, {} backend call(s), {} distinct response(s)",
        sent("GET /report"),
        calls(&backend.report_calls),
        bodies["GET /report"].len()
    );
    println!(
        "bypassed (POST, Authorization): {} requests, {} backend calls",
        sent("POST /report") + sent("GET /me (Authorization)"),
        calls(&backend.order_calls) + calls(&backend.me_calls)
    );

    drop(client);
    let _ = stop.send(());
    server.await.unwrap();
}

fn get_req(url: &str) -> Request<Empty<Bytes>> {
    Request::get(url).body(Empty::new()).unwrap()
}

/// Reads the `Cache-Status` entry the layer added.
fn served_by(cache_status: &str) -> &'static str {
    if cache_status.contains("fwd=bypass") || cache_status.contains("fwd=method") {
        "bypass"
    } else if cache_status.contains("collapsed=?0") {
        "released"
    } else if cache_status.contains("collapsed") {
        "follower"
    } else if cache_status.contains("fwd=miss") {
        "leader"
    } else {
        "unmarked"
    }
}
