//! Reading and writing the string keys the module keeps its state in, and replicating the *effect*.
//!
//! Every write goes through [`put`] / [`delete`]: they change the key locally and replicate a plain
//! `SET key value PXAT <unix ms>` or `DEL key` — never the module command itself, so a replica or an
//! AOF replay applies the primary's decision instead of recomputing it with another clock. The SETs
//! are replicated through `RedisModule_Replicate`'s format directly (no argument strings created
//! and freed per call for the key, the value or the option word: the limiter's hot path).

use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use redis_module::key::RedisKeyWritable;
use redis_module::{raw, Context, KeyType, RedisError, RedisString};

/// The option words of the replicated SETs, as strings made once: `RedisModule_Replicate`'s `s`
/// format only takes a reference on them, where `c` would make (and free) a new string per call.
static PXAT: AtomicPtr<raw::RedisModuleString> = AtomicPtr::new(std::ptr::null_mut());
static KEEPTTL: AtomicPtr<raw::RedisModuleString> = AtomicPtr::new(std::ptr::null_mut());

/// The string of `word`, made on first use (module commands run on Redis' main thread only).
fn word(slot: &AtomicPtr<raw::RedisModuleString>, word: &CStr) -> *mut raw::RedisModuleString {
    let kept = slot.load(Ordering::Relaxed);
    if !kept.is_null() {
        return kept;
    }
    let bytes = word.to_bytes();
    // SAFETY: no context: the string lives until `release_words` (module unload).
    let made = unsafe {
        raw::RedisModule_CreateString.expect("RedisModule_CreateString")(
            std::ptr::null_mut(),
            bytes.as_ptr().cast(),
            bytes.len(),
        )
    };
    slot.store(made, Ordering::Relaxed);
    made
}

/// Frees the kept option words (module unload).
pub fn release_words() {
    for slot in [&PXAT, &KEEPTTL] {
        let kept = slot.swap(std::ptr::null_mut(), Ordering::Relaxed);
        if !kept.is_null() {
            // SAFETY: made by `word` without a context; nothing holds it after the unload.
            unsafe {
                raw::RedisModule_FreeString.expect("RedisModule_FreeString")(
                    std::ptr::null_mut(),
                    kept,
                )
            };
        }
    }
}

/// Wall-clock milliseconds (the clock Redis expires keys with).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a key holds, as far as the module cares.
pub enum Held<'a> {
    Nothing,
    Bytes(&'a [u8]),
    /// A list, hash, set, … — never ours.
    OtherType,
}

/// Reads a key without changing it (works on replicas).
pub fn read<'k>(key: &'k redis_module::key::RedisKey) -> Result<Held<'k>, RedisError> {
    match key.key_type() {
        KeyType::Empty => Ok(Held::Nothing),
        KeyType::String => Ok(key.read()?.map_or(Held::Nothing, Held::Bytes)),
        _ => Ok(Held::OtherType),
    }
}

/// Reads a key opened for writing.
pub fn read_writable(key: &RedisKeyWritable) -> Result<Option<Vec<u8>>, Option<()>> {
    match key.key_type() {
        KeyType::Empty => Ok(None),
        KeyType::String => key
            .as_string_dma()
            .map(|d| Some(d.to_vec()))
            .map_err(|_| Some(())),
        _ => Err(None),
    }
}

/// Stores `value` under `name` until `expires_at_ms`, and replicates exactly that.
///
/// A new key, or a value of the same length, is written in place through the caller's handle (the
/// limiter's fixed-size state). Any other write sets a new string of exactly the value's size:
/// growing a string in place lets Redis reserve twice the length (measured: a 152-byte limiter
/// state took 368 bytes instead of 208).
pub fn put(
    ctx: &Context,
    name: &RedisString,
    key: &RedisKeyWritable,
    value: &[u8],
    now: u64,
    expires_at_ms: u64,
) -> Result<(), RedisError> {
    let ttl = expires_at_ms.saturating_sub(now).max(1);
    let in_place = match key.key_type() {
        // Writing into an empty key through its DMA view creates a string of exactly the
        // value's size (RedisModule_StringTruncate on an empty key), on the caller's handle.
        KeyType::Empty => true,
        KeyType::String => key
            .as_string_dma()
            .map(|d| d.len() == value.len())
            .unwrap_or(false),
        _ => false,
    };
    if in_place {
        key.as_string_dma()?.write(value)?;
        key.set_expire(std::time::Duration::from_millis(ttl))?;
    } else {
        let fresh = RedisString::create_from_slice(ctx.ctx, value);
        // A second handle on the same key, used and closed right here; the caller's handle is
        // not read again after a put.
        let handle = raw::open_key(
            ctx.ctx,
            name.inner,
            raw::KeyMode::READ | raw::KeyMode::WRITE,
        );
        let written = raw::string_set(handle, fresh.inner) == raw::Status::Ok
            && raw::set_expire(handle, i64::try_from(ttl).unwrap_or(i64::MAX)) == raw::Status::Ok;
        raw::close_key(handle);
        if !written {
            return Err(RedisError::Str("ERR could not write the key"));
        }
    }
    let at = i64::try_from(now.saturating_add(ttl)).unwrap_or(i64::MAX);
    let pxat = word(&PXAT, c"PXAT");
    // SAFETY: the format names each argument's C type: s = a RedisModuleString (the key's name,
    // the kept word), b = the value's pointer and length, l = a long long. Redis copies or takes a
    // reference on them for the propagated command before returning.
    unsafe {
        raw::RedisModule_Replicate.expect("RedisModule_Replicate")(
            ctx.ctx,
            c"SET".as_ptr(),
            c"sbsl".as_ptr(),
            name.inner,
            value.as_ptr(),
            value.len(),
            pxat,
            at as std::ffi::c_longlong,
        );
    }
    Ok(())
}

/// Overwrites an existing value of the same length in place, keeping the key's expiry, and
/// replicates exactly that (`SET … KEEPTTL`: the replica's expiry was set by the same earlier write).
pub fn overwrite_keep_ttl(
    ctx: &Context,
    name: &RedisString,
    key: &RedisKeyWritable,
    value: &[u8],
) -> Result<(), RedisError> {
    key.as_string_dma()?.write(value)?;
    replicate_keep_ttl(ctx, name, value);
    Ok(())
}

/// Replicates `SET name value KEEPTTL` (the caller rewrote the value in place).
pub fn replicate_keep_ttl(ctx: &Context, name: &RedisString, value: &[u8]) {
    let keepttl = word(&KEEPTTL, c"KEEPTTL");
    // SAFETY: as in `put`: s = the key and the kept word, b = pointer and length.
    unsafe {
        raw::RedisModule_Replicate.expect("RedisModule_Replicate")(
            ctx.ctx,
            c"SET".as_ptr(),
            c"sbs".as_ptr(),
            name.inner,
            value.as_ptr(),
            value.len(),
            keepttl,
        );
    }
}

/// Deletes keys (already opened for writing) and replicates one `DEL` naming them.
pub fn delete(ctx: &Context, deleted: &[(&[u8], RedisKeyWritable)]) -> Result<(), RedisError> {
    if deleted.is_empty() {
        return Ok(());
    }
    for (_, key) in deleted {
        key.delete()?;
    }
    let names: Vec<&[u8]> = deleted.iter().map(|(n, _)| *n).collect();
    ctx.replicate("DEL", &names[..]);
    Ok(())
}
