"""shards.users: DIDs that hang give their resolution slot up, so they delay only themselves."""
from __future__ import annotations

import threading
import time

from shards.identity import IdentityConfig, build_directory
from shards.users import NewUser, UserCreations
from tests.conftest import fake_network, wait_until
from tools.generate import did_documents


def test_hanging_dids_do_not_hold_the_slots_of_the_rest() -> None:
    docs = did_documents(40, seed=3)
    dids = list(docs)
    hanging, healthy = dids[:2], dids[2:]
    timeout = 4.0
    with fake_network(docs, hang_dids=hanging) as (plc, dns):
        config = IdentityConfig(plc_url=plc.url, dns_server=dns.address,
                                allow_private_addresses=True, read_timeout=6.0)
        late: list[str] = []
        creations = UserCreations(build_directory(config), 2, timeout, None,
                                  lambda ident: late.append(ident.did))
        started = time.monotonic()
        for did in dids:  # the hanging ones first: they take both slots
            creations.begin(did, started)
        settled: dict[str, tuple[NewUser, float]] = {}
        while creations.pending:
            now = time.monotonic()
            for pending, user in creations.settle_due(now):
                settled[pending.did] = (user, now - started)
            time.sleep(0.02)  # the shard loop's own pace of looking (it waits up to LINGER)
        assert creations.threads == 2 + len(hanging)  # stand-ins for the two that hang
        for did in hanging:  # answered at last: handed over late, and the stand-ins leave
            plc.release(did)
        wait_until(lambda: sorted(late) == sorted(hanging) and creations.threads == 2)
    for did in healthy:  # resolved and verified, well before the hanging ones' deadline
        user, after = settled[did]
        assert user.handle == docs[did]["alsoKnownAs"][0][5:] and not user.incomplete
        assert after < timeout / 2
    for did in hanging:  # each fell back at its own deadline
        user, after = settled[did]
        assert user.fallback and after >= timeout
    assert creations.slow >= len(hanging)
    assert creations.active == 0


def test_each_incomplete_user_says_why() -> None:
    from shards.identity import AddressRefused, Identity, ResolutionFailed
    from shards.identity.mock import MockDirectory
    from shards.users import TIMED_OUT

    ok, inward, down, slow = (f"did:plc:{c * 24}" for c in "aijk")
    directory = MockDirectory([Identity(ok, "ok.test"), Identity(inward, "inward.test"),
                               Identity(slow, "slow.test")])
    directory.verify_errors["inward.test"] = AddressRefused("inward.test", "10.0.0.1", "private")
    directory.errors[down] = ResolutionFailed("GET http://plc.test/x: timed out")
    directory.gate = threading.Event()
    creations = UserCreations(directory, 4, 60.0, None, lambda _ident: None)
    now = time.monotonic()
    for did in (ok, inward, down):
        creations.begin(did, now)
    creations.begin(slow, now - 60.0)  # its deadline is over before it gets an answer
    settled = {p.did: u for p, u in creations.settle_due(time.monotonic())}
    assert settled[slow].error == TIMED_OUT and settled[slow].fallback
    directory.gate.set()

    def all_settled() -> bool:
        settled.update({p.did: u for p, u in creations.settle_due(time.monotonic())})
        return len(settled) == 4

    wait_until(all_settled)
    assert settled[ok].error is None and not settled[ok].incomplete
    assert settled[inward].handle == "inward.test" and settled[inward].incomplete
    assert settled[inward].refused
    assert settled[inward].error == ("refused private address: inward.test resolves to private"
                                     " address 10.0.0.1 (allowed only with"
                                     " --allow-private-addresses)")
    assert settled[down].fallback and not settled[down].refused
    assert settled[down].error == "lookup failed: GET http://plc.test/x: timed out"
    assert settled[ok].row()[-1] is None and settled[down].row()[-1] == settled[down].error
