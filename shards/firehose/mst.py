"""The Merkle Search Tree of a repository: lookups along one path, full walks, and building.

A node is {"l": subtree or None, "e": [{"p": shared prefix length, "k": rest of the key,
"v": value CID, "t": subtree or None}]}; keys are "collection/rkey" and a key's height in the
tree is the number of leading zero bit pairs of its sha2-256."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

from .car import Blocks
from .datamodel import cid_for
from .errors import VerificationError


def height(key: bytes) -> int:
    """The layer of `key`: leading zero bits of sha256(key), two at a time."""
    digest = int.from_bytes(hashlib.sha256(key).digest(), "big")
    return (256 - digest.bit_length()) // 2


Entry = tuple[bytes, bytes, bytes | None]  # full key, value CID, right subtree


def _node(blocks: Blocks, cid: bytes) -> tuple[bytes | None, list[Entry]]:
    """(left subtree, [(key, value, right subtree)]) of a node; keys rebuilt from prefixes."""
    node = blocks.get(cid)
    if node is None:
        raise VerificationError("tree", "a tree node on the path is missing from the CAR")
    try:
        left, raw = node["l"], node["e"]
        entries = []
        key = b""
        for entry in raw:
            prefix, rest, value, right = entry["p"], entry["k"], entry["v"], entry["t"]
            if type(prefix) is not int or not 0 <= prefix <= len(key) or type(rest) is not bytes:
                raise TypeError
            if type(value) is not bytes or (right is not None and type(right) is not bytes):
                raise TypeError
            key = key[:prefix] + rest
            entries.append((key, value, right))
    except (KeyError, TypeError):
        raise VerificationError("tree", "malformed tree node") from None
    if left is not None and type(left) is not bytes:
        raise VerificationError("tree", "malformed tree node")
    return left, entries


def get(blocks: Blocks, root: bytes, key: bytes) -> bytes | None:
    """The value CID under `key`, or None when the tree proves it absent.

    Reads only the nodes along the key's path, each only up to the key, since it runs for every
    op of every commit; raises VerificationError("tree") when a node is missing or malformed.
    The blocks must have been checked against their CIDs."""
    cid: Any = root
    try:
        while cid is not None:
            node = blocks.get(cid)
            if node is None:
                raise VerificationError("tree", "a tree node on the path is missing from the CAR")
            cid = node["l"]
            entry_key = b""
            for entry in node["e"]:
                entry_key = entry_key[:entry["p"]] + entry["k"]
                if key <= entry_key:
                    if key == entry_key:
                        return entry["v"]
                    break
                cid = entry["t"]
    except (KeyError, TypeError):
        raise VerificationError("tree", "malformed tree node") from None
    return None


def walk(blocks: Blocks, root: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value CID) of the tree in key order, checking that it is well formed: every
    node present, keys strictly ascending, each key on its own layer, no empty inner node.

    Raises VerificationError("tree")."""
    left, entries = _node(blocks, root)
    if not entries:
        if left is not None:
            raise VerificationError("tree", "the root is a lone pointer to a subtree")
        return
    last = [b""]
    yield from _walk(blocks, root, height(entries[0][0]), last)


def _walk(blocks: Blocks, cid: bytes, layer: int,
          last: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    left, entries = _node(blocks, cid)
    if not entries and left is None:
        raise VerificationError("tree", "empty inner tree node")
    for subtree, entry in [(left, None)] + [(e[2], e) for e in entries]:
        if entry is not None:
            key, value, _ = entry
            if key <= last[0]:
                raise VerificationError("tree", "tree keys out of order")
            if height(key) != layer:
                raise VerificationError("tree", "a tree key on the wrong layer")
            last[0] = key
            yield key, value
        if subtree is not None:
            if layer == 0:
                raise VerificationError("tree", "a subtree below the lowest layer")
            yield from _walk(blocks, subtree, layer - 1, last)


def build(items: Mapping[bytes, bytes]) -> tuple[bytes, Blocks]:
    """The root CID and nodes of the tree holding `items` (key -> value CID)."""
    ordered = sorted(items.items())
    blocks: Blocks = {}
    layers = [height(key) for key, _ in ordered]
    root = _build(ordered, layers, max(layers, default=0), blocks)
    if root is None:  # the empty tree is one empty node
        root = _store({"e": [], "l": None}, blocks)
    return root, blocks


def _build(items: list[tuple[bytes, bytes]], layers: list[int], layer: int,
           blocks: Blocks) -> bytes | None:
    if not items:
        return None
    entries: list[dict[str, Any]] = []
    start, previous = 0, b""
    left: bytes | None = None
    for i, (key, value) in enumerate(items):
        if layers[i] != layer:
            continue
        below = _build(items[start:i], layers[start:i], layer - 1, blocks)
        if entries:
            entries[-1]["t"] = below
        else:
            left = below
        shared = _shared_prefix(previous, key)
        entries.append({"k": key[shared:], "p": shared, "t": None, "v": value})
        start, previous = i + 1, key
    below = _build(items[start:], layers[start:], layer - 1, blocks)
    if entries:
        entries[-1]["t"] = below
    else:
        left = below
    return _store({"e": entries, "l": left}, blocks)


def _shared_prefix(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _store(node: dict[str, Any], blocks: Blocks) -> bytes:
    cid = cid_for(node)
    blocks[cid] = node
    return cid
