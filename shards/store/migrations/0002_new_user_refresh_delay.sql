-- A new user is first due for the refresher a minute after it is written, so the user row can be
-- COPYed without naming the column.
ALTER TABLE users ALTER COLUMN refresh_after SET DEFAULT now() + interval '1 minute';
