"""The faster BERT attention / dropout: the same function as HF's, checked against independent computations."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertAttention, BertSelfAttention

from helpers.stats import assert_rate
from mmf_multilevel.modules.attention import (
    FastBertSelfAttention,
    FastDropout,
    dropout,
    record_attention,
    use_fast_attention,
)
from mmf_multilevel.modules.text import BertTextEncoder

CONFIG = dict(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=40)


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.rand(400_000) + 0.5
    x.requires_grad_(True)
    for p in (0.1, 0.5):
        y = dropout(x, p)
        dropped = (y == 0).float().mean().item()
        assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / x.numel())  # 4 sigma
        kept = y != 0
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))
        (grad,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(grad, kept.float() / (1 - p))
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout(x, 1.0)


def test_swapped_model_keeps_its_state_and_matches_hf_in_evaluation():
    torch.manual_seed(1)
    reference = BertModel(BertConfig(**CONFIG)).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    encoder = BertTextEncoder.from_config(BertConfig(**CONFIG))
    encoder.bert.load_state_dict(state)
    encoder.eval()
    selves = [layer.attention.self for layer in encoder.layers]
    assert all(type(s) is FastBertSelfAttention for s in selves)
    assert all(type(m) is FastDropout for m in encoder.modules() if isinstance(m, torch.nn.Dropout))
    assert encoder.bert.state_dict().keys() == state.keys()
    ids = torch.randint(0, 80, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(encoder.bert(ids, attention_mask=mask).last_hidden_state,
                                   reference(ids, attention_mask=mask).last_hidden_state, atol=1e-6, rtol=0)
    assert use_fast_attention(encoder) == 0  # already swapped


@pytest.mark.parametrize("cross", [False, True])
def test_training_path_equals_softmax_attention_with_the_drawn_mask(cross):
    torch.manual_seed(2)
    config = BertConfig(**CONFIG, attention_probs_dropout_prob=0.25)
    attention = FastBertSelfAttention(config).train()
    B, S, K, H = 2, 5, 7 if cross else 5, 32
    hidden = torch.randn(B, S, H)
    memory = torch.randn(B, K, H) if cross else None
    keep = torch.ones(B, K)
    keep[1, 3:] = 0
    additive = (1.0 - keep)[:, None, None, :] * torch.finfo(torch.float32).min
    torch.manual_seed(7)
    out, _ = attention(hidden, attention_mask=additive, encoder_hidden_states=memory)
    # independent: the keep mask is the first draw after seeding (the projections draw nothing)
    torch.manual_seed(7)
    draws = torch.empty(B, 4, S, K, dtype=torch.int32).random_(0, 2 ** 31)
    mask = draws >= round(0.25 * 2 ** 31)
    source = hidden if memory is None else memory

    def heads(x):
        return x.view(B, -1, 4, 8).transpose(1, 2)

    q, k, v = heads(attention.query(hidden)), heads(attention.key(source)), heads(attention.value(source))
    probs = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + additive, dim=-1)
    expected = ((probs * mask / 0.75) @ v).transpose(1, 2).reshape(B, S, H)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.manual_seed(7)  # a boolean mask (True = attend, SDPA's convention) means the same
    as_bool = attention(hidden, attention_mask=keep.bool()[:, None, None, :], encoder_hidden_states=memory)[0]
    torch.testing.assert_close(as_bool, expected, atol=1e-6, rtol=0)
    # with p = 0 (or in evaluation) the SDPA kernel gives HF's numbers
    attention.eval()
    with torch.no_grad():
        plain = attention(hidden, attention_mask=additive, encoder_hidden_states=memory)[0]
    torch.testing.assert_close(plain, (probs @ v).transpose(1, 2).reshape(B, S, H), atol=1e-6, rtol=0)


def test_cases_it_does_not_cover_fall_back_to_hf():
    torch.manual_seed(3)
    attention = FastBertSelfAttention(BertConfig(**CONFIG, attn_implementation="eager")).eval()
    hidden = torch.randn(2, 5, 32)
    out = attention(hidden, output_attentions=True)
    assert out[1] is not None and out[1].shape == (2, 4, 5, 5)  # HF's eager code returned the maps


@pytest.mark.parametrize("cross", [False, True])
def test_recorded_probabilities_are_hfs_output_attentions_and_the_output_is_unchanged(cross):
    torch.manual_seed(4)
    config = BertConfig(**CONFIG, attention_probs_dropout_prob=0.25, attn_implementation="eager")
    container = torch.nn.ModuleDict({"block": BertAttention(config)})
    assert use_fast_attention(container) > 0
    attention = container["block"].self
    B, S, K = 2, 5, 7 if cross else 5
    hidden = torch.randn(B, S, 32)
    memory = torch.randn(B, K, 32) if cross else None
    keep = torch.ones(B, K)
    keep[1, 3:] = 0
    additive = (1.0 - keep)[:, None, None, :] * torch.finfo(torch.float32).min
    container.eval()
    with torch.no_grad():
        plain = attention(hidden, attention_mask=additive, encoder_hidden_states=memory)[0]
        with record_attention(container) as recorder:
            recorded = attention(hidden, attention_mask=additive, encoder_hidden_states=memory)[0]
            attention(hidden, attention_mask=keep.bool()[:, None, None, :], encoder_hidden_states=memory)
        _, hf_probs = BertSelfAttention.forward(attention, hidden, attention_mask=additive,
                                                encoder_hidden_states=memory, output_attentions=True)
        attention(hidden, attention_mask=additive, encoder_hidden_states=memory)  # outside: not recorded
    assert torch.equal(recorded, plain)
    calls = recorder.records["block.self"]
    assert len(calls) == 2 and all(call.cross == cross and call.name == "block.self" for call in calls)
    assert calls[0].probs.shape == (B, 4, S, K)
    torch.testing.assert_close(calls[0].probs, hf_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(calls[1].probs, hf_probs, atol=1e-6, rtol=0)  # the boolean mask means the same
    assert float(calls[0].probs[1, :, :, 3:].abs().max()) == 0.0  # masked keys get nothing
    # in training: the probabilities before dropout; the recording draws nothing, so the output is the same
    container.train()
    torch.manual_seed(9)
    unrecorded = attention(hidden, attention_mask=additive, encoder_hidden_states=memory)[0]
    torch.manual_seed(9)
    with record_attention(container, names=["block.self"]) as recorder:
        trained = attention(hidden, attention_mask=additive, encoder_hidden_states=memory)[0]
    assert torch.equal(trained, unrecorded)
    torch.testing.assert_close(recorder.last("block.self").probs, hf_probs, atol=1e-6, rtol=0)
    # HF's own path (returned maps asked for) is recorded too
    container.eval()
    with torch.no_grad(), record_attention(container) as recorder:
        attention(hidden, attention_mask=additive, encoder_hidden_states=memory, output_attentions=True)
    torch.testing.assert_close(recorder.last("block.self").probs, hf_probs, atol=1e-6, rtol=0)


def test_recording_names_must_exist_and_a_module_that_did_not_run_is_named():
    container = torch.nn.ModuleDict({"block": BertAttention(BertConfig(**CONFIG, attn_implementation="eager"))})
    use_fast_attention(container)
    with pytest.raises(KeyError, match=r"no FastBertSelfAttention named \['nope'\].*block\.self"):
        with record_attention(container, names=["nope"]):
            pass
    with record_attention(container) as recorder:
        pass
    with pytest.raises(KeyError, match="attention module block.self did not run while recording"):
        recorder.last("block.self")


def _hf(attention, *args, **kwargs):
    with torch.no_grad():
        return BertSelfAttention.forward(attention, *args, **kwargs)[0]


def test_caches_relative_positions_and_head_masks_give_hfs_answer():
    """The cases the fast path does not compute go to HF's code with every argument: a key/value cache (by
    keyword, by position, or under its deprecated name), relative position scores, a head mask."""
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(5)
    config = dict(CONFIG, attn_implementation="eager")
    attention = FastBertSelfAttention(BertConfig(**config), layer_idx=0).eval()
    hidden, earlier = torch.randn(2, 3, 32), torch.randn(2, 4, 32)

    def cache():
        c = DynamicCache()
        with torch.no_grad():
            c.update(attention.key(earlier).view(2, -1, 4, 8).transpose(1, 2),
                     attention.value(earlier).view(2, -1, 4, 8).transpose(1, 2), 0)
        return c

    expected = _hf(attention, hidden, past_key_values=cache())
    assert not torch.allclose(expected, _hf(attention, hidden))  # the cache matters
    with torch.no_grad():
        torch.testing.assert_close(attention(hidden, past_key_values=cache())[0], expected, atol=0, rtol=0)
        torch.testing.assert_close(attention(hidden, None, None, None, cache())[0], expected, atol=0, rtol=0)
        with pytest.warns(FutureWarning, match="past_key_value"):
            torch.testing.assert_close(attention(hidden, past_key_value=cache())[0], expected, atol=0, rtol=0)
    relative = FastBertSelfAttention(BertConfig(**config, position_embedding_type="relative_key")).eval()
    with torch.no_grad():
        torch.testing.assert_close(relative(hidden)[0], _hf(relative, hidden), atol=0, rtol=0)
    head_mask = torch.tensor([1.0, 0.0, 1.0, 1.0])[None, :, None, None]
    with torch.no_grad():
        masked = attention(hidden, head_mask=head_mask)[0]
    torch.testing.assert_close(masked, _hf(attention, hidden, head_mask=head_mask), atol=0, rtol=0)
    assert float(masked[..., 8:16].abs().max()) == 0.0  # the second head's slice is off


@pytest.mark.parametrize("cross", [False, True])
def test_hfs_path_records_whether_it_was_cross_attention(cross):
    torch.manual_seed(6)
    container = torch.nn.ModuleDict({"block": BertAttention(BertConfig(**CONFIG, attn_implementation="eager"))})
    use_fast_attention(container)
    container.eval()
    hidden = torch.randn(2, 5, 32)
    memory = torch.randn(2, 7, 32) if cross else None
    with torch.no_grad(), record_attention(container) as recorder:
        container["block"].self(hidden, encoder_hidden_states=memory, head_mask=torch.ones(1, 4, 1, 1))
    assert recorder.last("block.self").cross is cross


def test_the_swap_counts_what_it_changed_and_fast_dropout_drops_in_training():
    config = BertConfig(**CONFIG)
    model = torch.nn.ModuleDict({"bert": BertModel(config, add_pooling_layer=False)})
    attention = sum(isinstance(m, BertSelfAttention) for m in model.modules())
    dropouts = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert attention == 2 and dropouts > 0
    assert use_fast_attention(model) == attention + dropouts
    layer = FastDropout(0.5).train()
    torch.manual_seed(0)
    x = torch.ones(40_000)
    assert_rate((layer(x) == 0).float().mean().item(), 0.5, x.numel(), what="dropped")
    assert layer.eval()(x) is x
