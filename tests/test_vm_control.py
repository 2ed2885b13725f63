"""The VM lab's control channel (xoverlay/lab/vm_control.py), its guest side served on
this machine's loopback: what `lab exec` and the forwarded `status`/`monitor` rely on in
a VM (exit status, both output streams, end of input, signals, the token, detached
commands, a terminal and its size), checked without booting one."""
from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import sys
import termios
import threading
import time

import pytest

from xoverlay.errors import XoError
from xoverlay.lab import vm_control

TOKEN = "s3cret"


@pytest.fixture
def guest(tmp_path):
    """A control server as a guest runs it, on 127.0.0.1: its port."""
    server = vm_control.Server(("127.0.0.1", 0), TOKEN, str(tmp_path))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_command_gives_its_status_and_both_streams(guest):
    rc, out, err = vm_control.run(guest, TOKEN, ["sh", "-c", "echo out; echo err >&2; exit 3"], capture=True,
                                  timeout=30)
    assert (rc, out, err) == (3, b"out\n", b"err\n")


def test_a_command_reads_end_of_input(guest):
    assert vm_control.run(guest, TOKEN, ["cat"], capture=True, timeout=30) == (0, b"", b"")


def test_a_missing_command_is_127_with_its_name(guest):
    rc, _, err = vm_control.run(guest, TOKEN, ["/nonexistent/cmd"], capture=True, timeout=30)
    assert rc == 127 and b"/nonexistent/cmd" in err


def test_a_wrong_token_runs_nothing(guest, tmp_path):
    mark = tmp_path / "ran"
    rc, _, err = vm_control.run(guest, "wrong", ["touch", str(mark)], capture=True, timeout=30)
    assert rc == 255 and b"bad token" in err
    time.sleep(0.3)
    assert not mark.exists()


def test_a_port_nobody_serves_is_a_clear_error():
    with pytest.raises(XoError, match="does not answer"):
        vm_control.run(1, TOKEN, ["true"], timeout=5)


def test_a_detached_command_answers_at_once_with_its_pid(guest, tmp_path):
    mark = tmp_path / "done"
    t0 = time.monotonic()
    rc, out, _ = vm_control.run(guest, TOKEN, ["sh", "-c", f"sleep 1; touch {mark}"], capture=True,
                                detach=True, timeout=30)
    assert rc == 0 and time.monotonic() - t0 < 1
    pid = int(out)
    deadline = time.monotonic() + 10
    while not mark.exists():
        assert time.monotonic() < deadline, "the detached command never finished"
        time.sleep(0.1)
    os.waitpid(pid, 0)        # it is our child here (in a guest, the server's)


def test_sigterm_on_the_host_reaches_the_command(guest):
    """The host's SIGTERM (or Ctrl-C) goes to the command in the guest, which ends."""
    child = os.fork()
    if child == 0:                                   # the host side, in a process of its own
        try:
            rc, _, _ = vm_control.run(guest, TOKEN, ["sleep", "30"], capture=True, timeout=60)
            os._exit(rc & 0xff)
        finally:
            os._exit(99)
    time.sleep(1)
    t0 = time.monotonic()
    os.kill(child, signal.SIGTERM)
    _, status = os.waitpid(child, 0)
    assert time.monotonic() - t0 < 5
    assert os.waitstatus_to_exitcode(status) == (-signal.SIGTERM) & 0xff


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_a_terminal_gets_its_size_and_follows_a_resize(guest):
    """With a terminal on the host, the command runs on a pty of the host's size, and a
    resized window (SIGWINCH) resizes it."""
    script = ("from xoverlay.lab import vm_control; import sys; "
              f"sys.exit(vm_control.run({guest}, {TOKEN!r}, ['sh', '-c', "
              "'stty size; while [ \"$(stty size)\" = \"30 100\" ]; do sleep 0.1; done; stty size'], tty=True)[0])")
    master, slave = os.openpty()
    _set_size(slave, 30, 100)             # before the request: its first size
    pid = os.fork()
    if pid == 0:                          # the host side, on a terminal of its own
        try:
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            os.execv(sys.executable, [sys.executable, "-c", script])
        finally:
            os._exit(127)
    os.close(slave)
    text = b""
    deadline = time.monotonic() + 30

    def read_until(what: bytes) -> None:
        nonlocal text
        while what not in text:
            assert time.monotonic() < deadline, text
            if select.select([master], [], [], 0.5)[0]:
                try:
                    text += os.read(master, 4096)
                except OSError:
                    break
    status = None
    try:
        read_until(b"30 100")
        _set_size(master, 40, 120)        # the kernel sends the host side SIGWINCH
        read_until(b"40 120")
        status = _reap(pid, 10)
    finally:
        if status is None:                # the size never came: the host side would wait forever
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0
    assert text.index(b"30 100") < text.index(b"40 120")


def _reap(pid: int, seconds: float) -> int | None:
    """The wait status of a child that ends within `seconds`, else None (still running)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    return None


def test_end_of_input_closes_the_commands_stdin_once(guest):
    """The number freed by closing the command's stdin is taken by the next descriptor the
    guest opens (in a guest: the next connection's socket, and `lab up` failed with "env:
    Bad file descriptor"); closing stdin a second time must not close that one."""
    import gc
    done = []
    runner = threading.Thread(target=lambda: done.append(
        vm_control.run(guest, TOKEN, ["sh", "-c", "cat; sleep 0.6"], capture=True, timeout=30)))
    runner.start()
    time.sleep(0.3)                 # end of input has been passed on; the command still runs
    pipes = [os.pipe() for _ in range(4)]
    try:
        runner.join(30)
        gc.collect()
        assert done == [(0, b"", b"")]
        for r, w in pipes:
            os.fstat(r), os.fstat(w)
    finally:
        for fds in pipes:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
