"""dask_forkmap's defaults in ``dask.config``, under the ``forkmap.`` namespace.

The defaults ship as ``forkmap.yaml`` beside this file and are registered with
:func:`dask.config.update_defaults`, the way dask and distributed register theirs, so that
``dask.config.set``, ``DASK_FORKMAP__*`` environment variables and YAML files under
``~/.config/dask`` all work.
"""

from __future__ import annotations

import pathlib
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = pathlib.Path(__file__).with_name("forkmap.yaml")

with _DEFAULTS_FILE.open() as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(DEFAULTS)


def get(key: str) -> Any:
    """The current value of ``forkmap.<key>``, or its shipped default.

    The default matters where the configuration was replaced wholesale after import: a Nanny hands
    its worker a snapshot of its own ``dask.config``, and test utilities restore an earlier one.
    """
    return dask.config.get(f"forkmap.{key}", default=_default(key))


def _default(key: str) -> Any:
    node: Any = DEFAULTS["forkmap"]
    for part in key.split("."):
        node = node[part]
    return node
