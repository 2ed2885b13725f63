"""The first process of a VM lab node (virtme-ng runs it as the guest's command): names
and addresses its two NICs, found by the MACs the host gave them (the underlay one
becomes eth1, as on the namespace lab's nodes; the control one gets qemu's user-network
address and no route), mounts bpffs, and serves the control channel until the VM is
stopped. The host then starts the agent and everything else through that channel."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from xoverlay.lab import vm_control

UNDERLAY_DEV, CONTROL_DEV = "eth1", "ctl0"
CONTROL_IP = "10.0.2.15"          # qemu user networking's guest address


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _device_with_mac(mac: str) -> str:
    for name in os.listdir("/sys/class/net"):
        try:
            with open(f"/sys/class/net/{name}/address") as f:
                if f.read().strip() == mac.lower():
                    return name
        except OSError:
            continue
    raise SystemExit(f"xoverlay vm: no NIC with MAC {mac}")


def _nic(mac: str, name: str, address: str) -> None:
    dev = _device_with_mac(mac)
    if dev != name:
        _sh("ip", "link", "set", dev, "down")
        _sh("ip", "link", "set", dev, "name", name)
    _sh("ip", "addr", "add", address, "dev", name)
    _sh("ip", "link", "set", name, "up")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m xoverlay.lab.vm_guest")
    p.add_argument("--underlay-mac", required=True)
    p.add_argument("--underlay-ip", required=True, help="ADDRESS/PREFIX")
    p.add_argument("--control-mac", required=True)
    p.add_argument("--dir", required=True, help="the directory shared with the host (token, logs)")
    a = p.parse_args(argv)
    log = os.open(os.path.join(a.dir, "guest.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    with open(os.path.join(a.dir, "token")) as f:
        token = f.read().strip()
    if not os.path.ismount("/sys/fs/bpf"):
        _sh("mount", "-t", "bpf", "bpf", "/sys/fs/bpf")
    _sh("ip", "link", "set", "lo", "up")
    _sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    _nic(a.underlay_mac, UNDERLAY_DEV, a.underlay_ip)
    # As on a Docker host, and as the namespace lab's nodes: the underlay forwards, so the
    # data path's FIB lookups answer (docs/DESIGN.md).
    _sh("sysctl", "-qw", f"net.ipv4.conf.{UNDERLAY_DEV}.forwarding=1")
    _nic(a.control_mac, CONTROL_DEV, f"{CONTROL_IP}/24")
    server = vm_control.Server((CONTROL_IP, vm_control.CONTROL_PORT), token, a.dir)
    with open(os.path.join(a.dir, "ready"), "w") as f:
        f.write(f"{os.uname().release}\n")
    print(f"xoverlay vm: {os.uname().nodename} on {os.uname().release}, control on {CONTROL_IP}:"
          f"{vm_control.CONTROL_PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
