"""The predictor's tests' helpers: a demo project's predictor, its config's dataset as ``mmf_run`` builds it, the
model on one of the dataset's samples, and the dataset's image as a query gives it."""
import io

import torch

from helpers.mmf import ROOT


def predictor_for(data, method, project, **kwargs):
    from mmf_multilevel.predict import load_predictor

    torch.manual_seed(0)
    return load_predictor(f"{ROOT}/projects/{method}/demo/{project}.yaml", overrides=[f"env.data_dir={data}"],
                          device="cpu", **kwargs)


def dataset_of(predictor, split="val", **settings):
    """The config's dataset as mmf_run builds it (the builder's class, processors initialised), with ``settings``
    overriding its dataset_config."""
    from mmf.common.registry import registry
    from omegaconf import OmegaConf, open_dict

    name = predictor.dataset_name
    # MMF's build_processors reuses a processor registered under the dataset's key: another test's project
    # (SIMLA's 64-pixel vqa2_images pipeline for SOHO's) must not leak into this one
    for key in predictor.dataset_config.processors:
        registry.unregister(f"{name}_{key}")
    config = OmegaConf.create(OmegaConf.to_container(predictor.dataset_config, resolve=True))
    with open_dict(config):
        config.update(settings)
    dataset = registry.get_builder_class(name).dataset_class(name, config, split)
    dataset.init_processors()
    return dataset


def model_scores(predictor, sample, dataset):
    """The model on the dataset's sample, collated as MMF's test loader collates one."""
    from mmf.common.sample import SampleList

    batch = SampleList([sample])
    batch.dataset_name, batch.dataset_type = dataset.dataset_name, "test"
    with torch.no_grad():
        return predictor.model(batch)["scores"].float()


def image_input(dataset, image_id, kind):
    """The dataset's image as a query gives it: the file's path, its bytes or a PIL image."""
    from PIL import Image

    source = dataset.image_source
    if kind == "path":
        return source.resolve(str(image_id))
    data = source.get_bytes(str(image_id))
    return data if kind == "bytes" else Image.open(io.BytesIO(data))


#: MVPTR's demo model sizes its word table from the concept tool's vocabulary: two concepts past the 74 pieces
DEMO_CONCEPTS = {"74": ["red", "circle"], "75": ["blue", "square"]}


def demo_data(root, num_images: int, concepts=None):
    """The generated demo set under ``root/demo`` with ``num_images`` images and a concept vocabulary
    (``concepts``: id -> phrase tuple, default :data:`DEMO_CONCEPTS`) for MVPTR's projects; returns ``root``."""
    import json

    from mmf_multilevel.datasets import generate as gen

    gen.generate(root / "demo", num_images=num_images, progress=False)
    (root / "demo" / "concepts").mkdir()
    (root / "demo" / "concepts" / "id2phrase.json").write_text(json.dumps(DEMO_CONCEPTS if concepts is None
                                                                          else concepts))
    return root
