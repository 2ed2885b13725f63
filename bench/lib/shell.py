"""Commands, network namespaces, one benchmark at a time, signals and clean-up, the
machine, /proc. The names of everything a benchmark creates are here, so that a new run
finds and removes what a crashed one left, and nothing else: network namespaces start
with PREFIX, the xoverlay labs keep their state (and so their names) under STATE_ROOT,
and the BPF programs of the cost measurement are pinned under a node of their own."""
from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import signal
import subprocess
import sys

PREFIX = "xbench-"                       # every netns we create
STATE_ROOT = "/tmp/xoverlay-bench"       # state stores of our xoverlay labs
LOCK_PATH = "/run/xoverlay-bench.lock"   # one benchmark at a time
LOCKED = f"another benchmark holds {LOCK_PATH}"    # how a second one is refused
BPF_NODE = "xbench-bpf"                  # pin directory of the cost measurement


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sh(*cmd: str, timeout: float = 60, check: bool = True, input: str | None = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r.stdout


class Host:
    """Where a benchmark's commands run: this machine (a guest of the VM lab is another,
    bench/lib/vm_paths.py). A command enters its netns itself (in_ns)."""
    name = "host"
    patience = 1.0           # how many times longer than here its waits must be

    def run(self, argv: list[str], timeout: float = 60) -> tuple[int, str, str]:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    def start(self, argv: list[str], limit: float) -> subprocess.Popen:
        """argv started, its output piped (text): communicate, poll, terminate, kill and
        wait as Popen's. `limit`: the seconds it may take (a guest enforces it)."""
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def serve(self, argv: list[str]) -> subprocess.Popen:
        """A server for the whole run, its output discarded."""
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)


HOST = Host()


def in_ns(path: str, *cmd: str) -> list[str]:
    """A command run in the network namespace at `path`. nsenter, not `ip netns exec`,
    which remounts /sys and hides bpffs."""
    return ["nsenter", f"--net={path}", "--", *cmd]


def ns_path(name: str) -> str:
    return f"/run/netns/{name}"


def ns_add(name: str) -> str:
    sh("ip", "netns", "add", name)
    # No IPv6 chatter (router solicitations, DAD) in the measurements.
    sh("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
       "net.ipv6.conf.default.disable_ipv6=1")
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return ns_path(name)


def ns_del_prefix(prefix: str) -> list[str]:
    """Remove every netns whose name starts with `prefix` (their veths go with them)."""
    gone = []
    if os.path.isdir("/run/netns"):
        for name in sorted(os.listdir("/run/netns")):
            if name.startswith(prefix):
                sh("ip", "netns", "delete", name, check=False)
                gone.append(name)
    return gone


def ip_batch(ns: str, lines: list[str]) -> None:
    sh("ip", "-n", ns, "-batch", "-", input="\n".join(lines) + "\n")


# --- one at a time, and always cleaned up ------------------------------------------------

class Lock:
    """Refuse to run two benchmarks at once: they would share names and CPUs."""

    def __enter__(self):
        self.fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise BenchError(f"{LOCKED}; wait for it to finish") from None
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(LOCK_PATH)      # leave nothing behind; we still hold the lock
        except FileNotFoundError:
            pass
        os.close(self.fd)


def signals_raise() -> None:
    """Ctrl-C, SIGTERM and SIGHUP unwind as KeyboardInterrupt, so every `finally` runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with it ignored
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def signals_ignore() -> None:
    """While cleaning up: a second Ctrl-C must not leave half the topology behind."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def removed_after(cleanup):
    """The with-block, then cleanup() whatever happened in it, with the signals ignored
    while it runs."""
    try:
        yield
    finally:
        signals_ignore()
        try:
            cleanup()
        finally:
            signals_raise()


def run_locked(name: str, work, errors: tuple = (BenchError,)) -> int:
    """work() holding the lock, Ctrl-C and SIGTERM unwinding it (its removed_after blocks
    clean up). The exit status: 0, 130 when interrupted, 1 on one of `errors` (said in a
    line)."""
    signals_raise()
    try:
        with Lock():
            work()
    except KeyboardInterrupt:
        log("interrupted: everything removed")
        return 130
    except errors as e:
        log(f"{name}: {e}")
        return 1
    return 0


# --- the machine, /proc ------------------------------------------------------------------

def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as f:
            br_nf = f.read().strip() == "1"     # bridged packets also cross iptables
    except OSError:
        br_nf = False
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu,
            "bridge_nf_call_iptables": br_nf,
            "hostname": platform.node(), "iperf3": sh("iperf3", "--version", check=False).split("\n")[0],
            "sockperf": sh("sockperf", "--version", check=False).split("\n")[0].strip()}


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
