"""Run Python work in copy-on-write ``os.fork()`` children and get only the result back.

Public names live here; the modules behind them are private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

# ForkIsolation and its companions need distributed: imported only when asked for, the rest works without it.
if TYPE_CHECKING:
    from ._plugin import ForkIsolation as ForkIsolation
    from ._plugin import WorkerInfo as WorkerInfo
    from ._plugin import WorkerNotAvailable as WorkerNotAvailable
    from ._plugin import worker_info as worker_info

_NEED_DISTRIBUTED = ("ForkIsolation", "WorkerInfo", "WorkerNotAvailable", "worker_info")


def __getattr__(name: str) -> Any:
    if name in _NEED_DISTRIBUTED:
        from . import _plugin

        return getattr(_plugin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
