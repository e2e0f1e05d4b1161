-- Fine-tuning as a service (OpenAI's Fine-tuning API) on the pool: a job record per API job,
-- its events and its checkpoints; a paused pool job still owns its output directory; and a
-- training price per model (micro-dollars per million trained tokens).
DROP INDEX jobs_live_out_dir;
CREATE UNIQUE INDEX jobs_live_out_dir ON jobs (out_dir)
    WHERE state IN ('queued', 'running', 'preempted', 'paused');

ALTER TABLE prices ADD COLUMN training BIGINT NOT NULL DEFAULT 0;

CREATE TABLE ft_jobs (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    suffix TEXT,
    seed BIGINT NOT NULL,
    -- the request's method and hyperparameters as given, then as resolved (JSON)
    method TEXT NOT NULL,
    metadata TEXT,
    status TEXT NOT NULL,
    -- {code, message, param} (JSON) once failed
    error TEXT,
    -- the pool job that trains it, once queued
    pool_job_id TEXT REFERENCES jobs (id),
    out_dir TEXT NOT NULL,
    fine_tuned_model TEXT,
    -- the training file's tokens times the epochs, and the steps, once validated
    billable_tokens BIGINT,
    total_steps BIGINT,
    trained_tokens BIGINT,
    result_file TEXT,
    created_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT
);

CREATE INDEX ft_jobs_by_tenant ON ft_jobs (tenant_id, created_at_ms);
CREATE INDEX ft_jobs_by_status ON ft_jobs (status);

CREATE TABLE ft_events (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES ft_jobs (id),
    -- what the event is about, so that followers racing each other write it once
    key TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT,
    UNIQUE (job_id, key)
);

CREATE INDEX ft_events_by_job ON ft_events (job_id, created_at_ms);

CREATE TABLE ft_checkpoints (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES ft_jobs (id),
    step BIGINT NOT NULL,
    model TEXT NOT NULL,
    -- the PEFT adapter directory
    path TEXT NOT NULL,
    metrics TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (job_id, step)
);
