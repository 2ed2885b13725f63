"""Shared fixtures: the CLI as a subprocess, and a 3-node namespace lab with its own
store (so it never meets the user's lab), removed at the end whatever happens."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

PY = sys.executable


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_xo(state: str, *args: str, check: bool = True, timeout: float = 60) -> Result:
    r = subprocess.run([PY, "-m", "xoverlay", "--state", state, *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"xoverlay {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return Result(r.returncode, r.stdout, r.stderr)


def in_netns(path: str, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(["nsenter", f"--net={path}", "--", *cmd], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} in {path} failed: {r.stderr}{r.stdout}")
    return r


@contextlib.contextmanager
def inside_netns_with_veth(name: str, end: str = "v0", peer: str = "v1"):
    """A netns of the test's own holding a veth pair (`end`, `peer`), this thread inside
    it for the with-block; yields `end`'s ifindex. The netns goes at the end."""
    from xoverlay.kernel import netns
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", end, "type", "veth", "peer", "name", peer], check=True)
        with netns.entered(f"/run/netns/{name}"):
            yield socket.if_nametoindex(end)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class LabHandle:
    def __init__(self, state: str):
        self.state = state

    def xo(self, *args, **kw) -> Result:
        return run_xo(self.state, *args, **kw)

    def endpoints(self) -> dict:
        return {e["name"]: e for e in json.loads(self.xo("endpoint", "ls", "--json").out)}

    def nodes(self) -> list[str]:
        return self.lab().nodes()

    def store(self):
        """The lab's store, whichever backend it runs on (the path follows a lab's etcd)."""
        from xoverlay.store import open_store
        return open_store(self.state)

    def lab(self):
        from xoverlay.lab.namespace_lab import Lab
        return Lab(self.store(), self.state)

    @contextlib.contextmanager
    def agent_paused(self, node: str):
        """The node's agent frozen (SIGSTOP) for the with-block: what the test breaks stays
        broken until it has looked, however the agent's passes fall."""
        from xoverlay.kernel.processes import running_pid
        pid = running_pid(node)
        assert pid, f"no agent runs for {node}"
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def node_netns(self, node: str) -> str:
        return f"/run/netns/xo-{node}"

    def stop_as_another_build(self, node: str) -> None:
        """The node's agent stopped and its pins marked as another build's (build id 1):
        the next agent loads its own programs and swaps them in."""
        from xoverlay.kernel.datapath import open_maps
        from xoverlay.kernel.processes import running_pid
        from xoverlay.maps.layout import U32
        os.kill(running_pid(node), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while running_pid(node) and time.monotonic() < deadline:
            time.sleep(0.05)
        cfg_map = open_maps(node)["xo_config"]
        cfg = cfg_map.get(U32(0))
        cfg.build_id = 1
        cfg_map.set(U32(0), cfg)

    def ep(self, name: str) -> dict:
        return self.endpoints()[name]

    def run_in(self, endpoint: str, *cmd: str, **kw):
        return in_netns(self.ep(endpoint)["netns"], *cmd, **kw)

    def ping(self, src: str, dst_ip: str, count: int = 3, **kw) -> bool:
        r = self.run_in(src, "ping", "-c", str(count), "-i", "0.1", "-W", "1", dst_ip, check=False, **kw)
        return r.returncode == 0

    def ping_stream(self, src: str, dst_ip: str, seconds: float | None = None) -> subprocess.Popen:
        """A 100 Hz ping in the background, for `seconds` or until ping_loss() stops it."""
        return subprocess.Popen(["nsenter", f"--net={self.ep(src)['netns']}", "--", "ping", "-q", "-i", "0.01",
                                 *(["-w", str(seconds)] if seconds else []), dst_ip],
                                stdout=subprocess.PIPE, text=True)

    def drift(self, node: str) -> list[dict]:
        """Entries where the node's maps differ from what the store wants (xoverlay/ui/status.py)."""
        from xoverlay.ui.status import drift, read_maps
        store = self.store()
        try:
            state = store.read()
            return drift(state, node, read_maps(node, [s.id for s in state.services.values()]))
        finally:
            store.close()

    def wait_converged(self, timeout: float = 15) -> None:
        """Every endpoint ready (none pending or being removed) and no drift on any node."""
        deadline = time.monotonic() + timeout
        while True:
            store = self.store()                 # not the CLI: this polls
            eps = store.read().endpoints
            store.close()
            unsettled = sorted(n for n, e in eps.items() if not e.ready or e.removing)
            drifts = {n: self.drift(n) for n in self.nodes()}
            if not unsettled and not any(drifts.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not converged after {timeout}s: endpoints {unsettled}, drift "
                                     + str({n: d[:3] for n, d in drifts.items() if d}))
            time.sleep(0.2)

    def drops(self, node: str) -> dict[str, int]:
        from xoverlay.kernel.counters import drop_counts
        from xoverlay.maps.drops import REASONS
        return {REASONS[k].name: v[0] for k, v in drop_counts(node).items()}


def skip_if_bench_locked(stderr: str) -> None:
    """A bench script refused to start because another benchmark runs (bench/lib/shell.py
    Lock): this machine is busy, which says nothing of the script."""
    from bench.lib.shell import LOCK_PATH, LOCKED
    if LOCKED in stderr:
        pytest.skip(f"a benchmark is running ({LOCK_PATH})")


def ping_loss(proc: subprocess.Popen, finish: bool = False) -> tuple[int, int]:
    """(sent, received) of a ping_stream: stopped first if it still runs, or with
    finish=True, waited for until its `seconds` are over."""
    if finish:
        proc.wait(timeout=120)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)      # ping prints its summary on SIGINT
    out, _ = proc.communicate(timeout=60)
    line = next(l for l in out.splitlines() if "transmitted" in l)
    sent, received = int(line.split()[0]), int(line.split(",")[1].split()[0])
    return sent, received


def leftovers(prefix: str) -> list[str]:
    """Anything of a lab with this name prefix still on the machine."""
    found = []
    if os.path.isdir("/run/netns"):
        found += [f"netns {n}" for n in os.listdir("/run/netns") if prefix in n]
    if os.path.isdir("/etc/netns"):       # endpoints' resolv.conf (xoverlay/kernel/resolvconf.py)
        found += [f"/etc/netns/{n}" for n in os.listdir("/etc/netns") if prefix in n]
    if os.path.isdir("/sys/fs/bpf/xoverlay"):
        found += [f"pin {n}" for n in os.listdir("/sys/fs/bpf/xoverlay") if n.startswith(prefix)]
    ps = subprocess.run(["pgrep", "-af", r"-m xoverlay( |\.lab\.demo_server)|^etcd "], capture_output=True, text=True).stdout
    found += [f"process {line}" for line in ps.splitlines() if prefix in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip()
        # Any xo link in the host's netns is a leftover, but the etcd link of another lab
        # that is still up (`xo-<its prefix>st`, xoverlay/lab/namespace_lab.py store_link) is that lab's.
        if name.startswith("xo") and (prefix in name or not re.match(r"xo-x[0-9a-f]{4}-st\b", name)):
            found.append(f"link {name}")
    return found


# Every end-to-end test runs on both stores: the embedded SQLite file and a real etcd the
# lab starts (`lab up --store etcd`). XOVERLAY_TEST_STORES=etcd (or sqlite) runs one only.
LAB_STORES = [s for s in os.environ.get("XOVERLAY_TEST_STORES", "sqlite,etcd").split(",") if s]


@pytest.fixture(scope="session", params=LAB_STORES)
def lab(request, tmp_path_factory):
    """A 3-node lab; `lab.state` is its --state on either store (for etcd, the path
    stands for the lab's etcd while the lab is up)."""
    state = str(tmp_path_factory.mktemp(f"lab-{request.param}") / "state.db")
    handle = LabHandle(state)
    handle.backend = request.param
    try:
        handle.xo("lab", "up", "--nodes", "3", "--store", request.param, timeout=180)
        yield handle
    finally:
        run_xo(state, "lab", "down", check=False, timeout=180)


class EtcdProc:
    """A Debian etcd of one test: its own data dir and ports, stopped at the end.
    stop()/start() restart it on the same data (an outage)."""

    def __init__(self, tmp: str, tls=None):
        from xoverlay.store import etcd_server
        self.dir, self.tls = tmp, tls
        self.port, self.peer = etcd_server.free_port(), etcd_server.free_port()
        self.url = f"etcd://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> "EtcdProc":
        from xoverlay.store import etcd_server
        cmd = etcd_server.command("t", os.path.join(self.dir, "data"),
                                  etcd_server.client_urls("127.0.0.1", self.port, bool(self.tls)),
                                  f"http://127.0.0.1:{self.peer}", self.tls)
        self.proc = etcd_server.start(cmd, os.path.join(self.dir, "etcd.log"), "127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        from xoverlay.store import etcd_server
        if self.proc:
            etcd_server.stop(self.proc.pid)
            self.proc = None


@pytest.fixture
def etcd(tmp_path):
    e = EtcdProc(str(tmp_path)).start()
    try:
        yield e
    finally:
        e.stop()
