"""Tiny SOHO models and batches for the method contract (see ``methods/testing.py``) and SOHO's tests."""
import torch

from mmf_multilevel.methods.soho.pretraining import compose_itm_pairs
from mmf_multilevel.methods.testing import TINY_BERT

#: [MASK] of the tiny vocabulary (``methods/testing.py``: [CLS] = 2, [SEP] = 3, [MASK] = 4)
MASK, CLS, SEP = 4, 2, 3
VD_SIZE, ANSWERS = 16, 5
#: a small timm ResNet (4.9M parameters, stride 32 at C5), randomly initialised
TINY_BACKBONE = dict(backbone="resnet10t", backbone_pretrained=False)


def tiny_config(head_type):
    config = dict(TINY_BERT, **TINY_BACKBONE, training_head_type=head_type, vd_size=VD_SIZE, mask_token_id=MASK,
                  freeze_resnet_epochs=0, pretraining=dict(init_mlm_from_bert=False))
    if head_type == "vqa":
        config.update(num_answers=ANSWERS, losses=[{"type": "logit_bce"}])
    elif head_type != "pretraining":
        config.update(losses=[{"type": "cross_entropy"}])
    return config


def _sample_list():
    from mmf.common.sample import SampleList

    return SampleList()


def texts(count, generator, length=7, vocab_size=40):
    """``count`` texts ``[CLS] words [SEP]`` (every other one shorter, zero-padded): ``(ids, mask)``."""
    ids = torch.randint(5, vocab_size, (count, length), generator=generator)
    lengths = torch.tensor([length if i % 2 == 0 else length - 2 for i in range(count)])
    mask = (torch.arange(length).view(1, -1) < lengths.view(-1, 1)).long()
    ids[:, 0] = CLS
    ids[torch.arange(count), lengths - 1] = SEP
    return ids * mask, mask


def images(count, generator, height=128, width=192, sizes=None):
    """``count`` random images padded to ``height x width`` and their ``[h, w]`` content sizes (the
    second image smaller by default, so the batch has padding cells)."""
    if sizes is None:
        sizes = [[height, width]] + [[64, 128]] * (count - 1)
    pixels = torch.randn(count, 3, height, width, generator=generator)
    size = torch.tensor(sizes)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, h:] = 0
        pixels[i, :, :, w:] = 0
    return pixels, size


def mask_words(ids, mask, generator, per_text=2):
    """``(masked ids, lm_label_ids)`` as the masked_token processor gives them: ``per_text`` words of
    each text replaced by [MASK], their ids as labels, -1 elsewhere."""
    labels = torch.full_like(ids, -1)
    masked = ids.clone()
    for row in range(ids.size(0)):
        real = int(mask[row].sum())
        for position in (torch.randperm(real - 2, generator=generator)[:per_text] + 1).tolist():
            labels[row, position] = ids[row, position]
            masked[row, position] = MASK
    return masked, labels


def pretraining_batch(num_images=2, captions_per_image=2, seed=0, dataset_name="soho_contract", **image_args):
    """``num_images`` images, each with two matched and two mismatched texts under ``pairs`` (the layout of
    SOHO's pre-training corpora, ``data.py``)."""
    from mmf.common.sample import SampleList

    generator = torch.Generator().manual_seed(seed)
    batch = _sample_list()
    batch.image, batch.image_size = images(num_images, generator, **image_args)
    captions, caption_mask = texts(num_images * captions_per_image, generator)
    layout = compose_itm_pairs(num_images, captions_per_image, generator=generator)
    ids, mask = captions[layout["pair_text_index"]], caption_mask[layout["pair_text_index"]]
    pairs = SampleList()
    pairs.input_ids, pairs.lm_label_ids = mask_words(ids, mask, generator)
    pairs.input_mask = mask
    pairs.segment_ids = torch.zeros_like(ids)
    pairs.pair_image_index, pairs.is_correct = layout["pair_image_index"], layout["is_correct"]
    batch.pairs = pairs
    batch.dataset_name, batch.dataset_type = dataset_name, "train"
    return batch


def one_text_batch(num_images=2, seed=0, dataset_name="soho_contract"):
    """One text per image at the top level, mismatched for the second image (a caption corpus with
    ``itm_probability``)."""
    generator = torch.Generator().manual_seed(seed)
    batch = _sample_list()
    batch.image, batch.image_size = images(num_images, generator)
    ids, mask = texts(num_images, generator)
    batch.input_ids, batch.lm_label_ids = mask_words(ids, mask, generator)
    batch.input_mask, batch.segment_ids = mask, torch.zeros_like(ids)
    batch.is_correct = torch.tensor([1] + [0] * (num_images - 1))
    batch.dataset_name, batch.dataset_type = dataset_name, "train"
    return batch


def tiny_batch(head_type, seed=0):
    if head_type == "pretraining":
        return pretraining_batch(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    batch = _sample_list()
    if head_type == "nlvr2":  # the paired layout: one statement, an image under each of img0 / img1
        for side in ("img0", "img1"):
            batch[side] = _sample_list()
            batch[side].image, batch[side].image_size = images(2, generator)
    else:
        batch.image, batch.image_size = images(2, generator)
    batch.input_ids, batch.input_mask = texts(2, generator)
    batch.segment_ids = torch.zeros_like(batch.input_ids)
    if head_type == "vqa":
        batch.targets = torch.rand(2, ANSWERS, generator=generator)
    else:
        batch.targets = torch.tensor([1, 0] if head_type != "snli_ve" else [2, 0])
    batch.dataset_name, batch.dataset_type = "soho_contract", "train"
    return batch


def official_layout_state(seed=0, conv_norm=True, pos_line=True, hidden=32, vd_size=16, vocab_size=40, layers=2,
                          intermediate=64, max_positions=40, heads=4):
    """A randomly initialised state dict in the official release's key layout (researchmm/soho:
    ``SOHOSingleStreamPre`` with ``SimpleVDforPre``; mmcv ResNet-18 = torchvision's module names, the 1x1 conv
    with a BatchNorm after it or a bias, the dictionary and its running statistics, BERT without a pooler,
    the tied MLM decoder, the bias-free ITM layer), for the converter's tests (``checkpoints.py``)."""
    import torchvision
    from transformers import BertConfig, BertModel

    C, K = hidden, vd_size
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    resnet = torchvision.models.resnet18(weights=None)
    state = {}
    for key, value in resnet.state_dict().items():
        if key.startswith("fc."):
            continue
        if key.endswith("running_mean"):
            value = torch.randn(value.shape, generator=g) * 0.1
        elif key.endswith("running_var"):
            value = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith(".bias") and "bn" in key or "downsample.1.bias" in key:
            value = torch.randn(value.shape, generator=g) * 0.1
        state[f"backbone.{key}"] = value
    state["neck.conv.conv.weight"] = torch.randn(C, 512, 1, 1, generator=g) * 0.05
    if conv_norm:
        state.update({"neck.conv.bn.weight": torch.rand(C, generator=g) + 0.5,
                      "neck.conv.bn.bias": torch.randn(C, generator=g) * 0.1,
                      "neck.conv.bn.running_mean": torch.randn(C, generator=g) * 0.1,
                      "neck.conv.bn.running_var": torch.rand(C, generator=g) + 0.5,
                      "neck.conv.bn.num_batches_tracked": torch.tensor(7)})
    else:
        state["neck.conv.conv.bias"] = torch.randn(C, generator=g) * 0.1
    state.update({"neck.ln.weight": torch.rand(C, generator=g) + 0.5, "neck.ln.bias": torch.randn(C, generator=g) * 0.1,
                  "neck.mask_emb.weight": torch.randn(1, C, generator=g),
                  "neck.vq.embed": torch.randn(K, C, generator=g),
                  "neck.vq.cluster_size": torch.rand(K, generator=g), "neck.vq.cluster_sum": torch.rand(K, generator=g),
                  "neck.vq.embed_avg": torch.randn(K, C, generator=g)})
    if pos_line:
        state.update({"neck.pos_line.weight": torch.randn(C, C, generator=g), "neck.pos_line.bias": torch.zeros(C)})
    bert = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=C, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=intermediate, max_position_embeddings=max_positions),
                     add_pooling_layer=False)
    for key, value in bert.state_dict().items():
        if "position_ids" in key or "token_type_ids" in key:
            continue
        state[f"language.bert.{key}"] = value + 0.01 * torch.randn(value.shape, generator=g)
    state["mask_l_fc.weight"] = state["language.bert.embeddings.word_embeddings.weight"].clone()
    state["head.match_class.weight"] = torch.randn(2, C, generator=g)
    return state
