"""MVPTR (Li et al., 2022): multi-stage VLP with multi-level semantic alignment. See README.md here.

The offline phrase-concept tool (``.concepts``), the network (``.network``) and the pre-training heads
(``.pretraining``) exist; importing this package imports nothing heavy (no torch, no spaCy)."""
