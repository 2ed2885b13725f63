"""The node's side of the overlay, beside its endpoints' veths: the gateway device xo-gw
and the routing rules and tables that bring replies back to endpoints, egress (the
nftables table that masquerades what endpoint.c hands to xo-gw), lo's settings for the
routing mesh's replies to the node itself, and xo-gro, the idle tunnel device whose
socket lets GRO merge VXLAN. Runs in the node's netns; every ensure_*
is idempotent and the agent calls it each pass."""
from __future__ import annotations

import errno
import ipaddress
import logging
import shutil
import socket
import subprocess

from pyroute2.netlink.exceptions import NetlinkError

from xoverlay.core import desired
from xoverlay.core.model import GATEWAY_IP
from xoverlay.kernel.veth import GW_MAC, IFF_UP, NUD_PERMANENT, RT_SCOPE_LINK, our_veths, write_sysctl

log = logging.getLogger("xoverlay.links")

# The node's side of the gateway: a device of its own, xo-gw, holding GATEWAY_IP (where
# the DNS responder listens) and GW_MAC. endpoint.c redirects a container's DNS into its
# ingress: a host veth cannot pass it up itself, being a port of the down headroom bridge.
# It is a bridge with no ports because this kernel has no dummy devices; nothing is ever
# switched through it. Replies leave from GATEWAY_IP by a routing table of their own,
# with a route to each local endpoint through its veth (docs/DNS.md).
GATEWAY_DEV = "xo-gw"
RETURN_TABLE = 30831            # 0x786f, "xo"
RETURN_RULE_PRIORITY = 30831


# --- the gateway address on the node ------------------------------------------------------

def _return_rules(ipr) -> list:
    return [r for r in ipr.get_rules(family=socket.AF_INET)
            if r.get_attr("FRA_TABLE") == RETURN_TABLE or r["table"] == RETURN_TABLE]


# --- which routing table the data path may consult directly --------------------------

FR_ACT_TO_TBL = 1
# The IPv4 rules every policy starts with: lookup local, main, default (shape below).
KERNEL_RULES = frozenset({(0, 255, FR_ACT_TO_TBL, ()), (32766, 254, FR_ACT_TO_TBL, ()),
                          (32767, 253, FR_ACT_TO_TBL, ())})
# Ours: what leaves from GATEWAY_IP (DNS replies) by RETURN_TABLE. No packet the data
# path routes has that source.
OUR_RULE = (RETURN_RULE_PRIORITY, RETURN_TABLE, FR_ACT_TO_TBL, (("FRA_SRC", GATEWAY_IP), ("src_len", 32)))
_NOT_SELECTORS = {"FRA_TABLE", "FRA_PRIORITY", "FRA_PROTOCOL"}
NO_SUPPRESS = 0xffffffff


def rule_shape(msg) -> tuple:
    """An IPv4 rule as (priority, table, action, selectors): selectors are what it matches
    (or suppresses) on, in a fixed order; a rule with none applies to every packet."""
    attrs = dict(msg["attrs"])
    selectors = tuple(sorted((k, v) for k, v in attrs.items() if k not in _NOT_SELECTORS
                             and not (k == "FRA_SUPPRESS_PREFIXLEN" and v == NO_SUPPRESS)))
    selectors += tuple((k, msg[k]) for k in ("dst_len", "src_len", "tos", "flags") if msg[k])
    return (attrs.get("FRA_PRIORITY", 0), attrs.get("FRA_TABLE", msg["table"]), msg["action"], selectors)


def _ours(shape) -> bool:
    """One of our rules: DNS replies' (OUR_RULE), or egress replies' to a network's subnet
    (priority EGRESS_RULE_PRIORITY, RETURN_TABLE, a destination prefix and nothing else)."""
    if shape == OUR_RULE:
        return True
    priority, table, action, selectors = shape
    return (priority, table, action) == (EGRESS_RULE_PRIORITY, RETURN_TABLE, FR_ACT_TO_TBL) and \
        [k for k, _ in selectors] == ["FRA_DST", "dst_len"]


def main_table_suffices(shapes) -> bool:
    """Whether the main table alone routes every packet the data path sends out of the
    underlay (config flag XO_CFG_FIB_MAIN_ONLY, bpf/lib/route.h) as the whole policy
    would: the rules are the kernel's three and ours, nothing else. Our destinations are
    never local addresses (the local table) nor in an overlay subnet (egress rules), and a
    miss in main falls back to the kernel's full route. Any rule of the operator's, and it
    is the whole policy."""
    return {s for s in shapes if not _ours(s)} == KERNEL_RULES


def fib_main_only(ipr) -> bool:
    return main_table_suffices(rule_shape(r) for r in ipr.get_rules(family=socket.AF_INET))


def ensure_gateway(ipr) -> tuple[int, list[str]]:
    """xo-gw: up, GW_MAC, GATEWAY_IP/32 (scope link: never picked as the source of
    anything else), loose reverse-path filtering (a query comes in on xo-gw, its reply
    leaves by the endpoint's veth: strict filtering would drop the query), no IPv6; and
    the rule that routes what leaves from GATEWAY_IP by RETURN_TABLE. Returns its ifindex
    (for the data path's config) and what it changed."""
    changes = []
    found = ipr.link_lookup(ifname=GATEWAY_DEV)
    if not found:
        ipr.link("add", ifname=GATEWAY_DEV, kind="bridge")
        found = ipr.link_lookup(ifname=GATEWAY_DEV)
        changes.append(f"created {GATEWAY_DEV}")
    index = found[0]
    write_sysctl(f"/proc/sys/net/ipv6/conf/{GATEWAY_DEV}/disable_ipv6", "1")
    # max(all, this device) is what counts: 2 (loose) whatever `all` says.
    write_sysctl(f"/proc/sys/net/ipv4/conf/{GATEWAY_DEV}/rp_filter", "2")
    link = ipr.get_links(index)[0]
    if (link.get_attr("IFLA_ADDRESS") or "").lower() != GW_MAC:
        ipr.link("set", index=index, address=GW_MAC)
    if not link["flags"] & IFF_UP:
        ipr.link("set", index=index, state="up")
    addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=socket.AF_INET)]
    if GATEWAY_IP not in addrs:
        ipr.addr("add", index=index, address=GATEWAY_IP, prefixlen=32, scope=RT_SCOPE_LINK)
        changes.append(f"added {GATEWAY_IP}/32 to {GATEWAY_DEV}")
    rules = _return_rules(ipr)
    good = [r for r in rules if r.get_attr("FRA_SRC") == GATEWAY_IP and r["src_len"] == 32
            and r.get_attr("FRA_PRIORITY") == RETURN_RULE_PRIORITY]
    if not good:
        ipr.rule("add", family=socket.AF_INET, table=RETURN_TABLE, priority=RETURN_RULE_PRIORITY,
                 src=GATEWAY_IP, src_len=32)
        changes.append(f"added rule from {GATEWAY_IP} lookup {RETURN_TABLE}")
    return index, changes


def remove_gateway(ipr) -> None:
    """xo-gw, our rules and RETURN_TABLE, and egress (its nftables table: xo-gw's own
    sysctls go with the device)."""
    remove_egress()
    for r in _return_rules(ipr):
        match = {k: v for k, v in (("src", r.get_attr("FRA_SRC")), ("src_len", r["src_len"]),
                                   ("dst", r.get_attr("FRA_DST")), ("dst_len", r["dst_len"])) if v}
        ipr.rule("del", family=socket.AF_INET, table=RETURN_TABLE, priority=r.get_attr("FRA_PRIORITY"), **match)
    for route in ipr.get_routes(family=socket.AF_INET, table=RETURN_TABLE):
        if route.get_attr("RTA_TABLE") == RETURN_TABLE:
            ipr.route("del", table=RETURN_TABLE, dst=route.get_attr("RTA_DST"), dst_len=route["dst_len"])
    for index in ipr.link_lookup(ifname=GATEWAY_DEV):
        ipr.link("del", index=index)


# --- xo-gro: a tunnel socket, for GRO ----------------------------------------------------
#
# The kernel merges a UDP flow's frames, inner TCP included, only for a UDP socket with a
# tunnel GRO handler on their port; without one each 1,450-byte segment crosses the tc
# decap program, and the container's TCP, on its own (TCP between VMs at 0.77x the kernel
# vxlan device's: docs/BENCHMARKS.md). xo-gro is a collect-metadata vxlan device on the
# node's VXLAN port, up, with no address and a program on its tc ingress that drops what
# reaches it (bpf/underlay_tc.c): it exists for its socket. The underlay's tc program
# decides every frame before that socket could see one.
TUNNEL_DEV = "xo-gro"


class PortInUse(Exception):
    """Another socket holds the VXLAN port: xo-gro cannot have one of its own."""


def _tunnel_port(link) -> tuple[bool, int | None]:
    """(a collect-metadata vxlan device?, its UDP port) of a link message."""
    info = link.get_attr("IFLA_LINKINFO")
    if not info or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return False, None
    data = info.get_attr("IFLA_INFO_DATA")
    return bool(data.get_attr("IFLA_VXLAN_COLLECT_METADATA")), data.get_attr("IFLA_VXLAN_PORT")


def ensure_tunnel_device(ipr, port: int) -> tuple[int, list[str]]:
    """xo-gro, up, on UDP `port`, no IPv6 (no link-local address, nothing sent through
    it). One of another shape (a port changed by `up --vxlan-port`) is made anew. Returns
    its ifindex and what changed; raises PortInUse when another socket holds `port`."""
    changes = []
    found = ipr.link_lookup(ifname=TUNNEL_DEV)
    link = ipr.get_links(found[0])[0] if found else None
    if link is not None and _tunnel_port(link) != (True, port):
        ipr.link("del", index=link["index"])
        changes.append(f"removed {TUNNEL_DEV} of another port or kind")
        link = None
    if link is None:
        ipr.link("add", ifname=TUNNEL_DEV, kind="vxlan", vxlan_collect_metadata=1, vxlan_port=port,
                 vxlan_learning=0)
        link = ipr.get_links(ipr.link_lookup(ifname=TUNNEL_DEV)[0])[0]
        changes.append(f"created {TUNNEL_DEV} (a tunnel socket on UDP {port}, for GRO)")
    index = link["index"]
    write_sysctl(f"/proc/sys/net/ipv6/conf/{TUNNEL_DEV}/disable_ipv6", "1")
    if not link["flags"] & IFF_UP:
        try:
            ipr.link("set", index=index, state="up")      # opens the socket
        except NetlinkError as e:
            if e.code != errno.EADDRINUSE:
                raise
            ipr.link("del", index=index)
            raise PortInUse(f"UDP {port} is held by another socket on this node") from None
    return index, changes


def remove_tunnel_device(ipr) -> bool:
    """Returns whether there was one."""
    found = ipr.link_lookup(ifname=TUNNEL_DEV)
    for index in found:
        ipr.link("del", index=index)
    return bool(found)


# --- lo: where the routing mesh's replies to the node itself come in -------------------
#
# A reply for a connection the node made to its own published port enters lo from BPF
# (bpf/lib/mesh.h xo_mesh_reply_out) without the route a packet of the node's own stack
# carries there, so the input route judges it, and would drop it as a martian: its source
# is the node's own address (accept_local), and for a connection to 127.0.0.1, once
# conntrack has turned it back, so is its loopback destination (route_localnet). Only
# packets that enter lo without a route are judged: nothing from outside the node ever
# arrives on lo. `down` sets both back to the kernel's default, 0.
LOOPBACK_SYSCTLS = ("accept_local", "route_localnet")


def ensure_loopback() -> list[str]:
    """lo's two sysctls at 1; what it changed."""
    changes = []
    for name in LOOPBACK_SYSCTLS:
        path = f"/proc/sys/net/ipv4/conf/lo/{name}"
        with open(path) as f:
            if f.read().strip() == "1":
                continue
        write_sysctl(path, "1")
        changes.append(f"set net.ipv4.conf.lo.{name}=1 (the routing mesh's replies to this node)")
    return changes


def remove_loopback() -> None:
    for name in LOOPBACK_SYSCTLS:
        write_sysctl(f"/proc/sys/net/ipv4/conf/lo/{name}", "0")


# --- egress: the node's stack masquerades what endpoint.c hands to xo-gw -----------------
#
# endpoint.c redirects a packet for outside every overlay network into xo-gw's ingress (as
# it does DNS); the node routes it like its own forwarded traffic, and this table
# masquerades whatever came in on xo-gw, out of whichever device its route takes (never
# to a published port: egress_ruleset).
# Conntrack turns the replies back to the endpoint's address, and a rule per network
# subnet (`to SUBNET lookup RETURN_TABLE`) sends them, and anything else the node sends to
# a local endpoint (ping replies from its own addresses, ICMP errors), out of the
# endpoint's veth by the routes DNS replies already use. Overlay and service traffic never
# enters xo-gw, so it is never masqueraded. Why the stack and not SNAT in BPF: DESIGN.md.
NFT_TABLE = "xoverlay"             # `table ip xoverlay`, in the node's netns
EGRESS_RULE_PRIORITY = RETURN_RULE_PRIORITY + 1


def egress_ruleset(ranges: dict[str, list[tuple[int, int]]] | None = None, node_ip: str | None = None,
                   published: list[tuple[int, str]] = ()) -> str:
    """The nftables table, exactly as `nft list` prints it. `ranges`: per protocol with
    published ports, the source port ranges a masqueraded connection may get
    (desired.masquerade_ranges: never a published port, whose replies the routing mesh
    would take); everything else is plain masquerade.

    With the node's IP and its published ports, also the node's own connections to them
    on 127.0.0.0/8: to the node's IP, from it (the routing mesh sees them on lo,
    bpf/loopback.c; a backend must never see a loopback source, its stack would drop it
    as a martian). Conntrack gives the replies their 127 addresses back. As Docker's
    OUTPUT DNAT does, this takes the port on 127.0.0.1 from any local listener."""
    rules = []
    for proto, gaps in sorted((ranges or {}).items()):
        rules += [f'iifname "{GATEWAY_DEV}" {proto} sport {lo}-{hi} masquerade to :{lo}-{hi}' for lo, hi in gaps]
        lo, hi = max(gaps, key=lambda g: g[1] - g[0])
        rules.append(f'iifname "{GATEWAY_DEV}" meta l4proto {proto} masquerade to :{lo}-{hi}')
    rules.append(f'iifname "{GATEWAY_DEV}" masquerade')
    chains = [("egress", "type nat hook postrouting priority srcnat; policy accept;", rules)]
    ports = sorted(published, key=lambda p: (p[1], p[0])) if node_ip else []
    if ports:
        chains += [
            ("localhost", "type nat hook output priority -100; policy accept;",
             [f"ip daddr 127.0.0.0/8 {proto} dport {port} dnat to {node_ip}" for port, proto in ports]),
            ("localhost_source", "type nat hook postrouting priority srcnat; policy accept;",
             [f'oifname "lo" ip saddr 127.0.0.0/8 ip daddr {node_ip} {proto} dport {port} snat to {node_ip}'
              for port, proto in ports])]
    body = "\n".join(f"\tchain {name} {{\n\t\t{hook}\n" + "".join(f"\t\t{r}\n" for r in chain_rules) + "\t}\n"
                     for name, hook, chain_rules in chains)
    return f"table ip {NFT_TABLE} {{\n{body}}}\n"


EGRESS_RULESET = egress_ruleset()        # no published port anywhere


def _nft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, timeout=10)


def _egress_rules(ipr) -> list:
    return [r for r in _return_rules(ipr) if r.get_attr("FRA_PRIORITY") == EGRESS_RULE_PRIORITY]


def ensure_egress(ipr, subnets: list[str], ranges: dict | None = None, node_ip: str | None = None,
                  published: list[tuple[int, str]] = ()) -> tuple[str | None, list[str]]:
    """Egress in place and as it should be: xo-gw forwards (its own sysctl; only what
    enters xo-gw is routed by it), the nftables table holds exactly egress_ruleset(...), and
    a rule per overlay subnet sends what is addressed to a local endpoint by RETURN_TABLE.
    Returns (why egress cannot work, or None) and what it changed. Idempotent: run
    every pass, it puts back what was changed behind our back."""
    changes = []
    path = f"/proc/sys/net/ipv4/conf/{GATEWAY_DEV}/forwarding"
    try:
        with open(path) as f:
            forwarding = f.read().strip()
    except OSError:
        return f"{GATEWAY_DEV} does not exist", changes
    if forwarding != "1":
        write_sysctl(path, "1")
        changes.append(f"set net.ipv4.conf.{GATEWAY_DEV}.forwarding=1")
    want = {(str(ipaddress.IPv4Network(n).network_address), ipaddress.IPv4Network(n).prefixlen) for n in subnets}
    have = {(r.get_attr("FRA_DST"), r["dst_len"]) for r in _egress_rules(ipr)}
    for dst, dst_len in sorted(want - have):
        ipr.rule("add", family=socket.AF_INET, table=RETURN_TABLE, priority=EGRESS_RULE_PRIORITY,
                 dst=dst, dst_len=dst_len)
        changes.append(f"added rule to {dst}/{dst_len} lookup {RETURN_TABLE}")
    for dst, dst_len in sorted(have - want):
        ipr.rule("del", family=socket.AF_INET, table=RETURN_TABLE, priority=EGRESS_RULE_PRIORITY,
                 dst=dst, dst_len=dst_len)
        changes.append(f"deleted rule to {dst}/{dst_len} lookup {RETURN_TABLE}")
    if shutil.which("nft") is None:
        return "nft (nftables) is not installed: nothing masquerades", changes
    want_table = egress_ruleset(ranges, node_ip, published)
    listed = _nft("list", "table", "ip", NFT_TABLE)
    if listed.returncode != 0 or listed.stdout != want_table:
        # Made (or made again) in one transaction: adding an empty table first makes the
        # delete safe when there is none.
        done = _nft("-f", "-", stdin=f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n{want_table}")
        if done.returncode != 0:
            return f"nft refused the egress table: {done.stderr.strip()}", changes
        changes.append(f"{'set' if listed.returncode != 0 else 'repaired'} nftables table ip {NFT_TABLE} "
                       f"(masquerade what enters {GATEWAY_DEV})")
    return None, changes


def remove_egress() -> None:
    if shutil.which("nft") is not None:
        _nft("delete", "table", "ip", NFT_TABLE)


def sync_return_paths(ipr, want: dict[str, tuple[int, str]]) -> list[str]:
    """Routes (in RETURN_TABLE) and permanent neighbour entries for the local endpoints,
    so that replies from GATEWAY_IP reach them. Permanent: the node never ARPs for a
    container (endpoint.c would drop the container's ARP reply)."""
    veths = set(our_veths(ipr).values())
    routes = {r.get_attr("RTA_DST"): r.get_attr("RTA_OIF")
              for r in ipr.get_routes(family=socket.AF_INET, table=RETURN_TABLE)
              if r["dst_len"] == 32 and r.get_attr("RTA_TABLE") == RETURN_TABLE}
    neighbours = {(n.get_attr("NDA_DST"), n["ifindex"]): (n.get_attr("NDA_LLADDR"), bool(n["state"] & NUD_PERMANENT))
                  for n in ipr.get_neighbours(family=socket.AF_INET) if n["ifindex"] in veths}
    ops = desired.return_path_ops(want, routes, neighbours)
    for op in ops:
        try:
            if op.kind == "route" and op.value is not None:
                ipr.route("replace", table=RETURN_TABLE, dst=op.key, dst_len=32, oif=op.value,
                          scope=RT_SCOPE_LINK)
            elif op.kind == "route":
                ipr.route("del", table=RETURN_TABLE, dst=op.key, dst_len=32)
            elif op.value is not None:
                ipr.neigh("replace", dst=op.key[0], ifindex=op.key[1], lladdr=op.value, state=NUD_PERMANENT)
            else:
                ipr.neigh("del", dst=op.key[0], ifindex=op.key[1])
        except Exception as e:        # a veth that went away meanwhile: the next pass sees it
            log.warning("%s failed: %s", op, e)
    return [str(op) for op in ops]
