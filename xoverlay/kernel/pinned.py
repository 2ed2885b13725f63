"""A pinned BPF map opened by path, its entries as the layouts of xoverlay/maps/layout.py: what
the agent, status and tests read and write the data path's maps with (no BCC)."""
from __future__ import annotations

import ctypes
import errno
import os

from xoverlay.kernel import bpf
from xoverlay.maps.layout import MapSpec


class PinnedMap:
    """A pinned map opened by path: what the agent, status and tests use (no BCC)."""

    def __init__(self, node_dir: str, spec: MapSpec):
        self._bpf = bpf
        self.spec = spec
        self.path = os.path.join(node_dir, spec.name)
        self.fd = bpf.obj_get(self.path)
        self._ksize = ctypes.sizeof(spec.key)
        self._vsize = ctypes.sizeof(spec.value)
        # Per-CPU values come as one slot per possible CPU, each rounded up to 8 bytes.
        self._slot = (self._vsize + 7) // 8 * 8
        self._ncpu = bpf.possible_cpus() if spec.percpu else 1

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _values(self, raw: bytes) -> list:
        return [self.spec.value.from_buffer_copy(raw[i * self._slot:i * self._slot + self._vsize])
                for i in range(self._ncpu)]

    def get(self, key):
        raw = self._bpf.map_lookup(self.fd, bytes(key), self._slot * self._ncpu)
        if raw is None:
            return None
        values = self._values(raw)
        return values if self.spec.percpu else values[0]

    def set(self, key, value) -> None:
        data = bytes(value)
        if self.spec.percpu:
            data = (data.ljust(self._slot, b"\0")) * self._ncpu
        self._bpf.map_update(self.fd, bytes(key), data)

    def delete(self, key) -> bool:
        return self._bpf.map_delete(self.fd, bytes(key))

    def delete_raw(self, key: bytes) -> bool:
        return self._bpf.map_delete(self.fd, key)

    def keys(self) -> list:
        return [self.spec.key.from_buffer_copy(k) for k in self._bpf.map_keys(self.fd, self._ksize)]

    def items(self) -> dict:
        """Every entry. In batches of thousands per syscall where the map type has batch
        lookups (hash and array maps): the agent reads every map on each resync, and one
        syscall per entry kept an idle agent busy at 10,000 services. Entry by entry
        where the kernel has no batches for the map type."""
        if not self.spec.percpu:
            return self.decode(self.raw_items())
        raw = self._lookup_batch(self._slot * self._ncpu)    # per-CPU values at 8-byte slots
        if raw is None:
            return self._items_one_by_one()
        return {self.spec.key.from_buffer_copy(k): self._values(v) for k, v in raw}

    def raw_items(self) -> dict[bytes, bytes]:
        """Every entry as the kernel holds it, key bytes -> value bytes (not for per-CPU
        maps). Cheap to compare with what was written: an idle agent decodes nothing."""
        assert not self.spec.percpu, self.spec.name
        raw = self._lookup_batch(self._vsize)
        if raw is None:
            return {bytes(k): bytes(v) for k, v in self._items_one_by_one().items()}
        return dict(raw)

    def _lookup_batch(self, stride: int) -> list | None:
        """Every (key, value) pair in batches, values `stride` bytes apart; None where
        the kernel has no batch lookups for the map type."""
        try:
            return self._bpf.lookup_batch(self.fd, self._ksize, stride, self.spec.max_entries)
        except self._bpf.BpfError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, 524):    # 524: the kernel's ENOTSUPP
                raise
            return None

    def decode(self, raw: dict[bytes, bytes]) -> dict:
        """raw_items() as key and value structs."""
        key, value = self.spec.key.from_buffer_copy, self.spec.value.from_buffer_copy
        return {key(k): value(v) for k, v in raw.items()}

    def _items_one_by_one(self) -> dict:
        out = {}
        for key in self.keys():
            value = self.get(key)
            if value is not None:
                out[key] = value
        return out
