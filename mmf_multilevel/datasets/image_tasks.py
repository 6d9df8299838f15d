"""Raw-image variants of the downstream tasks, for the pixel-based methods (SOHO, SIMLA).

Each region-feature task dataset gets a twin on raw pixels, with the same annotations, text
fields, targets and metrics, registered as ``<task>_images``: ``vqa2_images``,
``nlvr2_images``, ``snli_ve_images``, ``gqa_images``, ``vgqa_images``,
``coco_retrieval_images``, ``flickr30k_retrieval_images``, ``refcoco_plus_images``. Instead of
``image_feature_0`` / ``image_info_0`` a sample carries ``image`` (float 3 x H x W, from
``RawImageMixin.image_fields``; NLVR2: ``img0.image`` and ``img1.image``), and
``dataset_config.<task>_images`` names ``images:`` per split (a folder, a zip or an image LMDB)
instead of ``features:``, plus the image keys of ``mmf_multilevel.datasets.images`` and an
``image_processor``. When a training image is flipped, "left"/"right" in its text - and in a
GQA / VQA answer - are swapped (``swap_left_right``; NLVR2's default is false, because there
"left"/"right" name the image of the pair, which a flip does not move).

RefCOCO+ on raw images keeps reading its proposals' boxes from the region cache
(``features:``; the features themselves are not loaded): the gold box and the proposals are in
original-image pixels, so the splits that use boxes must not be augmented - with
``supervision: box`` the training split is refused in ``augment_splits``; the weakly supervised
variant (``supervision: none``, SIMLA / ALBEF) trains on augmented images without boxes and is
evaluated on un-augmented ones.
"""
import os

from mmf.common.registry import registry

from mmf_multilevel.datasets.gqa import GQABuilder, VGQABuilder
from mmf_multilevel.datasets.images import RawImageMixin
from mmf_multilevel.datasets.nlvr2 import NLVR2Builder
from mmf_multilevel.datasets.refcoco import RefCOCOPlusBuilder
from mmf_multilevel.datasets.retrieval import COCORetrievalBuilder, Flickr30kRetrievalBuilder
from mmf_multilevel.datasets.snli_ve import SNLIVEBuilder
from mmf_multilevel.datasets.vqa2 import VQA2Builder
from mmf_multilevel.registration import register_variants


class RawImageTaskMixin(RawImageMixin):
    """Swaps a region task dataset's visual input for raw images (see the module docstring)."""

    def image_ids_of(self, record):
        # the task's own notion (NLVR2: two images), not RawImageMixin's single image field
        return [str(i) for i in super(RawImageMixin, self).image_ids_of(record)]

    def open_visual(self, config, dataset_type, index):
        self.init_images(config, dataset_type, index)
        self.records = self.check_images(self.records, self.annotation_path)

    def attach_visual(self, sample, image_id):
        self._flipped = self.image_fields(str(image_id), sample, field="image")
        return self._flipped

    def view_text(self, text):
        return self.text_for_image(text, self._flipped)

    def __getitem__(self, idx):
        return self.get_with_replacement(idx, super().__getitem__)


class RawImageNLVR2Mixin(RawImageTaskMixin):
    def open_visual(self, config, dataset_type, index):
        if self.layout != "paired":
            raise ValueError(
                f"dataset_config.{self.dataset_name}.input_layout: raw images are given per image "
                f"(img0.image, img1.image): use 'paired', not {self.layout!r}"
            )
        super().open_visual(config, dataset_type, index)


class RawImageRefCOCOMixin(RawImageTaskMixin):
    def open_visual(self, config, dataset_type, index):
        from mmf_multilevel.datasets.base import RegionTextDataset

        super().open_visual(config, dataset_type, index)
        if self.supervision == "box" and self.augment:
            raise ValueError(
                f"dataset_config.{self.dataset_name}: supervision 'box' needs un-augmented images in the "
                f"'{dataset_type}' split (boxes are in original pixels); remove it from augment_splits, or use "
                "supervision 'none' (weakly supervised)"
            )
        RegionTextDataset.open_visual(self, config, dataset_type, index)  # the proposals' boxes

    def attach_visual(self, sample, image_id):
        flipped = super().attach_visual(sample, image_id)
        _, sample.image_info_0 = self.region_fields(image_id)
        return flipped


def _twin(builder, mixin=RawImageTaskMixin):
    """The class attributes of ``builder``'s raw-image twin: its dataset with the raw-image mixin."""
    dataset_class = type(f"{builder.dataset_class.__name__[:-len('Dataset')]}ImagesDataset", (mixin, builder.dataset_class), {})
    return {"name": f"{builder.name}_images", "dataset_class": dataset_class,
            "config_file": os.path.join("image_tasks", f"{builder.name}_images.yaml")}


for _name, _builder, _mixin in (
    ("vqa2_images", VQA2Builder, RawImageTaskMixin),
    ("snli_ve_images", SNLIVEBuilder, RawImageTaskMixin),
    ("gqa_images", GQABuilder, RawImageTaskMixin),
    ("vgqa_images", VGQABuilder, RawImageTaskMixin),
    ("coco_retrieval_images", COCORetrievalBuilder, RawImageTaskMixin),
    ("flickr30k_retrieval_images", Flickr30kRetrievalBuilder, RawImageTaskMixin),
    ("nlvr2_images", NLVR2Builder, RawImageNLVR2Mixin),
    ("refcoco_plus_images", RefCOCOPlusBuilder, RawImageRefCOCOMixin),
):
    register_variants(registry.register_builder, _builder, {_name: _twin(_builder, _mixin)}, suffix="Builder")
