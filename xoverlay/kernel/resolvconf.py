"""Pointing an endpoint's resolver at its node's DNS responder.

For a named netns (/run/netns/NAME) that is /etc/netns/NAME/resolv.conf: `ip netns exec
NAME cmd` bind-mounts it over /etc/resolv.conf for cmd (iproute2's convention). Nothing
else does: nsenter, or a container runtime's own mount namespace, sees whatever
/etc/resolv.conf it has, and an endpoint given as /proc/PID/ns/net has no name at all;
its owner writes `nameserver 169.254.1.1` into that container's resolv.conf (docs/DNS.md).

A file that is not ours (no marker on its first line) is never overwritten or removed."""
from __future__ import annotations

import logging
import os

from xoverlay.core.model import GATEWAY_IP, Endpoint
from xoverlay.errors import XoError
from xoverlay.kernel.netns import NETNS_RUN_DIR

log = logging.getLogger("xoverlay.resolvconf")
ETC_NETNS = "/etc/netns"
MARKER = "# Written by xoverlay"


def netns_name(path: str) -> str | None:
    """NAME for /run/netns/NAME; None for any other path (/proc/PID/ns/net, ...)."""
    if os.path.dirname(os.path.normpath(path)) == NETNS_RUN_DIR:
        return os.path.basename(path)
    return None


def path_for(ep: Endpoint, etc_netns: str = ETC_NETNS) -> str | None:
    name = netns_name(ep.netns)
    return os.path.join(etc_netns, name, "resolv.conf") if name else None


def content(ep: Endpoint) -> str:
    return (f"{MARKER} for endpoint {ep.name} (network {ep.network}); removed with it.\n"
            f"# Its node's DNS responder: names of network {ep.network}, and the rest forwarded. See docs/DNS.md.\n"
            f"nameserver {GATEWAY_IP}\n")


def _ours(path: str) -> bool:
    try:
        with open(path) as f:
            return f.readline().startswith(MARKER)
    except OSError:
        return False


def write(ep: Endpoint, etc_netns: str = ETC_NETNS) -> bool:
    """Write the endpoint's resolv.conf. Returns whether it did (False: a /proc netns, or
    a file of someone else's that we leave alone). Atomic: a reader sees the old file or
    the new one. XoError if it cannot be written."""
    path = path_for(ep, etc_netns)
    if path is None:
        return False
    if os.path.exists(path) and not _ours(path):
        log.warning("endpoint %s: %s exists and is not ours: left as it is", ep.name, path)
        return False
    tmp = path + ".xoverlay-tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            f.write(content(ep))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise XoError(f"endpoint {ep.name}: cannot write {path}: {e.strerror}") from None
    return True


def remove(ep: Endpoint, etc_netns: str = ETC_NETNS) -> None:
    """Remove the file if it is ours, and its directory if that is then empty."""
    path = path_for(ep, etc_netns)
    if path is None or not _ours(path):
        return
    os.unlink(path)
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass        # not empty: other files of the user's
