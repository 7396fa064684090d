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
    """Base class of every error raised by dask_forkmap's own machinery.

    A task's own exception is never wrapped in it: that is re-raised with its original type. Catch
    ``ForkMapError`` to handle every failure of the fork machinery (a crash, a timeout, a result
    that cannot travel) in one place.

    Notes
    -----
    Every subclass pickles with its attributes, so these errors can cross a process boundary again,
    as they do under ``distributed``.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (type(self), self.args, dict(self.__dict__))


class ChildTraceback(Exception):
    """The formatted traceback of an exception raised in a forked child.

    Attached as ``__cause__`` to exceptions re-raised in the parent, so the report shows where in the
    child the error happened, the way :mod:`concurrent.futures` reports worker tracebacks. It is not
    raised on its own, and it is not a :class:`ForkMapError`.

    Attributes
    ----------
    text : str
        The traceback as the child formatted it.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class ForkUnavailable(ForkMapError, RuntimeError):
    """This platform has no usable ``os.fork`` (Windows, WebAssembly).

    Importing dask_forkmap works everywhere; running anything in a child raises this error instead:
    :func:`~dask_forkmap.fork_map`, creating a :class:`~dask_forkmap.ForkExecutor`, computing with
    :func:`~dask_forkmap.forkmap_get`, and setting up :class:`~dask_forkmap.ForkIsolation` on a
    worker. Use dask's threads or processes scheduler on such a platform.
    """


class ForkFailed(ForkMapError, OSError):
    """``fork()`` itself failed, usually for lack of memory or process slots.

    Nothing ran: the task was never started.

    Attributes
    ----------
    errno : int
        The error number ``fork()`` failed with (``EAGAIN``, ``ENOMEM``), as on any :class:`OSError`.
    """


class ExecutorShutdown(ForkMapError, RuntimeError):
    """Work was submitted to a :class:`~dask_forkmap.ForkExecutor` after ``shutdown()``.

    An executor that was shut down (explicitly, or by leaving its ``with`` block) takes no more
    work; create a new one.
    """


class ChildCrashed(ForkMapError):
    """The child ended without sending a result: a fatal signal, ``os._exit``, or the OOM killer.

    The message names the signal or exit code and its usual cause; when the memory limit may be the
    reason (C code that aborts on a failed allocation), it says so.

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

    Examples
    --------
    >>> import os
    >>> from dask_forkmap import ChildCrashed, fork_map
    >>> try:
    ...     fork_map(os._exit, 3)
    ... except ChildCrashed as exc:
    ...     print(exc.exitcode, exc.signal)
    3 None
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
    """The task ran longer than its timeout; its child's process group was killed.

    Also a :class:`TimeoutError`. The timeout is counted from the fork; grandchildren the task
    started are killed with the child, unless they left its process group.

    Attributes
    ----------
    pid : int
        The child's process id.
    timeout : float
        The timeout that expired, in seconds.
    task : str or None
        What was running, when the caller knows (a Dask key, a function name).
    """

    pid: int
    timeout: float
    task: str | None

    def __init__(self, message: str, *, pid: int, timeout: float, task: str | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.timeout = timeout
        self.task = task


class MemoryLimitExceeded(ForkMapError, MemoryError):
    """The task tried to allocate more than its memory limit allowed.

    Also a :class:`MemoryError`. Raised when the task's allocation failed with a
    :class:`MemoryError` in the child; C code that aborts instead shows up as :class:`ChildCrashed`.

    Attributes
    ----------
    pid : int
        The child's process id.
    limit : int
        The limit in bytes: what the task could allocate on top of what it inherited.
    child_traceback : str or None
        Where the allocation failed, formatted in the child.
    task : str or None
        What was running, when the caller knows (a Dask key, a function name).
    """

    pid: int
    limit: int
    child_traceback: str | None
    task: str | None

    def __init__(
        self, message: str, *, pid: int, limit: int, child_traceback: str | None = None, task: str | None = None
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.limit = limit
        self.child_traceback = child_traceback
        self.task = task


class ResultPicklingError(ForkMapError):
    """The task's result could not be pickled in the child, so it cannot be sent back.

    Plain :mod:`pickle` was tried first, then cloudpickle. Return plain data instead (a lock, an open
    file or a generator cannot leave the child).

    Attributes
    ----------
    type_name : str
        The qualified name of the result's type.
    reason : str
        The pickling error, as ``"TypeName: message"``.
    task : str or None
        Whose result it was, when the caller knows (a Dask key, a function name).
    """

    type_name: str
    reason: str
    task: str | None

    def __init__(self, message: str, *, type_name: str, reason: str, task: str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.reason = reason
        self.task = task


class ResultUnpicklingError(ForkMapError):
    """The child sent a result that the parent could not unpickle.

    Typically the result's class was defined or imported only in the child, or its ``__reduce__``
    fails here. Return types the parent can import. The message names the result's type.

    Attributes
    ----------
    type_name : str or None
        The qualified name of the result's type, e.g. ``"mymodule.Table"``, as the child sent it
        next to the pickle; None when what failed was not a returned value.
    reason : str
        The unpickling error, as ``"TypeName: message"``.
    """

    type_name: str | None
    reason: str

    def __init__(self, message: str, *, type_name: str | None, reason: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.reason = reason


class TaskError(ForkMapError):
    """The task raised an exception that could not be re-created in the parent.

    Raised instead of the original when the exception cannot be pickled, or when unpickling it
    fails (typically a class whose ``__init__`` needs arguments that ``args`` does not hold). Its
    ``__cause__`` is the child's traceback (:class:`ChildTraceback`).

    Attributes
    ----------
    type_name : str
        The qualified name of the task's exception class, e.g. ``"mymodule.ParseError"``.
    message : str
        ``str()`` of the task's exception.
    child_traceback : str
        The task's traceback, formatted in the child.
    """

    type_name: str
    message: str
    child_traceback: str

    def __init__(self, text: str, *, type_name: str, message: str, child_traceback: str) -> None:
        super().__init__(text)
        self.type_name = type_name
        self.message = message
        self.child_traceback = child_traceback

    @classmethod
    def standing_in_for(cls, type_name: str, message: str, child_traceback: str) -> TaskError:
        """The error that stands in for a task's exception of type ``type_name``, which cannot cross."""
        return cls(
            f"{type_name}: {message}\n(the task raised {type_name}, which could not be re-created in "
            "this process; its type and message are kept here and its traceback is the cause)",
            type_name=type_name,
            message=message,
            child_traceback=child_traceback,
        )


class TaskInterrupted(ForkMapError):
    """The task raised ``KeyboardInterrupt`` or ``SystemExit``.

    They end the child, never the parent: the parent gets this error instead. (A Ctrl-C in the
    parent while it waits is different: it kills the child and the ``KeyboardInterrupt`` propagates
    in the parent.)

    Attributes
    ----------
    exc_type : str
        ``"KeyboardInterrupt"`` or ``"SystemExit"``.
    code : object
        ``SystemExit.code`` (``None`` for ``KeyboardInterrupt``).
    child_traceback : str
        The task's traceback, formatted in the child.
    """

    exc_type: str
    code: Any
    child_traceback: str

    def __init__(self, message: str, *, exc_type: str, code: Any, child_traceback: str) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.code = code
        self.child_traceback = child_traceback
