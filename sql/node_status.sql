-- dbopt.node_status() and dbopt.replication_status(): what a router, an SRE or a DBA needs to know
-- about one node, from PostgreSQL's own functions and views. Plain SQL on purpose: every figure comes
-- from the server's own bookkeeping, so nothing here can drift from what PostgreSQL reports.
--
-- Privileges: the WAL receiver and replication views hide addresses and positions from roles without
-- pg_read_all_stats (or pg_monitor); connect as such a role to see them.

CREATE FUNCTION dbopt.node_status(
    OUT role text,                     -- 'primary' or 'replica'
    OUT in_recovery boolean,           -- pg_is_in_recovery()
    OUT current_lsn pg_lsn,            -- primary: pg_current_wal_lsn(); replica: NULL
    OUT received_lsn pg_lsn,           -- replica: last WAL position received and flushed
    OUT replayed_lsn pg_lsn,           -- replica: last WAL position replayed
    OUT replay_lag_s double precision, -- replica: 0 when all received WAL is replayed, else the age of
                                       -- the last replayed transaction; primary: 0
    OUT replay_lag_bytes numeric,      -- replica: received - replayed; primary: 0
    OUT receiver_state text,           -- replica: WAL receiver state ('streaming', ...); NULL if none
    OUT upstream_host text,            -- replica: host it streams from (a replica for a cascade)
    OUT upstream_port integer,
    OUT cpu_percent double precision,  -- host CPU busy %, last second; NULL before the first sample
    OUT uptime_s double precision      -- seconds since the postmaster started
)
RETURNS record
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$
    SELECT
        CASE WHEN s.rec THEN 'replica' ELSE 'primary' END,
        s.rec,
        CASE WHEN NOT s.rec THEN pg_current_wal_lsn() END,
        s.received,
        s.replayed,
        CASE
            WHEN NOT s.rec THEN 0
            WHEN s.received IS NULL OR s.replayed >= s.received THEN 0
            ELSE coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0)
        END::double precision,
        CASE
            WHEN NOT s.rec THEN 0
            ELSE greatest(coalesce(pg_wal_lsn_diff(s.received, s.replayed), 0), 0)
        END,
        w.status,
        w.sender_host,
        w.sender_port,
        dbopt.host_cpu_percent(),
        extract(epoch FROM clock_timestamp() - pg_postmaster_start_time())::double precision
    FROM (SELECT pg_is_in_recovery() AS rec,
                 pg_last_wal_receive_lsn() AS received,
                 pg_last_wal_replay_lsn() AS replayed) AS s
    LEFT JOIN pg_stat_wal_receiver AS w ON true
$$;

COMMENT ON FUNCTION dbopt.node_status() IS
    'Role, WAL positions, replay lag, upstream, host CPU and uptime of this node';

CREATE FUNCTION dbopt.replication_status(
    OUT application_name text,  -- the replica's name (Patroni sets it to the member name)
    OUT client_addr inet,
    OUT client_port integer,
    OUT state text,             -- 'streaming', 'catchup', 'startup', 'backup', 'stopping'
    OUT sent_lsn pg_lsn,
    OUT write_lsn pg_lsn,
    OUT flush_lsn pg_lsn,
    OUT replay_lsn pg_lsn,
    OUT write_lag interval,
    OUT flush_lag interval,
    OUT replay_lag interval,
    OUT replay_lag_bytes numeric, -- this node's WAL position minus the replica's replayed position
                                  -- (NULL when the caller may not see positions)
    OUT sync_state text,        -- 'async', 'potential', 'sync', 'quorum'
    OUT reply_time timestamptz
)
RETURNS SETOF record
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$
    SELECT r.application_name::text, r.client_addr, r.client_port, r.state,
           r.sent_lsn, r.write_lsn, r.flush_lsn, r.replay_lsn,
           r.write_lag, r.flush_lag, r.replay_lag,
           -- a cascading replica sends what it has received or replayed, whichever is further;
           -- NULL (not 0, "caught up") when the caller may not see the replica's position
           CASE WHEN r.replay_lsn IS NOT NULL THEN greatest(pg_wal_lsn_diff(
               CASE WHEN pg_is_in_recovery()
                    THEN greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())
                    ELSE pg_current_wal_lsn() END,
               r.replay_lsn), 0) END,
           r.sync_state, r.reply_time
    FROM pg_stat_replication AS r
    ORDER BY r.application_name
$$;

COMMENT ON FUNCTION dbopt.replication_status() IS
    'Replicas streaming from this node (the children of a cascade, on a cascading replica)';
