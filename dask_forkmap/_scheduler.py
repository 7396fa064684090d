"""``forkmap_get``: a Dask scheduler that runs graph tasks in copy-on-write forked children.

Data flow of one ``compute``::

    scheduler thread (dask.local.get_async)     _Run                       slot threads / children
    ---------------------------------------     ----                       -----------------------
    fire ready task ---- submit(key) -------->  parent task? run it here,
                                                  future done at once
                                                else: pending (LIFO)
                                                dispatch a batch --------> ForkExecutor slot forks;
    queue.get() <--- one future per task <----  per-task results <-------- child runs the batch,
                                                                           returns values + timings

Why it is shaped this way:

* ``get_async`` keeps dask's ordering, callbacks (ProgressBar, Profiler), ``dask.config`` keys and
  error handling. It is called with ``chunksize=1`` and a window of ``num_workers * chunksize``
  tasks, so every task gets its own future (dependents and callbacks fire as soon as *it* is done)
  while batching happens here, where the costs are known: a child takes as many pending tasks as
  fit in ``batch-duration`` or in a few fork round trips (both measured as the compute runs), at
  most ``chunksize``, and at most its share of what is pending (guided scheduling), see
  ``_Run._fill``. Tasks not yet measured go alone. Dask's own ``chunksize`` batches blindly: four
  ready tasks on two workers may all go to one process.
* Inputs are passed as live objects (``dumps``/``loads`` are identities): the child reads them
  copy-on-write, nothing is pickled on the way in.
* Children are forked by the ``ForkExecutor``'s long-lived slot threads, never by the scheduler
  thread, which may hold locks the children would need.
* Whatever must happen in the parent's memory (``da.store`` into a numpy array) runs in the parent,
  even inside a fused task: the fused subgraph is split, the child computes what the store needs
  and the parent runs the store.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import struct
import sys
import time
import types
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import dask
from dask._task_spec import (
    Alias,
    DataNode,
    GraphNode,
    NestedContainer,
    Task,
    TaskRef,
    _execute_subgraph,
    execute_graph,
)
from dask.core import literal
from dask.local import get_async
from dask.utils import key_split, parse_timedelta

from . import _config, _core, _placement
from ._child import Several
from ._core import Job
from ._errors import ForkMapError
from ._executor import ForkExecutor, available_cpus
from ._limits import ANNOTATION, NO_LIMITS, Limits, check_workers, resolve

__all__ = ["forkmap_get"]

# Task.__call__ and _run_batch only lead into a task: crash stacks end at the task's own frame.
_core.register_wrappers(sys.modules["dask._task_spec"], sys.modules[__name__])

_NAME = "forkmap"
_AUTO_MAX_CHUNK = 256  # ``chunksize: auto``: most tasks per child
_COST_MULTIPLE = 8  # ``chunksize: auto``: a batch may hold this many fork round trips of work
_MARK = struct.Struct("q")
_SPARE_PER_SLOT = 1  # tasks waiting in _Run.pending per slot beyond a full batch

# The result of one task as ``get_async`` expects it: (key, payload, failed).
_Outcome = tuple[Any, Any, bool]


class _Failure:
    """Stands in for the traceback ``get_async`` hands back to ``raise_exception``.

    ``get_async`` only passes ``(exc, tb)`` through; carrying the key here lets ``_Run._raise`` name
    the task and re-run it locally without any other bookkeeping in ``get_async``.
    """

    __slots__ = ("key", "tb")

    def __init__(self, key: Any, tb: Any) -> None:
        self.key = key
        self.tb = tb


class _Options:
    """Scheduler settings resolved once per compute (arguments over ``dask.config``)."""

    def __init__(
        self,
        num_workers: int | None,
        chunksize: int | str | None,
        timeout: float | None,
        memory_limit: int | str | None,
        inline: bool | None,
    ) -> None:
        if num_workers is None:
            num_workers = dask.config.get("num_workers", None) or available_cpus()
        self.num_workers = check_workers(num_workers, "num_workers")
        if chunksize is None:
            chunksize = _config.get("scheduler.chunksize")
        # -1 is dask's "divide the ready tasks evenly", which the guided batching already does; it
        # is never passed on (get_async(chunksize=-1) divides by zero when nothing is ready).
        self.auto = chunksize in ("auto", -1)
        if self.auto:
            self.chunksize = _AUTO_MAX_CHUNK
        elif isinstance(chunksize, int) and not isinstance(chunksize, bool) and chunksize >= 1:
            self.chunksize = chunksize
        else:
            raise ValueError(f"chunksize must be 'auto', -1 or a positive int, not {chunksize!r}")
        self.batch_duration = parse_timedelta(_config.get("scheduler.batch-duration"), default="s") or 0.0
        # The layer's own limits; resolve() adds the task's and the configuration's.
        self.limits = Limits(timeout=timeout, memory_limit=memory_limit)
        self.inline = _config.get("scheduler.inline") if inline is None else inline
        self.inline_functions = _placement.Names(_config.get("scheduler.inline-functions"))
        self.parent_functions = _placement.Names(_config.get("scheduler.parent-functions"))


class _Pending:
    """A task waiting for a child."""

    __slots__ = ("alone", "data", "future", "key", "limits", "split", "task")

    def __init__(
        self,
        key: Any,
        task: GraphNode,
        data: dict[Any, Any],
        limits: Limits,
        alone: bool,
        future: Future[list[_Outcome]],
    ) -> None:
        self.key = key
        self.task = task
        self.data = data
        self.limits = limits  # resolved: with_limits, annotation, forkmap_get's arguments, config
        self.alone = alone  # never batched: limits of its own, or a timeout
        self.future = future
        self.split: tuple[frozenset[Any], frozenset[Any]] | None = None  # see _Run._split


def _is_container(task: Task) -> bool:
    # A big container reaches us as a plain Task calling what a NestedContainer calls.
    return isinstance(task, NestedContainer) or task.func is NestedContainer.to_container


def _calls(args: Sequence[Any]) -> bool:
    """Whether computing these task arguments calls anything beyond assembling containers."""
    return any(isinstance(a, Task) and (not _is_container(a) or _calls(a.args)) for a in args)


def _materialized(value: Any) -> Any:
    """A lazy iterator a task returned (``map``, ``filter``, a generator), as a list.

    A bag partition function may return ``map(f, part)``: pickled as such, ``f`` would run wherever
    the value is next iterated (in the parent, by the inline ``finalize``). Consuming it
    here keeps the work, and any crash, in the task's own child; a generator could not be pickled
    at all. Only the built-in and itertools iterators, and not the endless ones: consuming a file
    or a user's iterator could change what the task means.
    """
    if (
        isinstance(value, Iterator)
        and (isinstance(value, types.GeneratorType) or type(value).__module__ in ("builtins", "itertools"))
        and not isinstance(value, _ENDLESS)
    ):
        return list(value)
    return value


_ENDLESS = (itertools.count, itertools.cycle, itertools.repeat)


def _run_batch(batch: list[tuple[GraphNode, dict[Any, Any]]], mark: mmap.mmap | None) -> Several:
    """In the child: run the tasks; the parent receives their values, and their durations and our pid.

    ``mark`` (shared with the parent) holds the index of the running task, so that the parent can
    name the task when the child crashes or raises mid-batch.
    """
    values = []
    durations = []
    for i, (task, data) in enumerate(batch):
        if mark is not None:
            _MARK.pack_into(mark, 0, i)
        start = time.perf_counter()
        values.append(_materialized(task(data)))
        durations.append(time.perf_counter() - start)
    return Several(values, [str(task.key) for task, _ in batch], (durations, os.getpid()))


def _resolve(arg: Any, data: Mapping[Any, Any]) -> Any:
    if isinstance(arg, TaskRef):
        return data[arg.key]
    if isinstance(arg, GraphNode):
        return arg({k: data[k] for k in arg.dependencies})
    return arg


def _subgraph(task: Task, keys: Any, data: Mapping[Any, Any], computed: Mapping[Any, Any]) -> dict[Any, GraphNode]:
    """The nodes ``keys`` of a fused task's inner graph, with its inputs and ``computed`` as data."""
    inner, _, inkeys, *deps = task.args
    graph: dict[Any, GraphNode] = {k: inner[k] for k in keys}
    for k, dep in zip(inkeys, deps):  # noqa: B905 - _execute_subgraph's own pairing
        graph[k] = DataNode(None, _resolve(dep, data))
    for k, v in computed.items():
        graph[k] = DataNode(None, v)
    return graph


def _run_child_part(task: Task, parent: frozenset[Any], needed: frozenset[Any], data: dict[Any, Any]) -> dict[Any, Any]:
    """In the child: the part of a fused task that its parent-only calls depend on."""
    inner, _, inkeys, *_ = task.args
    keys = [k for k in inner if k not in parent and k not in inkeys]
    cache = execute_graph(_subgraph(task, keys, data, {}), keys=needed)
    return {k: cache[k] for k in needed}


def _run_parent_part(task: Task, parent: frozenset[Any], computed: dict[Any, Any], data: dict[Any, Any]) -> Any:
    """In the parent: the parent-only calls of a fused task and whatever follows them."""
    outkey = task.args[1]
    return execute_graph(_subgraph(task, parent, data, computed), keys=[outkey])[outkey]


class _Run:
    """The state of one ``forkmap_get`` call: what is pending, running and in flight."""

    def __init__(self, options: _Options, annotations: Mapping[str, Mapping[Any, Any]], rerun: bool) -> None:
        self.options = options
        self.rerun = rerun
        self.annotations = annotations.get(ANNOTATION, {})
        self.executor = ForkExecutor(options.num_workers, thread_name_prefix="dask-forkmap-scheduler")
        # Re-entrant: a child may finish before add_done_callback, which then runs _done (and
        # _dispatch) at once, on the thread that is dispatching.
        self.lock = _core.SignalSafeLock()
        self.pending: deque[_Pending] = deque()
        self.running = 0
        self.inflight: dict[Any, _Pending] = {}  # forked tasks not yet done, for rerun and naming
        self.durations: dict[str, float] = {}  # key prefix -> recent mean task duration
        self.fork_cost = 0.0  # recent mean of a child's round trip minus the work it did
        self.pid = os.getpid()
        self.stores: list[Any] = []  # shuffle stores made here, removed when the compute ends

    # -- submit: called by get_async on the scheduler thread ------------------------------------

    def submit(self, fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> Future[list[_Outcome]]:
        # get_async runs with chunksize=1: exactly one (key, (task, data), dumps, loads, get_id,
        # pack_exception) per call.
        ((key, (task, data), *_),) = args
        future: Future[list[_Outcome]] = Future()
        annotation = self.annotations.get(key)
        try:
            own = _placement.own_limits(task)
            limits = resolve(own, annotation=annotation, key=key, layer=self.options.limits)
        except (TypeError, ValueError) as exc:  # a bad annotation fails its task, named
            future.set_result([(key, (exc, _Failure(key, exc.__traceback__)), True)])
            return future
        store = _placement.shared_store(task)
        if store is not None:
            future.set_result([self._make_store(key, store)])
            return future
        if self._in_parent(task, annotation):
            outcome = self._run_here(key, task, data)
            if not outcome[2] and type(outcome[1][0]).__module__.startswith("partd."):
                self.stores.append(outcome[1][0])  # a shuffle store (parent-functions): ours to remove
            future.set_result([outcome])
            return future
        alone = own is not NO_LIMITS or isinstance(annotation, Mapping) or limits.timeout is not None
        item = _Pending(key, task, data, limits, alone, future)
        if isinstance(task, Task) and task.func is _execute_subgraph:
            item.split = self._split(task)
            if item.split is not None and not item.split[1]:  # nothing for a child to compute first
                future.set_result([self._run_here(key, task, data)])
                return future
        with self.lock:
            self.inflight[key] = item
            self.pending.append(item)
            self._dispatch()
        return future

    def _in_parent(self, task: GraphNode, annotation: Any) -> bool:
        if annotation is False:
            return True
        if isinstance(task, (Alias, DataNode)):
            return self.options.inline and annotation is None
        if not isinstance(task, Task):
            return False
        if isinstance(task.func, literal) and not task.args and not task.kwargs:
            # delayed(obj, traverse=False) holding dask collections: a legacy (literal(obj),) task
            # that only returns obj: literal data too.
            return self.options.inline and annotation is None
        if task.func is not _execute_subgraph and self.options.parent_functions.called_by(task):
            return True
        if not self.options.inline or annotation is not None:
            return False
        if _is_container(task):
            # Assembling a list/tuple/dict of results: the very objects, no copy through a pipe.
            return not _calls(task.args)
        return task.func in self.options.inline_functions and not _calls((*task.args, *task.kwargs.values()))

    def _run_here(self, key: Any, task: GraphNode, data: dict[Any, Any]) -> _Outcome:
        try:
            return key, (task(data), self.pid), False
        except Exception as exc:
            return key, (exc, _Failure(key, exc.__traceback__)), True

    def _make_store(self, key: Any, factory: Callable[[], Any]) -> _Outcome:
        """Make a shuffle store here, unbuffered, for the children to write into (see _placement)."""
        try:
            store = factory()
        except Exception as exc:
            return key, (exc, _Failure(key, exc.__traceback__)), True
        self.stores.append(store)
        return key, (store, self.pid), False

    def _split(self, task: Task) -> tuple[frozenset[Any], frozenset[Any]] | None:
        """For a fused task calling parent-only functions: the inner keys that run in the parent
        (those calls and everything downstream of them) and the inner keys they need from the
        child. None if it calls none."""
        inner, _, inkeys, *_ = task.args
        parent = {k for k, node in inner.items() if isinstance(node, Task) and self._calls_parent_only(node)}
        if not parent:
            return None
        changed = True
        while changed:
            changed = False
            for k, node in inner.items():
                if k not in parent and node.dependencies & parent:
                    parent.add(k)
                    changed = True
        needed = {dep for k in parent for dep in inner[k].dependencies if dep not in parent and dep not in inkeys}
        return frozenset(parent), frozenset(needed)

    def _calls_parent_only(self, node: Task) -> bool:
        # blockwise nests subgraphs in subgraphs: a nested one with such a call runs in the parent
        return self.options.parent_functions.called_by(node)

    # -- batching and forking ------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Fork batches while slots are free. Called with ``self.lock`` held."""
        options = self.options
        while self.pending and self.running < options.num_workers:
            batch = [self.pending.pop()]  # most recent first, as get_async's own ready stack
            first = batch[0]
            if first.split is None and not first.alone:
                self._fill(batch)
            self.running += 1
            self._fork(batch)

    def _fill(self, batch: list[_Pending]) -> None:
        """Add pending tasks to ``batch``, whose first task is already in it.

        Guided: a batch takes at most its share of what is pending, so that the other slots get
        work too. With ``chunksize: auto`` the batch is also bounded by the measured work of its
        tasks: up to ``batch-duration`` or ``_COST_MULTIPLE`` fork round trips, whichever is more,
        so that forking costs at most about a ninth of the time. Near the end of a compute the
        shares shrink, but never below one fork round trip of work: a smaller batch would cost
        more in forking than it gains in parallelism.
        """
        options = self.options
        share = math.ceil((len(self.pending) + 1) / options.num_workers)  # + 1: batch[0]
        # auto: the share is enforced with the work below, which may take a small tail whole
        room = options.chunksize if options.auto else min(options.chunksize, share)
        limit = max(options.batch_duration, _COST_MULTIPLE * self.fork_cost)
        work = self.durations.get(key_split(batch[0].key), math.inf)
        while len(batch) < room and self.pending:
            nxt = self.pending[-1]
            if nxt.split is not None or nxt.alone:
                break
            if options.auto:
                work += self.durations.get(key_split(nxt.key), math.inf)  # not measured yet: alone
                if work > limit or (len(batch) >= share and work > self.fork_cost):
                    break
            batch.append(self.pending.pop())

    def _fork(self, batch: list[_Pending]) -> None:
        first = batch[0]
        if first.split is not None:
            parent, needed = first.split
            fn: Callable[..., Any] = _run_child_part
            args: tuple[Any, ...] = (first.task, parent, needed, first.data)
            mark = None
        else:
            fn = _run_batch
            mark = mmap.mmap(-1, _MARK.size) if len(batch) > 1 else None
            args = ([(item.task, item.data) for item in batch], mark)
        name = str(first.key) if len(batch) == 1 else _batch_name(first.key, len(batch))
        started = time.perf_counter()
        try:
            child = self.executor.submit_job(Job(fn, args, None, first.limits, name))
        except BaseException as exc:
            self.running -= 1
            for item in batch:
                self._fail(item, exc)
            return
        child.add_done_callback(lambda f: self._done(f, batch, mark, started))

    def _done(self, child: Future[Any], batch: list[_Pending], mark: mmap.mmap | None, started: float) -> None:
        """On a slot thread: hand each task's outcome to get_async and refill the slots."""
        if child.cancelled():
            return
        try:
            self._deliver(child, batch, mark, started)
        except BaseException as exc:  # a bug here must fail the compute, not leave it waiting
            for item in batch:
                if not item.future.done():
                    self._fail(item, exc)
        finally:
            if mark is not None:
                mark.close()
            with self.lock:
                self.running -= 1
                self._dispatch()

    def _deliver(self, child: Future[Any], batch: list[_Pending], mark: mmap.mmap | None, started: float) -> None:
        exc = child.exception()
        if exc is not None:
            # The task whose value could not be pickled names itself; otherwise the one running when
            # the child failed (the mark), which for an unpicklable batch is as good as any.
            named = next((item for item in batch if str(item.key) == getattr(exc, "task", None)), None)
            failed = named or (batch[_MARK.unpack_from(mark)[0]] if mark is not None else batch[0])
            self._fail(failed, _name_task(exc, failed.key, batch[0].key, len(batch)))
        elif batch[0].split is not None:
            self._finish_split(batch[0], child.result())
        else:
            values, (durations, pid) = child.result()
            # What forking cost this child: its round trip less the work it did (see _fill).
            cost = time.perf_counter() - started - sum(durations)
            self.fork_cost = cost if not self.fork_cost else 0.8 * self.fork_cost + 0.2 * cost
            for item, value, duration in zip(batch, values, durations):  # noqa: B905 - same length
                self._record(item.key, duration)
                self._complete(item, [(item.key, (value, pid), False)])

    def _finish_split(self, item: _Pending, computed: dict[Any, Any]) -> None:
        assert item.split is not None
        assert isinstance(item.task, Task)
        try:
            value = _run_parent_part(item.task, item.split[0], computed, item.data)
        except Exception as exc:
            self._fail(item, exc)
            return
        self._complete(item, [(item.key, (value, self.pid), False)])

    def _record(self, key: Any, duration: float) -> None:
        prefix = key_split(key)
        old = self.durations.get(prefix)
        self.durations[prefix] = duration if old is None else 0.8 * old + 0.2 * duration

    def _complete(self, item: _Pending, outcome: list[_Outcome]) -> None:
        self.inflight.pop(item.key, None)
        item.future.set_result(outcome)

    def _fail(self, item: _Pending, exc: BaseException) -> None:
        # Only the failing task's future is completed: get_async raises on it, and the other tasks
        # of the batch stay pending until shutdown kills what is left.
        item.future.set_result([(item.key, (exc, _Failure(item.key, exc.__traceback__)), True)])

    # -- errors --------------------------------------------------------------------------------

    def pack_exception(self, exc: BaseException, dumps: Any) -> Any:  # pragma: no cover - unused
        return exc, _Failure(None, exc.__traceback__)

    def raise_exception(self, exc: BaseException, failure: Any) -> None:
        item = self.inflight.get(getattr(failure, "key", None))
        if self.rerun and item is not None and not isinstance(exc, ForkMapError):
            # Debugging aid, as in dask: re-run the task in this process so that its traceback and
            # a post-mortem debugger are local. Only for a task that raised a Python exception in
            # its child; a task that crashed, timed out or hit its memory limit is never re-run
            # here, where the same crash would take the parent down.
            item.task(item.data)
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note("(re-running the task in the parent did not raise; it failed only in its child)")
        tb = getattr(failure, "tb", None)
        raise exc.with_traceback(tb)

    def close(self, failed: bool) -> None:
        # On failure (KeyboardInterrupt included) every child still running is killed and reaped
        # before compute raises. On success none is running; reaping finishes in the background.
        with self.lock:
            self.pending.clear()
        self.executor.shutdown(wait=failed, cancel_futures=True)
        for store in self.stores:  # every child that wrote into them has delivered, or is dead
            _remove_store(store)


def _remove_store(store: Any) -> None:
    """Remove a partd store's folder (its File is at the bottom of the wrappers) and forget it."""
    import shutil

    part = store
    while not hasattr(part, "path") and hasattr(part, "partd"):
        part = part.partd
    path = getattr(part, "path", None)
    if not isinstance(path, str):
        return
    shutil.rmtree(path, ignore_errors=True)
    try:
        import partd.file

        partd.file.cleanup_files.remove(path)
    except (ImportError, ValueError):
        pass


def _batch_name(first_key: Any, batch_size: int) -> str:
    return f"{first_key} (one of a batch of {batch_size} tasks)"


def _name_task(exc: BaseException, key: Any, first_key: Any, batch_size: int) -> BaseException:
    """``exc`` from a batch child, naming the task that failed rather than the batch."""
    if batch_size == 1 or not isinstance(exc, ForkMapError) or not hasattr(exc, "task"):
        return exc
    batch_name = _batch_name(first_key, batch_size)
    exc.args = tuple(a.replace(batch_name, str(key)) if isinstance(a, str) else a for a in exc.args)
    exc.task = str(key)
    return exc


def _annotations(dsk: Any) -> Mapping[str, Mapping[Any, Any]]:
    """The graph's annotations, ``{name: {key: value}}``, before ``get_async`` drops them."""
    if not isinstance(dsk, Mapping) and hasattr(dsk, "__dask_annotations__"):
        return dsk.__dask_annotations__() or {}
    # Older dask (before expressions reached get functions) hands over a HighLevelGraph: the
    # annotations sit on its layers, a value or a callable of the key.
    layers = getattr(dsk, "layers", None)
    if not isinstance(layers, Mapping):
        return {}
    ours: dict[Any, Any] = {}
    for layer in layers.values():
        value = (getattr(layer, "annotations", None) or {}).get(ANNOTATION, _UNSET)
        if value is _UNSET:
            continue
        for key in layer:
            ours[key] = value(key) if callable(value) else value
    return {ANNOTATION: ours} if ours else {}


_UNSET = object()


def forkmap_get(
    dsk: Any,
    keys: Sequence[Any] | Any,
    *,
    num_workers: int | None = None,
    chunksize: int | str | None = None,
    timeout: float | None = None,
    memory_limit: int | str | None = None,
    inline: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Compute a Dask graph with every task in a copy-on-write forked child.

    Use it as ``dask.compute(x, scheduler=forkmap_get)`` or, once ``dask_forkmap`` is imported,
    ``scheduler="forkmap"``. A task reads its inputs from the parent's memory (nothing is pickled on
    the way in) and only its result comes back; whatever it mutates, leaks or crashes stays in the
    child.

    Parameters
    ----------
    dsk : Mapping or dask graph
        The graph, as dask passes it to a get function.
    keys : key or nested list of keys
        The keys to compute.
    num_workers : int, optional
        Most children alive at once; default ``dask.config`` ``num_workers``, else the CPU count.
    chunksize : int, 'auto' or -1, optional
        Most tasks one child runs (``forkmap.scheduler.chunksize``, default ``1``: every task in a
        child of its own). Batching is an opt-in that shares a child between tasks: ``'auto'``
        batches tasks measured to be tiny, up to ``forkmap.scheduler.batch-duration`` of work per
        child; an int ``n`` batches up to ``n`` tasks.
    timeout : float, optional
        Per-task wall-clock limit in seconds (see :class:`~dask_forkmap.Limits`); default
        ``forkmap.timeout``. A task with a timeout gets a child of its own.
    memory_limit : int or str, optional
        Per-task memory limit, e.g. ``"2 GiB"``; default ``forkmap.memory-limit``. It applies to the
        child, i.e. to the batch of tasks the child runs when batching is on. ``with_limits`` on a
        task and its ``forkmap`` annotation take precedence over both limits.
    inline : bool, optional
        Run trivial tasks (aliases, literal data, list/tuple/dict assembly, getitem) in the parent;
        default ``forkmap.scheduler.inline``.
    **kwargs
        ``rerun_exceptions_locally`` (default: the dask config key of that name) re-runs a task that
        raised an ordinary exception in the parent, never one that crashed its child. The rest is
        passed to :func:`dask.local.get_async`: ``callbacks``, ``cache``, ... A ``pool`` is ignored.

    Returns
    -------
    object
        The computed values, shaped as ``keys``.

    Raises
    ------
    Exception
        A task's own exception, with its original type and the child's traceback as ``__cause__``.
    ChildCrashed, TaskTimeoutError, MemoryLimitExceeded
        A child died, timed out or ran out of its memory; the error names the task's key.
    ForkMapError
        Any other error of the fork machinery (see :ref:`failures`). Before ``compute`` raises,
        every other child of the computation is killed with its process group and reaped.

    Notes
    -----
    A task's ``dask.annotate(forkmap=...)`` annotation overrides the limits and the inlining for that
    task: ``False`` runs it in the parent, ``True`` forks it even if it is trivial, a dict such as
    ``{"timeout": 30, "memory_limit": "2 GiB"}`` sets its limits. dask's low-level fusion drops
    annotations; see :doc:`scheduler`.

    Examples
    --------
    >>> import dask
    >>> from dask_forkmap import forkmap_get
    >>> total = dask.delayed(sum)([1, 2, 3])
    >>> dask.compute(total, scheduler=forkmap_get)
    (6,)
    >>> total.compute(scheduler="forkmap", num_workers=2)
    6
    """
    options = _Options(num_workers, chunksize, timeout, memory_limit, inline)
    annotations = _annotations(dsk)
    kwargs.pop("pool", None)  # a thread pool is meaningless here (``dask.config`` may carry one)
    rerun = kwargs.pop("rerun_exceptions_locally", None)
    if rerun is None:
        rerun = dask.config.get("rerun_exceptions_locally", False)
    run = _Run(options, annotations, bool(rerun))
    failed = True
    try:
        result = get_async(  # type: ignore[no-untyped-call]
            run.submit,
            # A window of tasks in flight, so that there is something to batch (see _Run._dispatch),
            # plus one waiting task per slot: a slot that finishes forks the next task itself, at
            # once, instead of waiting for the scheduler thread to wake up and submit it.
            options.num_workers * (options.chunksize + _SPARE_PER_SLOT),
            dsk,
            keys,
            chunksize=1,
            rerun_exceptions_locally=False,  # done by raise_exception, which never re-runs a crash
            raise_exception=run.raise_exception,
            pack_exception=run.pack_exception,
            **kwargs,
        )
        failed = False
    finally:
        run.close(failed)
    return result


def _register() -> None:
    # Dask has no public registry of scheduler names: ``scheduler="forkmap"`` resolves through this
    # private dict. tests/scheduler/test_scheduler.py::test_named_scheduler fails if dask changes it.
    from dask.base import named_schedulers

    named_schedulers.setdefault(_NAME, forkmap_get)


_register()
