"""Dask's own shuffling machinery under forkmap_get, with dask's default settings.

dask.dataframe shuffles locally through a partd store ("disk" shuffle): every shuffle task appends
to it and the collecting tasks read from it. forkmap_get makes that store in the parent, unbuffered,
so that the children's writes reach the files; it removes the store when the compute ends.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from dask import delayed

from dask_forkmap import forkmap_get

PDF = pd.DataFrame({"k": np.arange(1000) % 100, "v": np.arange(1000.0), "w": np.arange(1000)[::-1]})
OTHER = pd.DataFrame({"k": np.arange(0, 100, 2), "z": np.arange(50) * 2})


def _frames():
    return dd.from_pandas(PDF, npartitions=16), dd.from_pandas(OTHER, npartitions=7)


SHUFFLES = {
    "groupby mean": lambda f, o: f.groupby("k").v.mean(),
    "groupby split_out": lambda f, o: f.groupby("k").v.sum(split_out=4),
    "set_index": lambda f, o: f.set_index("w"),
    "shuffle": lambda f, o: f.shuffle("k"),
    "merge": lambda f, o: f.merge(o, on="k"),
    "sort_values": lambda f, o: f.sort_values("w"),
    "repartition": lambda f, o: f.repartition(npartitions=5),
}


def _canonical(x: pd.DataFrame | pd.Series) -> pd.DataFrame:
    frame = x.to_frame() if isinstance(x, pd.Series) else x
    frame = frame.reset_index(drop=frame.index.name is None)  # an unnamed index is only positions
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


@pytest.fixture
def shuffle_dir(tmp_path: Path):
    """dask's shuffle stores go here; the test fails if forkmap_get left one behind.

    (The threads scheduler leaves its stores until the interpreter exits: its results are computed
    with another temporary directory.)
    """
    ours = tmp_path / "forkmap"
    ours.mkdir()
    with dask.config.set(temporary_directory=str(ours)):
        yield tmp_path / "threads"
    assert not list(ours.glob("*.partd")), "a shuffle store was left behind"


def _threads(collection, shuffle_dir: Path):
    shuffle_dir.mkdir(exist_ok=True)
    with dask.config.set(temporary_directory=str(shuffle_dir)):
        return collection.compute(scheduler="threads")


@pytest.mark.parametrize("make", SHUFFLES.values(), ids=SHUFFLES.keys())
def test_dataframe_shuffles_give_the_threads_schedulers_results(make, shuffle_dir) -> None:
    assert dask.config.get("dataframe.shuffle.method", None) is None  # dask's default: "disk"
    threads = _threads(make(*_frames()), shuffle_dir)
    forked = make(*_frames()).compute(scheduler=forkmap_get)
    assert len(forked) == len(threads) > 0
    pd.testing.assert_frame_equal(_canonical(forked), _canonical(threads))


def test_tasks_shuffle_too(shuffle_dir) -> None:
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        forked = SHUFFLES["set_index"](*_frames()).compute(scheduler=forkmap_get)
    pd.testing.assert_frame_equal(_canonical(forked), _canonical(PDF.set_index("w")))


def test_shuffle_store_is_made_in_the_parent(shuffle_dir) -> None:
    # The store's folder is made by this process (the files inside by the children): its cleanup is ours.
    made = []
    real = __import__("tempfile").mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        path = real(*args, **kwargs)
        made.append((os.getpid(), path))
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tempfile.mkdtemp", recording_mkdtemp)
        SHUFFLES["shuffle"](*_frames()).compute(scheduler=forkmap_get)
    assert [pid for pid, path in made if path.endswith(".partd")] == [os.getpid()]


def test_bag_groupby_on_disk() -> None:
    # Its store (a partd.File) is made in the parent and removed when partd's object is collected,
    # as under the threads scheduler.
    bag = db.from_sequence(range(200), npartitions=8)
    threads = bag.groupby(lambda i: i % 7, shuffle="disk").compute(scheduler="threads")
    forked = bag.groupby(lambda i: i % 7, shuffle="disk").compute(scheduler=forkmap_get)
    assert sorted((k, sorted(v)) for k, v in forked) == sorted((k, sorted(v)) for k, v in threads)


def test_array_rechunk() -> None:
    x = da.random.default_rng(0).random((40, 40), chunks=(10, 10))
    expected = x.compute(scheduler="threads")
    np.testing.assert_array_equal(x.rechunk((40, 5)).compute(scheduler=forkmap_get), expected)
    np.testing.assert_array_equal(x.rechunk((5, 40), method="tasks").compute(scheduler=forkmap_get), expected)


_SEEN: list[int] = []


def _append_and_look(i: int) -> tuple[int, int]:
    _SEEN.append(i)
    return os.getpid(), len(_SEEN)


def test_no_task_sees_another_tasks_globals_by_default() -> None:
    # The default is one child per task: a module global that every task appends to is seen by
    # each task with its own entry only, and each ran in a child of its own.
    tasks = [delayed(_append_and_look, pure=False)(i) for i in range(40)]
    results = dask.compute(*tasks, scheduler="forkmap")
    assert [seen for _, seen in results] == [1] * 40
    assert len({pid for pid, _ in results}) == 40
    assert _SEEN == []
    bag = db.from_sequence(range(40), npartitions=40).map(_append_and_look)
    assert [seen for _, seen in bag.compute(scheduler="forkmap")] == [1] * 40


def test_batching_is_an_opt_in_that_shares_a_child() -> None:
    tasks = [delayed(_append_and_look, pure=False)(i) for i in range(40)]
    results = dask.compute(*tasks, scheduler=forkmap_get, num_workers=1, chunksize=8)
    assert len({pid for pid, _ in results}) < 40
    assert max(seen for _, seen in results) > 1  # batch-mates saw each other's appends
