-- The newest repository revision applied per DID (firehose commits and syncs, backfills): a
-- commit whose rev is not newer is skipped, so replays and redeliveries change nothing.
CREATE TABLE repo_revs (
    did        text PRIMARY KEY,
    rev        text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- When the event at a cursor happened (firehose frames carry it; a seq does not say), so that
-- `pipeline status` can show how far behind a firehose cursor is.
ALTER TABLE cursors ADD COLUMN event_time timestamptz;
