"""The VM lab's control channel: run a command in a guest from the host, as ssh would,
without an sshd. The guest serves TCP on its control NIC (qemu user networking, which
the host reaches on a forwarded port of its own loopback: no other netns or host can);
a request carries a token that only root on the host can read.

Frames both ways: one type byte, a 4-byte big-endian length, the payload.
  host -> guest  R request (JSON: token, argv, tty, rows, cols, detach)
                 I stdin bytes (empty: end of input)   S a signal number   W rows,cols
  guest -> host  O stdout bytes   E stderr bytes   X exit status (JSON; -N: killed by N)
A detached request starts the command in a session of its own, its output to a log
file, and answers X 0 at once with its pid on O."""
from __future__ import annotations

import fcntl
import hmac
import json
import os
import pty
import select
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import termios
import threading
import time
import tty as ttymod

from xoverlay.agent.dns_responder import recv_exact
from xoverlay.errors import XoError

CONTROL_PORT = 7000        # in the guest, on its control NIC


def send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(kind + struct.pack("!I", len(payload)) + payload)


def recv(sock: socket.socket) -> tuple[bytes, bytes] | None:
    head = recv_exact(sock, 5)
    if head is None:
        return None
    kind, n = head[:1], struct.unpack("!I", head[1:])[0]
    body = recv_exact(sock, n) if n else b""
    return None if body is None else (kind, body)


# --- the guest's side ---------------------------------------------------------------------

class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], token: str, log_dir: str):
        self.token, self.log_dir = token, log_dir
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        first = recv(sock)
        if first is None or first[0] != b"R":
            return
        req = json.loads(first[1])
        if not hmac.compare_digest(str(req.get("token", "")), self.server.token):
            send(sock, b"E", b"xoverlay vm: bad token\n")
            send(sock, b"X", b"255")
            return
        try:
            if req.get("detach"):
                self._detached(sock, req["argv"])
            elif req.get("tty"):
                self._with_pty(sock, req)
            else:
                self._with_pipes(sock, req["argv"])
        except OSError as e:         # no such command, or the host went away
            try:
                send(sock, b"E", f"xoverlay vm: {req['argv'][0]}: {e.strerror}\n".encode())
                send(sock, b"X", b"127")
            except OSError:
                pass

    def _detached(self, sock, argv):
        log = os.path.join(self.server.log_dir, f"{os.path.basename(argv[0])}-{time.time_ns()}.log")
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        send(sock, b"O", f"{proc.pid}\n".encode())
        send(sock, b"X", b"0")

    def _with_pipes(self, sock, argv):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        pumps = [threading.Thread(target=_pump, args=(proc.stdout.fileno(), sock, b"O"), daemon=True),
                 threading.Thread(target=_pump, args=(proc.stderr.fileno(), sock, b"E"), daemon=True)]
        for t in pumps:
            t.start()
        self._follow_host(sock, proc, proc.stdin.fileno(), close_input=proc.stdin.close)
        for t in pumps:
            t.join()
        send(sock, b"X", str(proc.wait()).encode())

    def _with_pty(self, sock, req):
        pid, fd = pty.fork()
        if pid == 0:
            try:
                os.execvp(req["argv"][0], req["argv"])
            finally:
                os._exit(127)
        _winsize(fd, req.get("rows", 24), req.get("cols", 80))
        proc = _Child(pid)
        pump = threading.Thread(target=_pump, args=(fd, sock, b"O"), daemon=True)
        pump.start()
        self._follow_host(sock, proc, fd, pty_fd=fd)
        pump.join()
        send(sock, b"X", str(proc.wait()).encode())

    def _follow_host(self, sock, proc, stdin_fd: int, pty_fd: int | None = None, close_input=None):
        """Pass the host's input, signals and window size on until the command ends;
        the host gone ends the command (SIGHUP to its session). End of input is closed
        through its owner (close_input): an os.close here would leave Popen's file object
        to close the same number again later, by then another connection's socket."""
        while proc.poll() is None:
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            frame = recv(sock)
            if frame is None:
                _signal(proc.pid, signal.SIGHUP)
                return
            kind, body = frame
            if kind == b"I":
                if body:
                    os.write(stdin_fd, body)
                elif close_input is not None:
                    close_input()
            elif kind == b"S":
                _signal(proc.pid, int(body))
            elif kind == b"W" and pty_fd is not None:
                rows, cols = (int(x) for x in body.split(b","))
                _winsize(pty_fd, rows, cols)


class _Child:
    """What _follow_host needs of a pty child: poll, wait and pid, like Popen."""

    def __init__(self, pid: int):
        self.pid, self.status = pid, None

    def poll(self):
        if self.status is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def wait(self):
        if self.status is None:
            self.status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.status


def _pump(fd: int, sock: socket.socket, kind: bytes) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:             # a pty whose child has gone: EIO
            return
        if not data:
            return
        try:
            send(sock, kind, data)
        except OSError:
            return


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# --- the host's side ----------------------------------------------------------------------

def run(port: int, token: str, argv: list[str], *, tty: bool = False, capture: bool = False,
        detach: bool = False, timeout: float | None = None) -> tuple[int, bytes, bytes]:
    """Run argv in the guest whose control port the host reaches on 127.0.0.1:`port`.
    Output streams to this process's stdout and stderr (or is returned with capture);
    Ctrl-C and SIGTERM go to the command. Returns (exit status, stdout, stderr)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout or 30)
    except OSError as e:
        raise XoError(f"the VM's control port 127.0.0.1:{port} does not answer ({e.strerror or e}): "
                      "is the VM lab up?") from None
    sock.settimeout(timeout)
    rows, cols = 24, 80
    if tty and sys.stdout.isatty():
        size = os.get_terminal_size()
        rows, cols = size.lines, size.columns
    send(sock, b"R", json.dumps({"token": token, "argv": argv, "tty": tty, "rows": rows, "cols": cols,
                                 "detach": detach}).encode())
    if not tty:
        send(sock, b"I")                        # no input: the command reads end of file
    out, err = bytearray(), bytearray()
    forwarded = {}

    def forward(sig, _frame):
        try:
            send(sock, b"S", str(sig).encode())
        except OSError:
            pass
    def resize(_sig, _frame):
        size = os.get_terminal_size()
        try:
            send(sock, b"W", f"{size.lines},{size.columns}".encode())
        except OSError:
            pass
    main = threading.current_thread() is threading.main_thread()
    if main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            forwarded[sig] = signal.signal(sig, forward)
        if tty and sys.stdout.isatty():         # the window resized: so is the command's pty
            forwarded[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resize)
    saved = None
    if tty and sys.stdin.isatty():
        saved = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setraw(sys.stdin.fileno())
    try:
        status = None
        typing = saved is not None            # a terminal's keys go to the command's pty
        while status is None:
            ready, _, _ = select.select([sock] + ([sys.stdin] if typing else []), [], [], timeout)
            if not ready:
                raise XoError(f"the command in the VM did not finish within {timeout} s: {' '.join(argv)}")
            if sys.stdin in ready:
                keys = os.read(sys.stdin.fileno(), 4096)
                typing = bool(keys)
                send(sock, b"I", keys)
                continue
            frame = recv(sock)
            if frame is None:
                raise XoError("the VM closed its control connection (did it stop?)")
            kind, body = frame
            if kind == b"X":
                status = int(body)
            elif capture:
                (out if kind == b"O" else err).extend(body)
            else:
                stream = sys.stdout if kind == b"O" else sys.stderr
                stream.buffer.write(body)
                stream.flush()
        return status, bytes(out), bytes(err)
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        sock.close()
