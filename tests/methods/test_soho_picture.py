"""The dictionary picture (mmf_multilevel/methods/soho/picture.py): the per-cell ids against the nearest
dictionary entry computed here from the grid features, padding cells marked, the colour drawn at every cell
centre of the written PNG equal to its id's colour, the model loaded through MMF's build from a checkpoint,
the command end to end on the demo config, and errors that name the file or the key."""
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mmf_multilevel.methods.batch import pixel_inputs
from mmf_multilevel.methods.soho import picture
from mmf_multilevel.methods.soho import testing as tiny
from mmf_multilevel.methods.soho.model import SOHO

pytestmark = pytest.mark.usefixtures("mmf_global_config")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model_config():
    return OmegaConf.merge(OmegaConf.load(SOHO.config_path()).model_config.soho, tiny.tiny_config("pretraining"))


@pytest.fixture(scope="module")
def trained():
    """A tiny pre-training SOHO whose dictionary is drawn at its features' scale (vd_init:
    feature_statistics, as pre-training's first forward does), and a padded batch of two images: the
    first fills 128 x 192 (2 x 3 cells), the second 64 x 128 (its row 0, columns 0-1 are real)."""
    from mmf.common.registry import registry

    previous = registry.get("config", no_warning=True)
    registry.register("config", OmegaConf.create({"evaluation": {"predict": False}, "training": {"update_frequency": 1}}))
    torch.manual_seed(0)
    model = SOHO(tiny_model_config())
    model.build()
    model.eval()
    pixels, sizes = tiny.images(2, torch.Generator().manual_seed(1))
    inputs = pixel_inputs({"image": pixels, "image_size": sizes}, "soho")
    with torch.no_grad():
        out = model.backbone.encode_image(inputs.pixels, inputs.mask, quantise=False)
        model.backbone.dictionary.initialise_from(out["features"], out["mask"])
    registry.register("config", previous)
    return model, inputs


def test_cell_ids_are_the_nearest_entries_and_padding_is_marked(trained):
    model, inputs = trained
    grids = picture.cell_ids(model.backbone, inputs.pixels, inputs.mask)
    with torch.no_grad():
        features = model.backbone.encode_image(inputs.pixels, inputs.mask, quantise=False)["features"]
    table = model.backbone.dictionary.embedding
    nearest = torch.cdist(features.reshape(-1, table.size(1)), table).argmin(1).view(2, 2, 3).numpy()
    real = np.array([[[True, True, True], [True, True, True]], [[True, True, False], [False, False, False]]])
    assert [grid.shape for grid in grids] == [(2, 3), (2, 3)]
    for grid, expected, cells in zip(grids, nearest, real):
        assert np.array_equal(grid[cells], expected[cells])
        assert (grid[~cells] == picture.PADDING).all()
    assert len(np.unique(grids[0])) > 1  # the check below tells ids apart only if there are several


def _cell_centre_rgb(png, axes, row, col):
    """The PNG's RGB at the centre of cell (row, col) of a panel (its data coordinates are pixels)."""
    x, y = axes.transData.transform(((col + 0.5) * 64, (row + 0.5) * 64))
    return png[png.shape[0] - 1 - int(round(y - 0.5)), int(round(x - 0.5)), :3].astype(int)


def test_every_cell_centre_is_drawn_in_its_ids_colour(trained, tmp_path):
    model, inputs = trained
    grids = picture.cell_ids(model.backbone, inputs.pixels, inputs.mask)
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (128, 192, 3), dtype=np.uint8), rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)]
    colours = picture.id_colours(grids)
    assert sorted(colours) == sorted({int(i) for g in grids for i in g.ravel()} - {picture.PADDING})
    assert len(set(colours.values())) == len(colours)
    figure = picture.draw(pictures, grids, ["first", "second"], alpha=1.0, numbers=False)
    path = picture.write_picture(figure, str(tmp_path / "out" / "dictionary.png"))
    assert os.listdir(tmp_path / "out") == ["dictionary.png"]  # no temporary file left
    png = np.asarray(Image.open(path).convert("RGB"))
    for panel, grid in enumerate(grids):
        for row in range(grid.shape[0]):
            for col in range(grid.shape[1]):
                cell = int(grid[row, col])
                expected = picture.PADDING_COLOUR if cell == picture.PADDING else colours[cell]
                got = _cell_centre_rgb(png, figure.axes[panel], row, col)
                assert np.abs(got - np.round(np.array(expected) * 255)).max() <= 2, (panel, row, col, cell, got)
    # the titles name the image, the grid and the number of distinct ids
    assert figure.axes[1].get_title() == f"second\n2 x 3 grid, {len(set(grids[1].ravel()) - {picture.PADDING})} distinct ids"


def test_half_transparent_cells_show_the_picture_and_numbers_are_written(trained, tmp_path):
    model, inputs = trained
    grids = picture.cell_ids(model.backbone, inputs.pixels, inputs.mask)[:1]
    black, white = np.zeros((128, 192, 3), np.uint8), np.full((128, 192, 3), 255, np.uint8)
    colour = np.array(picture.id_colours(grids)[int(grids[0][0, 0])])
    for base in (black, white):
        figure = picture.draw([base], grids, ["x"], alpha=0.5, numbers=False)
        png = np.asarray(Image.open(picture.write_picture(figure, str(tmp_path / "a.png"))).convert("RGB"))
        got = _cell_centre_rgb(png, figure.axes[0], 0, 0)
        assert np.abs(got - np.round(255 * (0.5 * colour + 0.5 * base[0, 0] / 255))).max() <= 2
    numbered = picture.draw([black], grids, ["x"])  # a 6-cell grid: ids written
    assert sorted(t.get_text() for t in numbered.axes[0].texts) == sorted(str(int(i)) for i in grids[0].ravel())


def test_load_model_takes_the_checkpoints_weights(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "soho_final.pth"
    torch.save(model.state_dict(), path)
    config = OmegaConf.create({"model": "soho", "model_config": {"soho": tiny_model_config()}})
    loaded = picture.load_model(config, str(path))
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_errors_name_the_file_or_the_key(trained, tmp_path):
    model, _ = trained
    config = OmegaConf.create({"model": "soho", "model_config": {"soho": tiny_model_config()}})
    missing = tmp_path / "nowhere" / "soho_final.pth"
    with pytest.raises(picture.PictureError, match=f"checkpoint not found: {missing}"):
        picture.load_model(config, str(missing))
    state = {k: v for k, v in model.state_dict().items() if k != picture.DICTIONARY_KEY}
    torch.save(state, tmp_path / "vqa.pth")
    with pytest.raises(picture.PictureError, match=r"vqa\.pth: not a SOHO pre-training checkpoint .*'backbone\.dictionary\.embedding'"):
        picture.load_model(config, str(tmp_path / "vqa.pth"))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(picture.PictureError, match=f"{tmp_path / 'broken.jpg'}: not an image file"):
        picture.read_images([str(tmp_path / "broken.jpg")])
    with pytest.raises(picture.PictureError, match=f"image not found: {tmp_path / 'absent.png'}"):
        picture.read_images([str(tmp_path / "absent.png")])
    with pytest.raises(SystemExit, match=f"error: image not found: {tmp_path / 'absent.png'}"):
        picture.main(["--checkpoint", str(tmp_path / "vqa.pth"), "--config", "unused.yaml",
                      "--images", str(tmp_path / "absent.png"), "--out", str(tmp_path / "p.png")])


def test_the_command_on_the_demo_config_and_its_val_split(tmp_path):
    """``python -m mmf_multilevel.methods.soho.picture`` in-process: the demo config (its includes, defaults
    and an override), a checkpoint of that model, three val images through the config's image processor."""
    from mmf.utils.build import build_model
    from omegaconf import open_dict

    from mmf_multilevel.datasets import generate as gen

    gen.generate(tmp_path / "demo", num_images=10, progress=False)
    config_path = os.path.join(ROOT, "projects", "soho", "demo", "pretrain.yaml")
    config = picture.load_configuration(config_path, [f"env.data_dir={tmp_path}"])
    attributes = config.model_config.soho
    with open_dict(attributes):
        attributes.model = "soho"
    torch.manual_seed(0)
    torch.save(build_model(attributes).state_dict(), tmp_path / "soho_final.pth")
    out = tmp_path / "pictures" / "dictionary.png"
    args = ["--checkpoint", str(tmp_path / "soho_final.pth"), "--config", config_path, "--dataset-split", "val",
            "--count", "3", "--out", str(out), f"env.data_dir={tmp_path}"]
    assert picture.main(args) == str(out)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    with pytest.raises(SystemExit, match="not found: .*nothing.pth"):
        picture.main(args[:1] + [str(tmp_path / "nothing.pth")] + args[2:])
