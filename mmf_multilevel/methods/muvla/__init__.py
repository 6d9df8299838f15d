"""μ-VLA (Zhou et al., 2022): unsupervised vision-language pre-training on a weakly aligned corpus.
See README.md here.

Importing this package loads the framework-free network, heads and losses only; the registered MMF
model is ``mmf_multilevel.methods.muvla.model.MuVLA`` and the datasets are in ``.data``."""
from mmf_multilevel.methods.muvla.network import TASK_IDS, TASKS, MuVLANetwork  # noqa: F401
from mmf_multilevel.methods.muvla.pretraining import MuVLAPretrainingHeads, pretraining_losses  # noqa: F401
