"""What a run shows while it works: a progress bar on a terminal, else a log line now and then."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import click

from pipeline.summary import Summary

log = logging.getLogger("pipeline.progress")
LOG_EVERY = 5.0


class Progress:
    """Feeds click's progress bar (bytes of the file) or logs one summary line every few seconds."""

    def __init__(self, bar: bool) -> None:
        self._bar: Any = None
        self._use_bar = bar
        self._done = 0
        self._last_log = time.monotonic()

    @classmethod
    def for_terminal(cls, replay: bool) -> Progress:
        return cls(bar=replay and sys.stderr.isatty())

    def update(self, s: Summary) -> None:
        done, total = s.progress
        if self._use_bar and total:
            if self._bar is None:
                self._bar = click.progressbar(length=total, label="replaying", file=sys.stderr,
                                              show_eta=True, show_percent=True,
                                              item_show_func=lambda _x: None)
                self._bar.__enter__()
            self._bar.label = f"replaying {s.events_per_second:,.0f} events/s"
            self._bar.update(max(0, done - self._done))
            self._done = done
        elif time.monotonic() - self._last_log >= LOG_EVERY:
            self._last_log = time.monotonic()
            log.info("read %d, committed %d, dead-lettered %d, users %d, %.0f events/s,"
                        " p99 read-to-commit %s ms", s.events_read, s.committed, s.dead_letters,
                        s.users_created, s.events_per_second,
                        "-" if s.latency_p99_ms is None else f"{s.latency_p99_ms:.0f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
