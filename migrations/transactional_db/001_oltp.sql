-- The OLTP system's tables (the demo source).
CREATE TABLE IF NOT EXISTS customers (
    customer_id BIGINT PRIMARY KEY,
    first_name  TEXT NOT NULL,
    last_name   TEXT NOT NULL,
    email       TEXT NOT NULL,
    country     CHAR(2) NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS customers_updated_at ON customers (updated_at);

CREATE TABLE IF NOT EXISTS transactions (
    transaction_id BIGINT PRIMARY KEY,
    customer_id    BIGINT NOT NULL REFERENCES customers,
    merchant_id    TEXT NOT NULL,
    amount         NUMERIC(12,2) NOT NULL CHECK (amount > 0),
    currency       CHAR(3) NOT NULL,
    status         TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS transactions_updated_at ON transactions (updated_at);
