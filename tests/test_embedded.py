"""The embedded server: a fresh data dir gets the current PostgreSQL, an older one's data dir is
refused untouched, and tools.upgrade_data_dir copies its databases over."""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pipeline import embedded
from tests.conftest import DATA, ROOT, digest, fake_network, identity_args, query, run_pipeline
from tools.upgrade_data_dir import PORT, Owner, old_server

OLD_BIN = Path("/usr/lib/postgresql/15/bin")
CORPUS = str(DATA / "expected_v1.jsonl")


def scratch_dir() -> Path:
    """A directory in /tmp that a server running as another user (we may be root) can reach."""
    path = Path(tempfile.mkdtemp(prefix="pipeline-test-"))
    path.chmod(0o755)
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Mode, owner and content hash of everything under `root`."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            st = path.lstat()
            content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, content)
    return out


@pytest.fixture
def old_data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir laid out as pipeline keeps it (`<dir>/pg`), made by PostgreSQL 15's initdb
    with the options pgserver used."""
    if not (OLD_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL 15 in {OLD_BIN}")
    base = scratch_dir()
    pgdata = base / embedded.SERVER_DIR
    pgdata.mkdir(mode=0o700)
    if os.geteuid() == 0:  # initdb refuses root: it runs as the owner of the directory
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and no postgres user to run initdb as")
        os.chown(pgdata, user.pw_uid, user.pw_gid)
    code = Owner.of(pgdata).run([str(OLD_BIN / "initdb"), "-D", str(pgdata), "-U", "postgres",
                                 "--auth=trust", "--encoding=utf8"], tmp_path / "initdb.log")
    assert code == 0, (tmp_path / "initdb.log").read_text()
    yield base
    shutil.rmtree(base)


def test_a_fresh_data_dir_starts_the_current_server() -> None:
    data_dir = scratch_dir()
    try:
        result = run_pipeline("status", "--data-dir", str(data_dir), "--shards", "1")
        assert result.returncode == 0, result.stderr
        version = embedded.server_version(embedded.bin_dir())
        label = f"PostgreSQL {version} (embedded, {data_dir})"
        assert f"pipeline: {label}" in result.stderr.splitlines()
        assert result.stdout.splitlines()[0] == f"server  {label}"
        assert (data_dir / "pg" / "PG_VERSION").read_text().strip() == version.split(".")[0]
        assert embedded.major(version) >= (18,)
    finally:
        shutil.rmtree(data_dir)


def test_status_names_the_server_of_a_dsn(dsn: str) -> None:
    number = int(query(dsn, "SHOW server_version_num")[0][0])
    result = run_pipeline("status", "--dsn", dsn, "--json")
    assert result.returncode == 0, result.stderr
    server = json.loads(result.stdout)["server"]
    assert server.startswith(f"PostgreSQL {number // 10000}.{number % 10000} (")
    assert server.endswith(f"/{psycopg.conninfo.conninfo_to_dict(dsn)['dbname']})")
    assert f"pipeline: {server}" in result.stderr.splitlines()


def test_an_older_servers_data_dir_is_refused_and_left_as_it_is(old_data_dir: Path) -> None:
    before = snapshot(old_data_dir)
    for args in (["run", "--replay", CORPUS], ["status"], ["db", "upgrade"]):
        result = run_pipeline(*args, "--data-dir", str(old_data_dir), timeout=60)
        assert result.returncode == 3, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"pipeline: {old_data_dir}/pg holds a PostgreSQL 15 database, "
                               f"which the embedded PostgreSQL ")
        assert "it was left as it is" in line
        assert (f"-m tools.upgrade_data_dir {old_data_dir} NEW_DIR --old-bin "
                f"<PostgreSQL 15's bin directory>") in line
        assert line.endswith("or start afresh with another --data-dir.")
    assert snapshot(old_data_dir) == before


def test_the_refusal_says_where_the_old_server_comes_from() -> None:
    """pgserver 0.1.4 made the PostgreSQL 16 data dirs; a newer data dir needs a newer pipeline."""
    data_dir = Path("/srv/pipeline/.pipeline-data")
    old = embedded.refusal(data_dir, "16", "18.6")
    assert (f"{sys.executable} -m pip install --no-deps --target /tmp/pgserver-0.1.4 "
            f"pgserver==0.1.4 && {sys.executable} -m tools.upgrade_data_dir {data_dir} NEW_DIR "
            f"--old-bin /tmp/pgserver-0.1.4/pgserver/pginstall/bin;") in old
    newer = embedded.refusal(data_dir, "19", "18.6")
    assert "Use the release of the pipeline that made it, or another --data-dir." in newer
    assert "tools.upgrade_data_dir" not in newer


def test_the_upgrade_tool_copies_every_row_and_only_reads_the_old_dir(old_data_dir: Path) -> None:
    pgdata = old_data_dir / embedded.SERVER_DIR
    docs = json.loads((DATA / "did_docs.json").read_text())
    with old_server(OLD_BIN, pgdata, Owner.of(pgdata)) as sockets:
        old_dsn = psycopg.conninfo.make_conninfo(host=str(sockets), port=PORT, user="postgres",
                                                 dbname="postgres")
        with fake_network(docs) as net:
            result = run_pipeline("run", "--replay", CORPUS, "--dsn", old_dsn,
                                  *identity_args(*net))
        assert result.returncode == 0, result.stderr
        assert "pipeline: PostgreSQL 15." in result.stderr
        expected = digest(old_dsn)
    assert int(expected["likes"].split(":")[0]) > 0
    before = snapshot(old_data_dir)
    parent = scratch_dir()
    new_dir = parent / "new"
    tool = [sys.executable, "-m", "tools.upgrade_data_dir", str(old_data_dir), str(new_dir),
            "--old-bin", str(OLD_BIN)]
    try:
        wrong = subprocess.run([*tool, "--old-user", "nobody"], capture_output=True, text=True,
                               timeout=240, cwd=ROOT)
        assert wrong.returncode == 1 and "nothing was copied" in wrong.stderr, wrong.stderr
        assert not list(parent.iterdir())  # what it had made is gone
        done = subprocess.run(tool, capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert snapshot(old_data_dir) == before
        assert [p.name for p in parent.iterdir()] == ["new"]  # the scratch copy is gone
        new_dsn = embedded.start(str(new_dir))
        try:
            assert digest(new_dsn) == expected
        finally:
            embedded.stop(new_dsn)
        again = subprocess.run(tool, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert again.returncode == 2 and "exists and is not empty" in again.stderr
    finally:
        shutil.rmtree(parent)
