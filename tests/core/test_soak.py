"""The soak plan (tests/soak_plan.py) through ForkExecutor: every outcome exact, nothing left behind."""

from __future__ import annotations

import threading

import pytest
from crash_cases import CASES, WAIT, check
from procs import child_pids, open_fds, threads_left
from soak_plan import plan

from dask_forkmap import ForkExecutor, fork_map
from dask_forkmap._core import _reaper


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_executor_with_crash_table_faults() -> None:
    tasks = plan()
    fork_map(int)
    assert _reaper.wait(timeout=WAIT)
    threads = {t.ident for t in threading.enumerate()}
    fds = open_fds()
    children = child_pids()  # earlier tests' helpers (multiprocessing's resource tracker, say) are not ours
    with ForkExecutor(2) as ex:
        futures = [ex.submit(fn, *args) for fn, args in (p.call() for p in tasks)]
        for p, future in zip(tasks, futures, strict=True):
            if p.case is None:
                assert future.result(timeout=WAIT) == p.expected, p
                continue
            error = future.exception(timeout=WAIT)
            assert error is not None, p
            check(CASES[p.case], error)
    assert _reaper.wait(timeout=WAIT)
    assert child_pids() <= children
    assert open_fds() == fds
    assert not threads_left(threads, within=10)
