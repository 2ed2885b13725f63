"""Fixtures for what the differential fuzzer (tests/test_fuzz_datapath.py) found in the
data path, one per bug, in the style of tests/test_bpf_programs.py.

A VXLAN frame shorter than its outer IPv4 total length says (cut on the wire, or a
lying length) passed both the XDP filter and tc decap: the inner packet went into the
container, whose stack dropped it as truncated, uncounted by us. Decap skips ip_rcv(),
so the data path makes its length check: TRUNCATED_UDP. Ethernet padding (a frame
longer than its total length) is still fine."""
from __future__ import annotations

import os

import pytest
from bpfrun import TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, Datapath, Topology as T

pytest.importorskip("scapy")
from test_bpf_programs import ETH, Case, decapsulated, run_case, set_ip_tot_len, vxlan  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root"),
    pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def dp():
    with Datapath(f"pytest-fuzzfound-{os.getpid()}") as datapath:
        yield datapath


_ok = vxlan()
_cut = _ok[:-10]                                           # the inner payload cut short
_long = set_ip_tot_len(_ok, len(_ok) - ETH + 10)           # says 10 bytes more than there are
_padded = _ok + bytes(8)                                   # Ethernet padding after the packet

CASES = [
    ("cut inside the inner packet", _cut, "TRUNCATED_UDP"),
    ("outer total length past the frame", _long, "TRUNCATED_UDP"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("prog", ["prog_underlay_xdp", "prog_underlay_tc"])
def test_vxlan_shorter_than_its_ip_length_is_dropped(dp, prog, case):
    desc, frame, reason = case
    verdict = XDP_DROP if prog == "prog_underlay_xdp" else TC_ACT_SHOT
    run_case(dp, prog, Case(desc, frame, verdict, drop=reason))


def test_padding_after_the_packet_is_still_decapsulated(dp):
    run_case(dp, "prog_underlay_xdp", Case("padded", _padded, XDP_PASS))
    run_case(dp, "prog_underlay_tc", Case("padded", _padded, TC_ACT_REDIRECT, decapsulated(_padded, T.WEB1)))
