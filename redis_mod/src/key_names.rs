//! Key-name strings for tag keys, kept between calls. A cache hit opens each of the entry's tags
//! by name; making a `RedisModuleString` for it and freeing it again costs an allocation and a free
//! per tag per `DBOPT.CACHE.GET` (≈ 350 of a hit's ≈ 6,800 server instructions, callgrind). The
//! names are kept in a small direct-mapped table instead: a hit costs one FNV hash and a compare.
//! A collision (hostile tag names included) only means a new string, as before; the table never
//! grows. Module commands run on Redis' main thread only, the one thread that touches the table.

use std::cell::RefCell;

use redis_module::RedisString;

/// Slots of the table (tag names; a few KiB of Redis memory at most with short names).
const SLOTS: usize = 256;

struct Table(RefCell<Vec<Option<(u64, RedisString)>>>);

// SAFETY: only Redis' main thread runs module commands (and the unload hook), so the table and
// its strings are never reached from two threads.
unsafe impl Sync for Table {}

static TABLE: Table = Table(RefCell::new(Vec::new()));

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `f` with a key-name string holding `bytes`.
pub fn with_name<R>(bytes: &[u8], f: impl FnOnce(&RedisString) -> R) -> R {
    let Ok(mut table) = TABLE.0.try_borrow_mut() else {
        // Never expected (handlers do not nest); a fresh string is always correct.
        return f(&RedisString::create_from_slice(std::ptr::null_mut(), bytes));
    };
    if table.is_empty() {
        table.resize_with(SLOTS, || None);
    }
    let hash = fnv1a(bytes);
    let slot = &mut table[(hash % SLOTS as u64) as usize];
    match slot {
        Some((h, name)) if *h == hash && name.as_slice() == bytes => f(name),
        _ => {
            // No context: the string outlives this call (freed when replaced or at unload).
            let name = RedisString::create_from_slice(std::ptr::null_mut(), bytes);
            f(&slot.insert((hash, name)).1)
        }
    }
}

/// Frees every kept name (module unload).
pub fn clear() {
    if let Ok(mut table) = TABLE.0.try_borrow_mut() {
        table.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_spreads_similar_names() {
        let slots: std::collections::HashSet<u64> = (0..64)
            .map(|i| fnv1a(format!("tag:{i}").as_bytes()) % SLOTS as u64)
            .collect();
        assert!(
            slots.len() > 48,
            "{} distinct slots of 64 names",
            slots.len()
        );
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
