"""Run dask's own test suites with the default scheduler set to ``forkmap_get``.

    python tests/scheduler/run_dask_suites.py               # forkmap (what CI runs)
    python tests/scheduler/run_dask_suites.py --scheduler threads   # the baseline to compare with
    python tests/scheduler/run_dask_suites.py --suites dataframe    # only the dataframe group
    python tests/scheduler/run_dask_suites.py --everything  # LONG_RUNNING too (about 20 more minutes)
    python tests/scheduler/run_dask_suites.py -- -k store   # extra arguments go to pytest

The suites are the installed dask's (``--pyargs``), so they always match the dask being tested.
Tests that can only pass when tasks share the parent's memory are deselected, each with its reason,
in ``THREADS_ONLY`` (listed in docs/scheduler.md too); everything else must pass as with threads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import dask
import pytest

SUITES = {
    "core": [
        "dask.tests.test_delayed",
        "dask.tests.test_local",
        "dask.array.tests.test_array_core",
        "dask.array.tests.test_reductions",
        "dask.bag.tests.test_bag",
    ],
    # dask's shuffles, merges and groupbys: the local "disk" shuffle keeps its partd store in the
    # process that computes, so these are where a fork-per-task scheduler loses data if it is wrong.
    "dataframe": [
        "dask.dataframe.tests.test_shuffle",
        "dask.dataframe.tests.test_multi",
        "dask.dataframe.tests.test_groupby",
    ],
}

# Test functions (all their parameters) that CI leaves out for time alone: together about 13 of the
# dataframe group's 22 minutes on 2 cores, each a grid of the same merges and groupbys that the tests
# kept already run. They pass under forkmap_get; --everything runs them.
LONG_RUNNING = {
    "dask.dataframe.tests.test_multi": [
        "test_merge_by_index_patterns",
        "test_join_by_index_patterns",
        "test_merge_by_multiple_columns",
        "test_merge_asof_left_on_right_index",
    ],
    "dask.dataframe.tests.test_groupby": [
        "test_dataframe_aggregations_multilevel",
        "test_series_aggregations_multilevel",
        "test_split_apply_combine_on_series",
        "test_groupby_aggregate_categorical_observed",
    ],
}

# "module::test id" -> why it cannot pass when tasks run in other processes (see docs/scheduler.md).
# Each of these observes a side effect that a task has on an object in the caller's memory.
THREADS_ONLY: dict[str, str] = {
    "dask.bag.tests.test_bag::test_to_delayed_optimize_graph": (
        "counts calls of a monkeypatched dask.bag.core.reify in a closure (nonlocal counter); the "
        "calls happen in a child, whose counter is a copy"
    ),
    "dask.array.tests.test_array_core::test_store_delayed_target": (
        "the store targets are made by delayed tasks that also record them in a dict of the test "
        "(targs[key] = a); those tasks run in a child, so the test's dict stays empty"
    ),
    "dask.array.tests.test_array_core::test_store_locks_count_calls[True]": (
        "counts acquire/release calls of a lock object; the store calls run in the parent and are "
        "counted, but the load-back calls (return_stored=True) read the target in children, whose "
        "counters are copies"
    ),
}


def _test_id(item: pytest.Item) -> str:
    module = getattr(item, "module", None)
    return f"{getattr(module, '__name__', '?')}::{item.name}"


class Environment:
    """Make the run independent of dask's own pytest configuration, which ``-c /dev/null`` drops."""

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        try:
            import pytest_mock  # noqa: F401
        except ImportError:
            skip = pytest.mark.skip(reason="needs the mocker fixture: pytest-mock is not installed")
            for item in items:
                if "mocker" in getattr(item, "fixturenames", ()):
                    item.add_marker(skip)


class LeaveOut:
    """Deselect the ``LONG_RUNNING`` test functions (with every parameter)."""

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        keep, drop = [], []
        for item in items:
            module = getattr(getattr(item, "module", None), "__name__", "?")
            name = getattr(item, "originalname", item.name)
            (drop if name in LONG_RUNNING.get(module, ()) else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep


class ForkmapDefault:
    """A pytest plugin: the default scheduler is ``scheduler`` for the whole run."""

    def __init__(self, scheduler: str, modules: list[str]) -> None:
        self.scheduler = scheduler
        self.threads_only = {test: why for test, why in THREADS_ONLY.items() if test.split("::")[0] in modules}
        self._ctx: Any = None

    def pytest_configure(self, config: pytest.Config) -> None:
        import dask_forkmap._scheduler  # noqa: F401 - registers the "forkmap" name

        self._ctx = dask.config.set(scheduler=self.scheduler)
        self._ctx.__enter__()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if self.scheduler != "forkmap":
            return
        keep, drop = [], []
        for item in items:
            (drop if _test_id(item) in self.threads_only else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
        missing = set(self.threads_only) - {_test_id(item) for item in drop}
        if missing and not config.option.keyword:  # a -k run may not have collected them
            # dask renamed or dropped one: the list must not silently outlive its tests
            raise pytest.UsageError(f"THREADS_ONLY names tests that were not collected: {sorted(missing)}")

    def pytest_report_header(self) -> str:
        return f"default dask scheduler: {self.scheduler}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheduler", default="forkmap")
    parser.add_argument("--suites", choices=[*SUITES, "all"], default="all", help="which group of suites to run")
    parser.add_argument("--everything", action="store_true", help="include the LONG_RUNNING tests")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    modules = [m for group, names in SUITES.items() if args.suites in (group, "all") for m in names]
    pytest_args = [
        "--pyargs",
        *modules,
        # dask's own markers and options, not ours: run outside our setup.cfg
        "-c",
        "/dev/null",
        "--rootdir",
        ".",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfE",
        "-o",
        "timeout=300",
        # dask's own config turns warnings into errors; test_nanquantile_all_nan relies on it for
        # RuntimeWarning (pytest.raises(RuntimeWarning)). Only RuntimeWarning here: the others
        # need dask's list of exceptions, which lives in its (uninstalled) pyproject.toml.
        "-W",
        "error::RuntimeWarning",
        *args.pytest_args,
    ]
    plugins: list[object] = [Environment(), ForkmapDefault(args.scheduler, modules)]
    if not args.everything:
        plugins.append(LeaveOut())
    return int(pytest.main(pytest_args, plugins=plugins))


if __name__ == "__main__":
    sys.exit(main())
