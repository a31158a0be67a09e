"""pipeline.endpoints: the start line naming the operator's endpoints and what their addresses are."""
from __future__ import annotations

from pipeline.endpoints import (
    database_endpoint,
    identity_endpoints,
    notice,
    url_endpoint,
)
from shards.identity import IdentityConfig
from tools.fake_dns import FakeDNS


def test_each_endpoint_with_its_address_and_kind_and_no_secrets() -> None:
    with FakeDNS() as dns:
        dns.add_a("plc.mirror.test", "10.1.2.3")
        config = IdentityConfig(plc_url="http://plc.mirror.test:2582", dns_server=dns.address)
        line = notice([*identity_endpoints(config),
                       database_endpoint("postgresql://bsky:secret@127.0.0.1:5432/bsky"),
                       url_endpoint("Redis", "redis://:hunter2@127.0.0.1:6379/0")], False)
    assert line == (
        "endpoints named by the operator, used as given: PLC http://plc.mirror.test:2582"
        f" (10.1.2.3: private), DNS {dns.address} (loopback), database 127.0.0.1:5432/bsky"
        " (loopback), Redis redis://127.0.0.1:6379/0 (loopback); hosts from the network's data:"
        " public addresses only (--allow-private-addresses is off)")


def test_a_typo_shows_as_a_name_that_does_not_resolve() -> None:
    with FakeDNS() as dns:
        config = IdentityConfig(plc_url="http://plc.mirorr.test", dns_server=dns.address,
                                allow_private_addresses=True)
        line = notice(identity_endpoints(config), True)
    assert "PLC http://plc.mirorr.test (does not resolve: NXDOMAIN for plc.mirorr.test)" in line
    assert line.endswith("hosts from the network's data: private allowed"
                         " (--allow-private-addresses)")


def test_a_database_on_a_local_socket_is_named_without_lookup() -> None:
    endpoint = database_endpoint("postgresql://postgres:@/postgres?host=/run/pg")
    assert (endpoint.where, endpoint.lookup) == ("postgres (local socket in /run/pg)", None)
    assert database_endpoint("dbname=bsky").where == "bsky (local socket)"
