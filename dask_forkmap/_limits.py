"""Per-task limits (a wall-clock timeout and a memory limit), and the checks every entry point shares.

Limits travel *with the function*, not as keyword arguments of ``fork_map``/``submit``, so they can
never clash with the task's own keyword arguments: ``fork_map(with_limits(f, timeout=5), timeout=1)``
runs ``f(timeout=1)`` with a 5 s limit.

Every layer puts a task's limits together with :func:`resolve`, and nowhere else. Highest first:

1. :func:`with_limits` on the function itself;
2. the task's ``dask.annotate(forkmap={...})`` annotation (``forkmap_get``, ``ForkIsolation``);
3. the layer's own arguments (``ForkExecutor(timeout=)``, ``forkmap_get(timeout=)``, ``ForkIsolation(timeout=)``);
4. ``dask.config`` (``forkmap.timeout``, ``forkmap.memory-limit``).

Each value is checked where it is given, by the same validators in every layer, so a value refused
by one entry point is refused by all of them with the same message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dask.utils import parse_bytes

from . import _config

__all__ = ["Limited", "Limits", "with_limits"]

R = TypeVar("R")

# The annotation key read by forkmap_get and ForkIsolation: dask.annotate(forkmap=...).
ANNOTATION = "forkmap"


def check_callable(fn: Any, what: str = "the task") -> None:
    """Refuse a non-callable before anything is forked for it."""
    if not callable(fn):
        shown = repr(fn)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TypeError(f"{what} must be callable, not {type(fn).__name__} ({shown})")


def check_workers(value: Any, what: str) -> int:
    """A count of children at once (``max_workers``, ``num_workers``): a positive int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a positive int, not {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{what} must be a positive int, not {value!r}")
    return value


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive, finite number of seconds, not {timeout!r}")
    return float(timeout)


def _check_memory_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, str):
        try:
            value = parse_bytes(limit)
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"memory_limit {limit!r} is not a size; write bytes as a number or a string like '2 GiB'"
            ) from exc
    elif isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise TypeError(
            f"memory_limit must be a number of bytes, a string like '2 GiB', or None, not {type(limit).__name__}"
        )
    else:
        if not math.isfinite(limit):
            raise ValueError(f"memory_limit must be a finite number of bytes, not {limit!r}")
        value = int(limit)
    if value <= 0:
        raise ValueError(f"memory_limit must be positive, not {limit!r}")
    return value


@dataclass(frozen=True)
class Limits:
    """What one task may use. ``None`` means no limit.

    Parameters
    ----------
    timeout : float, optional
        Wall-clock seconds from the fork. When it expires the child's whole process group
        (grandchildren included) is killed and :class:`~dask_forkmap.TaskTimeoutError` is raised.
    memory_limit : int or str, optional
        Bytes the task may allocate beyond what the child inherited from its parent, e.g.
        ``"512 MiB"``. Enforced with ``RLIMIT_AS`` set to the child's current address-space size plus
        this much, so the inherited copy-on-write mappings do not count against it. Exceeding it raises
        :class:`~dask_forkmap.MemoryLimitExceeded`.

    Attributes
    ----------
    timeout : float or None
        The timeout in seconds.
    memory_limit : int or None
        The memory limit in bytes (a string is parsed when the limits are made).

    Raises
    ------
    TypeError
        A limit of the wrong type (a ``bool``, a list, ...).
    ValueError
        A limit that is not positive and finite, or a size string that cannot be parsed.

    See Also
    --------
    with_limits : attach limits to a function.

    Examples
    --------
    >>> from dask_forkmap import Limits
    >>> Limits(timeout=30, memory_limit="1 KiB")
    Limits(timeout=30.0, memory_limit=1024)
    """

    timeout: float | None = None
    memory_limit: int | None = None

    def __init__(self, timeout: float | None = None, memory_limit: int | str | None = None) -> None:
        object.__setattr__(self, "timeout", _check_timeout(timeout))
        object.__setattr__(self, "memory_limit", _check_memory_limit(memory_limit))

    def over(self, fallback: Limits) -> Limits:
        """These limits, with ``fallback``'s values where these are unset.

        Parameters
        ----------
        fallback : Limits
            The limits that apply where these set none.

        Returns
        -------
        Limits
            A new instance; neither input changes.
        """
        return Limits(
            timeout=self.timeout if self.timeout is not None else fallback.timeout,
            memory_limit=self.memory_limit if self.memory_limit is not None else fallback.memory_limit,
        )

    @classmethod
    def from_config(cls) -> Limits:
        """The defaults currently in ``dask.config``.

        Returns
        -------
        Limits
            ``forkmap.timeout`` and ``forkmap.memory-limit``, as set at the time of the call.
        """
        return cls(timeout=_config.get("timeout"), memory_limit=_config.get("memory-limit"))

    @classmethod
    def from_annotation(cls, value: Any, key: Any) -> Limits | None:
        """The limits a task's ``forkmap`` annotation sets; None if it sets none.

        The annotation is ``True`` (fork), ``False`` (run in process) or a dict of limits, which
        implies forking. Anything else is refused rather than ignored, naming the task: a typo such
        as ``memory-limit`` would otherwise leave the task without the limit it asked for.

        Parameters
        ----------
        value : bool, dict or None
            The annotation's value; None when the task has none.
        key : object
            The task's key, named in error messages.

        Returns
        -------
        Limits or None
            The limits of a dict annotation; None for ``True``, ``False`` and ``None``.

        Raises
        ------
        TypeError
            The annotation is neither a bool nor a dict, or a limit in it has the wrong type.
        ValueError
            The dict has keys other than ``timeout`` and ``memory_limit``, or a limit is invalid.
        """
        if value is None or value is True or value is False:
            return None
        if not isinstance(value, Mapping):
            raise TypeError(
                f"the {ANNOTATION!r} annotation of task {key!r} must be True, False or a dict with "
                f"'timeout' and/or 'memory_limit', not {value!r}"
            )
        unknown = set(value) - {"timeout", "memory_limit"}
        if unknown:
            raise ValueError(
                f"the {ANNOTATION!r} annotation of task {key!r} has unknown keys {sorted(map(str, unknown))}; "
                "the known ones are 'timeout' and 'memory_limit'"
            )
        try:
            return cls(timeout=value.get("timeout"), memory_limit=value.get("memory_limit"))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"the {ANNOTATION!r} annotation of task {key!r}: {exc}") from None


@dataclass(frozen=True)
class Limited(Generic[R]):
    """A callable carrying its own :class:`Limits`; see :func:`with_limits`.

    Calling it in process simply calls the wrapped function: the limits only act when it runs in a
    forked child (:func:`fork_map`, :class:`ForkExecutor`, :func:`forkmap_get`, ``ForkIsolation``).

    Parameters
    ----------
    fn : callable
        The function to run.
    limits : Limits
        The limits for each child that runs it.

    Attributes
    ----------
    fn : callable
        The wrapped function.
    limits : Limits
        Its limits.
    """

    fn: Callable[..., R]
    limits: Limits

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.fn(*args, **kwargs)

    @property
    def __name__(self) -> str:  # so that reports and dask key names read well
        return getattr(self.fn, "__name__", type(self.fn).__name__)


def with_limits(
    fn: Callable[..., R], *, timeout: float | None = None, memory_limit: int | str | None = None
) -> Limited[R]:
    """Attach per-task limits to ``fn`` for :func:`fork_map`, :class:`ForkExecutor` and Dask graphs.

    Limits travel with the function rather than as keyword arguments of ``fork_map`` or ``submit``,
    so they never clash with the task's own keyword arguments. They take precedence over the
    executor's (or scheduler's, or plugin's) limits, which take precedence over ``dask.config``.

    Parameters
    ----------
    fn : callable
        The function to limit.
    timeout : float, optional
        Wall-clock seconds from the fork; see :class:`Limits`.
    memory_limit : int or str, optional
        Bytes the task may allocate beyond what it inherited, e.g. ``"2 GiB"``; see :class:`Limits`.

    Returns
    -------
    Limited
        A callable that calls ``fn`` and carries the limits. Wrapping an already limited function
        overrides the limits it sets and keeps the others.

    Raises
    ------
    TypeError
        ``fn`` is not callable, or a limit has the wrong type.
    ValueError
        A limit is not positive and finite, or a size string cannot be parsed.

    Examples
    --------
    >>> from dask_forkmap import fork_map, with_limits
    >>> fork_map(with_limits(sum, timeout=10, memory_limit="1 GiB"), [1, 2, 3])
    6

    A keyword argument named ``timeout`` goes to the function, not to the limits:

    >>> def pause(*, timeout):
    ...     return timeout
    >>> fork_map(with_limits(pause, timeout=10), timeout=0.5)
    0.5
    """
    check_callable(fn, "the function given to with_limits")
    limits = Limits(timeout=timeout, memory_limit=memory_limit)
    if isinstance(fn, Limited):
        return Limited(fn.fn, limits.over(fn.limits))
    return Limited(fn, limits)


def split(fn: Callable[..., R]) -> tuple[Callable[..., R], Limits]:
    """``fn`` without its :class:`Limited` wrapper, and the limits it carried."""
    if isinstance(fn, Limited):
        return fn.fn, fn.limits
    return fn, NO_LIMITS


NO_LIMITS = Limits()


def resolve(
    own: Limits = NO_LIMITS,
    *,
    annotation: Any = None,
    key: Any = None,
    layer: Limits = NO_LIMITS,
) -> Limits:
    """The limits one task runs under: the single place where their sources meet.

    Parameters
    ----------
    own : Limits
        What the task's function carries (:func:`with_limits`; see :func:`split`).
    annotation : bool, dict or None
        The task's ``forkmap`` annotation, checked by :meth:`Limits.from_annotation`.
    key : object
        The task's key, for the annotation's error messages.
    layer : Limits
        The arguments of the layer running the task (executor, scheduler, plugin).

    Returns
    -------
    Limits
        Each field from the first source that sets it, ``dask.config`` last.
    """
    limits = own
    from_annotation = Limits.from_annotation(annotation, key)
    if from_annotation is not None:
        limits = limits.over(from_annotation)
    return limits.over(layer).over(Limits.from_config())
