"""The reference pages agree with the code: configuration keys, errors, API entries."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import dask_forkmap
from dask_forkmap import ForkMapError

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
YAML_FILE = ROOT / "dask_forkmap" / "forkmap.yaml"

# Names importable from dask_forkmap besides __all__ (they need distributed, so are imported lazily).
LAZY_NAMES = ("ForkIsolation", "WorkerInfo", "WorkerNotAvailable", "worker_info")


def _flatten(node: dict, prefix: str) -> dict[str, object]:
    flat: dict[str, object] = {}
    for name, value in node.items():
        key = f"{prefix}.{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key))
        else:
            flat[key] = value
    return flat


def shipped_defaults() -> dict[str, object]:
    return _flatten(yaml.safe_load(YAML_FILE.read_text(encoding="utf-8"))["forkmap"], "forkmap")


def configuration_table() -> dict[str, object]:
    """``{key: default}`` from the table rows of docs/configuration.md."""
    rows = {}
    row = re.compile(r"^\|\s*`(?P<key>forkmap\.[^`]+)`\s*\|\s*`(?P<default>[^`]*)`\s*\|(?P<meaning>.*)\|\s*$")
    for line in (DOCS / "configuration.md").read_text(encoding="utf-8").splitlines():
        match = row.match(line)
        if match:
            assert match["key"] not in rows, f"{match['key']} is listed twice"
            assert match["meaning"].strip(), f"{match['key']} has no meaning"
            rows[match["key"]] = yaml.safe_load(match["default"])
    return rows


def test_configuration_page_matches_the_shipped_yaml():
    documented = configuration_table()
    shipped = shipped_defaults()
    assert sorted(documented) == sorted(shipped), "docs/configuration.md and forkmap.yaml list different keys"
    for key, default in shipped.items():
        assert documented[key] == default, f"{key}: the page says {documented[key]!r}, forkmap.yaml {default!r}"


def test_config_keys_named_in_the_docs_exist():
    """No page names a key (or an environment variable) that forkmap.yaml does not have."""
    shipped = shipped_defaults()
    known = set(shipped) | {key.rsplit(".", n)[0] for key in shipped for n in (1, 2)}
    canonical = {key.replace("_", "-") for key in known}
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        named = set(re.findall(r"`(forkmap(?:\.[A-Za-z0-9_-]+)+)", text))
        named |= {
            "forkmap." + var.lower().replace("__", ".")
            for var in re.findall(r"DASK_FORKMAP__([A-Z0-9_]+?)(?==|\b|-style)", text)
        }
        named.discard("forkmap.yaml")
        unknown = sorted(key for key in named if key.replace("_", "-") not in canonical)
        assert not unknown, f"{page.name} names configuration keys forkmap.yaml does not have: {unknown}"


def _error_classes() -> list[type[BaseException]]:
    from dask_forkmap import _errors

    classes = [getattr(_errors, name) for name in _errors.__all__]
    try:
        from dask_forkmap import WorkerNotAvailable
    except ImportError:  # pragma: no cover - distributed is part of the test extra
        pass
    else:
        classes.append(WorkerNotAvailable)
    return classes


def test_failures_page_lists_every_error():
    text = (DOCS / "failures.md").read_text(encoding="utf-8")
    missing = [cls.__name__ for cls in _error_classes() if f"`{cls.__name__}`" not in text]
    assert not missing, f"docs/failures.md does not mention {missing}"
    for cls in _error_classes():
        if cls.__name__ != "ChildTraceback":
            assert issubclass(cls, ForkMapError), cls


def test_api_page_documents_every_public_name():
    text = (DOCS / "api.rst").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. auto(?:function|class|exception)::\s*(\w+)\s*$", text, re.MULTILINE))
    public = set(dask_forkmap.__all__) | set(LAZY_NAMES)
    assert public <= documented, f"docs/api.rst lacks {sorted(public - documented)}"
    assert documented <= public, (
        f"docs/api.rst documents names dask_forkmap does not export: {sorted(documented - public)}"
    )
    assert set(_errors_all()) <= documented


def _errors_all() -> list[str]:
    from dask_forkmap import _errors

    return list(_errors.__all__)
