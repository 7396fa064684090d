"""``ForkExecutor``: a :class:`concurrent.futures.Executor` that forks one child per task.

Data flow::

    submit() (any thread)          slot threads (at most max_workers)          children
    ---------------------          ----------------------------------          --------
    Future + _WorkItem --queue-->  take an item, spawn() ----------fork------>  run the task
                                   Child.collect(wake_fd) <--------frame-----  write the result
                                   set the future's result/exception

Slot threads are long-lived and do the forking themselves. That keeps forks away from the threads
that call ``submit`` (a Dask scheduler's loop, a distributed worker's event loop, which may hold locks
a child would need), and ties each child's ``PR_SET_PDEATHSIG`` to a thread that outlives it: the
kernel delivers that signal when the *forking thread* exits, not only when the process does.

A future stays PENDING while its child runs, so ``Future.cancel()`` succeeds on a running task: the
cancel callback wakes the slot through its wake pipe, and the slot kills and reaps the child.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from . import _core
from ._child import Several
from ._core import Job
from ._errors import ExecutorShutdown
from ._limits import Limited, Limits, check_callable, check_workers, split

__all__ = ["ForkExecutor"]

R = TypeVar("R")

_live_executors: weakref.WeakSet[ForkExecutor] = weakref.WeakSet()


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware where the platform tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS
        return os.cpu_count() or 1


class _WorkItem:
    __slots__ = ("future", "job")

    def __init__(self, future: Future[Any], job: Job) -> None:
        self.future = future
        self.job = job


class _Slot:
    """One slot thread and its wake pipe."""

    def __init__(self, executor: ForkExecutor, index: int) -> None:
        self.wake_r, self.wake_w = _core.open_pipe()
        self.thread = _core.QuietThread(
            target=_slot_loop,
            args=(weakref.ref(executor), executor._work, self),
            name=f"{executor._name}-{index}",
            daemon=True,
        )

    def wake(self) -> None:
        if self.wake_w < 0:  # closed: the slot has ended, and the number may belong to someone else
            return
        try:
            os.write(self.wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def drain(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        wake_r, wake_w = self.wake_r, self.wake_w
        self.wake_r = self.wake_w = -1
        _core.close_ours(wake_r, wake_w)


def _slot_loop(executor_ref: weakref.ref[ForkExecutor], work: queue.SimpleQueue[_WorkItem | None], slot: _Slot) -> None:
    try:
        while True:
            executor = executor_ref()
            if executor is not None and executor._leave_or_wait(slot):
                return
            del executor
            item = work.get()
            executor = executor_ref()
            if executor is not None:
                executor._got_work()
            del executor
            if item is None:
                work.put(None)  # let the other slots see it too
                return
            _run(item, slot)
            del item
    finally:
        slot.close()


def _run(item: _WorkItem, slot: _Slot) -> None:
    future = item.future
    if future.cancelled():
        return
    # No drain() here: a wake-up left over from an earlier task (cancelled as it finished) costs one
    # extra pass of the loop below, which is cheaper than a read() on every task.
    try:
        child = _core.spawn(item.job)
    except BaseException as exc:
        if future.set_running_or_notify_cancel():
            future.set_exception(exc)
        return
    future.add_done_callback(lambda f: slot.wake() if f.cancelled() else None)
    while True:
        try:
            value = child.collect(wake_fd=slot.wake_r)
        except _core.Woken:
            slot.drain()
            if future.cancelled():
                child.kill()
                return
            continue
        except BaseException as exc:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
            return
        if future.set_running_or_notify_cancel():
            future.set_result(value)
        return


class _RunChunk:
    """What one child of ``map(fn, ..., chunksize=n)`` runs: ``fn`` over consecutive items."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__qualname__ = f"map({_core._describe_task(fn)})"  # names the child in errors

    def __call__(self, part: tuple[int, list[tuple[Any, ...]]]) -> Several:
        # In the child. Labelled, so that a value that cannot be pickled is named by its position.
        start, chunk = part
        values = [self.fn(*args) for args in chunk]
        return Several(values, [f"item {start + i} of {self.__qualname__}" for i in range(len(values))])


def _chunks(iterables: tuple[Iterable[Any], ...], size: int) -> Iterator[tuple[int, list[tuple[Any, ...]]]]:
    it = zip(*iterables)  # noqa: B905 - map() stops at the shortest iterable
    start = 0
    while chunk := list(itertools.islice(it, size)):
        yield start, chunk
        start += len(chunk)


def _values(results: Iterator[tuple[list[R], Any]]) -> Iterator[R]:
    for values, _ in results:
        yield from values


class ForkExecutor(Executor):
    """An executor that runs every task in its own forked child.

    Inputs are never pickled: each child reads them from the parent's memory, copy-on-write. Only
    results come back. A child that crashes fails its own future with
    :class:`~dask_forkmap.ChildCrashed`; the executor and its other tasks carry on.

    Parameters
    ----------
    max_workers : int, optional
        Most children alive at once; default: the CPUs this process may use.
    timeout : float, optional
        Default wall-clock limit of every task, in seconds (see :class:`~dask_forkmap.Limits`).
    memory_limit : int or str, optional
        Default memory limit of every task, e.g. ``"2 GiB"``. ``with_limits`` on a task overrides
        both defaults; unset values fall back to ``dask.config``.
    thread_name_prefix : str, default "dask-forkmap"
        Name of the slot threads that fork and wait for the children.

    Raises
    ------
    ForkUnavailable
        The platform has no ``os.fork``.
    TypeError, ValueError
        ``max_workers`` is not a positive int, or a limit is invalid.

    See Also
    --------
    fork_map : one call, one child, no executor.

    Notes
    -----
    ``Future.cancel()`` also works on a running task: it kills the child and its process group.
    Futures therefore stay pending while their child runs, so ``Future.running()`` says nothing.
    ``shutdown(cancel_futures=True)`` cancels everything that is left, queued or running, and the
    context manager does so when its block raises (a ``KeyboardInterrupt`` included).

    Children are forked by the executor's own long-lived slot threads, never by the thread that calls
    ``submit``. It is safe to submit from many threads.

    Works as a Dask scheduler: ``dask.compute(x, scheduler=ForkExecutor(2))``.

    Examples
    --------
    >>> from dask_forkmap import ForkExecutor
    >>> with ForkExecutor(max_workers=2) as ex:
    ...     print(ex.submit(pow, 2, 10).result())
    ...     print(list(ex.map(abs, [-1, -2, -3], chunksize=2)))
    1024
    [1, 2, 3]
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        timeout: float | None = None,
        memory_limit: int | str | None = None,
        thread_name_prefix: str = "dask-forkmap",
    ) -> None:
        _core._check_platform()
        self._max_workers = check_workers(available_cpus() if max_workers is None else max_workers, "max_workers")
        self._limits = Limits(timeout=timeout, memory_limit=memory_limit)
        self._name = thread_name_prefix
        self._work: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._slots: list[_Slot] = []
        self._slot_numbers = itertools.count()
        self._lent = 0  # slots lent beyond max_workers, one per running child whose task seceded
        # Slots waiting for work, counted exactly (under _lock): a slot that finishes one task and
        # takes the next already queued was never idle, and must not make submit() skip a new slot.
        self._idle = 0
        self._lock = _core.SignalSafeLock()
        self._shutdown = False
        self._inflight: weakref.WeakSet[Future[Any]] = weakref.WeakSet()
        # An executor dropped without shutdown(): once it is collected, its slots finish the work
        # already queued (whose futures someone may still hold), then end and close their pipes.
        self._finalizer = weakref.finalize(self, _abandoned, self._work, self._slots, self._name)
        _live_executors.add(self)

    @property
    def max_workers(self) -> int:
        """Most children alive at once.

        Returns
        -------
        int
        """
        return self._max_workers

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        """Run ``fn(*args, **kwargs)`` in a forked child.

        Parameters
        ----------
        fn : callable
            The task. Wrap it with :func:`~dask_forkmap.with_limits` for limits of its own.
        *args, **kwargs
            Passed to ``fn``, all of them.

        Returns
        -------
        concurrent.futures.Future
            Resolves to ``fn``'s result, or to the error :func:`~dask_forkmap.fork_map` would raise.
            Cancelling it kills the child if it is already running.

        Raises
        ------
        ExecutorShutdown
            The executor was shut down.
        """
        return self.submit_job(Job.of(fn, args, kwargs, self._limits, "the function given to submit"))

    def submit_job(self, job: Job) -> Future[Any]:
        """Run one :class:`~dask_forkmap._core.Job` in a forked child, as it is.

        For the layers above (``forkmap_get``, ``ForkIsolation``), which resolve limits themselves
        (with the task's annotation and their own arguments) and name the work after a Dask key.
        The executor's own ``timeout``/``memory_limit`` do not apply to it.
        """
        with self._lock:
            if self._shutdown:
                raise ExecutorShutdown("cannot submit to a ForkExecutor after shutdown(); create a new one")
            future: Future[Any] = Future()
            self._inflight.add(future)
            self._work.put(_WorkItem(future, job))
            self._add_slot_if_needed()
        return future

    def _leave_or_wait(self, slot: _Slot) -> bool:
        """Between two tasks of ``slot``: end it if it is surplus (True), else count it waiting.

        A slot is surplus when more slots exist than may run: the one whose seceded child has just
        ended is, at once, since it returned the lent slot while finishing that task.
        """
        with self._lock:
            if len(self._slots) > self._max_workers + self._lent and slot in self._slots:
                self._slots.remove(slot)
                return True
            self._idle += 1
            return False

    def _got_work(self) -> None:
        with self._lock:
            self._idle -= 1

    def _add_slot_if_needed(self) -> None:
        # Under _lock. Queued items beyond the slots waiting for them need a slot each, up to the limit.
        if self._work.qsize() <= self._idle:
            return
        if len(self._slots) < self._max_workers + self._lent:
            slot = _Slot(self, next(self._slot_numbers))
            self._slots.append(slot)
            slot.thread.start()

    def _lend_slot(self) -> None:
        """Let one more child run at once: a running task seceded and no longer counts.

        For ``ForkIsolation``, whose worker hands a seceded task's slot to the next task, as it does
        with its thread pool. ``_return_slot`` gives it back when that task's child has ended.
        """
        with self._lock:
            self._lent += 1
            self._add_slot_if_needed()

    def _return_slot(self) -> None:
        with self._lock:
            self._lent -= 1

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[R]:
        """Like :meth:`concurrent.futures.Executor.map`, with ``chunksize`` calls in each child.

        Parameters
        ----------
        fn : callable
            Called once per item, as ``fn(*items)``.
        *iterables : iterable
            Consumed together, stopping at the shortest.
        timeout : float, optional
            The overall wait in seconds, as in :meth:`concurrent.futures.Executor.map`; not a limit
            of the tasks (use :func:`~dask_forkmap.with_limits` for that).
        chunksize : int, default 1
            Consecutive calls one child makes. Chunks amortize the fork over many small items; a
            limit set with :func:`~dask_forkmap.with_limits` applies to each chunk's child as a
            whole.

        Returns
        -------
        iterator
            The results, in order. An error is raised when iteration reaches its item.

        Raises
        ------
        ValueError
            ``chunksize`` is not a positive int.
        ExecutorShutdown
            The executor was shut down.
        """
        check_callable(fn, "the function given to map")
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, not {chunksize!r}")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        inner, limits = split(fn)
        run: Callable[..., Any] = Limited(_RunChunk(inner), limits)
        return _values(super().map(run, _chunks(iterables, chunksize), timeout=timeout))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally wait, and optionally cancel what is left.

        Parameters
        ----------
        wait : bool, default True
            Return only once every child is gone, reaped included.
        cancel_futures : bool, default False
            Cancel queued tasks and kill running children with their process groups.
        """
        with self._lock:
            self._shutdown = True
            slots = list(self._slots)
        self._finalizer.detach()
        if cancel_futures:
            for future in list(self._inflight):
                future.cancel()
        self._work.put(None)
        if wait:
            me = threading.current_thread()
            for slot in slots:
                # Not alive: ended, or its start() was interrupted (Ctrl-C in submit) before it
                # reported in; it then finds the sentinel and ends by itself. Not ourselves: a
                # done-callback running on a slot may shut the executor down.
                if slot.thread is not me and slot.thread.is_alive():
                    slot.thread.join()
            _core._reaper.wait()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # On an error (KeyboardInterrupt included) nothing that is left should outlive the block.
        self.shutdown(wait=True, cancel_futures=exc_type is not None)


def _abandoned(work: queue.SimpleQueue[_WorkItem | None], slots: list[_Slot], name: str) -> None:
    work.put(None)
    if slots:
        warnings.warn(
            f"a ForkExecutor ({name!r}) was collected without shutdown(); its slots end once the work "
            "already submitted is done. Use it as a context manager, or call shutdown()",
            ResourceWarning,
            stacklevel=2,
        )


@atexit.register
def _shutdown_at_exit() -> None:
    for executor in list(_live_executors):
        executor.shutdown(wait=True)
