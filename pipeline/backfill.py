"""`pipeline backfill`: repositories fetched from their PDS, verified whole, written like the
stream's events; a summary at the end, and a non-zero exit when any was refused or failed."""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field

import click

from pipeline.endpoints import start_line
from pipeline.options import (
    RET_ERROR,
    RET_OK,
    RET_USAGE,
    common_options,
    database_options,
    fail,
    identity_config,
    identity_options,
    max_repo_bytes_option,
    open_database,
    opt,
    pds_config,
    pds_limit_options,
    resolve_dsn,
    setup_logging,
)
from shards.backfill import DONE, FAILED, REFUSED, SKIPPED, Outcome
from shards.syntax import is_did, is_nsid

RET_INTERRUPTED = 130

log = logging.getLogger("pipeline")


@dataclass
class BackfillSummary:
    """What a backfill did, for people."""

    outcomes: list[Outcome] = field(default_factory=list)
    elapsed: float = 0.0

    def counts(self) -> Counter[str]:
        return Counter(o.result for o in self.outcomes)

    @property
    def ok(self) -> bool:
        counts = self.counts()
        return not counts[REFUSED] and not counts[FAILED]

    def render(self) -> str:
        c = self.counts()
        done = [o for o in self.outcomes if o.result == DONE]
        lines = [
            f"repositories      {len(self.outcomes)}: {c[DONE]} written, {c[SKIPPED]} skipped"
            f" (a newer rev already applied), {c[REFUSED]} refused, {c[FAILED]} failed",
            f"records           {sum(o.records for o in done):,}",
            f"bytes             {sum(o.size for o in self.outcomes):,} fetched",
            f"elapsed           {self.elapsed:.1f} s",
        ]
        for o in self.outcomes:
            if o.result in (REFUSED, FAILED):
                lines.append(f"{o.result:<17} {o.did}: {o.reason}")
        return "\n".join(lines)


def read_dids(arguments: tuple[str, ...], path: str | None) -> list[str]:
    """The DIDs of the arguments and the file (one a line; blank lines and # comments skipped),
    each once, in order. A malformed one is a usage error."""
    found = list(arguments)
    if path is not None:
        try:
            with click.open_file(path, encoding="utf-8") as f:
                found += [line.strip() for line in f
                          if line.strip() and not line.lstrip().startswith("#")]
        except OSError as exc:
            fail(f"cannot read --dids-file {path}: {exc.strerror}", RET_USAGE)
    for did in found:
        if not is_did(did):
            fail(f"{did[:200]!r} is not a DID", RET_USAGE)
    if not found:
        fail("give the DIDs to backfill, as arguments or with --dids-file", RET_USAGE)
    return list(dict.fromkeys(found))


@click.command("backfill")
@click.argument("dids", nargs=-1, metavar="[DID]...")
@opt("--dids-file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
     metavar="FILE", help="Also the DIDs in FILE, one a line (- for stdin; # starts a comment).")
@opt("--collections", multiple=True, metavar="NSID",
     help="Only the records of these collections (repeatable). Default: every collection.")
@opt("--concurrency", type=click.IntRange(min=1, max=256), default=4, show_default=True,
     help="Repositories fetched, verified and written at once (within --pds-rate and "
          "--pds-host-concurrency per host).")
@max_repo_bytes_option
@pds_limit_options
@identity_options
@database_options
@common_options
def backfill(dids: tuple[str, ...], dids_file: str | None, collections: tuple[str, ...],
             concurrency: int, max_repo_bytes: int, resolve_timeout: float,
             max_user_creations: int, plc_url: str, dns_server: str | None,
             allow_private_addresses: bool, dsn: str | None, data_dir: str,
             log_level: str) -> None:
    """Load repositories whole from their PDS (getRepo), verify them, write their records.

    Each repository's commit must hash to the CAR's root, name the DID and verify with the DID
    document's #atproto key; every block must hash to its CID; exactly the records the tree
    reaches are written, into the same tables and with the same JSON as stream events. One that
    fails a check is refused whole (kept in dead_letters). Exits 1 once every DID has been
    tried if any was refused or could not be fetched.

    \b
    Examples:
      pipeline backfill did:plc:53iucmf5ldftgqyf2ac7hmhd --dsn postgresql://localhost/bsky
      pipeline backfill --dids-file dids.txt --collections app.bsky.feed.post --concurrency 8
    """
    from shards.backfill import Backfill
    from shards.identity import Counters, build_directory
    from shards.pds.client import PdsClient
    from shards.store.pool import open_pool

    setup_logging(log_level)
    wanted = read_dids(dids, dids_file)
    for nsid in collections:
        if not is_nsid(nsid):
            fail(f"--collections {nsid[:200]!r} is not an NSID", RET_USAGE)
    dsn = resolve_dsn(dsn, data_dir)
    open_database(dsn).close()
    identity = identity_config(plc_url, dns_server, allow_private_addresses, resolve_timeout)
    log.info(start_line(identity, dsn))
    counters = Counters()
    directory = build_directory(identity, counters=counters)
    pool = open_pool(dsn, concurrency, "pipeline-backfill")
    job = Backfill(pool, directory, PdsClient(identity, pds_config(), counters),
                   max_bytes=max_repo_bytes, collections=set(collections) or None)
    summary, stop = BackfillSummary(), threading.Event()
    started = time.monotonic()
    threads = ThreadPoolExecutor(concurrency, thread_name_prefix="backfill")
    code = RET_OK
    try:
        futures = [threads.submit(job.repository, did, stop) for did in wanted]
        with ExitStack() as stack:
            bar = stack.enter_context(click.progressbar(
                length=len(wanted), label="repositories", file=sys.stderr,
                show_pos=True)) if sys.stderr.isatty() else None
            for future in as_completed(futures):
                summary.outcomes.append(future.result())
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:
        stop.set()
        threads.shutdown(wait=False, cancel_futures=True)
        code = RET_INTERRUPTED
    finally:
        threads.shutdown(wait=code == RET_OK)
        pool.close()
    summary.elapsed = time.monotonic() - started
    click.echo(summary.render())
    if code == RET_OK and not summary.ok:
        code = RET_ERROR
    sys.exit(code)
