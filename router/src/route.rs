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

    /// An LSN that covers every commit acknowledged before `write_ms`: the first sample whose
    /// query was sent at or after that time (it read a position at least that far).
    /// `None` while no such sample exists yet.
    pub fn covering(&self, write_ms: u64) -> Option<u64> {
        self.samples
            .iter()
            .find(|s| s.sent_ms >= write_ms)
            .map(|s| s.lsn)
    }
}

/// A client's pending read-your-writes barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    None,
    /// The client's last write committed at this time; its LSN is not known yet.
    WroteAt(u64),
    /// Reads may use replicas that replayed at least this far.
    Lsn(u64),
}

impl Barrier {
    /// Resolves the LSN when a covering sample exists.
    pub fn resolve(self, history: &LsnHistory) -> Barrier {
        match self {
            Barrier::WroteAt(t) => history.covering(t).map_or(self, Barrier::Lsn),
            other => other,
        }
    }

    /// May a replica that replayed up to `replay_lsn` serve this client's reads?
    pub fn allows(self, replay_lsn: Option<u64>) -> bool {
        match self {
            Barrier::None => true,
            Barrier::WroteAt(_) => false,
            Barrier::Lsn(l) => replay_lsn.is_some_and(|r| r >= l),
        }
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
        let b = Barrier::WroteAt(150).resolve(&h);
        assert_eq!(
            b,
            Barrier::WroteAt(150),
            "no sample sent after the write yet"
        );
        assert!(!b.allows(Some(u64::MAX)));
        h.push(LsnSample {
            sent_ms: 150,
            lsn: 1200,
        });
        h.push(LsnSample {
            sent_ms: 250,
            lsn: 1300,
        });
        let b = Barrier::WroteAt(150).resolve(&h);
        assert_eq!(b, Barrier::Lsn(1200));
        assert!(!b.allows(Some(1199)));
        assert!(!b.allows(None));
        assert!(b.allows(Some(1200)));
        assert!(Barrier::None.allows(None));
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
