"""Compile, load, pin and attach the BPF programs of one node (the side effects; the
decisions about what goes in the maps live in desired.py).

Pinned under /sys/fs/bpf/xoverlay/<node>/: every map (BCC pins them at compile time) and
the programs. Programs and maps outlive the agent: a new agent with the same build
adopts them without touching the kernel; one with a new build replaces the programs in
place (tcx replace, XDP replace), keeping the maps and their contents."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xoverlay.errors import XoError
from xoverlay.kernel import bpf
from xoverlay.kernel.pinned import PinnedMap
from xoverlay.maps import BPF_DIR
from xoverlay.maps.layout import MAPS, PIN_ROOT, U32, pin_dir

SOURCES = ("endpoint.c", "underlay_tc.c", "underlay_xdp.c", "loopback.c")

# program pin name -> (function in the C source, program type)
PROGRAMS = {
    "prog_endpoint": ("xo_endpoint_ingress", bpf.BPF_PROG_TYPE_SCHED_CLS),
    "prog_underlay_tc": ("xo_underlay_ingress", bpf.BPF_PROG_TYPE_SCHED_CLS),
    "prog_underlay_xdp": ("xo_underlay_xdp", bpf.BPF_PROG_TYPE_XDP),
    "prog_loopback": ("xo_loopback_ingress", bpf.BPF_PROG_TYPE_SCHED_CLS),
    "prog_tunnel_device": ("xo_tunnel_device_ingress", bpf.BPF_PROG_TYPE_SCHED_CLS),
}


def build_id() -> int:
    """Identifies the BPF sources: equal ids mean the pinned programs are ours as built."""
    h = hashlib.sha256()
    for path in sorted(BPF_DIR.rglob("*.[ch]")):
        h.update(path.relative_to(BPF_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


# --- what the kernel must have ---------------------------------------------------------
#
# Each feature the data path cannot do without, probed by asking the kernel for it (a
# tiny program or map), never by version number: distribution kernels backport. `since`
# is the first mainline kernel that has it, for the error message. tcx (6.6) is not
# here: below it tc programs attach as cls_bpf filters (bpf.tc_attach_kind).

def _insns(*words: tuple[int, int, int]) -> bytes:
    """BPF instructions from (opcode, dst | src << 4, imm)."""
    return b"".join(bytes([op, regs]) + b"\0\0" + (imm & 0xffffffff).to_bytes(4, "little") for op, regs, imm in words)


_MOV_R1_0, _MOV_R2_0, _MOV_R3_0, _MOV_R4_0 = (0xb7, 1, 0), (0xb7, 2, 0), (0xb7, 3, 0), (0xb7, 4, 0)
_MOV_R0_0, _EXIT = (0xb7, 0, 0), (0x95, 0, 0)


def _loads(prog_type: int, insns: bytes, flags: int = 0) -> bool:
    try:
        os.close(bpf.prog_load(prog_type, "xo_probe", insns, flags))
        return True
    except bpf.BpfError:
        return False


def _calls(helper: int) -> bool:
    """Does a tc program calling this helper (all arguments 0) pass the verifier?"""
    return _loads(bpf.BPF_PROG_TYPE_SCHED_CLS,
                  _insns(_MOV_R1_0, _MOV_R2_0, _MOV_R3_0, _MOV_R4_0, (0x85, 0, helper), _MOV_R0_0, _EXIT))


def _makes_map(map_type: int, key: int, value: int, entries: int, flags: int = 0) -> bool:
    try:
        os.close(bpf.map_create(map_type, "xo_probe", key, value, entries, flags))
        return True
    except bpf.BpfError:
        return False


@dataclass(frozen=True)
class Feature:
    name: str          # as the user reads it
    since: str         # the first mainline kernel with it
    present: Callable[[], bool]


FEATURES = (
    Feature("the BPF ring buffer (monitor events)", "5.8", lambda: _makes_map(27, 0, 0, 4096)),
    Feature("bpf_redirect_peer (delivery into a container)", "5.10", lambda: _calls(155)),
    Feature("bpf_redirect_neigh (tunnel packets to the underlay)", "5.10", lambda: _calls(152)),
    Feature("inner maps of their own size (Maglev tables)", "5.10",
            lambda: _makes_map(bpf.BPF_MAP_TYPE_ARRAY, 4, 4, 1, bpf.BPF_F_INNER_MAP)),
    Feature("XDP programs that accept multi-buffer frames (XDP frags)", "5.18",
            lambda: _loads(bpf.BPF_PROG_TYPE_XDP, _insns((0xb7, 0, 2), _EXIT), bpf.BPF_F_XDP_HAS_FRAGS)),
)


def kernel_error(release: str, missing: list[Feature]) -> str:
    """The one line `up` says on a kernel that lacks what the data path needs."""
    oldest = max((f.since for f in missing), key=lambda v: tuple(int(x) for x in v.split(".")))
    return (f"this kernel ({release}) lacks " + "; ".join(f"{f.name}, from Linux {f.since}" for f in missing)
            + f": xoverlay needs Linux {oldest} or newer")


def check_kernel() -> None:
    """Refuse, in one line, a kernel that lacks a feature the data path needs."""
    missing = [f for f in FEATURES if not f.present()]
    if missing:
        raise XoError(kernel_error(os.uname().release, missing))


def check_bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        raise XoError("bpffs is not mounted at /sys/fs/bpf: run `mount -t bpf bpf /sys/fs/bpf` "
                      "(setup.sh does it)")


_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)


def bundle_source(sources=SOURCES) -> str:
    """One translation unit of our C: BCC takes programs, and rewrites map calls, only in
    its main file, so our own quoted includes are inlined (each once; #line keeps compiler
    messages pointing at the real file). System <...> includes stay includes."""
    seen: set[Path] = set()

    def expand(path: Path) -> str:
        path = path.resolve()
        if path in seen:
            return ""
        seen.add(path)
        out, pos = [], 0
        text = path.read_text()
        for m in _LOCAL_INCLUDE.finditer(text):
            out.append(text[pos:m.start()])
            line = text.count("\n", 0, m.end()) + 2
            out.append(expand(path.parent / m.group(1)) + f'\n#line {line} "{path}"\n')
            pos = m.end() + 1
        out.append(text[pos:])
        return f'#line 1 "{path}"\n' + "".join(out)

    return "\n".join(expand(BPF_DIR / name) for name in sources)


def compile_programs(pin: str) -> dict[str, int]:
    """Compile with BCC (which creates or reuses the pinned maps), load each program, and
    return their fds. The XDP program is loaded through libbpf, frags-aware: BCC 0.26
    cannot set BPF_F_XDP_HAS_FRAGS."""
    from bcc import BPF, libbcc  # imported here: BCC is slow to import and only `up` needs it

    text = bundle_source()
    cflags = [f"-I{BPF_DIR}", f'-DXO_PIN_DIR="{pin}"', "-Wno-macro-redefined"]
    try:
        module = BPF(text=text.encode(), cflags=cflags)
    except Exception as e:
        raise XoError(f"compiling the BPF programs failed: {e}") from None
    fds = {}
    try:
        for pin_name, (func, prog_type) in PROGRAMS.items():
            if prog_type == bpf.BPF_PROG_TYPE_XDP:
                start = libbcc.lib.bpf_function_start(module.module, func.encode())
                size = libbcc.lib.bpf_function_size(module.module, func.encode())
                import ctypes
                insns = ctypes.string_at(start, size)
                fds[pin_name] = bpf.prog_load(prog_type, func, insns, bpf.BPF_F_XDP_HAS_FRAGS)
            else:
                fn = module.load_func(func.encode(), BPF.SCHED_CLS)
                fds[pin_name] = os.dup(fn.fd)
    finally:
        module.cleanup()
    return fds


@dataclass
class Programs:
    """Open fds of the pinned programs of a node."""
    fds: dict
    build: int
    replaced: bool       # False: adopted from pins of the same build
    recreated: tuple = ()    # maps of another shape, pinned by an older build: made anew, empty

    def close(self):
        for fd in self.fds.values():
            os.close(fd)


def _pinned_build(pin: str) -> int | None:
    try:
        with PinnedMap(pin, MAPS["xo_config"]) as cfg:
            value = cfg.get(U32(0))
            return value.build_id if value else None
    except OSError:
        return None


def outdated_maps(pin: str) -> list[str]:
    """The maps pinned in `pin` whose shape (type, key and value size, entries) is not
    what xoverlay/maps/layout.py (checked against bpf/lib/structs.h and maps.h) declares: pinned by a build with
    another layout. BCC would reuse such a pin as it is, and the programs would read
    its entries with the new layout."""
    out = []
    for name, spec in MAPS.items():
        path = os.path.join(pin, name)
        if not os.path.exists(path):
            continue
        fd = bpf.obj_get(path)
        try:
            info = bpf.map_info(fd)
        finally:
            os.close(fd)
        if (info.type, info.key_size, info.value_size, info.max_entries) != spec.shape:
            out.append(name)
    return out


def is_pinned(node: str) -> bool:
    """Does `node` have a data path pinned here (an agent ran and may run again)?"""
    return _pinned_build(pin_dir(node)) is not None


def load(node: str, force: bool = False) -> Programs:
    """Adopt the node's pinned programs if they are of this build, else compile and pin
    new ones (the caller re-attaches them and writes the new build id)."""
    check_bpffs()
    check_kernel()
    pin = pin_dir(node)
    os.makedirs(pin, exist_ok=True)
    build = build_id()
    pins = {name: os.path.join(pin, name) for name in PROGRAMS}
    if not force and _pinned_build(pin) == build and all(os.path.exists(p) for p in pins.values()):
        return Programs({name: bpf.obj_get(p) for name, p in pins.items()}, build, replaced=False)
    # An outdated map is unpinned for BCC to make anew; the old programs keep theirs
    # until they are replaced, and the agent fills the new one on its next pass.
    recreated = tuple(outdated_maps(pin))
    for name in recreated:
        os.unlink(os.path.join(pin, name))
    fds = compile_programs(pin)
    for name, fd in fds.items():
        if os.path.exists(pins[name]):
            os.unlink(pins[name])
        bpf.obj_pin(fd, pins[name])
    return Programs(fds, build, replaced=True, recreated=recreated)


def prog_id(fd: int) -> int:
    return bpf.prog_info(fd).id


# --- whether the underlay gets the XDP filter -----------------------------------------
#
# The XDP program only drops bad tunnel traffic early: the tc decap program classifies
# every frame the same way, so without XDP nothing is let through that XDP would stop.
# XDP is worth it only where it costs the device nothing, and on the drivers measured
# here it costs a lot: on a veth the peer turns GSO/TSO off (TCP between lab nodes fell to
# 0.14x of the tc path), and virtio-net turns its receive offloads off. `auto` attaches
# it only on drivers known to keep their offloads with XDP: none measured yet.
XDP_COSTS = {
    "veth": "a veth's peer turns GSO off while XDP is attached",
    "virtio_net": "virtio-net turns its receive offloads (LRO, GRO_HW) off while XDP is attached",
}
XDP_KEEPS_OFFLOADS: frozenset[str] = frozenset()    # drivers measured to lose nothing


def choose_xdp(request, driver: str | None) -> tuple[bool, str]:
    """(attach XDP?, why) for `up --xdp auto|on|off` (or True/False) on a device of this
    driver: what status shows beside the mode."""
    if request in (True, "on"):
        return True, "on (--xdp)" + (f"; it costs: {XDP_COSTS[driver]}" if driver in XDP_COSTS else "")
    if request in (False, "off"):
        return False, "off (--no-xdp)"
    if driver in XDP_KEEPS_OFFLOADS:
        return True, f"on (auto: {driver} keeps its offloads with XDP)"
    if driver in XDP_COSTS:
        return False, f"off (auto: {XDP_COSTS[driver]}; the tc program filters the same)"
    return False, f"off (auto: XDP not measured on {driver or 'this driver'}; the tc program filters the same)"


# --- whether the node gets a tunnel socket for GRO (xo-gro, kernel/gateway.py) ---------
#
# With the socket, GRO hands the decap program a TCP stream's frames merged (up to 64 KB)
# and the program decapsulates the aggregate. The kernel's own tunnel devices then clear
# the aggregate's UDP-tunnel GSO state; bpf_skb_adjust_room cannot on the kernels tested
# (the flag that does, BPF_F_ADJ_ROOM_DECAP_L4_UDP, is newer), so it stays. Delivered
# into a container, that is harmless; sent out of the underlay again (a routing-mesh
# reply) it is segmented by the kernel, which reads the headers afresh, unless the device
# segments UDP tunnels itself: a NIC would be handed a "tunnel" packet that is none. So
# the socket only where the underlay cannot do that.

def choose_gro(driver: str | None, features: dict[str, bool], port: int) -> tuple[bool, str]:
    """(make xo-gro?, why) for an underlay device of this driver and `ethtool -k`
    features: what status shows."""
    if driver != "veth" and features.get("tx-udp_tnl-segmentation"):
        return False, (f"off: {driver or 'the underlay'} segments UDP tunnels itself (tx-udp_tnl-segmentation), "
                       "and an aggregate the program decapsulates keeps its tunnel flags on this kernel: a "
                       "routing-mesh reply leaving again could be cut wrong")
    return True, f"on: xo-gro's socket on UDP {port} lets GRO merge tunnel frames before the tc program"


LOOPBACK_IFINDEX = 1            # lo, in every network namespace


@dataclass(frozen=True)
class UnderlayAttached:
    mode: str                   # the XDP mode: 'native', 'generic', 'other' or 'off'
    attached: tuple[str, ...]   # what this call attached ("tc", "xdp", "lo"): the rest was in place


def attach_underlay(ifindex: int, progs: Programs, xdp: bool) -> UnderlayAttached:
    """tc ingress decap always; XDP filter natively if the driver can, else generic; and
    on lo's tc ingress the node's own connections to its published ports, which never
    cross the underlay (bpf/loopback.c). What is attached already is left alone: adopting
    a running node must not disturb its traffic. Says what it attached, as found at the
    moment it looked (a repair reports that, not what an earlier look planned)."""
    attached = []
    if bpf.tc_ensure(ifindex, progs.fds["prog_underlay_tc"]):
        attached.append("tc")
    if bpf.tc_ensure(LOOPBACK_IFINDEX, progs.fds["prog_loopback"]):
        attached.append("lo")
    if not xdp:
        detach_xdp(ifindex)
        return UnderlayAttached("off", tuple(attached))
    mode, current = bpf.xdp_query(ifindex)
    if current and current == prog_id(progs.fds["prog_underlay_xdp"]):
        mode = {bpf.XDP_ATTACHED_DRV: "native", bpf.XDP_ATTACHED_SKB: "generic"}.get(mode, "other")
        return UnderlayAttached(mode, tuple(attached))
    try:
        bpf.xdp_attach(ifindex, progs.fds["prog_underlay_xdp"], bpf.XDP_FLAGS_DRV_MODE)
        mode = "native"
    except bpf.BpfError:
        bpf.xdp_attach(ifindex, progs.fds["prog_underlay_xdp"], bpf.XDP_FLAGS_SKB_MODE)
        mode = "generic"
    return UnderlayAttached(mode, (*attached, "xdp"))


def detach_xdp(ifindex: int) -> None:
    mode, pid = bpf.xdp_query(ifindex)
    if pid:
        flags = {bpf.XDP_ATTACHED_DRV: bpf.XDP_FLAGS_DRV_MODE,
                 bpf.XDP_ATTACHED_SKB: bpf.XDP_FLAGS_SKB_MODE}.get(mode, 0)
        bpf.xdp_detach(ifindex, flags)


def detach_underlay(ifindex: int) -> None:
    """What attach_underlay attached, lo's program included."""
    bpf.tc_detach(ifindex)
    bpf.tc_detach(LOOPBACK_IFINDEX)
    try:
        detach_xdp(ifindex)
    except bpf.BpfError:
        pass


def open_maps(node: str) -> dict[str, PinnedMap]:
    pin = pin_dir(node)
    try:
        return {name: PinnedMap(pin, spec) for name, spec in MAPS.items()}
    except OSError as e:
        raise XoError(f"node {node} has no pinned maps under {pin} ({e.strerror}): is `xoverlay up` "
                      "running or has it run?") from None


def unpin(node: str) -> None:
    shutil.rmtree(pin_dir(node), ignore_errors=True)
    try:
        os.rmdir(PIN_ROOT)   # only when no node is left
    except OSError:
        pass
