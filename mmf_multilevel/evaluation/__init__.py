"""Evaluation algorithms of the downstream tasks, independent of MMF (tensors in, numbers out)."""
