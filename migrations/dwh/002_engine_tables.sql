-- Tables the engine keeps in the warehouse: quarantined rows, watermarks.
CREATE TABLE IF NOT EXISTS etl_rejects (
    id          BIGSERIAL PRIMARY KEY,
    run_id      TEXT NOT NULL,
    node        TEXT NOT NULL,
    check_name  TEXT NOT NULL,
    reason      TEXT NOT NULL,
    row_data    JSONB NOT NULL,
    rejected_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS etl_rejects_run ON etl_rejects (run_id);

CREATE TABLE IF NOT EXISTS etl_state (
    pipeline   TEXT NOT NULL,
    node       TEXT NOT NULL,
    watermark  TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, node)
);
