"""xoverlay/kernel/bpf.py's tcx attach, in a netns of the test's own: ours goes first, replaces
itself in place, leaves other programs alone, and takes over from the cls_bpf filter an
older build attached."""
from __future__ import annotations

import ctypes
import os
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


def test_ours_goes_first_and_is_replaced_in_place(progs, veth):
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


def test_the_cls_bpf_filter_of_an_older_build_is_removed(progs, veth):
    """How builds before tcx attached: clsact, a cls_bpf filter at our handle/priority."""
    lib = bpf._lib
    lib.bpf_tc_hook_create.argtypes = [ctypes.POINTER(bpf._TcHook)]
    lib.bpf_tc_attach.argtypes = [ctypes.POINTER(bpf._TcHook), ctypes.POINTER(bpf._TcOpts)]
    hook = bpf._TcHook(sz=ctypes.sizeof(bpf._TcHook), ifindex=veth, attach_point=1)
    assert lib.bpf_tc_hook_create(ctypes.byref(hook)) == 0
    opts = bpf._TcOpts(sz=ctypes.sizeof(bpf._TcOpts), prog_fd=progs["xo_one"], handle=bpf.LEGACY_TC_HANDLE,
                       priority=bpf.LEGACY_TC_PRIORITY)
    assert lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)) == 0

    def filters() -> str:
        return subprocess.run(["tc", "filter", "show", "dev", "v0", "ingress"], capture_output=True,
                              text=True, check=True).stdout
    assert "xo_one" in filters()
    bpf.tc_attach(veth, progs["xo_two"])
    assert filters() == ""
    assert bpf.tcx_programs(veth) == [pid(progs["xo_two"])]


DETACH = "import socket; from xoverlay.kernel import bpf; i = socket.if_nametoindex('v0'); " \
         "bpf.tc_detach(i); bpf.tc_detach(i, bpf.BPF_TCX_EGRESS); print('detached')"


def test_detach_where_nothing_was_attached_prints_nothing(veth):
    """`down` and `lab down` detach from devices that never had a cls_bpf filter: libbpf
    must not print the kernel's complaint about the missing qdisc on the terminal. (In a
    process of its own, as `lab down` is: in this test process, after the module's BCC
    programs were compiled, the complaint did not show even before the fix.)"""
    r = subprocess.run(["nsenter", f"--net=/run/netns/{NETNS}", "--", sys.executable, "-c", DETACH],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert (r.returncode, r.stdout, r.stderr) == (0, "detached\n", "")
