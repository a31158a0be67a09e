"""`pipeline status` and `pipeline dead-letters`: what an operator asks of the database.

Both read the tables the pipeline writes and take the same database (and, for the retry,
identity) options as `run`, so PIPELINE_* variables mean the same thing everywhere."""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import click
import psycopg

from common.routing import sql_shard_expr
from pipeline.options import (
    RET_DATABASE,
    _short,
    common_options,
    database_options,
    fail,
    identity_config,
    identity_options,
    open_database,
    opt,
    resolve_dsn,
    server_label,
    setup_logging,
)
from pipeline.sources.streams import compression
from shards.store.counts import pending as pending_counts

RECORD_TABLES = ("posts", "likes", "reposts", "follows", "blocks", "records")
NO_REASON = "no reason recorded"  # users written before the reasons were
RAW_PREVIEW_CHARS = 80
NOT_LINES = ("pds:", "backfill:")  # dead letters of these sources are not stream lines
_FINGERPRINT_BYTES = 64 * 1024  # what FileSource hashes into a replay cursor's name


# ----- status ---------------------------------------------------------------------------------

@dataclass
class CursorInfo:
    """One saved cursor, with how far behind (jetstream) or how far through (replay) it is."""

    name: str
    cursor: int
    updated_at: str
    kind: str  # "jetstream", "firehose", "replay" or "other"
    lag_seconds: float | None = None  # jetstream: now - cursor time; firehose: now - frame time
    file_size: int | None = None  # replay: size of the file that is still at the path
    percent: float | None = None  # replay: cursor / file_size
    note: str | None = None  # why a replay cursor has no percentage


@dataclass
class ShardInfo:
    """Rows owned by one shard (by DID), so skew between shards shows."""

    shard: int
    users: int = 0
    tables: dict[str, int] = field(default_factory=lambda: {t: 0 for t in RECORD_TABLES})
    epoch: int | None = None  # raised by each Redis worker that took the shard over

    @property
    def total(self) -> int:
        """Rows of every record table (`records` is itself one of them)."""
        return sum(self.tables.values())


@dataclass(frozen=True)
class PostCounts:
    uri: str
    likes: int
    reposts: int
    replies: int


@dataclass(frozen=True)
class UserCounts:
    did: str
    handle: str | None  # None: not (yet) in users
    followers: int
    follows: int
    posts: int


@dataclass
class Profiles:
    """Where users' profiles came from, and those still missing one."""

    stream: int = 0
    fetched: int = 0
    absent: int = 0  # the PDS said it has none
    missing: int = 0
    missing_due: int = 0  # missing, and its PDS is due to be asked now
    missing_without_pds: int = 0  # missing, and no PDS known yet


@dataclass
class Status:
    server: str  # e.g. "PostgreSQL 18.6 (embedded, /srv/pipeline/.pipeline-data)"
    cursors: list[CursorInfo]
    incomplete_users: int
    incomplete_due: int
    incomplete_reasons: dict[str, int]  # by the reason of each one's last failed resolution
    dead_letters: dict[str, int]
    dead_letters_total: int
    shards: list[ShardInfo]
    profiles: Profiles = field(default_factory=Profiles)
    complete_users: int = 0  # handle settled, and profile known (fetched, streamed or absent)
    top_posts: list[PostCounts] = field(default_factory=list)  # most liked
    top_users: list[UserCounts] = field(default_factory=list)  # most followed
    filling: list[str] = field(default_factory=list)  # counts tables not yet filled

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "cursors": [asdict(c) for c in self.cursors],
            "incomplete_users": {"total": self.incomplete_users, "due": self.incomplete_due,
                                 "by_reason": self.incomplete_reasons},
            "profiles": asdict(self.profiles),
            "complete_users": self.complete_users,
            "dead_letters": {"total": self.dead_letters_total, "by_reason": self.dead_letters},
            "shards": [{"shard": s.shard, "users": s.users, **s.tables, "total": s.total,
                        "epoch": s.epoch} for s in self.shards],
            "counts": {"exact": not self.filling, "filling": self.filling},
            "top_posts": [asdict(p) for p in self.top_posts],
            "top_users": [asdict(u) for u in self.top_users],
        }


def reason_of(error: str) -> str:
    """The dead-letter reason without its details: the text up to the first ':'."""
    return error.split(":", 1)[0].strip()


def replay_progress(name: str, offset: int) -> tuple[int | None, float | None, str | None]:
    """Size and percentage for a `replay:/abs/path#fingerprint` cursor, if the file is still there.

    Offsets count uncompressed bytes, so a gzip or zstd file has no honest percentage; a file
    whose head no longer matches the fingerprint is a different file and gets none either."""
    rest = name[len("replay:"):]
    path, _, fingerprint = rest.rpartition("#")
    if not path or not os.path.isabs(path):
        return None, None, "not a file"
    try:
        with open(path, "rb") as f:
            head = f.read(_FINGERPRINT_BYTES)
        size = os.path.getsize(path)
    except OSError:
        return None, None, "file gone"
    if fingerprint and hashlib.sha256(head).hexdigest()[:len(fingerprint)] != fingerprint:
        return size, None, "file changed"
    kind = compression(head)
    if kind != "plain":
        return size, None, f"{kind}: offset is uncompressed"
    return size, (100.0 * offset / size if size else 100.0), None


def cursor_info(name: str, cursor: int, updated_at: datetime, now: float,
                event_time: datetime | None = None) -> CursorInfo:
    """`event_time`: when the newest committed event happened (firehose frames carry it)."""
    info = CursorInfo(name, cursor, updated_at.isoformat(), "other")
    if name.startswith("jetstream:"):
        info.kind = "jetstream"
        info.lag_seconds = round(now - cursor / 1e6, 3)
    elif name.startswith("firehose:"):
        info.kind = "firehose"
        if event_time is not None:
            info.lag_seconds = round(now - event_time.timestamp(), 3)
    elif name.startswith("replay:"):
        info.kind = "replay"
        info.file_size, info.percent, info.note = replay_progress(name, cursor)
        if info.percent is not None:
            info.percent = round(info.percent, 2)
    return info


def collect(conn: psycopg.Connection, shards: int, server: str, top: int = 5) -> Status:
    """Every figure in a handful of aggregate queries, one read-only snapshot."""
    now = time.time()
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cursors = [cursor_info(n, c, u, now, t) for n, c, u, t in conn.execute(
            "SELECT name, cursor, updated_at, event_time FROM cursors ORDER BY name")]
        incomplete, due = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE refresh_after <= now())"
            " FROM users WHERE incomplete").fetchone()
        why: dict[str, int] = {}
        for reason, n in conn.execute(
                "SELECT split_part(resolve_error, ':', 1) AS reason, count(*) FROM users"
                " WHERE incomplete GROUP BY reason ORDER BY count(*) DESC, reason"):
            why[reason or NO_REASON] = n
        *counts, complete = conn.execute(
            "SELECT count(*) FILTER (WHERE profile_source = 'stream'),"
            " count(*) FILTER (WHERE profile_source = 'pds'),"
            " count(*) FILTER (WHERE profile_source = 'none'),"
            " count(*) FILTER (WHERE profile_source IS NULL),"
            " count(*) FILTER (WHERE profile_source IS NULL AND profile_after <= now()),"
            " count(*) FILTER (WHERE profile_source IS NULL AND pds IS NULL),"
            " count(*) FILTER (WHERE NOT incomplete AND profile_source IS NOT NULL)"
            " FROM users").fetchone()
        reasons: dict[str, int] = {}
        for reason, n in conn.execute(
                "SELECT split_part(error, ':', 1) AS reason, count(*) FROM dead_letters"
                " GROUP BY reason ORDER BY count(*) DESC, reason"):
            reasons[reason.strip()] = reasons.get(reason.strip(), 0) + n
        by_shard = {k: ShardInfo(k) for k in range(shards)}
        users_sql = f"SELECT {sql_shard_expr('did', shards)} AS s, count(*) FROM users GROUP BY s"
        for k, n in conn.execute(users_sql):
            by_shard[k].users = n
        for table in RECORD_TABLES:
            # Count per author first (an index-only scan on author_did), then hash each
            # author once rather than each row.
            sql = (f"SELECT {sql_shard_expr('author_did', shards)} AS s, sum(n)::bigint"
                   f" FROM (SELECT author_did, count(*) AS n FROM {table} GROUP BY author_did) a"
                   f" GROUP BY s")
            for k, n in conn.execute(sql):
                by_shard[k].tables[table] = n
        for k, epoch in conn.execute("SELECT shard, epoch FROM shard_epochs"):
            if k in by_shard:
                by_shard[k].epoch = epoch
        # No index on the counts (it would cost every increment): a scan, 0.15 s per million
        # rows.
        top_posts = [PostCounts(*r) for r in conn.execute(
            "SELECT uri, likes, reposts, replies FROM post_stats ORDER BY likes DESC, uri"
            " LIMIT %s", (top,))]
        top_users = [UserCounts(*r) for r in conn.execute(
            "SELECT s.did, u.handle, s.followers, s.follows, s.posts FROM user_stats s"
            " LEFT JOIN users u ON u.did = s.did ORDER BY s.followers DESC, s.did LIMIT %s",
            (top,))]
        filling = pending_counts(conn)
    return Status(server, cursors, incomplete, due, why, reasons, sum(reasons.values()),
                  [by_shard[k] for k in range(shards)], Profiles(*counts), complete, top_posts,
                  top_users, filling)


def _duration(seconds: float) -> str:
    if seconds < 0:
        return f"{seconds:.1f}s (ahead)"
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes}m"
    return f"{hours}h {minutes}m {sec}s" if hours else f"{minutes}m {sec}s"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = [str(c).rjust(w) if i in right else str(c).ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render(status: Status) -> str:
    out: list[str] = [f"server  {status.server}", "", "cursors"]
    if status.cursors:
        rows = []
        for c in status.cursors:
            if c.kind == "jetstream" or c.kind == "firehose" and c.lag_seconds is not None:
                progress = f"lag {_duration(c.lag_seconds or 0.0)}"
            elif c.kind == "firehose":
                progress = f"seq {c.cursor}"
            elif c.kind == "replay":
                progress = f"byte {c.cursor}"
                if c.percent is not None:
                    progress += f" of {c.file_size} ({c.percent:.1f}%)"
                elif c.note:
                    progress += f" ({c.note})"
            else:
                progress = ""
            rows.append([c.name, str(c.cursor), c.updated_at[:19].replace("T", " "), progress])
        out += ["  " + s for s in _table(["name", "value", "updated", "progress"], rows, {1})]
    else:
        out.append("  (none)")
    p = status.profiles
    out += ["", f"incomplete users  {status.incomplete_users}"
                f" ({status.incomplete_due} due for refresh)"]
    out += [f"  {n:>8}  {reason}" for reason, n in status.incomplete_reasons.items()]
    out += [f"profiles          {p.stream} from the stream, {p.fetched} fetched, {p.absent} known"
            f" absent; {p.missing} missing ({p.missing_due} due now, {p.missing_without_pds}"
            " without a PDS)",
            f"complete users    {status.complete_users} (handle verified or invalid, profile known)",
            "", f"dead letters      {status.dead_letters_total}"]
    for reason, n in status.dead_letters.items():
        out.append(f"  {n:>8}  {reason}")
    header = ["shard", "users", *RECORD_TABLES, "total"]
    rows = [[str(s.shard), str(s.users), *(str(s.tables[t]) for t in RECORD_TABLES),
             str(s.total)] for s in status.shards]
    rows.append(["all", str(sum(s.users for s in status.shards)),
                 *(str(sum(s.tables[t] for s in status.shards)) for t in RECORD_TABLES),
                 str(sum(s.total for s in status.shards))])
    if any(s.epoch is not None for s in status.shards):  # shards served by Redis workers
        header.append("epoch")
        for row, s in zip(rows, status.shards):
            row.append("-" if s.epoch is None else str(s.epoch))
        rows[-1].append("")
    out += ["", f"per shard (of {len(status.shards)}, by DID)"]
    out += ["  " + s for s in _table(header, rows, set(range(1, len(header))))]
    out += ["", "counts            " + ("exact" if not status.filling else
                                       "being filled: " + ", ".join(status.filling)
                                       + " (pipeline db upgrade completes them)")]
    out += ["", "most liked posts"]
    out += ["  " + s for s in _table(
        ["likes", "reposts", "replies", "uri"],
        [[str(p.likes), str(p.reposts), str(p.replies), p.uri] for p in status.top_posts],
        {0, 1, 2})] if status.top_posts else ["  (none)"]
    out += ["", "most followed users"]
    out += ["  " + s for s in _table(
        ["followers", "follows", "posts", "did", "handle"],
        [[str(u.followers), str(u.follows), str(u.posts), u.did, u.handle or "-"]
         for u in status.top_users], {0, 1, 2})] if status.top_users else ["  (none)"]
    return "\n".join(out)


@click.command("status")
@opt("--shards", type=click.IntRange(min=1, max=1024), default=4, show_default=True,
     help="Shard count to group users and records by (as given to run).")
@opt("--top", type=click.IntRange(min=0), default=5, show_default=True,
     help="How many of the most liked posts and most followed users to show.")
@opt("--json", "as_json", is_flag=True, default=False, help="Print the figures as JSON.")
@database_options
@common_options
def status(shards: int, top: int, as_json: bool, dsn: str | None, data_dir: str,
           log_level: str) -> None:
    """Cursors and lag, incomplete users and dead letters by reason, profiles, rows per shard
    (and the epoch of each shard a Redis worker took over), the most liked posts and most
    followed users."""
    setup_logging(log_level)
    dsn = resolve_dsn(dsn, data_dir)
    conn = open_database(dsn)
    try:
        figures = collect(conn, shards, server_label(conn, dsn), top)
    except psycopg.Error as exc:
        fail(f"database error: {_short(exc)}", RET_DATABASE)
    finally:
        conn.close()
    if as_json:
        import orjson

        click.echo(orjson.dumps(figures.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render(figures))


# ----- dead letters ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DeadLetter:
    """One row of dead_letters, raw bytes and all."""

    id: int
    source: str
    position: int
    error: str
    created_at: datetime
    raw: bytes


@dataclass
class RetryResult:
    """What a retry did: `committed` left dead_letters, `still_bad` stayed (maybe re-reasoned)."""

    retried: int = 0
    committed: int = 0
    still_bad: int = 0
    users_created: int = 0
    users_fallback: int = 0
    gone: int = 0  # deleted by someone else meanwhile


def preview(raw: bytes, chars: int = RAW_PREVIEW_CHARS) -> str:
    """The start of a raw line, safe for a terminal: bad UTF-8 and control characters escaped."""
    text = raw[:chars * 4].decode("utf-8", errors="backslashreplace")
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
    return safe[:chars] + ("..." if len(safe) > chars or len(raw) > chars * 4 else "")


_SELECT = "SELECT id, source, position, error, created_at, raw FROM dead_letters"


def _source_filter(source: str | None) -> tuple[str, tuple[Any, ...]]:
    """A source given with or without its `#fingerprint`."""
    if source is None:
        return "", ()
    return " WHERE (source = %s OR starts_with(source, %s))", (source, source + "#")


def fetch(conn: psycopg.Connection, source: str | None, limit: int) -> tuple[list[DeadLetter], int]:
    """The oldest dead letters in source order, and how many match in all."""
    where, params = _source_filter(source)
    total = conn.execute(f"SELECT count(*) FROM dead_letters{where}", params).fetchone()[0]
    lim = f" LIMIT {int(limit)}" if limit else ""
    rows = conn.execute(f"{_SELECT}{where} ORDER BY source, position, id{lim}", params).fetchall()
    return [DeadLetter(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows], total


def resolve_users(directory: Any, dids: list[str], slots: int,
                  timeout: float) -> dict[str, tuple[Any, ...]]:
    """Users rows for new authors, each resolution bounded by `timeout`, with no DB connection.

    The shards' own UserCreations does the work, so the fallback (DID as handle, incomplete)
    and the partial answer (claimed handle, unverified) are exactly those of a run."""
    from shards.users import UserCreations

    wake = threading.Event()
    creations = UserCreations(directory, max(1, min(slots, len(dids))), timeout, wake.set,
                              lambda _ident: None)  # late answers: the refresher's job
    started = time.monotonic()
    for did in dids:
        creations.begin(did, started)
    rows: dict[str, tuple[Any, ...]] = {}
    while creations.pending:
        wake.clear()
        for pending, user in creations.settle_due(time.monotonic()):
            rows[pending.did] = user.row()
        if creations.pending:
            deadline = creations.next_deadline()
            wake.wait(0.5 if deadline is None else max(0.0, deadline - time.monotonic()))
    return rows


def retry_letters(dsn: str, letters: list[DeadLetter], directory_factory: Callable[[], Any],
                  slots: int, timeout: float) -> RetryResult:
    """Feeds dead letters through decode and write again; whatever still fails stays put.

    Firehose frames are verified again with their author's key, fetched afresh (before any
    database connection is opened); frames and Jetstream commits keep to their repository's rev
    as in a run."""
    from shards.events import BadEvent, decode
    from shards.frames import KEY_UNAVAILABLE, FrameEvent, Frames
    from shards.frames import decode as decode_frame
    from shards.identity import IdentityError
    from shards.store.writes import Changes, Writer, prepare_connection, repo_states

    result = RetryResult(retried=len(letters))
    good: list[tuple[DeadLetter, Any]] = []
    reasons: list[tuple[str, int]] = []
    for letter in letters:
        try:
            read = decode_frame if letter.raw[:1] >= b"\x80" else decode
            good.append((letter, read(letter.raw, 0, 0, letter.position)))
        except BadEvent as exc:
            result.still_bad += 1
            if str(exc) != letter.error:
                reasons.append((str(exc), letter.id))
    good = [(letter, ev) for letter, ev in good if ev.did]
    authors = sorted({ev.did for _, ev in good})
    with psycopg.connect(dsn, application_name="pipeline") as conn:
        if reasons:
            conn.cursor().executemany("UPDATE dead_letters SET error = %s WHERE id = %s", reasons)
        known = {r[0] for r in conn.execute(
            "SELECT did FROM users WHERE did = ANY(%s)", (authors,))} if authors else set()
    missing = [d for d in authors if d not in known]
    directory = directory_factory()
    new_users = resolve_users(directory, missing, slots, timeout) if missing else {}
    frames = Frames(verify=True)
    keyed = sorted({ev.did for _, ev in good if isinstance(ev, FrameEvent) and ev.needs_key})
    keys = {}
    for did in keyed:
        try:
            keys[did] = frames.key(directory.resolve_did(did))
        except IdentityError:
            keys[did] = None
    revised = sorted({*keyed, *(ev.did for _, ev in good if ev.rev is not None)})
    with psycopg.connect(dsn, application_name="pipeline") as conn:
        prepare_connection(conn)
        if revised:
            frames.load(repo_states(conn, revised))
            conn.commit()
        for letter, ev in good:
            changes = Changes()
            user = new_users.get(ev.did)
            if user is not None:
                changes.users.append(user)
            if isinstance(ev, FrameEvent):
                failed = (KEY_UNAVAILABLE if ev.needs_key and keys.get(ev.did) is None
                          else frames.check(ev, keys.get(ev.did)))
                if failed is not None:
                    result.still_bad += 1
                    conn.execute("UPDATE dead_letters SET error = %s WHERE id = %s",
                                 (failed, letter.id))
                    conn.commit()
                    continue
                if frames.admit(ev) is None:  # else its rev is applied already: nothing to write
                    for op in ev.events:
                        changes.add(op)
                    if ev.rev is not None:
                        changes.revs[ev.did] = ev.rev
            elif ev.rev is None or frames.admit_event(ev) is None:
                changes.add(ev)
            try:
                with conn.transaction():
                    # Claim the row first: a concurrent retry that got here earlier wins.
                    if conn.execute("DELETE FROM dead_letters WHERE id = %s",
                                    (letter.id,)).rowcount == 0:
                        result.gone += 1
                        continue
                    Writer().write(conn, changes)
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                result.still_bad += 1
                reason = f"rejected by database: {str(exc).strip().splitlines()[0]}"
                conn.execute("UPDATE dead_letters SET error = %s WHERE id = %s", (reason, letter.id))
                conn.commit()
                continue
            result.committed += 1
            if user is not None:  # written with this event: later ones of the DID need not
                del new_users[ev.did]
                result.users_created += 1
                result.users_fallback += user[1] == user[0]
    return result


@click.command("dead-letters")
@opt("--source", default=None, metavar="NAME",
     help="Only this source (a cursor name, e.g. replay:/abs/path#fingerprint; the #fingerprint "
          "may be left out).")
@opt("--limit", type=click.IntRange(min=0), default=100, show_default=True,
     help="At most this many, oldest first in source order (0: all).")
@opt("--retry", is_flag=True, default=False,
     help="Feed them through again: those that now decode and commit leave the table.")
@identity_options
@database_options
@common_options
def dead_letters(source: str | None, limit: int, retry: bool, resolve_timeout: float,
                 max_user_creations: int, plc_url: str, dns_server: str | None,
                 allow_private_addresses: bool, dsn: str | None, data_dir: str,
                 log_level: str) -> None:
    """List dead letters, or retry them after a fix (a code change or a repaired line)."""
    setup_logging(log_level)
    dsn = resolve_dsn(dsn, data_dir)
    # Checked before any work, so a bad --plc-url is a usage error, not a half-done retry.
    config = identity_config(plc_url, dns_server, allow_private_addresses, resolve_timeout) \
        if retry else None
    conn = open_database(dsn)
    try:
        letters, total = fetch(conn, source, limit)
    except psycopg.Error as exc:
        fail(f"database error: {_short(exc)}", RET_DATABASE)
    finally:
        conn.close()
    more = total - len(letters)
    if not retry:
        for d in letters:
            click.echo(f"#{d.id}  {d.source}  @{d.position}  "
                       f"{d.created_at.isoformat(timespec='seconds')}  {preview(d.error.encode(), 200)}")
            click.echo(f"    {preview(d.raw)}")
        click.echo(f"{len(letters)} dead letters shown" + (f", {more} more (raise --limit)" if more else ""))
        return
    from shards.identity import build_directory

    # PDS answers and refused repositories are no stream lines: asked for again on their own.
    kept = [d for d in letters if d.source.startswith(NOT_LINES)]
    letters = [d for d in letters if not d.source.startswith(NOT_LINES)]
    try:
        result = retry_letters(dsn, letters, lambda: build_directory(config), max_user_creations,
                               resolve_timeout)
    except psycopg.Error as exc:
        fail(f"database error: {_short(exc)}", RET_DATABASE)
    click.echo(f"retried {result.retried}: {result.committed} committed, "
               f"{result.still_bad} still bad"
               + (f", {result.gone} already gone" if result.gone else "")
               + f"; {result.users_created} users created"
               + (f" ({result.users_fallback} with the DID as handle)" if result.users_fallback else "")
               + (f"; {more} more not retried (raise --limit)" if more else "")
               + (f"; {len(kept)} left alone (PDS answers and refused repositories, asked for"
                  " again by the refresher and by pipeline backfill)" if kept else ""))

