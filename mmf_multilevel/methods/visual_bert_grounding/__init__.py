"""The RefCOCO+ reference model: MMF's VisualBERT encoder with a per-region scoring head. See README.md here.

Importing this package loads nothing; the registered MMF model is
``mmf_multilevel.methods.visual_bert_grounding.model.VisualBERTGrounding``."""
