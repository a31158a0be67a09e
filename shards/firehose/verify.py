"""Verifying what a repository signed: firehose commits (#commit, #sync) and whole repositories.

Nothing here touches the network: the caller brings the author's key (see keys.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import libipld

from shards.syntax import is_collection, is_record_key, is_tid

from . import mst
from .car import Blocks, CarBlocks, check_blocks, hashes_to, read_car
from .datamodel import cid_str, to_json
from .errors import VerificationError
from .frames import BadFrame, check_body
from .keys import SigningKey

__all__ = ["Commit", "Op", "Repo", "VerificationError", "read_commit", "read_repo", "read_sync",
           "verify_ops", "verify_signature"]

ACTIONS = ("create", "update", "delete")
REPO_VERSION = 3


@dataclass(slots=True)
class Op:
    """One record operation of a commit; the record as atproto JSON, as Jetstream serves it."""

    action: str  # create | update | delete
    collection: str
    rkey: str
    cid: str | None  # the record's CID (None for delete)
    record: dict[str, Any] | None  # None for delete
    _cid: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> str:
        return f"{self.collection}/{self.rkey}"


@dataclass(slots=True)
class Commit:
    """A decoded #commit whose blocks all hash to their CIDs; signature and tree are checked by
    verify_signature and verify_ops."""

    did: str
    rev: str
    since: str | None
    _commit: bytes = field(repr=False)
    too_big: bool
    ops: list[Op]
    _blocks: Blocks = field(default_factory=dict, repr=False, compare=False)
    _signed: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def commit_cid(self) -> str:
        return cid_str(self._commit)

    @property
    def data_cid(self) -> str | None:
        return cid_str(self._signed["data"]) if self._signed else None


@dataclass
class Repo:
    """A whole repository (getRepo CAR), verified: its records as atproto JSON, in tree order."""

    did: str
    rev: str
    data_cid: str
    commit_cid: str
    records: list[tuple[str, str, str, dict[str, Any]]]  # (collection, rkey, cid, record)


def _split_path(path: Any) -> tuple[str, str] | None:
    if not isinstance(path, str):
        return None
    collection, _, rkey = path.partition("/")
    if is_collection(collection) and is_record_key(rkey):
        return collection, rkey
    return None


def _op(raw: Any) -> Op:
    action = raw.get("action") if isinstance(raw, dict) else None
    if action not in ACTIONS:
        raise BadFrame("commit op with missing or unknown action")
    parts = _split_path(raw.get("path"))
    if parts is None:
        raise BadFrame("commit op with missing or invalid path")
    if action == "delete":
        return Op(action, parts[0], parts[1], None, None)
    cid = raw.get("cid")
    if type(cid) is not bytes:
        raise BadFrame(f"commit {action} without a cid")
    return Op(action, parts[0], parts[1], None, None, cid)


def _signed_commit(blocks: CarBlocks, cid: bytes, did: str, rev: str | None,
                   hashed: bool = False) -> dict[str, Any]:
    """The commit object under `cid`: present, hashing to it (unless all blocks were `hashed`),
    signed, naming `did` and `rev` (a valid TID, or None for any valid one)."""
    if not (cid in blocks.raw if hashed else hashes_to(cid, blocks.raw.get(cid, b""))):
        raise VerificationError("commit hash", "the commit block is missing or does not hash "
                                               "to its CID")
    signed = blocks.get(cid)
    if (not isinstance(signed, dict) or type(signed.get("data")) is not bytes
            or type(signed.get("sig")) is not bytes or not isinstance(signed.get("did"), str)):
        raise VerificationError("repo", "not a signed commit object")
    if signed.get("version") != REPO_VERSION:
        raise VerificationError("repo", f"unsupported version {signed.get('version')!r:.20}")
    if signed["did"] != did:
        raise VerificationError("repo", f"the commit is signed for {signed['did'][:200]}")
    if signed.get("rev") != rev if rev is not None else not is_tid(signed.get("rev")):
        raise VerificationError("repo", "the commit's rev is invalid or not the frame's")
    return signed


def read_commit(body: dict[str, Any], checked: bool = False) -> Commit:
    """Decodes a #commit body and checks what needs no key: the commit block hashes to
    body["commit"] and names body["repo"] and body["rev"], every block of the CAR hashes to its
    CID, every create and update has its record block. A tooBig commit comes back with
    too_big=True and no ops, unread. `checked`: parse_frame has checked the body's fields.

    Raises BadFrame (missing fields, bad ops) or VerificationError ("commit hash", "repo",
    "record hash", "tree", "car")."""
    if not checked:
        check_body("#commit", body)
    did, rev = body["repo"], body["rev"]
    if not is_tid(rev):
        raise BadFrame("commit with invalid rev")
    since = body.get("since")
    since = since if isinstance(since, str) else None
    commit_cid = body["commit"]
    if body.get("tooBig") is True:
        return Commit(did, rev, since, commit_cid, True, [])
    ops = [_op(raw) for raw in body["ops"]]
    _, raw_blocks = read_car(body["blocks"])
    check_blocks(raw_blocks, lambda cid: "commit hash" if cid == commit_cid else "record hash"
                 if any(op._cid == cid for op in ops) else "tree")
    blocks = CarBlocks(raw_blocks)
    signed = _signed_commit(blocks, commit_cid, did, rev, hashed=True)
    for op in ops:
        if op._cid is None:
            continue
        record = blocks.get(op._cid)
        if record is None:
            raise VerificationError("record hash",
                                    f"the record of {op.path} is missing from the CAR")
        if not isinstance(record, dict):
            raise BadFrame("record is not an object")
        try:
            op.cid, op.record = cid_str(op._cid), to_json(record)
        except RecursionError:
            raise BadFrame("record nested too deep") from None
    return Commit(did, rev, since, commit_cid, False, ops, blocks, signed)


def read_sync(body: dict[str, Any]) -> Commit:
    """Decodes a #sync body (a CAR holding only the signed commit) for verify_signature; raises
    BadFrame or VerificationError ("car", "commit hash", "repo")."""
    check_body("#sync", body)
    if not is_tid(body["rev"]):
        raise BadFrame("sync with invalid rev")
    roots, raw_blocks = read_car(body["blocks"])
    if not roots:
        raise VerificationError("car", "the CAR has no root")
    check_blocks(raw_blocks, lambda cid: "commit hash" if cid == roots[0] else "car")
    blocks = CarBlocks(raw_blocks)
    signed = _signed_commit(blocks, roots[0], body["did"], body["rev"], hashed=True)
    return Commit(body["did"], body["rev"], None, roots[0], False, [], blocks, signed)


def verify_signature(commit: Commit, key: SigningKey) -> None:
    """Raises VerificationError("signature") unless `key` signed the commit: a low-S signature
    over the DAG-CBOR of the commit object without its `sig`."""
    if not commit._signed:
        raise VerificationError("signature", "a tooBig commit carries nothing to verify")
    unsigned = dict(commit._signed)
    del unsigned["sig"]
    if not key.verify(libipld.encode_dag_cbor(unsigned), commit._signed["sig"]):
        raise VerificationError("signature", "does not verify with the #atproto key")


def verify_ops(commit: Commit) -> None:
    """Each create and update path leads to its CID through the CAR's tree nodes from the
    commit's `data`, and each delete's path is absent; raises VerificationError("tree")."""
    if not commit._signed:
        raise VerificationError("tree", "a tooBig commit carries no tree")
    root = commit._signed["data"]
    for op in commit.ops:
        found = mst.get(commit._blocks, root, op.path.encode())
        if found != op._cid:
            raise VerificationError(
                "tree", f"{op.path} is still in the tree" if op._cid is None
                else f"{op.path} does not lead to its CID in the signed tree")


def read_repo(car: bytes, did: str, key: SigningKey,
              collections: set[str] | None = None) -> Repo:
    """A whole repository, verified: the CAR's root is a commit that names `did` and that `key`
    signed, every block hashes to its CID, and the tree from the commit's `data` is walked whole
    and well formed. Gives exactly the records it reaches (of `collections`, when given).

    Raises VerificationError ("car", "commit hash", "repo", "signature", "tree", "record hash")."""
    roots, raw_blocks = read_car(car)
    if not roots:
        raise VerificationError("car", "the CAR has no root")
    blocks = CarBlocks(raw_blocks)
    signed = _signed_commit(blocks, roots[0], did, None)
    commit = Commit(did, signed["rev"], None, roots[0], False, [], blocks, signed)
    verify_signature(commit, key)
    records: list[tuple[str, str, str, dict[str, Any]]] = []
    roles = {roots[0]: "commit hash"}
    for path, cid in mst.walk(blocks, signed["data"]):
        parts = _split_path(path.decode("utf-8", "replace"))
        if parts is None:
            raise VerificationError("tree", f"invalid record path {path[:300]!r}")
        roles[cid] = "record hash"
        if collections is not None and parts[0] not in collections:
            continue
        record = blocks.get(cid)
        if record is None:
            raise VerificationError("record hash", f"the record of {path.decode()} is missing "
                                                   "from the CAR")
        if not isinstance(record, dict):
            raise VerificationError("car", f"{path.decode()} is not a record")
        try:
            records.append((parts[0], parts[1], cid_str(cid), to_json(record)))
        except RecursionError:
            raise VerificationError("car", f"{path.decode()} is nested too deep") from None
    check_blocks(raw_blocks, lambda cid: roles.get(cid, "tree"))
    return Repo(did, signed["rev"], cid_str(signed["data"]), cid_str(roots[0]), records)
