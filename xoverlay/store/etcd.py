"""The cluster store on etcd (v3 API through its HTTP gateway, with etcd3gw), for clusters
that span machines. Same interface as the SQLite store (xoverlay/store/__init__.py):

  PREFIX/o/KIND/NAME   one object of the State, JSON (the same bodies as SQLite's rows)
  PREFIX/generation    a counter every changing update increments
  PREFIX/alive/NODE    a node's registration, attached to its agent's lease

update() reads everything at one revision, runs the pure change, and writes the
difference in one transaction that holds only if the generation key was not modified
since that read (compare-and-swap); on conflict it reads again and retries. So
allocations (IPAM, VNIs, names) are as atomic as SQLite's BEGIN IMMEDIATE, across
machines. wait() blocks on a watch of the generation key, not on polling."""
from __future__ import annotations

import base64
import json
import math
import random
import threading
import time
from typing import Callable

import requests
import urllib3
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from xoverlay.core.model import State
from xoverlay.errors import XoError
from xoverlay.store.base import ETCD_SCHEME, Store, StoreUnavailable, Tls, changes, state_of

DEFAULT_PORT = 2379
DEFAULT_PREFIX = "/xoverlay"
CONNECT_TIMEOUT = 2.0      # seconds: an etcd that is gone should be noticed quickly
REQUEST_TIMEOUT = 10.0
WATCH_IDLE = 30.0          # a silent watch is re-made this often (finds half-open TCP)
UPDATE_SECONDS = 15.0      # how long update() retries conflicts (SQLite waits 15 s for its lock too)
PAGE = 2000                # keys per range request of a full read
ETCD_MAX_TXN_OPS = 128     # etcd's default --max-txn-ops (`xoverlay store serve` sets 10000)


def idle_timeout(e: BaseException) -> bool:
    """The watch stream was only quiet for WATCH_IDLE seconds: requests turns urllib3's
    read timeout during a streamed body into a ConnectionError that carries it."""
    return isinstance(e, requests.exceptions.ConnectionError) and bool(e.args) \
        and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError)


def parse_url(url: str) -> tuple[str, int, str]:
    """etcd://HOST[:PORT][/PREFIX] -> (host, port, key prefix)."""
    if not url.startswith(ETCD_SCHEME):
        raise XoError(f"store {url}: an etcd store is etcd://HOST:PORT[/PREFIX]")
    rest = url[len(ETCD_SCHEME):]
    hostport, _, path = rest.partition("/")
    host, port = hostport, str(DEFAULT_PORT)
    if hostport.startswith("["):                       # [v6]:port
        host, _, tail = hostport[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else port
    elif ":" in hostport:
        host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise XoError(f"store {url}: an etcd store is etcd://HOST:PORT[/PREFIX] (bad host or port)")
    prefix = "/" + path.strip("/") if path.strip("/") else DEFAULT_PREFIX
    return host, int(port), prefix


def explain(url: str, text: str, tls: bool) -> XoError:
    """One line for a failed request to etcd: StoreUnavailable when retrying may help
    (etcd down, network), a plain XoError when the setup is wrong (TLS, certificates)."""
    low = text.lower()
    if "certificate verify failed" in low or "certificate_verify_failed" in low:
        return XoError(f"store {url}: etcd's TLS certificate is not signed by --store-ca "
                       "(certificate verify failed): give the CA that signed etcd's certificate")
    if "wrong version number" in low or ("ssl" in low and "record layer" in low):
        return XoError(f"store {url}: etcd does not speak TLS there: drop --store-ca/--store-cert/--store-key "
                       "or point at etcd's https port")
    if "http request to an https server" in low:
        return XoError(f"store {url}: etcd wants TLS: give --store-ca (and --store-cert/--store-key)")
    if "bad certificate" in low or "certificate required" in low or "unknown ca" in low or (
            tls and "eof occurred in violation of protocol" in low):
        return XoError(f"store {url}: etcd refused our client certificate: give --store-cert/--store-key, "
                       "signed by the CA etcd trusts")
    if "too many operations in txn" in low:
        return XoError(f"store {url}: etcd refused a transaction this large: raise etcd's --max-txn-ops "
                       "(`xoverlay store serve` sets 10000)")
    if not tls and "closed connection without response" in low:
        return XoError(f"store {url}: etcd closed the connection without answering: if it serves TLS, give "
                       "--store-ca (and --store-cert/--store-key)")
    if tls and ("ssl" in low or "tls" in low):
        return XoError(f"store {url}: TLS failed: {text.strip().splitlines()[-1][:200]}")
    known = ("connection refused", "no route to host", "network is unreachable", "name or service not known",
             "temporary failure in name resolution", "connection reset", "connection closed", "timed out")
    reason = next((k for k in known if k in low), None) or ("timed out" if "timeout" in low else
                                                            text.strip().splitlines()[-1][:120] or "no answer")
    return StoreUnavailable(f"store {url} is unreachable: {reason}")


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _text(b64: str | None) -> str:
    return base64.b64decode(b64 or "").decode()


def _put(key: str, value: str, lease: int = 0) -> dict:
    put = {"key": _b64(key), "value": _b64(value)}
    if lease:
        put["lease"] = lease
    return {"request_put": put}


def _after(prefix: str) -> str:
    """The range end that covers every key starting with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class EtcdStore(Store):
    def __init__(self, url: str, tls: Tls = Tls()):
        self.url = self.where = url
        self.host, self.port, self.prefix = parse_url(url)
        if bool(tls.cert) != bool(tls.key):
            raise XoError("--store-cert and --store-key go together (the client certificate and its key)")
        self.tls = tls
        self.gen_key = f"{self.prefix}/generation"
        self.obj_prefix = f"{self.prefix}/o/"
        self.alive_prefix = f"{self.prefix}/alive/"
        self.client = self._client()
        self._lease = None                 # (node, ttl, info, lease id) once registered
        self._cache = None                 # (generation, State) of the last full read
        self._cond = threading.Condition()
        self._watch_gen = None             # the generation as the watch last saw it
        self._watch_live = False           # the watch is connected and caught up
        self._watcher = None
        self._closed = False

    def _client(self) -> Etcd3Client:
        client = Etcd3Client(host=self.host, port=self.port, protocol="https" if self.tls else "http",
                             ca_cert=self.tls.ca, cert_cert=self.tls.cert, cert_key=self.tls.key,
                             timeout=(CONNECT_TIMEOUT, REQUEST_TIMEOUT), api_path="/v3/")
        # Exactly the CA and proxy the user gave: requests would let REQUESTS_CA_BUNDLE
        # override --store-ca, and send etcd's traffic to an HTTP(S)_PROXY.
        client.session.trust_env = False
        return client

    def object_key(self, kind: str, name: str) -> str:
        return f"{self.obj_prefix}{kind}/{name}"

    def close(self) -> None:
        self._closed = True
        with self._cond:
            self._cond.notify_all()

    # --- requests -----------------------------------------------------------------------

    def _post(self, path: str, body: dict, client: Etcd3Client | None = None) -> dict:
        client = client or self.client
        try:
            return client.post(client.get_url(path), json=body)
        except etcd_exc.Etcd3Exception as e:
            detail = getattr(e, "detail_text", None) or str(e)
            raise explain(self.url, f"{detail} {e}", bool(self.tls)) from None
        except (requests.RequestException, OSError) as e:
            raise explain(self.url, str(e), bool(self.tls)) from None

    def _range(self, key: str, end: str | None = None, revision: int = 0, limit: int = 0,
               client: Etcd3Client | None = None) -> dict:
        body = {"key": _b64(key)}
        if end:
            body["range_end"] = _b64(end)
        if revision:
            body["revision"] = revision
        if limit:
            body["limit"] = limit
        return self._post("/kv/range", body, client)

    def _fetch(self) -> tuple[int, int, State]:
        """Everything at one revision: (generation, mod revision of the generation key, State)."""
        first = self._range(self.gen_key)
        revision = int(first["header"]["revision"])
        kv = (first.get("kvs") or [None])[0]
        generation = int(_text(kv["value"]) or 0) if kv else 0
        gen_mod = int(kv["mod_revision"]) if kv else 0
        rows, start, end = [], self.obj_prefix, _after(self.obj_prefix)
        while True:       # pages, all at the same revision: a consistent snapshot
            page = self._range(start, end, revision=revision, limit=PAGE)
            kvs = page.get("kvs", [])
            for kv in kvs:
                kind, _, name = _text(kv["key"])[len(self.obj_prefix):].partition("/")
                rows.append((kind, name, _text(kv.get("value"))))
            if not page.get("more"):
                break
            start = _text(kvs[-1]["key"]) + "\0"
        state = state_of(rows)
        self._cache = (generation, state)
        return generation, gen_mod, state

    # --- the Store interface ------------------------------------------------------------

    def _cached(self) -> tuple[int, State] | None:
        """The last full read, if the live watch says nothing changed since."""
        with self._cond:
            if self._watch_live and self._cache and self._cache[0] == self._watch_gen:
                return self._cache
        return None

    def read(self) -> State:
        return self.snapshot()[1]

    def snapshot(self) -> tuple[int, State]:
        cached = self._cached()
        if cached:
            return cached
        generation, _, state = self._fetch()
        return generation, state

    def generation(self) -> int:
        with self._cond:
            if self._watch_live and self._watch_gen is not None:
                return self._watch_gen
        kv = (self._range(self.gen_key).get("kvs") or [None])[0]
        return int(_text(kv["value"]) or 0) if kv else 0

    def update(self, change: Callable[[State], State]) -> State:
        deadline = time.monotonic() + UPDATE_SECONDS
        pause = 0.005
        while True:
            generation, gen_mod, old = self._fetch()
            new = change(old)
            puts, deletes = changes(old, new)
            if not puts and not deletes:
                return new
            ops = [_put(self.object_key(k, n), body) for k, n, body in puts]
            ops += [{"request_delete_range": {"key": _b64(self.object_key(k, n))}} for k, n in deletes]
            ops.append(_put(self.gen_key, str(generation + 1)))
            # Holds only if nobody wrote since our read: the generation key moves with every write.
            txn = {"compare": [{"key": _b64(self.gen_key), "result": "EQUAL", "target": "MOD",
                                "mod_revision": gen_mod}], "success": ops, "failure": []}
            if self._post("/kv/txn", txn).get("succeeded"):
                self._cache = None
                return new
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"store {self.url} is too busy: the update lost every race for "
                                       f"{UPDATE_SECONDS:.0f} s")
            time.sleep(random.uniform(0, pause))     # jitter: the losers do not collide again
            pause = min(pause * 2, 0.2)

    def seed(self, state: State, alive: dict[str, dict] | None = None, alive_ttl: int = 3600,
             ops_per_txn: int = ETCD_MAX_TXN_OPS) -> int:
        """Write a whole State into a prefix nobody uses yet, in transactions of at most
        `ops_per_txn` puts: a big cluster in update()'s one transaction is beyond etcd's
        --max-txn-ops, and built one update at a time (each reads the whole state) it is
        quadratic. With `alive`, those nodes are registered too, all under one lease of
        `alive_ttl` seconds. The generation is written last, so a watcher wakes once, on
        the whole of it. Not atomic: for seeding a store at scale (bench/etcd-scale), not
        for a store in use. Returns the number of transactions."""
        if self._range(self.obj_prefix, _after(self.obj_prefix), limit=1).get("kvs") or self.generation():
            raise XoError(f"store {self.url} is not empty: seed() only writes a fresh prefix")
        ops = [_put(self.object_key(kind, name), body) for kind, name, body in changes(State(), state)[0]]
        if alive:
            lease = int(self._post("/lease/grant", {"TTL": alive_ttl})["ID"])
            ops += [_put(self.alive_prefix + node, json.dumps(info), lease) for node, info in sorted(alive.items())]
        txns = 0
        for start in range(0, len(ops), ops_per_txn):
            self._post("/kv/txn", {"success": ops[start:start + ops_per_txn]})
            txns += 1
        self._post("/kv/txn", {"success": [_put(self.gen_key, "1")]})
        self._cache = None
        return txns + 1

    def wait(self, since: int, timeout: float, poll: float = 0.05) -> int:
        """Block until the watch sees the generation move past `since` (or the timeout)."""
        self._ensure_watch()
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (self._watch_live and self._watch_gen != since), timeout)
            return self._watch_gen if self._watch_live and self._watch_gen is not None else since

    # --- the watch ----------------------------------------------------------------------

    def _ensure_watch(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch_loop, name="xo-etcd-watch", daemon=True)
            self._watcher.start()

    def _set_watch(self, live: bool, generation: int | None = None) -> None:
        with self._cond:
            self._watch_live = live
            if generation is not None:
                self._watch_gen = generation
            self._cond.notify_all()

    def _watch_loop(self) -> None:
        """Read the generation, then watch it from the next revision on: no change between
        the read and the watch is missed. Whenever the watch breaks (etcd gone, compacted
        history, idle too long) start over from a fresh read, never from an old revision."""
        client = self._client()          # its own connection: the stream holds one
        pause = 0.2
        while not self._closed:
            try:
                first = self._range(self.gen_key, client=client)
                revision = int(first["header"]["revision"])
                kv = (first.get("kvs") or [None])[0]
                self._set_watch(True, int(_text(kv["value"]) or 0) if kv else 0)
                create = {"create_request": {"key": _b64(self.gen_key), "start_revision": revision + 1}}
                with client.session.post(client.get_url("/watch"), json=create, stream=True,
                                         timeout=(CONNECT_TIMEOUT, WATCH_IDLE)) as resp:
                    if resp.status_code != 200:
                        raise explain(self.url, resp.text, bool(self.tls))
                    pause = 0.2
                    for line in resp.iter_lines():
                        if self._closed:
                            return
                        result = json.loads(line).get("result", {}) if line.strip() else {}
                        if result.get("canceled") or "compact_revision" in result:
                            break                      # history compacted: read afresh
                        for event in result.get("events", []):
                            self._set_watch(True, int(_text(event["kv"].get("value")) or 0))
                # The stream ended (etcd stopped, or compaction): not live until read afresh.
                self._set_watch(False)
                continue
            except requests.exceptions.ConnectionError as e:
                if idle_timeout(e) and self._watch_live:
                    continue                           # only idle: re-made at once
                self._set_watch(False)
            except Exception:
                self._set_watch(False)
            if not self._closed:
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    # --- liveness -----------------------------------------------------------------------

    def register(self, node: str, ttl: float, info: dict) -> None:
        lease = self._post("/lease/grant", {"TTL": max(2, math.ceil(ttl))})
        lease_id = int(lease["ID"])
        self._post("/kv/put", _put(self.alive_prefix + node, json.dumps(info), lease_id)["request_put"])
        self._lease = (node, ttl, info, lease_id)

    def renew(self) -> None:
        node, ttl, info, lease_id = self._lease
        result = self._post("/lease/keepalive", {"ID": lease_id}).get("result", {})
        if int(result.get("TTL", 0)) <= 0:      # expired (a long outage): register anew
            self.register(node, ttl, info)

    def unregister(self) -> None:
        if self._lease:
            try:
                self._post("/kv/lease/revoke", {"ID": self._lease[3]})
            except XoError:
                pass            # the lease ends by itself
            self._lease = None

    def alive(self) -> dict[str, dict]:
        page = self._range(self.alive_prefix, _after(self.alive_prefix))
        return {_text(kv["key"])[len(self.alive_prefix):]: json.loads(_text(kv.get("value")) or "{}")
                for kv in page.get("kvs", [])}
