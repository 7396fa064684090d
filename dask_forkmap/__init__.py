"""Run Python work in copy-on-write ``os.fork()`` children and get only the result back.

Public names live here; the modules behind them are private.
"""

from __future__ import annotations

from ._core import fork_map
from ._errors import (
    ChildCrashed,
    ChildTraceback,
    ExecutorShutdown,
    ForkFailed,
    ForkMapError,
    ForkUnavailable,
    MemoryLimitExceeded,
    ResultPicklingError,
    ResultUnpicklingError,
    TaskError,
    TaskInterrupted,
    TaskTimeoutError,
)
from ._executor import ForkExecutor
from ._limits import Limited, Limits, with_limits
from ._scheduler import forkmap_get

__all__ = [
    "ChildCrashed",
    "ChildTraceback",
    "ExecutorShutdown",
    "ForkExecutor",
    "ForkFailed",
    "ForkMapError",
    "ForkUnavailable",
    "Limited",
    "Limits",
    "MemoryLimitExceeded",
    "ResultPicklingError",
    "ResultUnpicklingError",
    "TaskError",
    "TaskInterrupted",
    "TaskTimeoutError",
    "fork_map",
    "forkmap_get",
    "with_limits",
]

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("dask_forkmap")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
