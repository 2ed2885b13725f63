"""Faults on a real lab: agents SIGKILLed in the middle of reconciles, the data
path undone behind the agent's back, a store that is locked, corrupt or unreadable.
Traffic between endpoints nobody touches runs through all of it and loses nothing."""
from __future__ import annotations

import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import in_netns, ping_loss

pytestmark = pytest.mark.lab

KILLS = int(os.environ.get("XO_FAULT_KILLS", 20))   # fewer only when working on this test
MAX_KILL_STEP = 14          # every batch below takes at least 18 steps on every node


def prefix(lab) -> str:
    return lab.lab().prefix


def log_of(node: str) -> str:
    from xoverlay.kernel.processes import log_path
    with open(log_path(node)) as f:
        return f.read()


def wait_for(what: str, check, timeout: float = 10, detail=lambda: "") -> None:
    """Poll check() until it holds; on timeout, fail saying what, and detail() if given."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail()}")
        time.sleep(0.1)


def start_agent(lab, node: str, env: dict | None = None) -> None:
    """`xoverlay up --detach` in the node's netns, as `lab up` starts it."""
    from xoverlay.lab.namespace_lab import UNDERLAY_DEV
    cmd = ["nsenter", f"--net={lab.node_netns(node)}", "--", sys.executable, "-m", "xoverlay", "--state",
           lab.state, "up", "--node", node, "--underlay", UNDERLAY_DEV, "--detach", "--xdp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"up --node {node}: {r.stderr}{r.stdout}"


def update_store(lab, change) -> None:
    store = lab.store()
    try:
        store.update(change)
    finally:
        store.close()


# --- SIGKILL at random points of reconciles -------------------------------------------------

def add_batch(names: list[str], nodes: list[str], service: str):
    """Six endpoints (two per node) and a service over them, in one store transaction:
    one reconcile pass of at least 18 steps on every node."""
    from xoverlay.core import model

    def change(s):
        for i, name in enumerate(names):
            s = model.add_endpoint(s, name, "demo", nodes[i % len(nodes)], f"/run/netns/{name}", True)
        return model.create_service(s, service, "demo", ["80/tcp"], names)
    return change


def remove_batch(names: list[str], service: str):
    """Whatever of add_batch is there, marked for removal in one transaction."""
    from xoverlay.core import model

    def change(s):
        if service in s.services:
            s = model.remove_service(s, service)
        for name in names:
            if name in s.endpoints and not s.endpoints[name].removing:
                s = model.mark_endpoint_removing(s, name)
        return s
    return change


def test_agent_sigkilled_mid_reconcile_20_times_converges_and_loses_nothing(lab):
    """Each round kills one agent (chosen at random) after a random step (1..14) of the
    reconcile that applies a batch of changes (xoverlay/agent/loop.py FAULT_ENV): the agent dies with
    the batch half applied (checked: its maps still differ from the store, or endpoints are
    still pending), the next `up` converges (drift 0 on every node, every endpoint ready),
    and two 100 Hz pings between endpoints nobody touches lose nothing."""
    from xoverlay.agent.loop import FAULT_ENV
    from xoverlay.kernel.processes import running_pid
    from xoverlay.kernel.processes import stop_agent
    nodes = lab.nodes()
    n1, n2, n3 = nodes
    seed = int(os.environ.get("XO_FAULT_SEED", time.time()))
    rng = random.Random(seed)
    p = prefix(lab)
    names = [f"{p}kill-{j}" for j in range(6)]
    service = f"{p}killsvc"
    pings = [lab.ping_stream(f"{n1}-a", lab.ep(f"{n2}-a")["ip"]),
             lab.ping_stream(f"{n3}-a", lab.ep(f"{n1}-b")["ip"])]
    kills = []
    try:
        present = False
        for round_ in range(KILLS):
            victim, step = rng.choice(nodes), rng.randint(1, MAX_KILL_STEP)
            stop_agent(victim)        # graceful: it was started without the fault
            start_agent(lab, victim, {FAULT_ENV: str(step)})
            lab.wait_converged()      # the `up` after the previous kill converged
            if present and round_ % 4 == 1:
                # Now and then: new endpoints really carry traffic once converged.
                assert lab.ping(f"{n1}-a", lab.ep(names[1])["ip"], count=1), "a batch endpoint is unreachable"
            fatal = log_of(victim).count(f"fault injection: SIGKILL after step {step} ")
            update_store(lab, remove_batch(names, service) if present else add_batch(names, nodes, service))
            present = not present
            wait_for(f"the agent of {victim} to die at step {step}", lambda: running_pid(victim) is None)
            assert log_of(victim).count(f"fault injection: SIGKILL after step {step} ") == fatal + 1
            store = lab.store()
            unsettled = [e for e in store.read().endpoints.values()
                         if e.node == victim and (not e.ready or e.removing)]
            store.close()
            kills.append((victim, step, len(lab.drift(victim)), len(unsettled)))
            assert kills[-1][2] or kills[-1][3], f"the kill of {victim} at step {step} was not mid-reconcile"
            start_agent(lab, victim)  # the next `up`
        lab.wait_converged()
    finally:
        for node in nodes:
            if running_pid(node) is None:
                start_agent(lab, node)
        losses = [ping_loss(ping) for ping in pings]
        update_store(lab, remove_batch(names, service))
        lab.wait_converged()
    print(f"seed {seed}; kills (node, step, drift entries, unsettled endpoints): {kills}; pings {losses}")
    assert len(kills) == KILLS
    for sent, received in losses:
        assert sent >= 40 * KILLS and received == sent, f"lost {sent - received} of {sent} (seed {seed})"


# --- undone behind the agent's back -----------------------------------------------------------

def test_agent_repairs_pins_veth_and_filters_undone_behind_its_back(lab):
    """Pins deleted, an endpoint's veth deleted, tc programs and XDP detached, xo-gro
    deleted: within a
    resync or two the agent has put everything back, says so in its log, and traffic
    that does not cross node1 never noticed."""
    from xoverlay.agent.loop import RESYNC_SECONDS
    from xoverlay.kernel import bpf, netns
    from xoverlay.kernel.veth import host_ifname
    from xoverlay.maps.layout import pin_dir
    n1, n2, n3 = lab.nodes()
    ns = lab.node_netns(n1)
    ping = lab.ping_stream(f"{n2}-b", lab.ep(f"{n3}-a")["ip"])
    try:
        logged = len(log_of(n1))
        pins = ["xo_endpoints", "xo_config", "prog_endpoint", "prog_underlay_xdp"]
        for name in pins:
            os.unlink(os.path.join(pin_dir(n1), name))
        in_netns(ns, "ip", "link", "del", host_ifname(f"{n1}-b"))
        with netns.entered(ns):                               # tcx: no `tc filter` to delete
            for dev in (host_ifname(f"{n1}-a"), "eth1"):
                bpf.tc_detach(socket.if_nametoindex(dev))
        in_netns(ns, "ip", "link", "set", "eth1", "xdp", "off")
        in_netns(ns, "ip", "link", "del", "xo-gro")
        t0 = time.monotonic()
        wanted = [f"repaired: pin {name} was deleted" for name in pins] + [
            f"repaired: endpoint {n1}-b: created veth {host_ifname(f'{n1}-b')}",
            f"repaired: endpoint {n1}-a: attached the endpoint program",
            "repaired: the tc program on eth1", "repaired: the XDP program on eth1",
            "created xo-gro (a tunnel socket on UDP 4789, for GRO)", "attached prog_tunnel_device to xo-gro"]
        missing = lambda: [w for w in wanted if w not in log_of(n1)[logged:]]   # noqa: E731
        wait_for("the repairs in the log", lambda: not missing(), timeout=2 * RESYNC_SECONDS + 3,
                 detail=lambda: f"; missing {missing()}; the log since:\n{log_of(n1)[logged:][-3000:]}")
        took = time.monotonic() - t0
        assert all(os.path.exists(os.path.join(pin_dir(n1), name)) for name in pins)
        # Both endpoints of node1 talk again, across nodes, both ways.
        assert lab.ping(f"{n2}-a", lab.ep(f"{n1}-b")["ip"], count=2)
        assert lab.ping(f"{n1}-a", lab.ep(f"{n3}-b")["ip"], count=2)
        assert lab.drift(n1) == []
        status = lab.xo("status", "--node", n1, "--json")      # the pins are status's way in
        assert '"pinned": true' in status.out
    finally:
        sent, received = ping_loss(ping)
    print(f"repaired in {took:.1f}s; bystander ping {received}/{sent}")
    assert sent >= 100 and received == sent


def test_a_veth_left_half_made_by_a_killed_agent_is_made_again(lab):
    """An agent killed inside veth creation leaves the host end down (it is set up last),
    the container end still beside it. The next pass must not take it for plumbed: it
    deletes it and plumbs the endpoint from scratch, which then talks across nodes."""
    from xoverlay.kernel.veth import creating_ifname, host_ifname
    n1, n2, _ = lab.nodes()
    ns, name = lab.node_netns(n1), f"{n1}-half"
    host = host_ifname(name)
    in_netns(ns, "ip", "link", "add", host, "type", "veth", "peer", "name", creating_ifname(host))
    try:
        lab.xo("endpoint", "add", name, "--network", "demo", "--node", n1)   # waits until plumbed
        assert creating_ifname(host) not in in_netns(ns, "ip", "-br", "link").stdout
        assert lab.ping(f"{n2}-a", lab.ep(name)["ip"], count=2)
        assert lab.drift(n1) == []
    finally:
        lab.xo("endpoint", "rm", name, check=False)
        in_netns(ns, "ip", "link", "del", host, check=False)


# --- a store that cannot be used ---------------------------------------------------------------

def one_line_error(r, *words) -> None:
    assert r.code == 1, r
    assert r.err.startswith("xoverlay: error: state store") and r.err.count("\n") == 1, r.err
    assert all(w in r.err for w in words), r.err


def test_store_locked_corrupt_or_unreadable_one_line_errors_and_the_data_path_runs_on(lab):
    """A writer holding the lock, junk at the state file's path, a directory there: the
    CLI says so in one line and changes nothing; agents keep forwarding, log the store
    unreachable once, and pick up again when it is back (an endpoint added then is plumbed)."""
    from xoverlay.kernel.processes import running_pid
    if lab.backend != "sqlite":
        pytest.skip("a SQLite file's faults (etcd outages: tests/test_e2e_store.py)")
    nodes = lab.nodes()
    n1, n2, _ = nodes
    state = lab.state
    good = state + ".good"
    ping = lab.ping_stream(f"{n1}-a", lab.ep(f"{n2}-a")["ip"])
    logged = {n: len(log_of(n)) for n in nodes}
    name = f"{prefix(lab)}after-outage"
    n1b = lab.ep(f"{n1}-b")["ip"]      # the CLI cannot tell us during the outage
    try:
        # Locked: a writer that never finishes. Readers go on (WAL); writers give up.
        locker = sqlite3.connect(state, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            t0 = time.monotonic()
            one_line_error(lab.xo("network", "create", "locked", "--subnet", "10.99.0.0/16", check=False),
                           "locked")
            locked_for = time.monotonic() - t0
            assert n1 + "-a" in lab.xo("endpoint", "ls").out
        finally:
            locker.close()      # rolls back: the lab's teardown needs the store

        # Corrupt: junk where the state file was (a botched restore). A good copy first,
        # checkpointed, so the WAL beside it holds nothing the copy lacks.
        src = sqlite3.connect(state)
        src.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with sqlite3.connect(good) as dst:
            src.backup(dst)
        src.close()
        with open(state + ".junk", "wb") as f:
            f.write(b"not sqlite " * 1000)
        os.rename(state + ".junk", state)
        one_line_error(lab.xo("endpoint", "ls", check=False), "not a database")
        for n in nodes:
            wait_for(f"{n}'s agent to notice", lambda n=n: "file is not a database: the data path keeps "
                     "forwarding" in log_of(n)[logged[n]:])
        # Unreadable: no file to open there.
        os.unlink(state)
        os.mkdir(state)
        one_line_error(lab.xo("endpoint", "ls", check=False), "unable to open")
        time.sleep(1)
        assert all(running_pid(n) for n in nodes), "an agent died of the store"
        assert in_netns(f"/run/netns/{n2}-b", "ping", "-c", "2", "-i", "0.2", "-W", "1", n1b, check=False).returncode == 0

        os.rmdir(state)
        os.rename(good, state)
        for n in nodes:
            wait_for(f"{n}'s agent to read the store again",
                     lambda n=n: "store reachable again" in log_of(n)[logged[n]:])
        lab.xo("endpoint", "add", name, "--network", "demo", "--node", n1)   # waits until plumbed
        assert lab.ping(f"{n2}-a", lab.ep(name)["ip"], count=1)
        lab.wait_converged()
    finally:
        if os.path.isdir(state):
            os.rmdir(state)
        if os.path.exists(good):
            os.replace(good, state)
        lab.xo("endpoint", "rm", name, check=False)
        sent, received = ping_loss(ping)
    print(f"locked store: CLI gave up after {locked_for:.1f}s; ping {received}/{sent}")
    errors = [l for n in nodes for l in log_of(n)[logged[n]:].splitlines() if "ERROR" in l]
    # One line per cause and node: locked (renewing the agent's registration is a write),
    # corrupt, unreadable.
    assert len(errors) <= 3 * len(nodes), f"the agents repeat themselves: {errors}"
    assert sent >= 500 and received == sent


def test_an_endpoint_whose_container_is_gone_leaves_the_maps_then_gives_its_address_back(lab):
    """An endpoint attached by hand to a process's netns, as a container runtime's would
    be. The process dies: the endpoint shows `gone`, leaves every node's maps and DNS at
    once, the agent says so in one log line (not one a pass), and after the grace its
    address is released."""
    import dataclasses

    from xoverlay.agent.loop import RESYNC_SECONDS
    from xoverlay.core import model
    from xoverlay.kernel.datapath import open_maps
    from xoverlay.maps.layout import EndpointKey, ip_be
    n1, n2, _ = lab.nodes()
    proc = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    path = f"/proc/{proc.pid}/ns/net"
    store = lab.store()
    try:
        wait_for("the process's own netns", lambda: os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino)
        lab.xo("endpoint", "add", "procx", "--network", "demo", "--node", n1, "--netns", path)
        ep = lab.ep("procx")
        assert ep["state"] == "ready" and lab.ping(f"{n2}-a", ep["ip"], count=2)
        key = EndpointKey(vni=store.read().networks["demo"].vni, ip=ip_be(ep["ip"]))
        logged = len(log_of(n1))
        proc.kill()
        proc.wait()
        wait_for("procx shown gone", lambda: lab.ep("procx")["state"] == "gone", timeout=2 * RESYNC_SECONDS + 3)
        wait_for("procx out of every node's maps",
                 lambda: all(open_maps(n)["xo_endpoints"].get(key) is None for n in lab.nodes()))
        asker = os.path.basename(lab.ep(f"{n1}-a")["netns"])       # its resolv.conf: the node's responder
        assert subprocess.run(["ip", "netns", "exec", asker, "getent", "hosts", "procx"]).returncode != 0
        assert subprocess.run(["ip", "netns", "exec", asker, "getent", "hosts", f"{n2}-a"],
                              capture_output=True).returncode == 0
        time.sleep(2 * RESYNC_SECONDS + 1)                        # passes go by
        assert log_of(n1)[logged:].count("endpoint procx: netns") == 1, log_of(n1)[logged:][-2000:]
        assert lab.ep("procx")["state"] == "gone" and lab.drift(n1) == []
        # The grace run out (found gone that long ago): the address is released.
        store.update(lambda s: s.with_("endpoint", "procx", dataclasses.replace(
            s.endpoints["procx"], gone_since=time.time() - model.GONE_GRACE_SECONDS - 1)))
        wait_for("procx released", lambda: "procx" not in lab.endpoints(), timeout=3 * RESYNC_SECONDS + 3)
        assert re.search(rf"endpoint procx: gone \d+ s, released {ep['ip']}\n", log_of(n1)[logged:])
    finally:
        proc.kill()
        proc.wait()
        lab.xo("endpoint", "rm", "procx", check=False)
        store.close()
