"""Completes users in the background: handle, PDS and verification, with backoff; and, through
its ProfileFetcher, their profiles from their PDS."""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg_pool import ConnectionPool

from common.routing import sql_shard_expr
from shards.identity.directory import (
    INVALID_HANDLE, DIDNotFound, Directory, Identity, IdentityError, ResolutionFailed,
    failure_reason,
)
from shards.profiles import ProfileFetcher, ProfileResult
from shards.store.fence import Fence, StaleEpoch
from shards.store.pool import RETRYABLE
from shards.store.writes import lock_users

log = logging.getLogger("pipeline.refresher")

FIRST_BACKOFF = 60.0
MAX_BACKOFF = 6 * 3600.0


@dataclass
class RefreshResult:
    """One pass: users looked at, completed, and still incomplete."""

    checked: int = 0
    completed: int = 0
    failed: int = 0

    def __iadd__(self, other: RefreshResult) -> RefreshResult:
        self.checked += other.checked
        self.completed += other.completed
        self.failed += other.failed
        return self


# A complete user keeps no error; an incomplete one the newest it was given, if any. A user
# whose PDS is new (found, or moved) and whose profile is not known is due for it again.
_UPDATE = (
    "UPDATE users SET handle = %(handle)s, handle_verified = %(verified)s, pds = %(pds)s,"
    " incomplete = %(incomplete)s,"
    " resolve_error = CASE WHEN %(incomplete)s THEN coalesce(%(error)s, resolve_error) END,"
    " refresh_attempts = 0, refresh_after = now(),"
    " profile_after = CASE WHEN %(pds)s::text IS NOT NULL AND pds IS DISTINCT FROM %(pds)s"
    " AND profile_source IS DISTINCT FROM 'stream' AND profile_source IS DISTINCT FROM 'pds'"
    " THEN now() ELSE profile_after END, updated_at = now() WHERE did = %(did)s"
)
_FAILED = (
    "UPDATE users SET refresh_attempts = refresh_attempts + 1, resolve_error = %s,"
    " refresh_after = now() + make_interval(secs => least(%s * power(2, refresh_attempts), %s))"
    " WHERE did = %s"
)


def _row(ident: Identity, error: str | None = None) -> dict[str, object]:
    return {"handle": ident.handle, "verified": ident.handle_verified, "pds": ident.pds,
            "incomplete": not ident.complete, "error": error, "did": ident.did}


class Refresher:
    """Per shard (or for all shards when `shard` is None): select due users, resolve, update.

    With a fence (a Redis worker's), a pass that finds its shard taken over stops the refresher
    and leaves the StaleEpoch in `fenced` for the worker to stop on."""

    def __init__(self, pool: ConnectionPool, directory: Directory, shard: int | None = None,
                 shards: int = 1, interval: float = 30.0, page: int = 200,
                 concurrency: int = 8, fence: Fence | None = None,
                 profiles: ProfileFetcher | None = None) -> None:
        self._pool = pool
        self._directory = directory
        self._where = "" if shard is None else f" AND {sql_shard_expr('did', shards)} = {int(shard)}"
        self._interval = interval
        self._page = page
        self._concurrency = concurrency
        self._fence = fence
        self.fenced: StaleEpoch | None = None
        self.profiles = profiles
        self._late: queue.SimpleQueue[Identity] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.late_offered = 0
        self.backlog = 0  # incomplete users of this shard seen due at the last pass
        self.name = "refresher" if shard is None else f"refresher-{shard}"

    def offer(self, ident: Identity) -> None:
        """A resolution that finished after its deadline: applied on the next pass."""
        self.late_offered += 1
        self._late.put(ident)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        if self.profiles is not None:
            self.profiles.start()

    def stop(self) -> None:
        self._stop.set()
        if self.profiles is not None:
            self.profiles.stop()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.run_pass(due_only=True)
            except StaleEpoch as exc:
                self.fenced = exc
                return
            except Exception:  # never let the loop die; the next pass tries again
                log.exception("%s: pass failed", self.name)

    def run_pass(self, due_only: bool = True) -> RefreshResult:
        """Applies late results, then resolves every incomplete user (due ones only, by default)."""
        self._apply_late()
        self.backlog = self._count_due()
        total = RefreshResult()
        seen: set[str] = set()
        while not self._stop.is_set():
            dids = [d for d in self._select(due_only) if d not in seen]
            if not dids:
                break
            seen.update(dids)
            total += self._refresh(dids)
        return total

    def run_profiles(self, due_only: bool = True) -> ProfileResult:
        """One pass of the profile fetcher, for `refresh-users` (after `run_pass`, which may have
        found new PDS endpoints); in the background the fetcher runs on its own thread."""
        return ProfileResult() if self.profiles is None else self.profiles.run_pass(due_only)

    def _apply_late(self) -> None:
        rows = []
        while not self._late.empty():
            rows.append(_row(self._late.get()))
        if rows:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                self._check(cur)
                lock_users(cur, (row["did"] for row in rows))
                cur.executemany(_UPDATE + " AND incomplete", rows)

    def _check(self, cur: psycopg.Cursor) -> None:
        if self._fence is not None:
            self._fence.check(cur)

    def _count_due(self) -> int:
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT count(*) FROM users WHERE incomplete{self._where}").fetchone()
        return row[0] if row else 0

    def _select(self, due_only: bool) -> list[str]:
        due = " AND refresh_after <= now()" if due_only else ""
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT did FROM users WHERE incomplete{due}{self._where}"
                f" ORDER BY refresh_after LIMIT {self._page}"
            ).fetchall()
        return [r[0] for r in rows]

    def _resolve(self, did: str) -> tuple[Identity | None, str | None]:
        """What is known of `did` now (None: nothing), and why it is not complete, if it is not."""
        try:
            ident = self._directory.resolve_did(did)
        except DIDNotFound:
            return Identity(did, INVALID_HANDLE), None
        except IdentityError as exc:
            return None, failure_reason(exc)
        if ident.complete:
            return ident, None
        try:
            return self._directory.verify(ident), None
        except ResolutionFailed as exc:
            # The claimed handle, unverified: tried again after a backoff.
            return ident, failure_reason(exc)

    def _refresh(self, dids: list[str]) -> RefreshResult:
        """Resolves with no connection held, then writes every outcome in one transaction."""
        for did in dids:
            self._directory.purge(did)
        with ThreadPoolExecutor(self._concurrency, thread_name_prefix=self.name) as ex:
            outcomes = list(ex.map(self._resolve, dids))
        done = [_row(ident, error) for ident, error in outcomes if ident is not None]
        failed = [(error, FIRST_BACKOFF, MAX_BACKOFF, did)
                  for did, (ident, error) in zip(dids, outcomes)
                  if ident is None or not ident.complete]
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                self._check(cur)
                lock_users(cur, dids)
                if done:
                    cur.executemany(_UPDATE, done)
                if failed:
                    cur.executemany(_FAILED, failed)
        except RETRYABLE as exc:
            log.warning("%s: could not save results: %s", self.name, exc)
        return RefreshResult(len(dids), len(dids) - len(failed), len(failed))
