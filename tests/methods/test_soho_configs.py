"""SOHO's projects: Table 7's ablation configs (projects/soho/ablations) load, merge with the projects they
include and build the network they state at a tiny scale; the downstream projects carry §4.2's values."""
import os

import mmf  # noqa: F401  (applies the compatibility layer, registers our components)
import pytest
import torch
from mmf.utils.configuration import load_yaml
from omegaconf import OmegaConf
from transformers import BertConfig, BertModel

from mmf_multilevel.methods.soho import testing as tiny
from mmf_multilevel.methods.soho.model import SOHO

pytestmark = pytest.mark.usefixtures("mmf_global_config")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECTS = os.path.join(ROOT, "projects", "soho")

#: Table 7's rows: file -> (use_vd, vd_size)
TABLE7 = {"pretrain_no_vd.yaml": (False, 2048), "pretrain_vd1024.yaml": (True, 1024),
          "pretrain_vd2048.yaml": (True, 2048), "pretrain_vd4096.yaml": (True, 4096),
          "pretrain_vd8192.yaml": (True, 8192)}
FINETUNE = {"vqa.yaml": "vqa", "nlvr2.yaml": "nlvr2", "snli_ve.yaml": "snli_ve", "retrieval_coco.yaml": "retrieval"}


def load(name):
    return load_yaml(os.path.join(PROJECTS, name))


@pytest.fixture(scope="module")
def four_layer_bert(tmp_path_factory):
    """A save_pretrained BERT of 4 distinct layers (stands in for bert-base-uncased)."""
    path = tmp_path_factory.mktemp("bert") / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=40)).save_pretrained(path)
    return path


def build_scaled(model_config, bert_path, head_type):
    """``model_config.soho`` as the project states it, with only the sizes a CPU test cannot afford
    replaced: the BERT (a 4-layer local one) and random ResNet weights; backbone, layer count, dictionary
    size and use_vd are the project's."""
    scaled = OmegaConf.merge(model_config, {"bert_model_name": str(bert_path), "backbone_pretrained": False,
                                            "mask_token_id": tiny.MASK, "training_head_type": head_type,
                                            "num_answers": 5,
                                            "pretraining": {"init_mlm_from_bert": False}})
    model = SOHO(scaled)
    model.build()
    return model


@pytest.mark.parametrize("name", sorted(TABLE7))
def test_table7_pretraining_configs_state_the_row_and_keep_the_recipe(name, four_layer_bert):
    use_vd, size = TABLE7[name]
    config, base = load(f"ablations/{name}"), load("pretrain.yaml")
    soho = config.model_config.soho
    assert (soho.backbone, soho.bert_num_layers, soho.use_vd, soho.vd_size) == ("resnet18", 3, use_vd, size)
    # everything else is pretrain.yaml's: data, optimizer, schedule, freeze, batch
    assert config.datasets == base.datasets and config.training == base.training
    assert config.dataset_config == base.dataset_config
    for key in ("optimization", "freeze_resnet_epochs", "bert_model_name", "vd_momentum", "pretraining"):
        assert soho[key] == base.model_config.soho[key], key

    model = build_scaled(soho, four_layer_bert, "pretraining")
    network = model.backbone
    assert len(network.text.bert.encoder.layer) == 3
    assert network.encoder.resnet.feature_info[-1]["num_chs"] == 512  # ResNet-18's C5
    assert tuple(network.dictionary.embedding.shape) == (size, 32)
    assert network.dictionary.updating is use_vd
    assert (model.heads.mvm.decoder.out_features == size) if use_vd else True
    if not use_vd:  # no dictionary, no MVM loss
        batch = tiny.tiny_batch("pretraining")
        model.init_losses()
        losses = model(batch)["losses"]
        assert not any(key.endswith("/mvm") for key in losses), sorted(losses)


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_table7_fine_tuning_configs_are_the_projects_on_the_ablation_network(name, four_layer_bert):
    config, base = load(f"ablations/{name}"), load(name)
    soho = config.model_config.soho
    assert (soho.backbone, soho.bert_num_layers) == ("resnet18", 3)
    expected = OmegaConf.merge(base.model_config.soho, {"backbone": "resnet18", "bert_num_layers": 3})
    assert soho == expected
    assert config.training == base.training and config.dataset_config == base.dataset_config
    model = build_scaled(soho, four_layer_bert, FINETUNE[name])
    assert len(model.backbone.text.bert.encoder.layer) == 3


def test_bert_num_layers_keeps_the_first_layers_of_the_named_bert(four_layer_bert):
    full = BertModel.from_pretrained(four_layer_bert)
    model = build_scaled(OmegaConf.load(SOHO.config_path()).model_config.soho.copy(), four_layer_bert, "vqa")
    assert model.settings.bert_num_layers is None and len(model.backbone.text.bert.encoder.layer) == 4
    cut = build_scaled(OmegaConf.merge(OmegaConf.load(SOHO.config_path()).model_config.soho, {"bert_num_layers": 3}),
                       four_layer_bert, "vqa")
    layers = cut.backbone.text.bert.encoder.layer
    assert len(layers) == 3
    for i in range(3):
        for key, value in full.encoder.layer[i].state_dict().items():
            assert torch.equal(layers[i].state_dict()[key], value), (i, key)
    assert torch.equal(cut.backbone.text.bert.embeddings.word_embeddings.weight, full.embeddings.word_embeddings.weight)


def test_bert_num_layers_without_a_named_bert_is_an_error():
    config = OmegaConf.merge(OmegaConf.load(SOHO.config_path()).model_config.soho, tiny.tiny_config("vqa"),
                             {"bert_num_layers": 3})
    with pytest.raises(ValueError, match="bert_num_layers.*num_hidden_layers: 3"):
        SOHO(config).build()


@pytest.mark.parametrize("name,dataset,head,batch,steps,updates,ratio", [
    ("nlvr2.yaml", "nlvr2_images", "nlvr2", 128, [12 * 675, 16 * 675], 18 * 675, 0.1),
    ("snli_ve.yaml", "snli_ve_images", "snli_ve", 128, [4 * 4137], 6 * 4137, 0.1),
    ("retrieval_coco.yaml", "coco_retrieval_images", "retrieval", 24, [e * 23615 for e in (3, 5, 9, 13)],
     20 * 23615, 0.5),
    ("retrieval_flickr.yaml", "flickr30k_retrieval_images", "retrieval", 24, [e * 6042 for e in (3, 5, 9, 13)],
     20 * 6042, 0.5),
])
def test_downstream_projects_carry_the_papers_schedule(name, dataset, head, batch, steps, updates, ratio):
    config = load(name)
    soho = OmegaConf.merge(OmegaConf.load(SOHO.config_path()).model_config.soho, config.model_config.soho)
    assert config.datasets == dataset and soho.training_head_type == head and soho.backbone == "resnet101"
    assert config.training.batch_size == batch and config.training.max_updates == updates
    assert list(soho.optimization.lr_steps) == steps and soho.optimization.lr_ratio == ratio
    assert (soho.optimization.lr, soho.optimization.weight_decay) == (1e-4, 1e-2)
    assert soho.optimization.cnn_lr == 1e-2 and config.training.lr_scheduler is False
    assert not soho.use_vd_in_finetune and config.training.trainer == "mmf_multilevel"
    if head == "retrieval":  # §4.2.1's batches: aligned pairs only, the batch's other captions unaligned
        assert soho.retrieval_in_batch and config.dataset_config[dataset].itm_probability == 0
    mapping = dict(config.checkpoint.pretrained_state_mapping)
    assert mapping == ({"backbone": "backbone", "itm_head": "heads.itm"} if head == "retrieval" else {"backbone": "backbone"})
