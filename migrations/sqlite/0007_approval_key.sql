-- The key that signs the Stepgate-Approval header, when none is configured: generated once by
-- whichever instance starts first (INSERT ... ON CONFLICT DO NOTHING) and then read by all, so
-- every instance signs with, and publishes, the same key.
CREATE TABLE approval_keys (
    id TEXT PRIMARY KEY,
    private_key_pem TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
