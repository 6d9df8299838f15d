"""SIMLA's alignment pictures (mmf_multilevel/methods/simla/picture.py): the command on a generated demo image with
the demo's tiny model - one PNG per expression and per word, a page and a summary; the word maps (word pieces
merged) differ and average, weighted by their piece counts, to the expression's map; bad input named."""
import json
import os

import pytest
import torch

from helpers.mmf import ROOT
from mmf_multilevel.datasets import generate as gen
from mmf_multilevel.methods.simla import picture

pytestmark = pytest.mark.usefixtures("mmf_global_config")

CONFIG = os.path.join(ROOT, "projects", "simla", "demo", "refcoco_plus_weak.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Generated demo data and a checkpoint of the demo's (randomly initialised) grounding model."""
    from mmf_multilevel.compat.launcher import load_run_config
    from mmf_multilevel.methods.base import load_method_model

    root = tmp_path_factory.mktemp("simla_picture")
    gen.generate(root / "demo", num_images=6, progress=False)
    opts = [f"env.data_dir={root}", "model_config.simla.queue_size=32"]
    torch.manual_seed(0)
    model = load_method_model(load_run_config(CONFIG, opts), "simla")
    checkpoint = root / "simla.pth"
    torch.save(model.state_dict(), checkpoint)
    record = json.loads((root / "demo" / "annotations" / "refcoco+_train.jsonl").read_text().splitlines()[0])
    image = root / "demo" / "images" / f"{record['image_id']}.jpg"
    return dict(root=root, opts=opts, model=model, checkpoint=str(checkpoint), image=str(image), record=record)


def run(setup, out, *extra, image=None, texts=("the red circle", "the square on the left")):
    args = ["--config", CONFIG, "--checkpoint", setup["checkpoint"], "--image", image or setup["image"],
            "--out", str(out), *extra]
    for text in texts:
        args += ["--text", text]
    return picture.main(args + setup["opts"])


def test_the_command_writes_a_picture_per_expression_and_word_and_a_page(setup, tmp_path, capsys):
    out = tmp_path / "pictures"
    regions = str(setup["root"] / "demo" / "features" / "regions.lmdb")
    assert run(setup, out, "--regions", regions, "--image-id", setup["record"]["image_id"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == 0 and len(summary["expressions"]) == 2
    page = (out / "index.html").read_text()
    for section in summary["expressions"]:
        files = [section["picture"]] + [word["picture"] for word in section["words"]]
        for name in files:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
            assert name in page
        assert [w["word"] for w in section["words"]][0] == "[CLS]" and section["words"][-1]["word"] == "[SEP]"
        assert section["chosen"] is not None and len(section["chosen_box"]) == 4
    assert [w["word"] for w in summary["expressions"][1]["words"]] == ["[CLS]", "the", "square", "on", "the", "left",
                                                                       "[SEP]"]
    assert f'"page": "{out / "index.html"}"' in capsys.readouterr().out


def test_word_maps_differ_and_average_to_the_expression_map(setup):
    from mmf.datasets.processors.processors import Processor

    from mmf_multilevel.compat.launcher import load_run_config
    from mmf_multilevel.methods.simla.grounding import itm_gradcam

    config = load_run_config(CONFIG, setup["opts"])
    processors = config.dataset_config.refcoco_plus_images.processors
    text_processor, image_processor = Processor(processors.text_processor), Processor(processors.image_processor)
    image = picture._read_image(setup["image"])
    pixels = image_processor({"image": image, "train": False})["image"].unsqueeze(0)
    texts = [dict(text_processor({"text": t}), text=t) for t in ("the red circle", "the square on the left")]
    model = setup["model"]
    results = picture.alignment_maps(model, pixels, texts)
    for text, result in zip(texts, results):
        counts = torch.tensor([len(u.positions) for u in result.units], dtype=torch.float)
        assert int(counts.sum()) == int(text["input_mask"].sum())
        average = (result.unit_maps * counts.view(-1, 1, 1)).sum(dim=0) / counts.sum()
        torch.testing.assert_close(average, result.expression_map)
        assert not torch.allclose(result.unit_maps[1], result.unit_maps[2])  # two words, two maps
    # the expression map is the one the grounding evaluation scores boxes with
    encoder = model.backbone.image_encoder
    ids = torch.stack([t["input_ids"] for t in texts])
    mask = torch.stack([t["input_mask"] for t in texts])
    cam = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, encoder(pixels).expand(2, -1, -1), ids, mask,
                      0, encoder.grid_size)
    torch.testing.assert_close(results[1].expression_map, cam.maps[1])


def test_word_pieces_merge_into_their_word():
    units = picture.word_units(["[CLS]", "the", "gre", "##en", "##ish", "circle", "[SEP]"])
    assert [(u.label, u.positions) for u in units] == [("[CLS]", [0]), ("the", [1]), ("greenish", [2, 3, 4]),
                                                       ("circle", [5]), ("[SEP]", [6])]
    token_maps = torch.arange(7, dtype=torch.float).view(7, 1, 1).expand(7, 2, 2)
    assert picture.word_maps(token_maps, units)[:, 0, 0].tolist() == [0.0, 1.0, 3.0, 5.0, 6.0]


def test_bad_input_is_named(setup, tmp_path, capsys):
    missing = str(tmp_path / "nowhere.jpg")
    assert run(setup, tmp_path / "a", image=missing) == 2
    assert f"--image {missing}: no such file" in capsys.readouterr().err
    assert run(setup, tmp_path / "b", texts=("the red circle", "  ")) == 2
    assert "--text number 2 is empty" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert run(setup, tmp_path / "c", image=str(broken)) == 2
    assert str(broken) in capsys.readouterr().err
    assert run(setup, tmp_path / "d", "--layer", "5") == 2
    assert "gradcam_layer must be a 0-based layer index in [0, 1]" in capsys.readouterr().err
    assert run(setup, tmp_path / "e", "--regions", str(tmp_path / "none.lmdb")) == 2
    assert "--regions needs --image-id" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
