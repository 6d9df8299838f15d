"""SOHO (Huang et al., 2021): end-to-end pre-training from pixels with a visual dictionary. See README.md here.

Importing this package loads the framework-free network only; the registered MMF model is
``mmf_multilevel.methods.soho.model.SOHO``."""
from mmf_multilevel.methods.soho.network import (  # noqa: F401
    GRID_STRIDE,
    GridEncoder,
    SOHONetwork,
    VisualDictionary,
    sine_position_embedding,
)
