"""SIMLA (Khan et al., 2022): single-stream multi-level alignment. See README.md here.

Work in progress: the image side (``vision.py``: the ViT image encoder with its MIM mask token, BEiT
block masking and the frozen DALL·E dVAE tokenizer), the shared text/multimodal BERT (``network.py``)
and the pre-training heads (``pretraining.py``) exist; the losses and the MMF adapter do not. Importing this package loads nothing;
import :mod:`mmf_multilevel.methods.simla.vision` for those.
"""
