"""SIMLA (Khan et al., 2022): single-stream multi-level alignment. See README.md here.

Work in progress: only the image side exists (``vision.py``: the ViT image encoder with its MIM mask
token, BEiT block masking and the frozen DALL·E dVAE tokenizer). Importing this package loads nothing;
import :mod:`mmf_multilevel.methods.simla.vision` for those.
"""
