"""The contract between the BPF data path and the control plane: every map's layout
(layout.py), the drop reasons (drops.py) and the monitor's event types (events.py), read
from or checked against the C headers in bpf/lib/."""
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"     # the data path's sources
