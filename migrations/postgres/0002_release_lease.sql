-- Releases go through `applying`: a lease owned by the forwarding instance, the number of
-- forwards made, and the upstream's status once known.
ALTER TABLE changes ADD COLUMN lease_until BIGINT;
ALTER TABLE changes ADD COLUMN release_attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE changes ADD COLUMN outcome_status BIGINT;
-- The sweep looks for lapsed pending changes.
CREATE INDEX changes_by_state ON changes (state);
