//! The statement table across restarts: written at a clean shutdown, loaded at the next start
//! (as pg_stat_statements does).

use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};

use pgrx::pg_sys;

use super::layout::{StatsEntry, StatsKey, TEXT_MAX};
use super::statements::{search, Entries};
use super::{ready, HEADER};
use crate::gucs;

/// Where statistics are kept across restarts (relative to the data directory, like
/// pg_stat_statements' file).
const SAVE_FILE: &str = "pg_stat/dbopt.stat";
/// Identifies the file format: magic, then the entry size it was written with.
const SAVE_MAGIC: &[u8; 8] = b"DBOPTST1";

#[pgrx::pg_guard]
pub(super) unsafe extern "C-unwind" fn save_at_shutdown(code: i32, _arg: pg_sys::Datum) {
    // A crash (non-zero code) must not overwrite the last good file with half-updated counters.
    if code != 0 {
        return;
    }
    if let Err(e) = save() {
        pgrx::log!("dbopt: could not save statement statistics to {SAVE_FILE}: {e}");
    }
}

/// Writes every entry (raw, fixed-size records) to a temporary file, then renames it into place.
fn save() -> std::io::Result<()> {
    use std::io::Write;
    if !ready() {
        return Ok(());
    }
    let tmp = format!("{SAVE_FILE}.tmp");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    out.write_all(SAVE_MAGIC)?;
    out.write_all(&(size_of::<StatsEntry>() as u64).to_le_bytes())?;
    // SAFETY: called in the postmaster at shutdown, after every backend has exited.
    unsafe {
        for e in Entries::new() {
            out.write_all(std::slice::from_raw_parts(
                e.cast::<u8>(),
                size_of::<StatsEntry>(),
            ))?;
        }
        out.write_all(&(*HEADER).evictions.load(Ordering::Relaxed).to_le_bytes())?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, SAVE_FILE)
}

/// Loads the file `save` wrote, if it exists and has this build's format; then removes it (as
/// pg_stat_statements does), so a later crash restarts from empty rather than from stale data.
///
/// # Safety
/// Only from the startup hook, before any backend exists.
pub(super) unsafe fn load_saved() {
    let Ok(bytes) = std::fs::read(SAVE_FILE) else {
        return;
    };
    let _ = std::fs::remove_file(SAVE_FILE);
    let size = size_of::<StatsEntry>();
    let header = SAVE_MAGIC.len() + 8;
    // magic, entry size, entries, then the eviction count.
    let well_formed = bytes.len() >= header + 8
        && &bytes[..8] == SAVE_MAGIC
        && u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default()) == size as u64
        && (bytes.len() - header - 8).is_multiple_of(size);
    if !well_formed {
        pgrx::log!("dbopt: ignoring {SAVE_FILE}: not written by this version of dbopt");
        return;
    }
    let body = &bytes[header..bytes.len() - 8];
    let max = gucs::max_statements();
    let mut loaded = 0;
    // SAFETY: HTAB is attached; records are raw StatsEntry images written by `save`.
    unsafe {
        for rec in body.chunks_exact(size).take(max) {
            let mut key = StatsKey::default();
            ptr::copy_nonoverlapping(
                rec.as_ptr(),
                ptr::from_mut(&mut key).cast::<u8>(),
                size_of::<StatsKey>(),
            );
            let (e, found) = search(&key, pg_sys::HASHACTION::HASH_ENTER_NULL);
            if e.is_null() || found {
                continue;
            }
            ptr::copy_nonoverlapping(rec.as_ptr(), e.cast::<u8>(), size);
            (*e).spin = AtomicU32::new(0);
            (*e).text_len = (*e).text_len.min(TEXT_MAX as u32);
            loaded += 1;
        }
        let tail = &bytes[bytes.len() - 8..];
        (*HEADER).evictions.store(
            u64::from_le_bytes(tail.try_into().unwrap_or_default()),
            Ordering::Relaxed,
        );
    }
    pgrx::log!("dbopt: loaded statistics of {loaded} statements from {SAVE_FILE}");
}
