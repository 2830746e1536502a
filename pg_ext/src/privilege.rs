//! Who may see what, as in pg_stat_statements: other users' statement texts and plans only for
//! superusers and members of `pg_read_all_stats`.

use pgrx::pg_sys;

/// Whether the current user may see texts of statements run by `owner`.
pub fn may_see(owner: u32) -> bool {
    // SAFETY: catalog-free privilege checks on the current user.
    unsafe {
        let me = pg_sys::GetUserId();
        u32::from(me) == owner
            || pg_sys::superuser()
            || pg_sys::has_privs_of_role(me, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_ALL_STATS))
    }
}

/// Shown instead of a text the caller may not see.
pub const HIDDEN: &str = "<insufficient privilege>";

/// Role name for an oid (NULL-safe: unknown roles show their oid).
pub fn role_name(oid: u32) -> String {
    // SAFETY: syscache lookup with noerr = true.
    unsafe {
        let p = pg_sys::GetUserNameFromId(pg_sys::Oid::from(oid), true);
        if p.is_null() {
            oid.to_string()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// Database name for an oid.
pub fn database_name(oid: u32) -> String {
    // SAFETY: syscache lookup; returns NULL for a dropped database.
    unsafe {
        let p = pg_sys::get_database_name(pg_sys::Oid::from(oid));
        if p.is_null() {
            oid.to_string()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// This session's `application_name` ("" when unset).
pub fn application_name() -> String {
    // SAFETY: the GUC variable is a backend-local NUL-terminated string or NULL.
    unsafe {
        let p = pg_sys::application_name;
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// A TimestampTz as a SQL value (NULL when zero / out of range).
pub fn timestamp(ts: i64) -> Option<pgrx::datum::TimestampWithTimeZone> {
    (ts != 0)
        .then(|| pgrx::datum::TimestampWithTimeZone::try_from(ts).ok())
        .flatten()
}
