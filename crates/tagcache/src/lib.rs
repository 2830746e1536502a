//! Tag-indexed cache bookkeeping by *generations*: the pure part of the Redis module's cache.
//!
//! # Layout
//! - [`Generations`]: makes tag generation numbers (unique per process, unpredictable across them).
//! - [`encode_entry`] / [`decode_entry`]: a cache entry = the value plus, per tag, the generation the
//!   tag had when the entry was stored.
//! - [`encode_generation`] / [`decode_generation`]: the value of a tag key.
//! - [`token`] / [`is_token`]: the fill token, the tags' generations captured before a fill.
//! - [`canonical_tags`]: tags sorted and de-duplicated, the order every function above expects.
//!
//! # Why generations (and no tag → entries sets)
//! A tag is one small key holding a generation. An entry is valid only while every tag it names
//! still holds the generation recorded in the entry. Invalidating a tag deletes its key: every entry
//! recorded under the old generation is invalid at once, in O(1), with no set of members to walk,
//! grow, or leave orphaned when entries expire or are evicted. A tag key that is missing (never made,
//! invalidated, expired, evicted) matches no entry, so losing one fails safe: a miss, never a stale
//! hit. A tag key made again gets a fresh generation, never an old one.

use std::fmt;

/// Magic prefix of an encoded entry (format version 1).
pub const ENTRY_MAGIC: &[u8; 4] = b"DCE1";
/// Magic prefix of a tag key's value (format version 1).
pub const TAG_MAGIC: &[u8; 4] = b"DCT1";
/// Length of a tag key's value: magic + generation + the key's expiry (unix ms).
pub const TAG_VALUE_LEN: usize = 20;
/// Most tags one entry may carry.
pub const MAX_TAGS: usize = 1024;
/// Longest tag name, in bytes.
pub const MAX_TAG_LEN: usize = 1024;

/// Makes generation numbers: a bijective mix (SplitMix64) of `seed + counter`, so no two values of
/// one process are equal, and values of processes with different random seeds do not line up.
#[derive(Debug, Clone)]
pub struct Generations {
    seed: u64,
    counter: u64,
}

impl Generations {
    /// `seed` should be random (the module seeds from the OS); tests pass a fixed one.
    pub fn new(seed: u64) -> Generations {
        Generations { seed, counter: 0 }
    }

    /// The next generation; never 0 (0 is not a valid generation anywhere).
    pub fn next_generation(&mut self) -> u64 {
        loop {
            self.counter = self.counter.wrapping_add(1);
            let mut z = self
                .seed
                .wrapping_add(self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z != 0 {
                return z;
            }
        }
    }
}

/// Bytes that are not a cache entry (or a tag value) of this format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Foreign;

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("value is not a dbopt cache entry")
    }
}

impl std::error::Error for Foreign {}

/// A decoded entry borrowing from the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// (tag key, generation when stored), in canonical order.
    pub tags: Vec<(&'a [u8], u64)>,
    pub value: &'a [u8],
}

/// Sorts and de-duplicates tags: the canonical order entries and tokens use.
pub fn canonical_tags(mut tags: Vec<&[u8]>) -> Vec<&[u8]> {
    tags.sort_unstable();
    tags.dedup();
    tags
}

/// Encodes an entry: magic, u16 tag count, per tag (u16 length, name, u64 generation), value.
/// Tag count and lengths must be within [`MAX_TAGS`] / [`MAX_TAG_LEN`] (callers check first).
pub fn encode_entry(tags: &[(&[u8], u64)], value: &[u8]) -> Vec<u8> {
    let header: usize = tags.iter().map(|(t, _)| 2 + t.len() + 8).sum();
    let mut out = Vec::with_capacity(4 + 2 + header + value.len());
    out.extend_from_slice(ENTRY_MAGIC);
    out.extend_from_slice(&(tags.len() as u16).to_le_bytes());
    for (tag, generation) in tags {
        out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
        out.extend_from_slice(tag);
        out.extend_from_slice(&generation.to_le_bytes());
    }
    out.extend_from_slice(value);
    out
}

/// Decodes an entry without copying; anything malformed is [`Foreign`].
pub fn decode_entry(bytes: &[u8]) -> Result<Entry<'_>, Foreign> {
    let mut tags = Vec::new();
    let value = visit_entry(bytes, |tag, generation| tags.push((tag, generation)))?;
    Ok(Entry { tags, value })
}

/// [`decode_entry`] without the allocation (a cache hit's path): calls `each(tag, generation)` for
/// every tag in stored order, then returns the value; a malformed entry is [`Foreign`] whatever
/// `each` saw before.
pub fn visit_entry<'a>(
    bytes: &'a [u8],
    mut each: impl FnMut(&'a [u8], u64),
) -> Result<&'a [u8], Foreign> {
    let rest = bytes.strip_prefix(ENTRY_MAGIC).ok_or(Foreign)?;
    let (count, mut rest) = take_u16(rest)?;
    if usize::from(count) > MAX_TAGS {
        return Err(Foreign);
    }
    for _ in 0..count {
        let (len, r) = take_u16(rest)?;
        let len = usize::from(len);
        if r.len() < len + 8 {
            return Err(Foreign);
        }
        let (tag, r) = r.split_at(len);
        let (generation, r) = r.split_at(8);
        let mut g = [0u8; 8];
        g.copy_from_slice(generation);
        each(tag, u64::from_le_bytes(g));
        rest = r;
    }
    Ok(rest)
}

fn take_u16(b: &[u8]) -> Result<(u16, &[u8]), Foreign> {
    if b.len() < 2 {
        return Err(Foreign);
    }
    Ok((u16::from_le_bytes([b[0], b[1]]), &b[2..]))
}

/// A tag key's value: its generation, and the unix-ms expiry the module gave the key (kept in the
/// value so extending it needs no extra lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagState {
    pub generation: u64,
    pub expires_at_ms: u64,
}

/// The value stored in a tag key.
pub fn encode_generation(tag: TagState) -> [u8; TAG_VALUE_LEN] {
    let mut out = [0u8; TAG_VALUE_LEN];
    out[..4].copy_from_slice(TAG_MAGIC);
    out[4..12].copy_from_slice(&tag.generation.to_le_bytes());
    out[12..].copy_from_slice(&tag.expires_at_ms.to_le_bytes());
    out
}

/// Reads a tag key's value; `Err(Foreign)` when the key holds something else.
pub fn decode_generation(bytes: &[u8]) -> Result<TagState, Foreign> {
    if bytes.len() != TAG_VALUE_LEN || &bytes[..4] != TAG_MAGIC {
        return Err(Foreign);
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&bytes[4..12]);
    let generation = u64::from_le_bytes(g);
    g.copy_from_slice(&bytes[12..]);
    if generation == 0 {
        return Err(Foreign);
    }
    Ok(TagState {
        generation,
        expires_at_ms: u64::from_le_bytes(g),
    })
}

/// The expiry a tag key needs so it outlives an entry expiring at `entry_expires_at_ms`: `None`
/// when its current expiry already suffices; otherwise twice the entry's TTL from now, so a stream
/// of fills with one TTL rewrites the tag at most once per TTL instead of on every fill.
pub fn extended_expiry(current: u64, now_ms: u64, entry_expires_at_ms: u64) -> Option<u64> {
    (entry_expires_at_ms > current)
        .then(|| entry_expires_at_ms.saturating_add(entry_expires_at_ms.saturating_sub(now_ms)))
}

/// The fill token for tags' generations (in canonical tag order): `1` then `:` and 16 hex digits
/// per tag. A fill presents it; the store recomputes it from the current generations and refuses
/// the fill when they differ (a tag was invalidated, or the fill names other tags).
pub fn token(generations: &[u64]) -> String {
    let mut s = String::with_capacity(1 + 17 * generations.len());
    s.push('1');
    for g in generations {
        s.push_str(&format!(":{g:016x}"));
    }
    s
}

/// Whether bytes have the syntax of a token (so a garbled one is an error, not just a refusal).
pub fn is_token(bytes: &[u8]) -> bool {
    let Some(rest) = bytes.strip_prefix(b"1") else {
        return false;
    };
    rest.len().is_multiple_of(17)
        && rest
            .chunks(17)
            .all(|c| c[0] == b':' && c[1..].iter().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_are_unique_nonzero_and_seed_dependent() {
        let mut a = Generations::new(42);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let g = a.next_generation();
            assert_ne!(g, 0);
            assert!(seen.insert(g), "duplicate generation {g}");
        }
        let (mut x, mut y) = (Generations::new(1), Generations::new(2));
        assert_ne!(x.next_generation(), y.next_generation());
        assert_eq!(
            Generations::new(7).next_generation(),
            Generations::new(7).next_generation(),
            "deterministic per seed"
        );
    }

    #[test]
    fn entries_round_trip() {
        let tags: Vec<(&[u8], u64)> = vec![(b"t:orders", 7), (b"t:users", u64::MAX), (b"", 1)];
        let bytes = encode_entry(&tags, b"the value \x00\xff");
        let e = decode_entry(&bytes).expect("decodes");
        assert_eq!(e.tags, tags);
        assert_eq!(e.value, b"the value \x00\xff");
        let none = encode_entry(&[], b"");
        assert_eq!(
            decode_entry(&none),
            Ok(Entry {
                tags: vec![],
                value: b""
            })
        );
    }

    #[test]
    fn malformed_entries_are_foreign() {
        let good = encode_entry(&[(b"tag", 1)], b"v");
        assert_eq!(decode_entry(b"plain string"), Err(Foreign));
        assert_eq!(decode_entry(b"DCE1"), Err(Foreign));
        assert_eq!(
            decode_entry(b"DCE1\x01\x00\x05\x00ab"),
            Err(Foreign),
            "tag runs past the end"
        );
        assert_eq!(
            decode_entry(&good[..good.len() - 2]),
            Err(Foreign),
            "generation cut short"
        );
        let mut many = b"DCE1".to_vec();
        many.extend_from_slice(&((MAX_TAGS + 1) as u16).to_le_bytes());
        assert_eq!(decode_entry(&many), Err(Foreign));
        // Every prefix of a valid entry either decodes or is Foreign: never a panic.
        for n in 0..good.len() {
            let _ = decode_entry(&good[..n]);
        }
    }

    #[test]
    fn generation_values() {
        let t = TagState {
            generation: 99,
            expires_at_ms: 1_700_000_000_000,
        };
        assert_eq!(decode_generation(&encode_generation(t)), Ok(t));
        let zero = TagState {
            generation: 0,
            expires_at_ms: 1,
        };
        assert_eq!(decode_generation(&encode_generation(zero)), Err(Foreign));
        assert_eq!(decode_generation(b"DCT1short"), Err(Foreign));
        assert_eq!(decode_generation(b"ABCD1234567812345678"), Err(Foreign));
    }

    #[test]
    fn tag_expiry_is_extended_rarely() {
        // Current expiry covers the entry: nothing to do.
        assert_eq!(extended_expiry(5000, 1000, 4000), None);
        assert_eq!(extended_expiry(5000, 1000, 5000), None);
        // Otherwise: twice the entry's TTL from now.
        assert_eq!(extended_expiry(5000, 1000, 6000), Some(11_000));
        assert_eq!(extended_expiry(0, 1000, u64::MAX), Some(u64::MAX));
    }

    #[test]
    fn tokens() {
        assert_eq!(token(&[]), "1");
        assert_eq!(token(&[1, 0xabc]), "1:0000000000000001:0000000000000abc");
        assert!(is_token(token(&[5, 6, 7]).as_bytes()));
        for bad in [
            &b""[..],
            b"2",
            b"1:",
            b"1:000000000000000g",
            b"1:00000000000000001",
            b"x",
        ] {
            assert!(!is_token(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn canonical_order() {
        let t = canonical_tags(vec![b"b", b"a", b"b", b"c"]);
        assert_eq!(t, vec![&b"a"[..], b"b", b"c"]);
    }
}
