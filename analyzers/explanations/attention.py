"""Attention weights and attention rollout: where a transformer's tokens (words, image patches) look.

Pure computation (no Streamlit); arrays in, a frozen dataclass and arrays out.

`attention_weights(model, inputs, *, batch_size=64, explicit_softmax=True) -> AttentionWeights`
    `model`: a `LoadedModel`, a `SandboxedModel` (then it runs in the model's worker) or a plain `nn.Module`.
    `inputs`: the batch every analysis here feeds the model, (N, *sample_shape) float32 (a numpy array or a tensor):
    images (N, C, H, W), sequences, or for a token model the packed rows of its ids and attention mask
    (`analyzers.loading.inputs.InputLayout`, as `explain` takes them). One sample of the model's sample shape is
    taken as a batch of one; the result always has N rows.
    Returns `AttentionWeights`:
      - `layers`: one name per attention *call site*, in the order the forward pass makes the calls. A call site is
        the innermost module running when the attention is computed (a BERT layer's `...attention.self`, a ViT
        layer's `...attention.attention`, an `nn.MultiheadAttention`; `(model)` for a call in the root module's own
        forward). A module that makes several calls in one pass is reported `name@1`, `name@2`, ... (as the
        gradient traces name reused modules);
      - `weights`: per layer a float32 array (N, heads, queries, keys) whose rows sum to 1 (0 for a query whose every
        key is masked);
      - `sources`: per layer how it was found: "sdpa" (a fused scaled_dot_product_attention call),
        "multi_head_attention" (`nn.MultiheadAttention`'s functional form) or "softmax" (an explicit softmax).
    A model without attention raises `NoAttention` (an `AnalyzerError`) whose message starts with
    `NO_ATTENTION` ("no attention in this model"): the reason a caller shows when it skips the view.

Where the weights come from. A `torch.overrides.TorchFunctionMode` is pushed for the forward passes only (popped on
exit, even on an error; it is thread-local, so other threads' models are not seen) and watches:
  - `F.scaled_dot_product_attention` in eager modules (transformers models with `attn_implementation="sdpa"`, the
    default; `nn.TransformerEncoderLayer`, whose MultiheadAttention calls it with need_weights=False), and the
    `aten.scaled_dot_product_attention.default` node of a `torch.export` program (called as an OpOverload inside
    the unflattened program's modules; also the backend ops `_scaled_dot_product_flash_attention_for_cpu`,
    `_scaled_dot_product_attention_math`, `_..._efficient_attention`, ...). The fused call never materialises its
    weights: q and k are captured at the call and softmax(q kᵀ · scale + mask) is computed here, with `scale`
    defaulting to 1/√d (d: the last dimension of q), a boolean mask meaning -inf where False, a float mask added,
    `is_causal` a lower-triangular (top-left aligned) mask, and grouped-query attention (fewer key heads than query
    heads, `enable_gqa`) handled as torch does: each key head repeated for its group of query heads. `dropout_p` is
    ignored: weights are those of the model in eval mode, before dropout;
  - `F.multi_head_attention_forward` (every `nn.MultiheadAttention` in eager mode: with a mode active torch never
    takes its fused fast path): called once more with `need_weights=True, average_attn_weights=False` for the
    weights per head; the model gets the result of its own call;
  - with `explicit_softmax` (default on), a softmax over the last axis of a 4-D tensor (batch, heads, queries,
    keys): the eager attention of transformers (`attn_implementation="eager"`) and of most hand-written models, and
    the `aten.softmax`/`aten._softmax` node of such a model's export; and a 3-D softmax (batch·heads, queries,
    keys) inside a module that is (or, in an export, was) an `nn.MultiheadAttention` (its export computes the
    weights explicitly). A 4-D softmax over the last axis that is not attention (a spatial softmax) would be
    reported too: pass `explicit_softmax=False` to see fused attention only.
The ops inside a watched call are not seen again (torch pops the mode while it runs), so no call is counted twice.
A layer whose attention runs over a batch other than the samples' (windowed attention, as in Swin, folds windows
into the batch) is refused, as is a pass whose attention calls change from batch to batch, and a request whose
weights would pass `MAX_WEIGHT_BYTES` (2 GiB: N × Σ heads·queries·keys × 4 bytes; the message says how many samples
fit). `sdpa_weights(query, key, attn_mask, is_causal, scale, enable_gqa)` is the computation on its own.

The model is analysed in eval mode inside `analysis_mode` (locked; hooks, modes, `.grad`, `requires_grad` handed
back as they were) under `torch.no_grad()`; module pre/post hooks that track the call site are removed on exit.

`attention_rollout(weights, *, residual=True, head_fusion="mean", layers=None) -> (N, T, T) float32`
    Abnar & Zuidema (2020): per sample each layer's heads are averaged (or their max / min), the identity added for
    the residual connection and the rows renormalised, Â = 0.5·W + 0.5·I, and the layers multiplied from the first
    to the last, R = Â_L · … · Â_2 · Â_1: row i of R is how the last layer's token i draws on the input tokens
    (rows sum to 1). `weights` is an `AttentionWeights` or a sequence of arrays (N, heads, T, T) or (N, T, T);
    `layers` picks some of an `AttentionWeights`' layers by name. Every layer must be self-attention over the same T
    tokens.

`token_relevance(rollout, *, query="cls", mask=None) -> (N, T)`: one relevance per token, the row of the query
    token. The classification-token choice: `query="cls"` (the default) takes row 0, where BERT ([CLS]), RoBERTa
    (<s>), DistilBERT and ViT put the token their classifier reads; `query="mean"` averages the rows of every query
    (of the tokens where `mask` (N, T) is nonzero, such as a text model's attention mask), for a model that pools
    over tokens and has no classification token; an int takes that row. Masked tokens get relevance 0.
`image_relevance(rollout, image_size, *, query="auto") -> (maps (N, H, W), grid (N, side, side))`: for a vision
    transformer, the relevance of its patches (after 1 or 2 leading class / distillation tokens, found from the
    token count as Grad-CAM on tokens finds them) on their square grid, upsampled bilinearly onto the image as
    Grad-CAM upsamples its token maps. `query="auto"`: the class token's row when there is a leading token, the mean
    over queries when the tokens are a bare grid (a ViT pooled by averaging); "cls", "mean" or an int as above.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import numpy as np

from ..errors import AnalyzerError, first_line
from ..loading.sandbox import runs_in_worker

NO_ATTENTION = "no attention in this model"
ROOT_NAME = "(model)"
MAX_WEIGHT_BYTES = 2 << 30  # the weights of all samples together; more is refused with the number that fits
SOURCES = ("sdpa", "multi_head_attention", "softmax")
HEAD_FUSIONS = ("mean", "max", "min")


class NoAttention(AnalyzerError):
    """The model makes no attention call: there are no attention weights to show (a skip, not a failure)."""


@dataclass(frozen=True, eq=False)
class AttentionWeights:
    """Attention weights per call site ("layer"), in call order; see the module's docstring."""

    layers: tuple  # names, in the order the forward pass calls them
    weights: tuple  # per layer float32 (N, heads, queries, keys)
    sources: tuple  # per layer "sdpa", "multi_head_attention" or "softmax"

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_samples(self) -> int:
        return int(self.weights[0].shape[0]) if self.weights else 0

    def layer(self, name: str) -> np.ndarray:
        """The weights (N, heads, queries, keys) of the layer called `name`."""
        if name not in self.layers:
            raise AnalyzerError(f"no attention layer {name!r}: choose one of {', '.join(self.layers)}")
        return self.weights[self.layers.index(name)]


# --- what the forward pass is watched for ------------------------------------------------------------------------------

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_OPS = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_attention_math", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_fused_attention_overrideable")
_SOFTMAX_OPS = (("softmax", "int"), ("_softmax", "default"), ("_safe_softmax", "default"))
_WATCHED: dict = {}  # function or OpOverload -> (kind, argument names)


def _watched() -> dict:
    """Every function the capture looks at, with the names of its arguments (built once)."""
    if _WATCHED:
        return _WATCHED
    import torch
    import torch.nn.functional as F

    table = {F.scaled_dot_product_attention: ("sdpa", _SDPA_ARGS),
             F.multi_head_attention_forward: ("mha", tuple(inspect.signature(F.multi_head_attention_forward).parameters)),
             F.softmax: ("softmax", ("input", "dim", "_stacklevel", "dtype")),
             torch.softmax: ("softmax", ("input", "dim", "dtype")),
             torch.Tensor.softmax: ("softmax", ("input", "dim", "dtype"))}
    for name in _SDPA_OPS:
        op = getattr(getattr(torch.ops.aten, name, None), "default", None)
        if op is not None:
            table[op] = ("sdpa", tuple(a.name for a in op._schema.arguments))
    for name, overload in _SOFTMAX_OPS:
        op = getattr(getattr(torch.ops.aten, name, None), overload, None)
        if op is not None:
            table[op] = ("softmax", tuple(a.name for a in op._schema.arguments))
    _WATCHED.update(table)
    return _WATCHED


def _bind(names: tuple, args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def sdpa_weights(query, key, attn_mask=None, is_causal: bool = False, scale=None, enable_gqa: bool = False):
    """The weights a fused scaled_dot_product_attention(query, key, value, attn_mask, is_causal, scale) applies to
    `value`: softmax(q kᵀ · scale + mask) over the keys, in float32, shaped (N, heads, queries, keys). A query whose
    every key is masked gets zeros. Grouped-query attention (fewer key heads than query heads) repeats each key
    head for its group of query heads, as torch's `enable_gqa` does."""
    import torch

    q = query.detach().float()
    k = key.detach().float()
    if q.ndim < 3 or k.ndim < 3:
        raise AnalyzerError(f"attention over unbatched queries {tuple(q.shape)} has no weights per sample")
    if q.ndim == k.ndim and k.shape[-3] != q.shape[-3]:
        hq, hk = q.shape[-3], k.shape[-3]
        if hq % hk:
            raise AnalyzerError(f"attention with {hq} query heads and {hk} key heads: grouped-query attention needs "
                                f"the query heads to be a multiple of the key heads, as torch's enable_gqa does")
        k = k.repeat_interleave(hq // hk, dim=-3)
    length, keys = q.shape[-2], k.shape[-2]
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = torch.matmul(q, k.transpose(-2, -1)) * factor
    minus_inf = torch.tensor(float("-inf"), device=logits.device)
    if attn_mask is not None:
        mask = attn_mask.detach()
        if mask.dtype == torch.bool:
            logits = torch.where(mask, logits, minus_inf)
        else:
            logits = logits + mask.float()
    if is_causal:
        causal = torch.ones(length, keys, dtype=torch.bool, device=logits.device).tril()
        logits = torch.where(causal, logits, minus_inf)
    weights = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return weights.reshape(weights.shape[0], -1, length, keys) if weights.ndim != 3 else weights[:, None]


def _module_classes(module) -> dict:
    """Module path -> class name, for eager modules and, from the graph's nn_module_stack, for the modules of an
    unflattened export (whose submodules are InterpreterModules that no longer say what they were)."""
    classes = {}
    for name, sub in module.named_modules():
        classes[name] = type(sub).__name__
        graph = getattr(sub, "graph", None)
        nodes = getattr(graph, "nodes", None)
        if nodes is None or type(sub).__name__ not in ("InterpreterModule", "UnflattenedModule", "GraphModule"):
            continue
        for node in nodes:
            stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
            for path, cls in (stack or {}).values():
                if path and isinstance(path, str):
                    qual = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
                    classes[path] = str(qual).rsplit(".", 1)[-1]
    return classes


def _make_capture(stack: list, classes: dict, *, explicit_softmax: bool):
    """A TorchFunctionMode that records (site, source, weights) for every attention call it sees."""
    import torch
    from torch.overrides import TorchFunctionMode

    watched = _watched()

    class Capture(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.records: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            try:
                kind, names = watched.get(func, (None, None))
            except TypeError:  # an unhashable callable: nothing watched
                kind = None
            if kind is None or (kind == "softmax" and not explicit_softmax):
                return func(*args, **kwargs)
            site = stack[-1] if stack else ""
            if kind == "softmax" and classes.get(site) == "Softmax":  # an nn.Softmax: the attention is its caller's
                site = stack[-2] if len(stack) > 1 else ""
            bound = _bind(names, args, kwargs)
            if kind == "mha":
                result = func(*args, **kwargs)
                again = {**bound, "need_weights": True, "average_attn_weights": False}
                with torch.no_grad():
                    _, weights = func(**again)
                if weights is not None:
                    weights = torch.nan_to_num(weights.detach().float(), nan=0.0)
                    self.records.append((site, "multi_head_attention",
                                         weights if weights.ndim == 4 else weights[None]))
                return result
            result = func(*args, **kwargs)
            if kind == "sdpa":
                self.records.append((site, "sdpa", sdpa_weights(
                    bound["query"], bound["key"], bound.get("attn_mask", bound.get("attn_bias")),
                    bool(bound.get("is_causal", False)), bound.get("scale"), bool(bound.get("enable_gqa", False)))))
                return result
            out = result  # an explicit softmax: its output is the weights
            dim = bound.get("dim")
            if isinstance(out, torch.Tensor) and out.ndim in (3, 4) and isinstance(dim, int) and \
                    dim % out.ndim == out.ndim - 1:
                if out.ndim == 4:
                    self.records.append((site, "softmax", torch.nan_to_num(out.detach().float(), nan=0.0)))
                elif classes.get(site) == "MultiheadAttention":  # (batch * heads, queries, keys): split later
                    self.records.append((site, "softmax", torch.nan_to_num(out.detach().float(), nan=0.0)))
            return result

    return Capture()


@contextlib.contextmanager
def _call_sites(module):
    """Track which module is running (a stack of names) with pre/post hooks on every submodule, removed on exit."""
    stack: list = []
    handles = []

    def enter(name):
        def hook(_m, _args):
            stack.append(name)
        return hook

    def leave(_m, _args, _out):
        if stack:
            stack.pop()

    try:
        for name, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(enter(name)))
            handles.append(sub.register_forward_hook(leave, always_call=True))
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def _batch(model, inputs) -> np.ndarray:
    """Inputs as a float32 batch (a single sample of the model's sample shape becomes a batch of one)."""
    if hasattr(inputs, "detach"):
        inputs = inputs.detach().cpu().numpy()
    x = np.asarray(inputs, dtype=np.float32)
    sample_shape = getattr(model, "input_shape", None)
    if sample_shape and tuple(x.shape) == tuple(sample_shape):
        x = x[None]
    if sample_shape and tuple(x.shape[1:]) != tuple(sample_shape):
        raise AnalyzerError(f"inputs of shape {x.shape} do not fit the model's sample shape {tuple(sample_shape)}: "
                            f"pass a batch (N, {', '.join(map(str, sample_shape))})")
    if x.ndim < 2 or len(x) == 0:
        raise AnalyzerError(f"inputs of shape {x.shape} are not a batch: pass at least one sample (N, ...)")
    if not np.isfinite(x).all():
        raise AnalyzerError("the inputs hold NaN or inf: clean them before reading attention")
    return x


def _per_sample(weights, n: int):
    """(N, heads, queries, keys) from a 3-D softmax over (N * heads, queries, keys) in nn.MultiheadAttention's
    batch-major layout; 4-D weights as they are."""
    if weights.ndim == 3 and weights.shape[0] % n == 0:
        return weights.reshape(n, -1, *weights.shape[1:])
    return weights


def _site_names(records: list) -> list:
    """Each record's layer name: the module's, with @1, @2, ... for a module that made several calls."""
    counts: dict = {}
    for site, _, _ in records:
        counts[site] = counts.get(site, 0) + 1
    seen: dict = {}
    names = []
    for site, _, _ in records:
        seen[site] = seen.get(site, 0) + 1
        base = site or ROOT_NAME
        names.append(base if counts[site] == 1 else f"{base}@{seen[site]}")
    return names


@runs_in_worker
def attention_arrays(model, inputs, *, batch_size: int = 64, explicit_softmax: bool = True) -> dict:
    """`attention_weights`' fields as a plain dict ({"layers", "sources", "weights"}): what a sandboxed worker
    sends back. Call `attention_weights` instead."""
    import torch

    from ..engines.inference import module_device
    from ..guard import analysis_mode, unwrap

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise AnalyzerError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
    if not isinstance(explicit_softmax, (bool, np.bool_)):
        raise AnalyzerError(f"explicit_softmax must be True or False, got {explicit_softmax!r}")
    module = unwrap(model)
    x = _batch(model, inputs)
    classes = _module_classes(module)
    layers = sources = None
    out: list = []
    with analysis_mode(module), _call_sites(module) as stack, torch.no_grad():
        device = module_device(module)
        for start in range(0, len(x), int(batch_size)):
            xb = torch.as_tensor(x[start:start + int(batch_size)], device=device)
            stack.clear()
            capture = _make_capture(stack, classes, explicit_softmax=bool(explicit_softmax))
            try:
                with capture:
                    module(xb)
            except AnalyzerError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise AnalyzerError(f"the model failed while its attention was read ({first_line(exc)}): check "
                                    f"that it runs on these inputs") from exc
            records = [(site, source, _per_sample(w, len(xb))) for site, source, w in capture.records]
            names = _site_names(records)
            if start == 0:
                if not records:
                    raise NoAttention(
                        f"{NO_ATTENTION}: none of its layers calls scaled_dot_product_attention or "
                        f"nn.MultiheadAttention, or takes a softmax over (batch, heads, queries, keys) scores")
                layers, sources = names, [source for _, source, _ in records]
                shapes = [tuple(w.shape[1:]) for _, _, w in records]
                total = len(x) * sum(4 * math.prod(s) for s in shapes)
                if total > MAX_WEIGHT_BYTES:
                    fits = max(1, MAX_WEIGHT_BYTES * len(x) // total)
                    raise AnalyzerError(f"the attention weights of {len(x)} samples take {total / 2 ** 30:.1f} GiB: "
                                        f"pass at most {fits} samples at a time")
                out = [np.zeros((len(x), *s), dtype=np.float32) for s in shapes]
            elif names != layers or [source for _, source, _ in records] != sources:
                raise AnalyzerError("the model's attention calls change from one batch to the next (data-dependent "
                                    "control flow): its attention cannot be read layer by layer")
            for name, (_, _, w), target in zip(names, records, out):
                if w.shape[0] != len(xb):
                    raise AnalyzerError(f"the attention at {name} runs over {w.shape[0]} rows for a batch of "
                                        f"{len(xb)} samples (windowed or reshaped attention): it has no weights per "
                                        f"sample")
                if tuple(w.shape[1:]) != target.shape[1:]:
                    raise AnalyzerError(f"the attention at {name} changes shape between batches "
                                        f"({target.shape[1:]} then {tuple(w.shape[1:])})")
                target[start:start + len(xb)] = w.cpu().numpy()
    return {"layers": list(layers), "sources": list(sources), "weights": out}


def attention_weights(model, inputs, *, batch_size: int = 64, explicit_softmax: bool = True) -> AttentionWeights:
    """The attention weights of every call site of `model` on `inputs`, per sample; see the module's docstring.
    Raises `NoAttention` (an AnalyzerError) for a model without attention."""
    if hasattr(inputs, "detach"):  # a tensor: arrays are what crosses to a sandboxed worker
        inputs = inputs.detach().cpu().numpy()
    try:
        raw = attention_arrays(model, inputs, batch_size=batch_size, explicit_softmax=explicit_softmax)
    except NoAttention:
        raise
    except AnalyzerError as exc:  # from a worker the error comes back as its one line
        if str(exc).startswith(NO_ATTENTION):
            raise NoAttention(str(exc)) from None
        raise
    weights = tuple(np.asarray(w, dtype=np.float32) for w in raw["weights"])
    return AttentionWeights(layers=tuple(str(n) for n in raw["layers"]), weights=weights,
                            sources=tuple(str(s) for s in raw["sources"]))


# --- attention rollout -------------------------------------------------------------------------------------------------

def _layer_arrays(weights, layers) -> list:
    if isinstance(weights, AttentionWeights):
        if layers is not None:
            return [weights.layer(name) for name in layers]
        return list(weights.weights)
    if layers is not None:
        raise AnalyzerError("layers= picks layers of an AttentionWeights by name: pass the AttentionWeights")
    if isinstance(weights, np.ndarray) or hasattr(weights, "detach"):
        raise AnalyzerError("pass the weights as a sequence of arrays, one (N, heads, T, T) per layer")
    return [np.asarray(w.detach().cpu() if hasattr(w, "detach") else w) for w in weights]


def attention_rollout(weights, *, residual: bool = True, head_fusion: str = "mean", layers=None) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020), (N, T, T) float32: R = Â_L · … · Â_1 with Â the layer's weights
    averaged over heads (`head_fusion` "mean", or "max" / "min"), plus the identity for the residual connection
    (Â = 0.5·W + 0.5·I, `residual=True`) and rows renormalised to sum to 1. Row i of R spreads the last layer's
    token i over the input tokens. `weights`: an `AttentionWeights` (`layers` picks some by name) or a sequence of
    arrays (N, heads, T, T) or (N, T, T), from the first layer to the last."""
    if head_fusion not in HEAD_FUSIONS:
        raise AnalyzerError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not isinstance(residual, (bool, np.bool_)):
        raise AnalyzerError(f"residual must be True or False, got {residual!r}")
    mats = _layer_arrays(weights, layers)
    if not mats:
        raise AnalyzerError("no attention layers to roll out")
    fused = []
    for i, w in enumerate(mats):
        w = np.asarray(w, dtype=np.float64)
        if w.ndim == 3:
            w = w[:, None]
        if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
            raise AnalyzerError(f"attention layer {i} has weights of shape {w.shape}: rollout needs self-attention "
                                f"(N, heads, T, T) with as many queries as keys")
        if fused and (w.shape[0] != fused[0].shape[0] or w.shape[-1] != fused[0].shape[-1]):
            raise AnalyzerError(f"attention layer {i} has weights of shape {w.shape} after layers over "
                                f"{fused[0].shape[0]} samples and {fused[0].shape[-1]} tokens: rollout needs every "
                                f"layer over the same samples and tokens")
        if not np.isfinite(w).all():
            raise AnalyzerError(f"attention layer {i} holds NaN or inf weights")
        a = {"mean": w.mean, "max": w.max, "min": w.min}[head_fusion](axis=1)
        if residual:
            a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
        sums = a.sum(axis=-1, keepdims=True)
        fused.append(np.divide(a, sums, out=np.zeros_like(a), where=sums > 0))
    result = fused[0]
    for a in fused[1:]:
        result = a @ result
    return result.astype(np.float32)


def _query_row(rollout: np.ndarray, query, mask) -> np.ndarray:
    tokens = rollout.shape[-1]
    if isinstance(query, str):
        if query == "cls":
            return rollout[:, 0]
        if query == "mean":
            if mask is None:
                return rollout.mean(axis=1)
            m = mask.astype(np.float64)
            counts = m.sum(axis=1, keepdims=True)
            return np.divide((rollout * m[:, :, None]).sum(axis=1), counts, out=np.zeros(rollout.shape[::2]),
                             where=counts > 0)
        raise AnalyzerError(f"query must be 'cls', 'mean' or a token index, got {query!r}")
    if isinstance(query, (bool, np.bool_)) or not isinstance(query, (int, np.integer)) or \
            not -tokens <= query < tokens:
        raise AnalyzerError(f"query must be 'cls', 'mean' or a token index below {tokens}, got {query!r}")
    return rollout[:, int(query)]


def _checked_rollout(rollout) -> np.ndarray:
    r = np.asarray(rollout.detach().cpu() if hasattr(rollout, "detach") else rollout, dtype=np.float64)
    if r.ndim != 3 or r.shape[1] != r.shape[2]:
        raise AnalyzerError(f"a rollout is (N, tokens, tokens); got shape {r.shape}")
    return r


def token_relevance(rollout, *, query="cls", mask=None) -> np.ndarray:
    """One relevance per token (N, T): the rollout's row of the classification token (`query="cls"`, row 0: BERT's
    [CLS], ViT's class token), the mean over queries (`"mean"`, over the tokens where `mask` (N, T) is nonzero when
    given: for a model without a classification token), or row `query`. Tokens where `mask` is 0 get 0."""
    r = _checked_rollout(rollout)
    if mask is not None:
        mask = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask) != 0
        if mask.shape != r.shape[:2]:
            raise AnalyzerError(f"mask of shape {mask.shape} does not fit a rollout over {r.shape[:2]} tokens")
    row = _query_row(r, query, mask)
    if mask is not None:
        row = row * mask
    return row.astype(np.float32)


def image_relevance(rollout, image_size, *, query="auto") -> tuple[np.ndarray, np.ndarray]:
    """A vision transformer's rollout on its image: (maps (N, H, W) upsampled bilinearly onto `image_size` (H, W),
    grid (N, side, side) at the patches' resolution). The patches follow 0, 1 or 2 leading tokens (class,
    distillation), found from the token count; `query="auto"` reads the class token's row when there is one and the
    mean over queries for a bare grid; "cls", "mean" or an int as in `token_relevance`."""
    import torch

    from .attributions import _token_grid  # Grad-CAM on tokens finds the patch grid the same way

    r = _checked_rollout(rollout)
    grid = _token_grid(r.shape[-1])
    if grid is None:
        raise AnalyzerError(f"{r.shape[-1]} tokens are not a square grid of patches after 0, 1 or 2 leading tokens: "
                            f"use token_relevance")
    lead, side = grid
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise AnalyzerError(f"image_size must be (height, width), got {image_size!r}")
    if query == "auto":
        query = "cls" if lead else "mean"
    patches = _query_row(r, query, None)[:, lead:].reshape(len(r), 1, side, side)
    raw = torch.as_tensor(patches, dtype=torch.float32)
    up = torch.nn.functional.interpolate(raw, size=size, mode="bilinear", align_corners=False)
    return up[:, 0].numpy(), raw[:, 0].numpy()
