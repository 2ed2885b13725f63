"""The namespace lab: the one-machine twin of vagrant/. Nodes are network namespaces
joined by a bridge (in a namespace of its own) that plays the underlay; each runs a
detached agent, exactly as a real node would, and all share this machine's store.

Names are per store, so a test lab (its own store) never meets the user's lab: the default
store's lab has nodes node1..N; another store's gets a prefix made from its path."""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time

from . import agent, model, netns, teardown
from .errors import XoError
from .store import DEFAULT_STATE, default_path

UNDERLAY_NET = ipaddress.IPv4Network("192.0.2.0/24")   # TEST-NET-1: never a real network
UNDERLAY_DEV = "eth1"
DEMO_NETWORK = "demo"
DEMO_SUBNET = "10.10.0.0/16"
READY_SECONDS = 20


SWITCH_NO_NETFILTER = ("net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0",
                       "net.bridge.bridge-nf-call-arptables=0")


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise XoError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")


class Lab:
    def __init__(self, store, state_path: str | None):
        self.store = store
        self.state_path = os.path.abspath(state_path or default_path())
        if self.state_path == DEFAULT_STATE:
            self.prefix = ""
        else:
            self.prefix = "x" + hashlib.sha1(self.state_path.encode()).hexdigest()[:4] + "-"
        self.registry = self.state_path + ".lab.json"

    # --- names --------------------------------------------------------------------------

    def node_name(self, i: int) -> str:
        return f"{self.prefix}node{i}"

    def node_netns(self, node: str) -> str:
        return f"xo-{node}"

    @property
    def underlay_netns(self) -> str:
        return f"xo-{self.prefix}underlay"

    def node_ip(self, i: int) -> str:
        return str(UNDERLAY_NET.network_address + 10 + i)

    def endpoint_names(self, node: str) -> list[str]:
        return [f"{node}-a", f"{node}-b"]

    def _load(self) -> dict:
        try:
            with open(self.registry) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"nodes": []}

    def _save(self, data: dict) -> None:
        with open(self.registry, "w") as f:
            json.dump(data, f, indent=2)

    def nodes(self) -> list[str]:
        return self._load()["nodes"]

    def netns_of(self, name: str) -> str:
        """The netns path of a lab node or of any endpoint."""
        if name in self.nodes():
            return netns.resolve(self.node_netns(name))
        ep = self.store.read().endpoints.get(name)
        if ep:
            return ep.netns
        if name in ("underlay",):
            return netns.resolve(self.underlay_netns)
        raise XoError(f"{name} is neither a lab node nor an endpoint")

    # --- up -----------------------------------------------------------------------------

    def up(self, count: int, xdp: bool = True, echo=print) -> None:
        data = self._load()
        self._underlay()
        nodes = [self.node_name(i) for i in range(1, count + 1)]
        data["nodes"] = sorted(set(data["nodes"]) | set(nodes), key=lambda n: int(n.rsplit("node", 1)[1]))
        self._save(data)
        for i, node in enumerate(nodes, start=1):
            self._node(i, node)
            self._agent(node, xdp, echo)
        state = self.store.read()
        if DEMO_NETWORK not in state.networks:
            self.store.update(lambda s: model.create_network(s, DEMO_NETWORK, DEMO_SUBNET))
        for node in nodes:
            for ep in self.endpoint_names(node):
                if ep not in self.store.read().endpoints:
                    path = netns.resolve(ep)
                    if os.path.exists(path):
                        netns.remove(path)      # left from a crashed lab
                    self.store.update(lambda s, ep=ep, node=node:
                                      model.add_endpoint(s, ep, DEMO_NETWORK, node, path, True))
        wanted = [ep for node in nodes for ep in self.endpoint_names(node)]
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            eps = self.store.read().endpoints
            if all(eps[e].ready for e in wanted):
                break
            time.sleep(0.1)
        else:
            raise XoError("lab endpoints did not become ready: see /run/xoverlay/*.log")
        eps = self.store.read().endpoints
        echo(f"lab up: {len(nodes)} nodes on {UNDERLAY_NET}, network {DEMO_NETWORK} ({DEMO_SUBNET}), endpoints "
             + ", ".join(f"{e}={eps[e].ip}" for e in wanted))

    def _underlay(self) -> None:
        ns = self.underlay_netns
        if os.path.exists(netns.resolve(ns)):
            return
        _run("ip", "netns", "add", ns)
        self._quiet(ns)
        # A physical switch runs no firewall: bridged frames skip iptables here. (This
        # kernel has br_netfilter built in and on in every new netns.)
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", *SWITCH_NO_NETFILTER)
        _run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", ns, "link", "set", "br0", "up")

    def _quiet(self, ns: str) -> None:
        """No IPv6 noise in the lab: the drop counters should count only what we send."""
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1")

    def _node(self, i: int, node: str) -> None:
        ns = self.node_netns(node)
        if os.path.exists(netns.resolve(ns)):
            return
        _run("ip", "netns", "add", ns)
        self._quiet(ns)
        port = f"p{i}"
        _run("ip", "-n", self.underlay_netns, "link", "add", port, "type", "veth", "peer", "name", UNDERLAY_DEV,
             "netns", ns)
        _run("ip", "-n", self.underlay_netns, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.node_ip(i)}/{UNDERLAY_NET.prefixlen}", "dev", UNDERLAY_DEV)
        _run("ip", "-n", ns, "link", "set", UNDERLAY_DEV, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def _agent(self, node: str, xdp: bool, echo) -> None:
        from .agent import running_pid
        if running_pid(node):
            return
        cmd = ["nsenter", f"--net={netns.resolve(self.node_netns(node))}", "--",
               sys.executable, "-m", "ctl.cli", "--state", self.state_path, "up", "--node", node,
               "--underlay", UNDERLAY_DEV, "--detach", "--xdp" if xdp else "--no-xdp"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise XoError(f"starting the agent of {node} failed: {r.stderr.strip() or r.stdout.strip()}")

    # --- down ---------------------------------------------------------------------------

    def down(self, echo=print) -> None:
        nodes = set(self.nodes())
        # After a crash the registry may be gone: find our namespaces by name too.
        for name in os.listdir(netns.NETNS_RUN_DIR) if os.path.isdir(netns.NETNS_RUN_DIR) else []:
            if name.startswith(f"xo-{self.prefix}node") and name[len(f"xo-{self.prefix}node"):].isdigit():
                nodes.add(name[3:])
        for node in sorted(nodes):
            path = netns.resolve(self.node_netns(node))
            try:
                teardown.node_down(self.store, node, path if os.path.exists(path) else None)
            except XoError:
                pass
            netns.remove(path)
            for leftover in (agent.log_path(node), agent.pid_path(node)):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        netns.remove(self.underlay_netns)
        state = self.store.read()
        if DEMO_NETWORK in state.networks and not any(e.network == DEMO_NETWORK for e in state.endpoints.values()):
            self.store.update(lambda s: model.remove_network(s, DEMO_NETWORK) if DEMO_NETWORK in s.networks else s)
        if os.path.exists(self.registry):
            os.unlink(self.registry)
        echo(f"lab down: removed {len(nodes)} nodes")
