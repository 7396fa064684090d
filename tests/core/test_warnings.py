"""Warnings raised in a child are re-emitted in the parent as if the task had run in process."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dask_forkmap import ForkExecutor, fork_map


def warn_user() -> int:
    warnings.warn("watch out", UserWarning, stacklevel=1)
    return 1


class CustomWarning(UserWarning):
    pass


def warn_custom() -> None:
    warnings.warn(CustomWarning("custom"), stacklevel=1)


def test_pytest_warns_sees_child_warnings() -> None:
    with pytest.warns(UserWarning, match="watch out") as record:
        assert fork_map(warn_user) == 1
    assert record[0].filename == __file__
    assert record[0].lineno == warn_user.__code__.co_firstlineno + 1


def test_custom_categories_keep_their_class() -> None:
    with pytest.warns(CustomWarning, match="custom"):
        fork_map(warn_custom)


def test_numpy_runtime_warnings() -> None:
    with pytest.warns(RuntimeWarning, match="divide by zero"):
        fork_map(lambda: np.log(np.zeros(3)))


def test_error_filter_raises_in_the_task() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match="watch out"):
            fork_map(warn_user)


def test_ignore_filter_drops_them() -> None:
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("ignore")
        fork_map(warn_user)
    assert log == []


def test_default_action_shows_a_location_once_across_children() -> None:
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("default")
        with ForkExecutor(2) as ex:
            list(ex.map(lambda _: warn_user(), range(6)))
        fork_map(warn_user)
    assert [str(w.message) for w in log] == ["watch out"]
