"""One folder per method (``methods/<method>/``), on the adapter base (``base.py``) and the batch
contract (``batch.py``). Importing this package loads nothing heavy and no MMF.

A method is found by walking this package: every sub-package with a ``model.py`` is a method, and
:func:`register_all` imports its ``model`` (which registers the adapter with MMF) and its ``data``
(method-only datasets) when it has one. Adding a method is adding a folder.
"""
import importlib
import os
import pkgutil
import sys
from typing import List

__all__ = ["method_names", "register_all", "registration_pending"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_pending = False


def method_names() -> List[str]:
    """The method folders, sorted (a folder is a method when it holds ``model.py``)."""
    return sorted(
        info.name for info in pkgutil.iter_modules([_HERE])
        if info.ispkg and os.path.isfile(os.path.join(_HERE, info.name, "model.py"))
    )


def register_all() -> List[str]:
    """Import every method's ``model`` (and ``data`` when present); needs MMF. Returns the names.

    When MMF's import was started by ``methods/base.py`` itself (a program that imports a method's
    model before ``mmf``), the adapters cannot be defined yet: the registration is left pending and
    ``base.py`` finishes it at the end of its own import."""
    global _pending
    base = sys.modules.get(f"{__name__}.base")
    if base is not None and not hasattr(base, "MethodModel"):
        _pending = True
        return []
    _pending = False
    names = method_names()
    for name in names:
        importlib.import_module(f"{__name__}.{name}.model")
        if os.path.isfile(os.path.join(_HERE, name, "data.py")):
            importlib.import_module(f"{__name__}.{name}.data")
    return names


def registration_pending() -> bool:
    """Whether :func:`register_all` was called while ``base.py`` was still being imported."""
    return _pending
