"""How batches travel between the supervisor and its shard workers.

`local` (the default): multiprocessing pipes to child processes of the supervisor.
`redis://HOST:PORT/DB`: Redis Streams (see `pipeline.transport.redis`), so that workers can run
on other machines, started by cron or systemd."""
from __future__ import annotations

LOCAL = "local"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def parse_transport(value: str | None) -> str | None:
    """None for the local transport, else the Redis URL; ValueError for anything else."""
    value = (value or LOCAL).strip()
    if value == LOCAL:
        return None
    if value.startswith(REDIS_SCHEMES):
        return value
    raise ValueError(f"--transport must be 'local' or a redis:// URL, not {value!r}")
