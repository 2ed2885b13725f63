"""The package's folders are its architecture: imports point down the layers (xoverlay/
__init__.py draws them), so the pure rules never reach for the kernel, a store or a
terminal, and no folder grows past a dozen modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xoverlay"
# Lowest first: a module may import from its own layer and those before it.
LAYERS = ["errors", "maps", "core", "kernel", "store", "runtimes", "agent", "lab", "ui"]
# What the pure layers may import from outside the package: no sockets, processes,
# netlink, BPF or databases.
PURE_MAY_IMPORT = {"__future__", "collections", "ctypes", "dataclasses", "functools", "hashlib", "ipaddress",
                   "re", "typing", "dnslib"}
# The layouts name their pin paths and the C sources (os.path, pathlib) and convert
# addresses (socket.inet_aton): string work, no I/O, but nothing core needs.
PURE = {"core": PURE_MAY_IMPORT, "maps": PURE_MAY_IMPORT | {"os", "pathlib", "socket"}}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if layer_of(p) in LAYERS)


def test_every_module_sits_in_a_layer():
    strays = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
              if layer_of(p) not in LAYERS + ["__init__", "__main__"]]
    assert not strays, f"modules outside every layer of {LAYERS}: {strays}"


def upward(path: Path, layer: str) -> list[str]:
    """The imports of `path` that reach above `layer`, or are relative (which hide it)."""
    mine = LAYERS.index(layer)
    wrong = []
    for line, module in imports(path):
        if module.startswith("."):
            wrong.append(f"line {line}: relative import {module} (name the layer: from xoverlay.X ...)")
            continue
        parts = module.split(".")
        if parts[0] == "xoverlay" and len(parts) > 1 and parts[1] in LAYERS and LAYERS.index(parts[1]) > mine:
            wrong.append(f"line {line}: {module} is above {layer}")
    return wrong


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    wrong = upward(path, layer_of(path))
    assert not wrong, "; ".join(wrong)


def io_imports(path: Path, layer: str) -> list[str]:
    return [f"line {line}: {module}" for line, module in imports(path)
            if module.split(".")[0] not in PURE[layer] | {"xoverlay"}]


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(p) in PURE], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_pure_layers_do_no_io(path):
    wrong = io_imports(path, layer_of(path))
    assert not wrong, f"{path.name} imports what does I/O: {wrong}"


def test_the_check_sees_the_core_import_os(tmp_path):
    copy = tmp_path / "desired.py"
    copy.write_text((PACKAGE / "core" / "desired.py").read_text() + "\n\ndef f():\n    import os\n")
    assert io_imports(PACKAGE / "core" / "desired.py", "core") == []
    assert [w.split(": ", 1)[1] for w in io_imports(copy, "core")] == ["os"]


def test_no_folder_holds_more_than_a_dozen_modules():
    for folder in [PACKAGE, *(p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, f"{folder.name}/ holds {len(modules)} modules"


def test_the_check_sees_a_pure_module_reach_up(tmp_path):
    copy = tmp_path / "model.py"
    copy.write_text((PACKAGE / "core" / "model.py").read_text() + "\n\ndef f():\n    from xoverlay.kernel import bpf\n")
    assert upward(PACKAGE / "core" / "model.py", "core") == []
    assert [w.split(": ", 1)[1] for w in upward(copy, "core")] == ["xoverlay.kernel is above core"]
