"""Filling post_stats and user_stats from records written before the counts existed.

Migration 0004 makes writes keep the counts exact from then on; what was there before is counted
here, in ranges of keys, each range in a short transaction that first locks its counts table
against writes (EXCLUSIVE: readers go on). A writer applies its deltas at commit, so once the
lock is held every writer has either committed (its records are in the count about to be taken)
or not yet applied anything (it adds its deltas to the count once the range is written): the
range is exact, and stays exact."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

_LOCK_KEY = 7_311_402_004  # one filler at a time
BATCH_ROWS = 5_000  # about the most records of each source table a range holds (a key is never
# split, so one key with more records makes a range of its own)

# Built CONCURRENTLY (writes go on); the reads they serve: a post's likers and reposters, a
# user's followers, a post's replies. The ranges of the fill walk them too.
INDEXES = {
    "likes_subject": "likes (subject_uri)",
    "reposts_subject": "reposts (subject_uri)",
    "follows_subject": "follows (subject_did)",
    "posts_reply_parent": "posts (reply_parent_uri) WHERE reply_parent_uri IS NOT NULL",
}


@dataclass(frozen=True)
class Source:
    """One record table column whose rows a count adds up."""

    table: str
    column: str
    counts: str  # the counts table's column it feeds


@dataclass(frozen=True)
class CountsTable:
    """A counts table, its key column, and the record columns each of its counts adds up."""

    name: str
    key: str
    sources: tuple[Source, ...]


COUNTS = (
    CountsTable("post_stats", "uri", (Source("likes", "subject_uri", "likes"),
                                      Source("reposts", "subject_uri", "reposts"),
                                      Source("posts", "reply_parent_uri", "replies"))),
    CountsTable("user_stats", "did", (Source("follows", "subject_did", "followers"),
                                      Source("follows", "author_did", "follows"),
                                      Source("posts", "author_did", "posts"))),
)


@dataclass
class FillResult:
    """What a fill did: per counts table, ranges written and rows they hold now."""

    busy: bool = False  # another process holds the filler's lock
    indexes_built: list[str] = field(default_factory=list)
    ranges: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def pending(conn: psycopg.Connection) -> list[str]:
    """Counts tables not yet filled from the records written before them."""
    return [r[0] for r in conn.execute("SELECT name FROM stats_fill WHERE NOT done ORDER BY name")]


def fill(conn: psycopg.Connection, batch_rows: int = BATCH_ROWS,
         on_range: Callable[[str, str | None], None] | None = None) -> FillResult:
    """Builds the missing indexes, then fills what `pending` lists; resumes where a fill stopped.

    Needs a connection with no transaction open; leaves it in autocommit mode."""
    result = FillResult()
    started = time.monotonic()
    conn.autocommit = True
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED  # a snapshot per statement
    if not conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()[0]:
        result.busy = True
        return result
    try:
        result.indexes_built = build_indexes(conn)
        todo = set(pending(conn))
        for table in COUNTS:
            if table.name in todo:
                result.ranges[table.name], result.rows[table.name] = _fill_table(
                    conn, table, batch_rows, on_range)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    result.seconds = time.monotonic() - started
    return result


def build_indexes(conn: psycopg.Connection) -> list[str]:
    """CREATE INDEX CONCURRENTLY of each missing index (an invalid one, left by a build that was
    interrupted, is dropped and built again); returns the names built."""
    built = []
    for name, target in INDEXES.items():
        row = conn.execute("SELECT i.indisvalid FROM pg_index i JOIN pg_class c"
                           " ON c.oid = i.indexrelid WHERE c.relname = %s"
                           " AND pg_table_is_visible(c.oid)", (name,)).fetchone()
        if row is not None and row[0]:
            continue
        if row is not None:
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE INDEX CONCURRENTLY {} ON {}").format(
            sql.Identifier(name), sql.SQL(target)))
        built.append(name)
    return built


def _fill_table(conn: psycopg.Connection, table: CountsTable, batch_rows: int,
                on_range: Callable[[str, str | None], None] | None) -> tuple[int, int]:
    after = conn.execute("SELECT after FROM stats_fill WHERE name = %s",
                         (table.name,)).fetchone()[0]
    ranges = 0
    while True:
        high = _next_bound(conn, table, after, batch_rows)
        _fill_range(conn, table, after, high)
        ranges += 1
        if on_range is not None:
            on_range(table.name, high)
        if high is None:
            break
        after = high
    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
        sql.Identifier(table.name))).fetchone()[0]
    return ranges, rows


def _within(column: str, after: str | None, high: str | None) -> sql.Composable:
    """`column` in (after, high]; None is no bound on that side."""
    col = sql.Identifier(column)
    parts = [sql.SQL("{} > {}").format(col, sql.Literal(after)) if after is not None
             else sql.SQL("{} IS NOT NULL").format(col)]
    if high is not None:
        parts.append(sql.SQL("{} <= {}").format(col, sql.Literal(high)))
    return sql.SQL(" AND ").join(parts)


def _next_bound(conn: psycopg.Connection, table: CountsTable, after: str | None,
                batch_rows: int) -> str | None:
    """The smallest of each source's key `batch_rows` rows after `after`; None: the rest fits."""
    bounds = [sql.SQL("(SELECT {col} FROM {src} WHERE {cond} ORDER BY {col}"
                      " OFFSET {n} LIMIT 1)").format(
        col=sql.Identifier(s.column), src=sql.Identifier(s.table),
        cond=_within(s.column, after, None), n=sql.Literal(batch_rows))
        for s in table.sources]
    query = sql.SQL("SELECT least({})").format(sql.SQL(", ").join(bounds))
    return conn.execute(query).fetchone()[0]


def _fill_range(conn: psycopg.Connection, table: CountsTable, after: str | None,
                high: str | None) -> None:
    """The counts of the keys in (after, high], counted under the counts table's lock."""
    names = [s.counts for s in table.sources]
    parts = [sql.SQL("SELECT {col}, {counts} FROM {src} WHERE {cond} GROUP BY {col}").format(
        col=sql.Identifier(s.column), src=sql.Identifier(s.table),
        cond=_within(s.column, after, high),
        counts=sql.SQL(", ").join(sql.SQL("count(*)") if n == s.counts else sql.SQL("0::bigint")
                                  for n in names))
        for s in table.sources]
    key = sql.Identifier(table.key)
    with conn.transaction():
        conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.Identifier(table.name)))
        conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(
            sql.Identifier(table.name), _within(table.key, after, high)))
        conn.execute(sql.SQL(
            "INSERT INTO {table} ({key}, {cols}) SELECT k, {sums} FROM ({parts}) AS t (k, {cols})"
            " GROUP BY k").format(
            table=sql.Identifier(table.name), key=key,
            cols=sql.SQL(", ").join(map(sql.Identifier, names)),
            sums=sql.SQL(", ").join(sql.SQL("sum({})").format(sql.Identifier(n)) for n in names),
            parts=sql.SQL(" UNION ALL ").join(parts)))
        conn.execute("UPDATE stats_fill SET after = %s, done = %s WHERE name = %s",
                     (high, high is None, table.name))
