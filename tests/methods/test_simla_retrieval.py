"""SIMLA's retrieval head (``training_head_type: retrieval``) on the tiny configuration: the image-id-aware ITC
target (every caption of an image a positive) against a computation written out here, the ITM hard negatives
never of the query's image, the gallery scores (the ITM match logit), aligned validation without an enqueue,
and a pre-training checkpoint loading into a retrieval model whole."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from helpers.simla import unimodal_features
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.methods.simla import model as simla_model
from mmf_multilevel.methods.simla import testing
from mmf_multilevel.methods.simla.losses import itc_loss

pytestmark = pytest.mark.usefixtures("mmf_global_config")

#: six captions of three images: 0 has three, 1 two, 2 one
IMAGE_INDEX = [0, 0, 0, 1, 1, 2]


def build(head_type="retrieval", seed=0, **overrides):
    from mmf.common.registry import registry

    cls = registry.get_model_class("simla")
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.simla, testing.tiny_config(head_type),
                             overrides)
    torch.manual_seed(seed)
    model = cls(config)
    model.build()
    model.init_losses()  # as MMF's build_model does
    return model


def aligned_batch(image_index=IMAGE_INDEX, seed=0):
    """Aligned pairs as ``coco_retrieval_images`` gives them: the captions of one image each with their own
    augmented view of it (the picture plus a little noise). With identical pixels the captions of an image would
    have identical ITC logits, and a pair-only target would give the same loss as the image-aware one."""
    batch = testing.tiny_batch("retrieval", seed=seed, batch=len(image_index))
    index = torch.tensor(image_index)
    generator = torch.Generator().manual_seed(seed + 100)
    pictures = torch.randn(int(index.max()) + 1, 3, testing.IMAGE_SIZE, testing.IMAGE_SIZE, generator=generator)
    views = pictures[index] + 0.3 * torch.randn(index.numel(), 3, testing.IMAGE_SIZE, testing.IMAGE_SIZE,
                                                generator=generator)
    batch.image, batch.image_index = views, index
    return batch


def test_the_itc_target_makes_every_caption_of_an_image_a_positive():
    """``itc_loss`` with the batch's image ids and the untracked queue ids, α = 0: the cross-entropy against the
    hard target alone, which for pair b is uniform over the batch's pairs of b's image (both directions) and zero
    on every queued feature - written out row by row on random features."""
    generator = torch.Generator().manual_seed(0)
    n, dim, queue = len(IMAGE_INDEX), 8, 5

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator), dim=-1)

    image_feat, text_feat, image_feat_m, text_feat_m = (unit(n, dim) for _ in range(4))
    image_queue, text_queue = unit(queue, dim).t(), unit(queue, dim).t()
    temp = torch.tensor(0.1)
    ids = torch.tensor(IMAGE_INDEX)
    got = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, 0.0,
                   image_ids=ids, queue_ids=torch.full((queue,), simla_model.UNTRACKED_ID)).loss
    expected = 0.0
    for b in range(n):
        positives = [j for j in range(n) if IMAGE_INDEX[j] == IMAGE_INDEX[b]]
        target = torch.zeros(n + queue)
        target[positives] = 1.0 / len(positives)
        i2t = torch.cat([image_feat[b] @ text_feat_m.t(), image_feat[b] @ text_queue]) / temp
        t2i = torch.cat([text_feat[b] @ image_feat_m.t(), text_feat[b] @ image_queue]) / temp
        expected += -(target * F.log_softmax(i2t, dim=0)).sum() / 2 - (target * F.log_softmax(t2i, dim=0)).sum() / 2
    assert float(got) == pytest.approx(float(expected) / n, rel=1e-5)


def test_the_model_hands_itc_the_batch_image_ids_and_a_queue_of_negatives(monkeypatch):
    seen = []
    original = simla_model.itc_loss

    def record(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(simla_model, "itc_loss", record)
    model = build(queue_size=12).train()
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    model(aligned_batch())
    (kwargs,) = seen
    assert kwargs["image_ids"].tolist() == IMAGE_INDEX
    queue_ids = kwargs["queue_ids"]
    assert queue_ids.shape == (12,) and not bool(torch.isin(queue_ids, kwargs["image_ids"]).any())


def test_tracked_queue_ids_make_queued_features_of_a_batch_image_positives(monkeypatch):
    """track_queue_ids (ALBEF's idx_queue): the enqueue writes the batch's image ids, and the next step hands ITC
    the queue's ids, so a queued feature of the same image counts as a positive; untracked (SIMLA) never does."""
    seen = []
    original = simla_model.itc_loss

    def record(*args, **kwargs):  # a copy: the queue's ids are the live buffer, written after the loss
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        return original(*args, **kwargs)

    monkeypatch.setattr(simla_model, "itc_loss", record)
    model = build(queue_size=12, track_queue_ids=True).train()
    assert "queues.idx_queue" in model.state_dict()
    for update in range(2):
        model.on_update_start(TrainingProgress(update=update, epoch=1))
        model(aligned_batch())
    first, second = seen
    assert (first["queue_ids"] == -100).all()
    assert second["queue_ids"][:6].tolist() == IMAGE_INDEX and (second["queue_ids"][6:] == -100).all()
    assert model.queues.idx_queue[0, 6:].tolist() == IMAGE_INDEX and int(model.queues.queue_ptr) == 0
    assert "queues.idx_queue" not in build(queue_size=12).state_dict()


def test_the_itm_negatives_are_never_of_the_same_image(monkeypatch):
    drawn = []
    original = simla_model.itm_pair_indices

    def record(neg_text, neg_image):
        drawn.append((neg_text.clone(), neg_image.clone()))
        return original(neg_text, neg_image)

    monkeypatch.setattr(simla_model, "itm_pair_indices", record)
    model = build(queue_size=12).train()
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    index = torch.tensor(IMAGE_INDEX)
    for seed in range(12):
        torch.manual_seed(seed)
        out = model(aligned_batch(seed=seed))
        assert out["scores"].shape == (len(IMAGE_INDEX), 2)
    assert len(drawn) == 12
    for neg_text, neg_image in drawn:
        assert (index[neg_text] != index).all(), (neg_text, index)
        assert (index[neg_image] != index).all(), (neg_image, index)


def test_a_batch_of_one_image_has_a_zero_itm_loss_and_aligned_validation_enqueues_nothing():
    model = build(queue_size=12).eval()
    batch = aligned_batch([0, 0, 0])
    batch.dataset_type = "val"
    with torch.no_grad():
        losses = model(batch)["losses"]
    assert float(losses["val/simla_contract/itm"]) == 0.0 and torch.isfinite(losses["val/simla_contract/itc"])
    assert int(model.queues.queue_ptr) == 0


@pytest.mark.parametrize("image_index", [[0, 0, 0], [0]])
def test_the_pairs_of_one_image_are_scored_by_the_itm_head_on_their_padded_captions(image_index):
    """With no other image to draw a negative from (a short last batch, or one pair), the scores are the ITM logits
    of the pairs themselves - each caption with its padding mask - and the ITM loss is a zero in the graph."""
    model = build().train()
    for module in model.modules():  # no dropout, still the training path
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = aligned_batch(image_index)
    batch.input_mask[0, -2:] = 0  # the first caption padded too
    out = model(batch)
    itm = out["losses"]["train/simla_contract/itm"]
    assert float(itm.detach()) == 0.0 and itm.requires_grad
    with torch.no_grad():
        net = model.backbone
        fused = net.text_encoder.fuse(batch.input_ids, batch.input_mask, net.image_encoder(batch.image))
        expected = model.heads.itm_head(fused[:, 0])
    torch.testing.assert_close(out["scores"], expected)


def test_gallery_pairs_are_scored_by_the_itm_match_logit():
    model = build().eval()
    batch = aligned_batch([0, 1, 1, 2])
    del batch["image_index"]
    batch.pair_image_index, batch.pair_text_index = torch.tensor([0, 1, 1, 2]), torch.arange(4)
    batch.dataset_type = "test"
    with torch.no_grad():
        scores = model(batch)["scores"]
        net = model.backbone
        fused = net.text_encoder.fuse(batch.input_ids, batch.input_mask, net.image_encoder(batch.image))
        expected = model.heads.itm_head(fused[:, 0])[:, 1:]
    assert scores.shape == (4, 1)
    torch.testing.assert_close(scores, expected)


def test_a_pre_training_checkpoint_loads_whole_into_a_retrieval_model():
    state = build("pretraining", seed=3).state_dict()
    target = build("retrieval", seed=4)
    target.load_state_dict(state, strict=True)
    assert torch.equal(target.state_dict()["heads.itm_head.weight"], state["heads.itm_head.weight"])
    assert target.dvae is None


def test_pretrained_state_mapping_resamples_the_position_embeddings_to_the_fine_tuning_grid():
    """A 64² pre-training checkpoint (4x4 patches) into a 96² retrieval model (6x6) through the trainer's
    ``pretrained_state_mapping`` load: the online and momentum position embeddings resampled, the rest copied."""
    from types import SimpleNamespace

    from mmf_multilevel.methods.simla.vision import resize_position_embeddings
    from mmf_multilevel.trainers.checkpoint import MultilevelCheckpoint

    source = build("pretraining", seed=3).state_dict()
    target = build("retrieval", seed=4, image_size=96)
    mapping = {"backbone": "backbone", "heads": "heads", "momentum": "momentum", "queues": "queues"}
    config = OmegaConf.create({"checkpoint": {"pretrained_state_mapping": mapping}})
    writer = SimpleNamespace(write=lambda *args, **kwargs: None)
    MultilevelCheckpoint._load_pretrained(SimpleNamespace(trainer=SimpleNamespace(model=target, config=config,
                                                                                  writer=writer)), source)
    after = target.state_dict()
    for key in ("backbone.image_encoder.vit.pos_embed", "momentum.copies.visual_encoder.vit.pos_embed"):
        assert after[key].shape == (1, 37, 32)
        torch.testing.assert_close(after[key], resize_position_embeddings({"pos_embed": source[key]}, (6, 6))["pos_embed"])
    for key in ("heads.itm_head.weight", "backbone.text_encoder.text.bert.embeddings.word_embeddings.weight",
                "momentum.copies.vision_proj.weight", "queues.text_queue"):
        assert torch.equal(after[key], source[key]), key


def test_sixty_steps_on_a_fixed_batch_lower_both_losses():
    model = build(queue_size=12, optimization=dict(lr=1e-3, warmup_lr=1e-3, warmup_updates=0)).train()
    optimizer = model.configure_optimizer(OmegaConf.create({}))
    batch = aligned_batch()
    history = []
    for step in range(60):
        model.on_update_start(TrainingProgress(update=step, epoch=1))
        torch.manual_seed(step)
        losses = model(batch)["losses"]
        history.append({key.rsplit("/", 1)[-1]: float(value) for key, value in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for name in ("itc", "itm"):
        assert history[-1][name] < 0.9 * history[0][name], (name, history[0], history[-1])


@pytest.mark.parametrize("with_image_index", [True, False])
def test_retrieval_losses_and_scores_equal_a_recomputation_from_the_pieces(with_image_index):
    """ITC (Eq. 2 with the momentum distillation of Eqs. 3-4 at α, the image-aware hard target, the queue all
    negatives) and ITM (Eq. 5: the B pairs and the hard negatives drawn from the ITC similarities, fused with
    the text-mode states) recomputed from the encoders, heads and momentum copies; without ``image_index`` every
    pair is its own image."""
    from mmf_multilevel.methods.simla.losses import itm_loss, itm_pair_indices, sample_hard_negatives

    model = build(queue_size=12).eval()  # no dropout, no enqueue
    model.alpha = 0.4
    with torch.no_grad():  # online and momentum features differ; the fusion reads the cross-attention
        model.heads.vision_proj.weight.add_(torch.randn_like(model.heads.vision_proj.weight))
        model.backbone.text_encoder.cross_attention["0"].self.query.weight.mul_(1.5)
        model.queues.image_queue.copy_(F.normalize(torch.randn_like(model.queues.image_queue), dim=0))
        model.queues.text_queue.copy_(F.normalize(torch.randn_like(model.queues.text_queue), dim=0))
    batch = aligned_batch()
    if not with_image_index:
        del batch["image_index"]
    image_ids = torch.tensor(IMAGE_INDEX) if with_image_index else torch.arange(len(IMAGE_INDEX))
    torch.manual_seed(7)
    with torch.no_grad():
        out = model(batch)
    losses = {key.rsplit("/", 1)[-1]: value for key, value in out["losses"].items()}
    ids, mask = batch.input_ids, batch.input_mask
    with torch.no_grad():
        bert, heads = model.backbone.text_encoder, model.heads
        f = unimodal_features(model, batch.image, ids, mask)
        image, text = f["image"], f["text"]
        queue_ids = torch.full((12,), -100, dtype=torch.long)
        itc = itc_loss(f["image_feat"], f["text_feat"], f["image_feat_m"], f["text_feat_m"], model.queues.image_queue,
                       model.queues.text_queue, heads.clamp_temperature(), 0.4, image_ids=image_ids, queue_ids=queue_ids)
        torch.manual_seed(7)  # the negatives are the forward's first random draw
        neg_text, neg_image = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, image_ids=image_ids)
        text_index, image_index = itm_pair_indices(neg_text, neg_image)
        fused = bert.fuse(ids[text_index], mask[text_index], image[image_index], text_states=text[text_index])
        logits = heads.itm_logits(fused[:, 0])
    torch.testing.assert_close(losses["itc"], itc.loss)
    torch.testing.assert_close(losses["itm"], itm_loss(logits))
    torch.testing.assert_close(out["scores"], logits[: len(IMAGE_INDEX)])


def test_only_the_vit_position_embeddings_are_resampled_on_a_mapped_load():
    """``adapt_pretrained_tensor``: a position embedding of another grid is resampled; any other tensor - of the same
    shape or not (the loader then names the mismatch) - comes back as it is."""
    model = build()
    own = model.backbone.image_encoder.vit.pos_embed
    other = torch.randn(3, 5)
    assert model.adapt_pretrained_tensor("backbone.text_encoder.x.weight", other, torch.zeros(4, 5)) is other
    same = torch.randn_like(own)
    assert model.adapt_pretrained_tensor("backbone.image_encoder.vit.pos_embed", same, own) is same
    bigger = torch.randn(1, 1 + 8 * 8, own.size(2))  # an 8x8 grid for the model's 4x4
    assert model.adapt_pretrained_tensor("momentum.copies.visual_encoder.vit.pos_embed", bigger, own).shape == own.shape
