-- Each customer's usual behaviour, computed from the warehouse's history by
-- pipelines/profiles.yaml and looked up by the fraud stream.
CREATE TABLE IF NOT EXISTS customer_profile (
    customer_id      BIGINT PRIMARY KEY,
    home_country     TEXT,
    transactions     BIGINT NOT NULL,
    typical_amount   DOUBLE PRECISION,
    amount_stddev    DOUBLE PRECISION,
    max_amount       DOUBLE PRECISION,
    usual_currencies TEXT,
    usual_categories TEXT,
    computed_at      TIMESTAMPTZ NOT NULL
);
