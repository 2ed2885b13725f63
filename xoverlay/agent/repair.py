"""What was undone behind the agent's back, and putting it back: pins deleted (the data
path still runs, but `status`, the CLI and the next agent find nothing: the next agent
would even start over with empty maps), the underlay's tc program or XDP program, or
lo's, detached. Checked on every reconcile pass, cheaply: a stat per pin, three netlink
queries. (An endpoint's veth or its tc program is put back by veth.plumb, which says
what it fixed.) The decision is pure (plan); observe and apply are the side effects."""
from __future__ import annotations

import os
from dataclasses import dataclass

from xoverlay.kernel import bpf, datapath
from xoverlay.maps.layout import MAPS, pin_dir


@dataclass(frozen=True)
class Seen:
    """The node's data path as found."""
    missing_pins: frozenset     # names (maps and programs) absent from the node's pin dir
    tc_prog: int                # id of the program on the underlay's tc ingress (0: none)
    xdp_prog: int               # id of the underlay's XDP program (0: none)
    lo_prog: int = 0            # id of the program on lo's tc ingress (0: none)


@dataclass(frozen=True)
class Want:
    tc_prog: int
    xdp_prog: int               # 0: XDP is off on this node, whatever is attached
    lo_prog: int = 0


@dataclass(frozen=True)
class Repair:
    kind: str                   # "pin", "tc" or "xdp"
    what: str                   # the pin's name, or the device

    def __str__(self):
        return {"pin": f"repaired: pin {self.what} was deleted: pinned again",
                "tc": f"repaired: the tc program on {self.what} was detached or replaced: attached again",
                "xdp": f"repaired: the XDP program on {self.what} was detached or replaced: attached again",
                }[self.kind]


def plan(seen: Seen, want: Want, underlay: str) -> list[Repair]:
    out = [Repair("pin", name) for name in sorted(seen.missing_pins)]
    if seen.tc_prog != want.tc_prog:
        out.append(Repair("tc", underlay))
    if want.xdp_prog and seen.xdp_prog != want.xdp_prog:
        out.append(Repair("xdp", underlay))
    if seen.lo_prog != want.lo_prog:
        out.append(Repair("tc", "lo"))
    return out


def pin_names() -> list[str]:
    return sorted(set(MAPS) | set(datapath.PROGRAMS))


def observe(node: str, underlay_ifindex: int) -> Seen:
    d = pin_dir(node)
    missing = frozenset(n for n in pin_names() if not os.path.exists(os.path.join(d, n)))
    return Seen(missing, bpf.tc_query(underlay_ifindex), bpf.xdp_query(underlay_ifindex)[1],
                bpf.tc_query(datapath.LOOPBACK_IFINDEX))


def apply(node: str, repairs: list[Repair], fds: dict[str, int], underlay, progs, xdp: bool) -> list[Repair]:
    """`fds`: the agent's open fd of every map and program, by pin name; `underlay`: its
    ifindex and name. Returns the repairs made: the underlay's programs as found when
    attaching (one detached after the look that planned this is put back too, and said)."""
    d = pin_dir(node)
    done = []
    for r in repairs:
        if r.kind == "pin":
            os.makedirs(d, exist_ok=True)
            bpf.obj_pin(fds[r.what], os.path.join(d, r.what))
            done.append(r)
    if any(r.kind in ("tc", "xdp") for r in repairs):
        attached = datapath.attach_underlay(underlay.ifindex, progs, xdp).attached   # leaves alone what is right
        done += [Repair("tc", "lo") if kind == "lo" else Repair(kind, underlay.name) for kind in attached]
    return done
