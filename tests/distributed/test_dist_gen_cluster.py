"""ForkIsolation on ``gen_cluster`` clusters: Nanny workers (real processes) over loopback TCP."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid

import dask
import forkmap_dist_tasks as t
import pytest
from distributed import Nanny, wait
from distributed.utils_test import gen_cluster
from procs import wait_gone

from dask_forkmap import ChildCrashed, MemoryLimitExceeded, TaskTimeoutError, with_limits
from dask_forkmap._plugin import ForkIsolation

NANNIES = {"client": True, "Worker": Nanny, "nthreads": [("127.0.0.1", 2)] * 2, "timeout": 120}


async def _read_pid_file(path: str) -> int:
    # Polled from the test's loop: Client.run would block the worker's event loop while it waits.
    deadline = time.monotonic() + t.WAIT
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear within {t.WAIT} s"
        await asyncio.sleep(0.01)
    with open(path) as f:
        return int(f.read())


def _marker() -> str:
    return os.path.join(tempfile.gettempdir(), f"forkmap-test-{uuid.uuid4().hex}")


async def _worker_pids(c):
    return await c.run(os.getpid)


async def _task_pids(c, n=8):
    futures = c.map(t.pid, range(n), pure=False)
    return set(await c.gather(futures))


@gen_cluster(**NANNIES)
async def test_tasks_run_in_children_with_correct_results(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    workers = await _worker_pids(c)
    results = await c.gather(c.map(t.inc, range(50)))
    assert results == list(range(1, 51))
    task_pids = await _task_pids(c, 20)
    assert task_pids.isdisjoint(workers.values())
    assert len(task_pids) == 20  # one fresh child per task


@gen_cluster(**NANNIES)
async def test_segfault_fails_the_task_not_the_worker(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    before = await _worker_pids(c)
    crashes = (
        (t.segfault, "SIGSEGV", -11),
        (t.abort, "SIGABRT", -6),
        (t.killed, "SIGKILL", -9),
        (t.hard_exit, None, 3),
    )
    for crash, signame, exitcode in crashes:
        future = c.submit(crash, pure=False)
        with pytest.raises(ChildCrashed) as info:
            await future.result(timeout=t.WAIT)
        assert info.value.signal == signame
        assert info.value.exitcode == exitcode
        if signame in ("SIGSEGV", "SIGABRT"):  # the stack ends at the task, not at the worker's way into it
            assert info.value.crash_stack is not None
            assert info.value.crash_stack.splitlines()[-1].endswith(f" in {crash.__name__}")
        assert "the child running task" in str(info.value)
    assert await _worker_pids(c) == before  # same workers, same processes: nothing was restarted
    assert set(s.workers) == set(before)
    assert await c.gather(c.map(t.inc, range(10))) == list(range(1, 11))


@gen_cluster(**NANNIES)
async def test_retries_apply_to_crashes(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    marker = _marker()
    try:
        assert await c.submit(t.crash_once, marker, retries=1, pure=False).result(timeout=t.WAIT) == "ok"
    finally:
        if os.path.exists(marker):
            os.remove(marker)


@gen_cluster(**NANNIES)
async def test_leak_leaves_worker_rss_flat(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    address = a.worker_address
    before = (await c.run(t.rss, workers=[address]))[address]
    nbytes = 200 * 2**20
    for _ in range(3):
        await c.submit(t.leak, nbytes, workers=[address], pure=False).result(timeout=t.WAIT)
    after = (await c.run(t.rss, workers=[address]))[address]
    assert after - before < 50 * 2**20, (before, after)
    # The same task in the worker process does grow it: the measurement can see a leak.
    with dask.annotate(executor="in-process"):
        await c.submit(t.leak, nbytes, workers=[address], pure=False).result(timeout=t.WAIT)
    grown = (await c.run(t.rss, workers=[address]))[address]
    assert grown - after > nbytes // 2


@gen_cluster(**NANNIES)
async def test_restarted_workers_are_isolated_again(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    first = await _worker_pids(c)
    await c.restart(timeout=t.WAIT)
    second = await _worker_pids(c)
    assert set(second.values()).isdisjoint(first.values())
    assert (await _task_pids(c)).isdisjoint(second.values())
    types = await c.run(t.executor_type)
    assert all(e["default"] == "ForkIsolatedExecutor" for e in types.values())


@gen_cluster(**NANNIES, worker_kwargs={"memory_limit": "2 GiB"})
async def test_default_memory_limit_is_the_workers_share_per_thread(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    limits = await c.run(lambda dask_worker: dask_worker.executors["default"].limits.memory_limit)
    assert set(limits.values()) == {2**30}  # 2 GiB over 2 threads
    with pytest.raises(MemoryLimitExceeded, match="memory limit of 1073741824 bytes"):
        await c.submit(t.leak, 3 * 2**30, pure=False).result(timeout=t.WAIT)
    assert set((await _worker_pids(c)).values()) == {a.pid, b.pid}


@gen_cluster(**NANNIES)
async def test_children_offer_themselves_to_the_oom_killer_first(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    workers = await c.run(t.oom_score_adj)
    children = await c.gather(c.map(t.oom_score_adj, range(4), pure=False))
    assert set(children) == {1000}
    assert 1000 not in workers.values()


@gen_cluster(**NANNIES)
async def test_timeout_and_memory_limit_by_annotation(c, s, a, b):
    await c.register_plugin(ForkIsolation(timeout=30))
    with dask.annotate(forkmap={"timeout": 0.5}):
        slow = c.submit(t.sleep_and_report, 60, pure=False)
    with pytest.raises(TaskTimeoutError, match=r"0\.5 s timeout"):
        await slow.result(timeout=t.WAIT)
    with dask.annotate(forkmap={"memory_limit": "64 MiB"}):
        big = c.submit(t.leak, 512 * 2**20, pure=False)
    with pytest.raises(MemoryLimitExceeded):
        await big.result(timeout=t.WAIT)
    # with_limits on the function itself wins over the annotation.
    with dask.annotate(forkmap={"timeout": 30}):
        limited = c.submit(with_limits(t.sleep_and_report, timeout=0.5), 60, pure=False)
    with pytest.raises(TaskTimeoutError, match=r"0\.5 s timeout"):
        await limited.result(timeout=t.WAIT)
    # Without the annotation the plugin's own limits apply, and the same work succeeds.
    assert await c.submit(t.leak, 64 * 2**20, pure=False).result(timeout=t.WAIT)


@gen_cluster(**NANNIES)
async def test_forkmap_annotation_as_in_forkmap_get(c, s, a, b):
    # The same annotations mean the same on a cluster: False runs the task in the worker process,
    # with the worker API working; True forks; a typo fails its task, naming it, and nothing else.
    from distributed import get_worker

    await c.register_plugin(ForkIsolation())
    workers = set((await _worker_pids(c)).values())
    with dask.annotate(forkmap=False):
        here = c.submit(lambda: (os.getpid(), get_worker().address), pure=False, key="here")
    with dask.annotate(forkmap=True):
        there = c.submit(t.pid, 0, pure=False)
    with dask.annotate(forkmap={"memory-limit": "1 GiB"}):
        typo = c.submit(t.pid, 1, pure=False, key="typo")
    pid, address = await here.result(timeout=t.WAIT)
    assert pid in workers
    assert address in s.workers
    assert await there.result(timeout=t.WAIT) not in workers
    with pytest.raises(ValueError, match=r"annotation of task 'typo' has unknown keys \['memory-limit'\]"):
        await typo.result(timeout=t.WAIT)
    assert set((await _worker_pids(c)).values()) == workers


@gen_cluster(**NANNIES)
async def test_named_executor_isolates_only_annotated_tasks(c, s, a, b):
    await c.register_plugin(ForkIsolation("fork"))
    workers = set((await _worker_pids(c)).values())
    assert (await _task_pids(c)) <= workers
    with dask.annotate(executor="fork"):
        futures = c.map(t.pid, range(8), pure=False)
    assert set(await c.gather(futures)).isdisjoint(workers)


@gen_cluster(**NANNIES)
async def test_unregister_restores_the_executor_and_kills_children(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    address = a.worker_address
    worker_pid = (await c.run(os.getpid, workers=[address]))[address]
    marker = _marker()
    try:
        parked = c.submit(t.park, marker, worker_pid, workers=[address], pure=False)
        child = await _read_pid_file(marker)
        assert child != worker_pid
        assert t.is_alive(child)
        await c.unregister_worker_plugin("forkmap-isolation")
        # Removal returns once the worker's teardown has killed and reaped the child.
        assert not t.is_alive(child)
        # The cut-short task was rescheduled, not failed: it now runs in the worker process itself.
        assert await parked.result(timeout=t.WAIT) == worker_pid
    finally:
        if os.path.exists(marker):
            os.remove(marker)
    types = await c.run(t.executor_type)
    assert all(e["default"] == "ThreadPoolExecutor" and "in-process" not in e for e in types.values())
    assert (await _task_pids(c)) <= set((await _worker_pids(c)).values())


@gen_cluster(**NANNIES)
async def test_result_metadata_is_recorded(c, s, a, b):
    np = pytest.importorskip("numpy")
    await c.register_plugin(ForkIsolation())
    future = c.submit(np.ones, 2**20, pure=False)
    await wait(future, timeout=t.WAIT)
    ts = s.tasks[future.key]
    assert ts.nbytes >= 8 * 2**20
    assert ts.type == "numpy.ndarray"
    timed = c.submit(t.sleep_and_report, 0.3, pure=False)
    _, started, stopped = await timed.result(timeout=t.WAIT)
    computes = [
        ss
        for ws in s.tasks[timed.key].who_has or ()
        for ss in (await c.run(_startstops, timed.key, workers=[ws.address]))[ws.address]
    ]
    assert len(computes) == 1
    # start/stop measure the task itself in the child, not the fork around it.
    assert 0.3 <= computes[0]["stop"] - computes[0]["start"] < 0.3 + (stopped - started)


def _startstops(key, dask_worker):
    return [ss for ss in dask_worker.state.tasks[key].startstops if ss["action"] == "compute"]


@gen_cluster(**NANNIES)
async def test_at_most_nthreads_children_per_worker(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    address = a.worker_address
    futures = c.map(t.sleep_and_report, [0.3] * 8, workers=[address], allow_other_workers=False, pure=False)
    spans = [(start, stop) for _, start, stop in await c.gather(futures)]
    events = sorted([(start, 1) for start, _ in spans] + [(stop, -1) for _, stop in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2


_SHARED = ForkIsolation()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2)] * 2, timeout=120, worker_kwargs={"plugins": {_SHARED}})
async def test_worker_plugins_argument_one_instance_for_two_workers(c, s, a, b):
    # Worker(plugins=...) in this process: the same plugin object serves both workers.
    assert a.plugins["forkmap-isolation"] is b.plugins["forkmap-isolation"] is _SHARED
    assert type(a.executors["default"]).__name__ == "ForkIsolatedExecutor"
    assert a.executors["default"] is not b.executors["default"]
    assert os.getpid() not in await _task_pids(c)
    with pytest.raises(ChildCrashed):
        await c.submit(t.segfault, pure=False).result(timeout=t.WAIT)
    await a.close()
    # Closing one worker tore down its executor only.
    assert type(b.executors["default"]).__name__ == "ForkIsolatedExecutor"
    assert type(a.executors["default"]).__name__ == "ThreadPoolExecutor"


@gen_cluster(**NANNIES)
async def test_closing_a_worker_kills_its_children(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    worker_pid = a.pid
    marker = _marker()
    try:
        parked = c.submit(t.park, marker, worker_pid, workers=[a.worker_address], allow_other_workers=True, pure=False)
        child = await _read_pid_file(marker)
        assert t.is_alive(child)
        await a.close()
        assert wait_gone(child, t.WAIT)
        # The task was not lost with its worker: it runs again on the other one (parked there too).
        await _read_pid_file_changed(marker, child)
        del parked
    finally:
        if os.path.exists(marker):
            os.remove(marker)


async def _read_pid_file_changed(path: str, old: int) -> int:
    deadline = time.monotonic() + t.WAIT
    while True:
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
            if text and int(text) != old:
                return int(text)
        assert time.monotonic() < deadline, f"{path} still names {old} after {t.WAIT} s"
        await asyncio.sleep(0.01)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=120)
async def test_no_thread_of_ours_outlives_a_test(c, s, a):
    # In-process workers fork from this process. gen_cluster fails the test if a thread started during
    # it is still running 5 s after it: dask_forkmap's reaper must end once it has nothing to reap.
    await c.register_plugin(ForkIsolation())
    assert await c.submit(t.pid, 0, pure=False).result(timeout=t.WAIT) != os.getpid()
