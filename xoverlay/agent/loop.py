"""The node agent: brings the node's data path up, then keeps the kernel equal to the
store (endpoints plumbed, maps reconciled) until stopped. Everything it sets up keeps
forwarding when it is gone."""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from itertools import groupby

from pyroute2 import IPRoute

from xoverlay.agent import dns_responder, repair
from xoverlay.core import desired, model
from xoverlay.errors import NodeRemoved, StoreError, XoError
from xoverlay.kernel import bpf, datapath, ethtool, gateway, monitor_flag, netns, veth
from xoverlay.kernel.maglev_maps import MaglevTables
from xoverlay.store.base import Store, StoreUnavailable

log = logging.getLogger("xoverlay.agent")
RESYNC_SECONDS = 2.0      # full re-check even without store changes: repairs drift
LEASE_TTL = 10.0          # seconds without its agent before a node is shown down
RETRY_FIRST, RETRY_MAX = 0.25, 5.0     # backoff while the store is unreachable


def next_retry(previous: float | None) -> float:
    """Seconds to wait before asking an unreachable store again: doubling, capped."""
    return RETRY_FIRST if previous is None else min(previous * 2, RETRY_MAX)

# Fault injection for tests (tests/test_e2e_faults.py): SIGKILL ourselves after this many
# steps of the agent's loop, a step being one map operation or one endpoint plumbed or
# removed. Only the loop counts: the reconcile that `up` runs before it is ready never dies.
FAULT_ENV = "XOVERLAY_FAULT_KILL_AFTER_STEPS"


@dataclass
class Underlay:
    name: str
    ifindex: int
    ip: str
    mtu: int


def find_underlay(ipr, name: str) -> Underlay:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise XoError(f"underlay device {name} does not exist in this network namespace")
    ifindex = found[0]
    addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=ifindex, family=socket.AF_INET)]
    if not addrs:
        raise XoError(f"underlay device {name} has no IPv4 address")
    mtu = ipr.get_links(ifindex)[0].get_attr("IFLA_MTU")
    return Underlay(name, ifindex, addrs[0], mtu)


@dataclass(frozen=True)
class WantMemo:
    """What a pass wanted, and from what: reused while `inputs` stay the same."""
    inputs: tuple             # store generation, plumbed veths, underlay, build, xo-gw, FIB flag, egress
    want: dict                # desired.desired_maps
    raw: dict                 # the same as the kernel holds it: desired.encoded(want)
    tables: dict              # desired.desired_tables


@dataclass
class Agent:
    node: str
    underlay_name: str
    store: Store
    xdp: bool | str = "auto"           # True/"on", False/"off", or "auto" (datapath.choose_xdp)
    xdp_reason: str = ""               # why XDP is on or off here, for status
    gro: bool = False                  # keep xo-gro, the tunnel socket for GRO (datapath.choose_gro)
    gro_reason: str = ""               # why it is there or not, as chosen
    gro_problem: str | None = None     # why it could not be made after all (another socket on the port)
    vxlan_port: int = model.DEFAULT_VXLAN_PORT
    ipr: IPRoute = field(default_factory=IPRoute)
    stopping: bool = False
    dns: bool = True                   # run the DNS responder (docs/DNS.md)
    dns_forward: bool = True           # forward names that are not ours; else REFUSED
    dns_upstreams: list | None = None  # (address, port) to forward to; None: /etc/resolv.conf
    dns_server: dns_responder.DnsServer | None = None
    gateway_ifindex: int = 0           # xo-gw, where endpoint.c sends DNS (0: none yet)
    fib_main_only: bool = False        # XO_CFG_FIB_MAIN_ONLY: no rule of the operator's (links)
    egress_problem: str | None = "not set up yet"   # why egress cannot work here; None: XO_CFG_EGRESS
    last_state: object = None         # the store's state of the last pass (read by metrics)
    observer: object = None           # metrics.AgentMetrics, when --metrics is on
    lease_ttl: float = LEASE_TTL
    store_error: str | None = None    # why the store is unreachable now (None: it answers)
    joined: bool = False              # our node is in the store and registered alive
    renewed: float = 0.0              # monotonic time of the last renewal of our registration
    alive_nodes: dict | None = None   # the store's live registrations, as of the last renewal

    kill_after_steps: int = 0          # FAULT_ENV; 0: never
    steps: int = 0
    table_memo: dict = field(default_factory=dict)   # desired.desired_tables' memo, pass to pass
    want_memo: WantMemo | None = None  # what the last pass wanted: see sync_maps

    def _join(self, s):
        return model.join_node(s, self.node, self.underlay.ip, self.vxlan_port, self.underlay.mtu)

    def start(self) -> None:
        """Join the cluster and bring the data path up (adopting what is pinned). With the
        store unreachable, an agent whose data path is pinned still starts (a restart
        during a store outage): it adopts the pins, touches no map and joins later."""
        # Every check first, so that a refusal leaves the kernel and the store as they were.
        self.underlay = find_underlay(self.ipr, self.underlay_name)
        driver = ethtool.driver(self.underlay.name)
        self.xdp, self.xdp_reason = datapath.choose_xdp(self.xdp, driver)
        self.gro, self.gro_reason = datapath.choose_gro(driver, ethtool.features(self.underlay.name), self.vxlan_port)
        datapath.check_bpffs()
        try:
            self._join(self.store.read())
        except StoreUnavailable as e:
            if not datapath.is_pinned(self.node):
                raise XoError(f"{e}: a node's first start needs the store") from None
            self.store_error = str(e)
            log.error("%s: keeping the pinned data path as it is until the store answers", e)
        if self.dns:     # bound now (IP_FREEBIND: before the address exists), served later
            self.dns_server = dns_responder.DnsServer(self.node, forward=self.dns_forward, upstreams=self.dns_upstreams)
        try:
            self.progs = datapath.load(self.node)
            self.xdp_mode = datapath.attach_underlay(self.underlay.ifindex, self.progs, self.xdp).mode
            for change in self._tunnel_device():
                log.info("%s", change)
            self.maps = datapath.open_maps(self.node)
            self.headroom_bridge = veth.ensure_headroom_bridge(self.ipr)
            self.tables = MaglevTables(self.maps[desired.MAGLEV])
            if self.store_error is None:
                self._join_and_register()
            # xo-gw exists whether or not our responder runs: DNS that endpoint.c sends
            # there must end on this node (an ICMP error at worst), never go onwards.
            self.gateway_ifindex, changes = gateway.ensure_gateway(self.ipr)
            for change in changes:
                log.info("%s", change)
        except BaseException:
            if self.dns_server:
                self.dns_server.close()
            raise
        verb = "loaded" if self.progs.replaced else "adopted"
        log.info("node %s: %s programs (build %x) on %s (%s), XDP %s %s", self.node, verb,
                 self.progs.build, self.underlay.name, self.underlay.ip, self.xdp_mode, self.xdp_reason.split(" ", 1)[1])
        if self.progs.recreated:
            log.warning("maps of an older layout made anew (their entries come back on the first pass, "
                        "their counters start at zero): %s", ", ".join(self.progs.recreated))
        if self.dns_server:
            if self.store_error is None:
                self.dns_server.set_state(self.store.read())
            self.dns_server.start()

    def _join_and_register(self) -> None:
        self.store.update(self._join)
        self.store.register(self.node, self.lease_ttl, {"pid": os.getpid(), "host": socket.gethostname(),
                                                        "underlay_ip": self.underlay.ip, "since": time.time(),
                                                        "xdp": self.xdp_reason, "gro": self.gro_problem or self.gro_reason})
        self.alive_nodes = self.store.alive()
        self.joined, self.renewed = True, time.monotonic()

    def _renew(self) -> None:
        """Keep our registration alive: renewed at a third of its TTL, so one lost renewal
        does not mark the node down."""
        if not self.joined:
            self._join_and_register()
        elif time.monotonic() - self.renewed >= self.lease_ttl / 3:
            self.store.renew()
            self.alive_nodes = self.store.alive()
            self.renewed = time.monotonic()

    def stop_dns(self) -> None:
        if self.dns_server:
            self.dns_server.stop()
            self.dns_server = None

    # --- one reconcile pass ------------------------------------------------------------

    def reconcile(self, changes: list[str] | None = None) -> list[str]:
        """Make the kernel match the store once. Says what it changed, for the log, in
        `changes` as it goes (a pass that fails halfway has still done what it did
        before) and returns them. The store is read before anything is touched:
        unreachable, nothing changes."""
        changes = [] if changes is None else changes
        generation, state = self.store.snapshot()
        self.last_state = state
        if self.node not in state.nodes:
            raise NodeRemoved(f"node {self.node} was removed from the store")
        if self.dns_server:
            self.dns_server.set_state(state, generation)
        changes += self._repair()
        try:                      # repairs drift; never a reason to leave the maps alone
            self.gateway_ifindex, gw_changes = gateway.ensure_gateway(self.ipr)
            changes += gw_changes
        except Exception as e:
            log.error("gateway device %s: %s", gateway.GATEWAY_DEV, e)
        self._egress(state, changes)
        changes += self._tunnel_device()
        try:
            changes += gateway.ensure_loopback()
        except OSError as e:      # only the node's own connections to published ports need it
            log.error("lo: %s", e)
        try:
            self.fib_main_only = gateway.fib_main_only(self.ipr)
        except Exception as e:    # the full lookup is always right, only slower
            self.fib_main_only = False
            log.error("reading the routing rules: %s", e)
        ifindexes, told = self._plumb(state, changes)
        try:
            changes += gateway.sync_return_paths(self.ipr, desired.return_paths(state, self.node, ifindexes))
        except Exception as e:    # DNS replies only: never a reason to leave the maps alone
            log.error("return paths of DNS replies: %s", e)
        veth.drop_unclaimed_replies(self.ipr)      # pyroute2's stray ACKs (see there)
        self.sync_maps(state, ifindexes, generation, changes)
        stale = monitor_flag.clear_if_stale(self.maps["xo_monitor"])
        if stale is not None:
            changes.append(f"cleared the monitor flag left by pid {stale.pid}, which is gone: the data path "
                           "no longer writes events nobody reads")
        # Tell the store after the maps are in place: `endpoint add` waits for this.
        self.record(**told)
        return changes

    def _tunnel_device(self) -> list[str]:
        """xo-gro in place with its program on tc ingress, or gone where choose_gro said
        no. Another socket on the port leaves the node without one: the reason shows in
        status, and the vxlan-port-in-use lint names the socket."""
        changes = []
        try:
            if not self.gro:
                if gateway.remove_tunnel_device(self.ipr):
                    changes.append(f"removed {gateway.TUNNEL_DEV}: {self.gro_reason}")
                return changes
            index, changes = gateway.ensure_tunnel_device(self.ipr, self.vxlan_port)
            if bpf.tc_ensure(index, self.progs.fds["prog_tunnel_device"]):
                changes.append(f"attached prog_tunnel_device to {gateway.TUNNEL_DEV}")
            self.gro_problem = None
        except gateway.PortInUse as e:
            if f"off: {e}" != self.gro_problem:
                log.error("no tunnel socket for GRO: %s", e)
            self.gro_problem = f"off: {e}"
        except Exception as e:    # TCP is only slower without it: never a reason to stop
            log.error("%s: %s", gateway.TUNNEL_DEV, e)
        return changes

    def _egress(self, state, changes: list[str]) -> None:
        """Masquerade, forwarding on xo-gw and the replies' rules, put (back) in place
        (kernel/gateway.py ensure_egress). Where it cannot be, the data path is told
        (XO_CFG_EGRESS off: packets for outside are dropped as NO_ROUTE) and the log says
        why, once per cause; status lints it."""
        try:
            problem, done = gateway.ensure_egress(self.ipr, [n.subnet for n in state.networks.values()],
                                                  desired.masquerade_ranges(state), self.underlay.ip,
                                                  desired.published_ports(state))
            changes += done
        except Exception as e:    # never a reason to leave the maps alone
            problem = f"egress: {e}"
        if problem and problem != self.egress_problem:
            log.error("egress off on this node: %s", problem)
        elif not problem and self.egress_problem and self.egress_problem != "not set up yet":
            log.info("egress on again")
        self.egress_problem = problem

    def sync_maps(self, state, ifindexes: dict[str, int], generation: int | None = None,
                  changes: list[str] | None = None) -> list[str]:
        """The maps part of a pass: the kernel's reconciled maps and Maglev tables made
        equal to what `state` wants, given the plumbed local endpoints' veths. With the
        store's `generation` of `state`, what the last pass wanted is reused while nothing
        it depends on moved, and the periodic resync compares the maps' bytes with it
        before decoding anything: an idle agent at 10,000 services spent most of its time
        decoding, diffing and recomputing what had not changed (docs/INVESTIGATIONS.md).
        Appends what it changed to `changes` and returns them."""
        changes = [] if changes is None else changes
        inputs = (generation, tuple(sorted(ifindexes.items())), self.underlay.ifindex, self.progs.build,
                  self.gateway_ifindex, self.fib_main_only, self.egress_problem is None)
        raw = {name: self.maps[name].raw_items() for name in desired.RECONCILED_MAPS}
        have_tables = self.tables.read(s.id for s in state.services.values())
        memo = self.want_memo if generation is not None and self.want_memo and self.want_memo.inputs == inputs \
            else None
        if memo and raw == memo.raw and have_tables == memo.tables:
            return changes             # the kernel holds exactly what this state wants
        actual = {name: self.maps[name].decode(raw[name]) for name in desired.RECONCILED_MAPS}
        if memo:
            want, want_tables = memo.want, memo.tables
        else:
            want = desired.desired_maps(state, self.node, ifindexes, self.underlay.ifindex, self.progs.build,
                                        self.gateway_ifindex, actual, self.fib_main_only,
                                        self.egress_problem is None)
            want_tables = desired.desired_tables(state, self.table_memo)
            self.want_memo = WantMemo(inputs, want, desired.encoded(want), want_tables)
        # New counter slots are zeroed before the entries that name them are written.
        ops = desired.fresh_counters(want, actual)
        ops += desired.plan(want, actual, want_tables, have_tables)
        # Runs of table operations are applied together (one kernel wait per batch).
        for (is_table, deleting), run in groupby(ops, lambda o: (o.map == desired.MAGLEV, o.value is None)):
            if not is_table:
                self._apply(run, changes)
                continue
            run = list(run)
            if deleting:
                self.tables.apply({}, [o.key for o in run])
            else:
                self.tables.apply({o.key: o.value for o in run}, [])
            changes += [f"{'delete' if deleting else 'set'} Maglev table of service id {o.key}" for o in run]
            self._step(len(run))
        return changes

    def record(self, ready=(), removed=(), lost=(), expired=(), now: float = 0.0) -> None:
        """What the pass found, told to the store in one update: endpoints now plumbed are
        ready (and no longer gone); those torn down leave the store; those whose netns is
        gone are marked so (as of `now`); those gone past the grace become tombstones."""
        if not (ready or removed or lost or expired):
            return

        def change(s):
            for name in ready:
                s = model.set_endpoint_ready(model.mark_endpoint_back(s, name), name)
            for name in removed:
                if name in s.endpoints and s.endpoints[name].removing:
                    s = model.remove_endpoint(s, name)
            for name in lost:
                s = model.mark_endpoint_gone(s, name, now)
            for name in expired:
                if name in s.endpoints and s.endpoints[name].gone_since:
                    s = model.mark_endpoint_removing(s, name)
            return s
        self.store.update(change)

    def _apply(self, ops, changes) -> None:
        for op in ops:
            if op.value is None:
                self.maps[op.map].delete(op.key)
            else:
                self.maps[op.map].set(op.key, op.value)
            if not op.map.endswith("_stats"):
                changes.append(str(op))
            self._step()

    def _step(self, n: int = 1) -> None:
        """Count a step that changed the node; under fault injection, die after the Nth."""
        if not self.kill_after_steps:
            return
        self.steps += n
        if self.steps >= self.kill_after_steps:
            log.warning("fault injection: SIGKILL after step %d of this agent's loop", self.steps)
            os.kill(os.getpid(), signal.SIGKILL)

    def _repair(self) -> list[str]:
        """Pins and underlay programs undone behind our back, put back (xoverlay/agent/repair.py)."""
        want = repair.Want(datapath.prog_id(self.progs.fds["prog_underlay_tc"]),
                           datapath.prog_id(self.progs.fds["prog_underlay_xdp"]) if self.xdp_mode != "off" else 0,
                           datapath.prog_id(self.progs.fds["prog_loopback"]))
        todo = repair.plan(repair.observe(self.node, self.underlay.ifindex), want, self.underlay.name)
        if todo:
            fds = {**{name: m.fd for name, m in self.maps.items()}, **self.progs.fds}
            todo = repair.apply(self.node, todo, fds, self.underlay, self.progs, self.xdp)
            if self.observer is not None:
                self.observer.repaired(todo)
        return [str(r) for r in todo]

    def _plumb(self, state, changes):
        """Create the veths of this node's endpoints, remove those of endpoints removed.
        An endpoint whose netns has gone (its container's, not ours) is marked gone, which
        takes it out of every map; its address is released GONE_GRACE_SECONDS later, or
        it is plumbed again if its named netns comes back first. Returns the ifindexes of
        the plumbed ones and, for record(), what to tell the store."""
        ifindexes, ready, removed, lost, expired = {}, [], [], [], []
        mine = {e.name: e for e in state.endpoints.values() if e.node == self.node}
        now = time.time()

        def returned(ep):         # a gone endpoint's named netns, there again
            return model.netns_may_return(ep) and netns.exists(ep.netns)
        for ep in mine.values():
            if ep.removing:
                shared = any(o.netns == ep.netns and not o.removing for o in mine.values() if o.name != ep.name)
                veth.remove_endpoint(self.ipr, ep, netns_in_use=shared)
                changes.append(f"removed endpoint {ep.name}")
                removed.append(ep.name)
                self._step()
            elif ep.gone_since and not returned(ep) and now - ep.gone_since >= model.GONE_GRACE_SECONDS:
                expired.append(ep.name)
                changes.append(f"endpoint {ep.name}: gone {now - ep.gone_since:.0f} s, released {ep.ip}")
        wanted = {veth.host_ifname(name): e for name, e in mine.items()
                  if not e.removing and (not e.gone_since or returned(e))}
        for ifname, index in veth.our_veths(self.ipr).items():
            if ifname not in wanted:
                veth.unplumb(self.ipr, ifname)
                changes.append(f"removed stray veth {ifname}")
        for ifname, ep in wanted.items():
            try:
                ifindexes[ep.name], did = veth.plumb(self.ipr, state, ep, self.progs.fds["prog_endpoint"],
                                                      self.headroom_bridge)
            except veth.NetnsGone as e:
                if not ep.owns_netns:
                    lost.append(ep.name)
                    changes.append(f"{e} (its container stopped?): out of the maps, {ep.ip} released in "
                                   f"{model.GONE_GRACE_SECONDS:.0f} s unless it is back")
                    continue
                log.error("%s", e)
                continue
            except XoError as e:
                log.error("%s", e)
                continue
            if ep.gone_since:
                changes.append(f"endpoint {ep.name}: netns {ep.netns} is back: plumbed again")
            if not ep.ready or ep.gone_since:
                ready.append(ep.name)
                changes.append(f"plumbed endpoint {ep.name} ({ep.ip})")
                self._step()
            else:       # it was plumbed: whatever had to be done again was undone behind our back
                changes += [f"repaired: endpoint {ep.name}: {d}" for d in did]
                if did and self.observer is not None:
                    self.observer.repaired([repair.Repair("endpoint", ep.name)] * len(did))
        return ifindexes, {"ready": ready, "removed": removed, "lost": lost, "expired": expired, "now": now}

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        self.kill_after_steps = int(os.environ.get(FAULT_ENV) or 0)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))
        try:
            self._loop()
        finally:
            self.stop_dns()
            if self.joined and self.store_error is None:
                self.store.unregister()       # shown down at once, not after the TTL
            self.store.close()
        log.info("agent for node %s stopping; the data path keeps forwarding (DNS does not)", self.node)

    def _loop(self) -> None:
        gen = -1
        last_full = 0.0
        retry = None             # backoff while the store is unreachable
        outage_since = time.monotonic() if self.store_error else None
        while not self.stopping:
            try:
                self._renew()
                gen, last_full = self._pass(gen, last_full)
                if self.store_error is not None:
                    log.info("store reachable again after %.1f s: full resync", time.monotonic() - outage_since)
                    self.store_error, retry = None, None
                self.store.wait(gen, timeout=0.5)
            except XoError as e:      # unreachable (etcd); locked, unreadable or corrupt (SQLite)
                now = time.monotonic()
                if self.store_error is None:
                    outage_since = now
                if str(e) != self.store_error:      # once per cause, not once per retry
                    log.error("%s: the data path keeps forwarding as it is; retrying", e)
                self.store_error, gen = str(e), -1
                retry = next_retry(retry)
                deadline = now + retry
                while not self.stopping and time.monotonic() < deadline:
                    time.sleep(0.1)

    def _pass(self, gen: int, last_full: float) -> tuple[int, float]:
        """Reconcile if the store moved or the resync is due. Store errors propagate."""
        now = time.monotonic()
        current = self.store.generation()
        if current == gen and now - last_full < RESYNC_SECONDS:
            return gen, last_full
        started = time.monotonic()
        ok = False
        changes: list[str] = []
        try:
            self.reconcile(changes)
            ok = True
        except StoreError:
            raise
        except NodeRemoved as e:
            log.error("%s", e)
            self.stopping = True
        except XoError as e:
            log.error("%s", e)
        except Exception:
            log.exception("reconcile failed; retrying")
        finally:
            # Also when the pass failed halfway: what it changed before is changed (a
            # veth deleted under a pass that was repairing pins must not hide the pins).
            for c in changes:
                log.info("%s", c)
        if self.observer is not None:
            self.observer.observe(time.monotonic() - started, ok)
        if changes and ok:
            log.info("reconciled in %.1f ms", (time.monotonic() - started) * 1000)
        return current, now
