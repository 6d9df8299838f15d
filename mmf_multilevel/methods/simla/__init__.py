"""SIMLA (Khan et al., 2022): single-stream multi-level alignment. See README.md here.

The registered MMF model ``simla`` (``model.py``; settings ``config.py`` / ``defaults.yaml``) pre-trains it
with ITC, ITM, MLM, MIM and PSL from the framework-free parts: the image side (``vision.py``: the ViT image
encoder with its MIM mask token, BEiT block masking and the frozen DALL·E dVAE tokenizer), the shared
text/multimodal BERT (``network.py``), the pre-training heads (``pretraining.py``), the momentum copies,
feature queues and α ramp (``momentum.py``) and the pre-training losses (``losses.py``). Importing this
package loads nothing; import its modules for those.
"""
