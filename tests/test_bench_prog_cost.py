"""bench/prog-cost: two builds' programs measured side by side on the tests' harness, in
alternating order; a revision that is no commit, or whose programs do not fit this tree's
map layouts, is one line and exit status 1, with nothing left behind."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest
from conftest import skip_if_bench_locked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG_COST = os.path.join(REPO, "bench", "prog-cost")
sys.path.insert(0, REPO)

SMALL = ["--rounds", "2", "--samples", "200", "--repeat", "2000"]
# The data path before bpf/lib/maps.h was split: its programs know no loopback.c.
OLD_LAYOUT = "d376e25"


def _prog_cost(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, PROG_COST, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    skip_if_bench_locked(r.stderr)
    return r


def _left_behind() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "xo-prog-cost-*"))


def test_two_builds_are_measured_side_by_side(tmp_path):
    out = tmp_path / "prog-cost.json"
    r = _prog_cost("HEAD", *SMALL, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [rd["order"] for rd in res["rounds"]] == [["before", "after"], ["after", "before"]]
    names = [p["name"] for p in res["paths"]]
    assert "endpoint: VXLAN encap (to a remote endpoint)" in names and "underlay tc: VXLAN decap" in names
    assert any(n.startswith("VIP,") for n in names)
    for p in res["paths"]:
        for build in ("before", "after"):
            assert p["ns_single"][build]["n"] == 2 and p["ns_single"][build]["median"] > 0, p
        assert p["ns_single_ratio"]["n"] == 2, p
    assert "| endpoint: VXLAN encap (to a remote endpoint) |" in r.stdout
    assert not _left_behind()


def test_a_revision_that_is_no_commit_is_one_line(tmp_path):
    out = tmp_path / "prog-cost.json"
    r = _prog_cost("no-such-revision", *SMALL, "--out", str(out))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "prog-cost: no-such-revision: not a commit of this repository"
    assert "Traceback" not in r.stderr and not out.exists() and not _left_behind()


def test_programs_of_another_layout_are_refused(tmp_path):
    if subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{OLD_LAYOUT}^{{commit}}"],
                      capture_output=True).returncode:
        pytest.skip(f"{OLD_LAYOUT} is not in this clone's history")
    out = tmp_path / "prog-cost.json"
    r = _prog_cost(OLD_LAYOUT, *SMALL, "--out", str(out))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"prog-cost: {OLD_LAYOUT}: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists() and not _left_behind()


def test_refused_by_the_lock_it_leaves_nothing(tmp_path):
    import fcntl

    from bench.lib.shell import LOCK_PATH, LOCKED
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pytest.skip(f"a benchmark is running ({LOCK_PATH})")
        r = subprocess.run([sys.executable, PROG_COST, "HEAD", *SMALL, "--out", str(tmp_path / "p.json")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(LOCK_PATH)
    assert r.returncode == 1 and LOCKED in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "p.json").exists() and not _left_behind()
