-- Safety and control: tenants' and keys' moderation policies, what an operator has suspended,
-- and a record of every moderation decision and operator switch.

-- subject: 't:{tenant id}' or 'k:{key id}'; policy: the policy as TOML (fount-safety reads it)
CREATE TABLE safety_policies (
    subject TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- kind: tenant, key, model or adapter; name: the tenant's or key's id, the model's or
-- adapter's name
CREATE TABLE suspensions (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (kind, name)
);

-- bumped by every change to either table above: servers poll it to pick changes up
CREATE TABLE safety_version (
    id INTEGER PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO safety_version (id, version) VALUES (1, 0);

-- stage: input, output, moderation or operator; action: allow, log, block, redact, suspend,
-- resume, policy; categories and rules: JSON arrays; content: only where the policy keeps it;
-- ledger_entry: the ledger entry that commits the record's hour, once committed
CREATE TABLE audit_records (
    id TEXT PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    tenant_id TEXT,
    key_id TEXT,
    request_id TEXT,
    stage TEXT NOT NULL,
    action TEXT NOT NULL,
    categories TEXT NOT NULL,
    rules TEXT NOT NULL,
    policy TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    content TEXT,
    ledger_entry BIGINT
);
CREATE INDEX audit_records_by_time ON audit_records (created_at_ms, id);
