"""ForkIsolation's cost and benefit on a LocalCluster (1 worker, 2 threads): case 8 of ``report.py``.

    python benchmarks/bench_distributed.py [--quick] [--rounds N]

1. Overhead: 500 small tasks with and without the plugin (client.map + gather, both threads busy), and
   the latency of one task at a time, against the fork floor measured inside the worker process
   (``fork_map`` of a no-op: what any fork-per-task design pays there), from one thread and from two
   threads at once, as the worker's two threads fork when both are busy: then the forks, the
   children and the worker share two CPUs, and each fork costs more. The raw ``os.fork`` floor
   (fork, pipe, waitpid) is measured both ways too, for comparison.
2. Crashes: a batch where 1 task in 10 segfaults: completed tasks, worker restarts and wall time.

Prints a Markdown table (medians over rounds; rounds alternate between the two set-ups).
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from _common import CaseResult, Config, Progress, cli, raw_fork
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from dask_forkmap._plugin import ForkIsolation


def _silent(text: str) -> None:
    pass


def inc(x: int) -> int:
    return x + 1


def maybe_segfault(i: int) -> int:
    if i % 10 == 0:
        ctypes.string_at(0)
    time.sleep(0.01)
    return i


def noop() -> None:
    return None


def fork_floor(n: int = 200, threads: int = 1, raw: bool = False) -> float:
    """Median seconds of one fork of a no-op in this (the worker's) process, each of ``threads``
    threads making ``n`` calls at once: ``fork_map``, or with ``raw`` the bare fork + pipe + waitpid."""
    from dask_forkmap import fork_map

    call: Callable[[Callable[[], None]], Any] = (lambda fn: raw_fork(fn)) if raw else fork_map
    times: list[float] = []

    def loop() -> None:
        for _ in range(n):
            start = time.perf_counter()
            call(noop)
            times.append(time.perf_counter() - start)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return statistics.median(times)


def time_executor(dask_worker: Any) -> None:
    """Record, on the worker, how long each task spends in its default executor (submit to done)."""
    executor = dask_worker.executors["default"]
    times: list[float] = []
    submit = executor.submit

    def timed_submit(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        future = submit(fn, *args, **kwargs)
        future.add_done_callback(lambda _: times.append(time.perf_counter() - start))
        return future

    executor.submit = timed_submit
    dask_worker._bench_executor_times = times


def executor_median(dask_worker: Any) -> float:
    """The median of the times recorded since the last call, which starts a new record."""
    times: list[float] = dask_worker._bench_executor_times
    median = statistics.median(times)
    times.clear()
    return median


class WorkerArrivals(SchedulerPlugin):
    """Counts workers joining the scheduler: every arrival after the first is a restart."""

    def __init__(self) -> None:
        self.arrivals = 0

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.arrivals += 1


def cluster(isolated: bool) -> LocalCluster:
    return LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        plugins={ForkIsolation()} if isolated else set(),
        # Without isolation every segfault makes the nanny log a restart; the table counts them.
        silence_logs=logging.CRITICAL,
    )


def batch_seconds(client: Client, n: int) -> float:
    start = time.perf_counter()
    client.gather(client.map(inc, range(n), pure=False))
    return time.perf_counter() - start


def latency_seconds(client: Client, n: int = 100) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        client.submit(inc, i, pure=False).result(timeout=60)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def overhead(
    rounds: int, n: int, *, latency_n: int = 100, floor_n: int = 200, note: Callable[[str], None] = _silent
) -> dict[str, Any]:
    batch: dict[bool, list[float]] = {False: [], True: []}
    latency: dict[bool, list[float]] = {False: [], True: []}
    in_executor: dict[bool, list[float]] = {False: [], True: []}  # one task at a time
    in_executor_batch: dict[bool, list[float]] = {False: [], True: []}  # both threads busy
    floors: dict[str, list[float]] = {name: [] for name in FLOORS}
    for r in range(rounds):
        for isolated in (False, True):
            note(f"round {r + 1}/{rounds}: {n} tasks {'with' if isolated else 'without'} ForkIsolation")
            with cluster(isolated) as c, Client(c) as client:
                client.gather(client.map(inc, range(50), pure=False))  # warm up: imports, first forks
                client.run(time_executor)
                batch[isolated].append(batch_seconds(client, n))
                in_executor_batch[isolated].extend(client.run(executor_median).values())
                latency[isolated].append(latency_seconds(client, latency_n))
                in_executor[isolated].extend(client.run(executor_median).values())
                if isolated:
                    for name, (threads, raw) in FLOORS.items():
                        floors[name].extend(client.run(fork_floor, floor_n, threads, raw).values())
    return {
        "batch": batch,
        "latency": latency,
        "in_executor": in_executor,
        "in_executor_batch": in_executor_batch,
        "floor": floors,
    }


def crashes(n: int, isolated: bool, limit: float, *, gone: float = 20) -> dict[str, Any]:
    """Run the crash batch until every task is done, ``limit`` seconds have passed, or the cluster has
    had no worker for ``gone`` seconds (the nanny gave up: what is pending then stays pending)."""
    arrivals = WorkerArrivals()
    with cluster(isolated) as c, Client(c) as client:
        c.scheduler.add_plugin(arrivals)
        start = time.perf_counter()
        futures = client.map(maybe_segfault, range(n), pure=False)
        stopped = "all done"
        no_worker_since = None
        while not all(f.done() for f in futures):
            now = time.perf_counter()
            if now - start > limit:
                stopped = f"stopped at the {limit:.0f} s cap"
                break
            if c.scheduler.workers:
                no_worker_since = None
            elif no_worker_since is None:
                no_worker_since = now
            elif now - no_worker_since > gone:
                stopped = f"stopped {gone:.0f} s after the last worker was gone, at {no_worker_since - start:.1f} s"
                break
            time.sleep(0.1)
        wall = time.perf_counter() - start
        done = sum(f.status == "finished" for f in futures)
        kinds: dict[str, int] = {}
        for f in futures:
            if f.status == "error":
                name = type(f.exception(timeout=60)).__name__
                kinds[name] = kinds.get(name, 0) + 1
            elif f.status != "finished":  # pending forever, or lost with a worker
                kinds[f.status] = kinds.get(f.status, 0) + 1
        workers = len(c.scheduler.workers)
    return {
        "completed": done,
        "restarts": max(0, arrivals.arrivals - 1),
        "wall": wall,
        "errors": kinds,
        "workers_left": workers,
        "stopped": stopped,
    }


WITHOUT, WITH = "without", "with ForkIsolation"
# The floors measured in the worker: (threads forking at once, raw os.fork rather than fork_map).
FLOOR_1, FLOOR_2 = "fork floor, 1 thread", "fork floor, 2 threads at once"
RAW_1, RAW_2 = "raw os.fork floor, 1 thread", "raw os.fork floor, 2 threads at once"
FLOORS = {FLOOR_1: (1, False), FLOOR_2: (2, False), RAW_1: (1, True), RAW_2: (2, True)}


def distributed(cfg: Config, progress: Progress) -> CaseResult:
    """Distributed: LocalCluster(1 worker, 2 threads) with and without ForkIsolation."""
    rounds = cfg.rounds(3)
    n, latency_n, floor_n = cfg.size((500, 100, 200), (50, 10, 20))
    batch, limit = cfg.size((100, 300.0), (20, 60.0))
    result = CaseResult("without ForkIsolation")
    o = overhead(rounds, n, latency_n=latency_n, floor_n=floor_n, note=progress.note)
    per_task = {label: [t / n for t in o["batch"][isolated]] for isolated, label in ((False, WITHOUT), (True, WITH))}
    result.add(f"{n} tasks, wall per task", per_task, WITHOUT)
    groups = (
        ("in_executor_batch", f"{n} tasks, time in the worker's executor"),
        ("latency", "one task at a time, latency"),
        ("in_executor", "one task at a time, time in the worker's executor"),
    )
    for key, group in groups:
        result.add(group, {WITHOUT: o[key][False], WITH: o[key][True]}, WITHOUT)
    result.add("fork floors in the worker", o["floor"], FLOOR_1)
    for row in result.rows[-4:]:
        row.note = "fork_map of a no-op" if "raw" not in row.contender else "fork + pipe + waitpid of a no-op"
    m = {
        key: {isolated: statistics.median(o[key][isolated]) for isolated in (False, True)}
        for key in ("latency", "in_executor", "in_executor_batch")
    }
    floor = {name: statistics.median(values) for name, values in o["floor"].items()}
    added = {key: m[key][True] - m[key][False] for key in m}
    result.notes.append(
        "ForkIsolation's own cost per task, time in the executor with minus without minus the floor of the "
        f"same concurrency: {n} tasks (both threads forking) {(added['in_executor_batch'] - floor[FLOOR_2]) * 1e3:+.2f} ms "
        f"over the two-thread fork_map floor ({(added['in_executor_batch'] - floor[RAW_2]) * 1e3:+.2f} ms over the "
        f"two-thread raw os.fork floor); one task at a time {(added['in_executor'] - floor[FLOOR_1]) * 1e3:+.2f} ms over "
        f"the one-thread fork_map floor; latency of one task at a time, with minus without, minus the one-thread "
        f"floor: {(added['latency'] - floor[FLOOR_1]) * 1e3:+.2f} ms"
    )
    result.notes.append(
        f"two threads forking at once: fork_map {floor[FLOOR_2] / floor[FLOOR_1]:.2f}x its one-thread time, "
        f"raw os.fork {floor[RAW_2] / floor[RAW_1]:.2f}x"
    )

    runs = {}
    for isolated, label in ((False, WITHOUT), (True, WITH)):
        progress.note(f"a batch of {batch} tasks, 1 in 10 segfaults, {label}")
        runs[label] = crashes(batch, isolated, limit)
    notes = {}
    for label, r in runs.items():
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "no errors"
        notes[label] = (
            f"{r['completed']}/{batch} completed, {r['restarts']} worker restarts, {errors}, "
            f"{r['workers_left']} worker(s) at the end, {r['stopped']}"
        )
    walls = {label: [r["wall"]] for label, r in runs.items()}
    result.add(f"{batch} tasks, 1 in 10 segfaults: wall", walls, WITHOUT, notes=notes)
    return result


CASES = {8: distributed}


def main(argv: list[str] | None = None) -> int:
    return cli(CASES, __file__, __doc__ or "", argv)


if __name__ == "__main__":
    sys.exit(main())
