"""BUTD (ResNet-101 C4) and VinVL (ResNeXt-152 C4) region detectors as detectron2 models.

Both are detectron2 ``GeneralizedRCNN`` models: a ResNet C4 backbone (res1-res4), detectron2's
RPN, and :class:`AttributeRes5ROIHeads` (registered in ``ROI_HEADS_REGISTRY``): RoI pooling on
res4, the res5 stage per region, mean pooling to one 2048-d vector, detectron2's
``FastRCNNOutputLayers`` and an attribute predictor conditioned on the object class, as in the
Visual Genome detectors of bottom-up attention and VinVL.

Conventions of the modules (what the weight converters in :mod:`.converters` map onto):

* ``roi_heads.box_predictor.cls_score``: detectron2 order, C object classes then background;
  ``bbox_pred``: C x 4 class-specific deltas (the extractor keeps the proposal boxes, as the
  originals' feature extraction does, so the deltas are loaded but unused).
* ``roi_heads.attribute_predictor.obj_embed``: C + 1 rows in detectron2's class order (row k =
  object class k, 0-based; row C = background), as in detectron2 attribute heads
  (grid-feats-vqa, py-bottom-up-attention); ``fc.0`` (Linear(D + E, F) + ReLU) and
  ``attr_score`` (A + 1 outputs, column 0 = "no attribute").

Extra config keys (:func:`add_region_config`): ``MODEL.RESNETS.CAFFE_MAXPOOL`` (caffe's
``pool1``: 3x3/2, no padding, ceil mode), ``MODEL.RESNETS.RES5_DILATION`` reused for the res5
head (2 = BUTD's dilated res5 of stride 1), ``MODEL.ROI_ATTRIBUTE_HEAD.*`` and ``EXTRACT.*``.
"""
import os

import torch
from torch import nn
from torch.nn import functional as F

from mmf_multilevel.compat.detectron2 import import_detectron2
from mmf_multilevel.paths import DETECTOR_CONFIG_DIR

import_detectron2()

from detectron2.config import CfgNode, configurable, get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, build_model  # noqa: E402
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet, build_resnet_backbone  # noqa: E402
from detectron2.modeling.roi_heads import Res5ROIHeads  # noqa: E402

CONFIG_DIR = DETECTOR_CONFIG_DIR

MODELS = {
    "butd_r101": "butd_r101.yaml",
    "vinvl_x152c4": "vinvl_x152c4.yaml",
}


def config_path(model_name):
    """Path of the yaml config of ``model_name`` (``feature_extraction/configs``, installed as
    ``mmf_multilevel/extraction/configs``)."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {sorted(MODELS)}")
    path = os.path.join(CONFIG_DIR, MODELS[model_name])
    if not os.path.exists(path):
        raise FileNotFoundError(f"config {MODELS[model_name]} of model {model_name!r} not found in {CONFIG_DIR}")
    return path


def add_region_config(cfg):
    """Add the keys of the region detectors to a detectron2 config (idempotent)."""
    cfg.MODEL.RESNETS.CAFFE_MAXPOOL = False
    cfg.MODEL.ATTRIBUTE_ON = True
    cfg.MODEL.ROI_ATTRIBUTE_HEAD = CfgNode()
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES = 401  # attributes + "no attribute" (column 0)
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.OBJ_EMBED_DIM = 256
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM = 512
    cfg.EXTRACT = CfgNode()
    cfg.EXTRACT.MIN_BOXES = 10
    cfg.EXTRACT.MAX_BOXES = 100
    cfg.EXTRACT.CONF_THRESH = 0.2
    cfg.EXTRACT.NMS_THRESH = 0.3
    return cfg


def load_config(model_name, opts=()):
    """detectron2 config of ``model_name`` with ``opts`` (``["KEY", "VALUE", ...]``) applied."""
    cfg = add_region_config(get_cfg())
    cfg.merge_from_file(config_path(model_name))
    if opts:
        if len(opts) % 2:
            raise ValueError(f"config overrides must come in KEY VALUE pairs, got {list(opts)}")
        cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = ""
    return cfg


# --------------------------------------------------------------------------- backbone
class CaffeMaxPoolStem(BasicStem):
    """detectron2's stem with caffe's ``pool1`` (3x3, stride 2, no padding, ceil mode)."""

    def forward(self, x):
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


@BACKBONE_REGISTRY.register()
def build_region_resnet_backbone(cfg, input_shape):
    """detectron2's ResNet backbone, with caffe's stem pooling when ``MODEL.RESNETS.CAFFE_MAXPOOL``."""
    backbone = build_resnet_backbone(cfg, input_shape)
    if cfg.MODEL.RESNETS.CAFFE_MAXPOOL:
        backbone.stem.__class__ = CaffeMaxPoolStem  # same parameters, different pooling
    return backbone


# --------------------------------------------------------------------------- ROI heads
class AttributePredictor(nn.Module):
    """Attribute logits from a region feature and the embedding of its object class."""

    def __init__(self, input_dim, num_object_classes, num_attributes, embed_dim=256, fc_dim=512):
        super().__init__()
        self.obj_embed = nn.Embedding(num_object_classes + 1, embed_dim)
        self.fc = nn.Sequential(nn.Linear(input_dim + embed_dim, fc_dim), nn.ReLU(inplace=True))
        self.attr_score = nn.Linear(fc_dim, num_attributes)

    def forward(self, features, object_labels):
        """``object_labels``: 0-based object class per region (detectron2 order)."""
        return self.attr_score(self.fc(torch.cat([features, self.obj_embed(object_labels)], dim=1)))


@ROI_HEADS_REGISTRY.register()
class AttributeRes5ROIHeads(Res5ROIHeads):
    """C4 ROI heads with a dilatable res5 and an attribute predictor (BUTD / VinVL)."""

    @configurable
    def __init__(self, *, attribute_predictor=None, **kwargs):
        super().__init__(**kwargs)
        self.attribute_predictor = attribute_predictor

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        if cfg.MODEL.ATTRIBUTE_ON:
            head = cfg.MODEL.ROI_ATTRIBUTE_HEAD
            out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
            ret["attribute_predictor"] = AttributePredictor(
                out_channels, cfg.MODEL.ROI_HEADS.NUM_CLASSES, head.NUM_CLASSES, head.OBJ_EMBED_DIM, head.FC_DIM
            )
        return ret

    @classmethod
    def _build_res5_block(cls, cfg):
        resnets = cfg.MODEL.RESNETS
        dilation = resnets.RES5_DILATION
        if dilation not in (1, 2):
            raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {dilation}")
        groups, width = resnets.NUM_GROUPS, resnets.WIDTH_PER_GROUP
        out_channels = resnets.RES2_OUT_CHANNELS * 8
        blocks = ResNet.make_stage(
            BottleneckBlock,
            3,
            stride_per_block=[2 if dilation == 1 else 1, 1, 1],
            in_channels=out_channels // 2,
            bottleneck_channels=groups * width * 8,
            out_channels=out_channels,
            num_groups=groups,
            norm=resnets.NORM,
            stride_in_1x1=resnets.STRIDE_IN_1X1,
            dilation=dilation,
        )
        return nn.Sequential(*blocks), out_channels

    def region_outputs(self, features, proposal_boxes):
        """Pooled res5 features and class probabilities of every proposal.

        -> ``pooled`` (R, D), ``cls_prob`` (R, C + 1) with the background in column 0.
        """
        box_features = self._shared_roi_transform([features[f] for f in self.in_features], proposal_boxes)
        pooled = box_features.mean(dim=[2, 3])
        logits, _deltas = self.box_predictor(pooled)
        probs = F.softmax(logits.float(), dim=-1)
        cls_prob = torch.cat([probs[:, -1:], probs[:, :-1]], dim=1)  # background first, as the originals
        return pooled, cls_prob

    def attribute_probs(self, pooled, object_labels):
        """(R, A + 1) attribute probabilities ("no attribute" in column 0), or None without the head."""
        if self.attribute_predictor is None:
            return None
        return F.softmax(self.attribute_predictor(pooled, object_labels).float(), dim=-1)


# --------------------------------------------------------------------------- building
def build_detector(cfg, device="cpu"):
    """Build the detectron2 model of ``cfg`` in eval mode on ``device`` (random weights)."""
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = str(device)
    model = build_model(cfg)
    model.eval()
    return model


@torch.no_grad()
def calibrate_frozen_norms(model, image):
    """Give a random-initialised model sane activations: set every FrozenBatchNorm2d's statistics.

    With detectron2's FrozenBatchNorm at identity the activations of a random ResNet grow by
    orders of magnitude and the RPN returns no proposals. This runs ``image`` (3 x H x W, BGR
    0-255) through the model once; a pre-hook on each FrozenBatchNorm2d sets its mean/variance
    to those of its input (weight 1, bias 0) just before it normalises, so every layer sees
    unit-variance inputs. Deterministic for a given image and weights.
    """
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]

    def hook(module, args):
        x = args[0]
        dims = [0, 2, 3]
        module.running_mean.copy_(x.mean(dim=dims))
        module.running_var.copy_(x.var(dim=dims, unbiased=False).clamp_min(1e-3) - module.eps)
        module.weight.fill_(1.0)
        module.bias.zero_()

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        images = model.preprocess_image([{"image": image.to(model.device)}])
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        if sum(len(p) for p in proposals) == 0:  # res5 still needs statistics
            from detectron2.structures import Boxes

            h, w = images.image_sizes[0]
            boxes = [Boxes(torch.tensor([[0.0, 0.0, float(w), float(h)]], device=model.device))]
        else:
            boxes = [p.proposal_boxes for p in proposals]
        model.roi_heads.region_outputs(features, boxes)
    finally:
        for handle in handles:
            handle.remove()
    return len(norms)


def random_calibration_image(cfg, seed):
    """A deterministic smooth random BGR image at the configured test size (for calibration)."""
    generator = torch.Generator().manual_seed(seed)
    h = int(cfg.INPUT.MIN_SIZE_TEST)
    w = min(int(cfg.INPUT.MAX_SIZE_TEST), int(round(h * 4 / 3)))
    coarse = torch.rand(1, 3, max(2, h // 16), max(2, w // 16), generator=generator) * 255.0
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]


def build_random_detector(cfg, seed=0, device="cpu"):
    """Random-initialised detector with calibrated normalisation (tests, benchmarks, demos)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_detector(cfg, "cpu")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for module in model.modules():  # detectron2 leaves some heads at fixed init; randomise them a little
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.01)
                    nn.init.zeros_(module.bias)
        calibrate_frozen_norms(model, random_calibration_image(cfg, seed))
    finally:
        torch.random.set_rng_state(state)
    return model.to(device)


class DetectorSetupError(ValueError):
    """A detector that cannot be built or loaded (the message names the model, config key or weights file)."""


def load_detector(model_name, weights=None, random_init=None, opts=(), device="cpu"):
    """``(cfg, model, weights_layout, weights_sha256)``: ``model_name``'s detector (a key of :data:`MODELS`, config
    ``opts`` applied) in eval mode on ``device``, with ``weights`` (a path or URL, converted by
    :mod:`.converters`) or, with ``random_init`` (a seed), random calibrated weights. What ``extract.py`` runs."""
    from mmf_multilevel.extraction import converters

    if (weights is None) == (random_init is None):
        raise DetectorSetupError(f"{model_name}: give the detector's weights (a path or URL) or a random_init seed, "
                                 "exactly one")
    try:
        cfg = load_config(model_name, list(opts))
    except Exception as exc:
        raise DetectorSetupError(f"config of {model_name}: {exc}") from None
    if random_init is not None:
        model = build_random_detector(cfg, seed=int(random_init), device="cpu")
        return cfg, model.to(device).eval(), f"random-init seed {random_init}", converters.state_sha256(model)
    model = build_detector(cfg, "cpu")
    try:
        path = converters.resolve_weights(weights)
        layout, weights_sha = converters.load_weights(model, path, converters.anchor_shape(cfg))
    except converters.CheckpointError as exc:
        raise DetectorSetupError(str(exc)) from None
    return cfg, model.to(device).eval(), layout, weights_sha
