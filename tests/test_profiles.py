"""The profile fetcher against a real PostgreSQL and a PDS stub: what each answer leaves in `users`."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import orjson
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from shards.events import decode
from shards.identity.directory import Identity
from shards.identity.mock import MockDirectory
from shards.identity.testing import local_config
from shards.pds.client import PdsClient
from shards.pds.config import PdsConfig
from shards.profiles import ProfileFetcher
from shards.refresher import Refresher
from shards.store.migrations import upgrade
from shards.store.pool import open_pool
from shards.store.writes import Changes, Writer, prepare_connection
from tests.conftest import query, wait_until
from tools.fake_pds import FakePDS

A, B, C, D = ("did:plc:" + c * 24 for c in "abcd")
PROFILE = {"$type": "app.bsky.actor.profile", "displayName": "From the PDS",
           "avatar": {"$type": "blob", "ref": {"$link": "bafkreipds"}, "mimeType": "image/png",
                      "size": 1}}


@pytest.fixture
def pool(dsn: str) -> Iterator[ConnectionPool]:
    with psycopg.connect(dsn) as conn:
        upgrade(conn)
    p = open_pool(dsn, 3, "pipeline-test")
    yield p
    p.close()


def add_users(dsn: str, pds: str | None, *dids: str) -> None:
    with psycopg.connect(dsn) as conn:
        for did in dids:
            conn.execute("INSERT INTO users (did, handle, pds) VALUES (%s, %s, %s)", (did, did, pds))


def fetcher(pool: ConnectionPool, **overrides: object) -> ProfileFetcher:
    values: dict[str, object] = {"rate": 0.0}
    values.update(overrides)
    return ProfileFetcher(pool, PdsClient(local_config(total_timeout=1.0),
                                          PdsConfig(**values)))  # type: ignore[arg-type]


def profile(dsn: str, did: str) -> tuple[object, ...]:
    """display_name, avatar_cid, profile_source, profile_attempts, and seconds until asked again
    (None: never)."""
    return query(dsn, "SELECT display_name, avatar_cid, profile_source, profile_attempts,"
                      " CASE WHEN profile_after < 'infinity'"
                      " THEN extract(epoch FROM profile_after - now())::int END"
                      " FROM users WHERE did = %s", (did,))[0]


def stream_profile(dsn: str, did: str, name: str) -> None:
    """Writes a profile event for `did` the way a shard worker does."""
    line = orjson.dumps({"did": did, "time_us": 1, "kind": "commit", "commit": {
        "rev": "3l3qo2vutsw2b", "operation": "update", "collection": "app.bsky.actor.profile",
        "rkey": "self", "cid": "bafyreistream",
        "record": {"$type": "app.bsky.actor.profile", "displayName": name}}})
    changes = Changes()
    changes.add(decode(line, 0, 0, 0))
    with psycopg.connect(dsn) as conn:
        prepare_connection(conn)
        Writer().write(conn, changes)


def test_each_answer_moves_the_user_on(dsn: str, pool: ConnectionPool) -> None:
    with FakePDS({A: PROFILE}) as pds:
        pds.fail(C, 500)
        add_users(dsn, pds.url, A, B, C)
        add_users(dsn, None, D)
        result = fetcher(pool).run_pass()
    assert result.checked == 4
    assert result.results == {"found": 1, "absent": 1, "failed": 1, "no_pds": 1}
    assert profile(dsn, A)[:4] == ("From the PDS", "bafkreipds", "pds", 0)
    name, _avatar, source, attempts, ahead = profile(dsn, B)
    assert (name, source, attempts) == (None, "none", 0) and 86_300 < ahead <= 86_400
    name, _avatar, source, attempts, ahead = profile(dsn, C)
    assert (name, source, attempts) == (None, None, 1) and 50 < ahead <= 60
    # No PDS known: not asked, and not looked at again until the refresher finds one.
    assert profile(dsn, D) == (None, None, None, 0, None)


def test_no_profile_is_not_asked_again_in_a_loop(dsn: str, pool: ConnectionPool) -> None:
    with FakePDS({}) as pds:
        add_users(dsn, pds.url, A)
        f = fetcher(pool)
        for _ in range(3):
            f.run_pass()
        f.run_pass(due_only=False)  # even "everyone missing a profile" leaves it its day
        assert pds.requests_for(A) == 1
    assert profile(dsn, A)[2] == "none"


def test_a_429_is_retried_after_its_delay_and_never_taken_for_no_profile(
        dsn: str, pool: ConnectionPool) -> None:
    with FakePDS({A: PROFILE, B: PROFILE}) as pds:
        pds.fail(A, 429, times=1, retry_after=1)
        add_users(dsn, pds.url, A, B)
        result = fetcher(pool).run_pass()  # waits for users rescheduled within 30 s
        first, second = pds.seen(A)
    assert second.at - first.at >= 1.0
    assert result.results == {"found": 2, "later": 1}
    assert profile(dsn, A)[:3] == ("From the PDS", "bafkreipds", "pds")


def test_a_fetch_never_replaces_a_profile_the_stream_wrote_meanwhile(
        dsn: str, pool: ConnectionPool) -> None:
    with FakePDS({A: PROFILE}, hang_dids={A}) as pds:
        add_users(dsn, pds.url, A)
        f = fetcher(pool)
        round_done = threading.Thread(target=f.run_pass)
        round_done.start()
        assert pds.wait_for_requests(1)  # the fetch is on its way...
        stream_profile(dsn, A, "From the stream")  # ...when the stream's profile commits
        pds.release(A)
        round_done.join(timeout=10)
        assert not round_done.is_alive()
    assert profile(dsn, A)[:3] == ("From the stream", None, "stream")


def test_the_stream_replaces_a_fetched_profile(dsn: str, pool: ConnectionPool) -> None:
    with FakePDS({A: PROFILE}) as pds:
        add_users(dsn, pds.url, A)
        fetcher(pool).run_pass()
        assert profile(dsn, A)[2] == "pds"
        stream_profile(dsn, A, "From the stream")
        fetcher(pool).run_pass(due_only=False)
        assert pds.requests_for(A) == 1
    assert profile(dsn, A)[:3] == ("From the stream", None, "stream")


def test_bad_answers_are_dead_letters(dsn: str, pool: ConnectionPool) -> None:
    with FakePDS({A: {"$type": "app.bsky.feed.post", "text": "not a profile"}}) as pds:
        add_users(dsn, pds.url, A)
        fetcher(pool).run_pass()
        host = pds.url.removeprefix("http://")
    [(source, raw, error)] = query(dsn, "SELECT source, raw, error FROM dead_letters")
    assert source == f"pds:{host}" and error.startswith("profile: answer is a app.bsky.feed.post")
    assert orjson.loads(bytes(raw))["value"]["text"] == "not a profile"
    assert profile(dsn, A)[2] is None  # still missing, asked again in a day
    assert profile(dsn, A)[4] > 86_000


def test_a_pds_found_later_makes_the_profile_due(dsn: str, pool: ConnectionPool) -> None:
    with FakePDS({A: PROFILE}) as pds:
        add_users(dsn, None, A)
        f = fetcher(pool)
        f.run_pass()
        assert pds.requests_for(A) == 0
        directory = MockDirectory([Identity(A, "a.test", pds=pds.url)])
        Refresher(pool, directory, profiles=f).run_pass(due_only=False)
        assert query(dsn, "SELECT pds, incomplete FROM users WHERE did = %s", (A,)) == [
            (pds.url, False)]
        f.run_pass()
        assert pds.requests_for(A) == 1
    assert profile(dsn, A)[2] == "pds"


def test_the_background_loop_reads_due_users_and_takes_offered_ones(
        dsn: str, pool: ConnectionPool) -> None:
    with FakePDS({A: PROFILE, B: PROFILE}) as pds:
        add_users(dsn, pds.url, A)
        f = ProfileFetcher(pool, PdsClient(local_config(), PdsConfig(rate=0)), poll=3600)
        f.start()  # reads the table once now, then not for an hour
        try:
            wait_until(lambda: profile(dsn, A)[2] == "pds", timeout=10)
            add_users(dsn, pds.url, B)  # as a shard worker writes a new user...
            f.offer(B, pds.url)  # ...and hands it over
            wait_until(lambda: profile(dsn, B)[2] == "pds", timeout=10)
        finally:
            f.stop()


def test_a_hosts_rate_spaces_its_requests(dsn: str, pool: ConnectionPool) -> None:
    with FakePDS({A: PROFILE, B: PROFILE, C: PROFILE}) as pds:
        add_users(dsn, pds.url, A, B, C)
        result = fetcher(pool, rate=4.0).run_pass()  # one request every 0.25 s
        times = sorted(pds.seen(d)[0].at for d in (A, B, C))
    assert result.results == {"found": 3}
    assert times[1] - times[0] >= 0.24 and times[2] - times[1] >= 0.24
