"""The soak plan (tests/soak_plan.py) through ForkExecutor: every outcome exact, nothing left behind."""

from __future__ import annotations

import pytest
from crash_cases import CASES, WAIT, check
from soak_plan import nothing_left_behind, plan

from dask_forkmap import ForkExecutor


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_executor_with_crash_table_faults() -> None:
    tasks = plan()
    with nothing_left_behind(), ForkExecutor(2) as ex:
        futures = [ex.submit(fn, *args) for fn, args in (p.call() for p in tasks)]
        for p, future in zip(tasks, futures, strict=True):
            if p.case is None:
                assert future.result(timeout=WAIT) == p.expected, p
                continue
            error = future.exception(timeout=WAIT)
            assert error is not None, p
            check(CASES[p.case], error)
