-- Emergency freeze: while frozen_at is set, protected requests are refused. Unfreezing is a
-- built-in protected change of its own (passkey confirmation, then a cooling-off).
ALTER TABLE users ADD COLUMN frozen_at BIGINT;
