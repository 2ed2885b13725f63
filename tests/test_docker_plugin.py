"""The Docker plugin's pure rules: options, pools, adopting a store network, Join's answer."""
from __future__ import annotations

import pytest

from xoverlay.core import model
from xoverlay.core.model import State
from xoverlay.errors import XoError
from xoverlay.runtimes import docker_plugin as dp


def cluster():
    s = model.join_node(State(), "n1", "192.0.2.1")
    return model.create_network(s, "demo", "10.10.0.0/16")


def test_options():
    assert dp.parse_options({}) == dp.NetworkSpec("")
    assert dp.parse_options({dp.GENERIC: {"mtu": "1400"}, dp.INTERNAL: True}) == dp.NetworkSpec("", True, 1400)
    for generic, why in (({"mtu": "x"}, "not a number"), ({"mtu": "100"}, "use 576"),
                         ({"encrypted": ""}, "no encrypted networks yet"), ({"colour": "blue"}, "unknown option")):
        with pytest.raises(XoError, match=why):
            dp.parse_options({dp.GENERIC: generic})


def test_pools():
    assert dp.parse_pool("10.30.0.0/16") == "10.30.0.0/16"
    for bad, why in (("", "--subnet"), ("10.30.0.1/16", "not an IPv4 network")):
        with pytest.raises(XoError, match=why):
            dp.parse_pool(bad)
    assert dp.check_pool(cluster(), "10.10.0.0/16") == "demo"
    assert dp.check_pool(cluster(), "10.30.0.0/16") is None
    with pytest.raises(XoError, match="overlaps xoverlay network demo"):
        dp.check_pool(cluster(), "10.10.128.0/17")


def test_adopt_by_subnet_or_make_by_name():
    s, name = dp.adopt_network(cluster(), "other", dp.NetworkSpec("10.10.0.0/16"))
    assert name == "demo" and s.networks.keys() == {"demo"}
    s, name = dp.adopt_network(cluster(), "appnet", dp.NetworkSpec("10.30.0.0/16", mtu=1400))
    assert name == "appnet" and s.networks["appnet"].mtu == 1400
    with pytest.raises(XoError, match="xoverlay network demo has subnet 10.10.0.0/16"):
        dp.adopt_network(cluster(), "demo", dp.NetworkSpec("10.30.0.0/16"))
    with pytest.raises(XoError, match="is not --internal"):
        dp.adopt_network(cluster(), "demo", dp.NetworkSpec("10.10.0.0/16", internal=True))


def test_join_answer_gateway_only_for_the_first_network():
    first = dp.join_answer(True, "xt1")
    assert first["Gateway"] == model.GATEWAY_IP and first["StaticRoutes"][0]["RouteType"] == 1
    assert first["InterfaceName"] == {"SrcName": "xt1", "DstPrefix": "eth"}
    later = dp.join_answer(False, "xt2")
    assert "Gateway" not in later and "StaticRoutes" not in later and later["DisableGatewayService"]


def test_aliases_are_valid_names_once():
    c = {"Name": "/web1", "NetworkSettings": {"Networks": {"appnet": {"Aliases": ["web1", "7daa739c3209", "www"]}}}}
    assert dp.aliases_for(c, "appnet") == ("web1", "www")
    assert dp.endpoint_name("7daa739c3209318d2cb7") == "docker-7daa739c3209"
