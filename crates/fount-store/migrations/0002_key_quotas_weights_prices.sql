-- Per-key quotas (the same limits as a tenant's, applied on top of them), a tenant's share of
-- the engine under contention, and prices per model with each record's cost.
ALTER TABLE quotas ADD COLUMN weight BIGINT;

CREATE TABLE key_quotas (
    key_id TEXT PRIMARY KEY REFERENCES api_keys (id),
    requests_per_minute BIGINT,
    tokens_per_minute BIGINT,
    tokens_per_day BIGINT,
    tokens_per_month BIGINT,
    concurrent_requests BIGINT,
    max_context BIGINT,
    models TEXT
);

-- Micro-dollars per million tokens: a token costs exactly that many picodollars.
CREATE TABLE prices (
    model TEXT PRIMARY KEY,
    input BIGINT NOT NULL,
    cached_input BIGINT NOT NULL,
    output BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

ALTER TABLE usage_records ADD COLUMN cost_picodollars BIGINT NOT NULL DEFAULT 0;

CREATE INDEX usage_by_key_time ON usage_records (key_id, created_at_ms);
