"""One folder per method (``methods/<method>/``), on the adapter base (``base.py``) and the batch
contract (``batch.py``). Importing this package loads nothing heavy and no MMF.

A method is found by walking this package: every sub-package with a ``model.py`` is a method, and
:func:`register_all` imports its ``model`` (which registers the adapter with MMF) and its ``data``
(method-only datasets) when it has one. Adding a method is adding a folder.
"""
import importlib
import os
import pkgutil
from typing import List

__all__ = ["method_names", "register_all"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def method_names() -> List[str]:
    """The method folders, sorted (a folder is a method when it holds ``model.py``)."""
    return sorted(
        info.name for info in pkgutil.iter_modules([_HERE])
        if info.ispkg and os.path.isfile(os.path.join(_HERE, info.name, "model.py"))
    )


def register_all() -> List[str]:
    """Import every method's ``model`` (and ``data`` when present); needs MMF. Returns the names."""
    names = method_names()
    for name in names:
        importlib.import_module(f"{__name__}.{name}.model")
        if os.path.isfile(os.path.join(_HERE, name, "data.py")):
            importlib.import_module(f"{__name__}.{name}.data")
    return names
