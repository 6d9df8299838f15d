"""Predictions on raw inputs, the same API for every registered method (see :mod:`.predictor`):

    from mmf_multilevel.predict import load_predictor
    predictor = load_predictor("projects/simla/demo/vqa.yaml", "save/simla_vqa/simla_final.pth",
                               overrides=["env.data_dir=data"])
    predictor.vqa("data/demo/images/demo_000000.jpg", "what color is the circle?")
    predictor.picture("data/demo/images/demo_000000.jpg", "what color is the circle?", "circle.png", "circle.html")

``mmf_ml_predict`` is the command (:mod:`.cli`).
"""
from mmf_multilevel.predict.align import Alignment
from mmf_multilevel.predict.detect import DetectorRegions
from mmf_multilevel.predict.inputs import PredictInputError, QueryImage, read_image
from mmf_multilevel.predict.pictures import draw_alignment, write_alignment
from mmf_multilevel.predict.predictor import Predictor, load_predictor, resolve_model
from mmf_multilevel.predict.regions import MissingRegionsError, RegionCache, RegionSource

__all__ = ["load_predictor", "Predictor", "resolve_model", "PredictInputError", "QueryImage", "read_image",
           "RegionSource", "RegionCache", "MissingRegionsError", "DetectorRegions", "Alignment", "draw_alignment",
           "write_alignment"]
