"""The namespace lab: the one-machine twin of vagrant/. Nodes are network namespaces
joined by a bridge (in a namespace of its own) that plays the underlay; each runs a
detached agent, exactly as a real node would, and all share this machine's store.

Names are per store, so a test lab (its own store) never meets the user's lab: the default
store's lab has nodes node1..N; another store's gets a prefix made from its path.

The lab also deploys the demo service `web` (a backend endpoint NODE-web on every node,
served by one supervised xoverlay/lab/demo_server.py process, published on port 8080 of every node)
and an outside `client` namespace on the underlay bridge, for the routing mesh."""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time

from xoverlay.agent.down import node_down
from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.kernel import netns, processes
from xoverlay.lab.docker_lab import IMAGE, NodeDocker
from xoverlay.store import etcd_server, open_store
from xoverlay.store.base import DEFAULT_STATE, LAB_SUFFIX, default_path, is_etcd
from xoverlay.store.memory import MemoryStore

UNDERLAY_NET = ipaddress.IPv4Network("192.0.2.0/24")   # TEST-NET-1: never a real network
UNDERLAY_DEV = "eth1"
DEMO_NETWORK = "demo"
DEMO_SUBNET = "10.10.0.0/16"
READY_SECONDS = 20
WEB_SERVICE = "web"
WEB_PORTS = ("80/tcp", "80/udp")     # the demo server answers HTTP and UDP on 80
WEB_PUBLISH = "8080:80"
DEMO_SERVER = "xoverlay.lab.demo_server"   # its module: how its processes are found
CLIENT_HOST = 200                    # the outside client: 192.0.2.200 (tests use .250 for a DNS upstream)
# `lab up --store etcd`: Debian's etcd runs in the switch's netns, on 192.0.2.1 of the
# underlay (where a real cluster's etcd would be: a machine of the underlay), and on a
# private /30 to the host from RFC 2544's benchmarking range, one per lab (the host's CLI:
# the host cannot use underlay addresses, and several labs must not share a route).
ETCD_HOST = str(UNDERLAY_NET.network_address + 1)
# The switch's own address (etcd's, above). A bridge left to itself takes the lowest MAC
# of its ports and changes it when that port goes: the nodes' ARP entries for etcd then
# point at no one until they age out (measured: a restarted agent's first etcd read timed
# out after a test's port on the switch was removed). Set once, it stays.
SWITCH_MAC = "02:00:c0:00:02:01"     # locally administered; 192.0.2.1
ETCD_PORT = 2379
HOST_LINK_NET = ipaddress.IPv4Network("198.18.0.0/15")


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # python -m from here
BR_NETFILTER_SYSCTL = "/proc/sys/net/bridge/bridge-nf-call-iptables"
SWITCH_NO_NETFILTER = ("net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0",
                       "net.bridge.bridge-nf-call-arptables=0")


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise XoError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")


class Lab:
    ready_seconds = READY_SECONDS       # for every endpoint to be plumbed, from `lab up`

    def __init__(self, store, state_path: str | None):
        self.store = store
        spec = state_path or default_path()
        self.state_path = spec if is_etcd(spec) else os.path.abspath(spec)
        digest = hashlib.sha1(self.state_path.encode()).hexdigest()
        if self.state_path == DEFAULT_STATE:
            self.prefix = ""
        else:
            self.prefix = "x" + digest[:4] + "-"
        self.registry = (os.path.join(processes.RUN_DIR, f"lab-{digest[:8]}.json") if is_etcd(spec)
                         else self.state_path + LAB_SUFFIX)
        link = int(digest[4:8], 16) % (HOST_LINK_NET.num_addresses // 4)
        self.link_net = ipaddress.IPv4Network((int(HOST_LINK_NET.network_address) + 4 * link, 30))

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

    def web_endpoint(self, node: str) -> str:
        """The node's backend of the demo service."""
        return f"{node}-web"

    @property
    def client_netns(self) -> str:
        return f"xo-{self.prefix}client"

    @property
    def client_ip(self) -> str:
        return str(UNDERLAY_NET.network_address + CLIENT_HOST)

    @property
    def demo_tag(self) -> str:
        """Marks the demo server's command line: how `down` finds it after a crash."""
        return f"{self.prefix}lab-web"

    @property
    def demo_pidfile(self) -> str:
        return os.path.join(processes.RUN_DIR, f"{self.demo_tag}.pid")

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
        if name == "client":
            return netns.resolve(self.client_netns)
        raise XoError(f"{name} is neither a lab node nor an endpoint")

    def command_in(self, name: str) -> list[str]:
        """The prefix that runs a command in a lab node, an endpoint, the client or the
        underlay. An endpoint with a named netns is entered with `ip netns exec`, which
        also gives it its /etc/netns/NAME/resolv.conf (the node's DNS responder)."""
        path = self.netns_of(name)
        if name not in self.nodes() and name not in ("client", "underlay") and \
                os.path.dirname(path) == netns.NETNS_RUN_DIR:
            return ["ip", "netns", "exec", os.path.basename(path)]
        return ["nsenter", f"--net={path}", "--"]

    def run(self, name: str, argv: list[str], *, check: bool = True, timeout: float | None = 120,
            capture: bool = True, tty: bool = False) -> tuple[int, bytes, bytes]:
        """Run argv in a lab node, an endpoint, the client or the underlay: (status,
        stdout, stderr), or with capture=False the output on ours."""
        r = subprocess.run([*self.command_in(name), *argv], capture_output=capture, timeout=timeout)
        if check and r.returncode != 0:
            raise XoError(f"`{' '.join(argv)}` in {name} failed ({r.returncode}): "
                          f"{(r.stderr or b'').decode().strip()[-300:]}")
        return r.returncode, r.stdout or b"", r.stderr or b""

    # --- up -----------------------------------------------------------------------------

    def up(self, count: int, xdp: bool | None = None, echo=print, store: str | None = None,
           docker: bool = False) -> None:
        """`store`: "sqlite" (the store file) or "etcd" (a real etcd for the lab); None:
        what the lab already runs on, SQLite for a new one. `xdp`: forced on or off; None:
        on for this lab (its tests are of XDP's paths too), the nodes' own default
        (`--xdp auto`) on the VM lab."""
        data = self._load()
        running = "etcd" if data.get("etcd") else ("sqlite" if data["nodes"] else None)
        if store and running and store != running:
            raise XoError(f"the lab is up on {running}: `xoverlay lab down` first, then `lab up --store {store}`")
        if is_etcd(self.state_path):
            raise XoError("the lab starts its own etcd (`xoverlay lab up --store etcd`, with --state a file "
                          "path or the default): its namespaces could not reach another one")
        self._underlay()
        if (store or running) == "etcd":
            data["etcd"] = self._etcd(data.get("etcd"))
            self._save(data)
            self.store = open_store(data["etcd"]["url"])
        nodes = [self.node_name(i) for i in range(1, count + 1)]
        data["nodes"] = sorted(set(data["nodes"]) | set(nodes), key=lambda n: int(n.rsplit("node", 1)[1]))
        if docker and not data.get("docker") and any(processes.running_pid(n) for n in nodes):
            raise XoError("the lab is up without Docker: `xoverlay lab down` first, then `lab up --docker`")
        data["docker"] = bool(docker or data.get("docker"))
        self._save(data)
        node_store = data["etcd"]["node_url"] if data.get("etcd") else self.state_path
        self._nodes(nodes, self._xdp(xdp), echo, node_store)
        state = self.store.read()
        if DEMO_NETWORK not in state.networks:
            self.store.update(lambda s: model.create_network(s, DEMO_NETWORK, DEMO_SUBNET))
        for node in nodes:
            for ep in self.endpoint_names(node) + [self.web_endpoint(node)]:
                if ep not in self.store.read().endpoints:
                    path = netns.resolve(ep)
                    if os.path.exists(path):
                        netns.remove(path)      # left from a crashed lab
                    self.store.update(lambda s, ep=ep, node=node:
                                      model.add_endpoint(s, ep, DEMO_NETWORK, node, path, True))
        wanted = [ep for node in nodes for ep in self.endpoint_names(node) + [self.web_endpoint(node)]]
        deadline = time.monotonic() + self.ready_seconds
        while time.monotonic() < deadline:
            eps = self.store.read().endpoints
            if all(eps[e].ready for e in wanted):
                break
            time.sleep(0.1)
        else:
            raise XoError("lab endpoints did not become ready: see /run/xoverlay/*.log")
        self._client()
        if data["docker"]:
            for node in nodes:
                d = NodeDocker(self, node)
                d.start()
                d.image()
        webs = [self.web_endpoint(n) for n in self.nodes()]
        self._web_service(webs)
        self._demo_server(webs)
        state = self.store.read()
        eps = state.endpoints
        web = state.services[WEB_SERVICE]
        echo(f"lab up: {len(nodes)} nodes on {UNDERLAY_NET}, network {DEMO_NETWORK} ({DEMO_SUBNET}), endpoints "
             + ", ".join(f"{e}={eps[e].ip}" for e in wanted))
        echo(f"service {WEB_SERVICE}: {web.vip} {' '.join(web.ports)}, backends {', '.join(webs)}, published on "
             f"port {WEB_PUBLISH.split(':')[0]} of every node; outside client: netns {self.client_netns} "
             f"({self.client_ip})")
        etcd = self._load().get("etcd")
        echo(f"store: etcd {etcd['node_url']} for the nodes, {etcd['url']} from this host (the CLI follows it "
             "with the lab's --state until `lab down`)" if etcd else f"store: {self.state_path} (SQLite)")
        if data["docker"]:
            echo(f"Docker: a dockerd in every node with image {IMAGE}; `xoverlay lab docker {nodes[0]} -- ps` "
                 "runs the docker CLI against one")

    # --- the lab's etcd -----------------------------------------------------------------

    @property
    def etcd_data(self) -> str:
        return self.state_path + ".etcd"

    @property
    def etcd_url(self) -> str:
        """Where the host reaches the lab's etcd: the switch's end of the lab's /30."""
        return f"etcd://{self.link_net[2]}:{ETCD_PORT}"

    @property
    def store_link(self) -> str:
        return f"xo-{self.prefix}st"

    def _etcd(self, known: dict | None) -> dict:
        """Start Debian's etcd in the switch's netns: kept if it runs, restarted on its
        data if it stopped (`lab up` after an outage), new otherwise."""
        if known and self._etcd_pids():
            return known
        host_ip, switch_ip = str(self.link_net[1]), str(self.link_net[2])
        ns = self.underlay_netns
        if not os.path.exists(f"/sys/class/net/{self.store_link}"):
            taken = subprocess.run(["ip", "-4", "-o", "addr", "show", "to", str(self.link_net)],
                                   capture_output=True, text=True).stdout.strip()
            if taken:
                raise XoError(f"{self.link_net}, the lab's link to its etcd, is already used here: {taken[:120]}")
            _run("ip", "link", "add", self.store_link, "type", "veth", "peer", "name", "st", "netns", ns)
            _run("ip", "addr", "add", f"{host_ip}/30", "dev", self.store_link)
            _run("ip", "link", "set", self.store_link, "up")
            _run("ip", "-n", ns, "addr", "add", f"{switch_ip}/30", "dev", "st")
            _run("ip", "-n", ns, "link", "set", "st", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{ETCD_HOST}/{UNDERLAY_NET.prefixlen}", "dev", "br0")
        os.makedirs(self.etcd_data, mode=0o700, exist_ok=True)
        cmd = etcd_server.command(f"{self.prefix}lab".strip("-") or "lab", self.etcd_data,
                                  [f"http://{ETCD_HOST}:{ETCD_PORT}", f"http://{switch_ip}:{ETCD_PORT}"],
                                  "http://127.0.0.1:2380", advertise=f"http://{ETCD_HOST}:{ETCD_PORT}")
        proc = etcd_server.start(cmd, self.etcd_data + ".log", switch_ip, ETCD_PORT,
                                 netns_path=netns.resolve(ns))
        return {"url": self.etcd_url, "node_url": f"etcd://{ETCD_HOST}:{ETCD_PORT}", "pid": proc.pid}

    def _etcd_pids(self) -> list[int]:
        """Our etcd, found by its data dir (also after a crash)."""
        return processes.pids_with(["etcd", f"--data-dir={self.etcd_data}"])

    def _stop_etcd(self) -> None:
        """Our etcd, its data, its host link."""
        for pid in self._etcd_pids():
            etcd_server.stop(pid)
        import shutil
        shutil.rmtree(self.etcd_data, ignore_errors=True)
        if os.path.exists(self.etcd_data + ".log"):
            os.unlink(self.etcd_data + ".log")
        if os.path.exists(f"/sys/class/net/{self.store_link}"):
            _run("ip", "link", "del", self.store_link)

    # --- the demo service and the outside client ----------------------------------------

    # Run inside a netns: GET http://HOST/ N times, a new connection each, one line per answer.
    _GET = ("import sys, urllib.request\n"
            "for _ in range(int(sys.argv[2])):\n"
            "    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode().strip(), flush=True)\n")

    def web_requests(self, endpoint: str, count: int = 6) -> tuple[str, list[str]]:
        """`count` requests from `endpoint` to http://web/: by name if the endpoint's
        resolver knows it (`ip netns exec` gives it /etc/netns/NAME/resolv.conf), else by
        the VIP. Returns (the URL used, the answers)."""
        state = self.store.read()
        ep = state.endpoints[endpoint]
        vip = state.services[WEB_SERVICE].vip
        name = os.path.basename(ep.netns)
        url = f"http://{vip}/"
        if os.path.exists(f"/etc/netns/{name}/resolv.conf"):     # a node DNS responder is set up
            try:
                named = subprocess.run(["ip", "netns", "exec", name, "getent", "ahostsv4", WEB_SERVICE],
                                       capture_output=True, text=True, timeout=3)
                if named.returncode == 0 and named.stdout.split()[:1] == [vip]:
                    url = f"http://{WEB_SERVICE}/"
            except subprocess.TimeoutExpired:
                pass
        r = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", self._GET, url, str(count)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise XoError(f"requests from {endpoint} to {url} failed: {r.stderr.strip().splitlines()[-1:]}")
        return url, r.stdout.split("\n")[:-1]

    def mesh_request(self, node: str) -> tuple[str, str]:
        """One request from the outside client to NODE's underlay IP:published port."""
        url = f"http://{self.store.read().nodes[node].underlay_ip}:{WEB_PUBLISH.split(':')[0]}/"
        r = subprocess.run(["nsenter", f"--net={netns.resolve(self.client_netns)}", "--", sys.executable, "-c",
                            self._GET, url, "1"], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise XoError(f"the outside client's request to {url} failed: {r.stderr.strip().splitlines()[-1:]}")
        return url, r.stdout.strip()

    def _web_service(self, backends: list[str]) -> None:
        def ensure(s):
            svc = s.services.get(WEB_SERVICE)
            if svc is None:
                return model.create_service(s, WEB_SERVICE, DEMO_NETWORK, list(WEB_PORTS), backends,
                                            publish=[WEB_PUBLISH])
            missing = [b for b in backends if not (svc.backend(b) and not svc.backend(b).draining)]
            return model.update_service(s, WEB_SERVICE, add=missing) if missing else s
        self.store.update(ensure)

    def _demo_server(self, backends: list[str]) -> None:
        """One supervised process serving every web backend (in each one's netns). Kept if
        it runs and serves exactly these endpoints' current namespaces; else replaced."""
        eps = self.store.read().endpoints
        specs = [f"{b}={eps[b].netns}" for b in backends]
        want = {"specs": specs, "netns": [processes.inode(eps[b].netns) for b in backends]}
        data = self._load()
        pid = processes.pid_in_file(self.demo_pidfile, DEMO_SERVER)
        if pid and data.get("demo") == want:
            return
        self._stop_demo_server()
        os.makedirs(processes.RUN_DIR, exist_ok=True)
        read_fd, write_fd = os.pipe()
        log = os.path.join(processes.RUN_DIR, f"{self.demo_tag}.log")
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", DEMO_SERVER, "--supervise", f"--ready-fd={write_fd}",
                 f"--tag={self.demo_tag}", "--http=80", "--udp=80", "--echo=9000", *specs],
                cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=logf, stderr=logf, pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            answer = r.readline().strip()
        if answer != "ok":
            proc.kill()
            raise XoError(f"the demo server did not start: {answer or 'no answer'} (see {log})")
        processes.write_pidfile(self.demo_pidfile, proc.pid)
        data = self._load()
        data["demo"] = want
        self._save(data)

    def _stop_demo_server(self) -> None:
        """The supervisor by its pid file, then anything left with our tag (a crash)."""
        pids = [p for p in (processes.pid_in_file(self.demo_pidfile, DEMO_SERVER),) if p]
        pids += [p for p in processes.pids_with([DEMO_SERVER, f"--tag={self.demo_tag}"]) if p not in pids]
        processes.terminate_all(pids, 5.0)
        for leftover in (self.demo_pidfile, os.path.join(processes.RUN_DIR, f"{self.demo_tag}.log")):
            if os.path.exists(leftover):
                os.unlink(leftover)

    def _client(self) -> None:
        """An outside host on the underlay: its own netns, a port of the bridge, an
        address of the underlay range. Its checksums are finished (tx offload off), as a
        frame that crossed a real wire has them: between veths a TCP/UDP checksum may stay
        partial, which XDP cannot see."""
        ns = self.client_netns
        if os.path.exists(netns.resolve(ns)):
            return
        _run("ip", "netns", "add", ns)
        self._quiet(ns)
        _run("ip", "-n", self.underlay_netns, "link", "add", "pc", "type", "veth", "peer", "name", "eth0",
             "netns", ns)
        _run("ip", "-n", self.underlay_netns, "link", "set", "pc", "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.client_ip}/{UNDERLAY_NET.prefixlen}", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off")

    def _underlay(self) -> None:
        ns = self.underlay_netns
        if os.path.exists(netns.resolve(ns)):
            return
        _run("ip", "netns", "add", ns)
        self._quiet(ns)
        # A physical switch runs no firewall: bridged frames skip iptables here. Only
        # br_netfilter sends them there, and only where it is built in or loaded (a
        # module on Debian's kernel, which we do not load: it would reach every bridge).
        if os.path.exists(BR_NETFILTER_SYSCTL):
            _run("ip", "netns", "exec", ns, "sysctl", "-qw", *SWITCH_NO_NETFILTER)
        _run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", ns, "link", "set", "br0", "address", SWITCH_MAC, "up")

    def _quiet(self, ns: str) -> None:
        """No IPv6 noise in the lab: the drop counters should count only what we send."""
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1")

    @staticmethod
    def _xdp(xdp: bool | None) -> bool | None:
        return True if xdp is None else xdp

    def _nodes(self, nodes: list[str], xdp: bool, echo, store: str) -> None:
        """Each node made (kept if it is there) and its agent running."""
        for i, node in enumerate(nodes, start=1):
            self._node(i, node, xdp)
            self._agent(node, xdp, echo, store)

    def _node(self, i: int, node: str, xdp: bool) -> None:
        ns = self.node_netns(node)
        if os.path.exists(netns.resolve(ns)):
            return
        _run("ip", "netns", "add", ns)
        self._quiet(ns)
        port = f"p{i}"
        _run("ip", "-n", self.underlay_netns, "link", "add", port, "type", "veth", "peer", "name", UNDERLAY_DEV,
             "netns", ns)
        _run("ip", "-n", self.underlay_netns, "link", "set", port, "master", "br0", "up")
        # XDP_TX on the node's end (the routing mesh) sends into this one: a veth takes XDP
        # frames only with an XDP program of its own (measured: GRO's NAPI is not enough
        # for XDP_TX). A switch port of a real NIC needs nothing. Only
        # with XDP: the program turns TSO off on the node's eth1 (veth), and a --no-xdp lab
        # serves the mesh in tc, without XDP_TX.
        if xdp:
            _xdp_pass(netns.resolve(self.underlay_netns), port)
        _run("ip", "-n", ns, "addr", "add", f"{self.node_ip(i)}/{UNDERLAY_NET.prefixlen}", "dev", UNDERLAY_DEV)
        _run("ip", "-n", ns, "link", "set", UNDERLAY_DEV, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        # As on a Docker host: the underlay forwards. The data path's FIB lookups (the next
        # hop of tunnel packets, in tc and in XDP) answer only then (docs/DESIGN.md).
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.conf.{UNDERLAY_DEV}.forwarding=1")

    def _agent(self, node: str, xdp: bool, echo, store: str) -> None:
        from xoverlay.kernel.processes import running_pid
        if running_pid(node):
            return
        cmd = ["nsenter", f"--net={netns.resolve(self.node_netns(node))}", "--",
               sys.executable, "-m", "xoverlay", "--store", store, "up", "--node", node,
               "--underlay", UNDERLAY_DEV, "--detach", "--xdp" if xdp else "--no-xdp"]
        if self._load().get("docker"):
            d = NodeDocker(self, node)
            cmd += ["--docker-plugin", d.plugin_socket, "--docker-host", d.host]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise XoError(f"starting the agent of {node} failed: {r.stderr.strip() or r.stdout.strip()}")

    # --- down ---------------------------------------------------------------------------

    def down(self, echo=print) -> None:
        etcd = self._load().get("etcd") or os.path.isdir(self.etcd_data)
        if etcd:
            if not self._load().get("etcd"):      # a crash took the registry: etcd is still where it was
                self.store = open_store(self.etcd_url)
            try:
                self.store.read()
            except XoError:          # the lab's etcd is gone: its data goes too; the kernel's still
                self.store = MemoryStore()
        try:
            self._down(echo)
        finally:
            if etcd:
                self._stop_etcd()

    def _down(self, echo) -> None:
        self._stop_demo_server()
        for node in self.nodes():
            NodeDocker(self, node).stop()      # its containers' endpoints leave through the plugin
        state = self.store.read()
        if WEB_SERVICE in state.services and state.services[WEB_SERVICE].network == DEMO_NETWORK:
            self.store.update(lambda s: model.remove_service(s, WEB_SERVICE) if WEB_SERVICE in s.services else s)
        netns.remove(self.client_netns)
        nodes = set(self.nodes())
        # After a crash the registry may be gone: find our namespaces by name too.
        for name in os.listdir(netns.NETNS_RUN_DIR) if os.path.isdir(netns.NETNS_RUN_DIR) else []:
            if name.startswith(f"xo-{self.prefix}node") and name[len(f"xo-{self.prefix}node"):].isdigit():
                nodes.add(name[3:])
        for node in sorted(nodes):
            path = netns.resolve(self.node_netns(node))
            try:
                node_down(self.store, node, path if os.path.exists(path) else None)
            except XoError:
                pass
            netns.remove(path)
            for leftover in (processes.log_path(node), processes.pid_path(node)):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        netns.remove(self.underlay_netns)
        state = self.store.read()
        if DEMO_NETWORK in state.networks and not any(e.network == DEMO_NETWORK for e in state.endpoints.values()):
            self.store.update(lambda s: model.remove_network(s, DEMO_NETWORK) if DEMO_NETWORK in s.networks else s)
        if os.path.exists(self.registry):
            os.unlink(self.registry)
        echo(f"lab down: removed {len(nodes)} nodes")


# --- the switch's XDP_PASS --------------------------------------------------------------

# r0 = XDP_PASS; exit
_XDP_PASS_INSNS = bytes.fromhex("b700000002000000" "9500000000000000")


def _xdp_pass(ns_path: str, dev: str) -> None:
    """Attach a program that passes everything, natively, to `dev` (it stays attached
    when our fd closes, and goes with the device)."""
    import socket

    from xoverlay.kernel import bpf
    with netns.entered(ns_path):
        fd = bpf.prog_load(bpf.BPF_PROG_TYPE_XDP, "xo_lab_pass", _XDP_PASS_INSNS)
        try:
            bpf.xdp_attach(socket.if_nametoindex(dev), fd, bpf.XDP_FLAGS_DRV_MODE)
        finally:
            os.close(fd)
