"""Firehose frames in a shard: decoded into the same Events as Jetstream lines, verified with the
author's key, and kept to one newer revision per repository.

A frame's life: `decode` (no network, no database) reads it and, for a #commit, its CAR (every
block's hash checked); the worker then finds the author's signing key in its DID document
(cached by the identity layer, or resolved like a new user's identity), `Frames.check` verifies
the signature and tree proofs, and `Frames.admit` skips a revision that is not newer than the
last one applied; the worker hands the Events to the open transaction with the new revision.
Jetstream commits and repository backfills keep to the same revisions (`admit_event`,
`written`)."""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shards.events import BadEvent, Event
from shards.firehose.frames import BadFrame, parse_frame
from shards.firehose.keys import SigningKey, signing_key
from shards.firehose.verify import (
    Commit,
    Op,
    VerificationError,
    read_commit,
    read_sync,
    verify_ops,
    verify_signature,
)
from shards.identity.directory import Identity

KINDS = {"#commit": "commit", "#identity": "identity", "#account": "account"}
KEY_UNAVAILABLE = "key unavailable"
STALE = "stale rev"


class Refused(BadEvent):
    """A commit that fails a verification check already while it is read (hashes, CAR)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


@dataclass(slots=True, eq=False)
class FrameEvent:
    """One frame on its way through a shard; `events` are what it writes once applied."""

    batch: int
    idx: int
    position: int
    raw: bytes
    kind: str
    did: str | None
    seq: int | None
    time: str | None
    rev: str | None = None
    commit: Commit | None = None  # a #commit's, or a #sync's (no ops); dropped once verified
    needs_key: bool = False  # a #commit or #sync: its signature is checked with the author's key
    events: list[Event] = field(default_factory=list)
    refetched: bool = False  # its author's document was fetched again after a bad signature


def decode(raw: bytes, batch: int, idx: int, position: int) -> FrameEvent:
    """Reads a frame (and a commit's CAR); raises BadEvent with the dead-letter reason."""
    try:
        frame = parse_frame(raw)
    except BadFrame as exc:
        raise BadEvent(str(exc)) from None
    fe = FrameEvent(batch, idx, position, raw, frame.kind, frame.did, frame.seq, frame.time)
    body = frame.body
    kind = KINDS.get(frame.kind)
    if frame.kind in ("#commit", "#sync"):
        if body.get("tooBig"):
            raise BadEvent("tooBig: the relay left this commit's blocks out")
        try:
            fe.commit = (read_commit(body, checked=True) if frame.kind == "#commit"
                         else read_sync(body))
        except VerificationError as exc:
            raise Refused(exc.check, str(exc)) from None
        except BadFrame as exc:
            raise BadEvent(str(exc)) from None
        fe.rev, fe.needs_key = fe.commit.rev, True
        fe.events = [_op_event(fe, op) for op in fe.commit.ops]
    elif kind is not None:
        ev = Event(batch, idx, position, raw, frame.did or "", kind)
        if kind == "account":
            status = body.get("status")
            ev.active, ev.status = body["active"], status if isinstance(status, str) else None
        fe.events = [ev]
    return fe


def _op_event(fe: FrameEvent, op: Op) -> Event:
    """A commit's operation as the Event a Jetstream line of it would give (read_commit has
    checked its action, collection, rkey and record)."""
    return Event(fe.batch, fe.idx, fe.position, fe.raw, fe.did or "", "commit", op.action,
                 op.collection, op.rkey, op.cid, op.record)


@dataclass(slots=True)
class RepoState:
    """What a shard knows of one repository: the newest revision applied, and whether its
    account is active (commits of an inactive account are refused, as a relay does)."""

    rev: str | None
    active: bool


class Frames:
    """Per shard: signing keys already parsed, repository states, and what was skipped."""

    def __init__(self, verify: bool, capacity: int = 200_000) -> None:
        self.verify = verify
        self._capacity = capacity
        self._keys: OrderedDict[str, tuple[tuple[Any, ...], SigningKey | None]] = OrderedDict()
        self.repos: OrderedDict[str, RepoState] = OrderedDict()
        self.skipped: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()  # verification failures by check

    def missing_repos(self, dids: set[str]) -> list[str]:
        return [d for d in dids if d not in self.repos]

    def load(self, rows: list[tuple[str, str | None, bool | None]]) -> None:
        """Repository states read from the database: (did, rev, active)."""
        for did, rev, active in rows:
            self._remember(did, RepoState(rev, active is not False))

    def key(self, ident: Identity) -> SigningKey | None:
        """The `#atproto` key of the identity's document, parsed once per document."""
        methods = ident.verification_methods
        held = self._keys.get(ident.did)
        if held is not None and held[0] is methods:
            self._keys.move_to_end(ident.did)
            return held[1]
        try:
            key: SigningKey | None = signing_key(
                {"id": ident.did, "verificationMethod": list(methods)})
        except VerificationError:
            key = None
        self._keys[ident.did] = (methods, key)
        if len(self._keys) > self._capacity:
            self._keys.popitem(last=False)
        return key

    def check(self, fe: FrameEvent, key: SigningKey | None) -> str | None:
        """None when the frame may be written, else the failed check ("signature", "key", ...)."""
        if not self.verify or not fe.needs_key:
            return None
        if key is None:
            return "key"
        try:
            verify_signature(fe.commit, key)  # type: ignore[arg-type]
            verify_ops(fe.commit)  # type: ignore[arg-type]
        except VerificationError as exc:
            return str(exc)
        return None

    def admit(self, fe: FrameEvent) -> str | None:
        """Updates the repository's state for a frame about to be written; returns why it is
        skipped instead ("stale rev", "inactive account"), or None. The state of a frame with
        a rev, or of an #account, must have been loaded (`missing_repos`, `load`)."""
        if fe.kind != "#account" and fe.rev is None:
            return None
        state = self._state(fe.did or "")
        if fe.kind == "#account":
            state.active = bool(fe.events[0].active)
            return None
        if state.rev is not None and fe.rev <= state.rev:  # TIDs sort as their strings
            return STALE
        if fe.kind == "#commit" and not state.active:
            return "inactive account"
        state.rev = fe.rev
        return None

    def admit_event(self, ev: Event) -> str | None:
        """Why a Jetstream commit is skipped ("stale rev": not newer than the repository's rev, a
        backfilled snapshot's or a firehose commit's), or None; its state must have been loaded.
        Jetstream splits a commit into one event per operation, all with its rev, so the rev is
        left as it is."""
        state = self._state(ev.did)
        if state.rev is not None and ev.rev is not None and ev.rev <= state.rev:
            return STALE
        return None

    def written(self, did: str, rev: str) -> None:
        """A repository snapshot of `rev` was written (repo_revs has it, if it is newer)."""
        state = self.repos.get(did)
        if state is not None and (state.rev is None or rev > state.rev):
            state.rev = rev

    def _state(self, did: str) -> RepoState:
        state = self.repos.get(did)
        if state is None:
            state = RepoState(None, True)
            self._remember(did, state)
        else:
            self.repos.move_to_end(did)
        return state

    def _remember(self, did: str, state: RepoState) -> None:
        self.repos[did] = state
        if len(self.repos) > self._capacity:
            self.repos.popitem(last=False)


def frame_time(value: str | None) -> float | None:
    """A frame's `time` as unix seconds, None when absent or unreadable."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
