-- Several `fount serve` replicas on one PostgreSQL: the replicas alive, the requests each has
-- admitted and not yet recorded, shared rate windows, and the registry of adapters registered
-- through the API. Created on SQLite too (one process uses the registry; the rest stays empty).

-- heartbeat_ms: renewed every second; a replica silent for longer than the sweep's limit is
-- taken for dead and its open requests are recorded as abandoned by another
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL
);

-- a request admitted by a replica whose usage record is not written yet: the same
-- transaction that writes the record deletes the row; tokens: what the request reserved of
-- its budgets (prompt plus every token it may generate)
CREATE TABLE open_requests (
    request_id TEXT PRIMARY KEY,
    replica_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    tokens BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX open_requests_by_replica ON open_requests (replica_id);
CREATE INDEX open_requests_by_tenant ON open_requests (tenant_id);
CREATE INDEX open_requests_by_key ON open_requests (key_id);

-- requests and tokens charged to a tenant ('t:{id}') or key ('k:{id}') in one second (Unix)
CREATE TABLE quota_seconds (
    subject TEXT NOT NULL,
    second BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    PRIMARY KEY (subject, second)
);

-- adapters registered through the API: name is the engine's (a tenant's private adapters are
-- `{tenant id}/{name}`); location is a local directory or an artifacts key; digest the SHA-256
-- of its files (checked when fetched); version: the registry version of the last change, and
-- removed = 1 once deleted
CREATE TABLE adapters (
    name TEXT PRIMARY KEY,
    location TEXT NOT NULL,
    digest TEXT,
    version BIGINT NOT NULL,
    removed BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX adapters_by_version ON adapters (version);

CREATE TABLE registry_version (
    id INTEGER PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO registry_version (id, version) VALUES (1, 0);

-- tokens used per tenant ('t:{id}') and key ('k:{id}') per UTC day (day_ms: the day's start,
-- Unix ms), kept by the transaction that writes usage records on PostgreSQL: budgets shared by
-- replicas read at most 31 rows instead of summing a month of records; filled from the records
-- already written
CREATE TABLE quota_days (
    subject TEXT NOT NULL,
    day_ms BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    PRIMARY KEY (subject, day_ms)
);
INSERT INTO quota_days (subject, day_ms, tokens)
SELECT 't:' || tenant_id, created_at_ms - (created_at_ms % 86400000),
       SUM(prompt_tokens + completion_tokens)
FROM usage_records GROUP BY tenant_id, created_at_ms - (created_at_ms % 86400000);
INSERT INTO quota_days (subject, day_ms, tokens)
SELECT 'k:' || key_id, created_at_ms - (created_at_ms % 86400000),
       SUM(prompt_tokens + completion_tokens)
FROM usage_records WHERE key_id <> ''
GROUP BY key_id, created_at_ms - (created_at_ms % 86400000);
