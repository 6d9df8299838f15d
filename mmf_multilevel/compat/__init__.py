"""The one place that adapts MMF 1.0.0rc10 to Python 3.11, torch 2.x, transformers 4.x
and omegaconf 2.3+.

Nothing here is imported eagerly except :mod:`._bootstrap` (a stdlib-only import
hook). Every patch lives in :mod:`.patches`, names the MMF file and line it serves,
checks whether the installed MMF still needs it, and stays off otherwise.
``python -m mmf_multilevel.compat`` prints which patches are active.
"""


def install():
    """Activate the import hook (normally done by the installed ``.pth`` file)."""
    from mmf_multilevel.compat import _bootstrap

    return _bootstrap.install()


def status():
    """Mapping of patch name -> ``"applied"`` / ``"not needed"`` / ``"pending"``."""
    from mmf_multilevel.compat import patches

    return patches.status()
