"""Per-packet cost of xoverlay's BPF programs through BPF_PROG_TEST_RUN: bpf_costs for
the east-west paths, bpf_lb_costs for the load balancer with N services in the maps. The
maps hold what node A's agent would write for a small cluster made with
xoverlay.core.model; the programs are pinned under the node BPF_NODE."""
from __future__ import annotations

import os
import statistics

from bench.lib.service_paths import FILLER_PORT, vips_from_top
from bench.lib.shell import BPF_NODE, PREFIX
from bench.lib.traffic import UDP_PAYLOAD, UDP_PORT

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_PASS = 2
# struct __sk_buff up to ingress_ifindex (offset 36): the only field we set. The kernel
# reads a shorter ctx_in as if the rest were zero.
_SKB_CTX_LEN = 40
_INSN_MOV_R0 = 0xb7               # BPF_ALU64 | BPF_MOV | BPF_K, dst r0
_INSN_EXIT = 0x95


def _return_prog(prog_type: int, value: int, flags: int = 0) -> int:
    """A program that only returns `value`: what a run costs with nothing to do."""
    from xoverlay.kernel import bpf
    insns = bytes([_INSN_MOV_R0, 0, 0, 0]) + value.to_bytes(4, "little") + bytes([_INSN_EXIT]) + bytes(7)
    return bpf.prog_load(prog_type, "xbench_empty", insns, flags)


def _skb_ctx(ingress_ifindex: int) -> bytes:
    ctx = bytearray(_SKB_CTX_LEN)
    ctx[36:40] = ingress_ifindex.to_bytes(4, "little")
    return bytes(ctx)


class BpfCostCluster:
    """Node A of a two-node cluster, built with the control plane's own functions
    (xoverlay.core.model, then xoverlay.core.desired.desired_maps): local endpoints a1, a2 on A, b1 on node
    B. The maps hold exactly what A's agent would write."""
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

    def fill(self, maps: dict, build_id: int) -> None:
        from xoverlay.core import desired
        want = desired.desired_maps(self.state, "A", self.IFINDEX, self.UNDERLAY_IFINDEX, build_id)
        for name, entries in want.items():
            for key, value in entries.items():
                maps[name].set(key, value)

    def packets(self) -> dict:
        from scapy.layers.inet import IP, UDP
        from scapy.layers.l2 import Ether
        from scapy.layers.vxlan import VXLAN
        a1, a2, b1 = self.ep["a1"], self.ep["a2"], self.ep["b1"]
        gw = "ee:ee:ee:ee:ee:ee"
        payload = b"x" * UDP_PAYLOAD

        def inner(src, dst, smac, dmac):
            return Ether(src=smac, dst=dmac) / IP(src=src.ip, dst=dst.ip) / UDP(sport=40000, dport=5301) / payload
        vxlan = (Ether(src=self.B_MAC, dst=self.A_MAC) / IP(src=self.B_IP, dst=self.A_IP, flags="DF") /
                 UDP(sport=50000, dport=4789, chksum=0) / VXLAN(vni=self.VNI, flags=0x08) /
                 inner(b1, a1, b1.mac, a1.mac))
        return {"encap": bytes(inner(a1, b1, a1.mac, gw)), "local": bytes(inner(a1, a2, a1.mac, gw)),
                "vxlan": bytes(vxlan)}


def _check_encap(inp: bytes, out: bytes, c: BpfCostCluster) -> str | None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    if len(out) != len(inp) + 50:
        return f"output is {len(out)} bytes, expected {len(inp) + 50}"
    p = Ether(out)
    if not (p.haslayer(UDP) and p[IP].dst == c.B_IP and p[UDP].dport == 4789):
        return "output is not VXLAN to node B"
    return None


def _check_local(inp: bytes, out: bytes, c: BpfCostCluster) -> str | None:
    if out[:6] != bytes.fromhex(c.ep["a2"].mac.replace(":", "")) or out[14:] != inp[14:]:
        return "output is not the same packet addressed to a2's MAC"
    return None


def _check_decap(inp: bytes, out: bytes, c: BpfCostCluster) -> str | None:
    if len(out) != len(inp) - 50 or out[14:] != inp[64:]:
        return "output is not the inner packet"
    if out[:6] != bytes.fromhex(c.ep["a1"].mac.replace(":", "")):
        return "inner frame not addressed to a1's MAC"
    return None


def bpf_costs(samples: int, repeat: int) -> list[dict]:
    """ns per packet of each program on its main path, measured two ways, each less what
    the same measurement gives for a program that only returns (the test harness's own
    cost):

    single: `samples` runs of one packet each (repeat=1): the median of the kernel's own
      timing of each run. Every run gets a fresh skb, so every run takes the path we
      mean; caches are as cold as a syscall and an skb allocation leave them.
    loop: one BPF_PROG_TEST_RUN with repeat=`repeat`, hot caches. The kernel runs the
      program that many times on the SAME skb, so from the second run on a program sees
      the packet as it left it: encap would wrap the wrapped packet, decap would see a
      plain frame. Only two paths survive that: the XDP filter (it does not change the
      packet) and local delivery, if the sender's own MAC is the gateway's (the rewritten
      source MAC then passes the source check again: same code path, one map entry
      changed for the loop only). Each loop is checked: same verdict and output as one
      run, no drop counted."""
    from xoverlay.kernel import bpf, datapath
    from xoverlay.maps.layout import U32, sum_percpu

    c = BpfCostCluster()
    pk = c.packets()
    rows = [
        # name, program, packet, ingress_ifindex, expected verdict, output check, loop?
        ("endpoint: VXLAN encap (to a remote endpoint)", "prog_endpoint", pk["encap"], c.IFINDEX["a1"],
         TC_ACT_REDIRECT, _check_encap, False),
        ("endpoint: local delivery (same node)", "prog_endpoint", pk["local"], c.IFINDEX["a1"],
         TC_ACT_REDIRECT, _check_local, True),
        ("underlay tc: VXLAN decap", "prog_underlay_tc", pk["vxlan"], None, TC_ACT_REDIRECT, _check_decap, False),
        ("underlay XDP: valid VXLAN, pass", "prog_underlay_xdp", pk["vxlan"], None, XDP_PASS,
         lambda i, o, c: None if o == i else "XDP changed the packet", True),
    ]
    progs, maps, empty = None, {}, {}
    try:
        progs = datapath.load(BPF_NODE, force=True)
        maps = datapath.open_maps(BPF_NODE)
        c.fill(maps, progs.build)
        empty = {"tc": _return_prog(bpf.BPF_PROG_TYPE_SCHED_CLS, TC_ACT_OK),
                 "xdp": _return_prog(bpf.BPF_PROG_TYPE_XDP, XDP_PASS, bpf.BPF_F_XDP_HAS_FRAGS)}

        def drops() -> int:
            return sum(sum_percpu(maps["xo_drops"].get(U32(i))).packets for i in range(32))

        def single(fd: int, packet: bytes, ctx: bytes | None) -> float:
            return statistics.median(bpf.prog_test_run(fd, packet, ctx, 1)[2] for _ in range(samples))

        def loop(fd: int, packet: bytes, ctx: bytes | None) -> int:
            return bpf.prog_test_run(fd, packet, ctx, repeat)[2]

        base = {"tc": (single(empty["tc"], pk["local"], _skb_ctx(0)), loop(empty["tc"], pk["local"], _skb_ctx(0))),
                "xdp": (single(empty["xdp"], pk["vxlan"], None), loop(empty["xdp"], pk["vxlan"], None))}
        out = []
        for name, prog, packet, ifindex, want, check, loopable in rows:
            kind = "xdp" if prog == "prog_underlay_xdp" else "tc"
            ctx = _skb_ctx(ifindex or 0) if kind == "tc" else None
            fd = progs.fds[prog]
            d0 = drops()
            verdict, result, _ = bpf.prog_test_run(fd, packet, ctx, 1)
            problem = (f"verdict {verdict}, expected {want}" if verdict != want else check(packet, result, c))
            ns = single(fd, packet, ctx)
            if drops() != d0:
                problem = problem or "the drop counters moved during the single runs"
            row = {"name": name, "program": prog, "packet_bytes": len(packet), "verdict": verdict,
                   "ns_single": round(ns - base[kind][0], 1), "ns_single_raw": ns,
                   "ns_loop": None, "ns_loop_raw": None, "empty_single": base[kind][0],
                   "empty_loop": base[kind][1], "loop_note": "", "problem": problem}
            if loopable:
                if prog == "prog_endpoint":
                    packet = _sender_is_gateway(maps, c, packet)
                    verdict, result, _ = bpf.prog_test_run(fd, packet, ctx, 1)
                d0 = drops()
                lv, lout, lns = bpf.prog_test_run(fd, packet, ctx, repeat)
                if lv == verdict == want and lout == result and drops() == d0:
                    row["ns_loop_raw"], row["ns_loop"] = lns, lns - base[kind][1]
                else:
                    row["loop_note"] = f"loop not valid: last verdict {lv}, {drops() - d0} drops counted"
            else:
                row["loop_note"] = "rewrites its packet: repeated runs would take another path"
            out.append(row)
        return out
    finally:
        for fd in empty.values():
            os.close(fd)
        for m in maps.values():
            m.close()
        if progs is not None:
            progs.close()
        datapath.unpin(BPF_NODE)


def _sender_is_gateway(maps: dict, c: BpfCostCluster, packet: bytes) -> bytes:
    """For the local-delivery loop: a1's MAC becomes the gateway's, in its map entry and
    in the packet, so the packet as the program leaves it passes the source check again."""
    import ctypes

    from xoverlay.maps.layout import U32
    key = U32(c.IFINDEX["a1"])
    entry = maps["xo_local_endpoints"].get(key)
    entry.mac = (ctypes.c_uint8 * 6).from_buffer_copy(b"\xee" * 6)
    maps["xo_local_endpoints"].set(key, entry)
    return packet[:6] + b"\xee" * 6 + packet[12:]


def _services_state(c: BpfCostCluster, total: int):
    """c's cluster with `total` services: two measured ones (VIP-LOCAL: backend a2 on
    this node; VIP-REMOTE: b1 on node B) and fillers with two backends each, all made by
    xoverlay.core.model."""
    from dataclasses import replace as dc_replace

    from xoverlay.core import model
    s = c.state
    for name, backend in (("vip-local", "a2"), ("vip-remote", "b1")):
        s = model.create_service(s, name, c.NET, [f"{UDP_PORT}/udp", f"{UDP_PORT}/tcp"], [backend])
    fillers = max(0, total - 2)
    if fillers:
        s = model.create_service(s, "filler-0", c.NET, [FILLER_PORT], ["a2", "b1"])
        tpl = s.services["filler-0"]
        taken = {x.vip for x in s.services.values()} | {e.ip for e in s.endpoints.values()}
        vips = (v for v in vips_from_top(c.SUBNET) if v not in taken)
        services = dict(s.services)
        next_id = max(x.id for x in services.values()) + 1
        for i in range(1, fillers):
            services[f"filler-{i}"] = dc_replace(tpl, name=f"filler-{i}", id=next_id, vip=next(vips))
            next_id += 1
        s = dc_replace(s, services=services)
    return s


def _l4_checksums_ok(ip_bytes: bytes) -> bool:
    from scapy.layers.inet import IP, TCP, UDP
    pkt = IP(ip_bytes)
    fresh = IP(ip_bytes)
    del fresh.chksum
    if isinstance(fresh.payload, (TCP, UDP)):
        del fresh.payload.chksum
    again = IP(bytes(fresh))
    return again.chksum == pkt.chksum and (not isinstance(pkt.payload, (TCP, UDP))
                                           or again.payload.chksum == pkt.payload.chksum)


def bpf_lb_costs(samples: int, repeat: int, counts=(10, 10_000)) -> list[dict]:
    """ns per packet of the endpoint program on the service paths next to the same
    packet without a service, with `counts` services in the maps (filled by
    xoverlay.core.desired.desired_maps, Maglev tables pushed by xoverlay.kernel.maglev_maps as the agent does),
    each less an empty program's cost (see bpf_costs for the two columns).

    single: `samples` runs of one packet each, fresh skb each time. The connection table
      outlives the runs: a UDP packet to a VIP is a new flow once (a warm-up run) and an
      established one (table hit) in every timed run; a TCP SYN is a new connection in
      every run (Maglev pick, both table entries written).
    loop: repeat=`repeat` on one skb, for the path without a service only. A DNAT
      rewrites the packet: from its second run on a program would see a packet to the
      backend, not to the VIP. (Two services pointing at each other's VIP, both VIPs
      also endpoint entries, made a loop through the full service path until the
      endpoint program looked endpoints up before services: a VIP that is an endpoint
      is now direct traffic, so no loop can stay on the service path.)"""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    from xoverlay.core import desired
    from xoverlay.kernel import bpf, datapath
    from xoverlay.kernel.maglev_maps import MaglevTables
    from xoverlay.maps.layout import U32, sum_percpu

    c = BpfCostCluster()
    a1, a2, b1 = c.ep["a1"], c.ep["a2"], c.ep["b1"]
    gw = "ee:ee:ee:ee:ee:ee"
    payload = b"x" * UDP_PAYLOAD
    progs, maps, empty = None, {}, {}
    out = []
    try:
        progs = datapath.load(BPF_NODE, force=True)
        maps = datapath.open_maps(BPF_NODE)
        tables = MaglevTables(maps[desired.MAGLEV])
        fd = progs.fds["prog_endpoint"]
        empty = _return_prog(bpf.BPF_PROG_TYPE_SCHED_CLS, TC_ACT_OK)
        ctx = _skb_ctx(c.IFINDEX["a1"])

        def drops() -> int:
            return sum(sum_percpu(maps["xo_drops"].get(U32(i))).packets for i in range(32))

        def single(packet: bytes) -> float:
            return statistics.median(bpf.prog_test_run(fd, packet, ctx, 1)[2] for _ in range(samples))

        def frame(dst_ip, l4, smac=a1.mac):
            return bytes(Ether(src=smac, dst=gw) / IP(src=a1.ip, dst=dst_ip) / l4 / payload)

        def udp_(sport):
            return UDP(sport=sport, dport=UDP_PORT)

        def syn_(sport):
            return TCP(sport=sport, dport=UDP_PORT, flags="S", seq=1000)

        sport = 41000
        for total in counts:
            state = _services_state(c, total)
            svc = state.services
            want = desired.desired_maps(state, "A", c.IFINDEX, c.UNDERLAY_IFINDEX, progs.build)
            for name, entries in want.items():
                for key, value in entries.items():
                    maps[name].set(key, value)
            tables.apply(desired.desired_tables(state), [])
            # The services are in: the empty program's cost now, next to the runs.
            base_single = statistics.median(bpf.prog_test_run(empty, frame(a2.ip, udp_(1)), ctx, 1)[2]
                                            for _ in range(samples))
            base_loop = bpf.prog_test_run(empty, frame(a2.ip, udp_(1)), ctx, repeat)[2]
            sport += 10
            rows = [
                ("direct to a local endpoint (UDP), no service", frame(a2.ip, udp_(sport)), a2.ip, False),
                ("VIP, local backend: UDP, established flow", frame(svc["vip-local"].vip, udp_(sport + 1)),
                 a2.ip, False),
                ("VIP, local backend: TCP SYN, new connection (Maglev)",
                 frame(svc["vip-local"].vip, syn_(sport + 2)), a2.ip, False),
                ("direct to a remote endpoint (UDP, VXLAN encap), no service", frame(b1.ip, udp_(sport + 3)),
                 b1.ip, True),
                ("VIP, remote backend: UDP, established flow (+ encap)",
                 frame(svc["vip-remote"].vip, udp_(sport + 4)), b1.ip, True),
            ]
            for name, packet, dst, encap in rows:
                d0 = drops()
                verdict, result, _ = bpf.prog_test_run(fd, packet, ctx, 1)     # also the warm-up
                ip = result[14 + 50:] if encap else result[14:]
                problem = None
                if verdict != TC_ACT_REDIRECT:
                    problem = f"verdict {verdict}"
                elif encap and (len(result) != len(packet) + 50 or Ether(result)[IP].dst != c.B_IP):
                    problem = "not VXLAN to node B"
                elif IP(ip).dst != dst or not _l4_checksums_ok(ip):
                    problem = f"output to {IP(ip).dst} (expected {dst}) or bad checksums"
                ns = single(packet)
                if drops() != d0:
                    problem = problem or "drops counted"
                out.append({"services": total, "name": name, "ns_single": round(ns - base_single, 1),
                            "ns_single_raw": ns, "empty_single": base_single, "ns_loop": None,
                            "ns_loop_raw": None, "empty_loop": base_loop, "loop_note": "", "problem": problem})

            # --- the loop: the path without a service ----------------------------------
            _sender_is_gateway(maps, c, b"")          # a1's MAC := the gateway's (until the next count's maps)
            sport += 10
            packet = frame(a2.ip, udp_(sport), gw)
            row = next(r for r in out if r["services"] == total and r["name"].startswith("direct to a local"))
            d0 = drops()
            verdict, result, _ = bpf.prog_test_run(fd, packet, ctx, 1)
            lv, lout, lns = bpf.prog_test_run(fd, packet, ctx, repeat)
            if lv != verdict or verdict != TC_ACT_REDIRECT or drops() != d0:
                row["loop_note"] = f"loop not valid: verdict {lv}, {drops() - d0} drops"
            elif lout != result:
                row["loop_note"] = "loop not valid: output differs from one run's"
            else:
                row["ns_loop_raw"], row["ns_loop"] = lns, round(lns - base_loop, 1)
            for r in out:
                if r["services"] == total and r["ns_loop"] is None and not r["loop_note"]:
                    r["loop_note"] = "rewrites its packet (DNAT, encap): single runs only"
        return out
    finally:
        if empty:
            os.close(empty)
        for m in maps.values():
            m.close()
        if progs is not None:
            progs.close()
        datapath.unpin(BPF_NODE)
