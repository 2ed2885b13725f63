"""bench/soak, short: 40 s of traffic plus a change a second on a lab of its own, then no
map entry, netns, link, pin, process or fd left over, no ping lost, agents' RSS flat.
The 10-minute run is `bench/soak` (figures in docs/RELIABILITY.md)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lab

SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "soak")


def test_short_soak_leaks_nothing_and_loses_nothing():
    r = subprocess.run([sys.executable, SOAK, "--seconds", "40", "--json"], capture_output=True, text=True,
                       timeout=600)
    assert r.stdout.strip(), r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps({k: result[k] for k in ("seconds", "changes", "ping", "rss_kib", "agent_fds", "seed")}))
    assert result["leaks"] == {}
    assert sum(result["changes"].values()) >= 30
    assert result["ping"]["sent"] >= 1000 and result["ping"]["received"] == result["ping"]["sent"]
    assert result["ok"] and r.returncode == 0, result["rss_kib"]
