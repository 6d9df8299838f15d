"""Adaptations that let detectron2's Python code run the region feature extractor today.

The extractor's detectors are detectron2 models. The only detectron2 the package registry
serves for Python 3.11 is the source distribution ``pb1-detectron2==0.6`` (detectron2 v0.6's
Python code, without its C++ sources), which ``scripts/install.sh`` installs without building
the extension. Faster R-CNN C4 does not need that extension (ROIAlign and NMS go through
torchvision), but two things break before a model can be built:

* ``detectron2._C`` is imported at module level by ``layers/deform_conv.py``,
  ``layers/roi_align_rotated.py`` and ``layers/rotated_boxes.py`` (all pulled in by
  ``detectron2.layers``), so ``import detectron2.modeling`` raises ``ImportError`` when the
  extension was not built. Patch ``extension_stub``: an empty stand-in module whose
  attributes raise an error naming the missing op. Off when a real ``_C`` exists (a
  detectron2 built from source).
* ``detectron2/data/transforms/transform.py`` (v0.6) uses ``PIL.Image.LINEAR``, removed in
  Pillow 10; the extractor imports ``detectron2.data`` only through ``detectron2.modeling``'s
  test-time-augmentation module. Patch ``pil_linear``: alias it to ``Image.BILINEAR`` (the
  same filter). Off when Pillow still has the name.

``apply()`` must run before the first ``import detectron2.*`` of a process; it is idempotent
and returns the status of each patch. ``status()`` reports them without applying anything.
"""
import importlib.util
import sys
import types

_STATUS = {}

INSTALL_HINT = (
    "the region feature extractor needs detectron2: run `bash scripts/install.sh` (it installs the "
    "pb1-detectron2 0.6 sources from the package registry), or build detectron2 from source"
)


class MissingDetectron2Extension(AttributeError):
    """An op of detectron2's C++ extension was used, but the extension is not built."""


class _ExtensionStub(types.ModuleType):
    """Stand-in for ``detectron2._C``: importable, every op raises a clear error."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingDetectron2Extension(
            f"detectron2._C.{name} is a C++ op of detectron2's extension, which is not built in this install "
            "(pb1-detectron2 sources without C++). The BUTD/VinVL C4 extractors do not use it; rotated boxes, "
            "deformable convolution and the C++ COCO evaluation need detectron2 built from source."
        )


def detectron2_available():
    """True if a ``detectron2`` package can be imported."""
    return importlib.util.find_spec("detectron2") is not None


def _has_real_extension():
    if "detectron2._C" in sys.modules:
        return not isinstance(sys.modules["detectron2._C"], _ExtensionStub)
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


def _patch_extension_stub():
    if _has_real_extension():
        return "not needed"
    if isinstance(sys.modules.get("detectron2._C"), _ExtensionStub):
        return "applied"
    stub = _ExtensionStub("detectron2._C", "stand-in for detectron2's unbuilt C++ extension (mmf_multilevel.compat.detectron2)")
    sys.modules["detectron2._C"] = stub
    parent = sys.modules.get("detectron2")
    if parent is not None:
        setattr(parent, "_C", stub)
    return "applied"


def _patch_pil_linear():
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return "not needed"
    Image.LINEAR = Image.BILINEAR
    return "applied"


_PATCHES = (
    ("extension_stub", "detectron2/layers/{deform_conv,roi_align_rotated,rotated_boxes}.py: `from detectron2 import _C`", _patch_extension_stub),
    ("pil_linear", "detectron2/data/transforms/transform.py (v0.6): `Image.LINEAR`, removed in Pillow 10", _patch_pil_linear),
)


def apply():
    """Apply the patches that are needed (idempotent); -> {name: "applied" | "not needed"}."""
    if not detectron2_available():
        raise ImportError(INSTALL_HINT)
    for name, _serves, func in _PATCHES:
        if _STATUS.get(name) != "applied":
            _STATUS[name] = func()
    return dict(_STATUS)


def status():
    """{name: (serves, state)} where state is "applied", "not needed" or "pending"."""
    return {name: (serves, _STATUS.get(name, "pending")) for name, serves, _ in _PATCHES}


def import_detectron2():
    """Apply the patches, import the detectron2 pieces the extractor uses and return the package."""
    apply()
    import detectron2
    import detectron2.modeling  # noqa: F401  (builds the registries)

    return detectron2
