"""JetstreamSource against tools.fake_jetstream serving the recorded Jetstream v1 corpus.

Iteration is made finite either by `stop_at_time_us` or by the test breaking out once it has
what it waits for; a watchdog timer calls close() so that a bug fails a test instead of
hanging it. Backoffs are configured small; no sleep is used to synchronise."""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from pipeline.sources.base import SourceError
from pipeline.sources.jetstream import DEFAULT_MAX_MESSAGE_BYTES, JetstreamSource
from tools.fake_jetstream import FakeJetstream

CORPUS = Path(__file__).parent / "data" / "jetstream" / "expected_v1.jsonl"
LINES = [line for line in CORPUS.read_bytes().split(b"\n") if line]
REWIND_US = 50_000
"""Rewind used by the tests: above the corpus's worst time_us disorder (33 ms), far below its
span (318 ms), so resumed connections really start part-way."""
FAST = dict(rewind_seconds=REWIND_US / 1e6, max_backoff=0.05, initial_backoff=0.01)
WATCHDOG_S = 10.0

Got = list[tuple[int, bytes]]


def time_us(raw: bytes) -> int:
    return orjson.loads(raw)["time_us"]


def clamped(raws: list[bytes], start: int = 0) -> list[int]:
    """The positions the source must give: time_us made non-decreasing."""
    out, last = [], start
    for raw in raws:
        last = max(last, time_us(raw))
        out.append(last)
    return out


def collect(source: JetstreamSource, cursor: int | None,
            until: Callable[[Got], bool] | None = None) -> Got:
    """Iterates events() until `until(got)` or the end; the watchdog turns a hang into a
    failed assertion."""
    got: Got = []
    fired = threading.Event()
    watchdog = threading.Timer(WATCHDOG_S, lambda: (fired.set(), source.close()))
    watchdog.start()
    events: Iterator[tuple[int, bytes]] = source.events(cursor)
    try:
        for item in events:
            if item is None:  # nothing new for a moment (the Source protocol allows it)
                continue
            got.append(item)
            if until is not None and until(got):
                break
    finally:
        events.close()  # type: ignore[attr-defined]
        watchdog.cancel()
    assert not fired.is_set(), "watchdog fired: events() did not finish by itself"
    return got


def poll(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_reader(source: JetstreamSource, cursor: int | None) -> tuple[threading.Thread, Got]:
    """Runs events() in a thread the way the supervisor does."""
    got: Got = []

    def run() -> None:
        got.extend(item for item in source.events(cursor) if item is not None)

    thread = threading.Thread(target=run, name="test-jetstream-reader", daemon=True)
    thread.start()
    return thread, got


def reconnect_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pipeline.jetstream" and r.levelno == logging.WARNING]


def test_corpus_is_the_pinned_copy() -> None:
    assert len(LINES) == 152
    assert (CORPUS.parent / "LICENSE.txt").read_text().startswith(
        "origin bluesky-social/jetstream @ 9a30defd224e9058814a7d6ce8d9e4fc48d5493c")


def test_two_drops_lose_nothing_and_resume_from_last_time_minus_rewind(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.jetstream")
    everything = set(LINES)
    with FakeJetstream(CORPUS, drop_after=[60, 50]) as server:
        source = JetstreamSource(server.url, **FAST)
        got = collect(source, None, until=lambda g: everything <= {raw for _, raw in g})
        conns = server.connections

    assert everything <= {raw for _, raw in got}
    positions = [p for p, _ in got]
    assert positions == clamped([raw for _, raw in got])  # time_us, clamped non-decreasing
    # The first connection live-tails; each reconnect asks for the last position minus rewind.
    assert [c.sent for c in conns[:2]] == [60, 50] and [c.dropped for c in conns] == [
        True, True, False]
    assert [c.cursor for c in conns] == [None, positions[59] - REWIND_US,
                                         positions[109] - REWIND_US]
    assert conns[0].max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert source.stats.connects == 3 and source.stats.failures == 2
    warnings = reconnect_warnings(caplog)
    assert len(warnings) == 2 and all("reconnecting" in w and "closed" in w for w in warnings)
    assert source.next_position == positions[-1]
    assert source.progress == (len(got), None)


def test_wanted_collections_filter_and_url_query_kept() -> None:
    wanted = ("app.bsky.feed.post", "app.bsky.graph.*")

    def is_wanted(raw: bytes) -> bool:
        event = orjson.loads(raw)
        if event["kind"] != "commit":
            return True
        collection = event["commit"]["collection"]
        return collection == wanted[0] or collection.startswith("app.bsky.graph.")

    expected = [line for line in LINES if is_wanted(line)]
    # identity and account events come last in the file, with smaller time_us than the newest
    # commit, so this test stops by count rather than by stop_at_time_us.
    assert {orjson.loads(line)["kind"] for line in expected} == {"commit", "identity", "account"}

    with FakeJetstream(CORPUS) as server:
        source = JetstreamSource(server.url + "?maxMessageSizeBytes=1000000", wanted, **FAST)
        got = collect(source, None, until=lambda g: len(g) == len(expected))
        (conn,) = server.connections

    assert [raw for _, raw in got] == expected
    assert [p for p, _ in got] == clamped(expected)
    assert conn.wanted_collections == wanted
    assert conn.max_message_bytes == 1_000_000  # the URL's own parameter wins
    assert conn.query.startswith("maxMessageSizeBytes=1000000&")


def test_resumes_from_saved_cursor_minus_rewind_and_never_goes_below_it() -> None:
    cursor = time_us(LINES[100])
    with FakeJetstream(CORPUS) as server:
        source = JetstreamSource(server.url, stop_at_time_us=max(map(time_us, LINES)), **FAST)
        got = collect(source, cursor)
        assert server.cursors == [cursor - REWIND_US]
    sent = [line for line in LINES[:149] if time_us(line) >= cursor - REWIND_US]
    assert [raw for _, raw in got] == sent
    assert [p for p, _ in got] == clamped(sent, start=cursor)
    assert min(p for p, _ in got) == cursor


def test_unreadable_events_are_yielded_at_the_last_position(tmp_path: Path) -> None:
    lines = [b'{"did":"did:plc:a","time_us":100,"kind":"identity"}', b"not json",
             b'{"did":"did:plc:a","kind":"account"}', b'{"time_us":50,"kind":"identity"}',
             b'["time_us", 7]', b'{"time_us":200,"kind":"identity"}']
    with FakeJetstream(lines) as server:
        source = JetstreamSource(server.url, stop_at_time_us=200, **FAST)
        got = collect(source, None)
    assert got == [(100, lines[0]), (100, lines[1]), (100, lines[2]), (100, lines[3]),
                   (100, lines[4]), (200, lines[5])]


def test_close_from_another_thread_while_blocked_in_recv() -> None:
    with FakeJetstream(CORPUS) as server:
        source = JetstreamSource(server.url, read_timeout=30.0, **FAST)
        thread, got = start_reader(source, None)
        # The fake goes quiet after the file, like a live stream: the reader blocks in recv.
        assert poll(lambda: len(got) == len(LINES))
        started = time.monotonic()
        source.close()
        thread.join(timeout=2.0)
        elapsed = time.monotonic() - started
    assert not thread.is_alive()
    assert elapsed < 1.0
    assert source.stats.connects == 1


def test_close_interrupts_backoff() -> None:
    source = JetstreamSource(f"ws://127.0.0.1:{free_port()}/subscribe", max_backoff=60.0,
                             initial_backoff=60.0)
    thread, got = start_reader(source, None)
    assert poll(lambda: source.stats.failures >= 1)  # now sleeping 30-60 s before retrying
    started = time.monotonic()
    source.close()
    thread.join(timeout=2.0)
    assert not thread.is_alive() and time.monotonic() - started < 1.0
    assert got == []


def test_refused_connection_backs_off_then_connects_when_server_comes_up(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.jetstream")
    port = free_port()
    cursor = time_us(LINES[0])
    stop = max(map(time_us, LINES))
    source = JetstreamSource(f"ws://127.0.0.1:{port}/subscribe", stop_at_time_us=stop, **FAST)
    thread, got = start_reader(source, cursor)
    try:
        assert poll(lambda: source.stats.failures >= 2)
        with FakeJetstream(CORPUS, port=port) as server:
            thread.join(timeout=WATCHDOG_S)
            assert not thread.is_alive()
            assert server.cursors == [cursor - REWIND_US]
    finally:
        source.close()
        thread.join(timeout=2.0)
    assert [raw for _, raw in got] == LINES[:149]  # stops at the recording's newest event
    assert source.stats.connects == 1
    warnings = reconnect_warnings(caplog)
    assert len(warnings) >= 2 and "connect failed" in warnings[0]
    assert "refused" in warnings[0].lower()


def test_read_timeout_reconnects_from_last_position() -> None:
    with FakeJetstream(CORPUS) as server:
        source = JetstreamSource(server.url, read_timeout=0.3, **FAST)
        thread, got = start_reader(source, None)
        try:
            assert server.wait_for_connections(2, timeout=5.0)
        finally:
            source.close()
            thread.join(timeout=2.0)
        cursors = server.cursors
    assert cursors[:2] == [None, max(map(time_us, LINES)) - REWIND_US]
    assert source.stats.last_error is not None and "no message for 0.3 s" in \
        source.stats.last_error


def test_handshake_404_is_a_user_error() -> None:
    with FakeJetstream(CORPUS) as server:
        source = JetstreamSource(server.url.replace("/subscribe", "/nope"), **FAST)
        with pytest.raises(SourceError, match="HTTP 404"):
            collect(source, None)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:6008/subscribe",
    "jetstream2.us-east.bsky.network/subscribe",
    "ws:///subscribe",
    "ws://127.0.0.1:99999/subscribe",
    "ws://127.0.0.1:6008/subscribe?cursor=5",
    "wss://jetstream.example/subscribe?compress=true",
])
def test_bad_url_is_one_line_source_error(url: str) -> None:
    with pytest.raises(SourceError) as info:
        JetstreamSource(url)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("collections", [["not a nsid"], ["app"], ["a.b"] * 101])
def test_bad_collections_are_source_errors(collections: list[str]) -> None:
    with pytest.raises(SourceError):
        JetstreamSource("ws://127.0.0.1:6008/subscribe", collections)


def test_identity() -> None:
    source = JetstreamSource("wss://jetstream2.us-east.bsky.network/subscribe?requireHello=false",
                             ["app.bsky.feed.*"])
    assert source.name == "jetstream:wss://jetstream2.us-east.bsky.network/subscribe"
    assert source.resumable is True
    assert source.progress == (0, None)
    assert source.next_position == 0
