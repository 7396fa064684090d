"""Isolated tasks that talk to the cluster: clients, seceding, coordination primitives, actors."""

from __future__ import annotations

import os

import dask
import forkmap_dist_tasks as t
import pytest
from distributed import Event, Lock, MultiLock, Nanny, Queue, Semaphore, Variable
from distributed.utils_test import gen_cluster

from dask_forkmap import ResultPicklingError, WorkerInfo, WorkerNotAvailable, worker_info
from dask_forkmap._plugin import ForkIsolation

NANNIES = {"client": True, "Worker": Nanny, "timeout": 120}


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 1)])
async def test_worker_client_secedes_so_nested_waits_finish_on_one_single_thread_worker(c, s, a):
    await c.register_plugin(ForkIsolation())
    (worker_pid,) = (await c.run(os.getpid)).values()
    value, pid = await c.submit(t.fib, 5, pure=False).result(timeout=t.WAIT)
    assert value == 5
    assert pid != worker_pid
    # Each task's client was closed with its child: only the test's own is left.
    assert list(s.clients) == ["fire-and-forget", c.id]
    # The lent slots are back: the worker runs one task at a time again.
    state = await c.run(t.lent_and_slots)
    assert list(state.values()) == [(0, 1)]


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 1)])
async def test_get_client_gives_the_task_a_client_of_its_own_named_after_it(c, s, a):
    await c.register_plugin(ForkIsolation())
    (worker_pid,) = (await c.run(os.getpid)).values()
    future = c.submit(t.submit_with_get_client, 41, key="asks-for-a-client")
    result, client_id, pid = await future.result(timeout=t.WAIT)
    assert result == 42
    assert pid != worker_pid
    assert client_id.startswith("Client-forkmap-task-asks-for-a-client-")
    assert client_id not in s.clients
    events = [msg for _, msg in s.get_events("worker-get-client")]
    assert [(m["client"], m["worker"]) for m in events] == [(client_id, a.worker_address)]


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 2)])
async def test_get_worker_still_fails_clearly_and_in_process_tasks_keep_it(c, s, a):
    await c.register_plugin(ForkIsolation())
    with pytest.raises(WorkerNotAvailable, match=r"^get_worker\(\) cannot work in this task: ForkIsolation"):
        await c.submit(t.get_worker_address, pure=False).result(timeout=t.WAIT)
    with dask.annotate(executor="in-process"):
        assert await c.submit(t.get_worker_address, pure=False).result(timeout=t.WAIT) == a.worker_address


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 2)], worker_kwargs={"resources": {"GPU": 1}})
async def test_worker_info_tells_an_isolated_task_what_get_worker_would(c, s, a):
    await c.register_plugin(ForkIsolation())
    (worker_pid,) = (await c.run(os.getpid)).values()
    expected = WorkerInfo(
        address=a.worker_address, name=0, nthreads=2, resources={"GPU": 1}, scheduler_address=s.address
    )
    info, pid = await c.submit(t.info_of_my_worker, pure=False).result(timeout=t.WAIT)
    assert pid != worker_pid
    assert info == expected
    with dask.annotate(executor="in-process"):
        info, pid = await c.submit(t.info_of_my_worker, pure=False).result(timeout=t.WAIT)
    assert (info, pid) == (expected, worker_pid)
    with pytest.raises(ValueError, match=r"call it inside a task"):
        worker_info()


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 2)])
async def test_coordination_objects_passed_to_an_isolated_task_work(c, s, a):
    await c.register_plugin(ForkIsolation())
    # The worker's own client exists (as after any get_client() in the worker), so the objects rebuild
    # themselves in the worker bound to it: the child must not use that binding.
    with dask.annotate(executor="in-process"):
        await c.gather(c.map(t.worker_client_id, range(2), pure=False))
    lock, semaphore = Lock("forkmap-lock"), Semaphore(max_leases=1, name="forkmap-semaphore")
    queue, variable = await Queue("forkmap-queue"), Variable("forkmap-variable")
    event, multi_lock = Event("forkmap-event"), MultiLock(["forkmap-a", "forkmap-b"])
    locked, pid = await c.submit(
        t.use_passed_objects, lock, semaphore, queue, variable, event, multi_lock, pure=False
    ).result(timeout=t.WAIT)
    assert locked is True
    assert pid not in (await c.run(os.getpid)).values()
    assert await queue.get(timeout=t.WAIT) == "from the task"
    assert await variable.get(timeout=t.WAIT) == "set by the task"
    assert await event.is_set()
    # Everything the task held was released when it left its with-block.
    assert not await lock.locked()
    assert await lock.acquire(timeout=t.WAIT)
    await lock.release()


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 2)])
async def test_a_lock_made_in_an_isolated_task_works(c, s, a):
    await c.register_plugin(ForkIsolation())
    assert await c.submit(t.make_and_use_a_lock, "forkmap-made-in-task", pure=False).result(timeout=t.WAIT)


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 2)])
async def test_an_actor_handle_passed_to_an_isolated_task_calls_the_actor(c, s, a):
    await c.register_plugin(ForkIsolation())
    counter = await c.submit(t.Counter, actor=True)
    assert await counter.increment() == 1
    value, pid = await c.submit(t.call_actor, counter, pure=False).result(timeout=t.WAIT)
    assert value == 2
    assert pid not in (await c.run(os.getpid)).values()
    assert await counter.increment() == 3  # one actor, in the worker, seen by both


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 2)])
async def test_what_stays_bound_to_the_workers_loop_fails_at_once(c, s, a):
    await c.register_plugin(ForkIsolation())
    # The worker's own client, kept by code in the worker process: its copy in a child has no loop.
    with dask.annotate(executor="in-process"):
        await c.submit(t.stash_worker_client, pure=False).result(timeout=t.WAIT)
    with pytest.raises(WorkerNotAvailable, match=r"needs the event loop of the worker at .*executor='in-process'"):
        await c.submit(t.use_stashed_client, 1, pure=False).result(timeout=t.WAIT)
    with dask.annotate(executor="in-process"):  # the way out the message names
        assert await c.submit(t.use_stashed_client, 1, pure=False).result(timeout=t.WAIT) == 2


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 2)])
async def test_returning_futures_of_the_tasks_own_client_fails_clearly(c, s, a):
    await c.register_plugin(ForkIsolation())
    with pytest.raises(ResultPicklingError, match=r"holds 1 Future\(s\) of the task's own client") as info:
        await c.submit(t.return_own_future, 1, key="returns-a-future").result(timeout=t.WAIT)
    assert info.value.task == "task 'returns-a-future'"


@gen_cluster(**NANNIES, nthreads=[("127.0.0.1", 2)])
async def test_big_messages_through_the_tasks_client_after_the_worker_offloaded(c, s, a):
    await c.register_plugin(ForkIsolation())
    # The worker serializes this result on its offload thread: the pool now has a thread, in the worker.
    assert len(await c.submit(t.megabytes, 20, pure=False).result(timeout=t.WAIT)) == 20 * 2**20
    assert await c.submit(t.fetch_big_through_own_client, 20, pure=False).result(timeout=t.WAIT) == 20 * 2**20


def test_objects_passed_to_tasks_of_an_in_process_worker_rebind():
    # An in-process worker runs its loop in a thread of its own, not the main thread: its copy in the
    # child is as dead, and the objects must rebind all the same.
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=False,
            protocol="tcp",
            dashboard_address=None,
            plugins={ForkIsolation()},
        ) as cluster,
        Client(cluster, timeout=t.WAIT) as client,
    ):
        with dask.annotate(executor="in-process"):
            client.gather(client.map(t.worker_client_id, range(2), pure=False))
        lock, semaphore = Lock("inproc-lock"), Semaphore(max_leases=1, name="inproc-semaphore")
        queue, variable = Queue("inproc-queue"), Variable("inproc-variable")
        event, multi_lock = Event("inproc-event"), MultiLock(["inproc-a"])
        locked, _ = client.submit(
            t.use_passed_objects, lock, semaphore, queue, variable, event, multi_lock, pure=False
        ).result(timeout=t.WAIT)
        assert locked is True
        assert queue.get(timeout=t.WAIT) == "from the task"
        assert variable.get(timeout=t.WAIT) == "set by the task"
