"""Copies the databases of a data dir made by an older PostgreSQL into a new embedded data dir.

    python -m tools.upgrade_data_dir OLD_DATA_DIR NEW_DATA_DIR --old-bin DIR

A newer server cannot open an older one's files, so `pipeline` refuses such a data dir. Here the
old server (the programs in --old-bin) runs on a scratch copy, so OLD_DATA_DIR is only read; the
embedded server's pg_dump (the newer one, as PostgreSQL advises) reads every database from it and
pg_restore loads each into a fresh embedded server. Every table's rows are counted on both sides
before NEW_DATA_DIR gets its name: until then the work is in a hidden sibling, removed on failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import psycopg
from psycopg import sql

from pipeline import embedded
from pipeline.options import RET_ERROR, RET_USAGE, _short, fail

PORT = 5432  # only names the old server's socket file: it listens on no TCP address
COLUMN_OPTIONS = ("n_distinct", "n_distinct_inherited")  # every one PostgreSQL defines
START_TIMEOUT = 120  # seconds pg_ctl waits for the old server (crash recovery included)


@dataclass(frozen=True)
class Owner:
    """Who runs the old server: we do, or, when we are root (which PostgreSQL refuses to run
    as), the owner of its files."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def of(cls, pgdata: Path) -> Owner:
        if os.geteuid() != 0:
            return cls()
        st = pgdata.stat()
        if st.st_uid == 0:
            fail(f"{pgdata} belongs to root, as which no PostgreSQL server runs", RET_USAGE)
        return cls(st.st_uid, st.st_gid)

    def give(self, path: Path) -> None:
        """Makes `path` and everything under it the server user's."""
        if self.uid is None:
            return
        os.chown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)

    def run(self, args: list[str], log: Path) -> int:
        """Runs a server program as this user, its output appended to `log` (a pipe could be
        held open by the server it starts)."""
        user = {} if self.uid is None else {"user": self.uid, "group": self.gid, "extra_groups": []}
        with open(log, "a") as out:
            return subprocess.run(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                  cwd="/", **user).returncode


def find_pgdata(data_dir: Path) -> Path:
    """The server's files: `<data dir>/pg` as `pipeline` keeps them, or the dir itself."""
    for pgdata in (data_dir / embedded.SERVER_DIR, data_dir):
        if (pgdata / "PG_VERSION").is_file():
            return pgdata
    fail(f"{data_dir} holds no PostgreSQL data dir (no PG_VERSION in it or in its "
         f"{embedded.SERVER_DIR}/)", RET_USAGE)
    raise AssertionError  # fail() exits


def check_copyable(pgdata: Path) -> None:
    """A running server's files are not consistent, and links (pg_wal elsewhere, tablespaces)
    would let the old server write outside the copy."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        pid = 0
    if pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass  # left by a server that died: the copy recovers like any crash
        else:
            fail(f"the server of {pgdata} is running (pid {pid} in postmaster.pid): stop it "
                 f"first (end the pipeline commands using it)", RET_USAGE)
    for root, dirs, files in os.walk(pgdata):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                fail(f"{os.path.join(root, name)} is a link out of the data dir (pg_wal "
                     f"elsewhere or a tablespace): copy that data by hand", RET_USAGE)


@contextmanager
def old_server(bin_dir: Path, pgdata: Path, owner: Owner) -> Iterator[Path]:
    """Runs the old server on `pgdata` with a private socket dir, trusted there whatever its own
    pg_hba.conf says; yields the socket dir."""
    sockets = Path(tempfile.mkdtemp(prefix="pg-old-"))
    log, ctl_log = sockets / "server.log", sockets / "pg_ctl.log"
    (sockets / "pg_hba.conf").write_text("local all all trust\n")
    log.touch()
    owner.give(sockets)
    try:
        options = f"-k {sockets} -h '' -p {PORT} -c hba_file={sockets / 'pg_hba.conf'}"
        code = owner.run([str(bin_dir / "pg_ctl"), "start", "-w", "-t", str(START_TIMEOUT),
                          "-D", str(pgdata), "-l", str(log), "-o", options], ctl_log)
        if code:
            fail(f"the old server did not start: {_last_line(log) or _last_line(ctl_log)}",
                 RET_ERROR)
        try:
            yield sockets
        finally:
            owner.run([str(bin_dir / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(pgdata)],
                      ctl_log)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _last_line(log: Path) -> str:
    """The last thing the server or pg_ctl said, for a one-line error."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else ""


def _with_db(conninfo: str, dbname: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**params)


def databases(conninfo: str) -> list[str]:
    with psycopg.connect(conninfo) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate"
            " ORDER BY datname")]


def drop_unknown_column_options(conninfo: str) -> int:
    """Removes column options PostgreSQL does not define from the copy's own tables: some builds
    add their own (the postgresql-15 15.20 package tested here puts pg_attver on every column),
    which the new server would refuse on restore. Returns how many columns changed."""
    with psycopg.connect(conninfo) as conn:
        return conn.execute(
            "UPDATE pg_attribute SET attoptions = nullif(array(SELECT o FROM unnest(attoptions) o"
            "  WHERE split_part(o, '=', 1) = ANY(%(known)s)), '{}')"
            " WHERE attrelid >= 16384 AND attoptions IS NOT NULL"  # 16384: the first user object
            " AND EXISTS (SELECT FROM unnest(attoptions) o"
            "  WHERE split_part(o, '=', 1) <> ALL(%(known)s))",
            {"known": list(COLUMN_OPTIONS)}).rowcount


def row_counts(conninfo: str) -> dict[str, int]:
    """Rows of every table outside the system schemas, by schema.table."""
    with psycopg.connect(conninfo) as conn:
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE c.relkind = 'r'"
            " AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'").fetchall()
        return {f"{schema}.{table}": conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
                ).fetchone()[0] for schema, table in tables}


def _tool(name: str, *args: str) -> None:
    """Runs one of the embedded server's client programs; its first error line is ours."""
    result = subprocess.run([str(embedded.bin_dir() / name), *args], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL)
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if "error:" in line] or lines
        fail(f"{name} failed: {errors[0] if errors else f'exit {result.returncode}'}", RET_ERROR)


def copy_databases(old: str, new: str, scratch: Path) -> list[tuple[str, int, int, int]]:
    """Dumps every database of `old` and restores it into `new`, checking its row counts;
    returns (database, tables, rows, columns that lost options) of each."""
    done = []
    for dbname in databases(old):
        dropped = drop_unknown_column_options(_with_db(old, dbname))
        dump = scratch / f"{len(done)}.dump"
        _tool("pg_dump", "--format=custom", f"--file={dump}", f"--dbname={_with_db(old, dbname)}")
        target = _with_db(new, dbname)
        if dbname != "postgres":  # the one database a new server already has
            with psycopg.connect(new, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        # Ownership and grants name roles the new server does not have; pipeline uses its own.
        _tool("pg_restore", "--exit-on-error", "--single-transaction", "--no-owner",
              "--no-privileges", f"--dbname={target}", str(dump))
        before, after = row_counts(_with_db(old, dbname)), row_counts(target)
        if before != after:
            differ = sorted(t for t in before.keys() | after.keys() if before.get(t) != after.get(t))
            fail(f"database {dbname}: row counts differ after the copy in {', '.join(differ)}",
                 RET_ERROR)
        done.append((dbname, len(before), sum(before.values()), dropped))
    return done


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("old_data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("new_data_dir", type=click.Path(path_type=Path))
@click.option("--old-bin", required=True, metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="bin directory of the PostgreSQL that made OLD_DATA_DIR (pg_ctl, postgres).")
@click.option("--old-user", default="postgres", show_default=True,
              help="A superuser of the old server (pgserver's is postgres).")
def main(old_data_dir: Path, new_data_dir: Path, old_bin: Path, old_user: str) -> None:
    """Copy the databases of OLD_DATA_DIR (made by an older PostgreSQL) into NEW_DATA_DIR, a new
    data dir of the embedded server. OLD_DATA_DIR is never written to."""
    old_dir, new_dir = old_data_dir.absolute(), new_data_dir.absolute()
    pgdata = find_pgdata(old_dir)
    try:
        found = embedded.data_version(pgdata) or ""
    except embedded.EmbeddedError as exc:
        fail(str(exc), RET_USAGE)
    try:
        old_version = embedded.server_version(old_bin)
    except (OSError, subprocess.SubprocessError, embedded.EmbeddedError):
        fail(f"no runnable postgres in --old-bin {old_bin}", RET_USAGE)
    if embedded.major(old_version) != embedded.major(found):
        fail(f"{pgdata} was made by PostgreSQL {found}, but --old-bin holds PostgreSQL "
             f"{old_version}", RET_USAGE)
    if new_dir.exists() and (not new_dir.is_dir() or any(new_dir.iterdir())):
        fail(f"{new_dir} exists and is not empty: give a new directory", RET_USAGE)
    work = new_dir.parent / f".{new_dir.name}.partial"
    if work.exists():
        fail(f"{work} is left from an attempt that was cut short: remove it first", RET_USAGE)
    check_copyable(pgdata)
    try:
        copied = upgrade(pgdata, old_version, Owner.of(pgdata), old_bin, old_user, work)
    except (embedded.EmbeddedError, psycopg.Error, OSError) as exc:
        fail(f"nothing was copied: {_short(exc)}", RET_ERROR)
    work.rename(new_dir)
    for dbname, tables, rows, dropped in copied:
        click.echo(f"  {dbname}: {tables} tables, {rows:,} rows"
                   + (f" ({dropped} columns lost options only their server knew)" if dropped
                      else ""))
    click.echo(f"{new_dir} holds them on PostgreSQL {embedded.server_version(embedded.bin_dir())};"
               f" {old_dir} is unchanged: remove it once `pipeline status --data-dir {new_dir}`"
               f" shows what you expect")


def upgrade(pgdata: Path, old_version: str, owner: Owner, old_bin: Path, old_user: str,
            work: Path) -> list[tuple[str, int, int, int]]:
    """Fills `work` with a new embedded data dir holding the databases of `pgdata`, its server
    stopped again; on any failure removes `work` whole."""
    new_dsn = None
    try:
        new_dsn = embedded.start(str(work))
        copy = work / "old" / embedded.SERVER_DIR
        click.echo(f"copying {pgdata} for PostgreSQL {old_version} to run on")
        shutil.copytree(pgdata, copy, symlinks=True,
                        ignore=shutil.ignore_patterns("postmaster.pid"))
        owner.give(copy.parent)
        with old_server(old_bin, copy, owner) as sockets:
            old_dsn = psycopg.conninfo.make_conninfo(host=str(sockets), port=PORT, user=old_user,
                                                     dbname="postgres")
            copied = copy_databases(old_dsn, new_dsn, work / "old")
        shutil.rmtree(work / "old")
        embedded.stop(new_dsn)
        return copied
    except BaseException:  # fail() exits with SystemExit from inside, too
        if new_dsn is not None:
            embedded.stop(new_dsn)
        shutil.rmtree(work, ignore_errors=True)
        raise

if __name__ == "__main__":
    main()
