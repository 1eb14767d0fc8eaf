-- Passkey lifecycle: an added passkey is pending until its own confirmed change has cooled
-- off; a cloned one is disabled. Confirmations record a quarantine that moved release_at.
-- Security events (a counter that went backwards) are kept for later notification and audit.
ALTER TABLE passkeys ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
ALTER TABLE passkeys ADD COLUMN aaguid TEXT;
ALTER TABLE passkeys ADD COLUMN activation_change_id TEXT;
ALTER TABLE passkeys ADD COLUMN disabled_at BIGINT;
ALTER TABLE changes ADD COLUMN quarantined_until BIGINT;

CREATE TABLE security_events (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    passkey_id  TEXT,
    detail      TEXT NOT NULL,
    occurred_at BIGINT NOT NULL
);
CREATE INDEX security_events_by_user ON security_events (user_id, occurred_at);
