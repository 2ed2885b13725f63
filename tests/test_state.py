"""The cluster state under random change.

Stateful property tests: hypothesis drives random sequences of network / endpoint /
service create, update and remove, valid and invalid, through the real SqliteStore and
the model functions the CLI calls. After every step: the store's invariants hold
(tests/invariants.py), a refused step raised one clear XoError and changed nothing (same
generation, same contents), and the agent's map pass (Agent.sync_maps, the code
`xoverlay up` runs) has made a real node's pinned BPF maps equal to what xoverlay/core/desired.py
computes from the store, which independent counts of the store confirm.

The node's maps are the real thing: BCC compiles the data path and pins its maps in a
throwaway pin directory, as `up` does. What is not run is plumbing: local endpoints get
made-up veth ifindexes (the maps only store the number), and other nodes' agents are
played by a rule that clears their tombstones.

Profiles: CI runs a fixed, derandomized campaign; XO_STATE_PROFILE=long runs a big one.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from collections import Counter

import pytest
from hypothesis import HealthCheck, seed, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from invariants import violations

from xoverlay.agent.loop import Agent, Underlay
from xoverlay.core import desired, model
from xoverlay.errors import XoError
from xoverlay.kernel import bpf, datapath
from xoverlay.kernel.maglev_maps import MaglevTables
from xoverlay.maps.layout import MAX_LOCAL_ENDPOINTS, MAX_PEERS, ip_be
from xoverlay.store.sqlite import SqliteStore
from xoverlay.ui import service_view

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="BPF maps need root")

PROFILES = {
    "ci": dict(max_examples=60, stateful_step_count=25, derandomize=True),    # with CI_SEED
    "long": dict(max_examples=int(os.environ.get("XO_STATE_EXAMPLES", "500")), stateful_step_count=50),
}
PROFILE = os.environ.get("XO_STATE_PROFILE", "ci")
# derandomize alone seeds hypothesis from the source of the state machine, so any edit of
# the class would draw another campaign; a seed of our own keeps CI's campaign the same.
CI_SEED = int(os.environ.get("XO_STATE_SEED", "0"))

ME, OTHERS = f"xostate{os.getpid()}", ("n2", "n3")    # ME: the node whose maps are pinned
UNDERLAY = {ME: "192.0.2.1", "n2": "192.0.2.2", "n3": "192.0.2.3"}
NETWORKS = ("red", "blue", "green", "gray")
ENDPOINTS = tuple(f"e{i}" for i in range(8))
SERVICES = ("s0", "s1", "s2")
NODES = (ME, *OTHERS, "ghost")

# Small networks in one /24, so that they overlap each other and run out of addresses.
def _subnet(prefix: int, index: int) -> str:
    size = 1 << (32 - prefix)
    return f"10.0.0.{(index * size) % 256}/{prefix}"


def mostly(good, bad, one_in: int = 8):
    """`good`, and `bad` about once in `one_in` draws (Hypothesis leans to small draws,
    so the first branch is the one it shrinks to)."""
    return st.integers(0, one_in - 1).flatmap(lambda i: bad if i == one_in - 1 else good)


def some(*values):
    return st.sampled_from(values)


_good_subnets = st.builds(_subnet, st.integers(26, 30), st.integers(0, 63))
subnets = mostly(_good_subnets, some("10.0.0.1/28", "169.254.0.0/16", "10.0.0.0/31", "10.0.0.0/33", "nonsense"))
addresses = mostly(st.integers(0, 255).map(lambda i: f"10.0.0.{i}"), st.just("10.0.0.300"))
port_lists = mostly(st.lists(some("80", "80/udp", "53/udp", "443/tcp"), min_size=1, max_size=3, unique=True),
                    some([], ["80", "80/tcp"], ["0"], ["x/sctp"], ["53/udp", "53/UDP"]))


OPS = {}     # step name -> (weight, precondition, argument strategies)


def op(weight: int, pre, **strategies):
    """A kind of step, drawn `weight` times as often as the rarest while `pre` holds.
    (Hypothesis' own rule choice favours rules with fewer arguments and disables some
    per example: here the mix is ours to set.)"""
    def register(fn):
        OPS[fn.__name__] = (weight, pre, strategies)
        return fn
    return register


class Counts:
    """What the CI run did, for docs/RELIABILITY.md (printed at the end)."""
    examples = steps = accepted = refused = kernel_checks = 0
    by_rule: Counter = Counter()


class StoreAndKernel(RuleBasedStateMachine):
    node = None          # set by the test: (name, Programs, maps) of the pinned node

    def __init__(self):
        super().__init__()
        Counts.examples += 1
        self.dir = tempfile.mkdtemp(prefix="xo-state-")
        self.store = SqliteStore(os.path.join(self.dir, "state.db"))
        name, progs, maps = self.node
        self.agent = Agent(name, "none", self.store, ipr=None, dns=False)
        self.agent.progs, self.agent.maps = progs, maps
        self.agent.tables = MaglevTables(maps[desired.MAGLEV])
        self.agent.underlay = Underlay("none", 7, UNDERLAY[ME], 1500)
        self.agent.gateway_ifindex = 9
        self.ifindexes: dict[str, int] = {}     # the made-up veths of local endpoints
        self.auto: set[str] = set()             # endpoints whose IP IPAM chose
        for node, ip in UNDERLAY.items():        # every node joins, as their agents do
            self.store.update(lambda s, node=node, ip=ip: model.join_node(s, node, ip))

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- one step: through the store, checked either way -----------------------------

    def step(self, rule: str, change, why: list[str], must_pass: bool = False):
        """Run `change` in the store. `why`: every reason the spec has to refuse it (the
        error must name one); none and `must_pass`: nothing may refuse it. A refusal
        changes nothing."""
        Counts.steps += 1
        gen, before = self.store.generation(), self.store.read()
        try:
            after = self.store.update(change)
        except XoError as e:
            Counts.refused += 1
            Counts.by_rule[f"{rule} refused"] += 1
            msg = str(e)
            if os.environ.get("XO_STATE_DEBUG"):
                print(f"{rule}: {msg}")
            assert msg and "\n" not in msg, f"{rule}: not a one-line error: {msg!r}"
            assert any(w in msg for w in why) or (why == [] and not must_pass), \
                f"{rule}: refused with {msg!r}, expected {why or 'success'}"
            assert self.store.generation() == gen, f"{rule}: refused step moved the generation"
            assert self.store.read() == before, f"{rule}: refused step changed the store"
            return None
        Counts.accepted += 1
        Counts.by_rule[f"{rule} accepted"] += 1
        assert not why, f"{rule}: invalid step accepted (should fail: {why})"
        assert after == self.store.read()
        assert self.store.generation() == gen + (after != before)
        return after

    def state(self):
        return self.store.read()

    # --- names: mostly ones that make sense, sometimes not ------------------------------

    def existing(self, data, kind: str, pool) -> str:
        """Mostly the name of an object that exists, else one of the pool that does not."""
        have = sorted(self.state().table(kind))
        missing = [n for n in pool if n not in have]
        if have and (not missing or data.draw(st.integers(0, 3), label=f"{kind} exists?") < 3):
            return data.draw(st.sampled_from(have), label=kind)
        return data.draw(st.sampled_from(missing or pool), label=kind)

    def fresh(self, data, kind: str, pool) -> str:
        """Mostly a name nothing has yet, else any name of the pool."""
        free = [n for n in pool if n not in self.state().table(kind)]
        if free and data.draw(st.integers(0, 5), label=f"{kind} new?") < 5:
            return data.draw(st.sampled_from(free), label=kind)
        return data.draw(st.sampled_from(pool), label=kind)

    def endpoint_names(self):
        have = sorted(self.state().endpoints)
        return st.sampled_from(have) if have and len(have) > 1 else st.sampled_from(ENDPOINTS)

    @staticmethod
    def room_for(s, net, node: str) -> bool:
        """Whether IPAM has an address for one more endpoint of `node`: a usable address
        no endpoint and no VIP holds, in a slice of the node or in one nobody has yet."""
        sub = ipaddress.IPv4Network(net.subnet)
        owner = {sl.subnet: sl.node for sl in s.slices.values() if sl.network == net.name}
        taken = {e.ip for e in s.endpoints.values()} | {v.vip for v in s.services.values()}
        for sl in sub.subnets(new_prefix=net.slice_prefix):
            if owner.get(str(sl), node) != node:
                continue
            for a in sl:
                edge = sl.prefixlen < 31 and a in (sl.network_address, sl.broadcast_address)
                if not edge and a not in (sub.network_address, sub.broadcast_address) and str(a) not in taken:
                    return True
        return False

    def backends(self, data, most: int, network: str, least: int = 0) -> list[str]:
        """Backend specs: mostly live endpoints of `network`, else any endpoint."""
        ours = sorted(e.name for e in self.state().endpoints.values() if e.network == network and not e.removing)
        names = mostly(st.sampled_from(ours), self.endpoint_names(), 6) if ours else self.endpoint_names()
        return data.draw(st.lists(st.builds(lambda name, port, weight: name + port + weight, names,
                                            mostly(st.just(""), st.just(":8080")),
                                            mostly(some("", "@3"), st.just("@0"))),
                                  min_size=least, max_size=most), label="backends")

    # --- the steps ---------------------------------------------------------------------
    # A step runs only where there is something for it to change (its precondition), but
    # the names it draws still point at nothing now and then. Each lists every reason the
    # spec gives for refusing it (the error must name one of them); with none, it must pass.

    @initialize(data=st.data(), networks=st.integers(1, 3))
    def create_networks(self, data, networks):
        """A few networks to start with."""
        for _ in range(networks):
            self.create_network(data, data.draw(_good_subnets, label="subnet"), None, 2)

    @op(2, lambda self: len(self.state().networks) < 3, subnet=subnets,
        vni=mostly(st.none(), some(1, 4096, 4097, 0, 1 << 24), 4), slice_delta=mostly(some(2, 1, 3, 4, 0), st.just(-1)))
    def create_network(self, data, subnet, vni, slice_delta):
        name = self.fresh(data, "network", NETWORKS)
        s = self.state()
        try:
            net = ipaddress.IPv4Network(subnet)       # strict: host bits set is invalid
            slice_prefix = min(net.prefixlen + slice_delta, 31)
        except ValueError:
            net, slice_prefix = None, 30
        used_vnis = {n.vni: n.name for n in s.networks.values()}
        why = []
        if name in s.networks:
            why.append("already exists")
        if net is None:
            why.append("is not an IPv4 network")
        else:
            if net.prefixlen > 30:
                why.append("too small")
            if not net.prefixlen <= slice_prefix <= 30:
                why.append("slice prefix")
            if net.overlaps(ipaddress.IPv4Network(model.GATEWAY_IP)):
                why.append("gateway")
            why += [f"overlaps network {n.name}" for n in s.networks.values()
                    if net.overlaps(ipaddress.IPv4Network(n.subnet))]
        if vni is not None and not model.VNI_MIN <= vni <= model.VNI_MAX:
            why.append("out of range")
        if vni in used_vnis:
            why.append(f"already used by network {used_vnis[vni]}")
        self.step("network create", lambda s: model.create_network(s, name, subnet, vni, slice_prefix),
                  why, must_pass=True)

    @op(1, lambda self: self.state().networks)
    def remove_network(self, data):
        name = self.existing(data, "network", NETWORKS)
        s = self.state()
        why = []
        if name not in s.networks:
            why.append("does not exist")
        if any(e.network == name for e in s.endpoints.values()):
            why.append("still has endpoints")
        if any(v.network == name for v in s.services.values()):
            why.append("still has services")
        self.step("network rm", lambda s: model.remove_network(s, name), why, must_pass=True)

    @op(5, lambda self: self.state().networks, node=mostly(some(*NODES[:-1]), st.just(NODES[-1])),
        fixed_ip=mostly(st.just(False), st.just(True), 3), shared_netns=mostly(st.just(False), st.just(True)))
    def add_endpoint(self, data, node, fixed_ip, shared_netns):
        name = self.fresh(data, "endpoint", ENDPOINTS)
        network = self.existing(data, "network", NETWORKS + ("nowhere",))
        s = self.state()
        ip = None
        if fixed_ip:        # mostly one of the network's, else anything
            hosts = [str(a) for a in ipaddress.IPv4Network(s.networks[network].subnet).hosts()] \
                if network in s.networks else []
            ip = data.draw(mostly(st.sampled_from(hosts), addresses, 4) if hosts else addresses, label="ip")
        netns = f"/run/netns/{name}"
        if shared_netns and s.endpoints:
            netns = sorted(s.endpoints.values(), key=lambda e: e.name)[0].netns
        net = s.networks.get(network)
        why = []
        if name in s.endpoints:
            why.append("already exists")
        if net is None:
            why.append(f"network {network} does not exist")
        if node not in s.nodes:
            why.append(f"node {node} does not exist")
        if any(e.netns == netns and e.network == network for e in s.endpoints.values()):
            why.append(f"netns {netns} is already in network {network}")
        if ip is not None and net is not None:
            sub = ipaddress.IPv4Network(net.subnet)
            try:
                addr = ipaddress.IPv4Address(ip)
            except ValueError:
                addr = None
            if addr is None:
                why.append("is not an IPv4 address")
            elif addr not in sub or addr in (sub.network_address, sub.broadcast_address):
                why.append("is not a usable address")
            if any(e.ip == ip for e in s.endpoints.values()):
                why.append(f"{ip} is already used by endpoint")
            if any(v.vip == ip for v in s.services.values()):
                why.append(f"{ip} is the virtual IP of service")
        elif ip is None and net is not None and not why and not self.room_for(s, net, node):
            why.append("no free")
        after = self.step("endpoint add", lambda s: model.add_endpoint(s, name, network, node, netns, True, ip),
                          why, must_pass=True)
        if after is not None and ip is None:
            self.auto.add(name)

    @op(2, lambda self: self.state().endpoints)
    def remove_endpoint(self, data):
        """`endpoint rm`: a tombstone that the endpoint's agent clears."""
        name = self.existing(data, "endpoint", ENDPOINTS)
        why = [] if name in self.state().endpoints else ["does not exist"]
        if self.step("endpoint rm", lambda s: model.mark_endpoint_removing(s, name), why, must_pass=True):
            self.auto.discard(name)

    @op(1, lambda self: any(e.removing for e in self.state().endpoints.values()))
    def other_agents_clear_tombstones(self, data):
        """What the agents of the other nodes do: their removed endpoints leave the store."""
        def clear(s):
            for e in list(s.endpoints.values()):
                if e.removing and e.node != ME:
                    s = model.remove_endpoint(s, e.name)
            return s
        self.step("other agents", clear, [], must_pass=True)

    @op(5, lambda self: self.state().endpoints, ports=port_lists, vip=mostly(st.just("auto"), addresses, 5),
        publish=mostly(st.just(()), some(("8080:80",), ("8080:80",), ("4789:53",)), 3),
        affinity=mostly(some("none", "client-ip"), st.just("sticky")))
    def create_service(self, data, ports, vip, publish, affinity):
        name = self.fresh(data, "service", SERVICES)
        network = self.existing(data, "network", NETWORKS + ("nowhere",))
        backends = self.backends(data, 4, network)
        s = self.state()
        net = s.networks.get(network)
        canon = []
        for p in ports:
            number, _, proto = p.partition("/")
            canon.append(f"{number}/{(proto or 'tcp').lower()}")
        names = [b.split("@")[0].split(":")[0] for b in backends]
        taken = {e.ip for e in s.endpoints.values()} | {v.vip for v in s.services.values()}
        why = []
        if name in s.services:
            why.append("already exists")
        if net is None:
            why.append(f"network {network} does not exist")
        if not ports:
            why.append("needs at least one --port")
        if any(p in ("0", "x/sctp") for p in ports):
            why.append("port '")
        if len(set(canon)) < len(canon):
            why.append("is given twice")
        if affinity == "sticky":
            why.append("affinity")
        if net is not None:
            hosts = {str(a) for a in ipaddress.IPv4Network(net.subnet).hosts()}
            if vip == "auto" and not hosts - taken:
                why.append("no free address")
            if vip != "auto" and vip not in hosts:
                why.append(vip)
            if vip != "auto" and vip in taken:
                why.append(f"VIP {vip} is already used by")
        for pub in publish:
            published, _, target = pub.partition(":")
            matching = [p for p in canon if p.split("/")[0] == target]
            if not matching:
                why.append("has no port")
            for p in matching:
                proto = p.split("/")[1]
                if proto == "udp" and published == "4789":
                    why.append("VXLAN port")
                if any(x == f"{published}:{p}" for v in s.services.values() for x in v.publish):
                    why.append(f"published port {published}/{proto} is already used")
        if len(set(names)) < len(names):
            why.append("is given twice")
        for n in names:
            if n not in s.endpoints or s.endpoints[n].removing:
                why.append(f"endpoint {n} does not exist")
            elif s.endpoints[n].network != network:
                why.append(f"endpoint {n} is in network")
        if any("@0" in b for b in backends):
            why.append("weight")
        if any(":8080" in b for b in backends) and len(ports) > 1:
            why.append("target port")
        self.step("service create", lambda s: model.create_service(s, name, network, ports, backends, vip,
                                                                   list(publish), affinity), why, must_pass=True)

    @op(6, lambda self: self.state().services)
    def update_service(self, data):
        name = self.existing(data, "service", SERVICES)
        svc = self.state().services.get(name)
        ours = sorted(b.endpoint for b in svc.backends) if svc else []
        what = data.draw(mostly(some("add", "rm", "drain", "all") if ours else st.just("add"), st.just("none")),
                         label="what")
        names = mostly(st.sampled_from(ours), self.endpoint_names(), 6) if ours else self.endpoint_names()
        need = {w: int(what == w) for w in ("add", "rm", "drain")}
        add = self.backends(data, 2, svc.network if svc else "", need["add"]) if what in ("add", "all") else []
        rm, drain = ([data.draw(st.lists(names, min_size=need[w], max_size=2, unique=True), label=w)
                      if what in (w, "all") else [] for w in ("rm", "drain")])
        s = self.state()
        svc = s.services.get(name)
        added = [b.split("@")[0].split(":")[0] for b in add]
        why = []
        if svc is None:
            why.append("does not exist")
        else:
            if not (add or rm or drain):
                why.append("nothing to do")
            why += [f"{e} is not a backend" for e in rm + drain if not svc.backend(e)]
            why += [f"{e} cannot be both" for e in set(rm) & set(drain)]
            if any("@0" in b for b in add):
                why.append("weight")
            for e in added:
                if e not in s.endpoints or s.endpoints[e].removing:
                    why.append(f"endpoint {e} does not exist")
                elif s.endpoints[e].network != svc.network:
                    why.append(f"endpoint {e} is in network")
            if any(":8080" in b for b in add) and len(svc.ports) > 1:
                why.append("target port")
            # Adding what is (still, or now twice) an active backend.
            active = {b.endpoint for b in svc.backends if not b.draining} - set(rm) - set(drain)
            for i, e in enumerate(added):
                if e in active or e in added[:i]:
                    why.append(f"{e} is already a backend")
        self.step("service update", lambda s: model.update_service(s, name, add, rm, drain), why, must_pass=True)

    @op(2, lambda self: self.state().services)
    def remove_service(self, data):
        name = self.existing(data, "service", SERVICES)
        why = [] if name in self.state().services else ["does not exist"]
        self.step("service rm", lambda s: model.remove_service(s, name), why, must_pass=True)

    @op(1, lambda self: True)
    def drift(self, data):
        """Someone changes the kernel and not the store (the generation stays): the next
        pass must put it back, though it reuses what it wanted and first compares bytes."""
        name = data.draw(st.sampled_from(desired.RECONCILED_MAPS), label="map")
        m = self.agent.maps[name]
        raw = m.raw_items()
        hash_map = m.spec.kind == "hash"
        how = data.draw(st.sampled_from(["garble"] + (["delete", "extra"] if hash_map else [])), label="drift")
        if how == "extra":
            key = data.draw(st.binary(min_size=m._ksize, max_size=m._ksize), label="key")
            bpf.map_update(m.fd, key, bytes(m._vsize))
        elif raw:
            key = data.draw(st.sampled_from(sorted(raw)), label="entry")
            if how == "delete":
                m.delete_raw(key)
            else:
                value = bytearray(raw[key])
                value[data.draw(st.integers(0, len(value) - 1), label="byte")] ^= 0xff
                bpf.map_update(m.fd, key, bytes(value))
        Counts.by_rule[f"drift {how}"] += 1

    @rule(data=st.data())
    def act(self, data):
        names = [name for name, (weight, pre, _) in sorted(OPS.items(), key=lambda kv: -kv[1][0])
                 if pre(self) for _ in range(weight)]
        name = data.draw(st.sampled_from(names), label="step")
        strategies = OPS[name][2]
        getattr(self, name)(data, **{k: data.draw(v, label=k) for k, v in strategies.items()})

    # --- after every step ------------------------------------------------------------

    @invariant()
    def store_is_consistent(self):
        s = self.state()
        assert violations(s) == []
        # IPAM hands a node addresses from its own slices.
        for name in self.auto & s.endpoints.keys():
            e = s.endpoints[name]
            assert any(ipaddress.IPv4Address(e.ip) in ipaddress.IPv4Network(sl.subnet)
                       for sl in model.node_slices(s, e.network, e.node)), f"{name} {e.ip} outside {e.node}'s slices"
        # What `service ls/inspect` show agrees with the store.
        for row in service_view.rows(s):
            info = service_view.inspect(s, row["name"])
            for b in info["backends"]:
                assert b["ip"] == s.endpoints[b["endpoint"]].ip and b["state"] in ("active", "draining")

    @invariant()
    def kernel_equals_store(self):
        """One pass of this node's agent, then the kernel's maps are what the store wants."""
        s = self.state()
        mine = [e for e in s.endpoints.values() if e.node == ME]
        for e in mine:
            if not e.removing:
                self.ifindexes.setdefault(e.name, 100 + len(self.ifindexes))
        plumbed = {e.name: self.ifindexes[e.name] for e in mine if not e.removing}
        # With the generation, as the agent passes it: its memo of the desired maps must
        # follow every change (and a refused one, which moves nothing, reuses it).
        self.agent.sync_maps(s, plumbed, self.store.generation())
        self.agent.record([e.name for e in mine if not e.removing and not e.ready],
                          [e.name for e in mine if e.removing])
        s = self.state()
        assert not any(e.removing for e in s.endpoints.values() if e.node == ME)
        Counts.kernel_checks += 1

        maps = self.agent.maps
        have = {name: maps[name].items() for name in desired.RECONCILED_MAPS}
        # Counter slots are kept from the maps as they are (checked on their own below).
        want = desired.desired_maps(s, ME, plumbed, 7, self.agent.progs.build, 9, actual=have)
        for name in desired.RECONCILED_MAPS:
            assert have[name] == want[name], f"{name}: kernel differs from the store"
        tables = MaglevTables(maps[desired.MAGLEV]).read()      # a new reader: the kernel, not a cache
        assert tables == desired.desired_tables(s)

        # The same, counted from the store without xoverlay/core/desired.py.
        live = [e for e in s.endpoints.values() if not e.removing]
        assert sorted(v.vni for v in have["xo_subnets"].values()) == sorted(n.vni for n in s.networks.values())
        assert {(k.vni, k.ip): v.node_ip for k, v in have["xo_endpoints"].items()} == \
            {(s.networks[e.network].vni, ip_be(e.ip)): ip_be(UNDERLAY[e.node]) for e in live}
        assert len(have["xo_local_endpoints"]) == sum(1 for e in live if e.node == ME)
        assert len(have["xo_peers"]) == len(s.nodes) - 1
        # Counter slots: one per peer and per local endpoint, in range; an endpoint entry
        # names its own (local) or its node's (remote).
        peer_slot = {k.value: v.slot for k, v in have["xo_peers"].items()}
        local_slot = {(v.vni, v.ip): v.slot for v in have["xo_local_endpoints"].values()}
        for slots, limit in ((peer_slot, MAX_PEERS), (local_slot, MAX_LOCAL_ENDPOINTS)):
            assert len(set(slots.values())) == len(slots) and all(x < limit for x in slots.values())
        for k, v in have["xo_endpoints"].items():
            assert v.slot == (local_slot[(k.vni, k.ip)] if v.ifindex else peer_slot[v.node_ip])
        assert len(have["xo_lb_services"]) == sum(len(v.ports) for v in s.services.values())
        assert len(have["xo_lb_backends"]) == sum(len(v.backends) for v in s.services.values())
        assert len(have["xo_lb_mesh"]) == sum(len(v.publish) for v in s.services.values())
        for v in s.services.values():
            active = {b.index for b in v.backends if not b.draining}
            if active:
                assert set(tables[v.id][1:]) == active, f"service {v.name}: table is not its active backends"
            else:
                assert v.id not in tables


@pytest.fixture(scope="module")
def pinned_node():
    """A node's programs and maps, compiled and pinned as `up` does, in a pin directory
    of its own; removed at the end."""
    name = ME
    progs = datapath.load(name)
    maps = datapath.open_maps(name)
    try:
        yield name, progs, maps
    finally:
        for m in maps.values():
            m.close()
        progs.close()
        datapath.unpin(name)


def test_random_changes_keep_store_and_kernel_consistent(pinned_node):
    StoreAndKernel.node = pinned_node
    Counts.by_rule.clear()
    Counts.examples = Counts.steps = Counts.accepted = Counts.refused = Counts.kernel_checks = 0
    machine = seed(CI_SEED)(StoreAndKernel) if PROFILE == "ci" else StoreAndKernel
    run_state_machine_as_test(machine, settings=settings(
        deadline=None, suppress_health_check=list(HealthCheck), **PROFILES[PROFILE]))
    print(f"\nstate machine ({PROFILE}): {Counts.examples} examples, {Counts.steps} steps "
          f"({Counts.accepted} accepted, {Counts.refused} refused), {Counts.kernel_checks} kernel checks")
    for what, n in sorted(Counts.by_rule.items()):
        print(f"  {what}: {n}")
    # The campaign really went everywhere: every rule both accepted and refused something.
    for what in ("network create", "network rm", "endpoint add", "endpoint rm", "service create",
                 "service update", "service rm"):
        assert Counts.by_rule[f"{what} accepted"] and Counts.by_rule[f"{what} refused"], what
