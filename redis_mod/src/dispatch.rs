//! The commands' entry point: Redis calls one `extern "C"` function per command (made by
//! [`command_table!`]), which runs the handler on the call's arguments *borrowed* — no `Vec` and
//! no retain/free per argument, as redis-module's own wrapper does on every call (measured with
//! callgrind: ≈ 250 instructions and one allocation per `DBOPT.RL.HIT`) — under a panic guard.

use std::mem::ManuallyDrop;
use std::os::raw::c_int;

use redis_module::{raw, Context, RedisError, RedisResult, RedisString, Status};

/// A command handler: the module context and the call's arguments (the command name first).
pub type Handler = fn(&Context, &[RedisString]) -> RedisResult;

/// Arguments up to this many are viewed from the stack; longer calls (`HITALL`, `DEL` of many
/// keys) use one allocation.
const ON_STACK: usize = 8;

/// Runs `handler` for one call and replies with its result.
///
/// # Safety
/// `ctx`, `argv` and `argc` must be what Redis passed to the command function.
pub unsafe fn call(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
    handler: Handler,
) -> c_int {
    let context = Context::new(ctx);
    let argv: &[*mut raw::RedisModuleString] = if argv.is_null() || argc <= 0 {
        &[]
    } else {
        // SAFETY: Redis passes `argc` valid strings that live until the command returns.
        unsafe { std::slice::from_raw_parts(argv, argc as usize) }
    };
    let result = with_borrowed(ctx, argv, |args| guarded(handler, &context, args));
    context.reply(result) as c_int
}

/// Views Redis' argument strings as `RedisString`s without taking a reference on them: they are
/// Redis' for the length of the call, the slice cannot outlive it, and `ManuallyDrop` keeps them
/// from being freed when the view goes.
fn with_borrowed<R>(
    ctx: *mut raw::RedisModuleCtx,
    argv: &[*mut raw::RedisModuleString],
    f: impl FnOnce(&[RedisString]) -> R,
) -> R {
    let view = |s: &*mut raw::RedisModuleString| {
        ManuallyDrop::new(RedisString::from_redis_module_string(ctx, *s))
    };
    if argv.len() <= ON_STACK {
        let mut stack: [ManuallyDrop<RedisString>; ON_STACK] = std::array::from_fn(|_| {
            ManuallyDrop::new(RedisString::from_redis_module_string(
                ctx,
                std::ptr::null_mut(),
            ))
        });
        for (slot, s) in stack.iter_mut().zip(argv) {
            *slot = view(s);
        }
        f(as_strings(&stack[..argv.len()]))
    } else {
        let heap: Vec<ManuallyDrop<RedisString>> = argv.iter().map(view).collect();
        f(as_strings(&heap))
    }
}

fn as_strings(views: &[ManuallyDrop<RedisString>]) -> &[RedisString] {
    // SAFETY: `ManuallyDrop<T>` is `repr(transparent)` over `T`: same size, alignment and layout.
    unsafe { std::slice::from_raw_parts(views.as_ptr().cast::<RedisString>(), views.len()) }
}

/// Runs a handler so that a panic becomes an `ERR` reply and a warning in the Redis log instead of
/// unwinding into Redis, which would abort the server. Handlers are written not to panic (the fuzz
/// test checks); this is the net under them.
fn guarded(handler: Handler, ctx: &Context, args: &[RedisString]) -> RedisResult {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(ctx, args))).unwrap_or_else(
        |panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            ctx.log_warning(&format!(
                "dbopt: internal error in a command handler: {what}"
            ));
            Err(RedisError::String(format!(
                "ERR dbopt internal error: {what}"
            )))
        },
    )
}

/// Registers one command with Redis (`RedisModule_CreateCommand`).
pub fn create(
    ctx: &Context,
    name: &std::ffi::CStr,
    entry: raw::RedisModuleCmdFunc,
    flags: &std::ffi::CStr,
    keys: (c_int, c_int, c_int),
) -> Status {
    // SAFETY: called from the module's load function with its context; the strings are copied.
    let created = unsafe {
        raw::RedisModule_CreateCommand.expect("RedisModule_CreateCommand")(
            ctx.ctx,
            name.as_ptr(),
            entry,
            flags.as_ptr(),
            keys.0,
            keys.1,
            keys.2,
        )
    };
    if created == raw::Status::Err as c_int {
        ctx.log_warning(&format!("dbopt: cannot create the command {name:?}"));
        Status::Err
    } else {
        Status::Ok
    }
}

/// `fn register(ctx: &Context) -> Status`, registering each row `[name, handler, flags,
/// first_key, last_key, key_step]` with its own entry function.
#[macro_export]
macro_rules! command_table {
    ($( [$name:literal, $handler:path, $flags:literal, $first:literal, $last:literal, $step:literal] ),* $(,)?) => {
        fn register(ctx: &redis_module::Context) -> redis_module::Status {
            $({
                extern "C" fn entry(
                    ctx: *mut redis_module::raw::RedisModuleCtx,
                    argv: *mut *mut redis_module::raw::RedisModuleString,
                    argc: std::os::raw::c_int,
                ) -> std::os::raw::c_int {
                    // SAFETY: Redis' own arguments to the command function.
                    unsafe { $crate::dispatch::call(ctx, argv, argc, $handler) }
                }
                if $crate::dispatch::create(ctx, $name, Some(entry), $flags, ($first, $last, $step))
                    == redis_module::Status::Err
                {
                    return redis_module::Status::Err;
                }
            })*
            redis_module::Status::Ok
        }
    };
}
