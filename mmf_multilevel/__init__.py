"""mmf-multilevel: multi-level vision-language pre-training methods as an MMF plugin.

Importing this package is cheap on purpose: it is imported from a ``.pth`` hook at
interpreter start, so nothing heavy (torch, transformers, mmf) may be imported here.
"""

__version__ = "0.1.0"
