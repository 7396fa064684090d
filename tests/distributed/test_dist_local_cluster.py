"""ForkIsolation on ``LocalCluster(processes=True)``: plugins= and both client registration methods."""

from __future__ import annotations

import forkmap_dist_checks as checks
import pytest
from distributed import Client, LocalCluster

from dask_forkmap._plugin import ForkIsolation


def _cluster(**kwargs) -> LocalCluster:
    return LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        **kwargs,
    )


def test_plugins_argument():
    with _cluster(plugins={ForkIsolation()}) as cluster, Client(cluster, timeout=60) as client:
        checks.check_all(client, 2)


def test_register_plugin_and_idempotence():
    with _cluster() as cluster, Client(cluster, timeout=60) as client:
        client.register_plugin(ForkIsolation())
        # Registering again (say, from a second client) changes nothing and adds no second plugin.
        client.register_plugin(ForkIsolation(timeout=1))
        plugins = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
        assert [name for name in plugins if "forkmap" in name] == ["forkmap-isolation"]
        limits = client.run(lambda dask_worker: dask_worker.executors["default"].limits.timeout)
        assert set(limits.values()) == {None}
        checks.check_all(client, 2)


@pytest.mark.skipif(not hasattr(Client, "register_worker_plugin"), reason="removed in distributed 2026.6.0")
def test_register_worker_plugin_on_older_distributed():
    with _cluster() as cluster, Client(cluster, timeout=60) as client:
        with pytest.warns((DeprecationWarning, FutureWarning)):
            client.register_worker_plugin(ForkIsolation())
        checks.check_results_and_pids(client)
        checks.check_segfault(client)
