"""The RefCOCO+ reference model: MMF's VisualBERT with a per-region scoring head. See README.md here."""
