"""The PostgreSQL the tool starts itself when no DSN is given (pgserver), kept in a data dir."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

DEFAULT_DATA_DIR = ".pipeline-data"


class EmbeddedError(RuntimeError):
    """The embedded server could not be started."""


def start(data_dir: str) -> str:
    """Starts (or reuses) the server in `data_dir`; returns its DSN. It stops when we exit."""
    path = Path(data_dir).absolute()
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        import pgserver

        try:
            server = pgserver.get_server(path / "pg", cleanup_mode="stop")
        except Exception as exc:  # pgserver raises bare exceptions with the server's log
            raise EmbeddedError(f"could not start the embedded PostgreSQL in {path}: {exc}") from None
    _servers.append(server)
    return server.get_uri()


_servers: list[object] = []  # keeps the handle alive, so the server lives as long as we do
