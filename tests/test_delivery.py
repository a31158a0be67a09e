"""Nothing lost: killed workers, a killed supervisor, killed connections, signals, one run at a time."""
from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import orjson
import psutil
import pytest

from tests.conftest import (HOLD, database, digest, held, identity_args, kill_workers_midway,
                            query, rows_committed, run_pipeline, start_pipeline, wait_until,
                            workers)
from tools.generate import write_replay

EVENTS, DIDS, SEED = 100_000, 1_000, 11


@pytest.fixture(scope="module")
def replay_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("delivery") / "events.jsonl"
    write_replay(path, EVENTS, DIDS, seed=SEED)
    return path


@pytest.fixture(scope="module")
def clean_digest(server_dsn: str, replay_file: Path, net: tuple) -> Iterator[dict[str, str]]:
    """The content a clean run leaves: what every faulty run must end with too."""
    with database(server_dsn, f"t_clean_{uuid.uuid4().hex[:12]}") as dsn:
        result = run_pipeline(*args(dsn, replay_file, net))
        assert result.returncode == 0, result.stderr
        assert f"committed         {EVENTS}" in result.stdout
        yield digest(dsn)


def args(dsn: str, path: Path, net: tuple, *extra: str) -> list[str]:
    return ["run", "--replay", str(path), "--dsn", dsn, *identity_args(*net), "--batch-size", "500",
            "--log-level", "WARNING", *extra]








def test_workers_killed_midway_lose_nothing(dsn: str, replay_file: Path, net: tuple,
                                            gate: tuple[str, int],
                                            clean_digest: dict[str, str]) -> None:
    with held(net[0], gate[0]):
        proc = start_pipeline(*args(dsn, replay_file, net, *HOLD))
        kill_workers_midway(proc, dsn, kills=4, rows_between=8_000, seed=1)
        assert proc.poll() is None
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert int(re.search(r"worker restarts\s+(\d+)", out).group(1)) == 4
    assert digest(dsn) == clean_digest


def test_supervisor_killed_then_rerun_resumes(dsn: str, replay_file: Path, net: tuple,
                                              gate: tuple[str, int],
                                              clean_digest: dict[str, str]) -> None:
    plc, (did, offset) = net[0], gate
    with held(plc, did):
        proc = start_pipeline(*args(dsn, replay_file, net, *HOLD))
        wait_until(lambda: _cursor(dsn) > 0 and plc.requests_for(did) > 0)
        psutil.Process(proc.pid).send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    saved = _cursor(dsn)
    assert saved <= offset
    second = run_pipeline(*args(dsn, replay_file, net))
    assert second.returncode == 0, second.stderr
    read = int(re.search(r"events read\s+(\d+)", second.stdout).group(1))
    assert f"started at cursor {saved}" in second.stdout
    assert 0 < read < EVENTS
    with open(replay_file, "rb") as f:  # it read exactly the lines from the cursor on
        f.seek(saved)
        assert read == sum(1 for _ in f)
    assert digest(dsn) == clean_digest


def _cursor(dsn: str) -> int:
    try:
        rows = query(dsn, "SELECT cursor FROM cursors")
    except Exception:
        return 0
    return rows[0][0] if rows else 0


def test_connections_terminated_midway_lose_nothing(dsn: str, replay_file: Path, net: tuple,
                                                    gate: tuple[str, int],
                                                    clean_digest: dict[str, str]) -> None:
    with held(net[0], gate[0]):
        proc = start_pipeline(*args(dsn, replay_file, net, *HOLD))
        dbname = query(dsn, "SELECT current_database()")[0][0]
        for threshold in (10_000, 40_000):
            wait_until(lambda: rows_committed(dsn) > threshold)
            killed = query(dsn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                " WHERE application_name LIKE 'pipeline%%' AND datname = %s",
                           (dbname,))
            assert killed[0][0] > 0
    _out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert digest(dsn) == clean_digest


def test_sigterm_drains_saves_cursor_and_exits_zero(dsn: str, replay_file: Path, net: tuple,
                                                   clean_digest: dict[str, str]) -> None:
    proc = start_pipeline(*args(dsn, replay_file, net))
    wait_until(lambda: rows_committed(dsn) > 20_000)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 0, err
    saved = _cursor(dsn)
    assert 0 < saved < replay_file.stat().st_size
    assert f"cursor now {saved}" in out
    rest = run_pipeline(*args(dsn, replay_file, net))
    assert rest.returncode == 0, rest.stderr
    assert digest(dsn) == clean_digest


def test_second_run_of_the_same_source_exits_at_once(dsn: str, replay_file: Path,
                                                     net: tuple, gate: tuple[str, int]) -> None:
    with held(net[0], gate[0]):
        first = start_pipeline(*args(dsn, replay_file, net, *HOLD))
        wait_until(lambda: rows_committed(dsn) > 0)
        started = time.monotonic()
        second = run_pipeline(*args(dsn, replay_file, net))
        took = time.monotonic() - started
        assert second.returncode == 0
        assert "another run of" in second.stdout and "in progress" in second.stdout
        assert first.poll() is None, "the first run should still be working"
        assert took < 15
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert f"committed         {EVENTS}" in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_whole_process_group_is_a_clean_stop(
        dsn: str, replay_file: Path, net: tuple, tmp_path: Path, clean_digest: dict[str, str],
        signum: signal.Signals) -> None:
    """What systemd (KillMode=control-group), `timeout`, Ctrl-C and `kill -- -PGID` send."""
    figures = tmp_path / "summary.json"
    proc = start_pipeline(*args(dsn, replay_file, net, "--summary-json", str(figures)),
                          start_new_session=True)
    wait_until(lambda: rows_committed(dsn) > 20_000)
    os.killpg(proc.pid, signum)
    started = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 0, err
    assert "restarting" not in err and "exited" not in err, err
    first = orjson.loads(figures.read_bytes())
    assert first["restarts"] == 0
    assert 0 < first["events_read"] < EVENTS
    assert first["committed"] + first["dead_letters"] == first["events_read"]
    # every worker's own count of what it committed adds up to the supervisor's: nothing twice
    assert sum(s["committed"] for s in first["shards"]) == first["committed"]
    rest = run_pipeline(*args(dsn, replay_file, net))
    assert rest.returncode == 0, rest.stderr
    assert f"started at cursor {first['cursor']}" in rest.stdout
    assert int(re.search(r"events read\s+(\d+)", rest.stdout).group(1)) == \
        EVENTS - first["events_read"]
    assert digest(dsn) == clean_digest


def test_worker_dying_while_stopping_is_not_restarted(dsn: str, replay_file: Path, net: tuple,
                                                      gate: tuple[str, int],
                                                      clean_digest: dict[str, str]) -> None:
    """A stop waiting on a held author loses its workers: the run ends at once, restarting
    nobody, and leaves what they had not committed to the next run."""
    plc, (did, offset) = net[0], gate
    asked = plc.requests_for(did)  # by the module's earlier runs
    with held(plc, did):
        proc = start_pipeline(*args(dsn, replay_file, net, *HOLD), start_new_session=True)
        err = Lines(proc.stderr)
        wait_until(lambda: plc.requests_for(did) > asked)  # the stop will wait on that author
        parent = psutil.Process(proc.pid)
        before = {w.pid for w in workers(parent)}
        os.killpg(proc.pid, signal.SIGTERM)
        wait_until(lambda: err.has("received SIGTERM"))
        live = workers(parent)  # the group's SIGTERM ended none of them
        assert {w.pid for w in live} == before and len(before) == 4
        assert all(w.status() != psutil.STATUS_ZOMBIE for w in live)
        for w in live:
            w.kill()
        proc.wait(timeout=30)
        out = proc.stdout.read()
    err.thread.join(timeout=10)
    assert proc.returncode == 0, err.text()
    assert "restarting" not in err.text(), err.text()
    assert err.text().count("exited while stopping (killed by SIGKILL)") == 4, err.text()
    assert "left to the next run" in err.text()
    assert re.search(r"worker restarts\s+0;", out)
    saved = _cursor(dsn)
    assert 0 < saved <= offset
    rest = run_pipeline(*args(dsn, replay_file, net))
    assert rest.returncode == 0, rest.stderr
    assert f"started at cursor {saved}" in rest.stdout
    assert digest(dsn) == clean_digest


class Lines:
    """A running process's stderr, read line by line as it comes."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def text(self) -> str:
        return "".join(self.lines)
