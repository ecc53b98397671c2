//! [`Panicked`]: a panic caught in the inner call, shared by the flight's waiters.

use super::*;

/// The error a flight's waiters get when making or polling its inner future panicked.
///
/// The panic is caught where it happens and ends the flight; the key stays usable. (With
/// `panic = "abort"` there is nothing to catch.)
#[derive(Clone)]
pub struct Panicked {
    message: Arc<str>,
}

impl Panicked {
    pub(crate) fn new(payload: Box<dyn Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            Arc::from(*s)
        } else if let Some(s) = payload.downcast_ref::<String>() {
            Arc::from(s.as_str())
        } else {
            Arc::from("<non-string panic payload>")
        };
        // The payload's destructor is user code; a panic in it must not escape here.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
        Panicked { message }
    }

    /// The panic message: the payload if it was a string, `<non-string panic payload>`
    /// otherwise.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Panicked")
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coalesced call panicked: {}", self.message)
    }
}

impl std::error::Error for Panicked {}
