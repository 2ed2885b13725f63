"""Lints: settings of a node that break or slow its overlay, each with what to do.

Each decision is a pure function of facts (unit-tested in tests/test_lints.py);
`gather` is the thin part that reads the facts from the kernel: the node's netns, its
underlay device (XDP mode, driver, offload features, MTU), its endpoints' veths, the
UDP sockets of that netns and the monitor flag. Why each lint exists is in
docs/STATUS.md ("Lints")."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from typing import Callable

from xoverlay.core.model import State
from xoverlay.errors import XoError
from xoverlay.kernel import monitor_flag
from xoverlay.kernel.datapath import XDP_COSTS
from xoverlay.kernel.pinned import PinnedMap
from xoverlay.maps.layout import CFG_EGRESS, MAPS, U32, ip_str, pin_dir

HEADROOM = 50                # outer IPv4 + UDP + VXLAN + inner Ethernet
SEVERITIES = ("error", "warning", "info")
# VMware's vmxnet3 offloads VXLAN itself (tunnel segmentation, inner checksums) since
# vSphere 6.7u2; with the port in use by NSX or not, several releases break it.
VMXNET3_BROKEN = ("tx-checksum-ip-generic", "tx-udp_tnl-segmentation", "tx-udp_tnl-csum-segmentation")


def lint(id: str, severity: str, subject: str, message: str, fix: str) -> dict:
    assert severity in SEVERITIES
    return {"id": id, "severity": severity, "subject": subject, "message": message, "fix": fix}


# --- one pure decision per lint --------------------------------------------------------------

def lint_bpffs(mounted: bool) -> list[dict]:
    if mounted:
        return []
    return [lint("bpffs-not-mounted", "error", "/sys/fs/bpf",
                 "bpffs is not mounted: the pinned maps and programs cannot be found, and `up` refuses to start",
                 "mount -t bpf bpf /sys/fs/bpf")]


def lint_xdp(device: str, mode: str, attached_id: int, ours_id: int | None, driver: str | None = None) -> list[dict]:
    """mode: 'native', 'generic', 'offload', 'multi' or 'off' (bpf_xdp_query on the
    underlay); attached_id: the program there (0: none); ours_id: our pinned XDP
    program's id (None: not pinned); driver: the underlay's (ethtool -i)."""
    if mode == "off":
        return [lint("xdp-off", "info", device,
                     "no XDP program on the underlay: bad tunnel traffic is dropped by the tc program, after "
                     "the kernel has allocated an skb for it",
                     "where the driver keeps its offloads with XDP, up --xdp (the drop-early filter)")]
    out = []
    if driver in XDP_COSTS:
        out.append(lint("xdp-costs-offloads", "warning", device,
                        f"XDP is attached to a {driver} device: {XDP_COSTS[driver]}, which costs TCP far more "
                        "than the filter saves (the tc program filters the same)",
                        "xoverlay up --xdp auto (the default) or --no-xdp"))
    if ours_id is not None and attached_id and attached_id != ours_id:
        out.append(lint("xdp-foreign", "warning", device,
                        f"the XDP program on the underlay (id {attached_id}) is not this node's "
                        f"(pinned prog_underlay_xdp is id {ours_id})",
                        "find who attached it (ip link show); restarting the agent replaces it"))
    if mode == "generic":
        out.append(lint("xdp-generic", "warning", device,
                        "XDP runs in generic (SKB) mode: it runs after the skb is allocated, so it saves "
                        "nothing over tc, and it does not see packets that arrived by bpf_redirect (veths)",
                        "use a driver with native XDP, or up --no-xdp to leave the checks to tc"))
    return out


def lint_offloads(device: str, driver: str | None, features: dict[str, bool]) -> list[dict]:
    if driver != "vmxnet3":
        return []
    on = [f for f in VMXNET3_BROKEN if features.get(f)]
    if not on:
        return []
    return [lint("offload-vmxnet3-vxlan", "warning", device,
                 f"vmxnet3 with {', '.join(on)} on: VMware's VXLAN offload computes wrong inner checksums or "
                 "drops tunnelled TCP/UDP on several vSphere and kernel releases (ICMP still passes)",
                 f"ethtool -K {device} " + " ".join(f"{f} off" for f in on))]


def lint_mtu(device: str, underlay_mtu: int, smallest_peer_mtu: int | None,
             endpoints: dict[str, int]) -> list[dict]:
    """endpoints: local endpoint name -> MTU of its veth."""
    path_mtu = min(underlay_mtu, smallest_peer_mtu) if smallest_peer_mtu else underlay_mtu
    short = {name: mtu for name, mtu in sorted(endpoints.items()) if path_mtu - mtu < HEADROOM}
    if not short:
        return []
    biggest = max(short.values())
    where = f"{device} MTU {underlay_mtu}" + (f", smallest peer underlay {smallest_peer_mtu}"
                                               if smallest_peer_mtu and smallest_peer_mtu < underlay_mtu else "")
    names = ", ".join(f"{n} ({m})" for n, m in list(short.items())[:5]) + (" ..." if len(short) > 5 else "")
    return [lint("mtu-headroom", "error", device,
                 f"{len(short)} endpoint(s) with an MTU that leaves less than {HEADROOM} bytes for VXLAN "
                 f"({where}): {names}; their full-size frames are dropped (VXLAN is sent with DF)",
                 f"endpoint MTU at most {path_mtu - HEADROOM} (re-create the endpoints), or raise the underlay "
                 f"MTU to {biggest + HEADROOM}")]


_UDP_LINE = re.compile(r"^\s*\d+:\s+([0-9A-Fa-f]{8}):([0-9A-Fa-f]{4})\s+\S+\s+(\S+)(?:\s+\S+){5}\s+(\d+)")


def parse_proc_udp(text: str) -> list[dict]:
    """/proc/net/udp -> [{"ip", "port", "inode"}] of the bound sockets (IPv4)."""
    out = []
    for line in text.splitlines()[1:]:
        m = _UDP_LINE.match(line)
        if not m:
            continue
        # The address is the socket's __be32 printed as a host-order number.
        ip = socket.inet_ntoa(int(m.group(1), 16).to_bytes(4, "little"))
        out.append({"ip": ip, "port": int(m.group(2), 16), "inode": int(m.group(4))})
    return out


def lint_vxlan_port(port: int, node_ip: str, sockets: list[dict], tunnel_device: bool = False) -> list[dict]:
    """sockets: [{"ip", "port", "inode", "owner"}] bound in the node's netns;
    tunnel_device: xo-gro is there, and one socket on 0.0.0.0 held by no process is its."""
    clash = [s for s in sockets if s["port"] == port and s["ip"] in ("0.0.0.0", node_ip)]
    ours = next((s for s in clash if s["ip"] == "0.0.0.0" and not s.get("owner")), None) if tunnel_device else None
    clash = [s for s in clash if s is not ours]
    if not clash:
        return []
    who = "; ".join(s.get("owner") or ("a kernel socket (a vxlan device: Docker's overlay, flannel.1, "
                                        "vxlan.calico...)" if not s["inode"] else f"socket inode {s['inode']}")
                    for s in clash)
    return [lint("vxlan-port-in-use", "error", f"udp {port}",
                 f"another user of UDP port {port} on {node_ip}: {who}. Our programs take every VXLAN packet "
                 "for this address before any socket sees it, so it gets none of its own (ours are decapsulated, "
                 "the rest dropped as UNKNOWN_VNI/UNKNOWN_PEER)",
                 "give one of the two another port (xoverlay up --vxlan-port, or the other tool's setting)")]


def lint_forwarding(device: str, forwarding: bool | None) -> list[dict]:
    """forwarding: net.ipv4.conf.DEVICE.forwarding in the node's netns (None: unread)."""
    if forwarding is not False:
        return []
    return [lint("underlay-not-forwarding", "warning", device,
                 f"{device} does not forward: the kernel's FIB lookup for BPF answers only for a forwarding "
                 "device, so every tunnel packet takes the kernel's full output route (slower), blackhole or "
                 "unreachable routes to peers are not honoured, the routing mesh runs in tc instead of XDP, and "
                 "replies to endpoints' egress (routed from it to their veths) are dropped",
                 f"sysctl -w net.ipv4.conf.{device}.forwarding=1 (Docker hosts have ip_forward=1; the host then "
                 "routes what arrives on it)")]


def lint_egress(node: str, egress: bool | None, nft: bool) -> list[dict]:
    """egress: XO_CFG_EGRESS in the node's pinned config (None: not pinned); nft: the
    nftables tool is installed."""
    if egress is not False:
        return []
    why = ("nft (nftables) is not installed" if not nft else
           "the agent could not set its nftables table up, or has not yet (its log says why)")
    return [lint("egress-off", "warning", node,
                 f"egress is off on {node}: {why}, so its endpoints' packets to anything outside the overlay "
                 "are dropped (NO_ROUTE)",
                 "apt-get install nftables (the agent sets egress up on its next pass)" if not nft else
                 f"see /run/xoverlay/{node}.log or the agent's output")]


def lint_monitor(state: str, pid: int) -> list[dict]:
    if state != "stale":
        return []
    return [lint("monitor-flag-stale", "warning", "xo_monitor",
                 f"monitor flag stale: pid {pid} set it and is gone, so the data path writes events nobody reads "
                 "(a small cost on every drop)",
                 "nothing if the agent runs (it clears it within 2 s); else any `xoverlay monitor` takes it over "
                 "and clears it on exit")]


def lint_unknown_netns(node: str) -> list[dict]:
    return [lint("underlay-not-found", "info", node,
                 f"node {node}'s underlay device is not in this network namespace and no agent of it runs here: "
                 "the XDP, offload, MTU and port lints were skipped",
                 "run status on the node itself (or where its agent runs)")]


def evaluate(facts: dict) -> list[dict]:
    """All lints for the facts `gather` returns, errors first."""
    out = lint_bpffs(facts["bpffs"])
    u = facts.get("underlay")
    if facts.get("pinned") and u is None:
        out += lint_unknown_netns(facts["node"])
    if u is not None:
        if u.get("xdp_mode") is not None:
            out += lint_xdp(u["name"], u["xdp_mode"], u["xdp_id"], facts.get("our_xdp_id"), u.get("driver"))
        out += lint_offloads(u["name"], u.get("driver"), u.get("features", {}))
        out += lint_mtu(u["name"], u["mtu"], facts.get("smallest_peer_mtu"), facts.get("endpoint_mtus", {}))
        out += lint_forwarding(u["name"], u.get("forwarding"))
        if facts.get("vxlan_port") and facts.get("node_ip"):
            out += lint_vxlan_port(facts["vxlan_port"], facts["node_ip"], facts.get("udp_sockets", []),
                                   facts.get("tunnel_tc_id") is not None)
    out += lint_egress(facts["node"], facts.get("egress"), facts.get("nft", True))
    if facts.get("monitor"):
        out += lint_monitor(facts["monitor"]["state"], facts["monitor"]["pid"])
    return sorted(out, key=lambda x: SEVERITIES.index(x["severity"]))


# --- gathering the facts (thin) ------------------------------------------------------------

XDP_MODES = {0: "off", 1: "native", 2: "generic", 3: "offload", 4: "multi"}


def _owners(inodes: set[int]) -> dict[int, str]:
    """socket inode -> 'pid N (comm)' of a process holding it."""
    found: dict[int, str] = {}
    if not inodes:
        return found
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                    with open(f"/proc/{pid}/comm") as f:
                        found.setdefault(int(link[8:-1]), f"pid {pid} ({f.read().strip()})")
        except OSError:
            continue
    return found


def _pinned(node: str, name: str, read: Callable):
    try:
        with PinnedMap(pin_dir(node), MAPS[name]) as m:
            return read(m)
    except OSError:
        return None


def _pinned_prog_id(node: str, name: str) -> int | None:
    from xoverlay.kernel import bpf
    try:
        fd = bpf.obj_get(os.path.join(pin_dir(node), name))
    except OSError:
        return None
    try:
        return bpf.prog_info(fd).id
    finally:
        os.close(fd)


def _forwarding(device: str) -> bool | None:
    """net.ipv4.conf.DEVICE.forwarding of this thread's netns."""
    try:
        with open(f"/proc/sys/net/ipv4/conf/{device}/forwarding") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def _conntrack() -> dict | None:
    """This thread's netns's conntrack: entries, max, and what it refused (summed over
    CPUs): `insert_failed`/`drop` is where connections egress could not give a port of
    the node's go (docs/DESIGN.md, "Egress"). None without conntrack here."""
    try:
        with open("/proc/thread-self/net/stat/nf_conntrack") as f:
            lines = f.read().split("\n")
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            count = int(f.read())
        with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    head = lines[0].split()
    totals = {k: 0 for k in ("insert_failed", "drop", "early_drop")}
    for line in lines[1:]:
        for k, v in zip(head, line.split()):
            if k in totals:
                totals[k] += int(v, 16)
    return {"entries": count, "max": limit, **totals}


def gather(state: State, node: str) -> dict:
    """The facts `evaluate` judges, read now. Anything that cannot be read is left out."""
    from xoverlay.kernel import bpf, ethtool, netns
    me = state.nodes.get(node)
    cfg = _pinned(node, "xo_config", lambda m: m.get(U32(0)))
    facts: dict = {"node": node, "bpffs": os.path.ismount("/sys/fs/bpf"), "pinned": cfg is not None,
                   "node_ip": me.underlay_ip if me else (ip_str(cfg.node_ip) if cfg else None),
                   "vxlan_port": me.vxlan_port if me else None}
    peers = [n.underlay_mtu for n in state.nodes.values() if n.name != node]
    facts["smallest_peer_mtu"] = min(peers) if peers else None
    mon = monitor_flag.read_flag(node)
    if mon is not None:
        facts["monitor"] = {"state": monitor_flag.flag_state(mon), "pid": mon.pid}
    if cfg is None:
        return facts
    facts["egress"] = bool(cfg.flags & CFG_EGRESS)
    facts["nft"] = shutil.which("nft") is not None
    from xoverlay.kernel.datapath import LOOPBACK_IFINDEX, PROGRAMS
    from xoverlay.kernel.gateway import TUNNEL_DEV
    facts["program_ids"] = {name: _pinned_prog_id(node, name) for name in PROGRAMS}
    facts["our_xdp_id"] = facts["program_ids"]["prog_underlay_xdp"]

    path = netns.node_netns(node)
    devices = netns.devices(path)
    dev = devices.get(cfg.underlay_ifindex)
    if dev is None or (facts["node_ip"] and facts["node_ip"] not in dev["ipv4"]):
        return facts                    # not the node's netns: nothing to say about its devices
    underlay = {"name": dev["name"], "mtu": dev["mtu"], "ifindex": cfg.underlay_ifindex}
    local = _pinned(node, "xo_local_endpoints", lambda m: m.items()) or {}
    vni_of = {n.name: n.vni for n in state.networks.values()}
    name_of = {(vni_of.get(e.network), e.ip): e.name for e in state.endpoints.values()}
    facts["endpoint_mtus"] = {name_of.get((v.vni, ip_str(v.ip)), f"ifindex {k.value}"): devices[k.value]["mtu"]
                              for k, v in local.items() if k.value in devices}
    try:
        with (netns.entered(path) if path else contextlib.nullcontext()):
            mode, prog = bpf.xdp_query(cfg.underlay_ifindex)
            underlay["xdp_mode"], underlay["xdp_id"] = XDP_MODES.get(mode, f"mode {mode}"), prog
            facts["tc_attach"] = bpf.tc_attach_kind()
            underlay["tc_id"] = bpf.tc_query(cfg.underlay_ifindex)
            facts["loopback_tc_id"] = bpf.tc_query(LOOPBACK_IFINDEX)
            tunnel = [i for i, d in devices.items() if d["name"] == TUNNEL_DEV]
            facts["tunnel_tc_id"] = bpf.tc_query(tunnel[0]) if tunnel else None
            facts["endpoint_tc_ids"] = {k.value: bpf.tc_query(k.value) for k in local if k.value in devices}
            underlay["forwarding"] = _forwarding(dev["name"])
            facts["conntrack"] = _conntrack()
            underlay["driver"] = ethtool.driver(dev["name"])
            underlay["features"] = ethtool.features(dev["name"])
            with open("/proc/thread-self/net/udp") as f:
                sockets = parse_proc_udp(f.read())
    except (OSError, XoError):
        sockets = []
    owners = _owners({s["inode"] for s in sockets if s["port"] == facts["vxlan_port"] and s["inode"]})
    facts["udp_sockets"] = [dict(s, owner=owners.get(s["inode"])) for s in sockets]
    facts["underlay"] = underlay
    return facts
