"""The VM lab: the namespace lab's cluster (nodes node1..N, network demo, endpoints, the
web service, the outside client), but each node a qemu VM with a kernel of its own
(Debian 12's 6.1 by default) and a virtio-net NIC on the underlay.

virtme-ng boots the kernel with this machine's root filesystem shared read-only (writable
overlays on /etc, /var, /tmp ...), so a guest has xoverlay, BCC and the venv exactly as
installed here. Each VM's underlay NIC is a tap on the lab's switch (br0 in the underlay
netns, where the host can watch the wire); its control NIC is qemu user networking, whose
guest port the host reaches on a port of its own loopback (lab/vm_control.py). The store
is the lab's etcd on the switch, as `lab up --store etcd` runs it. KVM where it works,
else TCG (this machine's /dev/kvm is PVM, under which stock kernels hang)."""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time

from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.kernel import netns, processes
from xoverlay.lab import vm_control
from xoverlay.lab.namespace_lab import DEMO_NETWORK, REPO, UNDERLAY_NET, WEB_SERVICE, Lab, _run
from xoverlay.store import etcd_server

BOOT_SECONDS = 600            # a TCG boot of three VMs on two CPUs, BCC compiles included
# vagrant/node-up in a TCG guest: the store probe, `up` and its BCC compile. Python starts
# about 100x slower there than on the host (`import xoverlay.ui.cli` 18 s against 0.16 s,
# the guests sharing two CPUs): measured 8-11 minutes with two guests.
AGENT_START_SECONDS = 1200
VM_MEMORY = "1536M"
VM_CPUS = 2
GUEST_DIR = "/run/xoverlay-vm"     # where a guest sees its directory shared with the host


def accelerator() -> str:
    """'kvm' where /dev/kvm is usable for a stock kernel, else 'tcg'. PVM's /dev/kvm (a
    paravirtual KVM for nested guests) opens, but a stock kernel hangs under it."""
    if os.path.exists("/sys/module/kvm_pvm") or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    return "kvm"


def find_kernel(spec: str) -> str:
    """The kernel image for `--kernel`: debian12 (Debian 12's 6.1, linux-image-amd64),
    running (this machine's, if /boot has its image), or a path."""
    if spec == "debian12":
        images = sorted(glob.glob("/boot/vmlinuz-6.1.*-amd64"))
        if not images:
            raise XoError("no Debian 12 kernel (/boot/vmlinuz-6.1.*-amd64): setup.sh installs linux-image-amd64")
        return images[-1]
    if spec == "running":
        path = f"/boot/vmlinuz-{os.uname().release}"
        if not os.path.exists(path):
            raise XoError(f"the running kernel's image is not in /boot ({path}): give --kernel PATH")
        return path
    if not os.path.isfile(spec):
        raise XoError(f"--kernel {spec}: no such file (use debian12, running or a kernel image's path)")
    return spec


def _vng() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "vng")
    found = here if os.path.exists(here) else shutil.which("vng")
    if not found:
        raise XoError("virtme-ng (vng) is not installed: run setup.sh")
    return found


class VmLab(Lab):
    """A Lab whose nodes are VMs. Everything but the nodes (switch, etcd, client, the
    store's objects) is the namespace lab's."""
    ready_seconds = BOOT_SECONDS

    def __init__(self, store, state_path: str | None, kernel: str = "debian12"):
        super().__init__(store, state_path)
        self.kernel_spec = kernel

    # --- names --------------------------------------------------------------------------

    def vm_dir(self, node: str) -> str:
        return os.path.join(processes.RUN_DIR, "vm", node)

    def tap(self, i: int) -> str:
        return f"xo{self.prefix}t{i}"

    @staticmethod
    def mac(kind: int, i: int) -> str:
        return f"52:54:00:00:{kind:02x}:{10 + i:02x}"

    @property
    def node_store(self) -> str:
        """The store as the guests reach it: the lab's etcd on the switch."""
        etcd = self._load().get("etcd")
        if not etcd:
            raise XoError("the VM lab's etcd is not running: `xoverlay lab up --vms`")
        return etcd["node_url"]

    def vm(self, node: str) -> dict:
        vms = self._load().get("vms") or {}
        if node not in vms:
            raise XoError(f"{node} is not a VM of this lab")
        return vms[node]

    # --- up -----------------------------------------------------------------------------

    def up(self, count: int, xdp: bool | None = None, echo=print, store: str | None = None) -> None:
        if store == "sqlite":
            raise XoError("the VM lab runs on etcd (its VMs reach it over the underlay): drop --store sqlite")
        data = self._load()
        if data["nodes"] and not data.get("vms"):
            raise XoError("a namespace lab is up on this store: `xoverlay lab down` first")
        self.kernel = data.get("kernel") or find_kernel(self.kernel_spec)
        self.accel = accelerator()
        data.update(kernel=self.kernel, accel=self.accel, vms=data.get("vms") or {})
        self._save(data)
        echo(f"VM lab: {count} nodes on {os.path.basename(self.kernel)} ({self.accel.upper()}"
             + (": slow, minutes to boot" if self.accel == "tcg" else "") + ")")
        super().up(count, xdp=xdp, echo=echo, store="etcd")

    def _nodes(self, nodes: list[str], xdp: bool, echo, store: str) -> None:
        """Every VM booting at once, then their agents started side by side. Under TCG on
        two CPUs that is CPU-bound either way (three nodes: 7.4 minutes one after the
        other, about as long together); with KVM or more CPUs the boots overlap."""
        for i, node in enumerate(nodes, start=1):
            self._node(i, node, xdp)
        errors = []

        def agent(node):
            try:
                self._agent(node, xdp, echo, store)
            except XoError as e:
                errors.append(str(e))
        threads = [threading.Thread(target=agent, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise XoError("; ".join(sorted(errors)))

    @staticmethod
    def _xdp(xdp: bool | None) -> bool | None:
        return xdp                      # None: the nodes' default, as users run them

    def _node(self, i: int, node: str, xdp: bool | None) -> None:
        """Boot the node's VM (kept if it runs) and put its tap on the switch."""
        data = self._load()
        known = data["vms"].get(node)
        if known and processes.alive(known["pid"]):
            return
        directory = self.vm_dir(node)
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, mode=0o700)
        token = secrets.token_hex(16)
        with open(os.open(os.path.join(directory, "token"), os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(token + "\n")
        port = etcd_server.free_port()
        tap = self.tap(i)
        guest = (f"cd {REPO} && exec {sys.executable} -m xoverlay.lab.vm_guest --underlay-mac {self.mac(2, i)} "
                 f"--underlay-ip {self.node_ip(i)}/{UNDERLAY_NET.prefixlen} --control-mac {self.mac(3, i)} "
                 f"--dir {GUEST_DIR}")
        qemu = (f"-netdev tap,id=underlay,ifname={tap},script=no,downscript=no "
                f"-device virtio-net-pci,netdev=underlay,mac={self.mac(2, i)} "
                f"-netdev user,id=control,net=10.0.2.0/24,restrict=on,"
                f"hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:{vm_control.CONTROL_PORT} "
                f"-device virtio-net-pci,netdev=control,mac={self.mac(3, i)}")
        cmd = [_vng(), "--run", self.kernel, "--name", node, "--cpus", str(VM_CPUS), "--memory", VM_MEMORY,
               "--disable-microvm", *(["--disable-kvm"] if self.accel == "tcg" else []),
               f"--rwdir={GUEST_DIR}={directory}", f"--qemu-opts={qemu}", "--exec", guest]
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", ""))
        with open(os.path.join(directory, "console.log"), "ab") as log:
            proc = subprocess.Popen(cmd, cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                    start_new_session=True)
        data["vms"][node] = {"pid": proc.pid, "port": port, "index": i, "tap": tap}
        self._save(data)
        self._wait(lambda: os.path.exists(f"/sys/class/net/{tap}"), proc, node, 60, "its tap")
        _run("ip", "link", "set", tap, "netns", self.underlay_netns)
        _run("ip", "-n", self.underlay_netns, "link", "set", tap, "master", "br0", "up")

    def _wait(self, done, proc, node: str, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not done():
            if proc is not None and proc.poll() is not None:
                raise XoError(f"the VM of {node} exited while waiting for {what}: see "
                              f"{os.path.join(self.vm_dir(node), 'console.log')}")
            if time.monotonic() > deadline:
                raise XoError(f"the VM of {node}: no {what} after {seconds:.0f} s: see "
                              f"{os.path.join(self.vm_dir(node), 'console.log')}")
            time.sleep(0.2)

    def _agent(self, node: str, xdp: bool, echo, store: str) -> None:
        """Wait for the guest's control channel, then start the agent inside, detached."""
        ready = os.path.join(self.vm_dir(node), "ready")
        self._wait(lambda: os.path.exists(ready), None, node, BOOT_SECONDS, "guest (boot)")
        alive = f"import sys; from xoverlay.kernel.processes import running_pid; sys.exit(not running_pid({node!r}))"
        if self.run(node, [sys.executable, "-c", alive], check=False)[0] == 0:
            return
        # Vagrant's own provisioning step (vagrant/node-up), so the VM lab proves it.
        ip = self.node_ip(self.vm(node)["index"])
        rc, out, err = self.run(node, ["env", f"PATH={os.path.dirname(sys.executable)}:/usr/sbin:/usr/bin:/sbin:/bin",
                                       f"XOVERLAY_STORE={store}", os.path.join(REPO, "vagrant", "node-up"), node, ip,
                                       *([] if xdp is None else ["--xdp" if xdp else "--no-xdp"])],
                                check=False, timeout=AGENT_START_SECONDS)
        if rc != 0:
            raise XoError(f"starting the agent of {node} failed: {(err or out).decode().strip()}")

    def _demo_server(self, backends: list[str]) -> None:
        """Each guest serves its own node's backend (the namespace lab serves all from one
        process on the host)."""
        state = self.store.read()
        for web in backends:
            node = state.endpoints[web].node
            running = self.run(node, ["pgrep", "-f", f"--tag={self.demo_tag}"], check=False)[0] == 0
            if not running:
                self.run(node, [sys.executable, "-m", "xoverlay.lab.demo_server", "--supervise",
                                f"--tag={self.demo_tag}", "--http=80", "--udp=80", "--echo=9000",
                                f"{web}={state.endpoints[web].netns}"], detach=True)

    def _stop_demo_server(self) -> None:
        pass            # it goes with its VM

    # --- running things inside ----------------------------------------------------------

    def where(self, name: str) -> tuple[str | None, list[str]]:
        """(the node whose guest runs it, the command prefix there) for a lab node or an
        endpoint; (None, host prefix) for the client and the underlay."""
        if name in ("client", "underlay"):
            return None, ["nsenter", f"--net={self.netns_of(name)}", "--"]
        if name in self.nodes():
            return name, []
        ep = self.store.read().endpoints.get(name)
        if ep is None:
            raise XoError(f"{name} is neither a lab node nor an endpoint")
        return ep.node, ["ip", "netns", "exec", os.path.basename(ep.netns)]

    def run(self, name: str, argv: list[str], *, check: bool = True, timeout: float | None = 600,
            capture: bool = True, tty: bool = False, detach: bool = False) -> tuple[int, bytes, bytes]:
        """As Lab.run; in a node's guest (through its control channel) for the nodes and
        their endpoints. detach: start it there in a session of its own and return."""
        node, prefix = self.where(name)
        if node is None:
            r = subprocess.run([*prefix, *argv], capture_output=capture, timeout=timeout)
            out = (r.returncode, r.stdout or b"", r.stderr or b"")
        else:
            vm = self.vm(node)
            with open(os.path.join(self.vm_dir(node), "token")) as f:
                token = f.read().strip()
            out = vm_control.run(vm["port"], token, [*prefix, *argv], capture=capture, detach=detach,
                                 timeout=timeout, tty=tty)
        if check and out[0] != 0:
            raise XoError(f"`{' '.join(argv)}` in {name} failed ({out[0]}): {out[2].decode().strip()[-300:]}")
        return out

    def web_requests(self, endpoint: str, count: int = 6) -> tuple[str, list[str]]:
        url = f"http://{WEB_SERVICE}/"
        rc, out, err = self.run(endpoint, [sys.executable, "-c", self._GET, url, str(count)], check=False)
        if rc != 0:
            raise XoError(f"requests from {endpoint} to {url} failed: {err.decode().strip().splitlines()[-1:]}")
        return url, out.decode().split("\n")[:-1]

    # --- down ---------------------------------------------------------------------------

    def _down(self, echo) -> None:
        data = self._load()
        vms = data.get("vms") or {}
        for node, vm in vms.items():
            self._stop_vm(node, vm)
        state = self.store.read()
        if WEB_SERVICE in state.services and state.services[WEB_SERVICE].network == DEMO_NETWORK:
            self.store.update(lambda s: model.remove_service(s, WEB_SERVICE) if WEB_SERVICE in s.services else s)
        for node in self.nodes():
            self.store.update(lambda s, node=node: model.remove_node(s, node) if node in s.nodes else s)
        state = self.store.read()
        if DEMO_NETWORK in state.networks and not any(e.network == DEMO_NETWORK for e in state.endpoints.values()):
            self.store.update(lambda s: model.remove_network(s, DEMO_NETWORK) if DEMO_NETWORK in s.networks else s)
        netns.remove(self.client_netns)
        netns.remove(self.underlay_netns)
        shutil.rmtree(os.path.join(processes.RUN_DIR, "vm"), ignore_errors=True)
        if os.path.exists(self.registry):
            os.unlink(self.registry)
        echo(f"lab down: removed {len(vms)} VMs")

    def _stop_vm(self, node: str, vm: dict) -> None:
        """qemu and virtme-ng, by the session the lab started them in (a crash leaves
        nothing else: the guest's filesystem is overlays in its memory)."""
        pid = vm["pid"]
        processes.terminate(pid, lambda: not processes.group_alive(pid), 5.0, group=True)
        shutil.rmtree(self.vm_dir(node), ignore_errors=True)


def open_lab(store, state_path: str | None, vms: bool = False, kernel: str = "debian12") -> Lab:
    """The lab of this store: a VM lab if asked for or if that is what is up, else the
    namespace lab."""
    lab = Lab(store, state_path)
    if vms or lab._load().get("vms") is not None:
        return VmLab(store, state_path, kernel)
    return lab
