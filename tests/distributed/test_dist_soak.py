"""Thousands of isolated tasks with mixed failures: every future settles, nothing hangs or leaks."""

from __future__ import annotations

import os

import forkmap_dist_tasks as t
import pytest
from distributed import Client, LocalCluster, wait

from dask_forkmap import ChildCrashed
from dask_forkmap._plugin import ForkIsolation

N = 2000


@pytest.mark.slow
def test_soak_mixed_failures():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            plugins={ForkIsolation()},
        ) as cluster,
        Client(cluster, timeout=t.WAIT) as client,
    ):
        workers = client.run(os.getpid)
        futures = client.map(t.mixed, range(N), pure=False)
        _, not_done = wait(futures, timeout=240)
        assert not not_done
        by_kind: dict[int, set[str]] = {}
        for i, future in enumerate(futures):
            kind = i % 10
            if kind in (3, 5, 7):
                assert future.status == "error", i
                exc = future.exception(timeout=t.WAIT)
                by_kind.setdefault(kind, set()).add(type(exc).__name__)
                if kind == 3:
                    assert isinstance(exc, ChildCrashed)
                    assert exc.signal == "SIGSEGV"
                elif kind == 7:
                    assert isinstance(exc, ChildCrashed)
                    assert exc.exitcode == 7
            else:
                assert future.status == "finished", i
        assert by_kind == {3: {"ChildCrashed"}, 5: {"ValueError"}, 7: {"ChildCrashed"}}
        ok = [f for i, f in enumerate(futures) if i % 10 not in (3, 5, 7)]
        assert client.gather(ok) == [2 * i for i in range(N) if i % 10 not in (3, 5, 7)]
        # The workers survived all of it, and left no child behind.
        assert client.run(os.getpid) == workers
        leftover = client.run(lambda: __import__("dask_forkmap")._core._reaper.wait(timeout=30))
        assert all(leftover.values())
        children = client.run(_child_count)
        assert set(children.values()) == {0}


def _child_count() -> int:
    me = str(os.getpid())
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat[stat.rindex(b")") + 2 :].split()[1] == me.encode():
                count += 1
    return count
