"""`xoverlay down`: a node taken down, everything `up` made for it (agent, veths, the
gateway, xo-gro, programs, pins) and its place in the store."""
from __future__ import annotations

import contextlib
import os

from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.kernel import datapath, gateway, netns, processes, veth
from xoverlay.kernel.pinned import PinnedMap
from xoverlay.maps.layout import MAPS, U32, pin_dir


def _pinned_underlay(node: str) -> int | None:
    try:
        with PinnedMap(pin_dir(node), MAPS["xo_config"]) as cfg:
            value = cfg.get(U32(0))
            return value.underlay_ifindex if value else None
    except OSError:
        return None


def node_down(store, node: str, netns_path: str | None = None) -> None:
    """Everything `up` made for `node`, removed. Runs in the node's netns (entered when
    `netns_path` is given). Safe to repeat, and after a crash."""
    state = store.read()
    known = node in state.nodes or os.path.isdir(pin_dir(node)) or processes.running_pid(node)
    if not known:
        raise XoError(f"node {node} does not exist")
    processes.stop_agent(node)
    with (netns.entered(netns_path) if netns_path else contextlib.nullcontext()):
        with netns.iproute() as ipr:
            for ep in state.endpoints.values():
                if ep.node == node:
                    veth.remove_endpoint(ipr, ep)
            for ifname in veth.our_veths(ipr):
                veth.unplumb(ipr, ifname)
            veth.remove_headroom_bridge(ipr)
            gateway.remove_gateway(ipr)
            gateway.remove_tunnel_device(ipr)
            gateway.remove_loopback()
            ifindex = _pinned_underlay(node)
            if ifindex:
                datapath.detach_underlay(ifindex)
    datapath.unpin(node)
    if node in state.nodes:
        store.update(lambda s: model.remove_node(s, node) if node in s.nodes else s)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(processes.pid_path(node))
