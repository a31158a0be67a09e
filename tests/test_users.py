"""shards.users: DIDs that hang give their resolution slot up, so they delay only themselves."""
from __future__ import annotations

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
