"""Imported once MMF is loaded: registers every mmf-multilevel component with MMF."""
import mmf_multilevel.datasets.captions  # noqa: F401
import mmf_multilevel.datasets.images  # noqa: F401
import mmf_multilevel.datasets.synthetic  # noqa: F401
import mmf_multilevel.datasets.vqa2  # noqa: F401
import mmf_multilevel.metrics  # noqa: F401
import mmf_multilevel.processors.answers  # noqa: F401
import mmf_multilevel.processors.images  # noqa: F401
import mmf_multilevel.trainers.multilevel_trainer  # noqa: F401
