-- Set once a delay-warning DSN was sent for the recipient, so the sender gets at most one.
ALTER TABLE recipients ADD COLUMN warned INTEGER NOT NULL DEFAULT 0 CHECK (warned IN (0, 1));
