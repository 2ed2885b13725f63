"""The lab's demo backend: run inside an endpoint's netns, it answers with its own name
and the client address it saw (which is how you see that the overlay keeps it):

    HTTP  (TCP, --http, default 80):  "NAME saw CLIENT_IP:PORT\\n" for any request
    UDP   (--udp, default 53):        "NAME saw CLIENT_IP:PORT" for any datagram
    echo  (TCP, --echo, default 9000): "NAME\\n", then every byte it gets back

    nsenter --net=/run/netns/node1-a -- python3 -m ctl.demo_server node1-a
"""
from __future__ import annotations

import argparse
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(name: str, http_port: int = 80, udp_port: int = 53, echo_port: int = 9000) -> list:
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

    servers = [ThreadingHTTPServer(("0.0.0.0", http_port), Http), Tcp(("0.0.0.0", echo_port), Echo),
               socketserver.ThreadingUDPServer(("0.0.0.0", udp_port), Udp)]
    for s in servers:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    return servers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--http", type=int, default=80)
    p.add_argument("--udp", type=int, default=53)
    p.add_argument("--echo", type=int, default=9000)
    a = p.parse_args()
    serve(a.name, a.http, a.udp, a.echo)
    print("listening", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
