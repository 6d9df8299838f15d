"""Where the shipped yaml files are, in a source checkout and in an installed wheel alike.

In the repository the default configs live in the top-level ``configs/`` and the detector configs in
``feature_extraction/configs/``; ``pip install .`` copies them into the package
(``mmf_multilevel/configs``, ``mmf_multilevel/extraction/configs``; see ``setup.py``). Each path
below is the installed copy when there is one, else the checkout's folder. Standard library only
(imported by the compatibility layer at MMF's import).
"""
import os

__all__ = ["PACKAGE_DIR", "CONFIG_DIR", "DATASET_CONFIG_DIR", "DETECTOR_CONFIG_DIR"]

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPOSITORY = os.path.dirname(PACKAGE_DIR)


def _first_holding(marker, *folders):
    """The first folder that holds the file ``marker`` (an empty leftover folder does not count)."""
    for folder in folders:
        if os.path.isfile(os.path.join(folder, marker)):
            return folder
    return folders[-1]


#: ``defaults.yaml`` (MMF's missing defaults), ``models/`` (MMF models' missing configs), ``datasets/``
CONFIG_DIR = _first_holding("defaults.yaml", os.path.join(PACKAGE_DIR, "configs"), os.path.join(_REPOSITORY, "configs"))
DATASET_CONFIG_DIR = os.path.join(CONFIG_DIR, "datasets")
#: the BUTD / VinVL detector yaml files
DETECTOR_CONFIG_DIR = _first_holding("butd_r101.yaml", os.path.join(PACKAGE_DIR, "extraction", "configs"),
                                     os.path.join(_REPOSITORY, "feature_extraction", "configs"))
