"""The checks every kind of isolated cluster must pass, for a synchronous Client."""

from __future__ import annotations

import os

import dask
import forkmap_dist_tasks as t
import pytest

from dask_forkmap import ChildCrashed


def worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def task_pids(client, n: int = 8) -> set[int]:
    return set(client.gather(client.map(t.pid, range(n), pure=False)))


def check_results_and_pids(client) -> None:
    assert client.gather(client.map(t.inc, range(40))) == list(range(1, 41))
    pids = task_pids(client, 16)
    assert pids.isdisjoint(worker_pids(client).values())
    assert len(pids) == 16


def check_segfault(client) -> None:
    before = worker_pids(client)
    with pytest.raises(ChildCrashed) as info:
        client.submit(t.segfault, pure=False).result(timeout=t.WAIT)
    assert info.value.signal == "SIGSEGV"
    assert worker_pids(client) == before
    assert client.submit(t.inc, 1, pure=False).result(timeout=t.WAIT) == 2


def check_leak(client) -> None:
    address = next(iter(worker_pids(client)))
    before = client.run(t.rss, workers=[address])[address]
    for _ in range(3):
        client.submit(t.leak, 200 * 2**20, workers=[address], pure=False).result(timeout=t.WAIT)
    after = client.run(t.rss, workers=[address])[address]
    assert after - before < 50 * 2**20, (before, after)


def check_restart(client, n_workers: int) -> None:
    first = worker_pids(client)
    client.restart(timeout=t.WAIT, wait_for_workers=True)
    client.wait_for_workers(n_workers, timeout=t.WAIT)
    second = worker_pids(client)
    assert set(second.values()).isdisjoint(first.values())
    assert task_pids(client).isdisjoint(second.values())


def check_all(client, n_workers: int) -> None:
    check_results_and_pids(client)
    check_segfault(client)
    check_leak(client)
    check_restart(client, n_workers)
    with dask.annotate(executor="in-process"):  # the escape hatch is there after a restart too
        assert client.submit(t.pid, pure=False).result(timeout=t.WAIT) in worker_pids(client).values()
