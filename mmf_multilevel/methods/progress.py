"""What the trainer pushes to a method before every optimizer update (framework-free)."""
from dataclasses import dataclass

__all__ = ["TrainingProgress"]


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stands when an update starts: ``update`` optimizer updates are done (so this
    is the 0-based index of the update about to run), ``epoch`` is MMF's 1-based epoch."""

    update: int = 0
    epoch: int = 0
