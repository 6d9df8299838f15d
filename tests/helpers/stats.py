"""Tolerances for tests of random draws, sized in standard errors so a wrong rate cannot pass."""
import math


def assert_rate(observed: float, expected: float, trials: int, sigmas: float = 4.0, what: str = "rate"):
    """``observed`` (a fraction of ``trials`` Bernoulli draws) within ``sigmas`` standard errors of
    ``expected``; the standard error is ``sqrt(p (1 - p) / n)``."""
    se = math.sqrt(expected * (1 - expected) / trials)
    assert abs(observed - expected) <= sigmas * se, (
        f"{what}: {observed:.5f} vs {expected} over {trials} draws (tolerance {sigmas} x {se:.5f})")
    return se
