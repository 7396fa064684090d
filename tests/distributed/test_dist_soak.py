"""The soak plan (tests/soak_plan.py) through ForkIsolation: every outcome exact, the workers unharmed."""

from __future__ import annotations

import os

import forkmap_dist_tasks as t
import pytest
from crash_cases import CASES, check
from distributed import Client, LocalCluster, wait
from soak_plan import plan

from dask_forkmap._plugin import ForkIsolation


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_soak_with_crash_table_faults():
    tasks = plan()
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            memory_limit=0,  # no per-task default limit: the MemoryError row stays a MemoryError
            dashboard_address=None,
            plugins={ForkIsolation()},
        ) as cluster,
        Client(cluster, timeout=t.WAIT) as client,
    ):
        workers = client.run(os.getpid)
        futures = []
        for p in tasks:
            fn, args = p.call()
            futures.append(client.submit(fn, *args, key=f"soak-{p.i}"))
        _, not_done = wait(futures, timeout=900)
        assert not not_done
        good = [(p, f) for p, f in zip(tasks, futures, strict=True) if p.case is None]
        assert all(f.status == "finished" for _, f in good)
        assert client.gather([f for _, f in good]) == [p.expected for p, _ in good]
        for p, future in zip(tasks, futures, strict=True):
            if p.case is not None:
                assert future.status == "error", p
                check(CASES[p.case], future.exception(timeout=t.WAIT), task=f"task 'soak-{p.i}'")
        # The workers survived all of it, and left no child behind.
        assert client.run(os.getpid) == workers
        assert all(client.run(_reaped).values())
        assert set(client.run(_child_count).values()) == {0}


def _reaped() -> bool:
    from dask_forkmap._core import _reaper

    return _reaper.wait(timeout=30)


def _child_count() -> int:
    from procs import child_pids

    return len(child_pids())
