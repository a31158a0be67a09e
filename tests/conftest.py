"""Fixtures: a real PostgreSQL (embedded, or TEST_DSN), a fresh database per test, the CLI."""
from __future__ import annotations

import os
import random
import subprocess
import time
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import psutil
import psycopg
import pytest

from tools.fake_dns import FakeDNS
from tools.fake_plc import FakePLC

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """TEST_DSN names a server to use; otherwise an embedded one lives for the session."""
    if os.environ.get("TEST_DSN"):
        yield os.environ["TEST_DSN"]
        return
    from pipeline import embedded

    with tempfile.TemporaryDirectory(prefix="pipeline-test-pg-") as d:
        dsn = embedded.start(d)
        try:
            yield dsn
        finally:  # before its directory goes: a server left on a removed one lingers a minute
            embedded.stop(dsn)


@contextmanager
def database(server_dsn: str, name: str) -> Iterator[str]:
    """A new empty database on the server, dropped afterwards; yields its DSN."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    info = psycopg.conninfo.conninfo_to_dict(server_dsn)
    info["dbname"] = name
    yield psycopg.conninfo.make_conninfo(**info)
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def dsn(server_dsn: str) -> Iterator[str]:
    """A new empty database for one test, dropped afterwards."""
    with database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as d:
        yield d


def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def run_pipeline(*args: str, timeout: float = 240, env: dict[str, str] | None = None,
                 **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Runs the real command line to its end."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    full_env.update(env or {})
    return subprocess.run(pipeline_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=ROOT, **kwargs)


def start_pipeline(*args: str, env: dict[str, str] | None = None,
                   **kwargs: object) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    full_env.update(env or {})
    return subprocess.Popen(pipeline_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env, cwd=ROOT, **kwargs)


def query(dsn: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def like(did: str, rkey: str) -> bytes:
    """A Jetstream line: `did` likes a post."""
    return orjson.dumps({"did": did, "time_us": 1_700_000_000_000_000, "kind": "commit", "commit": {
        "rev": "3l3qo2vutsw2b", "operation": "create", "collection": "app.bsky.feed.like",
        "rkey": rkey, "cid": "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a",
        "record": {"$type": "app.bsky.feed.like", "createdAt": "2024-09-09T19:46:02.102Z",
                   "subject": {"uri": "at://did:plc:x/app.bsky.feed.post/1", "cid": "bafy"}}}})


def wait_until(predicate, timeout: float = 60.0, every: float = 0.05) -> None:
    """Polls until `predicate()` holds; fails the test when the deadline passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


def workers(proc: psutil.Process) -> list[psutil.Process]:
    """The shard workers of a local run: children of the supervisor's fork server."""
    return [w for c in proc.children() if "forkserver" in " ".join(c.cmdline())
            for w in c.children()]


def kill_workers_midway(proc: subprocess.Popen, dsn: str, kills: int, rows_between: int,
                        seed: int) -> None:
    """Kills a shard worker (SIGKILL) each time `rows_between` more rows are committed, each
    after the one killed before was restarted."""
    rng, parent = random.Random(seed), psutil.Process(proc.pid)
    for kill in range(kills):
        wait_until(lambda: rows_committed(dsn) > (kill + 1) * rows_between)
        live = {w.pid for w in workers(parent)}
        victim = rng.choice(sorted(live))
        psutil.Process(victim).kill()
        wait_until(lambda: (now := {w.pid for w in workers(parent)}) and victim not in now
                   and len(now) == len(live))


def rows_committed(dsn: str) -> int:
    """Rows in the likes and posts tables (0 before the schema exists), to watch progress."""
    try:
        return query(dsn, "SELECT (SELECT count(*) FROM likes) + (SELECT count(*) FROM posts)")[0][0]
    except psycopg.Error:
        return 0


@pytest.fixture(scope="module")
def gate(replay_file: Path) -> tuple[str, int]:
    """The author who appears last in the module's replay, and the byte offset of its first
    event: while the PLC stub holds it, a run cannot end and its cursor cannot pass that offset."""
    first: dict[str, int] = {}
    offset = 0
    with open(replay_file, "rb") as f:
        for line in f:
            try:
                first.setdefault(orjson.loads(line)["did"], offset)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                pass  # the bad lines some tests add
            offset += len(line)
    did = max(first, key=first.__getitem__)
    return did, first[did]


@contextmanager
def held(plc: FakePLC, did: str) -> Iterator[None]:
    """Keeps a run going (one author unresolved) until the block ends, however it ends."""
    plc.hold(did)
    try:
        yield
    finally:
        plc.release(did)


# with an author held, the resolve timeout must not expire into a fallback handle meanwhile,
# nor may the end of the replay cut its wait short
WORKER_HOLD = ("--resolve-timeout", "120")  # `pipeline worker`: no end of a source to cut it
HOLD = (*WORKER_HOLD, "--end-wait", "120")


TABLES = ("users", "posts", "likes", "reposts", "follows", "blocks", "records", "dead_letters",
          "post_stats", "user_stats")
VOLATILE = {"updated_at", "created_at", "refresh_after", "refresh_attempts", "resolve_error",
            "profile_after", "profile_attempts", "id"}


def digest(dsn: str) -> dict[str, str]:
    """A digest of each table's rows, leaving out bookkeeping timestamps."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            cols = [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                " ORDER BY ordinal_position", (table,))]
            keep = ", ".join(c for c in cols if c not in VOLATILE or table not in ("users", "dead_letters"))
            row = conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
                f" FROM (SELECT {keep} FROM {table}) t").fetchone()
            out[table] = f"{row[0]}:{row[1]}"
    return out


def expected_counts(dsn: str) -> tuple[set[tuple], set[tuple]]:
    """(post_stats, user_stats) rows as counted from the record tables now."""
    posts = query(dsn, "SELECT uri, sum(l)::bigint, sum(r)::bigint, sum(p)::bigint FROM ("
                       " SELECT subject_uri, 1, 0, 0 FROM likes UNION ALL"
                       " SELECT subject_uri, 0, 1, 0 FROM reposts UNION ALL"
                       " SELECT reply_parent_uri, 0, 0, 1 FROM posts) AS t (uri, l, r, p)"
                       " WHERE uri IS NOT NULL GROUP BY uri")
    users = query(dsn, "SELECT did, sum(fr)::bigint, sum(fg)::bigint, sum(p)::bigint FROM ("
                       " SELECT subject_did, 1, 0, 0 FROM follows UNION ALL"
                       " SELECT author_did, 0, 1, 0 FROM follows UNION ALL"
                       " SELECT author_did, 0, 0, 1 FROM posts) AS t (did, fr, fg, p)"
                       " WHERE did IS NOT NULL GROUP BY did")
    return set(posts), set(users)


def assert_counts_exact(dsn: str) -> None:
    """post_stats and user_stats hold exactly what the record tables hold (no row of zeros)."""
    posts, users = expected_counts(dsn)
    got_posts = set(query(dsn, "SELECT uri, likes, reposts, replies FROM post_stats"))
    got_users = set(query(dsn, "SELECT did, followers, follows, posts FROM user_stats"))
    assert got_posts == posts, (sorted(got_posts - posts)[:5], sorted(posts - got_posts)[:5])
    assert got_users == users, (sorted(got_users - users)[:5], sorted(users - got_users)[:5])


@contextmanager
def fake_network(docs: dict[str, dict], **plc_options: object) -> Iterator[tuple[FakePLC, FakeDNS]]:
    """A PLC stub serving `docs` and a DNS server whose TXT records verify every handle."""
    dns = FakeDNS()
    for did, doc in docs.items():
        for aka in doc.get("alsoKnownAs", []):
            if aka.startswith("at://"):
                dns.add_txt(f"_atproto.{aka[5:]}", f"did={did}")
    with dns, FakePLC(docs, **plc_options) as plc:
        yield plc, dns


@pytest.fixture(scope="module")
def net(request: pytest.FixtureRequest) -> Iterator[tuple[FakePLC, FakeDNS]]:
    """PLC and DNS stubs for the generated authors of a module's DIDS and SEED."""
    from tools.generate import did_documents

    with fake_network(did_documents(request.module.DIDS, seed=request.module.SEED)) as n:
        yield n


def identity_args(plc: FakePLC, dns: FakeDNS) -> list[str]:
    return ["--plc-url", plc.url, "--dns-server", dns.address, "--allow-private-addresses"]
