"""What every command shares: PIPELINE_* options, exit codes, one-line errors, the database.

`cli.py` builds the commands from these, and so does `status.py`; neither imports the other."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click
import psycopg

from common.logs import FORMATS, configure
from pipeline import embedded
from shards.pds.config import PdsConfig

RET_OK = 0
RET_ERROR = 1
RET_USAGE = 2
RET_DATABASE = 3
RET_SOURCE = 4

log = logging.getLogger("pipeline")
_KNOWN_ENV: set[str] = {"PIPELINE_DATA_DIR"}


def opt(*decls: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A click option whose environment variable is PIPELINE_ plus its long name."""
    long = next(d for d in decls if d.startswith("--")).split("/")[0]
    env = "PIPELINE_" + long[2:].upper().replace("-", "_")
    _KNOWN_ENV.add(env)
    return click.option(*decls, envvar=env, show_envvar=True, **kwargs)


def fail(message: str, code: int) -> None:
    """One clear line for a user's mistake, and a non-zero exit."""
    click.echo(f"pipeline: {message}", err=True)
    sys.exit(code)


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def database_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = opt("--data-dir", default=embedded.DEFAULT_DATA_DIR, show_default=True,
            type=click.Path(file_okay=False),
            help="Where the embedded PostgreSQL keeps its files, in DIR/pg (used when no --dsn).")(f)
    f = opt("--dsn", default=None, metavar="DSN",
            help="PostgreSQL connection string. Absent: an embedded server in --data-dir.")(f)
    return f


def identity_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = opt("--allow-private-addresses", is_flag=True, default=False,
            help="Let hosts named by the network's data (handles, did:web hosts, PDS endpoints, "
                 "redirects) resolve to private, loopback and link-local addresses, and PDS "
                 "endpoints be plain http; off, they are refused. The endpoints you name here "
                 "are used as given either way.")(f)
    f = opt("--dns-server", default=None, metavar="HOST[:PORT]",
            help="DNS server for handle verification, used as given (a local resolver is fine). "
                 "Default: the system's resolvers.")(f)
    f = opt("--plc-url", default="https://plc.directory", show_default=True,
            help="PLC directory that resolves did:plc, used as given (a local mirror is fine).")(f)
    f = opt("--resolve-timeout", type=click.FloatRange(min=0.01), default=5.0, show_default=True,
            metavar="SECONDS",
            help="Longest an event waits for its new author's resolution before the user is "
                 "written with the DID as handle and marked incomplete.")(f)
    f = opt("--max-user-creations", type=click.IntRange(min=1), default=100, show_default=True,
            help="Most resolutions of new users at once, across all shards.")(f)
    return f


def _keep(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    ctx.meta.setdefault("pds", {})[param.name] = value


_PDS = PdsConfig()
# option name -> PdsConfig field
_PDS_FIELDS = {"fetch_profiles": "fetch_profiles", "pds_rate": "rate",
               "pds_host_concurrency": "host_concurrency", "max_pds_fetches": "concurrency",
               "profile_retry": "absent_retry"}


def pds_limit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """How hard PDS hosts are asked; read back with `pds_config()` rather than passed to `f`."""
    f = opt("--pds-host-concurrency", type=click.IntRange(min=1), default=_PDS.host_concurrency,
            show_default=True, expose_value=False, callback=_keep,
            help="Most requests in flight to one PDS host, per process.")(f)
    f = opt("--pds-rate", type=click.FloatRange(min=0), default=_PDS.rate, show_default=True,
            metavar="REQUESTS/S", expose_value=False, callback=_keep,
            help="Most requests a second to one PDS host for the whole pipeline (each shard asks "
                 "at its share; 0: no limit). 10 is the 3,000 per 5 minutes Bluesky's hosts "
                 "allow one address.")(f)
    return f


def pds_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The PDS limits, and how profiles are fetched; read back with `pds_config()`."""
    f = opt("--profile-retry", type=click.FloatRange(min=1), default=_PDS.absent_retry,
            show_default=True, metavar="SECONDS", expose_value=False, callback=_keep,
            help="How long a user whose PDS has no profile record waits before it is asked "
                 "again.")(f)
    f = opt("--max-pds-fetches", type=click.IntRange(min=1), default=_PDS.concurrency,
            show_default=True, expose_value=False, callback=_keep,
            help="Most PDS requests in flight at once across the pipeline (split across shards, "
                 "at least 1 each).")(f)
    f = pds_limit_options(f)
    f = opt("--fetch-profiles/--no-fetch-profiles", default=True, show_default=True,
            expose_value=False, callback=_keep,
            help="Ask each user's PDS for its profile when none came from the stream.")(f)
    return f


def pds_config() -> PdsConfig:
    """The PdsConfig of the current command's `pds_options` (the whole pipeline's limits)."""
    values = click.get_current_context().meta.get("pds", {})
    return PdsConfig(**{_PDS_FIELDS[k]: v for k, v in values.items()})


MAX_REPO_BYTES = 512 * 1024 * 1024


def max_repo_bytes_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return opt("--max-repo-bytes", type=click.IntRange(min=1), default=MAX_REPO_BYTES,
               show_default=True, metavar="BYTES",
               help="A repository larger than this is refused, and not read further. Each one "
                    "being fetched is held in memory whole, twice while it is decoded.")(f)


def backfill_new_users_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = max_repo_bytes_option(f)
    f = opt("--backfill-concurrency", type=click.IntRange(min=1), default=8, show_default=True,
            help="With --backfill-new-users: repositories fetched at once across the pipeline "
                 "(split across shards, at least 1 each), within the PDS limits.")(f)
    f = opt("--backfill-new-users", is_flag=True, default=False,
            help="Load the repository of every user the database has never seen (getRepo, "
                 "verified whole) in the background, in order with its live events.")(f)
    return f


def transport_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return opt("--transport", default="local", show_default=True,
               metavar="local|redis://HOST:PORT/DB",
               help="How batches reach the shard workers: child processes (local), or Redis "
                    "Streams read by `pipeline worker` processes on any machine.")(f)


def redis_transport(value: str) -> str | None:
    """None for local; for a redis:// URL, the URL once Redis answers (else exit 1)."""
    from pipeline.transport import parse_transport

    try:
        url = parse_transport(value)
    except ValueError as exc:
        fail(str(exc), RET_USAGE)
    if url is None:
        return None
    import redis

    from pipeline.transport.redis import connect, describe

    try:
        client = connect(url)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError) as exc:
        fail(f"cannot reach Redis at {describe(url)}: {_short(exc)}", RET_ERROR)
    return url


def common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = opt("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
            expose_value=False, is_eager=True,
            callback=lambda ctx, _param, value: ctx.meta.__setitem__("log_format", value),
            help="text for people, json for log collectors (one object a line).")(f)
    f = opt("--log-level", default="INFO", show_default=True,
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))(f)
    return f


def log_format() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("log_format", "text") if ctx is not None else "text"


def setup_logging(level: str, process: str = "supervisor") -> None:
    configure(level, log_format(), process)
    unknown = sorted(k for k in os.environ if k.startswith("PIPELINE_") and k not in _KNOWN_ENV)
    for name in unknown:
        log.warning("unknown environment variable %s is ignored", name)


def resolve_dsn(dsn: str | None, data_dir: str) -> str:
    """The DSN given, or that of the embedded server, started on demand."""
    if dsn:
        return dsn
    try:
        return embedded.start(data_dir)
    except embedded.EmbeddedError as exc:
        fail(str(exc), RET_DATABASE)


def server_label(conn: psycopg.Connection, dsn: str) -> str:
    """Which server a command works on: "PostgreSQL 18.6 (embedded, DIR)" or its address."""
    number = conn.info.server_version
    version = f"PostgreSQL {number // 10000}.{number % 10000}"
    data_dir = embedded.data_dir_of(dsn)
    if data_dir is not None:
        return f"{version} (embedded, {data_dir})"
    info = conn.info
    return f"{version} ({info.user}@{info.host}:{info.port}/{info.dbname})"


def connect_database(dsn: str, application_name: str = "pipeline") -> psycopg.Connection:
    """Connects and names the server on stderr; an unreachable one is one line and exit 3."""
    from shards.store.pool import connect

    try:
        conn = connect(dsn, application_name, connect_timeout=10)
    except psycopg.Error as exc:
        fail(f"cannot connect to the database: {_short(exc)}", RET_DATABASE)
    click.echo(f"pipeline: {server_label(conn, dsn)}", err=True)
    return conn


def open_database(dsn: str, application_name: str = "pipeline") -> psycopg.Connection:
    """Connects and applies the migrations the database lacks."""
    from shards.store import migrations

    conn = connect_database(dsn, application_name)
    migrations.upgrade(conn)
    return conn


def fill_counts(dsn: str, quiet: bool = False) -> list[str]:
    """Builds the counts' indexes and fills the counts of records older than them, in batches
    (see shards/store/counts.py); returns lines saying what was done (`quiet`: only a fill)."""
    from shards.store import counts

    conn = connect_database(dsn)
    try:
        result = counts.fill(conn)
    except psycopg.Error as exc:
        fail(f"database error while filling counts: {_short(exc)}", RET_DATABASE)
    finally:
        conn.close()
    if result.busy:
        return ["another process is filling the counts; they are exact once it is done"]
    lines = [] if quiet else [f"built index {name}" for name in result.indexes_built]
    lines += [f"filled {table}: {result.rows[table]} rows, {n} ranges" for table, n in
              result.ranges.items()]
    if result.ranges:
        lines.append(f"counts filled in {result.seconds:.1f}s")
    return lines


def identity_config(plc_url: str, dns_server: str | None, allow_private_addresses: bool,
                    resolve_timeout: float) -> Any:
    """HTTP waits outlast the resolve timeout, so a late answer still reaches the refresher."""
    from shards.identity import IdentityConfig

    try:
        return IdentityConfig(plc_url=plc_url.rstrip("/"), dns_server=dns_server,
                              allow_private_addresses=allow_private_addresses,
                              read_timeout=max(5.0, 1.5 * resolve_timeout),
                              total_timeout=max(10.0, 2 * resolve_timeout))
    except ValueError as exc:
        fail(str(exc), RET_USAGE)
