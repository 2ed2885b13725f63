"""How our tc programs attach (xoverlay/kernel/bpf.py), in a netns of the test's own: the
choice between tcx and clsact + cls_bpf, and on each, ours goes first, replaces itself in
place, leaves other programs alone; on tcx it takes over from the cls_bpf filter an older
build (or an older kernel's agent) attached."""
from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys

import pytest
from bcc import BPF
from conftest import inside_netns_with_veth

from xoverlay.kernel import bpf

NETNS = f"xotest-tcx-{os.getpid()}"
PROGS = b"int xo_one(struct __sk_buff *s) { return 0; }\nint xo_two(struct __sk_buff *s) { return 0; }\n" \
        b"int other(struct __sk_buff *s) { return 0; }\n"


@pytest.fixture(scope="module")
def progs():
    b = BPF(text=PROGS)
    try:
        yield {name: b.load_func(name.encode(), BPF.SCHED_CLS).fd for name in ("xo_one", "xo_two", "other")}
    finally:
        b.cleanup()


@pytest.fixture
def veth():
    """The ifindex of a fresh veth end, with this thread in its netns for the test."""
    with inside_netns_with_veth(NETNS) as ifindex:
        yield ifindex


def pid(fd: int) -> int:
    return bpf.prog_info(fd).id


def use(monkeypatch, kind: str | None) -> None:
    """Attach as `kind` from here on in this process (None: as the probe says)."""
    if kind:
        monkeypatch.setenv(bpf.TC_ATTACH_ENV, kind)
    else:
        monkeypatch.delenv(bpf.TC_ATTACH_ENV, raising=False)
    bpf.tc_attach_kind.cache_clear()


@pytest.fixture
def tcx(monkeypatch):
    if not bpf.kernel_has_tcx():
        pytest.skip("this kernel has no tcx (6.6+): its agents attach cls_bpf filters")
    use(monkeypatch, bpf.TCX)
    yield
    bpf.tc_attach_kind.cache_clear()


@pytest.fixture
def cls_bpf(monkeypatch):
    use(monkeypatch, bpf.CLS_BPF)
    yield
    bpf.tc_attach_kind.cache_clear()


def filters(point: str = "ingress") -> str:
    return subprocess.run(["tc", "filter", "show", "dev", "v0", point], capture_output=True,
                          text=True, check=True).stdout


def test_the_attach_kind_is_tcx_where_the_kernel_has_it_else_cls_bpf():
    assert bpf.choose_tc_attach(True, None) == bpf.TCX
    assert bpf.choose_tc_attach(False, None) == bpf.CLS_BPF
    assert bpf.choose_tc_attach(True, "cls_bpf") == bpf.CLS_BPF
    with pytest.raises(bpf.BpfError, match=r"XOVERLAY_TC_ATTACH=tcx: this kernel has no tcx \(it came in 6.6\)"):
        bpf.choose_tc_attach(False, "tcx")
    with pytest.raises(bpf.BpfError, match="XOVERLAY_TC_ATTACH=tc: use tcx or cls_bpf"):
        bpf.choose_tc_attach(True, "tc")


def test_the_probe_finds_tcx_on_kernels_from_6_6():
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    assert bpf.kernel_has_tcx() == ((major, minor) >= (6, 6))


def test_tcx_ours_goes_first_and_is_replaced_in_place(progs, veth, tcx):
    other = bpf._AttachAttr(target_ifindex=veth, attach_bpf_fd=progs["other"], attach_type=bpf.BPF_TCX_INGRESS)
    bpf._sys_bpf(bpf.BPF_PROG_ATTACH, other, "attach another program")
    assert bpf.tc_query(veth) == 0                    # not ours
    bpf.tc_attach(veth, progs["xo_one"])
    assert bpf.tcx_programs(veth) == [pid(progs["xo_one"]), pid(progs["other"])]
    assert bpf.tc_query(veth) == pid(progs["xo_one"])
    bpf.tc_attach(veth, progs["xo_two"])
    assert bpf.tcx_programs(veth) == [pid(progs["xo_two"]), pid(progs["other"])]
    bpf.tc_detach(veth)
    assert bpf.tcx_programs(veth) == [pid(progs["other"])]
    bpf.tc_detach(veth)                               # nothing of ours: fine
    assert bpf.tc_query(veth, bpf.BPF_TCX_EGRESS) == 0


def test_tcx_takes_over_from_our_cls_bpf_filter(progs, veth, tcx):
    """How builds before tcx, and agents on kernels before 6.6, attach: clsact, a cls_bpf
    filter at our handle/priority."""
    lib = bpf._lib
    hook = bpf._TcHook(sz=ctypes.sizeof(bpf._TcHook), ifindex=veth, attach_point=1)
    assert lib.bpf_tc_hook_create(ctypes.byref(hook)) == 0
    opts = bpf._TcOpts(sz=ctypes.sizeof(bpf._TcOpts), prog_fd=progs["xo_one"], handle=bpf.LEGACY_TC_HANDLE,
                       priority=bpf.LEGACY_TC_PRIORITY)
    assert lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)) == 0
    assert "xo_one" in filters()
    bpf.tc_attach(veth, progs["xo_two"])
    assert filters() == ""
    assert bpf.tcx_programs(veth) == [pid(progs["xo_two"])]


def test_cls_bpf_ours_is_a_direct_action_filter_replaced_in_place(progs, veth, cls_bpf):
    other = bpf._TcOpts(sz=ctypes.sizeof(bpf._TcOpts), prog_fd=progs["other"], handle=1, priority=2)
    hook = bpf._TcHook(sz=ctypes.sizeof(bpf._TcHook), ifindex=veth, attach_point=1)
    assert bpf._lib.bpf_tc_hook_create(ctypes.byref(hook)) == 0
    assert bpf._lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(other)) == 0
    assert bpf.tc_query(veth) == 0                    # not ours
    bpf.tc_attach(veth, progs["xo_one"])
    assert bpf.tc_query(veth) == pid(progs["xo_one"])
    shown = filters()
    assert "xo_one" in shown and "direct-action" in shown and "handle 0x58" in shown and "pref 1 " in shown
    bpf.tc_attach(veth, progs["xo_two"])              # in place: one filter of ours, the other one kept
    shown = filters()
    assert bpf.tc_query(veth) == pid(progs["xo_two"])
    assert "xo_one" not in shown and shown.count("handle 0x58") == 1 and "other" in shown
    assert not bpf.kernel_has_tcx() or bpf.tcx_programs(veth) == []     # nothing on tcx
    bpf.tc_detach(veth)
    assert bpf.tc_query(veth) == 0 and "xo_two" not in filters() and "other" in filters()
    bpf.tc_detach(veth)                               # nothing of ours: fine
    assert bpf.tc_query(veth, bpf.BPF_TCX_EGRESS) == 0


def test_cls_bpf_attaches_where_there_is_no_clsact_yet(progs, veth, cls_bpf):
    bpf.tc_attach(veth, progs["xo_one"], bpf.BPF_TCX_EGRESS)
    assert bpf.tc_query(veth, bpf.BPF_TCX_EGRESS) == pid(progs["xo_one"]) and "xo_one" in filters("egress")
    assert bpf.tc_query(veth) == 0
    bpf.tc_detach(veth, bpf.BPF_TCX_EGRESS)
    assert filters("egress") == ""


DETACH = "import socket; from xoverlay.kernel import bpf; i = socket.if_nametoindex('v0'); " \
         "bpf.tc_detach(i); bpf.tc_detach(i, bpf.BPF_TCX_EGRESS); print('detached')"


@pytest.mark.parametrize("kind", [bpf.TCX, bpf.CLS_BPF])
def test_detach_where_nothing_was_attached_prints_nothing(veth, kind):
    if kind == bpf.TCX and not bpf.kernel_has_tcx():
        pytest.skip("this kernel has no tcx (6.6+)")
    """`down` and `lab down` detach from devices that never had a cls_bpf filter: libbpf
    must not print the kernel's complaint about the missing qdisc on the terminal. (In a
    process of its own, as `lab down` is: in this test process, after the module's BCC
    programs were compiled, the complaint did not show even before the fix.)"""
    r = subprocess.run(["nsenter", f"--net=/run/netns/{NETNS}", "--", sys.executable, "-c", DETACH],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, bpf.TC_ATTACH_ENV: kind,
                            "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert (r.returncode, r.stdout, r.stderr) == (0, "detached\n", "")
