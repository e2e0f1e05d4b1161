-- The ledger's rows (fount-ledger gives them meaning): entries, the tree's stored hashes (the
-- hash of every complete subtree, level and index as in RFC 6962's tiling), every signed
-- checkpoint, and the hourly usage commitments. Hashes are lowercase hex.
CREATE TABLE ledger_head (
    id INTEGER PRIMARY KEY,
    size BIGINT NOT NULL
);
INSERT INTO ledger_head (id, size) VALUES (1, 0);

CREATE TABLE ledger_entries (
    idx BIGINT PRIMARY KEY,
    body TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE ledger_hashes (
    level INTEGER NOT NULL,
    idx BIGINT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (level, idx)
);

CREATE TABLE ledger_checkpoints (
    size BIGINT PRIMARY KEY,
    note TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

-- a tenant's usage records committed in one entry: the records whose ledger_entry is it,
-- in (created_at_ms, request_id) order, hash to root
CREATE TABLE ledger_usage_commits (
    entry_idx BIGINT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    from_ms BIGINT NOT NULL,
    to_ms BIGINT NOT NULL,
    records BIGINT NOT NULL,
    root TEXT NOT NULL
);
CREATE INDEX ledger_usage_commits_tenant ON ledger_usage_commits (tenant_id, from_ms);

ALTER TABLE usage_records ADD COLUMN ledger_entry BIGINT;
CREATE INDEX usage_records_ledger_entry ON usage_records (ledger_entry);
