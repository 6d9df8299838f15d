"""The analytic FLOP counts the benchmarks print (benchmarks/bench_soho.py, bench_extract.py) against
``torch.utils.flop_counter`` run on the real modules: a formula that forgets a layer, a stride or the
downsampling branch fails here."""
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_extract  # noqa: E402
import bench_soho  # noqa: E402


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """torch's own SDPA formula for the CPU flash kernel, which its flop counter does not register."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def counted(fn):
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("size", [(64, 96), (100, 130)])
def test_resnet101_to_c5(size):
    import timm

    model = timm.create_model("resnet101", pretrained=False, features_only=True, out_indices=(4,)).eval()
    flops, grid = bench_soho.resnet_flops(101, *size)
    out = []
    assert counted(lambda: out.append(model(torch.zeros(1, 3, *size))[-1])) == flops
    assert tuple(out[0].shape[-2:]) == grid


def test_soho_grid_encoder_and_transformer():
    from transformers import BertConfig

    from mmf_multilevel.methods.soho.network import SOHONetwork
    from mmf_multilevel.modules.heads import VQAHead
    from mmf_multilevel.modules.text import BertTextEncoder

    hidden, layers, inter, answers, words = bench_soho.H, 2, bench_soho.I, 7, 5
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=50,
                        max_position_embeddings=40)
    network = SOHONetwork(BertTextEncoder.from_config(config), backbone="resnet101", pretrained_backbone=False,
                          vd_size=8, mask_token_id=4).eval()
    head = VQAHead(hidden, answers).eval()
    height, width = 130, 200
    expected = bench_soho.soho_inference_flops(height, width, words=words)
    pixels = torch.zeros(1, 3, height, width)
    assert counted(lambda: network.encode_image(pixels, quantise=False)) == expected["cnn"]
    image = network.encode_image(pixels, quantise=False)
    assert image["features"].size(1) == expected["cells"] == 3 * 4
    ids = torch.full((1, words), 5)

    def transformer():
        out = network.joint(ids, torch.ones_like(ids), image["visual"], image["mask"], image["grid"])
        head(out["pooled"])

    analytic = (bench_soho.encoder_flops(words + expected["cells"], layers=layers)
                + bench_soho.vqa_head_flops(answers=answers))
    assert counted(transformer) == analytic


def test_butd_detector_stages():
    """bench_extract's C4 formula (BUTD R101-C4: caffe stem, dilated res5 head) on the extractor's detector."""
    from mmf_multilevel.extraction import detectors

    cfg = detectors.load_config("butd_r101")
    model = detectors.build_detector(cfg, "cpu").eval()  # the architecture; FLOPs do not depend on the weights
    height, width, proposals = 96, 160, 3
    expected = bench_extract.c4_flops(**bench_extract.ANALYTIC["butd_r101"], height=height, width_px=width,
                                      proposals=proposals)
    image = torch.zeros(3, height, width)
    batch = model.preprocess_image([{"image": image}])
    features = {}
    assert counted(lambda: features.update(model.backbone(batch.tensor))) == expected["backbone"]
    # the RPN's convolutions only (its box decoding and NMS are not multiply-adds)
    head = model.proposal_generator.rpn_head
    assert counted(lambda: head([features["res4"]])) == expected["rpn"]
    from detectron2.structures import Boxes

    boxes = [Boxes(torch.tensor([[0.0, 0.0, 40.0, 30.0], [10.0, 5.0, 90.0, 80.0], [50.0, 20.0, 150.0, 90.0]]))]
    assert counted(lambda: model.roi_heads.region_outputs(features, boxes)) == expected["res5_head"] + expected["predictor"]
