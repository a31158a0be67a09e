-- Where a user's profile came from, and when its PDS is next asked for it.
--   profile_source: 'stream' (a profile event, never replaced by a fetched one), 'pds' (fetched
--   with getRecord), 'none' (the PDS has no profile record), NULL (not known yet).
--   profile_after: when the PDS is next asked; 'infinity' never (the profile is known, or the
--   user has no PDS yet). A constant default keeps the ALTER from rewriting the table: existing
--   users without a profile are due at once; new users are due when they are written.
ALTER TABLE users
    ADD COLUMN profile_source   text CHECK (profile_source IN ('stream', 'pds', 'none')),
    ADD COLUMN profile_after    timestamptz NOT NULL DEFAULT '-infinity',
    ADD COLUMN profile_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE users ALTER COLUMN profile_after SET DEFAULT now();
-- Before this migration every profile came from the stream.
UPDATE users SET profile_source = 'stream', profile_after = 'infinity'
 WHERE display_name IS NOT NULL OR description IS NOT NULL OR avatar_cid IS NOT NULL
    OR banner_cid IS NOT NULL;
CREATE INDEX users_profile_due ON users (profile_after) WHERE profile_after < 'infinity';
