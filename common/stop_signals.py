"""SIGINT and SIGTERM, the signals that ask for a stop, and who answers them.

Ctrl-C, `timeout`, `kill -- -PGID` and systemd's KillMode=control-group send them to every
process of the run at once; only the supervisor acts on them, and it stops the rest in order."""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def blocked() -> Iterator[None]:
    """Holds the two back in this thread: a process started meanwhile inherits the mask, so a
    signal cannot end it before it has chosen what to do with them (one that came is kept)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore() -> None:
    """For a process its parent stops: the two are dropped, those already held back included."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
