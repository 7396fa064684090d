"""ForkIsolation's cost and benefit on a LocalCluster (1 worker, 2 threads). Not a test.

    python benchmarks/bench_distributed.py [--rounds 5] [--tasks 500] [--crash-batch 100]

1. Overhead: 500 small tasks with and without the plugin (client.map + gather, both threads busy), and
   the latency of one task at a time, against the raw fork floor measured inside the worker process
   (``fork_map`` of a no-op: what any fork-per-task design pays there).
2. Crashes: a batch where 1 task in 10 segfaults: completed tasks, worker restarts and wall time.

Prints a Markdown table (medians over rounds; rounds alternate between the two set-ups).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from typing import Any

from distributed import Client, LocalCluster, wait
from distributed.diagnostics.plugin import SchedulerPlugin

from dask_forkmap._plugin import ForkIsolation


def inc(x: int) -> int:
    return x + 1


def maybe_segfault(i: int) -> int:
    if i % 10 == 0:
        ctypes.string_at(0)
    time.sleep(0.01)
    return i


def fork_floor(n: int = 200) -> float:
    """Median seconds of fork_map(no-op) in this (the worker's) process."""
    from dask_forkmap import fork_map

    def noop() -> None:
        return None

    times = []
    for _ in range(n):
        start = time.perf_counter()
        fork_map(noop)
        times.append(time.perf_counter() - start)
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
    return statistics.median(dask_worker._bench_executor_times)


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


def overhead(rounds: int, n: int) -> dict[str, Any]:
    batch: dict[bool, list[float]] = {False: [], True: []}
    latency: dict[bool, list[float]] = {False: [], True: []}
    in_executor: dict[bool, list[float]] = {False: [], True: []}
    floors = []
    for _ in range(rounds):
        for isolated in (False, True):
            with cluster(isolated) as c, Client(c) as client:
                client.gather(client.map(inc, range(50), pure=False))  # warm up: imports, first forks
                batch[isolated].append(batch_seconds(client, n))
                client.run(time_executor)
                latency[isolated].append(latency_seconds(client))
                in_executor[isolated].extend(client.run(executor_median).values())
                if isolated:
                    floors.extend(client.run(fork_floor).values())
    return {
        "batch": {k: statistics.median(v) for k, v in batch.items()},
        "latency": {k: statistics.median(v) for k, v in latency.items()},
        "in_executor": {k: statistics.median(v) for k, v in in_executor.items()},
        "floor": statistics.median(floors),
    }


def crashes(n: int, isolated: bool, limit: float) -> dict[str, Any]:
    arrivals = WorkerArrivals()
    with cluster(isolated) as c, Client(c) as client:
        c.scheduler.add_plugin(arrivals)
        start = time.perf_counter()
        futures = client.map(maybe_segfault, range(n), pure=False)
        try:
            wait(futures, timeout=limit)
        except TimeoutError:
            pass  # reported below as tasks left pending
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--crash-batch", type=int, default=100)
    parser.add_argument("--crash-wait", type=float, default=300, help="seconds to wait for the crash batch")
    args = parser.parse_args()

    o = overhead(args.rounds, args.tasks)
    n = args.tasks
    plain, iso = o["batch"][False] / n, o["batch"][True] / n
    lat_plain, lat_iso = o["latency"][False], o["latency"][True]
    floor = o["floor"]
    print(f"## Overhead ({args.rounds} rounds, medians; LocalCluster 1 worker x 2 threads; {os.cpu_count()} CPUs)\n")
    print("| measure | without | with ForkIsolation | ratio | added |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| {n} tasks, wall per task (2 threads) | {plain * 1e3:.2f} ms | {iso * 1e3:.2f} ms "
        f"| {iso / plain:.2f}x | {(iso - plain) * 1e3:+.2f} ms |"
    )
    print(
        f"| one task at a time, latency | {lat_plain * 1e3:.2f} ms | {lat_iso * 1e3:.2f} ms "
        f"| {lat_iso / lat_plain:.2f}x | {(lat_iso - lat_plain) * 1e3:+.2f} ms |"
    )
    ex_plain, ex_iso = o["in_executor"][False], o["in_executor"][True]
    print(
        f"| one task at a time, time in the worker's executor | {ex_plain * 1e3:.2f} ms | {ex_iso * 1e3:.2f} ms "
        f"| | {(ex_iso - ex_plain) * 1e3:+.2f} ms |"
    )
    print(f"| raw fork floor in the worker (fork_map no-op) | | {floor * 1e3:.2f} ms | | |")
    print(
        f"\nTime in the executor minus the raw fork floor: {(ex_iso - ex_plain - floor) * 1e3:+.2f} ms per task "
        f"(target: at most +1 ms). End-to-end latency minus the floor: {(lat_iso - lat_plain - floor) * 1e3:+.2f} ms."
        f" Batch: {(iso - plain - floor / 2) * 1e3:+.2f} ms per task over the floor shared by 2 threads."
    )

    rows = {isolated: crashes(args.crash_batch, isolated, args.crash_wait) for isolated in (False, True)}
    print(f"\n## A batch of {args.crash_batch} tasks, 1 in 10 segfaults\n")
    print("| | completed | worker restarts | wall | errors | workers at the end |")
    print("|---|---:|---:|---:|---|---:|")
    for isolated, label in ((False, "without"), (True, "with ForkIsolation")):
        r = rows[isolated]
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "none"
        print(
            f"| {label} | {r['completed']}/{args.crash_batch} | {r['restarts']} | {r['wall']:.1f} s | {errors} "
            f"| {r['workers_left']} |"
        )
    print(f"\nWall time ratio (without / with): {rows[False]['wall'] / rows[True]['wall']:.1f}x")


if __name__ == "__main__":
    main()
