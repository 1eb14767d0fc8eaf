-- Ceremonies are marked consumed instead of deleted, so the starts of the last minute can be
-- counted (the per-user rate limit) until the sweep removes them after they expire.
ALTER TABLE ceremonies ADD COLUMN consumed_at BIGINT;
CREATE INDEX ceremonies_by_user ON ceremonies (user_id, created_at);
CREATE INDEX changes_pending_by_user ON changes (user_id, state);
