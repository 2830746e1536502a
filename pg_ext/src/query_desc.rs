//! What a QueryDesc says about its statement: its own text out of the source string, and a
//! fingerprint of that text with its bound parameter values (N+1 detection tells the executions
//! of one statement apart by it); and the fast hasher both the fingerprint and the hooks' set of
//! known statements use. Shared by [`crate::hooks`], [`crate::slow`] and [`crate::nplusone`],
//! which therefore do not import each other for it.

use std::ffi::CStr;
use std::hash::{Hash, Hasher};

use pgrx::pg_sys;

/// This statement's own bytes out of the (possibly multi-statement) source string, borrowed.
///
/// # Safety
/// `qd` must be a valid QueryDesc; the slice lives as long as the portal's source text.
#[inline]
pub unsafe fn statement_bytes<'a>(qd: *mut pg_sys::QueryDesc) -> &'a [u8] {
    // SAFETY: sourceText is a NUL-terminated string owned by the portal for the executor's life.
    unsafe {
        if (*qd).sourceText.is_null() {
            return &[];
        }
        let all = CStr::from_ptr((*qd).sourceText).to_bytes();
        let stmt = (*qd).plannedstmt;
        let (loc, len) = if stmt.is_null() {
            (0, 0)
        } else {
            ((*stmt).stmt_location, (*stmt).stmt_len)
        };
        let start = usize::try_from(loc).unwrap_or(0).min(all.len());
        let end = if len > 0 {
            (start + len as usize).min(all.len())
        } else {
            all.len()
        };
        all[start..end].trim_ascii()
    }
}

/// This statement's own text out of the (possibly multi-statement) source string.
///
/// # Safety
/// `qd` must be a valid QueryDesc.
pub unsafe fn statement_text(qd: *mut pg_sys::QueryDesc) -> String {
    // SAFETY: forwarded from the caller.
    String::from_utf8_lossy(unsafe { statement_bytes(qd) }).into_owned()
}

/// A fast non-cryptographic hasher: a fingerprint only has to tell parameter sets of one statement
/// apart, on every execution — SipHash's protection against chosen collisions buys nothing here.
pub struct Fnv(u64);

impl Default for Fnv {
    #[inline]
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    /// Eight bytes per step (rotate, xor, multiply — the FxHash mix), then the tail: every byte
    /// counts, at a fraction of byte-wise FNV's cost (measured: the fingerprint was the largest
    /// cost of dbopt's own code per statement).
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(K);
        }
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A fingerprint of the statement's literal text and bound parameter values.
///
/// # Safety
/// `qd` must be a valid QueryDesc.
pub unsafe fn fingerprint(qd: *mut pg_sys::QueryDesc) -> u64 {
    let mut h = Fnv::default();
    // SAFETY: sourceText and params belong to the running portal.
    unsafe {
        statement_bytes(qd).hash(&mut h);
        let params = (*qd).params;
        if !params.is_null() {
            let n = usize::try_from((*params).numParams).unwrap_or(0);
            let list = (*params).params.as_slice(n);
            for p in list {
                p.isnull.hash(&mut h);
                if p.isnull || p.ptype == pg_sys::InvalidOid {
                    continue;
                }
                let (mut len, mut byval) = (0i16, false);
                pg_sys::get_typlenbyval(p.ptype, &mut len, &mut byval);
                if byval {
                    p.value.value().hash(&mut h);
                } else if len == -1 {
                    let v = pg_sys::pg_detoast_datum_packed(p.value.cast_mut_ptr());
                    let bytes = pgrx::varlena::varlena_to_byte_slice(v);
                    bytes.hash(&mut h);
                } else if len == -2 {
                    CStr::from_ptr(p.value.cast_mut_ptr())
                        .to_bytes()
                        .hash(&mut h);
                } else if len > 0 {
                    std::slice::from_raw_parts(p.value.cast_mut_ptr::<u8>(), len as usize)
                        .hash(&mut h);
                }
            }
        }
    }
    h.finish()
}
