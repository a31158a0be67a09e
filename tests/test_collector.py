"""The collector settings a shard worker takes once its start-up is done."""
from __future__ import annotations

import subprocess
import sys

from shards import collector

PROBE = """
import gc
from shards import collector
before = gc.get_freeze_count()
collector.settle()
print(before, gc.get_freeze_count(), gc.get_threshold()[0], gc.isenabled())
"""


def test_settle_freezes_what_start_up_made_and_collects_young_objects_less_often() -> None:
    # In a process of its own: the test runner's collector is left as it is.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    before, frozen, young, enabled = int(out[0]), int(out[1]), int(out[2]), out[3]
    assert before == 0
    assert frozen > 1000  # modules, classes and functions imported so far
    assert young == collector.YOUNG_THRESHOLD > 700
    assert enabled == "True"  # cycles are still collected, only less often
