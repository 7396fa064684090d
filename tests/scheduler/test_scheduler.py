"""forkmap_get: the Dask scheduler that runs tasks in forked children."""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import Future

import dask
import dask.array as da
import dask.bag as db
import numpy as np
import pandas as pd
import pytest
from dask import delayed
from dask._task_spec import Task
from dask.callbacks import Callback
from dask.utils_test import GetFunctionTestMixin

import dask_forkmap._scheduler  # noqa: F401 - registers "forkmap" until __init__ imports it
from dask_forkmap import ChildCrashed, ResultPicklingError, TaskTimeoutError
from dask_forkmap._limits import NO_LIMITS
from dask_forkmap._scheduler import _Options, _Pending, _Run, forkmap_get

pytestmark = pytest.mark.usefixtures("no_children_left")


class TestGetFunctionMixin(GetFunctionTestMixin):
    # dask's own checks for third-party get functions.
    get = staticmethod(forkmap_get)

    @pytest.mark.timeout(900)
    def test_get_stack_limit(self):
        # dask's 10 000-task chain, unchanged: one fork per link, since no two links are ever ready
        # together (~4-6 ms each: 40-60 s, about twice that on a loaded 2-core machine).
        super().test_get_stack_limit()


# -- choosing the scheduler ----------------------------------------------------------------------


def test_named_scheduler():
    # The name lives in dask's private table of named schedulers: fail here, not in users' code,
    # if a dask release changes it.
    from dask.base import get_scheduler, named_schedulers

    assert named_schedulers["forkmap"] is forkmap_get
    assert get_scheduler(scheduler="forkmap") is forkmap_get
    with dask.config.set(scheduler="forkmap"):
        assert get_scheduler() is forkmap_get
        assert delayed(os.getpid)().compute() != os.getpid()


def test_tasks_run_in_children():
    pids = dask.compute(*[delayed(os.getpid)(dask_key_name=f"pid-{i}") for i in range(6)], scheduler="forkmap")
    assert os.getpid() not in pids


def test_num_workers_bounds_children():
    # Each task reports when it ran (CLOCK_MONOTONIC is system-wide, so times from different
    # children compare); at no moment do more than num_workers tasks run. (Counting live siblings
    # from inside a child would also count children that already sent their result and are still
    # exiting, which the scheduler does not wait for.)
    def interval(i):
        start = time.monotonic()
        while time.monotonic() - start < 0.02:
            pass
        return start, time.monotonic(), os.getpid()

    out = dask.compute(*[delayed(interval)(i) for i in range(8)], scheduler=forkmap_get, num_workers=2, chunksize=1)
    assert len({pid for _, _, pid in out}) == 8  # chunksize=1: a child per task
    events = sorted([(start, 1) for start, _, _ in out] + [(end, -1) for _, end, _ in out])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 1 <= peak <= 2


@pytest.mark.parametrize("chunksize", [1, 4, -1, "auto"])
def test_chunksize(chunksize):
    items = list(range(300))
    got = (
        db.from_sequence(items, npartitions=60).map(lambda i: i * 2).compute(scheduler=forkmap_get, chunksize=chunksize)
    )
    assert got == [i * 2 for i in items]


def test_bad_chunksize():
    with pytest.raises(ValueError, match="chunksize"):
        delayed(int)(1).compute(scheduler=forkmap_get, chunksize=0)


# -- results identical to the threaded scheduler -------------------------------------------------


def _both(*collections):
    return dask.compute(*collections, scheduler="threads"), dask.compute(*collections, scheduler=forkmap_get)


def test_delayed_matches_threads():
    a = delayed(lambda x: x + 1)(1)
    b = delayed(sum)([a, a, delayed(int)("3")])
    threads, forked = _both(b, {"k": [a, b]})
    assert threads == forked == (7, {"k": [2, 7]})


def test_bag_matches_threads():
    b = db.from_sequence(range(1000), npartitions=13)
    threads, forked = _both(
        b.map(lambda i: i * 3),
        b.map_partitions(lambda part: [sum(part)]),
        b.foldby(lambda i: i % 7, lambda acc, i: acc + i, 0),
        b.groupby(lambda i: i % 5).map(lambda kv: (kv[0], sorted(kv[1]))),
    )
    assert threads[0] == forked[0]
    assert threads[1] == forked[1]
    assert sorted(threads[2]) == sorted(forked[2])
    assert sorted(threads[3]) == sorted(forked[3])


def test_array_matches_numpy():
    x_np = np.random.default_rng(0).random((300, 200))
    x = da.from_array(x_np, chunks=(70, 60))
    exprs = [
        x.sum(),
        x.mean(axis=0),
        x.std(axis=1),
        x.max(),
        (x + x.T[:200, :300].T) * 2,
        x @ x.T,
        da.argmin(x, axis=1),
    ]
    expected = [
        x_np.sum(),
        x_np.mean(axis=0),
        x_np.std(axis=1),
        x_np.max(),
        (x_np + x_np.T[:200, :300].T) * 2,
        x_np @ x_np.T,
        np.argmin(x_np, axis=1),
    ]
    threads, forked = _both(*exprs)
    for t, f, e in zip(threads, forked, expected, strict=True):
        np.testing.assert_allclose(f, e)
        np.testing.assert_allclose(f, t, rtol=1e-13)  # BLAS may sum in another order in a child


def test_dataframe_groupby_matches_pandas():
    dd = pytest.importorskip("dask.dataframe")
    pdf = pd.DataFrame({"g": np.arange(1000) % 7, "x": np.arange(1000.0), "y": np.arange(1000) % 3})
    ddf = dd.from_pandas(pdf, npartitions=5)
    got = ddf.groupby("g").agg({"x": ["sum", "mean"], "y": "max"}).compute(scheduler=forkmap_get)
    expected = pdf.groupby("g").agg({"x": ["sum", "mean"], "y": "max"})
    pd.testing.assert_frame_equal(got.sort_index(), expected)


# -- what runs in the parent ---------------------------------------------------------------------


def test_literal_data_and_aliases_are_the_very_objects():
    obj = object()
    arr = np.arange(10)
    assert delayed(obj, traverse=False).compute(scheduler=forkmap_get) is obj
    out = dask.compute([delayed(arr, traverse=False), delayed(obj, traverse=False)], scheduler=forkmap_get)[0]
    assert out[0] is arr
    assert out[1] is obj


def test_literal_holding_collections_is_the_very_object():
    # delayed(obj, traverse=False) of a list holding a Delayed: a legacy (literal(obj),) task
    a = delayed(int)(1)
    x = [a, 1, 2]
    res = delayed(x, traverse=False).compute(scheduler=forkmap_get)
    assert res is x
    assert res[0] is a


def test_getitem_and_assembly_run_in_the_parent():
    big = delayed(lambda: {"a": np.ones(3)})()
    item = big["a"]
    pid = os.getpid()
    # where did the getitem run: its result is the very array the parent holds for `big`
    got_big, got_item = dask.compute(big, item, scheduler=forkmap_get)
    assert got_item is got_big["a"]
    assert dask.compute([delayed(os.getpid)()], scheduler=forkmap_get)[0][0] != pid


def test_inline_off_forks_getitem():
    big = delayed(lambda: {"a": np.ones(3)})()
    with dask.config.set({"forkmap.scheduler.inline": False}):
        got_big, got_item = dask.compute(big, big["a"], scheduler=forkmap_get)
    assert got_item is not got_big["a"]
    np.testing.assert_array_equal(got_item, got_big["a"])


def test_annotation_forkmap_false_runs_in_parent():
    with dask.annotate(forkmap=False):
        here = delayed(os.getpid)(dask_key_name="here")
    there = delayed(os.getpid)(dask_key_name="there")
    got_here, got_there = dask.compute(here, there, scheduler=forkmap_get)
    assert got_here == os.getpid()
    assert got_there != os.getpid()


def test_annotation_timeout():
    ev = threading.Event()
    with dask.annotate(forkmap={"timeout": 0.5}):
        slow = delayed(ev.wait)(dask_key_name="slow-task")  # never set in the child
    with pytest.raises(TaskTimeoutError, match="slow-task"):
        slow.compute(scheduler=forkmap_get)


@pytest.mark.parametrize(
    ("annotation", "error", "match"),
    [
        ({"timeut": 1}, ValueError, r"task 'x' has unknown keys \['timeut'\]"),
        ({"memory-limit": "1 GiB"}, ValueError, r"unknown keys \['memory-limit'\]"),
        ({"timeout": -1}, ValueError, r"annotation of task 'x': timeout must be a positive"),
        ("yes", TypeError, r"task 'x' must be True, False or a dict"),
    ],
)
def test_annotation_rejects_nonsense(annotation, error, match):
    with dask.annotate(forkmap=annotation):
        x = delayed(int)(1, dask_key_name="x")
    with pytest.raises(error, match=match):
        x.compute(scheduler=forkmap_get)


def test_store_into_numpy_runs_in_parent():
    x = da.arange(100, chunks=10) * 2
    target = np.zeros(100, dtype=x.dtype)
    da.store(x, target, scheduler=forkmap_get)
    np.testing.assert_array_equal(target, np.arange(100) * 2)


def test_store_source_chunks_computed_in_children():
    def chunk_pid(block):
        return np.full(block.shape, os.getpid())

    x = da.zeros(40, chunks=10).map_blocks(chunk_pid)
    target = np.zeros(40, dtype=int)
    da.store(x, target, scheduler=forkmap_get)
    pids = set(target.tolist())
    assert os.getpid() not in pids
    assert 0 not in pids


def test_store_unfused_and_return_stored():
    x = da.arange(30, chunks=10) + 1
    target = np.zeros(30, dtype=x.dtype)
    with dask.config.set({"optimization.fuse.active": False}):
        da.store(x, target, scheduler=forkmap_get)
    np.testing.assert_array_equal(target, np.arange(30) + 1)
    target2 = np.zeros(30, dtype=x.dtype)
    stored = da.store(x, target2, return_stored=True, compute=False)
    if isinstance(stored, tuple):  # dask 2025.1 returns a tuple even for one source
        (stored,) = stored
    np.testing.assert_array_equal(stored.compute(scheduler=forkmap_get), np.arange(30) + 1)
    np.testing.assert_array_equal(target2, np.arange(30) + 1)


# -- isolation ------------------------------------------------------------------------------------

STATE = {"n": 0}


def test_global_mutation_stays_in_child():
    def mutate(i):
        STATE["n"] += 1
        return STATE["n"]

    out = dask.compute(*[delayed(mutate)(i) for i in range(5)], scheduler=forkmap_get, chunksize=1)
    assert out == (1,) * 5
    assert STATE["n"] == 0


def test_leak_leaves_parent_unchanged():
    leak = []

    def leak_memory():
        leak.append(bytearray(64 * 2**20))
        return len(leak)

    assert delayed(leak_memory)().compute(scheduler=forkmap_get) == 1
    assert leak == []


def _segfault():
    ctypes.string_at(0)


def test_segfault_raises_child_crashed_then_next_compute_works():
    crash = delayed(_segfault)(dask_key_name="crashing-key")
    others = [delayed(threading.Event().wait)(dask_key_name=f"blocked-{i}") for i in range(1)]
    with pytest.raises(ChildCrashed, match="crashing-key") as info:
        dask.compute(crash, *others, scheduler=forkmap_get, num_workers=2)
    assert info.value.signal == "SIGSEGV"
    assert info.value.task == "crashing-key"
    # The stack ends at the task itself, not at dask's or the scheduler's way into it.
    assert info.value.crash_stack is not None
    assert info.value.crash_stack.splitlines()[-1].endswith(" in _segfault")
    # the blocked sibling was killed and reaped before compute raised (no_children_left checks)
    assert delayed(sum)([1, 2]).compute(scheduler=forkmap_get) == 3


def _batch_size(pending, duration, fork_cost):
    """How many tasks the next child takes with chunksize auto, 2 workers, batch-duration 20 ms:
    ``pending`` tasks of one key prefix measured at ``duration`` s, forks measured at ``fork_cost`` s."""
    with dask.config.set({"forkmap.scheduler.batch-duration": "20ms"}):
        run = _Run(_Options(2, "auto", None, None, None), {}, rerun=False)
    try:
        if duration is not None:
            run.durations["t"] = duration
        run.fork_cost = fork_cost
        run.pending.extend(
            _Pending(("t", i), Task(("t", i), int), {}, NO_LIMITS, False, Future()) for i in range(pending)
        )
        batch = [run.pending.pop()]
        run._fill(batch)
        return len(batch)
    finally:
        run.executor.shutdown()


@pytest.mark.parametrize(
    ("pending", "duration", "fork_cost", "expected"),
    [
        (1000, 0.9e-3, 1e-3, 22),  # cheap forks: batch-duration's worth of work
        (1000, 0.9e-3, 10e-3, 88),  # dear forks: 8 fork round trips' worth, so forking is ~1/9 of the time
        (1000, 1e-5, 10e-3, 256),  # at most 256 tasks
        (100, 0.9e-3, 10e-3, 50),  # at most the child's share of what is pending
        (100, 1e-5, 10e-3, 100),  # the tail: not split below a fork's worth of work
        (6, 8e-3, 10e-3, 3),  # ... but split into shares when there is more
        (1000, None, 1e-3, 1),  # not measured yet: alone
    ],
)
def test_auto_batch_size(pending, duration, fork_cost, expected):
    assert _batch_size(pending, duration, fork_cost) == expected


def test_crash_in_batch_names_the_task():
    # Many tiny tasks batched into few children (chunksize auto, opted into; one worker); the error
    # names the task that crashed (partition 150 holds item 150), not the batch or its first task.
    def f(i):
        if i == 150:
            _segfault()
        return i

    b = db.from_sequence(range(200), npartitions=200).map(f)
    with pytest.raises(ChildCrashed) as info:
        b.compute(scheduler=forkmap_get, num_workers=1, chunksize="auto")
    key = info.value.task
    # low-level fusion prefixes the name: ('from_sequence-f-<token>', 150)
    assert re.fullmatch(rf"\('([\w-]+-)?{re.escape(b.name)}', 150\)", key), key
    assert str(info.value).startswith(f"the child running {key} (pid {info.value.pid}) was killed by SIGSEGV")
    assert "one of a batch" not in str(info.value)


def test_lazy_partitions_are_consumed_in_their_child():
    # A partition function returning map(f, part): sent back as a lazy map object, f would run
    # where the partitions are next iterated, in the parent, which concatenates them (an inline
    # `finalize`), and this segfault would take the test process down.
    def f(i):
        if i == 5:
            _segfault()
        return i

    b = db.from_sequence(range(8), npartitions=4).map_partitions(lambda part: map(f, part))
    with pytest.raises(ChildCrashed) as info:
        b.compute(scheduler=forkmap_get)
    assert re.fullmatch(rf"\('([\w-]+-)?{re.escape(b.name)}', 2\)", info.value.task), info.value.task
    pids = db.from_sequence(range(8), npartitions=4).map_partitions(lambda part: map(lambda _: os.getpid(), part))
    assert os.getpid() not in pids.compute(scheduler=forkmap_get)


def test_generator_partitions_come_back_as_lists():
    # as with the threads scheduler; a generator itself cannot leave the child
    b = db.from_sequence(range(10), npartitions=3).map_partitions(lambda part: (x * 2 for x in part))
    assert b.compute(scheduler=forkmap_get) == [x * 2 for x in range(10)]


class Countdown:
    """An iterator of the user's own: consuming it could change what the task meant."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return self

    def __next__(self):
        if self.n == 0:
            raise StopIteration
        self.n -= 1
        return self.n


def test_endless_and_own_iterators_come_back_as_they_are():
    endless = delayed(itertools.count)(5)  # list() would never end
    if sys.version_info >= (3, 14):  # itertools objects no longer pickle: a clear error, no hang
        with pytest.raises(ResultPicklingError, match=r"itertools\.count cannot be pickled.* what it yields"):
            endless.compute(scheduler=forkmap_get)
    else:
        counter = endless.compute(scheduler=forkmap_get)
        assert isinstance(counter, itertools.count)
        assert next(counter) == 5
    countdown = delayed(Countdown)(3).compute(scheduler=forkmap_get)
    assert isinstance(countdown, Countdown)
    assert list(countdown) == [2, 1, 0]


@pytest.mark.parametrize("npartitions", [3, 150])  # 150: dask hands the partitions over as a plain Task
def test_bag_concatenation_runs_in_the_parent(npartitions):
    # The items of the computed bag are the very objects of the partitions handed to the parent:
    # concatenating them in a child would have sent copies back.
    partitions = []

    class Record(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(result, list) and not str(key).startswith("finalize"):
                partitions.append(result)

    b = db.from_sequence(range(300), npartitions=npartitions).map_partitions(lambda part: [[x] for x in part])
    with Record():
        out = b.compute(scheduler=forkmap_get)
    assert out == [[x] for x in range(300)]
    held = {id(item) for part in partitions for item in part}
    assert all(id(item) in held for item in out)


def test_crash_in_batch_is_batched():
    # the naming above is only worth something if that graph really runs tasks in batches
    def pid_of(i):
        return os.getpid()

    pids = (
        db.from_sequence(range(200), npartitions=200)
        .map(pid_of)
        .compute(scheduler=forkmap_get, num_workers=1, chunksize="auto")
    )
    assert len(set(pids)) < len(pids)


def test_exception_type_and_child_traceback():
    def fail(x):
        raise KeyError(f"missing {x}")

    with pytest.raises(KeyError, match="missing 3") as info:
        delayed(fail)(3).compute(scheduler=forkmap_get)
    assert "in fail" in str(info.value.__cause__)


def test_rerun_exceptions_locally_reraises_ordinary_error_in_parent():
    calls = []

    def fail():
        calls.append(os.getpid())
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        delayed(fail)().compute(scheduler=forkmap_get, rerun_exceptions_locally=True)
    assert calls == [os.getpid()]  # the child's append vanished with it; the local re-run's did not


def test_rerun_exceptions_locally_never_reruns_a_crash():
    with (
        dask.config.set(rerun_exceptions_locally=True),
        pytest.raises(ChildCrashed),
    ):
        delayed(_segfault)().compute(scheduler=forkmap_get)


def test_warnings_reach_the_caller():
    def warn():
        warnings.warn("from the child", RuntimeWarning, stacklevel=1)
        return 1

    with pytest.warns(RuntimeWarning, match="from the child"):
        assert delayed(warn)().compute(scheduler=forkmap_get) == 1


def test_keyboard_interrupt_leaves_no_child():
    # The parent's main thread gets SIGINT while children run; compute raises KeyboardInterrupt
    # and no_children_left checks that every child was killed and reaped.
    started = os.pipe()
    handled = threading.Event()
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    def block(i):
        os.write(started[1], b"x")
        threading.Event().wait()

    def on_sigint(signum, frame):
        if not handled.is_set():  # one KeyboardInterrupt, however many signals it took
            handled.set()
            raise KeyboardInterrupt

    def interrupt():
        os.read(started[0], 1)
        # CPython only runs a signal handler when the main thread next checks for one: a signal
        # that arrives just before it goes to sleep in a lock is seen when something else wakes it.
        # Press Ctrl-C again, as a user would, until the handler has run.
        for _ in range(30):
            signal.pthread_kill(main, signal.SIGINT)
            if handled.wait(timeout=2):
                return

    previous = signal.signal(signal.SIGINT, on_sigint)
    t = threading.Thread(target=interrupt)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            dask.compute(*[delayed(block)(i) for i in range(4)], scheduler=forkmap_get, num_workers=2)
    finally:
        t.join(timeout=120)
        signal.signal(signal.SIGINT, previous)
        os.close(started[0])
        os.close(started[1])
    assert handled.is_set()


def test_progressbar_output(capsys):
    from dask.diagnostics import ProgressBar

    with ProgressBar():
        dask.compute(*[delayed(int)(i) for i in range(4)], scheduler=forkmap_get)
    out = capsys.readouterr().out
    assert "100% Completed" in out


def test_profiler_records_every_task():
    from dask.diagnostics import Profiler

    xs = [delayed(int)(i, dask_key_name=f"k{i}") for i in range(4)]
    with Profiler() as prof:
        dask.compute(*xs, scheduler=forkmap_get)
    assert {r.key for r in prof.results} >= {f"k{i}" for i in range(4)}
