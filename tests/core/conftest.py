from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_children_left(no_children_left):
    """Every core test must leave no child, zombie or not (checked by the shared fixture)."""
