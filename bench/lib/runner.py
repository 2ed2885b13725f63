"""What bench/eastwest and bench/services share: their common options, the rounds (the
order rotating) and the interleaved measurement with its control, the run's life cycle
(lock, leftovers, paths and servers up, measuring, everything down whatever happens,
then the programs' cost), the bars, and the results file, report and chart. Each script
keeps its paths, its measurements and its bars."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import time

from bench.lib.shell import BPF_NODE, log, machine, removed_after, run_locked
from bench.lib.stats import cycle_ratio, write_json
from bench.lib.topologies import CONTAINER_MTU, bring_up, clean_leftovers, take_down

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# rounds, seconds, BPF samples, BPF repeat of --quick
QUICK = (1, 2, 5000, 100_000)


# --- options ------------------------------------------------------------------------------

def parser(name: str, doc: str, rounds: int, rounds_help: str = "rounds") -> argparse.ArgumentParser:
    """The options every such benchmark has; the script adds its own, then calls parse."""
    p = argparse.ArgumentParser(prog=name, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(full_defaults=(rounds, 5, 50_000, 1_000_000))
    p.add_argument("--rounds", type=int, default=None, help=f"{rounds_help} (default {rounds})")
    p.add_argument("--seconds", type=float, default=None, help="length of each test (default 5)")
    p.add_argument("--bpf-samples", type=int, default=None, help="single runs per BPF case (default 50000)")
    p.add_argument("--bpf-repeat", type=int, default=None, help="repeat of the looped BPF_PROG_TEST_RUN (default 1e6)")
    p.add_argument("--skip-bpf", action="store_true", help="no BPF_PROG_TEST_RUN costs")
    p.add_argument("--agents-running", action="store_true",
                   help="keep the xoverlay agents running while measuring (default: SIGSTOP them)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round, 2 s tests, 5000 BPF samples, repeat 1e5 (explicit options win)")
    p.add_argument("--out", default=os.path.join(BENCH, "results"), help=f"where {name}.json/.png go")
    return p


def parse(p: argparse.ArgumentParser, full_defaults=None) -> argparse.Namespace:
    """full_defaults(args): the defaults without --quick, when the options change them."""
    a = p.parse_args()
    full = full_defaults(a) if full_defaults else a.full_defaults
    for option, value in zip(("rounds", "seconds", "bpf_samples", "bpf_repeat"), QUICK if a.quick else full):
        if getattr(a, option) is None:
            setattr(a, option, value)
    return a


def results(name: str, args, **config) -> dict:
    """A results file's start: what ran, when, where, with which settings."""
    return {"benchmark": name, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(),
            "config": {"rounds": args.rounds, "seconds": args.seconds, **config,
                       "agents_running": args.agents_running, "bpf_samples": args.bpf_samples,
                       "bpf_repeat": args.bpf_repeat, "container_mtu": CONTAINER_MTU, "quick": args.quick},
            "bpf": []}


# --- rounds, interleaving ------------------------------------------------------------------

def rotated(items: list, r: int) -> list:
    """Round r's order: the items rotated by r, so that none is always first."""
    k = r % len(items)
    return items[k:] + items[:k]


def with_control(measure, targets: list, prefix: str) -> tuple[list[dict], float | None]:
    """`targets` measured interleaved by `measure` (targets -> rows), the first twice:
    the rows, and the second's <prefix>_cycle_rates over the first's (cycle_ratio), the
    method's own noise."""
    got = measure(targets + targets[:1])
    rates = f"{prefix}_cycle_rates"
    return got[:-1], cycle_ratio(got[-1][rates], got[0][rates])


# --- the run ---------------------------------------------------------------------------

def run(name: str, args, res: dict, *, every: list, paths: list, servers, measure, costs) -> int:
    """Holding the lock: what an earlier run of any of `every` left removed, `paths` up
    with servers(path) started, measure() (it fills res), everything removed again
    whatever happens; then, unless --skip-bpf, res["bpf"] = costs(samples, repeat), its
    pins removed whatever happens. The exit status (run_locked's)."""
    def work():
        started = []
        with removed_after(lambda: take_down(paths, started)):
            left = clean_leftovers(every)
            if left:
                log(f"removed leftovers of an earlier run: {', '.join(left)}")
            bring_up(paths, servers, started)
            measure()
        if not args.skip_bpf:
            from xoverlay.kernel import datapath
            log("BPF per-packet cost (BPF_PROG_TEST_RUN)")
            with removed_after(lambda: datapath.unpin(BPF_NODE)):
                res["bpf"] = costs(args.bpf_samples, args.bpf_repeat)
    return run_locked(name, work)


def write(name: str, res: dict, args, started: float, report, chart) -> int:
    """The results file and the chart in --out, the report on stdout."""
    res["duration_s"] = round(time.monotonic() - started, 1)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{name}.json")
    write_json(json_path, res)
    png_path = chart_file(chart, res, os.path.join(args.out, f"{name}.png"))
    print(report(res))
    log(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else "") + f" in {res['duration_s']:.0f} s")
    return 0


# --- bars ------------------------------------------------------------------------------

class Bars(list):
    """The bars of a run as they are judged: one dict each, as the results file has them."""

    def add(self, text: str, value: float, threshold: float, ok: bool, detail: str | None = None,
            judged: bool = True) -> None:
        """judged=False: a cross-check of a bar, measured another way; not a bar."""
        b = {"bar": text, "value": value, "threshold": threshold, "pass": bool(ok) if judged else None}
        if detail is not None:
            b["detail"] = detail
        self.append(b)


def bar_table(bars: list[dict], thresholds: bool = True) -> list[str]:
    """The bars as a Markdown table; thresholds: the value each needs, next to its own."""
    lines = ["| bar | measured | pass |", "|---|---|---|"]
    for b in bars:
        measured = f"{b['value']:.3f}" + (f" (needs {b['threshold']:g})" if thresholds else "")
        if b.get("detail"):
            measured += f", {b['detail']}"
        verdict = "cross-check" if b["pass"] is None else "PASS" if b["pass"] else "FAIL"
        lines.append(f"| {b['bar']} | {measured} | {verdict} |")
    return lines


def cell(fmt: str, s: dict) -> str:
    """A summary in a table: the median, with (min–max) over several rounds."""
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


# --- the chart -----------------------------------------------------------------------------

def chart_file(chart, res: dict, path: str) -> str | None:
    """chart(res, path); the path, or None without matplotlib."""
    try:
        chart(res, path)
    except ImportError:
        log("no matplotlib in this python: no chart (pip install matplotlib)")
        return None
    return path


@contextlib.contextmanager
def figure(path: str, res: dict, what: str, legend: str, panels: int, size: tuple[float, float],
           rect=(0, 0, 1, 1), where: str | None = None):
    """A row of `panels` panels of `size` each for the with-block to draw, saved at `path`
    under a title that says what ran where ("xoverlay `what`, date, machine: median of N
    rounds, `legend`"; `where` instead of this machine's CPUs and kernel). ImportError
    without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, panels, figsize=(size[0] * panels, size[1]))
    try:
        yield fig, axes
        m = res["machine"]
        where = where or f"{m['cpus']} CPUs, kernel {m['kernel']}"
        fig.suptitle(f"xoverlay {what}, {res['date'][:10]}, {where}: median of "
                     f"{res['config']['rounds']} rounds, {legend}", fontsize=10)
        fig.tight_layout(rect=rect)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def cost_panel(ax, names: list[str], single: list[float], title: str, loop: list[float] | None = None) -> None:
    """The programs' cost per packet, a bar per case (and the validated loop's beside it)."""
    ax.barh(range(len(names)), single, color="#8172b2", label="single runs")
    if loop is not None:
        ax.barh([i + 0.35 for i in range(len(names))], loop, height=0.35, color="#ccb974",
                label="repeat loop (validated)")
        ax.legend(fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7 if loop is None else 6.5)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9 if loop is None else 10)
