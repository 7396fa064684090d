"""The crash table: every way a task can fail, run through every layer.

Each layer's test module (``tests/core/test_crash_table.py``, ``tests/scheduler/test_scheduler_crash_table.py``,
``tests/distributed/test_dist_crash_table.py``) runs every row of :data:`CASES` its own way and checks
the same things with :func:`check`: the error's type, its fields, its message, that it names the
task, and that it survives pickling. Each then checks that the layer carries on.

The task functions live here, at module level, so that distributed's workers import them by name.
A row's limits are given separately from its function, because each layer attaches them its own
way (``with_limits`` on the function, or the layer's arguments).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dask_forkmap import (
    ChildCrashed,
    ForkMapError,
    MemoryLimitExceeded,
    ResultPicklingError,
    ResultUnpicklingError,
    TaskError,
    TaskInterrupted,
    TaskTimeoutError,
)

MiB = 1024 * 1024


def segfault() -> None:
    ctypes.string_at(0)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def exit_3() -> None:
    os._exit(3)


def raise_memory_error() -> None:
    raise MemoryError("simulated: no memory left")


def allocate_512_mib() -> int:
    return len(bytearray(512 * MiB))


def sleep_60() -> None:
    time.sleep(60)


def return_lock() -> threading.Lock:
    return threading.Lock()


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise HoldsALock("carries a lock")


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def raise_system_exit() -> None:
    sys.exit(4)


def raise_value_error() -> None:
    raise ValueError("bad value 17")


def _exit_now(code: int) -> None:
    raise SystemExit(code)


class ExitsWhenPickled:
    """A result whose own ``__reduce__`` raises ``SystemExit`` (user code, in the child)."""

    def __reduce__(self) -> Any:
        raise SystemExit(5)


class ExitsWhenUnpickled:
    """A result that pickles fine, and whose unpickling runs ``SystemExit`` in the receiving process."""

    def __reduce__(self) -> Any:
        return _exit_now, (6,)


def return_exits_when_pickled() -> ExitsWhenPickled:
    return ExitsWhenPickled()


def return_exits_when_unpickled() -> ExitsWhenUnpickled:
    return ExitsWhenUnpickled()


@dataclass(frozen=True)
class Case:
    fn: Callable[[], Any]
    error: type[BaseException]
    fields: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # a substring the message must contain
    limits: dict[str, Any] = field(default_factory=dict)  # for with_limits, or the layer's arguments
    names_task: bool = False  # the error has a ``task`` field naming what ran


CRASH = {"names_task": True}

CASES: dict[str, Case] = {
    "segfault": Case(segfault, ChildCrashed, {"signal": "SIGSEGV", "exitcode": -signal.SIGSEGV}, "SIGSEGV", **CRASH),
    "abort": Case(os.abort, ChildCrashed, {"signal": "SIGABRT", "exitcode": -signal.SIGABRT}, "SIGABRT", **CRASH),
    "os._exit(3)": Case(exit_3, ChildCrashed, {"signal": None, "exitcode": 3}, "exited with code 3", **CRASH),
    "SIGKILL of itself": Case(
        kill_self, ChildCrashed, {"signal": "SIGKILL", "exitcode": -signal.SIGKILL}, "SIGKILL", **CRASH
    ),
    "MemoryError": Case(raise_memory_error, MemoryError, {}, "simulated"),
    "memory limit": Case(
        allocate_512_mib,
        MemoryLimitExceeded,
        {"limit": 64 * MiB},
        "memory limit of 67108864 bytes",
        {"memory_limit": "64 MiB"},
        names_task=True,
    ),
    "timeout": Case(sleep_60, TaskTimeoutError, {"timeout": 0.5}, "0.5 s timeout", {"timeout": 0.5}, names_task=True),
    "unpicklable result": Case(
        return_lock, ResultPicklingError, {"type_name": "_thread.lock"}, "_thread.lock", names_task=True
    ),
    "result whose pickling raises SystemExit": Case(
        return_exits_when_pickled,
        ResultPicklingError,
        {"type_name": f"{__name__}.ExitsWhenPickled"},
        "SystemExit: 5",
        names_task=True,
    ),
    "result whose unpickling raises SystemExit": Case(
        return_exits_when_unpickled,
        ResultUnpicklingError,
        {"type_name": f"{__name__}.ExitsWhenUnpickled"},
        "SystemExit: 6",
    ),
    "unpicklable exception": Case(
        raise_unpicklable, TaskError, {"type_name": f"{__name__}.HoldsALock", "message": "carries a lock"}
    ),
    "KeyboardInterrupt in the task": Case(
        raise_keyboard_interrupt, TaskInterrupted, {"exc_type": "KeyboardInterrupt", "code": None}
    ),
    "SystemExit in the task": Case(
        raise_system_exit, TaskInterrupted, {"exc_type": "SystemExit", "code": 4}, "SystemExit(4)"
    ),
    "ordinary exception": Case(raise_value_error, ValueError, {}, "bad value 17"),
}

WAIT = 60.0  # the longest any single outcome may take to arrive


class FailsAt:
    """``fn`` for one item of a map or a batch, the item itself for the others."""

    def __init__(self, fn: Callable[[], Any], at: int) -> None:
        self.fn = fn
        self.at = at
        self.__name__ = f"fails_at_{at}"

    def __call__(self, item: int) -> Any:
        if item == self.at:
            return self.fn()
        return item


def check(case: Case, err: BaseException, task: str | None = None, *, several: bool = False) -> None:
    """Assert what every layer must give for ``case``.

    ``task``: what the error must name, if known. ``several``: the child ran several tasks (a map
    chunk, a batch), whose values arrive in one pickle: an unpickling error then names every type in it.
    """
    assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
    if case.error not in (MemoryError,):
        assert type(err) is case.error, f"{type(err).__name__}: {err}"
    for name, expected in case.fields.items():
        if several and isinstance(err, ResultUnpicklingError) and name == "type_name":
            assert expected in err.type_name.split(", "), err.type_name
            continue
        assert getattr(err, name) == expected, (name, getattr(err, name))
    assert case.message in str(err), str(err)
    if isinstance(err, ChildCrashed):
        assert err.pid != os.getpid()
        assert f"(pid {err.pid})" in str(err)
    if case.names_task and task is not None:
        assert err.task == task, (err.task, task)
        assert task in str(err), str(err)
    if isinstance(err, ForkMapError):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err)
        assert str(again) == str(err)
        for name in case.fields:
            assert getattr(again, name) == getattr(err, name)
