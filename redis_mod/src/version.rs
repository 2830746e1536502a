//! `DBOPT.VERSION` — which dbopt module is loaded.
//!
//! Wire format: `DBOPT.VERSION` → simple string, the crate version (e.g. `"0.1.0"`).
//! Any argument is an error: `ERR wrong number of arguments for 'dbopt.version' command`.

use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

/// The module version as Redis encodes it for `MODULE LIST`: major*10000 + minor*100 + patch.
pub const MODULE_VERSION: i32 = encode_version(env!("CARGO_PKG_VERSION"));

/// Encodes `"major.minor.patch"` as `major*10000 + minor*100 + patch` at compile time.
const fn encode_version(v: &str) -> i32 {
    let b = v.as_bytes();
    let mut parts = [0i32; 3];
    let (mut i, mut p) = (0, 0);
    while i < b.len() && p < 3 {
        let c = b[i];
        if c == b'.' {
            p += 1;
        } else if c.is_ascii_digit() {
            parts[p] = parts[p] * 10 + (c - b'0') as i32;
        } else {
            break; // pre-release suffix such as "-rc1"
        }
        i += 1;
    }
    parts[0] * 10000 + parts[1] * 100 + parts[2]
}

/// Handler of `DBOPT.VERSION`.
pub fn version_command(_ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() != 1 {
        return Err(RedisError::WrongArity);
    }
    Ok(RedisValue::SimpleString(
        env!("CARGO_PKG_VERSION").to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::encode_version;

    #[test]
    fn versions_encode_like_module_list_expects() {
        assert_eq!(encode_version("0.1.0"), 100);
        assert_eq!(encode_version("1.2.3"), 10203);
        assert_eq!(encode_version("12.34.56"), 123456);
        assert_eq!(encode_version("2.0.1-rc1"), 20001);
    }
}
