"""Attributions: which parts of an input a model's class score depends on, through Captum, and SHAP's expected
gradients computed here with shap's GradientExplainer's draws (the same values, without its loop per draw). LIME is
Captum's Lime on a documented interpretable representation (`_lime_mask`: superpixels, windows, features, tokens).

`explain(model, inputs, target, method, **options)` returns an array with the shape of `inputs` (a batch in, a batch
out). The model is analysed in eval mode inside `analysis_mode` (locked, handed back exactly as it came) and only
`torch.autograd.grad`-based code touches it, so parameter `.grad` is never written and two threads sharing one model
get the same maps. `METHODS` describes every method and its options for the dashboard.

The additive methods (`COMPLETE_METHODS`: Integrated Gradients and SHAP) are checked by default: their maps must sum
to a difference of class scores, and `explain` raises n_steps / nsamples until they do (`completeness`).
`details=True` returns an `ExplainResult`: the maps with the completeness gap and the settings that made them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..arrays import all_finite, empty_array
from ..errors import AnalyzerError, InvalidOption, first_line, whole_number
from ..guard import analysis_mode, unwrap
from ..engines.inference import ClassLogits, module_device, resolve_layer
from ..loading.inputs import PAD_ID, layout_of
from ..loading.models import layer_kinds, state_dict_sha256
from ..loading.sandbox import runs_in_worker

BASELINES = ("zeros", "blur", "mean")
MODALITIES = {2: "tabular", 3: "sequence", 4: "image"}  # by the batch's number of dimensions
ALL_MODALITIES = ("image", "sequence", "tabular", "tokens")


@dataclass(frozen=True)
class MethodInfo:
    """What the dashboard needs to offer a method: a label, what it needs, and its options with defaults."""

    name: str
    label: str
    description: str
    options: dict
    modalities: tuple = ALL_MODALITIES  # "tokens": through the embedding layer, one score per token
    needs_background: bool = False
    needs_conv_layer: bool = False
    signed: bool = True  # attributions can be negative (evidence against the class)
    # per unit of each input feature (a gradient): on tables, a feature measured in small numbers gets large values
    # whatever its importance, so they are compared per standard deviation (`per_standard_deviation`)
    per_input_unit: bool = False


# The completeness check of the additive methods (`completeness`): a map is complete when its sum misses the score
# difference by at most the tolerance. SHAP is a Monte Carlo estimate whose error falls as 1/sqrt(nsamples): 1%
# would take four times the draws of 2%, so its tolerance is 2%; its cap, 32 times the default draws, bounds what a
# sample that never converges (an untrained model on noise) costs.
IG_TOLERANCE, IG_MAX_STEPS = 0.01, 1600
SHAP_TOLERANCE, SHAP_MAX_NSAMPLES = 0.02, 6400
# LIME (`_lime_attribute`): perturbed copies per sample, and the kernel width as a fraction of sqrt(d), d the number
# of interpretable features (lime's tabular default, 0.75 * sqrt(d)); an image is cut into about LIME_GRID x LIME_GRID
# square superpixels and a sequence into about LIME_WINDOWS windows, so d stays well below n_samples
LIME_SAMPLES, LIME_KERNEL_WIDTH, LIME_GRID, LIME_WINDOWS = 200, 0.75, 8, 32

METHODS = {
    "saliency": MethodInfo("saliency", "Saliency", "absolute gradient of the class score with respect to the input",
                           {}, signed=False, per_input_unit=True),
    "input_x_gradient": MethodInfo("input_x_gradient", "Input × gradient", "input times the gradient of the score",
                                   {}),
    "integrated_gradients": MethodInfo(
        "integrated_gradients", "Integrated Gradients",
        "gradients averaged along a path from a baseline to the input; they sum to f(input) - f(baseline), and "
        f"n_steps (from 50) doubles until they do within {IG_TOLERANCE:.0%} (at most {IG_MAX_STEPS})",
        {"baseline": "zeros", "n_steps": 50, "internal_batch_size": None}),
    # Smilkov et al. (2017): the signed gradient averaged over noisy copies, its magnitude shown. Captum's NoiseTunnel
    # (nt_type="smoothgrad") over Saliency(abs=False) returns that mean of the raw gradients; the |.| is taken after.
    "smoothgrad": MethodInfo(
        "smoothgrad", "SmoothGrad",
        "Smilkov et al. (2017): the gradient averaged over 16 noisy copies of the input (noise std 15% of the "
        "value range), then its magnitude |mean ∇|; gradients whose sign flips under the noise cancel",
        {"nt_samples": 16, "stdevs": 0.15}, modalities=("image", "sequence", "tabular"), signed=False,
        per_input_unit=True),
    # NoiseTunnel over Saliency(abs=True): the absolute gradient averaged, which never cancels (mean |∇| >= |mean ∇|)
    "smoothgrad_abs": MethodInfo(
        "smoothgrad_abs", "SmoothGrad, mean |∇|",
        "the absolute gradient averaged over 16 noisy copies of the input (noise std 15% of the value range), "
        "mean |∇|: never smaller than SmoothGrad's |mean ∇|, since signs cannot cancel",
        {"nt_samples": 16, "stdevs": 0.15}, modalities=("image", "sequence", "tabular"), signed=False,
        per_input_unit=True),
    "occlusion": MethodInfo("occlusion", "Occlusion",
                            "drop in the class score when a window of the input is replaced by the baseline",
                            {"window": None, "stride": None, "baseline": "zeros"}),
    "gradcam": MethodInfo("gradcam", "Grad-CAM", "class-weighted activations of a convolutional layer, upsampled",
                          {"layer": None}, modalities=("image", "sequence", "tokens"), needs_conv_layer=True,
                          signed=False),
    # the method known to fail the randomisation check (Adebayo et al., 2018), offered so a person can see what
    # failing looks like; Captum's GuidedBackprop overrides the backward pass of nn.ReLU modules only
    "guided_backprop": MethodInfo(
        "guided_backprop", "Guided backprop",
        "the gradient with every ReLU letting only positive gradients back (Springenberg et al., 2015): sharp, "
        "but it barely depends on the later layers' weights, so it is known to fail the sanity check (Adebayo et "
        "al., 2018); shown so you can see what failing looks like. Needs the model's ReLUs to be nn.ReLU modules",
        {}, modalities=("image", "sequence", "tabular")),
    "shap": MethodInfo("shap", "SHAP (expected gradients)",
                       "shap's GradientExplainer (its estimator and draws): gradients between the input and samples "
                       "of the dataset; they sum to f(input) - E[f(dataset)], and nsamples (from 200) doubles until "
                       f"they do within {SHAP_TOLERANCE:.0%} (at most {SHAP_MAX_NSAMPLES})",
                       {"nsamples": 200}, modalities=("image", "sequence", "tabular"), needs_background=True),
    # Ribeiro et al. (2016) through Captum's Lime: a weighted linear model of the class score on which interpretable
    # features are kept (the rest set to the baseline); the representation is `_lime_mask`'s
    "lime": MethodInfo(
        "lime", "LIME",
        "Ribeiro et al. (2016): the class score of n_samples (200) copies with random interpretable features "
        "switched to the baseline (superpixels of an image, windows of a sequence, features of a table, tokens of "
        "a text), fitted by a linear model weighted by closeness to the input; each feature's weight is spread "
        "over its positions",
        {"n_samples": LIME_SAMPLES, "kernel_width": LIME_KERNEL_WIDTH, "window": None, "baseline": "zeros"}),
    # Abnar & Zuidema (2020) through analyzers.explanations.attention: the fused attention's weights recovered and
    # multiplied through the layers; the same map for every class, so it says where the model looks, not why
    "attention_rollout": MethodInfo(
        "attention_rollout", "Attention rollout",
        "Abnar and Zuidema (2020): each layer's attention averaged over heads, half kept for the residual, "
        "multiplied from the first layer to the last; a token's share is the mean over the tokens' rows (an "
        "image's patches upsampled onto it). The same map for every class: attention is where the model looks, "
        "not an explanation on its own, so read its faithfulness score",
        {}, modalities=("tokens", "image"), signed=False),
}
COMPLETE_METHODS = ("integrated_gradients", "shap")  # additive: a map sums to a difference of class scores
BACKGROUND_SIZE = 64  # rows of a SHAP background (and of the 'mean' baseline) drawn from a dataset or the inputs


@dataclass(frozen=True)
class ExplainResult:
    """What `explain(..., details=True)` returns: the maps and what made them.

    `settings` holds the options that made every map of the call, as resolved (the Grad-CAM layer chosen, the
    SmoothGrad noise std in input units, the baseline's name, ...); `n_steps` and `nsamples` the Integrated
    Gradients steps and SHAP draws each sample ended with (-1 for the other methods); `completeness_gap` the
    relative gap |sum(map) - difference| / |difference| (NaN where not checked, not additive, or skipped because
    the difference is below `min_difference`). `notes` says, in words, what the call chose that the caller did
    not ask for (SHAP's background drawn from the inputs)."""

    attributions: np.ndarray
    settings: dict
    completeness_gap: np.ndarray  # (N,)
    n_steps: np.ndarray  # (N,) int64
    nsamples: np.ndarray  # (N,) int64
    difference: np.ndarray  # (N,) what the map should sum to (f(x) - f(baseline) or - E[f(background)]), or NaN
    notes: tuple = ()

    def __post_init__(self):
        # text only, as a tuple: a worker's result arrives with its notes as a list (`wire`)
        object.__setattr__(self, "notes", tuple(str(note) for note in self.notes))

    def row_settings(self, i: int) -> dict:
        """Sample `i`'s settings: the call's, with the steps (or draws) this sample ended with."""
        out = dict(self.settings)
        if int(self.n_steps[i]) >= 0:
            out["n_steps"] = int(self.n_steps[i])
        if int(self.nsamples[i]) >= 0:
            out["nsamples"] = int(self.nsamples[i])
        return out


def per_standard_deviation(attributions, x_all) -> np.ndarray:
    """Feature attributions of tabular rows (N, F) per standard deviation of each feature over `x_all`: a gradient
    times the feature's spread, the change in score for a typical change of that feature. For methods in the score's
    own units (Integrated Gradients, input x gradient, occlusion, SHAP) the scale is already comparable."""
    spread = np.asarray(x_all, dtype=np.float64).std(axis=0)
    return (np.asarray(attributions, dtype=np.float64) * spread).astype(np.float32)


# A random method's draws for a sample come from `seed` and the sample's own bytes, never from its batch or its place
# in one: a sample's map is the same alone (a dashboard click), among others (the explain command), at any batch size
# and in any block of a Ray actor pool. Two identical samples get the same draws, and so the same map.

def _sample_entropy(x, seed: int) -> list:
    return [[int(seed), zlib.crc32(np.ascontiguousarray(row).tobytes())] for row in np.asarray(x)]


def sample_rngs(x, seed: int) -> list:
    """One numpy Generator per sample (row of `x`), seeded by `seed` and the sample's bytes."""
    return [np.random.default_rng(entropy) for entropy in _sample_entropy(x, seed)]


def sample_seeds(x, seed: int) -> np.ndarray:
    """One integer seed per sample (uint32, what `np.random.seed`, `RandomState` and `torch.manual_seed` take), from
    `seed` and the sample's bytes: for the libraries that draw from a seeded legacy or torch generator (shap's
    `rseed`, Captum's noise and perturbations)."""
    return np.asarray([np.random.SeedSequence(entropy).generate_state(1)[0]
                       for entropy in _sample_entropy(x, seed)], dtype=np.uint32)


def seeded_sample(x, seed: int, size: int = BACKGROUND_SIZE) -> np.ndarray:
    """Up to `size` rows of `x`, drawn without replacement by numpy's `default_rng(seed)`, in their order in `x`:
    a fixed sample of a dataset or of a batch (a SHAP background, the 'mean' baseline)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(x), size=min(size, len(x)), replace=False))
    return x[rows]


def list_methods(modality: str | None = None) -> list[MethodInfo]:
    """The methods that apply to `modality` ("image", "sequence", "tabular", "tokens"; None for all)."""
    return [m for m in METHODS.values() if modality is None or modality in m.modalities]


def modality_of(array) -> str:
    """"image" (N,C,H,W), "sequence" (N,C,L) or "tabular" (N,F) from a batch's number of dimensions."""
    kind = MODALITIES.get(np.ndim(array))
    if kind is None:
        raise AnalyzerError(f"inputs of shape {tuple(np.shape(array))} are not a batch of images (N,C,H,W), sequences "
                            f"(N,C,L) or tabular rows (N,F)")
    return kind


def model_modality(model, x) -> str:
    """The modality of `x` for `model`: "tokens" for a model of token ids (its inputs say so), else by shape."""
    return layout_of(model).modality or modality_of(x)


def reduce_for_display(attr, modality: str | None = None) -> np.ndarray:
    """What a person looks at: images (N,H,W) channel-summed heat maps, sequences (N,L) per-position scores,
    tabular (N,F) per-feature bars, tokens (N,L) per-token scores."""
    attr = np.asarray(attr, dtype=np.float32)
    if modality == "tokens":
        if attr.ndim != 2:
            raise AnalyzerError(f"attributions of shape {attr.shape} are not per-token scores (N, L)")
        return attr
    modality = modality or modality_of(attr)
    if modality != modality_of(attr):
        raise AnalyzerError(f"attributions of shape {attr.shape} are not {modality} attributions")
    return attr if modality == "tabular" else attr.sum(axis=1)


# --- the model as a function of its input ------------------------------------------------------------------------------

def _scores_module(model) -> nn.Module:
    """Class scores whose softmax is the class probabilities (logits as they are; probabilities made log-probs); a
    regression's predicted value as it is (one output: target 0 explains the prediction); a multi-label model's
    logits as they are (target k explains label k's logit, whose sigmoid is its probability)."""
    module = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    return module if output_kind in ("logits", "value", "multilabel_logits") else ClassLogits(module, output_kind)


def _callable_scores(scores: nn.Module):
    # A model whose first operation is in place (x.relu_()) would fail on an input leaf that requires grad; a clone
    # keeps the gradient with respect to the input itself.
    return lambda x: scores(x.clone())


class _ClonedInput(nn.Module):
    """`scores` on a clone of its input (as `_callable_scores`), as a module: Captum's GuidedBackprop finds the
    ReLUs to override among its model's submodules."""

    def __init__(self, scores: nn.Module):
        super().__init__()
        self.scores = scores

    def forward(self, x):
        return self.scores(x.clone())


def guided_backprop_skip_reason(model) -> str | None:
    """Why guided backprop does not apply to `model`, or None: it overrides nn.ReLU modules' backward pass, and a
    ReLU written as a function (torch.relu, F.relu, an exported graph's aten.relu) is left as a plain gradient."""
    if any(isinstance(m, nn.ReLU) for m in unwrap(model).modules()):
        return None
    return ("guided backprop overrides the backward pass of nn.ReLU modules, and this model has none (its ReLUs, if "
            "any, are functions or graph operations): choose another method")


class _TargetScore(nn.Module):
    """One class's score as an (N, 1) output: shap's GradientExplainer then explains just that class."""

    def __init__(self, scores: nn.Module, target: int):
        super().__init__()
        self.scores = scores
        self.target = target

    def forward(self, x):
        return self.scores(x.clone())[:, self.target:self.target + 1]


def _as_batch(model, inputs) -> tuple[np.ndarray, bool]:
    """Inputs as a float32 batch, and whether a single unbatched sample was given (known from the model's shape)."""
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.detach().cpu().numpy()
    x = np.asarray(inputs, dtype=np.float32)
    sample_shape = getattr(model, "input_shape", None)
    single = sample_shape is not None and tuple(x.shape) == tuple(sample_shape)
    if single:
        x = x[None]
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise AnalyzerError(f"inputs of shape {x.shape} do not fit the model's sample shape {tuple(sample_shape)}: "
                            f"pass a batch (N, {', '.join(map(str, sample_shape))})")
    modality_of(x)
    if len(x) == 0:
        raise AnalyzerError("no inputs to explain: pass at least one sample")
    if not all_finite(x):
        raise AnalyzerError("the inputs hold NaN or inf: clean them before explaining")
    return x, single


def _targets(scores: nn.Module, x: np.ndarray, target, batch_size: int, device) -> np.ndarray:
    """One class index per sample: given, broadcast, or the predicted class."""
    with torch.no_grad():
        first = scores(torch.as_tensor(x[:1], device=device))
    num_classes = first.shape[1]
    if target is None:
        preds = []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                preds.append(scores(torch.as_tensor(x[start:start + batch_size], device=device)).argmax(1).cpu())
        return torch.cat(preds).numpy().astype(np.int64)
    t = np.asarray(target.detach().cpu() if isinstance(target, torch.Tensor) else target)
    if t.ndim == 0:
        t = np.full(len(x), int(t))
    if t.shape != (len(x),) or not np.issubdtype(t.dtype, np.integer):
        raise AnalyzerError(f"target must be a class index or one integer per sample ({len(x)}), got shape {t.shape}")
    if t.min() < 0 or t.max() >= num_classes:
        raise AnalyzerError(f"target class {int(t.max() if t.max() >= num_classes else t.min())} is out of range: "
                            f"the model has {num_classes} classes (0..{num_classes - 1})")
    return t.astype(np.int64)


# --- baselines ---------------------------------------------------------------------------------------------------------

def baseline_for(x: np.ndarray, baseline="zeros", background=None, *, layout=None) -> np.ndarray:
    """The reference input per sample: zeros, a blurred copy, the dataset mean (from `background`), or an array.
    For a token model (`layout` packed), "zeros" replaces every token with the pad id and keeps the mask."""
    if layout is not None and layout.packed and not isinstance(baseline, (np.ndarray, torch.Tensor)):
        if baseline != "zeros":
            raise AnalyzerError(f"a token model's baseline is its pad token (id {PAD_ID}), chosen as 'zeros'; "
                                f"{baseline!r} applies to images, sequences and tables")
        return layout.token_baseline(x)
    if isinstance(baseline, (np.ndarray, torch.Tensor)):
        b = np.asarray(baseline.detach().cpu() if isinstance(baseline, torch.Tensor) else baseline, dtype=np.float32)
        if b.shape == x.shape[1:]:
            return np.broadcast_to(b, x.shape).copy()
        if b.shape == x.shape:
            return b.copy()
        raise AnalyzerError(f"a baseline array must have one sample's shape {x.shape[1:]}, got {b.shape}")
    if baseline == "zeros":
        return np.zeros_like(x)
    if baseline == "mean":
        if background is None:
            raise AnalyzerError("baseline='mean' needs background=: pass a sample of the dataset (N, ...) to average")
        bg = np.asarray(background, dtype=np.float32)
        if bg.shape[1:] != x.shape[1:]:
            raise AnalyzerError(f"background samples have shape {bg.shape[1:]} but inputs {x.shape[1:]}: pass "
                                f"samples of the same dataset")
        return np.broadcast_to(bg.mean(axis=0), x.shape).copy()
    if baseline == "blur":
        if x.ndim < 3:
            raise AnalyzerError("baseline='blur' needs images or sequences (tabular features have no neighbours): "
                                "use 'zeros' or 'mean'")
        from scipy.ndimage import gaussian_filter

        sigma = max(1.0, min(x.shape[2:]) / 4.0)
        # blur along the spatial axes only, never across samples or channels
        return gaussian_filter(x, sigma=(0, 0, *([sigma] * (x.ndim - 2))), mode="nearest").astype(np.float32)
    raise AnalyzerError(f"unknown baseline {baseline!r}: choose one of {', '.join(BASELINES)} or pass an array")


# --- layers for Grad-CAM -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvSite:
    """One convolution as it ran in a forward pass of one sample."""

    name: str
    order: int  # position among the convolutions' calls, in execution order
    calls: int  # how many times its module ran in the pass
    shape: tuple  # its output's shape, batch first
    depth: int  # convolutions on the longest path from the input to this one, itself included


def conv_sites(model, x) -> tuple[list, bool]:
    """The convolutions of `model` as they run on the first sample of `x`: order, output shape, calls and depth.

    Depth is read from the autograd graph of that pass, so a 1x1 shortcut convolution (registered last in a ResNet
    block, and run last in torchvision's) is shallower than the main path's last convolution. Also returns whether
    a later layer turns an image into (N, tokens, width), as a vision transformer's patch embedding does."""
    module = unwrap(model)
    kinds = layer_kinds(model)
    named = dict(module.named_modules())
    conv_names = [n for n in named if n and kinds.get(n, "").startswith("conv")]
    records, later_token_shapes = [], []
    calls: dict = {}

    def on_conv(name):
        def hook(_m, _a, out):
            if isinstance(out, torch.Tensor):
                calls[name] = calls.get(name, 0) + 1
                records.append((name, tuple(out.shape), out.grad_fn))
        return hook

    def on_any(_m, _a, out):
        if records and isinstance(out, torch.Tensor) and out.ndim == 3:
            later_token_shapes.append(tuple(out.shape))

    handles = [named[n].register_forward_hook(on_conv(n)) for n in conv_names]
    handles += [sub.register_forward_hook(on_any) for n, sub in named.items()
                if n and n not in conv_names and not any(True for _ in sub.children())]
    probe = torch.as_tensor(np.asarray(x[:1], dtype=np.float32), device=module_device(module))
    try:
        with analysis_mode(module), torch.enable_grad():
            _scores_module(model)(probe.clone().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    index_of = {id(node): i for i, (_, _, node) in enumerate(records) if node is not None}
    depths: list = []
    for i, (name, shape, node) in enumerate(records):
        deepest, stack, seen = 0, [f for f, _ in (node.next_functions if node is not None else ())], set()
        while stack:
            current = stack.pop()
            if current is None or id(current) in seen:
                continue
            seen.add(id(current))
            j = index_of.get(id(current))
            if j is not None and j < i:
                deepest = max(deepest, depths[j])  # an earlier convolution: its own depth covers what lies before
                continue
            stack.extend(f for f, _ in current.next_functions)
        depths.append(deepest + 1)
    sites = [ConvSite(name=name, order=i, calls=calls[name], shape=shape, depth=depths[i])
             for i, (name, shape, _) in enumerate(records)]
    tokenised = probe.ndim == 4 and bool(later_token_shapes)
    return sites, tokenised


def default_gradcam_layer(model, x) -> str:
    """The last convolution on the main path whose output still has spatial extent: the deepest (by graph
    position, not registration order) among those that run once and output more than one position. A model of
    tokens (token ids, or a vision transformer's patches) has none: Grad-CAM on its tokens is an explicit choice."""
    if layout_of(model).packed:
        raise AnalyzerError(_explicit_token_layer(model, x, "this model takes token ids, so Grad-CAM works on a "
                                                            "layer's tokens, which is an explicit choice"))
    sites, tokenised = conv_sites(model, x)
    if tokenised:
        raise AnalyzerError(_explicit_token_layer(model, x, "this model's convolutions feed a transformer's tokens "
                                                            "(a patch embedding), so Grad-CAM has no spatial layer "
                                                            "to default to; Grad-CAM on its patch tokens is an "
                                                            "explicit choice"))
    if not sites:
        raise AnalyzerError("Grad-CAM needs a convolutional layer and this model has none: use saliency, "
                            "integrated_gradients or shap")
    eligible = [s for s in sites if s.calls == 1 and int(np.prod(s.shape[2:])) > 1]
    if not eligible:
        raise AnalyzerError("every convolution of this model runs several times per pass or outputs a single "
                            "position, so a Grad-CAM map would be constant: use integrated_gradients or saliency")
    return max(eligible, key=lambda s: (s.depth, s.order)).name


def _explicit_token_layer(model, x, why: str) -> str:
    candidates = token_layers(model, x)
    example = f" (for example {candidates[-1]!r}, the last to run)" if candidates else ""
    return f"{why}: name a token layer with --layer{example}, or use integrated_gradients or saliency"


def _check_gradcam_layer(module: nn.Module, scores: nn.Module, layer_name: str, x: torch.Tensor, *,
                         tokens: int | None = None) -> str:
    """Refuse layers whose Grad-CAM would be silently wrong: run several times per pass, or neither a spatial map
    like the input nor a map over tokens. Returns "spatial" or "tokens". `tokens`: a token model's length."""
    layer = resolve_layer(module, layer_name)
    seen = []
    handle = layer.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            scores(x[:1])
    finally:
        handle.remove()
    if not seen:
        raise AnalyzerError(f"layer {layer_name!r} did not run in the forward pass: choose a layer the model calls")
    if len(seen) > 1:
        raise AnalyzerError(f"layer {layer_name!r} runs {len(seen)} times per forward pass (a reused module), so "
                            f"Grad-CAM would mix its calls: choose a layer that runs once")
    out = seen[0]
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if tokens is not None:
        if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[1] != tokens:
            raise AnalyzerError(f"layer {layer_name!r} outputs {shape}, not one vector per token (N, {tokens}, "
                                f"width): choose a transformer block or another token layer for Grad-CAM")
        return "tokens"
    if isinstance(out, torch.Tensor) and out.ndim == 3 and x.ndim == 4 and _token_grid(out.shape[1]) is not None:
        return "tokens"  # a vision transformer's patch tokens, reshaped to their grid
    if not isinstance(out, torch.Tensor) or out.ndim != x.ndim:
        raise AnalyzerError(f"layer {layer_name!r} outputs {shape}, not a spatial map like the input "
                            f"{tuple(x.shape)} nor a square grid of patch tokens: choose a convolutional layer (or "
                            f"a vision transformer's block) for Grad-CAM")
    return "spatial"


# --- token models and token layers ------------------------------------------------------------------------------------

def _run_with_hooks(model, x: np.ndarray, hooks: dict, *, pre: bool = False) -> None:
    """One no-grad forward pass of the first sample of `x` with `hooks` (layer name -> hook) attached, then removed."""
    module = unwrap(model)
    named = dict(module.named_modules())
    handles = [(named[n].register_forward_pre_hook(h) if pre else named[n].register_forward_hook(h))
               for n, h in hooks.items()]
    try:
        with analysis_mode(module), torch.no_grad():
            _scores_module(model)(torch.as_tensor(np.asarray(x[:1], dtype=np.float32), device=module_device(module)))
    finally:
        for handle in handles:
            handle.remove()


def token_embedding_layer(model, x) -> str:
    """The embedding layer that looks up a token model's ids: the first to run whose input is exactly the ids of
    the first sample of `x` (a position or segment embedding looks up other indices)."""
    layout = layout_of(model)
    kinds = layer_kinds(model)
    ids = torch.as_tensor(layout.token_ids(x[:1]))
    found: list = []

    def check(name):
        def hook(_m, args):
            value = args[0] if args else None
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(ids.shape) and \
                    torch.equal(value.detach().long().cpu(), ids):
                found.append(name)
        return hook

    _run_with_hooks(model, x, {n: check(n) for n, k in kinds.items() if k == "embedding"}, pre=True)
    if not found:
        raise AnalyzerError("no embedding layer of this model looks up its token ids (an nn.Embedding, or "
                            "aten.embedding in an export): token attributions are taken through that layer")
    return found[0]


def _token_grid(tokens: int) -> tuple[int, int] | None:
    """(leading special tokens, grid side) when `tokens` is a square patch grid after 0, 1 or 2 class tokens."""
    for lead in (0, 1, 2):
        side = math.isqrt(max(tokens - lead, 0))
        if side > 1 and side * side == tokens - lead:
            return lead, side
    return None


@runs_in_worker
def token_layers(model, x) -> list:
    """Layers whose output is a map over tokens, in the order they run: (N, L, D) for a token model's L tokens, or
    a square patch grid (after a class token) for an image model such as a vision transformer. These are what
    Grad-CAM on tokens can be pointed at; it never picks one itself."""
    tokens = layout_of(model).token_length if layout_of(model).packed else None
    kinds = layer_kinds(model)
    module = unwrap(model)
    seen: dict = {}

    def record(name):
        def hook(_m, _a, out):
            if isinstance(out, torch.Tensor) and out.ndim == 3 and name not in seen:
                fits = out.shape[1] == tokens if tokens is not None else _token_grid(out.shape[1]) is not None
                if fits and out.shape[2] > 1:
                    seen[name] = len(seen)
        return hook

    names = [n for n, _ in module.named_modules() if n and kinds.get(n) not in ("embedding", "dropout")]
    _run_with_hooks(model, x, {n: record(n) for n in names})
    return sorted(seen, key=seen.get)


def _token_gradcam(fn, layer: nn.Module, x: torch.Tensor, target: torch.Tensor, *, tokens: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM over a layer's token map A (N, T, D): a weight per channel d, the gradient averaged over tokens,
    then relu(sum_d w_d A[:, t, d]) per token (Selvaraju et al.'s rule with tokens as positions). For token ids the
    result is one score per token (N, L); for an image it is the patch grid upsampled onto the image."""
    captured = []
    handle = layer.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        scores = fn(x)
    finally:
        handle.remove()
    if len(captured) != 1 or not isinstance(captured[0], torch.Tensor) or captured[0].ndim != 3:
        raise AnalyzerError("the chosen Grad-CAM layer must run once and output (N, tokens, width)")
    acts = captured[0]
    grads, = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), acts)
    cam = torch.relu((grads.mean(dim=1, keepdim=True) * acts).sum(dim=2))  # (N, T)
    if tokens is not None:
        return cam, cam[:, None]
    lead, side = _token_grid(cam.shape[1])
    raw = cam[:, lead:].reshape(len(cam), 1, side, side)
    up = torch.nn.functional.interpolate(raw, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)
    return up.expand(-1, x.shape[1], -1, -1).contiguous(), raw


def _token_attribute(method: str, fn, module: nn.Module, embedding: str, x: torch.Tensor, target: torch.Tensor,
                     layout, *, opts: dict, base: torch.Tensor | None, seeds: np.ndarray | None) -> torch.Tensor:
    """One batch of a token model: per-token scores (N, L), summed over the embedding's width. `seeds`: each
    sample's own (`sample_seeds`), for LIME."""
    import captum.attr as ca

    length = layout.token_length
    if method == "attention_rollout":
        return _rollout_tokens(module, x, layout)
    if method == "gradcam":
        return _token_gradcam(fn, resolve_layer(module, opts["layer"]), x, target, tokens=length)[0]
    if method == "lime":  # on the ids themselves, as occlusion: a removed token becomes the pad id
        return _lime_tokens(fn, x, target, base, length, opts=opts, seeds=seeds)
    layer = resolve_layer(module, embedding)
    if method in ("saliency", "input_x_gradient"):
        attr = ca.LayerGradientXActivation(fn, layer, multiply_by_inputs=method == "input_x_gradient").attribute(
            x, target=target)
        return (attr.abs() if method == "saliency" else attr).sum(dim=-1)
    if method == "integrated_gradients":
        # the path runs from the pad tokens' embeddings to the sample's, so the scores sum to f(x) - f(pads)
        attr = ca.LayerIntegratedGradients(fn, layer).attribute(
            x, baselines=base, target=target, n_steps=opts["n_steps"], internal_batch_size=opts["internal_batch_size"])
        return attr.sum(dim=-1)
    if method == "occlusion":
        # each token is one feature, replaced by the pad id; the other inputs form one more feature whose baseline
        # is themselves, so ablating it changes nothing
        groups = torch.full((1, x.shape[1]), length, dtype=torch.long, device=x.device)
        groups[0, :length] = torch.arange(length, device=x.device)
        attr = ca.FeatureAblation(fn).attribute(x, baselines=base, target=target, feature_mask=groups,
                                                perturbations_per_eval=opts["perturbations_per_eval"])
        return attr[:, :length]
    raise AnalyzerError(f"{METHODS[method].label} does not apply to token ids")


# --- the methods -------------------------------------------------------------------------------------------------------

def _interpolate_mode(ndim: int) -> str:
    return {3: "linear", 4: "bilinear"}.get(ndim, "nearest")


def _occlusion_shapes(sample_shape: tuple, window, stride) -> tuple[tuple, tuple]:
    """Window and stride in input units, as Captum wants them (one sample's dimensions)."""
    spatial = sample_shape[1:] if len(sample_shape) > 1 else sample_shape

    def expand(value, default):
        if value is None:
            value = default
        if isinstance(value, (int, np.integer)):
            value = (int(value),) * len(spatial)
        value = tuple(int(v) for v in value)
        if len(value) == len(sample_shape) and len(sample_shape) > 1:
            return value
        if len(value) != len(spatial):
            raise AnalyzerError(f"occlusion window/stride {value} does not fit samples of shape {sample_shape}: give "
                                f"one size per spatial dimension ({len(spatial)})")
        return (sample_shape[0], *value) if len(sample_shape) > 1 else value

    default_window = tuple(max(1, s // 8) for s in spatial) if len(sample_shape) > 1 else (1,) * len(spatial)
    win = expand(window, default_window)
    default_stride = tuple(max(1, w // 2) for w in (win[1:] if len(sample_shape) > 1 else win))
    strides = expand(stride, default_stride)
    if any(w < 1 or w > s for w, s in zip(win, sample_shape)) or any(s < 1 for s in strides):
        raise AnalyzerError(f"occlusion window {win} / stride {strides} must be positive and fit the sample "
                            f"{sample_shape}")
    return win, strides


# --- LIME -------------------------------------------------------------------------------------------------------------
# Ribeiro et al. (2016) through Captum's Lime. The interpretable representation is a binary vector z over d features;
# a 0 sets that feature's positions to the baseline (`feature_mask`, Captum's default transform). Captum draws z with
# each feature kept with probability 1/2, fits a linear regression (sklearn's, through Captum's
# SkLearnLinearRegression: unregularised, so a small effect is not shrunk to zero) of the class score on z, weighted
# by Captum's exponential kernel exp(-D^2 / (2 w^2)) on the Euclidean distance D of z from the all-kept vector
# (sqrt of the number of features removed), with w = kernel_width * sqrt(d). The distance is taken in the
# interpretable space, not between inputs, so w means the same for pixels, raw table units and token ids. Each
# sample is fitted on its own, its draws seeded with its own seed (`sample_seeds`), so its map does not depend on
# the batch.

def _lime_window(sample_shape: tuple, modality: str, window) -> tuple | None:
    """LIME's superpixel (an image's patch height and width) or window (a sequence's positions), in input units;
    None for tables and tokens, whose interpretable features are the features and the tokens themselves. By default
    an image is cut into about LIME_GRID x LIME_GRID patches (side ceil(H / 8) x ceil(W / 8)) and a sequence into
    about LIME_WINDOWS windows (ceil(L / 32) positions)."""
    if modality in ("tabular", "tokens"):
        if window is not None:
            unit = "feature" if modality == "tabular" else "token"
            raise InvalidOption(f"LIME's window applies to images and sequences: on {modality} inputs each {unit} is "
                                f"its own interpretable feature; leave window unset")
        return None
    spatial = tuple(int(s) for s in sample_shape[1:])
    if window is None:
        parts = LIME_GRID if len(spatial) == 2 else LIME_WINDOWS
        return tuple(max(1, math.ceil(s / parts)) for s in spatial)

    def whole(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    values = (window,) * len(spatial) if whole(window) else \
        tuple(window) if isinstance(window, (tuple, list, np.ndarray)) else ()
    if len(values) != len(spatial) or not all(whole(v) and 1 <= v <= s for v, s in zip(values, spatial)):
        raise InvalidOption(f"LIME's window must be a whole number of positions per spatial dimension, from 1 to "
                            f"the input's size {'x'.join(map(str, spatial))}, got {window!r}: e.g. window="
                            f"{max(1, spatial[-1] // 4)}")
    return tuple(int(v) for v in values)


def _lime_mask(sample_shape: tuple, window: tuple | None) -> np.ndarray:
    """The interpretable representation as Captum's `feature_mask`, one sample's shape (int64): each position holds
    its interpretable feature's index. A table's feature f is feature f; an image's patches of `window` pixels on a
    grid (row-major, the last ones cut by the border) and a sequence's windows of positions are shared by all
    channels."""
    if window is None:
        return np.arange(int(np.prod(sample_shape)), dtype=np.int64).reshape(sample_shape)
    spatial = sample_shape[1:]
    cells = [np.arange(size) // w for size, w in zip(spatial, window)]
    index = cells[0] if len(spatial) == 1 else cells[0][:, None] * math.ceil(spatial[1] / window[1]) + cells[1][None]
    return np.broadcast_to(index.astype(np.int64), sample_shape).copy()


def _lime_similarity(features: int, kernel_width: float):
    """Captum's exponential kernel on the Euclidean distance of the interpretable vector from the all-kept one."""
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    kernel = get_exp_kernel_similarity_function("euclidean", kernel_width=kernel_width * math.sqrt(features))

    def similarity(_original, _perturbed, interpretable, **_kwargs):
        return kernel(torch.ones_like(interpretable), interpretable, None)

    return similarity


def _one_blas_thread():
    """BLAS on one thread for LIME's small least-squares fits (n_samples x d each): on two busy cores, OpenBLAS's
    two threads made each 200 x 65 fit take 0.18 s instead of 0.012 s. Process-wide while it lasts, but LIME holds
    `_RNG_LOCK` (a random method), so only one LIME at a time sets it. threadpoolctl comes with scikit-learn."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn requires it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _lime_one(fn, x: torch.Tensor, base: torch.Tensor, target: int, mask: torch.Tensor, *, opts: dict, seed: int
              ) -> torch.Tensor:
    """One sample (1, ...) through Captum's Lime: the linear model's weights, one per interpretable feature (d,).
    `seed`: the sample's own (`sample_seeds`)."""
    import captum.attr as ca
    from captum._utils.models.linear_model import SkLearnLinearRegression

    features = int(mask.max()) + 1
    lime = ca.Lime(fn, interpretable_model=SkLearnLinearRegression(),
                   similarity_func=_lime_similarity(features, opts["kernel_width"]))
    torch.manual_seed(int(seed))  # inside `_private_rng`: Captum draws z from torch's global generator
    with torch.no_grad():
        coefs = lime.attribute(x, baselines=base, target=target, feature_mask=mask, n_samples=opts["n_samples"],
                               perturbations_per_eval=opts["per_eval"], return_input_shape=False)
    return coefs.reshape(-1).float().to(x.device)


def _lime_attribute(fn, x: torch.Tensor, target: torch.Tensor, base: torch.Tensor, *, opts: dict,
                    seeds: np.ndarray) -> torch.Tensor:
    """A batch of images, sequences or rows: each sample's LIME weights spread over their features' positions."""
    mask = torch.as_tensor(opts["mask"], device=x.device)
    out = torch.zeros_like(x)
    with _one_blas_thread():
        for i in range(len(x)):
            coefs = _lime_one(fn, x[i:i + 1], base[i:i + 1], int(target[i]), mask[None], opts=opts, seed=seeds[i])
            out[i] = coefs[mask]
    return out


def _lime_tokens(fn, x: torch.Tensor, target: torch.Tensor, base: torch.Tensor, length: int, *, opts: dict,
                 seeds: np.ndarray) -> torch.Tensor:
    """A batch of packed token rows: one interpretable feature per token that is not already the pad id (removing
    it makes it the pad id, its attention mask kept, as occlusion does); pad positions get 0. LIME perturbs only
    those token ids, and the function it explains writes them back into the sample's packed row."""
    out = torch.zeros((len(x), length), dtype=torch.float32, device=x.device)
    with _one_blas_thread():
        for i in range(len(x)):
            live = torch.nonzero(x[i, :length] != PAD_ID).flatten()
            if len(live) == 0:
                continue
            row = x[i:i + 1]

            def forward(ids, row=row, live=live):
                full = row.expand(len(ids), -1).clone()
                full[:, live] = ids
                return fn(full)

            mask = torch.arange(len(live), device=x.device)[None]
            out[i, live] = _lime_one(forward, row[:, live], base[i:i + 1, live], int(target[i]), mask, opts=opts,
                                     seed=seeds[i])
    return out


def _rollout(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    """(N, T, T) attention rollout of a batch (analyzers.explanations.attention); a model without attention is
    refused with its reason, so the method is skipped and the others still run."""
    from .attention import attention_rollout, attention_weights

    return attention_rollout(attention_weights(module, x.detach().cpu().numpy(), batch_size=len(x)))


def _rollout_tokens(module: nn.Module, x: torch.Tensor, layout) -> torch.Tensor:
    """(N, L) per token: the mean over the real tokens' rows of the rollout (a padded row says nothing)."""
    from .attention import token_relevance

    rollout = _rollout(module, x)
    if rollout.shape[-1] != layout.token_length:
        raise AnalyzerError(f"the model attends over {rollout.shape[-1]} tokens, not its input's "
                            f"{layout.token_length}: attention rollout cannot be read as a map of the input")
    mask = layout.parts(x.detach().cpu().numpy()).get("attention_mask")
    mask = mask if mask is not None and mask.shape == rollout.shape[:2] else None
    return torch.as_tensor(token_relevance(rollout, query="mean", mask=mask), device=x.device)


def _rollout_image(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W): a vision transformer's rollout over its patch grid, upsampled onto the image (the class
    token's row where there is one), the same over the channels."""
    from .attention import image_relevance

    up, _ = image_relevance(_rollout(module, x), tuple(x.shape[2:]))
    return torch.as_tensor(up, device=x.device)[:, None].expand(-1, x.shape[1], -1, -1).contiguous()


def _attribute(method: str, scores: nn.Module, module: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
               opts: dict, base: torch.Tensor | None, seeds: np.ndarray | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch through Captum/shap: (attributions shaped like x, Grad-CAM's raw map or None). `seeds`: each
    sample's own (`sample_seeds`), for the random methods."""
    import captum.attr as ca

    fn = _callable_scores(scores)
    if method == "attention_rollout":
        return _rollout_image(module, x), None
    if method == "saliency":
        return ca.Saliency(fn).attribute(x, target=target, abs=True), None
    if method == "input_x_gradient":
        return ca.InputXGradient(fn).attribute(x, target=target), None
    if method == "integrated_gradients":
        attr = ca.IntegratedGradients(fn).attribute(x, baselines=base, target=target, n_steps=opts["n_steps"],
                                                    internal_batch_size=opts["internal_batch_size"])
        return attr, None
    if method in ("smoothgrad", "smoothgrad_abs"):
        attr = _smoothgrad(fn, x, target, opts=opts, seeds=seeds, magnitude=method == "smoothgrad_abs")
        return (attr.abs() if method == "smoothgrad" else attr), None
    if method == "guided_backprop":
        with warnings.catch_warnings():  # its note that it sets (and removes) backward hooks on the ReLUs
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU", category=UserWarning)
            return ca.GuidedBackprop(_ClonedInput(scores)).attribute(x, target=target), None
    if method == "occlusion":
        attr = ca.Occlusion(fn).attribute(x, sliding_window_shapes=opts["window"], strides=opts["stride"],
                                          baselines=base, target=target,
                                          perturbations_per_eval=opts["perturbations_per_eval"])
        return attr, None
    if method == "gradcam" and opts.get("layer_output") == "tokens":
        return _token_gradcam(fn, resolve_layer(module, opts["layer"]), x, target, tokens=None)
    if method == "gradcam":
        layer = resolve_layer(module, opts["layer"])
        raw = ca.LayerGradCam(fn, layer).attribute(x, target=target, relu_attributions=True)
        up = ca.LayerAttribution.interpolate(raw, tuple(x.shape[2:]), interpolate_mode=_interpolate_mode(x.ndim))
        return up.expand(-1, x.shape[1], *([-1] * (x.ndim - 2))).contiguous(), raw
    if method == "lime":
        return _lime_attribute(fn, x, target, base, opts=opts, seeds=seeds), None
    raise AnalyzerError(f"unknown method {method!r}")  # guarded by explain(); kept for direct callers


def _smoothgrad(fn, x: torch.Tensor, target: torch.Tensor, *, opts: dict, seeds: np.ndarray, magnitude: bool
                ) -> torch.Tensor:
    """Captum's NoiseTunnel(Saliency) with nt_type "smoothgrad": the mean of the inner attributions over noisy
    copies, of the raw gradients (Saliency abs=False) for Smilkov et al.'s |mean ∇| (taken by the caller), of their
    magnitudes for mean |∇|. Each sample's noise is what NoiseTunnel draws for that sample alone, with
    nt_samples_batch_size = nt_samples, after `torch.manual_seed(its seed)` (torch.normal(0, std) of its copies),
    drawn on the CPU whatever the device; NoiseTunnel on a batch draws one stream for the whole batch. The copies
    of whole samples are run together, about `nt_batch` copies per sample of the batch at a time (a sample's own
    copies at least), and only those are held."""
    import captum.attr as ca

    copies, std = opts["nt_samples"], opts["noise_std"]
    shape = tuple(x.shape[1:])
    per_pass = max(1, len(x) * opts["nt_batch"] // copies)  # samples whose copies are run together
    saliency = ca.Saliency(fn)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for start in range(0, len(x), per_pass):
        part = x[start:start + per_pass].detach()
        with torch.no_grad():
            noisy = torch.empty((len(part), copies, *shape), dtype=x.dtype)
            for i, seed in enumerate(seeds[start:start + len(part)]):  # in place: torch.normal(0, std)'s values
                noisy[i].normal_(0, std, generator=torch.Generator().manual_seed(int(seed)))
            noisy = noisy.to(x.device)
            noisy += part[:, None]  # x + noise, as NoiseTunnel adds them
        # a leaf that asks for its gradient (Saliency warns of one that does not), sharing noisy's memory
        rows = noisy.reshape(-1, *shape).detach().requires_grad_()
        grads = saliency.attribute(rows, target=target[start:start + len(part)].repeat_interleave(copies),
                                   abs=magnitude)
        out[start:start + len(part)] = grads.reshape(len(part), copies, *shape).sum(1) / copies
    return out


def _shap_draws(rng: np.random.RandomState, background_size: int, rows: int, nsamples: int):
    """shap's draws for `rows` samples, in its order: per sample and draw, a background row, then t ~ U(0, 1)."""
    pick, where = rng.randint, rng.random_sample  # the values of rng.choice(size) and rng.uniform(), faster
    rind = np.empty(rows * nsamples, dtype=np.int64)
    t = np.empty(rows * nsamples)
    for k in range(rows * nsamples):
        rind[k] = pick(background_size)
        t[k] = where()
    return rind, t


def _shap_attribute(scores: nn.Module, x: np.ndarray, targets: np.ndarray, background: np.ndarray, *,
                    nsamples: int, batch_size: int, seeds: np.ndarray, device) -> np.ndarray:
    """Expected gradients as shap's GradientExplainer computes them for PyTorch (one input, one output per class,
    no local smoothing): for each sample x, `nsamples` draws of a background row b and of t ~ U(0, 1) from numpy's
    legacy generator seeded with the sample's own seed (`seeds`, from `sample_seeds`), in shap's order, and the mean
    over the draws of grad f(t x + (1 - t) b) * (x - b) in float64. Each sample's values are those of
    `GradientExplainer(...).shap_values(x[i:i + 1], nsamples, rseed=seeds[i])`, without its Python loop of tensor
    copies per draw (a third of a millisecond each, which made doubling nsamples cost seconds per sample): the
    gradients are taken `batch_size` draws at a time, across samples."""
    out = np.zeros(x.shape, dtype=np.float64)
    bg = torch.as_tensor(background, device=device)
    spread = (-1,) + (1,) * (x.ndim - 1)
    for cls in np.unique(targets):
        rows = np.flatnonzero(targets == cls)
        score = _TargetScore(scores, int(cls))
        draws = [_shap_draws(np.random.RandomState(seeds[row]), len(background), 1, nsamples) for row in rows]
        rind, t = np.concatenate([d[0] for d in draws]), np.concatenate([d[1] for d in draws])
        owner = torch.as_tensor(np.repeat(np.arange(len(rows)), nsamples), device=device)
        picked = torch.as_tensor(rind, device=device)
        inputs = torch.as_tensor(x[rows], device=device)
        total = torch.zeros((len(rows), *x.shape[1:]), dtype=torch.float64, device=device)
        for start in range(0, len(rind), batch_size):
            sl = slice(start, start + batch_size)
            xb, bb = inputs[owner[sl]], bg[picked[sl]]
            # shap: t * x + (1 - t) * b with t a Python float, so each factor is rounded to float32 on its own
            tb = torch.as_tensor(t[sl].astype(np.float32), device=device).view(spread)
            sb = torch.as_tensor((1 - t[sl]).astype(np.float32), device=device).view(spread)
            point = (tb * xb + sb * bb).requires_grad_()
            grad, = torch.autograd.grad(score(point)[:, 0].sum(), point)
            total.index_add_(0, owner[sl], grad.detach().double() * (xb - bb).double())
        out[rows] = (total / nsamples).cpu().numpy()
    return out.astype(np.float32)


_RNG_LOCK = threading.Lock()  # the global generators are shared by every model: one seeded user at a time
RANDOM_METHODS = ("smoothgrad", "smoothgrad_abs", "shap", "lime")


@contextlib.contextmanager
def _private_rng(seed: int, needed: bool = True):
    """Seeded torch and numpy randomness (SmoothGrad noise, shap's draws, LIME's perturbations) without disturbing
    the caller's streams.

    Captum and shap draw from the global generators, so two threads explaining different models (different model
    locks) would interleave their draws; the lock keeps each explanation's draws its own."""
    if not needed:
        yield
        return
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        state = np.random.get_state()
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


# methods whose maps come from gradients with respect to the inputs (or a layer's output), never the weights'
INPUT_GRADIENT_METHODS = frozenset({"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad",
                                    "smoothgrad_abs", "gradcam"})


@runs_in_worker
def explain(model, inputs, target=None, method: str = "saliency", *, batch_size: int = 64, layer: str | None = None,
            baseline="zeros", n_steps: int = 50, internal_batch_size: int | None = None, nt_samples: int = 16,
            stdevs: float = 0.15, window=None, stride=None, nsamples: int = 200, background=None,
            n_samples: int = LIME_SAMPLES, kernel_width: float = LIME_KERNEL_WIDTH, return_raw: bool = False,
            seed: int = 0, check_completeness: bool = True, details: bool = False):
    """Attributions of `target` (a class index, one per sample, or None for the predicted class) for `inputs`.

    `model` is a LoadedModel or a plain module returning logits. Returns a float32 array shaped like `inputs`; with
    `return_raw=True` (Grad-CAM only) a pair (upsampled map, raw layer-resolution map (N, 1, ...)); with
    `details=True` an `ExplainResult` (the maps, their completeness gap, the steps or draws used and the settings;
    its arrays always have one row per sample).
    Options: `layer` (Grad-CAM, default the last convolution); `baseline` "zeros", "blur", "mean" (of `background`)
    or an array (integrated_gradients, occlusion); `n_steps`, `internal_batch_size` (integrated_gradients);
    `nt_samples` and `stdevs` (smoothgrad, smoothgrad_abs; noise std as a fraction of the value range of
    `background`, else of the inputs); `window`, `stride` (occlusion, in input units per spatial dimension);
    `nsamples` and `background` (shap: samples of the dataset; without it, `seeded_sample(inputs, seed)`, up to
    `BACKGROUND_SIZE` of the inputs, which `ExplainResult.notes` says); `n_samples` (perturbed copies per sample),
    `kernel_width` (a fraction of sqrt(interpretable features)), `window` (an image's superpixel side or a sequence's
    window, in positions; default about 8 x 8 patches or 32 windows) and `baseline` (lime). `seed` fixes the random
    draws of smoothgrad, shap and lime: each sample's come from `seed` and its own values (`sample_seeds`), so its
    map is the same at any batch size, alone or among others.
    `check_completeness` (default on): Integrated Gradients doubles `n_steps` (up to `IG_MAX_STEPS`) and SHAP
    `nsamples` (up to `SHAP_MAX_NSAMPLES`) for each sample whose map misses its score difference by more than the
    tolerance (`completeness.ig_completeness`, `completeness.shap_completeness`); False computes the maps at the
    given n_steps / nsamples, unchecked.
    """
    if method not in METHODS:
        raise AnalyzerError(f"unknown attribution method {method!r}: choose one of {', '.join(METHODS)}")
    for name, flag in (("check_completeness", check_completeness), ("details", details), ("return_raw", return_raw)):
        if not isinstance(flag, (bool, np.bool_)):
            raise AnalyzerError(f"{name} must be True or False, got {flag!r}")
    for name, value, least in (("batch_size", batch_size, 1), ("n_steps", n_steps, 2), ("nt_samples", nt_samples, 1),
                               ("nsamples", nsamples, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise AnalyzerError(f"{name} must be an integer of at least {least}, got {value!r}")
    if isinstance(n_samples, (bool, np.bool_)) or not isinstance(n_samples, (int, np.integer)) or n_samples < 10:
        raise InvalidOption(f"n_samples must be an integer of at least 10 (LIME's perturbed copies per sample; "
                            f"default {LIME_SAMPLES}), got {n_samples!r}")
    if isinstance(kernel_width, (bool, np.bool_)) or not isinstance(kernel_width, (int, float, np.number)) or \
            not math.isfinite(kernel_width) or kernel_width <= 0:
        raise InvalidOption(f"kernel_width must be a positive number (LIME's kernel width as a fraction of "
                            f"sqrt(interpretable features); default {LIME_KERNEL_WIDTH}), got {kernel_width!r}")
    if not isinstance(stdevs, (int, float, np.number)) or not math.isfinite(stdevs) or stdevs < 0:
        raise AnalyzerError(f"stdevs must be a finite noise level of 0 or more (a fraction of the value range), "
                            f"got {stdevs!r}")
    if return_raw and method != "gradcam":
        raise AnalyzerError("return_raw=True applies to gradcam only (its layer-resolution map)")
    if return_raw and details:
        raise AnalyzerError("return_raw=True and details=True do not combine: ask for one of them")
    module = unwrap(model)
    x, single = _as_batch(model, inputs)
    info = METHODS[method]
    layout = layout_of(model)
    modality = model_modality(model, x)
    if modality not in info.modalities:
        raise AnalyzerError(f"{info.label} does not apply to {modality} inputs: choose one of "
                            f"{', '.join(m.name for m in list_methods(modality))}")
    if background is not None:
        background = np.asarray(background.detach().cpu() if isinstance(background, torch.Tensor) else background,
                                dtype=np.float32)
        if background.ndim != x.ndim or background.shape[1:] != x.shape[1:] or len(background) == 0:
            raise AnalyzerError(f"background must be samples shaped like the inputs (M, {x.shape[1:]}), got "
                                f"{background.shape}")
    if method == "guided_backprop" and (reason := guided_backprop_skip_reason(model)) is not None:
        raise AnalyzerError(reason[0].upper() + reason[1:])
    notes = ()
    if info.needs_background and background is None:
        background, notes = _background_from_inputs(info, x, seed)
    if check_completeness and method in COMPLETE_METHODS:
        result = _explain_complete(model, x, target, method, batch_size=batch_size, baseline=baseline,
                                   n_steps=int(n_steps), internal_batch_size=internal_batch_size,
                                   nsamples=int(nsamples), background=background, seed=seed)
        if details:
            return dataclasses.replace(result, notes=notes)
        return result.attributions[0] if single else result.attributions
    opts = {"n_steps": int(n_steps), "layer": layer}
    scores = _scores_module(model)
    with analysis_mode(module):
        device = module_device(module)
        targets = _targets(scores, x, target, batch_size, device)
        base = None
        if method in ("integrated_gradients", "occlusion", "lime"):
            base = baseline_for(x, baseline, background, layout=layout)
        if method == "integrated_gradients":
            opts["internal_batch_size"] = internal_batch_size or max(n_steps, batch_size * 8)
        elif method in ("smoothgrad", "smoothgrad_abs"):
            ref = background if background is not None else x
            opts["noise_std"] = float(stdevs) * float(ref.max() - ref.min() or 1.0)
            opts["nt_samples"] = int(nt_samples)
            opts["nt_batch"] = max(1, min(int(nt_samples), 8 * batch_size))
        elif method == "occlusion":
            if modality == "tokens" and (window is not None or stride is not None):
                raise AnalyzerError("occlusion on a token model removes one token at a time (its id becomes the "
                                    "pad id): window and stride do not apply")
            opts["window"], opts["stride"] = _occlusion_shapes(x.shape[1:], window, stride)
            opts["perturbations_per_eval"] = max(1, batch_size // min(batch_size, len(x)))
        elif method == "lime":
            opts["lime_window"] = _lime_window(x.shape[1:], modality, window)
            opts["interpretable"] = {"image": "superpixels", "sequence": "windows", "tabular": "features",
                                     "tokens": "tokens"}[modality]
            if modality != "tokens":
                opts["mask"] = _lime_mask(x.shape[1:], opts["lime_window"])
            opts.update(n_samples=int(n_samples), kernel_width=float(kernel_width), per_eval=int(batch_size),
                        seed=int(seed))
        elif method == "gradcam":
            opts["layer"] = layer or default_gradcam_layer(model, x)
            opts["layer_output"] = _check_gradcam_layer(module, scores, opts["layer"],
                                                        torch.as_tensor(x[:1], device=device),
                                                        tokens=layout.token_length if layout.packed else None)
        embedding = token_embedding_layer(model, x) if modality == "tokens" and method not in ("gradcam", "lime") \
            else None
        if modality != "tokens" and method in INPUT_GRADIENT_METHODS:
            # no map needs a weight's gradient: frozen weights keep autograd from recording for them (saliency at
            # 100k: 1.32x the bare forward+backward, which freezes them too); analysis_mode restores them
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        # every row is written below (SHAP replaces it whole): no zeros to write first
        out = empty_array((len(x), layout.token_length) if modality == "tokens" else x.shape, dtype=np.float32)
        raws = []
        try:
            seeds = sample_seeds(x, seed) if method in RANDOM_METHODS else None
            with _private_rng(seed, needed=method in RANDOM_METHODS):
                if method == "shap":
                    out = _shap_attribute(scores, x, targets, background, nsamples=int(nsamples),
                                          batch_size=batch_size, seeds=seeds, device=device)
                else:
                    for start in range(0, len(x), batch_size):
                        stop = min(start + batch_size, len(x))
                        xb = torch.as_tensor(x[start:stop], device=device).requires_grad_(
                            method not in ("occlusion", "lime", "attention_rollout"))
                        tb = torch.as_tensor(targets[start:stop], device=device)
                        bb = None if base is None else torch.as_tensor(base[start:stop], device=device)
                        sb = None if seeds is None else seeds[start:stop]
                        if modality == "tokens":  # no gradient reaches integer ids: they are explained through
                            xb = xb.detach()      # their embedding layer
                            attr, raw = _token_attribute(method, _callable_scores(scores), module, embedding, xb, tb,
                                                         layout, opts=opts, base=bb, seeds=sb), None
                        else:
                            attr, raw = _attribute(method, scores, module, xb, tb, opts=opts, base=bb, seeds=sb)
                        block = torch.from_numpy(out[start:stop])
                        block.copy_(attr.detach())  # torch's copy, on its threads, straight into the result
                        if not bool(torch.isfinite(block).all()):  # checked while in cache, not in a pass after
                            raise AnalyzerError(f"{info.label} produced NaN or inf attributions: check the model's "
                                                f"outputs on these inputs")
                        if raw is not None:
                            raws.append(raw.detach().float().cpu().numpy())
        except AnalyzerError:
            raise
        except RuntimeError as exc:
            raise AnalyzerError(f"{info.label} failed on this model ({first_line(exc)}): try saliency or "
                                f"integrated_gradients, or check the model runs on these inputs") from exc
    if method == "shap" and not np.isfinite(out).all():  # the loop above checked each block of the others
        raise AnalyzerError(f"{info.label} produced NaN or inf attributions: check the model's outputs on these inputs")
    if details:
        unset = np.full(len(x), -1, dtype=np.int64)
        return ExplainResult(
            attributions=out, settings=_settings(method, opts, baseline=baseline, seed=seed, stdevs=stdevs,
                                                 background=background),
            completeness_gap=np.full(len(x), np.nan), difference=np.full(len(x), np.nan),
            n_steps=np.full(len(x), int(n_steps)) if method == "integrated_gradients" else unset,
            nsamples=np.full(len(x), int(nsamples)) if method == "shap" else unset, notes=notes)
    if single:
        out = out[0]
    if return_raw:
        raw = np.concatenate(raws)
        return out, (raw[0] if single else raw)
    return out


def _background_from_inputs(info: MethodInfo, x: np.ndarray, seed) -> tuple[np.ndarray, tuple]:
    """A method's background when none is given: a seeded sample of the inputs themselves, and the note that says
    so. One input is its own background, against which every map is zero: refused."""
    seed = whole_number(seed, "seed", 0, "the seed of numpy's default_rng, which draws the background")
    if len(x) < 2:
        raise AnalyzerError(f"{info.label} without background= draws it from the inputs, and one input is no "
                            f"background: pass background= (a sample of the dataset, e.g. 50-200 rows)")
    background = seeded_sample(x, seed)
    return background, (f"background: {len(background)} of the {len(x)} inputs, drawn with seed {seed} (no "
                        f"background= given); pass a sample of the dataset for values against the data",)


def _baseline_name(baseline) -> str:
    return baseline if isinstance(baseline, str) else "array"


def _settings(method: str, opts: dict, *, baseline, seed: int, stdevs: float, background) -> dict:
    """The options that made a call's maps, as resolved, in plain JSON values (what a page shows beside a map)."""
    if method == "integrated_gradients":
        return {"baseline": _baseline_name(baseline), "n_steps": opts["n_steps"],
                "internal_batch_size": int(opts["internal_batch_size"])}
    if method in ("smoothgrad", "smoothgrad_abs"):
        return {"nt_samples": opts["nt_samples"], "stdevs": float(stdevs), "noise_std": opts["noise_std"],
                "noise_range_of": "background" if background is not None else "inputs", "seed": int(seed)}
    if method == "occlusion":
        return {"baseline": _baseline_name(baseline), "window": list(opts["window"]), "stride": list(opts["stride"])}
    if method == "gradcam":
        return {"layer": opts["layer"], "layer_output": opts["layer_output"]}
    if method == "shap":
        return {"background_size": int(len(background)), "seed": int(seed)}
    if method == "lime":
        window = opts["lime_window"]
        return {"baseline": _baseline_name(baseline), "n_samples": opts["n_samples"],
                "kernel_width": opts["kernel_width"], "interpretable": opts["interpretable"],
                "patch": list(window) if window is not None else None,
                "features": int(opts["mask"].max()) + 1 if "mask" in opts else None, "seed": int(seed)}
    return {}


def describe_settings(method: str, settings: dict) -> str:
    """A map's settings (`ExplainResult.row_settings`) in words, for the line under the map: what made it."""
    if not settings:
        return "no options" if not METHODS[method].options else "settings not stored (made before they were)"
    if method == "lime" and "n_samples" in settings:
        return _describe_lime(settings)
    words = []
    if "baseline" in settings:
        words.append(f"baseline {settings['baseline']}")
    if "n_steps" in settings:
        words.append(f"{settings['n_steps']} steps")
    if "nt_samples" in settings:
        words.append(f"{settings['nt_samples']} noisy copies, noise std {settings['stdevs']:g} × the value range "
                     f"of the {settings.get('noise_range_of', 'inputs')} ({settings['noise_std']:.3g})")
    if "window" in settings:
        words.append(f"window {'×'.join(map(str, settings['window']))}, stride "
                     f"{'×'.join(map(str, settings['stride']))}")
    if "layer" in settings:
        words.append(f"layer {settings['layer']}" + (" (its tokens)" if settings.get("layer_output") == "tokens"
                                                      else ""))
    if "nsamples" in settings:
        words.append(f"{settings['nsamples']} draws")
    if "background_size" in settings:
        words.append(f"{settings['background_size']} background samples")
    if "seed" in settings:
        words.append(f"seed {settings['seed']}")
    return ", ".join(words)


def _describe_lime(settings: dict) -> str:
    kind, patch, features = settings.get("interpretable"), settings.get("patch"), settings.get("features")
    if kind == "superpixels":
        unit = f"{features} superpixels of {'×'.join(map(str, patch))} pixels"
    elif kind == "windows":
        unit = f"{features} windows of {patch[0]} positions"
    elif kind == "tokens":
        unit = "one feature per token (removed: the pad id)"
    else:
        unit = f"{features} features, each its own"
    return (f"{settings['n_samples']} perturbed copies, {unit}, kernel width {settings['kernel_width']:g} × "
            f"√features, baseline {settings['baseline']}, seed {settings['seed']}")


def _explain_complete(model, x: np.ndarray, target, method: str, *, batch_size: int, baseline, n_steps: int,
                      internal_batch_size, nsamples: int, background, seed: int) -> ExplainResult:
    """An additive method's maps with their completeness check (`completeness`): imported here, since completeness
    builds on this module."""
    from .completeness import ig_completeness, shap_completeness

    unset = np.full(len(x), -1, dtype=np.int64)
    if method == "integrated_gradients":
        done = ig_completeness(model, x, target, baseline=baseline, background=background, n_steps=n_steps,
                               batch_size=batch_size, internal_batch_size=internal_batch_size)
        return ExplainResult(attributions=done.attributions, settings=done.settings, completeness_gap=done.gap,
                             difference=done.difference, n_steps=done.n_steps, nsamples=unset)
    done = shap_completeness(model, x, target, background=background, nsamples=nsamples, batch_size=batch_size,
                             seed=seed)
    return ExplainResult(attributions=done.attributions, settings=done.settings, completeness_gap=done.gap,
                         difference=done.difference, n_steps=unset, nsamples=done.nsamples)


def model_fingerprint(model) -> str:
    """The loaded model's file hash, or a hash of a plain module's state (for caching results per model)."""
    return getattr(model, "sha256", None) or state_dict_sha256(unwrap(model))
