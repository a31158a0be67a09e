"""tools.firehose_cost, the per-frame cost of decoding and verifying, run as a user runs it."""
from __future__ import annotations

import gzip
import re
import struct
import subprocess
import sys
from pathlib import Path

from tests.firehose_corpus import frames

ROOT = Path(__file__).parent.parent
STEPS = ("route_key", "parse_frame", "read_commit", "verify_signature", "verify_ops",
         "all together")


def cost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.firehose_cost", "--repeat", "1",
                           "--runs", "2", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_times_every_step_of_the_recorded_frames() -> None:
    done = cost()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("150 frames, 148 commits verified, 0 refused; 1 passes a run")
    for step, line in zip(STEPS, lines[1:], strict=True):
        best, median = map(float, re.fullmatch(
            rf"  {step} +best +([0-9.]+) +median +([0-9.]+)", line).groups())
        assert 0 < best <= median


def test_a_forged_frame_is_reported_and_fails_the_run(tmp_path: Path) -> None:
    raw = list(frames())
    raw[0] = raw[0].replace(b"3mptbyplj5d2a", b"3mptbyplj5d2b")  # the like's rkey in its op
    recording = tmp_path / "forged.bin.gz"
    recording.write_bytes(gzip.compress(b"".join(struct.pack("<I", len(f)) + f for f in raw)))
    done = cost("--frames", str(recording))
    assert done.returncode == 1
    assert done.stdout.startswith("150 frames, 147 commits verified, 1 refused;")
    assert ("refused: VerificationError('tree: app.bsky.feed.like/3mptbyplj5d2b does not lead "
            "to its CID in the signed tree')") in done.stderr
