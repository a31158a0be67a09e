"""The operator's endpoints are used as given; hosts from the network's data are vetted: end to end.

The PLC and DNS stubs listen on 127.0.0.1 and the runs go without --allow-private-addresses.
Authors whose handle, did:web host or PLC redirect lead to other loopback addresses each get a
listener there, which must never see a connection."""
from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.conftest import fake_network, like, query, run_pipeline
from tools.fake_dns import FakeDNS
from tools.fake_plc import FakePLC
from tools.generate import did_documents

REFUSED = "refused loopback address"
INWARD_HANDLE = "did:plc:" + "h" * 24  # claims a handle whose host is 127.0.0.2
INWARD_REDIRECT = "did:plc:" + "r" * 24  # the PLC answers with a redirect to 127.0.0.4
LATER_REDIRECT = "did:plc:" + "s" * 24


@contextmanager
def listener(address: str, port: int = 0) -> Iterator[socket.socket | None]:
    """A listening socket nobody should connect to (the kernel queues any connection that
    comes, so a non-blocking accept afterwards tells); None where a port below 1024 needs
    privileges the tests lack."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except PermissionError:
        sock.close()
        yield None
        return
    sock.listen(16)
    sock.setblocking(False)
    with sock:
        yield sock


def connections(sock: socket.socket | None) -> int:
    """Connections `sock` has seen (0 when there is no socket: nothing could be seen)."""
    if sock is None:
        return 0
    seen = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return seen
        conn.close()
        seen += 1


def replay(path: Path, dids: list[str]) -> Path:
    path.write_bytes(b"".join(like(did, f"3l3qo2vutsa{i:02d}") + b"\n" for i, did in enumerate(dids)))
    return path


def run(dsn: str, path: Path, plc: FakePLC, dns: FakeDNS):
    result = run_pipeline("run", "--replay", str(path), "--dsn", dsn, "--shards", "2",
                          "--plc-url", plc.url, "--dns-server", dns.address)
    assert result.returncode == 0, result.stderr
    return result


def user(dsn: str, did: str) -> tuple[object, ...]:
    [row] = query(dsn, "SELECT handle, handle_verified, incomplete, resolve_error FROM users"
                       " WHERE did = %s", (did,))
    return row


def test_operator_endpoints_on_loopback_resolve_while_inward_hosts_are_never_reached(
    dsn: str, tmp_path: Path
) -> None:
    docs = did_documents(20, seed=20)
    with ExitStack() as stack:
        handle_host = stack.enter_context(listener("127.0.0.2", 443))  # https, no port
        web_host = stack.enter_context(listener("127.0.0.3"))
        moved_host = stack.enter_context(listener("127.0.0.4"))
        assert web_host is not None and moved_host is not None
        web_port, moved_port = web_host.getsockname()[1], moved_host.getsockname()[1]
        inward_web = f"did:web:inward-web.test%3A{web_port}"
        later_web = f"did:web:later-web.test%3A{web_port}"
        plc, dns = stack.enter_context(fake_network(docs))
        generated = sorted(docs)
        # Served by the PLC stub (the same dict), but given no TXT record by fake_network.
        docs[INWARD_HANDLE] = {"id": INWARD_HANDLE, "alsoKnownAs": ["at://inward-handle.test"]}
        dns.add_a("inward-handle.test", "127.0.0.2")  # and no TXT record
        dns.add_a("inward-web.test", "127.0.0.3")
        dns.add_a("later-web.test", "127.0.0.3")
        dns.add_a("moved.test", "127.0.0.4")
        for did in (INWARD_REDIRECT, LATER_REDIRECT):
            plc.redirect(did, f"http://moved.test:{moved_port}/{did}")

        first = run(dsn, replay(tmp_path / "mixed.jsonl",
                                [*generated, INWARD_HANDLE, inward_web, INWARD_REDIRECT]), plc, dns)
        [start] = [l for l in first.stderr.splitlines() if "endpoints named by the operator" in l]
        assert (f"PLC {plc.url} (loopback), DNS {dns.address} (loopback), database " in start
                and "hosts from the network's data: public addresses only" in start), start
        assert "every new user's lookup was refused" not in first.stderr
        assert "refused addresses 3 (loopback 3)" in first.stdout
        assert plc.requests_for(INWARD_REDIRECT) == 1  # asked, answered by a redirect
        for did in generated:
            handle = docs[did]["alsoKnownAs"][0][5:]
            assert user(dsn, did) == (handle, True, False, None)
        handle, verified, incomplete, error = user(dsn, INWARD_HANDLE)
        assert (handle, verified, incomplete) == ("inward-handle.test", False, True)
        assert error.startswith(f"{REFUSED}: inward-handle.test resolves to loopback address"
                                " 127.0.0.2")
        for did in (inward_web, INWARD_REDIRECT):  # no document: the DID as handle
            handle, verified, incomplete, error = user(dsn, did)
            assert (handle, verified, incomplete) == (did, False, True)
            assert error.startswith(f"{REFUSED}: "), error

        status = run_pipeline("status", "--dsn", dsn, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["incomplete_users"] == {
            "total": 3, "due": 0, "by_reason": {REFUSED: 3}}

        # A run whose every new author is refused says so, not only in a counter.
        second = run(dsn, replay(tmp_path / "inward.jsonl", [later_web, LATER_REDIRECT]), plc, dns)
        assert re.search(r"WARNING every new user's lookup was refused \(2 of 2\).*"
                         r"\(loopback 2\).*--allow-private-addresses", second.stderr), second.stderr
        status = run_pipeline("status", "--dsn", dsn)
        assert f"incomplete users  5 (0 due for refresh)\n         5  {REFUSED}\n" in status.stdout

        assert connections(handle_host) == connections(web_host) == connections(moved_host) == 0
