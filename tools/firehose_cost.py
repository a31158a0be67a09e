"""CPU cost per relay firehose frame of each step a shard runs on it, on one core.

    python -m tools.firehose_cost --repeat 20 --runs 5

Reads a firehose recording ([u32 little-endian length][frame] records, plain, gzip or zstd) and
a JSON object of DID documents by DID (defaults: the 150 recorded frames and their authors'
documents in tests/data), then times each step over every frame, `--repeat` times per run, and
prints the best and the median of `--runs` runs in microseconds per frame: route_key (the
supervisor's look), parse_frame, read_commit (the CAR split, every block hashed, the commit and
the records decoded), verify_signature, verify_ops (the tree nodes on each path decoded and
walked), and all of them together, each step as a shard runs it. Keys are parsed once per DID
beforehand, as a worker keeps them. Times are the process's CPU time, so that neighbours on a busy machine weigh less. A commit that fails verification is counted and reported, and makes the exit status 1.
"""
from __future__ import annotations

import gzip
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import orjson
import zstandard

from shards.firehose.car import CarBlocks
from shards.firehose.errors import VerificationError
from shards.firehose.frames import BadFrame, parse_frame, route_key
from shards.firehose.keys import SigningKey, signing_key
from shards.firehose.verify import Commit, read_commit, verify_ops, verify_signature

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
MAX_RECORDING_BYTES = 1 << 30
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def read_recording(path: Path) -> list[bytes]:
    """The frames of a recording, whichever of plain, gzip or zstd it is."""
    data = path.read_bytes()
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        data = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_RECORDING_BYTES)
    elif data.startswith(b"\x1f\x8b"):
        data = gzip.decompress(data)
    frames, pos = [], 0
    while pos + 4 <= len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        frames.append(data[pos + 4:pos + 4 + length])
        pos += 4 + length
    return frames


def timed(step: Callable[[Any], object], items: Sequence[Any], per: int, repeat: int,
          runs: int) -> list[float]:
    """Microseconds per frame of each run of `step` over `items`, `repeat` times."""
    out = []
    for _ in range(runs):
        start = time.process_time()
        for _ in range(repeat):
            for item in items:
                step(item)
        out.append((time.process_time() - start) / repeat / per * 1e6)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--frames", "frames_path", type=FILE,
              default=DATA / "jetstream" / "frames.bin.zst", show_default=True,
              help="firehose recording: [u32 LE length][frame] records, plain, gzip or zstd")
@click.option("--did-docs", "docs_path", type=FILE,
              default=DATA / "did_docs.json", show_default=True,
              help="JSON object: DID -> DID document, for the commits' keys")
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True,
              help="passes over all frames per run")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="runs per step; best and median are printed")
def main(frames_path: Path, docs_path: Path, repeat: int, runs: int) -> None:
    """Microseconds of CPU per firehose frame of each step a shard runs on it, on one core."""
    frames = read_recording(frames_path)
    docs = orjson.loads(docs_path.read_bytes())
    keys: dict[str, SigningKey] = {}
    for did, doc in docs.items():
        try:
            keys[did] = signing_key(doc)
        except VerificationError:
            pass
    bodies, commits, failures = [], [], 0
    for raw in frames:
        try:
            frame = parse_frame(raw)
            if frame.kind == "#commit":
                commit = read_commit(frame.body, checked=True)
                verify_signature(commit, keys[commit.did])
                verify_ops(commit)
                bodies.append(frame.body)
                commits.append(commit)
        except (BadFrame, VerificationError, KeyError) as exc:
            failures += 1
            click.echo(f"refused: {exc!r}", err=True)

    def read(body: dict[str, Any]) -> None:
        read_commit(body, checked=True)  # parse_frame has checked the body's fields

    def signature(commit: Commit) -> None:
        verify_signature(commit, keys[commit.did])

    def tree(commit: Commit) -> None:
        # a commit's tree nodes are decoded when first read: each pass starts without them
        commit._blocks = CarBlocks(commit._blocks.raw)  # type: ignore[attr-defined]
        verify_ops(commit)

    def everything(raw: bytes) -> None:
        route_key(raw)
        frame = parse_frame(raw)
        if frame.kind == "#commit":
            commit = read_commit(frame.body, checked=True)
            verify_signature(commit, keys[commit.did])
            verify_ops(commit)

    n = len(frames)
    click.echo(f"{n} frames, {len(commits)} commits verified, {failures} refused; "
               f"{repeat} passes a run, {runs} runs; microseconds per frame (of all {n} frames)")
    steps = [("route_key", route_key, frames), ("parse_frame", parse_frame, frames),
             ("read_commit", read, bodies), ("verify_signature", signature, commits),
             ("verify_ops", tree, commits), ("all together", everything, frames)]
    for name, step, items in steps:
        us = timed(step, items, n, repeat, runs)
        click.echo(f"  {name:<17} best {min(us):8.1f}   median {statistics.median(us):8.1f}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
