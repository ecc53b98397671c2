//! Lock shim: `std` normally, `loom` under `--cfg loom` so the model checker sees every lock.

use std::sync::PoisonError;

#[cfg(loom)]
use loom::sync::Mutex as Inner;
#[cfg(loom)]
pub(crate) use loom::sync::MutexGuard;
#[cfg(not(loom))]
use std::sync::Mutex as Inner;
#[cfg(not(loom))]
pub(crate) use std::sync::MutexGuard;

/// A mutex that ignores poisoning.
///
/// No user code runs under these locks except a key's `Eq` (a map lookup cannot avoid it), and
/// every invariant is restored before any call that could panic, so a poisoned lock still
/// guards consistent data.
pub(crate) struct Mutex<T>(Inner<T>);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Mutex(Inner::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
