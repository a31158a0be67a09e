"""Log output for people (text) or for collectors (one JSON object a line)."""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import orjson

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, process, message (and exception)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": self._process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def configure(level: str, fmt: str = "text", process: str = "supervisor") -> None:
    """Sets up the root logger once per process; psycopg's own chatter stays at WARNING."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {process} %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("psycopg").setLevel(max(logging.WARNING, root.level))
