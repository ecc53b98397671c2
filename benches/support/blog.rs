//! The approach of the request-coalescing blog post this crate started from (the project's
//! shared reference, outside this repository), re-implemented for comparison.
//!
//! Kept faithful on purpose, bugs included (see DESIGN.md, "Known traps"): one
//! `tokio::sync::Mutex<HashMap<K, Shared<BoxFuture>>>` for every key, a strong `Shared` in the
//! map, and every waiter removing the key unconditionally after it awaited the result. Only
//! the key and output types are made generic.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Mutex;

/// The registry of in-flight requests.
pub struct Registry<K, T> {
    requests: Mutex<HashMap<K, Shared<BoxFuture<'static, T>>>>,
}

impl<K, T> Registry<K, T>
where
    K: Hash + Eq + Clone,
    T: Clone,
{
    pub fn new() -> Self {
        Registry {
            requests: Mutex::new(HashMap::new()),
        }
    }

    /// `get_special_data` of the post: join `key`'s shared future or create it with `make`.
    pub async fn get<F>(&self, key: K, make: impl FnOnce() -> F) -> T
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut requests = self.requests.lock().await;
        let fut = match requests.get(&key) {
            Some(in_flight) => in_flight.clone(),
            None => {
                let request = make().boxed().shared();
                requests.insert(key.clone(), request.clone());
                request
            }
        };
        drop(requests);

        let result = fut.await;

        // The post's remove-after-await: every waiter removes the key, whoever owns the entry.
        self.requests.lock().await.remove(&key);
        result
    }
}
