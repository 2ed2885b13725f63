"""Per-packet cost of xoverlay's BPF programs through BPF_PROG_TEST_RUN, on the tests' own
harness (tests/bpfrun.py): its Datapath loads and pins the programs as the agent does
and runs them, ReturnOnly is the program whose cost (the harness's own) each number is
net of, checksum_problems and entry_replaced are the tests'. The maps hold what node A's
agent would write for a small cluster made with xoverlay.core.model (desired_maps, and
the Maglev tables as the agent pushes them), under the node BPF_NODE.

Two ways of timing, each less what the same gives for ReturnOnly:
  single: `samples` runs of one packet each (repeat=1), the median of the kernel's own
    timing of each. Every run gets a fresh skb, so every run takes the path we mean;
    caches are as cold as a syscall and an skb allocation leave them.
  loop: one BPF_PROG_TEST_RUN with repeat=`repeat`, hot caches. The kernel runs the
    program that many times on the SAME skb, so from the second run on a program sees
    the packet as it left it: encap would wrap the wrapped packet, decap would see a
    plain frame, a DNAT a packet to the backend. Only two paths survive that: the XDP
    filter (it does not change the packet) and local delivery, if the sender's own MAC
    is the gateway's (the rewritten source MAC then passes the source check again: same
    code path, one map entry changed for the loop only). Each loop is checked: same
    verdict and output as one run, no drop counted."""
from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import sys

from bench.lib.service_paths import with_fillers
from bench.lib.shell import BPF_NODE, PREFIX
from bench.lib.traffic import UDP_PAYLOAD, UDP_PORT

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "tests"))
from bpfrun import (  # noqa: E402
    GW_MAC,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    VXLAN_PORT,
    XDP_PASS,
    Datapath,
    ReturnOnly,
    checksum_problems,
    entry_replaced,
)

ETH_HLEN = 14
ENCAP = 50                        # outer IPv4 + UDP + VXLAN + inner Ethernet, before the inner IP


class Cluster:
    """Node A of a two-node cluster, made with xoverlay.core.model: endpoints a1 and a2 on
    A, b1 on node B, no service (with_services adds them)."""
    NET, SUBNET, VNI = "bench", "10.99.0.0/16", 4242
    A_IP, B_IP = "198.18.0.1", "198.18.0.2"
    A_MAC, B_MAC = "52:54:00:18:00:01", "52:54:00:18:00:02"
    IFINDEX = {"a1": 1001, "a2": 1002}
    UNDERLAY_IFINDEX = 77

    def __init__(self):
        from xoverlay.core import model
        s = model.State()
        s = model.create_network(s, self.NET, self.SUBNET, vni=self.VNI)
        s = model.join_node(s, "A", self.A_IP)
        s = model.join_node(s, "B", self.B_IP)
        for name, node in (("a1", "A"), ("a2", "A"), ("b1", "B")):
            s = model.add_endpoint(s, name, self.NET, node, f"/run/netns/{PREFIX}{name}", True)
        self.state = s
        self.ep = s.endpoints

    def with_services(self, total: int):
        """The cluster with `total` services: two measured ones (vip-local: backend a2 on
        this node; vip-remote: b1 on node B) and fillers with two backends each."""
        from xoverlay.core import model
        s = self.state
        for name, backend in (("vip-local", "a2"), ("vip-remote", "b1")):
            s = model.create_service(s, name, self.NET, [f"{UDP_PORT}/udp", f"{UDP_PORT}/tcp"], [backend])
        return with_fillers(s, [f"filler-{i}" for i in range(max(0, total - 2))], self.NET, ["a2", "b1"])

    def fill(self, dp: Datapath, state=None) -> None:
        """What A's agent would write for `state` (default: the cluster without services):
        its maps, and the Maglev tables of its services."""
        from xoverlay.core import desired
        from xoverlay.kernel.maglev_maps import MaglevTables
        state = self.state if state is None else state
        want = desired.desired_maps(state, "A", self.IFINDEX, self.UNDERLAY_IFINDEX, dp.progs.build)
        for name, entries in want.items():
            for key, value in entries.items():
                dp.maps[name].set(key, value)
        if state.services:
            MaglevTables(dp.maps[desired.MAGLEV]).apply(desired.desired_tables(state), [])

    def frame(self, dst_ip: str, l4, smac: str | None = None) -> bytes:
        """a1's packet to `dst_ip` with the UDP payload of the traffic tests."""
        from scapy.layers.inet import IP
        from scapy.layers.l2 import Ether
        a1 = self.ep["a1"]
        return bytes(Ether(src=smac or a1.mac, dst=GW_MAC) / IP(src=a1.ip, dst=dst_ip) / l4 / (b"x" * UDP_PAYLOAD))

    def packets(self) -> dict:
        from scapy.layers.inet import IP, UDP
        from scapy.layers.l2 import Ether
        from scapy.layers.vxlan import VXLAN
        a1, a2, b1 = self.ep["a1"], self.ep["a2"], self.ep["b1"]
        inner = (Ether(src=b1.mac, dst=a1.mac) / IP(src=b1.ip, dst=a1.ip) / UDP(sport=40000, dport=UDP_PORT) /
                 (b"x" * UDP_PAYLOAD))
        vxlan = (Ether(src=self.B_MAC, dst=self.A_MAC) / IP(src=self.B_IP, dst=self.A_IP, flags="DF") /
                 UDP(sport=50000, dport=VXLAN_PORT, chksum=0) / VXLAN(vni=self.VNI, flags=0x08) / inner)
        return {"encap": self.frame(b1.ip, UDP(sport=40000, dport=UDP_PORT)),
                "local": self.frame(a2.ip, UDP(sport=40000, dport=UDP_PORT)), "vxlan": bytes(vxlan)}


# --- what a path's output must be --------------------------------------------------------

def _check_encap(inp: bytes, out: bytes, c: Cluster) -> str | None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    if len(out) != len(inp) + ENCAP:
        return f"output is {len(out)} bytes, expected {len(inp) + ENCAP}"
    p = Ether(out)
    if not (p.haslayer(UDP) and p[IP].dst == c.B_IP and p[UDP].dport == VXLAN_PORT):
        return "output is not VXLAN to node B"
    return None


def _check_local(inp: bytes, out: bytes, c: Cluster) -> str | None:
    if out[:6] != bytes.fromhex(c.ep["a2"].mac.replace(":", "")) or out[ETH_HLEN:] != inp[ETH_HLEN:]:
        return "output is not the same packet addressed to a2's MAC"
    return None


def _check_decap(inp: bytes, out: bytes, c: Cluster) -> str | None:
    if len(out) != len(inp) - ENCAP or out[ETH_HLEN:] != inp[ETH_HLEN + ENCAP:]:
        return "output is not the inner packet"
    if out[:6] != bytes.fromhex(c.ep["a1"].mac.replace(":", "")):
        return "inner frame not addressed to a1's MAC"
    return None


def _check_unchanged(inp: bytes, out: bytes, c: Cluster) -> str | None:
    return None if out == inp else "XDP changed the packet"


def _check_delivered(inp: bytes, out: bytes, dst: str, encap: bool, c: Cluster) -> str | None:
    """A service path's output: VXLAN to node B if `encap`, the (inner) packet to `dst`
    with checksums scapy agrees with."""
    from scapy.layers.inet import IP
    if encap and (problem := _check_encap(inp, out, c)):
        return problem
    ip = out[ETH_HLEN + ENCAP:] if encap else out[ETH_HLEN:]
    if IP(ip).dst != dst:
        return f"output to {IP(ip).dst} (expected {dst})"
    bad = checksum_problems(ip)
    return f"bad checksums: {', '.join(bad)}" if bad else None


# --- measuring ---------------------------------------------------------------------------

def _dropped(dp: Datapath) -> int:
    return sum(packets for packets, _ in dp.drops().values())


def _median_ns(run, samples: int) -> float:
    return statistics.median(run().ns for _ in range(samples))


@contextlib.contextmanager
def _sender_is_gateway(dp: Datapath, c: Cluster, packet: bytes):
    """For the local-delivery loop: a1's MAC the gateway's, in its map entry for the
    with-block (entry_replaced) and in the packet it yields, so that the packet as the
    program leaves it passes the source check again."""
    from xoverlay.maps.layout import U32
    gw = bytes.fromhex(GW_MAC.replace(":", ""))
    key = U32(c.IFINDEX["a1"])
    entry = dp.maps["xo_local_endpoints"].get(key)
    entry.mac = (ctypes.c_uint8 * 6).from_buffer_copy(gw)
    with entry_replaced(dp.maps["xo_local_endpoints"], key, entry):
        yield packet[:6] + gw + packet[12:]


def bpf_costs(samples: int, repeat: int) -> list[dict]:
    """ns per packet of each program on its main path, single and (where the path
    survives it) loop, each less ReturnOnly's."""
    c = Cluster()
    pk = c.packets()
    rows = [
        # name, program, packet, ingress_ifindex (tc), expected verdict, output check, loop?
        ("endpoint: VXLAN encap (to a remote endpoint)", "prog_endpoint", pk["encap"], c.IFINDEX["a1"],
         TC_ACT_REDIRECT, _check_encap, False),
        ("endpoint: local delivery (same node)", "prog_endpoint", pk["local"], c.IFINDEX["a1"],
         TC_ACT_REDIRECT, _check_local, True),
        ("underlay tc: VXLAN decap", "prog_underlay_tc", pk["vxlan"], 0, TC_ACT_REDIRECT, _check_decap, False),
        ("underlay XDP: valid VXLAN, pass", "prog_underlay_xdp", pk["vxlan"], None, XDP_PASS, _check_unchanged,
         True),
    ]
    out = []
    with Datapath(BPF_NODE, fill=None) as dp, ReturnOnly("tc", TC_ACT_OK) as tc, \
            ReturnOnly("xdp", XDP_PASS) as xdp:
        c.fill(dp)
        base = {"tc": (_median_ns(lambda: tc.run(pk["local"], 0), samples), tc.run(pk["local"], 0, repeat).ns),
                "xdp": (_median_ns(lambda: xdp.run(pk["vxlan"]), samples), xdp.run(pk["vxlan"], None, repeat).ns)}
        for name, prog, packet, ifindex, want, check, loopable in rows:
            kind = "xdp" if prog == "prog_underlay_xdp" else "tc"
            d0 = _dropped(dp)
            first = dp.run(prog, packet, ifindex)
            problem = (f"verdict {first.verdict}, expected {want}" if first.verdict != want
                       else check(packet, first.out, c))
            ns = _median_ns(lambda: dp.run(prog, packet, ifindex), samples)
            if _dropped(dp) != d0:
                problem = problem or "the drop counters moved during the single runs"
            row = {"name": name, "program": prog, "packet_bytes": len(packet), "verdict": first.verdict,
                   "ns_single": round(ns - base[kind][0], 1), "ns_single_raw": ns,
                   "ns_loop": None, "ns_loop_raw": None, "empty_single": base[kind][0],
                   "empty_loop": base[kind][1], "loop_note": "", "problem": problem}
            if not loopable:
                row["loop_note"] = "rewrites its packet: repeated runs would take another path"
            else:
                with contextlib.ExitStack() as stack:
                    if prog == "prog_endpoint":
                        packet = stack.enter_context(_sender_is_gateway(dp, c, packet))
                        first = dp.run(prog, packet, ifindex)
                    d0 = _dropped(dp)
                    loop = dp.run(prog, packet, ifindex, repeat)
                    if loop.verdict == first.verdict == want and loop.out == first.out and _dropped(dp) == d0:
                        row["ns_loop_raw"], row["ns_loop"] = loop.ns, loop.ns - base[kind][1]
                    else:
                        row["loop_note"] = (f"loop not valid: last verdict {loop.verdict}, "
                                            f"{_dropped(dp) - d0} drops counted")
            out.append(row)
    return out


def bpf_lb_costs(samples: int, repeat: int, counts=(10, 10_000)) -> list[dict]:
    """ns per packet of the endpoint program on the service paths next to the same
    packet without a service, with `counts` services in the maps, each less ReturnOnly's.

    single: the connection table outlives the runs: a UDP packet to a VIP is a new flow
      once (the first run, which checks the output) and an established one (table hit)
      in every timed run; a TCP SYN is a new connection in every run (Maglev pick, both
      table entries written).
    loop: for the path without a service only (a DNAT rewrites the packet). Two services
      pointing at each other's VIP, both VIPs also endpoint entries, made a loop through
      the full service path until the endpoint program looked endpoints up before
      services: a VIP that is an endpoint is now direct traffic, so no loop can stay on
      the service path."""
    from scapy.layers.inet import TCP, UDP

    c = Cluster()
    a2, b1 = c.ep["a2"], c.ep["b1"]
    ifindex = c.IFINDEX["a1"]
    out = []
    with Datapath(BPF_NODE, fill=None) as dp, ReturnOnly("tc", TC_ACT_OK) as empty:
        def udp(sport):
            return UDP(sport=sport, dport=UDP_PORT)

        def syn(sport):
            return TCP(sport=sport, dport=UDP_PORT, flags="S", seq=1000)

        sport = 41000
        for total in counts:
            state = c.with_services(total)
            svc = state.services
            c.fill(dp, state)
            # The services are in: the empty program's cost now, next to the runs.
            baseline = c.frame(a2.ip, udp(1))
            base_single = _median_ns(lambda: empty.run(baseline, ifindex), samples)
            base_loop = empty.run(baseline, ifindex, repeat).ns
            sport += 10
            rows = [
                ("direct to a local endpoint (UDP), no service", c.frame(a2.ip, udp(sport)), a2.ip, False),
                ("VIP, local backend: UDP, established flow", c.frame(svc["vip-local"].vip, udp(sport + 1)),
                 a2.ip, False),
                ("VIP, local backend: TCP SYN, new connection (Maglev)",
                 c.frame(svc["vip-local"].vip, syn(sport + 2)), a2.ip, False),
                ("direct to a remote endpoint (UDP, VXLAN encap), no service", c.frame(b1.ip, udp(sport + 3)),
                 b1.ip, True),
                ("VIP, remote backend: UDP, established flow (+ encap)",
                 c.frame(svc["vip-remote"].vip, udp(sport + 4)), b1.ip, True),
            ]
            here = []
            for name, packet, dst, encap in rows:
                d0 = _dropped(dp)
                first = dp.run("prog_endpoint", packet, ifindex)     # also the warm-up
                problem = (f"verdict {first.verdict}" if first.verdict != TC_ACT_REDIRECT
                           else _check_delivered(packet, first.out, dst, encap, c))
                ns = _median_ns(lambda: dp.run("prog_endpoint", packet, ifindex), samples)
                if _dropped(dp) != d0:
                    problem = problem or "drops counted"
                here.append({"services": total, "name": name, "ns_single": round(ns - base_single, 1),
                             "ns_single_raw": ns, "empty_single": base_single, "ns_loop": None,
                             "ns_loop_raw": None, "empty_loop": base_loop,
                             "loop_note": "rewrites its packet (DNAT, encap): single runs only",
                             "problem": problem})

            # The loop: the path without a service.
            sport += 10
            row = here[0]
            with _sender_is_gateway(dp, c, c.frame(a2.ip, udp(sport))) as packet:
                d0 = _dropped(dp)
                first = dp.run("prog_endpoint", packet, ifindex)
                loop = dp.run("prog_endpoint", packet, ifindex, repeat)
                if loop.verdict != first.verdict or first.verdict != TC_ACT_REDIRECT or _dropped(dp) != d0:
                    row["loop_note"] = f"loop not valid: verdict {loop.verdict}, {_dropped(dp) - d0} drops"
                elif loop.out != first.out:
                    row["loop_note"] = "loop not valid: output differs from one run's"
                else:
                    row["ns_loop_raw"], row["ns_loop"], row["loop_note"] = loop.ns, round(loop.ns - base_loop, 1), ""
            out += here
    return out
