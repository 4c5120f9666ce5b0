-- Current version of every stored FHIR resource, plus denormalised search tokens.
-- COLLATE "C" gives bytewise ordering, identical to SQLite's BINARY collation.
CREATE TABLE resources (
    resource_type TEXT COLLATE "C" NOT NULL,
    id            TEXT COLLATE "C" NOT NULL,
    version_id    INTEGER NOT NULL,
    last_updated  TEXT COLLATE "C" NOT NULL,  -- instant, UTC, ISO 8601 with microseconds and Z
    subject       TEXT COLLATE "C",           -- normalised reference, e.g. Patient/p1
    date          TEXT COLLATE "C",           -- effective/occurrence instant (UTC ISO) or partial date
    content_hash  TEXT NOT NULL,              -- sha256 of the resource without meta.versionId/lastUpdated
    body          JSONB NOT NULL,             -- the resource including meta
    PRIMARY KEY (resource_type, id)
);
CREATE INDEX resources_by_subject_date ON resources (resource_type, subject, date DESC NULLS LAST, id);

-- One row per coding of the resource's `code` (Observation.code, RiskAssessment.code).
CREATE TABLE resource_tokens (
    resource_type TEXT COLLATE "C" NOT NULL,
    resource_id   TEXT COLLATE "C" NOT NULL,
    subject       TEXT COLLATE "C",
    system        TEXT COLLATE "C" NOT NULL DEFAULT '',  -- '' when the coding has no system
    code          TEXT COLLATE "C" NOT NULL,
    date          TEXT COLLATE "C"
);
CREATE INDEX resource_tokens_search ON resource_tokens (resource_type, subject, code, system, date DESC NULLS LAST, resource_id);
CREATE INDEX resource_tokens_code ON resource_tokens (resource_type, code, system, date DESC NULLS LAST, resource_id);
CREATE INDEX resource_tokens_owner ON resource_tokens (resource_type, resource_id);
