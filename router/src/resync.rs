//! Replicas that fell behind what the primary keeps: a replica that has not streamed for
//! `health.reclone_after_s` and whose replay position is older than the primary's oldest WAL
//! segment can never catch up by streaming (pg_rewind cannot help either: its WAL is gone). With
//! `health.reclone_lost_replicas`, the router asks the node's Patroni to re-clone it
//! (`POST /reinitialize`), at most once per `reclone_after_s`.
//!
//! The decision is pure; the monitor feeds it and makes the call.

/// The start LSN of a WAL segment file name (24 hex digits: 8 of timeline, then the segment
/// number as 8 of "log" and 8 of "seg"), for `segment_size` bytes per segment.
pub fn segment_start_lsn(name: &str, segment_size: u64) -> Option<u64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) || segment_size == 0 {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let per_log = 0x1_0000_0000u64 / segment_size;
    if seg >= per_log {
        return None;
    }
    log.checked_mul(0x1_0000_0000)?
        .checked_add(seg * segment_size)
}

/// What the monitor knows of one replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaWatch {
    /// Since when its WAL receiver has not been streaming (None: streaming).
    pub not_streaming_since_ms: Option<u64>,
    /// When the router last asked for a re-clone.
    pub last_request_ms: Option<u64>,
}

impl ReplicaWatch {
    /// Records a check: `streaming` is whether the WAL receiver streams now.
    pub fn observe(&mut self, streaming: bool, now_ms: u64) {
        if streaming {
            self.not_streaming_since_ms = None;
        } else if self.not_streaming_since_ms.is_none() {
            self.not_streaming_since_ms = Some(now_ms);
        }
    }

    /// Whether to ask for a re-clone now: not streaming for `after_ms`, replayed up to
    /// `replay_lsn`, which the primary no longer keeps (its oldest segment starts at
    /// `oldest_kept`), and no request in the last `after_ms`.
    pub fn should_reclone(
        &self,
        now_ms: u64,
        after_ms: u64,
        replay_lsn: Option<u64>,
        oldest_kept: Option<u64>,
    ) -> bool {
        let (Some(since), Some(replayed), Some(oldest)) =
            (self.not_streaming_since_ms, replay_lsn, oldest_kept)
        else {
            return false;
        };
        now_ms.saturating_sub(since) >= after_ms
            && replayed < oldest
            && self
                .last_request_ms
                .is_none_or(|t| now_ms.saturating_sub(t) >= after_ms)
    }
}

/// One check of `node` on its monitor connection: on the primary, where its oldest WAL starts;
/// on a replica, whether it streams — and the re-clone request when it cannot catch up.
pub async fn check(
    shared: &std::sync::Arc<crate::shared::Shared>,
    config: &crate::config::Config,
    node: usize,
    client: &tokio_postgres::Client,
    timeout_ms: u64,
) {
    let now = shared.now_ms();
    let (is_primary, streaming, replay_lsn) = {
        let t = shared.topology();
        let n = &t.nodes[node];
        (
            t.primary == Some(node),
            n.receiver_state.as_deref() == Some("streaming"),
            n.replay_lsn,
        )
    };
    if is_primary {
        let limit = std::time::Duration::from_millis(timeout_ms);
        match tokio::time::timeout(limit, client.query_one(crate::monitor::OLDEST_WAL_SQL, &[])).await {
            Ok(Ok(row)) => {
                let name: Option<String> = row.get(0);
                let size: Option<i64> = row.get(1);
                let lsn = name
                    .zip(size)
                    .and_then(|(n, s)| segment_start_lsn(&n, u64::try_from(s).ok()?));
                shared.topology().oldest_wal_lsn = lsn;
            }
            Ok(Err(e)) => crate::log::warn(&format!(
                "resync: cannot read the primary's WAL directory ({}); lost replicas are not re-cloned",
                e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
            )),
            Err(_) => {}
        }
        return;
    }
    let (decide, name, url) = {
        let mut t = shared.topology();
        let oldest = t.oldest_wal_lsn;
        let after_ms = config.health.reclone_after_s * 1000;
        let n = &mut t.nodes[node];
        n.resync.observe(streaming, now);
        let decide = n.resync.should_reclone(now, after_ms, replay_lsn, oldest);
        if decide {
            n.resync.last_request_ms = Some(now);
        }
        (decide, n.name.clone(), config.nodes[node].patroni.clone())
    };
    let Some(url) = url.filter(|_| decide) else {
        return;
    };
    crate::log::warn(&format!(
        "resync: replica {name} has not streamed for {} s and needs WAL the primary no longer keeps; \
         asking its Patroni to re-clone it",
        config.health.reclone_after_s
    ));
    let target = match crate::alerts::http_post::Target::parse(&format!(
        "{}/reinitialize",
        url.trim_end_matches('/')
    )) {
        Ok(t) => t,
        Err(e) => return crate::log::error(&format!("resync: {name}: {e}")),
    };
    let answer = crate::alerts::http_post::post_json(
        &target,
        br#"{"force": true}"#,
        None,
        std::time::Duration::from_secs(10),
    )
    .await;
    match answer {
        Ok(code) => {
            crate::shared::Counters::inc(&shared.counters.reclones);
            crate::log::warn(&format!(
                "resync: {name}: Patroni accepted the re-clone ({code})"
            ));
        }
        Err(e) => crate::log::error(&format!(
            "resync: {name}: Patroni refused the re-clone: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 * 1024 * 1024;

    #[test]
    fn segment_names() {
        assert_eq!(segment_start_lsn("000000010000000000000000", MB16), Some(0));
        assert_eq!(
            segment_start_lsn("000000010000000000000003", MB16),
            Some(3 * MB16)
        );
        assert_eq!(
            segment_start_lsn("0000000200000001000000FF", MB16),
            Some(0x1_0000_0000 + 0xFF * MB16)
        );
        // 16 MiB segments: 256 per "log"; 0x100 cannot exist.
        assert_eq!(segment_start_lsn("000000010000000000000100", MB16), None);
        assert_eq!(segment_start_lsn("00000001000000000000000", MB16), None);
        assert_eq!(segment_start_lsn("00000001000000000000000G", MB16), None);
        assert_eq!(
            segment_start_lsn("000000010000000000000001.partial", MB16),
            None
        );
        assert_eq!(segment_start_lsn("000000010000000000000001", 0), None);
        // 1 GiB segments: 4 per log.
        assert_eq!(
            segment_start_lsn("000000010000000000000003", 1 << 30),
            Some(3 << 30)
        );
    }

    #[test]
    fn recloned_only_when_lost_for_long_enough_and_not_twice_in_a_row() {
        let mut w = ReplicaWatch::default();
        w.observe(true, 0);
        assert!(
            !w.should_reclone(100_000, 30_000, Some(10), Some(20)),
            "streaming"
        );
        w.observe(false, 1000);
        w.observe(false, 20_000);
        assert!(
            !w.should_reclone(20_000, 30_000, Some(10), Some(20)),
            "not for long enough"
        );
        assert!(w.should_reclone(31_000, 30_000, Some(10), Some(20)));
        assert!(
            !w.should_reclone(31_000, 30_000, Some(20), Some(20)),
            "WAL still kept"
        );
        assert!(
            !w.should_reclone(31_000, 30_000, None, Some(20)),
            "position unknown"
        );
        assert!(
            !w.should_reclone(31_000, 30_000, Some(10), None),
            "primary unknown"
        );
        w.last_request_ms = Some(31_000);
        assert!(
            !w.should_reclone(50_000, 30_000, Some(10), Some(20)),
            "asked recently"
        );
        assert!(w.should_reclone(61_000, 30_000, Some(10), Some(20)));
        w.observe(true, 62_000);
        assert!(!w.should_reclone(100_000, 30_000, Some(10), Some(20)));
    }
}
