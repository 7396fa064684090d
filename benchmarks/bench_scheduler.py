"""forkmap_get against dask's threads and processes schedulers and the raw fork floor.

    python benchmarks/bench_scheduler.py [--repeat 5] [--skip-processes]

Prints one table: median wall time per case and scheduler, and the ratio to the reference the
issue names. Cases:

* tiny: 300 independent tiny tasks, per-task time, forkmap with chunksize=1 (one fork per task)
  against the raw fork floor (os.fork + os._exit + waitpid in a loop); forkmap's default (auto
  batching) shown too.
* shared: a 0.5 GiB array as one graph input, read by 16 reduction tasks. The processes scheduler
  pickles the input for every task (~47 s and ~16x the memory at 0.5 GiB), so it runs once, on a
  64 MiB input, and its time is scaled by 8 (marked *).
* gil: 8 pure-Python tasks of ~0.25 s each on 2 workers.
* bag: 200 000 items in 512-item partitions, map + sum, default settings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import dask
import dask.bag as db
import numpy as np
from dask import delayed

import dask_forkmap._scheduler  # noqa: F401 - registers "forkmap"
from dask_forkmap import ForkExecutor
from dask_forkmap._scheduler import forkmap_get


def median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up: imports, pools
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of each function, measured round-robin so that a change in the machine's
    load (other test runs on the same cores) hits every case alike."""
    for fn in fns.values():
        fn()  # warm up: imports, pools
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fork_floor(n: int) -> None:
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


def tiny(i: int) -> int:
    return i + 1


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-processes", action="store_true")
    args = parser.parse_args()
    r = args.repeat
    rows: list[tuple[str, str, float, str]] = []

    # -- 300 tiny tasks -------------------------------------------------------------------------
    n = 300
    tasks = [delayed(tiny)(i, dask_key_name=f"tiny-{i}") for i in range(n)]
    executor = ForkExecutor(1)

    def executor_floor() -> None:
        # the fork core alone: one ForkExecutor child per task, one at a time
        for i in range(n):
            executor.submit(tiny, i).result()

    cases: dict[str, Callable[[], object]] = {
        "raw fork floor": lambda: fork_floor(n),
        "ForkExecutor(1) one by one": executor_floor,
    }
    for workers in (1, 2):
        for label, kw in (("chunksize=1", {"chunksize": 1}), ("default", {})):
            cases[f"forkmap {workers}w {label}"] = lambda kw=kw, w=workers: dask.compute(
                *tasks, scheduler=forkmap_get, num_workers=w, **kw
            )
    cases["threads 2w"] = lambda: dask.compute(*tasks, scheduler="threads", num_workers=2)
    medians = interleaved(cases, r)
    executor.shutdown()
    floor = medians["raw fork floor"] / n
    for name, t in medians.items():
        ratio = "1.00" if name == "raw fork floor" else f"{t / n / floor:.2f} x floor"
        rows.append(("tiny x300 (per task)", name, t / n, ratio))

    # -- 0.5 GiB shared input -------------------------------------------------------------------
    def shared_graph(nbytes: int) -> list[object]:
        big = np.random.default_rng(0).random(nbytes // 8)
        x = delayed(big, traverse=False)
        return [delayed(np.sum)(x[i::16]) for i in range(16)]

    graph = shared_graph(2**29)
    t_threads = median_time(lambda: dask.compute(*graph, scheduler="threads", num_workers=2), r)
    rows.append(("0.5 GiB input, 16 reductions", "threads 2w", t_threads, "1.00"))
    t = median_time(lambda: dask.compute(*graph, scheduler=forkmap_get, num_workers=2), r)
    rows.append(("0.5 GiB input, 16 reductions", "forkmap 2w", t, f"{t / t_threads:.2f} x threads"))
    graph.clear()
    if not args.skip_processes:
        small = shared_graph(2**26)
        start = time.perf_counter()
        dask.compute(*small, scheduler="processes", num_workers=2)
        t = (time.perf_counter() - start) * 8
        rows.append(("0.5 GiB input, 16 reductions", "processes 2w (64 MiB x8)*", t, f"{t / t_threads:.0f} x threads"))

    # -- GIL-bound pure Python --------------------------------------------------------------------
    work = [delayed(spin)(1_500_000, dask_key_name=f"spin-{i}") for i in range(8)]
    t_threads = median_time(lambda: dask.compute(*work, scheduler="threads", num_workers=2), max(1, r // 2))
    rows.append(("GIL-bound 8 x spin", "threads 2w", t_threads, "1.00"))
    t = median_time(lambda: dask.compute(*work, scheduler=forkmap_get, num_workers=2), max(1, r // 2))
    rows.append(("GIL-bound 8 x spin", "forkmap 2w", t, f"{t / t_threads:.2f} x threads"))

    # -- bag, default settings --------------------------------------------------------------------
    bag = db.from_sequence(range(200_000), partition_size=512).map(tiny).sum()
    t_threads = median_time(lambda: bag.compute(scheduler="threads"), r)
    rows.append(("bag 200k items / 512", "threads", t_threads, "1.00"))
    t = median_time(lambda: bag.compute(scheduler=forkmap_get), r)
    rows.append(("bag 200k items / 512", "forkmap default", t, f"{t / t_threads:.2f} x threads"))
    t = median_time(lambda: bag.compute(scheduler=forkmap_get, chunksize=1), max(1, r // 2))
    rows.append(("bag 200k items / 512", "forkmap chunksize=1", t, f"{t / t_threads:.2f} x threads"))

    print(f"{'case':<30} {'scheduler':<28} {'median':>12}  ratio")
    for case, sched, t, ratio in rows:
        shown = f"{t * 1e3:.3f} ms" if t < 1 else f"{t:.2f} s"
        print(f"{case:<30} {sched:<28} {shown:>12}  {ratio}")


if __name__ == "__main__":
    main()
