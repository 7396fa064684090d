"""Dask's shuffles, merges and rechunks on a cluster whose every task is isolated: P2P with defaults.

P2P tasks (transfer, barrier, unpack) run in the worker process (``worker-functions``), because the
shuffle's state lives in the worker's shuffle extension; everything around them runs in children.
"""

from __future__ import annotations

import os

import dask
import dask.array as da
import dask.dataframe as dd
import forkmap_dist_tasks as t
import numpy as np
import pandas as pd
from distributed import Nanny
from distributed.utils_test import gen_cluster

from dask_forkmap._plugin import ForkIsolation

NANNIES = {"client": True, "Worker": Nanny, "nthreads": [("127.0.0.1", 2)] * 2, "timeout": 180}

PDF = pd.DataFrame({"k": np.arange(1000) % 100, "v": np.arange(1000.0), "w": np.arange(1000)[::-1]})
OTHER = pd.DataFrame({"k": np.arange(0, 100, 2), "z": np.arange(50) * 2})


def _canonical(x):
    frame = x.to_frame() if isinstance(x, pd.Series) else x
    frame = frame.reset_index(drop=frame.index.name is None)
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


EXPECTED = {
    "groupby split_out": (lambda f, o: f.groupby("k").v.sum(split_out=4), PDF.groupby("k").v.sum()),
    "set_index": (lambda f, o: f.set_index("w"), PDF.set_index("w")),
    "shuffle": (lambda f, o: f.shuffle("k"), PDF),
    "merge": (lambda f, o: f.merge(o, on="k"), PDF.merge(OTHER, on="k")),
    "sort_values": (lambda f, o: f.sort_values("w"), PDF.sort_values("w")),
}


def test_p2p_dataframe_shuffles_and_rechunk_with_defaults():
    # A synchronous client: set_index and sort_values compute their divisions while the graph is built.
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as c,
    ):
        c.register_plugin(ForkIsolation())
        workers = set(c.run(os.getpid).values())
        assert c.submit(t.pid, 0, pure=False).result(timeout=t.WAIT) not in workers  # isolated
        assert dask.config.get("dataframe.shuffle.method", None) is None  # dask picks P2P on a cluster
        frame, other = dd.from_pandas(PDF, npartitions=16), dd.from_pandas(OTHER, npartitions=7)
        for name, (make, expected) in EXPECTED.items():
            got = make(frame, other).compute()
            pd.testing.assert_frame_equal(_canonical(got), _canonical(expected), obj=name)
        x = da.random.default_rng(0).random((40, 40), chunks=(10, 10))
        values = x.compute()
        np.testing.assert_array_equal(x.rechunk((40, 5), method="p2p").compute(), values)
        assert set(c.run(os.getpid).values()) == workers  # no worker restarted


@gen_cluster(**NANNIES)
async def test_a_nested_compute_runs_locally_in_the_child(c, s, a, b):
    await c.register_plugin(ForkIsolation())
    assert await c.submit(t.nested_delayed_compute, pure=False).result(timeout=t.WAIT) == 6
    assert await c.submit(t.nested_dataframe_compute, pure=False).result(timeout=t.WAIT) == 10


def test_worker_functions_are_found_inside_tasks():
    from dask._task_spec import Task

    from dask_forkmap import _config
    from dask_forkmap._placement import Names

    names = Names(_config.get("distributed.worker-functions"))
    from distributed.shuffle._shuffle import shuffle_unpack

    assert names.called_by(Task("x", shuffle_unpack, "id", 0))
    assert names.called_by(Task("y", abs, Task(None, shuffle_unpack, "id", 0)))
    assert not names.called_by(Task("z", abs, -1))
