"""SIMLA (Khan et al., 2022): single-stream multi-level alignment. See README.md here.

Work in progress: the image side (``vision.py``: the ViT image encoder with its MIM mask token, BEiT
block masking and the frozen DALL·E dVAE tokenizer), the shared text/multimodal BERT (``network.py``),
the pre-training heads (``pretraining.py``), the momentum copies, feature queues and α ramp
(``momentum.py``) and the pre-training losses (``losses.py``) exist; the MMF adapter does not. Importing
this package loads nothing; import its modules for those.
"""
