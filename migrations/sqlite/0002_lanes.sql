-- Lanes: transactional mail never waits behind a bulk campaign. The lane is chosen per message
-- at intake and copied to its recipients so claims per lane use one index.
ALTER TABLE messages ADD COLUMN lane TEXT NOT NULL DEFAULT 'transactional'
    CHECK (lane IN ('transactional', 'bulk'));
ALTER TABLE recipients ADD COLUMN lane TEXT NOT NULL DEFAULT 'transactional'
    CHECK (lane IN ('transactional', 'bulk'));
CREATE INDEX recipients_lane_due ON recipients (lane, status, next_attempt);
