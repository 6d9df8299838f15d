"""Dataset builders. MMF is imported first: its import registers our builders, which import this package."""
import mmf  # noqa: F401
