"""Where a graph task runs: pure functions over dask's task specs, shared by ``forkmap_get`` and ``ForkIsolation``.

Nothing here forks or schedules. Each function looks at one task (a :class:`dask._task_spec.GraphNode`)
and answers a question about it:

* :class:`Names`: does it call one of a configured list of functions (``parent-functions``,
  ``worker-functions``), looking inside nested and fused tasks too?
* :func:`own_limits`: the limits that ``with_limits`` functions inside it carry.
* :func:`shared_store`: is it the creation of a shuffle store (partd) that its dependents write into?
  Such a store must be made in the process that outlives them, and must not buffer in memory: a
  child's writes into a buffer die with the child.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

from dask._task_spec import GraphNode, Task, _execute_subgraph

from ._limits import NO_LIMITS, Limited, Limits

__all__ = ["Names", "own_limits", "qualname", "shared_store"]


def qualname(func: Any) -> str:
    """``module.qualname`` of a function, or of the class of a callable object."""
    while isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, Limited):
        func = func.fn
    if not hasattr(func, "__qualname__"):
        func = type(func)
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', '')}"


def _callables(node: Any) -> Iterator[Any]:
    """Every function a task calls: its own, its nested tasks', those of a fused task's inner graph,
    and ``with_limits`` functions handed to it as arguments (``bag.map(with_limits(f))``)."""
    if isinstance(node, Task):
        yield node.func
        if node.func is _execute_subgraph:
            for inner in node.args[0].values():
                yield from _callables(inner)
        for arg in (*node.args, *node.kwargs.values()):
            if isinstance(arg, GraphNode):
                yield from _callables(arg)
            elif isinstance(arg, Limited):
                yield arg
    elif isinstance(node, GraphNode):
        for dep in getattr(node, "args", ()):
            if isinstance(dep, GraphNode):
                yield from _callables(dep)


class Names:
    """A configured list of functions: qualified names, or ``package.module.*`` for a whole package.

    C builtins report the module they are implemented in (``operator.getitem`` is
    ``_operator.getitem``): both spellings match.
    """

    def __init__(self, names: Sequence[str] | None) -> None:
        names = list(names or ())
        self.exact = frozenset(names + [f"_{n}" for n in names if n.startswith("operator.")])
        self.prefixes = tuple(n[:-1] for n in names if n.endswith(".*"))
        self._seen: dict[int, bool] = {}

    def __contains__(self, func: Any) -> bool:
        """Whether calling ``func`` itself is one of these calls."""
        name = qualname(func)
        return name in self.exact or (bool(self.prefixes) and name.startswith(self.prefixes))

    def called_by(self, node: Any) -> bool:
        """Whether running ``node`` makes one of these calls, directly or in a nested or fused task."""
        if not self.exact and not self.prefixes:
            return False
        for func in _callables(node):
            try:
                hit = self._seen[id(func)]
            except KeyError:
                # Keyed by identity, so only functions that live as long as the process: a
                # partial or a Limited made per task would fill the cache and might reuse ids.
                hit = func in self
                if not isinstance(func, (functools.partial, Limited)):
                    self._seen[id(func)] = hit
            if hit:
                return True
        return False


def own_limits(node: Any) -> Limits:
    """The limits of the ``with_limits`` functions a task calls; :data:`NO_LIMITS` if none.

    A fused task runs several calls one after the other in one child: their timeouts add up, and
    the largest memory limit applies.
    """
    timeouts: list[float] = []
    memory: list[int] = []
    for func in _callables(node):
        if isinstance(func, Limited):
            if func.limits.timeout is not None:
                timeouts.append(func.limits.timeout)
            if func.limits.memory_limit is not None:
                memory.append(func.limits.memory_limit)
    if not timeouts and not memory:
        return NO_LIMITS
    return Limits(timeout=sum(timeouts) if timeouts else None, memory_limit=max(memory) if memory else None)


def shared_store(node: Any) -> Any:
    """The unbuffered twin of a task's partd-store factory, if the task makes a shuffle store; else None.

    dask's local "disk" shuffle makes its store with a ``maybe_buffered_partd`` task: in memory
    first, spilling to files. Every shuffle task then appends to that object, and the collecting
    tasks read from it. Dask itself makes it unbuffered whenever the graph leaves the process (its
    pickled form is the unbuffered one): that is what a store shared by forked children must be.
    """
    if not isinstance(node, Task) or node.args or node.kwargs:
        return None
    func = node.func
    if qualname(func) != "dask.dataframe.shuffle.maybe_buffered_partd":
        return None
    reduced: Any = func.__reduce__()
    rebuild, args = reduced[:2]
    return rebuild(*args)
