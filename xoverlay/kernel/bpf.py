"""Thin ctypes bindings to libbpf.so.1: pinned objects, map operations, program load,
XDP/tc attach and BPF_PROG_TEST_RUN. Nothing here knows xoverlay's maps."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)


class BpfError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    # libbpf returns -errno (and sets errno) on failure.
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


_lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
_lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
for _name in ("bpf_map_lookup_elem", "bpf_map_update_elem", "bpf_map_delete_elem",
              "bpf_map_get_next_key"):
    getattr(_lib, _name).restype = ctypes.c_int
_lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
_lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
_lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
_lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    return _check(_lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def obj_get(path: str) -> int:
    """Open a pinned map or program; returns a new fd."""
    return _check(_lib.bpf_obj_get(path.encode()), f"open {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    ret = _lib.bpf_map_lookup_elem(fd, kbuf, vbuf)
    if ret < 0:
        if ctypes.get_errno() == 2 or ret == -2:
            return None
        _check(ret, "map lookup")
    return vbuf.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _check(_lib.bpf_map_update_elem(fd, kbuf, vbuf, flags), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    kbuf = ctypes.create_string_buffer(key, len(key))
    ret = _lib.bpf_map_delete_elem(fd, kbuf)
    if ret < 0:
        if ret == -2 or ctypes.get_errno() == 2:
            return False
        _check(ret, "map delete")
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys = []
    prev = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        ret = _lib.bpf_map_get_next_key(fd, prev, nxt)
        if ret < 0:
            break
        keys.append(nxt.raw)
        prev = ctypes.create_string_buffer(nxt.raw, key_size)
    return keys


class BpfProgInfo(ctypes.Structure):
    # struct bpf_prog_info, the leading fields we read.
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),   # with stats enabled
    ]


class BpfMapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16),
    ]


def prog_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
    return info


BPF_STATS_RUN_TIME = 0


def enable_stats() -> int:
    """Make the kernel time every BPF program run (prog_info run_time_ns/run_cnt) for as
    long as the returned fd is open, and no longer even if we crash. Each run then costs a
    clock read more: for measuring, never while measuring anything else."""
    return _check(_lib.bpf_enable_stats(BPF_STATS_RUN_TIME), "enable BPF run-time stats")


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


# --- map creation, batches, map-in-map ------------------------------------------------

BPF_MAP_TYPE_ARRAY = 2
BPF_F_INNER_MAP = 1 << 12     # inner maps of one outer map may then differ in max_entries


class _MapCreateOpts(ctypes.Structure):
    # struct bpf_map_create_opts (libbpf 1.1)
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64), ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                ctypes.c_uint32, ctypes.POINTER(_MapCreateOpts)]
_lib.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
_lib.bpf_map_update_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(_BatchOpts)]
_lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                      ctypes.POINTER(_BatchOpts)]


BPF_MAP_TYPE_ARRAY_OF_MAPS = 12


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, inner_map_fd: int = 0) -> int:
    """A new, unpinned map; returns its fd (the caller closes it)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags, inner_map_fd=inner_map_fd)
    return _check(_lib.bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries,
                                      ctypes.byref(opts)), f"create map {name}")


def map_fd_by_id(map_id: int) -> int:
    return _check(_lib.bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")


_lib.bpf_map_delete_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                      ctypes.POINTER(_BatchOpts)]


def u32_update_batch(fd: int, keys: list[int], values: list[int]) -> None:
    """Set u32 keys to u32 values in one syscall. On an array of maps the values are
    inner map fds, and the kernel waits for running programs once per batch, not once
    per entry (since 6.8): 10,000 tables swap in a fraction of a second, not minutes."""
    n = len(keys)
    if not n:
        return
    k = (ctypes.c_uint32 * n)(*keys)
    v = (ctypes.c_uint32 * n)(*values)
    count = ctypes.c_uint32(n)
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    _check(_lib.bpf_map_update_batch(fd, k, v, ctypes.byref(count), ctypes.byref(opts)), "batch update")
    if count.value != n:
        raise BpfError(5, f"batch update: {count.value} of {n} entries written")


def array_update_batch(fd: int, values: list[int]) -> None:
    """Set entries 0..len(values)-1 of a u32 -> u32 array in one syscall."""
    n = len(values)
    keys = (ctypes.c_uint32 * n)(*range(n))
    vals = (ctypes.c_uint32 * n)(*values)
    count = ctypes.c_uint32(n)
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    _check(_lib.bpf_map_update_batch(fd, keys, vals, ctypes.byref(count), ctypes.byref(opts)),
           "batch update")
    if count.value != n:
        raise BpfError(5, f"batch update: {count.value} of {n} entries written")


def lookup_batch(fd: int, key_size: int, value_size: int, max_entries: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a map in as few syscalls as the kernel allows (empty slots of
    an array of maps are skipped)."""
    chunk = max(1, min(max_entries, 4096))
    keys = ctypes.create_string_buffer(chunk * key_size)
    vals = ctypes.create_string_buffer(chunk * value_size)
    token = ctypes.create_string_buffer(max(key_size, 8))
    out: list[tuple[bytes, bytes]] = []
    first = True
    while True:
        count = ctypes.c_uint32(chunk)
        opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
        ret = _lib.bpf_map_lookup_batch(fd, None if first else token, token, keys, vals, ctypes.byref(count),
                                        ctypes.byref(opts))
        first = False
        k, v = keys.raw, vals.raw
        out.extend((k[i * key_size:(i + 1) * key_size], v[i * value_size:(i + 1) * value_size])
                   for i in range(count.value))
        if ret < 0:
            if ret == -2 or ctypes.get_errno() == 2:   # ENOENT: that was the last batch
                return out
            _check(ret, "batch lookup")
        if count.value == 0:
            return out


def array_lookup_batch(fd: int, n: int) -> list[int]:
    """Entries 0..n-1 of a u32 -> u32 array."""
    pairs = lookup_batch(fd, 4, 4, n)
    values = [0] * n
    for k, v in pairs:
        i = int.from_bytes(k, "little")
        if i < n:
            values[i] = int.from_bytes(v, "little")
    return values


# --- program load -------------------------------------------------------------------

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_F_XDP_HAS_FRAGS = 1 << 5


class _ProgLoadOpts(ctypes.Structure):
    # struct bpf_prog_load_opts (libbpf 1.1), up to log_buf.
    _fields_ = [
        ("sz", ctypes.c_size_t), ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_uint32), ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32), ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32), ("attach_btf_obj_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32), ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p), ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p), ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_char_p),
    ]


_lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p,
                               ctypes.c_size_t, ctypes.POINTER(_ProgLoadOpts)]


def prog_load(prog_type: int, name: str, insns: bytes, flags: int = 0) -> int:
    """Load already-relocated instructions (from BCC) with prog_flags BCC cannot set."""
    log = ctypes.create_string_buffer(1 << 20)
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), prog_flags=flags,
                         log_level=0, log_size=len(log), log_buf=ctypes.cast(log, ctypes.c_char_p))
    buf = ctypes.create_string_buffer(insns, len(insns))
    ret = _lib.bpf_prog_load(prog_type, name.encode()[:15], b"GPL", buf, len(insns) // 8,
                             ctypes.byref(opts))
    if ret < 0:
        # Retry with the verifier log on, to say why.
        opts.log_level = 1
        ret2 = _lib.bpf_prog_load(prog_type, name.encode()[:15], b"GPL", buf, len(insns) // 8,
                                  ctypes.byref(opts))
        tail = log.value.decode(errors="replace").strip().splitlines()[-3:]
        _check(ret2 if ret2 < 0 else ret, f"load {name}: {' | '.join(tail)}")
    return ret


# --- XDP ----------------------------------------------------------------------------

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_ATTACHED_NONE, XDP_ATTACHED_DRV, XDP_ATTACHED_SKB, XDP_ATTACHED_HW, XDP_ATTACHED_MULTI = range(5)

_lib.bpf_xdp_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p]
_lib.bpf_xdp_detach.argtypes = [ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p]


class _XdpQueryOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_id", ctypes.c_uint32), ("drv_prog_id", ctypes.c_uint32),
                ("hw_prog_id", ctypes.c_uint32), ("skb_prog_id", ctypes.c_uint32),
                ("attach_mode", ctypes.c_uint8), ("_pad", ctypes.c_uint8 * 7),
                ("feature_flags", ctypes.c_uint64)]


_lib.bpf_xdp_query.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_XdpQueryOpts)]


def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    _check(_lib.bpf_xdp_attach(ifindex, prog_fd, flags, None), f"attach XDP to ifindex {ifindex}")


def xdp_detach(ifindex: int, flags: int = 0) -> None:
    _check(_lib.bpf_xdp_detach(ifindex, flags, None), f"detach XDP from ifindex {ifindex}")


def xdp_query(ifindex: int) -> tuple[int, int]:
    """(attach mode, program id) of the XDP program on ifindex; (0, 0) if none."""
    opts = _XdpQueryOpts(sz=ctypes.sizeof(_XdpQueryOpts))
    _check(_lib.bpf_xdp_query(ifindex, 0, ctypes.byref(opts)), f"query XDP on ifindex {ifindex}")
    return opts.attach_mode, opts.prog_id


# --- tc: tcx where the kernel has it (6.6+), clsact + cls_bpf below it ------------------
#
# tcx is the kernel's BPF-only tc hook: no clsact qdisc, no cls_bpf classifier and its
# filter chain in front of every packet (measured on the 1-sender test: tc_run,
# cls_bpf_classify and tcf_classify were ~10% of what xoverlay costs over plain routing).
# Kernels before 6.6 have only the classic way: a clsact qdisc with a cls_bpf filter in
# direct-action mode, ours at a fixed handle and priority. Which one, a probe decides once
# per process (tc_attach_kind). Either way the program stays attached when the agent exits
# (plain BPF_PROG_ATTACH, no link; a filter), is replaced in place atomically, and is
# found again as the program on the hook whose name starts with "xo_".

_SYS_BPF = 321                      # x86_64
BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_PROG_QUERY = 8, 9, 16
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47
BPF_F_REPLACE, BPF_F_BEFORE = 1 << 2, 1 << 3
OUR_PROG_PREFIX = b"xo_"
TCX, CLS_BPF = "tcx", "cls_bpf"
TC_ATTACH_ENV = "XOVERLAY_TC_ATTACH"    # "tcx" or "cls_bpf": overrides the probe (tests use it)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _AttachAttr(ctypes.Structure):          # union bpf_attr, BPF_PROG_ATTACH/DETACH
    _fields_ = [("target_ifindex", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32), ("relative_fd", ctypes.c_uint32),
                ("expected_revision", ctypes.c_uint64)]


class _QueryAttr(ctypes.Structure):           # union bpf_attr, BPF_PROG_QUERY
    _fields_ = [("target_ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("prog_attach_flags", ctypes.c_uint64), ("link_ids", ctypes.c_uint64),
                ("link_attach_flags", ctypes.c_uint64), ("revision", ctypes.c_uint64)]


def _sys_bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def kernel_has_tcx() -> bool:
    """A tcx query of the loopback device (ifindex 1 in every netns) answers from 6.6 on;
    before, the kernel does not know the attach type (EINVAL)."""
    try:
        tcx_programs(1)
        return True
    except BpfError:
        return False


def choose_tc_attach(has_tcx: bool, forced: str | None) -> str:
    """The attach kind: what the environment forces, else tcx where the kernel has it."""
    if forced:
        if forced not in (TCX, CLS_BPF):
            raise BpfError(22, f"{TC_ATTACH_ENV}={forced}: use {TCX} or {CLS_BPF}")
        if forced == TCX and not has_tcx:
            raise BpfError(95, f"{TC_ATTACH_ENV}=tcx: this kernel has no tcx (it came in 6.6)")
        return forced
    return TCX if has_tcx else CLS_BPF


@lru_cache(maxsize=1)
def tc_attach_kind() -> str:
    return choose_tc_attach(kernel_has_tcx(), os.environ.get(TC_ATTACH_ENV))


def tcx_programs(ifindex: int, point: int = BPF_TCX_INGRESS) -> list[int]:
    """Ids of the programs on a tcx hook, in the order they run."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_ifindex=ifindex, attach_type=point, prog_ids=ctypes.addressof(ids), prog_cnt=64)
    _sys_bpf(BPF_PROG_QUERY, attr, f"query tcx on ifindex {ifindex}")
    return list(ids[:attr.prog_cnt])


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib.bpf_prog_get_fd_by_id(prog_id), f"program id {prog_id}")


def _ours(prog_id: int) -> bool:
    try:
        fd = prog_fd_by_id(prog_id)
    except BpfError:
        return False                        # gone since the query
    try:
        return prog_info(fd).name.startswith(OUR_PROG_PREFIX)
    finally:
        os.close(fd)


def tc_query(ifindex: int, point: int = BPF_TCX_INGRESS) -> int:
    """Program id of ours on the tc hook of ifindex (as tc_attach_kind attaches), 0 if none."""
    if tc_attach_kind() == CLS_BPF:
        return _cls_query(ifindex, point)
    try:
        ids = tcx_programs(ifindex, point)
    except BpfError:
        return 0                            # no such device (any more)
    return next((i for i in ids if _ours(i)), 0)


def tc_attach(ifindex: int, prog_fd: int, point: int = BPF_TCX_INGRESS) -> None:
    """Attach prog_fd as ours on the tc hook of ifindex, first; atomically in place of
    ours if one is there (no packet runs neither)."""
    if tc_attach_kind() == CLS_BPF:
        _cls_attach(ifindex, prog_fd, point)
        return
    attr = _AttachAttr(target_ifindex=ifindex, attach_bpf_fd=prog_fd, attach_type=point)
    old = tc_query(ifindex, point)
    old_fd = prog_fd_by_id(old) if old else -1
    try:
        if old_fd >= 0:
            attr.attach_flags, attr.replace_bpf_fd = BPF_F_REPLACE, old_fd
        else:
            attr.attach_flags = BPF_F_BEFORE          # no relative program: before all
        _sys_bpf(BPF_PROG_ATTACH, attr, f"attach tcx to ifindex {ifindex}")
    finally:
        if old_fd >= 0:
            os.close(old_fd)
    _cls_detach(ifindex, point)         # the filter an earlier build attached, if any


def tc_ensure(ifindex: int, prog_fd: int) -> bool:
    """prog_fd on the tc ingress of ifindex, attached (in place of ours) unless it already
    is: adopting a running node must not disturb its traffic. Returns whether it attached."""
    if tc_query(ifindex) == prog_info(prog_fd).id:
        return False
    tc_attach(ifindex, prog_fd)
    return True


def tc_detach(ifindex: int, point: int = BPF_TCX_INGRESS) -> None:
    """Detach ours from the tc hook of ifindex, whichever way it was attached (gone
    already is fine)."""
    _cls_detach(ifindex, point)
    if tc_attach_kind() == CLS_BPF:
        return
    try:
        prog = next((i for i in tcx_programs(ifindex, point) if _ours(i)), 0)
    except BpfError:
        return
    if not prog:
        return
    fd = prog_fd_by_id(prog)
    try:
        _sys_bpf(BPF_PROG_DETACH, _AttachAttr(target_ifindex=ifindex, attach_bpf_fd=fd, attach_type=point),
                 f"detach tcx from ifindex {ifindex}")
    except BpfError:
        pass                                # detached meanwhile
    finally:
        os.close(fd)


# cls_bpf: our filter in the clsact qdisc, at this handle and priority, direct-action.
class _TcHook(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int), ("attach_point", ctypes.c_int),
                ("parent", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class _TcOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32),
                ("priority", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


for _name in ("bpf_tc_attach", "bpf_tc_detach", "bpf_tc_query"):
    getattr(_lib, _name).argtypes = [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]
_lib.bpf_tc_hook_create.argtypes = [ctypes.POINTER(_TcHook)]
LEGACY_TC_HANDLE, LEGACY_TC_PRIORITY = 0x58, 1
BPF_TC_F_REPLACE = 1 << 0
_CLS_POINT = {BPF_TCX_INGRESS: 1, BPF_TCX_EGRESS: 2}     # BPF_TC_INGRESS, BPF_TC_EGRESS
_EEXIST, _ENOENT = 17, 2


_lib.libbpf_set_print.restype = ctypes.c_void_p
_lib.libbpf_set_print.argtypes = [ctypes.c_void_p]


def _quiet(call):
    """Run a libbpf tc call with its printing off: "no such filter" and "Parent Qdisc
    doesn't exists" are the usual answers here, and libbpf would print the kernel's
    complaint on the user's terminal."""
    printer = _lib.libbpf_set_print(None)
    try:
        return call()
    finally:
        _lib.libbpf_set_print(printer)


def _cls(ifindex: int, point: int, prog_fd: int = 0, flags: int = 0) -> tuple[_TcHook, _TcOpts]:
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=_CLS_POINT[point])
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=prog_fd, flags=flags, handle=LEGACY_TC_HANDLE,
                   priority=LEGACY_TC_PRIORITY)
    return hook, opts


def _cls_query(ifindex: int, point: int) -> int:
    hook, opts = _cls(ifindex, point)
    if _quiet(lambda: _lib.bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))) < 0:
        return 0                            # no qdisc, no filter, or no device
    return opts.prog_id if _ours(opts.prog_id) else 0


def _cls_attach(ifindex: int, prog_fd: int, point: int) -> None:
    hook, opts = _cls(ifindex, point, prog_fd, BPF_TC_F_REPLACE)
    ret = _quiet(lambda: _lib.bpf_tc_hook_create(ctypes.byref(hook)))
    if ret < 0 and ret != -_EEXIST:
        _check(ret, f"create clsact on ifindex {ifindex}")
    _check(_quiet(lambda: _lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))),
           f"attach cls_bpf to ifindex {ifindex}")


def _cls_detach(ifindex: int, point: int) -> None:
    """Remove our filter (the clsact qdisc stays: it may hold other filters, and an empty
    one costs nothing)."""
    hook, opts = _cls(ifindex, point)
    _quiet(lambda: _lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts)))


# --- BPF_PROG_TEST_RUN ----------------------------------------------------------------

class _TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t),
                ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


_lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]


def prog_test_run(prog_fd: int, packet: bytes, ctx: bytes | None = None,
                  repeat: int = 1, ctx_out=None) -> tuple[int, bytes, int]:
    """Run a program on one packet in the kernel. Returns (verdict, packet out, ns per run);
    `ctx_out`, a ctypes buffer at least the size of the program's whole context (struct
    __sk_buff: else ENOSPC), receives the context as the program left it."""
    out = ctypes.create_string_buffer(len(packet) + 256)
    inbuf = ctypes.create_string_buffer(packet, len(packet))
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(inbuf, ctypes.c_void_p),
                        data_out=ctypes.cast(out, ctypes.c_void_p), data_size_in=len(packet),
                        data_size_out=len(out), repeat=repeat)
    if ctx is not None:
        cbuf = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(cbuf, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
    if ctx_out is not None:
        opts.ctx_out = ctypes.addressof(ctx_out)
        opts.ctx_size_out = ctypes.sizeof(ctx_out)
    _check(_lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, out.raw[:opts.data_size_out], opts.duration


# --- ring buffer (BPF_MAP_TYPE_RINGBUF) -------------------------------------------------

_RingSampleFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_lib.ring_buffer__new.restype = ctypes.c_void_p
_lib.ring_buffer__new.argtypes = [ctypes.c_int, _RingSampleFn, ctypes.c_void_p, ctypes.c_void_p]
_lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
_lib.ring_buffer__consume.argtypes = [ctypes.c_void_p]
_lib.ring_buffer__free.argtypes = [ctypes.c_void_p]


class RingBuffer:
    """A reader of a ring buffer map by fd (a pinned one works: BCC's reader only knows
    maps of a module it compiled). poll() returns the records that arrived, as bytes."""

    def __init__(self, map_fd: int):
        self._records: list[bytes] = []

        def on_record(_ctx, data, size):
            self._records.append(ctypes.string_at(data, size))
            return 0
        self._callback = _RingSampleFn(on_record)     # keep a reference for libbpf
        ptr = _lib.ring_buffer__new(map_fd, self._callback, None, None)
        if not ptr:
            err = ctypes.get_errno() or 22
            raise BpfError(err, f"ring buffer on fd {map_fd}: {os.strerror(err)}")
        self._rb = ptr

    def poll(self, timeout_ms: int) -> list[bytes]:
        """Wait up to timeout_ms for records; return those read (maybe none). A signal
        ends the wait early (EINTR), as a timeout would."""
        ret = _lib.ring_buffer__poll(self._rb, timeout_ms)
        if ret < 0 and ret != -4:           # EINTR: let Python run its signal handlers
            _check(ret, "ring buffer poll")
        out, self._records = self._records, []
        return out

    def drain(self) -> list[bytes]:
        """Everything in the buffer now, without waiting."""
        ret = _lib.ring_buffer__consume(self._rb)
        if ret < 0 and ret != -4:
            _check(ret, "ring buffer consume")
        out, self._records = self._records, []
        return out

    def close(self) -> None:
        if self._rb:
            _lib.ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
