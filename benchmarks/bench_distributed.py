"""ForkIsolation's cost and benefit on a LocalCluster (1 worker, 2 threads): case 8 of ``report.py``.

    python benchmarks/bench_distributed.py [--quick] [--rounds N]

1. Overhead: 500 small tasks (client.map + gather, both threads busy) and the latency of one task at
   a time, in three set-ups: the worker as it is, the worker with a bare fork-per-task executor
   (each task's ``_run_task_simple`` in a child made by fork, pipe and waitpid, nothing else: the
   floor of any design that forks the worker per task, measured in the same batch), and the worker
   with ForkIsolation. The bare executor pays what forking a busy worker costs: the fork itself, and
   the copy-on-write faults of the worker's event loop, which writes about a thousand pages per task
   while children share them. ForkIsolation's own cost is its difference from that floor.
   The fork floors are also measured inside the worker with its event loop blocked (``client.run``):
   ``fork_map`` of a no-op and a bare fork + pipe + waitpid, from one thread and from two at once.
2. Crashes: a batch where 1 task in 10 segfaults: completed tasks, worker restarts and wall time.

Prints a Markdown table (medians over rounds). The overhead set-ups share one cluster and take turns
in blocks, in an order shuffled from round to round.
"""

from __future__ import annotations

import ctypes
import logging
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

from _common import CaseResult, Config, Progress, cli, raw_fork
from distributed import Client, LocalCluster, WorkerPlugin
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.worker import _run_task_simple

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


class BareForkExecutor(Executor):
    """Runs each task's ``_run_task_simple`` in a child made by a bare fork + pipe + waitpid (the floor
    of any fork-per-task executor), at most ``nthreads`` at once. No limits, no crash handling: a
    crashing task would hang its thread. Its name must not contain "ThreadPoolExecutor", or the
    worker would submit a function that only works in process."""

    def __init__(self, nthreads: int) -> None:
        self._threads = ThreadPoolExecutor(nthreads, thread_name_prefix="bench-bare-fork")

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if fn is _run_task_simple and not kwargs:
            return self._threads.submit(raw_fork, fn, *args)
        return self._threads.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._threads.shutdown(wait, cancel_futures=cancel_futures)


class BareForkPerTask(WorkerPlugin):
    name = "bench-bare-fork-per-task"

    def setup(self, worker: Any) -> None:
        self.replaced = worker.executors["default"]
        worker.executors["default"] = BareForkExecutor(worker.state.nthreads)

    def teardown(self, worker: Any) -> None:
        bare, worker.executors["default"] = worker.executors["default"], self.replaced
        bare.shutdown()


WITHOUT, BARE, WITH = "without", "bare fork per task (floor)", "with ForkIsolation"


def plugin_for(setup: str) -> WorkerPlugin | None:
    """The worker plugin that makes ``setup``; None for the worker as it is."""
    return {WITHOUT: None, BARE: BareForkPerTask(), WITH: ForkIsolation()}[setup]


def cluster(setup: str) -> LocalCluster:
    plugin = plugin_for(setup)
    return LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        plugins={plugin} if plugin is not None else set(),
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
    """All set-ups on one cluster, in blocks interleaved round by round (the plugins are registered
    and unregistered in between), so that a change in the machine's speed hits them alike."""
    setups = (WITHOUT, BARE, WITH)
    plugins = {setup: plugin_for(setup) for setup in setups}
    batch: dict[str, list[float]] = {s: [] for s in setups}
    latency: dict[str, list[float]] = {s: [] for s in setups}
    in_executor: dict[str, list[float]] = {s: [] for s in setups}  # one task at a time
    in_executor_batch: dict[str, list[float]] = {s: [] for s in setups}  # both threads busy
    floors: dict[str, list[float]] = {name: [] for name in FLOORS}
    shuffle = random.Random(0).sample
    with cluster(WITHOUT) as c, Client(c) as client:
        for r in range(rounds + 1):  # round 0 warms each set-up up: imports, first forks
            for setup in shuffle(setups, len(setups)):
                note(f"round {r}/{rounds}: {n} tasks, {setup}" if r else f"warm-up: {setup}")
                plugin = plugins[setup]
                if plugin is not None:
                    client.register_plugin(plugin)
                try:
                    client.run(time_executor)
                    seconds = batch_seconds(client, n)
                    batch_median = client.run(executor_median).values()
                    one_at_a_time = latency_seconds(client, latency_n)
                    single_median = client.run(executor_median).values()
                    if r:
                        batch[setup].append(seconds)
                        in_executor_batch[setup].extend(batch_median)
                        latency[setup].append(one_at_a_time)
                        in_executor[setup].extend(single_median)
                    if r and setup == WITH:
                        for name, (threads, raw) in FLOORS.items():
                            floors[name].extend(client.run(fork_floor, floor_n, threads, raw).values())
                finally:
                    if plugin is not None:
                        client.unregister_worker_plugin(plugin.name)
    return {
        "batch": batch,
        "latency": latency,
        "in_executor": in_executor,
        "in_executor_batch": in_executor_batch,
        "floor": floors,
    }


def crashes(n: int, setup: str, limit: float, *, gone: float = 20) -> dict[str, Any]:
    """Run the crash batch until every task is done, ``limit`` seconds have passed, or the cluster has
    had no worker for ``gone`` seconds (the nanny gave up: what is pending then stays pending)."""
    arrivals = WorkerArrivals()
    with cluster(setup) as c, Client(c) as client:
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


# The floors measured in the worker: (threads forking at once, raw os.fork rather than fork_map).
FLOOR_1, FLOOR_2 = "fork floor, 1 thread", "fork floor, 2 threads at once"
RAW_1, RAW_2 = "raw os.fork floor, 1 thread", "raw os.fork floor, 2 threads at once"
FLOORS = {FLOOR_1: (1, False), FLOOR_2: (2, False), RAW_1: (1, True), RAW_2: (2, True)}


def distributed(cfg: Config, progress: Progress) -> CaseResult:
    """Distributed: LocalCluster(1 worker, 2 threads) with and without ForkIsolation."""
    rounds = cfg.rounds(6)
    n, latency_n, floor_n = cfg.size((500, 50, 100), (50, 10, 20))
    batch, limit = cfg.size((100, 300.0), (20, 60.0))
    result = CaseResult("without ForkIsolation")
    o = overhead(rounds, n, latency_n=latency_n, floor_n=floor_n, note=progress.note)
    per_task = {setup: [t / n for t in times] for setup, times in o["batch"].items()}
    result.add(f"{n} tasks, wall per task", per_task, WITHOUT)
    groups = (
        ("in_executor_batch", f"{n} tasks, time in the worker's executor"),
        ("latency", "one task at a time, latency"),
        ("in_executor", "one task at a time, time in the worker's executor"),
    )
    for key, group in groups:
        result.add(group, o[key], WITHOUT)
    result.add("fork floors in the worker, event loop blocked", o["floor"], FLOOR_1)
    for row in result.rows[-4:]:
        row.note = "fork_map of a no-op" if "raw" not in row.contender else "fork + pipe + waitpid of a no-op"
    batch_ms = {setup: statistics.median(v) * 1e3 for setup, v in per_task.items()}
    floor = {name: statistics.median(values) for name, values in o["floor"].items()}

    def own_cost(samples: dict[str, list[float]], scale: float = 1.0) -> str:
        # Paired round by round (the set-ups took turns on one cluster): the machine's drift cancels.
        diffs = [(w - b) * scale * 1e3 for w, b in zip(samples[WITH], samples[BARE], strict=True)]
        return f"{statistics.median(diffs):+.2f} ms ({min(diffs):+.2f} to {max(diffs):+.2f})"

    result.notes.append(
        "ForkIsolation's own cost per task: with ForkIsolation minus the bare fork per task, round by round, "
        f"median (range): {n} tasks, wall per task {own_cost(o['batch'], 1 / n)}; one task at a time, latency "
        f"{own_cost(o['latency'])}"
    )
    result.notes.append(
        f"per-task overhead against the worker as it is ({n} tasks, wall per task, with minus without): "
        f"ForkIsolation {batch_ms[WITH] - batch_ms[WITHOUT]:+.2f} ms, the bare fork per task "
        f"{batch_ms[BARE] - batch_ms[WITHOUT]:+.2f} ms; the raw os.fork floor measured with the event loop "
        f"blocked is {floor[RAW_1] * 1e3:.2f} ms"
    )
    result.notes.append(
        f"two threads forking at once, event loop blocked: fork_map {floor[FLOOR_2] / floor[FLOOR_1]:.2f}x its "
        f"one-thread time, raw os.fork {floor[RAW_2] / floor[RAW_1]:.2f}x"
    )

    runs = {}
    for setup in (WITHOUT, WITH):
        progress.note(f"a batch of {batch} tasks, 1 in 10 segfaults, {setup}")
        runs[setup] = crashes(batch, setup, limit)
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
