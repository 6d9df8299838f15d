"""Import hook that adapts MMF rc10 the moment it is imported.

This module is imported from ``mmf_multilevel_hook.pth`` at every interpreter start,
so it imports nothing but the standard library and only installs a
``sys.meta_path`` finder. The finder wraps the loaders of ``mmf``/``mmf_cli``
modules; the real work (``mmf_multilevel.compat.patches``) runs only when a
program imports ``mmf``:

* before ``mmf/__init__.py`` runs, the import-level patches (module aliases,
  stand-ins) are applied, because rc10 imports its whole package tree at once;
* after each MMF module has executed, the patches that target that module are
  applied, before any other module can ``from … import`` the patched names;
* once ``mmf`` is fully imported, our components are registered in MMF's registry - at once, or,
  when a module of this package is what imported ``mmf`` (a program that imports, say, a method's
  model before ``mmf``), as soon as no module of this package is half-imported any more: the
  registration imports every module of the package, and a half-imported one would fail.

Set ``MMF_MULTILEVEL_DISABLE_HOOK=1`` to import a pristine MMF.
"""
import importlib.abc
import importlib.machinery
import os
import sys
import threading

_ROOTS = ("mmf", "mmf_cli")
_OWN = "mmf_multilevel"
_local = threading.local()
#: set while the plugin's registration waits for this package's modules to finish importing
_registration_deferred = False


def _is_target(fullname):
    return any(fullname == root or fullname.startswith(root + ".") for root in _ROOTS + (_OWN,))


def own_modules_initializing(exclude=None):
    """Names of this package's modules whose import is under way (``exclude`` left out)."""
    names = []
    for name, module in list(sys.modules.items()):
        if name == exclude or not (name == _OWN or name.startswith(_OWN + ".")):
            continue
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            names.append(name)
    return names


def defer_registration():
    global _registration_deferred
    _registration_deferred = True


def _registration_ready(fullname):
    """After a module of this package finished executing: run a deferred registration when no other
    module of the package is still half-imported."""
    global _registration_deferred
    if _registration_deferred and not own_modules_initializing(exclude=fullname):
        _registration_deferred = False
        from mmf_multilevel.compat import patches

        patches.register_plugin(deferred=True)


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to MMF's own loader and runs our patches around ``exec_module``."""

    def __init__(self, loader, fullname):
        self._loader = loader
        self._fullname = fullname

    def __getattr__(self, name):
        # get_data, get_filename, get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        if self._fullname == _OWN or self._fullname.startswith(_OWN + "."):
            self._loader.exec_module(module)
            _registration_ready(self._fullname)
            return
        from mmf_multilevel.compat import patches

        patches.before_module(self._fullname, module)
        self._loader.exec_module(module)
        patches.after_module(self._fullname, module)


class MMFImportHook(importlib.abc.MetaPathFinder):
    """Finds MMF modules with the other finders and wraps their loaders."""

    def find_spec(self, fullname, path=None, target=None):
        if not _is_target(fullname) or getattr(_local, "busy", False):
            return None
        _local.busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            _local.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, fullname)
        return spec


def install():
    """Put the hook first on ``sys.meta_path`` (idempotent). Returns True if active."""
    if os.environ.get("MMF_MULTILEVEL_DISABLE_HOOK", "") not in ("", "0"):
        return False
    if any(isinstance(f, MMFImportHook) for f in sys.meta_path):
        return True
    sys.meta_path.insert(0, MMFImportHook())
    already = [name for name in ("mmf",) if name in sys.modules]
    if already:
        # mmf was imported before the hook existed (e.g. the .pth file is missing):
        # apply what can still be applied to the loaded modules.
        from mmf_multilevel.compat import patches

        patches.apply_to_loaded_modules()
    return True


install()
