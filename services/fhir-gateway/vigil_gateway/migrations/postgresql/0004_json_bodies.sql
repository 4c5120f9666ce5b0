-- Issue #4: store each body as `json` (the text the store wrote, kept verbatim) instead of `jsonb`.
-- Nothing queries inside a body (search runs on the idx_* tables and the denormalised columns), and
-- every read returned the body as text: jsonb had to be turned back into text on each read (100 bodies
-- per search page), and its text has keys reordered by length. A json body is returned as stored, the
-- compact JSON the store serialised with resourceType, id and meta first, so the gateway writes it into
-- the response as is. PostgreSQL still checks that it is valid JSON on input.
-- Existing rows keep jsonb's text (keys by length, ", " separators); the store reorders those when
-- it reads them (PostgresStore._decode). Rewrites the three tables (minutes at 10M resources).
ALTER TABLE resources ALTER COLUMN body TYPE json USING body::json;
ALTER TABLE resource_history ALTER COLUMN body TYPE json USING body::json;
ALTER TABLE outbox ALTER COLUMN body TYPE json USING body::json;
