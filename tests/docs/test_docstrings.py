"""The examples in the public API's docstrings (what docs/api.rst shows) run and print what they say."""

from __future__ import annotations

import doctest

import pytest

import dask_forkmap

PUBLIC = [*dask_forkmap.__all__, "ForkIsolation", "WorkerInfo", "WorkerNotAvailable", "worker_info"]


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    found: dict[str, doctest.DocTest] = {}
    for name in PUBLIC:
        obj = getattr(dask_forkmap, name)
        for test in finder.find(obj, f"dask_forkmap.{name}", globs={}):
            if test.examples:
                found.setdefault(test.name, test)
    return sorted(found.values(), key=lambda test: test.name)


DOCTESTS = _doctests()


def test_docstring_examples_are_found():
    names = {test.name for test in DOCTESTS}
    assert {"dask_forkmap.fork_map", "dask_forkmap.with_limits", "dask_forkmap.ForkExecutor"} <= names


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_children_left")
@pytest.mark.parametrize("test", DOCTESTS, ids=[test.name for test in DOCTESTS])
def test_docstring_examples(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert not runner.failures, "".join(report)
