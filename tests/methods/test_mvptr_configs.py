"""MVPTR's projects: the paper's Table 4 ablation configs (projects/mvptr/ablations) load with the projects they
include and state the losses and inputs of their row; the model they configure returns exactly those
losses on a tiny batch; the retrieval projects carry the official fine-tuning values."""
import os

import mmf  # noqa: F401  (applies the compatibility layer, registers our components)
import pytest
import torch
from mmf.utils.configuration import load_yaml
from omegaconf import OmegaConf

from mmf_multilevel.methods.mvptr.model import MVPTR
from mmf_multilevel.methods.mvptr.testing import tiny_batch, tiny_config

pytestmark = pytest.mark.usefixtures("mmf_global_config")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECTS = os.path.join(ROOT, "projects", "mvptr")

#: Table 4's rows: file -> (mcr loss, wpg loss, tags in the input, phrases in the input)
TABLE4 = {"pretrain.yaml": (True, True, True, True),
          "ablations/pretrain_no_mcr.yaml": (False, True, True, True),
          "ablations/pretrain_no_mcr_tags.yaml": (False, True, False, True),
          "ablations/pretrain_no_wpg.yaml": (True, False, True, True),
          "ablations/pretrain_no_wpg_phrases.yaml": (True, False, True, False)}


def load(name):
    return load_yaml(os.path.join(PROJECTS, name))


def dataset_defaults(name):
    return OmegaConf.load(os.path.join(ROOT, "mmf_multilevel", "methods", "mvptr", "configs", f"{name}.yaml"))


@pytest.mark.parametrize("name", sorted(TABLE4))
def test_table4_rows_state_their_losses_and_inputs(name):
    mcr, wpg, tags, phrases = TABLE4[name]
    config = OmegaConf.merge(dataset_defaults("mvptr_captions"), load(name))
    assert config.model == "mvptr" and config.datasets == "mvptr_captions"
    model_config = OmegaConf.merge(OmegaConf.load(MVPTR.config_path()).model_config.mvptr, config.model_config.mvptr)
    data = config.dataset_config.mvptr_captions
    assert (model_config.pretraining.mcr, model_config.pretraining.wpg) == (mcr, wpg)
    assert (data.use_tags, data.use_phrases) == (tags, phrases)
    assert (data.mcr_mask_probability > 0) == mcr
    # the model the row configures (at a tiny size) returns exactly the row's losses
    tiny = OmegaConf.merge(model_config, tiny_config("pretraining"), {"concepts": None})
    torch.manual_seed(0)
    model = MVPTR(tiny)
    model.build()
    batch = tiny_batch("pretraining")
    losses = {key.rsplit("/", 1)[-1] for key in model(batch)["losses"]}
    assert losses == {"vsc", "itm", "mlm"} | ({"mcr"} if mcr else set()) | ({"wpg"} if wpg else set())


@pytest.mark.parametrize("name,flag", [("ablations/retrieval_coco_no_tags.yaml", "use_tags"),
                                       ("ablations/retrieval_coco_no_phrases.yaml", "use_phrases")])
def test_input_ablations_fine_tune_without_their_input(name, flag):
    config = OmegaConf.merge(dataset_defaults("mvptr_coco_retrieval"), load(name))
    data = config.dataset_config.mvptr_coco_retrieval
    assert data[flag] is False and config.model_config.mvptr.training_head_type == "retrieval"


@pytest.mark.parametrize("name,dataset,batch,lr,tags", [
    ("retrieval_coco.yaml", "mvptr_coco_retrieval", 96, 4e-5, 32),
    ("retrieval_flickr.yaml", "mvptr_flickr30k_retrieval", 64, 4e-5, 20)])
def test_retrieval_projects_carry_the_official_values(name, dataset, batch, lr, tags):
    config = OmegaConf.merge(dataset_defaults(dataset), load(name))
    assert config.datasets == dataset and config.training.batch_size == batch
    assert config.optimizer.params.lr == lr and config.optimizer.params.weight_decay == 0.05
    assert config.model_config.mvptr.num_tag_slots == tags == config.dataset_config[dataset].max_tags
    assert config.model_config.mvptr.retrieval.top_k_texts == 128 and config.model_config.mvptr.retrieval.top_k_images == 64
    assert config.checkpoint.pretrained_state_mapping == {"backbone": "backbone", "itm_head": "heads.itm"}
    assert load("retrieval_uni.yaml").model_config.mvptr.retrieval.uni is True


@pytest.mark.parametrize("name,dataset,head,lr,batch,regions,tags", [
    ("vqa.yaml", "mvptr_vqa2", "vqa", 5e-5, 32, 50, 32),
    ("snli_ve.yaml", "mvptr_snli_ve", "snli_ve", 4e-5, 64, 70, 20)])
def test_classification_projects_carry_the_official_values(name, dataset, head, lr, batch, regions, tags):
    config = OmegaConf.merge(dataset_defaults(dataset), load(name))
    model = config.model_config.mvptr
    data = config.dataset_config[dataset]
    assert config.datasets == dataset and model.training_head_type == head
    assert config.optimizer.params.lr == lr and config.optimizer.params.weight_decay == 0.05
    assert config.training.batch_size == batch and data.max_features == regions
    assert model.num_tag_slots == tags == data.max_tags
    assert config.checkpoint.pretrained_state_mapping == {"backbone": "backbone"}


def test_refcoco_project_reads_the_third_multimodal_layer_with_the_official_loss():
    config = OmegaConf.merge(dataset_defaults("mvptr_refcoco_plus"), load("refcoco_plus.yaml"))
    model = config.model_config.mvptr
    assert model.training_head_type == "refcoco" and model.refcoco.layer == 3 and model.refcoco.loss == "mse_iou"
    data = config.dataset_config.mvptr_refcoco_plus
    assert (data.max_features, data.max_tokens, data.max_tags) == (50, 30, 20) and config.training.batch_size == 64
    assert config.optimizer.params.lr == 4e-5 and "refcoco_accuracy" in config.evaluation.metrics


@pytest.mark.parametrize("name,dataset,files", [
    ("vqa.yaml", "mvptr_vqa2", ("vqa_train", "vqa_val", "vqa_test")),
    ("snli_ve.yaml", "mvptr_snli_ve", ("snli_ve_train", "snli_ve_dev", "snli_ve_test")),
    ("refcoco_plus.yaml", "mvptr_refcoco_plus", ("refcoco+_train", "refcoco+_val", "refcoco+_testA"))])
def test_task_projects_read_their_texts_phrases(name, dataset, files):
    """Each split's phrase file is the concept tool's output over that split's annotations (the --out the
    project's comment gives), 5 phrase slots; the dataset defaults read no phrases ([CLS] words [SEP])."""
    defaults = dataset_defaults(dataset).dataset_config[dataset]
    assert defaults.max_phrases == 0 and all(v is None for v in defaults.phrases.values())
    data = OmegaConf.merge(dataset_defaults(dataset), load(name)).dataset_config[dataset]
    assert data.max_phrases == 5 and data.use_phrases is True
    assert [data.phrases[s] for s in ("train", "val", "test")] == [f"concepts/{f}/captions.jsonl" for f in files]
    for split in ("train", "val", "test"):  # the phrase file was made from the split's annotation file
        assert data.phrases[split].split("/")[1] + ".jsonl" == os.path.basename(data.annotations[split])
