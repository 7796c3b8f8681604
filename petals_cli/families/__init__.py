"""Model families: a registry keyed by transformers ``model_type``, extensible through entry points.

Built-in families register exactly as an outside package would: a module-level ``Family`` named in the
``petals.families`` entry-point group (see ``builtin.py`` and pyproject.toml). An outside package adds::

    [project.entry-points."petals.families"]
    mymodel = "my_package.petals_family:FAMILY"
"""

from __future__ import annotations

from importlib.metadata import entry_points

from petals_cli.errors import UnsupportedModelError
from petals_cli.families.base import Family

ENTRY_POINT_GROUP = "petals.families"
_registry: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    for model_type in family.model_types:
        _registry[model_type] = family
    return family


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    from petals_cli.families import builtin

    for family in builtin.FAMILIES:
        register(family)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.value.startswith("petals_cli.families.builtin"):
            continue
        loaded = entry_point.load()
        for family in loaded if isinstance(loaded, (list, tuple)) else [loaded]:
            register(family)
    _loaded = True


def supported_model_types() -> list[str]:
    _load_entry_points()
    return sorted(_registry)


def family_for(config) -> Family:
    """The family adapter for a transformers config; a clear error when there is none."""
    _load_entry_points()
    model_type = getattr(config, "model_type", None)
    if model_type not in _registry:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return _registry[model_type]


__all__ = ["Family", "family_for", "register", "supported_model_types"]
