//! N+1 detection in the backend: feeds each top-level execution to the pure detector
//! (`dbopt_querystats::nplusone`) and keeps detected bursts in a shared ring for
//! `dbopt.n_plus_one()`.

use std::cell::RefCell;

use dbopt_querystats::nplusone::{
    recommendation, worth_publishing, Detector, Event, Outcome, Statement,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::gucs;
use crate::privilege::{application_name, database_name, may_see, role_name, timestamp, HIDDEN};
use crate::query_desc::fingerprint;
use crate::shmem::{self, StatsKey};

struct Local {
    detector: Detector,
    /// Ring ids of bursts reported in the current scope, by query id (to update their counts).
    reported: Vec<(i64, u64)>,
}

// Backend-local: one detector per connection; backends are single-threaded.
static LOCAL: crate::backend_local::BackendLocal<RefCell<Local>> =
    crate::backend_local::BackendLocal::new(|| {
        RefCell::new(Local {
            detector: Detector::default(),
            reported: Vec::new(),
        })
    });

/// Observes one top-level execution.
///
/// # Safety
/// `qd` must be the executor's valid QueryDesc.
pub unsafe fn observe(qd: *mut pg_sys::QueryDesc, key: &StatsKey, now_ms: u64) {
    let cfg = gucs::n_plus_one();
    if cfg.threshold == 0 {
        return;
    }
    // SAFETY: reads backend-local state.
    let in_block = unsafe { crate::fast_ffi::IsTransactionBlock() };
    let stmt = Statement {
        query_id: key.queryid,
        fingerprint: 0,
        in_transaction_block: in_block,
        now_ms,
    };
    // SAFETY: the QueryDesc is the running statement's (ExecutorEnd).
    let outcome = LOCAL.with(|l| {
        l.borrow_mut()
            .detector
            .observe_lazily(cfg, stmt, || unsafe { fingerprint(qd) })
    });
    match outcome {
        Outcome::Nothing => {}
        Outcome::Detected(e) => report(key, &e),
        Outcome::Grew(e) => {
            if worth_publishing(e.count) {
                publish(&e);
            }
        }
    }
}

/// A burst just crossed the threshold: keep it in the shared ring (rare, out of line).
#[cold]
#[inline(never)]
fn report(key: &StatsKey, e: &Event) {
    let text = shmem::text_of(key).unwrap_or_default();
    let parent = e.parent_query_id.unwrap_or(0);
    let parent_text = e
        .parent_query_id
        .and_then(|q| shmem::text_of(&StatsKey::new(key.userid, key.dbid, q, true)))
        .unwrap_or_default();
    let app = application_name();
    // SAFETY: reads the clock.
    let at = unsafe { pg_sys::GetCurrentTimestamp() };
    let id = shmem::push_n1(|r| {
        r.at = at;
        r.userid = key.userid;
        r.dbid = key.dbid;
        r.queryid = key.queryid;
        r.parent_queryid = parent;
        r.count = e.count;
        r.first_ms = e.first_ms;
        r.last_ms = e.last_ms;
        r.app.set(&app);
        r.text.set(&text);
        r.parent_text.set(&parent_text);
    });
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        if l.reported.len() >= 64 {
            l.reported.remove(0);
        }
        l.reported.push((key.queryid, id));
    });
}

/// Writes a reported burst's current count to its shared record.
#[inline(never)]
fn publish(e: &Event) {
    let id = LOCAL.with(|l| {
        l.borrow()
            .reported
            .iter()
            .rev()
            .find(|(q, _)| *q == e.query_id)
            .map(|(_, id)| *id)
    });
    if let Some(id) = id {
        shmem::update_n1(id, |r| {
            r.count = e.count;
            r.last_ms = e.last_ms;
        });
    }
}

/// Whether a transaction end has bursts to close (never panics: a busy state counts as yes).
pub fn transaction_open() -> bool {
    LOCAL.with(|l| l.try_borrow().map_or(true, |l| l.detector.in_transaction()))
}

/// A transaction ended: bursts scoped to it are over; their exact counts are written out.
pub fn end_transaction() {
    let closed = LOCAL.with(|l| l.borrow_mut().detector.end_transaction());
    for e in &closed {
        publish(e);
    }
}

/// Detected N+1 bursts, newest first, each with a concrete fix.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn n_plus_one() -> TableIterator<
    'static,
    (
        name!(detected_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(username, String),
        name!(datname, String),
        name!(application_name, String),
        name!(queryid, i64),
        name!(query, String),
        name!(executions, i64),
        name!(burst_ms, i64),
        name!(parent_queryid, Option<i64>),
        name!(parent_query, Option<String>),
        name!(recommendation, String),
    ),
> {
    let mut rows = Vec::new();
    shmem::each_n1(|r| {
        let visible = may_see(r.userid);
        let text = if visible {
            r.text.get()
        } else {
            HIDDEN.to_string()
        };
        let parent_text = r.parent_text.get();
        rows.push((
            timestamp(r.at),
            role_name(r.userid),
            database_name(r.dbid),
            r.app.get(),
            r.queryid,
            text.clone(),
            i64::from(r.count),
            r.last_ms.saturating_sub(r.first_ms) as i64,
            (r.parent_queryid != 0).then_some(r.parent_queryid),
            (r.parent_queryid != 0).then(|| {
                if visible {
                    parent_text
                } else {
                    HIDDEN.to_string()
                }
            }),
            recommendation(if visible { &text } else { "" }, r.count),
        ));
    });
    TableIterator::new(rows)
}

/// Forgets every recorded N+1 burst.
#[pg_extern(volatile)]
fn n_plus_one_reset() {
    shmem::reset_n1();
}
