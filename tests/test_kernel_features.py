"""The feature probe `up` runs before it loads anything: each feature asked of the real
kernel, and a kernel that lacks one refused in one line naming it and its first kernel."""
from __future__ import annotations

import os

import pytest

from xoverlay.errors import XoError
from xoverlay.kernel import datapath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="probing BPF needs root")


@pytest.mark.parametrize("feature", datapath.FEATURES, ids=lambda f: f.name)
def test_this_kernel_has_every_feature(feature):
    assert feature.present()


def test_the_probes_can_say_no():
    assert not datapath._calls(10_000)                      # no such helper
    assert not datapath._makes_map(10_000, 4, 4, 1)         # no such map type
    assert not datapath._loads(datapath.bpf.BPF_PROG_TYPE_XDP, datapath._insns((0xb7, 0, 2), datapath._EXIT),
                               1 << 30)                     # no such program flag
    datapath.check_kernel()                                 # and this kernel passes


def test_a_kernel_without_a_feature_is_refused_in_one_line(monkeypatch):
    frags = next(f for f in datapath.FEATURES if "frags" in f.name)
    ring = next(f for f in datapath.FEATURES if "ring buffer" in f.name)
    monkeypatch.setattr(datapath, "FEATURES", (ring, datapath.Feature(frags.name, frags.since, lambda: False)))
    with pytest.raises(XoError) as e:
        datapath.check_kernel()
    assert str(e.value) == (f"this kernel ({os.uname().release}) lacks XDP programs that accept multi-buffer "
                            "frames (XDP frags), from Linux 5.18: xoverlay needs Linux 5.18 or newer")


def test_the_message_names_every_missing_feature_and_the_newest_floor():
    ring, peer = datapath.FEATURES[0], datapath.FEATURES[1]
    assert datapath.kernel_error("5.4.0-100", [peer, ring]) == (
        "this kernel (5.4.0-100) lacks bpf_redirect_peer (delivery into a container), from Linux 5.10; "
        "the BPF ring buffer (monitor events), from Linux 5.8: xoverlay needs Linux 5.10 or newer")


@pytest.mark.parametrize("request_, driver, attach, why", [
    ("auto", "veth", False, "off (auto: a veth's peer turns GSO off while XDP is attached; the tc program filters the same)"),
    ("auto", "virtio_net", False, "off (auto: virtio-net turns its receive offloads (LRO, GRO_HW) off while XDP is "
                                  "attached; the tc program filters the same)"),
    ("auto", "ixgbe", False, "off (auto: XDP not measured on ixgbe; the tc program filters the same)"),
    ("auto", None, False, "off (auto: XDP not measured on this driver; the tc program filters the same)"),
    ("on", "ixgbe", True, "on (--xdp)"),
    (True, "veth", True, "on (--xdp); it costs: a veth's peer turns GSO off while XDP is attached"),
    ("off", "veth", False, "off (--no-xdp)"),
    (False, None, False, "off (--no-xdp)"),
])
def test_xdp_is_attached_by_default_only_where_it_costs_no_offloads(request_, driver, attach, why):
    assert datapath.choose_xdp(request_, driver) == (attach, why)


def test_a_driver_measured_to_keep_its_offloads_gets_xdp_by_default(monkeypatch):
    monkeypatch.setattr(datapath, "XDP_KEEPS_OFFLOADS", frozenset({"mlx5_core"}))
    assert datapath.choose_xdp("auto", "mlx5_core") == (True, "on (auto: mlx5_core keeps its offloads with XDP)")


@pytest.mark.parametrize("driver, features, make", [
    ("virtio_net", {"tx-udp_tnl-segmentation": False}, True),     # Debian 12's 6.1 guests
    ("veth", {"tx-udp_tnl-segmentation": True}, True),            # hands the skb to its peer as it is
    ("ixgbe", {"tx-udp_tnl-segmentation": True}, False),          # would segment a "tunnel" that is none
    (None, {}, True),
])
def test_the_tunnel_socket_for_gro_only_where_no_device_segments_a_decapsulated_aggregate(driver, features, make):
    made, why = datapath.choose_gro(driver, features, 4789)
    assert made is make
    if make:
        assert why == "on: xo-gro's socket on UDP 4789 lets GRO merge tunnel frames before the tc program"
    else:
        assert why.startswith("off: ixgbe segments UDP tunnels itself (tx-udp_tnl-segmentation)")
