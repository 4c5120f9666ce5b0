-- Issue #4: the hot search `Observation?subject=X&code=S|C&date=ge...` reads idx_token through
-- idx_token_subject; the date prefixes (ge, le, eq, ne) also test date_low, which was only in the
-- table. With date_low as a trailing column (SQLite has no INCLUDE) the index covers the search and
-- the total (counted on idx_token alone, see store._SqlBuilder.count_parts): no table row is read.
-- Rebuilding the index takes a while on a big table.
DROP INDEX idx_token_subject;
CREATE INDEX idx_token_subject ON idx_token (resource_type, param, subject, value, system,
    date_high DESC, resource_id, date_low);
