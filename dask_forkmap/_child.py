"""What a forked child does, from the moment ``fork()`` returns 0 to ``os._exit``.

The child runs exactly one call (or one chunk of calls) and never returns into parent code:

1. Leave the parent's process group (so a timeout can kill the child and its grandchildren with one
   ``killpg``, and a terminal's Ctrl-C reaches only the parent, which then kills us).
2. Ask for SIGKILL when the forking thread dies (``PR_SET_PDEATHSIG``), then re-check the parent
   pid, since the parent may have died before the request took effect.
3. Close the parent's descriptors for other children's channels, so that no sibling holds them, and
   unblock the signals that the forking thread (one of our own) left to the parent's main thread.
4. Free the module-level locks of numpy and dask that another thread of the parent may have held at
   the fork, then reseed numpy's legacy global random state (stdlib ``random`` reseeds itself).
5. Point faulthandler at the result pipe: a fatal signal leaves its Python stack there, for the
   parent's :class:`~dask_forkmap.ChildCrashed`.
6. Apply the memory limit, then run the task with warnings recorded for the parent to re-emit.
7. Serialize the outcome, flush stdout/stderr (the task's prints are not lost), write the frame,
   and ``os._exit``: no atexit handler, finalizer or buffered write of the parent runs twice.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import os
import pickle
import signal
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, cast

from . import _transport
from ._errors import ForkMapError, MemoryLimitExceeded, ResultPicklingError, TaskError, TaskInterrupted

KIND_VALUE = 0  # payload: (value, warnings)
KIND_RAISED = 1  # payload: (type name, message, traceback text, pickled exception or None, warnings)
KIND_ERROR = 2  # payload: (ForkMapError, warnings)

# Exit codes of a child that could not even report (the parent maps them to ChildCrashed).
EXIT_OK = 0
EXIT_PARENT_GONE = 74
EXIT_INTERNAL = 75

_PR_SET_PDEATHSIG = 1

# Module-level locks that tasks take through everyday calls (np.random.*, dask.config.set, tokenize,
# dask.array.random) and that other threads of the parent take too: a distributed worker's event
# loop measures results with dask's sizeof, which samples with np.random.choice. A lock held at the
# fork stays held in the child, where its owner does not exist, and the task's first call blocks
# forever. The child sees memory as the parent's threads saw it at that instant; freeing the lock
# makes it see the locks as they will be once the owner is done.
_INHERITED_LOCKS = (
    ("numpy.random.mtrand", ("_rand", "_bit_generator", "lock")),
    ("dask.config", ("config_lock",)),
    ("dask.tokenize", ("tokenize_lock",)),
    ("dask.array.random", ("_cached_states_lock",)),
)
_MT_STATE_BYTES = 624 * 4  # the Mersenne Twister's state: 624 32-bit words

# The C function behind signal.pthread_sigmask, which returns the old mask as a set of ints. The
# public wrapper turns each signal in that set into a Signals member in Python: for the mask that
# fork_map and every child restore (all asynchronous signals), some 50 enum lookups per call, most
# of the Python calls a fork_map call made, and in a child every page they touched was copied.
try:
    _signal: Any = importlib.import_module("_signal")
except ImportError:  # pragma: no cover - not CPython
    _signal = signal


def _no_sigmask(how: int, mask: Iterable[int]) -> set[int]:  # pragma: no cover - Windows
    # Where there are no signal masks there is no fork either: no mask is ever held to restore.
    return set()


pthread_sigmask: Callable[[int, Iterable[int]], set[int]] = getattr(_signal, "pthread_sigmask", _no_sigmask)

try:  # Resolve prctl once, in the parent: the child then pays only for the call.
    import ctypes

    _prctl: Callable[..., int] | None = (
        ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    )
except (ImportError, OSError, AttributeError, TypeError):  # pragma: no cover - no ctypes, or no prctl
    # TypeError: CDLL(None) where dlopen(NULL) does not exist (Windows).
    _prctl = None


def main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    wfd: int,
    shm_fd: int,
    close_fds: Iterable[int],
    memory_limit: int | None,
    parent_pid: int,
    sigmask: Iterable[int] | None = None,
) -> NoReturn:
    """Run ``fn(*args, **kwargs)`` in this freshly forked child and report to the parent."""
    global _channel, _faulthandler_was_enabled
    code = EXIT_INTERNAL
    try:
        _become_independent(parent_pid, close_fds, sigmask)
        _channel = tuple(fd for fd in (wfd, shm_fd) if fd >= 0)
        _faulthandler_was_enabled = faulthandler.is_enabled()
        faulthandler.enable(file=wfd, all_threads=False, **_PYTHON_STACK_ONLY)
        kind, payload = _run(fn, args, kwargs, memory_limit)
        parts = _encode(kind, payload, shm_fd)
        _flush_stdio()
        _transport.write_all(wfd, parts)
        code = EXIT_OK
    except BrokenPipeError:
        code = EXIT_PARENT_GONE
    except BaseException:
        # Our own code failed (the task closed our pipe, say): leave the parent the reason, as text,
        # which it reports like a crash report.
        try:
            os.write(wfd, traceback.format_exc().encode("utf-8", "replace"))
        except BaseException:
            pass
    finally:
        os._exit(code)


# Since 3.14 faulthandler also dumps the C stack by default: an unsymbolised list of addresses that
# would bury the task's Python frames in every crash report (and walking it from a signal handler
# is less reliable than the Python dump). The crash stack stays the Python stack.
_PYTHON_STACK_ONLY: dict[str, bool] = {"c_stack": False} if sys.version_info >= (3, 14) else {}

# This child's result pipe and memory file, while it runs a task (set in main).
_channel: tuple[int, ...] = ()
_faulthandler_was_enabled = False


def forget_channel() -> None:
    """In a process the task forked: drop this child's result channel, which is not its own.

    Called from the at-fork hook in every process forked from a child (a helper the task forks, a
    ``multiprocessing`` worker). Holding the pipe, such a process would keep the parent from seeing
    it end, and faulthandler would dump its crash into the pipe as if it were the task's; holding
    the memory file, it could rewrite a result the parent has mapped. It gets faulthandler back as
    the parent had it, on stderr.
    """
    global _channel
    if not _channel:
        return
    fds, _channel = _channel, ()
    faulthandler.disable()
    if _faulthandler_was_enabled:
        try:
            faulthandler.enable(all_threads=True)
        except (RuntimeError, ValueError, OSError):  # pragma: no cover - no usable stderr
            pass
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _become_independent(parent_pid: int, close_fds: Iterable[int], sigmask: Iterable[int] | None) -> None:
    # Every object inherited from the parent leaves the cyclic collector's reach (O(1): the
    # generation lists are spliced). A collection in the child would otherwise run the finalizers
    # of the parent's uncollected garbage here (a tempfile's, say, deleting the parent's file) and,
    # as a full collection visits every inherited object, copy every page holding one: with a
    # million objects in the parent that turned a 40 ms task into 400 ms. The task's own objects
    # are collected as usual.
    gc.freeze()
    try:
        os.setpgid(0, 0)
    except OSError:  # pragma: no cover - the parent already did it
        pass
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(EXIT_PARENT_GONE)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if sigmask is not None:
        pthread_sigmask(signal.SIG_SETMASK, sigmask)
    _free_inherited_locks()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        # Only if numpy.random is already loaded: importing it costs more than the whole fork. A whole
        # Mersenne Twister state of fresh OS entropy (pos 624: twist before the next draw; no cached
        # gaussian) through the legacy set_state. seed() with an array runs a few ufuncs whose first
        # touch copies ~120 inherited pages in a fresh child: that made every fork_map call cost 1.5-2
        # ms more CPU than a bare fork, half the tiny task's cost when two threads fork at once.
        try:
            np_random.set_state(("MT19937", memoryview(os.urandom(_MT_STATE_BYTES)).cast("I"), 624))
        except ValueError:
            # The legacy functions run on another bit generator (numpy.random.set_bit_generator),
            # whose state has another shape; seed() seeds that one from 128 bits.
            np_random.seed(int.from_bytes(os.urandom(16), "little"))


def _free_inherited_locks() -> None:
    for module_name, path in _INHERITED_LOCKS:
        lock: Any = sys.modules.get(module_name)  # only if loaded: nothing else can hold its locks
        for name in path:
            lock = getattr(lock, name, None)
        # _at_fork_reinit (CPython's own, for the locks of threading and logging) resets the lock,
        # plain or reentrant, to a new unlocked one without touching the old one's owner.
        reinit = getattr(lock, "_at_fork_reinit", None)
        if reinit is not None:
            reinit()


def _run(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], memory_limit: int | None
) -> tuple[int, Any]:
    if memory_limit is not None:
        _limit_memory(memory_limit)
    failure: BaseException | None = None
    with warnings.catch_warnings(record=True) as log:
        _record_all_warnings()
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            failure = exc
    if memory_limit is not None:
        _unlimit_memory()  # pickling the result must not fail for the task's limit
    if failure is None:
        return KIND_VALUE, (value, _warnings(log))
    if isinstance(failure, MemoryError) and memory_limit is not None:
        err: ForkMapError = MemoryLimitExceeded(
            f"the task needed more than its memory limit of {memory_limit} bytes "
            f"({type(failure).__name__}: {failure}); raise the limit or make the task use less",
            pid=os.getpid(),
            limit=memory_limit,
            child_traceback=_format(failure),
        )
        return KIND_ERROR, (err, _warnings(log))
    if isinstance(failure, (KeyboardInterrupt, SystemExit)):
        code = failure.code if isinstance(failure, SystemExit) else None
        what = f"SystemExit({code!r})" if isinstance(failure, SystemExit) else "KeyboardInterrupt"
        err = TaskInterrupted(
            f"the task raised {what}; it ended the child, not this process",
            exc_type=type(failure).__name__,
            code=code,
            child_traceback=_format(failure),
        )
        return KIND_ERROR, (err, _warnings(log))
    return KIND_RAISED, _describe(failure, log)


@dataclass(slots=True)
class Several:
    """The values of several tasks one child ran (a batch, a map chunk), as a child function returns them.

    It never crosses the pipe itself: the parent receives the plain tuple ``(values, extra)``. What it
    adds is the labels: if a value cannot be pickled, the error names that task and its value's
    type, not the list that held it.
    """

    values: list[Any]
    labels: Sequence[str]
    extra: Any = None


def _encode(kind: int, payload: Any, shm_fd: int) -> list[Any]:
    value = payload[0] if kind == KIND_VALUE else None
    if isinstance(value, Several):
        payload = ((value.values, value.extra), payload[1])
        type_name = ", ".join(dict.fromkeys(_qualname(type(one)) for one in value.values))
    else:
        # The result's type travels outside the pickle, so the parent can name it if unpickling fails.
        type_name = _qualname(type(value)) if kind == KIND_VALUE else ""
    try:
        stream, buffers = _transport.dumps(payload)
    except BaseException as exc:
        # A result's __reduce__ is the task's code: whatever it raises (SystemExit included) is the
        # task's failure to return something picklable, not ours.
        if kind != KIND_VALUE:
            raise
        err = _pickling_error(value, exc)
        kind, type_name = KIND_ERROR, ""
        stream, buffers = _transport.dumps((err, payload[1]))
    return _transport.encode(kind, stream, buffers, shm_fd, type_name)


def _pickling_error(value: Any, exc: BaseException) -> ResultPicklingError:
    task: str | None = None
    if isinstance(value, Several):
        for label, one in zip(value.labels, value.values):  # noqa: B905 - labels may be fewer
            try:
                _transport.dumps(one)
            except BaseException as one_exc:
                task, value, exc = label, one, one_exc
                break
    type_name = _qualname(type(value))
    whose = f"the result of {task}" if task is not None else "the task's result"
    # An iterator the task did not consume (a user's own, or an endless itertools one, which no
    # longer pickles since CPython 3.14) says most by what it would have produced.
    hint = "what it yields, or what it is built from" if isinstance(value, Iterator) else "plain data"
    return ResultPicklingError(
        f"{whose} of type {type_name} cannot be pickled, so it cannot leave the child "
        f"({type(exc).__name__}: {exc}); return something picklable, for example {hint}",
        type_name=type_name,
        reason=f"{type(exc).__name__}: {exc}",
        task=task,
    )


def _describe(exc: BaseException, log: list[warnings.WarningMessage]) -> tuple[Any, ...]:
    """The task's exception, pickled only if the parent will be able to unpickle it."""
    text = _format(exc)
    return (_qualname(type(exc)), _message(exc), text, _pickled(exc), _warnings(log))


def _pickled(exc: BaseException) -> bytes | None:
    """``exc`` pickled, if the parent will be able to unpickle it; its traceback is dropped."""
    # The traceback is not pickled, but on CPython 3.11 its mere presence makes pickling an exception
    # raised by deep recursion fail again with RecursionError. Callers format it first.
    exc.__traceback__ = None
    try:
        stream, buffers = _transport.dumps(exc)
        if buffers:
            return None
        # Exceptions whose __init__ takes other arguments than args pickle fine but fail here.
        pickle.loads(stream)
    except BaseException:  # the exception's own __reduce__/__init__ is the task's code
        return None
    return stream


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as err:  # pragma: no cover - a broken __str__
        return f"<str() failed: {err!r}>"


def portable(exc: BaseException, text: str) -> BaseException:
    """``exc`` if it can be re-created in the parent, else a :class:`TaskError` standing in for it.

    For a layer whose child function catches the task's exception itself (``text``: its traceback).
    """
    if _pickled(exc) is not None:
        return exc
    return TaskError.standing_in_for(_qualname(type(exc)), _message(exc), text)


def _format(exc: BaseException) -> str:
    tb = exc.__traceback__
    # The first frame is _run's own; the report starts at the task.
    if tb is not None and tb.tb_frame.f_code is _run.__code__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _qualname(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in (None, "builtins") else f"{module}.{name}"


def _record_all_warnings() -> None:
    """Keep the parent's filters, but record every warning that would be shown.

    "error" and "ignore" filters act here as they would in process. Actions that show a warning only
    once (default, once, module) become "always": the parent re-emits each record through its own
    filters and registries, which remember what was already shown across all children.
    """
    once = {"default", "once", "module"}
    filters = cast("list[Any]", warnings.filters)
    filters[:] = [("always", *f[1:]) if f[0] in once else f for f in filters]
    mutated = getattr(warnings, "_filters_mutated", None) or getattr(warnings, "_filters_mutated_lock_held", None)
    if mutated is not None:
        mutated()


def _warnings(log: list[warnings.WarningMessage]) -> list[tuple[Any, ...]]:
    records = [(w.message, w.category, w.filename, w.lineno) for w in log]
    if records:
        try:
            pickle.dumps(records, protocol=5)
        except Exception:
            records = [(str(m), c if _picklable(c) else UserWarning, f, n) for m, c, f, n in records]
    return records


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True


def _limit_memory(limit: int) -> None:
    import resource

    # RLIMIT_AS counts every mapping, including those inherited copy-on-write from the parent: the
    # limit is what the task may add on top of the address space it starts with.
    # Only the soft limit: it is lifted again after the task, so that sending the result back does
    # not count against the task's allowance.
    current = _address_space_size()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = current + limit
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _unlimit_memory() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def statm() -> tuple[int, int, int] | None:
    """This process's address-space size, resident and shared memory in bytes; None without procfs."""
    # os-level calls rather than open(): a file object touches a few dozen more of the parent's pages,
    # and in a child each one is copied.
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # pragma: no cover - no procfs
        return None
    try:
        size, resident, shared = os.read(fd, 256).split()[:3]
    finally:
        os.close(fd)
    page = os.sysconf("SC_PAGE_SIZE")
    return int(size) * page, int(resident) * page, int(shared) * page


def _address_space_size() -> int:
    sizes = statm()
    if sizes is None:  # pragma: no cover - no procfs
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return sizes[0]


def _flush_stdio() -> None:
    seen = set()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is None or id(stream) in seen:
            continue
        seen.add(id(stream))
        try:
            stream.flush()
        except Exception:
            pass


# Helpers for the parent, kept here so the record format lives in one module.


def reemit_warnings(records: list[tuple[Any, ...]]) -> None:
    """Re-emit warnings recorded in a child through the parent's filters and registries."""
    modules: dict[str, tuple[str | None, dict[Any, Any] | None]] = {}
    for message, category, filename, lineno in records:
        if filename not in modules:
            modules[filename] = _module_of(filename)
        module, registry = modules[filename]
        warnings.warn_explicit(message, category, filename, lineno, module=module, registry=registry)


def _module_of(filename: str) -> tuple[str | None, dict[Any, Any] | None]:
    # warn() in process would use the warning site's module name and __warningregistry__; recover
    # them from the file name so "module" filters and once-per-location display behave the same.
    for name, mod in list(sys.modules.items()):
        if isinstance(mod, types.ModuleType) and getattr(mod, "__file__", None) == filename:
            return name, mod.__dict__.setdefault("__warningregistry__", {})
    return None, None
