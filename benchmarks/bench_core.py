"""The fork core against its floor and its peers: cases 1, 3, 7 and 9 of ``report.py``.

    python benchmarks/bench_core.py [--quick] [--rounds N] [--cases 1,3,7,9]

1. tiny tasks, per task: the raw fork floor, fork_map, ForkExecutor, forkmap_get, dask's threads and
   processes schedulers, multiprocessing.Pool(maxtasksperchild=1), pebble's concurrent.process;
3. a big array result: an in-process copy, fork_map, a raw fork through a pipe, ProcessPoolExecutor;
7. the cost of a fork against the parent's resident memory, in 4 KiB pages and in huge pages;
9. the interpreter's own heap on huge pages (glibc's malloc with its hugetlb tunable instead of
   pymalloc): the cost of a fork and of pure-Python work, each in a fresh interpreter.

Prints a Markdown table of medians and ratios; ``report.py`` runs these with the other cases.
"""

from __future__ import annotations

import functools
import json
import mmap
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

import dask
import numpy as np
from _common import (
    CaseResult,
    Config,
    GiB,
    MiB,
    Progress,
    bare_fork,
    cli,
    interleaved,
    per_item,
    raw_fork,
    raw_forks_in_pairs,
    rss,
    thp_mode,
    timed,
    tiny,
)
from dask import delayed

from dask_forkmap import ForkExecutor, fork_map, forkmap_get

FLOOR = "raw fork + pipe + waitpid (floor)"
PAIRED_FLOOR = "the floor from 2 threads at once (ceiling for 2 workers)"

# Every process-based peer is given fork, the start method that shares the parent's memory like ours.
_fork = multiprocessing.get_context("fork")


def tiny_tasks(cfg: Config, progress: Progress) -> CaseResult:
    """Tiny tasks, per task."""
    from pebble import concurrent

    n = cfg.size(300, 20)
    tasks = [delayed(tiny)(i, dask_key_name=f"tiny-{i}") for i in range(n)]
    # pebble's decorator forks one process per call and returns a ProcessFuture. Its keyword for
    # the start method is ``context`` (pebble 5.2's type stubs say ``mp_context``, which it ignores).
    pebble_tiny = concurrent.process(context=_fork)(tiny)  # type: ignore[call-overload]

    def compute(num_workers: int = 2, **kwargs: Any) -> Callable[[], object]:
        return lambda: dask.compute(*tasks, num_workers=num_workers, **kwargs)

    calls = [functools.partial(tiny, i) for i in range(n)]
    result = CaseResult("the raw fork floor")
    with ForkExecutor(2) as executor, _fork.Pool(2, maxtasksperchild=1) as pool:
        contenders = {
            FLOOR: lambda: [raw_fork(tiny, i) for i in range(n)],
            PAIRED_FLOOR: lambda: raw_forks_in_pairs(calls),
            "fork_map, one call at a time": lambda: [fork_map(tiny, i) for i in range(n)],
            "ForkExecutor(2).map": lambda: list(executor.map(tiny, range(n))),
            "forkmap_get, 1 worker, chunksize=1": compute(1, scheduler=forkmap_get, chunksize=1),
            "forkmap_get, 2 workers, chunksize=1": compute(scheduler=forkmap_get, chunksize=1),
            "forkmap_get, 2 workers, auto batching": compute(scheduler=forkmap_get),
            "dask threads, 2 workers": compute(scheduler="threads"),
            "dask processes, 2 workers": compute(scheduler="processes"),
            "multiprocessing.Pool(2, maxtasksperchild=1)": lambda: pool.map(tiny, range(n), chunksize=1),
            "pebble concurrent.process, one call at a time": lambda: [pebble_tiny(i).result() for i in range(n)],
        }
        samples = interleaved({k: per_item(fn, n) for k, fn in contenders.items()}, cfg.rounds(7), progress)
    result.add(f"{n} tasks", samples, FLOOR)
    result.notes.append(
        "one call at a time: fork_map, pebble and forkmap_get with 1 worker run one child after another, like "
        "the floor; the others run 2 at a time (dask processes: a fresh pool of 2 spawned workers per compute, "
        "dask's default)"
    )
    result.notes.append(
        f"{PAIRED_FLOOR}: the floor's fork, pipe and waitpid run from 2 threads, each taking every other "
        "task, with nothing scheduled: the best 2 workers forking a child per task can do on this host"
    )
    return result


# ProcessPoolExecutor's worker forks after this is filled, and returns it from its copy of the parent.
_SHARED: dict[str, np.ndarray] = {}


def shared_array() -> np.ndarray:
    return _SHARED["array"]


def big_results(cfg: Config, progress: Progress) -> CaseResult:
    """Big results returned by the task."""
    mib = cfg.size(256, 8)
    _SHARED["array"] = source = np.random.default_rng(0).random(mib * MiB // 8)
    result = CaseResult("an in-process copy")
    try:
        with ProcessPoolExecutor(1, mp_context=_fork) as ppe:
            contenders = {
                "in-process copy()": timed(source.copy),
                "fork_map returning it": timed(lambda: fork_map(shared_array)),
                "raw fork, pickled through a pipe": timed(lambda: raw_fork(shared_array)),
                "ProcessPoolExecutor(1, fork)": timed(lambda: ppe.submit(shared_array).result()),
            }
            samples = interleaved(contenders, cfg.rounds(7), progress)
    finally:
        _SHARED.clear()
    result.add(f"{mib} MiB float64 array", samples, "in-process copy()")
    result.notes.append("each call's time includes freeing its result")
    return result


def _anon_huge_pages() -> int:
    """Bytes of this process's anonymous memory on transparent huge pages."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextmanager
def touched_memory(nbytes: int, huge: bool) -> Iterator[float]:
    """``nbytes`` of anonymous memory, every page written; yields the share on huge pages.

    An mmap rather than a numpy array, so that the kind of page is chosen here: numpy itself asks
    for huge pages for large arrays when THP is in ``madvise`` mode.
    """
    nbytes = -(-nbytes // (2 * MiB)) * 2 * MiB  # whole huge pages
    before = _anon_huge_pages()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
        np.frombuffer(m, dtype=np.uint8)[::4096] = 1  # fault every page in (the view is freed at once)
        yield (_anon_huge_pages() - before) / nbytes
    finally:
        m.close()


def fork_cost(cfg: Config, progress: Progress) -> CaseResult:
    """Fork cost against the parent's resident memory."""
    sizes = cfg.size([0.1, 1, 4], [0.1])
    calls = cfg.size(10, 3)
    rounds = cfg.rounds(7)
    thp = thp_mode()
    kinds = [False] + ([True] if thp in ("always", "madvise") else [])
    raw, ours = "raw fork + _exit + waitpid", "fork_map, tiny task"
    contenders = {
        raw: per_item(lambda: bare_fork(calls), calls),
        ours: per_item(lambda: [fork_map(tiny, 1) for _ in range(calls)], calls),
    }
    result = CaseResult("a raw fork of the parent without the extra memory")
    base_rss = rss() / MiB
    progress.note(f"parent as is: {base_rss:.0f} MiB resident")
    samples = interleaved(contenders, rounds, progress)
    result.add(f"parent as is ({base_rss:.0f} MiB resident)", samples, raw)
    baseline = {name: statistics.median(values) for name, values in samples.items()}
    slopes = {}
    for gib in sizes:
        for huge in kinds:
            label = f"+{gib:g} GiB, {'huge pages' if huge else '4 KiB pages'}"
            progress.note(f"allocating and touching {label}")
            with touched_memory(int(gib * GiB), huge) as huge_share:
                samples = interleaved(contenders, rounds, progress)
            if huge:
                label += f" ({huge_share:.0%} on huge pages)"
            result.add(label, samples, baseline[raw])
            medians = {name: statistics.median(values) for name, values in samples.items()}
            slopes[huge] = (gib, medians[raw] - baseline[raw], medians[ours] - baseline[ours])
    for huge, (gib, d_raw, d_ours) in slopes.items():
        result.notes.append(
            f"{'huge pages' if huge else '4 KiB pages'}, from the parent as is to +{gib:g} GiB: "
            f"raw fork {d_raw / gib * 1e3:+.1f} ms per GiB, fork_map {d_ours / gib * 1e3:+.1f} ms per GiB"
        )
    if len(kinds) == 1:
        result.notes.append(f"transparent huge pages are {thp!r} here: huge pages not measured")
    return result


# Run in a fresh interpreter per measurement: the allocator is chosen at its start. It loads what a
# Dask user's process typically holds, then measures forks and a pure-Python loop, and prints JSON.
_HEAP_PROBE = """
import json, os, statistics, sys, time
import dask, dask.array, dask.bag, distributed, numpy
try:
    import pandas
except ImportError:
    pandas = None
from dask_forkmap import fork_map, forkmap_get

calls, benchmarks = int(sys.argv[1]), sys.argv[2]
sys.path.insert(0, benchmarks)
from _common import bare_fork, settle, tiny
from bench_scheduler import spin

def each(fn, times):
    fn()
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)

def cpu_per_call(fn, times):
    fn()
    settle()
    before = os.times()
    for _ in range(times):
        fn()
    settle()
    after = os.times()
    used = sum(after[:4]) - sum(before[:4])  # user and system time, this process and its children
    return used / times

tasks = [dask.delayed(tiny)(i, dask_key_name=f"tiny-{i}") for i in range(2 * calls)]

def scheduled():
    start = time.perf_counter()
    dask.compute(*tasks, scheduler=forkmap_get, num_workers=2, chunksize=1)
    return (time.perf_counter() - start) / len(tasks)

heap = huge = 0
with open("/proc/self/smaps") as f:
    name = ""
    for line in f:
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            name = fields[5] if len(fields) > 5 else ""
        elif name == "[heap]" and fields[0] in ("Rss:", "AnonHugePages:"):
            if fields[0] == "Rss:":
                heap += int(fields[1]) * 1024
            else:
                huge += int(fields[1]) * 1024
print(json.dumps({
    "fork_map": each(lambda: fork_map(tiny, 1), calls),
    "fork_map_cpu": cpu_per_call(lambda: fork_map(tiny, 1), calls),
    "raw": each(lambda: bare_fork(1), calls),
    "forkmap_get": min(scheduled() for _ in range(3)),
    "spin": each(lambda: spin(200_000), max(3, calls // 6)),
    "heap": heap, "huge": huge, "pandas": pandas is not None,
}))
"""

HEAP_TUNED = "PYTHONMALLOC=malloc, glibc.malloc.hugetlb=1"
HEAP_DEFAULT = "as started by default (pymalloc)"


def _glibc_version() -> tuple[int, ...]:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return ()
    name, _, version = text.partition(" ")
    return tuple(int(p) for p in version.split(".") if p.isdigit()) if name == "glibc" else ()


def _probe(tuned: bool, calls: int) -> dict[str, Any]:
    env = dict(os.environ)
    if tuned:
        env["PYTHONMALLOC"] = "malloc"
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE, str(calls), os.path.dirname(os.path.abspath(__file__))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    probe: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return probe


def heap_on_huge_pages(cfg: Config, progress: Progress) -> CaseResult:
    """The interpreter's own heap on huge pages."""
    result = CaseResult("the interpreter as started by default")
    if thp_mode() != "madvise" or _glibc_version() < (2, 35):
        result.notes.append(
            f"not measured: glibc's hugetlb tunable needs glibc 2.35 or later and transparent huge pages in "
            f"madvise mode (here: glibc {'.'.join(map(str, _glibc_version())) or 'absent'}, THP {thp_mode()!r})"
        )
        return result
    calls = cfg.size(60, 6)
    rounds = cfg.rounds(7)
    names = {False: HEAP_DEFAULT, True: HEAP_TUNED}
    groups = {
        "fork_map": "fork_map of a tiny task, per call",
        "fork_map_cpu": "fork_map of a tiny task, CPU per call (parent and child)",
        "raw": "raw fork + _exit + waitpid, per call",
        "forkmap_get": "forkmap_get, 2 workers, chunksize=1, per tiny task",
        "spin": "pure-Python loop (200 000 multiplications), per run",
    }
    samples: dict[str, dict[str, list[float]]] = {g: {n: [] for n in names.values()} for g in groups}
    last: dict[bool, dict[str, Any]] = {}
    progress.block(2 * (rounds + 1))
    order = random.Random(0).sample
    for r in range(rounds + 1):  # round 0 warms the disk cache up
        for tuned in order([False, True], 2):
            progress.step(f"{'warm-up' if r == 0 else f'round {r}/{rounds}'}: {names[tuned]}")
            probe = last[tuned] = _probe(tuned, calls)
            if r:
                for key in groups:
                    samples[key][names[tuned]].append(probe[key])
    for key, group in groups.items():
        result.add(group, samples[key], HEAP_DEFAULT)
    for tuned, probe in last.items():
        result.notes.append(
            f"{names[tuned]}: heap {probe['heap'] / MiB:.0f} MiB, {probe['huge'] / MiB:.0f} MiB of it on huge pages"
        )
    result.notes.append(
        "each measurement is a fresh interpreter that imported dask, dask.array, dask.bag, distributed, numpy"
        + (" and pandas" if last[False]["pandas"] else "")
    )
    return result


CASES = {1: tiny_tasks, 3: big_results, 7: fork_cost, 9: heap_on_huge_pages}


def main(argv: list[str] | None = None) -> int:
    return cli(CASES, __file__, __doc__ or "", argv)


if __name__ == "__main__":
    sys.exit(main())
