"""Prometheus metrics, served by the supervisor from the figures every worker sends it.

Workers already report their counters to the supervisor once a second (and on exit), so the
supervisor exports the sums: figures add up across shards and survive worker restarts without
shared metric files between processes."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from pipeline.summary import Summary
from shards.stats import Histogram

# Exported latency buckets: every 4th internal bucket, i.e. upper bounds doubling from 0.1 ms.
_EVERY = 4


def _histogram(h: Histogram) -> tuple[list[tuple[str, float]], float]:
    buckets, total, approx_sum = [], 0, 0.0
    for k, count in enumerate(h.counts):
        total += count
        approx_sum += count * (1e-4 * 2 ** (k / 4))
        if k % _EVERY == _EVERY - 1:
            buckets.append((repr(1e-4 * 2 ** (k / 4)), total))
    buckets.append(("+Inf", total))
    return buckets, approx_sum


class PipelineCollector:
    """Turns the supervisor's current Summary (plus cursor figures) into metric families."""

    def __init__(self, summary: Callable[[], Summary], cursor: Callable[[], tuple[str, int | None]]):
        self._summary = summary
        self._cursor = cursor

    def collect(self) -> Iterator[Metric]:
        s = self._summary()
        events = CounterMetricFamily("pipeline_events", "Events by kind and result.",
                                     labels=["kind", "result"])
        for kind, n in sorted(s.events_by_kind.items()):
            events.add_metric([kind, "committed"], n)
        events.add_metric(["any", "dead_letter"], s.dead_letters)
        events.add_metric(["any", "read"], s.events_read)
        yield events
        dead = CounterMetricFamily("pipeline_dead_letters", "Dead letters by reason.",
                                   labels=["reason"])
        for reason, n in sorted(s.dead_reasons.items()):
            dead.add_metric([reason], n)
        yield dead
        buckets, approx_sum = _histogram(s.latency)
        latency = HistogramMetricFamily("pipeline_read_to_commit_seconds",
                                        "Time from reading an event to its commit.")
        latency.add_metric([], buckets, approx_sum)
        yield latency
        yield from self._per_shard(s)
        yield from self._identity(s.identity)
        restarts = CounterMetricFamily("pipeline_worker_restarts", "Shard workers restarted.")
        restarts.add_metric([], s.restarts)
        yield restarts
        users = CounterMetricFamily("pipeline_users_created", "Users created, by outcome.",
                                    labels=["handle"])
        users.add_metric(["resolved"], s.users_created - s.users_fallback - s.users_unverified)
        users.add_metric(["unverified"], s.users_unverified)
        users.add_metric(["fallback"], s.users_fallback)
        yield users
        name, cursor = self._cursor()
        position = GaugeMetricFamily("pipeline_cursor", "Saved low-watermark cursor.",
                                     labels=["source"])
        lag = GaugeMetricFamily("pipeline_cursor_lag_seconds",
                                "Now minus the saved cursor's time (Jetstream), or minus the"
                                " newest committed frame's time (firehose).",
                                labels=["source"])
        if cursor is not None:
            position.add_metric([name], cursor)
        if cursor is not None and name.startswith("jetstream:"):
            lag.add_metric([name], max(0.0, time.time() - cursor / 1e6))
        elif s.frame_time is not None:
            lag.add_metric([name], max(0.0, time.time() - s.frame_time))
        yield position
        yield lag
        for name, doc, label, values in (
                ("pipeline_frames_skipped",
                 "Firehose frames acknowledged without writing, by reason.", "reason", s.skipped),
                ("pipeline_verification_failures",
                 "Firehose commits refused, by the check that failed.", "check",
                 s.verify_failures)):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, n in sorted(values.items()):
                family.add_metric([key], n)
            yield family

    def _per_shard(self, s: Summary) -> Iterator[Metric]:
        specs: list[tuple[str, str, Callable[[Any], float]]] = [
            ("pipeline_active_user_creations", "Resolutions of new users in flight.",
             lambda f: f.active_user_creations),
            ("pipeline_pending_user_creation_dedup",
             "New users with one resolution in flight that later events wait on.",
             lambda f: f.pending_user_creations),
            ("pipeline_pool_connections_in_use", "Database connections checked out.",
             lambda f: f.pool_in_use),
            ("pipeline_pool_requests_waiting", "Requests waiting for a database connection.",
             lambda f: f.pool_waiting),
            ("pipeline_refresher_backlog", "Incomplete users of the shard.",
             lambda f: f.refresher_backlog),
        ]
        for name, doc, get in specs:
            g = GaugeMetricFamily(name, doc, labels=["shard"])
            for f in s.shards:
                g.add_metric([str(f.shard)], get(f))
            yield g
        committed = CounterMetricFamily("pipeline_shard_committed", "Events committed per shard.",
                                        labels=["shard"])
        for f in s.shards:
            committed.add_metric([str(f.shard)], f.committed)
        yield committed

    def _identity(self, stats: dict[str, int]) -> Iterator[Metric]:
        resolutions = CounterMetricFamily("pipeline_resolutions", "Identity lookups.",
                                          labels=["method", "result"])
        cache = CounterMetricFamily("pipeline_identity_cache", "Identity cache lookups.",
                                    labels=["result"])
        refused = CounterMetricFamily(
            "pipeline_refused_addresses",
            "Lookups refused: a host from the network's data resolved to a non-public address.",
            labels=["kind"])
        breaker = GaugeMetricFamily("pipeline_breaker_open", "Upstream circuits open now.")
        trips = CounterMetricFamily("pipeline_breaker_trips", "Times a circuit opened.")
        fetches = CounterMetricFamily("pipeline_pds_fetches", "PDS requests by kind and result.",
                                      labels=["kind", "result"])
        limited = CounterMetricFamily("pipeline_pds_rate_limited",
                                      "429 answers (Too Many Requests) by PDS host.",
                                      labels=["host"])
        backfills = CounterMetricFamily("pipeline_backfills",
                                        "Repositories of new users backfilled, by result.",
                                        labels=["result"])
        for key, value in sorted(stats.items()):
            parts = key.split(".")
            if parts[0] == "backfill" and len(parts) == 2:
                backfills.add_metric(parts[1:], value)
            elif parts[0] == "pds":
                if parts[1] == "rate_limited":
                    limited.add_metric([key.split(".", 2)[2]], value)
                elif len(parts) == 3:
                    fetches.add_metric(parts[1:], value)
            elif parts[0] == "resolution" and len(parts) == 3:
                resolutions.add_metric(parts[1:], value)
            elif parts[0] == "refused" and len(parts) == 2:
                refused.add_metric([parts[1]], value)
            elif parts[0] == "cache" and parts[1] in ("hit", "miss", "coalesced"):
                cache.add_metric([parts[1]], value)
            elif key == "breaker.open":
                breaker.add_metric([], value)
            elif key == "breaker.trips":
                trips.add_metric([], value)
        yield from (resolutions, refused, cache, breaker, trips, fetches, limited, backfills)


def serve(port: int, addr: str, summary: Callable[[], Summary],
          cursor: Callable[[], tuple[str, int | None]]) -> Any:
    """Starts the /metrics endpoint on a daemon thread; returns the server."""
    registry = CollectorRegistry()
    registry.register(PipelineCollector(summary, cursor))  # type: ignore[arg-type]
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
