"""The full-size μ-VLA projects carry the paper's hyper-parameters and name registered components."""
import os

import mmf  # noqa: F401  (applies the compatibility layer, registers our components)
import pytest
from mmf.common.registry import registry
from mmf.utils.configuration import load_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECTS = os.path.join(ROOT, "projects", "muvla")


def load(name):
    return load_yaml(os.path.join(PROJECTS, name))


@pytest.mark.parametrize("name,lr", [("pretrain_cc.yaml", 6e-5), ("pretrain_bc.yaml", 6e-5),
                                     ("baselines/u_visualbert.yaml", 6e-5), ("baselines/aligned_vlp.yaml", 6e-5)])
def test_pretraining_projects_use_the_paper_recipe(name, lr):
    config = load(name)
    training = config.training
    assert config.model == "muvla" and config.model_config.muvla.bert_model_name == "bert-base-uncased"
    assert training.batch_size == 480 and training.fp16 and training.max_grad_l2_norm == 5.0
    assert config.optimizer.type == "adam_w" and config.optimizer.params.lr == pytest.approx(lr)
    assert config.scheduler.params.num_warmup_steps == pytest.approx(0.1 * training.max_updates)
    for name_ in config.datasets.split(","):
        assert registry.get_builder_class(name_) is not None, name_
        dataset = config.dataset_config[name_]
        if "max_features" in dataset and name_ != "muvla_text":
            assert dataset.max_features == 100
    assert config.model_config.muvla.pretraining.itm_weight_start_epoch == 1


@pytest.mark.parametrize("name,dataset,head,lr,text", [
    ("vqa.yaml", "vqa2", "classification", 6e-5, 30), ("nlvr2.yaml", "nlvr2", "nlvr2", 3e-5, 128),
    ("snli_ve.yaml", "snli_ve", "classification", 8e-5, 60), ("refcoco_plus.yaml", "refcoco_plus", "refcoco", 2e-4, 60),
])
def test_downstream_projects_load_only_the_backbone(name, dataset, head, lr, text):
    config = load(name)
    assert config.datasets == dataset and config.model_config.muvla.training_head_type == head
    assert dict(config.checkpoint.pretrained_state_mapping) == {"backbone": "backbone"}
    assert config.optimizer.params.lr == pytest.approx(lr)
    assert config.dataset_config[dataset].processors.text_processor.params.max_seq_length == text
    assert config.training.trainer == "mmf_multilevel"


def test_vqa_pools_the_last_text_token_and_snli_ve_the_cls():
    assert load("vqa.yaml").model_config.muvla.pooling == "last_text"
    assert load("snli_ve.yaml").model_config.muvla.pooling == "cls"
