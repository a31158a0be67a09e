"""A PDS stub on 127.0.0.1: serves profile records (getRecord) and repositories (getRepo), and
misbehaves per DID on demand: 429 with Retry-After, 5xx, no answer at all.

    with FakePDS({did: {"$type": "app.bsky.actor.profile", "displayName": "Alice"}}) as pds:
        pds.fail(other, 429, times=1, retry_after=1)   # then served normally
        ...  # point the DID documents' #atproto_pds at pds.url

A profile not in `profiles` answers `absent_status` (404) with the XRPC error RecordNotFound; a
repository not in `repos` the same with RepoNotFound. Requests are counted per DID and kept
with their arrival times in `log`. Runs on the stubs' event loop (tools/stub_http.py)."""
from __future__ import annotations

import base64
import hashlib
import random
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import click
import orjson

from tools.stub_http import LoopStub, Reply, Request, http_response

PROFILE = "app.bsky.actor.profile"
GET_RECORD = "/xrpc/com.atproto.repo.getRecord"
GET_REPO = "/xrpc/com.atproto.sync.getRepo"
CAR_TYPE = "application/vnd.ipld.car"


@dataclass
class Failure:
    """What a DID's next requests get instead of their answer; `times` None: all of them."""

    status: int
    times: int | None = None
    retry_after: str | None = None  # the Retry-After header of a 429


@dataclass(frozen=True)
class Seen:
    """One request: when it arrived (monotonic seconds), which method, for which DID."""

    at: float
    method: str
    did: str


def _record_cid(did: str) -> str:
    """A stable CID-shaped string per DID (the stub does not encode records)."""
    digest = hashlib.sha256(did.encode()).digest()
    return "bafyrei" + base64.b32encode(digest + digest[:4]).decode().lower()[:52]


def _param(query: str, *names: str) -> str:
    """The first of `names` in a query string, percent-decoded ("" when absent)."""
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name in names:
            return unquote(value)
    return ""


class FakePDS(LoopStub):
    """Profiles by DID, repositories (CAR bytes) by DID, failures and holds by DID."""

    name = "fake-pds"

    def __init__(self, profiles: Mapping[str, Mapping[str, Any]] | None = None,
                 repos: Mapping[str, bytes] | None = None, *, port: int = 0,
                 latency: tuple[float, float] = (0.0, 0.0), absent_status: int = 404,
                 hang_dids: Iterable[str] = ()) -> None:
        super().__init__(port)
        self.profiles = dict(profiles or {})
        self.repos = dict(repos or {})
        self.latency = latency
        self.absent_status = absent_status
        self.failures: dict[str, Failure] = {}
        self.hanging: set[str] = set(hang_dids)
        self.log: list[Seen] = []
        self._log_lock = threading.Lock()
        self._answers: dict[str, tuple[object, bytes]] = {}  # did -> (profile, its 200 answer)

    # -- misbehaviour --------------------------------------------------------------------------
    def fail(self, did: str, status: int, *, times: int | None = None,
             retry_after: float | str | None = None) -> None:
        """The next `times` requests for `did` (all, when None) get `status` instead."""
        self.failures[did] = Failure(status, times,
                                     None if retry_after is None else str(retry_after))

    def hold(self, did: str) -> None:
        """Requests for `did` get no answer from now on, until release(did)."""
        self.hanging.add(did)

    def release(self, did: str) -> None:
        """Answers `did` again, held requests included."""
        self.hanging.discard(did)
        self.release_held(did)

    def seen(self, did: str, method: str | None = None) -> list[Seen]:
        """The requests for `did` (of one method: getRecord, getRepo), oldest first."""
        with self._log_lock:
            return [s for s in self.log if s.did == did and method in (None, s.method)]

    # -- answers ---------------------------------------------------------------------------------
    def key_of(self, request: Request) -> str:
        return _param(request.query, "repo", "did")

    def count(self, request: Request) -> None:
        method = request.path.rsplit(".", 1)[-1]
        with self._log_lock:
            self.log.append(Seen(time.monotonic(), method, self.key_of(request)))
        super().count(request)

    def reply(self, request: Request) -> Reply:
        did = self.key_of(request)
        if did in self.hanging:
            return Reply(hold=did)
        delay = random.uniform(*self.latency) if self.latency[1] > 0 else 0.0
        failure = self.failures.get(did)
        if failure is not None:
            if failure.times is not None:
                failure.times -= 1
                if failure.times <= 0:
                    del self.failures[did]
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else None
            body = orjson.dumps({"error": "RateLimitExceeded" if failure.status == 429
                                 else "InternalServerError", "message": "stub failure"})
            return Reply(http_response(failure.status, body, headers=headers), delay)
        if request.path == GET_RECORD:
            return Reply(self._record(did, request.query), delay)
        if request.path == GET_REPO:
            return Reply(self._repo(did), delay)
        return Reply(http_response(404, b'{"error": "MethodNotImplemented"}'), delay)

    def _record(self, did: str, query: str) -> bytes:
        """The answer for a record; a profile's is built once (again if it was replaced)."""
        collection, rkey = _param(query, "collection"), _param(query, "rkey")
        uri = f"at://{did}/{collection}/{rkey}"
        profile = self.profiles.get(did) if (collection, rkey) == (PROFILE, "self") else None
        if profile is None:
            body = {"error": "RecordNotFound", "message": f"Could not locate record: {uri}"}
            return http_response(self.absent_status, orjson.dumps(body))
        cached = self._answers.get(did)
        if cached is None or cached[0] is not profile:
            cached = (profile, http_response(200, orjson.dumps(
                {"uri": uri, "cid": _record_cid(did), "value": profile})))
            self._answers[did] = cached
        return cached[1]

    def _repo(self, did: str) -> bytes:
        car = self.repos.get(did)
        if car is None:
            body = {"error": "RepoNotFound", "message": f"Could not find repo for DID: {did}"}
            return http_response(self.absent_status, orjson.dumps(body))
        return http_response(200, car, content_type=CAR_TYPE)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profiles", "profiles_path", type=click.Path(exists=True, dir_okay=False),
              required=True, help="JSON object of DID -> profile record (tools.generate "
                                  "--profiles writes one); other DIDs have none.")
@click.option("--port", type=int, default=0, show_default=True, help="0 picks a free port.")
@click.option("--latency", type=(float, float), default=(0.001, 0.005), show_default=True,
              metavar="MIN MAX", help="Seconds before an answer, uniform (0 0: at once).")
def main(profiles_path: str, port: int, latency: tuple[float, float]) -> None:
    """Serve a fake PDS on 127.0.0.1 until interrupted."""
    profiles = orjson.loads(Path(profiles_path).read_bytes())
    FakePDS(profiles, port=port, latency=latency).serve_until_interrupted(
        f"fake PDS ({len(profiles)} profiles)")


if __name__ == "__main__":
    main()
