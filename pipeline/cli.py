"""The `pipeline` command. Every option also reads PIPELINE_<NAME> from the environment."""
from __future__ import annotations

import os
import sys
from typing import Any

import click
import psycopg

from pipeline.endpoints import start_line
from pipeline.options import (
    RET_DATABASE,
    RET_ERROR,
    RET_OK,
    RET_SOURCE,
    RET_USAGE,
    _short,
    backfill_new_users_options,
    common_options,
    connect_database,
    database_options,
    fail,
    fill_counts,
    identity_config,
    identity_options,
    log,
    log_format,
    open_database,
    opt,
    pds_config,
    pds_options,
    redis_transport,
    resolve_dsn,
    setup_logging,
    transport_option,
)
from pipeline.backfill import backfill
from pipeline.status import dead_letters, status


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Ingest AT Protocol (Bluesky) events into PostgreSQL, sharded by DID.

    \b
    Quick start (embedded PostgreSQL in ./.pipeline-data):
      pipeline run --replay tools/samples/sample.jsonl
    """


@main.command()
@opt("--replay", metavar="PATH",
     help="Replay a recording to its end: Jetstream JSON lines (.jsonl, .jsonl.gz, .jsonl.zst, - for "
          "stdin) or firehose frames (plain, gzip or zstd), see --format.")
@opt("--format", "replay_format", type=click.Choice(["auto", "jetstream", "firehose"]),
     default="auto", show_default=True,
     help="What --replay holds; auto tells firehose frames from JSON lines by the first bytes.")
@opt("--jetstream", metavar="URL", help="Follow a live Jetstream endpoint, resuming from the saved cursor.")
@opt("--firehose", metavar="URL",
     help="Follow a relay or PDS firehose (com.atproto.sync.subscribeRepos; the path is added when "
          "the URL has none), resuming from the saved seq.")
@opt("--no-verify", is_flag=True, default=False,
     help="Firehose: trust the relay; write commits without checking their signature, hashes "
          "and tree proofs.")
@opt("--collections", multiple=True, metavar="NSID",
     help="With --jetstream: only these collections (Jetstream's wantedCollections); repeatable.")
@opt("--shards", type=click.IntRange(min=1, max=1024), default=4, show_default=True,
     help="Shard worker processes; every event of a DID goes to the same one.")
@opt("--pool-budget", type=click.IntRange(min=2), default=200, show_default=True,
     help="Most database connections the whole pipeline opens, supervisor included.")
@opt("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
     help="Events per batch sent to a shard (one transaction each at most).")
@opt("--from-start", is_flag=True, default=False,
     help="Ignore the saved cursor and read the source from its beginning.")
@opt("--end-wait", type=click.FloatRange(min=0), default=1.0, show_default=True,
     metavar="SECONDS",
     help="Once a replay has read its last line, the longest an event still waits for its new "
          "author's resolution (never more than --resolve-timeout): a lookup that hangs does not "
          "hold the end of the run for the rest of its timeout. Local workers only.")
@opt("--metrics-port", type=click.IntRange(min=0, max=65535), default=0,
     help="Serve Prometheus metrics at http://ADDR:PORT/metrics (0: off).")
@opt("--metrics-addr", default="127.0.0.1", show_default=True,
     help="Address the metrics endpoint listens on (0.0.0.0: every interface).")
@opt("--summary-json", type=click.Path(dir_okay=False, writable=True), default=None,
     help="Also write the closing summary as JSON to this file.")
@transport_option
@opt("--stream-limit", type=click.IntRange(min=1), default=200, show_default=True,
     metavar="BATCHES",
     help="With a redis:// transport: most batches waiting in a shard's stream; the reader waits "
          "while a stream is that long (nothing unprocessed is ever trimmed).")
@backfill_new_users_options
@pds_options
@identity_options
@database_options
@common_options
def run(replay: str | None, replay_format: str, jetstream: str | None, firehose: str | None,
        no_verify: bool, collections: tuple[str, ...], shards: int,
        pool_budget: int, batch_size: int, from_start: bool, end_wait: float, metrics_port: int,
        metrics_addr: str, summary_json: str | None, transport: str, stream_limit: int,
        backfill_new_users: bool, backfill_concurrency: int, max_repo_bytes: int,
        resolve_timeout: float, max_user_creations: int,
        plc_url: str, dns_server: str | None, allow_private_addresses: bool, dsn: str | None,
        data_dir: str, log_level: str) -> None:
    """Run the pipeline over a recording, a live Jetstream or a firehose until the end or a signal.

    \b
    Examples:
      pipeline run --replay events.jsonl.gz --shards 8 --dsn postgresql://localhost/bsky
      pipeline run --jetstream wss://jetstream1.us-east.bsky.network/subscribe
      pipeline run --firehose wss://bsky.network
      pipeline run --replay frames.bin.zst   (a firehose recording, from `pipeline record`)
      * * * * * pipeline run --replay /data/today.jsonl.gz   (crontab: one run at a time)
      pipeline run --replay events.jsonl --transport redis://queue:6379/0   (workers elsewhere)
    """
    from pipeline.sources.base import SourceError
    from pipeline.supervisor import (
        AlreadyRunning,
        RunOptions,
        Supervisor,
        install_signal_handlers,
    )
    from shards.store.pool import Budget, BudgetError

    setup_logging(log_level)
    if sum(map(bool, (replay, jetstream, firehose))) != 1:
        fail("give exactly one of --replay PATH, --jetstream URL or --firehose URL", RET_USAGE)
    redis_url = redis_transport(transport)
    try:
        Budget(pool_budget, shards).per_shard()
    except BudgetError as exc:
        fail(str(exc), RET_USAGE)
    try:
        source = open_source(replay, replay_format, jetstream, firehose, collections)
    except SourceError as exc:
        fail(str(exc), RET_SOURCE)
    dsn = resolve_dsn(dsn, data_dir)
    open_database(dsn).close()
    for line in fill_counts(dsn, quiet=True):
        log.info("%s", line)
    identity = identity_config(plc_url, dns_server, allow_private_addresses, resolve_timeout)
    log.info(start_line(identity, dsn, jetstream=jetstream, redis=redis_url))
    options = RunOptions(
        dsn=dsn, shards=shards, pool_budget=pool_budget, max_user_creations=max_user_creations,
        resolve_timeout=resolve_timeout, identity=identity, pds=pds_config(),
        backfill_new_users=backfill_new_users, backfill_concurrency=backfill_concurrency,
        max_repo_bytes=max_repo_bytes,
        batch_size=batch_size, from_start=from_start, end_wait=end_wait,
        log_level=log_level.upper(),
        log_format=log_format(),
        transport=redis_url or "local", stream_limit=stream_limit, verify=not no_verify,
    )
    from pipeline.progress import Progress

    progress = Progress.for_terminal(replay is not None)
    supervisor = Supervisor(options, source, on_progress=progress.update)
    install_signal_handlers(supervisor)
    if metrics_port:
        from pipeline import metrics

        try:
            metrics.serve(metrics_port, metrics_addr, supervisor.summary,
                          lambda: (source.name, supervisor.saved_cursor))
        except OSError as exc:
            fail(f"cannot serve metrics on {metrics_addr}:{metrics_port}: {exc.strerror}", RET_USAGE)
    try:
        summary = supervisor.run()
    except AlreadyRunning:
        progress.close()
        click.echo(f"pipeline: another run of {source.name} is in progress; nothing to do")
        sys.exit(RET_OK)
    except SourceError as exc:
        progress.close()
        fail(str(exc), RET_SOURCE)
    except psycopg.OperationalError as exc:
        progress.close()
        fail(f"database error: {_short(exc)}", RET_DATABASE)
    progress.close()
    click.echo(summary.render())
    warning = summary.refusal_warning()
    if warning:
        log.warning(warning)
    if summary_json:
        import orjson

        with open(summary_json, "wb") as f:
            f.write(orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2))


def open_source(replay: str | None, replay_format: str, jetstream: str | None,
                firehose: str | None, collections: tuple[str, ...]) -> Any:
    """The source `run` reads; raises SourceError for a user's mistake."""
    from pipeline.sources.base import SourceError

    if replay:
        if replay_format == "auto" and replay != "-":
            from pipeline.sources.streams import sniff

            try:
                replay_format = sniff(replay)[1]
            except OSError:
                replay_format = "jetstream"  # FileSource says what is wrong with the path
        if replay_format == "firehose":
            if replay == "-":
                raise SourceError("a firehose recording cannot be read from stdin; give its path")
            from pipeline.sources.recording import RecordingSource

            return RecordingSource(replay)
        from pipeline.sources.file import FileSource

        return FileSource(replay)
    if firehose:
        from pipeline.sources.firehose import FirehoseSource

        return FirehoseSource(firehose)
    from pipeline.sources.jetstream import JetstreamSource

    return JetstreamSource(jetstream or "", collections=collections)


@main.command("record")
@opt("--firehose", metavar="URL", help="Record a relay or PDS firehose (subscribeRepos frames).")
@opt("--jetstream", metavar="URL", help="Record a Jetstream endpoint (JSON lines).")
@opt("--out", required=True, type=click.Path(dir_okay=False, writable=True), metavar="FILE",
     help="The recording to write (zstd; e.g. frames.bin.zst or events.jsonl.zst); replaced if "
          "it exists.")
@opt("--seconds", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
     help="Stop after this long. Default: on --events, or SIGINT/SIGTERM.")
@opt("--events", type=click.IntRange(min=1), default=None, metavar="N",
     help="Stop after this many frames (firehose) or events (Jetstream).")
@opt("--cursor", type=click.IntRange(min=1), default=None, metavar="CURSOR",
     help="Start here: a seq for the firehose (the frames after it), a time in unix "
          "microseconds for Jetstream. Default: the live stream.")
@common_options
def record_command(firehose: str | None, jetstream: str | None, out: str, seconds: float | None,
                   events: int | None, cursor: int | None, log_level: str) -> None:
    """Capture a live firehose or Jetstream to a file, to replay later with `run --replay`.

    \b
    Examples:
      pipeline record --firehose wss://bsky.network --out frames.bin.zst --seconds 60
      pipeline record --jetstream wss://jetstream1.us-east.bsky.network/subscribe \\
          --out events.jsonl.zst --events 100000
    """
    from pipeline.record import record
    from pipeline.sources.base import SourceError

    setup_logging(log_level, "record")
    if bool(firehose) == bool(jetstream):
        fail("give exactly one of --firehose URL or --jetstream URL", RET_USAGE)
    try:
        source = open_source(None, "auto", jetstream, firehose, ())
        with open(out, "wb") as f:
            done = record(source, f, seconds=seconds, events=events,
                          cursor=cursor + 1 if firehose and cursor else cursor)
    except SourceError as exc:
        fail(str(exc), RET_SOURCE)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}", RET_USAGE)
    unit = "frames" if firehose else "events"
    click.echo(f"recorded {done.events} {unit} ({done.bytes_in:,} bytes, {done.bytes_out:,} "
               f"compressed) in {done.seconds:.1f} s to {out}")


@main.command("refresh-users")
@opt("--due-only", is_flag=True, default=False,
     help="Only users whose backoff has passed (default: every incomplete user, and every user "
          "missing a profile whose PDS did not say it has none).")
@pds_options
@identity_options
@database_options
@common_options
def refresh_users(due_only: bool, resolve_timeout: float, max_user_creations: int, plc_url: str,
                  dns_server: str | None, allow_private_addresses: bool, dsn: str | None,
                  data_dir: str, log_level: str) -> None:
    """One pass of the refresher over incomplete users, then of the profile fetcher over users
    missing a profile, then exit (for cron). Users of a host that a 429 paused for more than
    30 s are left for the next run."""
    from shards.identity import Counters, build_directory
    from shards.pds.client import PdsClient
    from shards.profiles import ProfileFetcher
    from shards.refresher import Refresher
    from shards.store.pool import open_pool

    setup_logging(log_level)
    dsn = resolve_dsn(dsn, data_dir)
    open_database(dsn).close()
    identity = identity_config(plc_url, dns_server, allow_private_addresses, resolve_timeout)
    log.info(start_line(identity, dsn))
    pds = pds_config()
    counters = Counters()
    directory = build_directory(identity, counters=counters)
    pool = open_pool(dsn, 2, "pipeline-refresh")
    profiles = (ProfileFetcher(pool, PdsClient(identity, pds, counters))
                if pds.fetch_profiles else None)
    refresher = Refresher(pool, directory, concurrency=min(max_user_creations, 64),
                          profiles=profiles)
    try:
        result = refresher.run_pass(due_only=due_only)
        fetched = refresher.run_profiles(due_only=due_only)
    finally:
        if profiles is not None:
            profiles.stop()
        pool.close()
    with psycopg.connect(dsn, application_name="pipeline") as conn:
        left, missing = conn.execute(
            "SELECT count(*) FILTER (WHERE incomplete),"
            " count(*) FILTER (WHERE profile_source IS NULL) FROM users").fetchone()
    click.echo(f"checked {result.checked} users: {result.completed} completed, "
               f"{result.failed} still incomplete; {left} incomplete in all")
    if profiles is not None:
        outcomes = ", ".join(f"{n} {k}" for k, n in sorted(fetched.results.items()))
        click.echo(f"asked {fetched.checked} PDS for profiles: {outcomes or 'none due'};"
                   f" {missing} users without a profile")


@main.command()
@opt("--shard", type=click.IntRange(min=0), required=True, metavar="K",
     help="The shard this worker serves (0 to N-1).")
@opt("--shards", type=click.IntRange(min=1, max=1024), required=True, metavar="N",
     help="Shards of the pipeline: the supervisor's --shards.")
@opt("--transport", required=True, metavar="redis://HOST:PORT/DB",
     help="The Redis the supervisor (`pipeline run --transport ...`) appends batches to.")
@opt("--pool-size", type=click.IntRange(min=1), default=None, metavar="P",
     help="Database connections of this worker. Default: (--pool-budget - 1) / --shards, as each "
          "shard gets in a local run.")
@opt("--pool-budget", type=click.IntRange(min=2), default=200, show_default=True,
     help="Connections of the whole pipeline, supervisor (1) included; sizes --pool-size.")
@opt("--lock-ttl", type=click.FloatRange(min=1), default=15.0, show_default=True,
     metavar="SECONDS",
     help="Lifetime of the shard's lock, renewed every third of it: how long a killed worker's "
          "shard stays locked before a new worker can take over its pending entries. A "
          "transaction of this worker left idle that long is ended by the database.")
@opt("--refresh-interval", type=click.FloatRange(min=1), default=30.0, show_default=True,
     metavar="SECONDS", help="Pause between passes of this worker's refresher of incomplete users.")
@opt("--no-verify", is_flag=True, default=False,
     help="Firehose frames: trust the relay; write commits without checking their signature, "
          "hashes and tree proofs.")
@backfill_new_users_options
@pds_options
@identity_options
@database_options
@common_options
def worker(shard: int, shards: int, transport: str, pool_size: int | None, pool_budget: int,
           lock_ttl: float, refresh_interval: float, no_verify: bool, backfill_new_users: bool,
           backfill_concurrency: int, max_repo_bytes: int, resolve_timeout: float,
           max_user_creations: int, plc_url: str, dns_server: str | None,
           allow_private_addresses: bool, dsn: str | None, data_dir: str, log_level: str) -> None:
    """One shard worker fed over Redis Streams, until SIGTERM/SIGINT (drains, then exits 0).

    Exits 0 at once when shard K already has a live worker, so cron can start it every minute.
    On start it raises the shard's epoch in PostgreSQL, so that a worker it replaces can no
    longer commit (that one exits 1), then takes over the entries it left pending.

    \b
    Example (crontab on a worker machine, one line per shard):
      * * * * * pipeline worker --shard 0 --shards 4 --transport redis://queue:6379/0 --dsn ...
    """
    import dataclasses
    import signal

    from shards.store.pool import Budget, BudgetError

    setup_logging(log_level, f"shard-{shard}")
    state: dict[str, Any] = {"stop": False, "link": None}

    def first(signum: int, _frame: object) -> None:
        log.warning("shard %d: received %s: draining, then exiting", shard,
                    signal.Signals(signum).name)
        state["stop"] = True
        if state["link"] is not None:
            import threading

            threading.Thread(target=state["link"].stop, daemon=True).start()
        signal.signal(signal.SIGINT, second)
        signal.signal(signal.SIGTERM, second)

    def second(_signum: int, _frame: object) -> None:
        os._exit(130)

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)
    if shard >= shards:
        fail(f"--shard {shard} is not below --shards {shards}", RET_USAGE)
    if pool_size is None:
        try:
            pool_size = Budget(pool_budget, shards).per_shard()
        except BudgetError as exc:
            fail(str(exc), RET_USAGE)
    url = redis_transport(transport)
    if url is None:
        fail("pipeline worker needs --transport redis://HOST:PORT/DB", RET_USAGE)
    import redis

    from pipeline.transport.redis import RedisWorkerLink, ShardLock, connect, describe
    from shards.store.fence import StaleEpoch, take_over

    client = connect(url)
    lock = ShardLock(client, shard, ttl=lock_ttl,
                     on_lost=lambda: os._exit(RET_ERROR))  # another worker owns the shard now
    try:
        got = lock.acquire()
    except redis.RedisError as exc:
        fail(f"cannot reach Redis at {describe(url)}: {_short(exc)}", RET_ERROR)
    if not got:
        click.echo(f"pipeline: shard {shard} already has a worker ({lock.holder()}); nothing to do")
        sys.exit(RET_OK)
    code = RET_OK
    try:
        from shards.worker import ShardWorker, WorkerConfig

        dsn = resolve_dsn(dsn, data_dir)
        # The epoch is raised before anything pending is claimed: from here on, nothing the
        # previous worker still had in hand can commit.
        with open_database(dsn, f"pipeline-shard-{shard}") as conn:
            fence = take_over(conn, shard, lock.token.decode())
        log.info("shard %d: took the shard over at epoch %d", shard, fence.epoch)
        identity = identity_config(plc_url, dns_server, allow_private_addresses, resolve_timeout)
        log.info("shard %d: %s", shard, start_line(identity, dsn, redis=url))
        config = WorkerConfig(
            shard=shard, shards=shards, dsn=dsn, pool_size=pool_size,
            slots=max(1, max_user_creations // shards), resolve_timeout=resolve_timeout,
            identity=identity, source="redis", pds=pds_config().share(shards),
            backfill_new_users=backfill_new_users,
            backfill_concurrency=max(1, backfill_concurrency // shards),
            max_repo_bytes=max_repo_bytes, refresh_interval=refresh_interval, epoch=fence.epoch,
            lease=lock_ttl, log_level=log_level.upper(), log_format=log_format(),
            verify=not no_verify,
        )
        holder: dict[str, Any] = {}

        def on_source(name: str) -> None:  # dead letters name the source of their batch
            holder["w"].config = dataclasses.replace(holder["w"].config, source=name)

        link = RedisWorkerLink(client, shard, shards, lock, on_source=on_source)
        try:
            holder["w"] = ShardWorker(config, link)  # type: ignore[arg-type]
            state["link"] = link
            if state["stop"]:
                link.stop()
            log.info("shard %d: worker %s running (pool of %d connections)", shard,
                     link.consumer, pool_size)
            holder["w"].run()
            holder["w"].pool.close()
        finally:
            link.close()
        click.echo(f"shard {shard}: stopped after {link.entries_done} batches"
                   f" ({link.reclaimed} taken over from a previous worker)")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else RET_ERROR
    except StaleEpoch as exc:
        click.echo(f"pipeline: {exc}: this worker stops; its last transaction rolled back and "
                   f"is left to the new worker", err=True)
        code = RET_ERROR
    except Exception:
        log.exception("shard %d: worker failed", shard)
        code = RET_ERROR
    finally:
        lock.release()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the identity threads are not worth waiting for


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command()
@database_options
@common_options
def upgrade(dsn: str | None, data_dir: str, log_level: str) -> None:
    """Apply schema migrations, then fill counts of records older than them (run does this too)."""
    from shards.store import migrations

    setup_logging(log_level)
    dsn = resolve_dsn(dsn, data_dir)
    with connect_database(dsn) as conn:
        applied = migrations.upgrade(conn)
    click.echo("applied " + ", ".join(applied) if applied else "schema is up to date")
    for line in fill_counts(dsn):
        click.echo(line)


main.add_command(backfill)
main.add_command(status)
main.add_command(dead_letters)


if __name__ == "__main__":
    main()
