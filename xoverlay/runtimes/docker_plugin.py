"""Docker's network driver and IPAM driver for xoverlay: libnetwork's remote plugin
protocol (JSON over HTTP on a unix socket Docker finds in /run/docker/plugins), served by
the node's agent (`xoverlay up --docker`).

What Docker asks, and what it becomes (docs/DOCKER.md):
  IpamDriver.RequestPool      the network's --subnet, checked against the cluster's networks
  NetworkDriver.CreateNetwork its options checked (-o mtu=, --internal); the network itself is
                              taken into the store when its name is known (Docker does not
                              say it: its API does, once the network exists)
  IpamDriver.RequestAddress   an address of this node's slices, held until the endpoint exists
  NetworkDriver.Join          the endpoint in the store, its veth pair made by the agent's
                              pass; Docker moves the container end in and names it ethN
  NetworkDriver.Leave         the endpoint removed, its veth with it, its address released
Docker's names for its containers become DNS aliases of their endpoints, read from its API
(it says them to no driver) by a thread that follows every Join and checks every second."""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, replace

from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.kernel import veth

log = logging.getLogger("xoverlay.docker")

DRIVER = "xoverlay"                  # docker network create -d xoverlay --ipam-driver xoverlay
ADDRESS_SPACE = "xoverlay"
ENDPOINT_PREFIX = "docker-"
GATEWAY_REQUEST = "com.docker.network.gateway"
GENERIC = "com.docker.network.generic"       # -o KEY=VALUE
INTERNAL = "com.docker.network.internal"     # --internal
MTU_KEYS = ("mtu", "com.docker.network.driver.mtu")
SYNC_SECONDS = 1.0


def endpoint_name(endpoint_id: str) -> str:
    """The store's name of a Docker endpoint: stable, found again from Docker's id alone
    (a restarted agent keeps no table)."""
    return ENDPOINT_PREFIX + endpoint_id[:12]


@dataclass(frozen=True)
class NetworkSpec:
    """What a Docker network asks of xoverlay."""
    subnet: str
    internal: bool = False
    mtu: int = 0


def parse_pool(pool: str) -> str:
    if not pool:
        raise XoError("give the network a --subnet: xoverlay's addresses are the cluster's, not one daemon's")
    try:
        return str(ipaddress.IPv4Network(pool, strict=True))
    except ValueError as e:
        raise XoError(f"subnet {pool!r} is not an IPv4 network: {e}") from None


def parse_options(options: dict) -> NetworkSpec:
    """CreateNetwork's Options: xoverlay takes -o mtu=N and --internal; any other -o is an
    error (a typo must not be ignored)."""
    generic = options.get(GENERIC) or {}
    mtu = 0
    for key, value in generic.items():
        if key in MTU_KEYS:
            try:
                mtu = int(value)
            except ValueError:
                raise XoError(f"-o {key}={value}: not a number") from None
            if not model.MTU_MIN <= mtu <= 65535:
                raise XoError(f"-o {key}={value}: use {model.MTU_MIN}..65535")
        elif key == "encrypted":
            raise XoError("-o encrypted: xoverlay has no encrypted networks yet")
        else:
            raise XoError(f"-o {key}: unknown option (xoverlay takes -o mtu=N)")
    return NetworkSpec("", bool(options.get(INTERNAL)), mtu)


def check_pool(state: model.State, subnet: str) -> str | None:
    """The store's network of exactly this subnet (None: there is none yet); XoError if
    the subnet overlaps another network's."""
    net = ipaddress.IPv4Network(subnet)
    for other in state.networks.values():
        if other.subnet == subnet:
            return other.name
        if net.overlaps(ipaddress.IPv4Network(other.subnet)):
            raise XoError(f"subnet {subnet} overlaps xoverlay network {other.name} ({other.subnet})")
    return None


def adopt_network(state: model.State, name: str, spec: NetworkSpec) -> tuple[model.State, str]:
    """The store's network for Docker's network `name`: the one of its subnet (made by
    `xoverlay network create`, or by `docker network create` on another node), else a new
    one named as in Docker. XoError when they cannot be the same network."""
    existing = check_pool(state, spec.subnet)
    if existing is None:
        if name in state.networks:
            raise XoError(f"xoverlay network {name} has subnet {state.networks[name].subnet}, not {spec.subnet}: "
                          f"create the Docker network with --subnet {state.networks[name].subnet}")
        return model.create_network(state, name, spec.subnet, internal=spec.internal, mtu=spec.mtu), name
    net = state.networks[existing]
    if net.internal != spec.internal:
        raise XoError(f"xoverlay network {existing} ({spec.subnet}) is {'' if net.internal else 'not '}--internal; "
                      f"the Docker network must be the same")
    if spec.mtu and net.mtu != spec.mtu:
        raise XoError(f"xoverlay network {existing} ({spec.subnet}) has MTU {net.mtu or 'of the cluster'}, "
                      f"not {spec.mtu}")
    return state, existing


def spec_of(docker_network: dict) -> NetworkSpec:
    """A Docker network as its API shows it."""
    configs = (docker_network.get("IPAM") or {}).get("Config") or []
    subnet = parse_pool(configs[0].get("Subnet", "") if configs else "")
    spec = parse_options({GENERIC: docker_network.get("Options") or {}})
    return replace(spec, subnet=subnet, internal=bool(docker_network.get("Internal")))


def join_answer(first_in_sandbox: bool, tmp_ifname: str) -> dict:
    """Docker moves `tmp_ifname` into the sandbox as ethN. The sandbox's first network
    gives it 169.254.1.1 as its gateway, reachable on the link (a connected route: no
    subnet holds that address); further networks add only their interface and subnet."""
    answer = {"InterfaceName": {"SrcName": tmp_ifname, "DstPrefix": "eth"}, "DisableGatewayService": True}
    if first_in_sandbox:
        answer["Gateway"] = model.GATEWAY_IP
        answer["StaticRoutes"] = [{"Destination": f"{model.GATEWAY_IP}/32", "RouteType": 1}]
    return answer


def aliases_for(container: dict, network_name: str) -> tuple:
    """A container's name and its aliases on the network, those that are valid names."""
    names = [container.get("Name", "").lstrip("/")]
    networks = (container.get("NetworkSettings") or {}).get("Networks") or {}
    names += (networks.get(network_name) or {}).get("Aliases") or []
    out = []
    for n in names:
        try:
            model.check_name("alias", n)
        except XoError:
            continue        # Docker's short container id starts with a digit now and then
        if n not in out:
            out.append(n)
    return tuple(out)


PLUMB_SECONDS = 10.0     # for the node's agent to plumb a joined endpoint, or remove a left one


class DockerPlugin:
    """The protocol's calls for one node. The plugin only changes the store; the node's
    agent plumbs and unplumbs on its next pass (within 50 ms of the change), and the
    calls that need it done wait for it. Docker calls from many threads: each has a
    store of its own (`open_store`), as SQLite's connections are per thread."""

    def __init__(self, node: str, open_store, docker):
        self.node = node
        self._open_store = open_store
        self._stores = threading.local()
        self.docker = docker
        self.held: dict[str, float] = {}           # addresses given out, no endpoint's yet
        self.created: dict[str, tuple[str, str]] = {}   # Docker endpoint id -> (network, ip)
        self.networks: dict[str, str] = {}         # Docker network id -> store network
        self.lock = threading.Lock()
        self.kick = threading.Event()
        self.stopping = False

    @property
    def store(self):
        if not hasattr(self._stores, "store"):
            self._stores.store = self._open_store()
        return self._stores.store

    def _wait_for(self, name: str, done) -> bool:
        """Until done(the endpoint or None) holds, or PLUMB_SECONDS pass."""
        deadline = time.monotonic() + PLUMB_SECONDS
        while time.monotonic() < deadline:
            if done(self.store.read().endpoints.get(name)):
                return True
            time.sleep(0.02)
        return False

    # --- the protocol -------------------------------------------------------------------

    def handle(self, call: str, body: dict) -> dict:
        handler = getattr(self, "_" + call.replace(".", "_"), None)
        if handler is None:
            raise KeyError(call)
        return handler(body) or {}

    def _Plugin_Activate(self, _):
        return {"Implements": ["NetworkDriver", "IpamDriver"]}

    def _NetworkDriver_GetCapabilities(self, _):
        # local: each daemon keeps its own record of the network; the store is the truth.
        return {"Scope": "local", "ConnectivityScope": "global"}

    def _IpamDriver_GetCapabilities(self, _):
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    def _IpamDriver_GetDefaultAddressSpaces(self, _):
        return {"LocalDefaultAddressSpace": ADDRESS_SPACE, "GlobalDefaultAddressSpace": ADDRESS_SPACE}

    def _IpamDriver_RequestPool(self, body):
        if body.get("V6"):
            raise XoError("xoverlay networks are IPv4 only: create the network without --ipv6")
        if body.get("SubPool"):
            raise XoError("--ip-range: xoverlay gives each node slices of the subnet; give no range")
        subnet = parse_pool(body.get("Pool", ""))
        check_pool(self.store.read(), subnet)
        return {"PoolID": subnet, "Pool": subnet, "Data": {}}

    def _IpamDriver_ReleasePool(self, _):
        return {}     # the subnet is the cluster's network's: `xoverlay network rm` frees it

    def _IpamDriver_RequestAddress(self, body):
        subnet = body.get("PoolID", "")
        wanted = body.get("Address") or None
        if (body.get("Options") or {}).get("RequestAddressType") == GATEWAY_REQUEST:
            if wanted and wanted != model.GATEWAY_IP:
                raise XoError(f"--gateway: every xoverlay network's gateway is {model.GATEWAY_IP}")
            return {"Address": f"{model.GATEWAY_IP}/32"}
        network = self._network_for_pool(subnet)
        prefix = ipaddress.IPv4Network(subnet).prefixlen
        with self.lock:
            if wanted:
                if wanted in self.held:
                    raise XoError(f"{wanted} is already given out")
                model.check_address(self.store.read(), network, wanted)
                ip = wanted
            else:
                box = {}

                def allocate(s):
                    s, box["ip"] = model.allocate_address(s, network, self.node, set(self.held))
                    return s
                self.store.update(allocate)
                ip = box["ip"]
            self.held[ip] = time.time()
        return {"Address": f"{ip}/{prefix}"}

    def _IpamDriver_ReleaseAddress(self, body):
        with self.lock:
            self.held.pop(body.get("Address", ""), None)
        return {}

    def _NetworkDriver_CreateNetwork(self, body):
        spec = parse_options(body.get("Options") or {})
        if body.get("IPv6Data"):
            raise XoError("xoverlay networks are IPv4 only")
        v4 = body.get("IPv4Data") or []
        if len(v4) != 1 or v4[0].get("AddressSpace") != ADDRESS_SPACE:
            raise XoError("an xoverlay network takes its addresses from xoverlay: "
                          "docker network create -d xoverlay --ipam-driver xoverlay --subnet ...")
        subnet = parse_pool(v4[0].get("Pool", ""))
        state = self.store.read()
        existing = check_pool(state, subnet)
        if existing:
            adopt_network(state, existing, replace(spec, subnet=subnet))
        # Its name comes with Docker's API once the network exists: the sync takes it in.
        self.kick.set()

    def _NetworkDriver_DeleteNetwork(self, body):
        self.networks.pop(body.get("NetworkID", ""), None)
        # The store's network stays: other nodes' containers may be in it.

    def _NetworkDriver_CreateEndpoint(self, body):
        iface = body.get("Interface") or {}
        if iface.get("MacAddress"):
            raise XoError("--mac-address: an xoverlay endpoint's MAC follows from its address")
        if iface.get("AddressIPv6"):
            raise XoError("xoverlay networks are IPv4 only")
        if not iface.get("Address"):
            raise XoError("no address: the network's IPAM driver must be xoverlay")
        network = self._network(body["NetworkID"])
        ip = iface["Address"].split("/")[0]
        self.created[body["EndpointID"]] = (network, ip)
        return {"Interface": {"MacAddress": model.mac_for(ip)}}

    def _NetworkDriver_EndpointOperInfo(self, body):
        ep = self.store.read().endpoints.get(endpoint_name(body.get("EndpointID", "")))
        return {"Value": {"endpoint": ep.name, "ip": ep.ip} if ep else {}}

    def _NetworkDriver_Join(self, body):
        eid, sandbox = body["EndpointID"], body["SandboxKey"]
        if eid not in self.created:
            raise XoError(f"endpoint {eid[:12]} was not created through this agent (restarted in between?)")
        network, ip = self.created[eid]
        name = endpoint_name(eid)

        def add(s):
            first = not any(e.netns == sandbox and model.endpoint_live(e) for e in s.endpoints.values())
            box["first"] = first
            return model.add_endpoint(s, name, network, self.node, sandbox, False, ip, ifname="")
        box = {}
        self.store.update(add)
        with self.lock:
            self.held.pop(ip, None)
        if not self._wait_for(name, lambda ep: ep is not None and ep.ready):
            self._remove(name)
            raise XoError(f"endpoint {name}: node {self.node}'s agent did not plumb it within "
                          f"{PLUMB_SECONDS:.0f} s (see its log)")
        first = box["first"]
        del self.created[eid]
        self.kick.set()
        return join_answer(first, veth.creating_ifname(veth.host_ifname(name)))

    def _NetworkDriver_Leave(self, body):
        self._remove(endpoint_name(body["EndpointID"]))

    def _NetworkDriver_DeleteEndpoint(self, body):
        created = self.created.pop(body["EndpointID"], None)
        if created:
            with self.lock:
                self.held.pop(created[1], None)
        self._remove(endpoint_name(body["EndpointID"]))

    def _NetworkDriver_DiscoverNew(self, _):
        return {}

    def _NetworkDriver_DiscoverDelete(self, _):
        return {}

    def _NetworkDriver_ProgramExternalConnectivity(self, body):
        if ((body.get("Options") or {}).get("com.docker.network.portmap")):
            raise XoError("-p: publish a port with `xoverlay service create --publish`, on every node")
        return {}

    def _NetworkDriver_RevokeExternalConnectivity(self, _):
        return {}

    # --- the store's side ---------------------------------------------------------------

    def _remove(self, name: str) -> None:
        """The endpoint, its veth and its address gone before Docker hears back (a
        tombstone the agent's pass ends)."""
        if name not in self.store.read().endpoints:
            return
        self.store.update(lambda s: model.mark_endpoint_removing(s, name) if name in s.endpoints else s)
        if not self._wait_for(name, lambda ep: ep is None):
            log.error("endpoint %s: node %s's agent has not removed it yet; it will", name, self.node)

    def _network(self, docker_id: str) -> str:
        """The store's network of a Docker network, taken into the store if need be."""
        if docker_id in self.networks and self.networks[docker_id] in self.store.read().networks:
            return self.networks[docker_id]
        found = self.docker.network(docker_id)
        if found is None:
            raise XoError(f"Docker has no network {docker_id[:12]}")
        spec = spec_of(found)
        box = {}

        def adopt(s):
            s, box["name"] = adopt_network(s, found["Name"], spec)
            return s
        self.store.update(adopt)
        if box["name"] not in self.networks.values():
            log.info("docker network %s (%s) is xoverlay network %s", found["Name"], spec.subnet, box["name"])
        self.networks[docker_id] = box["name"]
        return box["name"]

    def _network_for_pool(self, subnet: str) -> str:
        name = check_pool(self.store.read(), subnet)
        if name:
            return name
        for found in self.docker.networks(DRIVER):
            configs = (found.get("IPAM") or {}).get("Config") or []
            if configs and configs[0].get("Subnet") == subnet:
                return self._network(found["Id"])
        raise XoError(f"no Docker network of driver {DRIVER} has subnet {subnet}")

    # --- names, from Docker's API -------------------------------------------------------

    def sync(self) -> None:
        """Docker's networks of our driver in the store, and each of this node's Docker
        endpoints with its container's names as aliases."""
        aliases = {}
        for summary in self.docker.networks(DRIVER):
            try:
                network = self._network(summary["Id"])
            except XoError as e:
                log.error("docker network %s: %s", summary.get("Name"), e)
                continue
            found = self.docker.network(summary["Id"]) or {}
            for cid, c in (found.get("Containers") or {}).items():
                container = self.docker.container(cid)
                if container:
                    aliases[endpoint_name(c.get("EndpointID", ""))] = aliases_for(container, found["Name"])
        mine = {n: e for n, e in self.store.read().endpoints.items()
                if e.node == self.node and n.startswith(ENDPOINT_PREFIX)}
        changed = {n: a for n, a in aliases.items() if n in mine and mine[n].aliases != a}
        if changed:
            def set_aliases(s):
                for n, a in changed.items():
                    if n in s.endpoints:
                        s = s.with_("endpoint", n, replace(s.endpoints[n], aliases=a))
                return s
            self.store.update(set_aliases)
            for n, a in changed.items():
                log.info("endpoint %s: DNS names %s", n, ", ".join(a) or "none")

    def run_sync(self) -> None:
        problem = None
        while not self.stopping:
            self.kick.wait(SYNC_SECONDS)
            self.kick.clear()
            if self.stopping:
                break
            try:
                self.sync()
                problem = None
            except XoError as e:
                if str(e) != problem:       # once per cause: dockerd may start after us
                    log.error("docker: %s", e)
                problem = str(e)
            except Exception:
                log.exception("docker: sync failed")
