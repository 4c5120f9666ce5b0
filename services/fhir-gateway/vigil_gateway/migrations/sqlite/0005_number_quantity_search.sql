-- Number and quantity search parameters (https://hl7.org/fhir/R4/search.html#number, #quantity).
-- Observation `value-quantity` (valueQuantity is 0..1) is denormalised onto the resource's own row, like
-- `subject` and `date`: no index row per Observation (searches filter the rows their other parameters
-- select). RiskAssessment `probability` (one per prediction, 0..*) gets idx_quantity rows; number rows
-- have no system, code or unit ('').
ALTER TABLE resources ADD COLUMN value_num REAL;
ALTER TABLE resources ADD COLUMN value_system TEXT;
ALTER TABLE resources ADD COLUMN value_code TEXT;
ALTER TABLE resources ADD COLUMN value_unit TEXT;
CREATE TABLE idx_quantity (
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    param         TEXT NOT NULL,
    value         REAL NOT NULL,
    system        TEXT NOT NULL DEFAULT '',
    code          TEXT NOT NULL DEFAULT '',
    unit          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX idx_quantity_value ON idx_quantity (resource_type, param, code, value, resource_id);
CREATE INDEX idx_quantity_owner ON idx_quantity (resource_type, resource_id);
-- Parameters added to types that may already have stored resources: the store computes their index
-- rows right after migrating (store.SqlStore._reindex_params), then empties this table.
CREATE TABLE reindex_params (
    resource_type TEXT NOT NULL,
    param         TEXT NOT NULL,
    PRIMARY KEY (resource_type, param)
);
INSERT INTO reindex_params (resource_type, param)
    SELECT 'Observation', 'value-quantity' WHERE EXISTS (SELECT 1 FROM resources WHERE resource_type = 'Observation');
INSERT INTO reindex_params (resource_type, param)
    SELECT 'RiskAssessment', p.param FROM (SELECT 'risk' AS param UNION ALL SELECT 'probability' UNION ALL SELECT 'performer') p
    WHERE EXISTS (SELECT 1 FROM resources WHERE resource_type = 'RiskAssessment');
