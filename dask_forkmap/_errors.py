"""The errors dask_forkmap raises.

Every error the machinery itself raises derives from :class:`ForkMapError`. A task's own exception is
re-raised with its original type instead, with the child's traceback attached as ``__cause__``; only
when that is impossible (the exception cannot cross the process boundary) does it become a
:class:`TaskError`.

All errors pickle with their attributes (they cross process boundaries again under ``distributed``),
and every message says what happened and, where there is something to do, what to do.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChildCrashed",
    "ChildTraceback",
    "ExecutorShutdown",
    "ForkFailed",
    "ForkMapError",
    "ForkUnavailable",
    "MemoryLimitExceeded",
    "ResultPicklingError",
    "ResultUnpicklingError",
    "TaskError",
    "TaskInterrupted",
    "TaskTimeoutError",
]


def _restore(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    # The subclasses take their fields as keyword-only arguments, so the default exception pickling
    # (cls(*args)) cannot rebuild them. Calling the constructor (rather than __new__ alone) keeps
    # builtin bases such as OSError and MemoryError properly initialized.
    try:
        exc = cls(*args, **state)
    except TypeError:
        exc = cls(*args)
    exc.__dict__.update(state)
    return exc


class ForkMapError(Exception):
    """Base class of every error raised by dask_forkmap's own machinery."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (type(self), self.args, dict(self.__dict__))


class ChildTraceback(Exception):
    """The formatted traceback of an exception raised in a forked child.

    Attached as ``__cause__`` to exceptions re-raised in the parent, so the report shows where in the
    child the error happened, the way :mod:`concurrent.futures` reports worker tracebacks.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class ForkUnavailable(ForkMapError, RuntimeError):
    """This platform has no usable ``os.fork`` (Windows, WebAssembly)."""


class ForkFailed(ForkMapError, OSError):
    """``fork()`` itself failed, usually for lack of memory or process slots."""


class ExecutorShutdown(ForkMapError, RuntimeError):
    """Work was submitted to a :class:`~dask_forkmap.ForkExecutor` after ``shutdown()``."""


class ChildCrashed(ForkMapError):
    """The child ended without sending a result: a fatal signal, ``os._exit``, or the OOM killer.

    Attributes
    ----------
    pid : int
        The child's process id.
    exitcode : int or None
        As in :mod:`multiprocessing`: the exit code, or minus the signal number; None if unknown.
    signal : str or None
        Name of the fatal signal (``"SIGSEGV"``), or None if the child exited.
    crash_stack : str or None
        The Python stack at the crash site, when a fatal signal hit the child inside Python code.
    task : str or None
        What was running, when the caller knows (a Dask key, a function name).
    """

    pid: int
    exitcode: int | None
    signal: str | None
    crash_stack: str | None
    task: str | None

    def __init__(
        self,
        message: str,
        *,
        pid: int,
        exitcode: int | None,
        signal: str | None,
        crash_stack: str | None = None,
        task: str | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.crash_stack = crash_stack
        self.task = task


class TaskTimeoutError(ForkMapError, TimeoutError):
    """The task ran longer than its timeout; its child's process group was killed."""

    pid: int
    timeout: float
    task: str | None

    def __init__(self, message: str, *, pid: int, timeout: float, task: str | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.timeout = timeout
        self.task = task


class MemoryLimitExceeded(ForkMapError, MemoryError):
    """The task tried to allocate more than its memory limit allowed."""

    pid: int
    limit: int
    child_traceback: str | None

    def __init__(self, message: str, *, pid: int, limit: int, child_traceback: str | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.limit = limit
        self.child_traceback = child_traceback


class ResultPicklingError(ForkMapError):
    """The task's result could not be pickled in the child, so it cannot be sent back."""

    type_name: str
    reason: str

    def __init__(self, message: str, *, type_name: str, reason: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.reason = reason


class ResultUnpicklingError(ForkMapError):
    """The child sent a result that the parent could not unpickle."""

    type_name: str | None
    reason: str

    def __init__(self, message: str, *, type_name: str | None, reason: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.reason = reason


class TaskError(ForkMapError):
    """The task raised an exception that could not be re-created in the parent.

    Raised instead of the original when the exception cannot be pickled, or when unpickling it
    fails (typically a class whose ``__init__`` needs arguments that ``args`` does not hold).
    """

    type_name: str
    message: str
    child_traceback: str

    def __init__(self, text: str, *, type_name: str, message: str, child_traceback: str) -> None:
        super().__init__(text)
        self.type_name = type_name
        self.message = message
        self.child_traceback = child_traceback


class TaskInterrupted(ForkMapError):
    """The task raised ``KeyboardInterrupt`` or ``SystemExit``.

    They end the child, never the parent: the parent gets this error instead.
    """

    exc_type: str
    code: Any
    child_traceback: str

    def __init__(self, message: str, *, exc_type: str, code: Any, child_traceback: str) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.code = code
        self.child_traceback = child_traceback
