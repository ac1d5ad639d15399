"""The user's own code, named in a study file as ``"package.module:function"``.

hpsearch always calls user code by this reference, never by a pickled function object: the
workers, the report's seed retrains (fresh interpreters) and ``load_best_model`` (any later
process; the checkpoint records the model factory's reference) each import it anew. So a user
function must be a module-level function (or class) of a module that Python can import by
name: not a lambda, not a function defined inside another, not one defined in ``__main__`` (a
script run directly, or a notebook).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from hpsearch.errors import ConfigError

# Modules a fresh interpreter cannot import the user's functions from.
_MAIN_MODULES = ("__main__", "__mp_main__")
IMPORTABLE_RULE = (
    "hpsearch calls user code by its \"package.module:function\" reference, imported anew in "
    "each worker, in the report's seed retrains and by load_best_model (checkpoints record the "
    "model factory's reference), so it must be a module-level function or class of an "
    "importable module: move it into a .py file on the Python path (the working folder, "
    "PYTHONPATH or an installed package) and import it from there"
)


def reference_of(fn: Callable[..., Any]) -> str:
    """The ``"package.module:function"`` reference of a module-level function or class.

    Raises:
        ValueError: ``fn`` cannot be imported back by name (a lambda, a nested function, a
            method, a ``functools.partial``, a callable object, or anything defined in
            ``__main__``); the message names it and says how to fix it.
    """
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    shown = f"{module}.{qualname}" if module and qualname else repr(fn)
    if not (inspect.isfunction(fn) or inspect.isclass(fn) or inspect.isbuiltin(fn)):
        why = f"{shown} is a {type(fn).__name__} object, not a function or class"
    elif qualname == "<lambda>":
        why = f"{shown} is a lambda"
    elif qualname and "<locals>" in qualname:
        why = f"{shown} is defined inside another function"
    elif module in _MAIN_MODULES or module is None:
        why = (f"{qualname or shown} is defined in {module or 'no module'} (a script run "
               "directly, or a notebook), which other processes cannot import")
    elif qualname is None or "." in qualname:
        why = f"{shown} is not a module-level function or class"
    else:
        reference = f"{module}:{qualname}"
        try:
            found = getattr(importlib.import_module(module), qualname, None)
        except Exception as err:  # any import-time failure is the user's to see
            found, why = None, f"{reference}: cannot import {module!r}: {err}"
        else:
            why = (f"{reference} does not name {shown} (the module's attribute is another "
                   "object)")
        if found is fn:
            return reference
    raise ValueError(f"{why}. {IMPORTABLE_RULE}")


def references_in(study: Any, source: str, path: tuple[str, ...] = ()) -> Any:
    """A copy of a study mapping with every callable replaced by its reference, wherever it
    stands (a model factory, the data factory, a loss, a metric, a callback...).

    Raises:
        ConfigError: A callable cannot be imported back by name (see :func:`reference_of`);
            the message names ``source`` and the key (``model.architecture.mine.factory``).
    """
    if isinstance(study, dict):
        return {k: references_in(v, source, (*path, str(k))) for k, v in study.items()}
    if isinstance(study, (list, tuple)):
        return [references_in(v, source, (*path, str(i))) for i, v in enumerate(study)]
    if callable(study):
        try:
            return reference_of(study)
        except ValueError as err:
            raise ConfigError(source, ".".join(path), str(err)) from None
    return study


def check_reference(path: str) -> None:
    """Raise ValueError unless ``path`` names an importable callable."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not of the form 'package.module:function'")
    if module_name in _MAIN_MODULES:
        raise ValueError(f"{path!r} names {module_name}, which other processes cannot "
                         f"import. {IMPORTABLE_RULE}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure is the user's to see
        raise ValueError(_import_problem(path, module_name, err)) from None
    if not callable(getattr(module, attr, None)):
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")


def resolve(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the callable.

    Raises:
        ImportError: The module (or one it needs) cannot be imported here, or has no such
            attribute; the message names the module and how to make it importable.
    """
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise type(err)(_import_problem(path, module_name, err), name=err.name) from err
    try:
        return getattr(module, attr)
    except AttributeError:
        where = getattr(module, "__file__", None) or module_name
        raise ImportError(f"{path}: module {module_name!r} ({where}) has no {attr!r}; was it "
                          "renamed since the study ran?", name=module_name) from None


def _import_problem(path: str, module_name: str, err: Exception) -> str:
    """Why ``module_name`` (of the reference ``path``) cannot be imported, and the fix."""
    missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    if missing is None:
        return f"cannot import {module_name!r} (for {path}): {type(err).__name__}: {err}"
    top = module_name.split(".")[0]
    if missing == module_name or module_name.startswith(missing + "."):
        return (f"cannot import {module_name!r} (for {path}): no module named {missing!r} on "
                f"this Python's path. Make it importable: run Python from the folder that "
                f"holds {top}.py (or the package folder {top}/), add that folder to PYTHONPATH "
                "(or sys.path), or pip install the package that provides it")
    return (f"cannot import {module_name!r} (for {path}): it needs {missing!r}, which is not "
            f"installed here (pip install the package that provides {missing!r})")
