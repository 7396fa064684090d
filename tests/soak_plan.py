"""A soak's plan: many tasks, about 5 % of them failing as a random row of the crash table.

Every layer's soak (``tests/core/test_soak.py``, ``tests/scheduler/test_scheduler_soak.py``,
``tests/distributed/test_dist_soak.py``) runs the same plan and checks the same thing: every good
task's exact result, the row's own typed error (:func:`crash_cases.check`) for every bad one, and
nothing left behind. ``FORKMAP_SOAK_TASKS`` sets the number of tasks (10 000 by default).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from crash_cases import CASES, WAIT
from procs import child_pids, open_fds, threads_left

from dask_forkmap import fork_map, with_limits
from dask_forkmap._core import _reaper

TASKS = int(os.environ.get("FORKMAP_SOAK_TASKS", "10000"))
FAULT_RATE = 0.05


@dataclass(frozen=True)
class Planned:
    i: int
    case: str | None  # a row of CASES, or None for a good task
    delay: float

    @property
    def expected(self) -> int:
        return 2 * self.i

    def call(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The function to run, with the row's limits attached, and its arguments."""
        limits = CASES[self.case].limits if self.case is not None else {}
        fn: Callable[..., Any] = with_limits(soak_task, **limits) if limits else soak_task
        return fn, (self.i, self.case, self.delay)


def plan(n: int = TASKS, seed: int = 20261203) -> list[Planned]:
    rng = random.Random(seed)
    names = sorted(CASES)
    tasks = []
    for i in range(n):
        case = rng.choice(names) if rng.random() < FAULT_RATE else None
        delay = rng.uniform(0, 0.005) if rng.random() < 0.2 else 0.0
        tasks.append(Planned(i, case, delay))
    # Every row at least once, whatever the seed and size.
    for j, name in enumerate(names):
        if j < n and not any(p.case == name for p in tasks):
            tasks[j * (n // len(names))] = Planned(j * (n // len(names)), name, 0.0)
    return tasks


def soak_task(i: int, case: str | None, delay: float) -> Any:
    if delay:
        time.sleep(delay)
    if case is None:
        return 2 * i
    return CASES[case].fn()


@contextlib.contextmanager
def nothing_left_behind() -> Iterator[None]:
    """Assert that the block leaves no child, descriptor or thread of this process behind."""
    fork_map(int)  # the reaper thread and its pipe exist from the first fork on: count them before
    assert _reaper.wait(timeout=WAIT)
    fds = open_fds()
    children = child_pids()  # earlier tests' helpers (multiprocessing's resource tracker, say) are not ours
    threads = {t.ident for t in threading.enumerate()}
    yield
    assert _reaper.wait(timeout=WAIT)
    assert child_pids() <= children
    assert open_fds() == fds
    assert not threads_left(threads, within=10)
