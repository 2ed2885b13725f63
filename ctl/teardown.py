"""Taking a node down: agent, veths, programs, pins, and its place in the store."""
from __future__ import annotations

import contextlib
import os
import signal
import time

from maps.layout import MAPS, PinnedMap, U32, pin_dir

from . import agent, datapath, links, model, netns
from .errors import XoError


def terminate(pid: int, gone, timeout: float) -> None:
    """SIGTERM, and SIGKILL if `gone()` is still false after `timeout` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.05)


def stop_agent(node: str, timeout: float = 5.0) -> None:
    pid = agent.running_pid(node)
    if pid:
        terminate(pid, lambda: agent.running_pid(node) is None, timeout)


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
    known = node in state.nodes or os.path.isdir(pin_dir(node)) or agent.running_pid(node)
    if not known:
        raise XoError(f"node {node} does not exist")
    stop_agent(node)
    with (netns.entered(netns_path) if netns_path else contextlib.nullcontext()):
        with netns.iproute() as ipr:
            for ep in state.endpoints.values():
                if ep.node == node:
                    links.remove_endpoint(ipr, ep)
            for ifname in links.our_veths(ipr):
                links.unplumb(ipr, ifname)
            links.remove_headroom_bridge(ipr)
            links.remove_gateway(ipr)
            ifindex = _pinned_underlay(node)
            if ifindex:
                datapath.detach_underlay(ifindex)
    datapath.unpin(node)
    if node in state.nodes:
        store.update(lambda s: model.remove_node(s, node) if node in s.nodes else s)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(agent.pid_path(node))
