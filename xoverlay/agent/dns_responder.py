"""The node's DNS responder: UDP and TCP port 53 on the gateway address (169.254.1.1),
served by a few threads of the agent, in the node's network namespace. What it answers
is decided by xoverlay/core/dns.py (pure); this module is sockets, threads and forwarding.

Forwarding passes the query's bytes through unchanged to the node's own resolvers (the
nameservers of /etc/resolv.conf, re-read when the file changes, or --dns-upstream), over
the transport the client used, and relays the reply; no upstream answering in time
gives SERVFAIL. The wire format is dnslib's; the only framing here is TCP's two-byte
length prefix (RFC 1035 4.2.2)."""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from xoverlay.core import dns
from xoverlay.core.model import GATEWAY_IP
from xoverlay.errors import XoError

log = logging.getLogger("xoverlay.dns")

DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"
IP_FREEBIND = 15                 # bind before the address exists (linux/in.h)
UPSTREAM_TIMEOUT = 2.0           # per upstream, per query
TCP_IDLE = 10.0                  # an idle client connection is closed after this
MAX_TCP_CONNECTIONS = 64
MAX_PENDING_FORWARDS = 256       # UDP queries waiting for an upstream; beyond: dropped
POLL = 0.25                      # how often blocked threads look at the stop flag


# --- upstreams ------------------------------------------------------------------------

def parse_upstream(text: str) -> tuple[str, int]:
    """'10.0.0.2', '10.0.0.2:5353', 'fd00::1' or '[fd00::1]:5353' -> (address, port)."""
    text = text.strip()
    host, port = text, DNS_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise XoError(f"DNS upstream {text!r}: use ADDRESS, ADDRESS:PORT or [IPv6]:PORT")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
        port = int(port)
    except ValueError:
        raise XoError(f"DNS upstream {text!r} is not an IP address with an optional port") from None
    if not 1 <= port <= 65535:
        raise XoError(f"DNS upstream {text!r}: port {port} is out of range")
    return host, port


def nameservers(resolv_conf_text: str) -> list[tuple[str, int]]:
    """The nameservers of a resolv.conf, less our own address (that would loop)."""
    found = []
    for line in resolv_conf_text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            if "%" in parts[1]:
                continue                 # a link-local with a scope: not reachable from here
            try:
                ip = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if str(ip) != GATEWAY_IP:
                found.append((str(ip), DNS_PORT))
    return found


class Upstreams:
    """Fixed ones (--dns-upstream), or the node's resolv.conf, re-read when it changes."""

    def __init__(self, fixed: list[tuple[str, int]] | None = None, path: str = RESOLV_CONF):
        self.fixed, self.path = fixed, path
        self._stamp, self._list = None, []

    def get(self) -> list[tuple[str, int]]:
        if self.fixed:
            return self.fixed
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        except OSError:
            return []
        if stamp != self._stamp:
            try:
                with open(self.path) as f:
                    self._list = nameservers(f.read())
            except OSError:
                self._list = []
            self._stamp = stamp
        return self._list


# --- forwarding -----------------------------------------------------------------------

def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def forward_udp(data: bytes, upstream: tuple[str, int], timeout: float) -> bytes | None:
    with socket.socket(_family(upstream[0]), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect(upstream)                  # only the upstream's own replies come back
        s.send(data)
        deadline = time.monotonic() + timeout
        while True:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            reply = s.recv(65535)
            if len(reply) >= 12 and reply[:2] == data[:2] and reply[2] & 0x80:
                return reply


def forward_tcp(data: bytes, upstream: tuple[str, int], timeout: float) -> bytes | None:
    with socket.create_connection(upstream, timeout=timeout) as s:
        s.sendall(struct.pack("!H", len(data)) + data)
        head = recv_exact(s, 2)
        if head is None:
            return None
        reply = recv_exact(s, struct.unpack("!H", head)[0])
        return reply if reply and reply[:2] == data[:2] else None


def servfail(data: bytes) -> bytes | None:
    """SERVFAIL for a query we could not forward (None if it does not even parse)."""
    try:
        from dnslib import RCODE, DNSRecord
        r = DNSRecord.parse(data).reply(ra=1, aa=0)
        r.header.rcode = RCODE.SERVFAIL
        return r.pack()
    except Exception:
        return None


# --- the server -----------------------------------------------------------------------

class DnsServer:
    """Bound at construction (so that `up` can refuse before changing anything), serving
    after start(), until stop(). set_state() gives it each new view of the store."""

    def __init__(self, node: str, address: str = GATEWAY_IP, port: int = DNS_PORT, forward: bool = True,
                 upstreams: list[tuple[str, int]] | None = None, resolv_conf: str = RESOLV_CONF,
                 timeout: float = UPSTREAM_TIMEOUT):
        self.node, self.address, self.port = node, address, port
        self.forward = forward
        self.upstreams = Upstreams(upstreams, resolv_conf)
        self.timeout = timeout
        self._view = dns.View(loaded=False)
        self._generation = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._tcp_slots = threading.BoundedSemaphore(MAX_TCP_CONNECTIONS)
        self._pending = threading.BoundedSemaphore(MAX_PENDING_FORWARDS)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dns-forward")
        self._last_warning = 0.0
        self.udp = self.tcp = None
        try:
            self.udp = self._bind(socket.SOCK_DGRAM)
            self.tcp = self._bind(socket.SOCK_STREAM)
            self.tcp.listen(64)
        except OSError as e:
            self.close()
            raise XoError(f"DNS responder: cannot listen on {address}:{port}: {e.strerror} "
                          "(another DNS server on this node? `up --no-dns` runs without ours)") from None

    def _bind(self, kind: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # restart over TIME_WAIT
            s.bind((self.address, self.port))
            s.settimeout(POLL)
        except OSError:
            s.close()
            raise
        return s

    # --- state ---------------------------------------------------------------------------

    def set_state(self, state, generation: int | None = None) -> None:
        """A new store view: rebuilt only when the store changed (the agent re-reads it
        every two seconds even without a change)."""
        if generation is not None and generation == self._generation:
            return
        self._view = dns.build_view(state, self.node)      # one reference swap: atomic
        self._generation = generation

    # --- life ----------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("dns-udp", self._serve_udp), ("dns-tcp", self._serve_tcp)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("DNS responder on %s:%d (UDP, TCP), %s", self.address, self.port,
                 "forwarding other names to " + (", ".join(f"{h}:{p}" for h, p in self.upstreams.get())
                                                 or "the nameservers of " + self.upstreams.path + " (none now)")
                 if self.forward else "refusing other names")

    def stop(self) -> None:
        self._stopping.set()
        for t in self._threads:
            t.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.close()

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            if s is not None:
                s.close()

    # --- UDP -----------------------------------------------------------------------------

    def _serve_udp(self) -> None:
        while not self._stopping.is_set():
            try:
                data, addr = self.udp.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("DNS: UDP receive failed")
                time.sleep(POLL)
                continue
            try:
                self._handle_udp(data, addr)
            except Exception:
                log.exception("DNS: query from %s failed", addr[0])

    def _handle_udp(self, data: bytes, addr) -> None:
        d = dns.answer(self._view, addr[0], data, self.forward)
        log.debug("DNS udp %s: %s %s", addr[0], d.action, d.why)
        if d.action == "answer":
            self.udp.sendto(d.reply, addr)
        elif d.action == "forward":
            if not self._pending.acquire(blocking=False):
                return          # flooded: drop, the client retries
            self._pool.submit(self._forward_udp, data, addr)

    def _forward_udp(self, data: bytes, addr) -> None:
        try:
            reply = self._forward(data, tcp=False)
            if reply is not None:
                self.udp.sendto(reply, addr)
        except Exception:
            log.exception("DNS: forwarding for %s failed", addr[0])
        finally:
            self._pending.release()

    def _forward(self, data: bytes, tcp: bool) -> bytes | None:
        ups = self.upstreams.get()
        for upstream in ups:
            try:
                reply = (forward_tcp if tcp else forward_udp)(data, upstream, self.timeout)
            except OSError:
                reply = None
            if reply is not None:
                return reply
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            log.warning("DNS: no upstream answered (%s): SERVFAIL", ", ".join(f"{h}:{p}" for h, p in ups)
                        or f"none in {self.upstreams.path}")
        return servfail(data)

    # --- TCP -----------------------------------------------------------------------------

    def _serve_tcp(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("DNS: TCP accept failed")
                time.sleep(POLL)
                continue
            if not self._tcp_slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._serve_connection, args=(conn, addr), name="dns-tcp-conn",
                             daemon=True).start()

    def _serve_connection(self, conn: socket.socket, addr) -> None:
        """Queries one after another on one connection until the client closes it or
        stays idle (glibc sends its A and AAAA queries on the same connection)."""
        try:
            with conn:
                conn.settimeout(TCP_IDLE)
                while not self._stopping.is_set():
                    head = recv_exact(conn, 2)
                    if head is None:
                        return
                    data = recv_exact(conn, struct.unpack("!H", head)[0])
                    if data is None:
                        return
                    d = dns.answer(self._view, addr[0], data, self.forward, tcp=True)
                    log.debug("DNS tcp %s: %s %s", addr[0], d.action, d.why)
                    reply = d.reply if d.action == "answer" else (
                        self._forward(data, tcp=True) if d.action == "forward" else None)
                    if reply is None:
                        return
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except (OSError, socket.timeout):
            pass
        except Exception:
            log.exception("DNS: TCP connection from %s failed", addr[0])
        finally:
            self._tcp_slots.release()
