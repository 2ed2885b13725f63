"""vagrant/ cannot boot here: check what it says so it cannot rot. Its nodes are three,
with distinct addresses on one /24, and every xoverlay command it runs exists in the CLI
with the options it passes."""
import re
import shlex
from pathlib import Path

import click

from ctl.cli import cli

VAGRANT = Path(__file__).resolve().parent.parent / "vagrant"


def test_three_nodes_on_one_private_network():
    text = (VAGRANT / "Vagrantfile").read_text()
    nodes = dict(re.findall(r'"(node\d+)"\s*=>\s*"([\d.]+)"', text))
    assert sorted(nodes) == ["node1", "node2", "node3"]
    assert len(set(nodes.values())) == 3
    assert len({ip.rsplit(".", 1)[0] for ip in nodes.values()}) == 1
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert 'path: "provision.sh", args: [name, ip]' in text


def _commands(script: str):
    for line in script.splitlines():
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
    while isinstance(group, click.Group):
        group = group.commands.get(args.pop(0))
        assert group is not None, f"no such command: xoverlay {' '.join(argv)}"
    known = {opt for p in group.params for opt in getattr(p, "opts", [])}
    for a in args:
        if a.startswith("--"):
            assert a.split("=")[0] in known, f"xoverlay {' '.join(argv)}: no option {a}"


def test_provisioning_installs_like_the_readme_and_runs_real_commands():
    script = (VAGRANT / "provision.sh").read_text()
    assert "./setup.sh" in script
    commands = list(_commands(script))
    assert ["up", "--node", "$node", "--underlay", "$underlay", "--detach"] in commands
    for argv in commands:
        _assert_in_cli(argv)


# In vagrant/check: `xo VM ARGS...` lines, and `xoverlay ARGS` inside the commands given to `on`.
_CHECK_XO = re.compile(r"(?:^|[;&|]|\bdo|\bthen)\s*xo \S+ ([^;\n]+)", re.M)
_CHECK_XOVERLAY = re.compile(r"xoverlay ([^|\"';>&)]+)")


def test_the_cross_vm_check_covers_every_path_with_real_commands():
    script = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in (VAGRANT / "check").read_text().splitlines())
    commands = [shlex.split(m) for m in _CHECK_XO.findall(script)]
    commands += [shlex.split(m) for m in _CHECK_XOVERLAY.findall(script) if not m.startswith("$*")]
    verbs = {" ".join(a for a in argv[:2]) for argv in commands}
    assert {"network create", "endpoint add", "service create", "service inspect", "endpoint ls",
            "service rm", "endpoint rm", "network rm"} <= verbs, verbs
    for argv in commands:
        _assert_in_cli(argv)
    for what in ("ping -c", "iperf3 -c", "http://$vip/", "http://chkweb/", ":8080/", "trap cleanup EXIT"):
        assert what in (VAGRANT / "check").read_text(), f"vagrant/check lost its {what!r}"
