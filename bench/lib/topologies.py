"""The east-west paths, each a way of carrying container traffic from a client on node 1
to a server on node 2, built on namespaces and always removed again: plain routing (the
ceiling), the kernel's vxlan device with a bridge (Docker, Flannel), and the xoverlay lab
with and without XDP. Every path has the same underlay (a switch netns, veths) and
containers behind veths with MTU CONTAINER_MTU."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field

from bench.lib.shell import (
    BPF_NODE,
    HOST,
    PREFIX,
    STATE_ROOT,
    BenchError,
    Host,
    ip_batch,
    log,
    ns_add,
    ns_del_prefix,
    ns_path,
    proc_cpu_seconds,
    sh,
)

CONTAINER_MTU = 1450                     # underlay 1500 less VXLAN's 50, on every path
GW_IP = "169.254.1.1"                    # the containers' next hop on the routed paths


@dataclass
class Path:
    """One way of carrying container traffic from a client on node 1 to a server on node
    2. up() builds it, down() removes all of it (also after a failed or partial up())."""
    key: str
    label: str
    client: str = ""          # netns path of the client container
    server: str = ""          # netns path of the server container
    server_ip: str = ""
    info: dict = field(default_factory=dict)
    client_at: Host = HOST    # the machine each netns is on (a VM lab's guest: vm_paths)
    server_at: Host = HOST
    # Its tests change what the other paths cross too (XDP on a NIC they share): it is
    # measured between enter() and leave(), alone, and interleaved only with itself.
    exclusive = False

    def up(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def enter(self) -> None:
        """Before this path's tests of a round (and its own interleaved rate)."""

    def leave(self) -> None:
        """After them, also when they failed."""

    def leftovers(self) -> list[str]:
        """What an interrupted run left of this path, removed: what it was."""
        return []

    def counters(self) -> dict:
        """Counters whose change over the measurements says something went wrong."""
        return {}


class _Underlay:
    """Nodes joined by veths to a bridge in a netns of its own: the switch. Built the way
    xoverlay/lab/namespace_lab.py builds the xoverlay lab's underlay, so that every path crosses the same
    devices."""

    def __init__(self, tag: str, net: str):
        self.tag = tag
        self.net = net                       # e.g. "198.51.100" (a /24)
        self.switch = f"{PREFIX}{tag}-ul"

    def node_ns(self, i: int) -> str:
        return f"{PREFIX}{self.tag}-n{i}"

    def node_ip(self, i: int) -> str:
        return f"{self.net}.{10 + i}"

    def build(self, nodes: int) -> None:
        from xoverlay.lab.namespace_lab import SWITCH_NO_NETFILTER
        ns_add(self.switch)
        # Like the lab's switch: no iptables on bridged frames, as on a physical switch.
        sh("ip", "netns", "exec", self.switch, "sysctl", "-qw", *SWITCH_NO_NETFILTER)
        ip_batch(self.switch, ["link add br0 type bridge", "link set br0 up"])
        for i in range(1, nodes + 1):
            ns = self.node_ns(i)
            ns_add(ns)
            ip_batch(self.switch, [f"link add p{i} type veth peer name eth1 netns {ns}",
                                   f"link set p{i} master br0 up"])
            ip_batch(ns, [f"addr add {self.node_ip(i)}/24 dev eth1", "link set eth1 up"])

    def remove(self) -> None:
        ns_del_prefix(f"{PREFIX}{self.tag}-")


def _veth_to_container(node: str, container: str, host_if: str, host_mac: str, ctr_mac: str) -> None:
    ip_batch(node, [f"link add {host_if} address {host_mac} mtu {CONTAINER_MTU} type veth peer name eth0 "
                    f"address {ctr_mac} mtu {CONTAINER_MTU} netns {container}",
                    f"link set {host_if} up"])
    ip_batch(container, ["link set eth0 up"])


class PlainRouting(Path):
    """No overlay: containers with /32 addresses routed by the nodes (Calico without
    IPIP). Container: default route via 169.254.1.1 onlink, a permanent neighbour entry
    for it with the host-side veth's MAC. Node: a /32 route per local container, a /32
    route per remote container via the other node's underlay address."""

    def __init__(self):
        super().__init__("plain", "plain routing, no overlay (the ceiling)")
        self.u = _Underlay("plain", "198.51.100")

    def _ctr_ip(self, i: int) -> str:
        return f"10.201.{i}.2"

    def up(self) -> None:
        self.u.build(2)
        for i in (1, 2):
            node, ctr = self.u.node_ns(i), f"{PREFIX}plain-c{i}"
            ns_add(ctr)
            host_mac, ctr_mac = f"02:b1:00:00:0{i}:01", f"02:b1:00:00:0{i}:02"
            sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _veth_to_container(node, ctr, "ctr", host_mac, ctr_mac)
            other = 3 - i
            ip_batch(node, [f"route add {self._ctr_ip(i)}/32 dev ctr",
                            f"neigh replace {self._ctr_ip(i)} lladdr {ctr_mac} dev ctr nud permanent",
                            f"route add {self._ctr_ip(other)}/32 via {self.u.node_ip(other)} dev eth1"])
            ip_batch(ctr, [f"addr add {self._ctr_ip(i)}/32 dev eth0",
                           f"neigh replace {GW_IP} lladdr {host_mac} dev eth0 nud permanent",
                           f"route add default via {GW_IP} dev eth0 onlink"])
        self.client, self.server = ns_path(f"{PREFIX}plain-c1"), ns_path(f"{PREFIX}plain-c2")
        self.server_ip = self._ctr_ip(2)
        self.info = {"underlay": f"{self.u.net}.0/24", "containers": [self._ctr_ip(1), self._ctr_ip(2)],
                     "mtu": CONTAINER_MTU}

    def down(self) -> None:
        self.u.remove()


class KernelVxlan(Path):
    """The kernel's vxlan device, as Docker's overlay driver (and Flannel's vxlan backend)
    use it: per node a bridge with the vxlan device and the containers' veths as ports,
    learning off, static entries: the remote container's MAC in the vxlan fdb (-> its
    node) and in the bridge fdb, its address in the container's neighbour table."""
    VNI = 42

    def __init__(self):
        super().__init__("kernel-vxlan", "kernel vxlan device + bridge, static fdb/neigh (Docker, Flannel)")
        self.u = _Underlay("vxlan", "203.0.113")

    @staticmethod
    def _ctr(i: int) -> tuple[str, str]:
        return f"10.202.0.{i}", f"02:b2:00:00:00:0{i}"

    def up(self) -> None:
        self.u.build(2)
        for i in (1, 2):
            node, ctr = self.u.node_ns(i), f"{PREFIX}vxlan-c{i}"
            ns_add(ctr)
            ip, mac = self._ctr(i)
            other = 3 - i
            oip, omac = self._ctr(other)
            ip_batch(node, [
                f"link add vx0 type vxlan id {self.VNI} dstport 4789 local {self.u.node_ip(i)} dev eth1 "
                "nolearning",
                "link add br0 type bridge",
                "link set vx0 master br0",
                "link set br0 up", "link set vx0 up"])
            _veth_to_container(node, ctr, "ctr", f"02:b2:00:00:0{i}:ff", mac)
            ip_batch(node, ["link set ctr master br0",
                            f"link set br0 mtu {CONTAINER_MTU}"])
            sh("bridge", "-n", node, "fdb", "append", omac, "dev", "vx0", "dst", self.u.node_ip(other),
               "self", "permanent")
            sh("bridge", "-n", node, "fdb", "replace", omac, "dev", "vx0", "master", "static")
            ip_batch(ctr, [f"addr add {ip}/24 dev eth0",
                           f"neigh replace {oip} lladdr {omac} dev eth0 nud permanent"])
        self.client, self.server = ns_path(f"{PREFIX}vxlan-c1"), ns_path(f"{PREFIX}vxlan-c2")
        self.server_ip = self._ctr(2)[0]
        self.info = {"underlay": f"{self.u.net}.0/24", "containers": [self._ctr(1)[0], self._ctr(2)[0]],
                     "vni": self.VNI, "mtu": CONTAINER_MTU}

    def down(self) -> None:
        self.u.remove()


def drops_by_reason(node: str) -> dict[str, int]:
    """Packets a lab node's data path dropped, by reason name (a code without a name by
    its number)."""
    from xoverlay.kernel.counters import drop_counts
    from xoverlay.maps.drops import REASONS
    return {(REASONS[code].name if code in REASONS else str(code)): packets
            for code, (packets, _bytes) in drop_counts(node).items()}


def agent_pids(nodes: list[str]) -> list[int]:
    """The running agents of these lab nodes."""
    from xoverlay.kernel.processes import running_pid
    return [p for p in (running_pid(node) for node in nodes) if p]


def signal_pids(pids: list[int], sig: int) -> None:
    """`sig` to each of pids; one that is gone meanwhile has nothing to stop or continue."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def xoverlay_cmd() -> list[str]:
    """The installed CLI next to this interpreter (the venv's), else the one on PATH."""
    mine = os.path.join(os.path.dirname(sys.executable), "xoverlay")
    if os.access(mine, os.X_OK):
        return [mine]
    found = shutil.which("xoverlay")
    if found:
        return [found]
    return [sys.executable, "-m", "xoverlay"]


class XoverlayLab(Path):
    """The real thing: `xoverlay lab up --nodes 2` with a state store of its own (so its
    names never meet the user's lab), client node1-a, server node2-a. Without XDP it is
    the data path `up` runs by default: `--xdp auto` attaches no XDP on a veth
    (xoverlay.kernel.datapath.choose_xdp)."""

    def __init__(self, xdp: bool):
        key = "xoverlay-xdp" if xdp else "xoverlay-noxdp"
        label = ("xoverlay, XDP filter forced on the underlay (--xdp)" if xdp
                 else "xoverlay default (--xdp auto: tc only on a veth)")
        super().__init__(key, label)
        self.xdp = xdp
        self.state = os.path.join(STATE_ROOT, key, "state.db")
        self.nodes: list[str] = []

    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return sh(*xoverlay_cmd(), "--state", self.state, *args, timeout=timeout, check=check)

    def up(self) -> None:
        os.makedirs(os.path.dirname(self.state), exist_ok=True)
        self.cli("lab", "up", "--nodes", "2", *([] if self.xdp else ["--no-xdp"]))
        eps = {e["name"]: e for e in json.loads(self.cli("endpoint", "ls", "--json"))}
        self.nodes = sorted({e["node"] for e in eps.values()}, key=lambda n: int(n.rsplit("node", 1)[1]))
        client, server = eps[f"{self.nodes[0]}-a"], eps[f"{self.nodes[1]}-a"]
        self.client, self.server, self.server_ip = client["netns"], server["netns"], server["ip"]
        links = json.loads(self.cli("lab", "exec", self.nodes[1], "--", "ip", "-d", "-j", "link", "show", "eth1"))
        xdp = links[0].get("xdp", {})
        mode = {1: "native", 2: "generic", 3: "offload"}.get(xdp.get("mode"), "off")
        self.info = {"state": self.state, "client": f"{client['name']} {client['ip']}",
                     "server": f"{server['name']} {server['ip']}", "underlay_xdp": mode,
                     "xdp_prog": xdp.get("prog", {}).get("name")}
        if (mode == "native") != self.xdp:
            raise BenchError(f"{self.key}: XDP on {self.nodes[1]}'s eth1 is {mode}, expected "
                             f"{'native' if self.xdp else 'off'}")

    def leftovers(self) -> list[str]:
        if not os.path.exists(self.state):
            return []
        self.down()
        return [f"lab {self.state}"]

    def counters(self) -> dict:
        return {f"{node} drop {name}": packets for node in self.nodes for name, packets in drops_by_reason(node).items()}

    def agent_pids(self) -> list[int]:
        return agent_pids(self.nodes)

    def pause_agents(self) -> None:
        """SIGSTOP the agents: the data path forwards without them (their periodic full
        resync costs CPU that the measurements would share, both nodes' agents on this
        machine's 2 CPUs). resume_agents() must follow, also on errors."""
        signal_pids(self.agent_pids(), signal.SIGSTOP)

    def resume_agents(self) -> None:
        signal_pids(self.agent_pids(), signal.SIGCONT)

    def agent_cpu(self) -> float:
        """CPU seconds the nodes' agents have used so far (utime + stime)."""
        total = 0.0
        for pid in self.agent_pids():
            try:
                total += proc_cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                pass
        return total

    def down(self) -> None:
        self.resume_agents()        # a stopped agent would never act on `lab down`'s SIGTERM
        if os.path.exists(self.state):
            self.cli("lab", "down", check=False)
        shutil.rmtree(os.path.dirname(self.state), ignore_errors=True)


def remove_state_root() -> None:
    try:
        os.rmdir(STATE_ROOT)         # only once every lab's directory is gone
    except OSError:
        pass


def all_paths() -> list[Path]:
    return [PlainRouting(), KernelVxlan(), XoverlayLab(xdp=False), XoverlayLab(xdp=True)]


def clean_leftovers(paths: list[Path]) -> list[str]:
    """What an interrupted earlier run may have left: our netns, labs and pins."""
    found = [what for p in paths for what in p.leftovers()]
    found += ns_del_prefix(PREFIX)
    remove_state_root()
    from xoverlay.kernel import datapath
    from xoverlay.maps.layout import pin_dir
    if os.path.isdir(pin_dir(BPF_NODE)):
        found.append(pin_dir(BPF_NODE))
        datapath.unpin(BPF_NODE)
    return found



def bring_up(paths: list[Path], make_servers, started: list) -> None:
    """Every path up, each with its servers (make_servers(path), started): appended to
    `started` as they start, so that take_down stops them after a failure too."""
    for p in paths:
        log(f"setting up {p.key}")
        p.up()
        s = make_servers(p)
        started.append(s)
        s.start()


def take_down(paths: list[Path], servers: list) -> None:
    """The servers stopped, the paths removed (the last first; one that fails does not
    keep the others), then whatever of ours is left."""
    for s in servers:
        s.stop()
    for p in reversed(paths):
        try:
            p.down()
        except Exception as e:     # go on: remove the rest
            log(f"removing {p.key} failed: {e}")
    ns_del_prefix(PREFIX)
    remove_state_root()
