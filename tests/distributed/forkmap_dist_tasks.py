"""Tasks and worker probes for the distributed tests (workers import them: see test_cli's PYTHONPATH)."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

# Seconds for any single wait on a cluster: generous for a loaded 2-core CI machine, never unbounded.
WAIT = 60

_LEAKED: list[bytes] = []


def pid(_: Any = None) -> int:
    return os.getpid()


def inc(x: int) -> int:
    return x + 1


def segfault(_: Any = None) -> None:
    ctypes.string_at(0)


def abort(_: Any = None) -> None:
    os.abort()


def killed(_: Any = None) -> None:
    """What an OOM kill looks like from outside: SIGKILL, no chance to report."""
    os.kill(os.getpid(), signal.SIGKILL)


def hard_exit(_: Any = None) -> None:
    os._exit(3)


def leak(nbytes: int) -> int:
    # Touch every page, then keep it: in the worker process this would stay resident for good.
    block = bytearray(nbytes)
    for i in range(0, nbytes, 4096):
        block[i] = 1
    _LEAKED.append(bytes(block))
    return os.getpid()


def crash_once(marker: str) -> str:
    """Segfault on the first attempt, succeed on the next (the marker file tells them apart)."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        ctypes.string_at(0)
    return "ok"


def sleep_and_report(seconds: float) -> tuple[int, float, float]:
    start = time.monotonic()
    time.sleep(seconds)
    return os.getpid(), start, time.monotonic()


def park(marker: str, worker_pid: int) -> int:
    """Write our pid to ``marker``, then block forever if we are a forked child of ``worker_pid``.

    Run in the worker process itself (after the plugin is gone, say) it returns at once.
    """
    me = os.getpid()
    if me != worker_pid:
        with open(marker + ".tmp", "w") as f:
            f.write(str(me))
        os.replace(marker + ".tmp", marker)
        time.sleep(3600)
    return me


def oom_score_adj(_: Any = None) -> int:
    with open("/proc/self/oom_score_adj") as f:
        return int(f.read())


# Probes, run on workers with Client.run.


def rss(dask_worker: Any = None) -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def executor_type(dask_worker: Any) -> dict[str, str]:
    return {name: type(e).__name__ for name, e in dask_worker.executors.items()}


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def nested_delayed_compute() -> int:
    import dask

    return dask.delayed(sum)([1, 2, 3]).compute()


def nested_dataframe_compute() -> int:
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    pdf = pd.DataFrame({"k": np.arange(100) % 10, "v": np.arange(100.0)})
    return len(dd.from_pandas(pdf, npartitions=4).groupby("k").v.mean().compute())


def hold_lock(lock):
    with lock:  # no timeout: a wait nothing can end would hang the task
        return "held"


def put_in_queue(queue):
    queue.put(1)
    return "put"


def worker_client_id(_):
    from distributed import get_client

    return get_client().id


def fib(n: int) -> tuple[int, int]:
    # Each level waits on two tasks of its own: on one single-thread worker that finishes only if
    # worker_client() secedes, handing the task's slot to the tasks it waits for.
    from distributed import worker_client

    if n < 2:
        return n, os.getpid()
    with worker_client() as client:
        a, b = client.gather([client.submit(fib, n - 1, pure=False), client.submit(fib, n - 2, pure=False)])
    return a[0] + b[0], os.getpid()


def submit_with_get_client(x: int) -> tuple[int, str, int]:
    from distributed import get_client, rejoin, secede

    client = get_client()
    future = client.submit(inc, x, pure=False)
    secede()
    result = future.result(timeout=WAIT)
    rejoin()
    return result, client.id, os.getpid()


def use_passed_objects(lock, semaphore, queue, variable, event, multi_lock) -> list[Any]:
    with lock, semaphore, multi_lock:
        queue.put("from the task", timeout=WAIT)
        variable.set("set by the task", timeout=WAIT)
        event.set()
        return [lock.locked(), os.getpid()]


def call_actor(counter) -> tuple[int, int]:
    return counter.increment().result(timeout=WAIT), os.getpid()


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def increment(self) -> int:
        self.n += 1
        return self.n


def make_and_use_a_lock(name: str) -> bool:
    from distributed import Lock

    lock = Lock(name)
    if not lock.acquire(timeout=WAIT):
        return False
    lock.release()
    return True


_STASHED_CLIENTS: list[Any] = []


def stash_worker_client(_: Any = None) -> str:
    # Run in the worker process: keeps the worker's own client in a module global, as a library might.
    from distributed import get_client

    _STASHED_CLIENTS.append(get_client())
    return _STASHED_CLIENTS[-1].id


def use_stashed_client(x: int) -> Any:
    return _STASHED_CLIENTS[-1].submit(inc, x, pure=False).result(timeout=WAIT)


def get_worker_address(_: Any = None) -> str:
    from distributed import get_worker

    return get_worker().address


def lent_and_slots(dask_worker: Any) -> tuple[int, int]:
    forks = dask_worker.executors["default"]._forks
    return forks._lent, len(forks._slots)


def info_of_my_worker(_: Any = None) -> tuple[Any, int]:
    from dask_forkmap import worker_info

    return worker_info(), os.getpid()


def return_own_future(x: int) -> Any:
    from distributed import get_client

    return [get_client().submit(inc, x, pure=False)]


def megabytes(n: int) -> bytes:
    return b"x" * (n * 2**20)


def fetch_big_through_own_client(n: int) -> int:
    # More than distributed.comm.offload (10 MiB): the child's client (de)serializes it on distributed's
    # offload thread, whose copy the worker left behind in the child.
    from distributed import get_client

    return len(get_client().submit(megabytes, n, pure=False).result(timeout=WAIT))
