"""The shard epoch against a real PostgreSQL: a take-over waits for the transaction in flight,
and every later transaction of the worker it replaced rolls back with nothing written."""
from __future__ import annotations

import threading

import orjson
import psycopg
import pytest

from shards.backfill import Backfill
from shards.events import decode
from shards.firehose.verify import read_repo
from shards.identity.directory import Identity
from shards.identity.metrics import Counters
from shards.identity.mock import MockDirectory
from shards.identity.testing import local_config
from shards.new_repos import NewRepos
from shards.pds.client import PdsClient
from shards.pds.config import PdsConfig
from shards.profiles import ProfileFetcher
from shards.refresher import Refresher
from shards.store.fence import Fence, StaleEpoch, take_over
from shards.store.migrations import upgrade
from shards.store.pool import open_pool
from shards.store.writes import Changes, Writer, prepare_connection
from tests.conftest import query, wait_until
from tests.firehose_corpus import REPO_DID, recovered_keys
from tests.test_backfill import CAR, forged
from tools.fake_pds import FakePDS

DID = "did:plc:" + "f" * 24


def _like(rkey: str, operation: str = "create") -> Changes:
    commit = {"rev": "r", "operation": operation, "collection": "app.bsky.feed.like",
              "rkey": rkey}
    if operation == "create":
        commit |= {"cid": f"bafy{rkey}", "record": {
            "subject": {"uri": "at://did:plc:x/app.bsky.feed.post/1", "cid": "c"}}}
    changes = Changes()
    changes.add(decode(orjson.dumps({"did": DID, "time_us": 1, "kind": "commit",
                                     "commit": commit}), 0, 0, 0))
    return changes


def _likes(dsn: str) -> list[str]:
    return [r[0].rsplit("/", 1)[1] for r in query(dsn, "SELECT uri FROM likes ORDER BY uri")]


@pytest.fixture
def conn(dsn: str) -> psycopg.Connection:
    with psycopg.connect(dsn, application_name="fence-old") as c:
        upgrade(c)
        c.commit()
        prepare_connection(c)
        yield c


def test_epochs_only_grow_per_shard(dsn: str, conn: psycopg.Connection) -> None:
    assert [take_over(conn, 3, f"w{i}").epoch for i in range(3)] == [1, 2, 3]
    assert take_over(conn, 0, "other").epoch == 1
    assert query(dsn, "SELECT shard, epoch, holder FROM shard_epochs ORDER BY shard") == [
        (0, 1, "other"), (3, 3, "w2")]


def test_a_stale_writer_commits_nothing(dsn: str, conn: psycopg.Connection) -> None:
    old = take_over(conn, 0, "old")
    Writer(old).write(conn, _like("a"))
    new = take_over(conn, 0, "new")
    with pytest.raises(StaleEpoch, match=r"shard 0 was taken over .*epoch 2; this worker's is 1"):
        Writer(old).write(conn, _like("a", "delete"))
    with pytest.raises(StaleEpoch):
        Writer(old).write(conn, _like("b"))
    assert _likes(dsn) == ["a"]
    Writer(new).write(conn, _like("a", "delete"))
    assert _likes(dsn) == []


def test_a_take_over_waits_for_the_transaction_in_flight(dsn: str,
                                                         conn: psycopg.Connection) -> None:
    """The old worker's transaction began under its epoch: it commits, and the raise waits for
    it; the old worker's next transaction sees the new epoch."""
    old = take_over(conn, 0, "old")
    in_flight = conn.transaction()
    in_flight.__enter__()
    with conn.cursor() as cur:
        old.check(cur)
        cur.execute("INSERT INTO cursors (name, cursor) VALUES ('in flight', 1)")
    raised: list[Fence] = []
    with psycopg.connect(dsn, application_name="fence-new") as successor:
        thread = threading.Thread(target=lambda: raised.append(take_over(successor, 0, "new")))
        thread.start()
        wait_until(lambda: query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type"
                                      " = 'Lock' AND application_name = 'fence-new'")[0][0] == 1,
                   timeout=30)
        assert not raised
        in_flight.__exit__(None, None, None)  # commits
        thread.join(timeout=30)
    assert [f.epoch for f in raised] == [2]
    assert query(dsn, "SELECT cursor FROM cursors WHERE name = 'in flight'") == [(1,)]
    with pytest.raises(StaleEpoch):
        Writer(old).write(conn, _like("late"))
    assert _likes(dsn) == []


def test_the_refresher_of_a_replaced_worker_writes_nothing_and_says_so(dsn: str) -> None:
    directory = MockDirectory([Identity(DID, "f.test", True)])
    with psycopg.connect(dsn) as c:
        upgrade(c)
        c.execute("INSERT INTO users (did, handle) VALUES (%s, %s)", (DID, DID))
        old = take_over(c, 0, "old")
        take_over(c, 0, "new")
    with open_pool(dsn, 2, "fence-refresher") as pool:
        refresher = Refresher(pool, directory, fence=old, interval=0.05)
        with pytest.raises(StaleEpoch):
            refresher.run_pass(due_only=False)
        refresher.offer(Identity(DID, "f.test", True))
        refresher.start()  # the background loop stops on it and leaves it for the worker
        wait_until(lambda: refresher.fenced is not None, timeout=30)
        refresher.stop()
    assert query(dsn, "SELECT handle, incomplete FROM users") == [(DID, True)]


def _replaced(dsn: str) -> Fence:
    """The fence of a worker that shard 0 was then taken over from."""
    with psycopg.connect(dsn) as c:
        upgrade(c)
        old = take_over(c, 0, "old")
        take_over(c, 0, "new")
    return old


def test_the_profile_fetcher_of_a_replaced_worker_writes_nothing_and_says_so(dsn: str) -> None:
    old = _replaced(dsn)
    profile = {"$type": "app.bsky.actor.profile", "displayName": "fetched"}
    with FakePDS({DID: profile}) as pds, open_pool(dsn, 2, "fence-profiles") as pool:
        query(dsn, "INSERT INTO users (did, handle, pds) VALUES (%s, %s, %s) RETURNING did",
              (DID, DID, pds.url))
        client = PdsClient(local_config(), PdsConfig(rate=0))
        profiles = ProfileFetcher(pool, client, 0, 1, poll=0.05, fence=old)
        profiles.start()
        wait_until(lambda: profiles.fenced is not None, timeout=30)  # asked, then refused
        profiles.stop()
        assert pds.requests_for(DID) >= 1
    assert query(dsn, "SELECT display_name, profile_source FROM users") == [(None, None)]


def test_repository_writes_of_a_replaced_worker_commit_nothing(dsn: str) -> None:
    """`--backfill-new-users`: the snapshot written by the worker's loop, and a refusal kept in
    dead_letters by its background threads, both check the epoch first."""
    old = _replaced(dsn)
    key = recovered_keys(CAR)[0]
    with FakePDS({}, {REPO_DID: forged()}) as pds, open_pool(dsn, 2, "fence-backfill") as pool:
        ident = Identity(REPO_DID, "repo.test", True, pds.url, verification_methods=(
            {"id": f"{REPO_DID}#atproto", "type": "Multikey", "controller": REPO_DID,
             "publicKeyMultibase": key.multibase()},))
        backfill = Backfill(pool, MockDirectory([ident]), PdsClient(local_config(),
                                                                    PdsConfig(rate=0)),
                            max_bytes=1 << 20, fence=old)
        with pytest.raises(StaleEpoch):
            backfill.write(ident, read_repo(CAR, REPO_DID, key), len(CAR))
        new_repos = NewRepos(backfill, 1, Counters())
        new_repos.offer(REPO_DID)  # fetched and refused (forged): its dead letter is fenced
        wait_until(lambda: new_repos.fenced is not None, timeout=30)
        new_repos.stop()
    for table in ("users", "likes", "repo_revs", "dead_letters"):
        assert query(dsn, f"SELECT count(*) FROM {table}") == [(0,)], table


def test_a_worker_pool_ends_transactions_left_idle_past_the_lease(dsn: str) -> None:
    with psycopg.connect(dsn) as c:
        upgrade(c)
    with open_pool(dsn, 1, "fence-idle", idle_in_transaction=0.5) as pool:
        with pool.connection() as c:
            assert c.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("500ms",)
            c.execute("SELECT 1")  # a transaction is open, and left idle
            wait_until(lambda: query(dsn, "SELECT count(*) FROM pg_stat_activity"
                                          " WHERE application_name = 'fence-idle'")[0][0] == 0,
                       timeout=30)
            with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
                c.execute("SELECT 1")
