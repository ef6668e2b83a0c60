-- Alerts of the streaming fraud detection, one per (transaction, rule).
CREATE TABLE IF NOT EXISTS fraud_alerts (
    alert_id       TEXT PRIMARY KEY,
    transaction_id BIGINT NOT NULL,
    customer_id    BIGINT NOT NULL,
    amount         NUMERIC(12,2) NOT NULL,
    rule_id        TEXT NOT NULL,
    severity       TEXT NOT NULL,
    rules_version  TEXT NOT NULL,
    reason         TEXT NOT NULL,
    alerted_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS fraud_alerts_transaction ON fraud_alerts (transaction_id);
