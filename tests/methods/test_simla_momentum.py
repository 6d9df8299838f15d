"""SIMLA's momentum copies, ITC feature queues and α ramp (tiny modules, CPU; the gloo test spawns 2 ranks)."""
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mmf_multilevel.methods.simla.momentum import (
    FeatureQueues,
    MomentumCopies,
    momentum_parameter_names,
    momentum_update,
    ramped_alpha,
)


class Owner(nn.Module):
    """A toy model laid out like SIMLA's: encoders, a head tied to an embedding, one module without a copy."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
        self.decoder = nn.Linear(4, 7, bias=False)
        self.decoder.weight = self.embed.weight  # tied, as the MLM decoder and the word embeddings
        self.itm_head = nn.Linear(3, 2)  # no momentum copy, as in the official code
        self.momentum = MomentumCopies({"embed": self.embed, "encoder": self.encoder, "decoder": self.decoder},
                                       momentum=0.9)


def test_copies_start_equal_without_gradients_and_are_named_for_the_optimizer():
    model = Owner()
    for online, copy in model.momentum.pairs():
        assert online is not copy
        for p, p_m in zip(online.parameters(), copy.parameters()):
            assert p is not p_m and torch.equal(p, p_m) and p.requires_grad and not p_m.requires_grad
    # the tie between two copied modules survives in the copies
    assert model.momentum["decoder"].weight is model.momentum["embed"].weight
    names = momentum_parameter_names(model)
    all_names = {n for n, _ in model.named_parameters()}
    assert names == {n for n in all_names if n.startswith("momentum.copies.")}
    assert names and all_names - names == {"embed.weight", "encoder.0.weight", "encoder.0.bias", "encoder.2.weight",
                                           "encoder.2.bias", "itm_head.weight", "itm_head.bias"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == all_names - names
    # the online modules are not registered a second time under the copies' container
    assert sum(1 for m in model.modules() if m is model.encoder) == 1
    assert any(k.startswith("momentum.copies.encoder.") for k in model.state_dict())
    assert momentum_parameter_names(model.momentum) == {n[len("momentum."):] for n in names}


def test_ema_update_is_m_times_momentum_plus_one_minus_m_times_online():
    model = Owner()
    with torch.no_grad():
        for p in [model.embed.weight, *model.encoder.parameters()]:
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.momentum.named_parameters()}
    online = dict(model.named_parameters())
    model.momentum.update()  # m = 0.9
    for name, p_m in model.momentum.named_parameters():
        source = online[name[len("copies."):]] if not name.startswith("copies.decoder") else online["embed.weight"]
        old, new = before[name].flatten().tolist(), source.flatten().tolist()
        expected = torch.tensor([0.9 * a + 0.1 * b for a, b in zip(old, new)]).view_as(p_m)
        torch.testing.assert_close(p_m, expected, rtol=0, atol=1e-6)  # the tied weight moved once, not twice
    # m = 1 leaves the copies, m = 0 makes them the online weights
    frozen = {n: p.clone() for n, p in model.momentum.named_parameters()}
    momentum_update(model.momentum.pairs(), 1.0)
    assert all(torch.equal(p, frozen[n]) for n, p in model.momentum.named_parameters())
    momentum_update(model.momentum.pairs(), 0.0)
    for online_module, copy in model.momentum.pairs():
        assert all(torch.equal(a, b) for a, b in zip(online_module.parameters(), copy.parameters()))
    with pytest.raises(ValueError, match="model_config.simla.momentum"):
        momentum_update(model.momentum.pairs(), 1.5)


def test_copies_of_the_simla_modules_compute_what_the_online_ones_do():
    # imported here: the spawned gloo ranks import this module, and transformers would slow each start by seconds
    from transformers import BertConfig

    from mmf_multilevel.methods.simla.network import SIMLATextEncoder
    from mmf_multilevel.methods.simla.pretraining import SIMLAPretrainingHeads

    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    text = SIMLATextEncoder.from_config(config).eval()
    heads = SIMLAPretrainingHeads(config, vision_width=32, embed_dim=8, image_vocab=12).tie_to(text.word_embeddings)
    # the official pairs on the text side: the BERT with its MLM head, the projection, the MIM and concept heads
    online = {"text_encoder": text, "mlm": heads.mlm, "text_proj": heads.text_proj, "mim_head": heads.mim_head,
              "concept_head": heads.concept_head}
    copies = MomentumCopies(online)
    assert copies["mlm"].decoder.weight is copies["text_encoder"].word_embeddings.weight  # the tie survives
    ids, image = torch.randint(1, 40, (2, 6)), torch.randn(2, 5, 32)
    torch.testing.assert_close(copies["text_encoder"].fuse(ids, None, image), text.fuse(ids, None, image))
    torch.testing.assert_close(copies["mlm"](text.encode_text(ids)), heads.mlm(text.encode_text(ids)))
    with torch.no_grad():
        text.word_embeddings.weight.add_(1.0)
    before = copies["text_encoder"].word_embeddings.weight.clone()
    copies.update()
    torch.testing.assert_close(copies["mlm"].decoder.weight, before + 0.005)  # moved once through the tie
    assert sum(p.requires_grad for p in copies.parameters()) == 0


def test_synchronize_after_loading_online_weights_and_pairs_must_match():
    model = Owner()
    with torch.no_grad():
        model.encoder[0].weight.fill_(3.0)
    assert not torch.equal(model.momentum["encoder"][0].weight, model.encoder[0].weight)
    model.momentum.synchronize()
    assert torch.equal(model.momentum["encoder"][0].weight, model.encoder[0].weight)
    with pytest.raises(ValueError, match="same architecture"):
        momentum_update([(nn.Linear(2, 2), nn.Linear(2, 2, bias=False))])
    with pytest.raises(ValueError, match="without dots"):
        MomentumCopies({"a.b": nn.Linear(2, 2)})


def test_queues_are_unit_norm_buffers_in_the_state_dict():
    queues = FeatureQueues(embed_dim=5, queue_size=8, generator=torch.Generator().manual_seed(0))
    assert queues.image_queue.shape == queues.text_queue.shape == (5, 8)
    torch.testing.assert_close(queues.image_queue.norm(dim=0), torch.ones(8))
    torch.testing.assert_close(queues.text_queue.norm(dim=0), torch.ones(8))
    assert not torch.equal(queues.image_queue, queues.text_queue)
    assert set(queues.state_dict()) == {"image_queue", "text_queue", "queue_ptr"}
    assert list(queues.parameters()) == []
    assert FeatureQueues().image_queue.shape == (256, 65536)
    tracked = FeatureQueues(5, 8, track_ids=True)
    assert torch.equal(tracked.idx_queue, torch.full((1, 8), -100))
    assert "idx_queue" in tracked.state_dict()


def test_enqueue_order_pointer_and_wrap_around():
    queues = FeatureQueues(embed_dim=3, queue_size=6, track_ids=True)
    start = queues.image_queue.clone()
    batches = [torch.arange(6.0).view(2, 3) + 10 * step for step in range(4)]
    pointers = []
    for step, feats in enumerate(batches):
        queues.enqueue(feats, -feats, ids=torch.tensor([step, step + 100]))
        pointers.append(int(queues.queue_ptr))
        if step == 0:  # only the first two columns written, the rest untouched
            assert torch.equal(queues.image_queue[:, 2:], start[:, 2:])
    assert pointers == [2, 4, 0, 2]
    # columns hold features in arrival order; the fourth batch overwrote the first (oldest)
    expected_columns = [batches[3][0], batches[3][1], batches[1][0], batches[1][1], batches[2][0], batches[2][1]]
    for column, feature in enumerate(expected_columns):
        assert torch.equal(queues.image_queue[:, column], feature)
        assert torch.equal(queues.text_queue[:, column], -feature)
    assert queues.idx_queue.tolist() == [[3, 103, 1, 101, 2, 102]]
    # state dict round trip carries the queue and its pointer
    other = FeatureQueues(embed_dim=3, queue_size=6, track_ids=True)
    other.load_state_dict(queues.state_dict())
    assert int(other.queue_ptr) == 2 and torch.equal(other.image_queue, queues.image_queue)


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    queues = FeatureQueues(embed_dim=3, queue_size=8)
    with pytest.raises(ValueError, match=r"model_config\.simla\.queue_size \(8\).*global batch size \(3"):
        queues.enqueue(torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="one shape"):
        queues.enqueue(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pass ids"):
        FeatureQueues(3, 8, track_ids=True).enqueue(torch.zeros(2, 3), torch.zeros(2, 3))


def _queue_rank(rank, world, init, local_batches, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    queues = FeatureQueues(embed_dim=3, queue_size=8, track_ids=True, generator=torch.Generator().manual_seed(0))
    for images, texts, ids in local_batches[rank]:
        queues.enqueue(images, texts, ids)
    torch.save(queues.state_dict(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_gloo_ranks_hold_the_queue_one_process_holds_for_the_global_batch(tmp_path):
    g = torch.Generator().manual_seed(1)
    steps = 3  # global batch 4 (2 per rank) into a queue of 8: the third step wraps around
    local = [[(torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), torch.randint(0, 50, (2,), generator=g))
              for _ in range(steps)] for _ in range(2)]
    reference = FeatureQueues(embed_dim=3, queue_size=8, track_ids=True, generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        reference.enqueue(*(torch.cat([local[0][step][i], local[1][step][i]]) for i in range(3)))
    # spawned ranks: a forked rank can deadlock in the OpenMP pool the parent has already used
    mp.spawn(_queue_rank, args=(2, f"file://{tmp_path / 'init'}", local, str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    for key, value in reference.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], value), key
    assert int(reference.queue_ptr) == 4


def test_alpha_ramps_linearly_over_the_first_epoch():
    values = [ramped_alpha(i, steps_per_epoch=4, alpha=0.4) for i in range(7)]
    assert values == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert ramped_alpha(0, 4, alpha=0.4, warm_up=False) == pytest.approx(0.4)
    assert ramped_alpha(1000, 10) == pytest.approx(0.4)  # the paper's 0.4 by default
    for bad in (dict(iteration=0, steps_per_epoch=0), dict(iteration=-1, steps_per_epoch=3),
                dict(iteration=0, steps_per_epoch=3, alpha=1.5)):
        with pytest.raises(ValueError):
            ramped_alpha(**bad)


def test_a_weight_tied_across_modules_does_not_stop_the_pairs_after_it():
    """The second module's first parameter is the first module's weight: it is paired once, and the second
    module's bias after it is still paired, copied and averaged."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    copies = MomentumCopies({"first": first, "second": second})
    assert copies.online("second") is second and copies.online("first") is first
    assert copies["second"].weight is copies["first"].weight  # tied in the copies too
    with torch.no_grad():
        second.bias.add_(1.0)
        first.weight.add_(1.0)
    copies.synchronize()
    torch.testing.assert_close(copies["second"].bias, second.bias)
    with torch.no_grad():
        second.bias.add_(2.0)
    before = copies["second"].bias.clone()
    copies.update(0.25)  # the m given, not the object's 0.995
    torch.testing.assert_close(copies["second"].bias, 0.25 * before + 0.75 * second.bias)
    torch.testing.assert_close(copies["first"].weight, first.weight)  # already equal: the average keeps it
    copies.update()
    torch.testing.assert_close(copies["second"].bias, 0.995 * (0.25 * before + 0.75 * second.bias)
                               + 0.005 * second.bias)


def test_queue_sizes_of_one_and_the_generator_alone_fill_the_queues():
    one = FeatureQueues(embed_dim=1, queue_size=1, track_ids=True)
    assert one.image_queue.shape == (1, 1) and one.image_queue.abs().item() == pytest.approx(1.0)
    assert one.queue_ptr.dtype == one.idx_queue.dtype == torch.long  # checkpoints carry integer pointers and ids
    for bad in (dict(embed_dim=0, queue_size=4), dict(embed_dim=4, queue_size=0)):
        with pytest.raises(ValueError, match="must be positive"):
            FeatureQueues(**bad)
    queues = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        queues.append(FeatureQueues(embed_dim=4, queue_size=8, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(queues[0].image_queue, queues[1].image_queue)
    torch.testing.assert_close(queues[0].text_queue, queues[1].text_queue)
    replay = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(4, 8, generator=replay), dim=0)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=replay), dim=0)
    torch.testing.assert_close(queues[0].image_queue, image)
    torch.testing.assert_close(queues[0].text_queue, text)


def test_alpha_bounds_are_inclusive():
    assert ramped_alpha(0, steps_per_epoch=1, alpha=0.4) == 0.0 and ramped_alpha(1, 1, alpha=0.4) == pytest.approx(0.4)
    assert ramped_alpha(5, 10, alpha=0.0) == 0.0 and ramped_alpha(5, 10, alpha=1.0) == pytest.approx(0.5)
