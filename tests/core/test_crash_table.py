"""The crash table (tests/crash_cases.py) through fork_map, ForkExecutor.submit and ForkExecutor.map."""

from __future__ import annotations

import pytest
from crash_cases import CASES, WAIT, Case, FailsAt, check

from dask_forkmap import ForkExecutor, ResultPicklingError, fork_map, with_limits


def _limited(case: Case, fn=None):
    fn = fn or case.fn
    return with_limits(fn, **case.limits) if case.limits else fn


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fork_map(case: Case) -> None:
    with pytest.raises(case.error) as info:
        fork_map(_limited(case))
    check(case, info.value, task=case.fn.__qualname__)
    assert fork_map(lambda: 21 * 2) == 42


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_executor_submit(case: Case) -> None:
    with ForkExecutor(2) as ex:
        bad = ex.submit(_limited(case))
        good = ex.submit(pow, 2, 10)
        with pytest.raises(case.error) as info:
            bad.result(timeout=WAIT)
        check(case, info.value, task=case.fn.__qualname__)
        assert good.result(timeout=WAIT) == 1024
        assert ex.submit(abs, -3).result(timeout=WAIT) == 3


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_executor_map_in_chunks(case: Case) -> None:
    # Item 5 fails, in the middle of the second chunk of 4; the items before it come back in order.
    with ForkExecutor(2) as ex:
        results = ex.map(_limited(case, FailsAt(case.fn, 5)), range(12), chunksize=4)
        assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
        with pytest.raises(case.error) as info:
            next(results)
        check(
            case,
            info.value,
            task="item 5 of map(fails_at_5)" if case.error is ResultPicklingError else None,
            several=True,
        )
        assert list(ex.map(abs, [-1, -2, -3], chunksize=2)) == [1, 2, 3]


@pytest.mark.parametrize("case", [CASES["timeout"], CASES["memory limit"]], ids=["timeout", "memory limit"])
def test_limit_given_as_the_executors_argument(case: Case) -> None:
    with ForkExecutor(2, **case.limits) as ex:
        with pytest.raises(case.error) as info:
            ex.submit(case.fn).result(timeout=WAIT)
        check(case, info.value, task=case.fn.__qualname__)
        assert ex.submit(abs, -3).result(timeout=WAIT) == 3


@pytest.mark.parametrize("case", [CASES["timeout"], CASES["memory limit"]], ids=["timeout", "memory limit"])
def test_limit_given_by_the_configuration(case: Case) -> None:
    import dask

    config = {f"forkmap.{name.replace('_', '-')}": value for name, value in case.limits.items()}
    with dask.config.set(config):
        with pytest.raises(case.error) as info:
            fork_map(case.fn)
        check(case, info.value, task=case.fn.__qualname__)
        with ForkExecutor(1) as ex, pytest.raises(case.error):
            ex.submit(case.fn).result(timeout=WAIT)
