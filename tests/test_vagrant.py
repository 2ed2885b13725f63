"""vagrant/ cannot boot here: check what it says so it cannot rot. Its nodes are three,
with distinct addresses on one /24, and every xoverlay command it runs exists in the CLI
with the options it passes."""
import re
import shlex
from pathlib import Path

import click

from xoverlay.ui.cli import cli

VAGRANT = Path(__file__).resolve().parent.parent / "vagrant"


def test_three_nodes_on_one_private_network():
    text = (VAGRANT / "Vagrantfile").read_text()
    nodes = dict(re.findall(r'"(node\d+)"\s*=>\s*"([\d.]+)"', text))
    assert sorted(nodes) == ["node1", "node2", "node3"]
    assert len(set(nodes.values())) == 3
    assert len({ip.rsplit(".", 1)[0] for ip in nodes.values()}) == 1
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert 'path: "provision.sh", args: [name, ip, ETCD_IP]' in text
    assert 'ETCD_IP = NODES["node1"]' in text and 't.run = { path: "make-certs", args: [ETCD_IP] }' in text


def _commands(script: str):
    for line in script.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("xoverlay "):
            yield shlex.split(line.split(">", 1)[0].split("||")[0])[1:]


def _assert_in_cli(argv: list[str]) -> None:
    group, args = cli, list(argv)
    known = {opt for p in cli.params for opt in getattr(p, "opts", [])}      # global options first
    while args and args[0].startswith("--"):
        opt = args.pop(0)
        assert opt.split("=")[0] in known, f"xoverlay {' '.join(argv)}: no global option {opt}"
        if "=" not in opt and args and not args[0].startswith("--"):
            args.pop(0)
    if "--" in args:                      # what follows is another program's (lab exec)
        args = args[:args.index("--")]
    while isinstance(group, click.Group):
        group = group.commands.get(args.pop(0))
        assert group is not None, f"no such command: xoverlay {' '.join(argv)}"
    known = {opt for p in group.params for opt in getattr(p, "opts", [])}
    for a in args:
        if a.startswith("--"):
            assert a.split("=")[0] in known, f"xoverlay {' '.join(argv)}: no option {a}"


def test_provisioning_installs_like_the_readme_and_runs_real_commands():
    """provision.sh installs as the README does and ends with node-up, the step the VM
    lab runs in its guests (tests/test_vm_lab.py), which starts the agent."""
    script = (VAGRANT / "provision.sh").read_text()
    assert "./setup.sh" in script
    assert script.rstrip().endswith('exec /opt/xoverlay/vagrant/node-up "$node" "$ip"')
    node_up = (VAGRANT / "node-up").read_text()
    commands = list(_commands(script)) + list(_commands(node_up))
    assert ["up", "--node", "$node", "--underlay", "$underlay", "--detach", "$@"] in commands
    assert ["store", "serve", "--listen", "$etcd_ip:2379", "--tls-cert", "$tls/etcd.crt", "--tls-key",
            "$tls/etcd.key", "--client-ca", "$tls/ca.crt", "--detach"] in commands
    for argv in commands:
        _assert_in_cli(argv)


# In vagrant/check: `xo VM ARGS...` lines, and `xoverlay ARGS` inside the commands given to `on`.
_CHECK_XO = re.compile(r"(?:^|[;&|(]|\bdo|\bthen)\s*xo \S+ ([^;|)\n]+)", re.M)
_CHECK_XOVERLAY = re.compile(r"xoverlay ([^|\"';>&)]+)")


def test_the_cross_vm_check_covers_every_path_with_real_commands():
    script = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in (VAGRANT / "check").read_text().splitlines())
    commands = [shlex.split(m) for m in _CHECK_XO.findall(script)]
    commands += [shlex.split(m) for m in _CHECK_XOVERLAY.findall(script)
                 if "$*" not in m and "$@" not in m and m.split() != ["--state"]]     # --lab: `--state "$STATE" ...`
    verbs = {" ".join(a for a in argv[:2]) for argv in commands}
    assert {"network create", "endpoint add", "service create", "service inspect", "endpoint ls",
            "service rm", "endpoint rm", "network rm"} <= verbs, verbs
    for argv in commands:
        _assert_in_cli(argv)
    for what in ("ping -c", "iperf3 -c", "http://$vip/", "http://chkweb/", ":8089/", "trap cleanup EXIT"):
        assert what in (VAGRANT / "check").read_text(), f"vagrant/check lost its {what!r}"


def _profile_env(script: str, **shell_vars) -> dict[str, str]:
    """The environment provision.sh writes to /etc/profile.d/xoverlay.sh, its shell
    variables filled in."""
    body = re.search(r"cat > /etc/profile.d/xoverlay.sh <<ENV\n(.*?)\nENV\n", script, re.S).group(1)
    env = {}
    for line in body.splitlines():
        name, value = re.fullmatch(r"export (\w+)=(\S+)", line).groups()
        for var, sub in shell_vars.items():
            value = value.replace(f"${var}", sub)
        env[name] = value
    return env


def test_the_vms_certificates_and_store_settings_reach_a_real_tls_etcd(tmp_path):
    """make-certs' certificates, `store serve` with provisioning's TLS flags, and the CLI
    with the environment a VM gets: node2 reaches node1's etcd (here on 127.0.0.1, also in
    the server certificate), and a certificate of another CA is refused."""
    import os
    import shutil
    import subprocess
    import sys

    from xoverlay.store.etcd_server import free_port, stop
    shutil.copy(VAGRANT / "make-certs", tmp_path / "make-certs")
    subprocess.run([str(tmp_path / "make-certs"), "127.0.0.1"], check=True, capture_output=True)
    tls = tmp_path / "tls"
    port = free_port()
    serve = subprocess.run([sys.executable, "-m", "xoverlay", "--state", str(tmp_path / "unused.db"), "store", "serve",
                            "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "etcd"), "--peer-port",
                            str(free_port()), "--tls-cert", str(tls / "etcd.crt"), "--tls-key", str(tls / "etcd.key"),
                            "--client-ca", str(tls / "ca.crt"), "--detach"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 0, serve.stderr
    pid = int(re.search(r"etcd pid (\d+)", serve.stdout).group(1))
    try:
        env = _profile_env((VAGRANT / "provision.sh").read_text(), etcd_ip="127.0.0.1", tls=str(tls), node="node2")
        env["XOVERLAY_STORE"] = env["XOVERLAY_STORE"].replace(":2379", f":{port}")
        base = {k: v for k, v in os.environ.items() if not k.startswith("XOVERLAY_")}

        def xo(*args, **extra):
            return subprocess.run([sys.executable, "-m", "xoverlay", *args], capture_output=True, text=True,
                                  timeout=60, env={**base, **env, **extra})
        r = xo("network", "create", "vnet", "--subnet", "10.77.0.0/16")
        assert r.returncode == 0, r.stderr
        assert "vnet" in xo("network", "ls").stdout
        other = tmp_path / "other"
        other.mkdir()
        shutil.copy(VAGRANT / "make-certs", other / "make-certs")
        subprocess.run([str(other / "make-certs"), "127.0.0.1"], check=True, capture_output=True)
        bad = xo("network", "ls", XOVERLAY_STORE_CERT=str(other / "tls" / "node2.crt"),
                 XOVERLAY_STORE_KEY=str(other / "tls" / "node2.key"))
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    finally:
        stop(pid)
