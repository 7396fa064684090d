"""``ForkIsolation``: a ``distributed`` worker plugin that runs each task in a forked child of the worker.

How a task flows::

    Worker.execute (event loop)                ForkIsolatedExecutor               child
    ---------------------------                --------------------               -----
    executors[name] is ours, not a
    ThreadPoolExecutor, so it calls
    loop.run_in_executor(e, _run_task_simple,
                         run_spec, data, delay) --> submit(): resolve the task's limits,
                                                    ForkExecutor.submit_job() --fork--> _run_task_simple(...)
                                                                         <--frame---  the worker's msg dict
    ExecuteSuccessEvent / ExecuteFailureEvent  <--  the child's msg, or a task-erred
                                                    msg built here for a crash/timeout

Why it is shaped this way:

* The worker already knows how to run a task in an executor that is not a thread pool (it is how
  ``ProcessPoolExecutor`` support works): it submits ``_run_task_simple``, which returns the message
  the worker stores (result, ``nbytes``, ``type``, start/stop). Running that very function in the
  child keeps the worker's bookkeeping untouched, and start/stop measure the task, not the fork.
* Everything the machinery itself raises (a crash, a timeout) is turned into an ordinary task
  failure message here, in the worker: the scheduler then sees a failed task, applies ``retries=``,
  and never a dead worker, so there is no nanny restart and no ``KilledWorker``.
* Forks happen on :class:`~dask_forkmap.ForkExecutor`'s long-lived slot threads, never on the event
  loop thread, whose locks (the loop's, logging's, comms') a child could otherwise inherit held.
* The executor's futures stay pending while a child runs, so when the worker cancels ``execute`` (it
  does on close) the asyncio cancellation reaches the child and kills it.
* Tasks that need the live worker run in the worker process, as on a plain worker: those annotated
  ``forkmap=False``, and those calling a ``worker-functions`` entry (P2P shuffles and rechunks, whose
  state lives in the worker's shuffle extension). See ``_placement``.
* What an isolated task asks of the cluster (``get_client()``, ``worker_client()``, ``secede()``,
  Lock/Queue/... and actor handles) is served in the child by a client of the task's own; see
  ``_cluster``. A seceding child tells the worker through the ``SECEDE_OP`` handler, and the
  executor lends it a slot, as the worker's thread pool would.
* The plugin keeps no per-worker state: what it replaced lives on the executor it installed. One
  instance may be shared by several in-process workers (``LocalCluster(processes=False)``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any

import dask
import dask._task_spec
import distributed.worker
from distributed import Reschedule, WorkerPlugin
from distributed.core import error_message
from distributed.worker import _run_task, _run_task_simple

from . import _child, _cluster, _config, _core, _placement
from ._child import Several
from ._cluster import SECEDE_OP, TaskAccess, WorkerFacts, WorkerInfo, WorkerNotAvailable, worker_info
from ._core import Job
from ._errors import ForkMapError, MemoryLimitExceeded, ResultPicklingError
from ._executor import ForkExecutor
from ._limits import ANNOTATION, Limits, resolve

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["ForkIsolatedExecutor", "ForkIsolation", "WorkerInfo", "WorkerNotAvailable", "worker_info"]

# The worker's way into a task (Task.__call__, _run_task_simple, _run_in_child) says nothing about
# a crash: crash stacks end at the task's own frame.
_core.register_wrappers(dask._task_spec, distributed.worker, sys.modules[__name__])

# Tasks annotated with this executor run in the worker process even when every other task is isolated.
IN_PROCESS = "in-process"


def _setting(key: str) -> Any:
    # Through _config, which falls back to the shipped defaults: a Nanny hands its worker a snapshot
    # of its own dask.config, which may predate dask_forkmap's import.
    return _config.get(f"distributed.{key}")


class ForkIsolation(WorkerPlugin):
    """Run every task of every worker in a forked child of the worker.

    The child reads the task's inputs from the worker's memory copy-on-write and pipes only the
    result back; the worker stores it as usual. A task that segfaults, aborts, calls ``os._exit``
    or is OOM-killed fails alone with :class:`~dask_forkmap.ChildCrashed`: the worker keeps running,
    the nanny restarts nothing, and ``retries=`` applies as for any other failure.

    Parameters
    ----------
    executor : str
        Which worker executor becomes isolated. ``"default"`` isolates every task; the original
        thread pool stays reachable as ``dask.annotate(executor="in-process")`` for tasks that need
        the live worker. Any other name adds an executor of that name, and only tasks annotated
        with ``dask.annotate(executor=name)`` are isolated.
    timeout : float, optional
        Per-task wall-clock limit in seconds; ``None``: ``forkmap.timeout``. On expiry the child's
        process group is killed and the task fails with :class:`~dask_forkmap.TaskTimeoutError`.
    memory_limit : int, str or None
        New memory each task may allocate, e.g. ``"4 GiB"``. ``"auto"`` (the default) is
        ``forkmap.memory-limit`` if set, else the worker's ``memory_limit`` divided by its thread
        count, so that the children together stay within what the nanny allows the worker (whose
        memory monitor cannot see them). ``None``: ``forkmap.memory-limit`` (unlimited by default).

    Attributes
    ----------
    name : str
        ``"forkmap-isolation"``, or ``"forkmap-isolation-<executor>"`` for another executor: the
        name to pass to ``Client.unregister_worker_plugin``.
    idempotent : bool
        True: registering a plugin of the same name again is a no-op.

    Raises
    ------
    TypeError
        ``executor`` is not a non-empty str, or a limit has the wrong type.
    ValueError
        ``executor`` is a name the worker or the plugin reserves (``"in-process"``, ``"offload"``,
        ``"actor"``), or a limit is invalid.

    See Also
    --------
    dask_forkmap.preload : ``dask worker --preload dask_forkmap.preload`` installs the plugin
        configured by :meth:`from_config`.

    Notes
    -----
    Per-task overrides: ``dask.annotate(forkmap={"timeout": 600, "memory_limit": "8 GiB"})``, or a
    function wrapped with :func:`~dask_forkmap.with_limits`, which wins over the annotation.

    The plugin is idempotent under its ``name``: registering it again is a no-op. To change its
    options on a running cluster, unregister it first.

    Examples
    --------
    >>> client.register_plugin(ForkIsolation(timeout=300))  # doctest: +SKIP
    >>> cluster = LocalCluster(plugins={ForkIsolation()})  # doctest: +SKIP
    """

    idempotent = True

    def __init__(
        self,
        executor: str = "default",
        *,
        timeout: float | None = None,
        memory_limit: int | str | None = "auto",
    ) -> None:
        if not isinstance(executor, str) or not executor:
            raise TypeError(f"executor must be a non-empty str, not {executor!r}")
        if executor in (IN_PROCESS, "offload", "actor"):
            raise ValueError(f"executor {executor!r} is reserved by the worker or ForkIsolation; choose another name")
        # Validate where the plugin is made, where a mistake is cheapest to see; "auto" is per worker.
        Limits(timeout=timeout, memory_limit=None if memory_limit == "auto" else memory_limit)
        self.executor = executor
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.name = "forkmap-isolation" if executor == "default" else f"forkmap-isolation-{executor}"

    @classmethod
    def from_config(cls) -> ForkIsolation:
        """A plugin configured from ``forkmap.distributed.*`` (what the preload module installs).

        Returns
        -------
        ForkIsolation
            With ``executor``, ``timeout`` and ``memory_limit`` read from
            ``forkmap.distributed.executor``, ``.timeout`` and ``.memory-limit``.
        """
        return cls(_setting("executor"), timeout=_setting("timeout"), memory_limit=_setting("memory-limit"))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(executor={self.executor!r}, timeout={self.timeout!r}, "
            f"memory_limit={self.memory_limit!r})"
        )

    def _limits(self, worker: Worker) -> Limits:
        memory_limit = self.memory_limit
        if memory_limit == "auto":
            memory_limit = _config.get("memory-limit")
            worker_limit = worker.memory_manager.memory_limit
            if memory_limit is None and worker_limit:
                memory_limit = max(1, int(worker_limit) // max(1, worker.state.nthreads))
        return Limits(timeout=self.timeout, memory_limit=memory_limit)

    def setup(self, worker: Worker) -> None:
        """Put a ``ForkIsolatedExecutor`` in place of (or next to) the worker's executor.

        Called by the worker when the plugin is registered, and again when a worker joins or
        restarts.

        Parameters
        ----------
        worker : distributed.Worker
            The worker to isolate.

        Raises
        ------
        ValueError
            Another plugin already isolates that executor of this worker.
        ForkUnavailable
            The platform has no ``os.fork``.
        """
        current = worker.executors.get(self.executor)
        if isinstance(current, ForkIsolatedExecutor):
            raise ValueError(
                f"the worker's {self.executor!r} executor is already isolated by another plugin "
                f"({current.plugin_name!r}); unregister that one first"
            )
        fallback = current if current is not None else worker.executors["default"]
        isolated = ForkIsolatedExecutor(
            worker,
            self._limits(worker),
            replaced=current,
            fallback=fallback,
            plugin_name=self.name,
            oom_score_adj=_setting("oom-score-adj"),
        )
        if self.executor == "default" and IN_PROCESS not in worker.executors:
            worker.executors[IN_PROCESS] = fallback
            isolated.added_in_process = True
        worker.executors[self.executor] = isolated
        # A child whose task secedes (worker_client(), secede()) says so through this handler.
        worker.handlers.setdefault(SECEDE_OP, _secede_handler(weakref.ref(worker)))

    async def teardown(self, worker: Worker) -> None:
        """Restore the executor it replaced; kill and reap the children (their tasks are rescheduled).

        Called by the worker when the plugin is unregistered or the worker closes. It returns once
        every child is gone; a task cut short by unregistration runs again, in the worker process.

        Parameters
        ----------
        worker : distributed.Worker
            The worker to restore.
        """
        isolated = worker.executors.get(self.executor)
        if not isinstance(isolated, ForkIsolatedExecutor) or isolated.plugin_name != self.name:
            return
        if isolated.replaced is None:
            del worker.executors[self.executor]
        else:
            worker.executors[self.executor] = isolated.replaced
        if isolated.added_in_process and worker.executors.get(IN_PROCESS) is isolated.fallback:
            del worker.executors[IN_PROCESS]
        # Killing and reaping blocks until the children are gone: not on the event loop. A thread of its
        # own, not the loop's default executor, so that nothing outlives the worker.
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shutdown() -> None:
            try:
                isolated.shutdown()
            finally:
                loop.call_soon_threadsafe(_set_done, done)

        threading.Thread(target=shutdown, name="Dask-Fork-Isolation-teardown", daemon=True).start()
        await done


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Running:
    __slots__ = ("fork_future", "key", "outer", "seceded", "start", "time_delay")

    def __init__(self, outer: Future[Any], fork_future: Future[Any], key: Any, start: float, time_delay: float) -> None:
        self.outer = outer
        self.fork_future = fork_future
        self.key = key
        self.start = start
        self.time_delay = time_delay
        self.seceded = False


# Names a running task to its child, and the child's secede message back to it; unique in the process,
# so that the one handler of a worker finds the task whichever of its isolated executors runs it.
_tokens = itertools.count()


class ForkIsolatedExecutor(Executor):
    """The executor :class:`ForkIsolation` installs in a worker; not meant to be built by hand.

    Tasks (calls of distributed's ``_run_task_simple``) run in forked children, at most ``nthreads``
    at once. Anything else the worker submits (a disk benchmark, say) goes to ``fallback`` in process.
    Its class name must not contain "ThreadPoolExecutor": the worker checks the name to decide how to
    submit, and only the other path hands over a function that can run in another process.
    """

    def __init__(
        self,
        worker: Worker,
        limits: Limits,
        *,
        replaced: Executor | None,
        fallback: Executor,
        plugin_name: str,
        oom_score_adj: int | None = None,
    ) -> None:
        nthreads = worker.state.nthreads
        self.replaced = replaced
        self.fallback = fallback
        self.plugin_name = plugin_name
        self.added_in_process = False
        self.limits = limits
        self._worker = weakref.ref(worker)
        self._oom_score_adj = oom_score_adj
        # Its jobs come with resolved limits (see submit): the executor's own defaults stay unset.
        self._forks = ForkExecutor(nthreads, thread_name_prefix="Dask-Fork-Isolation")
        self._lock = _core.SignalSafeLock()
        self._running: dict[int, _Running] = {}
        self._facts: WorkerFacts | None = None
        self._closed = False
        self._worker_functions = _placement.Names(_setting("worker-functions"))

    @property
    def _max_workers(self) -> int:  # read by code that sizes work to an executor, as dask does
        return self._forks.max_workers

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run a task in a forked child; send anything else to the in-process fallback."""
        if fn is not _run_task_simple or kwargs:
            return self.fallback.submit(fn, *args, **kwargs)
        run_spec, data, time_delay = args
        key = getattr(run_spec, "key", None)
        worker = self._worker()
        annotation = _annotation(worker, key)
        if (
            worker is not None
            and key is not None
            and (annotation is False or self._worker_functions.called_by(run_spec))
        ):
            # This task runs in the worker itself, set up as the worker sets up tasks on its thread
            # pool, so that get_worker() & co. work in it: dask.annotate(forkmap=False), or a call
            # that needs the live worker (a P2P shuffle's transfer, barrier or unpack).
            call = functools.partial(
                _run_task,
                run_spec,
                data,
                worker.execution_state,
                key,
                worker.active_threads,
                worker.active_threads_lock,
                time_delay,
            )
            return self.fallback.submit(contextvars.copy_context().run, call)
        outer: Future[Any] = Future()
        start = time.time()
        try:
            # Resolved here, not by ForkExecutor, because the child needs the memory limit to tell a
            # task that hit it from one that raised MemoryError by itself.
            limits = resolve(_placement.own_limits(run_spec), annotation=annotation, key=key, layer=self.limits)
        except (TypeError, ValueError) as exc:  # a bad annotation fails its task, not the worker
            outer.set_result(_failure_msg(exc, start, time.time(), time_delay))
            return outer
        token = next(_tokens)
        with self._lock:
            if self._closed or worker is None:
                # A task that slipped in between teardown and the worker seeing the old executor again.
                outer.set_result(_reschedule_msg(start, time_delay))
                return outer
            if self._facts is None:  # the worker is running when it runs tasks: its address is known now
                self._facts = WorkerFacts(worker)
            access = TaskAccess(self._facts, key, token)
            inner = self._forks.submit_job(
                Job(
                    _run_in_child,
                    (run_spec, data, time_delay, access, self._oom_score_adj, limits.memory_limit),
                    None,
                    limits,
                    f"task {key!r}" if key is not None else None,
                )
            )
            self._running[token] = _Running(outer, inner, key, start, time_delay)
        # The worker cancels the asyncio side of `outer` when it closes; that reaches the child here.
        outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        inner.add_done_callback(lambda f: self._finish(token, f))
        return outer

    def secede(self, token: int, compute_duration: float, stimulus_id: str) -> bool:
        """A running task's child asked to secede: lend it a slot, as the worker's thread pool would.

        On the worker's event loop, from the child's message. Returns whether ``token`` is one of
        this executor's running tasks (the worker's own bookkeeping is then told too).
        """
        with self._lock:
            running = self._running.get(token)
            if running is None or running.seceded:
                return running is not None
            running.seceded = True
            self._forks._lend_slot()
        worker = self._worker()
        if worker is not None:
            from distributed.worker_state_machine import SecedeEvent

            worker.handle_stimulus(
                SecedeEvent(key=running.key, compute_duration=compute_duration, stimulus_id=stimulus_id)
            )
        return True

    def _finish(self, token: int, inner: Future[Any]) -> None:
        with self._lock:
            running = self._running.pop(token, None)
            if running is not None and running.seceded:
                self._forks._return_slot()
        if running is None or inner.cancelled():
            return
        outer = running.outer
        if not outer.set_running_or_notify_cancel():
            return
        try:
            exc = inner.exception()
            if exc is None:
                outer.set_result(_message(inner.result()))
                return
            # The child could not report (crash, timeout, unpicklable result): a failure of this task,
            # timed from submission, as the worker would time a task that raised.
            outer.set_result(_failure_msg(exc, running.start, time.time(), running.time_delay))
        except BaseException as err:
            # Never leave Worker.execute waiting on a future nobody will set; it fails the task.
            outer.set_exception(err)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = True) -> None:
        """Kill the children of running tasks, reschedule those tasks, and reap everything.

        A task cut short this way is not failed: it is handed back to the scheduler, which runs it
        again (on this worker with its restored executor, or elsewhere).
        """
        with self._lock:
            self._closed = True
            running = list(self._running.values())
            self._running.clear()
        now = time.time()
        for r in running:
            if r.outer.set_running_or_notify_cancel():
                r.outer.set_result(_reschedule_msg(now, r.time_delay))
            r.fork_future.cancel()
        self._forks.shutdown(wait=wait, cancel_futures=cancel_futures)


def _secede_handler(worker_ref: weakref.ref[Worker]) -> Callable[..., bool]:
    def dask_forkmap_secede(token: int, compute_duration: float, stimulus_id: str) -> bool:
        worker = worker_ref()
        if worker is None:
            return False
        return any(
            executor.secede(token, compute_duration, stimulus_id)
            for executor in list(worker.executors.values())
            if isinstance(executor, ForkIsolatedExecutor)
        )

    return dask_forkmap_secede


def _annotation(worker: Worker | None, key: Any) -> Any:
    """The task's ``forkmap`` annotation as the worker holds it; None if it has none."""
    ts = worker.state.tasks.get(key) if worker is not None and key is not None else None
    return (ts.annotations or {}).get(ANNOTATION) if ts is not None else None


def _failure_msg(exc: BaseException, start: float, stop: float, time_delay: float) -> dict[str, Any]:
    # The traceback would only show dask_forkmap's machinery; the message says what happened.
    msg: dict[str, Any] = dict(error_message(exc.with_traceback(None)))
    msg.update(
        op="task-erred",
        actual_exception=exc,
        start=start + time_delay,
        stop=stop + time_delay,
        thread=threading.get_ident(),
    )
    return msg


def _reschedule_msg(now: float, time_delay: float) -> dict[str, Any]:
    # Worker.execute turns a Reschedule "exception" into a RescheduleEvent, not a task failure.
    return _failure_msg(Reschedule(), now, now, time_delay)


# What runs in the child.


def _run_in_child(
    run_spec: Any,
    data: dict[Any, Any],
    time_delay: float,
    access: TaskAccess,
    oom_score_adj: int | None,
    memory_limit: int | None,
) -> Several:
    _cluster.attach(access)
    if oom_score_adj is not None:
        _raise_oom_score(oom_score_adj)
    task = f"task {getattr(run_spec, 'key', '?')!r}"  # as the worker-side errors name it
    try:
        msg: dict[str, Any] = dict(_run_task_simple(run_spec, data, time_delay))
        if msg["op"] == "task-finished" and (held := _cluster.own_futures_in(msg["result"])):
            msg = _futures_returned(msg, held, task)
    finally:
        # Before the result leaves: what the task submitted is released in order, not on a dropped comm.
        _cluster.detach()
    if msg["op"] == "task-erred":
        exc = msg["actual_exception"]
        replacement: BaseException | None = None
        if memory_limit is not None and isinstance(exc, MemoryError) and not isinstance(exc, ForkMapError):
            # _run_task_simple caught it before dask_forkmap's child code could tell what it was.
            replacement = MemoryLimitExceeded(
                f"{task} needed more than its memory limit of {memory_limit} bytes ({type(exc).__name__}: "
                f"{exc}); raise the limit (forkmap annotation, ForkIsolation's memory_limit) or make the "
                "task use less",
                pid=os.getpid(),
                limit=memory_limit,
                child_traceback=msg.get("traceback_text"),
                task=task,
            )
        else:
            # An exception that cannot be pickled: distributed would send a bare Exception(str); the
            # other layers raise a TaskError that keeps its type's name.
            portable = _child.portable(exc, msg.get("traceback_text") or "")
            replacement = portable if portable is not exc else None
        if replacement is not None:
            replaced = error_message(replacement)
            msg.update(exception=replaced["exception"], exception_text=replaced["exception_text"])
        # The error message is already made to cross processes; the raw exception may not be. The
        # worker only checks its type (Reschedule), which the round-tripped copy keeps.
        msg["actual_exception"] = _portable_exception(msg)
    # The result travels as Several's value, not inside the message: if it cannot be pickled, the
    # error then names its type, not the message's dict.
    return Several([msg.pop("result")] if "result" in msg else [], [task], msg)


def _futures_returned(msg: dict[str, Any], held: list[Any], task: str) -> dict[str, Any]:
    # The task's client closes with its child, and the scheduler then forgets what only it held: the
    # worker would store futures nobody can ever resolve. Fail the task, saying so, instead.
    result = msg["result"]
    exc = ResultPicklingError(
        f"the result of {task} holds {len(held)} Future(s) of the task's own client (the first is "
        f"{held[0].key!r}); ForkIsolation closes that client when the task ends, and the scheduler "
        "then releases them. Return their values instead (client.gather(futures)), or run this task "
        "in the worker process with dask.annotate(executor='in-process')",
        type_name=_child._qualname(type(result)),
        reason="it holds Futures of the task's own client",
        task=task,
    )
    failed = {k: v for k, v in msg.items() if k not in ("result", "nbytes", "type")}
    failed.update(error_message(exc), op="task-erred", actual_exception=exc)
    return failed


def _message(sent: tuple[list[Any], dict[str, Any]]) -> dict[str, Any]:
    """The worker's message from what ``_run_in_child``'s :class:`Several` became in transit."""
    values, msg = sent
    if values:
        msg["result"] = values[0]
    return msg


def _portable_exception(msg: Any) -> BaseException:
    import pickle

    exc = msg["exception"].data
    try:
        restored = pickle.loads(exc) if isinstance(exc, (bytes, bytearray)) else exc
    except Exception:
        restored = None
    if isinstance(restored, BaseException):
        return restored
    return Exception(msg.get("exception_text", "the task failed"))


def _raise_oom_score(adj: int) -> None:
    # Raising one's own oom_score_adj needs no privilege. Under memory pressure the kernel then kills a
    # task's child, whose death is a clean task failure, rather than the worker or the nanny.
    # os-level calls: a text file object would touch (and so copy) dozens of the worker's pages.
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, str(adj).encode())
    except OSError:
        pass
    finally:
        os.close(fd)
