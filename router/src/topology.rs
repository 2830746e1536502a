//! What the router knows about its nodes: reachability, role, lag, CPU, replayed WAL position,
//! response-time EWMA and circuit breaker — updated by the monitor (`monitor.rs`) and by the
//! sessions, read by routing. One mutex, held for microseconds.

use std::sync::Arc;
use std::time::Instant;

use crate::balance::{Balancer, Candidate, Ewma};
use crate::breaker::{Admission, Breaker, BreakerPolicy, State, Transition};
use crate::classify::FunctionCatalog;
use crate::config::{Config, Node};
use crate::log;
use crate::route::{Floor, LsnHistory};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

#[derive(Debug)]
pub struct NodeState {
    pub name: String,
    pub addr: String,
    pub weight: u32,
    pub reachable: bool,
    pub role: Option<Role>,
    pub lag_s: Option<f64>,
    pub lag_bytes: Option<f64>,
    pub cpu_percent: Option<f64>,
    /// Slow statements since the node started (`dbopt.slow_queries_total()`), when known.
    pub slow_total: Option<u64>,
    /// A replica's WAL receiver state at the last full check (`streaming`, ...; None: none).
    pub receiver_state: Option<String>,
    /// Whether it streams, for re-cloning replicas that cannot catch up.
    pub resync: crate::resync::ReplicaWatch,
    pub replay_lsn: Option<u64>,
    pub last_error: Option<String>,
    pub last_check: Option<Instant>,
    /// Bumped each time the node becomes unreachable: its older connections are dead.
    pub generation: u64,
    pub ewma: Ewma,
    pub breaker: Breaker,
    /// Reads the router has running on the node now (balancing counts them).
    pub in_flight: u32,
}

#[derive(Debug)]
pub struct Topology {
    pub nodes: Vec<NodeState>,
    pub primary: Option<usize>,
    /// Bumped at every change of primary; server connections opened before are retired.
    pub epoch: u64,
    pub lsn_history: LsnHistory,
    pub functions: Arc<FunctionCatalog>,
    balancer: Balancer,
    pub max_lag_s: f64,
    pub cpu_high_percent: f64,
    /// `pool.read_balance` (and its `pack_in_flight`).
    read_policy: crate::balance::Policy,
    /// Where the primary's oldest kept WAL segment starts (`health.reclone_lost_replicas`).
    pub oldest_wal_lsn: Option<u64>,
    started: Instant,
}

pub fn breaker_policy(c: &Config) -> BreakerPolicy {
    BreakerPolicy {
        failure_ratio: c.breaker.failure_ratio,
        window_ms: c.breaker.window_s * 1000,
        min_attempts: c.breaker.min_attempts,
        open_ms: c.breaker.open_s * 1000,
    }
}

/// Why no server could be chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Unavailable {
    NoPrimary,
    BreakerOpen { node: String, retry_in_ms: u64 },
}

impl Topology {
    pub fn new(config: &Config) -> Self {
        let policy = breaker_policy(config);
        Topology {
            nodes: config.nodes.iter().map(|n| node_state(n, policy)).collect(),
            primary: None,
            epoch: 0,
            lsn_history: LsnHistory::default(),
            functions: Arc::new(FunctionCatalog::builtin()),
            balancer: Balancer::default(),
            max_lag_s: config.health.max_replica_lag_s,
            cpu_high_percent: config.health.cpu_high_percent,
            read_policy: read_policy(config),
            oldest_wal_lsn: None,
            started: Instant::now(),
        }
    }

    /// Applies a reloaded configuration (same node list; weights and thresholds may change).
    pub fn reconfigure(&mut self, config: &Config) {
        let policy = breaker_policy(config);
        for (n, c) in self.nodes.iter_mut().zip(&config.nodes) {
            n.weight = c.weight;
            n.breaker.set_policy(policy);
        }
        self.max_lag_s = config.health.max_replica_lag_s;
        self.cpu_high_percent = config.health.cpu_high_percent;
        self.read_policy = read_policy(config);
    }

    /// When the router started: the origin of [`Topology::now_ms`] (it never changes, so
    /// `Shared` keeps a copy and reads the clock without the topology lock).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Milliseconds since the router started: the clock of breakers and LSN samples.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// What a server connection to `node` opened now is stamped with; connections whose stamp
    /// differs are retired (see `ServerConn::epoch`).
    pub fn stamp(&self, node: usize) -> (u64, u64) {
        (self.epoch, self.nodes[node].generation)
    }

    /// Records a node's role as seen by a check; re-elects the primary when roles changed.
    pub fn set_role(&mut self, node: usize, role: Role) {
        self.nodes[node].role = Some(role);
        self.nodes[node].reachable = true;
        self.elect();
    }

    pub fn set_unreachable(&mut self, node: usize, error: String) {
        let n = &mut self.nodes[node];
        if n.reachable || n.last_error.is_none() {
            log::warn(&format!("node {} unreachable: {error}", n.name));
        }
        if n.reachable {
            n.generation += 1;
        }
        n.reachable = false;
        n.last_error = Some(error);
        self.elect();
    }

    fn elect(&mut self) {
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].reachable && self.nodes[i].role == Some(Role::Primary))
            .collect();
        // Keep the current primary while it still claims the role (two claimants: split brain,
        // stay put until one steps down); else take the claimant.
        let new = match self.primary {
            Some(p) if candidates.contains(&p) => Some(p),
            _ => candidates.first().copied(),
        };
        if new != self.primary {
            self.epoch += 1;
            self.lsn_history.clear();
            match new {
                Some(p) => log::info(&format!(
                    "primary is now {} ({})",
                    self.nodes[p].name, self.nodes[p].addr
                )),
                None => log::warn("no reachable primary"),
            }
            self.primary = new;
        }
    }

    fn admit(&mut self, node: usize) -> Result<bool, Unavailable> {
        let now = self.now_ms();
        let n = &mut self.nodes[node];
        let (a, t) = n.breaker.admit(now);
        if let Some(t) = t {
            log_transition(&n.name, t);
        }
        match a {
            Admission::Allowed => Ok(false),
            Admission::Trial => Ok(true),
            Admission::Rejected { retry_in_ms } => Err(Unavailable::BreakerOpen {
                node: n.name.clone(),
                retry_in_ms,
            }),
        }
    }

    /// May a connection attempt to `node` start? (Its breaker decides.)
    pub fn admit_attempt(&mut self, node: usize) -> Result<(), Unavailable> {
        self.admit(node).map(|_| ())
    }

    /// Reports how an attempt on `node` ended (connects, health checks, broken connections).
    pub fn record(&mut self, node: usize, success: bool) {
        let now = self.now_ms();
        let n = &mut self.nodes[node];
        if let Some(t) = n.breaker.record(now, success) {
            log_transition(&n.name, t);
        }
    }

    /// Makes a health check the breaker's trial when one is due (open for `open_s`, or half-open
    /// with no trial running): a node that answers again closes its breaker even when no client
    /// traffic is routed to it. Returns whether the check is a trial (then `record` its outcome).
    pub fn health_check_as_trial(&mut self, node: usize) -> bool {
        let now = self.now_ms();
        let b = &self.nodes[node].breaker;
        if b.state() == State::Closed || b.blocks(now) {
            return false;
        }
        matches!(self.admit(node), Ok(true))
    }

    pub fn breaker_state(&self, node: usize) -> State {
        self.nodes[node].breaker.state()
    }

    pub fn primary_for_writes(&self) -> Result<usize, Unavailable> {
        self.primary.ok_or(Unavailable::NoPrimary)
    }

    fn replica_usable(&self, i: usize, floor: &Floor, now_ms: u64) -> bool {
        let n = &self.nodes[i];
        n.reachable
            && n.role == Some(Role::Replica)
            && !n.breaker.blocks(now_ms)
            && n.lag_s.is_some_and(|l| l <= self.max_lag_s)
            && floor.allows(i, n.replay_lsn)
    }

    /// A replica for a read, or the primary when none is usable (lag, breaker, read-your-writes).
    /// `exclude` skips a node that just failed (for a retry).
    /// `has_room(node)`: that node's pool for the client can hand out a connection at once.
    /// `now`: [`Topology::now_ms`] (read once per batch by the caller).
    pub fn pick_for_read(
        &mut self,
        floor: &Floor,
        exclude: Option<usize>,
        has_room: impl Fn(usize) -> bool,
        now: u64,
    ) -> Result<usize, Unavailable> {
        let candidates: smallvec::SmallVec<[Candidate; 8]> = (0..self.nodes.len())
            .filter(|&i| Some(i) != exclude && self.replica_usable(i, floor, now))
            .map(|i| Candidate {
                node: i,
                weight: self.nodes[i].weight,
                cpu_percent: self.nodes[i].cpu_percent,
                ewma_ms: self.nodes[i].ewma.get(now),
                sampled_ms: self.nodes[i].ewma.last(),
                in_flight: self.nodes[i].in_flight,
                has_room: has_room(i),
            })
            .collect();
        let cpu_high = self.cpu_high_percent;
        match self
            .balancer
            .pick_with(&candidates, cpu_high, self.read_policy)
        {
            Some(i) => Ok(i),
            None => match self.primary {
                Some(p) if Some(p) != exclude => Ok(p),
                _ => Err(Unavailable::NoPrimary),
            },
        }
    }

    /// A read on `node` took `ms`; it ended at `now` ([`Topology::now_ms`]).
    pub fn observe_latency(&mut self, node: usize, ms: f64, now: u64) {
        self.nodes[node].ewma.observe(ms, now);
    }
}

fn read_policy(config: &Config) -> crate::balance::Policy {
    match config.pool.read_balance {
        crate::config::ReadBalance::Spread => crate::balance::Policy::Spread,
        crate::config::ReadBalance::Pack => crate::balance::Policy::Pack {
            in_flight: config.pool.pack_in_flight,
        },
    }
}

fn node_state(n: &Node, policy: BreakerPolicy) -> NodeState {
    NodeState {
        name: n.name.clone(),
        addr: format!("{}:{}", n.host, n.port),
        weight: n.weight,
        reachable: false,
        role: None,
        lag_s: None,
        lag_bytes: None,
        cpu_percent: None,
        slow_total: None,
        receiver_state: None,
        resync: crate::resync::ReplicaWatch::default(),
        replay_lsn: None,
        last_error: None,
        last_check: None,
        generation: 0,
        ewma: Ewma::default(),
        breaker: Breaker::new(policy),
        in_flight: 0,
    }
}

fn log_transition(node: &str, t: Transition) {
    match t {
        Transition::Opened { failures, attempts } => log::warn(&format!(
            "circuit breaker for {node} OPEN: {failures} of {attempts} attempts failed"
        )),
        Transition::HalfOpened => log::info(&format!(
            "circuit breaker for {node} half-open: letting one trial through"
        )),
        Transition::Closed => log::info(&format!("circuit breaker for {node} closed")),
    }
}

/// Parses a `pg_lsn` text (`16/B374D848`).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
            [listen]
            address = "127.0.0.1:7000"
            [server]
            user = "postgres"
            [[nodes]]
            name = "a"
            host = "127.0.0.1"
            port = 1
            [[nodes]]
            name = "b"
            host = "127.0.0.1"
            port = 2
            [[nodes]]
            name = "c"
            host = "127.0.0.1"
            port = 3
            [[users]]
            name = "u"
            auth = "trust"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn lsn_text() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(parse_lsn("x"), None);
    }

    #[test]
    fn follows_a_promotion_and_bumps_the_epoch() {
        let mut t = Topology::new(&config());
        t.set_role(0, Role::Primary);
        t.set_role(1, Role::Replica);
        assert_eq!((t.primary, t.epoch), (Some(0), 1));
        t.set_unreachable(0, "refused".into());
        assert_eq!(t.primary, None);
        t.set_role(1, Role::Primary);
        assert_eq!((t.primary, t.epoch), (Some(1), 3));
        // The old primary comes back as a replica: nothing changes for writes.
        t.set_role(0, Role::Replica);
        assert_eq!((t.primary, t.epoch), (Some(1), 3));
    }

    #[test]
    fn reads_skip_lagging_and_broken_replicas_and_fall_back_to_the_primary() {
        let mut t = Topology::new(&config());
        t.set_role(0, Role::Primary);
        for i in [1, 2] {
            t.set_role(i, Role::Replica);
            t.nodes[i].lag_s = Some(0.0);
            t.nodes[i].replay_lsn = Some(100);
        }
        let mut seen = [0; 3];
        for _ in 0..10 {
            seen[t
                .pick_for_read(&Floor::default(), None, |_| true, t.now_ms())
                .unwrap()] += 1;
        }
        assert_eq!(seen, [0, 5, 5]);
        t.nodes[1].lag_s = Some(30.0);
        assert_eq!(
            t.pick_for_read(&Floor::default(), None, |_| true, t.now_ms()),
            Ok(2)
        );
        assert_eq!(
            t.pick_for_read(&Floor::default(), Some(2), |_| true, t.now_ms()),
            Ok(0)
        );
        // Read-your-writes: replica 2 has not replayed far enough.
        assert_eq!(
            t.pick_for_read(&Floor::at(101), None, |_| true, t.now_ms()),
            Ok(0)
        );
        assert_eq!(
            t.pick_for_read(&Floor::at(100), None, |_| true, t.now_ms()),
            Ok(2)
        );
        // Breaker open on 2.
        for _ in 0..30 {
            t.record(2, false);
        }
        assert_eq!(
            t.pick_for_read(&Floor::default(), None, |_| true, t.now_ms()),
            Ok(0)
        );
        assert!(t.admit_attempt(2).is_err());
    }

    #[test]
    fn a_health_check_is_the_breakers_trial_once_one_is_due() {
        let mut c = config();
        c.breaker.open_s = 1;
        let mut t = Topology::new(&c);
        assert!(!t.health_check_as_trial(1), "closed: no trial");
        for _ in 0..30 {
            t.record(1, false);
        }
        assert!(matches!(t.breaker_state(1), State::Open { .. }));
        assert!(!t.health_check_as_trial(1), "not due before open_s");
        std::thread::sleep(std::time::Duration::from_millis(1050));
        assert!(t.health_check_as_trial(1));
        assert_eq!(t.breaker_state(1), State::HalfOpen);
        t.record(1, true);
        assert_eq!(t.breaker_state(1), State::Closed);
    }
}
