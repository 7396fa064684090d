"""Preload module: ``dask worker --preload dask_forkmap.preload`` isolates every task of that worker.

Also works from configuration (``distributed.worker.preload: [dask_forkmap.preload]``) and on the
scheduler (``dask scheduler --preload dask_forkmap.preload``), which then registers the plugin for
every worker that is or will be connected to it. Options come from ``forkmap.distributed.*`` in
``dask.config`` (YAML files, or ``DASK_FORKMAP__DISTRIBUTED__TIMEOUT=300``-style environment variables).

A worker started this way installs the plugin itself, before it connects to the scheduler: its
first task is already isolated, and a worker the nanny restarts runs the preload again.
"""

from __future__ import annotations

from typing import Any

from distributed import Scheduler, Worker

from ._plugin import ForkIsolation


async def dask_setup(server: Any) -> None:
    """Install :class:`~dask_forkmap.ForkIsolation` on a worker, or register it with a scheduler."""
    plugin = ForkIsolation.from_config()
    if isinstance(server, Worker):
        await server.plugin_add(plugin=plugin, name=plugin.name, catch_errors=False)
    elif isinstance(server, Scheduler):
        import cloudpickle

        await server.register_worker_plugin(None, plugin=cloudpickle.dumps(plugin), name=plugin.name, idempotent=True)
    else:
        raise TypeError(
            f"dask_forkmap.preload works on a worker or a scheduler, not a {type(server).__name__}; "
            "for a nanny, use `dask worker --preload dask_forkmap.preload`"
        )
