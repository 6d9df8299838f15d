"""MVPTR (Li et al., 2022): multi-stage VLP with multi-level semantic alignment. See README.md here.

So far only the offline phrase-concept tool exists (``mmf_multilevel.methods.mvptr.concepts``);
importing this package imports nothing heavy (no torch, no spaCy)."""
