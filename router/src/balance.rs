//! Read balancing across usable replicas.
//!
//! Each candidate's effective weight is
//!
//! ```text
//! effective = weight × cpu_factor × latency_factor × load_factor
//! cpu_factor     = 0.25 when the node's CPU ≥ cpu_high_percent, else 1
//! latency_factor = clamp(best_ewma / own_ewma, 0.1, 1)   (1 while a node has no samples)
//! load_factor    = 1 / (1 + reads in flight on the node)
//! ```
//!
//! and a node whose pool has no free connection is not a candidate while another one has room
//! (a read would only wait there, or fail with 53300).
//!
//! where `weight` is the configured capacity and `*_ewma` the exponentially weighted moving average
//! (α = 0.2) of the node's recent read round trips, which halves for every second without a new
//! sample: a node that was slow once (a cold cache after a restart) soon gets traffic again, and
//! its own samples then say whether it is still slow. Picks follow smooth weighted round-robin (as
//! nginx does): each pick adds every candidate's effective weight to its running score, takes the
//! highest, and subtracts the total from it — so a 3:1 weighting yields A A B A, not A A A B.

/// Exponentially weighted moving average of round trips, in milliseconds, on a caller clock.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ewma {
    value: Option<f64>,
    at_ms: u64,
}

pub const EWMA_ALPHA: f64 = 0.2;
/// Without samples the average halves every this many milliseconds.
pub const EWMA_HALF_LIFE_MS: f64 = 1000.0;

impl Ewma {
    pub fn observe(&mut self, sample_ms: f64, now_ms: u64) {
        if !sample_ms.is_finite() || sample_ms < 0.0 {
            return;
        }
        self.value = Some(match self.get(now_ms) {
            None => sample_ms,
            Some(v) => v + EWMA_ALPHA * (sample_ms - v),
        });
        self.at_ms = now_ms;
    }

    /// The average as of its last sample (no decay).
    pub fn last(&self) -> Option<f64> {
        self.value
    }

    /// The average as of `now_ms` (decayed since the last sample).
    pub fn get(&self, now_ms: u64) -> Option<f64> {
        let idle = now_ms.saturating_sub(self.at_ms);
        if idle == 0 {
            return self.value; // sampled this millisecond (the common case under load): no decay
        }
        self.value
            .map(|v| v * (-(idle as f64) / EWMA_HALF_LIFE_MS).exp2())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub node: usize,
    pub weight: u32,
    pub cpu_percent: Option<f64>,
    pub ewma_ms: Option<f64>,
    /// The average as of its last sample (`pack` compares these: a node that got no reads
    /// lately keeps its last figure instead of looking faster every second).
    pub sampled_ms: Option<f64>,
    /// Reads the router has running on the node now.
    pub in_flight: u32,
    /// The node's pool for this client can hand out a connection without waiting.
    pub has_room: bool,
}

pub const CPU_HIGH_FACTOR: f64 = 0.25;
pub const MIN_LATENCY_FACTOR: f64 = 0.1;

/// The effective weights of `candidates`, in order.
pub fn effective_weights(
    candidates: &[Candidate],
    cpu_high_percent: f64,
) -> smallvec::SmallVec<[f64; 8]> {
    let best = candidates
        .iter()
        .filter_map(|c| c.ewma_ms)
        .fold(f64::INFINITY, f64::min);
    candidates
        .iter()
        .map(|c| {
            let cpu = match c.cpu_percent {
                Some(p) if p >= cpu_high_percent => CPU_HIGH_FACTOR,
                _ => 1.0,
            };
            let latency = match c.ewma_ms {
                Some(own) if own > 0.0 && best.is_finite() => {
                    (best / own).clamp(MIN_LATENCY_FACTOR, 1.0)
                }
                _ => 1.0,
            };
            f64::from(c.weight) * cpu * latency / (1.0 + f64::from(c.in_flight))
        })
        .collect()
}

/// How reads are shared (`pool.read_balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Smooth weighted round-robin over the effective weights.
    Spread,
    /// The node with the highest effective weight (without the in-flight factor; latency as
    /// last sampled) takes the reads while it runs fewer than `in_flight` of them, then the
    /// next; when every node is that busy (or full), [`Policy::Spread`].
    Pack { in_flight: u32 },
}

/// `Pack` stays on the node it prefers until another one weighs this many times more (no
/// flapping between nodes whose latencies are within noise of each other).
pub const PACK_SWITCH_FACTOR: f64 = 1.25;

/// Smooth weighted round-robin state, keyed by node, and the node `Pack` prefers.
#[derive(Debug, Default)]
pub struct Balancer {
    /// (node index, running score): a handful of nodes, searched in place (no hashing per pick).
    score: smallvec::SmallVec<[(usize, f64); 8]>,
    preferred: Option<usize>,
}

impl Balancer {
    /// Picks one of `candidates` by `policy`; `None` when there are none (or all weigh 0).
    pub fn pick_with(
        &mut self,
        candidates: &[Candidate],
        cpu_high_percent: f64,
        policy: Policy,
    ) -> Option<usize> {
        match policy {
            Policy::Spread => self.pick(candidates, cpu_high_percent),
            Policy::Pack { in_flight } => self
                .pack(candidates, cpu_high_percent, in_flight)
                .or_else(|| self.pick(candidates, cpu_high_percent)),
        }
    }

    /// [`Policy::Pack`]: the first node, in order of preference, with room and fewer than
    /// `limit` reads running; `None` when there is none.
    fn pack(
        &mut self,
        candidates: &[Candidate],
        cpu_high_percent: f64,
        limit: u32,
    ) -> Option<usize> {
        let unloaded: smallvec::SmallVec<[Candidate; 8]> = candidates
            .iter()
            .map(|c| Candidate {
                in_flight: 0,
                ewma_ms: c.sampled_ms,
                ..*c
            })
            .collect();
        let w = effective_weights(&unloaded, cpu_high_percent);
        let mut order: smallvec::SmallVec<[usize; 8]> =
            (0..candidates.len()).filter(|&i| w[i] > 0.0).collect();
        order.sort_by(|&a, &b| {
            w[b].total_cmp(&w[a])
                .then(candidates[a].node.cmp(&candidates[b].node))
        });
        let &top = order.first()?;
        if let Some(pos) = self
            .preferred
            .and_then(|p| order.iter().position(|&i| candidates[i].node == p))
        {
            if w[order[pos]] * PACK_SWITCH_FACTOR >= w[top] {
                let kept = order.remove(pos);
                order.insert(0, kept);
            }
        }
        self.preferred = Some(candidates[order[0]].node);
        order
            .iter()
            .map(|&i| &candidates[i])
            .find(|c| c.has_room && c.in_flight < limit)
            .map(|c| c.node)
    }

    /// Picks one of `candidates`; `None` when there are none (or all weigh 0).
    pub fn pick(&mut self, candidates: &[Candidate], cpu_high_percent: f64) -> Option<usize> {
        let roomy: smallvec::SmallVec<[Candidate; 8]>;
        let candidates =
            if candidates.iter().any(|c| c.has_room) && candidates.iter().any(|c| !c.has_room) {
                roomy = candidates.iter().filter(|c| c.has_room).copied().collect();
                &roomy
            } else {
                candidates
            };
        let weights = effective_weights(candidates, cpu_high_percent);
        let total: f64 = weights.iter().sum();
        if candidates.is_empty() || total <= 0.0 {
            return None;
        }
        // Forget nodes that are no longer candidates, so a returning node starts fresh.
        self.score
            .retain(|(node, _)| candidates.iter().any(|c| c.node == *node));
        // (index into `score`, its value) of the highest score so far.
        let mut best: Option<(usize, f64)> = None;
        for (c, w) in candidates.iter().zip(&weights) {
            let at = match self.score.iter().position(|(node, _)| *node == c.node) {
                Some(at) => at,
                None => {
                    self.score.push((c.node, 0.0));
                    self.score.len() - 1
                }
            };
            let s = &mut self.score[at].1;
            *s += w;
            if best.is_none_or(|(_, b)| *s > b) {
                best = Some((at, *s));
            }
        }
        let (at, _) = best?;
        self.score[at].1 -= total;
        Some(self.score[at].0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cand(node: usize, weight: u32) -> Candidate {
        Candidate {
            node,
            weight,
            cpu_percent: None,
            ewma_ms: None,
            sampled_ms: None,
            in_flight: 0,
            has_room: true,
        }
    }

    const PACK4: Policy = Policy::Pack { in_flight: 4 };

    #[test]
    fn pack_keeps_reads_on_one_node_until_it_is_busy() {
        let mut b = Balancer::default();
        let c = [cand(1, 1), cand(2, 1), cand(3, 1)];
        // Equal nodes: the first takes every read while it has fewer than 4 running.
        for _ in 0..10 {
            assert_eq!(b.pick_with(&c, 80.0, PACK4), Some(1));
        }
        let mut busy = c;
        busy[0].in_flight = 4;
        assert_eq!(b.pick_with(&busy, 80.0, PACK4), Some(2));
        // Full pool: skipped as well.
        busy[1].has_room = false;
        assert_eq!(b.pick_with(&busy, 80.0, PACK4), Some(3));
        // Every node that busy: spread over them, as `Spread` would.
        busy[1].has_room = true;
        busy[1].in_flight = 4;
        busy[2].in_flight = 4;
        let picks: std::collections::HashSet<usize> = (0..30)
            .filter_map(|_| b.pick_with(&busy, 80.0, PACK4))
            .collect();
        assert_eq!(picks.len(), 3);
    }

    #[test]
    fn pack_prefers_the_faster_and_bigger_node_without_flapping() {
        let mut b = Balancer::default();
        let (mut one, mut two) = (cand(1, 1), cand(2, 1));
        one.sampled_ms = Some(1.0);
        two.sampled_ms = Some(0.5);
        assert_eq!(b.pick_with(&[one, two], 80.0, PACK4), Some(2));
        // Within 25 % of each other: it stays where it is.
        two.sampled_ms = Some(1.2);
        assert_eq!(b.pick_with(&[one, two], 80.0, PACK4), Some(2));
        // Clearly slower now: it moves.
        two.sampled_ms = Some(2.0);
        assert_eq!(b.pick_with(&[one, two], 80.0, PACK4), Some(1));
        // A configured weight counts too; a busy CPU too.
        let mut big = cand(3, 3);
        assert_eq!(b.pick_with(&[one, big], 80.0, PACK4), Some(3));
        big.cpu_percent = Some(95.0);
        assert_eq!(b.pick_with(&[one, big], 80.0, PACK4), Some(1));
        assert_eq!(b.pick_with(&[], 80.0, PACK4), None);
    }

    #[test]
    fn a_full_pool_is_skipped_while_another_has_room() {
        let mut b = Balancer::default();
        let mut full = cand(1, 10);
        full.has_room = false;
        let s = shares(&mut b, &[full, cand(2, 1), cand(3, 1)], 100);
        assert_eq!(s.get(&1), None);
        assert_eq!((s[&2], s[&3]), (50, 50));
        // When every pool is full, the weights decide (the read waits for a connection).
        let mut full2 = cand(2, 1);
        full2.has_room = false;
        assert_eq!(
            b.pick(&[full, full2], 80.0).map(|n| n == 1 || n == 2),
            Some(true)
        );
    }

    #[test]
    fn reads_in_flight_lower_a_nodes_share() {
        let mut b = Balancer::default();
        let mut busy = cand(1, 1);
        busy.in_flight = 3;
        let s = shares(&mut b, &[busy, cand(2, 1)], 5000);
        assert_eq!((s[&1], s[&2]), (1000, 4000));
    }

    fn shares(b: &mut Balancer, c: &[Candidate], n: usize) -> HashMap<usize, usize> {
        let mut m = HashMap::new();
        for _ in 0..n {
            *m.entry(b.pick(c, 80.0).unwrap()).or_default() += 1;
        }
        m
    }

    #[test]
    fn follows_configured_weights_smoothly() {
        let mut b = Balancer::default();
        let c = [cand(1, 3), cand(2, 1)];
        let seq: Vec<usize> = (0..8).map(|_| b.pick(&c, 80.0).unwrap()).collect();
        assert_eq!(seq, [1, 1, 2, 1, 1, 1, 2, 1]);
        let s = shares(&mut b, &c, 4000);
        assert_eq!((s[&1], s[&2]), (3000, 1000));
    }

    #[test]
    fn busy_cpu_gets_a_quarter() {
        let mut b = Balancer::default();
        let mut hot = cand(1, 1);
        hot.cpu_percent = Some(95.0);
        let mut cool = cand(2, 1);
        cool.cpu_percent = Some(10.0);
        let s = shares(&mut b, &[hot, cool], 5000);
        assert_eq!((s[&1], s[&2]), (1000, 4000));
    }

    #[test]
    fn slower_replica_gets_less_in_proportion() {
        let mut b = Balancer::default();
        let mut fast = cand(1, 1);
        fast.ewma_ms = Some(1.0);
        let mut slow = cand(2, 1);
        slow.ewma_ms = Some(4.0);
        let s = shares(&mut b, &[fast, slow], 5000);
        assert_eq!((s[&1], s[&2]), (4000, 1000));
        // A pathological one still gets its floor share, so its EWMA can recover.
        slow.ewma_ms = Some(1000.0);
        let w = effective_weights(&[fast, slow], 80.0);
        assert_eq!(w.as_slice(), [1.0, MIN_LATENCY_FACTOR]);
    }

    #[test]
    fn empty_or_weightless() {
        let mut b = Balancer::default();
        assert_eq!(b.pick(&[], 80.0), None);
        assert_eq!(b.pick(&[cand(1, 0)], 80.0), None);
        assert_eq!(b.pick(&[cand(1, 0), cand(2, 1)], 80.0), Some(2));
    }

    #[test]
    fn ewma_moves_a_fifth_of_the_way() {
        let mut e = Ewma::default();
        assert_eq!(e.get(0), None);
        e.observe(10.0, 0);
        e.observe(20.0, 0);
        assert_eq!(e.get(0), Some(12.0));
        e.observe(f64::NAN, 0);
        e.observe(-1.0, 0);
        assert_eq!(e.get(0), Some(12.0));
    }

    #[test]
    fn ewma_halves_every_second_without_samples() {
        let mut e = Ewma::default();
        e.observe(8.0, 1000);
        assert_eq!(e.get(2000), Some(4.0));
        assert_eq!(e.get(4000), Some(1.0));
        // A new sample starts from the decayed value.
        e.observe(1.0, 4000);
        assert_eq!(e.get(4000), Some(1.0));
    }
}
