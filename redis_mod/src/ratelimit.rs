//! `DBOPT.RL.HIT`, `DBOPT.RL.PEEK`, `DBOPT.RL.RESET` — sliding-window rate limits.
//!
//! ```text
//! DBOPT.RL.HIT  key limit window_ms [COST n]   → [allowed, limit, remaining, retry_after_ms, reset_after_ms]
//! DBOPT.RL.PEEK key limit window_ms [COST n]   → the same, without admitting anything (read-only)
//! DBOPT.RL.RESET key                           → 1 if a limiter was deleted, 0 if there was none
//! DBOPT.RL.HITALL cost key limit window_ms [key limit window_ms ...]
//!     → [allowed, index, limit, remaining, retry_after_ms, reset_after_ms]
//! DBOPT.RL.LEASE min max key limit window_ms [...]
//!     → HITALL's reply and the units granted: as many as every limiter has room for, min..=max
//! ```
//! `HITALL` admits `cost` units on every limiter or on none (one statement under a user's, an end
//! user's and a global limit at once): `index` is the refusing limiter with the longest wait (the
//! one the other fields describe), or -1 when all admitted (then the fields describe the limiter
//! with the least room left). At most [`MAX_HITALL`] limiters, each key once.
//! `allowed` is 1 or 0; `retry_after_ms` is -1 when allowed. Limits: `limit` 1..=4294967295,
//! `window_ms` 1..=31536000000 (a year), `COST` 1..=limit (default 1). The semantics (never more than
//! `limit` units in any `window_ms`, early denial bounded by window/32) are documented in
//! `dbopt-ratelimit`. Calling a key with another `window_ms` starts it afresh. The key expires by
//! itself once nothing is counted any more.

use dbopt_ratelimit::{
    longest_refusal, tightest, validate, Decision, Window, MAX_LIMIT, MAX_WINDOW_MS,
};
use redis_module::{raw, Context, KeyType, RedisError, RedisResult, RedisString, RedisValue};

use crate::args::{err, is_keyword, shown, uint, wrong_type};
use crate::stats::{RL_ALLOWED, RL_DENIED};
use crate::store::{self, Held};

const WHAT: &str = "dbopt rate limiter";

struct Request {
    limit: u64,
    window_ms: u64,
    cost: u64,
}

fn parse(args: &[RedisString]) -> Result<Request, RedisError> {
    if args.len() != 4 && args.len() != 6 {
        return Err(RedisError::WrongArity);
    }
    let limit = uint(args[2].as_slice(), "limit", 1, MAX_LIMIT)?;
    let window_ms = uint(args[3].as_slice(), "window_ms", 1, MAX_WINDOW_MS)?;
    let mut cost = 1;
    if args.len() == 6 {
        if !is_keyword(args[4].as_slice(), "COST") {
            return Err(err(format!(
                "unknown option '{}' (expected COST)",
                shown(args[4].as_slice())
            )));
        }
        cost = uint(args[5].as_slice(), "COST", 1, limit)?;
    }
    validate(limit, window_ms, cost).map_err(|e| err(e.to_string()))?;
    Ok(Request {
        limit,
        window_ms,
        cost,
    })
}

/// Replies with a decision straight into the client's buffer (no reply tree built first).
fn reply_now(ctx: &Context, d: Decision) -> RedisResult {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    raw::reply_with_array(ctx.ctx, 5);
    for v in [
        i64::from(d.allowed),
        int(d.limit),
        int(d.remaining),
        d.retry_after_ms,
        int(d.reset_after_ms),
    ] {
        raw::reply_with_long_long(ctx.ctx, v);
    }
    Ok(RedisValue::NoReply)
}

fn reply(d: Decision) -> RedisValue {
    let int = |v: u64| RedisValue::Integer(i64::try_from(v).unwrap_or(i64::MAX));
    RedisValue::Array(vec![
        RedisValue::Integer(i64::from(d.allowed)),
        int(d.limit),
        int(d.remaining),
        RedisValue::Integer(d.retry_after_ms),
        int(d.reset_after_ms),
    ])
}

/// A stored state for `window_ms` (`true`), or a fresh one (`false`) when the key is empty or was
/// made for another window.
fn state(bytes: Option<&[u8]>, window_ms: u64, now: u64) -> Result<(Window, bool), RedisError> {
    match bytes {
        None => Ok((Window::new(window_ms, now), false)),
        Some(b) => match Window::decode(b) {
            Ok(w) if w.window_ms() == window_ms => Ok((w, true)),
            Ok(_) => Ok((Window::new(window_ms, now), false)),
            Err(_) => Err(wrong_type(WHAT)),
        },
    }
}

pub fn hit(ctx: &Context, args: &[RedisString]) -> RedisResult {
    let req = parse(args)?;
    let now = store::now_ms();
    let key = ctx.open_key_writable(&args[1]);
    // One DMA view of the stored bytes: decoded from, and written back into in place.
    let mut stored_bytes = match key.key_type() {
        KeyType::Empty => None,
        KeyType::String => Some(key.as_string_dma()?),
        _ => return Err(wrong_type(WHAT)),
    };
    let (mut window, stored) = state(stored_bytes.as_deref(), req.window_ms, now)?;
    let keeps_expiry = stored && window.admission_keeps_reset_time(now);
    let decision = window.hit(now, req.limit, req.cost);
    if let (true, true, Some(dma)) = (decision.allowed, keeps_expiry, stored_bytes.as_mut()) {
        RL_ALLOWED.incr();
        // Same sub-bucket as the last admission: same reset time, same expiry; rewrite in place.
        let bytes = window.encode();
        dma.write(&bytes)?;
        store::replicate_keep_ttl(ctx, &args[1], &bytes);
    } else if decision.allowed {
        RL_ALLOWED.incr();
        // `put` takes its own view of the key (ours is not used past this point).
        // Only an admission changes what is counted; a denial leaves the key as it was.
        store::put(
            ctx,
            &args[1],
            &key,
            &window.encode(),
            now,
            now + decision.reset_after_ms,
        )?;
    } else {
        RL_DENIED.incr();
    }
    reply_now(ctx, decision)
}

/// Most limiters one `DBOPT.RL.HITALL` takes.
pub const MAX_HITALL: usize = 16;

/// One limiter of a `HITALL`: its key's argument index, limit and window.
type Limiter = (usize, u64, u64);

/// Parsed `HITALL`/`LEASE` arguments: the limiters, from argument `first` on, in triples. Each
/// must admit at least `least` units.
fn parse_limiters(
    args: &[RedisString],
    first: usize,
    least: u64,
) -> Result<Vec<Limiter>, RedisError> {
    if args.len() < first + 3 || !(args.len() - first).is_multiple_of(3) {
        return Err(RedisError::WrongArity);
    }
    let n = (args.len() - first) / 3;
    if n > MAX_HITALL {
        return Err(err(format!(
            "at most {MAX_HITALL} limiters per call, got {n}"
        )));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let k = first + 3 * i;
        let key = args[k].as_slice();
        if out
            .iter()
            .any(|&(j, _, _): &Limiter| args[j].as_slice() == key)
        {
            return Err(err(format!("key '{}' is given twice", shown(key))));
        }
        let limit = uint(args[k + 1].as_slice(), "limit", 1, MAX_LIMIT)?;
        let window_ms = uint(args[k + 2].as_slice(), "window_ms", 1, MAX_WINDOW_MS)?;
        validate(limit, window_ms, least).map_err(|e| err(e.to_string()))?;
        out.push((k, limit, window_ms));
    }
    Ok(out)
}

/// `DBOPT.RL.HITALL cost key limit window_ms [...]`.
pub fn hit_all(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() < 2 {
        return Err(RedisError::WrongArity);
    }
    let cost = uint(args[1].as_slice(), "cost", 1, MAX_LIMIT)?;
    let limiters = parse_limiters(args, 2, cost)?;
    charge_all(ctx, args, &limiters, cost, cost, false)
}

/// `DBOPT.RL.LEASE min max key limit window_ms [...]`: admits as many units as every limiter has
/// room for, between `min` and `max` (a router's lease of admissions to hand out itself); the reply
/// is HITALL's with the units granted appended (0 when refused).
pub fn lease(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() < 3 {
        return Err(RedisError::WrongArity);
    }
    let min = uint(args[1].as_slice(), "min", 1, MAX_LIMIT)?;
    let max = uint(args[2].as_slice(), "max", min, MAX_LIMIT)?;
    let limiters = parse_limiters(args, 3, min)?;
    charge_all(ctx, args, &limiters, min, max, true)
}

/// Charges between `min` and `max` units (the most every limiter admits) on all limiters, or
/// nothing when one cannot take `min`.
fn charge_all(
    ctx: &Context,
    args: &[RedisString],
    limiters: &[Limiter],
    min: u64,
    max: u64,
    show_granted: bool,
) -> RedisResult {
    let now = store::now_ms();
    let mut keys = Vec::with_capacity(limiters.len());
    let mut windows = Vec::with_capacity(limiters.len());
    for &(k, _, window_ms) in limiters {
        let key = ctx.open_key_writable(&args[k]);
        let w = match key.key_type() {
            KeyType::Empty => state(None, window_ms, now)?,
            KeyType::String => state(Some(&key.as_string_dma()?), window_ms, now)?,
            _ => return Err(wrong_type(WHAT)),
        };
        keys.push(key);
        windows.push(w);
    }
    // Decide on all before changing any: all admit, or none is charged.
    let decisions: Vec<Decision> = windows
        .iter()
        .zip(limiters)
        .map(|((w, _), &(_, limit, _))| w.peek(now, limit, min))
        .collect();
    let refused = longest_refusal(&decisions);
    // Room everywhere (each decision's `remaining` is the room before this request).
    let granted = decisions
        .iter()
        .map(|d| d.remaining)
        .min()
        .unwrap_or(0)
        .min(max);
    let (index, decision, granted) = match refused {
        Some((i, d)) => {
            RL_DENIED.incr();
            (i as i64, d, 0)
        }
        None => {
            let mut admitted = Vec::with_capacity(limiters.len());
            for (i, ((w, stored), &(k, limit, _))) in windows.iter_mut().zip(limiters).enumerate() {
                let keeps_expiry = *stored && w.admission_keeps_reset_time(now);
                let d = w.hit(now, limit, granted);
                if keeps_expiry {
                    store::overwrite_keep_ttl(ctx, &args[k], &keys[i], &w.encode())?;
                } else {
                    store::put(
                        ctx,
                        &args[k],
                        &keys[i],
                        &w.encode(),
                        now,
                        now + d.reset_after_ms,
                    )?;
                }
                admitted.push(d);
            }
            RL_ALLOWED.incr();
            (-1, tightest(admitted).unwrap_or(decisions[0]), granted)
        }
    };
    let RedisValue::Array(mut fields) = reply(decision) else {
        return Err(err("internal: reply shape"));
    };
    fields.insert(1, RedisValue::Integer(index));
    if show_granted {
        fields.push(RedisValue::Integer(
            i64::try_from(granted).unwrap_or(i64::MAX),
        ));
    }
    Ok(RedisValue::Array(fields))
}

pub fn peek(ctx: &Context, args: &[RedisString]) -> RedisResult {
    let req = parse(args)?;
    let now = store::now_ms();
    let key = ctx.open_key(&args[1]);
    let window = match store::read(&key)? {
        Held::Nothing => state(None, req.window_ms, now)?.0,
        Held::Bytes(b) => state(Some(b), req.window_ms, now)?.0,
        Held::OtherType => return Err(wrong_type(WHAT)),
    };
    Ok(reply(window.peek(now, req.limit, req.cost)))
}

pub fn reset(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() != 2 {
        return Err(RedisError::WrongArity);
    }
    let key = ctx.open_key_writable(&args[1]);
    match store::read_writable(&key).map_err(|_| wrong_type(WHAT))? {
        None => Ok(RedisValue::Integer(0)),
        Some(b) => {
            Window::decode(&b).map_err(|_| wrong_type(WHAT))?;
            store::delete(ctx, &[(args[1].as_slice(), key)])?;
            Ok(RedisValue::Integer(1))
        }
    }
}
