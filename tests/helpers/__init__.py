"""Shared test helpers (imported by tests as ``helpers.<module>``; ``tests/`` is on pytest's path)."""
