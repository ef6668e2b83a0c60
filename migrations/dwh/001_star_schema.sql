-- The star schema of the warehouse.
CREATE TABLE IF NOT EXISTS dim_customer (
    customer_key BIGINT PRIMARY KEY,
    customer_id  BIGINT NOT NULL UNIQUE,
    first_name   TEXT,
    last_name    TEXT,
    email        TEXT,
    country      CHAR(2),
    created_at   TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS dim_merchant (
    merchant_key BIGINT PRIMARY KEY,
    merchant_id  TEXT NOT NULL UNIQUE,
    name         TEXT,
    category     TEXT,
    city         TEXT,
    country      TEXT
);

CREATE TABLE IF NOT EXISTS dim_date (
    date_key    INT PRIMARY KEY,
    date        DATE NOT NULL UNIQUE,
    year        INT NOT NULL,
    quarter     INT NOT NULL,
    month       INT NOT NULL,
    day         INT NOT NULL,
    day_of_week INT NOT NULL,
    is_weekend  BOOLEAN NOT NULL
);

CREATE TABLE IF NOT EXISTS fact_transactions (
    transaction_id BIGINT PRIMARY KEY,
    customer_key   BIGINT NOT NULL REFERENCES dim_customer (customer_key),
    merchant_key   BIGINT NOT NULL REFERENCES dim_merchant (merchant_key),
    date_key       INT NOT NULL REFERENCES dim_date (date_key),
    amount         NUMERIC(12,2) NOT NULL,
    currency       CHAR(3) NOT NULL,
    status         TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS fact_transactions_customer ON fact_transactions (customer_key);
CREATE INDEX IF NOT EXISTS fact_transactions_merchant ON fact_transactions (merchant_key);
CREATE INDEX IF NOT EXISTS fact_transactions_date ON fact_transactions (date_key);
