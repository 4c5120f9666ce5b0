-- Issue #4: the hot search `Observation?subject=X&code=S|C&date=ge...` reads idx_token through
-- idx_token_subject; the date prefixes (ge, le, eq, ne) also test date_low, which was only in the
-- table, so every matching token row cost a heap page. Carrying date_low in the index (INCLUDE: not a
-- key, the order is unchanged) makes that part an index-only scan, and the total (counted on
-- idx_token alone, see store._SqlBuilder.count_parts) never touches a heap page.
-- Rebuilding the index takes a while on a big table (minutes at 10M Observations).
DROP INDEX idx_token_subject;
CREATE INDEX idx_token_subject ON idx_token (resource_type, param, subject, value, system,
    date_high DESC NULLS LAST, resource_id) INCLUDE (date_low);
