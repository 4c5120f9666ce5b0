-- Issue #4: every version kept (vread/history), generic search index tables (token, reference, date,
-- string), a creation sequence for stable paging, and an outbox for REST writes published to the bus.
-- Index rows are filled by the store in Python after this migration (reindex of existing resources).
ALTER TABLE resources ADD COLUMN created_seq BIGINT;
ALTER TABLE resources ADD COLUMN date_high TEXT COLLATE "C";
CREATE SEQUENCE resource_seq;
CREATE INDEX resources_created_seq ON resources (created_seq);
CREATE INDEX resources_type_updated ON resources (resource_type, last_updated);
DROP INDEX resources_by_subject_date;
CREATE INDEX resources_by_subject_date ON resources (resource_type, subject, date_high DESC NULLS LAST, id);
CREATE INDEX resources_by_date ON resources (resource_type, date_high DESC NULLS LAST, id);
DROP TABLE resource_tokens;

CREATE TABLE resource_history (
    resource_type TEXT COLLATE "C" NOT NULL,
    id            TEXT COLLATE "C" NOT NULL,
    version_id    INTEGER NOT NULL,
    last_updated  TEXT COLLATE "C" NOT NULL,
    method        TEXT NOT NULL DEFAULT 'PUT',   -- POST for version 1, PUT after
    body          JSONB NOT NULL,
    PRIMARY KEY (resource_type, id, version_id)
);
CREATE INDEX resource_history_type ON resource_history (resource_type, last_updated);
INSERT INTO resource_history (resource_type, id, version_id, last_updated, method, body)
    SELECT resource_type, id, version_id, last_updated, CASE WHEN version_id = 1 THEN 'POST' ELSE 'PUT' END, body
    FROM resources;

-- token parameters (code, category, status, identifier, class, gender, type, method); subject and the
-- resource's `date` range are denormalised so that subject+code+date is one index range scan.
CREATE TABLE idx_token (
    resource_type TEXT COLLATE "C" NOT NULL,
    resource_id   TEXT COLLATE "C" NOT NULL,
    param         TEXT COLLATE "C" NOT NULL,
    system        TEXT COLLATE "C" NOT NULL DEFAULT '',
    value         TEXT COLLATE "C" NOT NULL,
    subject       TEXT COLLATE "C",
    date_low      TEXT COLLATE "C",
    date_high     TEXT COLLATE "C"
);
CREATE INDEX idx_token_subject ON idx_token (resource_type, param, subject, value, system, date_high DESC NULLS LAST, resource_id);
CREATE INDEX idx_token_value ON idx_token (resource_type, param, value, system, date_high DESC NULLS LAST, resource_id);
CREATE INDEX idx_token_owner ON idx_token (resource_type, resource_id);

CREATE TABLE idx_reference (
    resource_type TEXT COLLATE "C" NOT NULL,
    resource_id   TEXT COLLATE "C" NOT NULL,
    param         TEXT COLLATE "C" NOT NULL,
    target        TEXT COLLATE "C" NOT NULL   -- Type/id
);
CREATE INDEX idx_reference_target ON idx_reference (resource_type, param, target, resource_id);
CREATE INDEX idx_reference_owner ON idx_reference (resource_type, resource_id);

CREATE TABLE idx_date (
    resource_type TEXT COLLATE "C" NOT NULL,
    resource_id   TEXT COLLATE "C" NOT NULL,
    param         TEXT COLLATE "C" NOT NULL,
    low           TEXT COLLATE "C" NOT NULL,
    high          TEXT COLLATE "C" NOT NULL
);
CREATE INDEX idx_date_low ON idx_date (resource_type, param, low, resource_id);
CREATE INDEX idx_date_high ON idx_date (resource_type, param, high, resource_id);
CREATE INDEX idx_date_owner ON idx_date (resource_type, resource_id);

CREATE TABLE idx_string (
    resource_type TEXT COLLATE "C" NOT NULL,
    resource_id   TEXT COLLATE "C" NOT NULL,
    param         TEXT COLLATE "C" NOT NULL,
    norm          TEXT COLLATE "C" NOT NULL,  -- lower case, accents removed
    exact         TEXT COLLATE "C" NOT NULL
);
CREATE INDEX idx_string_norm ON idx_string (resource_type, param, norm, resource_id);
CREATE INDEX idx_string_owner ON idx_string (resource_type, resource_id);

-- REST writes (Patient, Encounter) to publish on VIGIL_EHR; committed with the write, drained after.
CREATE TABLE outbox (
    seq           BIGSERIAL PRIMARY KEY,
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    version_id    INTEGER NOT NULL,
    body          JSONB NOT NULL
);

-- set when existing rows need their index rows computed (done by the store right after migrating)
CREATE TABLE reindex_pending (flag INTEGER PRIMARY KEY);
INSERT INTO reindex_pending (flag) SELECT 1 WHERE EXISTS (SELECT 1 FROM resources);
