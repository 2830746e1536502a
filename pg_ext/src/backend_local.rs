//! Per-backend state without thread-local lookups.
//!
//! A PostgreSQL backend is one single-threaded process, and pgrx refuses calls into the extension
//! from any thread but the backend's own: a process-wide static is therefore this backend's alone.
//! `thread_local!` in a shared library costs a `__tls_get_addr` call on every access — measured at
//! ≈ 190 instructions per statement across the hooks — so the hot per-backend state lives in a
//! [`BackendLocal`] instead, with the same `with` shape as a thread-local key.

use std::cell::OnceCell;

/// A value per backend process, made on first use.
pub struct BackendLocal<T: 'static> {
    value: OnceCell<T>,
    init: fn() -> T,
}

// SAFETY: only the backend's own thread ever reaches extension code (see the module doc), so the
// value is never shared between threads; interior mutability stays with the value (Cell/RefCell).
unsafe impl<T> Sync for BackendLocal<T> {}

impl<T> BackendLocal<T> {
    pub const fn new(init: fn() -> T) -> BackendLocal<T> {
        BackendLocal {
            value: OnceCell::new(),
            init,
        }
    }

    /// Runs `f` with the backend's value (shared access only, as with `LocalKey::with`).
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(self.value.get_or_init(self.init))
    }
}
