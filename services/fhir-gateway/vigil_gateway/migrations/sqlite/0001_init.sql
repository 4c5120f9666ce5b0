-- Current version of every stored FHIR resource, plus denormalised search tokens.
-- Text columns compare bytewise (SQLite's default BINARY collation), like COLLATE "C" in PostgreSQL.
CREATE TABLE resources (
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version_id    INTEGER NOT NULL,
    last_updated  TEXT    NOT NULL,          -- instant, UTC, ISO 8601 with microseconds and Z
    subject       TEXT,                      -- normalised reference, e.g. Patient/p1
    date          TEXT,                      -- effective/occurrence instant (UTC ISO) or partial date
    content_hash  TEXT    NOT NULL,          -- sha256 of the resource without meta.versionId/lastUpdated
    body          TEXT    NOT NULL,          -- the JSON resource including meta
    PRIMARY KEY (resource_type, id)
);
CREATE INDEX resources_by_subject_date ON resources (resource_type, subject, date DESC, id);

-- One row per coding of the resource's `code` (Observation.code, RiskAssessment.code).
CREATE TABLE resource_tokens (
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    subject       TEXT,
    system        TEXT NOT NULL DEFAULT '',  -- '' when the coding has no system
    code          TEXT NOT NULL,
    date          TEXT
);
CREATE INDEX resource_tokens_search ON resource_tokens (resource_type, subject, code, system, date DESC, resource_id);
CREATE INDEX resource_tokens_code ON resource_tokens (resource_type, code, system, date DESC, resource_id);
CREATE INDEX resource_tokens_owner ON resource_tokens (resource_type, resource_id);
