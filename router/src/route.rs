//! Routing policy: from the classification of a batch to a target, and the read-your-writes rule.
//! Pure; the session applies it with the live topology.

use std::collections::VecDeque;

use crate::classify::{Class, Hint, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    /// Use the primary's reserved connections.
    pub critical: bool,
    /// Whether the work can write (a read-your-writes barrier follows its commit).
    pub writes: bool,
}

/// Merges the classes of the statements of one batch into one.
pub fn combine(classes: &[Class]) -> Class {
    let mut out = Class {
        kind: Kind::Empty,
        hint: None,
        critical: false,
        session: false,
        // Only a batch of exactly one statement can be a simple SET.
        simple_set: classes.len() == 1 && classes[0].simple_set,
    };
    for c in classes {
        out.critical |= c.critical;
        out.session |= c.session;
        out.hint = match (out.hint, c.hint) {
            (Some(Hint::Primary), _) | (_, Some(Hint::Primary)) => Some(Hint::Primary),
            (a, b) => a.or(b),
        };
        out.kind = match (out.kind, c.kind) {
            (Kind::Write(r), _) | (_, Kind::Write(r)) => Kind::Write(r),
            (Kind::Empty, k) | (k, Kind::Empty) => k,
            (Kind::Read, Kind::Read) => Kind::Read,
            (Kind::MayWrite(r), Kind::Read | Kind::MayWrite(_))
            | (Kind::Read, Kind::MayWrite(r)) => Kind::MayWrite(r),
            // A transaction start with more statements in the same batch: keep it on the primary.
            _ => Kind::Write("transaction control with other statements"),
        };
    }
    out
}

/// Where a batch that starts outside a transaction goes.
pub fn decide(class: &Class, user_critical: bool, session_mode: bool) -> Decision {
    let writes = class.writes();
    let primary = |critical| Decision {
        target: Target::Primary,
        critical,
        writes,
    };
    if class.critical || user_critical {
        return primary(true);
    }
    if session_mode {
        return primary(false);
    }
    let replica = Decision {
        target: Target::Replica,
        critical: false,
        writes: false,
    };
    match (class.hint, class.kind) {
        (Some(Hint::Primary), _) => primary(false),
        // A hint vouches for a function the router does not know; it never moves DML, DDL,
        // transaction control or anything else that certainly writes.
        (Some(Hint::Replica), Kind::MayWrite(_)) => replica,
        (_, Kind::Read | Kind::Empty | Kind::BeginReadOnly) => replica,
        (_, Kind::Begin | Kind::Write(_) | Kind::MayWrite(_)) => primary(false),
    }
}

/// The primary's WAL position as sampled by the router, with the time the sample's query was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LsnSample {
    pub sent_ms: u64,
    pub lsn: u64,
}

/// Recent samples of the primary's WAL position (newest last).
#[derive(Debug, Default)]
pub struct LsnHistory {
    samples: VecDeque<LsnSample>,
}

pub const LSN_HISTORY: usize = 256;

impl LsnHistory {
    pub fn push(&mut self, s: LsnSample) {
        if self.samples.len() == LSN_HISTORY {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// An LSN that covers every commit acknowledged at or before `write_ms`: the first sample
    /// whose query was sent in a later millisecond (it read a position at least that far). A
    /// sample sent in the same millisecond may have been read just before the commit: found by
    /// the randomized consistency test, 1 read in 1,000 missed its user's write that way.
    /// `None` while no such sample exists yet.
    pub fn covering(&self, write_ms: u64) -> Option<u64> {
        self.samples
            .iter()
            .find(|s| s.sent_ms > write_ms)
            .map(|s| s.lsn)
    }
}

/// What a client has seen, as a floor its next reads must not go below: read-your-writes after its
/// writes (and, with the user scope, its user's), and never back in time after its reads and cache
/// hits. Each read and write raises the floor; a node may serve a read when its replayed position
/// is at or above it — or when it served the client's last read (a node's replay only moves
/// forward). The primary can always serve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Floor {
    /// Known part: reads must see at least this LSN.
    pub lsn: u64,
    /// Everything committed before this router time (ms) must be visible too; resolved into
    /// `lsn` by the first primary position sampled at or after it.
    pub pending_ms: Option<u64>,
    /// The node of the client's last read.
    pub sticky: Option<usize>,
}

impl Floor {
    /// A floor at a known position (tests, and a fresh client: `Floor::default()`).
    pub fn at(lsn: u64) -> Floor {
        Floor {
            lsn,
            ..Floor::default()
        }
    }

    fn pend(&mut self, at_ms: u64) {
        self.pending_ms = Some(self.pending_ms.map_or(at_ms, |p| p.max(at_ms)));
    }

    /// A write was acknowledged at `at_ms`: no replica is known to have it.
    pub fn after_write(&mut self, at_ms: u64) {
        self.pend(at_ms);
        self.sticky = None;
    }

    /// A read on `node` ended at `at_ms`.
    pub fn after_read(&mut self, node: usize, at_ms: u64) {
        self.pend(at_ms);
        self.sticky = Some(node);
    }

    /// A cache hit returned data at least as new as `lsn`... and at most that old.
    pub fn after_hit(&mut self, fill_lsn: u64) {
        self.lsn = self.lsn.max(fill_lsn);
        self.sticky = None;
    }

    /// Resolves the pending part when a covering sample exists.
    pub fn resolve(&mut self, history: &LsnHistory) {
        if let Some(t) = self.pending_ms {
            if let Some(l) = history.covering(t) {
                self.lsn = self.lsn.max(l);
                self.pending_ms = None;
            }
        }
    }

    /// The primary's position `lsn`, read after this client's last read and write ended (a cache
    /// barrier the client asked for): it covers whatever is pending, whatever the millisecond.
    /// A position sampled independently needs a later millisecond to be sure ([`Floor::resolve`]),
    /// which a client that sends its next statement at once does not leave.
    pub fn cover_pending(&mut self, lsn: u64) {
        if self.pending_ms.take().is_some() {
            self.lsn = self.lsn.max(lsn);
        }
    }

    /// May a replica `node` that replayed up to `replay_lsn` serve this client's next read?
    pub fn allows(&self, node: usize, replay_lsn: Option<u64>) -> bool {
        self.sticky == Some(node)
            || (self.pending_ms.is_none() && replay_lsn.is_some_and(|r| r >= self.lsn))
    }

    /// May a cache entry serve this client, when invalidations are done up to `processed_lsn`?
    pub fn allows_hit(&self, processed_lsn: u64) -> bool {
        self.pending_ms.is_none() && processed_lsn >= self.lsn
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::classify::{classify, FunctionCatalog};

    fn route(sql: &str) -> Decision {
        decide(&classify(sql, &FunctionCatalog::builtin()), false, false)
    }

    #[test]
    fn reads_to_replicas_writes_to_primary() {
        assert_eq!(route("SELECT 1").target, Target::Replica);
        assert_eq!(route("BEGIN READ ONLY").target, Target::Replica);
        let w = route("UPDATE t SET a = 1");
        assert_eq!(
            (w.target, w.writes, w.critical),
            (Target::Primary, true, false)
        );
        assert_eq!(route("BEGIN").target, Target::Primary);
        assert_eq!(route("SELECT nextval('s')").target, Target::Primary);
    }

    #[test]
    fn session_statements_set_no_read_your_writes_barrier() {
        let set = route("SET TimeZone = 'UTC'");
        assert_eq!((set.target, set.writes), (Target::Primary, false));
        assert!(!route("SHOW work_mem").writes);
        assert!(route("BEGIN").writes);
        assert!(route("INSERT INTO t VALUES (1)").writes);
    }

    #[test]
    fn hints_and_critical() {
        assert_eq!(
            route("/* dbopt:primary */ SELECT 1").target,
            Target::Primary
        );
        assert_eq!(
            route("/* dbopt:replica */ SELECT f()").target,
            Target::Replica
        );
        let c = route("/* dbopt:critical */ SELECT 1");
        assert_eq!((c.target, c.critical), (Target::Primary, true));
        let u = decide(
            &classify("SELECT 1", &FunctionCatalog::builtin()),
            true,
            false,
        );
        assert_eq!((u.target, u.critical), (Target::Primary, true));
        let s = decide(
            &classify("SELECT 1", &FunctionCatalog::builtin()),
            false,
            true,
        );
        assert_eq!(s.target, Target::Primary);
    }

    #[test]
    fn combining_a_batch() {
        let f = FunctionCatalog::builtin();
        let c = |s| classify(s, &f);
        assert_eq!(combine(&[c("SELECT 1"), c("SELECT 2")]).kind, Kind::Read);
        assert!(matches!(
            combine(&[c("SELECT 1"), c("DELETE FROM t")]).kind,
            Kind::Write(_)
        ));
        assert_eq!(combine(&[]).kind, Kind::Empty);
        assert!(matches!(
            combine(&[c("BEGIN READ ONLY"), c("SELECT 1")]).kind,
            Kind::Write(_)
        ));
        let h = combine(&[
            c("/* dbopt:replica */ SELECT 1"),
            c("/* dbopt:primary */ SELECT 1"),
        ]);
        assert_eq!(h.hint, Some(Hint::Primary));
    }

    #[test]
    fn read_your_writes_waits_for_a_covering_sample_and_replay() {
        let mut h = LsnHistory::default();
        h.push(LsnSample {
            sent_ms: 100,
            lsn: 1000,
        });
        let mut f = Floor::default();
        assert!(f.allows(1, Some(0)));
        f.after_write(150);
        f.resolve(&h);
        assert_eq!(
            f.pending_ms,
            Some(150),
            "no sample sent after the write yet"
        );
        assert!(!f.allows(1, Some(u64::MAX)));
        h.push(LsnSample {
            sent_ms: 150,
            lsn: 1150,
        });
        f.resolve(&h);
        assert_eq!(
            f.pending_ms,
            Some(150),
            "sent in the write's millisecond: maybe before it"
        );
        h.push(LsnSample {
            sent_ms: 151,
            lsn: 1200,
        });
        h.push(LsnSample {
            sent_ms: 250,
            lsn: 1300,
        });
        f.resolve(&h);
        assert_eq!(f, Floor::at(1200));
        assert!(!f.allows(1, Some(1199)));
        assert!(!f.allows(1, None));
        assert!(f.allows(1, Some(1200)));
    }

    #[test]
    fn never_back_in_time_after_reads_and_hits() {
        let mut h = LsnHistory::default();
        let mut f = Floor::default();
        f.after_read(2, 10);
        // The node that served the last read may serve the next; another must be past it.
        assert!(f.allows(2, Some(0)));
        assert!(
            !f.allows(3, Some(u64::MAX)),
            "unresolved: only the same node"
        );
        assert!(!f.allows_hit(u64::MAX));
        h.push(LsnSample {
            sent_ms: 11,
            lsn: 500,
        });
        f.resolve(&h);
        assert!(f.allows(3, Some(500)) && !f.allows(3, Some(499)));
        assert!(f.allows_hit(500) && !f.allows_hit(499));
        // A hit: the same node no longer vouches for itself.
        f.after_hit(800);
        assert!(!f.allows(2, Some(799)));
        assert!(f.allows(2, Some(800)));
        // A write: the sticky replica does not have it.
        f.after_read(2, 20);
        f.after_write(30);
        assert!(!f.allows(2, Some(u64::MAX)));
    }

    #[test]
    fn a_barrier_asked_for_after_a_read_covers_it_in_the_same_millisecond() {
        let mut h = LsnHistory::default();
        let mut f = Floor::at(300);
        f.after_read(1, 40);
        // The barrier's own sample went out in the read's millisecond: not covering by time.
        h.push(LsnSample {
            sent_ms: 40,
            lsn: 700,
        });
        f.resolve(&h);
        assert!(!f.allows_hit(700), "pending by time alone");
        f.cover_pending(700);
        assert!(f.allows_hit(700) && !f.allows_hit(699));
        assert!(f.allows(2, Some(700)) && !f.allows(2, Some(699)));
        // Nothing pending: the known part stays as it is (never lowered).
        f.cover_pending(10);
        assert_eq!(f.lsn, 700);
        assert_eq!(f.pending_ms, None);
    }

    #[test]
    fn history_is_bounded() {
        let mut h = LsnHistory::default();
        for i in 0..1000 {
            h.push(LsnSample { sent_ms: i, lsn: i });
        }
        assert_eq!(h.covering(0), Some(1000 - LSN_HISTORY as u64));
        assert_eq!(h.covering(2000), None);
    }
}
