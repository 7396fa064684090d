"""The crash table (tests/crash_cases.py) through ForkIsolation, on one real cluster for all rows.

One worker process with two threads, no worker memory limit (with one, ForkIsolation's default
per-task limit would turn the plain MemoryError row into MemoryLimitExceeded). Each row's bad task
runs next to a good one; afterwards the worker is the same process and still computes.
"""

from __future__ import annotations

import os
import uuid

import dask
import pytest
from crash_cases import CASES, WAIT, Case, check

from dask_forkmap import with_limits
from dask_forkmap._plugin import ForkIsolation

LIMIT_CASES = {name: CASES[name] for name in ("timeout", "memory limit")}
LIMITED = "limited"  # a second isolated executor, whose plugin carries a row's limits


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, memory_limit=0, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        c.register_plugin(ForkIsolation())
        yield c


def _worker_pids(c) -> set[int]:
    return set(c.run(os.getpid).values())


def _run(c, fn) -> tuple[BaseException, str]:
    """Run ``fn`` as a task next to a good one; its error, and what the error must name."""
    key = f"bad-task-{uuid.uuid4().hex[:8]}"  # each row's own: the scheduler remembers an erred key
    workers = _worker_pids(c)
    bad = c.submit(fn, key=key, pure=False)
    good = c.submit(abs, -5, key=f"good-{key}", pure=False)
    with pytest.raises(BaseException) as info:  # noqa: PT011 - check() asserts the exact type
        bad.result(timeout=WAIT)
    assert good.result(timeout=WAIT) == 5
    assert _worker_pids(c) == workers  # the same worker process carries on
    assert c.submit(sum, [1, 2, 3], pure=False).result(timeout=WAIT) == 6
    return info.value, f"task {key!r}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_one_child_per_task(client, case: Case) -> None:
    fn = with_limits(case.fn, **case.limits) if case.limits else case.fn
    check(case, *_run(client, fn))


@pytest.mark.parametrize("case", LIMIT_CASES.values(), ids=LIMIT_CASES.keys())
def test_limit_given_as_the_plugins_argument(client, case: Case) -> None:
    client.register_plugin(ForkIsolation(LIMITED, **case.limits))
    try:
        with dask.annotate(executor=LIMITED):
            err, task = _run(client, case.fn)
    finally:
        client.unregister_worker_plugin(f"forkmap-isolation-{LIMITED}")
    check(case, err, task)


@pytest.mark.parametrize("case", LIMIT_CASES.values(), ids=LIMIT_CASES.keys())
def test_limit_given_by_an_annotation(client, case: Case) -> None:
    with dask.annotate(forkmap=dict(case.limits)):
        check(case, *_run(client, case.fn))


@pytest.mark.parametrize("case", LIMIT_CASES.values(), ids=LIMIT_CASES.keys())
def test_limit_given_by_the_workers_configuration(client, case: Case) -> None:
    config = {f"forkmap.{name.replace('_', '-')}": value for name, value in case.limits.items()}

    def set_config(values):
        dask.config.set(values)  # in the worker process, for the tasks that follow

    client.run(set_config, config)
    try:
        err, task = _run(client, case.fn)
    finally:
        client.run(set_config, dict.fromkeys(config))
    check(case, err, task)
