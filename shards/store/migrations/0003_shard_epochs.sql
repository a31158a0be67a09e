-- The epoch (fencing token) of each shard's Redis worker. A worker that takes a shard over raises
-- it; each of its write transactions first locks the row FOR SHARE and finds its own epoch there,
-- so a worker that outlived its lease (paused, cut off from Redis) cannot commit after its
-- successor took over. Rows are never deleted: an epoch only grows.
CREATE TABLE shard_epochs (
    shard    integer PRIMARY KEY,
    epoch    bigint NOT NULL,
    holder   text NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now()
);
