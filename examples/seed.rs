//! The request-coalescing blog post this crate started from (its approach is re-implemented
//! as written in `benches/support/blog.rs`), its example served through the layer: two
//! clients make eight concurrent requests; a spy shows the remote system was called once per
//! client, and each client's callers all got the same data.
//!
//! Run: `cargo run --example seed`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_coalesce::CoalesceLayer;

/// Data returned from the remote system.
#[derive(Debug, Clone)]
struct SpecialData {
    key: String,
    data: u128,
}

#[tokio::main]
async fn main() {
    // Each remote call logs here, so we can see how many there were.
    let spy = Arc::new(Mutex::new(Vec::new()));
    let remote = {
        let spy = spy.clone();
        service_fn(move |key: String| {
            let spy = spy.clone();
            async move {
                let data = rand::random::<u128>();
                tokio::time::sleep(Duration::from_millis(200)).await;
                spy.lock()
                    .unwrap()
                    .push(format!("Request from client {key}, returning {data:032x}"));
                Ok::<_, Infallible>(SpecialData { key, data })
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(|key: &String| Some(key.clone())))
        .service(remote);

    let (key1, key2) = ("Some key", "Some other key");
    let keys = [key1, key1, key2, key2, key1, key2, key2, key2];
    let all: Vec<SpecialData> = join_all(keys.map(|k| svc.clone().oneshot(k.to_string())))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("the remote system does not fail");

    let mut by_key: HashMap<&str, Vec<u128>> = HashMap::new();
    for item in &all {
        by_key.entry(&item.key).or_default().push(item.data);
    }
    for (key, values) in &by_key {
        assert!(
            values.windows(2).all(|w| w[0] == w[1]),
            "{key}: callers disagree"
        );
        println!(
            "{key:>16}: {} callers, all got {:032x}",
            values.len(),
            values[0]
        );
    }
    let spy = spy.lock().unwrap();
    println!("\nremote calls ({}):", spy.len());
    for line in spy.iter() {
        println!("  {line}");
    }
    assert_eq!(spy.len(), 2, "one remote call per client");
    assert_eq!(svc.in_flight(), 0);
}
