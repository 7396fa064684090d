"""The soak plan (tests/soak_plan.py) through forkmap_get, in graphs of 20 independent tasks.

A compute stops at its first error, as with every dask scheduler: a graph with faults must raise one
of its own rows' errors, and a graph without must return every result exactly.
"""

from __future__ import annotations

import pytest
from crash_cases import CASES
from soak_plan import nothing_left_behind, plan

from dask_forkmap import forkmap_get

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
    good_graphs = bad_graphs = 0
    with nothing_left_behind():
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
