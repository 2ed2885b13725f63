"""The lab's demo backend: run inside an endpoint's netns, it answers with its own name
and the client address it saw (which is how you see that the overlay keeps it):

    HTTP  (TCP, --http, default 80):  "NAME saw CLIENT_IP:PORT\\n" for any request
    UDP   (--udp, default 53):        "NAME saw CLIENT_IP:PORT" for any datagram
    echo  (TCP, --echo, default 9000): "NAME\\n", then every byte it gets back

    nsenter --net=/run/netns/node1-a -- python3 -m xoverlay.lab.demo_server node1-a

Several endpoints from one process: NAME=NETNS_PATH binds NAME's sockets inside that
netns (a socket stays in the netns it was made in). `--supervise` is how the lab runs
it: a small parent that restarts the server if it dies, stops it on SIGTERM, and takes
it along if the parent itself is killed (the child asks for SIGTERM on its parent's
death); `--ready-fd` gets "ok" once the first server listens.
"""
from __future__ import annotations

import argparse
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(name: str, http_port: int = 80, udp_port: int = 53, echo_port: int = 9000,
          netns_path: str | None = None) -> list:
    class Http(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            body = f"{name} saw {self.client_address[0]}:{self.client_address[1]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(f"{name}\n".encode())
            while data := self.request.recv(65536):
                self.request.sendall(data)

    class Udp(socketserver.BaseRequestHandler):
        def handle(self):
            _, sock = self.request
            sock.sendto(f"{name} saw {self.client_address[0]}:{self.client_address[1]}".encode(),
                        self.client_address)

    class Tcp(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    import contextlib

    from xoverlay.kernel import netns
    with netns.entered(netns_path) if netns_path else contextlib.nullcontext():
        servers = [ThreadingHTTPServer(("0.0.0.0", http_port), Http)]
        if echo_port:
            servers.append(Tcp(("0.0.0.0", echo_port), Echo))
        if udp_port:
            servers.append(socketserver.ThreadingUDPServer(("0.0.0.0", udp_port), Udp))
    for s in servers:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    return servers


def _die_with_parent() -> None:
    """SIGTERM when the process that started us goes (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def supervise(argv: list[str], ready_fd: int) -> None:
    """Run the server (argv without --supervise) as a child and restart it when it
    exits, at most once a second; SIGTERM stops both."""
    import os
    import signal
    import subprocess
    import time
    stopping = False
    child = None

    def stop(*_):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "xoverlay.lab.demo_server", "--child", *argv],
                                 stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline().strip()
        if ready_fd >= 0:
            os.write(ready_fd, b"ok\n" if line == "listening" else f"{line or 'exited'}\n".encode())
            os.close(ready_fd)
            ready_fd = -1
            if line != "listening":
                child.wait()
                sys.exit(1)
        child.wait()
        if not stopping:
            print(f"demo server exited ({child.returncode}); restarting", file=sys.stderr, flush=True)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="+", metavar="NAME[=NETNS_PATH]")
    p.add_argument("--http", type=int, default=80)
    p.add_argument("--udp", type=int, default=53, help="0: none")
    p.add_argument("--echo", type=int, default=9000, help="0: none")
    p.add_argument("--supervise", action="store_true", help="run as a child, restarted when it dies")
    p.add_argument("--ready-fd", type=int, default=-1)
    p.add_argument("--tag", default="", help="a mark in the command line, for finding the process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.supervise:
        argv = [*a.names, f"--http={a.http}", f"--udp={a.udp}", f"--echo={a.echo}", f"--tag={a.tag}"]
        supervise(argv, a.ready_fd)
        return
    if a.child:
        _die_with_parent()
    try:
        for spec in a.names:
            name, _, path = spec.partition("=")
            serve(name, a.http, a.udp, a.echo, path or None)
    except Exception as e:          # a port taken, a netns gone: say so, the supervisor retries
        print(f"cannot serve: {e}", flush=True)
        sys.exit(1)
    print("listening", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
