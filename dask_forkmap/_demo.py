"""``dask forkmap demo``: misbehaving Dask tasks, isolated by fork, and a report of what got through.

Part 1 computes a graph with ``forkmap_get`` in this process; part 2 runs the same kinds of tasks
on a two-worker ``distributed.LocalCluster`` with ``ForkIsolation``. Some tasks keep 100 MB alive in
a module global, some bump a module-global counter, some segfault. The report then checks, from
the outside, that none of it reached this process or the workers: RSS, the globals themselves,
worker pids and restarts. Its exit status says whether isolation held, so CI can run it.

The task functions live at module level so that worker processes can unpickle them by reference.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._child import statm
from ._errors import ChildCrashed

MiB = 1024 * 1024
LEAK_MB = 100
# A leaked block that stayed would add LEAK_MB; growth below this is allocator and import noise.
RSS_SLACK = 50 * MiB
# Bounds every wait on the cluster, so that a broken isolation ends the demo instead of hanging it.
WAIT = 120

N_ORDINARY = 16
N_LEAK = 4
N_MUTATE = 4
_ORDINARY_SPAN = 200_000

_counter = {"value": 0}
_leaked: list[bytearray] = []


# The tasks.


def ordinary(i: int) -> int:
    """A well-behaved task: some pure-Python work (tens of milliseconds), a checkable result."""
    total = 0
    for j in range(_ORDINARY_SPAN):
        total += j * j
    return total + i


def expected_ordinary(i: int) -> int:
    n = _ORDINARY_SPAN
    return (n - 1) * n * (2 * n - 1) // 6 + i


def leak() -> int:
    """Keep 100 MB alive in a module global, as a leaky library would; return the MB held here."""
    block = bytearray(LEAK_MB * 1_000_000)
    block[::4096] = b"x" * len(block[::4096])  # touch every page, so that it is resident
    _leaked.append(block)
    return sum(len(b) for b in _leaked) // 1_000_000


def bump_global() -> int:
    """Mutate module state, as code with single-threaded static state does; return the new value."""
    _counter["value"] += 1
    return _counter["value"]


def segfault() -> None:
    """Dereference a null pointer, as a buggy C extension would."""
    ctypes.string_at(0)


def process_state(dask_worker: Any = None) -> dict[str, int]:
    """What a process holds: its pid, RSS, the counter and the MB kept by ``leak``.

    Run with ``Client.run`` on a worker (in the worker process itself, not in a child).
    """
    return {
        "pid": os.getpid(),
        "rss": _rss(),
        "counter": _counter["value"],
        "leaked_mb": sum(len(b) for b in _leaked) // 1_000_000,
    }


def _rss() -> int:
    sizes = statm()
    if sizes is None:  # pragma: no cover - no procfs
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return sizes[1]


# The report.


@dataclass
class _Check:
    ok: bool
    text: str


@dataclass
class _Section:
    title: str
    checks: list[_Check] = field(default_factory=list)

    def check(self, ok: bool, text: str) -> None:
        self.checks.append(_Check(ok, text))


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.0f} MiB"


_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<name>\S+)')


def _short(path: str) -> str:
    parts = path.split(os.sep)
    return os.sep.join(parts[-2:])


def describe_crash(exc: ChildCrashed) -> str:
    """One line: how the child died and where (the crash site, and the task's own frame)."""
    how = f"killed by {exc.signal}" if exc.signal else "exited without a result"
    text = f"ChildCrashed: {how}, exit code {exc.exitcode}"
    # faulthandler lists the most recent call first; the core trims the stack to end at the task.
    frames = [m.groupdict() for m in _FRAME.finditer(exc.crash_stack or "")]
    if frames:
        site = frames[0]
        text += f", in {site['name']} ({_short(site['path'])}:{site['line']})"
        if len(frames) > 1:
            task = frames[-1]
            text += f" called from {task['name']} ({_short(task['path'])}:{task['line']})"
    return text


def _print_report(sections: list[_Section]) -> bool:
    print("\nReport")
    ok = True
    for section in sections:
        print(f"  {section.title}")
        for check in section.checks:
            print(f"    {'ok    ' if check.ok else 'FAILED'}  {check.text}")
            ok = ok and check.ok
    return ok


# Part 1: forkmap_get.


def _local_graph() -> dict[str, list[Any]]:
    from dask.delayed import delayed

    # pure=False: every call is its own task, even with equal arguments (the leaks and the bumps).
    return {
        "ordinary": [delayed(ordinary, pure=False)(i, dask_key_name=f"ordinary-{i}") for i in range(N_ORDINARY)],
        "leak": [delayed(leak, pure=False)(dask_key_name=f"leak-{i}") for i in range(N_LEAK)],
        "bump_global": [delayed(bump_global, pure=False)(dask_key_name=f"bump_global-{i}") for i in range(N_MUTATE)],
    }


def _check_results(section: _Section, results: dict[str, list[Any]], where: str) -> None:
    wrong = [i for i, value in enumerate(results["ordinary"]) if value != expected_ordinary(i)]
    section.check(
        not wrong,
        f"results: {N_ORDINARY - len(wrong)}/{N_ORDINARY} ordinary tasks correct"
        + (f" (wrong: {wrong})" if wrong else ""),
    )
    # What each leaking child held, and the counter each mutating child saw: values of the child
    # (a child that ran two of these tasks in a batch shows both), never of the parent.
    section.check(
        all(mb >= LEAK_MB for mb in results["leak"]),
        f"{N_LEAK} leaking tasks each held {sorted(results['leak'])} MB in their {where}'s module global",
    )
    seen = results["bump_global"]
    section.check(
        all(value >= 1 for value in seen),
        f"{N_MUTATE} mutating tasks saw the counter at {seen} in their {where}"
        + (" (a child that ran several in one batch counts them all)" if max(seen) > 1 else ""),
    )


def _compute(graph: dict[str, list[Any]], num_workers: int) -> Any:
    """``dask.compute`` of ``graph`` with ``forkmap_get`` and dask's progress bar."""
    from dask.base import compute
    from dask.diagnostics.progress import ProgressBar

    from ._scheduler import forkmap_get

    with ProgressBar():  # type: ignore[no-untyped-call]
        (result,) = compute(graph, scheduler=forkmap_get, num_workers=num_workers)  # type: ignore[no-untyped-call]
    return result


def _run_local(num_workers: int) -> _Section:
    from dask.delayed import delayed

    me = os.getpid()
    section = _Section(f"forkmap_get, {num_workers} children at a time (this process, pid {me})")
    print(f"\n1. forkmap_get: a Dask graph computed by this process (pid {me}), every task in a forked child")
    print(
        f"   {N_ORDINARY} ordinary tasks, {N_LEAK} that each keep {LEAK_MB} MB in a module global,"
        f" {N_MUTATE} that bump a module-global counter"
    )
    rss_before = _rss()
    results = _compute(_local_graph(), num_workers)
    _check_results(section, results, "child")

    # forkmap_get, like dask's local schedulers, fails the whole compute when one task fails.
    print(f"\n   A graph of {N_ORDINARY} ordinary tasks and one that segfaults (a failed task fails the compute):")
    crashing = {
        "ordinary": _local_graph()["ordinary"],
        "segfault": [delayed(segfault, pure=False)(dask_key_name="segfault-local")],
    }
    crash: ChildCrashed | None = None
    try:
        _compute(crashing, num_workers)
    except ChildCrashed as exc:
        crash = exc
    if crash is None:
        section.check(False, "crash: the graph with a segfaulting task computed without an error")
    else:
        print(f"   {type(crash).__name__}: {str(crash).splitlines()[0]}")
        section.check(
            crash.signal == "SIGSEGV" and crash.task == "segfault-local",
            f"crash: task {crash.task!r} failed the compute with {describe_crash(crash)}",
        )

    print("\n   The well-behaved graph again, in the same process:")
    again = _compute(_local_graph(), num_workers)
    section.check(
        again["ordinary"] == results["ordinary"],
        f"after the crash: the next compute worked (same {N_ORDINARY} results), in pid {os.getpid()}",
    )

    rss_after = _rss()
    section.check(
        rss_after - rss_before < RSS_SLACK,
        f"RSS of this process: {_mib(rss_before)} before, {_mib(rss_after)} after"
        f" ({2 * N_LEAK * LEAK_MB} MB leaked by tasks in children)",
    )
    state = process_state()
    section.check(
        state["counter"] == 0 and state["leaked_mb"] == 0,
        f"globals of this process: counter {state['counter']}, {state['leaked_mb']} MB held"
        f" (after {2 * N_MUTATE} increments and {2 * N_LEAK} leaks in children)",
    )
    return section


# Part 2: ForkIsolation on a LocalCluster.


def _watch_workers(dask_scheduler: Any) -> None:
    """Install (on the scheduler) a plugin counting workers that join or leave from now on."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class WorkerEvents(SchedulerPlugin):
        name = "dask-forkmap-demo-worker-events"

        def __init__(self) -> None:
            self.joined = 0
            self.left = 0

        def add_worker(self, scheduler: Any, worker: str) -> None:
            self.joined += 1

        def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
            self.left += 1

    dask_scheduler.add_plugin(WorkerEvents())


def _worker_events(dask_scheduler: Any) -> tuple[int, int]:
    plugin = dask_scheduler.plugins["dask-forkmap-demo-worker-events"]
    return plugin.joined, plugin.left


def _run_distributed() -> _Section:
    import logging

    from distributed import Client, LocalCluster, wait
    from distributed.diagnostics.progressbar import progress

    from ._plugin import ForkIsolation

    section = _Section("ForkIsolation on a LocalCluster (2 worker processes, 1 thread each)")
    print("\n2. ForkIsolation: the same kinds of tasks on a LocalCluster with 2 worker processes")
    print("   starting the cluster ...", flush=True)
    with (
        LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            # No dashboard (its imports cost half a second) and no fixed port that could be taken.
            dashboard_address=":0",
            scheduler_kwargs={"dashboard": False},
            # The workers log each failed task at ERROR, a ChildCrashed repr with its stack; the
            # report says what failed and why, and counts restarts, which these logs would announce.
            silence_logs=logging.CRITICAL,
            plugins={ForkIsolation()},
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        client.wait_for_workers(2, timeout=WAIT)
        client.run_on_scheduler(_watch_workers)
        before: dict[str, dict[str, int]] = client.run(process_state)
        workers = sorted(before)
        print("   workers: " + ", ".join(f"{a} (pid {before[a]['pid']})" for a in workers))

        # Leaks and crashes are spread over both workers, so that each has something to survive.
        def on(i: int) -> list[str]:
            return [workers[i % len(workers)]]

        good = {
            "ordinary": [client.submit(ordinary, i, key=f"ordinary-{i}") for i in range(N_ORDINARY)],
            "leak": [client.submit(leak, key=f"leak-{i}", workers=on(i)) for i in range(N_LEAK)],
            "bump_global": [client.submit(bump_global, key=f"bump_global-{i}", workers=on(i)) for i in range(N_MUTATE)],
        }
        crashing = [client.submit(segfault, key=f"segfault-{i}", workers=on(i)) for i in range(len(workers))]
        n_good = sum(len(futures) for futures in good.values())
        # distributed's progress bar stops at the first failed task: it follows the tasks meant to
        # succeed, and the segfaulting ones are waited for on their own.
        print(f"   {n_good} tasks like part 1's, and {len(crashing)} that segfault (one per worker):")
        start = time.perf_counter()
        progress([f for futures in good.values() for f in futures], notebook=False)  # type: ignore[no-untyped-call]
        wait(crashing, timeout=WAIT)  # type: ignore[no-untyped-call]
        print(f"\r   done in {time.perf_counter() - start:.1f} s")

        try:
            results = {name: client.gather(futures) for name, futures in good.items()}
        except Exception as exc:  # a task meant to succeed failed: report it rather than stop
            section.check(False, f"results: a well-behaved task failed: {type(exc).__name__}: {exc}")
        else:
            _check_results(section, results, "worker's child")

        for future in crashing:
            error = future.exception(timeout=WAIT)
            if isinstance(error, ChildCrashed):
                section.check(
                    error.signal == "SIGSEGV", f"crash: task {future.key!r} failed alone with {describe_crash(error)}"
                )
            else:
                section.check(False, f"crash: task {future.key!r} ended with {type(error).__name__}: {error}")

        after: dict[str, dict[str, int]] = client.run(process_state)
        joined, left = client.run_on_scheduler(_worker_events)

    # A worker that restarted has a new address: its old one is missing from ``after``.
    now = [after.get(a) for a in workers]
    leaked = N_LEAK * LEAK_MB // len(workers)
    rss = [f"{_mib(before[a]['rss'])} -> {_mib(s['rss'])}" if s else "gone" for a, s in zip(workers, now, strict=True)]
    section.check(
        all(s and s["rss"] - before[a]["rss"] < RSS_SLACK for a, s in zip(workers, now, strict=True)),
        f"worker RSS: {', '.join(rss)} ({leaked} MB leaked by tasks on each worker)",
    )
    counters = [s["counter"] if s else None for s in now]
    held = [s["leaked_mb"] if s else None for s in now]
    section.check(
        counters == [0] * len(workers) and held == [0] * len(workers),
        f"worker globals: counters {counters}, MB held {held}"
        f" (after {N_MUTATE} increments and {N_LEAK} leaks in children)",
    )
    pids_before = [before[a]["pid"] for a in workers]
    pids_after = [s["pid"] if s else None for s in now]
    unchanged = pids_before == pids_after
    shown = ", ".join("gone" if pid is None else str(pid) for pid in pids_after)
    section.check(
        unchanged,
        f"worker pids: {pids_before} before, [{shown}] after" + (" (unchanged)" if unchanged else ""),
    )
    # A worker that dies leaves the scheduler, and its nanny starts a new one that joins.
    restarts = max(joined, left)
    section.check(restarts == 0, f"worker restarts: {restarts} (workers lost: {left}, joined: {joined})")
    return section


def _distributed_missing() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return True
    return False


def _sections(distributed: bool, num_workers: int) -> Iterator[_Section]:
    yield _run_local(num_workers)
    if not distributed:
        print("\n2. ForkIsolation: skipped (--local-only)")
    elif _distributed_missing():
        print(
            "\n2. ForkIsolation: skipped, distributed is not installed. For this part, install the extra:"
            "\n   pip install 'dask_forkmap[distributed]'   (from a checkout: pip install -e '.[distributed]')"
        )
    else:
        yield _run_distributed()


def main(*, distributed: bool = True, num_workers: int = 2) -> int:
    """Run the demo; 0 if isolation held everywhere, 1 if anything leaked through."""
    from importlib.metadata import PackageNotFoundError, version

    start = time.perf_counter()
    try:
        versions = f"dask {version('dask')}, distributed {version('distributed')}"
    except PackageNotFoundError:
        versions = f"dask {version('dask')}"
    print(
        f"dask_forkmap demo: Python {platform.python_version()}, {versions}, pid {os.getpid()}."
        "\nTasks that leak, segfault and change globals run in forked children; the report at the end"
        "\nchecks what reached this process and the workers."
    )
    sections = list(_sections(distributed, num_workers))
    ok = _print_report(sections)
    took = f"{time.perf_counter() - start:.1f} s"
    if ok:
        print(f"\nIsolation held: every crash, leak and global change stayed in its child ({took}).")
        return 0
    print(f"\nIsolation FAILED: see the checks marked FAILED above ({took}).")
    return 1
