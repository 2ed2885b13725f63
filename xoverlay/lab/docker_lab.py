"""`xoverlay lab up --docker`: a Docker daemon in every lab node, as a Docker host of a
real cluster has one. Each dockerd runs in its node's netns with its own data root, exec
root and API socket, and its own view of /run/docker/plugins (a bind mount in a mount
namespace of its own), where it finds only its own node's agent's plugin
socket. No registry is reachable: the lab's image, xoverlay/busybox:lab, is made from
Debian's busybox-static with `docker import`."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

from xoverlay.core.model import GATEWAY_IP
from xoverlay.errors import XoError
from xoverlay.kernel import netns, processes

IMAGE = "xoverlay/busybox:lab"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ping", "wget", "nslookup", "ip", "sleep", "cat", "hostname", "ls", "httpd", "nc", "echo", "true")
PLUGIN_DIR = "/run/docker/plugins"
START_SECONDS = 30


def docker_binary(name: str) -> str:
    """Debian's docker.io, whatever else PATH has: its CLI speaks the daemon's API."""
    path = f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else shutil.which(name)
    if not path:
        raise XoError(f"{name} is not installed: apt-get install docker.io (./setup.sh installs it)")
    return path


class NodeDocker:
    """One lab node's dockerd: where it keeps everything."""

    def __init__(self, lab, node: str):
        self.lab, self.node = lab, node
        self.run_dir = os.path.join(processes.RUN_DIR, "docker", node)
        self.data_root = os.path.join("/var/lib/xoverlay/docker", node)

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "docker.sock")

    @property
    def host(self) -> str:
        return "unix://" + self.socket

    @property
    def plugin_socket(self) -> str:
        """Where the node's agent serves the plugin; dockerd sees it in PLUGIN_DIR."""
        return os.path.join(self.run_dir, "plugins", "xoverlay.sock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.run_dir, "dockerd.pid")

    @property
    def log(self) -> str:
        return os.path.join(processes.RUN_DIR, f"{self.node}-dockerd.log")

    def cli(self, *args: str) -> list[str]:
        return [docker_binary("docker"), "-H", self.host, *args]

    def pid(self) -> int | None:
        return processes.pid_in_file(self.pidfile, self.pidfile)   # the dockerd told to write it

    def start(self) -> None:
        if self.pid():
            return
        dockerd = docker_binary("dockerd")
        os.makedirs(os.path.dirname(self.plugin_socket), exist_ok=True)
        os.makedirs(self.data_root, exist_ok=True)
        os.makedirs(PLUGIN_DIR, exist_ok=True)
        exec_root = os.path.join(self.run_dir, "exec")
        # --live-restore: containers outlive a restarted dockerd, as on a production host.
        # A dockerd started again (its containers live on) goes back into the mount
        # namespace its containerd still holds: the sandboxes' netns mounts are there,
        # and a daemon that cannot open them takes its containers off their networks.
        holders = _pids_mentioning(exec_root)
        enter = ["nsenter", f"--mount=/proc/{holders[0]}/ns/mnt"] if holders else \
            ["unshare", "--mount", "--propagation", "private"]
        mount = "" if holders else f"mount --bind {os.path.dirname(self.plugin_socket)} {PLUGIN_DIR} && "
        cmd = (f"{mount}exec {dockerd} "
               f"--data-root {self.data_root} --exec-root {exec_root} --pidfile {self.pidfile} -H {self.host} "
               f"--bridge=none --iptables=false --ip6tables=false --ip-masq=false --live-restore "
               f"--dns {GATEWAY_IP}")
        with open(self.log, "ab") as log:
            # Not `ip netns exec`: its fresh /sys hides the cgroup mounts dockerd needs.
            subprocess.Popen([*enter, "nsenter", f"--net={netns.resolve(self.lab.node_netns(self.node))}",
                              "sh", "-c", cmd],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if subprocess.run(self.cli("version"), capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise XoError(f"dockerd of {self.node} did not answer on {self.socket}: see {self.log}")

    def stop(self) -> None:
        """Its containers removed (they would outlive it: --live-restore), then dockerd
        and the containerd it started."""
        pid = self.pid()
        if pid:
            ids = subprocess.run(self.cli("ps", "-aq"), capture_output=True, text=True).stdout.split()
            if ids:
                subprocess.run(self.cli("rm", "-f", *ids), capture_output=True)
            for net in subprocess.run(self.cli("network", "ls", "-q", "--filter", "driver=xoverlay"),
                                      capture_output=True, text=True).stdout.split():
                subprocess.run(self.cli("network", "rm", net), capture_output=True)
            processes.terminate(pid, lambda: not processes.alive(pid), 15)
        for pid in _pids_mentioning(self.run_dir):
            os.kill(pid, signal.SIGKILL)
        for path in (self.run_dir, self.data_root):
            shutil.rmtree(path, ignore_errors=True)
            try:
                os.rmdir(os.path.dirname(path))      # the last node's takes the parent too
            except OSError:
                pass
        if os.path.exists(self.log):
            os.unlink(self.log)

    def image(self) -> None:
        """xoverlay/busybox:lab in this daemon, made if it lacks it."""
        if subprocess.run(self.cli("image", "inspect", IMAGE), capture_output=True).returncode == 0:
            return
        if not os.path.exists(BUSYBOX):
            raise XoError(f"{BUSYBOX} is missing: apt-get install busybox-static")
        with tempfile.TemporaryDirectory() as root:
            os.makedirs(os.path.join(root, "bin"))
            os.makedirs(os.path.join(root, "etc"))
            shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
            for applet in APPLETS:
                os.symlink("busybox", os.path.join(root, "bin", applet))
            tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
            r = subprocess.run(self.cli("import", "-c", "CMD [\"/bin/sh\"]", "-", IMAGE), stdin=tar.stdout,
                               capture_output=True, text=True)
            tar.wait()
        if r.returncode != 0:
            raise XoError(f"docker import of {IMAGE} on {self.node} failed: {r.stderr.strip()}")


def _pids_mentioning(path: str) -> list[int]:
    """Processes with `path` in an argument (the containerd a dockerd started, its shims:
    their arguments are paths under it, not it)."""
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and int(e) != os.getpid() and any(path in a for a in processes.cmdline(int(e)))]
