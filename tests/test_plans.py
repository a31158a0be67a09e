"""Lookups by DID keep using the index while `users` grows from empty (a fresh database)."""
from __future__ import annotations

import psycopg
from psycopg import sql

from shards.store.migrations import upgrade
from shards.store.pool import open_pool
from shards.store.writes import existing_users


def _add_users(conn: psycopg.Connection, first: int, count: int) -> None:
    conn.execute("INSERT INTO users (did, handle) SELECT 'did:plc:' || lpad(i::text, 24, '0'),"
                 " 'u' || i || '.test' FROM generate_series(%s::int, %s::int) AS i",
                 (first, first + count - 1))
    conn.commit()


def test_a_lookup_planned_on_a_small_table_still_uses_the_index_once_it_has_grown(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        upgrade(conn)
        conn.commit()
    pool = open_pool(dsn, 1, "pipeline-test")  # one connection: every lookup on the same session
    try:
        with pool.connection() as conn:
            _add_users(conn, 0, 1_000)
            asked = [f"did:plc:{i:024d}" for i in range(995, 1_195)]
            for _ in range(8):  # past psycopg's prepare threshold and PostgreSQL's custom plans
                assert existing_users(conn, asked) == set(asked[:5])
            _add_users(conn, 1_000, 100_000)
            assert existing_users(conn, asked) == set(asked)
            name, generic = conn.execute(
                "SELECT name, generic_plans FROM pg_prepared_statements"
                " WHERE statement LIKE 'SELECT did FROM users WHERE did = ANY%'").fetchone()
            plan = "\n".join(r[0] for r in conn.execute(
                sql.SQL("EXPLAIN EXECUTE {}({})").format(sql.Identifier(name), sql.Literal(asked))))
    finally:
        pool.close()
    assert generic == 0
    assert "users_pkey" in plan, plan
