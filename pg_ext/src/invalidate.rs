//! Invalidation on commit: every table a transaction wrote is announced once, when (and only if) it
//! commits, as a NOTIFY on `dbopt_invalidate` (payload format: the `dbopt-invalidation` crate).
//!
//! # What counts as a write, and how it is seen
//! - DML of any kind (INSERT/UPDATE/DELETE/MERGE, ON CONFLICT, writable CTEs), COPY FROM, and
//!   whatever triggers, functions and foreign-key cascades run: all of them pass PostgreSQL's
//!   permission check of their range table (`ExecCheckRTPerms`, for every plan at every nesting
//!   level and for COPY), whose hook sees each relation with the rights the statement needs. A
//!   relation needing INSERT or DELETE, or UPDATE with columns to update, is written; UPDATE without
//!   columns is `SELECT … FOR UPDATE/SHARE`, which writes nothing.
//! - DDL: the object-access hook sees relations altered, dropped and truncated (`OAT_TRUNCATE`), and
//!   every object created, altered or dropped (functions, views, types…) sets `ddl`, so readers know
//!   what a statement reads may have changed.
//! - `REFRESH MATERIALIZED VIEW` and `COMMIT PREPARED` (whose transaction was prepared elsewhere,
//!   and NOTIFY cannot be prepared) are seen in the utility hook; the latter announces the whole
//!   database.
//! - A partition written is announced with its ancestors, so readers of the parent are invalidated.
//!   Temporary tables are never announced (no other session can read them).
//!
//! # Cost
//! A read-only transaction pays one walk of each plan's range table (a few comparisons per
//! relation) and nothing at commit. A writing transaction pays a look-up in the set of watched
//! tables ([`crate::watched`]) at pre-commit, and one NOTIFY only when it wrote a watched table
//! (or `dbopt.announce_all_tables` is on): PostgreSQL serialises notifying commits.
//!
//! Not seen: writes applied by logical-replication workers (they skip the permission check) and
//! writes made with the hooks unloaded; `dbopt.invalidate_table()` covers those by hand.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::ptr;

use dbopt_invalidation::{check_user_tag, encode, unix_micros, Announcement, CHANNEL};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::backend_local::BackendLocal;

#[allow(non_snake_case)]
extern "C-unwind" {
    /// commands/async.h: queue a notification, delivered at commit (not in pgrx's bindings).
    fn Async_Notify(channel: *const std::ffi::c_char, payload: *const std::ffi::c_char);
    /// catalog/partition.h: the ancestors of a partition, nearest first.
    fn get_partition_ancestors(relid: pg_sys::Oid) -> *mut pg_sys::List;
}

/// What the current transaction will announce at commit.
#[derive(Default)]
struct Pending {
    tables: BTreeSet<u32>,
    tags: BTreeSet<String>,
    ddl: bool,
    all: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.tags.is_empty() && !self.ddl && !self.all
    }
}

// A backend is one single-threaded process: this is the backend's own state, no lock needed.
static PENDING: BackendLocal<RefCell<Pending>> = BackendLocal::new(RefCell::default);

static mut PREV_PERMS: pg_sys::ExecutorCheckPerms_hook_type = None;
static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init, once, in the postmaster.
    unsafe {
        PREV_PERMS = pg_sys::ExecutorCheckPerms_hook;
        pg_sys::ExecutorCheckPerms_hook = Some(check_perms);
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
    }
}

/// Iterates the pointers of a PostgreSQL `List`.
///
/// # Safety
/// `list` must be NULL or a valid pointer list that outlives the iteration.
pub(crate) unsafe fn pointers(
    list: *mut pg_sys::List,
) -> impl Iterator<Item = *mut std::ffi::c_void> {
    // SAFETY: per the contract above.
    let len = if list.is_null() {
        0
    } else {
        unsafe { (*list).length.max(0) as usize }
    };
    // SAFETY: i < length.
    (0..len).map(move |i| unsafe { (*(*list).elements.add(i)).ptr_value })
}

/// Iterates the OIDs of a PostgreSQL OID `List`.
///
/// # Safety
/// As [`pointers`], for an OID list.
pub(crate) unsafe fn oids(list: *mut pg_sys::List) -> impl Iterator<Item = pg_sys::Oid> {
    let len = if list.is_null() {
        0
    } else {
        // SAFETY: per the contract above.
        unsafe { (*list).length.max(0) as usize }
    };
    // SAFETY: i < length.
    (0..len).map(move |i| unsafe { (*(*list).elements.add(i)).oid_value })
}

/// A relation and, when it is a partition, its ancestors.
pub(crate) fn with_ancestors(relid: pg_sys::Oid) -> Vec<u32> {
    let mut out = vec![u32::from(relid)];
    // SAFETY: syscache lookups of an existing relation; the list is palloc'd and only read here.
    unsafe {
        if pg_sys::get_rel_relispartition(relid) {
            out.extend(oids(get_partition_ancestors(relid)).map(u32::from));
        }
    }
    out
}

fn note_table(relid: pg_sys::Oid) {
    // SAFETY: a syscache lookup; '\0' when the relation is not visible.
    let persistence = unsafe { pg_sys::get_rel_persistence(relid) } as u8;
    if persistence == pg_sys::RELPERSISTENCE_TEMP {
        return;
    }
    // The extension's own tables (dbopt.ddl_history, written by its event triggers during any
    // DDL; dbopt.alert_history) are no application's cached data.
    // SAFETY: syscache lookups by oid and by name; InvalidOid when missing.
    let own = unsafe {
        let ns = pg_sys::get_rel_namespace(relid);
        ns != pg_sys::InvalidOid && ns == pg_sys::get_namespace_oid(c"dbopt".as_ptr(), true)
    };
    if own {
        return;
    }
    let tables = with_ancestors(relid);
    PENDING.with(|p| p.borrow_mut().tables.extend(tables));
}

/// Runs after PostgreSQL's own checks passed (only permitted work gets here): notes the relations
/// the plan writes.
///
/// Called for every statement, so the scan runs without pgrx's guard (plain pointer reads that
/// cannot panic; an error raised by the hook chained after it passes a frame with nothing to
/// clean up); only a write found enters guarded code.
unsafe extern "C-unwind" fn check_perms(range_table: *mut pg_sys::List, report: bool) -> bool {
    const WRITES: u64 = (pg_sys::ACL_INSERT | pg_sys::ACL_DELETE) as u64;
    const UPDATE: u64 = pg_sys::ACL_UPDATE as u64;
    // SAFETY: the range table PostgreSQL is checking, a list of RangeTblEntry.
    unsafe {
        for rte in pointers(range_table).map(|p| p.cast::<pg_sys::RangeTblEntry>()) {
            if rte.is_null() || (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION {
                continue;
            }
            let perms = u64::from((*rte).requiredPerms);
            let writes =
                perms & WRITES != 0 || (perms & UPDATE != 0 && !(*rte).updatedCols.is_null());
            if writes {
                note_written((*rte).relid);
            }
        }
        match PREV_PERMS {
            Some(prev) => prev(range_table, report),
            None => true,
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn note_written(relid: pg_sys::Oid) {
    note_table(relid);
}

/// Called for every namespace search and function execution too: those return without pgrx's
/// guard (nothing to note); creating, altering, dropping and truncating enter guarded code.
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
    arg: *mut std::ffi::c_void,
) {
    use pg_sys::ObjectAccessType::*;
    if matches!(
        access,
        OAT_POST_CREATE | OAT_POST_ALTER | OAT_DROP | OAT_TRUNCATE
    ) {
        // SAFETY: forwarded from PostgreSQL.
        unsafe { object_changed(access, class_id, object_id, sub_id) };
    }
    // SAFETY: chaining with PostgreSQL's own arguments.
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            prev(access, class_id, object_id, sub_id, arg);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn object_changed(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
) {
    use pg_sys::ObjectAccessType::*;
    if access == OAT_POST_CREATE {
        PENDING.with(|p| p.borrow_mut().ddl = true);
        // A column added to an existing table (sub_id = its number) changes `SELECT *`.
        if class_id == pg_sys::RelationRelationId && sub_id != 0 {
            note_table(object_id);
        }
    } else {
        PENDING.with(|p| p.borrow_mut().ddl |= access != OAT_TRUNCATE);
        if class_id == pg_sys::RelationRelationId {
            note_table(object_id);
        }
    }
}

/// Called from the utility hook before a utility statement runs: the writes no other hook sees.
///
/// # Safety
/// `pstmt` is the PlannedStmt PostgreSQL passed to the utility hook.
pub unsafe fn before_utility(pstmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: per the contract; only node tags and fields of the matching node are read.
    unsafe {
        if pstmt.is_null() || (*pstmt).utilityStmt.is_null() {
            return;
        }
        let node = (*pstmt).utilityStmt;
        match (*node).type_ {
            pg_sys::NodeTag::T_TransactionStmt => {
                let stmt = node.cast::<pg_sys::TransactionStmt>();
                if (*stmt).kind == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED {
                    // What the prepared transaction wrote is not known here.
                    PENDING.with(|p| p.borrow_mut().all = true);
                }
            }
            pg_sys::NodeTag::T_RefreshMatViewStmt => note_range_var(node),
            _ => {}
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn note_range_var(node: *mut pg_sys::Node) {
    // SAFETY: a RefreshMatViewStmt; a missing relation is InvalidOid (the statement reports it).
    unsafe {
        let stmt = node.cast::<pg_sys::RefreshMatViewStmt>();
        let relid = pg_sys::RangeVarGetRelidExtended(
            (*stmt).relation,
            pg_sys::NoLock as i32,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            ptr::null_mut(),
        );
        if relid != pg_sys::InvalidOid {
            note_table(relid);
        }
    }
}

/// A transaction event (from the extension's one transaction callback, `hooks::xact_callback`):
/// only pre-commit and the ends matter; everything else returns at once. The work is kept out of
/// line: every transaction end comes here twice, and most transactions noted nothing.
///
/// # Safety
/// Called from PostgreSQL's transaction callback, without a pgrx guard: must not panic.
#[inline]
pub unsafe fn xact_event(event: pg_sys::XactEvent::Type) {
    use pg_sys::XactEvent::*;
    match event {
        // SAFETY: `announce` is guarded; it runs in the pre-commit callback as PostgreSQL's own
        // NOTIFY does.
        XACT_EVENT_PRE_COMMIT if pending() && crate::gucs::announce() => unsafe { announce() },
        // A prepared transaction cannot NOTIFY: its COMMIT PREPARED announces the database.
        // (Pre-commit took what it announced; this also clears what `dbopt.announce = off` kept.)
        // The commit is visible now: the transaction no longer counts as deciding.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_COMMIT => {
            if pending() {
                forget_pending();
            }
            crate::watched::release();
        }
        _ => {}
    }
}

/// Whether this transaction noted anything to announce (a busy state counts as yes).
#[inline]
fn pending() -> bool {
    PENDING.with(|p| p.try_borrow().map_or(true, |p| !p.is_empty()))
}

#[cold]
#[inline(never)]
fn forget_pending() {
    PENDING.with(|p| *p.borrow_mut() = Pending::default());
}

fn database_name() -> String {
    // SAFETY: the current database's name from the syscache (palloc'd, or NULL if it vanished).
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// Queues the NOTIFY for this transaction (delivered by PostgreSQL when the commit is done).
#[pg_guard]
unsafe extern "C-unwind" fn announce() {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    // SAFETY: reads the WAL insert position (a spinlock-protected shared value).
    let lsn = unsafe { pg_sys::GetXLogInsertRecPtr() };
    let written: Vec<u32> = pending.tables.into_iter().collect();
    let tables = if crate::gucs::announce_all_tables() {
        written
    } else {
        // Only what some cache watches (and the transaction counts as deciding until its commit
        // is visible: see `watched`).
        crate::watched::hold_and_filter(&written)
    };
    if tables.is_empty() && pending.tags.is_empty() && !pending.ddl && !pending.all {
        return;
    }
    let mut a = Announcement::new(&database_name(), lsn);
    a.tables = tables;
    a.tags = pending.tags.into_iter().collect();
    a.ddl = pending.ddl;
    a.all = pending.all;
    // SAFETY: reads the clock.
    a.at_us = unix_micros(unsafe { pg_sys::GetCurrentTimestamp() });
    let (Ok(channel), Ok(payload)) = (CString::new(CHANNEL), CString::new(encode(&a))) else {
        return;
    };
    // SAFETY: both strings are NUL-terminated and copied by Async_Notify.
    unsafe { Async_Notify(channel.as_ptr(), payload.as_ptr()) };
}

fn refuse_on_standby() {
    // SAFETY: reads shared recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "cannot announce invalidations during recovery",
            function_name!(),
        )
        .set_hint("Run it on the primary: a standby cannot NOTIFY.")
        .report(PgLogLevel::ERROR);
    }
}

/// Adds application tags to this transaction's announcement (delivered with its commit).
#[pg_extern(volatile, parallel_unsafe)]
fn invalidate_tags(tags: VariadicArray<'_, String>) {
    refuse_on_standby();
    let mut list = Vec::new();
    for tag in tags.iter() {
        let Some(tag) = tag else {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                "a tag may not be NULL",
                function_name!(),
            )
            .report(PgLogLevel::ERROR);
            return;
        };
        if let Err(e) = check_user_tag(&tag) {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid tag: {e}"),
                function_name!(),
            )
            .report(PgLogLevel::ERROR);
        }
        list.push(tag);
    }
    PENDING.with(|p| p.borrow_mut().tags.extend(list));
}

/// Announces a table (and its ancestors, if a partition) as written by this transaction.
#[pg_extern(volatile, parallel_unsafe)]
fn invalidate_table(table: pg_sys::Oid) {
    refuse_on_standby();
    // SAFETY: a syscache lookup.
    if unsafe { pg_sys::get_rel_relkind(table) } == 0 {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("relation with OID {} does not exist", u32::from(table)),
            function_name!(),
        )
        .report(PgLogLevel::ERROR);
    }
    let tables = with_ancestors(table);
    PENDING.with(|p| p.borrow_mut().tables.extend(tables));
}

/// Announces that everything cached for this database is invalid.
#[pg_extern(volatile, parallel_unsafe)]
fn invalidate_all() {
    refuse_on_standby();
    PENDING.with(|p| p.borrow_mut().all = true);
}
