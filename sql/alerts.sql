-- dbopt.alert_history: every alert notification dbopt-router (or Patroni's role-change callback)
-- sent through a channel of kind "notify", kept on the primary so that SELECT can read it and it
-- survives failovers (it replicates like any table). The same row is announced with NOTIFY on the
-- channel's notify_channel (default dbopt_alerts), payload = the alert as JSON.
--
-- Privileges: readable by pg_monitor and dbopt_admin; written by the router's [server] login,
-- which needs INSERT on the table and USAGE on its sequence when it is not a superuser:
--   GRANT INSERT ON dbopt.alert_history TO router_login;
--   GRANT USAGE ON SEQUENCE dbopt.alert_history_id_seq TO router_login;
CREATE TABLE dbopt.alert_history (
    id          bigserial PRIMARY KEY,
    fingerprint text NOT NULL,                 -- stable per alert (name + labels), as Alertmanager's
    alertname   text NOT NULL,                 -- PrimaryChanged, ReplicaLag, NodeDown, ...
    status      text NOT NULL CHECK (status IN ('firing', 'resolved')),
    severity    text NOT NULL,
    labels      jsonb NOT NULL,
    annotations jsonb NOT NULL,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz,                   -- resolved alerts only
    source      text NOT NULL,                 -- who sent it: 'router <host:port>', 'patroni <node>'
    sent_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX alert_history_fingerprint ON dbopt.alert_history (fingerprint, sent_at);
CREATE INDEX alert_history_sent_at ON dbopt.alert_history (sent_at);
COMMENT ON TABLE dbopt.alert_history IS 'Alerts sent by dbopt-router and Patroni''s callback (channels of kind notify)';

REVOKE ALL ON dbopt.alert_history FROM PUBLIC;
GRANT SELECT ON dbopt.alert_history TO pg_monitor, dbopt_admin;
-- Keeping a year of history is the DBA's call: DELETE FROM dbopt.alert_history WHERE sent_at < ...
