"""Image transforms for the pixel-based methods (SOHO, SIMLA), as MMF processors.

Registered as ``image_transform`` (decoded PIL image -> normalised tensor) and
``left_right_swap`` (swaps "left" and "right" in a text)::

    processors:
      image_processor:
        type: image_transform
        params:
          preset: simla_pretrain        # see PRESETS; the keys below override it
          train:                        # used when the item says train=True
            size: 256                   # int or [h, w]
            crop: random_resized        # random_resized | resize
            scale: [0.2, 1.0]           # random resized crop: area fraction
            ratio: [0.75, 1.3333333]    #                      aspect ratio range
            hflip: 0.5                  # probability of a horizontal flip
            randaugment: {num_ops: 2, magnitude: 7, ...}   # or null
          eval:                         # used otherwise
            size: [256, 256]
          mean: [0.48145466, 0.4578275, 0.40821073]
          std: [0.26862954, 0.26130258, 0.27577711]

Input ``{"image": PIL.Image (RGB), "train": bool}``; output ``{"image": FloatTensor 3 x H x W,
"flipped": bool, "image_size": LongTensor [h, w]}``. ``image_size`` is the size of the picture
inside ``image``: they differ only with ``pad_to``, which pads (bottom/right, zeros after
normalisation) to a fixed canvas so that images of different aspect ratio (SOHO's shorter side
600 / longer side at most 1000) stack into one batch with MMF's collator; the model masks or trims
the padding with ``image_size``.

Geometry (``crop``):

* ``random_resized``: torchvision's ``RandomResizedCrop(size, scale, ratio)``;
* ``resize``: torchvision's ``Resize``; an int ``size`` is the shorter side, ``max_size`` caps the
  longer one (SOHO: 600 / 1000); ``[h, w]`` resizes to exactly that (ALBEF/SIMLA evaluation).

Horizontal flip: the decision is drawn here (``torch.rand``) and returned as ``flipped``, so the
dataset can swap "left"/"right" in the paired text (:func:`swap_left_right`). The flip happens
before RandAugment, as in ALBEF.

RandAugment is torchvision's ``RandAugment`` restricted to ``ops`` (:class:`OpSubsetRandAugment`).
``magnitude`` counts in ``num_magnitude_bins - 1`` steps (``num_magnitude_bins: 11`` gives ALBEF's
0..10 scale, where SIMLA uses 7). With ``op_probability < 1`` each of the ``num_ops`` draws is applied
with that probability (ALBEF: 0.5). ALBEF/SIMLA leave out the colour ops (Color, Contrast, Posterize,
Solarize); ``ops`` defaults to their list. Ranges are torchvision's (shear 0.3, rotation 30 degrees,
brightness/sharpness 1 +- 0.9, translation 150/331 of the side) except translation, which
``max_translate_pixels`` sets in pixels (ALBEF: 10); ALBEF's brightness/sharpness factor is
0.1 + 1.8 * level / 10 (not signed) - the one range this module does not reproduce.

All randomness comes from torch's global generator, which the trainer seeds per sample in
DataLoader workers (``mmf_multilevel.trainers.data.SeededDataset``).
"""
import copy
import functools
import re

import torch
from mmf.common.registry import registry
from mmf.datasets.processors.processors import BaseProcessor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ALBEF's RandomAugment op list, which SIMLA reuses ("RandAugment with color changes removed")
ALBEF_OPS = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)
ALBEF_RANDAUGMENT = {
    "num_ops": 2,
    "magnitude": 7,
    "num_magnitude_bins": 11,
    "ops": list(ALBEF_OPS),
    "op_probability": 0.5,
    "fill": 128,
    "max_translate_pixels": 10,
    "interpolation": "nearest",
}

PRESETS = {
    # SIMLA / ALBEF pre-training: 256 crops (SIMLA paper §2.5), CLIP normalisation
    "simla_pretrain": {
        "train": {"size": 256, "crop": "random_resized", "scale": [0.2, 1.0], "interpolation": "bicubic",
                  "hflip": 0.5, "randaugment": ALBEF_RANDAUGMENT},
        "eval": {"size": [256, 256], "crop": "resize", "interpolation": "bicubic"},
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
    },
    # SIMLA / ALBEF fine-tuning at 384 (retrieval, VQA, NLVR2, SNLI-VE, grounding)
    "simla_finetune": {
        "train": {"size": 384, "crop": "random_resized", "scale": [0.5, 1.0], "interpolation": "bicubic",
                  "hflip": 0.5, "randaugment": ALBEF_RANDAUGMENT},
        "eval": {"size": [384, 384], "crop": "resize", "interpolation": "bicubic"},
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
    },
    # SOHO: shorter side 600, longer at most 1000 (SOHO paper §4.1); no augmentation is stated,
    # and flips are off because captions say left/right. ImageNet normalisation: not in the paper.
    "soho": {
        "train": {"size": 600, "max_size": 1000, "crop": "resize", "interpolation": "bilinear", "hflip": 0.0,
                  "randaugment": None, "pad_to": [1000, 1000]},
        "eval": {"size": 600, "max_size": 1000, "crop": "resize", "interpolation": "bilinear",
                 "pad_to": [1000, 1000]},
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    },
    # no preset: plain 224 pipelines with ImageNet statistics
    "default": {
        "train": {"size": 224, "crop": "random_resized", "scale": [0.08, 1.0], "interpolation": "bilinear",
                  "hflip": 0.5, "randaugment": None},
        "eval": {"size": [224, 224], "crop": "resize", "interpolation": "bilinear"},
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    },
}

TRAIN_KEYS = {"size", "crop", "scale", "ratio", "interpolation", "max_size", "hflip", "randaugment", "pad_to", "antialias"}
EVAL_KEYS = {"size", "crop", "interpolation", "max_size", "pad_to", "antialias"}
RANDAUGMENT_KEYS = {"num_ops", "magnitude", "num_magnitude_bins", "ops", "op_probability", "fill",
                    "max_translate_pixels", "interpolation"}


class ImageTransformConfigError(ValueError):
    """A bad ``image_transform`` setting (the message names the key)."""


def _plain(config):
    if config is None:
        return None
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, (DictConfig, ListConfig)):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return copy.deepcopy(config)


def _interpolation(name, where):
    if isinstance(name, InterpolationMode):
        return name
    try:
        return InterpolationMode(str(name).lower())
    except ValueError:
        choices = ", ".join(m.value for m in InterpolationMode)
        raise ImageTransformConfigError(f"{where}: unknown interpolation {name!r} (one of {choices})") from None


def _size(value, where):
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return [int(value[0]), int(value[1])]
    raise ImageTransformConfigError(f"{where}: expected a positive int or [height, width], got {value!r}")


def _pair(value, where, low=None, high=None):
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ImageTransformConfigError(f"{where}: expected [min, max], got {value!r}")
    a, b = float(value[0]), float(value[1])
    if a > b or (low is not None and a < low) or (high is not None and b > high):
        raise ImageTransformConfigError(f"{where}: expected min <= max within [{low}, {high}], got {value!r}")
    return (a, b)


# --------------------------------------------------------------------------- RandAugment
def _pixel_range(limit, num_bins, height, width):
    return torch.linspace(0.0, limit, num_bins)


class OpSubsetRandAugment(v2.RandAugment):
    """torchvision's RandAugment drawing only from ``ops``; translation optionally capped in pixels."""

    def __init__(self, ops=ALBEF_OPS, max_translate_pixels=None, **kwargs):
        super().__init__(**kwargs)
        space = v2.RandAugment._AUGMENTATION_SPACE
        unknown = [op for op in ops if op not in space]
        if unknown or not ops:
            raise ImageTransformConfigError(
                f"randaugment.ops: unknown op(s) {unknown} (torchvision's RandAugment has {sorted(space)})"
                if unknown else "randaugment.ops: empty"
            )
        self.ops = tuple(ops)
        self.max_translate_pixels = None if max_translate_pixels is None else float(max_translate_pixels)
        self._AUGMENTATION_SPACE = self._space()

    def _space(self):
        # an instance attribute: the class's table is left as torchvision has it
        space = dict(v2.RandAugment._AUGMENTATION_SPACE)
        if self.max_translate_pixels is not None:
            magnitudes = functools.partial(_pixel_range, self.max_translate_pixels)
            space["TranslateX"] = (magnitudes, True)
            space["TranslateY"] = (magnitudes, True)
        return {op: space[op] for op in self.ops}

    # the table holds torchvision's lambdas: rebuilt after unpickling (spawned DataLoader workers)
    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_AUGMENTATION_SPACE", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._AUGMENTATION_SPACE = self._space()

    def extra_repr(self):
        return f"num_ops={self.num_ops}, magnitude={self.magnitude}/{self.num_magnitude_bins - 1}, ops={list(self.ops)}"


def build_randaugment(config, where="randaugment"):
    """A transform from a ``randaugment`` setting (see the module docstring), or None."""
    if not config:
        return None
    config = dict(config)
    unknown = set(config) - RANDAUGMENT_KEYS
    if unknown:
        raise ImageTransformConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(RANDAUGMENT_KEYS)})")
    num_ops = int(config.get("num_ops", 2))
    bins = int(config.get("num_magnitude_bins", 11))
    magnitude = int(config.get("magnitude", 7))
    if num_ops < 0:
        raise ImageTransformConfigError(f"{where}.num_ops must be >= 0, got {num_ops}")
    if not 0 <= magnitude < bins:
        raise ImageTransformConfigError(f"{where}.magnitude must be in [0, num_magnitude_bins - 1 = {bins - 1}], got {magnitude}")
    probability = float(config.get("op_probability", 1.0))
    if not 0.0 <= probability <= 1.0:
        raise ImageTransformConfigError(f"{where}.op_probability must be in [0, 1], got {probability}")
    fill = config.get("fill")
    if isinstance(fill, (list, tuple)):
        fill = [float(v) for v in fill]
    common = dict(
        ops=tuple(config.get("ops") or ALBEF_OPS),
        max_translate_pixels=config.get("max_translate_pixels"),
        magnitude=magnitude,
        num_magnitude_bins=bins,
        interpolation=_interpolation(config.get("interpolation", "nearest"), f"{where}.interpolation"),
        fill=fill,
    )
    if num_ops == 0:
        return None
    if probability >= 1.0:
        return OpSubsetRandAugment(num_ops=num_ops, **common)
    # ALBEF draws num_ops ops with replacement and applies each with a probability: the same as
    # num_ops single-op RandAugments, each kept with that probability
    return v2.Compose([v2.RandomApply([OpSubsetRandAugment(num_ops=1, **common)], p=probability) for _ in range(num_ops)])


# --------------------------------------------------------------------------- pipelines
class ImagePipeline:
    """One pipeline: geometry, optional flip and RandAugment, tensor + normalisation, optional padding.

    ``pipeline(pil_image) -> (tensor 3 x H x W float32, flipped: bool, (h, w) of the content)``.
    """

    def __init__(self, config, mean, std, train, where):
        allowed = TRAIN_KEYS if train else EVAL_KEYS
        unknown = set(config) - allowed
        if unknown:
            raise ImageTransformConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(allowed)})")
        self.where = where
        self.train = train
        size = _size(config.get("size", 224), f"{where}.size")
        crop = config.get("crop", "random_resized" if train else "resize")
        interpolation = _interpolation(config.get("interpolation", "bicubic"), f"{where}.interpolation")
        antialias = bool(config.get("antialias", True))
        max_size = config.get("max_size")
        if crop == "random_resized":
            if not train:
                raise ImageTransformConfigError(f"{where}.crop: random_resized is a training crop; use resize")
            scale = _pair(config.get("scale", [0.08, 1.0]), f"{where}.scale", 0.0, 1.0)
            ratio = _pair(config.get("ratio", [3 / 4, 4 / 3]), f"{where}.ratio", 0.0)
            self.geometry = v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=interpolation, antialias=antialias)
        elif crop == "resize":
            if max_size is not None and not isinstance(size, int):
                raise ImageTransformConfigError(f"{where}.max_size needs an int size (the shorter side), got size={size}")
            self.geometry = v2.Resize(size, interpolation=interpolation, max_size=max_size, antialias=antialias)
        else:
            raise ImageTransformConfigError(f"{where}.crop: expected random_resized or resize, got {crop!r}")
        self.hflip = float(config.get("hflip", 0.0)) if train else 0.0
        if not 0.0 <= self.hflip <= 1.0:
            raise ImageTransformConfigError(f"{where}.hflip must be a probability in [0, 1], got {self.hflip}")
        self.randaugment = build_randaugment(config.get("randaugment"), f"{where}.randaugment") if train else None
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise ImageTransformConfigError(f"mean/std: expected 3 values each (std > 0), got mean={mean} std={std}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        # (x / 255 - mean) / std as one multiply-add from uint8, written straight into the (padded) output
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        self._bias = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)
        pad_to = config.get("pad_to")
        self.pad_to = None if pad_to is None else _size(list(pad_to), f"{where}.pad_to")
        if isinstance(self.pad_to, int):
            self.pad_to = [self.pad_to, self.pad_to]

    def __call__(self, image):
        image = self.geometry(image)
        flipped = False
        if self.hflip > 0.0 and float(torch.rand(())) < self.hflip:
            image = F.horizontal_flip(image)
            flipped = True
        if self.randaugment is not None:
            image = self.randaugment(image)
        pixels = F.pil_to_tensor(image) if not isinstance(image, torch.Tensor) else image
        pixels = pixels.as_subclass(torch.Tensor)
        if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ValueError(f"{self.where}: expected an RGB image, got a {tuple(pixels.shape)} {pixels.dtype} tensor")
        h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
        if self.pad_to is None:
            tensor = torch.empty((3, h, w), dtype=torch.float32)
            content = tensor
        else:
            ph, pw = self.pad_to
            if h > ph or w > pw:
                raise ValueError(f"{self.where}: a {h}x{w} image does not fit pad_to={self.pad_to} (raise pad_to)")
            tensor = torch.zeros((3, ph, pw), dtype=torch.float32)  # padding: 0 after normalisation
            content = tensor[:, :h, :w]
        torch.addcmul(self._bias, pixels, self._scale, out=content)
        return tensor, flipped, (h, w)

    def __repr__(self):
        parts = [repr(self.geometry)]
        if self.hflip:
            parts.append(f"hflip(p={self.hflip})")
        if self.randaugment is not None:
            parts.append(repr(self.randaugment))
        parts.append(f"Normalize(mean={self.mean}, std={self.std})")
        if self.pad_to:
            parts.append(f"pad_to({self.pad_to})")
        return f"ImagePipeline[{'train' if self.train else 'eval'}](" + ", ".join(parts) + ")"


def resolve_image_config(params):
    """The effective ``{"train", "eval", "mean", "std"}`` of ``image_transform`` params (preset + overrides)."""
    params = _plain(params) or {}
    name = params.get("preset") or "default"
    if name not in PRESETS:
        raise ImageTransformConfigError(f"image_transform.preset: unknown preset {name!r} (one of {sorted(PRESETS)})")
    resolved = copy.deepcopy(PRESETS[name])
    unknown = set(params) - {"preset", "train", "eval", "mean", "std"}
    if unknown:
        raise ImageTransformConfigError(f"image_transform: unknown key(s) {sorted(unknown)} (known: preset, train, eval, mean, std)")
    for part in ("train", "eval"):
        override = params.get(part) or {}
        if not isinstance(override, dict):
            raise ImageTransformConfigError(f"image_transform.{part}: expected a mapping, got {override!r}")
        for key, value in override.items():
            if key == "randaugment" and isinstance(value, dict) and isinstance(resolved[part].get(key), dict):
                merged = dict(resolved[part][key])
                merged.update(value)
                value = merged
            resolved[part][key] = value
    for key in ("mean", "std"):
        if params.get(key) is not None:
            resolved[key] = list(params[key])
    resolved["preset"] = name
    return resolved


def build_pipelines(params):
    """(train pipeline, eval pipeline) for ``image_transform`` params."""
    config = resolve_image_config(params)
    mean, std = config["mean"], config["std"]
    return (
        ImagePipeline(config["train"], mean, std, train=True, where="image_transform.train"),
        ImagePipeline(config["eval"], mean, std, train=False, where="image_transform.eval"),
    )


@registry.register_processor("image_transform")
class ImageTransformProcessor(BaseProcessor):
    """MMF processor: ``{"image": PIL, "train": bool}`` -> ``{"image", "flipped", "image_size"}``."""

    def __init__(self, config, *args, **kwargs):
        self.config = resolve_image_config(config)
        self.train_pipeline, self.eval_pipeline = build_pipelines(config)

    def __call__(self, item, *args, **kwargs):
        image = item["image"]
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        pipeline = self.train_pipeline if item.get("train", False) else self.eval_pipeline
        tensor, flipped, (h, w) = pipeline(image)
        return {"image": tensor, "flipped": flipped, "image_size": torch.tensor([h, w], dtype=torch.long)}


# --------------------------------------------------------------------------- left/right
_LEFT_RIGHT = re.compile(r"\b(left|right)(most|ward|wards)?\b", re.IGNORECASE)


def _swap_word(match):
    word = match.group(1)
    other = "right" if word.lower() == "left" else "left"
    if word.isupper() and len(word) > 1:
        other = other.upper()
    elif word[0].isupper():
        other = other.capitalize()
    return other + (match.group(2) or "")


def swap_left_right(text):
    """``text`` with the whole words left/right (and -most/-ward/-wards) swapped, keeping their case.

    "The dog on the Left, RIGHT of the leftmost cup" -> "The dog on the Right, LEFT of the rightmost
    cup". "bright", "leftover" and "left_side" are left alone. It cannot tell the verb ("she left")
    or "right" as in "all right" from the direction; captions that use them are rare.
    """
    if not isinstance(text, str):
        raise TypeError(f"swap_left_right expects a string, got {type(text).__name__}")
    return _LEFT_RIGHT.sub(_swap_word, text)


@registry.register_processor("left_right_swap")
class LeftRightSwapProcessor(BaseProcessor):
    """MMF processor: ``{"text": str | [str], "flipped": bool}`` -> the same with left/right swapped when flipped.

    ``params.enabled`` (default true) switches it off without changing the config's structure.
    """

    def __init__(self, config=None, *args, **kwargs):
        params = _plain(config) or {}
        self.enabled = bool(params.get("enabled", True))

    def __call__(self, item, *args, **kwargs):
        out = dict(item)
        if self.enabled and item.get("flipped", False):
            text = item["text"]
            out["text"] = [swap_left_right(t) for t in text] if isinstance(text, (list, tuple)) else swap_left_right(text)
        return out
