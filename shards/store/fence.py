"""A shard's epoch (fencing token) in PostgreSQL: only the worker that raised it last may write.

A lease in Redis cannot stop a paused process, so the store refuses a stale writer: a worker that
takes a shard over raises the epoch, and every one of its write transactions first locks the
epoch row FOR SHARE and finds its own epoch there. The raise waits for a transaction in flight
that holds the row; every transaction after the raise sees the new epoch and rolls back."""
from __future__ import annotations

from dataclasses import dataclass

import psycopg

_RAISE = (
    "INSERT INTO shard_epochs AS e (shard, epoch, holder) VALUES (%s, 1, %s)"
    " ON CONFLICT (shard) DO UPDATE SET epoch = e.epoch + 1, holder = EXCLUDED.holder,"
    " taken_at = now()"
    " RETURNING epoch"
)
_CHECK = "SELECT epoch FROM shard_epochs WHERE shard = %s FOR SHARE"


class StaleEpoch(Exception):
    """Another worker took the shard over: this worker's transaction rolled back."""

    def __init__(self, shard: int, epoch: int, current: int | None) -> None:
        super().__init__(f"shard {shard} was taken over by another worker (epoch {current}; "
                         f"this worker's is {epoch})")
        self.shard = shard
        self.epoch = epoch
        self.current = current


@dataclass(frozen=True)
class Fence:
    """The epoch a worker took its shard over with, checked at the start of each transaction."""

    shard: int
    epoch: int

    def check(self, cur: psycopg.Cursor) -> None:
        """Holds the epoch row FOR SHARE until the transaction ends; StaleEpoch if it moved on.

        Must be the transaction's first statement, so that nothing of it is written under an
        epoch already raised, and a successor's raise waits until this transaction is over."""
        row = cur.execute(_CHECK, (self.shard,)).fetchone()
        current = row[0] if row else None
        if current != self.epoch:
            raise StaleEpoch(self.shard, self.epoch, current)


def take_over(conn: psycopg.Connection, shard: int, holder: str) -> Fence:
    """Raises the shard's epoch and commits; waits for a transaction of the previous worker that
    is still in flight. Call it before reading any of the shard's pending work."""
    with conn.transaction():
        row = conn.execute(_RAISE, (shard, holder)).fetchone()
    assert row is not None
    return Fence(shard, row[0])
