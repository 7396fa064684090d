"""Shared setup for the ForkIsolation tests: real clusters over loopback TCP only.

Test modules are named test_dist_*.py and helpers forkmap_dist_*.py: test directories have no
__init__.py (a tests/distributed package would shadow distributed itself), so basenames must be
unique across the whole tree.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

if importlib.util.find_spec("distributed") is None or not sys.platform.startswith("linux"):
    # ForkIsolation needs distributed; the tests read /proc and use pidfds.
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True, scope="session")
def _reaper_started_before_tests():
    # dask_forkmap's reaper is a process-wide daemon thread started at the first fork. Start it now, so
    # that gen_cluster's thread-leak check does not count it against whichever test forks first.
    from dask_forkmap import fork_map

    fork_map(int)
