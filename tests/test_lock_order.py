"""Transactions that update several users lock them in one order, so they never deadlock."""
from __future__ import annotations

import threading
from collections.abc import Callable

import orjson
import psycopg

from shards.events import decode
from shards.identity.directory import Identity
from shards.identity.mock import MockDirectory
from shards.refresher import Refresher
from shards.store.migrations import upgrade
from shards.store.pool import open_pool
from shards.store.writes import Changes, Writer, prepare_connection
from tests.conftest import query, wait_until

A = "did:plc:" + "a" * 24
B = "did:plc:" + "b" * 24


def _users(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        upgrade(conn)
        conn.execute("INSERT INTO users (did, handle) VALUES (%s, %s), (%s, %s)",
                     (A, A, B, B))


def _waiting(dsn: str, app: str) -> bool:
    return query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                      " AND wait_event_type = 'Lock'", (app,))[0][0] > 0


def _second_user_stays_free_while_the_first_is_held(dsn: str, app: str,
                                                    update: Callable[[], None]) -> None:
    """Holds A; `update` (touching B, then A, in its own order) must wait for A before B."""
    holder = psycopg.connect(dsn)
    holder.execute("SELECT 1 FROM users WHERE did = %s FOR UPDATE", (A,))
    failed: list[BaseException] = []

    def run() -> None:
        try:
            update()
        except BaseException as exc:  # reported by the main thread
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_until(lambda: _waiting(dsn, app) or not thread.is_alive(), timeout=30)
        assert not failed
        # Locking in DID order means B is still free: a third transaction takes it at once.
        with psycopg.connect(dsn) as other:
            other.execute("SELECT 1 FROM users WHERE did = %s FOR UPDATE NOWAIT", (B,))
    finally:
        holder.commit()
        holder.close()
        thread.join(timeout=30)
    assert not thread.is_alive() and not failed


def test_the_refresher_locks_users_in_did_order(dsn: str) -> None:
    _users(dsn)
    directory = MockDirectory([Identity(A, "a.test", True), Identity(B, "b.test", True)])
    with open_pool(dsn, 2, "lock-refresher") as pool:
        refresher = Refresher(pool, directory)
        _second_user_stays_free_while_the_first_is_held(
            dsn, "lock-refresher", lambda: refresher._refresh([B, A]))
    assert query(dsn, "SELECT did, handle, incomplete FROM users ORDER BY did") == [
        (A, "a.test", False), (B, "b.test", False)]


def test_the_writer_locks_users_in_did_order(dsn: str) -> None:
    _users(dsn)
    changes = Changes()
    changes.add(decode(orjson.dumps({"did": B, "time_us": 1, "kind": "commit", "commit": {
        "rev": "r", "operation": "create", "collection": "app.bsky.actor.profile",
        "rkey": "self", "cid": "c", "record": {"displayName": "Bee"}}}), 0, 1, 1))
    changes.add(decode(orjson.dumps({"did": A, "time_us": 2, "kind": "account",
                                     "account": {"active": False, "status": "takendown"}}),
                       0, 2, 2))
    conn = psycopg.connect(dsn, application_name="lock-writer")
    prepare_connection(conn)
    with conn:
        _second_user_stays_free_while_the_first_is_held(
            dsn, "lock-writer", lambda: Writer().write(conn, changes))
    assert query(dsn, "SELECT did, display_name, active, status FROM users ORDER BY did") == [
        (A, None, False, "takendown"), (B, "Bee", True, None)]
