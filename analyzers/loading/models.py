"""Loading models from a spec without ever running code from a file.

Accepted: `sample:NAME`, a `torch.export` program (`.pt2`), or a state dict (`.safetensors`, or `.pt`/`.pth`/`.ckpt`
read by torch's weights-only unpickler) together with an architecture. Everything else is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import re
import threading
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import AnalyzerError, first_line
from ..guard import analysis_mode
from .hashing import sha256_bytes
from .layers import LayerGroups
from .sandbox import ISOLATIONS, open_sandboxed, sandboxed

EXPORT_HINT = (
    "export it with torch.export.save(torch.export.export(model.eval(), (example,), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2'), or save model.state_dict() with "
    "safetensors and pass --arch"
)
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
# Layer kinds a person can point an analysis at; names follow torch.nn classes, lower-cased.
_ATEN_KINDS = {
    "aten.conv1d": "conv1d", "aten.conv2d": "conv2d", "aten.conv3d": "conv3d", "aten.linear": "linear",
    "aten.relu": "relu", "aten.relu_": "relu_inplace", "aten.batch_norm": "batchnorm",
    "aten._native_batch_norm_legit_no_training": "batchnorm", "aten.dropout": "dropout",
}
_MODULE_KINDS = (
    (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"), (nn.Linear, "linear"),
    (nn.modules.batchnorm._BatchNorm, "batchnorm"), (nn.Dropout, "dropout"),
)
_EXPORT_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class LoadedModel(LayerGroups):
    """A model ready for analysis, in eval mode, with what the rest of the tool needs to know about it."""

    module: nn.Module
    spec: str
    sha256: str
    source: str  # "sample", "export", "state_dict" or "module"
    input_shape: tuple  # one sample, without the batch dimension
    num_classes: int
    class_names: tuple
    output_kind: str  # "logits", "probabilities", "binary_logit" (one sigmoid logit) or "binary_probability"
    layers: tuple  # names from named_modules() that accept forward hooks
    layer_kinds: dict = field(default_factory=dict, compare=False, hash=False)  # name -> "conv2d", "linear", ...
    make_copy: Callable[[], nn.Module] | None = field(default=None, compare=False, repr=False)

    def copy_module(self) -> nn.Module:
        """An independent copy of the module (a `.pt2` module cannot be deep-copied: it is reloaded)."""
        if self.make_copy is None:
            import copy

            return copy.deepcopy(self.module)
        return self.make_copy()


def state_dict_sha256(module: nn.Module) -> str:
    """A hash of a module's names and weights: what identifies a model that came from no file."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_model(spec: str, *, arch: str | None = None, input_shape: tuple | None = None,
               class_names: tuple | None = None, allow_import: bool = False, isolation: str = "auto",
               arch_kwargs: dict | None = None):
    """Load `sample:NAME`, `PATH.pt2`, or a state dict `PATH` with `arch`, in eval mode.

    `arch` is a sample architecture's name or, only with `allow_import=True` (the command line), an import path
    `package.module:callable` that builds the module, called with `arch_kwargs` (a JSON object, recorded in the run
    so that the model can be rebuilt). `input_shape` is needed only when the architecture does not say it (an
    import path).

    `isolation`: "auto" loads a model from a file in a sandboxed worker and returns a `SandboxedModel` (the built-in
    samples and an operator's import-path architecture, which are trusted code, load here); "sandbox" always uses a
    worker; "process" loads here and returns a `LoadedModel`, for files you trust (your own notebook's exports).
    """
    if isolation not in ISOLATIONS:
        raise AnalyzerError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
    if not isinstance(spec, str) or not spec:
        raise AnalyzerError("no model given: pass sample:NAME, a .pt2 export, or a state dict with --arch")
    check_arch_kwargs(arch, arch_kwargs)
    if sandboxed(spec, arch, isolation):
        return open_sandboxed(spec, spec=spec, arch=arch, input_shape=input_shape, class_names=class_names)[0]
    if spec.startswith("sample:"):
        return _load_sample(spec)
    path = Path(spec)
    if not path.is_file():
        raise AnalyzerError(f"model file {spec!r} does not exist: check the path")
    data = path.read_bytes()
    return load_model_bytes(data, name=path.name, spec=spec, arch=arch, input_shape=input_shape,
                            class_names=class_names, allow_import=allow_import, arch_kwargs=arch_kwargs)


def load_model_bytes(data: bytes, *, name: str, spec: str | None = None, arch: str | None = None,
                     input_shape: tuple | None = None, class_names: tuple | None = None,
                     allow_import: bool = False, check_archive: bool = True,
                     arch_kwargs: dict | None = None) -> LoadedModel:
    """Load a model from the bytes of a file called `name` in this process; see `load_model`.

    This runs the model here: for bytes you do not trust, store them and call `load_model`, which uses a worker.
    `check_archive=False` skips the archive policy, for the sandbox's own containment tests only."""
    spec = spec or name
    suffix = Path(name).suffix.lower()
    if not data:
        raise AnalyzerError(f"model file {name!r} is empty: upload the file again")
    digest = sha256_bytes(data)
    if suffix == ".pt2":
        if check_archive:
            from .archive_policy import sanitize_export_archive

            data = sanitize_export_archive(data, name).data  # torch only ever sees the archive we rebuilt
        module, export_shape = _load_export(data, name)
        return _describe(module, spec=spec, sha256=digest, source="export", input_shape=export_shape,
                         class_names=class_names, make_copy=lambda: _load_export(data, name)[0])
    if suffix in STATE_DICT_SUFFIXES:
        if not arch:
            raise AnalyzerError(
                f"{name!r} is a state dict, which holds weights but no architecture: pass --arch with a sample "
                f"architecture (digits, tabular, dna, shapes) or package.module:callable, or upload a .pt2 export")
        module, arch_shape, arch_classes = _build_arch(arch, allow_import=allow_import, kwargs=arch_kwargs)
        state = read_state_dict(data, name)
        load_state_dict_checked(module, state, name)
        return _describe(module, spec=spec, sha256=digest, source="state_dict", input_shape=input_shape or arch_shape,
                         class_names=class_names or arch_classes)
    raise AnalyzerError(f"{name!r} is not a supported model file (.pt2 export or .safetensors/.pt state dict): "
                        f"{EXPORT_HINT}")


def wrap_module(module: nn.Module, input_shape: tuple, *, class_names: tuple | None = None,
                spec: str = "module") -> LoadedModel:
    """Describe a plain `nn.Module` a user holds in a notebook, so every analysis accepts it. The module is the
    user's: it stays in the train or eval mode it came in (every analysis switches to eval for its own duration)."""
    return _describe(module, spec=spec, sha256=state_dict_sha256(module), source="module", input_shape=tuple(input_shape),
                     class_names=class_names, owned=False)


def _load_sample(spec: str) -> LoadedModel:
    from sample_models import SAMPLE_NAMES, get_sample

    name = spec.split(":", 1)[1]
    if name not in SAMPLE_NAMES:
        raise AnalyzerError(f"unknown sample model {name!r}: choose one of {', '.join(SAMPLE_NAMES)}")
    sample = get_sample(name)
    if not sample.weights_path.is_file():
        raise AnalyzerError(f"the weights of sample {name!r} are missing ({sample.weights_path}): "
                            f"run python -m sample_models.train {name}")
    data = sample.weights_path.read_bytes()
    module = sample.build_model()
    load_state_dict_checked(module, read_state_dict(data, sample.weights_path.name), sample.weights_path.name)
    return _describe(module, spec=spec, sha256=sha256_bytes(data), source="sample", input_shape=sample.input_shape,
                     class_names=sample.class_names)


def check_arch_kwargs(arch: str | None, kwargs) -> None:
    """Keyword arguments go to an import-path architecture only, as a JSON object with identifier keys."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise AnalyzerError(f"--arch-kwargs must be a JSON object of keyword arguments, such as "
                            f"'{{\"num_classes\": 10}}', got {str(kwargs)[:60]!r}")
    if not arch or ":" not in arch:
        raise AnalyzerError("--arch-kwargs applies to an import-path architecture (--arch package.module:callable) "
                            "only: the sample architectures take none")
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AnalyzerError(f"--arch-kwargs must hold JSON values only ({first_line(exc)})") from exc


def _build_arch(arch: str, *, allow_import: bool, kwargs: dict | None = None
                ) -> tuple[nn.Module, tuple | None, tuple | None]:
    from sample_models import SAMPLE_NAMES, get_sample

    check_arch_kwargs(arch, kwargs)

    if arch in SAMPLE_NAMES:
        sample = get_sample(arch)
        return sample.build_model(), sample.input_shape, sample.class_names
    if ":" not in arch:
        raise AnalyzerError(f"unknown architecture {arch!r}: use one of {', '.join(SAMPLE_NAMES)}"
                            + (" or package.module:callable" if allow_import else ""))
    if not allow_import:
        raise AnalyzerError(f"architecture {arch!r} is an import path, which only the command line accepts: "
                            f"choose a sample architecture or upload a .pt2 export")
    module_name, _, attr = arch.partition(":")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module_name) or not attr.isidentifier():
        raise AnalyzerError(f"architecture {arch!r} is not package.module:ClassOrFunction: name a module and an "
                            f"nn.Module class (or a function that builds one) in it")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise AnalyzerError(f"cannot import architecture {arch!r} ({exc}): check PYTHONPATH and the name") from exc
    # Only an nn.Module class or a Python function is called: a builtin such as os:system or a class of another kind
    # is refused before it runs, so a typo cannot call something with side effects.
    if not ((isinstance(factory, type) and issubclass(factory, nn.Module)) or isinstance(factory, types.FunctionType)):
        raise AnalyzerError(f"{arch!r} is a {type(factory).__name__}, not an nn.Module class or a function that "
                            f"builds one: name the model's class")
    try:
        module = factory(**(kwargs or {}))
    except Exception as exc:  # the user's own code: say what it raised, in one line
        given = f"with {json.dumps(kwargs)}" if kwargs else "with no arguments"
        raise AnalyzerError(f"building the architecture {arch!r} {given} failed ({type(exc).__name__}: "
                            f"{first_line(exc, 160)}): pass what it needs with --arch-kwargs '{{\"name\": value}}', "
                            f"or name a function that builds the model") from exc
    if not isinstance(module, nn.Module):
        raise AnalyzerError(f"{arch!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module, None, None


def read_state_dict(data: bytes, name: str) -> dict:
    """Tensors by name from safetensors bytes or a weights-only torch file; never unpickles arbitrary objects."""
    if name.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            return dict(load_safetensors(data))
        except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
            raise AnalyzerError(f"{name!r} is not a readable safetensors file ({first_line(exc)}): "
                                f"save it again with safetensors.torch.save_file(model.state_dict(), path)") from exc
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise AnalyzerError(f"{name!r} is not a file written by torch.save (not a zip archive): "
                            f"save model.state_dict() with torch.save or safetensors")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError,
            zipfile.BadZipFile, KeyError, OSError) as exc:
        if "weights_only" in str(exc) or isinstance(exc, pickle.UnpicklingError):
            raise AnalyzerError(f"{name!r} holds pickled Python objects (such as a whole nn.Module), which are never "
                                f"unpickled here: save model.state_dict() instead, or {EXPORT_HINT}") from exc
        raise AnalyzerError(f"{name!r} could not be read as a state dict ({first_line(exc)}): "
                            f"save model.state_dict() with torch.save or safetensors") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AnalyzerError(f"{name!r} holds no state dict (a mapping of names to tensors, or a checkpoint with "
                            f"one under 'state_dict'): save model.state_dict()")
    return dict(obj)


def load_state_dict_checked(module: nn.Module, state: dict, name: str) -> None:
    """Load `state` into `module`, or say which keys are missing, unexpected or mis-shaped."""
    expected = module.state_dict()
    state = _strip_common_prefix(state, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        parts = [f"{label}: {_short_list(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise AnalyzerError(f"the state dict in {name!r} does not fit the architecture ({'; '.join(parts)}): "
                            f"check --arch matches the model that was saved")
    module.load_state_dict(state)


def _strip_common_prefix(state: dict, expected: dict) -> dict:
    # Lightning and DataParallel prefix every key ("model.", "module."); drop a prefix shared by all keys if that fits.
    if set(state) == set(expected) or not state:
        return state
    first = next(iter(state))
    if "." not in first:
        return state
    prefix = first.split(".", 1)[0] + "."
    if all(k.startswith(prefix) for k in state):
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        if set(stripped) == set(expected):
            return stripped
    return state


def _short_list(keys: list, limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")



# --- torch.export programs -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _weights_only_and_quiet():
    # torch.export.load falls back to torch.load(weights_only=False); this variable forces the safe unpickler.
    # It also logs a full traceback before raising on a broken file, which a person should not see.
    with _EXPORT_LOAD_LOCK:
        previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
            if previous is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_export_program(data: bytes, name: str):
    """torch.export.load on archive bytes that already passed `archive_policy.sanitize_export_archive`."""
    with _weights_only_and_quiet():
        try:
            return torch.export.load(io.BytesIO(data))
        except MemoryError:
            raise  # the worker answers this with its own line: it is not a broken file
        except Exception as exc:  # torch raises many types for a broken archive; all mean the same to the person
            raise AnalyzerError(f"{name!r} could not be loaded as a torch.export program ({first_line(exc)}): "
                                f"{EXPORT_HINT}") from exc


def _load_export(data: bytes, name: str) -> tuple[nn.Module, tuple]:
    """The unflattened module tree of a `.pt2` (so hooks fire) and the shape of one input sample."""
    program = load_export_program(data, name)
    input_shape = _export_input_shape(program, name)
    try:
        module = torch.export.unflatten(program)
    except Exception as exc:
        raise AnalyzerError(f"{name!r} could not be unflattened into modules ({first_line(exc)}): "
                            f"export it again with torch.export.export(..., strict=False)") from exc
    kinds = {}
    for node in program.graph.nodes:
        kind = _ATEN_KINDS.get(str(node.target).rsplit(".", 1)[0]) if node.op == "call_function" else None
        stack = node.meta.get("nn_module_stack") if kind else None
        if stack:
            path = list(stack.values())[-1][0]
            if path:
                kinds[path] = kind if kinds.get(path) != "relu_inplace" else "relu_inplace"
    module._analyzer_layer_kinds = kinds  # the graph is the only place that says what an InterpreterModule does
    return module.eval(), input_shape


def _export_input_shape(program, name: str) -> tuple:
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise AnalyzerError(f"{name!r} takes {len(user_inputs)} inputs; the dashboard analyses models with one input "
                            f"tensor: wrap the model so forward takes a single batch tensor")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    value = node.meta.get("val")
    if value is None or not hasattr(value, "shape"):
        raise AnalyzerError(f"{name!r} does not record its input shape: export it again with an example tensor")
    dtype = getattr(value, "dtype", torch.float32)
    if not (dtype.is_floating_point or dtype.is_complex):
        # token ids (a text model's input_ids) and the like: every analysis here feeds float inputs and takes
        # gradients with respect to them, so say so now instead of failing later with a misleading shape error
        raise AnalyzerError(f"{name!r} takes {str(dtype).replace('torch.', '')} inputs (token ids, for example); "
                            f"models on integer inputs are not analysed yet: export a model that takes float inputs "
                            f"(for a text model, its embeddings)")
    shape = list(value.shape)
    if isinstance(shape[0], int):
        raise AnalyzerError(f"{name!r} was exported with a fixed batch size of {shape[0]}: export it again with "
                            f"dynamic_shapes=({{0: torch.export.Dim('batch')}},)")
    if not all(isinstance(d, int) for d in shape[1:]):
        raise AnalyzerError(f"{name!r} has a dynamic dimension other than the batch: export with fixed sample shape")
    return tuple(shape[1:])


# --- describing a module ---------------------------------------------------------------------------------------------

def layer_kinds(model) -> dict:
    """Layer name -> kind ("conv2d", "linear", "relu_inplace", ...) of a LoadedModel or a plain module."""
    kinds = getattr(model, "layer_kinds", None)
    return kinds if kinds else layer_kinds_of(getattr(model, "module", model))


def layer_kinds_of(module: nn.Module) -> dict:
    kinds = dict(getattr(module, "_analyzer_layer_kinds", {}))
    for layer_name, sub in module.named_modules():
        if not layer_name or layer_name in kinds:
            continue
        if isinstance(sub, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardtanh)):
            kinds[layer_name] = "relu_inplace" if getattr(sub, "inplace", False) else "relu"
            continue
        for cls, kind in _MODULE_KINDS:
            if isinstance(sub, cls):
                kinds[layer_name] = kind
                break
    return kinds


def _describe(module: nn.Module, *, spec: str, sha256: str, source: str, input_shape, class_names,
              make_copy=None, owned: bool = True) -> LoadedModel:
    """`owned`: the module was loaded here and is kept in eval mode; a user's module (wrap_module) keeps its mode."""
    if input_shape is None:
        raise AnalyzerError("the model's input shape is unknown: pass --input-shape C,H,W (or F for tabular)")
    if owned:
        module.eval()
    input_shape = tuple(int(d) for d in input_shape)
    with analysis_mode(module):  # probed in eval mode, whatever mode the module is in; restored afterwards
        output_kind, num_classes = probe_outputs(module, input_shape, name=spec)
    if class_names is not None and len(class_names) != num_classes:
        raise AnalyzerError(f"{len(class_names)} class names given but the model has {num_classes} outputs")
    names = tuple(str(c) for c in class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    layers = tuple(n for n, _ in module.named_modules() if n)
    return LoadedModel(module=module, spec=spec, sha256=sha256, source=source, input_shape=input_shape,
                       num_classes=num_classes, class_names=names, output_kind=output_kind, layers=layers,
                       layer_kinds=layer_kinds_of(module), make_copy=make_copy)


def probe_outputs(module: nn.Module, input_shape: tuple, *, name: str) -> tuple[str, int]:
    """Run the model on a small random batch: what its output means, how many classes, and whether it is sound."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand((3, *input_shape), generator=generator)
    try:
        with torch.no_grad():
            first = module(probe)
            second = module(probe)
    except Exception as exc:
        text = first_line(exc)
        if "Guard failed" in text and "size()[0]" in text:
            raise AnalyzerError(f"{name!r} was exported with a fixed batch size ({text}): export it again with "
                                f"dynamic_shapes=({{0: torch.export.Dim('batch')}},)") from exc
        raise AnalyzerError(f"the model failed on an input of shape {tuple(probe.shape)} ({text}): check the input "
                            f"shape it expects") from exc
    if not isinstance(first, torch.Tensor):
        raise AnalyzerError(f"the model returns {type(first).__name__}, not a tensor of class scores: wrap it so "
                            f"forward returns an (N, classes) tensor")
    if first.ndim != 2 or first.shape[0] != probe.shape[0]:
        raise AnalyzerError(f"the model returns shape {tuple(first.shape)} for a batch of {probe.shape[0]}; expected "
                            f"(N, classes): regression and multi-label outputs are not supported yet")
    if not torch.isfinite(first).all():
        raise AnalyzerError("the model returns NaN or inf on a random input: check its weights")
    if not torch.equal(first, second):
        raise AnalyzerError(f"{name!r} gives different outputs for the same input (exported or left in train mode, "
                            f"so dropout is active): call model.eval() before torch.export.export and export again")
    if first.shape[1] == 1:
        in_unit = bool(((first >= 0) & (first <= 1)).all())
        return ("binary_probability" if in_unit and not _looks_like_logits(module, input_shape) else "binary_logit"), 2
    sums = first.sum(dim=1)
    if bool((first >= 0).all()) and torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        return "probabilities", int(first.shape[1])
    return "logits", int(first.shape[1])


def _looks_like_logits(module: nn.Module, input_shape: tuple) -> bool:
    # One output in [0, 1] on a random batch could still be a logit; a larger batch of wider inputs tells.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        wide = module(torch.randn((32, *input_shape), generator=generator) * 3)
    return bool(((wide < 0) | (wide > 1)).any())
