"""The user's own code, named in a study file as ``"package.module:function"``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def check_reference(path: str) -> None:
    """Raise ValueError unless ``path`` names an importable callable."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure is the user's to see
        raise ValueError(f"cannot import {module_name!r}: {err}") from None
    if not callable(getattr(module, attr, None)):
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")


def resolve(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the callable."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)
