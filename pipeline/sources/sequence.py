"""The order of a firehose stream: each frame's seq must be above the one before it.

A relay numbers its frames; one whose seq does not go up (a repeat after a reconnect, a
misbehaving upstream) carries nothing new, so both firehose sources skip it and count it."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from shards.firehose.frames import route_key

log = logging.getLogger("pipeline.firehose")


@dataclass
class SeqOrder:
    """Remembers the last seq let through; frames without a seq (#info, errors) pass."""

    last: int | None = None
    skipped: int = 0

    def admit(self, raw: bytes) -> tuple[bool, int | None]:
        """(whether to route the frame, its seq)."""
        seq, _did = route_key(raw)
        if seq is None:
            return True, None
        if self.last is not None and seq <= self.last:
            self.skipped += 1
            if self.skipped <= 10 or self.skipped % 1000 == 0:
                log.warning("frame with seq %d after seq %d skipped (%d so far)", seq, self.last,
                            self.skipped)
            return False, seq
        self.last = seq
        return True, seq
