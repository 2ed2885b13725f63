"""The east-west paths between two VMs of the VM lab (`xoverlay lab up --vms --nodes 2`,
xoverlay/lab/vm_lab.py): the same four as on veths, all in the same two guests, across
the same wire (each guest's virtio-net eth1, a tap on the lab's switch).

  plain           /32 routes over eth1, containers of 10.201/16 (as topologies.PlainRouting)
  kernel-vxlan    a vxlan device on eth1 + a bridge, 10.202.0/24 (as topologies.KernelVxlan),
                  on UDP port 4790: xoverlay's decap on eth1 judges only its own port
                  (4789; bpf/lib/vxlan.h: another port is not VXLAN to it) and passes it
  xoverlay-noxdp  the lab's endpoints node1-a -> node2-a, the agents started with
                  --no-xdp: the data path of the default `--xdp auto` on virtio-net
  xoverlay-xdp    the same, with the pinned prog_underlay_xdp attached natively on both
                  guests' eth1 for its tests only (entered and left around them, checked)
  xoverlay-nogro  (not by default: a diagnostic) the default path with xo-gro, the
                  node's tunnel socket, down in both guests for its tests only: without
                  it GRO has no VXLAN handler and each segment is decapsulated alone

One lab for all four, so the paths share the guests, their CPUs and the wire; a path's
commands run in the guests through the lab's control channel (Guest). The guests share
this machine's root filesystem, so iperf3, sockperf, the venv and the checkout are at the
same paths there. Everything lives in the lab's guests, and `lab down` removes it all."""
from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import subprocess
import time

from bench.lib.shell import STATE_ROOT, BenchError, Host, log, sh
from bench.lib.topologies import CONTAINER_MTU, GW_IP, Path, xoverlay_cmd
from xoverlay.kernel.gateway import TUNNEL_DEV

VM_STATE = os.path.join(STATE_ROOT, "vms", "state.db")
KERNEL_VXLAN_PORT = 4790
UNDERLAY = "eth1"
LAB_UP_SECONDS = 1800            # two nodes under TCG take ~5 minutes; the lab's own limit is 600 s a boot
XDP_PROG = "xo_underlay_xdp"     # the name the kernel gives prog_underlay_xdp (its C function)


class GuestProcess:
    """A command started in a guest (detached, through the control channel), its output
    and exit status in files of the directory the guest shares with the host: Popen's
    communicate, poll, terminate, kill and wait."""
    _serial = itertools.count()

    def __init__(self, guest: Guest, argv: list[str]):
        from xoverlay.lab.vm_lab import GUEST_DIR
        self.guest, self.args, self.returncode = guest, argv, None
        tag = f"xbench-{os.getpid()}-{next(self._serial)}"
        self.files = {k: os.path.join(guest.host_dir, f"{tag}.{k}") for k in ("out", "err", "rc")}
        there = {k: os.path.join(GUEST_DIR, f"{tag}.{k}") for k in ("out", "err", "rc")}
        script = (f"{shlex.join(argv)} >{there['out']} 2>{there['err']}; "
                  f"echo $? >{there['rc']}.tmp; mv {there['rc']}.tmp {there['rc']}")
        rc, out, err = guest.lab_run(["sh", "-c", script], timeout=60, detach=True)
        if rc != 0:
            raise BenchError(f"{guest.node}: could not start {' '.join(argv)}: {err.strip()[-300:]}")
        self.pid = int(out.split()[0])       # sh's, the leader of the session it runs in

    def poll(self) -> int | None:
        if self.returncode is None and os.path.exists(self.files["rc"]):
            with open(self.files["rc"]) as f:
                self.returncode = int(f.read().strip() or -1)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        out = []
        for k in ("out", "err"):
            try:
                with open(self.files[k], errors="replace") as f:
                    out.append(f.read())
            except FileNotFoundError:
                out.append("")
        for path in self.files.values():
            if os.path.exists(path):
                os.unlink(path)
        return out[0], out[1]

    def terminate(self) -> None:
        """SIGTERM to the command (sh's children): sh still writes its exit status."""
        self._in_guest(["pkill", "-TERM", "-P", str(self.pid)])

    def kill(self) -> None:
        """SIGKILL to its whole session; it counts as ended (also if the guest is gone)."""
        self._in_guest(["kill", "-KILL", "--", f"-{self.pid}"])
        if self.returncode is None:
            self.returncode = -9

    def _in_guest(self, argv: list[str]) -> None:
        try:
            self.guest.run(argv, timeout=30)
        except BenchError:
            pass                # the guest is gone, and the command with it


class Guest(Host):
    """A node of the VM lab as a machine to run commands on: its guest's root netns,
    reached through the lab's control channel (VmLab.run)."""
    patience = 3.0           # under TCG a command starts in ~0.1-0.5 s and Python in seconds

    def __init__(self, cluster: VmCluster, node: str):
        self.cluster, self.node, self.name = cluster, node, node

    @property
    def host_dir(self) -> str:
        """The directory this guest shares with the host, as the host sees it."""
        return self.cluster.lab.vm_dir(self.node)

    def lab_run(self, argv: list[str], timeout: float, detach: bool = False) -> tuple[int, str, str]:
        from xoverlay.errors import XoError
        try:
            rc, out, err = self.cluster.lab.run(self.node, argv, check=False, timeout=timeout, detach=detach)
        except XoError as e:
            raise BenchError(f"{self.node}: {e}") from None
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def run(self, argv: list[str], timeout: float = 60) -> tuple[int, str, str]:
        return self.lab_run(argv, timeout)

    def start(self, argv: list[str], limit: float) -> GuestProcess:
        return GuestProcess(self, ["timeout", "-s", "KILL", f"{limit:g}", *argv])

    def serve(self, argv: list[str]) -> GuestProcess:
        return GuestProcess(self, argv)

    def script(self, lines: list[str], timeout: float = 120) -> str:
        """Shell lines run in order, the first failure an error."""
        rc, out, err = self.run(["sh", "-ec", "\n".join(lines)], timeout=timeout)
        if rc != 0:
            raise BenchError(f"{self.node}: `{' '.join(lines)[:200]}...` failed ({rc}): {(err or out).strip()[-300:]}")
        return out


class VmCluster:
    """The one 2-node VM lab every VM path runs on, with a state store of its own under
    STATE_ROOT (so its names, x<hash>-node1..., never meet the user's lab). Its agents run
    with --no-xdp: on virtio-net the default `--xdp auto` attaches no XDP either (checked:
    xoverlay.kernel.datapath.choose_xdp), and the forced-XDP path attaches it itself."""

    def __init__(self, kernel: str):
        self.kernel_spec = kernel
        self.state = VM_STATE
        self.lab = None
        self.guests: list[Guest] = []
        self.endpoints: dict[str, dict] = {}
        self.info: dict = {}

    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return sh(*xoverlay_cmd(), "--state", self.state, *args, timeout=timeout, check=check)

    def node_ip(self, i: int) -> str:
        return self.lab.node_ip(i)

    def up(self) -> None:
        """The lab booted and its agents running, once for all paths."""
        if self.lab is not None:
            return
        from xoverlay.kernel.datapath import choose_xdp
        from xoverlay.lab.vm_lab import VmLab, accelerator
        lab = VmLab(None, self.state, self.kernel_spec)     # run() in a node needs no store
        # `lab down` removes the whole of /run/xoverlay/vm, every VM lab's directories
        # (tokens, logs) with ours: never while another VM lab is up.
        vm_root = os.path.dirname(lab.vm_dir("x"))
        others = sorted(d for d in (os.listdir(vm_root) if os.path.isdir(vm_root) else [])
                        if not d.startswith(lab.prefix))
        if others:
            raise BenchError(f"another VM lab is up ({', '.join(others)} in {vm_root}): its `lab down` and ours "
                             "would remove each other's VM directories; wait until it is down")
        os.makedirs(os.path.dirname(self.state), exist_ok=True)
        log(f"booting the VM lab: 2 nodes, kernel {self.kernel_spec}, {accelerator().upper()} "
            "(under TCG ~5 minutes)")
        started = time.monotonic()
        self.cli("lab", "up", "--vms", "--nodes", "2", "--no-xdp", "--kernel", self.kernel_spec,
                 timeout=LAB_UP_SECONDS)
        self.lab = lab
        nodes = lab.nodes()
        self.guests = [Guest(self, n) for n in nodes]
        self.endpoints = {e["name"]: e for e in json.loads(self.cli("endpoint", "ls", "--json"))}
        registry = lab._load()
        guest_kernels, drivers = [], []
        for g in self.guests:
            guest_kernels.append(g.script(["uname -r"]).strip())
            drivers.append(g.script([f"ethtool -i {UNDERLAY} | sed -n 's/^driver: //p'"]).strip())
        for node, driver in zip(nodes, drivers):
            attach, why = choose_xdp("auto", driver)
            if driver != "virtio_net" or attach:
                raise BenchError(f"{node}'s {UNDERLAY} is {driver!r}, and `--xdp auto` says: {why}; the VM bench "
                                 "measures virtio-net, where the default attaches no XDP")
        self.info = {"accelerator": registry.get("accel", accelerator()), "kernel_image": registry.get("kernel"),
                     "guest_kernel": guest_kernels[0], "nodes": nodes, "underlay_driver": drivers[0],
                     "default_xdp": choose_xdp("auto", drivers[0])[1], "state": self.state,
                     "lab_up_s": round(time.monotonic() - started, 1)}
        log(f"VM lab up in {self.info['lab_up_s']:.0f} s: {', '.join(nodes)} on {guest_kernels[0]}, "
            f"{UNDERLAY} {drivers[0]}, {self.info['accelerator'].upper()}")

    def down(self) -> None:
        """The lab down (its VMs, and all that was built in them), its store removed; if
        `lab down` fails the store stays, for the next run to find the VMs by."""
        self.lab = None
        if os.path.exists(os.path.dirname(self.state)):
            self.cli("lab", "down", timeout=300)
            shutil.rmtree(os.path.dirname(self.state), ignore_errors=True)

    def leftovers(self) -> list[str]:
        if not os.path.exists(os.path.dirname(self.state)):
            return []
        self.down()
        return [f"VM lab {self.state}"]

    # --- the agents and the data path in the guests ---------------------------------

    def _agents(self, signal_name: str) -> None:
        from xoverlay.kernel.processes import pid_path
        for g in self.guests:
            g.script([f"kill -{signal_name} $(cat {pid_path(g.node)})"])

    def pause_agents(self) -> None:
        """SIGSTOP the guests' agents (as on veths: their resync would take CPU from the
        tests, and nothing then undoes the forced-XDP path's attachment)."""
        self._agents("STOP")

    def resume_agents(self) -> None:
        if self.lab is not None:
            try:
                self._agents("CONT")
            except BenchError as e:
                log(f"resuming the VM lab's agents: {e}")

    def xdp(self, g: Guest) -> tuple[str, str | None]:
        """(XDP mode on the guest's eth1, the attached program's name)."""
        link = json.loads(g.script([f"ip -d -j link show {UNDERLAY}"]))[0]
        xdp = link.get("xdp", {})
        return {1: "native", 2: "generic", 3: "offload"}.get(xdp.get("mode"), "off"), xdp.get("prog", {}).get("name")

    def counters(self) -> dict:
        """The data path's drop counters in each guest (xo_drops), by node and reason."""
        code = ("import json, sys; from xoverlay.kernel.counters import drop_counts; "
                "from xoverlay.maps.drops import REASONS; "
                "print(json.dumps({(REASONS[c].name if c in REASONS else str(c)): p "
                "for c, (p, _) in drop_counts(sys.argv[1]).items()}))")
        from xoverlay.lab.namespace_lab import REPO
        out = {}
        for g in self.guests:
            got = json.loads(g.script([f"cd {REPO}", shlex.join([_python(), "-c", code, g.node])], timeout=300))
            out.update({f"{g.node} drop {name}": packets for name, packets in got.items()})
        return out


def _python() -> str:
    import sys
    return sys.executable


class _VmPath(Path):
    """A path in the cluster's two guests: client on the first, server on the second."""

    def __init__(self, key: str, label: str, cluster: VmCluster):
        super().__init__(key, label)
        self.cluster = cluster

    def up(self) -> None:
        self.cluster.up()
        self.client_at, self.server_at = self.cluster.guests

    def down(self) -> None:
        self.cluster.down()          # what the path built goes with the guests

    def leftovers(self) -> list[str]:
        return self.cluster.leftovers()


def _ns_lines(ns: str) -> list[str]:
    """A netns in a guest, as shell.ns_add makes one on the host."""
    return [f"ip netns add {ns}",
            f"ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
            f"ip -n {ns} link set lo up"]


def _veth_lines(ns: str, host_if: str, host_mac: str, ctr_mac: str) -> list[str]:
    return [(f"ip link add {host_if} address {host_mac} mtu {CONTAINER_MTU} type veth peer name eth0 "
             f"address {ctr_mac} mtu {CONTAINER_MTU} netns {ns}"),
            f"ip link set {host_if} up", f"ip -n {ns} link set eth0 up"]


class VmPlainRouting(_VmPath):
    """topologies.PlainRouting in the guests: /32 routes over eth1, 10.201.i.2."""

    def __init__(self, cluster: VmCluster):
        super().__init__("plain", "plain routing, no overlay (the ceiling)", cluster)

    @staticmethod
    def _ctr_ip(i: int) -> str:
        return f"10.201.{i}.2"

    def up(self) -> None:
        super().up()
        for i, g in enumerate(self.cluster.guests, start=1):
            ns, other = f"xbench-plain-c{i}", 3 - i
            host_mac, ctr_mac = f"02:b1:00:00:0{i}:01", f"02:b1:00:00:0{i}:02"
            g.script(_ns_lines(ns) + ["sysctl -qw net.ipv4.ip_forward=1"] +
                     _veth_lines(ns, "xbplain", host_mac, ctr_mac) +
                     [f"ip route add {self._ctr_ip(i)}/32 dev xbplain",
                      f"ip neigh replace {self._ctr_ip(i)} lladdr {ctr_mac} dev xbplain nud permanent",
                      f"ip route add {self._ctr_ip(other)}/32 via {self.cluster.node_ip(other)} dev {UNDERLAY}",
                      f"ip -n {ns} addr add {self._ctr_ip(i)}/32 dev eth0",
                      f"ip -n {ns} neigh replace {GW_IP} lladdr {host_mac} dev eth0 nud permanent",
                      f"ip -n {ns} route add default via {GW_IP} dev eth0 onlink"])
        self.client, self.server = "/run/netns/xbench-plain-c1", "/run/netns/xbench-plain-c2"
        self.server_ip = self._ctr_ip(2)
        self.info = {"underlay": f"{UNDERLAY} (virtio-net)", "containers": [self._ctr_ip(1), self._ctr_ip(2)],
                     "mtu": CONTAINER_MTU}


class VmKernelVxlan(_VmPath):
    """topologies.KernelVxlan in the guests, on UDP port KERNEL_VXLAN_PORT. The guests'
    br_netfilter is a module nobody loads (6.1), so this bridge, unlike the veth bench's,
    sends no frame through iptables: the baseline is, if anything, cheaper than Docker's."""
    VNI = 42

    def __init__(self, cluster: VmCluster):
        super().__init__("kernel-vxlan", "kernel vxlan device + bridge, static fdb/neigh (Docker, Flannel)", cluster)

    @staticmethod
    def _ctr(i: int) -> tuple[str, str]:
        return f"10.202.0.{i}", f"02:b2:00:00:00:0{i}"

    def up(self) -> None:
        super().up()
        for i, g in enumerate(self.cluster.guests, start=1):
            ns, other = f"xbench-vxlan-c{i}", 3 - i
            ip, mac = self._ctr(i)
            oip, omac = self._ctr(other)
            g.script(_ns_lines(ns) +
                     [(f"ip link add xbvx0 type vxlan id {self.VNI} dstport {KERNEL_VXLAN_PORT} "
                       f"local {self.cluster.node_ip(i)} dev {UNDERLAY} nolearning"),
                      "ip link add xbbr0 type bridge", "ip link set xbvx0 master xbbr0",
                      "ip link set xbbr0 up", "ip link set xbvx0 up"] +
                     _veth_lines(ns, "xbvxc", f"02:b2:00:00:0{i}:ff", mac) +
                     ["ip link set xbvxc master xbbr0", f"ip link set xbbr0 mtu {CONTAINER_MTU}",
                      f"bridge fdb append {omac} dev xbvx0 dst {self.cluster.node_ip(other)} self permanent",
                      f"bridge fdb replace {omac} dev xbvx0 master static",
                      f"ip -n {ns} addr add {ip}/24 dev eth0",
                      f"ip -n {ns} neigh replace {oip} lladdr {omac} dev eth0 nud permanent"])
        self.client, self.server = "/run/netns/xbench-vxlan-c1", "/run/netns/xbench-vxlan-c2"
        self.server_ip = self._ctr(2)[0]
        self.info = {"underlay": f"{UNDERLAY} (virtio-net)", "containers": [self._ctr(1)[0], self._ctr(2)[0]],
                     "vni": self.VNI, "udp_port": KERNEL_VXLAN_PORT, "mtu": CONTAINER_MTU}


class VmXoverlay(_VmPath):
    """The VM lab's own data path, client node1-a, server node2-a. With xdp, the pinned
    XDP filter is attached natively on both guests' eth1 while this path is measured, and
    taken off after (exclusive: every path crosses those NICs); either way the state of
    eth1 is checked before each path's tests."""

    def __init__(self, cluster: VmCluster, xdp: bool, counts_drops: bool):
        key = "xoverlay-xdp" if xdp else "xoverlay-noxdp"
        label = ("xoverlay, XDP filter forced on eth1 (--xdp)" if xdp
                 else "xoverlay default (--xdp auto: tc only on virtio-net)")
        super().__init__(key, label, cluster)
        self.xdp, self.counts_drops = xdp, counts_drops
        self.exclusive = xdp

    def up(self) -> None:
        super().up()
        nodes = self.cluster.info["nodes"]
        client, server = self.cluster.endpoints[f"{nodes[0]}-a"], self.cluster.endpoints[f"{nodes[1]}-a"]
        self.client, self.server, self.server_ip = client["netns"], server["netns"], server["ip"]
        self.info = {"client": f"{client['name']} {client['ip']}", "server": f"{server['name']} {server['ip']}",
                     "agents": "--no-xdp", "default_xdp": self.cluster.info["default_xdp"],
                     "underlay_xdp": "native, for this path's tests" if self.xdp else "off"}
        self._check("off")

    def _check(self, want: str) -> None:
        for g in self.cluster.guests:
            mode, prog = self.cluster.xdp(g)
            if mode != want or (want == "native" and prog != XDP_PROG):
                raise BenchError(f"{self.key}: XDP on {g.node}'s {UNDERLAY} is {mode} ({prog}), expected {want}")

    def enter(self) -> None:
        if self.xdp:
            from xoverlay.maps.layout import pin_dir
            for g in self.cluster.guests:
                g.script([f"ip link set dev {UNDERLAY} xdpdrv pinned {pin_dir(g.node)}/prog_underlay_xdp"])
            self._check("native")
            time.sleep(1)            # virtio-net resets its queues to attach: let the link settle
        else:
            self._check("off")
        self._check_gro()

    def _check_gro(self) -> None:
        """The guests' xo-gro up, with its socket: what the default path runs with."""
        for g in self.cluster.guests:
            if ",UP" not in g.script([f"ip -br link show {TUNNEL_DEV}"]).replace("<", ","):
                raise BenchError(f"{self.key}: {g.node} has no {TUNNEL_DEV} up (status says why)")

    def leave(self) -> None:
        if self.xdp:
            for g in self.cluster.guests:
                g.script([f"ip link set dev {UNDERLAY} xdpdrv off"])
            self._check("off")
            time.sleep(1)

    def pause_agents(self) -> None:
        self.cluster.pause_agents()

    def resume_agents(self) -> None:
        self.cluster.resume_agents()

    def counters(self) -> dict:
        return self.cluster.counters() if self.counts_drops else {}


class VmXoverlayNoGro(VmXoverlay):
    """The default path with xo-gro, the node's tunnel socket for GRO, down in both guests
    while this path is measured (the agents are stopped: nothing brings it back before
    leave() does): the receive side as it was without one, each 1,450-byte segment
    decapsulated on its own. A diagnostic of what the socket gives, not a way xoverlay
    runs. Exclusive: it changes what the default path's frames meet."""

    def __init__(self, cluster: VmCluster):
        super().__init__(cluster, xdp=False, counts_drops=False)
        self.key = "xoverlay-nogro"
        self.label = "xoverlay default with xo-gro down (no tunnel socket, no GRO for VXLAN; diagnostic)"
        self.exclusive = True

    def up(self) -> None:
        super().up()
        self.info["tunnel_socket"] = f"{TUNNEL_DEV} down for this path's tests"

    def enter(self) -> None:
        super().enter()
        for g in self.cluster.guests:
            g.script([f"ip link set {TUNNEL_DEV} down"])

    def leave(self) -> None:
        for g in self.cluster.guests:
            g.script([f"ip link set {TUNNEL_DEV} up"])
        self._check_gro()


def vm_paths(kernel: str) -> list[Path]:
    """The paths on one VM lab booting `kernel` (debian12, running or a path). The
    xoverlay paths share its counters: the default path reports them."""
    cluster = VmCluster(kernel)
    return [VmPlainRouting(cluster), VmKernelVxlan(cluster), VmXoverlay(cluster, xdp=False, counts_drops=True),
            VmXoverlay(cluster, xdp=True, counts_drops=False), VmXoverlayNoGro(cluster)]
