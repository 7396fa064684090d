"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest
from procs import child_pids


@pytest.fixture
def no_children_left():
    """Fail the test if it leaves a child process behind (after background reaping settles)."""
    from dask_forkmap import _core

    before = child_pids()
    yield
    assert _core._reaper.wait(timeout=30), f"children still unreaped: {_core._reaper.pending()}"
    left = child_pids() - before
    assert not left, f"child processes left behind: {sorted(left)}"
