"""The soak plan (tests/soak_plan.py) through forkmap_get, in graphs of 20 independent tasks.

A compute stops at its first error, as with every dask scheduler: a graph with faults must raise one
of its own rows' errors, and a graph without must return every result exactly.
"""

from __future__ import annotations

import threading

import pytest
from crash_cases import CASES, WAIT
from procs import child_pids, open_fds, threads_left
from soak_plan import plan

from dask_forkmap import fork_map, forkmap_get
from dask_forkmap._core import _reaper

GRAPH = 20


def _is_one_of(error: BaseException, cases: list[str]) -> bool:
    from crash_cases import check

    for name in cases:
        try:
            check(CASES[name], error)
        except AssertionError:
            continue
        return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_forkmap_get_with_crash_table_faults() -> None:
    tasks = plan()
    fork_map(int)
    assert _reaper.wait(timeout=WAIT)
    fds = open_fds()
    children = child_pids()  # earlier tests' helpers (multiprocessing's resource tracker, say) are not ours
    threads = {t.ident for t in threading.enumerate()}
    good_graphs = bad_graphs = 0
    for start in range(0, len(tasks), GRAPH):
        part = tasks[start : start + GRAPH]
        dsk = {}
        for p in part:
            fn, args = p.call()
            dsk[f"soak-{p.i}"] = (fn, *args)
        keys = list(dsk)
        faults = [p.case for p in part if p.case is not None]
        if not faults:
            assert list(forkmap_get(dsk, keys, num_workers=2)) == [p.expected for p in part]
            good_graphs += 1
            continue
        with pytest.raises(BaseException) as info:  # noqa: PT011 - _is_one_of checks the exact type
            forkmap_get(dsk, keys, num_workers=2)
        assert _is_one_of(info.value, faults), (faults, repr(info.value))
        bad_graphs += 1
    assert good_graphs
    assert bad_graphs
    assert _reaper.wait(timeout=WAIT)
    assert child_pids() <= children
    assert open_fds() == fds
    assert not threads_left(threads, within=10)
