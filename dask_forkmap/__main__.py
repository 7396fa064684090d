"""``python -m dask_forkmap``: the same commands as ``dask forkmap`` (``demo``, ``bench``); alone, the demo."""

from __future__ import annotations

from ._cli import forkmap

if __name__ == "__main__":
    forkmap(prog_name="python -m dask_forkmap")
