"""`--backfill-new-users` in a shard worker: the repository of each user the database had never
seen is fetched and verified on background threads, and handed back to the worker's loop, which
writes it between two of its own transactions, so it falls in order with the user's live events.

The loop keeps, per DID waiting for its repository, the newest rev of the live commits it has
written: a snapshot older than those is fetched again (a few times at most), since writing it
would take the records back in time. Once a snapshot is written, live commits of that DID with a
rev not newer than its own are skipped (shards/frames.py keeps each repository's rev): the
snapshot holds them already."""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

from shards.backfill import FAILED, SKIPPED, Backfill, Outcome
from shards.firehose.verify import Repo
from shards.identity.directory import Identity
from shards.identity.metrics import Counters
from shards.store.fence import StaleEpoch

log = logging.getLogger("pipeline.backfill")

FETCHES = 3  # snapshots fetched for one DID while live commits keep being newer
MAX_WAITING = 100_000  # DIDs waiting for their repository, per worker; more are counted, dropped

Fetched = tuple[Identity, Repo, int] | Outcome


class NewRepos:
    """Thread-safe `offer`; everything else is the worker loop's. A refusal kept in
    dead_letters that finds the worker's shard taken over leaves the StaleEpoch in `fenced`
    for the worker to stop on."""

    def __init__(self, backfill: Backfill, concurrency: int, counters: Counters) -> None:
        self._backfill = backfill
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="backfill")
        self._ready: queue.SimpleQueue[tuple[str, Fetched]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._counters = counters
        self.fenced: StaleEpoch | None = None
        self.waiting: dict[str, int] = {}  # DID -> snapshots fetched so far
        self.live_revs: dict[str, str] = {}  # DID waiting -> newest live rev written

    def offer(self, did: str) -> None:
        """A user the database had never seen: its repository is fetched in the background."""
        if did in self.waiting:
            return
        if len(self.waiting) >= MAX_WAITING:
            self._counters.inc("backfill.dropped")
            return
        self.waiting[did] = 0
        self._fetch(did)

    def _fetch(self, did: str) -> None:
        self.waiting[did] += 1
        self._threads.submit(self._load, did)

    def _load(self, did: str) -> None:
        try:
            got: Fetched = self._backfill.fetch_verified(did, self._stop)
        except StaleEpoch as exc:
            self.fenced = exc
            return
        except Exception as exc:  # a bug, not an answer: counted as a failure, never lost
            log.exception("backfill of %s failed", did)
            got = Outcome(did, FAILED, reason=str(exc))
        self._ready.put((did, got))

    def stop(self) -> None:
        """Repositories not yet written are dropped (their users are not backfilled)."""
        self._stop.set()
        self._threads.shutdown(wait=False, cancel_futures=True)

    def live(self, did: str, rev: str) -> None:
        """A live commit about to be written: noted when its DID waits for its repository."""
        if did in self.waiting and rev > self.live_revs.get(did, ""):
            self.live_revs[did] = rev

    def ready(self) -> list[tuple[str, Fetched]]:
        """Fetched repositories to write now, with whatever failed (counted here)."""
        out = []
        while not self._ready.empty():
            did, got = self._ready.get()
            if isinstance(got, Outcome):
                self._done(did, got.result)
                continue
            live = self.live_revs.get(did)
            if live is not None and live > got[1].rev:  # older than what the stream wrote
                if self.waiting[did] < FETCHES:
                    self._fetch(did)
                else:
                    self._done(did, SKIPPED)
                continue
            out.append((did, got))
        return out

    def written(self, did: str, outcome: Outcome) -> None:
        """The worker wrote (or skipped) a snapshot."""
        self._done(did, outcome.result)

    def _done(self, did: str, result: str) -> None:
        self.waiting.pop(did, None)
        self.live_revs.pop(did, None)
        self._counters.inc(f"backfill.{result}")
