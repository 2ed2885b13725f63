"""Clients for the services tests, run inside an endpoint's netns; each prints one JSON
line (and, for `stream`, progress lines before it).

    http VIP PORT N        N requests, a new connection each: the backends that answered
    udp VIP PORT N         N datagrams from N sockets: the answers
    stream VIP PORT SECS   one TCP connection, a 64-byte ping-pong every 20 ms for SECS:
                           its backend first ("backend NAME"), then how it went
    bulk VIP PORT MIB      MIB megabytes through the echo port and back, checked
"""
from __future__ import annotations

import json
import socket
import sys
import time


def http(vip: str, port: int, n: int) -> dict:
    seen, errors = [], []
    for _ in range(n):
        try:
            with socket.create_connection((vip, port), timeout=3) as c:
                c.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
                data = b""
                while chunk := c.recv(4096):
                    data += chunk
            seen.append(data.split(b"\r\n\r\n", 1)[1].decode().strip())
        except OSError as e:
            errors.append(type(e).__name__)
    return {"answers": seen, "errors": errors}


def udp(vip: str, port: int, n: int) -> dict:
    seen, errors = [], []
    for _ in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            try:
                s.sendto(b"hello", (vip, port))
                data, addr = s.recvfrom(4096)
                seen.append({"answer": data.decode(), "from": f"{addr[0]}:{addr[1]}",
                             "port": s.getsockname()[1]})
            except OSError as e:
                errors.append(type(e).__name__)
    return {"answers": seen, "errors": errors}


def bulk(vip: str, port: int, mib: int) -> dict:
    """MIB megabytes to the echo port and back, full-size segments both ways: every byte
    must come back intact through DNAT and reverse NAT."""
    import hashlib
    import os
    import threading
    data = os.urandom(1 << 20) * mib
    c = socket.create_connection((vip, port), timeout=30)
    f = c.makefile("rb")
    backend = f.readline().decode().strip()
    threading.Thread(target=c.sendall, args=(data,), daemon=True).start()
    got = f.read(len(data))
    return {"backend": backend, "sent": len(data), "received": len(got),
            "intact": hashlib.sha256(got).digest() == hashlib.sha256(data).digest()}


def stream(vip: str, port: int, seconds: float) -> dict:
    start = time.monotonic()
    c = socket.create_connection((vip, port), timeout=5)
    c.settimeout(10)
    f = c.makefile("rb")
    backend = f.readline().decode().strip()
    print(f"backend {backend}", flush=True)
    peer = c.getpeername()
    rounds, max_gap, last, ended = 0, 0.0, time.monotonic(), "done"
    msg = b"x" * 64
    try:
        while time.monotonic() - start < seconds:
            c.sendall(msg)
            got = f.read(len(msg))
            if len(got) != len(msg):
                ended = "closed"
                break
            now = time.monotonic()
            max_gap, last = max(max_gap, now - last), now
            rounds += 1
            time.sleep(0.02)
    except OSError as e:
        ended = type(e).__name__
    return {"backend": backend, "peer": f"{peer[0]}:{peer[1]}", "rounds": rounds, "max_gap": round(max_gap, 3),
            "ended": ended, "after": round(time.monotonic() - start, 3)}


if __name__ == "__main__":
    cmd, vip, port, arg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    fn = {"http": lambda: http(vip, port, int(arg)), "udp": lambda: udp(vip, port, int(arg)),
          "stream": lambda: stream(vip, port, float(arg)), "bulk": lambda: bulk(vip, port, int(arg))}[cmd]
    print(json.dumps(fn()), flush=True)
