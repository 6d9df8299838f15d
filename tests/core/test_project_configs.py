"""Every component a project yaml names resolves in MMF's registry: models, datasets, processors,
metrics, losses, trainers, optimizers and schedulers (a misspelt name fails here, not in a user's run)."""
import glob
import os

import pytest
import torch
from omegaconf import OmegaConf

from helpers.mmf import ROOT

PROJECTS = sorted(glob.glob(os.path.join(ROOT, "projects", "**", "*.yaml"), recursive=True))


def _names(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [v if isinstance(v, str) else v.get("type") for v in value]


def named_components(path):
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    found = []
    if config.get("model"):
        found.append(("model", config["model"]))
    found += [("dataset", name) for name in _names(config.get("datasets"))]
    for dataset in (config.get("dataset_config") or {}).values():
        for processor in ((dataset or {}).get("processors") or {}).values():
            if isinstance(processor, dict) and processor.get("type"):
                found.append(("processor", processor["type"]))
    found += [("metric", name) for name in _names((config.get("evaluation") or {}).get("metrics"))]
    for model in (config.get("model_config") or {}).values():
        found += [("loss", name) for name in _names((model or {}).get("losses"))]
    if (config.get("training") or {}).get("trainer"):
        found.append(("trainer", config["training"]["trainer"]))
    if (config.get("optimizer") or {}).get("type"):
        found.append(("optimizer", config["optimizer"]["type"]))
    if (config.get("scheduler") or {}).get("type"):
        found.append(("scheduler", config["scheduler"]["type"]))
    return found


def resolves(kind, name):
    from mmf.common.registry import registry

    lookup = {
        "model": registry.get_model_class, "dataset": registry.get_builder_class,
        "processor": registry.get_processor_class, "metric": registry.get_metric_class,
        "loss": registry.get_loss_class, "trainer": registry.get_trainer_class,
        "scheduler": registry.get_scheduler_class,
    }
    if kind == "optimizer":
        return hasattr(torch.optim, name) or registry.get_optimizer_class(name) is not None
    return lookup[kind](name) is not None


def test_projects_are_found():
    assert len(PROJECTS) > 40
    assert os.path.join(ROOT, "projects", "semvlp", "vqa.yaml") in PROJECTS


@pytest.mark.parametrize("path", PROJECTS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "projects")))
def test_every_named_component_is_registered(path):
    import mmf  # noqa: F401  (registers this plugin)

    missing = [(kind, name) for kind, name in named_components(path) if not resolves(kind, name)]
    assert not missing, f"{os.path.relpath(path, ROOT)} names unregistered components: {missing}"
