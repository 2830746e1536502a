//! Tag keys: `DBOPT.TAG.TOKEN`, `DBOPT.TAG.INVALIDATE`, and the tag reads/writes the cache uses.
//!
//! ```text
//! DBOPT.TAG.TOKEN tag [tag …]        → token: the tags' generations now, for a later guarded fill
//! DBOPT.TAG.INVALIDATE tag [tag …]   → how many of the tags existed (each is dropped)
//! ```
//! A tag is a key of its own (so Redis Cluster routes and checks it like any key); its value is a
//! generation (see `dbopt-tagcache`). Dropping it invalidates every entry stored under it at once.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, OnceLock};

use dbopt_tagcache::{
    canonical_tags, decode_generation, encode_generation, extended_expiry, token, Generations,
    TagState, MAX_TAGS, MAX_TAG_LEN,
};
use redis_module::key::RedisKeyWritable;
use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::args::{err, wrong_type};
use crate::stats::TAG_INVALIDATIONS;
use crate::store;

pub const WHAT: &str = "dbopt cache tag";
/// How long a tag made by `DBOPT.TAG.TOKEN` lives without a fill: a fill slower than this is
/// refused (its tag is gone, so its token no longer matches) — fail safe, never stale.
pub const FILL_WINDOW_MS: u64 = 300_000;

fn generations() -> &'static Mutex<Generations> {
    static GENERATIONS: OnceLock<Mutex<Generations>> = OnceLock::new();
    GENERATIONS.get_or_init(|| {
        Mutex::new(Generations::new(
            RandomState::new().hash_one(std::process::id()),
        ))
    })
}

/// A fresh generation (unique in this process, unpredictable across processes).
fn next_generation() -> u64 {
    match generations().lock() {
        Ok(mut g) => g.next_generation(),
        Err(poisoned) => poisoned.into_inner().next_generation(),
    }
}

/// Checks tag arguments: count and length limits.
pub fn check_tag_args(tags: &[&[u8]]) -> Result<(), RedisError> {
    if tags.len() > MAX_TAGS {
        return Err(err(format!("at most {MAX_TAGS} tags, got {}", tags.len())));
    }
    if let Some(t) = tags.iter().find(|t| t.len() > MAX_TAG_LEN) {
        return Err(err(format!(
            "a tag is {} bytes, at most {MAX_TAG_LEN} allowed",
            t.len()
        )));
    }
    Ok(())
}

/// A tag key opened for writing, with what it holds now.
pub struct OpenTag<'a> {
    pub name_bytes: &'a [u8],
    pub name: RedisString,
    pub key: RedisKeyWritable,
    pub state: Option<TagState>,
}

/// Opens tags (canonical order) for writing; a key that holds anything but a tag is WRONGTYPE,
/// reported before anything is written.
pub fn open_tags<'a>(ctx: &Context, tags: Vec<&'a [u8]>) -> Result<Vec<OpenTag<'a>>, RedisError> {
    let mut out = Vec::with_capacity(tags.len());
    for t in canonical_tags(tags) {
        let name = RedisString::create_from_slice(ctx.ctx, t);
        let key = ctx.open_key_writable(&name);
        let state = match store::read_writable(&key).map_err(|_| wrong_type(WHAT))? {
            None => None,
            Some(b) => Some(decode_generation(&b).map_err(|_| wrong_type(WHAT))?),
        };
        out.push(OpenTag {
            name_bytes: t,
            name,
            key,
            state,
        });
    }
    Ok(out)
}

/// Makes sure an open tag exists and lives until at least `needed_until`; returns its generation.
pub fn ensure(
    ctx: &Context,
    tag: &OpenTag,
    now: u64,
    needed_until: u64,
) -> Result<u64, RedisError> {
    let (generation, current) = match tag.state {
        Some(s) => (s.generation, s.expires_at_ms),
        None => (next_generation(), 0),
    };
    if let Some(at) = extended_expiry(current, now, needed_until) {
        let value = encode_generation(TagState {
            generation,
            expires_at_ms: at,
        });
        store::put(ctx, &tag.name, &tag.key, &value, now, at)?;
    }
    Ok(generation)
}

fn tag_args(args: &[RedisString]) -> Result<Vec<&[u8]>, RedisError> {
    if args.len() < 2 {
        return Err(RedisError::WrongArity);
    }
    let tags: Vec<&[u8]> = args[1..].iter().map(|a| a.as_slice()).collect();
    check_tag_args(&tags)?;
    Ok(tags)
}

pub fn token_command(ctx: &Context, args: &[RedisString]) -> RedisResult {
    let tags = open_tags(ctx, tag_args(args)?)?;
    let now = store::now_ms();
    let mut gens = Vec::with_capacity(tags.len());
    for t in &tags {
        gens.push(ensure(ctx, t, now, now + FILL_WINDOW_MS)?);
    }
    Ok(RedisValue::BulkString(token(&gens)))
}

pub fn invalidate_command(ctx: &Context, args: &[RedisString]) -> RedisResult {
    let tags = open_tags(ctx, tag_args(args)?)?;
    let existing: Vec<(&[u8], RedisKeyWritable)> = tags
        .into_iter()
        .filter(|t| t.state.is_some())
        .map(|t| (t.name_bytes, t.key))
        .collect();
    store::delete(ctx, &existing)?;
    TAG_INVALIDATIONS.add(existing.len() as u64);
    Ok(RedisValue::Integer(existing.len() as i64))
}
