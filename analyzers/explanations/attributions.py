"""Attributions: which parts of an input a model's class score depends on, through Captum and shap.

`explain(model, inputs, target, method, **options)` returns an array with the shape of `inputs` (a batch in, a batch
out). The model is analysed in eval mode inside `analysis_mode` (locked, handed back exactly as it came) and only
`torch.autograd.grad`-based code touches it, so parameter `.grad` is never written and two threads sharing one model
get the same maps. `METHODS` describes every method and its options for the dashboard.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import AnalyzerError, first_line
from ..guard import analysis_mode, unwrap
from ..engines.inference import ClassLogits, module_device, resolve_layer
from ..loading.models import layer_kinds, state_dict_sha256
from ..loading.sandbox import runs_in_worker

BASELINES = ("zeros", "blur", "mean")
MODALITIES = {2: "tabular", 3: "sequence", 4: "image"}  # by the batch's number of dimensions


@dataclass(frozen=True)
class MethodInfo:
    """What the dashboard needs to offer a method: a label, what it needs, and its options with defaults."""

    name: str
    label: str
    description: str
    options: dict
    modalities: tuple = ("image", "sequence", "tabular")
    needs_background: bool = False
    needs_conv_layer: bool = False
    signed: bool = True  # attributions can be negative (evidence against the class)


METHODS = {
    "saliency": MethodInfo("saliency", "Saliency", "absolute gradient of the class score with respect to the input",
                           {}, signed=False),
    "input_x_gradient": MethodInfo("input_x_gradient", "Input × gradient", "input times the gradient of the score",
                                   {}),
    "integrated_gradients": MethodInfo(
        "integrated_gradients", "Integrated Gradients",
        "gradients averaged along a path from a baseline to the input; they sum to f(input) - f(baseline)",
        {"baseline": "zeros", "n_steps": 50, "internal_batch_size": None}),
    "smoothgrad": MethodInfo("smoothgrad", "SmoothGrad", "saliency averaged over noisy copies of the input",
                             {"nt_samples": 16, "stdevs": 0.15}, signed=False),
    "occlusion": MethodInfo("occlusion", "Occlusion",
                            "drop in the class score when a window of the input is replaced by the baseline",
                            {"window": None, "stride": None, "baseline": "zeros"}),
    "gradcam": MethodInfo("gradcam", "Grad-CAM", "class-weighted activations of a convolutional layer, upsampled",
                          {"layer": None}, modalities=("image", "sequence"), needs_conv_layer=True, signed=False),
    "shap": MethodInfo("shap", "SHAP (expected gradients)",
                       "shap's GradientExplainer: gradients between the input and samples of the dataset",
                       {"nsamples": 200}, needs_background=True),
}


def list_methods(modality: str | None = None) -> list[MethodInfo]:
    """The methods that apply to `modality` ("image", "sequence", "tabular"; None for all)."""
    return [m for m in METHODS.values() if modality is None or modality in m.modalities]


def modality_of(array) -> str:
    """"image" (N,C,H,W), "sequence" (N,C,L) or "tabular" (N,F) from a batch's number of dimensions."""
    kind = MODALITIES.get(np.ndim(array))
    if kind is None:
        raise AnalyzerError(f"inputs of shape {tuple(np.shape(array))} are not a batch of images (N,C,H,W), sequences "
                            f"(N,C,L) or tabular rows (N,F)")
    return kind


def reduce_for_display(attr, modality: str | None = None) -> np.ndarray:
    """What a person looks at: images (N,H,W) channel-summed heat maps, sequences (N,L) per-position scores,
    tabular (N,F) per-feature bars."""
    attr = np.asarray(attr, dtype=np.float32)
    modality = modality or modality_of(attr)
    if modality != modality_of(attr):
        raise AnalyzerError(f"attributions of shape {attr.shape} are not {modality} attributions")
    return attr if modality == "tabular" else attr.sum(axis=1)


# --- the model as a function of its input ------------------------------------------------------------------------------

def _scores_module(model) -> nn.Module:
    """Class scores whose softmax is the class probabilities (logits as they are; probabilities made log-probs)."""
    module = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    return module if output_kind == "logits" else ClassLogits(module, output_kind)


def _callable_scores(scores: nn.Module):
    # A model whose first operation is in place (x.relu_()) would fail on an input leaf that requires grad; a clone
    # keeps the gradient with respect to the input itself.
    return lambda x: scores(x.clone())


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
    if not np.isfinite(x).all():
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

def baseline_for(x: np.ndarray, baseline="zeros", background=None) -> np.ndarray:
    """The reference input per sample: zeros, a blurred copy, the dataset mean (from `background`), or an array."""
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
    position, not registration order) among those that run once and output more than one position."""
    sites, tokenised = conv_sites(model, x)
    if not sites:
        raise AnalyzerError("Grad-CAM needs a convolutional layer and this model has none: use saliency, "
                            "integrated_gradients or shap")
    if tokenised:
        raise AnalyzerError("this model's convolutions feed a transformer's tokens (a patch embedding), so Grad-CAM "
                            "has no spatial layer to default to: use integrated_gradients or saliency, or name a "
                            "layer with --layer")
    eligible = [s for s in sites if s.calls == 1 and int(np.prod(s.shape[2:])) > 1]
    if not eligible:
        raise AnalyzerError("every convolution of this model runs several times per pass or outputs a single "
                            "position, so a Grad-CAM map would be constant: use integrated_gradients or saliency")
    return max(eligible, key=lambda s: (s.depth, s.order)).name


def _check_gradcam_layer(module: nn.Module, scores: nn.Module, layer_name: str, x: torch.Tensor) -> nn.Module:
    """Refuse layers whose Grad-CAM would be silently wrong: run several times per pass, or not spatial."""
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
    if not isinstance(out, torch.Tensor) or out.ndim != x.ndim:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AnalyzerError(f"layer {layer_name!r} outputs {shape}, not a spatial map like the input "
                            f"{tuple(x.shape)}: choose a convolutional layer for Grad-CAM")
    return layer


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


def _attribute(method: str, scores: nn.Module, module: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
               opts: dict, base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch through Captum/shap: (attributions shaped like x, Grad-CAM's raw map or None)."""
    import captum.attr as ca

    fn = _callable_scores(scores)
    if method == "saliency":
        return ca.Saliency(fn).attribute(x, target=target, abs=True), None
    if method == "input_x_gradient":
        return ca.InputXGradient(fn).attribute(x, target=target), None
    if method == "integrated_gradients":
        attr = ca.IntegratedGradients(fn).attribute(x, baselines=base, target=target, n_steps=opts["n_steps"],
                                                    internal_batch_size=opts["internal_batch_size"])
        return attr, None
    if method == "smoothgrad":
        tunnel = ca.NoiseTunnel(ca.Saliency(fn))
        attr = tunnel.attribute(x, nt_type="smoothgrad", nt_samples=opts["nt_samples"], stdevs=opts["noise_std"],
                                nt_samples_batch_size=opts["nt_batch"], target=target, abs=True)
        return attr, None
    if method == "occlusion":
        attr = ca.Occlusion(fn).attribute(x, sliding_window_shapes=opts["window"], strides=opts["stride"],
                                          baselines=base, target=target,
                                          perturbations_per_eval=opts["perturbations_per_eval"])
        return attr, None
    if method == "gradcam":
        layer = resolve_layer(module, opts["layer"])
        raw = ca.LayerGradCam(fn, layer).attribute(x, target=target, relu_attributions=True)
        up = ca.LayerAttribution.interpolate(raw, tuple(x.shape[2:]), interpolate_mode=_interpolate_mode(x.ndim))
        return up.expand(-1, x.shape[1], *([-1] * (x.ndim - 2))).contiguous(), raw
    raise AnalyzerError(f"unknown method {method!r}")  # guarded by explain(); kept for direct callers


def _shap_attribute(scores: nn.Module, x: np.ndarray, targets: np.ndarray, background: np.ndarray, *,
                    nsamples: int, batch_size: int, seed: int, device) -> np.ndarray:
    import shap

    out = np.zeros_like(x)
    bg = torch.as_tensor(background, device=device)
    for cls in np.unique(targets):
        rows = np.flatnonzero(targets == cls)
        explainer = shap.GradientExplainer(_TargetScore(scores, int(cls)), bg, batch_size=batch_size)
        values = explainer.shap_values(torch.as_tensor(x[rows], device=device), nsamples=nsamples, rseed=seed)
        values = np.asarray(values[0] if isinstance(values, list) else values, dtype=np.float32)
        out[rows] = values.reshape(len(rows), *x.shape[1:])  # shap adds a trailing output axis of size 1
    return out


_RNG_LOCK = threading.Lock()  # the global generators are shared by every model: one seeded user at a time
RANDOM_METHODS = ("smoothgrad", "shap")


@contextlib.contextmanager
def _private_rng(seed: int, needed: bool = True):
    """Seeded torch and numpy randomness (SmoothGrad noise, shap's draws) without disturbing the caller's streams.

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


@runs_in_worker
def explain(model, inputs, target=None, method: str = "saliency", *, batch_size: int = 64, layer: str | None = None,
            baseline="zeros", n_steps: int = 50, internal_batch_size: int | None = None, nt_samples: int = 16,
            stdevs: float = 0.15, window=None, stride=None, nsamples: int = 200, background=None,
            return_raw: bool = False, seed: int = 0):
    """Attributions of `target` (a class index, one per sample, or None for the predicted class) for `inputs`.

    `model` is a LoadedModel or a plain module returning logits. Returns a float32 array shaped like `inputs`; with
    `return_raw=True` (Grad-CAM only) a pair (upsampled map, raw layer-resolution map (N, 1, ...)).
    Options: `layer` (Grad-CAM, default the last convolution); `baseline` "zeros", "blur", "mean" (of `background`)
    or an array (integrated_gradients, occlusion); `n_steps`, `internal_batch_size` (integrated_gradients);
    `nt_samples` and `stdevs` (smoothgrad; noise std as a fraction of the value range of `background`, else of the
    inputs); `window`, `stride` (occlusion, in input units per spatial dimension); `nsamples` and `background`
    (shap: samples of the dataset). `seed` fixes the random draws of smoothgrad and shap.
    """
    if method not in METHODS:
        raise AnalyzerError(f"unknown attribution method {method!r}: choose one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise AnalyzerError(f"batch_size must be at least 1, got {batch_size}")
    if return_raw and method != "gradcam":
        raise AnalyzerError("return_raw=True applies to gradcam only (its layer-resolution map)")
    module = unwrap(model)
    x, single = _as_batch(model, inputs)
    info = METHODS[method]
    modality = modality_of(x)
    if modality not in info.modalities:
        raise AnalyzerError(f"{info.label} does not apply to {modality} inputs: choose one of "
                            f"{', '.join(m.name for m in list_methods(modality))}")
    if background is not None:
        background = np.asarray(background.detach().cpu() if isinstance(background, torch.Tensor) else background,
                                dtype=np.float32)
        if background.ndim != x.ndim or background.shape[1:] != x.shape[1:] or len(background) == 0:
            raise AnalyzerError(f"background must be samples shaped like the inputs (M, {x.shape[1:]}), got "
                                f"{background.shape}")
    if info.needs_background and background is None:
        raise AnalyzerError(f"{info.label} needs background=: pass a sample of the dataset (e.g. 50-200 rows)")
    opts = {"n_steps": int(n_steps), "layer": layer}
    if method == "integrated_gradients" and n_steps < 2:
        raise AnalyzerError(f"n_steps must be at least 2, got {n_steps}")
    scores = _scores_module(model)
    with analysis_mode(module):
        device = module_device(module)
        targets = _targets(scores, x, target, batch_size, device)
        base = None
        if method in ("integrated_gradients", "occlusion"):
            base = baseline_for(x, baseline, background)
        if method == "integrated_gradients":
            opts["internal_batch_size"] = internal_batch_size or max(n_steps, batch_size * 8)
        elif method == "smoothgrad":
            ref = background if background is not None else x
            opts["noise_std"] = float(stdevs) * float(ref.max() - ref.min() or 1.0)
            opts["nt_samples"] = int(nt_samples)
            opts["nt_batch"] = max(1, min(int(nt_samples), 8 * batch_size))
        elif method == "occlusion":
            opts["window"], opts["stride"] = _occlusion_shapes(x.shape[1:], window, stride)
            opts["perturbations_per_eval"] = max(1, batch_size // min(batch_size, len(x)))
        elif method == "gradcam":
            opts["layer"] = layer or default_gradcam_layer(model, x)
            _check_gradcam_layer(module, scores, opts["layer"], torch.as_tensor(x[:1], device=device))
        out, raws = np.zeros_like(x), []
        try:
            with _private_rng(seed, needed=method in RANDOM_METHODS):
                if method == "shap":
                    out = _shap_attribute(scores, x, targets, background, nsamples=int(nsamples),
                                          batch_size=batch_size, seed=seed, device=device)
                else:
                    for start in range(0, len(x), batch_size):
                        stop = min(start + batch_size, len(x))
                        xb = torch.as_tensor(x[start:stop], device=device).requires_grad_(method != "occlusion")
                        tb = torch.as_tensor(targets[start:stop], device=device)
                        bb = None if base is None else torch.as_tensor(base[start:stop], device=device)
                        attr, raw = _attribute(method, scores, module, xb, tb, opts=opts, base=bb)
                        out[start:stop] = attr.detach().float().cpu().numpy()
                        if raw is not None:
                            raws.append(raw.detach().float().cpu().numpy())
        except AnalyzerError:
            raise
        except RuntimeError as exc:
            raise AnalyzerError(f"{info.label} failed on this model ({first_line(exc)}): try saliency or "
                                f"integrated_gradients, or check the model runs on these inputs") from exc
    if not np.isfinite(out).all():
        raise AnalyzerError(f"{info.label} produced NaN or inf attributions: check the model's outputs on these inputs")
    if single:
        out = out[0]
    if return_raw:
        raw = np.concatenate(raws)
        return out, (raw[0] if single else raw)
    return out


def model_fingerprint(model) -> str:
    """The loaded model's file hash, or a hash of a plain module's state (for caching results per model)."""
    return getattr(model, "sha256", None) or state_dict_sha256(unwrap(model))
