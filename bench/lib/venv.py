"""Re-run a benchmark under the project's venv. Imports nothing the venv has: a script
calls it before any of that, whatever python started it (the shebang's `python3` from
PATH cannot import bcc)."""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENVS = (os.path.join(REPO, ".venv/bin/python"), "/opt/xoverlay-venv/bin/python")


def ensure_venv(script: str) -> None:
    """Re-run `script` (with its arguments) under the project's venv when this python
    lacks bcc, pyroute2, scapy or xoverlay; return when it has them."""
    try:
        import bcc  # noqa: F401
        import pyroute2  # noqa: F401
        import scapy  # noqa: F401

        import xoverlay  # noqa: F401
        return
    except ImportError:
        pass
    for candidate in VENVS:
        venv = os.path.dirname(os.path.dirname(candidate))
        if os.access(candidate, os.X_OK) and os.path.realpath(venv) != os.path.realpath(sys.prefix):
            os.execv(candidate, [candidate, os.path.abspath(script), *sys.argv[1:]])
    sys.exit(f"{os.path.basename(script)}: needs the project's venv (bcc, pyroute2, scapy, xoverlay): run ./setup.sh, "
             f"then .venv/bin/python {os.path.relpath(script)}")
