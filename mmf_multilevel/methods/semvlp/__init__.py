"""SemVLP (Li et al., 2021): one transformer pre-trained single-stream and two-stream. See README.md here.

Importing this package loads the framework-free network only; the registered MMF model is
``mmf_multilevel.methods.semvlp.model.SemVLP``."""
from mmf_multilevel.methods.semvlp.network import MODES, SINGLE, TWO, SemVLPNetwork  # noqa: F401
from mmf_multilevel.methods.semvlp.pretraining import (  # noqa: F401
    ModeSchedule,
    SemVLPPretrainingHeads,
    pretraining_losses,
)
