-- Files tenants upload (OpenAI's Files API): the record here, the bytes in the data directory.
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    deleted_at BIGINT
);

CREATE INDEX files_by_tenant ON files (tenant_id, created_at_ms);
