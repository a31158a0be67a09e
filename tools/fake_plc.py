"""A PLC directory stub on 127.0.0.1: serves DID documents and misbehaves on demand.

Tests and benchmarks use it to make identity resolution healthy, slow for some DIDs, hang,
refuse connections (down) or accept and never answer, and to count who asked for what.

It shares the machine with the system under test, so it runs on the stubs' single-threaded
event loop (tools/stub_http.py) and answers with response bytes built once per DID.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson

from tools.stub_http import LoopStub, Reply, Request, http_response

PROFILES = ("healthy", "slow", "hang", "down", "never")


@dataclass
class Behaviour:
    """How the stub answers; attributes may be changed while it runs.

    `down` only means "not listening at start()"; once up() it answers like `healthy`.
    """

    profile: str = "healthy"
    latency: tuple[float, float] = (0.001, 0.005)  # seconds, uniform, for answered requests
    slow_fraction: float = 0.1  # profile "slow": share of DIDs held for `slow_seconds`
    slow_seconds: float = 60.0
    seed: int = 0
    hang_dids: set[str] = field(default_factory=set)  # never answered, whatever the profile

    def is_slow(self, did: str) -> bool:
        """Whether `did` is one of the slow ones: a stable hash of seed and DID, not chance."""
        h = hashlib.sha256(f"{self.seed}:{did}".encode()).digest()
        return int.from_bytes(h[:8], "big") < self.slow_fraction * 2**64


@dataclass(frozen=True)
class _Cached:
    """A DID's 200 response, valid while `docs` still maps the DID to this very document."""

    doc: Mapping[str, Any]
    response: bytes


class FakePLC(LoopStub):
    """The stub: `with FakePLC(docs) as plc: resolve(plc.url + "/" + did)`."""

    name = "fake-plc"

    def __init__(self, docs: Mapping[str, Mapping[str, Any]], *, port: int = 0,
                 profile: str = "healthy", latency: tuple[float, float] = (0.001, 0.005),
                 slow_fraction: float = 0.1, slow_seconds: float = 60.0, seed: int = 0,
                 hang_dids: Iterable[str] = ()) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; one of {', '.join(PROFILES)}")
        super().__init__(port)
        self.docs = docs
        self.behaviour = Behaviour(profile, latency, slow_fraction, slow_seconds, seed,
                                   set(hang_dids))
        self._responses: dict[str, _Cached] = {}
        self._redirects: dict[str, bytes] = {}

    def start(self, listen: bool = True) -> FakePLC:
        """Starts listening, unless the profile is `down` (then only the port is chosen)."""
        super().start(listen and self.behaviour.profile != "down")
        return self

    def hold(self, did: str) -> None:
        """Requests for `did` get no answer from now on, until release(did)."""
        self.behaviour.hang_dids.add(did)

    def release(self, did: str) -> None:
        """Answers `did` again, held requests included: tests hold a run open, then let it end."""
        self.behaviour.hang_dids.discard(did)
        self.release_held(did)

    def key_of(self, request: Request) -> str:
        return request.path.lstrip("/")  # the DID

    def reply(self, request: Request) -> Reply:
        did, b = self.key_of(request), self.behaviour
        if b.profile == "never" or did in b.hang_dids:
            return Reply(hold=did)  # until released, hung up or the listener ends
        if b.profile == "slow" and b.is_slow(did):
            delay = b.slow_seconds
        else:
            delay = random.uniform(*b.latency)
        return Reply(self._response_for(did), delay)

    def redirect(self, did: str, location: str) -> None:
        """Answers `did` with a 302 to `location` from now on, as a directory that moved might."""
        self._redirects[did] = http_response(302, b"{}", headers={"Location": location})

    def _response_for(self, did: str) -> bytes:
        """The response bytes for `did`, built once per document (a replaced document is rebuilt)."""
        moved = self._redirects.get(did)
        if moved is not None:
            return moved
        doc = self.docs.get(did)
        if doc is None:
            return http_response(404, orjson.dumps({"message": f"DID not registered: {did}"}))
        cached = self._responses.get(did)
        if cached is None or cached.doc is not doc:
            cached = _Cached(doc, http_response(200, orjson.dumps(doc)))
            self._responses[did] = cached
        return cached.response


@click.command()
@click.option("--docs", "docs_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="JSON object of DID -> DID document (tools.generate --docs writes one).")
@click.option("--port", type=int, default=0, show_default=True, help="0 picks a free port.")
@click.option("--profile", type=click.Choice(PROFILES), default="healthy", show_default=True)
@click.option("--slow-fraction", type=float, default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--latency", type=(float, float), default=(0.001, 0.005), show_default=True,
              metavar="MIN MAX", help="Seconds before an answer, uniform (0 0: at once).")
@click.option("--hang", "hang_dids", multiple=True, help="A DID never answered (repeatable).")
def main(docs_path: str, port: int, profile: str, slow_fraction: float, seed: int,
         latency: tuple[float, float], hang_dids: tuple[str, ...]) -> None:
    """Serve a fake PLC directory on 127.0.0.1 until interrupted."""
    docs = orjson.loads(Path(docs_path).read_bytes())
    FakePLC(docs, port=port, profile=profile, latency=latency, slow_fraction=slow_fraction,
            seed=seed, hang_dids=hang_dids).serve_until_interrupted(
        f"fake PLC ({profile}, {len(docs)} DIDs)")


if __name__ == "__main__":
    main()
