"""Socket timeouts kept by the kernel (SO_RCVTIMEO, SO_SNDTIMEO) on blocking plain sockets.

Python's own socket timeouts make the socket non-blocking and poll() before every send and recv:
twice the system calls, and in a process whose threads share the interpreter lock each call is
one more hand-over of the lock. With the kernel's timeouts a call that waits too long fails
with EAGAIN, which `expired` recognises. Never for TLS: OpenSSL retries such a read forever."""
from __future__ import annotations

import socket
import struct


def set_timeout(sock: socket.socket, seconds: float) -> None:
    """Makes `sock` blocking, each send or receive giving up after `seconds` (at least 1 ms)."""
    if sock.gettimeout() is not None:  # setting it costs a system call even when it is so
        sock.settimeout(None)
    whole = max(seconds, 0.001)
    value = struct.pack("ll", int(whole), int((whole % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def expired(exc: BaseException) -> bool:
    """Whether `exc` is a call that ran out of the time `set_timeout` gave it."""
    return isinstance(exc, BlockingIOError)
