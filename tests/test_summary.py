"""pipeline.summary (and its Prometheus export): refused lookups by kind, and the warning."""
from __future__ import annotations

from pipeline.metrics import PipelineCollector
from pipeline.summary import Summary
from shards.stats import ShardStats


def summary(refused: tuple[int, int]) -> Summary:
    shards = []
    for k, (kind, n) in enumerate((("loopback", 2), ("private", 1))):
        s = ShardStats(k, users_created=n, users_refused=refused[k])
        s.identity = {f"refused.{kind}": n, "resolution.web.refused": n, "resolution.plc.ok": 4}
        shards.append(s)
    return Summary.collect(source="replay:x", events_read=3, committed=3, dead_letters=0,
                           elapsed=1.0, start_cursor=None, cursor=3, restarts=0,
                           shard_stats=shards, current={0: None, 1: None}, progress=(3, 3))


def test_refusals_by_kind_in_the_summary_and_the_metrics() -> None:
    s = summary((1, 1))
    assert s.refusals == {"loopback": 2, "private": 1}
    text = s.render()
    assert ("refused addresses 3 (loopback 2, private 1): hosts named by the network's data must"
            " be public unless --allow-private-addresses") in text
    assert "identity          resolution.plc.ok 8, resolution.web.refused 3" in text
    assert s.refusal_warning() is None  # one new user of three was resolved
    [family] = [m for m in PipelineCollector(lambda: s, lambda: ("replay:x", 3)).collect()
                if m.name == "pipeline_refused_addresses"]
    assert {(x.labels["kind"], x.value) for x in family.samples if x.name.endswith("_total")} == {
        ("loopback", 2), ("private", 1)}


def test_a_run_whose_every_new_user_was_refused_warns() -> None:
    warning = summary((2, 1)).refusal_warning()
    assert warning == (
        "every new user's lookup was refused (3 of 3): the hosts their DID documents, handles or"
        " redirects name resolve to non-public addresses (loopback 2, private 1); only"
        " --allow-private-addresses lets the network's data reach such addresses")
