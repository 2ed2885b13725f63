"""Processes on this machine: a node's agent by its locked pid file, any process by pid
and start time, and stopping one. The agent, the lab, the monitor and etcd's wrapper all
find and stop processes through these."""
from __future__ import annotations

import fcntl
import os
import signal
import time

from xoverlay.errors import XoError

RUN_DIR = "/run/xoverlay"      # agents' pid files and logs, the lab's registries


def pid_path(node: str) -> str:
    return os.path.join(RUN_DIR, f"{node}.pid")


def log_path(node: str) -> str:
    return os.path.join(RUN_DIR, f"{node}.log")


def running_pid(node: str) -> int | None:
    """Pid of the node's live agent, from its pid file (None if none runs)."""
    try:
        with open(pid_path(node)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    try:
        fd = os.open(pid_path(node), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None         # nobody holds the lock: a stale file
        except BlockingIOError:
            return pid
        finally:
            os.close(fd)
    except OSError:
        return None


def release_pid_lock(node: str, fd: int) -> None:
    try:
        os.unlink(pid_path(node))
    except FileNotFoundError:
        pass
    os.close(fd)


def take_pid_lock(node: str) -> int:
    """Hold an exclusive lock on the node's pid file for the agent's life."""
    os.makedirs(RUN_DIR, exist_ok=True)
    fd = os.open(pid_path(node), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise XoError(f"an agent for node {node} is already running (pid {running_pid(node)})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def write_pidfile(path: str, pid: int) -> None:
    with open(path, "w") as f:
        f.write(f"{pid}\n")


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def pids_with(words: list[str]) -> list[int]:
    """Processes whose command line holds every one of these arguments."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            argv = cmdline(int(entry))
            if all(w in argv for w in words):
                out.append(int(entry))
    return out


def proc_start(pid: int) -> int | None:
    """Start time of a process, in clock ticks since boot (/proc/PID/stat field 22);
    None if there is no such process. With the pid it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain anything.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def owner_alive(pid: int, start: int) -> bool:
    return pid > 0 and start > 0 and proc_start(pid) == start


def pid_in_file(path: str, tag: str) -> int | None:
    """The pid written in `path` if that process is alive and its command line holds `tag`:
    a pid file outlives its process, and by then the number may be another's."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and alive(pid) and tag in cmdline(pid) else None


def terminate(pid: int, gone, timeout: float, group: bool = False) -> None:
    """SIGTERM, and SIGKILL if `gone()` is still false after `timeout` seconds. group: to
    the process group `pid` leads (a session the caller started, with its children)."""
    send = os.killpg if group else os.kill
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            send(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group `pgid` (its leader may be gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def terminate_all(pids: list[int], timeout: float) -> None:
    """SIGTERM to each, then SIGKILL to those still alive `timeout` seconds later."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        try:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_agent(node: str, timeout: float = 5.0) -> None:
    """The node's agent, by its pid file: SIGTERM, SIGKILL after `timeout` seconds."""
    pid = running_pid(node)
    if pid:
        terminate(pid, lambda: running_pid(node) is None, timeout)
