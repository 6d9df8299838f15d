"""Imported once MMF is loaded: registers every mmf-multilevel component with MMF."""
import mmf_multilevel.datasets.synthetic  # noqa: F401
import mmf_multilevel.trainers.multilevel_trainer  # noqa: F401
