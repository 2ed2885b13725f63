"""xoverlay/kernel/processes.py on real processes of the test's own: pid files that
outlive their process, and stopping one, several, or a whole process group (a child
that ignores SIGTERM gets SIGKILL)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from xoverlay.kernel import processes

# Ignores SIGTERM, so only SIGKILL ends it; prints once it has done so.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


def _stubborn() -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _gone(p: subprocess.Popen) -> bool:
    return p.poll() is not None


def test_pid_in_file_names_only_the_live_process_with_the_tag(tmp_path):
    pidfile = str(tmp_path / "demo.pid")
    assert processes.pid_in_file(pidfile, "sleep") is None                   # no file
    p = subprocess.Popen(["sleep", "30"])
    try:
        processes.write_pidfile(pidfile, p.pid)
        assert processes.pid_in_file(pidfile, "sleep") == p.pid
        assert processes.pid_in_file(pidfile, "xoverlay.lab.demo_server") is None   # someone else's pid now
    finally:
        p.kill()
        p.wait()
    assert processes.pid_in_file(pidfile, "sleep") is None                   # the file outlived it
    (tmp_path / "demo.pid").write_text("garbage\n")
    assert processes.pid_in_file(pidfile, "sleep") is None


def test_terminate_sends_sigkill_when_sigterm_is_ignored():
    p = _stubborn()
    started = time.monotonic()
    processes.terminate(p.pid, lambda: _gone(p), 0.5)
    assert _gone(p) and p.returncode == -9
    assert time.monotonic() - started < 5


def test_terminate_a_group_reaches_the_leaders_children():
    leader = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {STUBBORN!r}]); time.sleep(60)"],
                              start_new_session=True)
    try:
        deadline, children = time.monotonic() + 10, []
        while not children and time.monotonic() < deadline:
            children = [int(e) for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == leader.pid]
            time.sleep(0.05)
        assert children
        # The leader dies of SIGTERM at once; its child ignores it: only a wait for the
        # whole group gets the child its SIGKILL. Its end is counted when it is reaped (by
        # pid 1, the leader being gone: here that took ~2 s), hence the longer timeout.
        processes.terminate(leader.pid, lambda: _gone(leader) and not processes.group_alive(leader.pid), 3.0,
                            group=True)
        assert _gone(leader) and not any(processes.alive(c) for c in children)
        assert not processes.group_alive(leader.pid)
    finally:
        if not _gone(leader):
            leader.kill()
            leader.wait()


def test_terminate_all_stops_every_one_and_waits_for_them_together():
    quick = subprocess.Popen(["sleep", "30"])
    stubborn = [_stubborn(), _stubborn()]
    started = time.monotonic()
    processes.terminate_all([quick.pid] + [p.pid for p in stubborn] + [2 ** 22 + 1], 1.0)   # and one long gone
    elapsed = time.monotonic() - started
    for p in [quick, *stubborn]:
        p.wait(timeout=5)
    assert quick.returncode == -15 and [p.returncode for p in stubborn] == [-9, -9]
    assert elapsed < 1.9, "the timeout runs once for all (one per stubborn process would be 2 s)"


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
