"""The `xoverlay` command. Thin: parse, call into model/store/agent/lab, print."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time

import click
from rich.console import Console
from rich.table import Table

from xoverlay.agent.loop import LEASE_TTL
from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.kernel import netns
from xoverlay.lab.vm_lab import VmLab, open_lab
from xoverlay.store import open_store
from xoverlay.store.base import Tls

# Wide when piped, so tables in logs and tests are not truncated.
console = Console(width=None if sys.stdout.isatty() else 120)
WAIT_SECONDS = 10.0


def _store(ctx):
    return open_store(ctx.obj["state"], ctx.obj["tls"])


def _print_table(title: str, columns: list[str], rows: list[list], as_json: bool, records: list[dict]):
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(x) for x in r])
    console.print(table)


def _require_root():
    if os.geteuid() != 0:
        raise XoError("xoverlay must run as root (it loads BPF programs and changes network namespaces)")


def _in_vm(ctx, node: str, args: list[str]) -> bool:
    """A VM lab's node keeps its pins in its guest: commands that read them run there.
    True if `node` is such a node and the command ran (a failure exits with its status)."""
    lab = open_lab(_store(ctx), ctx.obj["state"])
    if not isinstance(lab, VmLab) or node not in lab.nodes():
        return False
    argv = [sys.executable, "-m", "xoverlay", "--store", lab.node_store, *args]
    rc = lab.run(node, argv, check=False, capture=False, timeout=None,
                 tty=sys.stdin.isatty() and sys.stdout.isatty())[0]
    if rc:
        sys.exit(rc)
    return True


def _default_node(state: model.State, node: str | None) -> str:
    """--node, else $XOVERLAY_NODE, else this host's name if it is a node, else the only node."""
    node = node or os.environ.get("XOVERLAY_NODE")
    if node:
        if node not in state.nodes:
            raise XoError(f"node {node} does not exist (run `xoverlay up --node {node}` there first)")
        return node
    if socket.gethostname() in state.nodes:
        return socket.gethostname()
    if len(state.nodes) == 1:
        return next(iter(state.nodes))
    if not state.nodes:
        raise XoError("no node has joined yet: run `xoverlay up --node NAME --underlay DEV` first")
    raise XoError(f"say which node with --node ({', '.join(sorted(state.nodes))})")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "--state", "state", envvar=["XOVERLAY_STORE", "XOVERLAY_STATE"], default=None,
              metavar="PATH|etcd://HOST:PORT",
              help="the cluster store: a SQLite file (default /var/lib/xoverlay/state.db) or etcd://HOST:PORT[/PREFIX] "
                   "(env XOVERLAY_STORE or XOVERLAY_STATE)")
@click.option("--store-ca", envvar="XOVERLAY_STORE_CA", default=None, metavar="FILE",
              help="etcd over TLS: the CA that signed etcd's certificate (env XOVERLAY_STORE_CA)")
@click.option("--store-cert", envvar="XOVERLAY_STORE_CERT", default=None, metavar="FILE",
              help="etcd over TLS: our client certificate (env XOVERLAY_STORE_CERT)")
@click.option("--store-key", envvar="XOVERLAY_STORE_KEY", default=None, metavar="FILE",
              help="etcd over TLS: the key of --store-cert (env XOVERLAY_STORE_KEY)")
@click.pass_context
def cli(ctx, state, store_ca, store_cert, store_key):
    """xoverlay: a VXLAN overlay for containers with its data path in eBPF."""
    ctx.ensure_object(dict)
    ctx.obj["state"] = state
    ctx.obj["tls"] = Tls(store_ca, store_cert, store_key)
    for flag, path in (("--store-ca", store_ca), ("--store-cert", store_cert), ("--store-key", store_key)):
        if path and not os.path.isfile(path):
            raise XoError(f"{flag} {path}: no such file")
    if ctx.invoked_subcommand and "--help" not in sys.argv and "-h" not in sys.argv:
        _require_root()


# --- up / down ----------------------------------------------------------------------

@cli.command()
@click.option("--node", required=True, help="this node's name in the cluster")
@click.option("--underlay", required=True, help="the device that carries VXLAN between nodes")
@click.option("--xdp", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True, is_flag=False,
              flag_value="on", help="drop bad tunnel traffic in XDP before the stack sees it: auto attaches it only "
                                    "where the driver keeps its offloads (the tc program filters the same); --xdp: on")
@click.option("--no-xdp", is_flag=True, help="= --xdp off")
@click.option("--vxlan-port", default=model.DEFAULT_VXLAN_PORT, show_default=True, type=int)
@click.option("--detach", is_flag=True, help="run the agent in the background (pid file and log in /run/xoverlay)")
@click.option("--dns/--no-dns", default=True, show_default=True,
              help=f"answer the endpoints' DNS on {model.GATEWAY_IP}:53 (docs/DNS.md)")
@click.option("--dns-forward/--dns-refuse", default=True, show_default=True,
              help="names that are not the network's: forward them to the node's resolvers, or answer REFUSED")
@click.option("--dns-upstream", "dns_upstreams", multiple=True, metavar="ADDR[:PORT]",
              help="where to forward (repeatable; default: the nameservers of /etc/resolv.conf)")
@click.option("--metrics", default=None, metavar="IP:PORT",
              help="serve Prometheus metrics there, e.g. 127.0.0.1:9469 (default: off)")
@click.option("--lease-ttl", default=LEASE_TTL, show_default=True, type=click.FloatRange(2, 3600),
              help="seconds without the agent before the node is shown down (its registration's lease)")
@click.option("--docker", is_flag=True,
              help="serve Docker's network and IPAM driver xoverlay on /run/docker/plugins/xoverlay.sock "
                   "(docs/DOCKER.md)")
@click.option("--docker-plugin", default=None, metavar="SOCKET", help="serve it on this socket instead (implies --docker)")
@click.option("--docker-host", default="unix:///var/run/docker.sock", show_default=True, metavar="unix://PATH",
              help="the Docker daemon's API, where its networks' and containers' names are read")
@click.pass_context
def up(ctx, node, underlay, xdp, no_xdp, vxlan_port, detach, dns, dns_forward, dns_upstreams, metrics, lease_ttl,
       docker, docker_plugin, docker_host):
    """Load and attach the data path, join the cluster, and keep the maps in sync."""
    if no_xdp:
        if ctx.get_parameter_source("xdp") != click.core.ParameterSource.DEFAULT:
            raise XoError("--xdp and --no-xdp: say one")
        xdp = "off"
    from xoverlay.agent import up as node_up
    options = node_up.Options(node, underlay, xdp=xdp, vxlan_port=vxlan_port, dns=dns, dns_forward=dns_forward,
                              dns_upstreams=dns_upstreams, metrics=metrics, lease_ttl=lease_ttl,
                              docker_plugin=docker_plugin or ("/run/docker/plugins/xoverlay.sock" if docker else None),
                              docker_host=docker_host)
    if detach:
        click.echo(node_up.detach(options, [a for a in sys.argv[1:] if a != "--detach"], ctx.obj["state"]))
        return
    node_up.run(options, lambda: _store(ctx), say=click.echo,
                warn=lambda msg: click.echo(f"xoverlay: warning: {msg}", err=True))


@cli.command()
@click.option("--node", required=True)
@click.pass_context
def down(ctx, node):
    """Stop the node's agent, remove its programs, pins, veths and its place in the store."""
    from xoverlay.agent.down import node_down
    if _in_vm(ctx, node, ["down", "--node", node]):
        return
    store = _store(ctx)
    lab = open_lab(store, ctx.obj["state"])
    path = netns.resolve(lab.node_netns(node)) if node in lab.nodes() else None
    node_down(store, node, path)
    click.echo(f"node {node} is down")


# --- networks -----------------------------------------------------------------------

@cli.group()
def network():
    """Overlay networks: one VNI and one subnet each."""


@network.command("create")
@click.argument("name")
@click.option("--subnet", required=True, help="e.g. 10.10.0.0/16")
@click.option("--vni", type=int, default=None, help=f"1..{model.VNI_MAX} (default: the first free from 4096)")
@click.option("--slice-prefix", type=int, default=model.DEFAULT_SLICE_PREFIX, show_default=True,
              help="prefix length of the slice each node gets for its endpoints")
@click.option("--internal", is_flag=True,
              help="its endpoints reach nothing outside the overlay (as Docker's --internal)")
@click.pass_context
def network_create(ctx, name, subnet, vni, slice_prefix, internal):
    s = _store(ctx).update(lambda st: model.create_network(st, name, subnet, vni, slice_prefix, internal))
    n = s.networks[name]
    click.echo(f"network {n.name}: subnet {n.subnet}, VNI {n.vni}" + (", internal" if n.internal else ""))


@network.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def network_ls(ctx, as_json):
    st = _store(ctx).read()
    nets = sorted(st.networks.values(), key=lambda n: n.name)
    count = {n.name: sum(1 for e in st.endpoints.values() if e.network == n.name) for n in nets}
    _print_table("networks", ["NAME", "SUBNET", "VNI", "EGRESS", "ENDPOINTS"],
                 [[n.name, n.subnet, n.vni, _egress(n), count[n.name]] for n in nets], as_json,
                 [dict(dataclasses.asdict(n), endpoints=count[n.name]) for n in nets])


def _egress(n) -> str:
    return "internal" if n.internal else "masquerade"


@network.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def network_inspect(ctx, name, as_json):
    st = _store(ctx).read()
    if name not in st.networks:
        raise XoError(f"network {name} does not exist")
    n = st.networks[name]
    eps = sorted(e.name for e in st.endpoints.values() if e.network == name)
    services = sorted(s.name for s in st.services.values() if s.network == name)
    info = dict(dataclasses.asdict(n), endpoints=eps, services=services)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"network {n.name}: subnet {n.subnet}, VNI {n.vni}, slices /{n.slice_prefix}; "
               f"egress: {'none (internal)' if n.internal else 'masquerade through each endpoint node'}")
    click.echo(f"  endpoints: {' '.join(eps) or '-'}")
    click.echo(f"  services: {' '.join(services) or '-'}")


@network.command("rm")
@click.argument("name")
@click.pass_context
def network_rm(ctx, name):
    _store(ctx).update(lambda st: model.remove_network(st, name))
    click.echo(f"network {name} removed")


# --- endpoints ----------------------------------------------------------------------

@cli.group()
def endpoint():
    """Containers (network namespaces) attached to a network."""


@endpoint.command("add")
@click.argument("name")
@click.option("--network", required=True)
@click.option("--netns", "ns", default=None,
              help="a name under /run/netns or a path such as /proc/PID/ns/net (default: a new netns NAME)")
@click.option("--ip", default=None, help="a fixed address (default: the next free one of the node's slice)")
@click.option("--node", default=None, help="the node it lives on (default: this one)")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until the node's agent has plumbed it")
@click.pass_context
def endpoint_add(ctx, name, network, ns, ip, node, wait):
    store = _store(ctx)
    st = store.read()
    node = _default_node(st, node)
    model.check_name("endpoint", name)
    if ns is None:
        path, owns = netns.resolve(name), True
        if os.path.exists(path):
            raise XoError(f"netns {name} already exists: pass --netns {name} to attach it")
    else:
        path, owns = netns.resolve(ns), False
        if not netns.exists(path):
            raise XoError(f"netns {ns} does not exist")
        path = os.path.realpath(path) if path.startswith("/run/netns") else path
    st = store.update(lambda s: model.add_endpoint(s, name, network, node, path, owns, ip))
    ep = st.endpoints[name]
    if wait and not _wait_for(store, lambda s: name in s.endpoints and s.endpoints[name].ready):
        click.echo(f"endpoint {name}: {ep.ip} on {node} is stored, but node {node}'s agent has not plumbed it "
                   f"yet (is `xoverlay up --node {node}` running?)", err=True)
        return
    click.echo(f"endpoint {name}: {ep.ip} ({ep.mac}) on {node}, netns {ep.netns}")
    from xoverlay.kernel import resolvconf
    if resolvconf.netns_name(ep.netns) is None:
        click.echo(f"endpoint {name}: DNS is {model.GATEWAY_IP}; {ep.netns} has no name, so write "
                   f"`nameserver {model.GATEWAY_IP}` into its container's resolv.conf yourself (docs/DNS.md)")


def _wait_for(store, done, timeout=WAIT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    gen = -1
    while time.monotonic() < deadline:
        if done(store.read()):
            return True
        gen = store.wait(gen, timeout=0.2)
    return done(store.read())


@endpoint.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.option("--network", default=None)
@click.option("--node", default=None)
@click.pass_context
def endpoint_ls(ctx, as_json, network, node):
    st = _store(ctx).read()
    eps = sorted((e for e in st.endpoints.values()
                  if (network is None or e.network == network) and (node is None or e.node == node)),
                 key=lambda e: (e.network, e.node, e.name))

    status = model.endpoint_state
    _print_table("endpoints", ["NAME", "NETWORK", "NODE", "IP", "MAC", "NETNS", "STATE"],
                 [[e.name, e.network, e.node, e.ip, e.mac, e.netns, status(e)] for e in eps], as_json,
                 [dict(dataclasses.asdict(e), state=status(e)) for e in eps])


@endpoint.command("rm")
@click.argument("name")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.pass_context
def endpoint_rm(ctx, name, wait):
    store = _store(ctx)
    store.update(lambda s: model.mark_endpoint_removing(s, name))
    if wait and not _wait_for(store, lambda s: name not in s.endpoints):
        click.echo(f"endpoint {name} is marked for removal; its node's agent has not removed it yet", err=True)
        return
    click.echo(f"endpoint {name} removed")


# --- services -----------------------------------------------------------------------

@cli.group()
def service():
    """Services: a virtual IP load-balanced over endpoints (Maglev, in the kernel)."""


@service.command("create")
@click.argument("name")
@click.option("--network", required=True)
@click.option("--port", "ports", multiple=True, required=True, help="PORT[/tcp|udp], repeatable (default tcp)")
@click.option("--backend", "backends", multiple=True,
              help="ENDPOINT[:TARGET_PORT][@WEIGHT], repeatable (target port: only with one --port)")
@click.option("--vip", default="auto", show_default=True, help="an address of the network's subnet, or auto")
@click.option("--publish", "publish", multiple=True, help="NODE_PORT:SERVICE_PORT, on every node's underlay IP")
@click.option("--affinity", type=click.Choice(model.AFFINITIES), default="none", show_default=True)
@click.pass_context
def service_create(ctx, name, network, ports, backends, vip, publish, affinity):
    st = _store(ctx).update(lambda s: model.create_service(s, name, network, list(ports), list(backends), vip,
                                                           list(publish), affinity))
    svc = st.services[name]
    click.echo(f"service {name}: {svc.vip} {' '.join(svc.ports)} in {network}, "
               f"{len(svc.backends)} backend{'s' * (len(svc.backends) != 1)}")


@service.command("update")
@click.argument("name")
@click.option("--add-backend", "add", multiple=True, help="ENDPOINT[:PORT][@WEIGHT] (also ends draining)")
@click.option("--rm-backend", "rm", multiple=True, help="its connections are reset")
@click.option("--drain", "drain", multiple=True, help="keeps its connections, gets no new ones")
@click.pass_context
def service_update(ctx, name, add, rm, drain):
    st = _store(ctx).update(lambda s: model.update_service(s, name, list(add), list(rm), list(drain)))
    svc = st.services[name]
    click.echo(f"service {name}: {len(svc.active)} active, {len(svc.backends) - len(svc.active)} draining")


@service.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def service_ls(ctx, as_json):
    from xoverlay.ui import service_view
    rows = service_view.rows(_store(ctx).read())
    _print_table("services", ["NAME", "NETWORK", "VIP", "PORTS", "BACKENDS", "PUBLISH", "AFFINITY"],
                 [[r["name"], r["network"], r["vip"], " ".join(r["ports"]), f"{r['active']}/{r['backends']}",
                   " ".join(r["publish"]) or "-", r["affinity"]] for r in rows], as_json, rows)


@service.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def service_inspect(ctx, name, as_json):
    from xoverlay.ui import service_view
    st = _store(ctx).read()
    info = service_view.inspect(st, name, service_view.read_counters(st, name))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    c = info["counters"]
    click.echo(f"service {info['name']} (id {info['id']}): {info['vip']} {' '.join(info['ports'])} in "
               f"{info['network']}; publish {' '.join(info['publish']) or '-'}; affinity {info['affinity']}; "
               f"Maglev table {info['table_size']} slots")
    click.echo(f"  {c['connections']} connections, {c['packets']} packets, {c['bytes']} bytes")
    _print_table("backends", ["ENDPOINT", "ID", "IP", "NODE", "PORT", "WEIGHT", "STATE", "CONNS", "PKTS", "BYTES"],
                 [[b["endpoint"], b["id"], b["ip"], b["node"], b["port"] or "-", b["weight"], b["state"],
                   b["counters"]["connections"], b["counters"]["packets"], b["counters"]["bytes"]]
                  for b in info["backends"]], False, [])


@service.command("rm")
@click.argument("name")
@click.pass_context
def service_rm(ctx, name):
    _store(ctx).update(lambda s: model.remove_service(s, name))
    click.echo(f"service {name} removed")


# --- peers --------------------------------------------------------------------------

@cli.group()
def peer():
    """The other nodes of the cluster, as one node sees them."""


@peer.command("ls")
@click.option("--node", default=None, help="whose peers (default: this node)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def peer_ls(ctx, node, as_json):
    from xoverlay.core.rates import ago
    from xoverlay.kernel.counters import peer_rows
    store = _store(ctx)
    st = store.read()
    node = _default_node(st, node)
    if _in_vm(ctx, node, ["peer", "ls", "--node", node, *(["--json"] if as_json else [])]):
        return
    rows = peer_rows(st, node, store.alive())
    _print_table(f"peers of {node}", ["NODE", "STATE", "UNDERLAY IP", "SUBNETS", "TX PKTS", "TX BYTES", "RX PKTS",
                                      "RX BYTES", "LAST RX"],
                 [[r["node"], r["liveness"], r["underlay_ip"], " ".join(r["subnets"]) or "-", r["tx_packets"],
                   r["tx_bytes"], r["rx_packets"], r["rx_bytes"], ago(r["last_rx_ago"])] for r in rows], as_json, rows)


# --- status -------------------------------------------------------------------------

@cli.command()
@click.option("--node", default=None)
@click.option("--once", is_flag=True, help="print one snapshot and exit")
@click.option("--json", "as_json", is_flag=True, help="one machine-readable snapshot")
@click.pass_context
def status(ctx, node, once, as_json):
    """What a node's data path is doing, from its pinned maps."""
    from xoverlay.ui import status as status_mod
    store = _store(ctx)
    state, alive, where = status_mod.store_view(store)
    if state is None:          # the maps still tell what the data path does
        node = node or os.environ.get("XOVERLAY_NODE")
        if not node:
            raise XoError(f"{where['error']}: say which node with --node to see its data path")
    else:
        node = _default_node(state, node)
    if _in_vm(ctx, node, ["status", "--node", node, *(["--once"] if once else []), *(["--json"] if as_json else [])]):
        return

    def snap():
        return status_mod.snapshot(state or model.State(), node, alive, where)
    if as_json:
        click.echo(json.dumps(snap(), indent=2))
        return
    if once or not sys.stdout.isatty():
        console.print(status_mod.render(snap()))
        return
    from xoverlay.ui.tui import StatusApp, StoreSource
    source = StoreSource(ctx.obj["state"], ctx.obj["tls"])
    StatusApp(source.snapshot, node, source.nodes).run()


# --- monitor ------------------------------------------------------------------------

@cli.command()
@click.option("--node", default=None)
@click.option("--reason", "reasons", multiple=True, metavar="REASON",
              help="only drops of this reason (repeat for more; names as `status` shows them)")
@click.option("--endpoint", default=None, help="only events to, from or on the veth of this endpoint")
@click.option("--service", default=None, help="only new connections to this service")
@click.option("--sample", type=click.IntRange(min=1), default=None, metavar="N",
              help="also show forwarded packets, one in N")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line (schema in docs/STATUS.md)")
@click.option("--count", type=click.IntRange(min=1), default=None, help="stop after N events")
@click.pass_context
def monitor(ctx, node, reasons, endpoint, service, sample, as_json, count):
    """Live data-path events: every drop with its reason and addresses, every new service
    connection with the backend chosen (and forwarded packets with --sample). The programs
    write events only while a monitor runs."""
    from xoverlay.ui import monitor as monitor_mod
    store = _store(ctx)
    node = _default_node(store.read(), node)
    if _in_vm(ctx, node, ["monitor", "--node", node, *(a for r in reasons for a in ("--reason", r)),
                          *(["--endpoint", endpoint] if endpoint else []), *(["--service", service] if service else []),
                          *(["--sample", str(sample)] if sample else []), *(["--json"] if as_json else []),
                          *(["--count", str(count)] if count else [])]):
        return
    monitor_mod.run(store.read, node, reasons=reasons, endpoint=endpoint, service=service, sample=sample,
                    as_json=as_json, count=count, echo=click.echo, note=lambda msg: click.echo(f"xoverlay monitor: {msg}", err=True))


# --- store ----------------------------------------------------------------------------

@cli.group("store")
def store_group():
    """The cluster store: etcd for clusters of several machines (docs/STORE.md)."""


@store_group.command("serve")
@click.option("--listen", default=f"127.0.0.1:{2379}", show_default=True, metavar="IP:PORT",
              help="where agents and the CLI reach etcd: an address of the underlay for a cluster")
@click.option("--data-dir", default="/var/lib/xoverlay/etcd", show_default=True, help="etcd's data (kept)")
@click.option("--name", default=None, help="the etcd member's name (default: this host's name)")
@click.option("--peer-port", default=2380, show_default=True, type=click.IntRange(1, 65535),
              help="etcd's peer port, on 127.0.0.1 (one member)")
@click.option("--tls-cert", default=None, metavar="FILE", help="serve https with this certificate")
@click.option("--tls-key", default=None, metavar="FILE", help="the key of --tls-cert")
@click.option("--client-ca", default=None, metavar="FILE",
              help="with --tls-cert: clients must show a certificate signed by this CA")
@click.option("--detach", is_flag=True, help="run in the background (log beside the data dir)")
def store_serve(listen, data_dir, name, peer_port, tls_cert, tls_key, client_ca, detach):
    """Run Debian's etcd as the cluster store, with sane flags (no etcd of our own)."""
    from xoverlay.agent.metrics import parse_listen
    from xoverlay.store import etcd_server
    host, port = parse_listen(listen)
    given = [tls_cert, tls_key, client_ca]
    if any(given) and not all(given):
        raise XoError("TLS needs all three of --tls-cert, --tls-key and --client-ca")
    for path in filter(None, given):
        if not os.path.isfile(path):
            raise XoError(f"{path}: no such file")
    tls = etcd_server.ServerTls(tls_cert, tls_key, client_ca) if tls_cert else None
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    os.chmod(data_dir, 0o700)        # etcd's own requirement
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cmd = etcd_server.command(name or socket.gethostname(), data_dir,
                              [f"{'https' if tls else 'http'}://{hostport}"], f"http://127.0.0.1:{peer_port}", tls)
    url = f"etcd://{hostport}"
    hint = (" with --store-ca/--store-cert/--store-key" if tls else "")
    if detach:
        log = data_dir.rstrip("/") + ".log"
        proc = etcd_server.start(cmd, log, host, port)
        click.echo(f"etcd pid {proc.pid} serves {url} (data {data_dir}, log {log}); use --store {url}{hint}")
        return
    click.echo(f"etcd serves {url} (data {data_dir}); use --store {url}{hint}; Ctrl-C stops it", err=True)
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError:
        raise XoError("etcd is not installed: apt-get install etcd-server (setup.sh does it)") from None


# --- lab ----------------------------------------------------------------------------

@cli.group()
def lab():
    """A multi-node cluster on this machine: network namespaces, or qemu VMs (--vms)."""


@lab.command("up")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option("--xdp/--no-xdp", default=None,
              help="force XDP on the nodes' underlay on or off (default: on in the namespace lab, whose tests "
                   "cover XDP's paths; the nodes' own `--xdp auto` in the VM lab)")
@click.option("--vms", is_flag=True, help="each node a qemu VM with its own kernel (docs/VMLAB.md); store: etcd")
@click.option("--kernel", default="debian12", show_default=True, metavar="debian12|running|PATH",
              help="the VMs' kernel (with --vms)")
@click.option("--store", "store_kind", type=click.Choice(["sqlite", "etcd"]), default=None,
              help="the lab's store: the --state file (SQLite, the default for a new lab) or a real etcd "
                   "started for the lab (Debian's; stopped and removed by `lab down`)")
@click.option("--docker", is_flag=True, help="a dockerd in every node, with xoverlay as its network plugin "
                                               "(docs/DOCKER.md; namespace lab only)")
@click.pass_context
def lab_up(ctx, nodes, xdp, vms, kernel, store_kind, docker):
    lab = open_lab(_store(ctx), ctx.obj["state"], vms, kernel)
    if docker and isinstance(lab, VmLab):
        raise XoError("--docker: the namespace lab only, for now")
    extra = {"docker": True} if docker else {}
    lab.up(nodes, xdp=xdp, echo=click.echo, store=store_kind, **extra)


@lab.command("docker", context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("args", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def lab_docker(ctx, node, args):
    """Run the docker CLI against a lab node's dockerd: xoverlay lab docker NODE -- ARGS..."""
    from xoverlay.lab.docker_lab import NodeDocker
    lab = open_lab(_store(ctx), ctx.obj["state"])
    if isinstance(lab, VmLab) or not lab._load().get("docker"):
        raise XoError("the lab has no Docker: `xoverlay lab up --docker`")
    if node not in lab.nodes():
        raise XoError(f"the lab has no node {node}: {', '.join(lab.nodes())}")
    cmd = NodeDocker(lab, node).cli(*args)
    os.execvp(cmd[0], cmd)


@lab.command("demo")
@click.pass_context
def lab_demo(ctx):
    """Bring the lab up (if it is not) and show it carrying traffic."""
    state = ctx.obj["state"]
    store = _store(ctx)
    lab = open_lab(store, state)
    lab.up(3, echo=click.echo)
    nodes = lab.nodes()
    eps = store.read().endpoints
    src, dst = f"{nodes[0]}-a", f"{nodes[1]}-a"
    console.rule(f"ping {dst} ({eps[dst].ip}, on {nodes[1]}) from {src} (on {nodes[0]})")
    rc, out, _ = lab.run(src, ["ping", "-c", "3", "-i", "0.2", eps[dst].ip], check=False)
    click.echo(out.decode().strip())
    if rc != 0:
        raise XoError(f"cross-node ping from {src} to {dst} failed")
    src_node = nodes[0]
    url, answers = lab.web_requests(src)
    console.rule(f"service web: {len(answers)} requests from {src} to {url} (one connection each), spread over "
                 "backends on every node")
    for a in answers:
        click.echo(f"  {a}")
    far = nodes[1] if len(nodes) > 1 else src_node
    url, answer = lab.mesh_request(far)
    console.rule(f"routing mesh: the outside client ({lab.client_ip}) asks {url}, {far}'s underlay IP")
    click.echo(f"  {answer}")
    click.echo(f"  (the backend saw the client's own address {lab.client_ip}; the client saw only {url})")
    console.rule("the overlay, as the CLI shows it")
    ctx.invoke(endpoint_ls, as_json=False, network=None, node=None)
    console.rule(f"xoverlay status --node {nodes[0]} --once")
    ctx.invoke(status, node=nodes[0], once=True, as_json=False)
    click.echo(f"Try: xoverlay lab exec {nodes[0]}-a -- ping 10.10.1.1 ; xoverlay lab exec client -- curl "
               f"http://{store.read().nodes[nodes[0]].underlay_ip}:8080/ ; xoverlay lab down removes it all.")


@lab.command("down")
@click.pass_context
def lab_down(ctx):
    open_lab(_store(ctx), ctx.obj["state"]).down(echo=click.echo)


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def lab_exec(ctx, name, command):
    """Run COMMAND inside a lab node, an endpoint, `client` or `underlay`: xoverlay lab exec NAME -- CMD..."""
    lab = open_lab(_store(ctx), ctx.obj["state"])
    if isinstance(lab, VmLab):
        sys.exit(lab.run(name, list(command), check=False, capture=False, timeout=None,
                         tty=sys.stdin.isatty() and sys.stdout.isatty())[0])
    prefix = lab.command_in(name)
    os.execvp(prefix[0], [*prefix, *command])


def main():
    try:
        cli(standalone_mode=False)
    except XoError as e:
        click.echo(f"xoverlay: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)

