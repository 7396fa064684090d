"""``python -m dask_forkmap``: misbehaving tasks, isolated by fork_map, with a report of what happened."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

from ._child import statm
from ._core import fork_map
from ._errors import ChildCrashed, ForkMapError, MemoryLimitExceeded, TaskTimeoutError
from ._executor import ForkExecutor
from ._limits import with_limits

MiB = 1024 * 1024
_counter = {"value": 0}
_leaked: list[bytearray] = []


def _rss_mib() -> float:
    sizes = statm()
    if sizes is None:  # pragma: no cover - no procfs
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return sizes[1] / MiB


def segfault() -> None:
    """Dereference a null pointer, as a buggy C extension would."""
    ctypes.string_at(0)


def leak_100_mb() -> int:
    """Keep 100 MB alive in a module global, as a leaky library would."""
    block = bytearray(100 * MiB)
    block[::4096] = b"x" * len(block[::4096])
    _leaked.append(block)
    return len(_leaked)


def bump_global() -> int:
    """Mutate module state, as code with single-threaded static state does."""
    _counter["value"] += 1
    return _counter["value"]


def _step(title: str, body: Callable[[], list[str]]) -> None:
    print(f"\n{title}")
    start = time.perf_counter()
    try:
        lines = body()
    except ForkMapError as exc:  # pragma: no cover - the demo expects none here
        lines = [f"unexpected {type(exc).__name__}: {exc}"]
    for line in lines:
        print(f"   {line}")
    print(f"   ({(time.perf_counter() - start) * 1000:.0f} ms)")


def _crash() -> list[str]:
    try:
        fork_map(segfault)
    except ChildCrashed as exc:
        site = [line.strip() for line in (exc.crash_stack or "").splitlines() if line.strip().startswith("File")]
        return [
            f"ChildCrashed: signal={exc.signal} exitcode={exc.exitcode} pid={exc.pid}",
            f"the task's frame at the crash: {site[-1] if site else 'unknown'}",
            f"this process (pid {os.getpid()}) is still running",
        ]
    return ["the task did not crash?"]


def _leak() -> list[str]:
    before = _rss_mib()
    counts = [fork_map(leak_100_mb) for _ in range(10)]
    after = _rss_mib()
    return [
        f"each call saw {counts[0]} leaked block (its own): results {set(counts)}",
        f"this process's RSS: {before:.0f} MiB before, {after:.0f} MiB after 10 x 100 MB of leaks",
    ]


def _mutate() -> list[str]:
    results = [fork_map(bump_global) for _ in range(5)]
    return [f"the task returned {results}; this process's counter is still {_counter['value']}"]


def _limits() -> list[str]:
    lines = []
    try:
        fork_map(with_limits(time.sleep, timeout=0.5), 60)
    except TaskTimeoutError as exc:
        lines.append(f"TaskTimeoutError after {exc.timeout:g} s: {exc}")
    try:
        fork_map(with_limits(bytearray, memory_limit="100 MiB"), 1024 * MiB)
    except MemoryLimitExceeded as exc:
        lines.append(f"MemoryLimitExceeded at {exc.limit // MiB} MiB: a 1 GiB allocation was refused")
    return lines


def _executor() -> list[str]:
    items = range(10_000)
    with ForkExecutor(2) as ex:
        pids: set[Any] = set(ex.map(lambda _: os.getpid(), items, chunksize=500))
        squares = sum(ex.map(lambda x: x * x, items, chunksize=500))
    return [
        f"10 000 items in chunks of 500: {len(pids)} children, 2 at a time; sum of squares {squares}",
    ]


def main() -> int:
    print(f"dask_forkmap demo: each task runs in a forked child of this process (pid {os.getpid()})")
    _step("1. A task that segfaults", _crash)
    _step("2. A task that leaks 100 MB per call, called 10 times", _leak)
    _step("3. A task that mutates a module-global counter, called 5 times", _mutate)
    _step("4. Limits: a 0.5 s timeout and a 100 MiB memory limit", _limits)
    _step("5. ForkExecutor.map with chunks (one fork per chunk)", _executor)
    return 0
