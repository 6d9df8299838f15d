"""References shared by SIMLA's model tests."""
import torch
import torch.nn.functional as F

#: the fields of the tiny pre-training batch (``methods/simla/testing.tiny_batch``)
PRETRAINING_FIELDS = ("input_ids", "input_mask", "lm_label_ids", "segment_ids", "image", "image_size")


def rows_of(full, rows, fields=PRETRAINING_FIELDS):
    """The sample list ``full`` cut to ``rows`` (a slice) over ``fields``, with its dataset name and type."""
    from mmf.common.sample import SampleList

    batch = SampleList({key: full[key][rows] for key in fields})
    batch.dataset_name, batch.dataset_type = full.dataset_name, full.dataset_type
    return batch


def unmasked_ids(batch):
    """The caption as written: the masked words (``lm_label_ids`` >= 0) put back into ``input_ids``."""
    return torch.where(batch.lm_label_ids >= 0, batch.lm_label_ids, batch.input_ids)


def unimodal_features(model, pixels, ids, mask):
    """The online ViT sequence (``image``) and text-mode BERT output (``text``), and the projected, normalised
    [CLS] features of the online model (``image_feat``, ``text_feat``) and of its momentum copies
    (``image_feat_m``, ``text_feat_m``) - ITC's inputs (paper §2.2, Eq. 1) - written out from the modules."""
    heads, momentum = model.heads, model.momentum
    image = model.backbone.image_encoder(pixels)
    text = model.backbone.text_encoder.encode_text(ids, mask)
    image_m = momentum["visual_encoder"](pixels)
    text_m = momentum["text_encoder"].encode_text(ids, mask)
    return {
        "image": image,
        "text": text,
        "image_feat": F.normalize(heads.vision_proj(image[:, 0]), dim=-1),
        "text_feat": F.normalize(heads.text_proj(text[:, 0]), dim=-1),
        "image_feat_m": F.normalize(momentum["vision_proj"](image_m[:, 0]), dim=-1),
        "text_feat_m": F.normalize(momentum["text_proj"](text_m[:, 0]), dim=-1),
    }
