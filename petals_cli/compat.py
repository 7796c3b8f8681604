"""What differs between the transformers releases petals supports, in one place.

petals runs transformers' own models, so it follows their calling conventions. Those move: transformers 5.24
renamed the attention-cache argument of every model's ``forward`` and of ``generate()`` from ``past_key_values``
to ``cache`` (the old name still works there, with a deprecation warning, until 5.40), and the cache field of
model outputs with it. Every caller in petals passes and reads the cache through this module, which asks the
installed transformers which name it uses (a feature probe, not a version check).

It also knows the window of transformers releases the test suite last passed on (``TESTED_TRANSFORMERS``, kept
equal to the oldest release ``pyproject.toml`` allows and the one ``constraints.txt`` pins) and warns, once, when
the installed release lies outside it. This module imports transformers but nothing of petals.
"""

from __future__ import annotations

import functools
import inspect
import logging

import transformers
from packaging.version import Version
from transformers.modeling_outputs import BaseModelOutputWithPast

logger = logging.getLogger(__name__)

TESTED_TRANSFORMERS = ("5.17.0", "5.24.0")  # oldest and newest release the suite passed on
_OLD_NAME, _NEW_NAME = "past_key_values", "cache"


def _outputs_use_new_name() -> bool:
    return _NEW_NAME in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {})


CACHE_NAME = _NEW_NAME if _outputs_use_new_name() else _OLD_NAME
"""The name under which this transformers passes an attention cache to ``generate()`` and to models."""


@functools.cache
def cache_name_of(forward) -> str:
    """The cache argument's name in a model's ``forward`` (a family may lag behind the library's rename)."""
    parameters = inspect.signature(forward).parameters
    if _NEW_NAME in parameters:
        return _NEW_NAME
    if _OLD_NAME in parameters:
        return _OLD_NAME
    return CACHE_NAME


def cache_kwargs(model, cache) -> dict:
    """Keyword arguments that hand ``cache`` to ``model`` (a transformers model) under the name it expects."""
    return {cache_name_of(type(model).forward): cache}


def find_cache(kwargs: dict):
    """The cache in a call's keyword arguments, whichever name the caller used (None when there is none)."""
    return next((kwargs[name] for name in (_NEW_NAME, _OLD_NAME) if kwargs.get(name) is not None), None)


def pop_cache(kwargs: dict):
    """Remove both names from a ``forward``'s keyword arguments and return the cache they held."""
    cache = find_cache(kwargs)
    for name in (_NEW_NAME, _OLD_NAME):
        kwargs.pop(name, None)
    return cache


def output_cache_kwargs(cache) -> dict:
    """Keyword arguments that put ``cache`` in a transformers model-output object."""
    return {CACHE_NAME: cache}


def transformers_version() -> str:
    return transformers.__version__


def outside_tested_window(version: str | None = None) -> bool:
    """Whether a transformers release lies outside the tested window (another minor or major, or older)."""
    installed = Version(version or transformers_version())
    oldest, newest = (Version(edge) for edge in TESTED_TRANSFORMERS)
    return installed < oldest or installed.release[:2] > newest.release[:2]


@functools.cache
def warn_if_untested() -> bool:
    """Log one warning line (once per process) when transformers is outside the tested window; never refuse."""
    if not outside_tested_window():
        return False
    oldest, newest = TESTED_TRANSFORMERS
    logger.warning(
        f"transformers {transformers_version()} is outside the range petals was tested with ({oldest} to {newest}); "
        f"outputs are checked at start-up, but if anything looks wrong install the tested versions: "
        f"pip install -c constraints.txt petals-cli"
    )
    return True
