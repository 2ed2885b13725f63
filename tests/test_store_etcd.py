"""The etcd store (xoverlay/store/etcd.py) against Debian's etcd: atomic updates under
concurrent writers, watches, liveness leases, outages, TLS; and its pure parts."""
import json
import multiprocessing
import os
import re
import subprocess
import threading
import time

import pytest
from conftest import PY, EtcdProc, run_xo

from xoverlay.agent import loop
from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.store import open_store
from xoverlay.store.base import StoreUnavailable, Tls, alive_now, changes
from xoverlay.store.etcd import EtcdStore, explain, idle_timeout, parse_url
from xoverlay.store.etcd_server import ServerTls, free_port
from xoverlay.store.memory import MemoryStore

# --- pure -------------------------------------------------------------------------------


def test_url_names_host_port_and_key_prefix():
    assert parse_url("etcd://10.0.0.1:2379") == ("10.0.0.1", 2379, "/xoverlay")
    assert parse_url("etcd://etcd.example") == ("etcd.example", 2379, "/xoverlay")
    assert parse_url("etcd://[fd00::1]:4001/prod/") == ("fd00::1", 4001, "/prod")
    for bad in ("etcd://", "etcd://h:99999", "etcd://h:x", "http://h:2379"):
        with pytest.raises(XoError, match="etcd://HOST:PORT"):
            parse_url(bad)


@pytest.mark.parametrize("text, retry, words", [
    ("Connection refused", True, "is unreachable: connection refused"),
    ("Read timed out. (read timeout=10)", True, "is unreachable: timed out"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer", False,
     "not signed by --store-ca"),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number", False, "does not speak TLS"),
    ("Client sent an HTTP request to an HTTPS server.", False, "etcd wants TLS"),
    ("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required", False, "client certificate"),
    ("SSLError(SSLEOFError(8, 'EOF occurred in violation of protocol (_ssl.c:2393)'))", False, "client certificate"),
    ("('Connection aborted.', RemoteDisconnected('Remote end closed connection without response'))", False,
     "if it serves TLS"),
    ("etcdserver: too many operations in txn request", False, "--max-txn-ops"),
])
def test_failures_are_explained_in_one_line(text, retry, words):
    e = explain("etcd://h:1", text, tls="SSL" in text or "TLS" in text)
    assert isinstance(e, StoreUnavailable) == retry
    assert words in str(e) and "\n" not in str(e) and str(e).startswith("store etcd://h:1")


def test_a_quiet_stream_is_told_from_an_unreachable_server():
    """What the watch loop re-makes at once (a stream only idle past its read timeout)
    against what it backs off from (nothing listens), on real sockets."""
    import socket

    import requests
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def quiet():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(3)
        conn.close()
    t = threading.Thread(target=quiet, daemon=True)
    t.start()
    try:
        with pytest.raises(requests.exceptions.ConnectionError) as quiet_stream:
            with requests.post(f"http://127.0.0.1:{port}/watch", stream=True, timeout=(2, 0.3)) as resp:
                for _ in resp.iter_lines():
                    pass
        assert idle_timeout(quiet_stream.value)
    finally:
        t.join()
        server.close()
    with pytest.raises(requests.exceptions.ConnectionError) as refused:
        requests.post(f"http://127.0.0.1:{port}/watch", timeout=(2, 0.3))       # nothing listens now
    assert not idle_timeout(refused.value)


def test_changes_are_the_difference_of_two_states():
    a = model.create_network(model.State(), "a", "10.1.0.0/16")
    b = model.create_network(model.remove_network(a, "a"), "b", "10.2.0.0/16")
    puts, deletes = changes(a, b)
    assert deletes == [("network", "a")] and [(k, n) for k, n, _ in puts] == [("network", "b")]
    assert changes(b, b) == ([], [])


def test_liveness_counts_only_unexpired_registrations():
    rows = [("n1", 105.0, '{"pid": 1}'), ("n2", 99.0, '{"pid": 2}')]
    assert alive_now(rows, 100.0) == {"n1": {"pid": 1}}


def test_retry_backoff_doubles_and_is_capped():
    waits = [loop.next_retry(None)]
    for _ in range(8):
        waits.append(loop.next_retry(waits[-1]))
    assert waits[0] == loop.RETRY_FIRST and waits[1] == 2 * waits[0] and max(waits) == loop.RETRY_MAX


def test_memory_store_moves_generation_only_on_change():
    s = MemoryStore()
    s.update(lambda st: st)
    assert s.generation() == 0
    s.update(lambda st: model.create_network(st, "a", "10.1.0.0/16"))
    assert s.generation() == 1 and "a" in s.read().networks


# --- against etcd ---------------------------------------------------------------------


def test_failed_update_changes_nothing_and_noop_keeps_generation(etcd):
    store = open_store(etcd.url)
    store.update(lambda s: model.create_network(s, "a", "10.1.0.0/16"))
    gen = store.generation()
    with pytest.raises(XoError, match="overlaps"):
        store.update(lambda s: model.create_network(model.create_network(s, "b", "10.2.0.0/16"),
                                                    "c", "10.1.0.0/24"))
    store.update(lambda s: s)
    assert set(store.read().networks) == {"a"} and store.generation() == gen


def test_an_internal_network_stays_internal_across_processes(etcd):
    """--internal is part of the network's record: another client reads it back."""
    open_store(etcd.url).update(lambda s: model.create_network(s, "in", "10.1.0.0/16", internal=True))
    open_store(etcd.url).update(lambda s: model.create_network(s, "out", "10.2.0.0/16"))
    nets = open_store(etcd.url).read().networks
    assert (nets["in"].internal, nets["out"].internal) == (True, False)


def test_key_prefixes_keep_clusters_apart(etcd):
    one, two = open_store(etcd.url + "/one"), open_store(etcd.url + "/two")
    one.update(lambda s: model.create_network(s, "a", "10.1.0.0/16"))
    assert two.read().networks == {} and set(one.read().networks) == {"a"}


def _allocate(url, node, count, queue):
    store = open_store(url)
    for i in range(count):
        store.update(lambda s, i=i: model.add_endpoint(s, f"{node}-{i}", "app", node, f"/x/{node}/{i}", True))
        if i % 5 == 0:     # a network with an automatic VNI now and then
            store.update(lambda s, i=i: model.create_network(s, f"{node}-net{i}", f"10.{200 + int(node[1:]) * 10 + i // 5}.0.0/16"))
    queue.put(node)


def test_concurrent_allocators_never_share_an_address_subnet_or_vni(etcd):
    """Four processes allocate at once through compare-and-swap transactions: every
    endpoint, slice and network is there, and nothing is handed out twice."""
    store = open_store(etcd.url)
    nodes = [f"n{i}" for i in range(4)]
    for i, n in enumerate(nodes):
        store.update(lambda s, n=n, i=i: model.join_node(s, n, f"192.0.2.{i + 1}"))
    store.update(lambda s: model.create_network(s, "app", "10.10.0.0/16", slice_prefix=28))
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_allocate, args=(etcd.url, n, 25, q)) for n in nodes]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    st = store.read()
    ips = [e.ip for e in st.endpoints.values()]
    vnis = [n.vni for n in st.networks.values()]
    slices = [s.subnet for s in st.slices.values()]
    assert len(st.endpoints) == 100 and len(set(ips)) == 100
    assert len(st.networks) == 1 + 4 * 5 and len(set(vnis)) == len(vnis)
    assert len(set(slices)) == len(slices) and len(slices) >= 4 * 2     # 25 addresses need 2 /28s a node
    assert store.generation() == 4 + 1 + 4 * 25 + 4 * 5                 # no update lost, none doubled


def test_a_change_wakes_a_waiter_through_the_watch(etcd):
    waiter, writer = open_store(etcd.url), open_store(etcd.url)
    gen = waiter.wait(-1, timeout=5)           # the watch is up and caught up
    woke = {}

    def wait():
        started = time.monotonic()
        woke["gen"] = waiter.wait(gen, timeout=5)
        woke["after"] = time.monotonic() - started
    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.5)
    changed = time.monotonic()
    writer.update(lambda s: model.create_network(s, "a", "10.1.0.0/16"))
    t.join(10)
    assert woke["gen"] == gen + 1
    assert woke["after"] - (changed - (time.monotonic() - woke["after"]) + woke["after"]) < 1   # sanity
    assert woke["after"] < 0.5 + 0.3, f"woke {woke['after'] - 0.5:.3f} s after the change"
    # the waiter's reads come from its cache while the watch says nothing changed
    assert waiter.read() is waiter.read()


def test_outage_then_compacted_history_resyncs_from_a_fresh_read(etcd):
    waiter = open_store(etcd.url)
    gen = waiter.wait(-1, timeout=5)
    etcd.stop()
    with pytest.raises(StoreUnavailable, match="is unreachable"):
        waiter.generation()
    started = time.monotonic()
    assert waiter.wait(gen, timeout=0.5) == gen           # no answer, and no busy loop either
    assert 0.4 < time.monotonic() - started < 2
    etcd.start()
    writer = open_store(etcd.url)
    for i in range(5):
        writer.update(lambda s, i=i: model.create_network(s, f"n{i}", f"10.{i}.0.0/16"))
    head = writer._range(writer.gen_key)["header"]["revision"]
    writer._post("/kv/compaction", {"revision": int(head), "physical": True})
    deadline = time.monotonic() + 10
    while waiter.wait(gen, timeout=1) != gen + 5 and time.monotonic() < deadline:
        pass
    assert waiter.generation() == gen + 5 and len(waiter.read().networks) == 5


def test_registration_lives_while_renewed_and_expires_after_its_ttl(etcd):
    store = open_store(etcd.url)
    for i, n in enumerate(("n1", "n2", "n3")):
        store.update(lambda s, n=n, i=i: model.join_node(s, n, f"192.0.2.{i + 1}"))
    kept, dropped = open_store(etcd.url), open_store(etcd.url)
    kept.register("n2", 2, {"pid": 2})
    dropped.register("n3", 2, {"pid": 3})      # its agent "dies": never renewed
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        kept.renew()
        time.sleep(0.5)
    peers = json.loads(run_xo(etcd.url, "peer", "ls", "--node", "n1", "--json").out)
    assert {p["node"]: p["liveness"] for p in peers} == {"n2": "up", "n3": "down"}
    kept.unregister()
    assert store.alive() == {}


# --- TLS -----------------------------------------------------------------------------------

def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={name}", cwd=d)


def _signed(d, name, ca, ext):
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture
def tls_etcd(tmp_path):
    d = str(tmp_path)
    _ca(d, "ca")
    _ca(d, "other-ca")
    # clientAuth too: etcd's HTTP gateway calls etcd's gRPC with the server's own certificate
    _signed(d, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    _signed(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _signed(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    e = EtcdProc(d, ServerTls(f"{d}/server.crt", f"{d}/server.key", f"{d}/ca.crt")).start()
    try:
        yield e, d
    finally:
        e.stop()


def _xo(url, *args, tls=()):
    return subprocess.run([PY, "-m", "xoverlay", "--store", url, *tls, *args], capture_output=True, text=True,
                          timeout=60)


def test_tls_with_client_certificates_works(tls_etcd):
    e, d = tls_etcd
    tls = ("--store-ca", f"{d}/ca.crt", "--store-cert", f"{d}/client.crt", "--store-key", f"{d}/client.key")
    r = _xo(e.url, "network", "create", "app", "--subnet", "10.10.0.0/16", tls=tls)
    assert r.returncode == 0, r.stderr
    store = EtcdStore(e.url, Tls(f"{d}/ca.crt", f"{d}/client.crt", f"{d}/client.key"))
    assert set(store.read().networks) == {"app"}


@pytest.mark.parametrize("case, flags, words", [
    ("wrong CA", ("--store-ca", "{d}/other-ca.crt", "--store-cert", "{d}/client.crt", "--store-key",
                  "{d}/client.key"), "etcd's TLS certificate is not signed by --store-ca"),
    ("no client certificate", ("--store-ca", "{d}/ca.crt"), "etcd refused our client certificate"),
    ("client certificate of another CA", ("--store-ca", "{d}/ca.crt", "--store-cert", "{d}/stranger.crt",
                                          "--store-key", "{d}/stranger.key"), "etcd refused our client certificate"),
    ("plain HTTP", (), "if it serves TLS, give --store-ca"),
    ("cert without key", ("--store-ca", "{d}/ca.crt", "--store-cert", "{d}/client.crt"),
     "--store-cert and --store-key go together"),
])
def test_tls_mistakes_are_refused_in_one_line(tls_etcd, case, flags, words):
    e, d = tls_etcd
    r = _xo(e.url, "network", "ls", tls=[f.format(d=d) for f in flags])
    assert r.returncode == 1, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xoverlay: error: ") and words in lines[0], r.stderr


# --- xoverlay store serve -----------------------------------------------------------------

def test_store_serve_runs_debians_etcd_with_our_flags(tmp_path):
    port = free_port()
    r = run_xo(str(tmp_path / "unused.db"), "store", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir",
               str(tmp_path / "etcd"), "--peer-port", str(free_port()), "--detach")
    pid = int(re.search(r"etcd pid (\d+)", r.out).group(1))
    try:
        url = f"etcd://127.0.0.1:{port}"
        assert f"--store {url}" in r.out
        run_xo(url, "network", "create", "app", "--subnet", "10.10.0.0/16")
        assert "app" in open_store(url).read().networks
        assert oct(os.stat(tmp_path / "etcd").st_mode & 0o777) == "0o700"
    finally:
        from xoverlay.store.etcd_server import stop
        stop(pid)
    bad = run_xo(str(tmp_path / "x.db"), "store", "serve", "--tls-cert", "/nonexistent", check=False)
    assert bad.code != 0 and "needs all three" in bad.err
