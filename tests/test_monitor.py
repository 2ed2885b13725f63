"""`xoverlay monitor`: the pure parts (decoding a record, names, filters, the text line,
stale flags) as units; then, on the lab, drops of every reason the tests can provoke
from a container or the underlay, seen by `xoverlay monitor --json`, and the flag's life
(cleared on SIGTERM and Ctrl-C, stale after SIGKILL, cleared by the agent)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import PY, in_netns

from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.kernel import monitor_flag, processes
from xoverlay.maps.drops import BY_NAME
from xoverlay.maps.layout import EVF_IP, EVF_OUTER, EVF_PORTS, EVF_VNI, MON_DROPS, MON_SERVICES, Event, Monitor, ip_be
from xoverlay.ui import monitor


def state():
    s = model.State()
    s = model.join_node(s, "n1", "192.0.2.1")
    s = model.join_node(s, "n2", "192.0.2.2")
    s = model.create_network(s, "app", "10.10.0.0/16", vni=4096)
    s = model.create_network(s, "iso", "10.20.0.0/16", vni=4097)
    s = model.add_endpoint(s, "web", "app", "n1", "/run/netns/web", True, "10.10.0.5")
    s = model.add_endpoint(s, "db", "app", "n2", "/run/netns/db", True, "10.10.1.7")
    return model.add_endpoint(s, "other", "iso", "n2", "/run/netns/other", True, "10.20.1.1")


NAMES = monitor.names_from(state(), {31: (4096, "10.10.0.5")}, {2: "eth1", 31: "xo0123456789"})


def record(**fields) -> bytes:
    ev = Event(**fields)
    return bytes(ev)


def port(n: int) -> int:
    return socket.htons(n)


def test_decode_an_endpoint_drop():
    raw = record(ts_ns=5, type=1, hook=1, reason=BY_NAME["UNKNOWN_DESTINATION"].code, protocol=17,
                 flags=EVF_VNI | EVF_IP | EVF_PORTS, ethertype=socket.htons(0x0800), ifindex=31, len=98, vni=4096,
                 saddr=ip_be("10.10.0.5"), daddr=ip_be("10.10.9.9"), sport=port(40000), dport=port(53))
    ev = monitor.decode(raw, NAMES)
    assert {k: ev[k] for k in ("type", "hook", "reason", "interface", "endpoint", "network", "src", "dst",
                               "src_endpoint", "dst_endpoint", "protocol", "sport", "dport", "len", "outer")} == {
        "type": "drop", "hook": "endpoint", "reason": "UNKNOWN_DESTINATION", "interface": "xo0123456789",
        "endpoint": "web", "network": "app", "src": "10.10.0.5", "dst": "10.10.9.9", "src_endpoint": "web",
        "dst_endpoint": None, "protocol": "udp", "sport": 40000, "dport": 53, "len": 98, "outer": None}
    assert ev["text"] == BY_NAME["UNKNOWN_DESTINATION"].text
    json.dumps(ev)


def test_decode_a_tunnel_drop_names_nodes_and_endpoints():
    raw = record(type=1, hook=3, reason=BY_NAME["UNKNOWN_PEER"].code, protocol=1,
                 flags=EVF_OUTER | EVF_VNI | EVF_IP | EVF_PORTS, ifindex=2, len=148, vni=4096,
                 outer_saddr=ip_be("192.0.2.99"), outer_daddr=ip_be("192.0.2.1"),
                 saddr=ip_be("10.10.1.7"), daddr=ip_be("10.10.0.5"), sport=port(8), dport=port(0))
    ev = monitor.decode(raw, NAMES)
    assert ev["outer"] == {"src": "192.0.2.99", "dst": "192.0.2.1", "src_node": None, "dst_node": "n1"}
    assert (ev["hook"], ev["interface"], ev["endpoint"]) == ("underlay_xdp", "eth1", None)
    assert (ev["src_endpoint"], ev["dst_endpoint"], ev["protocol"]) == ("db", "web", "icmp")
    text = monitor.line(ev)
    assert "UNKNOWN_PEER" in text and "outer 192.0.2.99 -> 192.0.2.1 (n1)" in text
    assert "10.10.1.7 (db) -> 10.10.0.5 (web) icmp 8/0" in text and "on eth1 [underlay_xdp]" in text
    assert text.endswith("148 B  · " + BY_NAME["UNKNOWN_PEER"].text)


def test_an_address_of_another_network_is_named_when_it_is_unique():
    raw = record(type=1, hook=1, reason=BY_NAME["OTHER_NETWORK"].code, protocol=1, flags=EVF_VNI | EVF_IP,
                 ifindex=31, vni=4096, saddr=ip_be("10.10.0.5"), daddr=ip_be("10.20.1.1"))
    ev = monitor.decode(raw, NAMES)
    assert ev["dst_endpoint"] == "other"


def test_addresses_behind_an_unknown_vni_are_nobodys():
    raw = record(type=1, hook=3, reason=BY_NAME["UNKNOWN_VNI"].code, flags=EVF_OUTER | EVF_VNI | EVF_IP, vni=777,
                 outer_saddr=ip_be("192.0.2.2"), saddr=ip_be("10.10.1.7"), daddr=ip_be("10.10.0.5"))
    ev = monitor.decode(raw, NAMES)
    assert (ev["network"], ev["src_endpoint"], ev["dst_endpoint"]) == (None, None, None)
    assert ev["outer"]["src_node"] == "n2"


def test_decode_non_ipv4_and_unknown_numbers():
    ev = monitor.decode(record(type=1, hook=1, reason=BY_NAME["ARP_NOT_ANSWERED"].code,
                               ethertype=socket.htons(0x0806), ifindex=99, len=42), NAMES)
    assert (ev["src"], ev["ethertype"], ev["interface"], ev["vni"]) == (None, "0x0806", None, None)
    assert "ethertype 0x0806 (ARP)" in monitor.line(ev) and "if99" in monitor.line(ev)
    odd = monitor.decode(record(type=9, hook=9, reason=200), NAMES)
    assert (odd["type"], odd["hook"]) == ("type 9", "hook 9")


def test_decode_a_forward_event():
    ev = monitor.decode(record(type=2, hook=1, reason=2, flags=EVF_OUTER | EVF_VNI | EVF_IP, ifindex=31, vni=4096,
                               outer_saddr=ip_be("192.0.2.1"), outer_daddr=ip_be("192.0.2.2"), protocol=6,
                               saddr=ip_be("10.10.0.5"), daddr=ip_be("10.10.1.7")), NAMES)
    assert (ev["type"], ev["action"], ev["reason"]) == ("forward", "encap", None)
    assert ev["outer"]["dst_node"] == "n2"


def test_decode_and_filter_a_service_connection():
    from xoverlay.maps.layout import EVF_XLATE
    names = monitor.Names(services={7: "web"}, local={31: "web"}, ifnames={31: "xo0123456789"})
    ev = monitor.decode(record(type=3, hook=1, reason=7, flags=EVF_IP | EVF_PORTS | EVF_XLATE, ifindex=31,
                               protocol=6, saddr=ip_be("10.10.0.5"), daddr=ip_be("10.10.255.254"),
                               sport=port(40000), dport=port(80), xlate_daddr=ip_be("10.10.1.7"),
                               xlate_dport=port(8080)), names)
    assert (ev["type"], ev["service"], ev["dst"], ev["xlate"]) == (
        "service_conn", "web", "10.10.255.254", {"dst": "10.10.1.7", "dport": 8080})
    assert "SERVICE_CONN  web" in monitor.line(ev) and "-> 10.10.1.7:8080" in monitor.line(ev)
    assert monitor.Filter(service="web").wants(ev)
    assert not monitor.Filter(service="api").wants(ev)
    drop = monitor.decode(record(type=1, hook=1, reason=BY_NAME["NO_ROUTE"].code), NAMES)
    assert not monitor.Filter(service="web").wants(drop), "--service shows only its connections"


def test_time_is_wall_clock_from_the_offset():
    ev = monitor.decode(record(type=1, ts_ns=1_000), NAMES, wall_offset_ns=1_700_000_000 * 10**9)
    assert ev["time"].startswith("2023-11-1")


def test_filters():
    ev = monitor.decode(record(type=1, hook=1, reason=BY_NAME["SPOOFED_SOURCE"].code, flags=EVF_VNI | EVF_IP,
                               ifindex=31, vni=4096, saddr=ip_be("10.10.0.99"), daddr=ip_be("10.10.1.7")), NAMES)
    assert monitor.Filter().wants(ev)
    assert monitor.Filter(frozenset({"SPOOFED_SOURCE"})).wants(ev)
    assert not monitor.Filter(frozenset({"NO_ROUTE"})).wants(ev)
    assert monitor.Filter(endpoint="web").wants(ev), "came in on web's veth"
    assert monitor.Filter(endpoint="db").wants(ev), "addressed to db"
    assert not monitor.Filter(endpoint="other").wants(ev)
    fwd = monitor.decode(record(type=2, hook=1, reason=1), NAMES)
    assert not monitor.Filter(frozenset({"SPOOFED_SOURCE"})).wants(fwd), "--reason shows only those drops"


def test_reason_names_are_checked_and_forgiving():
    assert monitor.parse_reasons(["unknown-destination", "XO_DROP_NO_ROUTE"]) == {"UNKNOWN_DESTINATION", "NO_ROUTE"}
    with pytest.raises(XoError, match="unknown drop reason 'nope'"):
        monitor.parse_reasons(["nope"])


def test_flag_states():
    assert monitor_flag.flag_state(None) == "off"
    assert monitor_flag.flag_state(Monitor()) == "off"
    assert monitor_flag.flag_state(Monitor(events=1, pid=7, pid_start=70), lambda pid, start: True) == "running"
    assert monitor_flag.flag_state(Monitor(events=1, pid=7, pid_start=70), lambda pid, start: False) == "stale"


def test_owner_alive_tells_a_reused_pid_apart():
    me, start = os.getpid(), processes.proc_start(os.getpid())
    assert start and processes.owner_alive(me, start)
    assert not processes.owner_alive(me, start + 1), "same pid, another start time: another process"
    child = subprocess.Popen(["true"])
    child.wait()
    assert processes.proc_start(child.pid) is None and not processes.owner_alive(child.pid, 1)
    assert not processes.owner_alive(0, 0)


def test_proc_start_reads_past_a_command_name_with_spaces_and_parentheses(tmp_path):
    exe = tmp_path / "a b) c"
    exe.symlink_to("/bin/sleep")
    p = subprocess.Popen([str(exe), "5"])
    try:
        time.sleep(0.1)
        assert processes.proc_start(p.pid) == int(open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[19])
    finally:
        p.kill()
        p.wait()


# --- the flag's owner, on a throwaway node's real maps (no agent there) -------------------

@pytest.fixture(scope="module")
def node_maps():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from bpfrun import Datapath
    dp = Datapath(f"pytest-flag-{os.getpid()}")
    try:
        yield dp
    finally:
        dp.close()


def flag(dp) -> Monitor:
    from xoverlay.maps.layout import U32
    return dp.maps["xo_monitor"].get(U32(0))


def set_raw_flag(dp, mon: Monitor) -> None:
    from xoverlay.maps.layout import U32
    dp.maps["xo_monitor"].set(U32(0), mon)


@pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
def test_listener_sets_and_clears_its_flag(node_maps):
    with monitor.Listener(node_maps.node, events=3, sample=7) as listener:
        mon = flag(node_maps)
        assert (mon.events, mon.sample, mon.pid) == (3, 7, os.getpid())
        assert monitor_flag.flag_state(mon) == "running"
        assert listener.took_over is None
    assert flag(node_maps) == Monitor()


@pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
def test_listener_clears_its_flag_when_the_body_raises(node_maps):
    with pytest.raises(KeyboardInterrupt):
        with monitor.Listener(node_maps.node, events=1):
            raise KeyboardInterrupt
    assert flag(node_maps) == Monitor()


@pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
def test_a_stale_flag_is_taken_over_and_a_live_one_refused(node_maps):
    dead = subprocess.Popen(["true"])
    dead.wait()
    set_raw_flag(node_maps, Monitor(events=1, pid=dead.pid, pid_start=12345))
    with monitor.Listener(node_maps.node, events=1) as listener:
        assert listener.took_over.pid == dead.pid
        assert flag(node_maps).pid == os.getpid()
    assert flag(node_maps) == Monitor()

    live = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        owner = Monitor(events=1, pid=live.pid, pid_start=processes.proc_start(live.pid))
        set_raw_flag(node_maps, owner)
        with pytest.raises(XoError, match=f"already running \\(pid {live.pid}\\)"):
            monitor.Listener(node_maps.node, events=1)
        assert flag(node_maps) == owner, "a refused monitor changes nothing"
    finally:
        live.kill()
        live.wait()
    assert monitor_flag.clear_if_stale(node_maps.maps["xo_monitor"]) == owner, "its owner is gone now"
    assert flag(node_maps) == Monitor()
    assert monitor_flag.clear_if_stale(node_maps.maps["xo_monitor"]) is None


def test_listener_refuses_a_node_without_maps():
    with pytest.raises(XoError, match="node no-such-node has no monitor map"):
        monitor.Listener("no-such-node", events=1)


# --- on the lab ---------------------------------------------------------------------------

SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    s.send(bytes.fromhex(frame))
"""


def send_frames(netns: str, iface: str, *frames: bytes) -> None:
    """Put raw frames on a device, as a misbehaving container or host would."""
    in_netns(netns, PY, "-c", SEND, iface, *[bytes(f).hex() for f in frames])


def mac_of(netns: str, dev: str) -> str:
    out = in_netns(netns, "ip", "-o", "link", "show", dev).stdout
    return out.split("link/ether ")[1].split()[0]


def _as_in_a_terminal():
    """Ctrl-C as a terminal's foreground process gets it: a test run started in the
    background (`cmd &` in a script: SIGINT ignored, and inherited) must not make the
    monitor deaf to it, as Python is to a SIGINT ignored at its start."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Monitoring:
    """`xoverlay monitor ARGS` in the background, ready once it says it is listening."""

    def __init__(self, lab, *args):
        self.proc = subprocess.Popen([PY, "-m", "xoverlay", "--state", lab.state, "monitor", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_as_in_a_terminal)
        self.notes = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            note = self.proc.stderr.readline()
            if not note:
                break
            self.notes.append(note)
            if "monitoring node" in note:
                return
        self.proc.kill()
        raise AssertionError(f"monitor did not start: {''.join(self.notes)}{self.proc.stderr.read()}")

    def finish(self, timeout=30) -> tuple[int, list[dict], str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _provoke_every_reason(lab, n1, n2, iso_ip):
    src = lab.ep(f"{n1}-a")
    lab.ping(f"{n1}-a", "10.10.250.250", count=1)                    # UNKNOWN_DESTINATION
    lab.ping(f"{n1}-a", iso_ip, count=1)                             # OTHER_NETWORK
    lab.ping(f"{n1}-a", "169.254.9.9", count=1)                      # NO_ROUTE (link-local never leaves)
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Ether
    from scapy.layers.vxlan import VXLAN
    spoofed = Ether(src=src["mac"], dst="ee:ee:ee:ee:ee:ee") / IP(src="10.10.0.99", dst=lab.ep(f"{n1}-b")["ip"]) / \
        UDP(sport=1111, dport=2222) / b"forged"
    v6 = Ether(src=src["mac"], dst="33:33:00:00:00:01") / IPv6(src="fe80::66", dst="ff02::1") / UDP()
    # A reply: a request from the container's own addresses would be answered.
    arp = Ether(src=src["mac"], dst="ff:ff:ff:ff:ff:ff") / \
        ARP(op="is-at", hwsrc=src["mac"], psrc=src["ip"], pdst="10.10.0.2")
    send_frames(src["netns"], "eth0", spoofed, v6, arp)              # SPOOFED_SOURCE, NOT_IPV4, ARP_NOT_ANSWERED
    lab_ = lab.lab()
    underlay = f"/run/netns/{lab_.underlay_netns}"
    node_ip = lab_.node_ip(1)
    eth1 = mac_of(f"/run/netns/xo-{n1}", "eth1")
    inner = Ether() / IP(src=lab.ep(f"{n2}-a")["ip"], dst=src["ip"]) / ICMP()

    def tunnel(outer_src, vni):
        return Ether(dst=eth1) / IP(src=outer_src, dst=node_ip, flags="DF") / \
            UDP(sport=50000, dport=4789, chksum=0) / VXLAN(vni=vni, flags=0x08) / inner
    send_frames(underlay, "br0", tunnel("192.0.2.99", 4096),        # UNKNOWN_PEER
                tunnel(lab_.node_ip(2), 777))                       # UNKNOWN_VNI
    return node_ip


@pytest.mark.lab
def test_monitor_sees_a_drop_of_each_reason_it_can_be_given(lab):
    from xoverlay.kernel.veth import host_ifname
    n1, n2, _ = lab.nodes()
    lab.xo("network", "create", "mon-iso", "--subnet", "10.78.0.0/16")
    mon = None
    try:
        lab.xo("endpoint", "add", "mon-iso-x", "--network", "mon-iso", "--node", n2)
        iso_ip = lab.ep("mon-iso-x")["ip"]
        mon = Monitoring(lab, "--node", n1, "--json", "--count", "8")
        assert monitor_flag.read_flag(n1).events == MON_DROPS | MON_SERVICES, "the flag is set while it runs"
        node_ip = _provoke_every_reason(lab, n1, n2, iso_ip)
        code, events, err = mon.finish()
    finally:
        if mon:
            mon.kill()
        lab.xo("endpoint", "rm", "mon-iso-x", check=False)
        lab.xo("network", "rm", "mon-iso", check=False)
    assert code == 0, err
    by_reason = {e["reason"]: e for e in events}
    assert sorted(by_reason) == sorted(["UNKNOWN_DESTINATION", "OTHER_NETWORK", "NO_ROUTE", "SPOOFED_SOURCE",
                                        "NOT_IPV4", "ARP_NOT_ANSWERED", "UNKNOWN_PEER", "UNKNOWN_VNI"]), events
    a = lab.ep(f"{n1}-a")
    veth = host_ifname(f"{n1}-a")
    for reason in ("UNKNOWN_DESTINATION", "OTHER_NETWORK", "NO_ROUTE", "SPOOFED_SOURCE", "NOT_IPV4",
                   "ARP_NOT_ANSWERED"):
        e = by_reason[reason]
        assert (e["type"], e["hook"], e["interface"], e["endpoint"], e["network"]) == \
            ("drop", "endpoint", veth, f"{n1}-a", "demo"), e
        assert e["text"] == BY_NAME[reason].text
    assert (by_reason["UNKNOWN_DESTINATION"]["src"], by_reason["UNKNOWN_DESTINATION"]["dst"]) == \
        (a["ip"], "10.10.250.250")
    assert by_reason["UNKNOWN_DESTINATION"]["protocol"] == "icmp"
    assert by_reason["OTHER_NETWORK"]["dst_endpoint"] == "mon-iso-x"
    assert by_reason["NO_ROUTE"]["dst"] == "169.254.9.9"
    spoofed = by_reason["SPOOFED_SOURCE"]
    assert (spoofed["src"], spoofed["dst_endpoint"], spoofed["protocol"], spoofed["sport"], spoofed["dport"]) == \
        ("10.10.0.99", f"{n1}-b", "udp", 1111, 2222)
    assert by_reason["NOT_IPV4"]["ethertype"] == "0x86dd" and by_reason["NOT_IPV4"]["src"] is None
    assert by_reason["ARP_NOT_ANSWERED"]["ethertype"] == "0x0806" and by_reason["ARP_NOT_ANSWERED"]["src"] is None
    peer, vni = by_reason["UNKNOWN_PEER"], by_reason["UNKNOWN_VNI"]
    for e in (peer, vni):
        assert (e["hook"], e["interface"], e["outer"]["dst"], e["outer"]["dst_node"]) == \
            ("underlay_xdp", "eth1", node_ip, n1), e
        assert (e["src"], e["dst"], e["protocol"]) == (lab.ep(f"{n2}-a")["ip"], a["ip"], "icmp")
    assert (peer["outer"]["src"], peer["outer"]["src_node"], peer["vni"], peer["network"]) == \
        ("192.0.2.99", None, 4096, "demo")
    assert (vni["outer"]["src_node"], vni["vni"], vni["network"]) == (n2, 777, None)
    assert monitor_flag.read_flag(n1).events == 0, "cleared when it stopped after --count"


@pytest.mark.lab
def test_monitor_shows_new_service_connections_with_the_backend(lab):
    n1, n2, _ = lab.nodes()
    backend = lab.ep(f"{n2}-b")
    lab.xo("service", "create", "mon-svc", "--network", "demo", "--port", "7/tcp", "--backend", f"{n2}-b")
    mon = None
    try:
        vip = json.loads(lab.xo("service", "inspect", "mon-svc", "--json").out)["vip"]
        mon = Monitoring(lab, "--node", n1, "--json", "--count", "1", "--service", "mon-svc")
        lab.run_in(f"{n1}-a", "python3", "-c",
                   "import socket\ntry: socket.create_connection(('%s', 7), timeout=2)\nexcept OSError: pass" % vip)
        code, events, err = mon.finish()
        assert code == 0, err
        [ev] = events
        assert (ev["type"], ev["service"], ev["src_endpoint"], ev["dst"], ev["dport"]) == \
            ("service_conn", "mon-svc", f"{n1}-a", vip, 7)
        assert ev["xlate"] == {"dst": backend["ip"], "dport": 7}
    finally:
        if mon:
            mon.kill()
        lab.xo("service", "rm", "mon-svc", check=False)


@pytest.mark.lab
def test_monitor_filters_by_endpoint_and_reason(lab):
    n1, _, _ = lab.nodes()
    mon = Monitoring(lab, "--node", n1, "--json", "--count", "1", "--endpoint", f"{n1}-b",
                     "--reason", "unknown-destination")
    try:
        lab.ping(f"{n1}-a", "10.10.250.1", count=1)      # another endpoint's drop
        lab.ping(f"{n1}-b", "169.254.9.2", count=1)      # its drop, another reason (NO_ROUTE)
        lab.ping(f"{n1}-b", "10.10.250.2", count=1)      # the one
        code, events, err = mon.finish()
    finally:
        mon.kill()
    assert code == 0, err
    assert [(e["reason"], e["endpoint"], e["dst"]) for e in events] == \
        [("UNKNOWN_DESTINATION", f"{n1}-b", "10.10.250.2")]


@pytest.mark.lab
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_monitor_clears_its_flag_when_stopped(lab, sig):
    n1 = lab.nodes()[0]
    mon = Monitoring(lab, "--node", n1)
    try:
        assert monitor_flag.read_flag(n1).pid == mon.proc.pid
        lab.ping(f"{n1}-a", "10.10.250.3", count=1)
        time.sleep(0.5)
        mon.proc.send_signal(sig)
        code, _, err = mon.finish()
    finally:
        mon.kill()
    assert code == 0, err
    assert monitor_flag.read_flag(n1) == Monitor()


@pytest.mark.lab
def test_a_killed_monitor_leaves_a_stale_flag_that_the_agent_clears(lab):
    n1 = lab.nodes()[0]
    mon = Monitoring(lab, "--node", n1)
    pid = mon.proc.pid
    mon.proc.kill()
    mon.proc.wait()
    left = monitor_flag.read_flag(n1)
    assert left.pid == pid and monitor_flag.flag_state(left) in ("stale", "off")
    deadline = time.monotonic() + 6           # the agent checks on every pass, at least every 2 s
    while monitor_flag.read_flag(n1).events and time.monotonic() < deadline:
        time.sleep(0.1)
    assert monitor_flag.read_flag(n1) == Monitor()
    log = open(f"/run/xoverlay/{n1}.log").read()
    assert f"cleared the monitor flag left by pid {pid}" in log
