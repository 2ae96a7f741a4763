"""Attention weights and rollout (issue 13): weights recovered from fused scaled_dot_product_attention calls, in
eager modules, transformers models and torch.export programs, against unfused references; rollout against a hand
computation; the skip reason of a model without attention; the model handed back as it came."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analyzers.errors import AnalyzerError
from analyzers.explanations.attention import (NO_ATTENTION, NoAttention, attention_rollout, attention_weights,
                                              image_relevance, sdpa_weights, token_relevance)
from conftest import TinyCNN, export_model

TOKENS, WIDTH, HEADS = 6, 8, 2


class SelfAttention(nn.Module):
    """One fused attention call: q, k, v projections, then F.scaled_dot_product_attention with the chosen mask."""

    def __init__(self, variant: str = "plain", heads: int = HEADS, kv_heads: int | None = None):
        super().__init__()
        self.variant, self.heads, self.kv_heads = variant, heads, kv_heads or heads
        self.head_dim = WIDTH // heads
        self.q = nn.Linear(WIDTH, heads * self.head_dim)
        self.kv = nn.Linear(WIDTH, 2 * self.kv_heads * self.head_dim)
        self.out = nn.Linear(heads * self.head_dim, WIDTH)
        generator = torch.Generator().manual_seed(1)
        keep = torch.rand(TOKENS, TOKENS, generator=generator) > 0.4
        keep[:, 0] = True  # every query keeps a key
        self.register_buffer("keep", keep)
        self.register_buffer("bias", torch.randn(1, heads, TOKENS, TOKENS, generator=generator))

    def qk(self, x):
        n = x.shape[0]
        q = self.q(x).view(n, TOKENS, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(n, TOKENS, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def mask(self, x):
        """(mask, is_causal, scale) of the variant; "padding" masks the keys of each sample where x[..., 0] < -0.5."""
        if self.variant == "bool_mask":
            return self.keep, False, None
        if self.variant == "float_mask":
            return self.bias, False, None
        if self.variant == "padding":
            keys = x[:, :, 0] > -0.5
            keys[:, 0] = True
            return keys[:, None, None, :], False, None
        if self.variant == "causal":
            return None, True, None
        if self.variant == "scale":
            return None, False, 0.9
        return None, False, None

    def forward(self, x):
        q, k, v = self.qk(x)
        mask, causal, scale = self.mask(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(o.transpose(1, 2).reshape(x.shape[0], TOKENS, -1))

    def reference(self, x):
        """The weights computed the unfused way: explicit matmul, mask and softmax, key heads repeated for GQA."""
        q, k, _ = self.qk(x)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        mask, causal, scale = self.mask(x)
        scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(self.head_dim))
        if causal:
            mask = torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        return torch.softmax(scores, dim=-1)


class Classifier(nn.Module):
    """Two attention blocks over (N, TOKENS, WIDTH) inputs, then a linear head on the mean token: 3 classes."""

    def __init__(self, variant: str = "plain", **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([SelfAttention(variant, **kwargs), SelfAttention(variant, **kwargs)])
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.dropout(x).mean(dim=1))

    @torch.no_grad()
    def references(self, x) -> list:
        refs = []
        for block in self.blocks:
            refs.append(block.reference(x).numpy())
            x = x + block(x)
        return refs


def _inputs(n: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, TOKENS, WIDTH)).astype(np.float32)


def _max_diff(got, refs) -> float:
    assert len(got.weights) == len(refs)
    for w, ref in zip(got.weights, refs):
        assert w.dtype == np.float32 and w.shape == ref.shape
    return max(float(np.abs(w - ref).max()) for w, ref in zip(got.weights, refs))


@pytest.mark.parametrize("variant", ["plain", "bool_mask", "float_mask", "padding", "causal", "scale"])
def test_fused_attention_weights_equal_the_unfused_reference(variant):
    model = Classifier(variant).eval()
    x = _inputs()
    with torch.no_grad():
        before = model(torch.as_tensor(x))
    got = attention_weights(model, x, batch_size=3)  # batches of 3, 3 and 1: per-sample masks stay aligned
    assert got.layers == ("blocks.0", "blocks.1") and got.sources == ("sdpa", "sdpa")
    assert _max_diff(got, model.references(torch.as_tensor(x))) < 1e-5
    np.testing.assert_allclose(got.weights[0].sum(-1), 1.0, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(torch.as_tensor(x)), before)


def test_grouped_query_attention_repeats_key_heads_as_torch_does():
    model = Classifier("causal", heads=4, kv_heads=2).eval()
    x = _inputs(4)
    got = attention_weights(model, x)
    assert got.weights[0].shape == (4, 4, TOKENS, TOKENS)
    assert _max_diff(got, model.references(torch.as_tensor(x))) < 1e-5
    with pytest.raises(AnalyzerError, match="multiple of the key heads"):
        sdpa_weights(torch.zeros(1, 3, 4, 2), torch.zeros(1, 2, 4, 2))


def test_a_module_called_twice_is_two_layers_and_nn_multihead_attention_is_read_per_head():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.shared = SelfAttention()
            self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
            self.head = nn.Linear(WIDTH, 3)

        def forward(self, x):
            x = self.shared(self.shared(x))
            x = self.mha(x, x, x, need_weights=False)[0]  # eval: torch's fast path would call SDPA inside
            return self.head(x.mean(1))

    model = Shared().eval()
    x = torch.as_tensor(_inputs(5))
    got = attention_weights(model, x)
    assert got.layers == ("shared@1", "shared@2", "mha")
    assert got.sources == ("sdpa", "sdpa", "multi_head_attention")
    with torch.no_grad():
        middle = model.shared(x)
        refs = [model.shared.reference(x).numpy(), model.shared.reference(middle).numpy(),
                model.mha(*(model.shared(middle),) * 3, average_attn_weights=False)[1].numpy()]
    assert _max_diff(got, refs) < 1e-5


def test_an_explicit_softmax_over_scores_is_attention_and_other_softmaxes_are_not():
    class Explicit(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.dim = dim
            self.softmax = nn.Softmax(dim=dim)

        def forward(self, x):  # x (N, 1, L, D): one head attending over its own tokens
            scores = x @ x.transpose(-1, -2)
            return (self.softmax(scores) @ x).flatten(1)[:, :3] + scores.softmax(dim=self.dim).flatten(1)[:, :3]

    x = torch.as_tensor(_inputs(3))[:, None]
    got = attention_weights(Explicit(-1), x)
    assert got.layers == ("(model)@1", "(model)@2") and got.sources == ("softmax", "softmax")  # nn.Softmax: its caller
    assert _max_diff(got, [torch.softmax(x @ x.transpose(-1, -2), -1).numpy()] * 2) == 0
    with pytest.raises(NoAttention):  # a softmax over another axis is not attention over keys
        attention_weights(Explicit(1), x)
    with pytest.raises(NoAttention):
        attention_weights(Explicit(-1), x, explicit_softmax=False)


# --- transformers: sdpa against eager with output_attentions --------------------------------------------------------

LENGTH = 10


class PackedBert(nn.Module):
    """BERT on the tool's packed float rows (N, 2 * LENGTH): token ids, then their attention mask."""

    def __init__(self, bert):
        super().__init__()
        self.model = bert

    def forward(self, rows):
        ids, mask = rows[:, :LENGTH].long(), rows[:, LENGTH:].long()
        return self.model(input_ids=ids, attention_mask=mask, return_dict=False)[0]


def _bert(implementation: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=LENGTH + 4, num_labels=3,
                                     attn_implementation=implementation)
    return transformers.BertForSequenceClassification(config).eval()


def _token_batch(n: int = 6):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, LENGTH + 1, n)
    lengths[0] = LENGTH
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 40, (n, LENGTH)) * mask
    return ids, mask


def _eager_attentions(ids, mask) -> list:
    eager = _bert("eager")
    with torch.no_grad():
        out = eager(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_attentions=True)
    return [a.numpy() for a in out.attentions]


def test_a_transformers_bert_with_sdpa_gives_the_eager_models_attentions():
    sdpa = _bert("sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    ids, mask = _token_batch()
    rows = np.concatenate([ids, mask], axis=1).astype(np.float32)
    got = attention_weights(PackedBert(sdpa), rows, batch_size=4)
    assert got.layers == ("model.bert.encoder.layer.0.attention.self", "model.bert.encoder.layer.1.attention.self")
    assert got.sources == ("sdpa", "sdpa")
    refs = _eager_attentions(ids, mask)
    for w, ref in zip(got.weights, refs):  # every layer and head
        assert np.abs(w - ref).max(axis=(0, 2, 3)).max() < 1e-5
    assert np.abs(got.weights[1][1][:, :, mask[1] == 0]).max() == 0  # padded keys take no attention
    # the eager model itself is read through its explicit softmax, to the same weights
    eager = attention_weights(PackedBert(_bert("eager")), rows)
    assert eager.layers == got.layers and eager.sources == ("softmax", "softmax")
    assert _max_diff(eager, refs) < 1e-6


def test_an_exported_bert_is_read_through_its_aten_sdpa_nodes(tmp_path):
    pytest.importorskip("transformers")
    from analyzers.loading.models import load_model
    from hf_architectures import TextLogits

    model = TextLogits(_bert("sdpa")).eval()
    batch = torch.export.Dim("batch")
    example = (torch.ones(2, LENGTH, dtype=torch.long), torch.ones(2, LENGTH, dtype=torch.long))
    program = torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch}))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("aten.scaled_dot_product_attention.default") == 2
    torch.export.save(program, str(tmp_path / "bert.pt2"))
    loaded = load_model(str(tmp_path / "bert.pt2"), isolation="process")
    ids, mask = _token_batch()
    rows = loaded.input_layout.pack({"input_ids": ids, "attention_mask": mask}, "test")
    got = attention_weights(loaded, rows)
    assert got.layers == ("model.bert.encoder.layer.0.attention.self", "model.bert.encoder.layer.1.attention.self")
    assert _max_diff(got, _eager_attentions(ids, mask)) < 1e-5


# --- torch.export programs of the small module ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["padding", "causal"])
def test_an_exported_program_gives_the_eager_modules_weights(variant, tmp_path):
    from analyzers.loading.models import load_model

    model = Classifier(variant).eval()
    path = export_model(model, torch.zeros(2, TOKENS, WIDTH), tmp_path / "attention.pt2")
    program = torch.export.load(str(path))
    assert [str(n.target) for n in program.graph.nodes if "attention" in str(n.target)] == [
        "aten.scaled_dot_product_attention.default"] * 2
    loaded = load_model(str(path), isolation="process")
    x = _inputs()
    got = attention_weights(loaded, x, batch_size=4)
    assert got.layers == ("blocks.0", "blocks.1") and got.sources == ("sdpa", "sdpa")
    assert _max_diff(got, model.references(torch.as_tensor(x))) < 1e-5


def test_an_exported_multihead_attention_is_read_through_its_explicit_softmax(tmp_path):
    from analyzers.loading.models import load_model

    class Mha(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
            self.head = nn.Linear(WIDTH, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x)[0].mean(1))  # need_weights: the export holds a 3-D aten.softmax

    model = Mha().eval()
    loaded = load_model(str(export_model(model, torch.zeros(2, TOKENS, WIDTH), tmp_path / "mha.pt2")),
                        isolation="process")
    x = torch.as_tensor(_inputs(5))
    got = attention_weights(loaded, x)
    assert got.layers == ("mha",) and got.sources == ("softmax",)
    with torch.no_grad():
        assert _max_diff(got, [model.mha(x, x, x, average_attn_weights=False)[1].numpy()]) < 1e-5


def test_a_sandboxed_export_is_read_in_its_worker(tmp_path):
    from analyzers.loading.models import load_model

    model = Classifier("padding").eval()
    x = _inputs(3)
    remote = load_model(str(export_model(model, torch.zeros(2, TOKENS, WIDTH), tmp_path / "attention.pt2")),
                        isolation="sandbox")
    try:
        got = attention_weights(remote, x)
    finally:
        remote.close()
    assert got.layers == ("blocks.0", "blocks.1")
    assert _max_diff(got, model.references(torch.as_tensor(x))) < 1e-5


def test_the_skip_reason_from_a_worker_is_typed_again(monkeypatch):
    import analyzers.explanations.attention as attention

    def worker_line(*_args, **_kwargs):  # a worker's error comes back as a plain AnalyzerError with its one line
        raise AnalyzerError(f"{NO_ATTENTION}: none of its layers calls scaled_dot_product_attention")

    monkeypatch.setattr(attention, "attention_arrays", worker_line)
    with pytest.raises(NoAttention, match=f"^{NO_ATTENTION}"):
        attention_weights(TinyCNN(), np.zeros((2, 1, 8, 8), dtype=np.float32))


# --- rollout -----------------------------------------------------------------------------------------------------------

def test_rollout_equals_the_hand_computation_on_two_layers():
    # sample 0: layer 1's heads average to [[.5, .5], [.5, .5]], so Â1 = .5·W + .5·I = [[.75, .25], [.25, .75]];
    # layer 2's heads average to [[.4, .6], [.4, .6]], so Â2 = [[.7, .3], [.2, .8]].
    # R = Â2 · Â1 = [[.7·.75 + .3·.25, .7·.25 + .3·.75], [.2·.75 + .8·.25, .2·.25 + .8·.75]] = [[.6, .4], [.35, .65]]
    # sample 1: both layers attend each token to itself (identity): R = I
    layer1 = np.array([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]],
                       [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    layer2 = np.array([[[[0.2, 0.8], [0.6, 0.4]], [[0.6, 0.4], [0.2, 0.8]]],
                       [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    rollout = attention_rollout([layer1, layer2])
    assert rollout.shape == (2, 2, 2) and rollout.dtype == np.float32
    np.testing.assert_allclose(rollout[0], [[0.6, 0.4], [0.35, 0.65]], atol=1e-6)
    np.testing.assert_allclose(rollout[1], np.eye(2), atol=1e-6)
    # the order matters: Â1 · Â2 would give [[.575, .425], [.325, .675]]
    assert not np.allclose(rollout[0], [[0.575, 0.425], [0.325, 0.675]])
    # without the residual: W2 · W1 = [[.4, .6], [.4, .6]] · [[.5, .5], [.5, .5]] = [[.5, .5], [.5, .5]]
    np.testing.assert_allclose(attention_rollout([layer1, layer2], residual=False)[0], 0.5, atol=1e-6)
    # the classification token's row, and the mean over queries for a model without one
    np.testing.assert_allclose(token_relevance(rollout)[0], [0.6, 0.4], atol=1e-6)
    np.testing.assert_allclose(token_relevance(rollout, query="mean")[0], [0.475, 0.525], atol=1e-6)
    np.testing.assert_allclose(token_relevance(rollout, query="mean", mask=[[1, 0], [1, 1]])[0], [0.6, 0.0],
                               atol=1e-6)


def test_rollout_of_a_real_model_and_its_image_map():
    model = Classifier("padding").eval()
    got = attention_weights(model, _inputs(3))
    rollout = attention_rollout(got)
    assert rollout.shape == (3, TOKENS, TOKENS)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(attention_rollout(got, layers=["blocks.1"]),
                               attention_rollout([got.weights[1]]), atol=1e-7)
    # a ViT's 1 + 4 tokens: the class token's row puts its weight on patch 2, the grid's bottom-left corner
    vit = np.full((1, 5, 5), 0.05)
    vit[0, 0] = [0.1, 0.1, 0.1, 0.6, 0.1]
    maps, grid = image_relevance(vit, (8, 8))
    assert grid.shape == (1, 2, 2) and maps.shape == (1, 8, 8)
    np.testing.assert_allclose(grid[0], [[0.1, 0.1], [0.6, 0.1]], atol=1e-6)
    assert np.unravel_index(maps[0].argmax(), (8, 8))[0] >= 4 and np.unravel_index(maps[0].argmax(), (8, 8))[1] < 4
    with pytest.raises(AnalyzerError, match="square grid"):
        image_relevance(np.zeros((1, 7, 7)), (8, 8))
    with pytest.raises(AnalyzerError, match="same samples and tokens"):
        attention_rollout([np.ones((1, 1, 2, 2)) / 2, np.ones((1, 1, 3, 3)) / 3])


# --- skips, refusals, and the model handed back -------------------------------------------------------------------------

def test_a_model_without_attention_is_skipped_with_the_reason_and_handed_back():
    model = TinyCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NoAttention, match=f"^{NO_ATTENTION}"):
        attention_weights(model, np.zeros((2, 1, 8, 8), dtype=np.float32))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_an_attention_model_is_read_in_eval_mode_and_handed_back_as_it_came():
    model = Classifier("padding").train()  # its dropout would change the output in train mode
    model.head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _inputs()
    got = attention_weights(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert not model.head.weight.requires_grad and model.blocks[0].q.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert _max_diff(got, model.eval().references(torch.as_tensor(x))) < 1e-5
    assert not torch.overrides._is_torch_function_mode_enabled()  # the capture's mode is popped


def test_refusals_name_the_problem(monkeypatch):
    import analyzers.explanations.attention as attention

    model = Classifier().eval()
    with pytest.raises(AnalyzerError, match="batch_size"):
        attention_weights(model, _inputs(), batch_size=0)
    with pytest.raises(AnalyzerError, match="NaN"):
        attention_weights(model, np.full((2, TOKENS, WIDTH), np.nan, dtype=np.float32))
    monkeypatch.setattr(attention, "MAX_WEIGHT_BYTES", 1000)
    with pytest.raises(AnalyzerError, match="pass at most 1 samples"):
        attention_weights(model, _inputs(4))

    class Windowed(nn.Module):  # attention over windows folded into the batch, as in Swin
        def forward(self, x):
            w = x.reshape(x.shape[0] * 2, 1, TOKENS // 2, WIDTH)
            return F.scaled_dot_product_attention(w, w, w).reshape(x.shape[0], -1)[:, :3]

    with pytest.raises(AnalyzerError, match="windowed"):
        attention_weights(Windowed(), _inputs(2))
