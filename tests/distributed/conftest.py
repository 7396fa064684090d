"""Shared setup for the ForkIsolation tests: real clusters over loopback TCP only.

Test modules are named test_dist_*.py and helpers forkmap_dist_*.py: test directories have no
__init__.py (a tests/distributed package would shadow distributed itself), so basenames must be
unique across the whole tree.
"""

from __future__ import annotations

import importlib.util
import sys

if importlib.util.find_spec("distributed") is None or not sys.platform.startswith("linux"):
    # ForkIsolation needs distributed; the tests read /proc and use pidfds.
    collect_ignore_glob = ["test_*.py"]
