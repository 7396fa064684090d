"""The crash table (tests/crash_cases.py) through forkmap_get: one child per task, and batches."""

from __future__ import annotations

import dask
import dask.bag as db
import pytest
from crash_cases import CASES, Case, FailsAt, check
from dask import delayed

from dask_forkmap import ResultUnpicklingError, forkmap_get, with_limits

LIMIT_CASES = {name: CASES[name] for name in ("timeout", "memory limit")}


def _limited(case: Case, fn=None):
    fn = fn or case.fn
    return with_limits(fn, **case.limits) if case.limits else fn


def _still_works() -> None:
    assert delayed(sum)([1, 2, 3]).compute(scheduler=forkmap_get) == 6


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_one_child_per_task(case: Case) -> None:
    bad = delayed(_limited(case), pure=False)(dask_key_name="bad-task")
    good = delayed(abs)(-5, dask_key_name="good-task")
    with pytest.raises(case.error) as info:
        dask.compute(bad, good, scheduler=forkmap_get, num_workers=2)
    check(case, info.value, task="bad-task")
    _still_works()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_batches(case: Case) -> None:
    # Task 5 of 12 fails in a batch of up to 4 (opted into); the error names its key, not the batch's.
    fn = _limited(case, FailsAt(case.fn, 5))
    tasks = [delayed(fn, pure=False)(i, dask_key_name=f"task-{i}") for i in range(12)]
    with pytest.raises(case.error) as info:
        dask.compute(*tasks, scheduler=forkmap_get, num_workers=1, chunksize=4)
    check(case, info.value, task="task-5", several=True)
    if case.error is not ResultUnpicklingError:  # the batch's values arrive in one pickle: it names the batch
        assert "one of a batch" not in str(info.value)
    _still_works()


@pytest.mark.parametrize("case", LIMIT_CASES.values(), ids=LIMIT_CASES.keys())
def test_limit_given_as_forkmap_gets_argument(case: Case) -> None:
    bad = delayed(case.fn, pure=False)(dask_key_name="bad-task")
    with pytest.raises(case.error) as info:
        bad.compute(scheduler=forkmap_get, **case.limits)
    check(case, info.value, task="bad-task")
    _still_works()


@pytest.mark.parametrize("case", LIMIT_CASES.values(), ids=LIMIT_CASES.keys())
def test_limit_given_by_the_configuration(case: Case) -> None:
    bad = delayed(case.fn, pure=False)(dask_key_name="bad-task")
    config = {f"forkmap.{name.replace('_', '-')}": value for name, value in case.limits.items()}
    with dask.config.set(config), pytest.raises(case.error) as info:
        bad.compute(scheduler="forkmap")
    check(case, info.value, task="bad-task")
    _still_works()


@pytest.mark.parametrize("case", LIMIT_CASES.values(), ids=LIMIT_CASES.keys())
def test_limit_given_by_an_annotation(case: Case) -> None:
    with dask.annotate(forkmap=dict(case.limits)):
        bad = delayed(case.fn, pure=False)(dask_key_name="bad-task")
    with pytest.raises(case.error) as info:
        bad.compute(scheduler=forkmap_get, optimize_graph=False)  # low-level fusion drops annotations
    check(case, info.value, task="bad-task")


@pytest.mark.parametrize("case", LIMIT_CASES.values(), ids=LIMIT_CASES.keys())
def test_with_limits_on_a_fused_task(case: Case) -> None:
    # Low-level fusion puts the limited call inside a fused task: its limits still reach the child.
    bag = db.from_sequence([1], npartitions=1).map(abs).map(with_limits(lambda x: case.fn(), **case.limits))
    with pytest.raises(case.error) as info:
        bag.compute(scheduler=forkmap_get)
    check(case, info.value)


def test_the_strongest_source_wins() -> None:
    # with_limits over the annotation over forkmap_get's argument over the configuration.
    import time

    def nap(seconds):
        time.sleep(seconds)
        return seconds

    with dask.config.set({"forkmap.timeout": 0.2}):
        assert delayed(nap)(0.6).compute(scheduler=forkmap_get, timeout=5) == 0.6
        with dask.annotate(forkmap={"timeout": 5}):
            slow = delayed(nap, pure=False)(0.6)
        assert slow.compute(scheduler=forkmap_get, timeout=0.2, optimize_graph=False) == 0.6
        with dask.annotate(forkmap={"timeout": 0.2}):
            limited = delayed(with_limits(nap, timeout=5), pure=False)(0.6)
        assert limited.compute(scheduler=forkmap_get, optimize_graph=False) == 0.6
