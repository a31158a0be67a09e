"""Counters (the figures the run summary prints and Prometheus exports)."""
from __future__ import annotations

import threading

from shards.identity import Counters, build_directory
from shards.identity.metrics import METHODS, RESULTS
from shards.identity.testing import local_config


def test_every_resolution_series_exists_from_the_start() -> None:
    snapshot = Counters().snapshot()
    for method in METHODS:
        for result in RESULTS:
            assert snapshot[f"resolution.{method}.{result}"] == 0
    for key in ("cache.hit", "cache.miss", "cache.coalesced", "breaker.trips", "breaker.rejected"):
        assert snapshot[key] == 0


def test_directory_stats_include_gauges() -> None:
    stats = build_directory(local_config()).stats()
    assert stats["cache.size"] == 0 and stats["breaker.open"] == 0
    assert all(isinstance(v, int) for v in stats.values())


def test_counting_is_thread_safe() -> None:
    counters = Counters()
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(2000):
            counters.resolution("plc", "ok")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counters.get("resolution.plc.ok") == 16000

