"""The Python half of the kernel/control contract: every map's name, pin path, type and
entry layout. Mirrors bpf/lib/structs.h (the layouts) and bpf/lib/maps.h (the declarations);
tests/test_layout.py checks the two agree."""
from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import socket
from dataclasses import dataclass

from xoverlay.maps import BPF_DIR

BPF_ROOT = "/sys/fs/bpf"
PIN_ROOT = os.path.join(BPF_ROOT, "xoverlay")


def pin_dir(node: str) -> str:
    """bpffs is shared by every network namespace: each node gets its own directory."""
    return os.path.join(PIN_ROOT, node)


def ip_be(addr: str) -> int:
    """An IPv4 address as the integer whose in-memory bytes are in network order."""
    return int.from_bytes(socket.inet_aton(addr), "little")


def ip_str(be: int) -> str:
    return socket.inet_ntoa(be.to_bytes(4, "little"))


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def mac_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


class Struct(ctypes.Structure):
    def __eq__(self, other):
        return type(self) is type(other) and bytes(self) == bytes(other)

    def __hash__(self):
        return hash(bytes(self))

    def __repr__(self):
        def show(name):
            value = getattr(self, name)
            if isinstance(value, ctypes.Array):
                return mac_str(value)
            if name in ("ip", "node_ip", "addr"):
                return ip_str(value)
            return repr(value)
        fields = ", ".join(f"{name}={show(name)}" for name, *_ in self._fields_ if not name.startswith("pad"))
        return f"{type(self).__name__}({fields})"


Mac = ctypes.c_uint8 * 6


class Config(Struct):
    _fields_ = [("node_ip", ctypes.c_uint32), ("underlay_ifindex", ctypes.c_uint32),
                ("vxlan_port", ctypes.c_uint16), ("flags", ctypes.c_uint16), ("gateway_ifindex", ctypes.c_uint32),
                ("build_id", ctypes.c_uint64)]


class EndpointKey(Struct):
    _fields_ = [("vni", ctypes.c_uint32), ("ip", ctypes.c_uint32)]


class Endpoint(Struct):
    _fields_ = [("node_ip", ctypes.c_uint32), ("ifindex", ctypes.c_uint32), ("mac", Mac),
                ("flags", ctypes.c_uint16), ("slot", ctypes.c_uint32)]


class LocalEndpoint(Struct):
    _fields_ = [("vni", ctypes.c_uint32), ("ip", ctypes.c_uint32), ("mac", Mac), ("flags", ctypes.c_uint16),
                ("slot", ctypes.c_uint32)]


def _flags(header: str, prefix: str) -> dict[str, int]:
    """The `#define <prefix>NAME 0x...` lines of bpf/lib/<header>: flags have their one
    definition in C, and Python reads it."""
    with open(BPF_DIR / "lib" / header) as f:
        return {name: int(value, 16) for name, value in
                re.findall(rf"^#define {prefix}(\w+) (0x[0-9a-fA-F]+)", f.read(), re.MULTILINE)}


CFG_FIB_MAIN_ONLY = _flags("structs.h", "XO_CFG_")["FIB_MAIN_ONLY"]
CFG_EGRESS = _flags("structs.h", "XO_CFG_")["EGRESS"]
EP_FLAGS = _flags("structs.h", "XO_EP_")
EP_NETWORK_HAS_SERVICES = EP_FLAGS["NETWORK_HAS_SERVICES"]
EP_SERVICE_BACKEND = EP_FLAGS["SERVICE_BACKEND"]
EP_NETWORK_INTERNAL = EP_FLAGS["NETWORK_INTERNAL"]


class SubnetKey(Struct):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class Subnet(Struct):
    _fields_ = [("vni", ctypes.c_uint32)]


class Peer(Struct):
    _fields_ = [("flags", ctypes.c_uint32), ("slot", ctypes.c_uint32)]


class Vni(Struct):
    _fields_ = [("flags", ctypes.c_uint32)]


class Traffic(Struct):
    _fields_ = [("tx_packets", ctypes.c_uint64), ("tx_bytes", ctypes.c_uint64),
                ("rx_packets", ctypes.c_uint64), ("rx_bytes", ctypes.c_uint64),
                ("last_rx_ns", ctypes.c_uint64)]
    _latest_ = ("last_rx_ns",)     # a time, not a count: across CPUs the latest wins


class DropCount(Struct):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class LbServiceKey(Struct):
    _fields_ = [("vni", ctypes.c_uint32), ("vip", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class LbService(Struct):
    _fields_ = [("id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class LbBackendKey(Struct):
    _fields_ = [("service", ctypes.c_uint32), ("index", ctypes.c_uint32)]


class LbBackend(Struct):
    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("state", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("slot", ctypes.c_uint32), ("where", Endpoint)]


class CtKey(Struct):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("dir", ctypes.c_uint8),
                ("pad", ctypes.c_uint16)]


class Ct(Struct):
    _fields_ = [("service", ctypes.c_uint32), ("backend", ctypes.c_uint32), ("vip", ctypes.c_uint32),
                ("vport", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class MeshKey(Struct):
    _fields_ = [("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class Mesh(Struct):
    _fields_ = [("service", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("vni", ctypes.c_uint32),
                ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class LbStats(Struct):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("connections", ctypes.c_uint64)]


# Constants of bpf/lib/structs.h and maps.h
LB_AFFINITY = 1
LB_ACTIVE, LB_DRAINING = 1, 2
CT_SERVICE, CT_REPLY, CT_MESH = 1, 2, 3
LB_MAX_SERVICES = 16384
LB_MAX_BACKENDS = 65536                          # slots of xo_lb_backend_stats
MAX_LOCAL_ENDPOINTS, MAX_PEERS = 4096, 1024     # slots of xo_endpoint_stats, xo_peer_stats
NO_SLOT = _flags("structs.h", "XO_NO_")["SLOT"]
IPPROTO = {"tcp": 6, "udp": 17}


def port_be(port: int) -> int:
    """A port as the integer whose in-memory bytes are in network order."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


class Monitor(Struct):
    _fields_ = [("events", ctypes.c_uint32), ("sample", ctypes.c_uint32), ("pid", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("pid_start", ctypes.c_uint64), ("lost", ctypes.c_uint64)]


class Event(Struct):
    """struct xo_event: one record of the xo_events ring buffer (addresses and ports in
    network order, as ip_be/ip_str and socket.ntohs expect)."""
    _fields_ = [("ts_ns", ctypes.c_uint64), ("type", ctypes.c_uint8), ("hook", ctypes.c_uint8),
                ("reason", ctypes.c_uint8), ("protocol", ctypes.c_uint8), ("flags", ctypes.c_uint16),
                ("ethertype", ctypes.c_uint16), ("ifindex", ctypes.c_uint32), ("len", ctypes.c_uint32),
                ("vni", ctypes.c_uint32), ("outer_saddr", ctypes.c_uint32), ("outer_daddr", ctypes.c_uint32),
                ("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("xlate_daddr", ctypes.c_uint32), ("xlate_dport", ctypes.c_uint16),
                ("pad", ctypes.c_uint16)]


# XO_MON_* and XO_EVF_* of bpf/lib/events.h
_MON, _EVF = _flags("events.h", "XO_MON_"), _flags("events.h", "XO_EVF_")
MON_DROPS, MON_FORWARDS, MON_SERVICES = _MON["DROPS"], _MON["FORWARDS"], _MON["SERVICES"]
EVF_OUTER, EVF_VNI, EVF_IP, EVF_PORTS, EVF_XLATE = (_EVF[n] for n in ("OUTER", "VNI", "IP", "PORTS", "XLATE"))
EVENTS_BYTES = 256 * 1024      # XO_EVENTS_BYTES


class U32(Struct):
    _fields_ = [("value", ctypes.c_uint32)]


@dataclass(frozen=True)
class MapSpec:
    name: str          # as declared in bpf/lib/maps.h, and the pin file name
    key: type
    value: type
    max_entries: int
    percpu: bool = False
    # What the agent reconciles from the store; counters are written by the data path.
    desired: bool = True
    # A ring buffer: no keys, max_entries is its size in bytes, `value` its record type.
    ringbuf: bool = False
    # The BPF map type, as bpf/lib/maps.h declares it (a key of MAP_TYPES).
    kind: str = "hash"

    @property
    def map_type(self) -> int:
        return MAP_TYPES[self.kind]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(type, key size, value size, max entries) as the kernel reports a map made from
        bpf/lib/maps.h (a ring buffer has neither keys nor values)."""
        if self.ringbuf:
            return self.map_type, 0, 0, self.max_entries
        return self.map_type, ctypes.sizeof(self.key), ctypes.sizeof(self.value), self.max_entries


# BPF_MAP_TYPE_* of the kinds we use (include/uapi/linux/bpf.h).
MAP_TYPES = {"hash": 1, "array": 2, "percpu_hash": 5, "percpu_array": 6, "lru_hash": 9, "lpm_trie": 11,
             "array_of_maps": 12, "ringbuf": 27}


MAPS = {spec.name: spec for spec in [
    MapSpec("xo_config", U32, Config, 1, kind="array"),
    MapSpec("xo_endpoints", EndpointKey, Endpoint, 65536),
    MapSpec("xo_local_endpoints", U32, LocalEndpoint, MAX_LOCAL_ENDPOINTS),
    MapSpec("xo_subnets", SubnetKey, Subnet, 1024, kind="lpm_trie"),
    MapSpec("xo_peers", U32, Peer, MAX_PEERS),
    MapSpec("xo_vnis", U32, Vni, 4096),
    # Counters by the slot in the entries above (xoverlay/core/desired.py gives the slots).
    MapSpec("xo_peer_stats", U32, Traffic, MAX_PEERS, percpu=True, desired=False, kind="percpu_array"),
    MapSpec("xo_endpoint_stats", U32, Traffic, MAX_LOCAL_ENDPOINTS, percpu=True, desired=False,
            kind="percpu_array"),
    MapSpec("xo_drops", U32, DropCount, 32, percpu=True, desired=False, kind="percpu_array"),
    MapSpec("xo_lb_services", LbServiceKey, LbService, 65536),
    MapSpec("xo_lb_backends", LbBackendKey, LbBackend, LB_MAX_BACKENDS),
    # The template of the Maglev tables (never written) and the tables by service id: a
    # lookup gives the inner map's id, an update takes an inner map's fd (xoverlay/kernel/maglev_maps.py).
    MapSpec("xo_lb_maglev_inner", U32, U32, 1, desired=False, kind="array"),
    MapSpec("xo_lb_maglev", U32, U32, LB_MAX_SERVICES, desired=False, kind="array_of_maps"),
    MapSpec("xo_lb_mesh", MeshKey, Mesh, 65536),
    MapSpec("xo_lb_ct", CtKey, Ct, 131072, desired=False, kind="lru_hash"),
    # By service id, and by the slot in a backend's entry.
    MapSpec("xo_lb_service_stats", U32, LbStats, LB_MAX_SERVICES, percpu=True, desired=False,
            kind="percpu_array"),
    MapSpec("xo_lb_backend_stats", U32, LbStats, LB_MAX_BACKENDS, percpu=True, desired=False,
            kind="percpu_array"),
    MapSpec("xo_monitor", U32, Monitor, 1, desired=False, kind="array"),
    MapSpec("xo_events", U32, Event, EVENTS_BYTES, desired=False, ringbuf=True, kind="ringbuf"),
]}


def sum_percpu(values: list):
    """Add up a per-CPU counter struct (its `_latest_` fields are times: the latest wins)."""
    total = type(values[0])()
    latest = getattr(total, "_latest_", ())
    for v in values:
        for name, *_ in total._fields_:
            mine, theirs = getattr(total, name), getattr(v, name)
            setattr(total, name, max(mine, theirs) if name in latest else mine + theirs)
    return total


def subnet_key(cidr: str) -> SubnetKey:
    net = ipaddress.IPv4Network(cidr)
    return SubnetKey(prefixlen=net.prefixlen, addr=ip_be(str(net.network_address)))
