-- A hash-chained audit log and a durable webhook outbox, both written in the same transaction
-- as the state change they record. audit_head holds the last sequence number and hash; taking
-- it (UPDATE ... RETURNING) is what serialises appends across instances.
CREATE TABLE audit_head (
    id   BIGINT PRIMARY KEY,
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY,
    occurred_at BIGINT NOT NULL,
    user_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    change_id   TEXT,
    detail      TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);

CREATE TABLE outbox (
    id              TEXT PRIMARY KEY,
    event_id        TEXT NOT NULL,
    event           TEXT NOT NULL,
    webhook_url     TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);

ALTER TABLE users ADD COLUMN anti_phishing_code TEXT;
