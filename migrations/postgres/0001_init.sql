-- The core gate: users, passkeys, held changes, passkey ceremonies, browser sessions.
-- Times are milliseconds since the Unix epoch; booleans are 0/1 integers, so one set of
-- queries serves SQLite and PostgreSQL alike.

CREATE TABLE users (
    user_id         TEXT PRIMARY KEY,
    webauthn_handle TEXT NOT NULL UNIQUE,
    created_at      BIGINT NOT NULL
);

CREATE TABLE passkeys (
    id              TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL REFERENCES users (user_id),
    credential_id   TEXT NOT NULL UNIQUE,
    name            TEXT NOT NULL,
    passkey_json    TEXT NOT NULL,
    backup_eligible BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    last_used_at    BIGINT
);
CREATE INDEX passkeys_by_user ON passkeys (user_id);

CREATE TABLE changes (
    id                TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL,
    rule_name         TEXT NOT NULL,
    method            TEXT NOT NULL,
    path              TEXT NOT NULL,
    query             TEXT,
    headers_json      TEXT NOT NULL,
    body              BYTEA NOT NULL,
    digest            TEXT NOT NULL,
    summary           TEXT NOT NULL,
    state             TEXT NOT NULL,
    cooling_off_ms    BIGINT NOT NULL,
    release_within_ms BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    confirm_before    BIGINT NOT NULL,
    confirmed_at      BIGINT,
    release_at        BIGINT,
    release_before    BIGINT,
    finished_at       BIGINT,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX changes_by_user ON changes (user_id, created_at);

CREATE TABLE ceremonies (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    change_id       TEXT,
    change_digest   TEXT,
    session_binding TEXT NOT NULL,
    state_json      TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL
);

CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    data        TEXT NOT NULL,
    expiry_date BIGINT NOT NULL
);
