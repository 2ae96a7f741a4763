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
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import AnalyzerError, first_line
from ..guard import analysis_mode
from .hashing import sha256_bytes
from .inputs import InputLayout, ModelInput, accept_packed_inputs
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
    "aten.embedding": "embedding",
}
_MODULE_KINDS = (
    (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"), (nn.Linear, "linear"),
    (nn.modules.batchnorm._BatchNorm, "batchnorm"), (nn.Dropout, "dropout"), (nn.Embedding, "embedding"),
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
    feature_names: tuple | None = None  # what the model file calls its input features, in order (tables)
    make_copy: Callable[[], nn.Module] | None = field(default=None, compare=False, repr=False)
    input_layout: InputLayout | None = field(default=None, compare=False)  # None: one float input of input_shape

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
               arch_kwargs: dict | None = None, inputs: InputLayout | None = None):
    """Load `sample:NAME`, `PATH.pt2`, or a state dict `PATH` with `arch`, in eval mode.

    `arch` is a sample architecture's name or, only with `allow_import=True` (the command line), an import path
    `package.module:callable` that builds the module, called with `arch_kwargs` (a JSON object, recorded in the run
    so that the model can be rebuilt). `input_shape` is needed only when the architecture does not say it (an
    import path); `inputs` (`inputs.parse_inputs`) declares an import-path architecture of token ids or of several
    inputs, which then takes packed rows like a `.pt2` of such inputs.

    `isolation`: "auto" loads a model from a file in a sandboxed worker and returns a `SandboxedModel` (the built-in
    samples and an operator's import-path architecture, which are trusted code, load here); "sandbox" always uses a
    worker; "process" loads here and returns a `LoadedModel`, for files you trust (your own notebook's exports).
    """
    if isolation not in ISOLATIONS:
        raise AnalyzerError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
    if not isinstance(spec, str) or not spec:
        raise AnalyzerError("no model given: pass sample:NAME, a .pt2 export, or a state dict with --arch")
    check_arch_kwargs(arch, arch_kwargs)
    if inputs is not None and (not arch or ":" not in arch):
        raise AnalyzerError("--inputs applies to a state dict with an import-path architecture (--arch "
                            "package.module:callable) only: an export records its own inputs")
    if sandboxed(spec, arch, isolation):
        return open_sandboxed(spec, spec=spec, arch=arch, input_shape=input_shape, class_names=class_names)[0]
    if spec.startswith("sample:"):
        return _load_sample(spec)
    path = Path(spec)
    if not path.is_file():
        raise AnalyzerError(f"model file {spec!r} does not exist: check the path")
    data = path.read_bytes()
    return load_model_bytes(data, name=path.name, spec=spec, arch=arch, input_shape=input_shape,
                            class_names=class_names, allow_import=allow_import, arch_kwargs=arch_kwargs,
                            inputs=inputs)


def load_model_bytes(data: bytes, *, name: str, spec: str | None = None, arch: str | None = None,
                     input_shape: tuple | None = None, class_names: tuple | None = None,
                     allow_import: bool = False, check_archive: bool = True,
                     arch_kwargs: dict | None = None, inputs: InputLayout | None = None) -> LoadedModel:
    """Load a model from the bytes of a file called `name` in this process; see `load_model`.

    This runs the model here: for bytes you do not trust, store them and call `load_model`, which uses a worker.
    `check_archive=False` skips the archive policy, for the sandbox's own containment tests only."""
    spec = spec or name
    suffix = Path(name).suffix.lower()
    if not data:
        raise AnalyzerError(f"model file {name!r} is empty: upload the file again")
    digest = sha256_bytes(data)
    if suffix == ".pt2":
        carried = {}
        if check_archive:
            from .archive_policy import sanitize_export_archive

            checked = sanitize_export_archive(data, name)
            data, carried = checked.data, checked.names or {}  # torch only ever sees the archive we rebuilt
        module, layout = _load_export(data, name)
        return _describe(module, spec=spec, sha256=digest, source="export", input_shape=layout.sample_shape,
                         class_names=class_names or carried.get("class_names"),
                         make_copy=lambda: _load_export(data, name)[0], input_layout=layout,
                         feature_names=carried.get("feature_names"))
    if suffix in STATE_DICT_SUFFIXES:
        state = read_state_dict(data, name)  # first: a pickled whole module is told so, not to pass an architecture
        if not arch:
            from sample_models import SAMPLE_NAMES

            raise AnalyzerError(
                f"{name!r} is a state dict, which holds weights but no architecture: pass --arch with a sample "
                f"architecture ({', '.join(SAMPLE_NAMES)}) or package.module:callable, or upload a .pt2 export")
        module, arch_shape, arch_classes = _build_arch(arch, allow_import=allow_import, kwargs=arch_kwargs)
        load_state_dict_checked(module, state, name)
        carried = carried_names(data, name)
        if inputs is None:  # a sample architecture that takes token rows (text) splits them itself, as its sample
            inputs = _sample_layout(arch)
        elif inputs.packed:
            accept_packed_inputs(module, inputs)
            input_shape = inputs.sample_shape
        else:
            input_shape = inputs.inputs[0].shape
        return _describe(module, spec=spec, sha256=digest, source="state_dict", input_shape=input_shape or arch_shape,
                         # a regression sample names no classes: its model's outputs are named by their index
                         class_names=class_names or carried.get("class_names") or arch_classes or None,
                         input_layout=inputs,
                         feature_names=carried.get("feature_names"))
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
    loaded = _describe(module, spec=spec, sha256=sha256_bytes(data), source="sample", input_shape=sample.input_shape,
                       class_names=sample.class_names or None,
                       # a token sample (text) takes packed rows of its ids and mask, which its module splits itself
                       input_layout=getattr(sample.module, "INPUT_LAYOUT", None))
    from ..evaluation.tasks import read_for_task

    # a sample states its task: a regression sample's one output is its value, not a binary logit
    return read_for_task(loaded, sample.task)


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


def _sample_layout(arch: str):
    """The input layout of a sample architecture that declares one (the text sample's packed ids and mask)."""
    from sample_models import SAMPLE_NAMES, get_sample

    return getattr(get_sample(arch).module, "INPUT_LAYOUT", None) if arch in SAMPLE_NAMES else None


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


def carried_names(data: bytes, name: str) -> dict:
    """Class and feature names a safetensors file carries in its header's `__metadata__` (`save_file(...,
    metadata={"class_names": json.dumps([...]), "feature_names": json.dumps([...])})`); other files carry none.
    The header is JSON, read without the safetensors library so that nothing else of the file is parsed twice."""
    if not name.lower().endswith(".safetensors") or len(data) < 8:
        return {}
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, 100 << 20):
        return {}  # read_state_dict has refused a broken header already
    try:
        metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        return {}
    out = {}
    for key in ("class_names", "feature_names"):
        if key not in metadata:
            continue
        try:
            value = json.loads(metadata[key])
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, list) or not value or len(value) > 100_000 or len(set(value)) != len(value) or \
                not all(isinstance(v, str) and 0 < len(v) <= 256 and v.isprintable() for v in value):
            raise AnalyzerError(f"the {key} in {name!r}'s metadata are not a JSON list of distinct names: save them "
                                f"with metadata={{'{key}': json.dumps(names)}}")
        out[key] = tuple(value)
    return out


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


def _load_export(data: bytes, name: str) -> tuple[nn.Module, InputLayout]:
    """The unflattened module tree of a `.pt2` (so hooks fire) and its inputs; a module of token ids or of several
    inputs takes packed float32 rows (`inputs.accept_packed_inputs`)."""
    program = load_export_program(data, name)
    layout = _export_layout(program, name)
    try:
        with warnings.catch_warnings():
            # torch's unflatten deep-copies the program's call graph, whose specs are its own deprecated LeafSpec:
            # torch warns about itself on every .pt2 loaded, which says nothing to the person about their model
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
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
    if layout.packed:
        accept_packed_inputs(module, layout)
    return module.eval(), layout


def _export_layout(program, name: str) -> InputLayout:
    """Each user input's name, sample shape and dtype, as the program records them."""
    user_inputs = list(program.graph_signature.user_inputs)
    if not user_inputs:
        raise AnalyzerError(f"{name!r} takes no inputs: export it with an example input tensor")
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = []
    for input_name in user_inputs:
        value = placeholders[input_name].meta.get("val") if input_name in placeholders else None
        if value is None or not hasattr(value, "shape"):
            raise AnalyzerError(f"{name!r} takes {input_name!r}, which is not a tensor: wrap the model so forward "
                                f"takes tensors only (token ids, a mask, or one float batch)")
        shape = list(value.shape)
        if not shape or isinstance(shape[0], int):
            raise AnalyzerError(f"{name!r} was exported with a fixed batch size of {shape[0] if shape else 0} for "
                                f"{input_name!r}: export it again with a dynamic batch dimension, "
                                f"dynamic_shapes=({{0: torch.export.Dim('batch')}},)")
        if not all(isinstance(d, int) for d in shape[1:]):
            raise AnalyzerError(f"{name!r} has a dynamic dimension other than the batch in {input_name!r}: export "
                                f"with a fixed sample shape (pad token ids to one length)")
        dtype = str(value.dtype).replace("torch.", "")
        if value.dtype.is_complex:
            raise AnalyzerError(f"{name!r} takes complex inputs ({input_name!r}), which are not analysed")
        inputs.append(ModelInput(str(input_name), tuple(int(d) for d in shape[1:]), dtype))
    spec = program.call_spec.in_spec
    keywords = ()
    children = spec.children() if spec is not None else []
    if len(children) == 2 and children[1].context:
        keywords = tuple(str(k) for k in children[1].context)
    try:
        return InputLayout(tuple(inputs), keywords).checked()
    except AnalyzerError as exc:
        raise AnalyzerError(f"{name!r}: {exc}") from exc


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
              make_copy=None, owned: bool = True, input_layout: InputLayout | None = None,
              feature_names: tuple | None = None) -> LoadedModel:
    """`owned`: the module was loaded here and is kept in eval mode; a user's module (wrap_module) keeps its mode."""
    if input_shape is None:
        raise AnalyzerError("the model's input shape is unknown: pass --input-shape C,H,W (or F for tabular)")
    if owned:
        module.eval()
    input_shape = tuple(int(d) for d in input_shape)
    with analysis_mode(module):  # probed in eval mode, whatever mode the module is in; restored afterwards
        output_kind, num_classes = probe_outputs(module, input_shape, name=spec, layout=input_layout)
    if class_names is not None and len(class_names) != num_classes:
        raise AnalyzerError(f"{len(class_names)} class names given but the model has {num_classes} outputs")
    if feature_names is not None and (len(input_shape) != 1 or len(feature_names) != input_shape[0]):
        raise AnalyzerError(f"the model file names {len(feature_names)} features but takes inputs of shape "
                            f"{input_shape}: save one name per input feature")
    names = tuple(str(c) for c in class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    layers = tuple(n for n, _ in module.named_modules() if n)
    return LoadedModel(module=module, spec=spec, sha256=sha256, source=source, input_shape=input_shape,
                       num_classes=num_classes, class_names=names, output_kind=output_kind, layers=layers,
                       layer_kinds=layer_kinds_of(module), make_copy=make_copy,
                       feature_names=tuple(feature_names) if feature_names is not None else None,
                       input_layout=input_layout if input_layout is not None and input_layout.packed else None)


def _probe_batch(input_shape: tuple, layout: InputLayout | None, n: int, generator, scale: float = 1.0):
    """A random batch the model accepts: uniform floats, and for packed inputs token id 1 and mask 1 everywhere
    (a valid id in any vocabulary of two or more, a mask that attends to every token)."""
    if layout is not None and layout.packed:
        probe = torch.ones((n, *input_shape))
        for index, item in enumerate(layout.inputs):
            if not item.is_integer:
                start = sum(i.size for i in layout.inputs[:index])
                probe[:, start:start + item.size] = torch.rand((n, item.size), generator=generator) * scale
        return probe
    return torch.rand((n, *input_shape), generator=generator) * scale


def probe_outputs(module: nn.Module, input_shape: tuple, *, name: str, layout: InputLayout | None = None
                  ) -> tuple[str, int]:
    """Run the model on a small random batch: what its output means, how many classes, and whether it is sound."""
    generator = torch.Generator().manual_seed(0)
    probe = _probe_batch(input_shape, layout, 3, generator)
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
        looks_like_logits = _looks_like_logits(module, input_shape, layout)
        return ("binary_probability" if in_unit and not looks_like_logits else "binary_logit"), 2
    sums = first.sum(dim=1)
    if bool((first >= 0).all()) and torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        return "probabilities", int(first.shape[1])
    return "logits", int(first.shape[1])


def _looks_like_logits(module: nn.Module, input_shape: tuple, layout: InputLayout | None = None) -> bool:
    # One output in [0, 1] on a random batch could still be a logit; a larger batch of wider inputs tells.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if layout is not None and layout.packed:  # token ids cannot be widened: only the float inputs are
            wide = module(_probe_batch(input_shape, layout, 32, generator, scale=3.0))
        else:
            wide = module(torch.randn((32, *input_shape), generator=generator) * 3)
    return bool(((wide < 0) | (wide > 1)).any())
