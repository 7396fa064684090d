"""The cluster as a task isolated by ``ForkIsolation`` sees it, from its forked child.

A child holds a copy of the worker's memory but none of its life: no event loop runs, no comm is
served, the thread pool is gone. What a task reaches for, and where it lands::

    in the task (child)                      stand-in installed by attach()        reaches
    -------------------                      ------------------------------        -------
    get_client(), worker_client()       -->  _TaskWorker._get_client()       -->   a Client of the task's own,
    Lock/Semaphore/Queue/Variable/Event/                                           made on first use, closed
      MultiLock/Actor (made in the task)                                           when the task returns
    the same, passed in as arguments    -->  rebound on first use to it
    secede() / worker_client()          -->  _TaskWorker.handle_stimulus() --rpc-> the worker: its executor
                                                                                   lends a slot, the task
                                                                                   turns long-running
    rejoin()                            -->  _ChildPool.submit(): returns at once
    get_worker() in the task's own code -->  WorkerNotAvailable
    .compute() in the task              -->  dask's local scheduler, in this child

Why:

* The worker's own client, loop and rpc cannot be used here: their sockets and epoll set are shared
  with the living worker, and nothing runs their loop. A fresh client, with its own loop thread and
  its own connection to the scheduler, behaves exactly as a client made in any other process.
* It is made lazily: a task that never asks pays nothing. It is named after the task, so that the
  scheduler (and its dashboard) shows which task a client belongs to.
* distributed's helpers find "the worker" through ``get_worker()``. In the child that returns
  :class:`_TaskWorker` to distributed's own helpers that need one (``get_client``, ``secede``,
  ``worker_client``, the coordination primitives), ``ValueError`` ("not on a worker") to its other
  internals, which then behave as in a client process, and :class:`WorkerNotAvailable` to the
  task's own code: the worker's state (``data``, ``state``, ``executors``) is not in the child, and
  a copy of it would mislead.
* Objects passed to the task were rebuilt in the worker, bound to the worker's client and loop:
  their classes get a check, in the child only, that drops such a binding before it is used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import dask
import distributed.client
import distributed.threadpoolexecutor
import distributed.utils
import distributed.worker

from ._errors import ForkMapError

if TYPE_CHECKING:
    from types import FrameType

    from distributed import Client

__all__ = [
    "SECEDE_OP",
    "TaskAccess",
    "WorkerFacts",
    "WorkerInfo",
    "WorkerNotAvailable",
    "attach",
    "detach",
    "own_futures_in",
    "worker_info",
]

# How long a child waits to close its task's client in order; past it, the connection just dies with
# the child (the scheduler then drops the client on its own), instead of holding the task's result.
_CLOSE_TIMEOUT = 10.0

# The worker handler (installed by ForkIsolation.setup) a child calls when its task secedes.
SECEDE_OP = "dask_forkmap_secede"

# distributed's helpers that may have the child's stand-in worker: what they use of it, it has.
_GIVEN_THE_STAND_IN = {
    ("distributed.worker", "get_client"),
    ("distributed.worker", "secede"),
    ("distributed.worker_client", "worker_client"),
    ("distributed.semaphore", "_bind_late"),
    ("distributed.actor", "_try_bind_worker_client"),
    ("distributed.multi_lock", "__init__"),
}


class WorkerNotAvailable(ForkMapError, RuntimeError):
    """An isolated task asked for the worker itself (``get_worker()``), or for its event loop.

    There is no live worker in a forked child: no event loop, no connections, no thread pool, only a
    copy of the worker's memory. ``get_client()``, ``worker_client()``, ``secede()`` and
    distributed's coordination primitives do work there, through a client of the task's own; the
    worker object does not. The message names the worker and says what to do.

    Notes
    -----
    It derives from :class:`RuntimeError`, not :class:`ValueError`: distributed's helpers treat a
    ``ValueError`` from ``get_worker()`` as "not on a worker", and would then quietly do something
    else than the task asked for.
    """


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """What a task may know of the worker that runs it, whether it is isolated or not.

    Attributes
    ----------
    address : str
        The worker's address, as ``Client.submit(..., workers=[address])`` takes it.
    name : str or int
        The worker's name.
    nthreads : int
        Tasks the worker runs at once.
    resources : dict of str to float
        The worker's resources (``--resources``), in total, not what is free now.
    scheduler_address : str
        Where the worker's scheduler listens.
    """

    address: str
    name: Any
    nthreads: int
    resources: dict[str, float]
    scheduler_address: str


class WorkerFacts:
    """What a child may know of its worker, gathered once per worker, in the worker."""

    __slots__ = ("info", "security")

    def __init__(self, worker: Any) -> None:
        self.info = WorkerInfo(
            address=str(worker.address),
            name=worker.name,
            nthreads=worker.state.nthreads,
            resources=dict(worker.state.total_resources),
            scheduler_address=worker.scheduler.address,
        )
        self.security = worker.security


def worker_info() -> WorkerInfo:
    """The worker running the current task: its address, name, threads, resources and scheduler.

    The supported way for a task isolated by :class:`~dask_forkmap.ForkIsolation` to learn what
    ``get_worker()`` would have told it of the worker (which fails there: the worker's state is not in
    the child). It works the same in a task that runs in the worker process.

    Returns
    -------
    WorkerInfo

    Raises
    ------
    ValueError
        Not called from a task running on a ``distributed`` worker.

    Examples
    --------
    >>> from dask_forkmap import worker_info
    >>> def where():
    ...     return worker_info().address
    >>> client.submit(where).result()  # doctest: +SKIP
    'tcp://127.0.0.1:40155'
    """
    if _stand_in is not None:
        return _stand_in.facts.info
    try:
        worker = distributed.worker.get_worker()
    except ValueError:
        raise ValueError("worker_info() tells a task about the worker running it; call it inside a task") from None
    return WorkerFacts(worker).info


class TaskAccess:
    """One task's way to the cluster, handed to its child: its worker's facts, key and token."""

    __slots__ = ("facts", "key", "token")

    def __init__(self, facts: WorkerFacts, key: Any, token: int) -> None:
        self.facts = facts
        self.key = key
        self.token = token


class _Scheduler:
    """``worker.scheduler`` for the stand-in: the address at once, the rpc only when used."""

    def __init__(self, owner: _TaskWorker) -> None:
        self._owner = owner
        self.address = owner.facts.info.scheduler_address

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner.client.scheduler, name)


class _TaskWorker:
    """What distributed's helpers get for "the worker" in a child: a client of the task's own."""

    def __init__(self, access: TaskAccess) -> None:
        self.facts = access.facts
        self.key = access.key
        self.token = access.token
        self.address = access.facts.info.address
        self.name = access.facts.info.name
        self.scheduler = _Scheduler(self)
        self._client: Client | None = None
        self._sending: set[asyncio.Future[None]] = set()

    def _get_client(self, timeout: float | None = None) -> Client:
        if self._client is None:
            client_class: Any = distributed.client.Client
            if self.facts.info.scheduler_address.startswith("inproc://"):
                raise WorkerNotAvailable(
                    f"get_client() cannot reach the scheduler at {self.facts.info.scheduler_address} from this "
                    "task: inproc:// connects only within one process, and ForkIsolation runs the task in a "
                    "forked child of the worker. Use a network protocol (LocalCluster(protocol='tcp')), or "
                    "run this task in the worker process with dask.annotate(executor='in-process')."
                )

            kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
            self._client = client_class(
                self.facts.info.scheduler_address,
                security=self.facts.security,
                name=f"forkmap-task-{self.key}",
                set_as_default=False,
                direct_to_workers=True,
                **kwargs,
            )
            # As the worker's own client is: what default_client() and Client.current() return, for
            # as_completed(), wait() and the like. The configuration it would set is left alone.
            distributed.client._set_global_client(self._client)
            # The event the worker logs when it hands a task a client, from the worker as it would be.
            self.log_event("worker-get-client", {"client": self._client.id, "timeout": timeout})
        return self._client

    @property
    def client(self) -> Client:
        return self._get_client()

    @property
    def loop(self) -> Any:
        return self.client.loop

    def rpc(self, address: str) -> Any:
        return self.client.rpc(address)

    def log_event(self, topic: str | list[str], msg: Any) -> None:
        # The scheduler adds the sender to events a worker logs; a client's it leaves as they are.
        if isinstance(msg, dict) and topic != self.address:
            msg = {**msg, "worker": self.address}
        self.client.log_event(topic, msg)

    def handle_stimulus(self, *events: Any) -> None:
        # secede() hands this a SecedeEvent through loop.add_callback: we are on the client's loop.
        from distributed.worker_state_machine import SecedeEvent

        for event in events:
            if isinstance(event, SecedeEvent):
                message = asyncio.ensure_future(self._secede(event.compute_duration, event.stimulus_id))
                self._sending.add(message)  # asyncio keeps only a weak reference to a running task
                message.add_done_callback(self._sending.discard)

    async def _secede(self, compute_duration: float, stimulus_id: str) -> None:
        try:
            handler = getattr(self.client.rpc(self.address), SECEDE_OP)
            await handler(token=self.token, compute_duration=compute_duration, stimulus_id=stimulus_id)
        except Exception:  # the worker is gone or closing: there is no slot to give back then
            pass

    def close(self) -> None:
        client: Any = self._client
        self._client = None
        if client is not None:
            try:
                client.close(timeout=_CLOSE_TIMEOUT)
            except Exception:  # the scheduler went away: the connection dies with the child anyway
                pass


class _ChildPool:
    """``thread_state.executor`` in a child: what distributed's ``secede``/``rejoin`` touch of it."""

    def __init__(self) -> None:
        self._threads = {threading.current_thread()}
        self._rejoin_lock = threading.Lock()
        self._rejoin_list: list[tuple[threading.Thread, threading.Event]] = []

    def _adjust_thread_count(self) -> None:
        pass  # the worker's executor lends the slot when the secede message reaches it

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        # rejoin() queues itself, then submits a no-op to get a thread to let it in. A child has no
        # pool to wait for: it keeps the slot the worker lent it until the task ends.
        with self._rejoin_lock:
            waiting, self._rejoin_list[:] = list(self._rejoin_list), []
        for thread, event in waiting:
            self._threads.add(thread)
            event.set()


class _NoWorker:
    """Stands in for distributed's ``_worker_cvar`` in a child; see the module docstring."""

    def __init__(self, stand_in: _TaskWorker) -> None:
        self.stand_in = stand_in

    def get(self, *default: Any) -> Any:
        caller: FrameType | None = sys._getframe(1)
        if caller is not None and caller.f_code.co_name == "get_worker":
            caller = caller.f_back
        if caller is None:
            self._refuse()
        if _under_get_scheduler(caller):
            # A .compute() in the task, looking for a cluster to run on: "no worker here" in the
            # words dask.base understands, so that it computes locally, in this child, as it does in
            # any process without a client.
            raise ValueError(f"no worker in this forked child of the worker at {self.stand_in.address}")
        module = str(caller.f_globals.get("__name__", ""))
        if (module, caller.f_code.co_name) in _GIVEN_THE_STAND_IN:
            return self.stand_in
        if _is_distributed(module):
            raise ValueError(f"no worker in this forked child of the worker at {self.stand_in.address}")
        self._refuse()

    def _refuse(self) -> NoReturn:
        raise WorkerNotAvailable(
            f"get_worker() cannot work in this task: ForkIsolation runs it in a forked child of the worker at "
            f"{self.stand_in.address}, a copy of the worker's memory without its event loop, data or thread "
            "pool. get_client(), worker_client(), secede() and distributed's Lock, Queue, Variable, Event, "
            "Semaphore and actors work here, through a client of the task's own, and "
            "dask_forkmap.worker_info() gives the worker's address, name, threads and resources. Pass the "
            "task anything else it needs of the worker as arguments, or run this task in the worker process "
            "with dask.annotate(executor='in-process')."
        )

    def set(self, value: Any) -> NoReturn:
        self._refuse()

    def reset(self, token: Any) -> None:
        pass


def _under_get_scheduler(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "get_scheduler" and frame.f_globals.get("__name__") == "dask.base":
            return True
        frame = frame.f_back
    return False


def _is_distributed(module: str) -> bool:
    return (module == "distributed" or module.startswith("distributed.")) and ".tests" not in module


# The child's one stand-in, for detach() at the end of the task.
_stand_in: _TaskWorker | None = None


def attach(access: TaskAccess) -> None:
    """In the child, before the task runs: point distributed's helpers at the task's own client."""
    global _stand_in
    _note_dead_loops()
    _renew_thread_machinery()
    stand_in = _stand_in = _TaskWorker(access)
    distributed.worker._worker_cvar = _NoWorker(stand_in)  # type: ignore[assignment]
    # What the worker sets for a task on its thread pool (worker_client() secedes only when it is
    # there), and what the pool itself sets, in a thread-local of its own.
    task_state = distributed.worker.thread_state  # type: ignore[attr-defined]
    task_state.start_time = time.time()
    task_state.key = access.key
    pool_state = distributed.threadpoolexecutor.thread_state
    pool_state.executor = _ChildPool()
    pool_state.proceed = True
    # The worker's own client (made by an earlier get_client() in the worker) is a copy here, bound
    # to a loop nothing runs: forget it, and the configuration it set as the default client
    # (scheduler: dask.distributed), so that nothing in the task waits on it forever.
    if distributed.client._global_clients:
        distributed.client._global_clients.clear()
    if dask.config.get("scheduler", None) in ("dask.distributed", "distributed"):
        dask.config.config.pop("scheduler", None)
    _rebind_passed_objects()
    _guard_sync(access.facts.info.address)


def _renew_thread_machinery() -> None:
    # distributed's module-level helpers whose threads or locks belong to the worker: the one offload
    # thread (messages over distributed.comm.offload are (de)serialized there; the child's copy of
    # the pool still counts the worker's thread and would queue work forever), and the lock the thread
    # pool's secede() takes, which a worker thread may have held at the fork.
    from concurrent.futures import ThreadPoolExecutor

    if hasattr(distributed.utils, "_offload_executor"):
        distributed.utils._offload_executor = ThreadPoolExecutor(1, thread_name_prefix="Dask-Offload")
    distributed.threadpoolexecutor.threads_lock = threading.Lock()


def own_futures_in(value: Any) -> list[Any]:
    """Futures of the task's own client inside ``value``; looked for only if the task made one."""
    stand_in = _stand_in
    client = stand_in._client if stand_in is not None else None
    if client is None:
        return []
    from distributed import client as client_module

    found: list[Any] = client_module.futures_of(value)  # type: ignore[no-untyped-call]
    return [f for f in found if getattr(f, "_client", None) is client]


def detach() -> None:
    """In the child, after the task: close the task's client, if it made one."""
    global _stand_in
    stand_in, _stand_in = _stand_in, None
    if stand_in is not None:
        stand_in.close()


def _stale_client(client: Any) -> bool:
    return client is not None and _loop_thread_is_gone(client.loop)


def _rebind_passed_objects() -> None:
    # A Lock, Queue, ... passed to the task was rebuilt in the worker, on the worker's client or loop.
    # These checks, made in the child's own copy of each class, drop that binding before first use;
    # the object then binds itself again, as it would in any process, to the task's client.
    import distributed.actor
    import distributed.event
    import distributed.multi_lock
    import distributed.queues
    import distributed.semaphore
    import distributed.variable

    semaphore: Any = distributed.semaphore.Semaphore
    bind_late = semaphore._bind_late

    def _bind_late(self: Any) -> None:
        if self._loop is not None and _loop_thread_is_gone(self._loop):
            self._scheduler = self._loop = None
            bind_late(self)
            old = getattr(self, "refresh_callback", None)
            if old is not None and self._loop is not None:
                # Lease refreshes ran on the worker's loop: start them again on the task's.
                from tornado.ioloop import PeriodicCallback

                self.refresh_callback = PeriodicCallback(self._refresh_leases, callback_time=old.callback_time)
                self._loop.add_callback(self.refresh_callback.start)
            return
        bind_late(self)

    semaphore._bind_late = _bind_late

    classes: tuple[Any, ...] = (distributed.queues.Queue, distributed.variable.Variable, distributed.event.Event)
    for cls in classes:
        cls.client = property(_fresh_client(cls.client.fget))

    def _multi_lock_client(self: Any) -> Any:
        client = self.__dict__.get("client")
        if _stale_client(client):
            client = self.__dict__["client"] = _stand_in.client if _stand_in is not None else None
        return client

    def _set_multi_lock_client(self: Any, value: Any) -> None:
        self.__dict__["client"] = value

    multi_lock: Any = distributed.multi_lock.MultiLock
    multi_lock.client = property(_multi_lock_client, _set_multi_lock_client)

    actor: Any = distributed.actor.Actor
    try_bind = actor._try_bind_worker_client

    def _try_bind_worker_client(self: Any) -> None:
        if self._worker is not None and not isinstance(self._worker, _TaskWorker):
            self._worker = None
        if _stale_client(self._client):
            self._client = self._future = None
        try_bind(self)

    actor._try_bind_worker_client = _try_bind_worker_client


def _fresh_client(fget: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def client(self: Any) -> Any:
        if _stale_client(self._client):
            self._client = None
        return fget(self)

    return client


def _guard_sync(address: str) -> None:
    # Anything else bound to the worker's loop (a Future made on the worker's client, say) would
    # wait forever in distributed's sync() for a loop nothing runs: fail it at once instead.
    real_sync = distributed.utils.sync

    def sync(loop: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        if _loop_thread_is_gone(loop):
            raise WorkerNotAvailable(
                f"{getattr(func, '__qualname__', func)!r} needs the event loop of the worker at {address}, "
                "which does not run in this forked child. It belongs to an object bound to the worker's "
                "own client; make it in the task (through get_client()) or pass it by name, or run this "
                "task in the worker process with dask.annotate(executor='in-process')."
            )
        return real_sync(loop, func, *args, **kwargs)

    distributed.utils.sync = sync
    if getattr(distributed.client, "sync", None) is real_sync:
        distributed.client.sync = sync  # type: ignore[attr-defined]


# The event loops that were running in other threads of the worker at the fork: nothing runs them
# here. Kept as objects, not thread idents: the child's new threads may get the idents of the
# worker's threads back (glibc reuses their stacks).
_dead_loops: list[Any] = []


def _note_dead_loops() -> None:
    from tornado.ioloop import IOLoop

    me = threading.get_ident()
    registry: dict[Any, Any] = getattr(IOLoop, "_ioloop_for_asyncio", {})
    _dead_loops[:] = [loop for loop in list(registry.keys()) if getattr(loop, "_thread_id", None) not in (None, me)]


def _loop_thread_is_gone(loop: Any) -> bool:
    """Whether ``loop`` (a tornado IOLoop) ran in a thread of the worker that the fork left behind."""
    asyncio_loop = getattr(loop, "asyncio_loop", None)
    return asyncio_loop is not None and any(asyncio_loop is dead for dead in _dead_loops)
