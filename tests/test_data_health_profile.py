"""The inference profile (issue 14): its median latency per batch agrees with a plain perf_counter timing of the same
forward; each layer's parameters are its own (`parameters(recurse=False)`), the model's size is its parameters' and
buffers' bytes (a shared weight once); a layer's activation memory is the bytes of its output; the hooks are removed
and every range closed even when the forward fails; the model is handed back as it came."""
from __future__ import annotations

import statistics
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import sample_models
from analyzers.data_health.profile import InferenceProfile, inference_profile, layer_ranges
from analyzers.errors import AnalyzerError, InvalidOption
from analyzers.guard import _hook_count
from analyzers.loading import wire
from analyzers.loading.models import load_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    return load_model("sample:digits"), sample_models.get_sample("digits").load_data("test")


class WithBuffers(nn.Module):
    """A container with a parameter of its own, a batch norm (buffers), and one weight shared by two layers."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.body = nn.Sequential(OrderedDict(fc=nn.Linear(6, 6), norm=nn.BatchNorm1d(6)))
        self.head = nn.Linear(6, 6)
        self.tied = nn.Linear(6, 6)
        self.tied.weight = self.head.weight  # shared: counted once in the model's size
        self.register_buffer("offset", torch.zeros(6, dtype=torch.float64))
        self.calls = 0
        self.fail_after = None

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("planted failure")
        return self.tied(self.head(self.body(x * self.scale) + self.offset.float()))


def test_the_median_latency_agrees_with_a_plain_timing_of_the_same_forward(digits):
    model, data = digits
    repeats, size = 60, 32
    batch = torch.from_numpy(np.array(data.x[:size], dtype=np.float32))

    def plain() -> list:
        spans = []
        with torch.inference_mode():
            for _ in range(3):
                model.module(batch)
            for _ in range(repeats):
                start = time.perf_counter()
                model.module(batch)
                spans.append(time.perf_counter() - start)
        return spans

    # timed before and after, so that the load of the shared cores drifting meanwhile falls on both sides
    before = plain()
    profile = inference_profile(model, data.x, batch_sizes=(1, size), repeats=repeats, warmup=3)
    reference = np.array(before + plain())
    measured = profile.latency_p50[list(profile.batch_sizes).index(size)]
    # within the spread of the plain spans, not a fixed tolerance around their median: under load on the
    # two shared cores the median itself wanders by 20%, while a profile that timed the wrong thing (the
    # warm-up, the whole sweep, one row) falls outside the 5th to 95th percentile by a large factor; a margin of a
    # fifth either way keeps a profile 0.2% below the 5th percentile (the fresh-clone suite of 1fcba1d) passing
    low, high = np.percentile(reference, [5, 95])
    assert 0.8 * low <= measured <= 1.25 * high, (measured, low, statistics.median(reference), high)
    assert np.all(profile.latency_p95 >= profile.latency_p50)
    np.testing.assert_allclose(profile.throughput, profile.batch_sizes / profile.latency_p50)
    assert profile.profile_batch_size == size and profile.profiled_time > 0


def test_layer_parameters_and_the_model_size_are_counted_from_the_modules(digits):
    for module, x in ((digits[0].module, digits[1].x[:4]), (WithBuffers(), np.random.default_rng(0).normal(
            size=(4, 6)).astype(np.float32))):
        profile = inference_profile(module, x, batch_sizes=(2,), repeats=2, warmup=1, profile_repeats=1)
        modules = dict(module.named_modules())
        assert profile.layers == tuple(name for name in modules if name)
        for name, params in zip(profile.layers, profile.params):
            assert params == sum(p.numel() for p in modules[name].parameters(recurse=False))
        unique = {id(p): p for p in module.parameters()}.values()
        param_bytes = sum(p.numel() * p.element_size() for p in unique)
        buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
        assert (profile.param_bytes, profile.buffer_bytes) == (param_bytes, buffer_bytes)
        assert profile.model_bytes == param_bytes + buffer_bytes
        assert profile.num_params == sum(p.numel() for p in unique)
    shared = dict(zip(profile.layers, profile.params))
    # each layer's own, the shared weight in both; the container's own none
    assert shared["tied"] == shared["head"] == 42 and shared["body"] == 0
    assert profile.buffer_bytes == 6 * 8 + 2 * 6 * 4 + 8  # offset (float64), running mean and var, the count
    assert profile.num_params == 6 + 42 + 12 + 42 + 6  # the shared weight once


def test_each_layer_s_time_share_and_activation_memory(digits):
    model, data = digits
    size = 16
    profile = inference_profile(model, data.x, batch_sizes=(size,), repeats=3, warmup=1, profile_repeats=3)
    table = profile.layer_table().set_index("layer")
    assert (table["calls"] == 1).all() and (table["time_ms"] > 0).all()
    assert 0 < table.loc[table["leaf"], "share"].sum() <= 1.05  # the leaves' ranges lie inside the forward's
    # the memory a layer leaves is its output: conv1's (16, 16, 8, 8) and fc1's (16, 64) float32
    assert table.loc["conv1", "output_bytes"] == size * 16 * 8 * 8 * 4
    assert table.loc["fc1", "output_bytes"] == size * 64 * 4
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert table.loc[name, "memory_bytes"] == table.loc[name, "output_bytes"]
    assert table.loc["flatten", "memory_bytes"] == 0  # a view allocates nothing


def test_hooks_are_removed_and_ranges_closed_even_when_the_forward_fails():
    module = WithBuffers().train()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = np.ones((4, 6), dtype=np.float32)
    with pytest.raises(AnalyzerError, match="planted failure"):
        # the timing runs 1 + 2 forwards and one more before the profiler starts: the profiler's first fails
        module.fail_after = 4
        inference_profile(module, x, batch_sizes=(4,), repeats=2, warmup=1)
    assert _hook_count(module) == 0 and module.training and all(m.training for m in module.modules())
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    module.fail_after, module.calls = None, 0
    with pytest.raises(RuntimeError, match="shapes"):
        with layer_ranges(module, ["body", "body.fc", "head"]) as counts:
            module.body.fc(torch.ones(2, 5))  # fails inside its range
    assert _hook_count(module) == 0 and counts["body.fc"] == [0, 0]
    profile = inference_profile(module.eval(), x, batch_sizes=(4,), repeats=2, warmup=1)  # a fresh start works
    assert isinstance(profile, InferenceProfile)


def test_bad_options_are_refused_and_a_profile_crosses_the_worker_boundary(digits):
    model, data = digits
    with pytest.raises(InvalidOption, match="batch_sizes must be a whole number of at least 1"):
        inference_profile(model, data.x, batch_sizes=(0, 8))
    with pytest.raises(InvalidOption, match="repeats"):
        inference_profile(model, data.x, repeats=0)
    with pytest.raises(InvalidOption, match="device must be 'cpu' or 'cuda'"):
        inference_profile(model, data.x, device="tpu")
    profile = inference_profile(model, data.x[:3], batch_sizes=(1, 5), repeats=2, warmup=0, profile_repeats=1)
    assert profile.batch_sizes.tolist() == [1, 5]  # 5 from 3 rows: rows repeated in order
    back = wire.decode(*wire.encode(profile))
    assert isinstance(back, InferenceProfile) and back.layers == profile.layers
    np.testing.assert_array_equal(back.params, profile.params)
    with pytest.raises(ValueError, match="malformed"):
        InferenceProfile(**{**profile.__dict__, "model_bytes": profile.model_bytes + 1})
