"""PdsClient against a real PDS stub on 127.0.0.1: what each answer means, and the host limits."""
from __future__ import annotations

import math
import threading
import time
from email.utils import formatdate

import orjson
import pytest

from shards.identity.testing import local_config
from shards.pds.client import (
    ABSENT, BAD, FAILED, FOUND, LATER, REFUSED, Answer, EndpointRefused, PdsClient, pds_origin,
    retry_after,
)
from shards.pds.config import PdsConfig
from shards.pds.hosts import HostLimits
from tools.fake_pds import FakePDS

A, B, C = ("did:plc:" + c * 24 for c in "abc")
PROFILE = {"$type": "app.bsky.actor.profile", "displayName": "Alice", "description": "hi",
           "avatar": {"$type": "blob", "ref": {"$link": "bafkreiavatar"}, "mimeType": "image/png",
                      "size": 10},
           "banner": {"$type": "blob", "ref": {"$link": "bafkreibanner"}, "mimeType": "image/png",
                      "size": 10}}


def client(**overrides: object) -> PdsClient:
    values: dict[str, object] = {"rate": 0.0, "breaker_threshold": 3}
    values.update(overrides)
    return PdsClient(local_config(total_timeout=1.0), PdsConfig(**values))  # type: ignore[arg-type]


def ask(pdsc: PdsClient, did: str, url: str) -> Answer:
    """One profile request under the host's limits, as the fetcher makes it."""
    base, host = pdsc.origin(url)
    assert pdsc.limits.acquire(host)
    try:
        return pdsc.profile(did, base, host)
    finally:
        pdsc.limits.leave(host)


def test_a_profile_record_becomes_the_users_fields() -> None:
    with FakePDS({A: PROFILE}) as pds:
        pdsc = client()
        answer = ask(pdsc, A, pds.url + "/")
        assert answer.result == FOUND
        assert answer.fields == ("Alice", "hi", "bafkreiavatar", "bafkreibanner")
        assert [s.method for s in pds.seen(A)] == ["getRecord"]
        assert pdsc.counters.get("pds.profile.found") == 1


@pytest.mark.parametrize("status", [404, 400])
def test_record_not_found_means_no_profile_for_a_day(status: int) -> None:
    with FakePDS({}, absent_status=status) as pds:
        pdsc = client()
        answer = ask(pdsc, A, pds.url)
        assert (answer.result, answer.retry_in) == (ABSENT, 86_400.0)
        assert pdsc.counters.get("pds.profile.absent") == 1


def test_a_429_pauses_the_host_and_is_never_taken_for_no_profile() -> None:
    with FakePDS({A: PROFILE, B: PROFILE}) as pds:
        pds.fail(A, 429, times=1, retry_after=2)
        pdsc = client()
        host = pds.url.removeprefix("http://")
        answer = ask(pdsc, A, pds.url)
        assert answer.result == LATER and answer.retry_in == 2.0
        assert 1.5 < pdsc.limits.paused_for(host) <= 2.0
        assert pdsc.counters.get(f"pds.rate_limited.{host}") == 1
        # The host is paused for everyone: a request for B starts only when the pause is over.
        assert 1.5 < pdsc.limits.ready_in(host) <= 2.0
        assert ask(pdsc, B, pds.url).result == FOUND
        assert ask(pdsc, A, pds.url).result == FOUND
        first, second = pds.seen(A)
        assert pds.seen(B)[0].at - first.at >= 2.0 and second.at - first.at >= 2.0


def test_retry_after_forms() -> None:
    now = 1_800_000_000.0
    clock = lambda: now  # noqa: E731
    assert retry_after({b"retry-after": b"7"}, 60, 3600, clock) == 7
    assert retry_after({b"retry-after": formatdate(now + 30, usegmt=True).encode()}, 60, 3600,
                       clock) == pytest.approx(30, abs=1)
    assert retry_after({b"ratelimit-reset": str(int(now) + 90).encode()}, 60, 3600, clock) == 90
    assert retry_after({b"ratelimit-reset": b"12"}, 60, 3600, clock) == 12
    assert retry_after({}, 60, 3600, clock) == 60
    assert retry_after({b"retry-after": b"999999"}, 60, 3600, clock) == 3600
    assert retry_after({b"retry-after": b"0"}, 60, 3600, clock) == 1
    assert retry_after({b"retry-after": b"soon"}, 60, 3600, clock) == 60


def test_server_errors_fail_and_open_the_hosts_circuit() -> None:
    with FakePDS({A: PROFILE}) as pds:
        pds.fail(A, 503)
        pdsc = client()
        assert [ask(pdsc, A, pds.url).result for _ in range(3)] == [FAILED] * 3
        answer = ask(pdsc, A, pds.url)
        assert answer.result == LATER and "circuit open" in answer.detail
        assert len(pds.seen(A)) == 3
        # The host is paused while its circuit cools down: its users wait, nobody asks.
        assert pdsc.limits.paused_for(pds.url.removeprefix("http://")) > 25


def test_a_host_that_hangs_times_out_as_a_failure() -> None:
    with FakePDS({A: PROFILE}, hang_dids={A}) as pds:
        started = time.monotonic()
        assert ask(client(), A, pds.url).result == FAILED
        assert time.monotonic() - started < 3


def test_host_limits_space_requests_cap_those_in_flight_and_pause() -> None:
    now = [100.0]
    limits = HostLimits(rate=2.0, per_host=2, clock=lambda: now[0])
    assert limits.ready_in("h") == 0
    limits.take("h")
    assert limits.ready_in("h") == 0.5 and limits.ready_in("other") == 0
    now[0] += 0.5
    limits.take("h")
    assert limits.ready_in("h") == math.inf  # two in flight: one must end first
    limits.leave("h")
    assert limits.ready_in("h") == 0.5
    limits.pause("h", 10)
    assert limits.ready_in("h") == 10 and limits.paused_for("h") == 10


def test_acquire_waits_for_the_hosts_slot_and_gives_up_when_stopped() -> None:
    limits = HostLimits(rate=5.0, per_host=1)
    started = time.monotonic()
    assert limits.acquire("h")
    limits.leave("h")
    assert limits.acquire("h")  # the next slot, 0.2 s after the first
    assert time.monotonic() - started >= 0.19
    stop = threading.Event()
    waiter = threading.Thread(target=lambda: results.append(limits.acquire("h", stop)))
    results: list[bool] = []
    waiter.start()  # one in flight: waits for leave() or stop
    stop.set()
    waiter.join(timeout=5)
    assert results == [False]


def test_endpoints_must_be_https_origins_unless_private_addresses_are_allowed() -> None:
    assert pds_origin("https://PDS.example.com/", False) == ("https://pds.example.com",
                                                              "pds.example.com")
    assert pds_origin("http://127.0.0.1:8080", True) == ("http://127.0.0.1:8080", "127.0.0.1:8080")
    for bad in ("http://pds.example.com", "https://pds.example.com/xrpc", "https://u@h.example",
                "https://h.example?x=1", "ftp://h.example", "https://h.example:99999"):
        with pytest.raises(EndpointRefused):
            pds_origin(bad, False)
    with FakePDS({A: PROFILE}) as pds:
        strict = PdsClient(local_config(allow_private_addresses=False), PdsConfig(rate=0))
        with pytest.raises(EndpointRefused):  # plain http
            strict.origin(pds.url)
        private = ask(strict, A, pds.url.replace("http://", "https://"))
        assert private.result == REFUSED and "loopback address" in private.detail
        assert strict.counters.get("refused.loopback") == 1  # in the summary's refused addresses
        assert pds.total_requests == 0


def test_answers_that_are_no_profile_are_bad_input() -> None:
    with FakePDS({A: {"$type": "app.bsky.feed.post", "text": "x"},
                  B: {"$type": "app.bsky.actor.profile", "displayName": "a\u0000b"},
                  C: {"$type": "app.bsky.actor.profile", "description": "x" * 70_000}}) as pds:
        pdsc = client()
        for did, why in ((A, "app.bsky.feed.post"), (B, "NUL"), (C, "bytes")):
            answer = ask(pdsc, did, pds.url)
            assert answer.result == BAD and why in answer.detail, answer
            assert answer.detail.startswith("profile: ") and answer.raw
        assert orjson.loads(ask(pdsc, A, pds.url).raw)["value"]["text"] == "x"
