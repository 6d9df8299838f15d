"""Imported once MMF is loaded: registers every mmf-multilevel component with MMF.

Shared datasets, processors, metrics and the trainer are listed here; methods are discovered
(:func:`mmf_multilevel.methods.register_all`: every folder under ``methods/`` with a ``model.py``).
"""
import mmf_multilevel.datasets.captions  # noqa: F401
import mmf_multilevel.datasets.gqa  # noqa: F401
import mmf_multilevel.datasets.image_tasks  # noqa: F401
import mmf_multilevel.datasets.images  # noqa: F401
import mmf_multilevel.datasets.nlvr2  # noqa: F401
import mmf_multilevel.datasets.refcoco  # noqa: F401
import mmf_multilevel.datasets.retrieval  # noqa: F401
import mmf_multilevel.datasets.snli_ve  # noqa: F401
import mmf_multilevel.datasets.synthetic  # noqa: F401
import mmf_multilevel.datasets.vqa2  # noqa: F401
import mmf_multilevel.metrics  # noqa: F401
import mmf_multilevel.processors.answers  # noqa: F401
import mmf_multilevel.processors.images  # noqa: F401
import mmf_multilevel.processors.qa  # noqa: F401
import mmf_multilevel.trainers.multilevel_trainer  # noqa: F401
from mmf_multilevel.methods import register_all

register_all()
