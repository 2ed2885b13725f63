"""What `ethtool -i` and `ethtool -k` tell about a device, through the SIOCETHTOOL ioctl
(the kernel's own ethtool interface; no ethtool binary needed). Answers for the network
namespace the calling thread is in: enter the node's first (xoverlay.kernel.netns.entered)."""
from __future__ import annotations

import array
import fcntl
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x03
ETHTOOL_GSTRINGS = 0x1B
ETHTOOL_GSSET_INFO = 0x37
ETHTOOL_GFEATURES = 0x3A
ETH_SS_FEATURES = 4
ETH_GSTRING_LEN = 32


def _ioctl(sock: socket.socket, ifname: str, buf: array.array) -> None:
    addr, _ = buf.buffer_info()
    ifreq = struct.pack("16sP", ifname.encode()[:15], addr)
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


def driver(ifname: str) -> str | None:
    """The device's driver name (`ethtool -i`: driver), None if it has none to tell."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        buf = array.array("B", struct.pack("I", ETHTOOL_GDRVINFO) + bytes(196))
        try:
            _ioctl(s, ifname, buf)
        except OSError:
            return None
        return buf.tobytes()[4:36].split(b"\0", 1)[0].decode() or None


def features(ifname: str) -> dict[str, bool]:
    """Every feature of the device by its ethtool name (`ethtool -k`), active or not.
    Empty if the device does not answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            # How many feature names there are.
            info = array.array("B", struct.pack("IIQI", ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_FEATURES, 0))
            _ioctl(s, ifname, info)
            count = struct.unpack_from("I", info.tobytes(), 16)[0]
            # Their names.
            names = array.array("B", struct.pack("III", ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count)
                                + bytes(count * ETH_GSTRING_LEN))
            _ioctl(s, ifname, names)
            raw = names.tobytes()[12:]
            labels = [raw[i * ETH_GSTRING_LEN:(i + 1) * ETH_GSTRING_LEN].split(b"\0", 1)[0].decode()
                      for i in range(count)]
            # Their state: blocks of 32 bits (available, requested, active, never_changed).
            blocks = (count + 31) // 32
            state = array.array("B", struct.pack("II", ETHTOOL_GFEATURES, blocks) + bytes(blocks * 16))
            _ioctl(s, ifname, state)
        except OSError:
            return {}
        data = state.tobytes()
        active = [struct.unpack_from("4I", data, 8 + 16 * b)[2] for b in range(blocks)]
        return {name: bool(active[i // 32] >> (i % 32) & 1) for i, name in enumerate(labels) if name}
