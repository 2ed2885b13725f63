"""`xoverlay up`: one node's agent from start to stop. Everything that can be refused
(a bad option, another agent for the node, a metrics port in use, a store that says no)
is refused before the kernel is touched; then the data path is brought up, the first
pass reconciles it, the caller is told (or, detached, the parent waiting on a pipe), and
the loop runs until a signal. The data path keeps forwarding after the agent stops."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from xoverlay.agent import dns_responder
from xoverlay.agent.loop import LEASE_TTL, Agent
from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.kernel import processes
from xoverlay.store.base import Store

READY_FD_ENV = "XOVERLAY_READY_FD"     # a detached agent says "ok" or its error on this fd


@dataclass(frozen=True)
class Options:
    node: str
    underlay: str
    xdp: bool | str = "auto"             # "auto", "on" or "off" (datapath.choose_xdp)
    vxlan_port: int = model.DEFAULT_VXLAN_PORT
    dns: bool = True
    dns_forward: bool = True
    dns_upstreams: tuple[str, ...] = ()
    metrics: str | None = None           # IP:PORT for Prometheus, or off
    lease_ttl: float = LEASE_TTL
    docker_plugin: str | None = None     # serve Docker's network and IPAM plugin on this socket
    docker_host: str = "unix:///var/run/docker.sock"   # the daemon's API: its networks' and containers' names


def _checked(options: Options) -> list:
    """Refuse what is wrong with the options or the node before anything starts; the
    forwarding upstreams as (address, port)."""
    model.check_name("node", options.node)
    upstreams = [dns_responder.parse_upstream(u) for u in options.dns_upstreams]
    if options.metrics:
        from xoverlay.agent import metrics      # prometheus_client only when asked for
        metrics.parse_listen(options.metrics)
    if options.docker_plugin:
        from xoverlay.runtimes import docker_api
        docker_api.DockerApi(options.docker_host)       # a bad URL refused now
    pid = processes.running_pid(options.node)
    if pid:
        raise XoError(f"an agent for node {options.node} is already running (pid {pid})")
    return upstreams


def detach(options: Options, argv: list[str], state: str | None) -> str:
    """Start the agent as a process of its own (argv: this command's arguments without
    --detach) and wait until it is up or has failed; the line to print."""
    _checked(options)
    node = options.node
    read_fd, write_fd = os.pipe()
    os.makedirs(processes.RUN_DIR, exist_ok=True)
    env = dict(os.environ, **{READY_FD_ENV: str(write_fd)})
    if state:
        env["XOVERLAY_STATE"] = state
    with open(processes.log_path(node), "ab") as logf:
        subprocess.Popen([sys.executable, "-m", "xoverlay", *argv], stdin=subprocess.DEVNULL, stdout=logf,
                         stderr=logf, env=env, pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd) as r:
        answer = r.readline().strip()
    if answer != "ok":
        raise XoError(answer or f"the agent for node {node} exited at start: see {processes.log_path(node)}")
    return f"node {node} is up; agent pid {processes.running_pid(node)}, log {processes.log_path(node)}"


def run(options: Options, open_store: Callable[[], Store], say: Callable[[str], None],
        warn: Callable[[str], None]) -> None:
    """Run the node's agent in this process until it is told to stop."""
    upstreams = _checked(options) or None
    node, metrics = options.node, options.metrics
    ready_fd = int(os.environ.pop(READY_FD_ENV, "-1"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    lock = agent = server = None
    if metrics:
        from xoverlay.agent import metrics as metrics_mod
    try:
        # The port first: a bad address or a port in use is refused before anything changes.
        server = metrics_mod.bind(metrics) if metrics else None
        lock = processes.take_pid_lock(node)
        agent = Agent(node, options.underlay, open_store(), xdp=options.xdp, vxlan_port=options.vxlan_port,
                      dns=options.dns, dns_forward=options.dns_forward, dns_upstreams=upstreams,
                      lease_ttl=options.lease_ttl)
        agent.start()
        if agent.store_error is None:
            agent.reconcile()
    except XoError as e:
        if agent is not None:
            agent.stop_dns()
        if lock is not None:
            processes.release_pid_lock(node, lock)
        if server is not None:
            server.server_close()
        if ready_fd >= 0:
            os.write(ready_fd, f"{e}\n".encode())
        raise
    if server is not None:
        agent.observer = metrics_mod.serve(server, node, lambda: agent.last_state,
                                           lambda: (agent.store_error, agent.alive_nodes))
        logging.getLogger("xoverlay.agent").info("metrics on http://%s/metrics", metrics)
    plugin = _docker_plugin(agent.node, open_store, options) if options.docker_plugin else None
    if ready_fd >= 0:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
    else:
        say(f"node {node} is up on {options.underlay} ({agent.underlay.ip}), XDP {agent.xdp_mode} "
            f"{agent.xdp_reason.split(' ', 1)[1]}"
            + (f", metrics on http://{metrics}/metrics" if metrics else "")
            + "; Ctrl-C stops the agent, the data path keeps forwarding")
    if agent.store_error:
        warn(f"{agent.store_error}: the pinned data path keeps forwarding as it is; "
             "the agent resyncs when the store is back")
    try:
        agent.run()
    finally:
        if plugin is not None:
            _stop_docker_plugin(*plugin)
    if server is not None:
        server.shutdown()
        server.server_close()
    processes.release_pid_lock(node, lock)


def _docker_plugin(node: str, open_store: Callable[[], Store], options: Options):
    """Docker's network and IPAM driver on options.docker_plugin, and the thread that
    takes Docker's names into the store (xoverlay/runtimes/docker_plugin.py)."""
    import threading

    from xoverlay.runtimes import docker_api, docker_plugin, plugin_server
    plugin = docker_plugin.DockerPlugin(node, open_store, docker_api.DockerApi(options.docker_host))
    server = plugin_server.serve(options.docker_plugin, plugin.handle)
    threading.Thread(target=plugin.run_sync, name="docker-names", daemon=True).start()
    logging.getLogger("xoverlay.agent").info("Docker plugin %s on %s (Docker's API: %s)", docker_plugin.DRIVER,
                                             options.docker_plugin, options.docker_host)
    return plugin, server


def _stop_docker_plugin(plugin, server) -> None:
    from xoverlay.runtimes import plugin_server
    plugin.stopping = True
    plugin.kick.set()
    plugin_server.close(server)
