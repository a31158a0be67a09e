"""What a repository held before the stream was followed: its CAR from the user's PDS
(getRepo), verified whole, its records written as the stream's events would write them.

A repository that fails any check (the commit's hash, DID and signature with the DID
document's `#atproto` key, every block's hash, the tree from the commit's `data`) is refused
whole: nothing of it is written, and it is kept in `dead_letters`. One that is written records
its rev in `repo_revs`; a snapshot older than the rev already there is skipped, so a backfill
never takes a repository back in time, and running one twice changes nothing."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import psycopg
from psycopg_pool import ConnectionPool

from shards.events import Event
from shards.firehose.errors import VerificationError
from shards.firehose.keys import SigningKey, signing_key
from shards.firehose.verify import Repo, read_repo
from shards.identity.directory import (
    DIDNotFound, Directory, Identity, IdentityError, ResolutionFailed, failure_reason,
)
from shards.pds.client import ABSENT, BAD, FOUND, LATER, EndpointRefused, PdsClient
from shards.store.fence import Fence
from shards.store.pool import RETRYABLE
from shards.store.writes import DEAD_LETTER, Changes, Writer, existing_users

log = logging.getLogger("pipeline.backfill")

DONE, SKIPPED, REFUSED, FAILED = "done", "skipped", "refused", "failed"
ATTEMPTS = 4  # requests for one repository (429s and failures), the first included
DEAD_RAW_BYTES = 64 * 1024  # what a refused repository's dead letter keeps of its CAR
SOURCE = "backfill"  # dead letters' source: backfill:<did>


@dataclass(frozen=True)
class Outcome:
    """What became of one repository: done (written), skipped (a newer rev was there already),
    refused (a check failed, or too large: a dead letter), failed (could not be fetched)."""

    did: str
    result: str
    records: int = 0
    size: int = 0
    rev: str | None = None
    reason: str = ""


class Backfill:
    """Fetches, verifies and writes repositories; thread-safe (one call per repository).

    With a fence (a Redis worker's), every write transaction first checks the shard's epoch and
    raises StaleEpoch once another worker took the shard over."""

    def __init__(self, pool: ConnectionPool, directory: Directory, client: PdsClient, *,
                 max_bytes: int, collections: set[str] | None = None,
                 fence: Fence | None = None) -> None:
        self._pool = pool
        self._fence = fence
        self._directory = directory
        self._client = client
        self._max_bytes = max_bytes
        self._collections = collections

    def repository(self, did: str, stop: threading.Event | None = None) -> Outcome:
        """Backfills one repository; never raises for what the network or the data did."""
        got = self.fetch_verified(did, stop)
        return got if isinstance(got, Outcome) else self.write(*got)

    def fetch_verified(self, did: str, stop: threading.Event | None = None,
                       ) -> tuple[Identity, Repo, int] | Outcome:
        """The identity, the verified repository and its size in bytes; or why not (a refusal
        is kept in dead_letters already)."""
        try:
            ident = self._directory.resolve_did(did)
        except DIDNotFound as exc:
            return Outcome(did, FAILED, reason=f"identity: {exc}")
        except IdentityError as exc:
            return Outcome(did, FAILED, reason=f"identity: {exc}")
        if ident.pds is None:
            return Outcome(did, FAILED, reason="identity: the DID document names no PDS")
        try:
            base, host = self._client.origin(ident.pds)
        except EndpointRefused as exc:
            return Outcome(did, FAILED, reason=str(exc))
        fetched = self._fetch(did, base, host, stop)
        if isinstance(fetched, Outcome):
            return fetched
        try:
            repo = self._verify(fetched, ident)
        except VerificationError as exc:
            return self._refuse(did, fetched, str(exc))
        return ident, repo, len(fetched)

    def _fetch(self, did: str, base: str, host: str,
               stop: threading.Event | None) -> bytes | Outcome:
        """The CAR, asking again after a 429 (once the host's pause is over) or a failure."""
        answer = None
        for attempt in range(ATTEMPTS):
            if not self._client.limits.acquire(host, stop):
                return Outcome(did, FAILED, reason="stopped")
            try:
                answer = self._client.repo(did, base, host, self._max_bytes)
            finally:
                self._client.limits.leave(host)
            if answer.result == FOUND:
                return answer.raw
            if answer.result == BAD:  # over --max-repo-bytes
                return self._refuse(did, b"", f"size: repository {answer.detail}")
            if answer.result == ABSENT:
                return Outcome(did, FAILED, reason=f"not on its PDS ({answer.detail})")
            if answer.result != LATER and attempt + 1 < ATTEMPTS:
                if (stop or threading.Event()).wait(2 ** attempt):  # back off: 1, 2, 4 s
                    break
        return Outcome(did, FAILED, reason=answer.detail if answer else "stopped")

    def _verify(self, car: bytes, ident: Identity) -> Repo:
        """read_repo with the document's key; a signature that does not verify is tried once
        more with the document fetched again (keys rotate)."""
        try:
            return read_repo(car, ident.did, _key(ident), self._collections)
        except VerificationError as exc:
            if exc.check not in ("signature", "key"):
                raise
            self._directory.purge(ident.did)
            try:
                fresh = self._directory.resolve_did(ident.did)
            except IdentityError:
                raise exc from None
            return read_repo(car, ident.did, _key(fresh), self._collections)

    def _refuse(self, did: str, car: bytes, reason: str) -> Outcome:
        log.warning("repository of %s refused: %s", did, reason)
        raw = car[:DEAD_RAW_BYTES] or did.encode()
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                self._check(cur)
                cur.execute(DEAD_LETTER, (f"{SOURCE}:{did}", 0, raw, reason))
        except RETRYABLE as exc:
            log.warning("could not keep the refusal of %s: %s", did, exc)
        return Outcome(did, REFUSED, size=len(car), reason=reason)

    def write(self, ident: Identity, repo: Repo, size: int) -> Outcome:
        """One transaction: the user (when new), every record, the rev; unless a newer rev is
        there already. A new user's handle is checked before, with no connection held."""
        did = ident.did
        changes = Changes()
        add_records(changes, repo)
        changes.revs[did] = repo.rev
        try:
            with self._pool.connection() as conn:
                new = not existing_users(conn, [did])
            if new:  # a user written meanwhile stays as it is (the merge does nothing)
                changes.users.append(self._user_row(ident))
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                self._check(cur)
                row = cur.execute("SELECT rev FROM repo_revs WHERE did = %s FOR UPDATE",
                                  (did,)).fetchone()
                if row is not None and row[0] > repo.rev:
                    return Outcome(did, SKIPPED, size=size, rev=repo.rev,
                                   reason=f"rev {row[0]} is newer than the snapshot's")
                Writer().write(conn, changes)  # a savepoint: the check above holds for it
        except RETRYABLE as exc:
            return Outcome(did, FAILED, size=size, reason=f"database: {exc}")
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return self._refuse(did, b"", f"rejected by database: {first}")
        return Outcome(did, DONE, len(repo.records), size, repo.rev)

    def _check(self, cur: psycopg.Cursor) -> None:
        if self._fence is not None:
            self._fence.check(cur)

    def _user_row(self, ident: Identity) -> tuple[object, ...]:
        """The users row of a DID the database has not seen: its handle verified if possible."""
        error = None
        if not ident.complete:
            try:
                ident = self._directory.verify(ident)
            except ResolutionFailed as exc:  # the claimed handle, unverified: retried later
                error = failure_reason(exc)
        return (ident.did, ident.handle, not ident.complete, ident.handle_verified, ident.pds,
                error)


def add_records(changes: Changes, repo: Repo) -> None:
    """A repository's records as the creates the stream would have brought."""
    for i, (collection, rkey, cid, record) in enumerate(repo.records):
        changes.add(Event(0, i, 0, b"", repo.did, "commit", "create", collection, rkey, cid,
                          record))


def _key(ident: Identity) -> SigningKey:
    """The `#atproto` key of an identity's document; raises VerificationError("key")."""
    return signing_key({"id": ident.did, "verificationMethod": list(ident.verification_methods)})
