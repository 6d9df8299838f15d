"""A picture of SOHO's visual dictionary on a few images: each grid cell coloured by the dictionary entry
its feature is assigned to (paper §3.2, Eq. 2: ``h_i = argmin_j ||v_i - d_j||``).

§4.4 (Figure 3) and Appendix A.3 (Figure 4) show what the dictionary learned by collecting, for a few
dictionary indices, the image patches assigned to them; this picture shows the other side of the same
assignment: per image, which index each patch (one cell = 64 x 64 pixels of the resized image, §3.1)
falls on, so patches of similar content sharing an index can be seen in place.

    python -m mmf_multilevel.methods.soho.picture --checkpoint save/soho_demo/pretrain/soho_final.pth \\
        --config projects/soho/demo/pretrain.yaml --dataset-split val --count 4 --out dictionary.png \\
        env.data_dir=$PWD/data
    python -m mmf_multilevel.methods.soho.picture --checkpoint soho_final.pth \\
        --config projects/soho/demo/pretrain.yaml --images a.jpg b.jpg --out dictionary.png

The model is built from the MMF config (its includes, the model's defaults and the ``key=value``
overrides given after the options, as ``mmf_run`` reads them; the ResNet's ImageNet weights are not
fetched, the checkpoint brings the weights). Each image goes through the image processor of the config's
dataset in its evaluation mode (the resize and normalisation of training without augmentation) and
:meth:`SOHONetwork.encode_image`; every cell is coloured by its dictionary id (one categorical colour per id
occurring in the picture, the same in every panel; grey: padding cells, which have no id), with the id
written in the cell while the grid is small.

The computation (:func:`cell_ids`: an ``(h, w)`` id array per image, :data:`PADDING` for padding cells) is
apart from the drawing (:func:`id_colours`, :func:`draw`), and both from the file (:func:`write_picture`:
a temporary file renamed onto the path).
"""
import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from mmf_multilevel.files import write_picture
from mmf_multilevel.methods.soho.network import GRID_STRIDE

__all__ = ["PADDING", "PADDING_COLOUR", "DICTIONARY_KEY", "PictureError", "cell_ids", "id_colours", "draw",
           "write_picture", "load_model", "image_processor", "dataset_images", "read_images", "batch_cell_ids",
           "network_picture", "encode_images", "predictor_signal", "main"]

#: the id of a padding cell (no picture pixel in it; the dictionary assigns it nothing)
PADDING = -1
#: the colour of padding cells (RGB in [0, 1])
PADDING_COLOUR = (0.5, 0.5, 0.5)
#: the state-dict key every SOHO network with a visual dictionary carries
DICTIONARY_KEY = "backbone.dictionary.embedding"
#: grids with at most this many cells get their ids written in the cells
NUMBERED_CELLS = 160


class PictureError(ValueError):
    """A bad input of the picture command (a missing file, a checkpoint or image that cannot be used)."""


# ---------------------------------------------------------------------------------------------- computation
@torch.no_grad()
def cell_ids(network, pixels: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None) -> List[np.ndarray]:
    """The dictionary id of every grid cell: ``pixels (B, 3, H, W)`` (``pixel_mask (B, H, W)``, True = picture)
    through ``network.encode_image`` -> one ``(h, w)`` int64 array per image, row-major as the grid, with
    :data:`PADDING` where a cell holds no picture pixel. The network is put in eval mode, so the dictionary
    neither initialises nor gathers update statistics."""
    network.eval()
    out = network.encode_image(pixels, pixel_mask, quantise=True)
    height, width = out["grid"]
    ids = out["ids"].masked_fill(~out["mask"], PADDING).view(-1, height, width)
    return [row.cpu().numpy().astype(np.int64) for row in ids]


# ---------------------------------------------------------------------------------------------- drawing
def id_colours(grids: Sequence[np.ndarray]) -> Dict[int, tuple]:
    """``{id: RGB in [0, 1]}`` for the ids occurring in ``grids`` (padding left out): a categorical
    matplotlib colormap (``tab20``, then ``tab20b`` and ``tab20c``: 60 colours) in increasing id order, so
    cells sharing an id share a colour in every panel; past 60 ids, evenly spaced hues of ``hsv``."""
    from matplotlib import colormaps

    ids = sorted({int(i) for grid in grids for i in np.unique(grid) if int(i) != PADDING})
    table = [colormaps[name].colors[j][:3] for name in ("tab20", "tab20b", "tab20c") for j in range(20)]
    if len(ids) > len(table):
        hsv = colormaps["hsv"]
        table = [tuple(hsv(j / len(ids))[:3]) for j in range(len(ids))]
    return {i: tuple(float(c) for c in table[n]) for n, i in enumerate(ids)}


def _composite(picture: np.ndarray, grid: np.ndarray, colours: Dict[int, tuple], alpha: float) -> np.ndarray:
    """The panel's pixels: ``picture`` (``h_img x w_img x 3`` uint8) on a canvas of the whole grid
    (``64 h x 64 w``), every cell blended with its id's colour (``alpha``); padding cells grey."""
    rows, cols = grid.shape
    canvas = np.empty((rows * GRID_STRIDE, cols * GRID_STRIDE, 3), dtype=np.float64)
    canvas[:] = PADDING_COLOUR
    height, width = min(picture.shape[0], canvas.shape[0]), min(picture.shape[1], canvas.shape[1])
    canvas[:height, :width] = picture[:height, :width, :3] / 255.0
    cell_colour = np.array([[colours.get(int(i), PADDING_COLOUR) for i in row] for row in grid], dtype=np.float64)
    overlay = np.repeat(np.repeat(cell_colour, GRID_STRIDE, axis=0), GRID_STRIDE, axis=1)
    weight = np.where((grid == PADDING)[..., None], 1.0, float(alpha))
    weight = np.repeat(np.repeat(weight, GRID_STRIDE, axis=0), GRID_STRIDE, axis=1)
    return (1.0 - weight) * canvas + weight * overlay


def draw(pictures: Sequence[np.ndarray], grids: Sequence[np.ndarray], names: Sequence[str],
         colours: Optional[Dict[int, tuple]] = None, alpha: float = 0.45, numbers: Optional[bool] = None,
         columns: int = 4, panel_inches: float = 4.0, dpi: int = 100):
    """A matplotlib figure, one panel per image: the picture (``pictures[i]``, the resized image the network
    read, ``H x W x 3`` uint8) under its cells (``grids[i]``, from :func:`cell_ids`) coloured by id
    (``colours``, default :func:`id_colours` over all grids) with opacity ``alpha``, padding cells grey,
    the id written in each real cell when ``numbers`` (default: grids of at most 160 cells), and a title
    with the image's name, the grid size and the number of distinct ids. A panel shows the picture's extent,
    or the whole grid when it has padding cells. Panel ``i`` is ``figure.axes[i]``; its data coordinates are
    the picture's pixels (x right, y down)."""
    from matplotlib import patheffects
    from matplotlib.figure import Figure

    if not len(pictures) == len(grids) == len(names) or not pictures:
        raise ValueError(f"draw needs one picture, grid and name per image, got {len(pictures)}, {len(grids)}, "
                         f"{len(names)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colours = id_colours(grids) if colours is None else colours
    columns = max(1, min(int(columns), len(pictures)))
    rows = math.ceil(len(pictures) / columns)
    figure = Figure(figsize=(panel_inches * columns, panel_inches * rows), dpi=dpi)
    for index, (picture, grid, name) in enumerate(zip(pictures, grids, names)):
        axes = figure.add_subplot(rows, columns, index + 1)
        grid_rows, grid_cols = grid.shape
        axes.imshow(_composite(np.asarray(picture), grid, colours, alpha), interpolation="nearest",
                    extent=(0, grid_cols * GRID_STRIDE, grid_rows * GRID_STRIDE, 0))
        distinct = len({int(i) for i in np.unique(grid)} - {PADDING})
        axes.set_title(f"{name}\n{grid_rows} x {grid_cols} grid, {distinct} distinct ids", fontsize=9)
        right, bottom = grid_cols * GRID_STRIDE, grid_rows * GRID_STRIDE
        if not (grid == PADDING).any():  # no padding cell: the picture alone (the last cells may reach past it)
            right, bottom = min(right, np.asarray(picture).shape[1]), min(bottom, np.asarray(picture).shape[0])
            axes.set_xlim(0, right)
            axes.set_ylim(bottom, 0)
        axes.set_xticks([])
        axes.set_yticks([])
        write = grid.size <= NUMBERED_CELLS if numbers is None else numbers
        if write:
            size = max(5, min(9, int(60 / max(grid_rows, grid_cols))))
            for r in range(grid_rows):
                for c in range(grid_cols):
                    if grid[r, c] != PADDING:  # in the middle of the cell's visible part
                        x = (c * GRID_STRIDE + min((c + 1) * GRID_STRIDE, right)) / 2
                        y = (r * GRID_STRIDE + min((r + 1) * GRID_STRIDE, bottom)) / 2
                        text = axes.text(x, y, str(int(grid[r, c])), ha="center", va="center", fontsize=size,
                                         color="white", clip_on=True)
                        text.set_path_effects([patheffects.withStroke(linewidth=1.5, foreground="black")])
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------------------------- inputs
def load_configuration(config_path: str, overrides: Sequence[str] = ()):
    """The MMF config ``mmf_run config=<config_path> <overrides>`` would run with (includes, the model's and
    the datasets' defaults), registered as MMF's global config."""
    from mmf_multilevel.compat.launcher import ConfigError, load_run_config

    if not os.path.isfile(config_path):
        raise PictureError(f"config not found: {config_path}")
    try:
        return load_run_config(config_path, overrides)
    except ConfigError as error:
        raise PictureError(str(error)) from None


def load_model(config, checkpoint: str):
    """The config's model (``model: soho``) built as MMF's trainer builds it, the ResNet without its
    ImageNet download, with the weights of ``checkpoint`` (an MMF ``.pth`` state dict or ``.ckpt``, read by
    :func:`mmf_multilevel.zoo.zoo.read_state`); in eval mode."""
    from mmf.utils.build import build_model
    from omegaconf import open_dict

    from mmf_multilevel.zoo.zoo import read_state

    if not os.path.isfile(checkpoint):
        raise PictureError(f"checkpoint not found: {checkpoint}")
    if config.get("model") != "soho":
        raise PictureError(f"the config's model is {config.get('model')!r}; the dictionary picture needs 'soho'")
    try:
        state = read_state(checkpoint)
    except ValueError as error:
        raise PictureError(str(error)) from None
    if DICTIONARY_KEY not in state:
        raise PictureError(f"{checkpoint}: not a SOHO pre-training checkpoint (it has no '{DICTIONARY_KEY}', the "
                           "visual dictionary)")
    attributes = config.model_config.soho
    with open_dict(attributes):
        attributes.model = "soho"
        attributes.backbone_pretrained = False  # the checkpoint brings the ResNet
    model = build_model(attributes)
    own = model.state_dict()
    shape = tuple(own[DICTIONARY_KEY].shape)
    if tuple(state[DICTIONARY_KEY].shape) != shape:
        raise PictureError(f"{checkpoint}: '{DICTIONARY_KEY}' is {tuple(state[DICTIONARY_KEY].shape)}, the config "
                           f"builds {shape} (model_config.soho.vd_size / hidden_size)")
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if key.startswith("backbone.")]
    if missing:
        raise PictureError(f"{checkpoint}: the network's {missing[:5]} are missing ({len(missing)} in all)")
    return model.eval()


def image_processor(config, dataset: Optional[str] = None):
    """``(dataset name, the image processor its config names)`` (MMF's ``Processor`` wrapper); ``dataset``
    defaults to the first of the config's ``datasets``."""
    from mmf.datasets.processors.processors import Processor

    names = [name.strip() for name in str(config.get("datasets") or "").split(",") if name.strip()]
    dataset = dataset or (names[0] if names else None)
    if not dataset or dataset not in config.dataset_config:
        raise PictureError(f"no dataset config for {dataset!r}: name one of {sorted(config.dataset_config)} with --dataset")
    processors = config.dataset_config[dataset].get("processors") or {}
    if "image_processor" not in processors:
        raise PictureError(f"dataset_config.{dataset}.processors has no image_processor")
    return dataset, Processor(processors.image_processor)


def read_images(paths: Sequence[str]):
    """``[(file name, RGB PIL image)]`` of image files; an error names the file that is missing or cannot
    be decoded."""
    from mmf_multilevel.images.sources import ImageDecodeError, decode_image

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise PictureError(f"image not found: {path}")
        with open(path, "rb") as handle:
            data = handle.read()
        try:
            images.append((os.path.basename(path), decode_image(data, path)))
        except ImageDecodeError as error:
            raise PictureError(str(error)) from None
    return images


def dataset_images(config, dataset: str, split: str, count: int):
    """``[(image id, RGB PIL image)]``: the first ``count`` distinct images of ``dataset``'s ``split``
    annotations, read from its image source as the dataset reads them."""
    from mmf_multilevel.datasets.annotations import read_jsonl
    from mmf_multilevel.datasets.base import data_path
    from mmf_multilevel.datasets.images import RawImageMixin

    settings = config.dataset_config[dataset]
    annotations = settings.get("annotations") or {}
    if split not in annotations:
        raise PictureError(f"dataset_config.{dataset}.annotations has no '{split}' split (has {sorted(annotations)})")

    class Images(RawImageMixin):
        dataset_name = dataset

    source = Images()
    try:
        source.init_images(settings, split)
    except FileNotFoundError as error:
        raise PictureError(str(error)) from None
    files = annotations[split]
    files = [files] if isinstance(files, str) else list(files)
    ids = []
    for name in files:
        path = data_path(name, settings.get("data_dir"))
        for record in read_jsonl(path, (source.image_field,)):
            image_id = str(record[source.image_field])
            if image_id not in ids:
                ids.append(image_id)
            if len(ids) == count:
                break
        if len(ids) == count:
            break
    return [(image_id, source.load_image(image_id)) for image_id in ids]


def batch_cell_ids(model, batch) -> List[np.ndarray]:
    """:func:`cell_ids` of a batch of processed images (``image`` ``(B, 3, H, W)`` and ``image_size``, as a raw-image
    dataset's batch holds them), through the batch contract SOHO reads them with."""
    from mmf_multilevel.methods.batch import pixel_inputs

    pixels = pixel_inputs(batch, "soho")
    return cell_ids(model.backbone, pixels.pixels, pixels.mask)


def network_picture(image, size) -> np.ndarray:
    """The picture the network read: ``image`` (a PIL image) resized to the processor's content ``size`` = (h, w),
    uint8."""
    from PIL import Image

    height, width = (int(v) for v in torch.as_tensor(size).view(2))
    return np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC))


def encode_images(model, processor, images):
    """``(pictures, grids)``: per image the resized picture the network read (uint8, the processor's
    content size) and its :func:`cell_ids` grid, each image on its own (its grid has no padding unless the
    processor pads)."""
    pictures, grids = [], []
    for _, image in images:
        out = processor({"image": image, "train": False})
        size = out["image_size"] if "image_size" in out else torch.tensor(out["image"].shape[-2:])
        grids.extend(batch_cell_ids(model, {"image": out["image"][None], "image_size": size.view(1, 2)}))
        pictures.append(network_picture(image, size))
    return pictures, grids


def predictor_signal(predictor, image=None, text=None, image_id=None):
    """SOHO's visual-dictionary ids (paper §3.2, Eq. 2) of the query image's grid cells for
    :mod:`mmf_multilevel.predict.signals`: :func:`batch_cell_ids` on the predictor's sample (the image through the
    dataset's evaluation pipeline), drawn by :func:`draw` over the picture the network read. The ids are the
    image's alone: ``text`` is not read. A model built without its dictionary (``use_vd: false``) has none."""
    from mmf_multilevel.predict.inputs import PredictInputError
    from mmf_multilevel.predict.signals import Signal

    model = predictor.model
    if not bool(model.settings.use_vd):
        raise PredictInputError("this soho model is built without its visual dictionary (model_config.soho.use_vd: "
                                "false): its cells have no dictionary ids (--picture draws its attention)")
    sample, query, _ = predictor._visual(image, image_id, "image")
    batch = predictor._batch([sample])
    with predictor._stage("model"):
        (grid,) = batch_cell_ids(model, batch)
    picture = network_picture(query.picture, sample.image_size)
    name = os.path.basename(query.where.split(" ", 1)[1]) if " " in query.where else "the image"
    source = (f"visual-dictionary id of each {GRID_STRIDE} x {GRID_STRIDE} cell of the resized image, of "
              f"{int(model.settings.vd_size)} entries (SOHO §3.2, Eq. 2)")
    ids, counts = np.unique(grid[grid != PADDING], return_counts=True)
    order = np.argsort(-counts, kind="stable")

    def table(top):
        rows = []
        for n in order:
            cells = np.argwhere(grid == ids[n])
            rows.append([int(ids[n]), int(counts[n]), "; ".join(f"{r},{c}" for r, c in cells.tolist())])
        return ["dictionary id", "cells", "cells (row, column)"], rows

    def summary(top):
        return {"method": predictor.method, "signal": source, "grid": list(grid.shape), "distinct": int(len(ids)),
                "ids": grid.tolist(), "padding": PADDING}

    width, height = query.picture.size
    return Signal(predictor.method, source, None, (int(width), int(height)), {"ids": grid, "picture": picture},
                  lambda top: draw([picture], [grid], [name]), table, summary)


# ---------------------------------------------------------------------------------------------- command
def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m mmf_multilevel.methods.soho.picture",
        description="Draw SOHO's visual dictionary ids on a few images: every grid cell coloured by the "
                    "dictionary entry its feature is assigned to (paper §3.2).",
        epilog="Trailing key=value arguments are MMF config overrides, as for mmf_run (e.g. env.data_dir=$PWD/data).")
    parser.add_argument("--checkpoint", required=True, help="a SOHO checkpoint (soho_final.pth, or an MMF .ckpt)")
    parser.add_argument("--config", required=True, help="the MMF config it was trained with (its model and image processor)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", nargs="+", metavar="IMAGE", help="image files")
    source.add_argument("--dataset-split", metavar="SPLIT", help="take images from this split of the config's dataset "
                        "(the default: val)")
    parser.add_argument("--count", type=int, default=4, help="how many images of the split (default 4)")
    parser.add_argument("--dataset", help="the dataset whose image processor (and split) to use (default: the "
                        "config's first)")
    parser.add_argument("--out", default="dictionary.png", help="the picture (default dictionary.png)")
    parser.add_argument("--alpha", type=float, default=0.45, help="opacity of the cell colours (default 0.45)")
    parser.add_argument("--columns", type=int, default=4, help="panels per row (default 4)")
    numbers = parser.add_mutually_exclusive_group()
    numbers.add_argument("--numbers", dest="numbers", action="store_true", default=None,
                         help="write the ids in the cells (default: grids of at most %d cells)" % NUMBERED_CELLS)
    numbers.add_argument("--no-numbers", dest="numbers", action="store_false", help="never write the ids")
    parser.add_argument("opts", nargs="*", metavar="key=value", help="MMF config overrides")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.count < 1:
        sys.exit("error: --count must be positive")
    bad = [opt for opt in args.opts if "=" not in opt]
    if bad:
        sys.exit(f"error: config overrides are key=value, got {bad}")
    try:
        if args.images:  # a missing image is named before the model is built
            read_images(args.images)
        config = load_configuration(args.config, args.opts)
        model = load_model(config, args.checkpoint)
        dataset, processor = image_processor(config, args.dataset)
        images = (read_images(args.images) if args.images
                  else dataset_images(config, dataset, args.dataset_split or "val", args.count))
        pictures, grids = encode_images(model, processor, images)
        figure = draw(pictures, grids, [name for name, _ in images], alpha=args.alpha, numbers=args.numbers,
                      columns=args.columns)
        write_picture(figure, args.out)
    except (PictureError, FileNotFoundError, KeyError) as error:
        sys.exit(f"error: {error}")
    used = len({int(i) for grid in grids for i in np.unique(grid)} - {PADDING})
    size = model.settings.vd_size
    print(f"{args.out}: {len(images)} images, {used} of the dictionary's {size} entries on their cells")
    return args.out


if __name__ == "__main__":
    main()
