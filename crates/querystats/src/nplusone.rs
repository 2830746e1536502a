//! N+1 detection for one connection: the same statement run again and again with *different*
//! parameters — the ORM loop that should have been one query (`= ANY($1)`, `select_related`,
//! `prefetch_related`).
//!
//! A *burst* is the executions of one query id inside one scope:
//! - inside a transaction block: the whole transaction (the shell calls [`Detector::end_transaction`]);
//! - outside (autocommit, as ORMs often run): executions at most `window_ms` apart.
//!
//! A burst is reported once it holds `threshold` executions with pairwise *distinct* parameter
//! fingerprints. A loop of different statements (each query id once) and a batch job repeating one
//! statement with one parameter set (one fingerprint) are never reported.

/// Detector settings (`dbopt.n_plus_one_threshold`, `dbopt.n_plus_one_window_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// 0 disables detection.
    pub threshold: u32,
    pub window_ms: u64,
}

/// One executed top-level statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statement {
    pub query_id: i64,
    /// Hash of the statement's parameter values (bound parameters and literals).
    pub fingerprint: u64,
    pub in_transaction_block: bool,
    pub now_ms: u64,
}

/// A detected N+1 burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub query_id: i64,
    /// The statement run just before the burst started: the likely parent loop.
    pub parent_query_id: Option<i64>,
    pub count: u32,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// What one observation produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Nothing,
    /// A burst just crossed the threshold.
    Detected(Event),
    /// A burst already reported ran once more: its event's count and end time are now these.
    Grew(Event),
}

/// At most this many query ids are followed per scope (the least recently seen is dropped).
const MAX_GROUPS: usize = 64;

#[derive(Debug, Clone)]
struct Group {
    event: Event,
    fingerprints: Vec<u64>,
    reported: bool,
    in_transaction: bool,
}

impl Group {
    /// An autocommit burst is over once its statement has not run for longer than the window.
    fn expired(&self, cfg: Config, now_ms: u64) -> bool {
        !self.in_transaction && now_ms.saturating_sub(self.event.last_ms) > cfg.window_ms
    }
}

/// Per-connection detector state (lives in backend-local memory).
#[derive(Debug, Clone, Default)]
pub struct Detector {
    groups: Vec<Group>,
    last_query_id: Option<i64>,
    /// Where the last statement's group is (checked first: ORM loops repeat one statement).
    last_idx: usize,
}

impl Detector {
    pub fn observe(&mut self, cfg: Config, s: Statement) -> Outcome {
        self.observe_lazily(cfg, s, || s.fingerprint)
    }

    /// As [`Detector::observe`], with the parameter fingerprint computed only when it matters:
    /// not for a statement whose burst is already reported (`s.fingerprint` is ignored).
    pub fn observe_lazily(
        &mut self,
        cfg: Config,
        s: Statement,
        fingerprint: impl FnOnce() -> u64,
    ) -> Outcome {
        if cfg.threshold == 0 || s.query_id == 0 {
            return Outcome::Nothing;
        }
        let parent = self.last_query_id.filter(|&q| q != s.query_id);
        self.last_query_id = Some(s.query_id);
        // Autocommit bursts end after a gap longer than the window. Expired groups are dropped
        // lazily — when their statement comes back or room is needed — not on every call: the
        // outcome is the same, and a repeated statement (the usual case) touches one group.
        let found = match self.groups.get(self.last_idx) {
            Some(g)
                if g.event.query_id == s.query_id && g.in_transaction == s.in_transaction_block =>
            {
                Some(self.last_idx)
            }
            _ => self.groups.iter().position(|g| {
                g.event.query_id == s.query_id && g.in_transaction == s.in_transaction_block
            }),
        };
        let idx = match found {
            Some(i) if !self.groups[i].expired(cfg, s.now_ms) => i,
            stale => self.start_group(cfg, s, parent, stale),
        };
        self.last_idx = idx;
        let g = &mut self.groups[idx];
        g.event.last_ms = s.now_ms;
        if g.reported {
            g.event.count += 1;
            return Outcome::Grew(g.event);
        }
        let fp = fingerprint();
        if !g.fingerprints.contains(&fp) {
            g.fingerprints.push(fp);
        }
        g.event.count = g.fingerprints.len() as u32;
        if g.fingerprints.len() as u32 >= cfg.threshold {
            g.reported = true;
            g.fingerprints = Vec::new();
            return Outcome::Detected(g.event);
        }
        Outcome::Nothing
    }

    /// Opens the group of a statement not followed yet (or whose burst expired, at `stale`);
    /// returns its index. Out of line: a repeated statement never comes here.
    #[inline(never)]
    fn start_group(
        &mut self,
        cfg: Config,
        s: Statement,
        parent: Option<i64>,
        stale: Option<usize>,
    ) -> usize {
        if let Some(i) = stale {
            self.groups.swap_remove(i);
        }
        if self.groups.len() >= MAX_GROUPS {
            self.groups.retain(|g| !g.expired(cfg, s.now_ms));
        }
        if self.groups.len() >= MAX_GROUPS {
            let oldest = (0..self.groups.len())
                .min_by_key(|&i| self.groups[i].event.last_ms)
                .unwrap_or(0);
            self.groups.swap_remove(oldest);
        }
        self.groups.push(Group {
            event: Event {
                query_id: s.query_id,
                parent_query_id: parent,
                count: 0,
                first_ms: s.now_ms,
                last_ms: s.now_ms,
            },
            fingerprints: Vec::new(),
            reported: false,
            in_transaction: s.in_transaction_block,
        });
        self.groups.len() - 1
    }

    /// Whether a transaction's end has anything to close (false for autocommit statements).
    #[inline]
    pub fn in_transaction(&self) -> bool {
        self.groups.iter().any(|g| g.in_transaction)
    }

    /// The transaction block ended (commit or abort): its bursts are over. Returns the final state
    /// of the bursts that had been reported, so their counts can be written out exactly.
    pub fn end_transaction(&mut self) -> Vec<Event> {
        // Autocommit statements never open a transaction group: nothing to do (the common case).
        if !self.groups.iter().any(|g| g.in_transaction) {
            return Vec::new();
        }
        let done = self
            .groups
            .iter()
            .filter(|g| g.in_transaction && g.reported)
            .map(|g| g.event)
            .collect();
        self.groups.retain(|g| !g.in_transaction);
        done
    }
}

/// Whether a grown burst's count is worth writing to shared memory now: every execution up to 64,
/// then every 64th (the exact count is written when a transaction ends). A long-running loop thus
/// costs one shared write per 64 executions instead of one per execution.
pub fn worth_publishing(count: u32) -> bool {
    count <= 64 || count.is_multiple_of(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: Config = Config {
        threshold: 10,
        window_ms: 1000,
    };

    fn stmt(query_id: i64, fingerprint: u64, tx: bool, now_ms: u64) -> Statement {
        Statement {
            query_id,
            fingerprint,
            in_transaction_block: tx,
            now_ms,
        }
    }

    #[test]
    fn fingerprints_are_not_computed_once_a_burst_is_reported() {
        let mut d = Detector::default();
        let mut computed = 0;
        for i in 0..30u64 {
            let s = stmt(7, 0, false, i);
            d.observe_lazily(CFG, s, || {
                computed += 1;
                i
            });
        }
        assert_eq!(
            computed, 10,
            "only until the 10th distinct execution reported it"
        );
        assert_eq!(d.end_transaction(), Vec::new());
    }

    #[test]
    fn django_loop_in_a_transaction_is_reported_once_and_grows() {
        let mut d = Detector::default();
        assert_eq!(d.observe(CFG, stmt(1, 1, true, 0)), Outcome::Nothing); // SELECT … FROM orders
        let mut detected = None;
        for i in 0..50 {
            match d.observe(CFG, stmt(2, 100 + i, true, i)) {
                Outcome::Detected(e) => {
                    assert!(detected.is_none(), "reported once");
                    assert_eq!(i, 9, "at the 10th distinct execution");
                    detected = Some(e);
                }
                Outcome::Grew(e) => assert_eq!(e.count as u64, i + 1),
                Outcome::Nothing => assert!(i < 9),
            }
        }
        let e = detected.expect("detected");
        assert_eq!((e.query_id, e.parent_query_id, e.count), (2, Some(1), 10));
        let closed = d.end_transaction();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].count, 50, "the exact final count");
        // A new transaction starts a new burst.
        assert_eq!(d.observe(CFG, stmt(2, 999, true, 100)), Outcome::Nothing);
    }

    #[test]
    fn distinct_statements_are_not_reported() {
        let mut d = Detector::default();
        for i in 0..100 {
            assert_eq!(d.observe(CFG, stmt(i, i as u64, true, 0)), Outcome::Nothing);
        }
    }

    #[test]
    fn a_batch_with_one_parameter_set_is_not_reported() {
        let mut d = Detector::default();
        for t in 0..1000 {
            assert_eq!(d.observe(CFG, stmt(7, 42, false, t)), Outcome::Nothing);
        }
    }

    #[test]
    fn autocommit_bursts_are_bounded_by_the_window() {
        let mut d = Detector::default();
        // Nine quick executions, then a pause longer than the window: no burst of ten.
        for i in 0..9 {
            assert_eq!(d.observe(CFG, stmt(3, i, false, i * 10)), Outcome::Nothing);
        }
        for i in 0..9 {
            assert_eq!(
                d.observe(CFG, stmt(3, 100 + i, false, 5000 + i * 10)),
                Outcome::Nothing
            );
        }
        // The tenth within the window of the previous one completes this burst.
        assert!(
            matches!(d.observe(CFG, stmt(3, 200, false, 5100)), Outcome::Detected(e) if e.count == 10)
        );
    }

    #[test]
    fn disabled_and_zero_query_ids_do_nothing() {
        let mut d = Detector::default();
        let off = Config {
            threshold: 0,
            window_ms: 1000,
        };
        for i in 0..50 {
            assert_eq!(d.observe(off, stmt(5, i, true, 0)), Outcome::Nothing);
            assert_eq!(d.observe(CFG, stmt(0, i, true, 0)), Outcome::Nothing);
        }
    }

    /// The detector as first written: every call drops every expired group before looking.
    /// Lazy expiry must give the same outcomes.
    #[derive(Default)]
    struct Eager {
        groups: Vec<(Event, Vec<u64>, bool, bool)>,
        last: Option<i64>,
    }

    impl Eager {
        fn observe(&mut self, cfg: Config, s: Statement) -> Outcome {
            if cfg.threshold == 0 || s.query_id == 0 {
                return Outcome::Nothing;
            }
            let parent = self.last.filter(|&q| q != s.query_id);
            self.last = Some(s.query_id);
            self.groups
                .retain(|g| g.3 || s.now_ms.saturating_sub(g.0.last_ms) <= cfg.window_ms);
            let at = self
                .groups
                .iter()
                .position(|g| g.0.query_id == s.query_id && g.3 == s.in_transaction_block);
            let idx = at.unwrap_or_else(|| {
                if self.groups.len() >= MAX_GROUPS {
                    let oldest = (0..self.groups.len())
                        .min_by_key(|&i| self.groups[i].0.last_ms)
                        .unwrap_or(0);
                    self.groups.swap_remove(oldest);
                }
                let e = Event {
                    query_id: s.query_id,
                    parent_query_id: parent,
                    count: 0,
                    first_ms: s.now_ms,
                    last_ms: s.now_ms,
                };
                self.groups
                    .push((e, Vec::new(), false, s.in_transaction_block));
                self.groups.len() - 1
            });
            let g = &mut self.groups[idx];
            g.0.last_ms = s.now_ms;
            if g.2 {
                g.0.count += 1;
                return Outcome::Grew(g.0);
            }
            if !g.1.contains(&s.fingerprint) {
                g.1.push(s.fingerprint);
            }
            g.0.count = g.1.len() as u32;
            if g.0.count >= cfg.threshold {
                g.2 = true;
                return Outcome::Detected(g.0);
            }
            Outcome::Nothing
        }

        fn end_transaction(&mut self) -> Vec<Event> {
            let done = self
                .groups
                .iter()
                .filter(|g| g.3 && g.2)
                .map(|g| g.0)
                .collect();
            self.groups.retain(|g| !g.3);
            done
        }
    }

    #[test]
    fn lazy_expiry_gives_the_eager_outcomes() {
        // A deterministic pseudo-random workload: 100 query ids (more than MAX_GROUPS), few
        // parameter values, gaps around the window, transaction blocks opening and closing.
        let mut rng = crate::test_rng::XorShift::new(0x2545_f491_4f6c_dd1d);
        let mut next = move |n: u64| rng.below(n);
        let cfg = Config {
            threshold: 3,
            window_ms: 100,
        };
        let (mut lazy, mut eager) = (Detector::default(), Eager::default());
        let (mut now, mut in_block) = (0, false);
        for step in 0..200_000 {
            now += next(60);
            if next(50) == 0 {
                if in_block {
                    assert_eq!(
                        lazy.end_transaction(),
                        eager.end_transaction(),
                        "step {step}"
                    );
                }
                in_block = !in_block;
            }
            let query_id = if next(3) == 0 {
                7
            } else {
                1 + next(100) as i64
            };
            let s = stmt(query_id, next(4), in_block, now);
            assert_eq!(lazy.observe(cfg, s), eager.observe(cfg, s), "step {step}");
        }
    }

    #[test]
    fn state_stays_bounded() {
        let mut d = Detector::default();
        for i in 0..10_000 {
            d.observe(CFG, stmt(i, 1, true, 0));
        }
        assert!(d.groups.len() <= MAX_GROUPS);
    }
}

/// A concrete fix for a burst of `count` executions of the normalised statement `text`: the
/// rewrite to one query, and what a Django developer writes instead of the loop.
pub fn recommendation(text: &str, count: u32) -> String {
    let single = rewrite_to_any(text);
    let mut out = format!(
        "{count} executions of one statement with different parameters: fetch them in one query"
    );
    match single {
        Some(q) => out.push_str(&format!(" ({q}, passing the {count} values as one array)")),
        None => out.push_str(" (collect the parameters and use = ANY($1) with an array)"),
    }
    out.push_str(
        ". In Django, load the related rows with the parent queryset: select_related() for foreign keys \
         and one-to-one, prefetch_related() for reverse and many-to-many relations; in Prisma, use include \
         or a findMany with { in: [...] }.",
    );
    out
}

/// `… WHERE col = $1 …` → `… WHERE col = ANY($1) …` when the statement filters on one parameter.
fn rewrite_to_any(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let where_at = lower.find(" where ")?;
    let rest = &text[where_at..];
    let eq = rest.find("= $")?;
    let after = &rest[eq + 2..];
    let digits = after[1..].chars().take_while(char::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let param = &after[..1 + digits];
    let head = &text[..where_at + eq];
    let tail = &after[1 + digits..];
    Some(format!("{head}= ANY({param}){tail}"))
}

#[cfg(test)]
mod recommendation_tests {
    use super::recommendation;

    #[test]
    fn rewrites_the_filter_and_names_the_orm_fixes() {
        let r = recommendation(
            "SELECT id, name FROM app_customer WHERE id = $1 LIMIT $2",
            50,
        );
        assert!(
            r.contains("SELECT id, name FROM app_customer WHERE id = ANY($1) LIMIT $2"),
            "{r}"
        );
        assert!(
            r.contains("select_related")
                && r.contains("prefetch_related")
                && r.starts_with("50 executions"),
            "{r}"
        );
        let r = recommendation("SELECT now()", 12);
        assert!(r.contains("= ANY($1) with an array"), "{r}");
    }
}
