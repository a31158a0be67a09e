"""Connection budget: how many connections each process may open, and pools sized from it."""
from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg_pool import ConnectionPool

from shards.store.writes import prepare_connection

SUPERVISOR_SHARE = 1  # the supervisor's one connection: advisory lock and cursor
# Faults a retry on a fresh connection cures: the server or the network went away, or the server
# ended a transaction left idle past `idle_in_transaction` (its worker was paused).
RETRYABLE = (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout)


class BudgetError(ValueError):
    """The requested shards cannot each get a connection within the budget."""


@dataclass(frozen=True)
class Budget:
    """Splits `--pool-budget` between the supervisor and the shards."""

    total: int
    shards: int

    def per_shard(self) -> int:
        available = self.total - SUPERVISOR_SHARE
        if available < self.shards:
            raise BudgetError(
                f"--pool-budget {self.total} cannot give {self.shards} shards a connection each "
                f"(the supervisor keeps {SUPERVISOR_SHARE}); use at most {max(available, 0)} "
                f"shards or a budget of at least {self.shards + SUPERVISOR_SHARE}"
            )
        return available // self.shards


def connect(dsn: str, application_name: str, **kwargs: object) -> psycopg.Connection:
    """One connection named for `pg_stat_activity`."""
    return psycopg.connect(dsn, application_name=application_name, **kwargs)


def open_pool(dsn: str, size: int, application_name: str,
              idle_in_transaction: float | None = None) -> ConnectionPool:
    """A small pool for one shard: at most `size` connections, staging tables ready.

    `idle_in_transaction` (seconds): the server ends a transaction left idle that long, so a
    worker paused in the middle of one does not hold up the successor that takes its shard."""

    def configure(conn: psycopg.Connection) -> None:
        if idle_in_transaction is not None:
            conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                         (f"{max(1, round(idle_in_transaction * 1000))}ms",))
        prepare_connection(conn)

    pool = ConnectionPool(
        dsn,
        min_size=1,
        max_size=size,
        kwargs={"application_name": application_name},
        configure=configure,
        name=application_name,
        timeout=60,
        reconnect_timeout=300,
        open=False,
    )
    pool.open(wait=True, timeout=30)
    return pool
