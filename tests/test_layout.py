"""The C map layouts (bpf/lib/structs.h and maps.h, as clang lays them out) and the Python ones
(xoverlay/maps/layout.py) agree: same size, and every field that is not padding at the same
offset with the same size. Cilium's bpf_alignchecker, done with BCC: BCC hands us the
key and value types of every table as ctypes built from clang's own layout."""
from __future__ import annotations

import ctypes
import os

import pytest

from xoverlay.maps.drops import REASONS
from xoverlay.maps.layout import MAPS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="compiling BPF maps needs root")


def is_pad(name: str) -> bool:
    # Ours are pad, pad2...; BCC names the holes clang leaves __pad_N.
    return name.startswith("pad") or name.startswith("__pad")


def fields(ty) -> dict[str, tuple[int, int]]:
    """Non-padding fields of a ctypes type: {name: (offset, size)}. A scalar (BCC gives a
    __u32 key as c_uint) is one nameless field."""
    if not issubclass(ty, ctypes.Structure):
        return {None: (0, ctypes.sizeof(ty))}
    return {name: (getattr(ty, name).offset, getattr(ty, name).size)
            for name, *_ in ty._fields_ if not is_pad(name)}


def same_layout(c_type, py_type) -> list[str]:
    """What differs between the C layout and the Python one, in words ([] if nothing)."""
    problems = []
    if ctypes.sizeof(c_type) != ctypes.sizeof(py_type):
        problems.append(f"size: C {ctypes.sizeof(c_type)}, Python {ctypes.sizeof(py_type)}")
    c, py = fields(c_type), fields(py_type)
    if None in c:
        # A scalar in C; Python wraps it in a one-field struct (U32).
        if len(py) != 1 or next(iter(py.values())) != c[None]:
            problems.append(f"C has a plain {c[None][1]}-byte scalar, Python has fields {py}")
        return problems
    for name in c.keys() - py.keys():
        problems.append(f"field {name} only in C")
    for name in py.keys() - c.keys():
        problems.append(f"field {name} only in Python")
    for name in c.keys() & py.keys():
        if c[name] != py[name]:
            problems.append(f"field {name}: C (offset, size) {c[name]}, Python {py[name]}")
    return problems


EVENT_LAYOUT = """
BPF_TABLE("array", __u32, struct xo_event, xo_layout_event, 1);
"""


@pytest.fixture(scope="module")
def bcc_module():
    """The bundle compiled as the loader compiles it, its maps pinned in a throwaway
    directory that is removed afterwards."""
    bcc = pytest.importorskip("bcc")
    from xoverlay.kernel import datapath
    node = f"pytest-layout-{os.getpid()}"
    pin = datapath.pin_dir(node)
    os.makedirs(pin, exist_ok=True)
    module = None
    try:
        cflags = [f"-I{datapath.BPF_DIR}", f'-DXO_PIN_DIR="{pin}"', "-Wno-macro-redefined"]
        # A throwaway array of struct xo_event, not pinned, so that clang's layout of the
        # ring buffer's record type can be compared too (a ring buffer has no value type).
        text = datapath.bundle_source() + EVENT_LAYOUT
        module = bcc.BPF(text=text.encode(), cflags=cflags)
        yield module, pin
    finally:
        if module is not None:
            module.cleanup()
        datapath.unpin(node)
        assert not os.path.exists(pin)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_map_layout_matches_c(bcc_module, name):
    module, _ = bcc_module
    spec = MAPS[name]
    if spec.ringbuf:
        # The record type, from the throwaway array; the size from the kernel.
        from xoverlay.kernel import bpf
        problems = [f"record {p}" for p in same_layout(module[b"xo_layout_event"].Leaf, spec.value)]
        assert not problems, f"{name}: xoverlay/maps/layout.py and bpf/lib/structs.h disagree: " + "; ".join(problems)
        info = bpf.map_info(module[name.encode()].map_fd)
        assert info.type == 27, f"{name} is not a BPF_MAP_TYPE_RINGBUF"
        assert info.max_entries == spec.max_entries
        return
    table = module[name.encode()]
    leaf = table.Leaf
    if spec.percpu:
        # BCC presents a per-CPU value as an array of the C struct, one per CPU.
        assert issubclass(leaf, ctypes.Array), f"{name} is per-CPU in Python but not in C"
        leaf = leaf._type_
    else:
        assert not issubclass(leaf, ctypes.Array), f"{name} is per-CPU in C but not in Python"
    problems = ([f"key {p}" for p in same_layout(table.Key, spec.key)] +
                [f"value {p}" for p in same_layout(leaf, spec.value)])
    assert not problems, f"{name}: xoverlay/maps/layout.py and bpf/lib/structs.h disagree: " + "; ".join(problems)
    assert table.max_entries == spec.max_entries, \
        f"{name}: max_entries C {table.max_entries}, Python {spec.max_entries}"
    # The type too: datapath.load() compares pinned maps to the specs to find the ones a
    # new build must recreate.
    from xoverlay.kernel import bpf
    assert bpf.map_info(table.map_fd).type == spec.map_type, f"{name}: C map type is not {spec.kind!r}"


def test_every_c_map_is_known_to_python(bcc_module):
    # BCC pins every XO_MAP of maps.h as it compiles, and nothing else yet: the pin
    # directory lists the C side's maps.
    _, pin = bcc_module
    assert set(os.listdir(pin)) == set(MAPS)


def test_drop_reasons_parsed():
    assert REASONS, "no XO_DROP(...) lines parsed from bpf/lib/drop.h"
    codes = [r.code for r in REASONS.values()]
    names = [r.name for r in REASONS.values()]
    assert len(set(names)) == len(names)
    assert all(0 < code < 32 for code in codes), codes     # 0 is "no drop"; xo_drops has 32
    assert all(r.text for r in REASONS.values())
    # Codes are the dict keys, so duplicates would have collapsed: count the lines instead.
    from xoverlay.maps.drops import _LINE, DROP_HEADER
    assert len(_LINE.findall(DROP_HEADER.read_text())) == len(REASONS), "duplicate drop code"


def test_layout_check_catches_a_moved_field():
    """The comparison itself: a swapped field is reported, by name."""
    class A(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint32), ("y", ctypes.c_uint16), ("pad", ctypes.c_uint16)]

    class B(ctypes.Structure):
        _fields_ = [("y", ctypes.c_uint16), ("__pad_1", ctypes.c_uint16), ("x", ctypes.c_uint32)]

    class C(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint32), ("y", ctypes.c_uint16), ("__pad_1", ctypes.c_char * 2)]

    assert same_layout(C, A) == []
    problems = same_layout(B, A)
    assert any("field x" in p for p in problems) and any("field y" in p for p in problems)


def test_freshly_pinned_maps_are_not_outdated(bcc_module):
    from xoverlay.kernel import datapath
    _, pin = bcc_module
    assert datapath.outdated_maps(pin) == []


def test_new_build_remakes_only_the_maps_whose_layout_changed():
    """A map pinned by a build with another layout (here xo_peers as it was before it had
    counter slots: a 4-byte value) is made anew, empty; the others keep their entries."""
    from xoverlay.kernel import bpf, datapath
    from xoverlay.kernel.pinned import PinnedMap
    from xoverlay.maps.layout import MAP_TYPES, U32, Peer, Vni
    node = f"pytest-upgrade-{os.getpid()}"
    pin = datapath.pin_dir(node)
    try:
        datapath.load(node).close()
        with PinnedMap(pin, MAPS["xo_vnis"]) as vnis:
            vnis.set(U32(4096), Vni())
        os.unlink(os.path.join(pin, "xo_peers"))
        old = bpf.map_create(MAP_TYPES["hash"], "xo_peers", 4, 4, 1024)
        try:
            bpf.obj_pin(old, os.path.join(pin, "xo_peers"))
            bpf.map_update(old, bytes(U32(7)), bytes(4))
        finally:
            os.close(old)
        assert datapath.outdated_maps(pin) == ["xo_peers"]
        progs = datapath.load(node, force=True)
        progs.close()
        assert progs.recreated == ("xo_peers",)
        assert datapath.outdated_maps(pin) == []
        with PinnedMap(pin, MAPS["xo_peers"]) as peers, PinnedMap(pin, MAPS["xo_vnis"]) as vnis:
            assert peers.items() == {} and list(vnis.items()) == [U32(4096)]
            peers.set(U32(7), Peer(slot=3))      # the new layout, all 8 bytes
            assert peers.get(U32(7)).slot == 3
    finally:
        datapath.unpin(node)
