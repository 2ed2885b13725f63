"""Differential fuzzing: every BPF program against the reference model (tests/refmodel.py).

Generated frames (tests/fuzzpackets.py: valid traffic of the fixed cluster, services,
the routing mesh and the connections made on the way, and malformed frames: cut at
every header boundary, bad IHL, IP options, fragments, TTL 0/1, bad checksums and
lengths, wrong VXLAN flags, VNI 0 and 2^24-1, nested VXLAN, VLAN tags, IPv6, ARP
(requests, replies, probes, announcements, other formats, cut short), runts, jumbo
frames) run through BPF_PROG_TEST_RUN and through the model; they must agree on
every verdict and every output frame, every drop must be counted once under the
model's reason, and what is forwarded must be well formed (scapy).

Hypothesis draws the generator's seeds, derandomized: CI runs the same 20,000 frames
per program every time. bench/fuzz runs the long campaign.

The model also has to agree with the hand-written fixture tables of
test_bpf_programs.py, without the kernel: the spec, twice."""
from __future__ import annotations

import os

import pytest
from bpfrun import Topology as T

pytest.importorskip("scapy")
hypothesis = pytest.importorskip("hypothesis")
import fuzzpackets as F  # noqa: E402
import refmodel as M  # noqa: E402
import test_bpf_programs as P  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

PER_PROGRAM = 20_000
BATCH = 500                 # frames per program per seed (and per drop counter check)

root = pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")


# --- the model against the fixture tables (pure) ---------------------------------------------------

def _fixture_rows():
    for prog, rows in (("prog_endpoint", P.ENDPOINT), ("prog_underlay_tc", P.UNDERLAY_TC),
                       ("prog_underlay_xdp", P.UNDERLAY_XDP)):
        for case in rows:
            yield pytest.param(prog, case, id=f"{prog}: {case.desc}")


@pytest.mark.parametrize("prog,case", list(_fixture_rows()))
def test_model_agrees_with_the_fixture_tables(prog, case):
    maps = F.model_maps([], [], {})
    want = F.MODEL[prog](F.Case(prog, case.frame, case.ifindex), maps)
    assert F.VERDICTS[prog][want.verdict] == case.verdict, want
    assert want.reason == case.drop
    out = want.frame(case.frame)
    if case.output is P.UNCHANGED:
        assert out == case.frame
    elif isinstance(case.output, bytes):
        assert out.hex() == case.output.hex()
    elif callable(case.output):
        case.output(out, case.frame)


def test_model_reset_and_source_port():
    """Two formulas the fixtures check only loosely, against their independent twins:
    the VXLAN source port (test_bpf_mesh.flow_sport) and a service reset's checksums."""
    from scapy.layers.inet import IP, TCP
    from test_bpf_mesh import flow_sport
    for sport in range(40000, 40040):
        frame = P.container(T.WEB1, T.API1.ip, l4=TCP(sport=sport, dport=80))
        assert M.flow_sport(frame) == flow_sport(frame[M.ETH_HLEN:])
    flow = M.Flow(F.a(T.WEB1.ip), F.a(T.MANY.vip), 41000, 80, M.TCP, 34, M.ACK | 0x08, 7, 5001)
    reset = IP(M.reset_frame(flow, bytes(6))[M.ETH_HLEN:])
    fresh = IP(bytes(reset))
    del fresh.chksum, fresh[TCP].chksum
    fresh = IP(bytes(fresh))
    assert (fresh.chksum, fresh[TCP].chksum) == (reset.chksum, reset[TCP].chksum)
    assert (str(reset[TCP].flags), reset[TCP].seq) == ("R", 5001)


# --- the kernel against the model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def differ():
    from test_bpf_mesh import mesh_datapath, mesh_underlay
    with mesh_underlay() as (path, ifindex), mesh_datapath(path, ifindex) as dp:
        d = F.new_differ(dp, ifindex)
        d.netns = path
        yield d


@root
@pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
def test_kernel_agrees_with_the_model(differ):
    from xoverlay.kernel import netns

    # Two batches more than 20,000 frames: the few the kernel refuses to run do not count.
    @settings(max_examples=PER_PROGRAM // BATCH + 2, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**32 - 1))
    def one_batch(seed):
        gen = F.Generator(seed, differ.maps)
        with netns.entered(differ.netns):
            F.seed_gone(differ.maps, differ.dp.maps["xo_lb_ct"])
            differ.batch([gen.case(p) for _ in range(BATCH) for p in F.PROGS])
        assert not differ.disagreements, "\n".join(map(str, differ.disagreements[:5]))

    one_batch()
    # A few frames are ones BPF_PROG_TEST_RUN refuses (tc: an IPv4 frame under 34 bytes).
    for prog in F.PROGS:
        assert differ.run[prog] >= PER_PROGRAM, (prog, differ.run[prog], differ.refused[prog])
    # The frames reached every behaviour, and every drop reason a frame can cause.
    from xoverlay.maps.drops import REASONS
    seen = {reason for (_, _, reason) in differ.outcomes}
    # Kernel refusals, and the node's routes (no frame makes a route refuse a peer); the
    # fuzzed cluster has no --internal network (test_bpf_egress.py has its rows); xo-gro's
    # program drops everything, as TUNNEL_DEVICE, and has no model to differ from
    # (test_bpf_programs.py has its rows).
    unreachable = {"ENCAP_FAILED", "DECAP_FAILED", "LB_NAT_FAILED", "UNDERLAY_UNREACHABLE", "EGRESS_INTERNAL",
                   "TUNNEL_DEVICE"}
    assert {r.name for r in REASONS.values()} - unreachable - seen == set()
    assert ("prog_endpoint", "redirect", "LB_BACKEND_GONE") in differ.outcomes      # the reset
    paths = {reason for (_, verdict, reason) in differ.outcomes if verdict != "drop"}
    assert {"local + reverse NAT", "decap + reverse NAT", "mesh reply: VXLAN to the ingress node",
            "mesh reply: decap, source := node:port", "mesh: DNAT + VXLAN to the backend's node",
            "service, VXLAN", "service, local", "DNS to the gateway", "mesh request: decap",
            "ARP answered"} <= paths


def test_well_formed_check_catches_what_both_could_get_wrong():
    """The scapy check stands apart from the model: a wrong outer checksum or length, or
    an inner checksum broken on the way, is reported even when model and kernel agree."""
    from scapy.layers.inet import TCP
    frame = P.container(T.WEB1, T.API1.ip, l4=TCP(sport=40000, dport=80) / b"data")
    maps = F.model_maps([], [], {})
    want = M.endpoint(frame, maps, T.WEB1.ifindex)
    case = F.Case("prog_endpoint", frame, T.WEB1.ifindex)
    assert want.built == "encap" and F.well_formed(case, want, want.out) == []
    out = bytearray(want.out)
    out[M.ETH_HLEN + 10] ^= 1                                    # outer IPv4 checksum
    assert F.well_formed(case, want, bytes(out)) == ["outer IPv4 header checksum / form"]
    out = bytearray(want.out)
    out[M.ETH_HLEN + 25] += 1                                    # outer UDP length
    assert F.well_formed(case, want, bytes(out)) == ["outer IP/UDP length"]
    out = bytearray(want.out)
    out[M.ETH_HLEN + M.ENCAP_LEN + 19] ^= 1                      # inner destination address
    assert F.well_formed(case, want, bytes(out)) == ["inner IPv4 checksum", "inner TCP checksum"]
