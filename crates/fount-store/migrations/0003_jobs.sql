-- The compute pool: jobs, every state a job went through, per-tenant job quotas, the lease that
-- lets one pool at a time act on the jobs, and usage records for job slot time.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT,
    priority BIGINT NOT NULL,
    kind TEXT NOT NULL,
    command TEXT NOT NULL,
    cwd TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    done_marker TEXT NOT NULL,
    time_limit_s BIGINT,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    stop TEXT,
    stop_at_ms BIGINT,
    executor TEXT,
    handle TEXT,
    log_path TEXT NOT NULL,
    checkpoint_step BIGINT,
    slot_ms BIGINT NOT NULL,
    started_at_ms BIGINT,
    created_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT,
    error TEXT
);

CREATE INDEX jobs_by_state ON jobs (state, created_at_ms);
-- no two live jobs write one directory, whoever submits them at once
CREATE UNIQUE INDEX jobs_live_out_dir ON jobs (out_dir)
    WHERE state IN ('queued', 'running', 'preempted');
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, created_at_ms);

CREATE TABLE job_events (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq BIGINT NOT NULL,
    state TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE job_quotas (
    tenant_id TEXT PRIMARY KEY REFERENCES tenants (id),
    running_jobs BIGINT,
    slot_seconds_per_day BIGINT,
    slot_seconds_per_month BIGINT,
    max_priority BIGINT
);

CREATE TABLE pool_lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

-- 'inference' (a request) or 'training' (one attempt of a job: slot_ms of pool time)
ALTER TABLE usage_records ADD COLUMN kind TEXT NOT NULL DEFAULT 'inference';
ALTER TABLE usage_records ADD COLUMN slot_ms BIGINT NOT NULL DEFAULT 0;
CREATE INDEX usage_by_kind_time ON usage_records (kind, created_at_ms);
