"""One way to register generated variants with MMF's registry.

Named classes register with their decorator (``@registry.register_builder("vqa2")``). A family of
variants that differ only in a few class attributes (the caption corpora, the raw-image twins of the
tasks, the retrieval recall metrics, μ-VLA's pre-training datasets) is registered here, its names
written out at the call site::

    register_variants(registry.register_builder, CaptionBuilder, {
        "coco_captions": {"name": "coco_captions"},
        ...
    })
"""
import sys
from typing import Callable, Dict

__all__ = ["register_variants", "class_name"]


def class_name(name: str, suffix: str = "") -> str:
    """``coco_captions`` -> ``CocoCaptions`` + ``suffix``."""
    return "".join(part.title() for part in name.split("_")) + suffix


def register_variants(register: Callable, base: type, variants: Dict[str, dict], suffix: str = "") -> Dict[str, type]:
    """For each ``name: attributes``: a subclass of ``base`` with those class attributes, registered
    with ``register(name)`` (e.g. ``registry.register_builder``). Returns ``{name: class}``."""
    module = sys._getframe(1).f_globals.get("__name__", base.__module__)  # the module that registers them
    classes = {}
    for name, attributes in variants.items():
        cls = type(class_name(name, suffix), (base,), {"__module__": module, **attributes})
        classes[name] = register(name)(cls)
    return classes
