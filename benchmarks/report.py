"""The benchmark report: every case, dask_forkmap and its alternatives side by side, in one run.

    pip install -e '.[bench]'
    python benchmarks/report.py                   # full run (about 7 minutes on a 2-core VM)
    python benchmarks/report.py --quick           # smoke run: tiny sizes, one round (what CI runs)
    python benchmarks/report.py --cases 1,3,5     # a subset
    python benchmarks/report.py --out /tmp/b --no-plot

Cases (ratios are to each case's reference, named in the table):

1. tiny tasks, per task: the raw fork + pipe + waitpid floor, fork_map, ForkExecutor, forkmap_get,
   dask threads and processes, multiprocessing.Pool(maxtasksperchild=1), pebble's concurrent.process;
2. a big graph input shared by 16 reduction tasks: forkmap_get, threads, processes;
3. big results (a 256 MiB array): fork_map, an in-process copy, a raw fork through a pipe,
   ProcessPoolExecutor;
4. GIL-bound pure Python tasks: forkmap_get, threads, processes;
5. many small items via bag partitions (map_partitions): forkmap_get, threads, processes;
6. leaky tasks: how much the computing process's RSS grows, per scheduler;
7. fork cost against the parent's memory (0.1, 1, 4 GiB; 4 KiB and transparent huge pages);
8. distributed: a LocalCluster with and without ForkIsolation (overhead; a batch with segfaults);
9. the interpreter's own heap on huge pages (PYTHONMALLOC=malloc, glibc.malloc.hugetlb=1): fork
   cost and pure-Python speed, each in a fresh interpreter.

Each case runs in a fresh interpreter (a fork costs what the forking process holds, so no case may
inherit another's leftovers). Each round of a case runs every contender once, in a shuffled order,
so that changes in the machine's load hit them alike; the table shows medians. Progress goes to
stderr, the table to stdout; the table, stamped with the machine it ran on, is also written to
OUT/benchmark-results.md, and a plot of the ratios to OUT/benchmarks.png (OUT defaults to
docs/_static). The cases live in bench_core.py (1, 3, 7, 9), bench_scheduler.py (2, 4, 5, 6) and
bench_distributed.py (8), which also run alone. Benchmarks, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import _common
from _common import Case, CaseResult, Config

if TYPE_CHECKING:
    from matplotlib.axes import Axes

REPO = Path(__file__).resolve().parent.parent

# Which script holds each case. Each case runs in an interpreter of its own, which imports only that
# script: what a process has imported (distributed, matplotlib) makes its forks costlier.
CASE_MODULES = {
    1: "bench_core",
    2: "bench_scheduler",
    3: "bench_core",
    4: "bench_scheduler",
    5: "bench_scheduler",
    6: "bench_scheduler",
    7: "bench_core",
    8: "bench_distributed",
    9: "bench_core",
}


def load_case(number: int) -> Case:
    module = importlib.import_module(CASE_MODULES[number])
    case: Case = module.CASES[number]
    return case


def markdown(results: Sequence[CaseResult], header: str) -> str:
    parts = [
        # A page of its own to Sphinx (docs/_static is under the docs source tree), in no toctree:
        # "orphan" keeps the warnings-as-errors build from failing on it.
        "---",
        "orphan: true",
        "---",
        "",
        "<!-- Written by benchmarks/report.py; rerun it rather than editing this file. -->",
        "",
        header,
        "",
        _common.TABLE_HEAD,
        *(_common.table_rows(r) for r in results),
        "",
        _common.notes_text(results),
        "",
    ]
    return "\n".join(parts)


def plot(results: Sequence[CaseResult], header: str, path: Path) -> None:
    """One panel per case: horizontal bars of each contender's ratio to the case's reference, grouped
    by measure; a log scale where the ratios span more than a factor of 20."""
    import matplotlib

    matplotlib.use("Agg")  # no display; and no GUI toolkit imported
    import matplotlib.pyplot as plt

    shown = [r for r in results if any(row.ratio is not None for row in r.rows)]
    if not shown:
        return
    cols = 2 if len(shown) > 1 else 1
    nrows = math.ceil(len(shown) / cols)
    heights = [_panel_height(r) for r in shown]
    row_heights = [max(heights[i : i + cols]) for i in range(0, len(shown), cols)]
    fig, axes = plt.subplots(
        nrows,
        cols,
        figsize=(8 * cols, sum(row_heights) + 1.5),
        gridspec_kw={"height_ratios": row_heights},
        squeeze=False,
    )
    for ax, result in zip(axes.flat, shown, strict=False):
        _panel(ax, result)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    fig.text(0.01, 0.005, header, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel_height(result: CaseResult) -> float:
    return 0.8 + 0.28 * sum(row.ratio is not None for row in result.rows) + 0.2 * len({r.group for r in result.rows})


def _panel(ax: Axes, result: CaseResult) -> None:
    rows = [row for row in result.rows if row.ratio is not None]
    groups = list(dict.fromkeys(row.group for row in rows))
    contenders = list(dict.fromkeys(row.contender for row in rows))
    colors = {name: f"C{i % 10}" for i, name in enumerate(contenders)}
    ratios = [row.ratio for row in rows if row.ratio is not None]
    # Log scale for wide spreads; not when some ratio is about zero (leaks avoided), which it would hide.
    log = min(ratios) >= 0.01 and max(ratios) / min(ratios) > 20
    labels, y = [], 0.0
    ticks = []
    widest = max(ratios)
    single = len(groups) == 1
    for group in reversed(groups):
        members = [row for row in rows if row.group == group]
        for row in reversed(members):
            assert row.ratio is not None
            # Whiskers: the smallest and the largest measurement, on the same scale as the median.
            xerr, right = None, row.ratio
            if row.low is not None and row.high is not None and row.value > 0:
                scale = row.ratio / row.value
                xerr = [[row.ratio - row.low * scale], [row.high * scale - row.ratio]]
                right = row.high * scale
            ax.barh(
                y, row.ratio, xerr=xerr, color=colors[row.contender], label=row.contender,
                error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.3"},
            )  # fmt: skip
            ax.annotate(
                _common.format_ratio(row.ratio), (right, y), xytext=(5, 0), textcoords="offset points",
                va="center", fontsize=7,
            )  # fmt: skip
            widest = max(widest, right)
            if single:
                ticks.append(y)
                labels.append(row.contender)
            y += 1
        if not single:
            ticks.append(y - (len(members) + 1) / 2)
            labels.append(group)
        y += 0.6
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.axvline(1, color="black", linewidth=0.8, linestyle="--")
    if log:
        ax.set_xscale("log")
    ax.set_xlim(right=widest * (3 if log else 1.25))
    ax.set_xlabel(f"ratio to {result.reference}{' (log scale)' if log else ''}", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{result.number}. {result.title}", fontsize=9, loc="left")
    if not single:
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles, strict=True))
        ax.legend([unique[name] for name in contenders], contenders, fontsize=6, loc="best", framealpha=0.8)


def main(argv: list[str] | None = None) -> int:
    known = sorted(CASE_MODULES)
    parser = _common.parser(__doc__ or "", known)
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "_static", help="where to write the table and the plot"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG (and do not import matplotlib)")
    args = parser.parse_args(argv)
    cfg = Config(quick=args.quick, rounds_override=args.rounds)
    if args.child:
        return _common.run_child(load_case(json.loads(args.child)["case"]), args.child, args.result, cfg)
    start, load_before = time.perf_counter(), _common.load_average()
    results = _common.run_cases(__file__, args.cases, cfg)
    took = time.perf_counter() - start
    header = (
        f"{_common.stamp(_common.machine())}; load average (1, 5, 15 min) before the run: "
        f"{load_before}, after: {_common.load_average()}; "
        f"{'quick smoke run' if cfg.quick else 'full run'}, {time.strftime('%Y-%m-%d')}, took {took:.0f} s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "benchmark-results.md"
    table.write_text(markdown(results, header))
    written = [table]
    if not args.no_plot:
        plot(results, header, args.out / "benchmarks.png")
        written.append(args.out / "benchmarks.png")
    print(f"\nTook {took:.0f} s; wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
