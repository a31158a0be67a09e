"""The test tools must be trustworthy: a deterministic, corpus-shaped generator and a PLC stub
that really serves, counts, hangs and refuses."""
from __future__ import annotations

import gzip
import hashlib
import re
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from click.testing import CliRunner

from tools.fake_plc import FakePLC
from tools.generate import (MIX, Hot, did_documents, did_list, generate_events, hot_targets, main,
                            write_replay)

DID = re.compile(r"^did:plc:[a-z2-7]{24}$")
TID = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")
CID = re.compile(r"^baf[yk]rei[a-z2-7]{52}$")
HANDLE = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
BIG = {"like": "app.bsky.feed.like", "post": "app.bsky.feed.post",
       "repost": "app.bsky.feed.repost", "follow": "app.bsky.graph.follow"}
TINY = ("app.bsky.graph.block", "app.bsky.actor.profile", "app.bsky.graph.listitem",
        "app.bsky.feed.threadgate")


def _digest(lines: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line + b"\n")
    return h.hexdigest()


def test_same_seed_same_bytes_and_files_match_the_stream(tmp_path: Path) -> None:
    first = _digest(generate_events(3000, 300, seed=7))
    assert first == _digest(generate_events(3000, 300, seed=7))
    assert first != _digest(generate_events(3000, 300, seed=8))
    expected = b"".join(line + b"\n" for line in generate_events(3000, 300, seed=7))
    write_replay(tmp_path / "r.jsonl", 3000, 300, seed=7)
    write_replay(tmp_path / "r.jsonl.gz", 3000, 300, seed=7)
    assert (tmp_path / "r.jsonl").read_bytes() == expected
    assert gzip.decompress((tmp_path / "r.jsonl.gz").read_bytes()) == expected


def test_hot_posts_and_users_take_their_share_and_change_nothing_when_off() -> None:
    assert _digest(generate_events(3000, 300, seed=7, hot=Hot())) == _digest(
        generate_events(3000, 300, seed=7))
    hot = Hot(posts=5, users=3, share=0.3)
    posts, users = hot_targets(7, hot)
    liked, followed = Counter(), Counter()
    for line in generate_events(20_000, 1_000, seed=7, hot=hot):
        commit = orjson.loads(line).get("commit") or {}
        if commit.get("operation") != "create":
            continue
        if commit["collection"] == "app.bsky.feed.like":
            liked[commit["record"]["subject"]["uri"]] += 1
        elif commit["collection"] == "app.bsky.graph.follow":
            followed[commit["record"]["subject"]] += 1
    to_hot = sum(liked[p["uri"]] for p in posts) / sum(liked.values())
    assert 0.28 < to_hot < 0.32
    assert {u for u, _ in liked.most_common(5)} == {p["uri"] for p in posts}
    assert 0.25 < sum(followed[u] for u in users) / sum(followed.values()) < 0.35
    assert users == did_list(1_000, seed=7)[:3]


def test_a_hot_author_takes_its_share_of_the_events() -> None:
    first = did_list(1_000, seed=7)[0]
    plain = Counter(orjson.loads(line)["did"] for line in generate_events(20_000, 1_000, seed=7))
    skewed = Counter(orjson.loads(line)["did"]
                     for line in generate_events(20_000, 1_000, seed=7, hot=Hot(author=0.15)))
    assert sum(skewed.values()) == 20_000
    share = (skewed[first] - plain[first] * 0.85) / 20_000  # its own events, less those replaced
    assert 0.14 < share < 0.16
    assert skewed.most_common(1)[0][0] == first


@dataclass
class Stats:
    """What one pass over a generated stream saw."""

    n: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # action name or collection
    authors: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def stats() -> Stats:
    """Reads 100,000 events once, checking every line on the way."""
    s, live, profiles, last_us = Stats(), set(), set(), 0
    for line in generate_events(100_000, 10_000, seed=3):
        e = orjson.loads(line)
        s.n += 1
        s.authors[e["did"]] += 1
        if next(iter(e)) != "did" or not DID.match(e["did"]) or e["time_us"] <= last_us:
            s.problems.append(f"bad envelope: {line[:80]!r}")
        last_us = e["time_us"]
        if e["kind"] != "commit":
            s.kinds[e["kind"]] += 1
            if e[e["kind"]]["did"] != e["did"]:
                s.problems.append(f"{e['kind']} for another did")
            continue
        c = e["commit"]
        key = (e["did"], c["collection"], c["rkey"])
        if not TID.match(c["rev"]) or not (TID.match(c["rkey"]) or c["rkey"] == "self"):
            s.problems.append(f"bad rev/rkey {c}")
        if c["operation"] == "delete":
            s.kinds["delete"] += 1
            if key not in live:
                s.problems.append(f"delete of a record never created: {key}")
            live.discard(key)
            continue
        s.kinds[c["collection"]] += 1
        record = c["record"]
        if not CID.match(c["cid"]) or record["$type"] != c["collection"] \
                or "createdAt" not in record:
            s.problems.append(f"bad record {c}")
        if c["collection"] == "app.bsky.actor.profile":
            expected = "update" if e["did"] in profiles else "create"
            if c["rkey"] != "self" or c["operation"] != expected:
                s.problems.append(f"bad profile {c}")
            profiles.add(e["did"])
        elif c["operation"] != "create" or key in live:
            s.problems.append(f"not a fresh create: {key}")
        live.add(key)
        if c["collection"] in (BIG["like"], BIG["repost"]):
            subject = record["subject"]
            if not CID.match(subject["cid"]) or not subject["uri"].startswith("at://did:plc:"):
                s.problems.append(f"bad subject {subject}")
    return s


def test_every_line_is_well_formed_and_deletes_follow_their_creates(stats: Stats) -> None:
    assert stats.n == 100_000
    assert stats.problems == []


def test_mix_is_close_to_the_corpus(stats: Stats) -> None:
    for name, collection in BIG.items():
        assert abs(stats.kinds[collection] / stats.n - MIX[name]) < 0.02, name
    assert 0.01 < stats.kinds["delete"] / stats.n < 0.03
    for rare in (*TINY, "identity", "account"):
        assert 0.001 < stats.kinds[rare] / stats.n < 0.02, rare


def test_authors_are_skewed_and_all_present(stats: Stats) -> None:
    assert set(stats.authors) == set(did_list(10_000, seed=3))
    counts = sorted(stats.authors.values(), reverse=True)
    assert counts[0] > 50 * counts[len(counts) // 2]  # a few very active authors


def test_did_documents_match_the_authors() -> None:
    docs = did_documents(50, seed=3)
    assert list(docs) == did_list(50, seed=3)
    handles = set()
    for did, doc in docs.items():
        assert doc["id"] == did
        handle = doc["alsoKnownAs"][0].removeprefix("at://")
        assert HANDLE.match(handle)
        handles.add(handle)
        assert doc["verificationMethod"][0]["publicKeyMultibase"].startswith("zQ3sh")
        (pds,) = [s for s in doc["service"] if s["id"] == "#atproto_pds"]
        assert pds["serviceEndpoint"].startswith("https://")
    assert len(handles) == 50


def test_cli_writes_replay_and_docs(tmp_path: Path) -> None:
    out, docs = tmp_path / "e.jsonl.gz", tmp_path / "docs.json"
    args = ["--events", "500", "--dids", "40", "--seed", "2",
            "--out", str(out), "--docs", str(docs)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(gzip.decompress(out.read_bytes()).splitlines()) == 500
    assert set(orjson.loads(docs.read_bytes())) == set(did_list(40, seed=2))


# --- FakePLC -----------------------------------------------------------------------------------

DOCS = did_documents(20, seed=0)
A, B, C = list(DOCS)[:3]


def test_serves_documents_and_counts_requests() -> None:
    with FakePLC(DOCS) as plc:
        assert requests.get(f"{plc.url}/{A}", timeout=5).json() == DOCS[A]
        assert requests.get(f"{plc.url}/{A.replace(':', '%3A')}", timeout=5).json() == DOCS[A]
        assert requests.get(f"{plc.url}/did:plc:unknown", timeout=5).status_code == 404
        assert (plc.requests_for(A), plc.requests_for(B), plc.total_requests) == (2, 0, 3)


def test_hanging_dids_time_out_while_others_are_served() -> None:
    with FakePLC(DOCS, profile="hang", hang_dids={A}) as plc:
        with pytest.raises(requests.ReadTimeout):
            requests.get(f"{plc.url}/{A}", timeout=0.5)
        assert requests.get(f"{plc.url}/{B}", timeout=5).status_code == 200
        assert plc.requests_for(A) == 1


def test_a_held_did_is_answered_once_released() -> None:
    with FakePLC(DOCS) as plc, requests.Session() as session:
        plc.hold(A)
        sock, gone = (socket.create_connection(("127.0.0.1", plc.port), timeout=5)
                      for _ in range(2))
        for s in (sock, gone):
            s.sendall(f"GET /{A} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert plc.wait_for_requests(2)
        gone.close()  # hangs up while held: forgotten, not answered
        with pytest.raises(requests.ReadTimeout):
            session.get(f"{plc.url}/{A}", timeout=0.3)
        plc.release(A)
        head = sock.recv(65536)  # the held request gets its answer on the same connection
        assert head.startswith(b"HTTP/1.1 200 OK") and A.encode() in head
        sock.close()
        assert session.get(f"{plc.url}/{A}", timeout=5).json() == DOCS[A]
        assert plc.requests_for(A) == 4


def test_never_profile_accepts_and_never_answers() -> None:
    with FakePLC(DOCS, profile="never") as plc:
        with pytest.raises(requests.ReadTimeout):
            requests.get(f"{plc.url}/{B}", timeout=0.3)


def test_slow_profile_holds_a_stable_share_of_dids() -> None:
    plc = FakePLC(DOCS, profile="slow", slow_fraction=0.25, seed=5)
    many = did_list(4000, seed=9)
    slow = [d for d in many if plc.behaviour.is_slow(d)]
    assert abs(len(slow) / len(many) - 0.25) < 0.03
    assert slow == [d for d in many if FakePLC({}, slow_fraction=0.25, seed=5).behaviour.is_slow(d)]
    slow_doc = next(d for d in DOCS if plc.behaviour.is_slow(d))
    fast_doc = next(d for d in DOCS if not plc.behaviour.is_slow(d))
    with plc:
        with pytest.raises(requests.ReadTimeout):
            requests.get(f"{plc.url}/{slow_doc}", timeout=0.3)
        assert requests.get(f"{plc.url}/{fast_doc}", timeout=5).json() == DOCS[fast_doc]


def test_down_refuses_then_up_serves_on_the_same_port() -> None:
    with FakePLC(DOCS, profile="down") as plc:
        url = plc.url
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/{A}", timeout=2)
        plc.up()
        assert requests.get(f"{url}/{A}", timeout=5).json() == DOCS[A]
        with requests.Session() as session:  # a pooled keep-alive connection is cut too
            assert session.get(f"{url}/{B}", timeout=5).status_code == 200
            plc.down()
            with pytest.raises(requests.ConnectionError):
                session.get(f"{url}/{B}", timeout=2)
        plc.up()
        assert plc.url == url
        assert requests.get(f"{url}/{C}", timeout=5).status_code == 200


def test_hundreds_of_held_connections_and_a_prompt_stop() -> None:
    plc = FakePLC(DOCS, hang_dids={A}).start()
    clients = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", plc.port), timeout=5)
        sock.sendall(f"GET /{A} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        clients.append(sock)
    assert plc.wait_for_requests(300, timeout=10)
    assert requests.get(f"{plc.url}/{B}", timeout=5).status_code == 200
    started = time.monotonic()
    plc.stop()
    assert time.monotonic() - started < 1.0
    for sock in clients:  # held, then cut: none of them ever got an answer
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
        sock.close()


def _read_response(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response off a socket file: status, headers (lowercase names), body."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, stream.read(int(headers["content-length"]))


def test_raw_keep_alive_pipelining_and_closing() -> None:
    with FakePLC(DOCS, latency=(0, 0)) as plc, \
            socket.create_connection(("127.0.0.1", plc.port), timeout=5) as sock:
        stream = sock.makefile("rb")
        sock.sendall(f"GET /{A} HTTP/1.1\r\nHost: x\r\n\r\n"
                     f"GET /did:plc:unknown?x=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = _read_response(stream)
        assert (status, headers["content-type"]) == (200, "application/json; charset=utf-8")
        assert orjson.loads(body) == DOCS[A]
        status, _, body = _read_response(stream)
        assert status == 404 and b"did:plc:unknown" in body
        for _ in range(3):  # the same connection keeps serving
            sock.sendall(f"GET /{B} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert _read_response(stream)[0] == 200
        sock.sendall(f"GET /{C} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert _read_response(stream)[0] == 200
        assert stream.read() == b""
        assert plc.total_requests == 6


@pytest.mark.parametrize(("request_bytes", "status"), [
    (f"GET /{A} HTTP/1.0\r\n\r\n".encode(), 200),  # HTTP/1.0 without keep-alive: closed after
    (b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501),
    (b"nonsense\r\n\r\n", 400),
])
def test_raw_answers_that_close_the_connection(request_bytes: bytes, status: int) -> None:
    with FakePLC(DOCS, latency=(0, 0)) as plc, \
            socket.create_connection(("127.0.0.1", plc.port), timeout=5) as sock:
        stream = sock.makefile("rb")
        sock.sendall(request_bytes)
        assert _read_response(stream)[0] == status
        assert stream.read() == b""


def test_a_replaced_document_is_served_and_slow_answers_do_come() -> None:
    docs = dict(DOCS)
    with FakePLC(docs, profile="slow", slow_fraction=1.0, slow_seconds=0.3) as plc:
        started = time.monotonic()
        assert requests.get(f"{plc.url}/{A}", timeout=5).json() == DOCS[A]
        assert time.monotonic() - started >= 0.3
        docs[A] = {**DOCS[A], "alsoKnownAs": ["at://renamed.test"]}
        assert requests.get(f"{plc.url}/{A}", timeout=5).json() == docs[A]
