"""Starting Debian's etcd (etcd-server) with sane flags: `xoverlay store serve`, the
namespace lab's etcd and the tests' all come from here. No etcd of our own: this only
chooses flags, waits until it answers, and stops it."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass

from xoverlay.errors import XoError

ETCD = "etcd"
READY_SECONDS = 20.0


@dataclass(frozen=True)
class ServerTls:
    """etcd's own certificate, and the CA its clients' certificates must be signed by."""
    cert: str
    key: str
    client_ca: str


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command(name: str, data_dir: str, client_urls: list[str], peer_url: str, tls: ServerTls | None = None,
            advertise: str | None = None) -> list[str]:
    """etcd's command line: one member, its data in `data_dir`, serving clients on
    `client_urls` (https when `tls`, with client certificates required)."""
    cmd = [ETCD, f"--name={name}", f"--data-dir={data_dir}",
           f"--listen-client-urls={','.join(client_urls)}", f"--advertise-client-urls={advertise or client_urls[0]}",
           f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
           f"--initial-cluster={name}={peer_url}", "--initial-cluster-state=new",
           # one update is one transaction: node removal or a big network touches many keys
           "--max-txn-ops=10000",
           # history is only for watches catching up; an hour is plenty (agents resync afresh)
           "--auto-compaction-mode=periodic", "--auto-compaction-retention=1h",
           "--logger=zap", "--log-level=warn"]
    if tls:
        cmd += [f"--cert-file={tls.cert}", f"--key-file={tls.key}", f"--trusted-ca-file={tls.client_ca}",
                "--client-cert-auth"]
    return cmd


def client_urls(host: str, port: int, tls: bool) -> list[str]:
    return [f"{'https' if tls else 'http'}://{host}:{port}"]


def wait_ready(proc: subprocess.Popen | None, host: str, port: int, log: str, timeout: float = READY_SECONDS) -> None:
    """Until etcd accepts connections on host:port (TCP is enough: the first request waits
    for the member to be ready), or fail with its last log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise XoError(f"etcd exited at start ({proc.returncode}): {_last_line(log)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise XoError(f"etcd did not listen on {host}:{port} within {timeout:.0f} s: {_last_line(log)}")


def _last_line(log: str) -> str:
    try:
        with open(log, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1][:300] if lines else "(empty log)"
    except OSError:
        return f"(no log at {log})"


def start(cmd: list[str], log: str, host: str, port: int, netns_path: str | None = None) -> subprocess.Popen:
    """Run etcd detached (its own session: it outlives this command), in `netns_path`
    when given (nsenter execs etcd: same pid); return once it listens on host:port."""
    if netns_path:
        cmd = ["nsenter", f"--net={netns_path}", "--", *cmd]
    with open(log, "ab") as logf:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        except FileNotFoundError:
            raise XoError("etcd is not installed: apt-get install etcd-server (setup.sh does it)") from None
    try:
        wait_ready(proc, host, port, log)      # host:port must be reachable from here
    except BaseException:
        stop(proc.pid)
        raise
    return proc


def stop(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL: etcd syncs its WAL on SIGTERM."""
    from xoverlay.kernel import processes

    def gone() -> bool:
        try:
            os.waitpid(pid, os.WNOHANG)        # our child: reap it, or it stays a zombie
        except ChildProcessError:
            pass
        return not processes.alive(pid)
    processes.terminate(pid, gone, timeout)
