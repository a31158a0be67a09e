"""End-to-end benchmark: generate, replay through `pipeline run`, and compare with a raw COPY.

    python -m tools.bench --events 1000000 --dids 100000 --profile healthy --profile slow

Each run gets a fresh database on the server (the --dsn one, or an embedded PostgreSQL in a
temporary directory), a PLC stub, a DNS stub and a PDS stub in their own processes (the PLC stub in
the chosen profile: healthy, slow or down, or each in turn when several are given, slow and down
then reported as a share of healthy; the DNS stub answers `_atproto.<handle>` TXT for every
generated handle, and points the 18 PDS host names at the PDS stub, which holds a profile for 80%
of the authors), and runs `python -m pipeline run --replay ...` as a subprocess, with profile
fetching on or off (--profiles; `alternate` takes turns, for ratios taken close together). Every
0.2 s it samples the pipeline's connections in pg_stat_activity (application_name LIKE 'pipeline%',
that database only) and the RSS of the supervisor and of each worker process (the peak is the
larger of the samples and the kernel's high-water mark, VmHWM). Then, on the same server, it times
two COPYs: one of as many like-shaped rows as there are events into a plain table without indexes
(the raw figure), and one of the very rows the run wrote into empty tables shaped like the
project's, with the same keys and indexes (the fair limit: what the database itself can take of
this work). It reports the pipeline's events/s against both, and the CPU seconds of each part
(supervisor, workers, PostgreSQL backends, stubs). `--format firehose` replays the same events as
signed firehose frames (tools.generate.write_frames), which the shards verify; `--format both`
alternates the two in each run and reports the firehose's share of Jetstream's events/s.

`--hot-posts 5 --hot-share 0.3` sends 30% of the likes to five posts (and `--hot-users`, that share
of the follows to a few users): what every shard counts at once when a post goes viral.
`--hot-author 0.15` gives 15% of all events to one author: one shard gets them all.

Targets (2 cores, 8 shards): healthy events/s >= 0.25 of the schema-shaped COPY's rows/s, on 200k
and 1M events; slow (10% of DIDs hanging) >= 85% of healthy; down >= 90% of healthy; peak RSS
< 150 MB per process; connections never above the budget; the verified firehose replay >= 50%
of the Jetstream replay's events/s on the same events; with profiles fetched from the PDS stub
>= 90% of the events/s without.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import orjson
import psutil
import psycopg
from psycopg import sql

from tools.generate import Hot, hot_options

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EVERY = 0.2
MB = 1024 * 1024
TARGET_SCHEMA_RATIO = 0.25
TARGET_RSS_MB = 150
TARGET_FIREHOSE = 0.5  # verified firehose events/s against Jetstream's, same events
TARGET_PROFILES = 0.9  # events/s with profiles fetched from the PDS stub against without
TARGET_AGAINST_HEALTHY = {"slow": 0.85, "down": 0.90}  # a PLC profile's events/s against healthy
MONITOR_APP = "bench-monitor"  # must not match 'pipeline%'
ISSUE_RE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|Error:|Exception")


class BenchError(RuntimeError):
    """A run could not be completed (stub did not start, pipeline failed, ...)."""


# --- data -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataFiles:
    events: Path
    docs: Path
    dns: Path
    profiles: Path
    frames: Path | None = None  # the same events as signed firehose frames

    def replay(self, fmt: str) -> Path:
        return self.frames if fmt == "firehose" and self.frames is not None else self.events


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def ensure_data(data_dir: Path, n_events: int, n_dids: int, seed: int,
                echo: Any = print, frames: bool = False, hot: Hot = Hot()) -> DataFiles:
    """The replay file (and with `frames` its firehose recording), the DID documents, the DNS
    records and the PDS stub's profiles, generated once per key."""
    from tools.generate import (
        did_documents, pds_host, profile_records, write_frames, write_replay,
    )

    data_dir.mkdir(parents=True, exist_ok=True)
    tag = (f"-hot-{hot.posts}-{hot.users}-{hot.share}" if hot.posts or hot.users or hot.share
           else "") + (f"-author-{hot.author}" if hot.author else "")
    files = DataFiles(events=data_dir / f"events-{n_events}-{n_dids}-{seed}{tag}.jsonl",
                      docs=data_dir / f"docs-keys-{n_dids}-{seed}.json",
                      dns=data_dir / f"dns-pds-{n_dids}-{seed}.json",
                      profiles=data_dir / f"profiles-{n_dids}-{seed}.json",
                      frames=data_dir / f"frames-{n_events}-{n_dids}-{seed}{tag}.bin" if frames
                      else None)
    for path, write in ((files.events, write_replay), (files.frames, write_frames)):
        if path is not None and not path.exists():
            started = time.perf_counter()
            _atomic_write(path, lambda p: write(p, n_events, n_dids, seed, hot))  # noqa: B023
            echo(f"generated {path} in {time.perf_counter() - started:.1f} s")
    if not files.docs.exists() or not files.dns.exists():
        docs = did_documents(n_dids, seed)
        records: dict[str, dict[str, list[str]]] = {}
        for did, doc in docs.items():
            for aka in doc.get("alsoKnownAs", []):
                if aka.startswith("at://"):
                    records.setdefault(f"_atproto.{aka[5:]}", {}).setdefault("TXT", []).append(
                        f"did={did}")
            records[pds_host(did)] = {"A": ["127.0.0.1"]}  # the PDS stub
        _atomic_write(files.docs, lambda p: p.write_bytes(orjson.dumps(docs)))
        _atomic_write(files.dns, lambda p: p.write_bytes(orjson.dumps(records)))
    if not files.profiles.exists():
        _atomic_write(files.profiles,
                      lambda p: p.write_bytes(orjson.dumps(profile_records(n_dids, seed))))
    return files


_ENDPOINT = re.compile(rb'"serviceEndpoint":"https://([a-z0-9.-]+)"')


def docs_for_pds(docs: Path, port: int, out: Path) -> Path:
    """The DID documents with every PDS endpoint at `http://<host>:<port>` (the PDS stub)."""
    out.write_bytes(_ENDPOINT.sub(rb'"serviceEndpoint":"http://\1:' + str(port).encode() + b'"',
                                  docs.read_bytes()))
    return out


def _iso_from_us(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, timezone.utc).isoformat()


def copy_rows(events_path: Path) -> list[tuple[str | None, ...]]:
    """One like-shaped row per event (uri, cid, author_did, subject_uri, subject_cid, created_at).

    Commits give their record's URI, CID and `subject` strong reference (likes and reposts;
    NULL otherwise) and `createdAt`; identity and account events a synthetic URI and their time.
    """
    rows: list[tuple[str | None, ...]] = []
    append, loads = rows.append, orjson.loads
    with open(events_path, "rb") as f:
        for line in f:
            try:
                ev = loads(line)
            except orjson.JSONDecodeError:
                continue
            did = ev.get("did")
            commit = ev.get("commit")
            subject_uri = subject_cid = created = cid = None
            if isinstance(commit, dict):
                uri = f"at://{did}/{commit.get('collection')}/{commit.get('rkey')}"
                cid = commit.get("cid")
                record = commit.get("record")
                if isinstance(record, dict):
                    subject = record.get("subject")
                    if isinstance(subject, dict):
                        subject_uri, subject_cid = subject.get("uri"), subject.get("cid")
                    created = record.get("createdAt")
            else:
                uri = f"at://{did}/{ev.get('kind')}/{ev.get('time_us')}"
            if not isinstance(created, str):
                created = _iso_from_us(int(ev.get("time_us") or 0))
            append((uri, cid, did, subject_uri, subject_cid, created))
    return rows


def raw_copy(dsn: str, rows: list[tuple[str | None, ...]]) -> tuple[float, int]:
    """Seconds for one COPY of `rows` into a fresh plain table (commit included); rows counted."""
    table = f"bench_copy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, application_name=MONITOR_APP) as conn:
        conn.execute(sql.SQL(
            "CREATE TABLE {} (uri text, cid text, author_did text, subject_uri text,"
            " subject_cid text, created_at timestamptz)").format(sql.Identifier(table)))
        conn.commit()
        try:
            with conn.cursor() as cur:
                started = time.perf_counter()
                with cur.copy(sql.SQL(
                        "COPY {} (uri, cid, author_did, subject_uri, subject_cid, created_at)"
                        " FROM STDIN").format(sql.Identifier(table))) as copy:
                    write_row = copy.write_row
                    for row in rows:
                        write_row(row)
                conn.commit()
                seconds = time.perf_counter() - started
            count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(table))).fetchone()[0]
        finally:
            conn.rollback()
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            conn.commit()
    return seconds, count


SKIP_TABLES = ("schema_migrations", "cursors")  # bookkeeping, not rows of events


def schema_copy(dsn: str) -> tuple[float, int]:
    """Seconds for one COPY of every row the run wrote into empty tables shaped like the
    project's (same keys, indexes and defaults: `LIKE ... INCLUDING ALL`), in one transaction
    with its commit; rows counted. The rows are read out first, untimed."""
    with psycopg.connect(dsn, application_name=MONITOR_APP) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> ALL(%s) AND tablename NOT LIKE 'bench%%' ORDER BY tablename",
            (list(SKIP_TABLES),))]
        loads: list[tuple[str, sql.Composed, list[bytes], int]] = []
        for table in tables:
            cols = [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public'"
                " AND table_name = %s AND is_generated = 'NEVER' ORDER BY ordinal_position",
                (table,))]
            col_list = sql.SQL(", ").join(map(sql.Identifier, cols))
            chunks: list[bytes] = []
            with conn.cursor() as cur:
                with cur.copy(sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)").format(
                        col_list, sql.Identifier(table))) as out:
                    chunks.extend(bytes(chunk) for chunk in out)
                count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                    sql.Identifier(table))).fetchone()[0]
            if count:
                loads.append((f"bench_shape_{table}", col_list, chunks, count))
                conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    sql.Identifier(f"bench_shape_{table}"), sql.Identifier(table)))
        conn.commit()
        try:
            started = time.perf_counter()
            with conn.cursor() as cur:
                for shaped, col_list, chunks, _count in loads:
                    with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
                            sql.Identifier(shaped), col_list)) as copy:
                        for chunk in chunks:
                            copy.write(chunk)
            conn.commit()
            seconds = time.perf_counter() - started
        finally:
            conn.rollback()
            for shaped, *_ in loads:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(shaped)))
            conn.commit()
    return seconds, sum(count for *_, count in loads)


# --- processes --------------------------------------------------------------------------------
class Children:
    """Every process we start, in its own session; killed (with descendants) on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.seen: dict[int, psutil.Process] = {}  # descendants met while sampling

    def start(self, cmd: list[str], log: Path, stdout: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        err = open(log, "wb")
        out = open(stdout, "wb") if stdout is not None else None
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                    stdout=out if out is not None else err,
                                    stderr=err, cwd=ROOT, env=env, start_new_session=True)
        finally:
            err.close()
            if out is not None:
                out.close()
        self.procs.append(proc)
        return proc

    def remember(self, procs: list[psutil.Process]) -> None:
        for p in procs:
            self.seen.setdefault(p.pid, p)

    def descendants(self, proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
        try:
            found = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        self.remember(found)
        return found

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM to its process group, then SIGKILL to the group and to known descendants."""
        if proc not in self.procs:
            return
        self.descendants(proc)
        if proc.poll() is None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, grace=2.0)
        for p in self.seen.values():
            with suppress(psutil.Error):
                if p.is_running():  # same pid and start time: still ours
                    p.kill()
        self.seen.clear()


def _wait_for_line(path: Path, pattern: re.Pattern[str], proc: subprocess.Popen[bytes],
                   timeout: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = pattern.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise BenchError(f"{' '.join(proc.args)} exited with {proc.returncode}: {text[-2000:]}")
        time.sleep(0.05)
    raise BenchError(f"{' '.join(proc.args)} did not start within {timeout:.0f} s")


def _hwm(pid: int) -> int:
    """The kernel's peak RSS of `pid` in bytes (VmHWM), 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a live process (0 where unknown or not ours to read)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def _split(before: Any, after: Any) -> tuple[float, float]:
    """Machine-wide (total, idle) CPU seconds between two psutil.cpu_times() readings."""
    def total(t: Any) -> float:  # guest time is already counted in user and nice
        return sum(getattr(t, f) for f in t._fields if f not in ("guest", "guest_nice"))

    def idle(t: Any) -> float:
        return t.idle + getattr(t, "iowait", 0.0)

    return total(after) - total(before), idle(after) - idle(before)


def _busy(before: Any, after: Any) -> float:
    total, idle = _split(before, after)
    return max(0.0, 1.0 - idle / total) if total > 0 else 0.0


def _busy_seconds(before: Any, after: Any) -> float:
    total, idle = _split(before, after)
    return max(0.0, total - idle)


def _backend_cpu(pid: int) -> float:
    """CPU seconds of a PostgreSQL backend when the server runs on this machine, else 0."""
    try:
        p = psutil.Process(pid)
        if not p.name().startswith("postgres"):
            return 0.0  # a remote server: this pid is somebody else here
        t = p.cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def _is_worker(p: psutil.Process, supervisor: int) -> bool:
    """The shard workers: the supervisor's grandchildren, forked by its fork server (its own
    children, the fork server and resource tracker, count as the supervisor's)."""
    try:
        return p.ppid() != supervisor
    except psutil.Error:
        return False


# --- one run ----------------------------------------------------------------------------------
@dataclass
class RunResult:
    run: int
    profile: str
    format: str
    fetch_profiles: bool
    events: int
    exit_code: int
    events_read: int
    committed: int
    dead_letters: int
    users_created: int
    users_fallback: int
    elapsed_s: float
    wall_s: float
    events_per_second: float
    summary_events_per_second: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    max_connections: int
    pool_budget: int
    supervisor_peak_rss_mb: float
    max_worker_peak_rss_mb: float
    worker_peak_rss_mb: list[float]
    workers_seen: int
    restarts: int
    db_retries: int
    copy_rows: int
    copy_seconds: float
    copy_rows_per_second: float
    ratio: float
    schema_copy_rows: int
    schema_copy_seconds: float
    schema_copy_rows_per_second: float
    schema_ratio: float  # events/s against the schema-shaped COPY's rows/s: the fair limit
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0  # share of all CPUs' time not idle during the pipeline run
    others_cpu_seconds: float = 0.0  # machine CPU time during the run not spent by ours
    load_average: float = 0.0  # 1-minute load average when the run started
    identity: dict[str, int] = field(default_factory=dict)  # non-zero resolution counters
    pds: dict[str, int] = field(default_factory=dict)  # non-zero PDS fetch counters
    stderr_issues: list[str] = field(default_factory=list)
    stderr_issue_count: int = 0
    log_dir: str = ""
    database: str = ""  # the run's own database on the server, dropped at its end


@contextmanager
def run_database(server_dsn: str) -> Iterator[str]:
    """A fresh database on the server, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True, application_name=MONITOR_APP) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(server_dsn)
    info["dbname"] = name
    try:
        yield psycopg.conninfo.make_conninfo(**info)
    finally:
        with psycopg.connect(server_dsn, autocommit=True, application_name=MONITOR_APP) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def _stderr_issues(path: Path, limit: int = 8) -> tuple[int, list[str]]:
    if not path.exists():
        return 0, []
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ISSUE_RE.search(ln)]
    distinct: list[str] = []
    for ln in lines:
        short = ln[:300]
        if short not in distinct:
            distinct.append(short)
        if len(distinct) >= limit:
            break
    return len(lines), distinct


def run_once(i: int, *, server_dsn: str, files: DataFiles, fmt: str, n_events: int, shards: int,
             pool_budget: int, profile: str, slow_fraction: float, seed: int,
             fetch_profiles: bool,
             log_dir: Path, children: Children, rows_cache: dict[str, Any], timeout: float,
             extra: tuple[str, ...], echo: Any = print) -> RunResult:
    log_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    with run_database(server_dsn) as dsn:
        dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        dns_proc = children.start([py, "-m", "tools.fake_dns", str(files.dns)],
                                  log_dir / "dns.log", stdout=log_dir / "dns.out")
        pds_proc = children.start([py, "-m", "tools.fake_pds", "--profiles", str(files.profiles),
                                   "--port", "0"], log_dir / "pds.log")
        plc_proc = None
        try:
            pds_url = _wait_for_line(log_dir / "pds.log", re.compile(r" at (http://\S+);"),
                                     pds_proc).group(1)
            docs = docs_for_pds(files.docs, int(pds_url.rsplit(":", 1)[1]), log_dir / "docs.json")
            atexit.register(docs.unlink, missing_ok=True)
            plc_proc = children.start(
                [py, "-m", "tools.fake_plc", "--docs", str(docs), "--port", "0",
                 "--profile", profile, "--slow-fraction", str(slow_fraction), "--seed", str(seed)],
                log_dir / "plc.log")
            dns_addr = _wait_for_line(log_dir / "dns.out", re.compile(r"^(\S+:\d+)$", re.M),
                                      dns_proc).group(1)
            plc_url = _wait_for_line(log_dir / "plc.log", re.compile(r" at (http://\S+);"),
                                     plc_proc).group(1)
            summary_path = log_dir / "summary.json"
            cmd = [py, "-m", "pipeline", "run", "--replay", str(files.replay(fmt)), "--dsn", dsn,
                   "--shards", str(shards), "--pool-budget", str(pool_budget),
                   "--plc-url", plc_url, "--dns-server", dns_addr, "--allow-private-addresses",
                   "--from-start", "--summary-json", str(summary_path),
                   *(() if fetch_profiles else ("--no-fetch-profiles",)), *extra]
            env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
            started = time.perf_counter()
            proc = children.start(cmd, log_dir / "pipeline.err", stdout=log_dir / "pipeline.out",
                                  env=env)
            sup = psutil.Process(proc.pid)
            peaks: dict[int, int] = {}
            cpu: dict[int, float] = {}  # last seen user+system seconds, per pipeline process
            backend_cpu: dict[int, float] = {}  # the same for the database's backends
            workers: set[int] = set()
            max_conn = 0
            machine_before = psutil.cpu_times()
            load_before = os.getloadavg()[0]
            with psycopg.connect(server_dsn, autocommit=True,
                                 application_name=MONITOR_APP) as mon:
                activity_sql = ("SELECT pid, application_name LIKE 'pipeline%%'"
                                " FROM pg_stat_activity WHERE datname = %s")
                while True:
                    done = proc.poll() is not None
                    tick = time.perf_counter()
                    activity = mon.execute(activity_sql, (dbname,)).fetchall()
                    max_conn = max(max_conn, sum(1 for _pid, ours in activity if ours))
                    for pid, ours in activity:
                        if ours:
                            backend_cpu[pid] = max(backend_cpu.get(pid, 0.0), _backend_cpu(pid))
                    for p in [sup, *children.descendants(proc)]:
                        try:
                            rss = max(p.memory_info().rss, _hwm(p.pid))
                            t = p.cpu_times()
                            cpu[p.pid] = t.user + t.system
                        except psutil.Error:
                            continue
                        peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
                        if p.pid != proc.pid and p.pid not in workers and _is_worker(p, proc.pid):
                            workers.add(p.pid)
                    if done:
                        break
                    if tick - started > timeout:
                        children.stop(proc)
                        raise BenchError(f"run {i}: the pipeline did not finish in {timeout:.0f} s"
                                         f" (logs in {log_dir})")
                    time.sleep(max(0.0, SAMPLE_EVERY - (time.perf_counter() - tick)))
            wall = time.perf_counter() - started
            machine_after = psutil.cpu_times()
            code = proc.returncode
            children.stop(proc)
            stub_cpu = {"plc": _cpu_of(plc_proc.pid), "dns": _cpu_of(dns_proc.pid),
                        "pds": _cpu_of(pds_proc.pid)}
        finally:
            if plc_proc is not None:
                children.stop(plc_proc)
            children.stop(pds_proc)
            children.stop(dns_proc)
        n_issues, issues = _stderr_issues(log_dir / "pipeline.err")
        if code != 0 or not summary_path.exists():
            tail = (log_dir / "pipeline.err").read_text(errors="replace")[-3000:]
            raise BenchError(f"run {i}: pipeline exited with {code} (logs in {log_dir}):\n{tail}")
        summary = orjson.loads(summary_path.read_bytes())

        if "rows" not in rows_cache:
            t0 = time.perf_counter()
            rows_cache["rows"] = copy_rows(files.events)
            echo(f"  built {len(rows_cache['rows']):,} COPY rows in {time.perf_counter() - t0:.1f} s"
                 " (not timed)")
        rows = rows_cache["rows"][:n_events]
        copy_s, copied = raw_copy(dsn, rows)
        shape_s, shaped = schema_copy(dsn)

    elapsed = float(summary.get("elapsed") or 0.0)
    committed = int(summary.get("committed") or 0)
    eps = committed / elapsed if elapsed > 0 else 0.0
    copy_rps = copied / copy_s if copy_s > 0 else 0.0
    shape_rps = shaped / shape_s if shape_s > 0 else 0.0
    worker_peaks = sorted((peaks[p] / MB for p in workers if p in peaks), reverse=True)
    return RunResult(
        run=i, profile=profile, format=fmt, fetch_profiles=fetch_profiles, events=n_events,
        exit_code=code,
        events_read=int(summary.get("events_read") or 0), committed=committed,
        dead_letters=int(summary.get("dead_letters") or 0),
        users_created=int(summary.get("users_created") or 0),
        users_fallback=int(summary.get("users_fallback") or 0),
        elapsed_s=elapsed, wall_s=wall, events_per_second=eps,
        summary_events_per_second=float(summary.get("events_per_second") or 0.0),
        latency_p50_ms=summary.get("latency_p50_ms"), latency_p99_ms=summary.get("latency_p99_ms"),
        max_connections=max_conn, pool_budget=pool_budget,
        supervisor_peak_rss_mb=peaks.get(proc.pid, 0) / MB,
        max_worker_peak_rss_mb=worker_peaks[0] if worker_peaks else 0.0,
        worker_peak_rss_mb=[round(x, 1) for x in worker_peaks], workers_seen=len(workers),
        restarts=int(summary.get("restarts") or 0), db_retries=int(summary.get("db_retries") or 0),
        copy_rows=copied, copy_seconds=copy_s, copy_rows_per_second=copy_rps,
        ratio=eps / copy_rps if copy_rps else 0.0,
        schema_copy_rows=shaped, schema_copy_seconds=shape_s,
        schema_copy_rows_per_second=shape_rps, schema_ratio=eps / shape_rps if shape_rps else 0.0,
        cpu_seconds={
            "supervisor": round(sum(c for p, c in cpu.items() if p not in workers), 1),
            "workers": round(sum(cpu.get(p, 0.0) for p in workers), 1),
            "postgres_backends": round(sum(backend_cpu.values()), 1),
            "plc_stub": round(stub_cpu["plc"], 1), "dns_stub": round(stub_cpu["dns"], 1),
            "pds_stub": round(stub_cpu["pds"], 1)},
        others_cpu_seconds=round(max(0.0, _busy_seconds(machine_before, machine_after) - (
            sum(cpu.values()) + sum(backend_cpu.values()) + sum(stub_cpu.values()))), 1),
        machine_busy=_busy(machine_before, machine_after),
        load_average=round(load_before, 2),
        identity={k: v for k, v in (summary.get("identity") or {}).items()
                  if v and k.startswith(("resolution.", "breaker.trips", "breaker.rejected"))},
        pds={k[4:]: v for k, v in (summary.get("identity") or {}).items()
             if v and k.startswith("pds.")},
        stderr_issues=issues, stderr_issue_count=n_issues, log_dir=str(log_dir), database=dbname,
    )


# --- reporting --------------------------------------------------------------------------------
MEDIAN_KEYS = ("events_per_second", "latency_p50_ms", "latency_p99_ms", "max_connections",
               "supervisor_peak_rss_mb", "max_worker_peak_rss_mb", "copy_rows_per_second", "ratio",
               "schema_copy_rows_per_second", "schema_ratio", "elapsed_s", "wall_s")


def medians(results: list[RunResult]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in MEDIAN_KEYS:
        values = [getattr(r, key) for r in results if getattr(r, key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} ms"


def format_line(label: str, f: dict[str, Any], budget: int) -> str:
    return (f"{label}: {f['events_per_second']:,.0f} events/s, read-to-commit p50 "
            f"{_ms(f['latency_p50_ms'])} p99 {_ms(f['latency_p99_ms'])}, max connections "
            f"{f['max_connections']:.0f}/{budget}, peak RSS supervisor "
            f"{f['supervisor_peak_rss_mb']:.0f} MB, worker max {f['max_worker_peak_rss_mb']:.0f} MB,"
            f" raw COPY {f['copy_rows_per_second']:,.0f} rows/s (ratio {f['ratio']:.1%}),"
            f" schema-shaped COPY {f['schema_copy_rows_per_second']:,.0f} rows/s"
            f" (ratio {f['schema_ratio']:.2f})")


def target_lines(m: dict[str, Any], profile: str, budget: int,
                 healthy_run: bool = False) -> list[str]:
    """The targets one setting's medians are held to; `healthy_run`: a healthy PLC ran beside
    it, so slow and down are compared with it after these lines."""
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    rss = max(m["max_worker_peak_rss_mb"], m["supervisor_peak_rss_mb"])
    lines = [f"  max connections {m['max_connections']:.0f} <= budget {budget}: "
             f"{mark(m['max_connections'] <= budget)}",
             f"  peak RSS per process {rss:.0f} MB < {TARGET_RSS_MB} MB: {mark(rss < TARGET_RSS_MB)}"]
    if profile == "healthy":
        lines.append(f"  events/s against the schema-shaped COPY {m['schema_ratio']:.2f} >= "
                     f"{TARGET_SCHEMA_RATIO}: {mark(m['schema_ratio'] >= TARGET_SCHEMA_RATIO)}")
    elif not healthy_run:
        lines.append(f"  compare: {profile} should reach >= {TARGET_AGAINST_HEALTHY[profile]:.0%}"
                     " of a healthy run's events/s taken close to it (--profile healthy"
                     f" --profile {profile})")
    return lines


def share_line(what: str, against: str, these: list[RunResult], those: list[RunResult],
               target: float) -> str:
    """`what` as a share of `those` (medians, and each pair of runs), against its target."""
    share, pairs = _share(these, those)
    return (f"  {what} {share:.0%} {against} (medians; pairs "
            + ", ".join(f"{p:.0%}" for p in pairs) + f") >= {target:.0%}: "
            + ("ok" if share >= target else "MISSED"))


def report_run(r: RunResult, label: str, n_events: int, budget: int) -> None:
    click.echo(format_line(label, asdict(r), budget)
               + f" [{r.committed:,} committed, {r.dead_letters} dead letters, "
               f"{r.users_created:,} users ({r.users_fallback:,} fallback), "
               f"{r.elapsed_s:.1f} s, wall {r.wall_s:.1f} s, restarts {r.restarts}]")
    c = r.cpu_seconds
    click.echo(f"  CPU s: workers {c['workers']}, supervisor {c['supervisor']}, postgres "
               f"backends {c['postgres_backends']}, PLC stub {c['plc_stub']}, DNS stub "
               f"{c['dns_stub']}, PDS stub {c['pds_stub']}; machine busy {r.machine_busy:.0%} of "
               f"{os.cpu_count()} CPUs, others' CPU {r.others_cpu_seconds} s (load "
               f"{r.load_average} at start); identity: {r.identity}; PDS: {r.pds}")
    if r.stderr_issue_count:
        click.echo(f"  pipeline stderr: {r.stderr_issue_count} warning/error line(s), e.g.:")
        for line in r.stderr_issues[:5]:
            click.echo(f"    {line}")
    if r.committed + r.dead_letters != r.events_read or r.events_read != n_events:
        click.echo(f"  note: read {r.events_read:,}, committed {r.committed:,}, dead "
                   f"{r.dead_letters:,} (expected {n_events:,} read)")


def _variant(fmt: str, fetch: bool, plc: str, formats: bool, fetches: bool, plcs: bool) -> str:
    """What tells a run's setting apart, when more than one is run: "firehose, profiles on"."""
    parts = (([fmt] if formats else []) + ([f"profiles {'on' if fetch else 'off'}"] if fetches
                                           else []) + ([f"PLC {plc}"] if plcs else []))
    return ", ".join(parts)


def _share(these: list[RunResult], those: list[RunResult]) -> tuple[float, list[float]]:
    """Median events/s of `these` against `those`, and the ratio of each pair of runs."""
    pairs = [a.events_per_second / b.events_per_second
             for a, b in zip(these, those) if b.events_per_second]
    share = (medians(these)["events_per_second"] or 0) / (
        medians(those)["events_per_second"] or 1)
    return share, pairs


# --- command ----------------------------------------------------------------------------------
def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--events", "n_events", type=click.IntRange(min=1), default=1_000_000,
              show_default=True, help="Events to generate and replay.")
@click.option("--dids", "n_dids", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Distinct authors.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--pool-budget", type=click.IntRange(min=2), default=200, show_default=True)
@click.option("--profile", "plcs", type=click.Choice(["healthy", "slow", "down"]), multiple=True,
              default=["healthy"], show_default=True,
              help="PLC stub: a few ms; a fraction of DIDs held 60 s; refused. Repeat it to run "
                   "each in every round, slow and down reported against healthy.")
@click.option("--slow-fraction", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="With --profile slow: share of DIDs that never answer within 60 s.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds; each runs every format and profile setting asked for, in turn.")
@click.option("--format", "fmt", type=click.Choice(["jetstream", "firehose", "both"]),
              default="jetstream", show_default=True,
              help="Replay the events as Jetstream JSON lines, as signed firehose frames (verified"
                   " by the shards), or both alternately in each run, with their ratio.")
@click.option("--profiles", "profiles_mode", type=click.Choice(["on", "off", "alternate"]),
              default="on", show_default=True,
              help="Profile fetching from the PDS stub: on, off, or alternate on/off runs, with "
                   "their ratio.")
@click.option("--dsn", default=None, metavar="DSN",
              help="PostgreSQL server (a database is created and dropped per run). "
                   "Default: an embedded server in a temporary directory.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Directory caching the generated files (default: a temporary one).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write every run's figures and the medians as JSON.")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Longest one pipeline run may take (seconds).")
@click.option("--pipeline-arg", "extra", multiple=True, metavar="ARG",
              help="Extra argument for `pipeline run` (repeatable), e.g. --pipeline-arg=--batch-size=500.")
@hot_options
def main(n_events: int, n_dids: int, seed: int, shards: int, pool_budget: int,
         plcs: tuple[str, ...], slow_fraction: float, runs: int, fmt: str, profiles_mode: str,
         dsn: str | None, data_dir: str | None, json_out: str | None, timeout: float,
         extra: tuple[str, ...], hot_posts: int, hot_users: int, hot_share: float,
         hot_author: float) -> None:
    """Benchmark `pipeline run --replay` end to end against a raw COPY on the same server."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    children = Children()
    atexit.register(children.stop_all)
    scratch = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    # Registered before the embedded server's own atexit hook, so it runs after the server stops.
    atexit.register(shutil.rmtree, scratch, True)
    echo = lambda msg: click.echo(msg, err=True)  # noqa: E731
    try:
        formats = ["jetstream", "firehose"] if fmt == "both" else [fmt]
        hot = Hot(hot_posts, hot_users, hot_share, hot_author)
        files = ensure_data(Path(data_dir) if data_dir else scratch / "data", n_events, n_dids,
                            seed, echo=echo, frames="firehose" in formats, hot=hot)
        if dsn is None:
            from pipeline import embedded

            dsn = embedded.start(str(scratch / "pg"))
            echo(f"embedded PostgreSQL in {scratch / 'pg'}")
        logs = Path(data_dir) / "logs" if data_dir else scratch / "logs"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        results: list[RunResult] = []
        rows_cache: dict[str, Any] = {}
        fetches = [True, False] if profiles_mode == "alternate" else [profiles_mode == "on"]
        plcs = tuple(dict.fromkeys(plcs))
        # every round runs each in turn
        variants = [(f, p, plc) for plc in plcs for p in fetches for f in formats]
        names = {v: _variant(*v, len(formats) > 1, len(fetches) > 1, len(plcs) > 1)
                 for v in variants}
        label = {v: f" {name}" if name else "" for v, name in names.items()}
        click.echo(f"bench: {n_events:,} events, {n_dids:,} DIDs, {shards} shards, budget "
                   f"{pool_budget}, PLC {', '.join(plcs)}"
                   + (f" ({slow_fraction:.0%} hanging)" if "slow" in plcs else "")
                   + (f", {hot_share:.0%} of likes to {hot_posts} posts and of follows to "
                      f"{hot_users} users" if hot_share else "")
                   + (f", {hot_author:.0%} of the events by one author" if hot_author else "")
                   + f", profiles {profiles_mode}, {runs} round(s) of {len(variants)} run(s),"
                   f" {os.cpu_count()} CPUs")
        for i in range(1, runs + 1):
            for fmt_i, fetch, plc in variants:  # alternated: each sees the machine as it is
                r = run_once(i, server_dsn=dsn, files=files, fmt=fmt_i, n_events=n_events,
                             shards=shards, pool_budget=pool_budget, profile=plc,
                             slow_fraction=slow_fraction, seed=seed, fetch_profiles=fetch,
                             log_dir=logs / "-".join((stamp, plc, fmt_i,
                                                      "on" if fetch else "off", str(i))),
                             children=children, rows_cache=rows_cache, timeout=timeout,
                             extra=extra, echo=echo)
                results.append(r)
                report_run(r, f"run {i}/{runs}" + label[(fmt_i, fetch, plc)], n_events,
                           pool_budget)
        groups = {(f, p, plc): [r for r in results if r.format == f and r.fetch_profiles == p
                                and r.profile == plc]
                  for f, p, plc in variants}
        m = medians(groups[variants[0]])
        for key, rs in groups.items():
            click.echo(format_line(f"median of {len(rs)}" + label[key], medians(rs), pool_budget))
        click.echo("targets (meant for 2 cores, 8 shards):")
        for key, rs in groups.items():
            if names[key]:
                click.echo(f" {names[key]}:")
            for line in target_lines(medians(rs), key[2], pool_budget, "healthy" in plcs):
                click.echo(line)

        many = (len(formats) > 1, len(fetches) > 1, len(plcs) > 1)

        def but(f: str, fetch: bool, plc: str, compared: int) -> str:
            """The settings that tell this comparison from the others (the compared one left
            out: 0 format, 1 profile fetching, 2 PLC), as ", firehose, PLC slow"."""
            name = _variant(f, fetch, plc, *(several and i != compared
                                             for i, several in enumerate(many)))
            return f", {name}" if name else ""

        for fetch, plc in dict.fromkeys((p, plc) for _, p, plc in variants
                                        if len(formats) == 2):
            click.echo(share_line(
                "verified firehose", "of Jetstream's events/s" + but("", fetch, plc, 0),
                groups[("firehose", fetch, plc)], groups[("jetstream", fetch, plc)],
                TARGET_FIREHOSE))
        for f, plc in dict.fromkeys((f, plc) for f, _, plc in variants if len(fetches) == 2):
            click.echo(share_line(
                "with profiles", "of the events/s without" + but(f, True, plc, 1),
                groups[(f, True, plc)], groups[(f, False, plc)], TARGET_PROFILES))
        for f, fetch, plc in variants if "healthy" in plcs else ():
            if plc != "healthy":
                click.echo(share_line(
                    f"PLC {plc}", "of healthy's events/s" + but(f, fetch, plc, 2),
                    groups[(f, fetch, plc)], groups[(f, fetch, "healthy")],
                    TARGET_AGAINST_HEALTHY[plc]))
        if json_out:
            payload = {
                "config": {"events": n_events, "dids": n_dids, "seed": seed, "shards": shards,
                           "hot": asdict(hot),
                           "pool_budget": pool_budget, "profile": list(plcs),
                           "slow_fraction": slow_fraction, "runs": runs, "format": fmt,
                           "profiles": profiles_mode,
                           "cpus": os.cpu_count(), "extra": list(extra)},
                "runs": [asdict(r) for r in results],
                "medians": ({names[key]: medians(rs) for key, rs in groups.items()}
                            if len(groups) > 1 else m),
            }
            Path(json_out).write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    except BenchError as exc:
        children.stop_all()
        click.echo(f"bench: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        children.stop_all()
        click.echo("bench: interrupted; stopped every child process", err=True)
        sys.exit(130)
    finally:
        children.stop_all()


if __name__ == "__main__":
    main()
