"""What the benchmark scripts share: the case harness, timing, the raw fork floors, the machine stamp.

A case is a function ``case(cfg, progress) -> CaseResult`` whose docstring's first line is its
title (the table's and the plot's). It measures its contenders with :func:`interleaved` (every round
runs every contender, in a shuffled order, so a change in the machine's load hits them alike) and
turns the medians into :class:`Row` s with ratios to the case's reference. ``bench_core.py``,
``bench_scheduler.py`` and ``bench_distributed.py`` each run their own cases through :func:`cli`;
``report.py`` runs all of them and also writes a Markdown file and a plot. Either way every case
runs in an interpreter of its own (:func:`run_cases`).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, TextIO

MiB = 1024 * 1024
GiB = 1024 * MiB

# Contenders fork on purpose, from a process that has threads (dask's, the reaper's). Python 3.12+
# warns about that on every fork; the warning is about the child using locks other threads held,
# which none of the contenders' children do.
_FORK_WARNING = r".*use of fork\(\) may lead to deadlocks in the child"


# -- the measured work -------------------------------------------------------------------------------


def tiny(i: int) -> int:
    """A task that does nothing worth measuring: what is left is the cost of running it somewhere."""
    return i + 1


def raw_fork(fn: Callable[..., Any], *args: Any) -> Any:
    """The floor of any fork-per-call design: fork, a length-prefixed pickle through a pipe, waitpid.

    Written inline, without process groups, limits, crash reports or a reaper, so that comparing it
    with ``fork_map`` shows what those cost.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            data = pickle.dumps(fn(*args), protocol=5)
            os.write(w, struct.pack("<Q", len(data)))
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
        finally:
            # Not sys.exit: the child must not run the parent's atexit hooks or flush its buffers.
            os._exit(0)
    os.close(w)
    try:
        (n,) = struct.unpack("<Q", os.read(r, 8))
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            got += os.readv(r, [view[got:]])
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return pickle.loads(buf)


def raw_forks_in_pairs(fns: Sequence[Callable[[], Any]]) -> list[Any]:
    """``raw_fork(fn)`` for each of ``fns``, two at a time from two threads: a ceiling for 2 workers.

    No scheduler, no batching decisions, no hand-over between threads: what is left is the host's
    own parallelism for forks and their children. Results come back in the order of ``fns``.
    """
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(indices: range) -> None:
        try:
            for i in indices:
                results[i] = raw_fork(fns[i])
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(range(k, len(fns), 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def bare_fork(calls: int) -> None:
    """``fork`` + ``_exit`` + ``waitpid``, ``calls`` times: the cost of the fork alone, nothing sent."""
    for _ in range(calls):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


def rss() -> int:
    """This process's resident memory in bytes (0 without procfs)."""
    from dask_forkmap._child import statm

    sizes = statm()
    return sizes[1] if sizes is not None else 0


def settle() -> None:
    """Wait until fork_map's background reaper has reaped every child, so that children of one
    contender do not tear down while the next one is being timed."""
    from dask_forkmap._core import _reaper

    _reaper.wait(timeout=120)


# -- timing ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """A contender measuring the wall time of one ``fn()`` (freeing its result included)."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def per_item(fn: Callable[[], object], items: int) -> Callable[[], float]:
    """A contender measuring the wall time of ``fn()`` divided by the number of items it handles."""
    run = timed(fn)
    return lambda: run() / items


def interleaved(
    contenders: Mapping[str, Callable[[], float]],
    rounds: int,
    progress: Progress,
    *,
    warmup: bool = True,
    between: Callable[[], None] = settle,
) -> dict[str, list[float]]:
    """Each contender's measurements over ``rounds`` rounds.

    Every round runs every contender once, in an order shuffled from round to round (with a fixed
    seed, so runs are comparable): no contender always follows the same one, whose processes may
    still be exiting, or always comes first. ``between`` runs after each measurement, untimed. A
    warm-up run of each comes first: imports, pools and dask's caches are not what is measured.
    """
    names = list(contenders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    progress.block(len(names) * (rounds + warmup))
    if warmup:
        for name in names:
            progress.step(f"warm-up: {name}")
            contenders[name]()
            between()
    shuffle = random.Random(0).sample
    for r in range(rounds):
        for name in shuffle(names, len(names)):
            progress.step(f"round {r + 1}/{rounds}: {name}")
            samples[name].append(contenders[name]())
            between()
    return samples


# -- results -----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One contender's median in one group of a case; ``ratio`` is to the group's reference."""

    group: str
    contender: str
    value: float
    unit: str = "s"  # "s" or "MiB"
    ratio: float | None = None
    note: str = ""
    low: float | None = None  # the smallest and largest measurement, when there were several
    high: float | None = None


@dataclass
class CaseResult:
    reference: str  # what the ratios are to, in words
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Filled in by run_cases: the case's number, its title (its docstring's first line), its run time.
    number: int = 0
    title: str = ""
    seconds: float = 0.0
    error: str = ""

    def add(
        self,
        group: str,
        samples: Mapping[str, Sequence[float]],
        reference: str | float | None,
        *,
        unit: str = "s",
        notes: Mapping[str, str] | None = None,
    ) -> None:
        """Rows of the medians of ``samples``, with ratios to the median of the contender named
        ``reference`` (or to a value)."""
        ref = statistics.median(samples[reference]) if isinstance(reference, str) else reference
        for name, values in samples.items():
            value = statistics.median(values)
            ratio = value / ref if ref else None
            low, high = (min(values), max(values)) if len(values) > 1 else (None, None)
            self.rows.append(Row(group, name, value, unit, ratio, (notes or {}).get(name, ""), low, high))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CaseResult:
        fields = json.loads(text)
        fields["rows"] = [Row(**row) for row in fields["rows"]]
        return cls(**fields)


@dataclass(frozen=True)
class Config:
    """What the command line chose: a quick smoke run or a full one, and a rounds override."""

    quick: bool = False
    rounds_override: int | None = None

    def rounds(self, full: int, quick: int = 1) -> int:
        if self.rounds_override is not None:
            return self.rounds_override
        return quick if self.quick else full

    def size(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def argv(self) -> list[str]:
        """The command-line options that give this configuration."""
        return (["--quick"] if self.quick else []) + (
            ["--rounds", str(self.rounds_override)] if self.rounds_override is not None else []
        )


Case = Callable[[Config, "Progress"], CaseResult]


class Progress:
    """Progress on stderr: one line per measurement, with the case, a counter and the elapsed time.

    stdout is left to the table, so that ``report.py > table.md`` captures only results.
    """

    def __init__(self, label: str, started: float, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.started = started  # time.time() when the whole run started
        self.stream = stream
        self.done = self.total = 0

    def block(self, steps: int) -> None:
        """A new series of ``steps`` measurements in the current case."""
        self.done, self.total = 0, steps

    def step(self, text: str) -> None:
        self.done += 1
        self.note(f"[{self.done}/{self.total}] {text}")

    def note(self, text: str) -> None:
        elapsed = time.time() - self.started
        print(f"[{elapsed:7.1f} s] {self.label}: {text}", file=self.stream, flush=True)


# -- the machine -------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def thp_mode(name: str = "enabled") -> str:
    """The bracketed choice in /sys/kernel/mm/transparent_hugepage/<name>, or "unknown"."""
    text = _read(f"/sys/kernel/mm/transparent_hugepage/{name}")
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def source_revision() -> str:
    """The git commit of the checkout these scripts are in, noting local changes to the package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        revision = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "dask_forkmap")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{revision}{' with local changes to dask_forkmap/' if changed else ''}"


def machine() -> dict[str, str]:
    """What the figures depend on: CPU, cores, memory, kernel, Python, libraries, huge pages."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    mem_kib = next(
        (int(line.split()[1]) for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal:")), 0
    )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores ({usable} usable)",
        "RAM": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "dask_forkmap source": source_revision(),
        "libraries": ", ".join(
            f"{name} {_version(name)}" for name in ("dask_forkmap", "numpy", "dask", "distributed", "pebble")
        ),
        "THP": f"enabled={thp_mode('enabled')}, defrag={thp_mode('defrag')}, shmem_enabled={thp_mode('shmem_enabled')}",
    }


def stamp(info: Mapping[str, str]) -> str:
    return "; ".join(f"{key}: {value}" for key, value in info.items())


# -- output ------------------------------------------------------------------------------------------


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        if value < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if value < 1:
            return f"{value * 1e3:.2f} ms"
        return f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:g} {unit}"


def format_ratio(ratio: float | None) -> str:
    if ratio is None:
        return ""
    if ratio >= 100:
        return f"{ratio:.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x"


TABLE_HEAD = (
    "| case | measure | contender | median | ratio | min \N{EN DASH} max | note |\n|---|---|---|---:|---:|---|---|"
)


def table_rows(result: CaseResult) -> str:
    """The Markdown table rows of one case (the case's title and reference on its first row)."""
    if result.error:
        return f"| {result.number}. {result.title} | | failed: {result.error} | | | | |"
    lines = []
    last_group = None
    for i, row in enumerate(result.rows):
        case = f"{result.number}. {result.title} (ratio: {result.reference})" if i == 0 else ""
        group = row.group if row.group != last_group else ""
        last_group = row.group
        spread = (
            f"{format_value(row.low, row.unit)} \N{EN DASH} {format_value(row.high, row.unit)}"
            if row.low is not None and row.high is not None
            else ""
        )
        lines.append(
            f"| {case} | {group} | {row.contender} | {format_value(row.value, row.unit)} "
            f"| {format_ratio(row.ratio)} | {spread} | {row.note} |"
        )
    return "\n".join(lines)


def notes_text(results: Sequence[CaseResult]) -> str:
    lines = [f"- case {r.number}: {note}" for r in results for note in r.notes]
    lines += [f"- case {r.number} took {r.seconds:.0f} s" for r in results]
    return "\n".join(lines)


# -- running -----------------------------------------------------------------------------------------


def parse_cases(text: str, known: Sequence[int]) -> list[int]:
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cases takes numbers separated by commas, not {text!r}") from None
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"no case {unknown or text!r}; the cases are {', '.join(map(str, known))}")
    return chosen


def parser(description: str, known: Sequence[int]) -> argparse.ArgumentParser:
    """The options every script takes: --quick, --rounds, --cases."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one round")
    p.add_argument("--rounds", "--repeat", type=int, default=None, help="rounds per case (default: chosen per case)")
    # How run_cases runs one case in a fresh interpreter; not for people.
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument(
        "--cases",
        type=lambda text: parse_cases(text, known),
        default=list(known),
        help=f"the cases to run, e.g. 1,3 (default: all of {','.join(map(str, known))})",
    )
    return p


def title_of(case: Case) -> str:
    return (case.__doc__ or case.__name__).strip().splitlines()[0].rstrip(".")


def run_cases(script: str, numbers: Sequence[int], cfg: Config, *, out: TextIO = sys.stdout) -> list[CaseResult]:
    """Run each case in a fresh interpreter (``script --child ...``), printing the machine stamp, then
    each case's rows as it finishes, then the notes.

    A fresh interpreter per case, because a fork costs what the forking process holds: memory a
    previous case left in malloc's arenas (dask's processes scheduler left ~75 MiB there), its
    threads, the modules it imported (distributed). Each case then starts from the same parent.
    """
    info = machine()
    print(f"{stamp(info)}; load average at the start: {load_average()}", file=out)
    print(f"{'quick smoke run' if cfg.quick else 'full run'}\n", file=out)
    print(TABLE_HEAD, file=out, flush=True)
    started = time.time()
    results = []
    for index, number in enumerate(numbers, 1):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "result.json")
            child = {"case": number, "label": f"case {number} ({index}/{len(numbers)})", "started": started}
            argv = [sys.executable, script, "--child", json.dumps(child), "--result", path, *cfg.argv()]
            # The case's own output (a library's prints) goes to stderr with the progress: stdout is the table's.
            code = subprocess.run(argv, stdout=sys.stderr, check=False).returncode
            try:
                with open(path) as f:
                    result = CaseResult.from_json(f.read())
            except OSError:
                result = CaseResult("", number=number, error=f"the case's interpreter exited with code {code}")
        print(table_rows(result), file=out, flush=True)
        results.append(result)
    print(f"\n{notes_text(results)}", file=out)
    print(f"- load average at the end: {load_average()}", file=out, flush=True)
    if source_revision() != info["dask_forkmap source"]:
        print(f"- the dask_forkmap source changed during the run: now {source_revision()}", file=out, flush=True)
    return results


def run_child(case: Case, child: str, result_path: str, cfg: Config) -> int:
    """In the fresh interpreter: run one case and write its result as JSON to ``result_path``."""
    import warnings

    warnings.filterwarnings("ignore", message=_FORK_WARNING, category=DeprecationWarning)
    spec = json.loads(child)
    title = title_of(case)
    progress = Progress(f"{spec['label']} {title}", spec["started"])
    progress.note("starting")
    start = time.perf_counter()
    try:
        result = case(cfg, progress)
    except Exception as exc:  # reported in the table; the other cases still run
        traceback.print_exc()
        result = CaseResult("", error=f"{type(exc).__name__}: {exc}")
    result.number, result.title = spec["case"], title
    result.seconds = time.perf_counter() - start
    progress.note(f"done in {result.seconds:.1f} s")
    with open(result_path, "w") as f:
        f.write(result.to_json())
    return 0


def cli(cases: Mapping[int, Case], script: str, description: str, argv: list[str] | None = None) -> int:
    """``main`` of ``script``, which runs its own ``cases`` and prints their table."""
    args = parser(description, sorted(cases)).parse_args(argv)
    cfg = Config(quick=args.quick, rounds_override=args.rounds)
    if args.child:
        return run_child(cases[json.loads(args.child)["case"]], args.child, args.result, cfg)
    results = run_cases(script, args.cases, cfg)
    return 1 if any(r.error for r in results) else 0
