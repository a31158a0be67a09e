-- Why an incomplete user is incomplete: its last resolution's failure as "reason: detail" (a
-- refused address, a timeout, a failed lookup), NULL once complete; `pipeline status` counts
-- incomplete users by reason.
ALTER TABLE users ADD COLUMN resolve_error text;
